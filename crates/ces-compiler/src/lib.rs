//! The CES policy compiler: a pure function from a cluster snapshot and the config to the policy model.
//!
//! What it guarantees:
//! - every rule in the model is fully resolved and valid; a rule with an error (a missing or invalid
//!   ExternalService, a bad schedule, an invalid selector, a missing Service) is left out whole and gets one
//!   diagnostic per problem, which becomes its status. Nothing is half-applied, and one bad object never keeps
//!   another, unrelated one out. What the user need not fix (a selector that matches nothing yet, an endpoint CES
//!   refuses to trust) is a warning: the rule stays in and says so;
//! - every source set belongs to one tenant (docs/semantics.md §2): the tenant of the namespace it was built from;
//! - no namespace can make another namespace's pods its sources: Service endpoints that are pods of another namespace
//!   (by `targetRef` or by address), subnets that several namespaces of a tenant share, and `hostNetwork` pods are
//!   never sources;
//! - each context's rules are sorted by priority, then namespace, then name;
//! - the output depends only on the input: no clock, no I/O, no hash-map iteration order.

mod incremental;
mod selector;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ces_api::{DEFAULT_PRIORITY, ExternalServiceSpec, LabelSelector, RuleCommon};
use ces_config::{COMMON, CesConfig, DefaultAction};
use ces_model::{
    AddressEntry, AddressSet, Bandwidth, DestinationSet, Diagnostic, Identity, LogPoolSettings, MODEL_VERSION, NatRule,
    ObjectRef, PolicyModel, PortMatch, Protocol, RouteDomainRef, Rule, RuleKind, Schedule, Settings, Severity, Sources,
    TenantBackend, TenantPolicy, TenantRef, Verdict, VirtualServerSettings, parse_port_list,
};
use ces_snapshot::{Key, Object, Pod, Snapshot};
use ipnet::IpNet;

pub use incremental::recompile_churn;
pub use selector::{matches as selector_matches, validate as validate_selector};

/// The namespace that holds the ExternalServices of ClusterEgressRules when none is configured.
pub const DEFAULT_CES_NAMESPACE: &str = "kube-system";

/// Address-set names. Stable: the AS3 backend derives object names from them. A namespace belongs to one tenant, so
/// each name is one tenant's; the set itself states which (`AddressSet::tenant`).
pub fn namespace_set(ns: &str) -> String {
    format!("namespace/{ns}")
}
pub fn namespace_pods_set(ns: &str) -> String {
    format!("namespace-pods/{ns}")
}
pub fn pod_selector_set(ns: &str, rule: &str) -> String {
    format!("pods/{ns}/{rule}")
}
pub fn service_set(ns: &str, svc: &str) -> String {
    format!("service/{ns}/{svc}")
}
pub fn tenant_set(tenant: &str) -> String {
    format!("tenant/{tenant}")
}

/// Compiles a snapshot. `ces_namespace` is where ClusterEgressRules find their ExternalServices.
pub fn compile(snap: &Snapshot, config: &CesConfig, ces_namespace: &str) -> PolicyModel {
    Compiler::new(snap, config, ces_namespace).run()
}

/// The rules compiled into one tenant, before sorting.
#[derive(Default)]
struct TenantRules {
    namespace: Vec<Rule>,
    service: Vec<Rule>,
    nat: Vec<NatRule>,
}

/// A problem found while compiling one object: a reason code and a message.
type Problem = (&'static str, String);

/// What a rule's sources came to: the sources, and warnings about them (the rule stays in).
struct Resolved<T> {
    value: T,
    warnings: Vec<Problem>,
}

/// A namespace's kube-ovn subnets: those that are its own, and those it shares with other namespaces of its tenant
/// (with their names).
#[derive(Default)]
struct Subnets {
    own: Vec<IpNet>,
    shared: Vec<(IpNet, Vec<String>)>,
}

/// A subnet as the pod lookup finds it: tenant, prefix length, network.
type SubnetKey<'t> = (&'t str, u8, IpNet);

/// A Service's source set, once computed: its name, whether it is empty, and the endpoints refused.
#[derive(Clone)]
struct ServiceSources {
    set: String,
    empty: bool,
    refused: Vec<Problem>,
}

struct Compiler<'a> {
    snap: &'a Snapshot,
    config: &'a CesConfig,
    ces_namespace: &'a str,
    diagnostics: Vec<Diagnostic>,
    sets: BTreeMap<String, AddressSet>,
    destinations: BTreeMap<String, DestinationSet>,
    /// Whether each ExternalService compiled (`false`: it has errors of its own).
    external_services: HashMap<Key, bool>,
    /// Each tenant by name, with its route domain id.
    tenant_refs: BTreeMap<&'a str, TenantRef>,
    /// The tenant of each namespace the config lists (`CesConfig::tenant_of`, as a map: it is asked per pod).
    namespace_tenants: HashMap<&'a str, &'a str>,
    /// Source pods (not finished, not hostNetwork) by address, across tenants; check the tenant before use.
    pods_by_ip: HashMap<IpAddr, Vec<&'a Pod>>,
    /// Each namespace's subnets, own or shared. A subnet is shared when another namespace of the same tenant carries
    /// an overlapping one (kube-ovn writes the default subnet on every namespace without its own) or has a pod in it.
    subnets: HashMap<&'a str, Subnets>,
    service_sources: HashMap<Key, ServiceSources>,
    /// For every Service with endpoint objects: the endpoint addresses CES trusts, and why it refuses the others.
    /// Computed once: rules' source sets and the tenants' members both use it.
    trusted_endpoints: HashMap<Key, (Vec<IpNet>, Vec<Problem>)>,
    /// Nodes' addresses: the first hostNetwork pod (in snapshot order) at each.
    node_pods: HashMap<IpAddr, &'a Pod>,
    /// `endpointAddresses` of the config, parsed.
    given: Vec<(IpNet, &'a str)>,
}

/// Pods CES takes as sources: not finished (they then have no IP) and not on the host network.
fn is_source(p: &Pod) -> bool {
    !p.host_network && !p.ips.is_empty()
}

/// The IPs of these pods, as host networks (/32, /128). hostNetwork pods are left out.
fn pod_nets<'p>(pods: impl IntoIterator<Item = &'p Pod>) -> Vec<IpNet> {
    pods.into_iter().filter(|p| !p.host_network).flat_map(|p| p.ips.iter().copied().map(IpNet::from)).collect()
}

/// The addresses of the pods a rule's pod selector picks.
fn selected_pod_nets(pods: &[Pod], sel: &LabelSelector) -> Vec<IpNet> {
    pod_nets(pods.iter().filter(|p| selector::matches(sel, &p.labels)))
}

/// The addresses of the ready pods a Service's selector picks: its set when it has no endpoint objects.
fn service_pod_nets(pods: &[Pod], sel: &ces_snapshot::Labels) -> Vec<IpNet> {
    pod_nets(pods.iter().filter(|p| p.ready && selector::service_selects(sel, &p.labels)))
}

/// What else claims an endpoint address that is no source pod's of the Service's tenant: the namespace
/// `endpointAddresses` gives it to, and the other namespaces of the tenant whose Services list it.
#[derive(Default)]
pub(crate) struct Claims {
    pub given_to: Option<String>,
    pub also: Vec<String>,
}

/// Why an endpoint address of Service `ns/svc` is not trusted, if it is not (docs/semantics.md §2): it names a pod of
/// another namespace; it is a node's address (`node`: a hostNetwork pod that has it); it is the address of a pod of
/// another namespace of the tenant; it lies in another namespace's own subnet; the config gives it to another
/// namespace; or, being no pod's, other namespaces of the tenant list it too (contested: a source for none). An
/// address of a pod of `ns`, or of nothing CES knows (a VM) that no other namespace claims, is trusted. `pods`: the
/// source pods of the Service's tenant that have the address, in snapshot order; `other_subnet`: another namespace of
/// the tenant, with its own subnet, that holds the address, and `claims`, asked only when no pod has it.
pub(crate) fn endpoint_refusal(
    ns: &str,
    svc: &str,
    ep: &ces_snapshot::Endpoint,
    pods: &[&Pod],
    node: Option<&Pod>,
    other_subnet: impl FnOnce() -> Option<(String, IpNet)>,
    claims: impl FnOnce() -> Claims,
) -> Option<Problem> {
    let ip = ep.ip;
    let foreign = |m: String| Some(("ForeignEndpoint", format!("{m}; it is not a source")));
    if let Some((pns, pname)) = &ep.pod
        && pns != ns
    {
        return foreign(format!("endpoint {ip} of Service {ns}/{svc} names pod {pns}/{pname} of another namespace"));
    }
    if let Some(n) = node {
        return Some((
            "NodeAddress",
            format!(
                "endpoint {ip} of Service {ns}/{svc} is a node's address (hostNetwork pod {}/{} has it): a node's traffic is never a Service's source",
                n.namespace, n.name
            ),
        ));
    }
    if pods.iter().any(|p| p.namespace == ns) {
        return None;
    }
    if let Some(p) = pods.first() {
        return foreign(format!(
            "endpoint {ip} of Service {ns}/{svc} is the address of pod {}/{} of another namespace",
            p.namespace, p.name
        ));
    }
    if let Some((other, net)) = other_subnet() {
        return foreign(format!("endpoint {ip} of Service {ns}/{svc} lies in subnet {net} of namespace {other}"));
    }
    let c = claims();
    match c.given_to {
        Some(owner) if owner == ns => None,
        Some(owner) => foreign(format!(
            "endpoint {ip} of Service {ns}/{svc} is given to namespace {owner} by ces-conf.yaml (endpointAddresses)"
        )),
        None if !c.also.is_empty() => Some((
            "ContestedEndpoint",
            format!(
                "endpoint {ip} of Service {ns}/{svc} is no pod's and Services of namespace(s) {} list it too: an address several namespaces claim is a source for none (ces-conf.yaml endpointAddresses can give it to one)",
                c.also.join(", ")
            ),
        )),
        None => None,
    }
}

/// The model's entry of a source pod of `tenant`.
fn pod_entry(tenant: &str, p: &Pod) -> ces_model::PodEntry {
    ces_model::PodEntry {
        tenant: tenant.to_string(),
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        ips: p.ips.clone(),
        labels: p.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn identity<S>(obj: &Object<S>) -> Identity {
    Identity { uid: obj.uid.clone(), generation: obj.generation }
}

impl<'a> Compiler<'a> {
    fn new(snap: &'a Snapshot, config: &'a CesConfig, ces_namespace: &'a str) -> Compiler<'a> {
        let mut tenant_refs = BTreeMap::new();
        tenant_refs.insert(COMMON, TenantRef { name: COMMON.to_string(), route_domain: 0 });
        let mut namespace_tenants = HashMap::new();
        for t in &config.tenant {
            for ns in &t.namespaces {
                namespace_tenants.insert(ns.as_str(), config.tenant_of(ns));
            }
        }
        if config.is_support_route_domain {
            for t in config.tenant.iter().filter(|t| t.name != COMMON) {
                let id = t.route_domain.as_ref().and_then(|rd| rd.id).unwrap_or(0);
                tenant_refs.insert(t.name.as_str(), TenantRef { name: t.name.clone(), route_domain: id });
            }
        }
        let mut pods_by_ip: HashMap<IpAddr, Vec<&Pod>> = HashMap::new();
        for p in snap.pods.iter().filter(|p| is_source(p)) {
            for ip in &p.ips {
                pods_by_ip.entry(*ip).or_default().push(p);
            }
        }
        let mut node_pods: HashMap<IpAddr, &Pod> = HashMap::new();
        for p in snap.pods.iter().filter(|p| p.host_network) {
            for ip in &p.ips {
                node_pods.entry(*ip).or_insert(p);
            }
        }
        let mut c = Compiler {
            node_pods,
            given: config.endpoint_addresses(),
            snap,
            config,
            ces_namespace,
            diagnostics: snap.diagnostics.clone(),
            sets: BTreeMap::new(),
            destinations: BTreeMap::new(),
            external_services: HashMap::new(),
            tenant_refs,
            namespace_tenants,
            pods_by_ip,
            subnets: HashMap::new(),
            service_sources: HashMap::new(),
            trusted_endpoints: HashMap::new(),
        };
        c.subnets = c.classify_subnets();
        c.trusted_endpoints = c.check_endpoints();
        c
    }

    /// Sorts every Service's ready endpoints into trusted addresses and refusals (`foreign_endpoint`).
    fn check_endpoints(&self) -> HashMap<Key, (Vec<IpNet>, Vec<Problem>)> {
        // The namespaces listing each address that is no source pod's of their tenant, by tenant.
        let mut listed: HashMap<(&str, IpAddr), BTreeSet<&str>> = HashMap::new();
        for (key, eps) in self.snap.endpoints.iter().filter(|(k, _)| self.snap.services.contains_key(*k)) {
            let tenant = self.tenant_name(&key.0);
            for ep in eps {
                let pod = self
                    .pods_by_ip
                    .get(&ep.ip)
                    .is_some_and(|v| v.iter().any(|p| self.tenant_name(&p.namespace) == tenant));
                if !pod {
                    listed.entry((tenant, ep.ip)).or_default().insert(key.0.as_str());
                }
            }
        }
        let mut out = HashMap::with_capacity(self.snap.endpoints.len());
        for (key, eps) in self.snap.endpoints.iter().filter(|(k, _)| self.snap.services.contains_key(*k)) {
            let (mut trusted, mut refused) = (Vec::with_capacity(eps.len()), Vec::new());
            let tenant = self.tenant_name(&key.0);
            for ep in eps {
                let claims = || Claims {
                    given_to: self.given.iter().find(|(n, _)| n.contains(&ep.ip)).map(|(_, o)| o.to_string()),
                    also: listed
                        .get(&(tenant, ep.ip))
                        .into_iter()
                        .flatten()
                        .filter(|n| **n != key.0)
                        .map(|n| n.to_string())
                        .collect(),
                };
                match self.foreign_endpoint(&key.0, &key.1, ep, claims) {
                    None => trusted.push(IpNet::from(ep.ip)),
                    Some(why) => refused.push(why),
                }
            }
            out.insert(key.clone(), (trusted, refused));
        }
        out
    }

    fn tenant_of(&self, ns: &str) -> &TenantRef {
        &self.tenant_refs[self.tenant_name(ns)]
    }

    /// The name of a namespace's tenant: `CesConfig::tenant_of`, looked up in a map.
    fn tenant_name(&self, ns: &str) -> &'a str {
        self.namespace_tenants.get(ns).copied().unwrap_or(COMMON)
    }

    /// Splits every namespace's subnet CIDRs into exclusive ones and ones shared inside its tenant.
    fn classify_subnets(&self) -> HashMap<&'a str, Subnets> {
        let mut out = HashMap::new();
        if self.config.cni_type() != ces_config::DEFAULT_CNI_TYPE {
            return out;
        }
        // Per tenant: every subnet with its namespace, and, by prefix length, where each subnet is.
        let mut by_tenant: BTreeMap<&str, Vec<(&'a str, IpNet)>> = BTreeMap::new();
        for n in self.snap.namespaces.values() {
            for c in &n.cidrs {
                by_tenant.entry(self.tenant_name(&n.name)).or_default().push((n.name.as_str(), *c));
            }
        }
        // Who else is in each subnet: namespaces with an overlapping subnet, and namespaces with a pod in it.
        let mut sharers: HashMap<(&str, IpNet), BTreeSet<String>> = HashMap::new();
        for entries in by_tenant.values() {
            for (ns, net) in entries {
                let others = entries.iter().filter(|(other, o)| other != ns && overlaps(net, o));
                sharers.entry((ns, *net)).or_default().extend(others.map(|(other, _)| other.to_string()));
            }
        }
        let mut lookup: HashMap<SubnetKey, Vec<(&'a str, IpNet)>> = HashMap::new();
        let mut lengths: BTreeSet<(&str, bool, u8)> = BTreeSet::new();
        for (tenant, entries) in &by_tenant {
            for (ns, net) in entries {
                lookup.entry((tenant, net.prefix_len(), net.trunc())).or_default().push((ns, *net));
                lengths.insert((tenant, net.addr().is_ipv4(), net.prefix_len()));
            }
        }
        for p in self.snap.pods.iter().filter(|p| is_source(p)) {
            let tenant = self.tenant_name(&p.namespace);
            for ip in &p.ips {
                for &(_, _, len) in lengths.range((tenant, ip.is_ipv4(), 0)..=(tenant, ip.is_ipv4(), u8::MAX)) {
                    let Ok(key) = IpNet::new(*ip, len).map(|n| n.trunc()) else { continue };
                    for (ns, net) in lookup.get(&(tenant, len, key)).into_iter().flatten() {
                        if *ns != p.namespace {
                            sharers.entry((ns, *net)).or_default().insert(p.namespace.clone());
                        }
                    }
                }
            }
        }
        for entries in by_tenant.values() {
            for (ns, net) in entries {
                let slot: &mut Subnets = out.entry(*ns).or_default();
                match sharers.remove(&(*ns, *net)).filter(|s| !s.is_empty()) {
                    None => slot.own.push(*net),
                    Some(others) => slot.shared.push((*net, others.into_iter().collect())),
                }
            }
        }
        out
    }

    fn run(mut self) -> PolicyModel {
        for (key, obj) in &self.snap.external_services {
            let compiled = self.external_service(key, obj);
            self.external_services.insert(key.clone(), compiled);
        }

        let mut cluster_rules = Vec::new();
        for obj in self.snap.cluster_rules.values() {
            let sources = match &obj.spec.namespace_selector {
                None => Ok(Resolved { value: Sources::Any, warnings: Vec::new() }),
                Some(sel) => self.namespace_selector_sources(sel),
            };
            let exsvc_ns = self.ces_namespace.to_string();
            if let Some(r) = self.rule(RuleKind::ClusterEgressRule, obj, obj.spec.common(), &exsvc_ns, sources) {
                cluster_rules.push(r);
            }
        }

        let mut by_tenant: BTreeMap<String, TenantRules> = BTreeMap::new();
        for ((ns, name), obj) in &self.snap.namespace_rules {
            let sources = self.namespace_rule_sources(ns, name, obj.spec.pod_selector.as_ref());
            if let Some(r) = self.rule(RuleKind::NamespaceEgressRule, obj, obj.spec.common(), ns, sources) {
                by_tenant.entry(self.tenant_name(ns).to_string()).or_default().namespace.push(r);
            }
        }
        for ((ns, _), obj) in &self.snap.service_rules {
            let sources = self.service_sources(ns, &obj.spec.service).map(|s| {
                let mut warnings = s.refused;
                if s.empty {
                    warnings.push((
                        "NoSources",
                        format!(
                            "Service {ns}/{} has no ready endpoint yet; the rule applies when one appears",
                            obj.spec.service
                        ),
                    ));
                }
                Resolved { value: Sources::Sets(vec![s.set]), warnings }
            });
            if let Some(mut r) = self.rule(RuleKind::ServiceEgressRule, obj, obj.spec.common(), ns, sources) {
                r.service = Some(obj.spec.service.clone());
                by_tenant.entry(self.tenant_name(ns).to_string()).or_default().service.push(r);
            }
        }
        // Egress addresses claimed by each ExternalIPRule: one claimed in two namespaces is refused in both.
        let claims: Vec<(&str, &str, Vec<ces_config::AddressRange>)> = self
            .snap
            .external_ip_rules
            .iter()
            .map(|((ns, name), obj)| {
                let ranges =
                    obj.spec.external_addresses.iter().filter_map(|a| ces_config::parse_range(a).ok()).collect();
                (ns.as_str(), name.as_str(), ranges)
            })
            .collect();
        // `claims` is in the order of the rules.
        for (((ns, _), obj), (_, _, mine)) in self.snap.external_ip_rules.iter().zip(&claims) {
            let conflicts: Vec<String> = claims
                .iter()
                .filter(|(n, _, theirs)| {
                    *n != ns.as_str() && theirs.iter().any(|t| mine.iter().any(|m| ces_config::ranges_overlap(m, t)))
                })
                .map(|(n, m, _)| format!("ExternalIPRule {n}/{m}"))
                .collect();
            if let Some(r) = self.nat_rule(ns, obj, &conflicts) {
                by_tenant.entry(self.tenant_name(ns).to_string()).or_default().nat.push(r);
            }
        }

        sort_rules(&mut cluster_rules);
        let tenants = self.tenants(by_tenant);
        let pods = self
            .snap
            .pods
            .iter()
            .filter(|p| is_source(p))
            .map(|p| pod_entry(self.tenant_name(&p.namespace), p))
            .collect();
        PolicyModel {
            version: MODEL_VERSION,
            ces_namespace: self.ces_namespace.to_string(),
            settings: settings(self.config),
            address_sets: self.sets,
            destination_sets: self.destinations,
            cluster_rules,
            tenants,
            pods,
            diagnostics: self.diagnostics,
        }
    }

    fn report(&mut self, object: &ObjectRef, origin: &Option<String>, severity: Severity, problems: Vec<Problem>) {
        for (reason, message) in problems {
            self.diagnostics.push(Diagnostic {
                severity,
                object: Some(object.clone()),
                origin: origin.clone(),
                reason: reason.to_string(),
                message,
            });
        }
    }

    fn external_service(&mut self, key: &Key, obj: &Object<ExternalServiceSpec>) -> bool {
        let mut problems: Vec<Problem> = Vec::new();
        let mut addresses = Vec::with_capacity(obj.spec.addresses.len());
        if obj.spec.addresses.is_empty() {
            problems.push(("InvalidAddress", "spec.addresses is empty".into()));
        }
        for (i, a) in obj.spec.addresses.iter().enumerate() {
            match a.parse::<AddressEntry>() {
                Ok(e) => addresses.push(e),
                Err(e) => problems.push(("InvalidAddress", format!("spec.addresses[{i}]: {e}"))),
            }
        }
        let mut ports = Vec::with_capacity(obj.spec.ports.len());
        for (i, p) in obj.spec.ports.iter().enumerate() {
            let at = format!("spec.ports[{i}]");
            let protocol = match Protocol::parse(p.protocol.as_deref().unwrap_or("")) {
                Ok(proto) => proto,
                Err(e) => {
                    problems.push(("UnknownProtocol", format!("{at}.protocol: {e}")));
                    continue;
                }
            };
            let ranges = match p.port.as_deref() {
                None => Vec::new(),
                Some(_) if protocol == Protocol::Icmp => {
                    problems.push(("InvalidPort", format!("{at}.port: ICMP has no ports; remove `port`")));
                    continue;
                }
                Some(s) => match parse_port_list(s) {
                    Ok(r) => r,
                    Err(e) => {
                        problems.push(("InvalidPort", format!("{at}.port: {e}")));
                        continue;
                    }
                },
            };
            let bandwidth = match p.bandwidth.as_deref().filter(|b| !b.is_empty()) {
                None => None,
                Some(b) => match Bandwidth::parse(b, &self.config.i_rule) {
                    Ok(bw) => Some(bw),
                    Err(e) => {
                        problems.push(("InvalidBandwidth", format!("{at}.bandwidth: {e}")));
                        continue;
                    }
                },
            };
            ports.push(PortMatch {
                name: p.name.clone().filter(|n| !n.is_empty()),
                protocol,
                ports: ranges,
                bandwidth,
            });
        }
        if !problems.is_empty() {
            let object = ObjectRef::new("ExternalService", Some(&key.0), &key.1);
            self.report(&object, &obj.origin, Severity::Error, problems);
            return false;
        }
        let set =
            DestinationSet { namespace: key.0.clone(), name: key.1.clone(), identity: identity(obj), addresses, ports };
        self.destinations.insert(set.id(), set);
        true
    }

    fn rule<S>(
        &mut self,
        kind: RuleKind,
        obj: &Object<S>,
        common: RuleCommon<'_>,
        exsvc_namespace: &str,
        sources: Result<Resolved<Sources>, Problem>,
    ) -> Option<Rule> {
        let namespace = obj.namespace.as_deref();
        let object = ObjectRef::new(kind.as_str(), namespace, &obj.name);
        let mut problems: Vec<Problem> = Vec::new();
        let sources = sources.map_err(|p| problems.push(p)).ok();

        let schedule = match common.schedule.map(Schedule::from_api) {
            None => None,
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                problems.push(("InvalidSchedule", format!("spec.schedule: {e}")));
                None
            }
        };
        if common.external_services.is_empty() {
            problems.push(("ExternalServiceNotFound", "spec.externalServices is empty".into()));
        }
        let mut destinations = Vec::with_capacity(common.external_services.len());
        for name in common.external_services {
            let key = (exsvc_namespace.to_string(), name.clone());
            match self.external_services.get(&key) {
                Some(true) => destinations.push(format!("{exsvc_namespace}/{name}")),
                Some(false) => problems.push((
                    "ExternalServiceInvalid",
                    format!("ExternalService {exsvc_namespace}/{name} is invalid (see its own errors)"),
                )),
                None => problems
                    .push(("ExternalServiceNotFound", format!("ExternalService {exsvc_namespace}/{name} not found"))),
            }
        }
        if !problems.is_empty() {
            self.report(&object, &obj.origin, Severity::Error, problems);
            return None;
        }
        let Resolved { value: sources, warnings } = sources.expect("no problems means sources resolved");
        self.report(&object, &obj.origin, Severity::Warning, warnings);
        Some(Rule {
            id: object.to_string(),
            kind,
            namespace: namespace.map(str::to_string),
            name: obj.name.clone(),
            identity: identity(obj),
            priority: common.priority.unwrap_or(DEFAULT_PRIORITY),
            action: common.action,
            mode: common.mode,
            logging: common.logging,
            schedule,
            sources,
            service: None,
            destinations,
        })
    }

    /// Stores a source set of namespace `ns` (so of its tenant); returns whether it is empty.
    fn insert_set(&mut self, name: &str, ns: &str, addrs: Vec<IpNet>) -> bool {
        let set = AddressSet::new(self.tenant_of(ns), addrs);
        let empty = set.addresses.is_empty();
        self.sets.insert(name.to_string(), set);
        empty
    }

    /// The set of a namespace: its pods' IPs, plus the kube-ovn subnet CIDRs that are its own. Returns the set's
    /// name and whether it is empty.
    fn namespace_set(&mut self, ns: &str) -> (String, bool) {
        let name = namespace_set(ns);
        if let Some(s) = self.sets.get(&name) {
            return (name, s.addresses.is_empty());
        }
        let mut addrs: Vec<IpNet> = pod_nets(self.snap.pods_in(ns));
        if let Some(subnets) = self.subnets.get(ns) {
            addrs.extend(subnets.own.iter().copied());
        }
        let empty = self.insert_set(&name, ns, addrs);
        (name, empty)
    }

    /// The pod IPs of a namespace, without its subnets: the sources a cluster rule's namespace selector picks.
    fn namespace_pods_set(&mut self, ns: &str) -> (String, bool) {
        let name = namespace_pods_set(ns);
        if let Some(s) = self.sets.get(&name) {
            return (name, s.addresses.is_empty());
        }
        let addrs = pod_nets(self.snap.pods_in(ns));
        let empty = self.insert_set(&name, ns, addrs);
        (name, empty)
    }

    /// The subnets of a namespace that are not used as sources, as warnings.
    fn shared_subnet_warnings(&self, ns: &str) -> Vec<Problem> {
        let Some(subnets) = self.subnets.get(ns) else { return Vec::new() };
        subnets
            .shared
            .iter()
            .map(|(net, others)| {
                (
                    "SharedSubnet",
                    format!(
                        "subnet {net} of namespace {ns} (annotation {}) is also used by namespace(s) {} of tenant {} \
                         (their subnet overlaps it, as kube-ovn's default subnet does, or their pods are in it); it is \
                         not used as a source, only the namespace's pods are",
                        ces_snapshot::OVN_CIDR_ANNOTATION,
                        others.join(", "),
                        self.tenant_name(ns)
                    ),
                )
            })
            .collect()
    }

    fn namespace_selector_sources(&mut self, sel: &LabelSelector) -> Result<Resolved<Sources>, Problem> {
        selector::validate(sel).map_err(|e| ("InvalidSelector", format!("spec.namespaceSelector: {e}")))?;
        let selected: Vec<String> = self
            .snap
            .namespaces
            .values()
            .filter(|n| selector::matches(sel, &n.labels))
            .map(|n| n.name.clone())
            .collect();
        let mut sets = Vec::with_capacity(selected.len());
        let mut all_empty = true;
        for ns in &selected {
            let (set, empty) = self.namespace_pods_set(ns);
            all_empty &= empty;
            sets.push(set);
        }
        let mut warnings = Vec::new();
        if selected.is_empty() {
            warnings.push(("NoSources", "spec.namespaceSelector selects no namespace yet".to_string()));
        } else if all_empty {
            warnings.push(("NoSources", format!("the selected namespace(s) {} have no pod yet", selected.join(", "))));
        }
        Ok(Resolved { value: Sources::Sets(sets), warnings })
    }

    fn namespace_rule_sources(
        &mut self,
        ns: &str,
        rule: &str,
        sel: Option<&LabelSelector>,
    ) -> Result<Resolved<Sources>, Problem> {
        let Some(sel) = sel else {
            let (set, empty) = self.namespace_set(ns);
            let mut warnings = self.shared_subnet_warnings(ns);
            if empty {
                warnings.push(("NoSources", format!("namespace {ns} has no pod and no subnet of its own yet")));
            }
            return Ok(Resolved { value: Sources::Sets(vec![set]), warnings });
        };
        selector::validate(sel).map_err(|e| ("InvalidSelector", format!("spec.podSelector: {e}")))?;
        let name = pod_selector_set(ns, rule);
        let empty = self.insert_set(&name, ns, selected_pod_nets(self.snap.pods_in(ns), sel));
        let warnings = if empty {
            vec![("NoSources", format!("spec.podSelector selects no pod in namespace {ns} yet"))]
        } else {
            Vec::new()
        };
        Ok(Resolved { value: Sources::Sets(vec![name]), warnings })
    }

    /// Why an endpoint address of a Service in `ns` is not trusted, if it is not ([`endpoint_refusal`]).
    fn foreign_endpoint(
        &self,
        ns: &str,
        svc: &str,
        ep: &ces_snapshot::Endpoint,
        claims: impl FnOnce() -> Claims,
    ) -> Option<Problem> {
        let tenant = self.tenant_name(ns);
        let pods: Vec<&Pod> = self
            .pods_by_ip
            .get(&ep.ip)
            .map(|v| v.iter().copied().filter(|p| self.tenant_name(&p.namespace) == tenant).collect())
            .unwrap_or_default();
        let node = self.node_pods.get(&ep.ip).copied();
        let other_subnet = || {
            self.snap.namespaces.values().filter(|n| n.name != ns && self.tenant_name(&n.name) == tenant).find_map(
                |n| {
                    let own = self.subnets.get(n.name.as_str())?;
                    own.own.iter().find(|c| c.contains(&ep.ip)).map(|net| (n.name.clone(), *net))
                },
            )
        };
        endpoint_refusal(ns, svc, ep, &pods, node, other_subnet, claims)
    }

    /// The set of a Service's endpoints: the ready addresses of its Endpoints/EndpointSlices that CES trusts, or,
    /// when it has none, the IPs of the ready pods its selector picks.
    fn service_sources(&mut self, ns: &str, svc: &str) -> Result<ServiceSources, Problem> {
        let key = (ns.to_string(), svc.to_string());
        if let Some(s) = self.service_sources.get(&key) {
            return Ok(s.clone());
        }
        let Some(service) = self.snap.services.get(&key) else {
            return Err(("ServiceNotFound", format!("Service {ns}/{svc} not found")));
        };
        let (addrs, refused) = match (self.trusted_endpoints.get(&key), &service.selector) {
            (Some((trusted, refused)), _) => (trusted.clone(), refused.clone()),
            (None, Some(sel)) => (service_pod_nets(self.snap.pods_in(ns), sel), Vec::new()),
            (None, None) => (Vec::new(), Vec::new()),
        };
        let name = service_set(ns, svc);
        let empty = self.insert_set(&name, ns, addrs);
        let s = ServiceSources { set: name, empty, refused };
        self.service_sources.insert(key, s.clone());
        Ok(s)
    }

    /// `conflicts`: the ExternalIPRules of other namespaces that claim one of this rule's addresses.
    fn nat_rule(
        &mut self,
        ns: &str,
        obj: &Object<ces_api::ExternalIPRuleSpec>,
        conflicts: &[String],
    ) -> Option<NatRule> {
        let object = ObjectRef::new("ExternalIPRule", Some(ns), &obj.name);
        let mut problems: Vec<Problem> = Vec::new();
        let mut warnings: Vec<Problem> = Vec::new();
        let mut external = Vec::new();
        if obj.spec.external_addresses.is_empty() {
            problems.push(("InvalidAddress", "spec.externalAddresses is empty".into()));
        }
        if !conflicts.is_empty() {
            problems.push((
                "EgressAddressConflict",
                format!(
                    "its egress addresses are claimed by {} too: an address claimed in two namespaces is refused in both",
                    conflicts.join(", ")
                ),
            ));
        }
        let pool = self.config.egress_pool(ns);
        for (i, a) in obj.spec.external_addresses.iter().enumerate() {
            if let (Some((whose, ranges)), Ok(r)) = (&pool, ces_config::parse_range(a))
                && !ranges.iter().any(|p| p.0.is_ipv4() == r.0.is_ipv4() && p.0 <= r.0 && r.1 <= p.1)
            {
                problems.push((
                    "EgressAddressNotInPool",
                    format!("spec.externalAddresses[{i}]: `{a}` is not in {whose} (ces-conf.yaml)"),
                ));
            }
        }
        for (i, a) in obj.spec.external_addresses.iter().enumerate() {
            match a.parse::<AddressEntry>() {
                Ok(e @ AddressEntry::Range(..)) => external.push(e),
                Ok(AddressEntry::Net(n)) if n.prefix_len() == n.max_prefix_len() => external.push(AddressEntry::Net(n)),
                Ok(_) => problems.push((
                    "InvalidAddress",
                    format!("spec.externalAddresses[{i}]: `{a}` must be an IP address or range"),
                )),
                Err(e) => problems.push(("InvalidAddress", format!("spec.externalAddresses[{i}]: {e}"))),
            }
        }
        let mut sources = Vec::new();
        if obj.spec.services.is_empty() {
            problems.push(("ServiceNotFound", "spec.services is empty".into()));
        }
        let mut all_empty = true;
        for svc in &obj.spec.services {
            match self.service_sources(ns, svc) {
                Ok(s) => {
                    all_empty &= s.empty;
                    warnings.extend(s.refused);
                    sources.push(s.set);
                }
                Err(p) => problems.push(p),
            }
        }
        if all_empty && !obj.spec.services.is_empty() {
            warnings.push(("NoSources", "the Services have no ready endpoint yet".into()));
        }
        let (mut dst_addrs, mut dst_proto, mut dst_ports) = (Vec::new(), None, Vec::new());
        if let Some(dm) = &obj.spec.destination_match {
            for (i, a) in dm.addresses.iter().enumerate() {
                match a.parse::<AddressEntry>() {
                    Ok(e) if !e.is_name() => dst_addrs.push(e),
                    Ok(_) => problems.push((
                        "InvalidAddress",
                        format!("spec.destinationMatch.addresses[{i}]: `{a}`: NAT matches IP addresses only"),
                    )),
                    Err(e) => problems.push(("InvalidAddress", format!("spec.destinationMatch.addresses[{i}]: {e}"))),
                }
            }
            if let Some(p) = &dm.destination_match_ports {
                dst_proto = p.protocol.map(|p| match p {
                    ces_api::NatProtocol::Tcp => Protocol::Tcp,
                    ces_api::NatProtocol::Udp => Protocol::Udp,
                });
                for (i, s) in p.ports.iter().enumerate() {
                    match parse_port_list(s) {
                        Ok(r) => dst_ports.extend(r),
                        Err(e) => problems.push((
                            "InvalidPort",
                            format!("spec.destinationMatch.destinationMatchPorts.ports[{i}]: {e}"),
                        )),
                    }
                }
            }
        }
        if !problems.is_empty() {
            self.report(&object, &obj.origin, Severity::Error, problems);
            return None;
        }
        self.report(&object, &obj.origin, Severity::Warning, warnings);
        Some(NatRule {
            id: object.to_string(),
            namespace: ns.to_string(),
            name: obj.name.clone(),
            identity: identity(obj),
            priority: obj.spec.priority.unwrap_or(DEFAULT_PRIORITY as u32),
            external_addresses: external,
            sources,
            services: obj.spec.services.clone(),
            destination_name: obj.spec.destination_match.as_ref().and_then(|d| d.name.clone()),
            destination_addresses: dst_addrs,
            destination_protocol: dst_proto,
            destination_ports: dst_ports,
        })
    }

    fn tenants(&mut self, mut by_tenant: BTreeMap<String, TenantRules>) -> Vec<TenantPolicy> {
        let config = self.config;
        let mut namespaces: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut all = self.snap.all_namespace_names();
        all.extend(config.tenant.iter().flat_map(|t| t.namespaces.iter().cloned()));
        all.sort_unstable();
        all.dedup();
        for ns in all {
            namespaces.entry(self.tenant_name(&ns)).or_default().push(ns);
        }

        // Trusted non-pod endpoints belong to their Service's tenant too (an address that is no pod's is in the
        // tenant where it enters).
        let mut endpoint_members: BTreeMap<&str, Vec<IpNet>> = BTreeMap::new();
        for (key, (trusted, _)) in &self.trusted_endpoints {
            endpoint_members.entry(self.tenant_name(&key.0)).or_default().extend_from_slice(trusted);
        }

        let refs: Vec<TenantRef> = self.tenant_refs.values().cloned().collect();
        let mut out = Vec::with_capacity(refs.len());
        for tref in refs {
            let name = tref.name.as_str();
            let tc = config.tenant(name);
            let route_domain = match tc.and_then(|t| t.route_domain.as_ref()) {
                Some(rd) if name != COMMON && config.is_support_route_domain => {
                    RouteDomainRef { id: tref.route_domain, name: rd.name.clone() }
                }
                _ => RouteDomainRef { id: 0, name: "0".into() },
            };
            let default_action = match tc.map(|t| t.default_action()).unwrap_or_default() {
                DefaultAction::Accept => Verdict::Accept,
                DefaultAction::Drop => Verdict::Drop,
                DefaultAction::Reject => Verdict::Reject,
            };
            let nss = namespaces.remove(name).unwrap_or_default();
            let members = tenant_set(name);
            let mut addrs = pod_nets(nss.iter().flat_map(|ns| self.snap.pods_in(ns)));
            for ns in &nss {
                if let Some(subnets) = self.subnets.get(ns.as_str()) {
                    addrs.extend(subnets.own.iter().copied());
                    addrs.extend(subnets.shared.iter().map(|(n, _)| *n));
                }
            }
            addrs.extend(endpoint_members.remove(name).unwrap_or_default());
            self.sets.insert(members.clone(), AddressSet::new(&tref, addrs));
            let TenantRules { namespace: mut ns_rules, service: mut svc_rules, nat: mut nat_rules } =
                by_tenant.remove(name).unwrap_or_default();
            sort_rules(&mut ns_rules);
            sort_rules(&mut svc_rules);
            nat_rules.sort_by(|a, b| (a.priority, &a.namespace, &a.name).cmp(&(b.priority, &b.namespace, &b.name)));
            out.push(TenantPolicy {
                name: name.to_string(),
                route_domain,
                default_action,
                namespaces: nss,
                members,
                backend: tenant_backend(tc),
                namespace_rules: ns_rules,
                service_rules: svc_rules,
                nat_rules,
            });
        }
        out
    }
}

/// The model's settings from a config that `CesConfig::from_yaml` has validated.
fn settings(config: &CesConfig) -> Settings {
    Settings {
        cluster_name: config.cluster_name.clone(),
        master_cluster: config.master_cluster().to_string(),
        schema_version: config.schema_version().to_string(),
        route_domains: config.is_support_route_domain,
        cni_type: config.cni_type().to_string(),
        i_rules: config.i_rule.clone(),
        log_pool: config.log_pool.as_ref().map(|lp| LogPoolSettings {
            logging_enabled: lp.logging_enabled,
            enable_remote_log: lp.enable_remote_log,
            health_monitor: lp.health_monitor.clone(),
            servers: if lp.server_addresses.is_empty() {
                vec![std::net::SocketAddr::from(([0, 0, 0, 0], 514))]
            } else {
                lp.server_addresses
                    .iter()
                    .filter_map(|a| ces_config::parse_host_port(a))
                    .map(std::net::SocketAddr::from)
                    .collect()
            },
            template: lp.template.as_deref().and_then(ces_config::json_object),
        }),
        snat_addresses: config.external_ip_addresses.iter().filter_map(|a| a.parse().ok()).collect(),
        gateway: {
            let g = config.gateway.clone().unwrap_or_default();
            let d = ces_model::GatewaySettings::default();
            ces_model::GatewaySettings {
                table: config.gateway_table().to_string(),
                log_group: g.log_group.unwrap_or(d.log_group),
                log_rate: g.log_rate.unwrap_or(d.log_rate),
                log_default: g.log_default.unwrap_or(d.log_default),
                uplinks: g.uplinks.clone(),
                dns: {
                    let c = g.dns.clone().unwrap_or_default();
                    let d = d.dns;
                    ces_model::DnsSettings {
                        min_ttl: c.min_ttl.unwrap_or(d.min_ttl),
                        grace: c.grace.unwrap_or(d.grace),
                        max_addresses_per_name: c.max_addresses_per_name.unwrap_or(d.max_addresses_per_name),
                        max_names: c.max_names.unwrap_or(d.max_names),
                        queue: c.queue.unwrap_or(d.queue),
                        pass_when_agent_down: c.when_agent_down.unwrap_or_default() == ces_config::WhenAgentDown::Pass,
                    }
                },
            }
        },
    }
}

fn tenant_backend(tc: Option<&ces_config::TenantConfig>) -> TenantBackend {
    let Some(tc) = tc else { return TenantBackend::default() };
    let mut vs = VirtualServerSettings::default();
    if let Some(v) = &tc.virtual_service {
        vs.template = v.template.as_deref().and_then(ces_config::json_object);
        if let Some(va) = &v.virtual_addresses {
            if let Some(a) = va.virtual_address.as_deref().and_then(|a| a.parse().ok()) {
                vs.virtual_address = a;
            }
            if let Some(e) = &va.icmp_echo {
                vs.icmp_echo = e.clone();
            }
            vs.arp_enabled = va.arp_enabled.unwrap_or(false);
        }
    }
    TenantBackend {
        gateway_pool: tc.gw_pool.iter().flat_map(|g| &g.server_addresses).filter_map(|a| a.parse().ok()).collect(),
        virtual_server: vs,
        gateway_interfaces: tc.gateway.iter().flat_map(|g| g.interfaces.iter().cloned()).collect(),
    }
}

/// Evaluation order inside a context: priority, then namespace, then name.
fn sort_rules(rules: &mut [Rule]) {
    rules.sort_by(|a, b| (a.priority, &a.namespace, &a.name).cmp(&(b.priority, &b.namespace, &b.name)));
}

#[cfg(test)]
mod tests;
