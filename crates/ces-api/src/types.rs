//! Custom resource types.
//!
//! Compatibility rules, from the original CES (`kubeovn/ces-controller` 0.5.3.2 and the 0.6.x line):
//! the same groups, kinds, scopes, short names, printer columns, required fields and the same action enum.
//! Everything added here is optional, so every manifest written for the original loads unchanged.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::ResourceStatus;

/// What a rule does with a flow it matches. The values are BIG-IP AFM's rule actions, verbatim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Ends the current context and goes on to the next one; in the service context it accepts.
    Accept,
    /// Drops silently.
    Drop,
    /// Accepts at once and skips every later context.
    AcceptDecisively,
    /// Drops and tells the client (TCP reset or ICMP unreachable).
    Reject,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Accept => "accept",
            Action::Drop => "drop",
            Action::AcceptDecisively => "accept-decisively",
            Action::Reject => "reject",
        }
    }
}

/// `enforce` (the default) or `audit`: an audit rule is evaluated and reported but never changes a verdict
/// (the original's promised "transparent detection mode").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

/// Day of the week, as written in a schedule window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    pub const ALL: [Weekday; 7] =
        [Weekday::Mon, Weekday::Tue, Weekday::Wed, Weekday::Thu, Weekday::Fri, Weekday::Sat, Weekday::Sun];

    /// Monday is 0, Sunday is 6.
    pub fn index(self) -> u8 {
        self as u8
    }
}

/// When a rule takes part in evaluation. Outside every window the rule is skipped as if absent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Schedule {
    /// IANA time zone name, such as `Europe/Paris`. Default `UTC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_+\-/]+$"))]
    pub timezone: Option<String>,
    /// The rule is active inside any of these windows.
    #[schemars(length(min = 1, max = 64))]
    pub windows: Vec<TimeWindow>,
}

/// A daily window of local time. `start` later than `end` crosses midnight: the window then runs from `start` on a
/// listed day to `end` on the next day.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeWindow {
    /// Days on which the window starts. Empty or absent means every day.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<Weekday>,
    /// Local start time, `HH:MM`, inclusive.
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub start: String,
    /// Local end time, `HH:MM`, exclusive; `24:00` is the end of the day.
    #[schemars(regex(pattern = r"^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$"))]
    pub end: String,
}

/// A Kubernetes label selector. An own type (not k8s-openapi's) so that unknown fields are rejected: a misspelt
/// `matchLabel` must not silently become "select everything".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// Admission-time shape of an ExternalService address: an IPv4/IPv6 address, CIDR or range `a-b`, a host name or
/// a wildcard host name `*.example.com`. The compiler checks each entry precisely.
pub const ADDRESS_PATTERN: &str = r"^(\*\.)?[0-9A-Za-z:.][0-9A-Za-z.:/-]*$";
/// The original's port syntax: `80`, `8000-8080`, `80,443,8000-8080`.
pub const PORT_PATTERN: &str = r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$";
/// `tcp`, `udp`, `icmp` or `any`, in any case (the original's examples write `UDP`). Empty means `any`.
pub const PROTOCOL_PATTERN: &str = r"^([Tt][Cc][Pp]|[Uu][Dd][Pp]|[Ii][Cc][Mm][Pp]|[Aa][Nn][Yy])?$";
/// A BIG-IP iRule name (the original's meaning) or a rate such as `10Mbps`.
pub const BANDWIDTH_PATTERN: &str = r"^[0-9A-Za-z][0-9A-Za-z_. /-]*$";

/// A set of external destinations: addresses and ports. Referenced by name from egress rules.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kubeovn.io",
    version = "v1alpha1",
    kind = "ExternalService",
    namespaced,
    shortname = "exsvc",
    status = "ResourceStatus",
    printcolumn = r#"{"name":"Addresses","type":"string","jsonPath":".spec.addresses"}"#,
    doc = "A set of destinations outside the cluster: addresses (IP, CIDR, range, host name, wildcard) and ports."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalServiceSpec {
    #[schemars(inner(length(min = 1, max = 253), regex(pattern = ADDRESS_PATTERN)))]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ExternalServicePort>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = PROTOCOL_PATTERN))]
    pub protocol: Option<String>,
    /// Absent means every port of the protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = PORT_PATTERN))]
    pub port: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 190), regex(pattern = BANDWIDTH_PATTERN))]
    pub bandwidth: Option<String>,
}

/// The cluster-wide scope, owned by the security team. Its ExternalServices live in the controller's namespace.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kubeovn.io",
    version = "v1alpha1",
    kind = "ClusterEgressRule",
    shortname = "cgr",
    status = "ResourceStatus",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Scope","type":"string","jsonPath":".status.scope"}"#,
    doc = "An egress rule for the whole cluster (AFM global context)."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterEgressRuleSpec {
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logging: Option<bool>,
    pub external_services: Vec<String>,
    /// Lower runs first. Default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// Narrows the sources to the pods of the namespaces it selects. Absent means every source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

/// The namespace scope, owned by the project team.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kubeovn.io",
    version = "v1alpha1",
    kind = "NamespaceEgressRule",
    namespaced,
    shortname = "nsgr",
    status = "ResourceStatus",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Scope","type":"string","jsonPath":".status.scope"}"#,
    doc = "An egress rule for the pods of one namespace (AFM route-domain context)."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceEgressRuleSpec {
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logging: Option<bool>,
    pub external_services: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// Narrows the sources to the matching pods of the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

/// The service scope, owned by the application owners.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "kubeovn.io",
    version = "v1alpha1",
    kind = "ServiceEgressRule",
    namespaced,
    shortname = "svcgr",
    status = "ResourceStatus",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Scope","type":"string","jsonPath":".status.scope"}"#,
    doc = "An egress rule for the endpoints of one Service (AFM virtual-server context)."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEgressRuleSpec {
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logging: Option<bool>,
    /// Name of a Service in the rule's namespace; its endpoints are the sources.
    #[schemars(length(min = 1, max = 63))]
    pub service: String,
    pub external_services: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
}

/// Source NAT for the endpoints of Services (the 0.6.x line).
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "bigip.io",
    version = "v1alpha1",
    kind = "ExternalIPRule",
    namespaced,
    shortname = "eipr",
    status = "ResourceStatus",
    printcolumn = r#"{"name":"ExternalIP","type":"string","jsonPath":".spec.externalAddresses"}"#,
    printcolumn = r#"{"name":"Services","type":"string","jsonPath":".spec.services"}"#,
    doc = "Source NAT of the endpoints of Services to external addresses."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExternalIPRuleSpec {
    #[schemars(length(min = 1))]
    pub external_addresses: Vec<String>,
    #[schemars(length(min = 1))]
    pub services: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_match: Option<DestinationMatch>,
    /// In the 0.6.x Go type but unused there. Lower runs first; default 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = 253), regex(pattern = ADDRESS_PATTERN)))]
    pub addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_match_ports: Option<DestinationMatchPorts>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationMatchPorts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<NatProtocol>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = PORT_PATTERN)))]
    pub ports: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NatProtocol {
    Tcp,
    Udp,
}

/// The fields every egress rule kind shares, borrowed from whichever kind it is.
#[derive(Clone, Copy, Debug)]
pub struct RuleCommon<'a> {
    pub action: Action,
    pub logging: bool,
    pub external_services: &'a [String],
    pub priority: Option<i32>,
    pub mode: Mode,
    pub schedule: Option<&'a Schedule>,
}

macro_rules! rule_common {
    ($spec:ty) => {
        impl $spec {
            pub fn common(&self) -> RuleCommon<'_> {
                RuleCommon {
                    action: self.action,
                    logging: self.logging.unwrap_or(false),
                    external_services: &self.external_services,
                    priority: self.priority,
                    mode: self.mode.unwrap_or_default(),
                    schedule: self.schedule.as_ref(),
                }
            }
        }
    };
}
rule_common!(ClusterEgressRuleSpec);
rule_common!(NamespaceEgressRuleSpec);
rule_common!(ServiceEgressRuleSpec);

/// Default rule priority when a rule sets none.
pub const DEFAULT_PRIORITY: i32 = 1000;
