//! The intermediate policy model: what the compiler produces and every backend and the evaluator consume.
//!
//! It is plain, ordered data: rules already sorted in evaluation order, references already resolved, every value
//! already validated. Source addresses are kept in named sets (one per namespace, pod selector, Service, tenant) so
//! that a set shared by many rules is stored once, as the data planes store it (AS3 address lists, nft sets).

use std::collections::BTreeMap;
use std::fmt;

use ces_api::{Action, Mode, ResourceStatus, failed_status, succeeded_status};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::address::AddressEntry;
use crate::ports::{Bandwidth, PortRange, Protocol};
use crate::schedule::Schedule;

/// The tenant of unmapped namespaces, unknown sources and cluster rules.
pub const COMMON_TENANT: &str = "Common";

/// Bumped when the JSON shape changes incompatibly.
pub const MODEL_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyModel {
    pub version: u32,
    /// Where ClusterEgressRules find their ExternalServices.
    pub ces_namespace: String,
    /// Named source address sets, referenced by rules and tenants.
    pub address_sets: BTreeMap<String, AddressSet>,
    /// The cluster context (AFM global context), in evaluation order.
    pub cluster_rules: Vec<Rule>,
    /// One entry per tenant, sorted by name.
    pub tenants: Vec<TenantPolicy>,
    /// One entry per problem, each naming its object; the objects are left out of the model.
    pub diagnostics: Vec<Diagnostic>,
}

/// A set of source addresses: pod IPs as /32 or /128, and namespace CIDRs. Sorted and without duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressSet {
    pub addresses: Vec<IpNet>,
}

impl AddressSet {
    pub fn from_unsorted(mut addresses: Vec<IpNet>) -> AddressSet {
        addresses.sort_unstable();
        addresses.dedup();
        AddressSet { addresses }
    }
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
    /// Name of the address set of this tenant's pod IPs.
    pub members: String,
    /// The namespace context (AFM route-domain context), in evaluation order.
    pub namespace_rules: Vec<Rule>,
    /// The service context (AFM virtual-server context), in evaluation order.
    pub service_rules: Vec<Rule>,
    /// Source NAT rules (ExternalIPRule), in priority order. Not part of the allow/deny decision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nat_rules: Vec<NatRule>,
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
    pub priority: i32,
    pub action: Action,
    pub mode: Mode,
    pub logging: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    pub sources: Sources,
    /// One entry per referenced ExternalService, in the order the rule lists them.
    pub destinations: Vec<DestinationMatch>,
}

/// Which sources a rule applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Sources {
    /// Every source (a cluster rule without a namespace selector).
    Any,
    /// Any address in any of these named sets.
    Sets(Vec<String>),
}

/// The destinations of one ExternalService.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationMatch {
    /// `namespace/name` of the ExternalService.
    pub external_service: String,
    pub addresses: Vec<AddressEntry>,
    /// In the order listed. Empty means any protocol and any port.
    pub ports: Vec<PortMatch>,
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
    pub priority: u32,
    pub external_addresses: Vec<AddressEntry>,
    /// One set per Service, in the order listed.
    pub sources: Vec<String>,
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

/// One problem with one object (or, for unparseable input, one file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Diagnostic {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjectRef>,
    /// Where the object came from, such as `manifests/a.yaml#3` (third document).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// A CamelCase reason code, used as the condition reason in the object's status.
    pub reason: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(o) = &self.origin {
            write!(f, "{o}: ")?;
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

    /// The status CES writes on an object: `Failed` with the first problem's reason, else `Success`.
    pub fn status_of(&self, object: &ObjectRef, generation: Option<i64>) -> ResourceStatus {
        let mut problems = self.diagnostics.iter().filter(|d| d.object.as_ref() == Some(object));
        match problems.next() {
            None => succeeded_status(generation, "compiled into the policy model"),
            Some(first) => {
                let mut message = first.message.clone();
                for more in problems {
                    message.push_str("; ");
                    message.push_str(&more.message);
                }
                failed_status(generation, &first.reason, &message)
            }
        }
    }
}
