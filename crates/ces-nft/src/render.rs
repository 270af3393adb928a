//! The policy model as one nftables table (text syntax, as `nft -f` reads it).
//!
//! Layout (docs/nft.md):
//! - `forward` (base chain, hook forward, priority filter): established and related traffic is accepted; a new flow
//!   is sent to its tenant's chain: by ingress interface for tenants that name interfaces, else by source address
//!   (interval verdict maps `tenants_v4`/`tenants_v6`, built from each tenant's members), else to `Common`.
//! - `t<i>` (one per tenant): jumps to `t<i>_cluster`, `t<i>_namespace`, `t<i>_service` in turn, then the tenant's
//!   default action. In the cluster and namespace chains `accept` is `return` (the flow goes on to the next context);
//!   `accept-decisively` is `accept`; `drop` and `reject` decide. An audit rule counts and never decides.
//! - Source sets `s<k>_v4`/`_v6` (one per model address set) and destination sets `d<k>_v4`/`_v6` (one per
//!   ExternalService) are interval sets of coalesced addresses; a rule with several source sets has a union set
//!   `u<n>_v4`/`_v6`. Source sets are declared even when empty, so pod churn only changes set elements.
//! - Schedules are `meta day`/`meta hour` matches in UTC, exact until the next offset change of the rule's time zone
//!   (`Ruleset::valid_until`), when the ruleset must be rendered again.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use ces_api::{Action, Mode};
use ces_model::{
    AddressEntry, Context, Diagnostic, ObjectRef, PolicyModel, PortMatch, Protocol, Rule, Severity, Sources,
    TenantPolicy, UtcSpan, Verdict,
};
use jiff::Timestamp;

use crate::intervals::{Intervals, first_overlap};

/// A set or map of the table, with its elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftSet {
    pub kind: SetKind,
    /// Elements in nft syntax (`10.0.0.0-10.0.255.255`, or `10.0.0.0-10.0.255.255 : jump t1` for maps).
    pub elements: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetKind {
    V4,
    V6,
    /// Interval map from IPv4 addresses to verdicts.
    VerdictMapV4,
    VerdictMapV6,
}

impl SetKind {
    fn keyword(self) -> &'static str {
        match self {
            SetKind::V4 | SetKind::V6 => "set",
            SetKind::VerdictMapV4 | SetKind::VerdictMapV6 => "map",
        }
    }
    fn type_line(self) -> &'static str {
        match self {
            SetKind::V4 => "type ipv4_addr",
            SetKind::V6 => "type ipv6_addr",
            SetKind::VerdictMapV4 => "type ipv4_addr : verdict",
            SetKind::VerdictMapV6 => "type ipv6_addr : verdict",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    /// The base-chain line (`type filter hook ...`), for base chains.
    pub hook: Option<String>,
    pub rules: Vec<String>,
}

/// How the DNS answers that teach host names' addresses reach the gateway agent (docs/nft.md, "Host names").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DnsHook {
    /// Nothing learns: host-name entries are not enforced (`ces gateway --once`: no agent runs).
    Off,
    /// The table holds answers itself, with nft's `queue` statement.
    #[default]
    Native,
    /// The agent holds answers through iptables-nft's NFQUEUE target (for kernels without nft's `queue`); the table
    /// has the learned sets but no queue line.
    External,
}

/// Where the table's DNS answers are held: the NFQUEUE number, and whether answers pass while no agent holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsQueue {
    pub num: u16,
    pub bypass: bool,
    /// The hook is the table's own `queue` line (else the agent's iptables-nft rules).
    pub native: bool,
}

/// A set of the addresses learned from DNS answers for the host names of one ExternalService in one tenant, one
/// address family. Its elements carry their own timeouts, set by the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LearnedSet {
    pub tenant: String,
    pub destination: String,
    pub v6: bool,
    /// The ExternalService's host-name and wildcard entries.
    pub names: Vec<AddressEntry>,
}

/// The tenant a DNS answer belongs to: the tenant of the client it goes to, found the way the forward chain finds a
/// new flow's tenant, reversed (an answer leaves on the interface its query came in on, towards its source).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AnswerTenants {
    /// Tenant interfaces to their tenant.
    pub interfaces: BTreeMap<String, String>,
    /// Tenants told apart by address, with their members.
    pub by_address: Vec<(String, Intervals)>,
    /// The tenant of every other client (Common, when it names no interface).
    pub otherwise: Option<String>,
}

impl AnswerTenants {
    /// The tenant of an answer leaving on `out_interface` towards `client`.
    pub fn tenant(&self, out_interface: Option<&str>, client: std::net::IpAddr) -> Option<&str> {
        if let Some(t) = out_interface.and_then(|i| self.interfaces.get(i)) {
            return Some(t);
        }
        if let Some((t, _)) = self.by_address.iter().find(|(_, iv)| iv.contains(client)) {
            return Some(t);
        }
        self.otherwise.as_deref()
    }
}

/// The stable name of a learned set: a hash of its tenant and ExternalService, so that the same set keeps its name
/// (and its elements) across policy changes and agent restarts.
pub fn learned_set_name(tenant: &str, destination: &str, v6: bool) -> String {
    // FNV-1a, 64 bits.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tenant.bytes().chain([0]).chain(destination.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("n{h:016x}_{}", if v6 { "v6" } else { "v4" })
}

/// Whether a set name is one [`learned_set_name`] makes.
pub fn is_learned_set_name(name: &str) -> bool {
    name.len() == 20
        && name.starts_with('n')
        && (name.ends_with("_v4") || name.ends_with("_v6"))
        && name[1..17].bytes().all(|b| b.is_ascii_hexdigit())
}

/// What a verdict line stands for; its id ([`crate::tags::TagIds`]) is in the line's log prefix (`ces/<id>`) and, for
/// lines that accept, in the connection's conntrack label.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogTag {
    pub tenant: String,
    pub context: Context,
    /// `Kind/namespace/name`, or `Tenant/<name>` for the default action.
    pub rule: String,
    /// What the rule does (or, in audit mode, would do): `accept`, `accept-decisively`, `drop`, `reject`.
    pub action: String,
    /// `enforce` or `audit`.
    pub mode: String,
    pub external_service: Option<String>,
}

/// A rendered table: everything `nft -f` needs, and what the gateway could not enforce.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// The table name (family `inet`).
    pub table: String,
    pub sets: BTreeMap<String, NftSet>,
    pub chains: Vec<Chain>,
    /// One warning per model entry the gateway does not enforce (host names, bandwidth, NAT), naming its object.
    pub diagnostics: Vec<Diagnostic>,
    /// When schedules must be rendered again (the next offset change of a schedule's time zone).
    pub valid_until: Option<Timestamp>,
    /// What each tag id of the table stands for (log prefixes, connection labels).
    pub log_tags: BTreeMap<u16, LogTag>,
    /// Rate-limited traffic classes, shaped on `uplinks` (HTB class `1:<10 + mark>`).
    pub shaping: Vec<ShapeClass>,
    pub uplinks: Vec<String>,
    /// Each source set stem (`s3`, `u0`) and the model address sets it is the union of, so that pod churn
    /// re-renders just the stems of the sets that moved.
    pub sources: BTreeMap<String, Vec<String>>,
    /// The sets of addresses learned from DNS answers, by name. Their elements are the agent's, never the
    /// renderer's: a replace keeps those of sets that live on.
    pub learned: BTreeMap<String, LearnedSet>,
    /// Where DNS answers are held, when the table learns names.
    pub dns_queue: Option<DnsQueue>,
    /// The tenant of each DNS answer.
    pub answer_tenants: AnswerTenants,
}

/// One rate-limited port entry of one rule: connections it accepts carry `mark` in the CES byte of the conntrack
/// mark, and their packets leaving through an uplink go to an HTB class of `bits_per_second`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeClass {
    pub mark: u8,
    pub bits_per_second: u64,
    /// `rule id | ExternalService | port entry`, for the reader.
    pub what: String,
}

/// The byte of the conntrack mark that CES owns (bits 16-23); other users' bits are left alone.
pub const CT_MARK_MASK: u32 = 0x00ff_0000;

/// A model the gateway cannot enforce at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RenderError {
    /// Two tenants that are told apart by address both hold an address: name their interfaces.
    AmbiguousAddress { a: String, b: String, address: std::net::IpAddr },
}

impl std::fmt::Display for RenderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RenderError::AmbiguousAddress { a, b, address } => write!(
                f,
                "tenants {a} and {b} both hold {address} (their pod networks or subnets overlap), and the gateway tells \
                 them apart by address: give each of them its interfaces (tenant[].gateway.interfaces in ces-conf.yaml)"
            ),
        }
    }
}

impl std::error::Error for RenderError {}

struct Renderer<'m> {
    model: &'m PolicyModel,
    at: Timestamp,
    dns: DnsHook,
    learned: BTreeMap<String, LearnedSet>,
    answer_tenants: AnswerTenants,
    sets: BTreeMap<String, NftSet>,
    /// Model address-set name to its nft set stem (`s3`).
    source_stems: BTreeMap<&'m str, String>,
    /// Destination-set id to its stem (`d2`) and intervals.
    destinations: BTreeMap<&'m str, (String, Intervals)>,
    unions: usize,
    diagnostics: Vec<Diagnostic>,
    warned: BTreeSet<(String, String)>,
    valid_until: Option<Timestamp>,
    log_tags: BTreeMap<u16, LogTag>,
    ids: crate::tags::TagIds,
    shaping: Vec<ShapeClass>,
    sources: BTreeMap<String, Vec<String>>,
}

/// Renders the model for the gateway agent, as of `at` (which fixes the UTC form of schedules), with the table's own
/// DNS queue line: what `ces compile --backend nft` shows.
pub fn render(model: &PolicyModel, at: Timestamp) -> Result<Ruleset, RenderError> {
    render_with(model, at, DnsHook::Native)
}

/// Renders the model with host names learned through `dns` (or not at all), with fresh tag ids.
pub fn render_with(model: &PolicyModel, at: Timestamp, dns: DnsHook) -> Result<Ruleset, RenderError> {
    render_tagged(model, at, dns, &mut crate::tags::TagIds::default())
}

/// Renders the model with the tag ids of `ids`, which it updates (new tags get ids, gone ones retire).
pub fn render_tagged(
    model: &PolicyModel,
    at: Timestamp,
    dns: DnsHook,
    ids: &mut crate::tags::TagIds,
) -> Result<Ruleset, RenderError> {
    ids.begin();
    let mut r = Renderer {
        model,
        at,
        dns,
        learned: BTreeMap::new(),
        answer_tenants: AnswerTenants::default(),
        sets: BTreeMap::new(),
        source_stems: BTreeMap::new(),
        destinations: BTreeMap::new(),
        unions: 0,
        diagnostics: Vec::new(),
        warned: BTreeSet::new(),
        valid_until: None,
        log_tags: BTreeMap::new(),
        ids: std::mem::take(ids),
        shaping: Vec::new(),
        sources: BTreeMap::new(),
    };
    for (k, (id, d)) in model.destination_sets.iter().enumerate() {
        let stem = format!("d{k}");
        let iv = Intervals::from_entries(&d.addresses);
        r.add_destination_sets(&stem, &iv);
        r.destinations.insert(id.as_str(), (stem, iv));
    }
    for (k, name) in model.address_sets.keys().enumerate() {
        r.source_stems.insert(name.as_str(), format!("s{k}"));
    }

    let mut chains = vec![r.forward_chain()?];
    for (i, t) in model.tenants.iter().enumerate() {
        let contexts = [
            ("cluster", Context::Cluster, &model.cluster_rules),
            ("namespace", Context::Namespace, &t.namespace_rules),
            ("service", Context::Service, &t.service_rules),
        ];
        let mut tenant_chain = Chain { name: format!("t{i}"), hook: None, rules: Vec::new() };
        let mut context_chains = Vec::with_capacity(contexts.len());
        for (label, ctx, rules) in contexts {
            let name = format!("t{i}_{label}");
            let mut lines = Vec::new();
            for rule in rules {
                r.rule_lines(t, ctx, rule, &mut lines);
            }
            tenant_chain.rules.push(format!("jump {name}"));
            context_chains.push(Chain { name, hook: None, rules: lines });
        }
        let comment = quote(&format!("tenant {} default", t.name));
        let id = r.tag(LogTag {
            tenant: t.name.clone(),
            context: Context::Default,
            rule: format!("Tenant/{}", t.name),
            action: t.default_action.as_str().to_string(),
            mode: "enforce".into(),
            external_service: None,
        });
        // Drops and rejects are always logged (they are the flow records of refused traffic); accepted connections
        // carry the tag in their label and are recorded from conntrack.
        if t.default_action != Verdict::Accept {
            tenant_chain.rules.push(r.log_line("", id));
        }
        let decided =
            if t.default_action == Verdict::Accept { crate::tags::label_statements(id) } else { String::new() };
        tenant_chain.rules.extend(verdict_lines(&decided, t.default_action, &comment));
        chains.push(tenant_chain);
        chains.extend(context_chains);
    }
    if !r.shaping.is_empty() {
        let map: Vec<String> =
            r.shaping.iter().map(|c| format!("0x{:08x} : 1:{}", (c.mark as u32) << 16, 10 + c.mark as u32)).collect();
        // Every packet of a marked connection, established ones included, goes to its class (before they are
        // accepted below).
        chains[0].rules.insert(
            0,
            format!(
                "ct mark and 0x{CT_MARK_MASK:08x} != 0x0 meta priority set ct mark and 0x{CT_MARK_MASK:08x} map {{ {} }}",
                map.join(", ")
            ),
        );
    }
    // ICMP errors about connections (destination unreachable, ...): logged under tag 0, for the records' outcomes.
    let icmp = format!(
        "ct state related meta l4proto {{ icmp, ipv6-icmp }} limit rate {}/second log prefix \"ces/0 \" group {}",
        model.settings.gateway.log_rate, model.settings.gateway.log_group
    );
    let established = chains[0].rules.iter().position(|l| l.starts_with("ct state established")).unwrap_or(0);
    chains[0].rules.insert(established, icmp);
    let settings = &model.settings.gateway.dns;
    let dns_queue = (!r.learned.is_empty() && dns != DnsHook::Off).then_some(DnsQueue {
        num: settings.queue,
        bypass: settings.pass_when_agent_down,
        native: dns == DnsHook::Native,
    });
    if let Some(q) = dns_queue.filter(|q| q.native) {
        // First of all (the established accept below would end the chain): answers to the clients' queries.
        let at = usize::from(!r.shaping.is_empty());
        chains[0].rules.insert(
            at,
            format!(
                "meta l4proto {{ tcp, udp }} th sport 53 ct direction reply queue num {}{}",
                q.num,
                if q.bypass { " bypass" } else { "" }
            ),
        );
    }
    chains.extend(r.nat_chain());
    *ids = std::mem::take(&mut r.ids);
    ids.finish((at.as_nanosecond() / 1000) as i64);
    Ok(Ruleset {
        table: model.settings.gateway.table.clone(),
        sets: r.sets,
        chains,
        diagnostics: r.diagnostics,
        valid_until: r.valid_until,
        log_tags: r.log_tags,
        shaping: r.shaping,
        uplinks: model.settings.gateway.uplinks.clone(),
        sources: r.sources,
        learned: r.learned,
        dns_queue,
        answer_tenants: r.answer_tenants,
    })
}

/// The address entries of one family as nft writes them: networks through `net`, ranges as `a-b`.
fn of_family(entries: &[AddressEntry], v4: bool, net: impl Fn(&ipnet::IpNet) -> String) -> Vec<String> {
    entries
        .iter()
        .filter_map(|a| match a {
            AddressEntry::Net(n) if n.addr().is_ipv4() == v4 => Some(net(n)),
            AddressEntry::Range(x, y) if x.is_ipv4() == v4 => Some(format!("{x}-{y}")),
            _ => None,
        })
        .collect()
}

/// The addresses from `a` to `b` (one family), at most `max`.
fn spell_out(a: std::net::IpAddr, b: std::net::IpAddr, max: usize) -> Vec<std::net::IpAddr> {
    let n = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(v) => u32::from(v) as u128,
        std::net::IpAddr::V6(v) => u128::from(v),
    };
    let (lo, hi) = (n(a), n(b));
    (lo..=hi)
        .take(max)
        .map(|x| if a.is_ipv4() { std::net::IpAddr::V4((x as u32).into()) } else { std::net::IpAddr::V6(x.into()) })
        .collect()
}

/// The lines that give `verdict` to packets matching `matches`, counted: one for `accept` and `drop`, two for
/// `reject` (a TCP reset for TCP, an ICMP unreachable for everything else).
fn verdict_lines(matches: &str, verdict: Verdict, comment: &str) -> Vec<String> {
    let parts: &[(&str, &str)] = match verdict {
        Verdict::Accept => &[("", "accept")],
        Verdict::Drop => &[("", "drop")],
        Verdict::Reject => &[("meta l4proto tcp", "reject with tcp reset"), ("", "reject with icmpx admin-prohibited")],
    };
    parts
        .iter()
        .map(|(extra, v)| {
            let m: Vec<&str> = [matches, extra].into_iter().filter(|s| !s.is_empty()).collect();
            let m = m.join(" ");
            if m.is_empty() {
                format!("counter {v} comment {comment}")
            } else {
                format!("{m} counter {v} comment {comment}")
            }
        })
        .collect()
}

/// A quoted nft comment: at most 120 bytes, no quotes.
fn quote(s: &str) -> String {
    let mut c: String = s.chars().filter(|c| *c != '"' && *c != '\\' && !c.is_control()).collect();
    while c.len() > 120 {
        c.pop();
    }
    format!("\"{c}\"")
}

fn object_of(rule: &Rule) -> ObjectRef {
    ObjectRef::new(rule.kind.as_str(), rule.namespace.as_deref(), &rule.name)
}

const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

fn hms(sec: u32) -> String {
    format!("\"{:02}:{:02}:{:02}\"", sec / 3600, sec / 60 % 60, sec % 60)
}

/// `meta day`/`meta hour` matches for UTC spans, grouped by hours. The end is exclusive, nft's range inclusive.
fn schedule_matches(spans: &[UtcSpan]) -> Vec<String> {
    let mut by_hours: BTreeMap<(u32, u32), Vec<u8>> = BTreeMap::new();
    for s in spans {
        by_hours.entry((s.start, s.end)).or_default().push(s.day);
    }
    by_hours
        .into_iter()
        .map(|((start, end), days)| {
            let days: Vec<&str> = days.iter().map(|d| DAYS[*d as usize]).collect();
            let day = if days.len() == 1 {
                format!("meta day \"{}\"", days[0])
            } else {
                format!("meta day {{ {} }}", days.iter().map(|d| format!("\"{d}\"")).collect::<Vec<_>>().join(", "))
            };
            if start == 0 && end == 86_400 { day } else { format!("{day} meta hour {}-{}", hms(start), hms(end - 1)) }
        })
        .collect()
}

fn port_match(p: &PortMatch, v4: bool) -> String {
    let ports = if p.ports.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = p.ports.iter().map(|r| r.to_string()).collect();
        format!(" th dport {{ {} }}", list.join(", "))
    };
    match (p.protocol, ports.is_empty()) {
        (Protocol::Tcp, _) => format!("meta l4proto tcp{ports}"),
        (Protocol::Udp, _) => format!("meta l4proto udp{ports}"),
        (Protocol::Icmp, _) => (if v4 { "meta l4proto icmp" } else { "meta l4proto ipv6-icmp" }).to_string(),
        (Protocol::Any, false) => format!("meta l4proto {{ tcp, udp }}{ports}"),
        (Protocol::Any, true) => String::new(),
    }
}

/// The `<stem>_v4` and `<stem>_v6` sets of a rule's sources: the union of these model address sets, coalesced,
/// declared even when empty (so that pod churn changes elements only). The renderer and the pod-churn update both
/// build them here.
pub(crate) fn source_sets(model: &PolicyModel, stem: &str, names: &[String]) -> [(String, NftSet); 2] {
    let parts: Vec<Intervals> = names
        .iter()
        .map(|n| Intervals::from_nets(model.address_sets.get(n).map_or(&[][..], |s| &s.addresses)))
        .collect();
    let iv = Intervals::union(&parts);
    [
        (format!("{stem}_v4"), NftSet { kind: SetKind::V4, elements: iv.elements_v4() }),
        (format!("{stem}_v6"), NftSet { kind: SetKind::V6, elements: iv.elements_v6() }),
    ]
}

impl<'m> Renderer<'m> {
    /// Registers a tag; returns its id.
    fn tag(&mut self, tag: LogTag) -> u16 {
        let id = self.ids.id(&tag);
        self.log_tags.insert(id, tag);
        id
    }

    /// A line that logs matching packets to the NFLOG group under tag `id`, rate-limited, and gives no verdict.
    fn log_line(&self, matches: &str, id: u16) -> String {
        let g = &self.model.settings.gateway;
        let m = if matches.is_empty() { String::new() } else { format!("{matches} ") };
        format!("{m}limit rate {}/second log prefix \"ces/{id} \" group {}", g.log_rate, g.log_group)
    }

    fn warn(&mut self, object: ObjectRef, message: String) {
        if self.warned.insert((object.to_string(), message.clone())) {
            self.diagnostics.push(Diagnostic {
                severity: Severity::Warning,
                object: Some(object),
                origin: None,
                reason: "NotEnforced".into(),
                message,
            });
        }
    }

    /// Declares a destination's `<stem>_v4` and `<stem>_v6`, each when it has elements.
    fn add_destination_sets(&mut self, stem: &str, iv: &Intervals) {
        if !iv.v4.is_empty() {
            self.sets.insert(format!("{stem}_v4"), NftSet { kind: SetKind::V4, elements: iv.elements_v4() });
        }
        if !iv.v6.is_empty() {
            self.sets.insert(format!("{stem}_v6"), NftSet { kind: SetKind::V6, elements: iv.elements_v6() });
        }
    }

    fn forward_chain(&mut self) -> Result<Chain, RenderError> {
        let model = self.model;
        let mut rules = vec!["ct state established,related accept".to_string()];
        let mut ifaces = Vec::new();
        let mut by_address: Vec<(usize, Intervals)> = Vec::new();
        for (i, t) in model.tenants.iter().enumerate() {
            if t.backend.gateway_interfaces.is_empty() {
                let members = model.address_sets.get(&t.members).map(|s| &s.addresses[..]).unwrap_or(&[]);
                by_address.push((i, Intervals::from_nets(members)));
            } else {
                ifaces.extend(t.backend.gateway_interfaces.iter().map(|n| format!("\"{n}\" : jump t{i}")));
            }
        }
        for (x, (i, a)) in by_address.iter().enumerate() {
            for (j, b) in &by_address[x + 1..] {
                if let Some(address) = first_overlap(a, b) {
                    let name = |k: &usize| model.tenants[*k].name.clone();
                    return Err(RenderError::AmbiguousAddress { a: name(i), b: name(j), address });
                }
            }
        }
        if !ifaces.is_empty() {
            rules.push(format!("iifname vmap {{ {} }}", ifaces.join(", ")));
        }
        for t in &model.tenants {
            for i in &t.backend.gateway_interfaces {
                self.answer_tenants.interfaces.insert(i.clone(), t.name.clone());
            }
        }
        self.answer_tenants.by_address =
            by_address.iter().map(|(i, iv)| (model.tenants[*i].name.clone(), iv.clone())).collect();
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (i, iv) in &by_address {
            v4.extend(iv.elements_v4().into_iter().map(|e| format!("{e} : jump t{i}")));
            v6.extend(iv.elements_v6().into_iter().map(|e| format!("{e} : jump t{i}")));
        }
        self.sets.insert("tenants_v4".into(), NftSet { kind: SetKind::VerdictMapV4, elements: v4 });
        self.sets.insert("tenants_v6".into(), NftSet { kind: SetKind::VerdictMapV6, elements: v6 });
        rules.push("ip saddr vmap @tenants_v4".into());
        rules.push("ip6 saddr vmap @tenants_v6".into());
        if let Some(c) = model.tenants.iter().position(|t| t.name == ces_model::COMMON_TENANT)
            && model.tenants[c].backend.gateway_interfaces.is_empty()
        {
            rules.push(format!("jump t{c}"));
            self.answer_tenants.otherwise = Some(model.tenants[c].name.clone());
        }
        Ok(Chain {
            name: "forward".into(),
            hook: Some("type filter hook forward priority filter; policy accept;".into()),
            rules,
        })
    }

    /// The source match stem of a rule for tenant `t`: `None` for every source, `Some(None)` when the rule has no
    /// source in this tenant (it is left out of the tenant's chain), `Some(Some(stem))` otherwise.
    fn source_stem(&mut self, t: &TenantPolicy, rule: &Rule) -> Option<Option<String>> {
        let Sources::Sets(names) = &rule.sources else { return None };
        Some(self.sets_stem(t, names))
    }

    /// The stem of the source sets holding `names`' sets of tenant `t` (a union when several); `None` when none is
    /// the tenant's.
    fn sets_stem(&mut self, t: &TenantPolicy, names: &[String]) -> Option<String> {
        let mine: Vec<&str> = names
            .iter()
            .filter(|n| self.model.address_sets.get(*n).is_some_and(|s| s.tenant == t.name))
            .map(String::as_str)
            .collect();
        let stem = match mine.as_slice() {
            [] => return None,
            [one] => self.source_stems[one].clone(),
            _ => {
                self.unions += 1;
                format!("u{}", self.unions - 1)
            }
        };
        if !self.sources.contains_key(&stem) {
            let names: Vec<String> = mine.iter().map(|n| n.to_string()).collect();
            self.sets.extend(source_sets(self.model, &stem, &names));
            self.sources.insert(stem.clone(), names);
        }
        Some(stem)
    }

    /// The postrouting chain that gives accepted flows of ExternalIPRules' sources their egress address
    /// (docs/nft.md, "Source NAT"): per tenant, its rules in priority order; the first that matches translates.
    /// Packets the forward chain refused never get here.
    fn nat_chain(&mut self) -> Option<Chain> {
        let model = self.model;
        let all_ifaces: Vec<String> =
            model.tenants.iter().flat_map(|t| t.backend.gateway_interfaces.iter().map(|i| quote(i))).collect();
        let mut rules = Vec::new();
        for t in &model.tenants {
            // The tenant the packet entered in, as the forward chain tells: by interface, else by address (then
            // not from any tenant's interface).
            let tenant_match = if !t.backend.gateway_interfaces.is_empty() {
                let mine: Vec<String> = t.backend.gateway_interfaces.iter().map(|i| quote(i)).collect();
                format!("iifname {{ {} }} ", mine.join(", "))
            } else if !all_ifaces.is_empty() {
                format!("iifname != {{ {} }} ", all_ifaces.join(", "))
            } else {
                String::new()
            };
            for nat in &t.nat_rules {
                let Some(stem) = self.sets_stem(t, &nat.sources) else { continue };
                for v4 in [true, false] {
                    let (fam, suffix) = if v4 { ("ip", "v4") } else { ("ip6", "v6") };
                    let to = of_family(&nat.external_addresses, v4, |n| n.addr().to_string());
                    if to.is_empty() {
                        continue;
                    }
                    let mut m = format!("{tenant_match}{fam} saddr @{stem}_{suffix}");
                    let dst = of_family(&nat.destination_addresses, v4, |n| n.to_string());
                    if !nat.destination_addresses.is_empty() {
                        if dst.is_empty() {
                            continue; // destinations of the other family only
                        }
                        m += &format!(" {fam} daddr {{ {} }}", dst.join(", "));
                    }
                    let ports: Vec<String> = nat
                        .destination_ports
                        .iter()
                        .map(|p| if p.start == p.end { p.start.to_string() } else { format!("{}-{}", p.start, p.end) })
                        .collect();
                    match (nat.destination_protocol, ports.is_empty()) {
                        (Some(p), true) => m += &format!(" meta l4proto {}", p.as_str()),
                        (Some(p), false) => m += &format!(" {} dport {{ {} }}", p.as_str(), ports.join(", ")),
                        (None, false) => {
                            m += &format!(" meta l4proto {{ tcp, udp }} th dport {{ {} }}", ports.join(", "))
                        }
                        (None, true) => {}
                    }
                    // One address or range: `persistent` keeps a client on one address; several: a hash of the
                    // source picks one, the same while the pod keeps its address.
                    let action = match to.as_slice() {
                        [one] => format!("snat {fam} to {one} persistent"),
                        _ => {
                            // The map's values are addresses: ranges are spelled out (at most 256 addresses).
                            let many: Vec<String> = nat
                                .external_addresses
                                .iter()
                                .flat_map(|a| match a {
                                    AddressEntry::Net(n) if n.addr().is_ipv4() == v4 => vec![n.addr()],
                                    AddressEntry::Range(x, y) if x.is_ipv4() == v4 => spell_out(*x, *y, 256),
                                    _ => Vec::new(),
                                })
                                .take(256)
                                .map(|a| a.to_string())
                                .collect();
                            let map: Vec<String> = many.iter().enumerate().map(|(i, a)| format!("{i} : {a}")).collect();
                            format!("snat {fam} to jhash {fam} saddr mod {} map {{ {} }}", many.len(), map.join(", "))
                        }
                    };
                    rules.push(format!("{m} {action} comment {}", quote(&nat.id)));
                }
            }
        }
        (!rules.is_empty()).then(|| Chain {
            name: "postrouting".into(),
            hook: Some("type nat hook postrouting priority srcnat; policy accept;".into()),
            rules,
        })
    }

    /// Declares the learned sets of `destination`'s names in tenant `t` (both families); returns their stem.
    fn learned_stem(&mut self, t: &TenantPolicy, destination: &str, names: Vec<AddressEntry>) -> String {
        for v6 in [false, true] {
            let set =
                LearnedSet { tenant: t.name.clone(), destination: destination.to_string(), v6, names: names.clone() };
            self.learned.insert(learned_set_name(&t.name, destination, v6), set);
        }
        learned_set_name(&t.name, destination, false).trim_end_matches("_v4").to_string()
    }

    fn rule_lines(&mut self, t: &TenantPolicy, ctx: Context, rule: &'m Rule, out: &mut Vec<String>) {
        let source = match self.source_stem(t, rule) {
            Some(None) => return,
            Some(Some(stem)) => Some(stem),
            None => None,
        };
        let object = object_of(rule);
        let schedules = match &rule.schedule {
            None => vec![String::new()],
            Some(s) => {
                let (spans, until) = s.utc_week(self.at);
                if let Some(u) = until {
                    self.valid_until = Some(self.valid_until.map_or(u, |v| v.min(u)));
                }
                schedule_matches(&spans)
            }
        };
        let comment = quote(&rule.id);
        let verdict = match (rule.mode, rule.action) {
            (Mode::Audit, _) => None,
            (_, Action::Accept) if ctx != Context::Service => Some(("return", None)),
            (_, Action::Accept | Action::AcceptDecisively) => Some(("accept", Some(Verdict::Accept))),
            (_, Action::Drop) => Some(("drop", Some(Verdict::Drop))),
            (_, Action::Reject) => Some(("reject", Some(Verdict::Reject))),
        };
        for dest_id in &rule.destinations {
            let Some(d) = self.model.destination_sets.get(dest_id) else { continue };
            let names: Vec<AddressEntry> = d.addresses.iter().filter(|e| e.is_name()).cloned().collect();
            let learned = if names.is_empty() {
                None
            } else if self.dns == DnsHook::Off {
                for e in &names {
                    self.warn(
                        object.clone(),
                        format!(
                            "not enforced without the gateway agent: host name {} of ExternalService {dest_id} (the agent learns names' addresses from DNS answers; `ces gateway --once` runs none)",
                            e
                        ),
                    );
                }
                None
            } else {
                Some(self.learned_stem(t, dest_id, names))
            };
            // A mark per rate-limited port entry (when the gateway has uplinks to shape on).
            let mut marks: Vec<Option<String>> = Vec::with_capacity(d.ports.len());
            for p in &d.ports {
                let entry = p.name.clone().unwrap_or_else(|| p.protocol.to_string());
                let mark = match &p.bandwidth {
                    None => None,
                    Some(ces_model::Bandwidth::IRule(name)) => {
                        self.warn(
                            object.clone(),
                            format!("not enforced by the nft backend: bandwidth of port entry {entry} of ExternalService {dest_id} names the BIG-IP iRule {name}"),
                        );
                        None
                    }
                    Some(ces_model::Bandwidth::BitsPerSecond(bps))
                        if verdict.is_some_and(|(v, _)| v != "drop" && v != "reject") =>
                    {
                        if self.model.settings.gateway.uplinks.is_empty() {
                            self.warn(
                                object.clone(),
                                format!("not enforced by the nft backend: bandwidth of port entry {entry} of ExternalService {dest_id} needs gateway.uplinks (the interfaces to shape on)"),
                            );
                            None
                        } else if self.shaping.len() >= 254 {
                            self.warn(object.clone(), format!("not enforced by the nft backend: more than 254 rate limits; port entry {entry} of ExternalService {dest_id} is not shaped"));
                            None
                        } else {
                            let mark = self.shaping.len() as u8 + 1;
                            self.shaping.push(ShapeClass {
                                mark,
                                bits_per_second: *bps,
                                what: format!("{} | {dest_id} | {entry}", rule.id),
                            });
                            Some(format!(
                                "ct mark set ct mark and 0x{:08x} or 0x{:08x}",
                                !CT_MARK_MASK,
                                (mark as u32) << 16
                            ))
                        }
                    }
                    Some(_) => None,
                };
                marks.push(mark);
            }
            let (stem, iv) = self.destinations[dest_id.as_str()].clone();
            // The destination's addresses, and the addresses learned for its names: the same rule either way.
            let mut daddrs: Vec<(bool, &str, String)> = Vec::new();
            for (v4, fam) in [(true, "ip"), (false, "ip6")] {
                let suffix = if v4 { "v4" } else { "v6" };
                if (v4 && !iv.v4.is_empty()) || (!v4 && !iv.v6.is_empty()) {
                    daddrs.push((v4, fam, format!("@{stem}_{suffix}")));
                }
                if let Some(l) = &learned {
                    daddrs.push((v4, fam, format!("@{l}_{suffix}")));
                }
            }
            for (v4, fam, daddr) in daddrs {
                let suffix = if v4 { "v4" } else { "v6" };
                let mut base = String::new();
                if let Some(s) = &source {
                    let _ = write!(base, "{fam} saddr @{s}_{suffix} ");
                }
                let _ = write!(base, "{fam} daddr {daddr}");
                let ports: Vec<(String, Option<String>)> = if d.ports.is_empty() {
                    vec![(String::new(), None)]
                } else {
                    d.ports.iter().zip(&marks).map(|(p, mark)| (port_match(p, v4), mark.clone())).collect()
                };
                for (port, mark) in &ports {
                    for sched in &schedules {
                        let m: Vec<&str> = [base.as_str(), port.as_str(), sched.as_str()]
                            .into_iter()
                            .filter(|s| !s.is_empty())
                            .collect();
                        let m = m.join(" ");
                        // The verdict lines mark the connection for shaping; logging lines do not.
                        let marked = match mark {
                            Some(mk) => format!("{m} {mk}"),
                            None => m.clone(),
                        };
                        let id = self.tag(LogTag {
                            tenant: t.name.clone(),
                            context: ctx,
                            rule: rule.id.clone(),
                            action: rule.action.as_str().to_string(),
                            mode: if verdict.is_none() { "audit" } else { "enforce" }.to_string(),
                            external_service: Some(dest_id.clone()),
                        });
                        // Audit hits, drops and rejects are always logged (they are flow records). Accepted connections
                        // are recorded from conntrack, each once, whatever `logging` says.
                        let logged = matches!(verdict, None | Some((_, Some(Verdict::Drop | Verdict::Reject))));
                        if logged {
                            out.push(self.log_line(&m, id));
                        }
                        match verdict {
                            None => out.push(format!("{m} counter comment {}", quote(&format!("audit {}", rule.id)))),
                            Some(("return", _)) => out.push(format!("{marked} counter return comment {comment}")),
                            Some((_, Some(Verdict::Accept))) => {
                                // The deciding line writes its tag into the connection's label.
                                let decided = format!("{marked} {}", crate::tags::label_statements(id));
                                out.extend(verdict_lines(&decided, Verdict::Accept, &comment))
                            }
                            Some((_, Some(v))) => out.extend(verdict_lines(&marked, v, &comment)),
                            Some(_) => unreachable!("every verdict but return has one"),
                        }
                    }
                }
            }
        }
    }
}

/// The objects of a table in the kernel, read from `nft list table`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Existing {
    /// `(set|map, name)`.
    pub sets: Vec<(String, String)>,
    pub chains: Vec<String>,
}

impl Existing {
    /// Reads the names of the sets, maps and chains from `nft list table` output.
    pub fn parse(listing: &str) -> Existing {
        let mut e = Existing::default();
        for line in listing.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [kind @ ("set" | "map"), name, "{"] => e.sets.push((kind.to_string(), name.to_string())),
                ["chain", name, "{"] => e.chains.push(name.to_string()),
                _ => {}
            }
        }
        e
    }
}

/// The element changes from `before` to `now` of set `name`, for [`crate::netlink`]; `None` when an element is not
/// one netlink updates carry.
pub fn set_update(name: &str, before: &NftSet, now: &NftSet) -> Option<crate::netlink::SetUpdate> {
    let new: BTreeSet<&String> = now.elements.iter().collect();
    let old: BTreeSet<&String> = before.elements.iter().collect();
    let parse = |texts: Vec<&&String>| -> Option<Vec<crate::netlink::Element>> {
        texts.into_iter().map(|t| crate::netlink::Element::parse(t).filter(|e| e.plain())).collect()
    };
    Some(crate::netlink::SetUpdate {
        set: name.to_string(),
        remove: parse(old.difference(&new).collect())?,
        add: parse(new.difference(&old).collect())?,
    })
}

/// An `nft` transaction that sets the elements of these sets (flushed, then filled).
pub fn refill_transaction(table: &str, sets: &BTreeMap<String, NftSet>) -> String {
    let mut s = String::new();
    for (name, set) in sets {
        let _ = writeln!(s, "flush {} inet {table} {name}", set.kind.keyword());
        if !set.elements.is_empty() {
            let _ = writeln!(s, "add element inet {table} {name} {{ {} }}", set.elements.join(", "));
        }
    }
    s
}

impl Ruleset {
    fn text(&self, with_elements: bool) -> String {
        let mut s = format!("table inet {} {{\n", self.table);
        for (name, set) in &self.sets {
            let _ = writeln!(s, "\t{} {name} {{\n\t\t{}\n\t\tflags interval", set.kind.keyword(), set.kind.type_line());
            if with_elements && !set.elements.is_empty() {
                let _ = writeln!(s, "\t\telements = {{ {} }}", set.elements.join(", "));
            }
            s.push_str("\t}\n");
        }
        for (name, set) in &self.learned {
            let ty = if set.v6 { "ipv6_addr" } else { "ipv4_addr" };
            let _ = writeln!(s, "\tset {name} {{\n\t\ttype {ty}\n\t\tflags timeout\n\t}}");
        }
        for c in &self.chains {
            let _ = writeln!(s, "\tchain {} {{", c.name);
            if let Some(h) = &c.hook {
                let _ = writeln!(s, "\t\t{h}");
            }
            for r in &c.rules {
                let _ = writeln!(s, "\t\t{r}");
            }
            s.push_str("\t}\n");
        }
        s.push_str("}\n");
        s
    }

    /// The whole table as `nft -f` text (what `ces compile --backend nft` writes).
    pub fn to_text(&self) -> String {
        self.text(true)
    }

    /// One transaction that makes the table equal to this ruleset, whatever it held. When the table exists
    /// (`existing` lists its sets, maps and chains) it is adopted, not recreated: every chain and set is flushed and
    /// refilled, and only objects this ruleset no longer has are deleted. A set that lives on keeps answering
    /// lookups with its old elements until the new ones are in; a recreated set would be empty for an instant after
    /// the new rules are live (seen in the lab as refused connections during agent restarts).
    pub fn replace_transaction(&self, existing: Option<&Existing>) -> String {
        let t = &self.table;
        let Some(existing) = existing else { return self.to_text() };
        let mut s = String::new();
        for c in &existing.chains {
            let _ = writeln!(s, "flush chain inet {t} {c}");
        }
        // A learned set that lives on keeps its elements: they are what clients were told, each with its own timeout.
        let learned = |keyword: &str, name: &str| keyword == "set" && self.learned.contains_key(name);
        for (keyword, name) in existing.sets.iter().filter(|(k, n)| !learned(k, n)) {
            let _ = writeln!(s, "flush {keyword} inet {t} {name}");
        }
        for c in existing.chains.iter().filter(|c| !self.chains.iter().any(|n| &n.name == *c)) {
            let _ = writeln!(s, "delete chain inet {t} {c}");
        }
        for (keyword, name) in &existing.sets {
            let keep = self.sets.get(name).is_some_and(|set| set.kind.keyword() == keyword) || learned(keyword, name);
            if !keep {
                let _ = writeln!(s, "delete {keyword} inet {t} {name}");
            }
        }
        s + &self.to_text()
    }

    /// Whether a table loaded from `previous` becomes this ruleset by changing set elements only: the same table,
    /// chains, and set and map declarations.
    pub fn same_structure(&self, previous: &Ruleset) -> bool {
        self.structure_change(previous).is_none()
    }

    /// What differs from `previous` beyond set elements (what makes a change replace the table), if anything.
    pub fn structure_change(&self, previous: &Ruleset) -> Option<String> {
        if self.table != previous.table {
            return Some("the table's name".into());
        }
        if self.chains.len() != previous.chains.len() {
            return Some("the number of chains".into());
        }
        if let Some((c, _)) = self.chains.iter().zip(&previous.chains).find(|(a, b)| a != b) {
            return Some(format!("chain {}", c.name));
        }
        if !self.learned.keys().eq(previous.learned.keys()) {
            return Some("the learned sets".into());
        }
        if self.dns_queue != previous.dns_queue {
            return Some("the DNS queue".into());
        }
        let same_sets = self.sets.len() == previous.sets.len()
            && self.sets.iter().zip(&previous.sets).all(|((n, s), (pn, ps))| n == pn && s.kind == ps.kind);
        if !same_sets {
            return Some("the sets".into());
        }
        None
    }

    /// The sets whose elements differ from `previous`'s (of the same structure).
    pub fn changed_sets(&self, previous: &Ruleset) -> BTreeMap<String, NftSet> {
        self.sets
            .iter()
            .filter(|(name, set)| previous.sets.get(*name).is_none_or(|p| p.elements != set.elements))
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_existing_table_is_adopted_not_recreated() {
        let rs = Ruleset {
            table: "ces".into(),
            sets: [("s0_v4".to_string(), NftSet { kind: SetKind::V4, elements: vec!["10.0.0.1".into()] })].into(),
            chains: vec![Chain {
                name: "forward".into(),
                hook: Some("type filter hook forward priority filter; policy accept;".into()),
                rules: vec!["ip saddr @s0_v4 drop".into()],
            }],
            ..Ruleset::default()
        };
        let listing = "table inet ces {\n\tset s0_v4 {\n\t\ttype ipv4_addr\n\t}\n\tmap tenants_v4 {\n\t}\n\tchain forward {\n\t}\n\tchain t9 {\n\t}\n}\n";
        let existing = Existing::parse(listing);
        assert_eq!(existing.chains, ["forward", "t9"]);
        let tx = rs.replace_transaction(Some(&existing));
        assert!(!tx.contains("delete table"), "never recreate a live table:\n{tx}");
        for line in [
            "flush chain inet ces forward",
            "flush chain inet ces t9",
            "flush set inet ces s0_v4",
            "flush map inet ces tenants_v4",
            "delete chain inet ces t9",
            "delete map inet ces tenants_v4",
        ] {
            assert!(tx.lines().any(|l| l == line), "missing `{line}` in:\n{tx}");
        }
        assert!(!tx.contains("delete set inet ces s0_v4"), "a set that lives on is kept:\n{tx}");
        assert!(tx.ends_with(&rs.to_text()));
        assert_eq!(rs.replace_transaction(None), rs.to_text(), "a new table is simply created");
    }
}
