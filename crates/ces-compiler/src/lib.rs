//! The CES policy compiler: a pure function from a cluster snapshot and the config to the policy model.
//!
//! What it guarantees:
//! - every rule in the model is fully resolved and valid; a rule with any problem (a missing or invalid
//!   ExternalService, a bad schedule, a selector that selects nothing, a missing Service) is left out whole and gets
//!   one diagnostic per problem, which becomes its status. Nothing is half-applied, and one bad object never keeps
//!   another, unrelated one out;
//! - each context's rules are sorted by priority, then namespace, then name;
//! - the output depends only on the input: no clock, no I/O, no hash-map iteration order.

mod selector;

use std::collections::{BTreeMap, HashMap};

use ces_api::{DEFAULT_PRIORITY, ExternalServiceSpec, LabelSelector, RuleCommon};
use ces_config::{COMMON, CesConfig, DefaultAction};
use ces_model::{
    AddressEntry, AddressSet, Bandwidth, DestinationMatch, Diagnostic, MODEL_VERSION, NatRule, ObjectRef, PolicyModel,
    PortMatch, Protocol, RouteDomainRef, Rule, RuleKind, Schedule, Sources, TenantPolicy, Verdict, parse_port_list,
};
use ces_snapshot::{Key, Object, Pod, Snapshot};
use ipnet::IpNet;

pub use selector::{matches as selector_matches, validate as validate_selector};

/// The namespace that holds the ExternalServices of ClusterEgressRules when none is configured.
pub const DEFAULT_CES_NAMESPACE: &str = "kube-system";

/// Address-set names. Stable: backends derive object names from them.
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
    Compiler {
        snap,
        config,
        ces_namespace,
        diagnostics: snap.diagnostics.clone(),
        sets: BTreeMap::new(),
        external_services: HashMap::new(),
    }
    .run()
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

struct Compiler<'a> {
    snap: &'a Snapshot,
    config: &'a CesConfig,
    ces_namespace: &'a str,
    diagnostics: Vec<Diagnostic>,
    sets: BTreeMap<String, AddressSet>,
    /// Compiled ExternalServices; `None` when invalid.
    external_services: HashMap<Key, Option<DestinationMatch>>,
}

/// The IPs of these pods, as host networks (/32, /128).
fn pod_nets<'p>(pods: impl IntoIterator<Item = &'p Pod>) -> Vec<IpNet> {
    pods.into_iter().flat_map(|p| p.ips.iter().copied().map(IpNet::from)).collect()
}

impl<'a> Compiler<'a> {
    fn run(mut self) -> PolicyModel {
        for (key, obj) in &self.snap.external_services {
            let compiled = self.external_service(key, obj);
            self.external_services.insert(key.clone(), compiled);
        }

        let mut cluster_rules = Vec::new();
        for obj in self.snap.cluster_rules.values() {
            let sources = match &obj.spec.namespace_selector {
                None => Ok(Sources::Any),
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
                by_tenant.entry(self.config.tenant_of(ns).to_string()).or_default().namespace.push(r);
            }
        }
        for ((ns, _), obj) in &self.snap.service_rules {
            let sources = self.service_sources(ns, &obj.spec.service).map(|s| Sources::Sets(vec![s]));
            if let Some(r) = self.rule(RuleKind::ServiceEgressRule, obj, obj.spec.common(), ns, sources) {
                by_tenant.entry(self.config.tenant_of(ns).to_string()).or_default().service.push(r);
            }
        }
        for ((ns, _), obj) in &self.snap.external_ip_rules {
            if let Some(r) = self.nat_rule(ns, obj) {
                by_tenant.entry(self.config.tenant_of(ns).to_string()).or_default().nat.push(r);
            }
        }

        sort_rules(&mut cluster_rules);
        let tenants = self.tenants(by_tenant);
        PolicyModel {
            version: MODEL_VERSION,
            ces_namespace: self.ces_namespace.to_string(),
            address_sets: self.sets,
            cluster_rules,
            tenants,
            diagnostics: self.diagnostics,
        }
    }

    fn report(&mut self, object: ObjectRef, origin: &Option<String>, problems: Vec<Problem>) {
        for (reason, message) in problems {
            self.diagnostics.push(Diagnostic {
                object: Some(object.clone()),
                origin: origin.clone(),
                reason: reason.to_string(),
                message,
            });
        }
    }

    fn external_service(&mut self, key: &Key, obj: &Object<ExternalServiceSpec>) -> Option<DestinationMatch> {
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
        if problems.is_empty() {
            Some(DestinationMatch { external_service: format!("{}/{}", key.0, key.1), addresses, ports })
        } else {
            self.report(ObjectRef::new("ExternalService", Some(&key.0), &key.1), &obj.origin, problems);
            None
        }
    }

    fn rule<S>(
        &mut self,
        kind: RuleKind,
        obj: &Object<S>,
        common: RuleCommon<'_>,
        exsvc_namespace: &str,
        sources: Result<Sources, Problem>,
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
            match self.external_services.get(&(exsvc_namespace.to_string(), name.clone())) {
                Some(Some(d)) => destinations.push(d.clone()),
                Some(None) => problems.push((
                    "ExternalServiceInvalid",
                    format!("ExternalService {exsvc_namespace}/{name} is invalid (see its own errors)"),
                )),
                None => problems
                    .push(("ExternalServiceNotFound", format!("ExternalService {exsvc_namespace}/{name} not found"))),
            }
        }
        if !problems.is_empty() {
            self.report(object, &obj.origin, problems);
            return None;
        }
        Some(Rule {
            id: object.to_string(),
            kind,
            namespace: namespace.map(str::to_string),
            name: obj.name.clone(),
            priority: common.priority.unwrap_or(DEFAULT_PRIORITY),
            action: common.action,
            mode: common.mode,
            logging: common.logging,
            schedule,
            sources: sources.expect("no problems means sources resolved"),
            destinations,
        })
    }

    /// The set of a namespace: its pods' IPs, plus its kube-ovn subnet CIDRs when the CNI is kube-ovn.
    fn namespace_set(&mut self, ns: &str) -> String {
        let name = namespace_set(ns);
        if !self.sets.contains_key(&name) {
            let mut addrs: Vec<IpNet> = pod_nets(self.snap.pods_in(ns));
            if self.config.cni_type() == ces_config::DEFAULT_CNI_TYPE
                && let Some(n) = self.snap.namespaces.get(ns)
            {
                addrs.extend(n.cidrs.iter().copied());
            }
            self.sets.insert(name.clone(), AddressSet::from_unsorted(addrs));
        }
        name
    }

    /// The pod IPs of a namespace, without its CIDRs: the sources a cluster rule's namespace selector picks.
    fn namespace_pods_set(&mut self, ns: &str) -> String {
        let name = namespace_pods_set(ns);
        if !self.sets.contains_key(&name) {
            let addrs = pod_nets(self.snap.pods_in(ns));
            self.sets.insert(name.clone(), AddressSet::from_unsorted(addrs));
        }
        name
    }

    fn namespace_selector_sources(&mut self, sel: &LabelSelector) -> Result<Sources, Problem> {
        selector::validate(sel).map_err(|e| ("InvalidSelector", format!("spec.namespaceSelector: {e}")))?;
        let selected: Vec<String> = self
            .snap
            .namespaces
            .values()
            .filter(|n| selector::matches(sel, &n.labels))
            .map(|n| n.name.clone())
            .collect();
        if selected.is_empty() {
            return Err(("SelectorMatchesNothing", "spec.namespaceSelector selects no namespace".into()));
        }
        Ok(Sources::Sets(selected.iter().map(|ns| self.namespace_pods_set(ns)).collect()))
    }

    fn namespace_rule_sources(
        &mut self,
        ns: &str,
        rule: &str,
        sel: Option<&LabelSelector>,
    ) -> Result<Sources, Problem> {
        let Some(sel) = sel else {
            return Ok(Sources::Sets(vec![self.namespace_set(ns)]));
        };
        selector::validate(sel).map_err(|e| ("InvalidSelector", format!("spec.podSelector: {e}")))?;
        let pods: Vec<_> = self.snap.pods_in(ns).iter().filter(|p| selector::matches(sel, &p.labels)).collect();
        if pods.is_empty() {
            return Err(("SelectorMatchesNothing", format!("spec.podSelector selects no pod in namespace {ns}")));
        }
        let name = pod_selector_set(ns, rule);
        let addrs = pod_nets(pods);
        self.sets.insert(name.clone(), AddressSet::from_unsorted(addrs));
        Ok(Sources::Sets(vec![name]))
    }

    /// The set of a Service's endpoints: the addresses its Endpoints/EndpointSlices list as ready, or, when it has
    /// none, the IPs of the ready pods its selector picks.
    fn service_sources(&mut self, ns: &str, svc: &str) -> Result<String, Problem> {
        let key = (ns.to_string(), svc.to_string());
        let Some(service) = self.snap.services.get(&key) else {
            return Err(("ServiceNotFound", format!("Service {ns}/{svc} not found")));
        };
        let name = service_set(ns, svc);
        if self.sets.contains_key(&name) {
            return Ok(name);
        }
        let addrs: Vec<IpNet> = match (self.snap.endpoints.get(&key), &service.selector) {
            (Some(ips), _) => ips.iter().copied().map(IpNet::from).collect(),
            (None, Some(sel)) => {
                pod_nets(self.snap.pods_in(ns).iter().filter(|p| p.ready && selector::service_selects(sel, &p.labels)))
            }
            (None, None) => Vec::new(),
        };
        self.sets.insert(name.clone(), AddressSet::from_unsorted(addrs));
        Ok(name)
    }

    fn nat_rule(&mut self, ns: &str, obj: &Object<ces_api::ExternalIPRuleSpec>) -> Option<NatRule> {
        let object = ObjectRef::new("ExternalIPRule", Some(ns), &obj.name);
        let mut problems: Vec<Problem> = Vec::new();
        let mut external = Vec::new();
        if obj.spec.external_addresses.is_empty() {
            problems.push(("InvalidAddress", "spec.externalAddresses is empty".into()));
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
        for svc in &obj.spec.services {
            match self.service_sources(ns, svc) {
                Ok(s) => sources.push(s),
                Err(p) => problems.push(p),
            }
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
            self.report(object, &obj.origin, problems);
            return None;
        }
        Some(NatRule {
            id: object.to_string(),
            namespace: ns.to_string(),
            name: obj.name.clone(),
            priority: obj.spec.priority.unwrap_or(DEFAULT_PRIORITY as u32),
            external_addresses: external,
            sources,
            destination_addresses: dst_addrs,
            destination_protocol: dst_proto,
            destination_ports: dst_ports,
        })
    }

    fn tenants(&mut self, mut by_tenant: BTreeMap<String, TenantRules>) -> Vec<TenantPolicy> {
        let config = self.config;
        let mut names: Vec<&str> = if config.is_support_route_domain {
            config.tenant.iter().map(|t| t.name.as_str()).collect()
        } else {
            Vec::new()
        };
        names.push(COMMON);
        names.sort_unstable();
        names.dedup();

        let mut namespaces: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut all = self.snap.all_namespace_names();
        all.extend(config.tenant.iter().flat_map(|t| t.namespaces.iter().cloned()));
        all.sort_unstable();
        all.dedup();
        for ns in all {
            namespaces.entry(config.tenant_of(&ns)).or_default().push(ns);
        }

        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let tc = config.tenant(name);
            let route_domain = match tc.and_then(|t| t.route_domain.as_ref()) {
                Some(rd) if name != COMMON && config.is_support_route_domain => {
                    RouteDomainRef { id: rd.id, name: rd.name.clone() }
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
            let addrs = pod_nets(nss.iter().flat_map(|ns| self.snap.pods_in(ns)));
            self.sets.insert(members.clone(), AddressSet::from_unsorted(addrs));
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
                namespace_rules: ns_rules,
                service_rules: svc_rules,
                nat_rules,
            });
        }
        out
    }
}

/// Evaluation order inside a context: priority, then namespace, then name.
fn sort_rules(rules: &mut [Rule]) {
    rules.sort_by(|a, b| (a.priority, &a.namespace, &a.name).cmp(&(b.priority, &b.namespace, &b.name)));
}

#[cfg(test)]
mod tests;
