//! The CES evaluator: the single definition of what the policy model means for a flow.
//!
//! `ces simulate` uses it, and every data plane is tested against it. The semantics (docs/semantics.md):
//! three contexts run in order (cluster, the source tenant's namespace rules, its service rules); inside a context
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
use ces_model::{COMMON_TENANT, Context, Destination, PolicyModel, Protocol, Rule, Sources, TenantPolicy, Verdict};
use ipnet::IpNet;
use jiff::Timestamp;
use serde::Serialize;

/// A flow to decide.
#[derive(Clone, Debug, PartialEq)]
pub struct Flow {
    pub source: IpAddr,
    /// The source's tenant when it is known (the flow comes from a named pod); otherwise it is found from the
    /// tenants' member sets, and an address of no known pod is in `Common`.
    pub tenant: Option<String>,
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
    /// The address belongs to pods of several tenants (overlapping pod networks); name the pod instead.
    AmbiguousSource(IpAddr, Vec<String>),
}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EvalError::UnknownTenant(t) => write!(f, "unknown tenant `{t}`"),
            EvalError::AmbiguousSource(ip, ts) => {
                write!(
                    f,
                    "{ip} belongs to pods of several tenants ({}); give the source as NAMESPACE/POD",
                    ts.join(", ")
                )
            }
        }
    }
}

impl std::error::Error for EvalError {}

/// Rules of one context, with the rules each source set brings in.
struct ContextIndex<'m> {
    rules: Vec<&'m Rule>,
    any_source: Vec<u32>,
    by_set: HashMap<u32, Vec<u32>>,
}

impl<'m> ContextIndex<'m> {
    fn new(rules: &'m [Rule], set_ids: &HashMap<&str, u32>) -> ContextIndex<'m> {
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
        ContextIndex { rules: rules.iter().collect(), any_source, by_set }
    }

    /// The rules whose sources include an address in `sets`, in evaluation order.
    fn candidates(&self, sets: &[u32]) -> Vec<&'m Rule> {
        let mut idx: Vec<u32> = self.any_source.clone();
        for s in sets {
            if let Some(v) = self.by_set.get(s) {
                idx.extend_from_slice(v);
            }
        }
        idx.sort_unstable();
        idx.dedup();
        idx.into_iter().map(|i| self.rules[i as usize]).collect()
    }
}

/// Decides flows against one policy model.
pub struct Evaluator<'m> {
    model: &'m PolicyModel,
    /// Host addresses (/32, /128) to the sets that hold them.
    hosts: HashMap<IpAddr, Vec<u32>>,
    /// Wider prefixes (namespace CIDRs) to their sets, bucketed by family and length: a lookup costs one hash
    /// probe per distinct prefix length, not one test per prefix.
    prefixes: Vec<(bool, u8, HashMap<IpNet, Vec<u32>>)>,
    /// Set id of each tenant's member set, by tenant index.
    tenant_sets: Vec<u32>,
    cluster: ContextIndex<'m>,
    namespace: Vec<ContextIndex<'m>>,
    service: Vec<ContextIndex<'m>>,
    common: usize,
}

impl<'m> Evaluator<'m> {
    pub fn new(model: &'m PolicyModel) -> Evaluator<'m> {
        let mut set_ids = HashMap::new();
        let mut hosts: HashMap<IpAddr, Vec<u32>> = HashMap::new();
        let mut prefixes: Vec<(bool, u8, HashMap<IpNet, Vec<u32>>)> = Vec::new();
        for (i, (name, set)) in model.address_sets.iter().enumerate() {
            let id = i as u32;
            set_ids.insert(name.as_str(), id);
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
            cluster: ContextIndex::new(&model.cluster_rules, &set_ids),
            namespace: model.tenants.iter().map(|t| ContextIndex::new(&t.namespace_rules, &set_ids)).collect(),
            service: model.tenants.iter().map(|t| ContextIndex::new(&t.service_rules, &set_ids)).collect(),
            hosts,
            prefixes,
            tenant_sets,
            common,
        }
    }

    /// The ids of every set holding `ip`.
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

    fn tenant_index(&self, flow: &Flow, sets: &[u32]) -> Result<usize, EvalError> {
        if let Some(name) = &flow.tenant {
            return self
                .model
                .tenants
                .iter()
                .position(|t| &t.name == name)
                .ok_or_else(|| EvalError::UnknownTenant(name.clone()));
        }
        let found: Vec<usize> = (0..self.tenant_sets.len()).filter(|&t| sets.contains(&self.tenant_sets[t])).collect();
        match found.as_slice() {
            [] => Ok(self.common),
            [one] => Ok(*one),
            many => Err(EvalError::AmbiguousSource(
                flow.source,
                many.iter().map(|&t| self.model.tenants[t].name.clone()).collect(),
            )),
        }
    }

    /// Decides a flow, finding candidate rules through the source index.
    pub fn decide(&self, flow: &Flow) -> Result<Decision, EvalError> {
        let sets = self.sets_of(flow.source);
        let t = self.tenant_index(flow, &sets)?;
        let candidates =
            [self.cluster.candidates(&sets), self.namespace[t].candidates(&sets), self.service[t].candidates(&sets)];
        Ok(decide_with(flow, &self.model.tenants[t], candidates))
    }

    /// Decides a flow by testing every rule's sources directly, without the index. Same answers as
    /// [`Evaluator::decide`], slower; kept as the reference the index is checked against.
    pub fn decide_by_scan(&self, flow: &Flow) -> Result<Decision, EvalError> {
        let sets = self.sets_of(flow.source);
        let t = self.tenant_index(flow, &sets)?;
        let tenant = &self.model.tenants[t];
        let holds = |r: &&Rule| match &r.sources {
            Sources::Any => true,
            Sources::Sets(names) => names.iter().any(|n| {
                self.model.address_sets.get(n).is_some_and(|s| s.addresses.iter().any(|a| a.contains(&flow.source)))
            }),
        };
        let candidates = [
            self.model.cluster_rules.iter().filter(holds).collect(),
            tenant.namespace_rules.iter().filter(holds).collect(),
            tenant.service_rules.iter().filter(holds).collect(),
        ];
        Ok(decide_with(flow, tenant, candidates))
    }

    pub fn model(&self) -> &'m PolicyModel {
        self.model
    }
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
    if protocol == Protocol::Icmp {
        return Ok((Destination::parse(hostport).map_err(|e| format!("`{s}`: {e}"))?, protocol, None));
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
    let port: u16 =
        port.parse().ok().filter(|p| *p != 0).ok_or_else(|| format!("`{s}`: port `{port}` is not in 1-65535"))?;
    Ok((Destination::parse(host).map_err(|e| format!("`{s}`: {e}"))?, protocol, Some(port)))
}

/// Which ExternalService and port entry of a rule match the flow's destination, if any.
fn destination_match(rule: &Rule, flow: &Flow) -> Option<(String, Option<String>)> {
    for d in &rule.destinations {
        if !d.addresses.iter().any(|a| a.matches(&flow.destination)) {
            continue;
        }
        if d.ports.is_empty() {
            return Some((d.external_service.clone(), None));
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
                return Some((d.external_service.clone(), Some(label)));
            }
        }
    }
    None
}

/// The decision, given each context's candidate rules (in evaluation order, sources already known to hold).
fn decide_with(flow: &Flow, tenant: &TenantPolicy, candidates: [Vec<&Rule>; 3]) -> Decision {
    let mut trail = Vec::new();
    let contexts = [Context::Cluster, Context::Namespace, Context::Service];
    for (ctx, rules) in contexts.into_iter().zip(candidates) {
        for rule in rules {
            let Some((external_service, port)) = destination_match(rule, flow) else {
                continue;
            };
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
