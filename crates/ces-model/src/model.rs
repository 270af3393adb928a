//! The intermediate policy model: what the compiler produces and every backend and the evaluator consume.
//!
//! It is plain, ordered data: rules already sorted in evaluation order, references already resolved, every value
//! already validated. It is the interface between the compiler and every backend (docs/model.md): a backend renders
//! from the model alone and never parses a name to learn a fact.
//!
//! - Source addresses are kept in named sets (one per namespace, pod selector, Service, tenant). Each set belongs to
//!   exactly one tenant and carries that tenant's route domain; a set matches only flows of its tenant. A set shared
//!   by many rules is stored once, as the data planes store it (AS3 address lists, nft sets).
//! - Each ExternalService is one named destination set; rules refer to it by id.
//! - `settings` and each tenant's `backend` carry what the data planes need from `ces-conf.yaml`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ces_api::{Action, Mode, ResourceStatus, accepted_status, rejected_status};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::address::AddressEntry;
use crate::ports::{Bandwidth, PortRange, Protocol};
use crate::schedule::Schedule;

/// The tenant of unmapped namespaces, unknown sources and cluster rules.
pub const COMMON_TENANT: &str = "Common";

/// Bumped when the JSON shape changes incompatibly. 2: tenant-qualified sets, destination sets, settings, identity.
pub const MODEL_VERSION: u32 = 2;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyModel {
    pub version: u32,
    /// Where ClusterEgressRules find their ExternalServices.
    pub ces_namespace: String,
    /// What the backends need from `ces-conf.yaml`, beyond the per-tenant settings.
    pub settings: Settings,
    /// Named source address sets, referenced by rules, NAT rules and tenants. Each belongs to one tenant.
    pub address_sets: BTreeMap<String, AddressSet>,
    /// Every valid ExternalService, by id `namespace/name`, referenced by rules.
    pub destination_sets: BTreeMap<String, DestinationSet>,
    /// The cluster context (AFM global context), in evaluation order.
    pub cluster_rules: Vec<Rule>,
    /// One entry per tenant, sorted by name.
    pub tenants: Vec<TenantPolicy>,
    /// Every source pod (not finished, not on the host network), sorted by namespace and name.
    pub pods: Vec<PodEntry>,
    /// One entry per problem, each naming its object. Objects with an error are left out of the model; warnings
    /// leave them in.
    pub diagnostics: Vec<Diagnostic>,
}

/// Settings of `ces-conf.yaml` that are not per tenant, parsed and validated.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    /// Prefix of per-rule AS3 objects.
    pub cluster_name: String,
    /// Prefix of shared AS3 objects (policies, pools, virtual server, log objects).
    pub master_cluster: String,
    /// AS3 `schemaVersion`.
    pub schema_version: String,
    /// `isSupportRouteDomain`: tenants are partitions with their own route domains.
    pub route_domains: bool,
    /// `cniType`.
    pub cni_type: String,
    /// iRule names that bandwidth entries may name (they live in `/Common`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub i_rules: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_pool: Option<LogPoolSettings>,
    /// `externalIPAddresses`: addresses of the default SNAT translation (0.6.x).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snat_addresses: Vec<AddressEntry>,
    /// The nftables gateway's settings.
    pub gateway: GatewaySettings,
}

/// `gateway` of `ces-conf.yaml`, with defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySettings {
    /// The private nftables table (family `inet`).
    pub table: String,
    /// The NFLOG group that logged packets go to.
    pub log_group: u16,
    /// At most this many packets per second are logged per rule (the kernel drops the rest of the log, never the
    /// traffic).
    pub log_rate: u32,
    /// Log the packets that the tenants' default actions decide.
    pub log_default: bool,
    /// Where traffic leaves towards its destinations: bandwidth limits are shaped there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uplinks: Vec<String>,
    /// How host names' addresses are learned from DNS answers.
    pub dns: DnsSettings,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            table: "ces".into(),
            log_group: 100,
            log_rate: 100,
            log_default: false,
            uplinks: Vec::new(),
            dns: DnsSettings::default(),
        }
    }
}

/// The gateway's DNS learning (`gateway.dns` in ces-conf.yaml; docs/nft.md, "Host names").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsSettings {
    /// TTLs below this count as this many seconds.
    #[serde(rename = "minTTL")]
    pub min_ttl: u32,
    /// Seconds a learned address lives past its TTL.
    pub grace: u32,
    pub max_addresses_per_name: u32,
    /// Names kept per tenant.
    pub max_names: u32,
    /// The NFQUEUE number answers are held in.
    pub queue: u16,
    /// Whether answers pass (unheld) while no agent holds the queue; else they are dropped.
    pub pass_when_agent_down: bool,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            min_ttl: 0,
            grace: 60,
            max_addresses_per_name: 256,
            max_names: 10_000,
            queue: 53,
            pass_when_agent_down: true,
        }
    }
}

/// A source pod, so that a data plane can name the pod behind an address (logs, reports).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodEntry {
    pub tenant: String,
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    /// The pod's labels (its workload), for flow records and reports.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// How a model differs from the one it was patched from when only pods and Services' endpoints moved
/// (`ces_compiler::recompile_churn`): the address sets whose members changed, and the pod entries as they were and
/// are (`None`: absent). Everything else is as it was. A backend may apply just this.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodDelta {
    pub sets: Vec<String>,
    pub pods: Vec<(Option<PodEntry>, Option<PodEntry>)>,
}

/// `logPool`, parsed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogPoolSettings {
    pub logging_enabled: bool,
    pub enable_remote_log: bool,
    pub health_monitor: String,
    /// Log servers; the port defaults to 514.
    pub servers: Vec<SocketAddr>,
    /// The AS3 log objects, by name, as written (the `k8s` substitution is the AS3 backend's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A set of source addresses of one tenant: pod IPs as /32 or /128, subnet CIDRs, non-pod endpoint addresses.
/// Sorted and without duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddressSet {
    /// The tenant whose flows this set can match.
    pub tenant: String,
    /// That tenant's route domain id (0 for `Common` or without route domains).
    pub route_domain: u16,
    pub addresses: Vec<IpNet>,
}

impl AddressSet {
    pub fn new(tenant: &TenantRef, mut addresses: Vec<IpNet>) -> AddressSet {
        addresses.sort_unstable();
        addresses.dedup();
        AddressSet { tenant: tenant.name.clone(), route_domain: tenant.route_domain, addresses }
    }
}

/// A tenant and its route domain id, as sets carry them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantRef {
    pub name: String,
    pub route_domain: u16,
}

/// One ExternalService: where traffic may go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationSet {
    pub namespace: String,
    pub name: String,
    #[serde(flatten)]
    pub identity: Identity,
    pub addresses: Vec<AddressEntry>,
    /// In the order listed. Empty means any protocol and any port.
    pub ports: Vec<PortMatch>,
}

impl DestinationSet {
    /// `namespace/name`, the key of `PolicyModel::destination_sets`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What identifies the Kubernetes object a model entry came from, for writing its status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantPolicy {
    pub name: String,
    pub route_domain: RouteDomainRef,
    /// The verdict when no service rule matched (the original's `deny_all_rule`).
    pub default_action: Verdict,
    /// Namespaces of this tenant: those the config lists and those seen in the cluster that map here.
    pub namespaces: Vec<String>,
    /// Name of the address set of every source address of this tenant: its pods, its namespaces' own subnets,
    /// and the non-pod endpoints of its Services.
    pub members: String,
    /// What the data planes need for this tenant from `ces-conf.yaml`.
    pub backend: TenantBackend,
    /// The namespace context (AFM route-domain context), in evaluation order.
    pub namespace_rules: Vec<Rule>,
    /// The service context (AFM virtual-server context), in evaluation order.
    pub service_rules: Vec<Rule>,
    /// Source NAT rules (ExternalIPRule), in priority order. Not part of the allow/deny decision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nat_rules: Vec<NatRule>,
}

impl TenantPolicy {
    pub fn tenant_ref(&self) -> TenantRef {
        TenantRef { name: self.name.clone(), route_domain: self.route_domain.id }
    }
}

/// Per-tenant backend settings: the egress gateway pool and the outbound virtual server.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantBackend {
    /// `gwPool.serverAddresses`: the egress next hops.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateway_pool: Vec<IpAddr>,
    pub virtual_server: VirtualServerSettings,
    /// `gateway.interfaces`: where this tenant's traffic enters the nftables gateway (empty: by source address).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateway_interfaces: Vec<String>,
}

/// `virtualService`, with the original's defaults filled in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServerSettings {
    /// A full AS3 `Service_L4` body, as written (substitutions are the AS3 backend's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<serde_json::Map<String, serde_json::Value>>,
    /// Default `0.0.0.0`.
    pub virtual_address: IpAddr,
    /// `enable`, `disable` (default) or `selective`.
    pub icmp_echo: String,
    pub arp_enabled: bool,
}

impl Default for VirtualServerSettings {
    fn default() -> Self {
        VirtualServerSettings {
            template: None,
            virtual_address: IpAddr::from([0, 0, 0, 0]),
            icmp_echo: "disable".into(),
            arp_enabled: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteDomainRef {
    pub id: u16,
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RuleKind {
    ClusterEgressRule,
    NamespaceEgressRule,
    ServiceEgressRule,
    ExternalIPRule,
    ExternalService,
}

impl RuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::ClusterEgressRule => "ClusterEgressRule",
            RuleKind::NamespaceEgressRule => "NamespaceEgressRule",
            RuleKind::ServiceEgressRule => "ServiceEgressRule",
            RuleKind::ExternalIPRule => "ExternalIPRule",
            RuleKind::ExternalService => "ExternalService",
        }
    }
}

/// A compiled egress rule. Its `id` is `Kind/namespace/name` (`Kind/name` for cluster rules).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    pub id: String,
    pub kind: RuleKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(flatten)]
    pub identity: Identity,
    pub priority: i32,
    pub action: Action,
    pub mode: Mode,
    pub logging: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    pub sources: Sources,
    /// The Service a ServiceEgressRule names (`spec.service`): backends name its source list after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Ids of the referenced destination sets (`namespace/name` of ExternalServices), in the order the rule lists
    /// them.
    pub destinations: Vec<String>,
}

/// Which sources a rule applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Sources {
    /// Every source of every tenant (a cluster rule without a namespace selector).
    Any,
    /// Any address in any of these named sets, for flows of the set's tenant. May be empty (a selector that
    /// matches nothing yet): the rule then matches no flow.
    Sets(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub protocol: Protocol,
    /// Empty means every port (and is the only form for ICMP).
    pub ports: Vec<PortRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
}

/// A compiled ExternalIPRule: SNAT of the endpoints of Services.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NatRule {
    pub id: String,
    pub namespace: String,
    pub name: String,
    #[serde(flatten)]
    pub identity: Identity,
    pub priority: u32,
    pub external_addresses: Vec<AddressEntry>,
    /// One set per Service, in the order listed.
    pub sources: Vec<String>,
    /// The Services (`spec.services`), in the order listed: `services[i]` is the Service of `sources[i]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// `spec.destinationMatch.name`, which backends name the destination objects after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_addresses: Vec<AddressEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<PortRange>,
}

/// The outcome for a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Accept,
    Drop,
    Reject,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Accept => "accept",
            Verdict::Drop => "drop",
            Verdict::Reject => "reject",
        }
    }
}

/// The evaluation contexts, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Context {
    Cluster,
    Namespace,
    Service,
    Default,
}

impl Context {
    pub fn as_str(self) -> &'static str {
        match self {
            Context::Cluster => "cluster",
            Context::Namespace => "namespace",
            Context::Service => "service",
            Context::Default => "default",
        }
    }
}

/// A reference to a Kubernetes object, shown as `Kind/namespace/name` or `Kind/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectRef {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectRef {
    pub fn new(kind: &str, namespace: Option<&str>, name: &str) -> ObjectRef {
        ObjectRef { kind: kind.to_string(), namespace: namespace.map(str::to_string), name: name.to_string() }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{}/{}/{}", self.kind, ns, self.name),
            None => write!(f, "{}/{}", self.kind, self.name),
        }
    }
}

/// Who has an address in a tenant: the pod behind a source address, for logs, reports and `simulate`. Kept up to
/// date pod by pod under churn ([`PodIndex::remove`], [`PodIndex::insert`]).
#[derive(Clone, Debug, Default)]
pub struct PodIndex {
    /// `(tenant, address)` to the `(namespace, name)` of the pods that have it.
    by_address: std::collections::HashMap<(String, IpAddr), Vec<(String, String)>>,
}

impl PodIndex {
    pub fn new(pods: &[PodEntry]) -> PodIndex {
        let mut index = PodIndex::default();
        for p in pods {
            index.insert(p);
        }
        index
    }

    pub fn insert(&mut self, p: &PodEntry) {
        for ip in &p.ips {
            self.by_address.entry((p.tenant.clone(), *ip)).or_default().push((p.namespace.clone(), p.name.clone()));
        }
    }

    pub fn remove(&mut self, p: &PodEntry) {
        for ip in &p.ips {
            let key = (p.tenant.clone(), *ip);
            if let Some(v) = self.by_address.get_mut(&key) {
                v.retain(|(ns, name)| (ns, name) != (&p.namespace, &p.name));
                if v.is_empty() {
                    self.by_address.remove(&key);
                }
            }
        }
    }

    /// `(namespace, pod)` of the one pod of `tenant` that has `ip`; `None` when no pod, or several, have it.
    pub fn pod(&self, tenant: &str, ip: IpAddr) -> Option<(&str, &str)> {
        match self.by_address.get(&(tenant.to_string(), ip)).map(Vec::as_slice) {
            Some([one]) => Some((one.0.as_str(), one.1.as_str())),
            _ => None,
        }
    }
}

/// An error leaves its object out of the model (the user must fix it); a warning leaves it in and says what CES
/// did not use, or that the object has no effect yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    #[default]
    Error,
    Warning,
}

/// One problem with one object (or, for unparseable input, one file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Diagnostic {
    #[serde(default)]
    pub severity: Severity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjectRef>,
    /// Where the object came from, such as `manifests/a.yaml:3` (the line its document starts on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// A CamelCase reason code, used as the condition reason in the object's status.
    pub reason: String,
    pub message: String,
}

impl Diagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(o) = &self.origin {
            write!(f, "{o}: ")?;
        }
        if self.severity == Severity::Warning {
            write!(f, "warning: ")?;
        }
        if let Some(obj) = &self.object {
            write!(f, "{obj}: ")?;
        }
        write!(f, "{} ({})", self.message, self.reason)
    }
}

impl PolicyModel {
    /// Every rule of every context, with the tenant that holds it (`None` for cluster rules).
    pub fn rules(&self) -> impl Iterator<Item = (Option<&TenantPolicy>, &Rule)> {
        self.cluster_rules.iter().map(|r| (None, r)).chain(
            self.tenants
                .iter()
                .flat_map(|t| t.namespace_rules.iter().chain(&t.service_rules).map(move |r| (Some(t), r))),
        )
    }

    pub fn tenant(&self, name: &str) -> Option<&TenantPolicy> {
        self.tenants.iter().find(|t| t.name == name)
    }

    /// The diagnostics that left an object out.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.is_error())
    }

    /// The status CES writes on an object: `Failed` with the first error's reason; else `Success`, with the first
    /// warning's reason when there is one (the object is applied, and says what it lacks).
    pub fn status_of(&self, object: &ObjectRef, generation: Option<i64>) -> ResourceStatus {
        let mine: Vec<&Diagnostic> = self.diagnostics.iter().filter(|d| d.object.as_ref() == Some(object)).collect();
        let errors: Vec<&Diagnostic> = mine.iter().copied().filter(|d| d.is_error()).collect();
        let join = |ds: &[&Diagnostic]| ds.iter().map(|d| d.message.as_str()).collect::<Vec<_>>().join("; ");
        match (errors.first(), mine.first()) {
            (Some(first), _) => rejected_status(generation, &first.reason, &join(&errors)),
            (None, Some(warning)) => accepted_status(generation, &warning.reason, &join(&mine)),
            (None, None) => accepted_status(generation, "Accepted", "compiled into the policy model"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_behind_an_address_is_looked_up_in_its_tenant_and_only_when_unique() {
        let pod = |tenant: &str, ns: &str, name: &str, ip: &str| PodEntry {
            labels: Default::default(),
            tenant: tenant.into(),
            namespace: ns.into(),
            name: name.into(),
            ips: vec![ip.parse().unwrap()],
        };
        let idx = PodIndex::new(&[
            pod("payments", "pay", "checkout-0", "10.10.0.11"),
            pod("analytics", "dev", "jupyter-0", "10.10.0.11"),
            pod("Common", "a", "x", "10.0.0.1"),
            pod("Common", "b", "y", "10.0.0.1"),
        ]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(idx.pod("payments", ip("10.10.0.11")), Some(("pay", "checkout-0")));
        assert_eq!(idx.pod("analytics", ip("10.10.0.11")), Some(("dev", "jupyter-0")));
        assert_eq!(idx.pod("Common", ip("10.10.0.11")), None, "no pod of Common has it");
        assert_eq!(idx.pod("Common", ip("10.0.0.1")), None, "two pods have it: naming one would be a guess");
    }
}
