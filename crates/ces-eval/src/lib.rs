//! The CES evaluator: the single definition of what the policy model means for a flow.
//!
//! `ces simulate` uses it, and every data plane is tested against it. The semantics (docs/semantics.md):
//! a flow carries the tenant where it enters the data plane, and only that tenant's source sets match it;
//! three contexts run in order (cluster, the flow tenant's namespace rules, its service rules); inside a context
//! the first matching rule acts: `accept` ends the context (and accepts in the service context),
//! `accept-decisively` accepts at once, `drop` and `reject` decide at once. A rule outside its schedule does not
//! take part; an `audit` rule is reported and ignored. When nothing decides, the tenant's default action does.
//!
//! [`Evaluator::decide`] finds candidate rules through an index of source addresses; [`Evaluator::decide_by_scan`]
//! considers every rule. Both feed the same decision function, and the tests check that they always agree.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use ces_api::{Action, Mode};
use ces_model::{
    AddressEntry, COMMON_TENANT, Context, Destination, DestinationSet, PolicyModel, Protocol, Rule, Sources,
    TenantPolicy, Verdict, parse_decimal,
};
use ipnet::IpNet;
use jiff::Timestamp;
use serde::Serialize;

/// A flow to decide.
#[derive(Clone, Debug, PartialEq)]
pub struct Flow {
    pub source: IpAddr,
    /// The tenant where the flow enters the data plane: the route domain on a BIG-IP, the ingress interface group on
    /// the gateway. Only this tenant's source sets (and cluster rules without a namespace selector) can match it.
    /// [`Evaluator::tenant_of`] finds it from an address when nothing else tells.
    pub tenant: String,
    pub destination: Destination,
    /// `Tcp`, `Udp` or `Icmp`.
    pub protocol: Protocol,
    /// The destination port, for TCP and UDP.
    pub port: Option<u16>,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub verdict: Verdict,
    pub tenant: String,
    pub decided_by: DecidedBy,
    /// Every rule the flow matched, in evaluation order, with what it did.
    pub trail: Vec<TrailEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DecidedBy {
    pub context: Context,
    /// `Kind/namespace/name` (`ClusterEgressRule/name`), or `Tenant/<name>` for the default action.
    pub rule: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_service: Option<String>,
    /// The matching port entry: its name, or `protocol:ports`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    pub logging: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Effect {
    /// The rule gave the verdict.
    Decided,
    /// `accept` in the cluster or namespace context: the flow goes on to the next context.
    NextContext,
    /// An `audit` rule matched; it would have done `action`, and was ignored.
    Audit,
    /// The rule would have matched but its schedule does not hold now.
    OutsideSchedule,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Decided => "decided",
            Effect::NextContext => "next-context",
            Effect::Audit => "audit",
            Effect::OutsideSchedule => "outside-schedule",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrailEntry {
    pub context: Context,
    pub rule: String,
    pub action: Action,
    pub effect: Effect,
    pub external_service: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EvalError {
    UnknownTenant(String),
    /// The address is a source of several tenants (overlapping pod networks); say which tenant the flow enters.
    AmbiguousSource(IpAddr, Vec<String>),
    /// An IPv4 source cannot reach an IPv6 destination, nor the reverse: no data plane sees such a flow.
    FamilyMismatch(IpAddr, IpAddr),
}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EvalError::UnknownTenant(t) => write!(f, "unknown tenant `{t}`"),
            EvalError::AmbiguousSource(ip, ts) => write!(
                f,
                "{ip} is a source address of several tenants ({}); give the tenant the flow enters (--tenant), or the source as NAMESPACE/POD",
                ts.join(", ")
            ),
            EvalError::FamilyMismatch(src, dst) => {
                let fam = |ip: &IpAddr| if ip.is_ipv4() { "IPv4" } else { "IPv6" };
                write!(f, "source {src} is {} but destination {dst} is {}: no such flow exists", fam(src), fam(dst))
            }
        }
    }
}

impl std::error::Error for EvalError {}

/// A rule with its destination sets resolved.
struct Compiled<'m> {
    rule: &'m Rule,
    destinations: Vec<&'m DestinationSet>,
}

/// Rules of one context, with the rules each source set brings in.
struct ContextIndex<'m> {
    rules: Vec<Compiled<'m>>,
    any_source: Vec<u32>,
    by_set: HashMap<u32, Vec<u32>>,
}

impl<'m> ContextIndex<'m> {
    fn new(model: &'m PolicyModel, rules: &'m [Rule], set_ids: &HashMap<&str, u32>) -> ContextIndex<'m> {
        let mut any_source = Vec::new();
        let mut by_set: HashMap<u32, Vec<u32>> = HashMap::new();
        for (i, r) in rules.iter().enumerate() {
            match &r.sources {
                Sources::Any => any_source.push(i as u32),
                Sources::Sets(sets) => {
                    for s in sets {
                        if let Some(&id) = set_ids.get(s.as_str()) {
                            by_set.entry(id).or_default().push(i as u32);
                        }
                    }
                }
            }
        }
        let rules = rules
            .iter()
            .map(|rule| Compiled {
                rule,
                destinations: rule.destinations.iter().filter_map(|d| model.destination_sets.get(d)).collect(),
            })
            .collect();
        ContextIndex { rules, any_source, by_set }
    }

    /// The rules whose sources include one of `sets`, in evaluation order.
    fn candidates(&self, sets: &[u32]) -> Vec<&Compiled<'m>> {
        let mut idx: Vec<u32> = self.any_source.clone();
        for s in sets {
            if let Some(v) = self.by_set.get(s) {
                idx.extend_from_slice(v);
            }
        }
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| &self.rules[i as usize]).collect()
    }
}

/// Decides flows against one policy model.
pub struct Evaluator<'m> {
    model: &'m PolicyModel,
    /// Host addresses (/32, /128) to the sets that hold them.
    hosts: HashMap<IpAddr, Vec<u32>>,
    /// Wider prefixes (subnets) to their sets, bucketed by family and length: a lookup costs one hash probe per
    /// distinct prefix length, not one test per prefix.
    prefixes: Vec<(bool, u8, HashMap<IpNet, Vec<u32>>)>,
    /// The tenant index of each set, by set id (`u32::MAX` for a set of no known tenant).
    set_tenant: Vec<u32>,
    /// Set id of each tenant's member set, by tenant index.
    tenant_sets: Vec<u32>,
    cluster: ContextIndex<'m>,
    namespace: Vec<ContextIndex<'m>>,
    service: Vec<ContextIndex<'m>>,
    common: usize,
}

impl<'m> Evaluator<'m> {
    pub fn new(model: &'m PolicyModel) -> Evaluator<'m> {
        let tenant_index: HashMap<&str, u32> =
            model.tenants.iter().enumerate().map(|(i, t)| (t.name.as_str(), i as u32)).collect();
        let mut set_ids = HashMap::new();
        let mut set_tenant = Vec::with_capacity(model.address_sets.len());
        let mut hosts: HashMap<IpAddr, Vec<u32>> = HashMap::new();
        let mut prefixes: Vec<(bool, u8, HashMap<IpNet, Vec<u32>>)> = Vec::new();
        for (i, (name, set)) in model.address_sets.iter().enumerate() {
            let id = i as u32;
            set_ids.insert(name.as_str(), id);
            set_tenant.push(tenant_index.get(set.tenant.as_str()).copied().unwrap_or(u32::MAX));
            for net in &set.addresses {
                if net.prefix_len() == net.max_prefix_len() {
                    hosts.entry(net.addr()).or_default().push(id);
                } else {
                    let (v4, len) = (net.addr().is_ipv4(), net.prefix_len());
                    let bucket = match prefixes.iter().position(|(f, l, _)| (*f, *l) == (v4, len)) {
                        Some(i) => i,
                        None => {
                            prefixes.push((v4, len, HashMap::new()));
                            prefixes.len() - 1
                        }
                    };
                    prefixes[bucket].2.entry(net.trunc()).or_default().push(id);
                }
            }
        }
        let tenant_sets =
            model.tenants.iter().map(|t| set_ids.get(t.members.as_str()).copied().unwrap_or(u32::MAX)).collect();
        let common = model.tenants.iter().position(|t| t.name == COMMON_TENANT).unwrap_or(0);
        Evaluator {
            model,
            cluster: ContextIndex::new(model, &model.cluster_rules, &set_ids),
            namespace: model.tenants.iter().map(|t| ContextIndex::new(model, &t.namespace_rules, &set_ids)).collect(),
            service: model.tenants.iter().map(|t| ContextIndex::new(model, &t.service_rules, &set_ids)).collect(),
            hosts,
            prefixes,
            set_tenant,
            tenant_sets,
            common,
        }
    }

    /// The ids of every set holding `ip`, of any tenant.
    fn sets_of(&self, ip: IpAddr) -> Vec<u32> {
        let mut out: Vec<u32> = self.hosts.get(&ip).cloned().unwrap_or_default();
        for (v4, len, nets) in &self.prefixes {
            if *v4 != ip.is_ipv4() {
                continue;
            }
            if let Some(ids) = IpNet::new(ip, *len).ok().and_then(|n| nets.get(&n.trunc())) {
                out.extend_from_slice(ids);
            }
        }
        out
    }

    /// The tenant a source address is in when nothing else tells (docs/semantics.md §2): the one tenant whose pods,
    /// own subnets or Service endpoints hold it; `Common` when none does; an error naming them when several do.
    pub fn tenant_of(&self, ip: IpAddr) -> Result<&'m str, EvalError> {
        let sets = self.sets_of(ip);
        let found: Vec<usize> = (0..self.tenant_sets.len()).filter(|&t| sets.contains(&self.tenant_sets[t])).collect();
        match found.as_slice() {
            [] => Ok(&self.model.tenants[self.common].name),
            [one] => Ok(&self.model.tenants[*one].name),
            many => {
                Err(EvalError::AmbiguousSource(ip, many.iter().map(|&t| self.model.tenants[t].name.clone()).collect()))
            }
        }
    }

    fn check(&self, flow: &Flow) -> Result<usize, EvalError> {
        if let Destination::Ip(dst) | Destination::Resolved { ip: dst, .. } = &flow.destination
            && dst.is_ipv4() != flow.source.is_ipv4()
        {
            return Err(EvalError::FamilyMismatch(flow.source, *dst));
        }
        self.model
            .tenants
            .iter()
            .position(|t| t.name == flow.tenant)
            .ok_or_else(|| EvalError::UnknownTenant(flow.tenant.clone()))
    }

    /// Decides a flow, finding candidate rules through the source index.
    pub fn decide(&self, flow: &Flow) -> Result<Decision, EvalError> {
        let t = self.check(flow)?;
        let mut sets = self.sets_of(flow.source);
        sets.retain(|&s| self.set_tenant[s as usize] == t as u32);
        let candidates =
            [self.cluster.candidates(&sets), self.namespace[t].candidates(&sets), self.service[t].candidates(&sets)];
        Ok(decide_with(flow, &self.model.tenants[t], candidates))
    }

    /// Decides a flow by testing every rule's sources directly, without the index. Same answers as
    /// [`Evaluator::decide`], slower; kept as the reference the index is checked against.
    pub fn decide_by_scan(&self, flow: &Flow) -> Result<Decision, EvalError> {
        let t = self.check(flow)?;
        let tenant = &self.model.tenants[t];
        let holds = |c: &&Compiled| match &c.rule.sources {
            Sources::Any => true,
            Sources::Sets(names) => names.iter().any(|n| {
                self.model
                    .address_sets
                    .get(n)
                    .is_some_and(|s| s.tenant == flow.tenant && s.addresses.iter().any(|a| a.contains(&flow.source)))
            }),
        };
        let candidates = [
            self.cluster.rules.iter().filter(holds).collect(),
            self.namespace[t].rules.iter().filter(holds).collect(),
            self.service[t].rules.iter().filter(holds).collect(),
        ];
        Ok(decide_with(flow, tenant, candidates))
    }

    pub fn model(&self) -> &'m PolicyModel {
        self.model
    }

    /// The source translation of an accepted flow (docs/semantics.md §9): the first ExternalIPRule of the flow's
    /// tenant, in priority order, whose Services' endpoints hold the source and whose `destinationMatch` (addresses,
    /// protocol, ports) the flow meets, with the egress addresses of the flow's family. `None` when none covers it,
    /// or the rule has no egress address of the family. A refused flow is never translated: ask after `decide`.
    pub fn translate(&self, flow: &Flow) -> Result<Option<Translation>, EvalError> {
        let t = self.check(flow)?;
        let dst_ip = match &flow.destination {
            Destination::Ip(ip) | Destination::Resolved { ip, .. } => Some(*ip),
            Destination::Host(_) => None,
        };
        for r in &self.model.tenants[t].nat_rules {
            let from = r.sources.iter().any(|n| {
                self.model
                    .address_sets
                    .get(n)
                    .is_some_and(|s| s.tenant == flow.tenant && s.addresses.iter().any(|a| a.contains(&flow.source)))
            });
            if !from {
                continue;
            }
            // A destination match on addresses needs the flow's address: a flow to a bare host name matches only a
            // rule without one.
            if !r.destination_addresses.is_empty()
                && !dst_ip.is_some_and(|ip| r.destination_addresses.iter().any(|a| a.matches(&Destination::Ip(ip))))
            {
                continue;
            }
            if let Some(p) = r.destination_protocol
                && p != flow.protocol
            {
                continue;
            }
            let port_met = matches!(flow.protocol, Protocol::Tcp | Protocol::Udp)
                && flow
                    .port
                    .is_some_and(|port| r.destination_ports.iter().any(|pr| pr.start <= port && port <= pr.end));
            if !r.destination_ports.is_empty() && !port_met {
                continue;
            }
            let to: Vec<String> = r
                .external_addresses
                .iter()
                .filter(|a| match a {
                    AddressEntry::Net(n) => n.addr().is_ipv4() == flow.source.is_ipv4(),
                    AddressEntry::Range(x, _) => x.is_ipv4() == flow.source.is_ipv4(),
                    _ => false,
                })
                .map(|a| match a {
                    AddressEntry::Net(n) => n.addr().to_string(),
                    other => other.to_string(),
                })
                .collect();
            if to.is_empty() {
                continue;
            }
            return Ok(Some(Translation { rule: r.id.clone(), to }));
        }
        Ok(None)
    }
}

/// What an accepted flow's source is translated to, and by which ExternalIPRule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Translation {
    pub rule: String,
    /// The egress addresses (or ranges) of the flow's family the rule translates to: one of them is the source.
    pub to: Vec<String>,
}

/// Parses a flow target: `HOST:PORT/tcp`, `HOST:PORT/udp` or `HOST/icmp`. HOST is an IP address (IPv6 in
/// brackets when a port follows) or a host name.
pub fn parse_target(s: &str) -> Result<(Destination, Protocol, Option<u16>), String> {
    let (hostport, proto) =
        s.rsplit_once('/').ok_or_else(|| format!("`{s}`: expected HOST:PORT/tcp, HOST:PORT/udp or HOST/icmp"))?;
    let protocol = match proto.to_ascii_lowercase().as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "icmp" => Protocol::Icmp,
        other => return Err(format!("`{s}`: protocol `{other}` is not tcp, udp or icmp")),
    };
    let host_only = |h: &str| -> Result<Destination, String> {
        if h.contains('/') {
            return Err(format!("`{s}`: a target is one address or host name, not a network (`{h}`)"));
        }
        Destination::parse(h).map_err(|e| format!("`{s}`: {e}"))
    };
    if protocol == Protocol::Icmp {
        let bare = hostport.strip_prefix('[').and_then(|r| r.split_once("]:")).map(|(h, _)| h);
        let with_port = bare.is_some()
            || hostport.rsplit_once(':').is_some_and(|(h, p)| !h.contains(':') && parse_decimal::<u16>(p).is_some());
        if with_port {
            return Err(format!("`{s}`: ICMP has no port; write HOST/icmp"));
        }
        return Ok((host_only(hostport)?, protocol, None));
    }
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(|| format!("`{s}`: expected [IPv6]:PORT"))?;
        (h, p)
    } else {
        let (h, p) =
            hostport.rsplit_once(':').ok_or_else(|| format!("`{s}`: {proto} needs a port, HOST:PORT/{proto}"))?;
        if h.contains(':') {
            return Err(format!("`{s}`: write an IPv6 address as [ADDRESS]:PORT"));
        }
        (h, p)
    };
    let port: u16 = parse_decimal(port)
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("`{s}`: port `{port}` is not a number in 1-65535"))?;
    Ok((host_only(host)?, protocol, Some(port)))
}

/// Which ExternalService and port entry of a rule match the flow's destination, if any.
fn destination_match(rule: &Compiled, flow: &Flow) -> Option<(String, Option<String>)> {
    for d in &rule.destinations {
        if !d.addresses.iter().any(|a| a.matches(&flow.destination)) {
            continue;
        }
        if d.ports.is_empty() {
            return Some((d.id(), None));
        }
        for p in &d.ports {
            let proto_ok = p.protocol == Protocol::Any || p.protocol == flow.protocol;
            let port_ok = p.ports.is_empty() || flow.port.is_some_and(|fp| p.ports.iter().any(|r| r.contains(fp)));
            if proto_ok && port_ok {
                let label = p.name.clone().unwrap_or_else(|| {
                    let ports: Vec<String> = p.ports.iter().map(|r| r.to_string()).collect();
                    if ports.is_empty() {
                        p.protocol.to_string()
                    } else {
                        format!("{}:{}", p.protocol, ports.join(","))
                    }
                });
                return Some((d.id(), Some(label)));
            }
        }
    }
    None
}

/// The decision, given each context's candidate rules (in evaluation order, sources already known to hold).
fn decide_with(flow: &Flow, tenant: &TenantPolicy, candidates: [Vec<&Compiled>; 3]) -> Decision {
    let mut trail = Vec::new();
    let contexts = [Context::Cluster, Context::Namespace, Context::Service];
    for (ctx, rules) in contexts.into_iter().zip(candidates) {
        for compiled in rules {
            let Some((external_service, port)) = destination_match(compiled, flow) else {
                continue;
            };
            let rule = compiled.rule;
            let mut entry = TrailEntry {
                context: ctx,
                rule: rule.id.clone(),
                action: rule.action,
                effect: Effect::Decided,
                external_service,
                port,
            };
            if rule.schedule.as_ref().is_some_and(|s| !s.active_at(flow.at)) {
                entry.effect = Effect::OutsideSchedule;
                trail.push(entry);
                continue;
            }
            if rule.mode == Mode::Audit {
                entry.effect = Effect::Audit;
                trail.push(entry);
                continue;
            }
            let verdict = match rule.action {
                Action::Accept if ctx != Context::Service => {
                    entry.effect = Effect::NextContext;
                    trail.push(entry);
                    break;
                }
                Action::Accept | Action::AcceptDecisively => Verdict::Accept,
                Action::Drop => Verdict::Drop,
                Action::Reject => Verdict::Reject,
            };
            let decided_by = DecidedBy {
                context: ctx,
                rule: entry.rule.clone(),
                external_service: Some(entry.external_service.clone()),
                port: entry.port.clone(),
                logging: rule.logging,
            };
            trail.push(entry);
            return Decision { verdict, tenant: tenant.name.clone(), decided_by, trail };
        }
    }
    Decision {
        verdict: tenant.default_action,
        tenant: tenant.name.clone(),
        decided_by: DecidedBy {
            context: Context::Default,
            rule: format!("Tenant/{}", tenant.name),
            external_service: None,
            port: None,
            logging: false,
        },
        trail,
    }
}

#[cfg(test)]
mod tests;
