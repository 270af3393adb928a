//! `ces-conf.yaml`, the configuration file of the original CES controller.
//!
//! Every key of the original is accepted with the original's default. Parsing is strict: an unknown key, a value of
//! the wrong type or a value that cannot work (a namespace mapped to two tenants, a template that is not JSON) is an
//! error that names the file and the key. All errors of a file are reported at once.
//! The keys are documented in `docs/config.md`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

/// The tenant every unmapped namespace, every unknown source and every cluster rule belongs to.
pub const COMMON: &str = "Common";
/// `schemaVersion` when the file sets none (the original's default).
pub const DEFAULT_SCHEMA_VERSION: &str = "3.29.0";
/// The original's `cniType` default (dev/calico branch).
pub const DEFAULT_CNI_TYPE: &str = "kube-ovn";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CesConfig {
    /// Prefix of every per-rule AS3 object. Required in practice: AS3 names must start with a letter.
    #[serde(default)]
    pub cluster_name: String,
    /// Prefix of shared AS3 objects; defaults to `clusterName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_cluster: Option<String>,
    #[serde(default)]
    pub is_support_route_domain: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<String>,
    /// iRule names that `ports[].bandwidth` may name.
    #[serde(default, rename = "iRule")]
    pub i_rule: Vec<String>,
    #[serde(default)]
    pub tenant: Vec<TenantConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_pool: Option<LogPool>,
    /// dev/calico branch: when not `kube-ovn`, namespace rules get no namespace CIDR source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_type: Option<String>,
    /// 0.6.x: addresses of the default SNAT translation.
    #[serde(default, rename = "externalIPAddresses", skip_serializing_if = "Vec::is_empty")]
    pub external_ip_addresses: Vec<String>,
    /// New: settings of the nftables egress gateway (`ces gateway`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayConfig>,
    /// New: addresses that are no pod's (VMs, appliances) given to a namespace by the administrator: listed by the
    /// endpoints of that namespace's Services they are sources; listed by any other namespace's, never
    /// (docs/semantics.md §2). Namespace to addresses or CIDRs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub endpoint_addresses: BTreeMap<String, Vec<String>>,
    /// New: namespaces' pools of egress addresses (addresses, CIDRs, ranges `a-b`): an ExternalIPRule of the
    /// namespace may translate to these only. Namespace to list.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub egress_addresses: BTreeMap<String, Vec<String>>,
}

/// An inclusive range of addresses of one family.
pub type AddressRange = (IpAddr, IpAddr);

/// An address, a CIDR or a range `a-b` as an inclusive range.
pub fn parse_range(s: &str) -> Result<AddressRange, String> {
    if let Some((x, y)) = s.split_once('-') {
        check_address_or_range(s)?;
        return Ok((x.parse().map_err(|_| String::new())?, y.parse().map_err(|_| String::new())?));
    }
    let n = parse_net(s).map_err(|_| format!("`{s}` is not an IP address, a CIDR or a range `a-b`"))?;
    Ok((n.network(), n.broadcast()))
}

/// Whether two ranges share an address.
pub fn ranges_overlap(a: &AddressRange, b: &AddressRange) -> bool {
    a.0.is_ipv4() == b.0.is_ipv4() && a.0 <= b.1 && b.0 <= a.1
}

/// `gateway`: the nftables egress gateway.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayConfig {
    /// The gateway's private nftables table (family `inet`). Default `ces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// The NFLOG group logged packets go to. Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_group: Option<u16>,
    /// Packets per second logged at most, per rule. Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_rate: Option<u32>,
    /// Log the packets the tenants' default actions decide. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_default: Option<bool>,
    /// Interfaces where traffic leaves the gateway towards its destinations: bandwidth limits are shaped there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uplinks: Vec<String>,
    /// How the gateway learns host names' addresses from the DNS answers that cross it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<GatewayDns>,
}

/// `gateway.dns`: host names on the gateway (docs/nft.md, "Host names").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayDns {
    /// TTLs below this count as this many seconds. Default 0.
    #[serde(default, rename = "minTTL", skip_serializing_if = "Option::is_none")]
    pub min_ttl: Option<u32>,
    /// Seconds a learned address lives past its TTL. Default 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace: Option<u32>,
    /// Addresses kept per name and tenant; the least recently seen go. Default 256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_addresses_per_name: Option<u32>,
    /// Names kept per tenant; the least recently seen go. Default 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_names: Option<u32>,
    /// The NFQUEUE number DNS answers are held in. Default 53.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<u16>,
    /// What DNS answers do while no agent holds the queue: `pass` (unheld, the default) or `drop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when_agent_down: Option<WhenAgentDown>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenAgentDown {
    #[default]
    Pass,
    Drop,
}

/// `tenant[].gateway`: how the gateway recognises this tenant's traffic.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantGateway {
    /// Interfaces on which this tenant's traffic enters the gateway. Needed when tenants' pod networks overlap: the
    /// gateway then tells tenants apart by interface, not by address.
    #[serde(default)]
    pub interfaces: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// Comma-separated list (the original's form) or a YAML list. Items are trimmed.
    #[serde(default, deserialize_with = "namespace_list")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_domain: Option<RouteDomain>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw_pool: Option<GwPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_service: Option<VirtualService>,
    /// New: what happens to a flow no service rule matched. Default `drop` (the original's `deny_all_rule`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_action: Option<DefaultAction>,
    /// New: the tenant's pool of egress addresses (addresses, CIDRs, ranges `a-b`): its ExternalIPRules may
    /// translate to these only (unless `egressAddresses` gives their namespace a pool of its own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_addresses: Vec<String>,
    /// New: the nftables gateway's view of this tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<TenantGateway>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    Accept,
    #[default]
    Drop,
    Reject,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteDomain {
    /// Required for every tenant but `Common` when route domains are on; unique; never 0 (that is Common's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u16>,
    #[serde(default)]
    pub name: String,
    /// Parsed and unused, as in the original.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GwPool {
    #[serde(default)]
    pub server_addresses: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualService {
    /// A full AS3 `Service_L4` body as a JSON string; `k8s` and `{{tenant}}` are substituted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_addresses: Option<VirtualAddresses>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualAddresses {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_echo: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arp_enabled: Option<bool>,
    /// Dead in the original (never read); accepted so existing files load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogPool {
    #[serde(default)]
    pub logging_enabled: bool,
    #[serde(default)]
    pub enable_remote_log: bool,
    #[serde(default)]
    pub health_monitor: String,
    /// `ip[:port]`; the port defaults to 514. Default `["0.0.0.0:514"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub server_addresses: Vec<String>,
    /// A JSON object of AS3 log objects, as a string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

fn namespace_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Comma(String),
        List(Vec<String>),
    }
    let items = match Option::<Form>::deserialize(d)? {
        None => Vec::new(),
        Some(Form::Comma(s)) => s.split(',').map(str::to_string).collect(),
        Some(Form::List(v)) => v,
    };
    Ok(items.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
}

/// One problem in a config file: the file, the key (a path such as `tenant[1].routeDomain.name`) and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.key, self.message)
        }
    }
}

/// Every problem found in one config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Where each namespace goes, resolved from the tenants and `isSupportRouteDomain`.
impl CesConfig {
    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<CesConfig, ConfigErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError { file: file.clone(), key: String::new(), message: e.to_string() }])
        })?;
        CesConfig::from_yaml(&text, &file)
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn from_yaml(text: &str, file: &str) -> Result<CesConfig, ConfigErrors> {
        let err =
            |key: String, message: String| ConfigErrors(vec![ConfigError { file: file.to_string(), key, message }]);
        let value: serde_json::Value =
            serde_saphyr::from_str(text).map_err(|e| err(String::new(), format!("not valid YAML: {e}")))?;
        if value.is_null() {
            return Err(err(String::new(), "the file is empty".to_string()));
        }
        let config: CesConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            err(key, e.into_inner().to_string())
        })?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(
                problems
                    .into_iter()
                    .map(|(key, message)| ConfigError { file: file.to_string(), key, message })
                    .collect(),
            ))
        }
    }

    /// The configuration used when none is given: one `Common` tenant, no route domains, default action drop.
    pub fn embedded_default() -> CesConfig {
        CesConfig::from_yaml(EMBEDDED_DEFAULT, "<embedded default>").expect("the embedded default config is valid")
    }

    pub fn master_cluster(&self) -> &str {
        match self.master_cluster.as_deref() {
            Some(m) if !m.is_empty() => m,
            _ => &self.cluster_name,
        }
    }

    pub fn schema_version(&self) -> &str {
        self.schema_version.as_deref().unwrap_or(DEFAULT_SCHEMA_VERSION)
    }

    /// The gateway's nftables table (family `inet`).
    pub fn gateway_table(&self) -> &str {
        self.gateway.as_ref().and_then(|g| g.table.as_deref()).unwrap_or("ces")
    }

    pub fn cni_type(&self) -> &str {
        self.cni_type.as_deref().unwrap_or(DEFAULT_CNI_TYPE)
    }

    /// The tenant a namespace belongs to: the tenant that lists it, else `Common`. Without route-domain support
    /// every namespace is in `Common`.
    pub fn tenant_of(&self, namespace: &str) -> &str {
        if !self.is_support_route_domain {
            return COMMON;
        }
        self.tenant
            .iter()
            .find(|t| t.namespaces.iter().any(|n| n == namespace))
            .map(|t| t.name.as_str())
            .unwrap_or(COMMON)
    }

    /// `endpointAddresses`, parsed: each address or network with the namespace it is given to (entries that do not
    /// parse are left out; `problems` reports them).
    pub fn endpoint_addresses(&self) -> Vec<(ipnet::IpNet, &str)> {
        let mut out = Vec::new();
        for (ns, list) in &self.endpoint_addresses {
            out.extend(list.iter().filter_map(|a| parse_net(a).ok()).map(|n| (n, ns.as_str())));
        }
        out
    }

    /// The pool of egress addresses an ExternalIPRule of `namespace` may use, and where it is configured: the
    /// namespace's own (`egressAddresses`), else its tenant's (`tenant[].egressAddresses`); `None`: no pool, any
    /// address.
    pub fn egress_pool(&self, namespace: &str) -> Option<(String, Vec<AddressRange>)> {
        let parse = |l: &Vec<String>| l.iter().filter_map(|a| parse_range(a).ok()).collect::<Vec<_>>();
        if let Some(l) = self.egress_addresses.get(namespace) {
            return Some((format!("egressAddresses.{namespace}"), parse(l)));
        }
        let t = self.tenant(self.tenant_of(namespace))?;
        (!t.egress_addresses.is_empty())
            .then(|| (format!("the egressAddresses of tenant {}", t.name), parse(&t.egress_addresses)))
    }

    /// The tenant entry by name.
    pub fn tenant(&self, name: &str) -> Option<&TenantConfig> {
        self.tenant.iter().find(|t| t.name == name)
    }

    /// Semantic checks, as `(key, message)` pairs.
    fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut p = |key: String, msg: String| out.push((key, msg));

        if self.cluster_name.is_empty() {
            p("clusterName".into(), "is required: it prefixes every AS3 object name".into());
        } else if self.cluster_name.len() > 52 {
            p(
                "clusterName".into(),
                "is longer than 52 characters: the remark `CES cluster <clusterName>` that marks this cluster's AS3 \
                 objects holds 64 at most"
                    .into(),
            );
        } else if !is_as3_name(&self.cluster_name) {
            p(
                "clusterName".into(),
                format!(
                    "`{}` is not a valid AS3 name prefix (a letter, then letters, digits, `_`, `.`, `-`)",
                    self.cluster_name
                ),
            );
        }
        if let Some(m) = &self.master_cluster
            && !m.is_empty()
            && !is_as3_name(m)
        {
            p("masterCluster".into(), format!("`{m}` is not a valid AS3 name prefix"));
        }
        if let Some(v) = &self.schema_version {
            let ok = v.split('.').count() == 3
                && v.split('.').all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if !ok {
                p("schemaVersion".into(), format!("`{v}` is not an AS3 schema version such as 3.29.0"));
            }
        }
        for (i, r) in self.i_rule.iter().enumerate() {
            if !is_as3_name(r) {
                p(format!("iRule[{i}]"), format!("`{r}` is not a valid iRule name"));
            }
        }
        if !self.tenant.iter().any(|t| t.name == COMMON) {
            p(
                "tenant".into(),
                format!("no entry named `{COMMON}`: it holds the cluster rules and every unmapped namespace"),
            );
        }
        let mut tenant_names: BTreeMap<&str, usize> = BTreeMap::new();
        let mut rd_names: BTreeMap<String, usize> = BTreeMap::new();
        let mut rd_ids: BTreeMap<u16, usize> = BTreeMap::new();
        let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
        for (i, t) in self.tenant.iter().enumerate() {
            let key = format!("tenant[{i}]");
            if !is_as3_name(&t.name) || t.name.len() > 64 {
                p(format!("{key}.name"), format!("`{}` is not a valid BIG-IP partition name", t.name));
            }
            if let Some(j) = tenant_names.insert(&t.name, i) {
                p(format!("{key}.name"), format!("`{}` is also the name of tenant[{j}]", t.name));
            }
            for ns in &t.namespaces {
                if !is_dns_label(ns) {
                    p(format!("{key}.namespaces"), format!("`{ns}` is not a valid namespace name"));
                }
                if let Some(other) = owner.insert(ns, &t.name)
                    && other != t.name
                {
                    p(format!("{key}.namespaces"), format!("namespace `{ns}` is already mapped to tenant `{other}`"));
                }
            }
            if self.is_support_route_domain && t.name != COMMON {
                let rd = t.route_domain.clone().unwrap_or_default();
                if rd.name.is_empty() {
                    p(
                        format!("{key}.routeDomain.name"),
                        "is required when isSupportRouteDomain is true: it names the route domain and suffixes the policy names".into(),
                    );
                } else if !is_as3_name(&rd.name) {
                    p(format!("{key}.routeDomain.name"), format!("`{}` is not a valid route-domain name", rd.name));
                } else if let Some(j) = rd_names.insert(rd.name.clone(), i) {
                    p(
                        format!("{key}.routeDomain.name"),
                        format!("`{}` is also the route domain of tenant[{j}]", rd.name),
                    );
                }
                match rd.id {
                    None => p(
                        format!("{key}.routeDomain.id"),
                        "is required when isSupportRouteDomain is true: without it the tenant would share route domain 0 with Common".into(),
                    ),
                    Some(0) => p(format!("{key}.routeDomain.id"), "0 is the route domain of Common; choose another id".into()),
                    Some(id) => {
                        if let Some(j) = rd_ids.insert(id, i) {
                            p(format!("{key}.routeDomain.id"), format!("{id} is also the route domain of tenant[{j}]"));
                        }
                    }
                }
            }
            if let Some(gw) = &t.gw_pool {
                for (j, a) in gw.server_addresses.iter().enumerate() {
                    if a.parse::<IpAddr>().is_err() {
                        p(format!("{key}.gwPool.serverAddresses[{j}]"), format!("`{a}` is not an IP address"));
                    }
                }
            }
            if let Some(vs) = &t.virtual_service {
                if let Some(tpl) = vs.template.as_deref().filter(|s| !s.trim().is_empty())
                    && let Err(e) = parse_json_object(tpl)
                {
                    p(format!("{key}.virtualService.template"), e);
                }
                if let Some(va) = &vs.virtual_addresses {
                    if let Some(a) = &va.virtual_address
                        && a.parse::<IpAddr>().is_err()
                    {
                        p(
                            format!("{key}.virtualService.virtualAddresses.virtualAddress"),
                            format!("`{a}` is not an IP address"),
                        );
                    }
                    if let Some(e) = &va.icmp_echo
                        && !matches!(e.as_str(), "enable" | "disable" | "selective")
                    {
                        p(
                            format!("{key}.virtualService.virtualAddresses.icmpEcho"),
                            format!("`{e}` is not one of enable, disable, selective"),
                        );
                    }
                }
            }
        }
        if let Some(lp) = &self.log_pool {
            for (j, a) in lp.server_addresses.iter().enumerate() {
                if parse_host_port(a).is_none() {
                    p(format!("logPool.serverAddresses[{j}]"), format!("`{a}` is not `ip` or `ip:port`"));
                }
            }
            if let Some(tpl) = lp.template.as_deref().filter(|s| !s.trim().is_empty())
                && let Err(e) = parse_json_object(tpl)
            {
                p("logPool.template".into(), e);
            }
            if lp.logging_enabled && lp.health_monitor.is_empty() {
                p(
                    "logPool.healthMonitor".into(),
                    "is required when loggingEnabled is true (a monitor such as `tcp`)".into(),
                );
            }
        }
        if let Some(dns) = self.gateway.as_ref().and_then(|g| g.dns.as_ref()) {
            if dns.max_addresses_per_name == Some(0) {
                p("gateway.dns.maxAddressesPerName".into(), "must be at least 1".into());
            }
            if dns.max_names == Some(0) {
                p("gateway.dns.maxNames".into(), "must be at least 1".into());
            }
            // A year: beyond it, a lifetime is a mistake (and kernel timeouts are bounded).
            for (key, v) in [("minTTL", dns.min_ttl), ("grace", dns.grace)] {
                if v.is_some_and(|v| v > 31_536_000) {
                    p(format!("gateway.dns.{key}"), "must be at most 31536000 seconds (a year)".into());
                }
            }
        }
        if self.gateway.as_ref().and_then(|g| g.log_rate) == Some(0) {
            p("gateway.logRate".into(), "must be at least 1 packet per second".into());
        }
        if let Some(table) = self.gateway.as_ref().and_then(|g| g.table.as_ref()) {
            let ok = table.len() <= 64
                && table.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
                && table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                p(
                    "gateway.table".into(),
                    format!("`{table}` is not a table name (a letter, then letters, digits, `_`)"),
                );
            }
        }
        let mut interface_owner: BTreeMap<&str, &str> = BTreeMap::new();
        for (j, name) in self.gateway.iter().flat_map(|g| g.uplinks.iter()).enumerate() {
            if !is_interface_name(name) {
                p(format!("gateway.uplinks[{j}]"), format!("`{name}` is not an interface name"));
            } else {
                interface_owner.insert(name, "uplinks");
            }
        }
        for (i, t) in self.tenant.iter().enumerate() {
            for (j, name) in t.gateway.iter().flat_map(|g| g.interfaces.iter()).enumerate() {
                let key = format!("tenant[{i}].gateway.interfaces[{j}]");
                if !is_interface_name(name) {
                    p(key, format!("`{name}` is not an interface name (1 to 15 letters, digits, `-`, `_`, `.`, `@`)"));
                } else if let Some(other) = interface_owner.insert(name, &t.name)
                    && other != t.name
                {
                    p(key, format!("interface `{name}` is already tenant `{other}`'s"));
                }
            }
        }
        for (j, a) in self.external_ip_addresses.iter().enumerate() {
            if let Err(e) = check_address_or_range(a) {
                p(format!("externalIPAddresses[{j}]"), e);
            }
        }
        // Egress pools: every entry parses; no address is in the pools of two tenants or of two namespaces, and a
        // namespace's pool lies in no other tenant's pool (inside its own tenant's, it narrows it).
        let mut tenant_pools: Vec<(AddressRange, &str)> = Vec::new();
        for (i, t) in self.tenant.iter().enumerate() {
            for (j, a) in t.egress_addresses.iter().enumerate() {
                let key = format!("tenant[{i}].egressAddresses[{j}]");
                match parse_range(a) {
                    Err(e) => p(key, e),
                    Ok(r) => {
                        if let Some((_, o)) = tenant_pools.iter().find(|(x, o)| *o != t.name && ranges_overlap(x, &r)) {
                            p(key, format!("`{a}` is also in the egress pool of tenant {o}"));
                        }
                        tenant_pools.push((r, &t.name));
                    }
                }
            }
        }
        let mut ns_pools: Vec<(AddressRange, &str)> = Vec::new();
        for (ns, list) in &self.egress_addresses {
            if !is_dns_label(ns) {
                p(format!("egressAddresses.{ns}"), format!("`{ns}` is not a valid namespace name"));
            }
            let tenant = self.tenant_of(ns);
            for (j, a) in list.iter().enumerate() {
                let key = format!("egressAddresses.{ns}[{j}]");
                match parse_range(a) {
                    Err(e) => p(key, e),
                    Ok(r) => {
                        if let Some((_, o)) = ns_pools.iter().find(|(x, o)| *o != ns && ranges_overlap(x, &r)) {
                            p(key.clone(), format!("`{a}` is also in the egress pool of namespace {o}"));
                        }
                        if let Some((_, o)) = tenant_pools.iter().find(|(x, o)| *o != tenant && ranges_overlap(x, &r)) {
                            p(key, format!("`{a}` is in the egress pool of tenant {o}, not of {tenant}"));
                        }
                        ns_pools.push((r, ns));
                    }
                }
            }
        }
        let mut given: Vec<(ipnet::IpNet, &str)> = Vec::new();
        for (ns, list) in &self.endpoint_addresses {
            if !is_dns_label(ns) {
                p(format!("endpointAddresses.{ns}"), format!("`{ns}` is not a valid namespace name"));
            }
            for (j, a) in list.iter().enumerate() {
                let key = format!("endpointAddresses.{ns}[{j}]");
                match parse_net(a) {
                    Err(e) => p(key, e),
                    Ok(n) => {
                        if let Some((_, other)) = given
                            .iter()
                            .find(|(m, o)| *o != ns && (m.contains(&n.network()) || n.contains(&m.network())))
                        {
                            p(key, format!("`{a}` is also given to namespace `{other}`: an address has one owner"));
                        }
                        given.push((n, ns));
                    }
                }
            }
        }
        out
    }
}

/// An address (a host network) or a network in CIDR form, with no host bits set.
fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(ipnet::IpNet::from(ip));
    }
    let n: ipnet::IpNet = s.parse().map_err(|_| format!("`{s}` is not an IP address or CIDR"))?;
    if n.trunc() != n {
        return Err(format!("`{s}` has host bits set (the network is {})", n.trunc()));
    }
    Ok(n)
}

impl TenantConfig {
    pub fn default_action(&self) -> DefaultAction {
        self.default_action.unwrap_or_default()
    }
}

/// `ip` or `ip:port` (IPv6 as `[ip]:port`); the port defaults to 514.
pub fn parse_host_port(s: &str) -> Option<(IpAddr, u16)> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some((ip, 514));
    }
    let sock: std::net::SocketAddr = s.parse().ok()?;
    Some((sock.ip(), sock.port()))
}

/// `a` or `a-b` (one address family, `a` not after `b`).
fn check_address_or_range(s: &str) -> Result<(), String> {
    let bad = || format!("`{s}` is not an IP address or a range `a-b`");
    match s.split_once('-') {
        None => s.parse::<IpAddr>().map(|_| ()).map_err(|_| bad()),
        Some((x, y)) => {
            let (x, y) = (x.parse::<IpAddr>().map_err(|_| bad())?, y.parse::<IpAddr>().map_err(|_| bad())?);
            if x.is_ipv4() != y.is_ipv4() {
                return Err(format!("range `{s}` mixes IPv4 and IPv6"));
            }
            if x > y {
                return Err(format!("range `{s}` is reversed (start is after end)"));
            }
            Ok(())
        }
    }
}

/// A template string as a JSON object; `None` when empty or not an object (validation reports those).
pub fn json_object(text: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    if text.trim().is_empty() { None } else { parse_json_object(text).ok() }
}

fn parse_json_object(text: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err("must be a JSON object".into()),
        Err(e) => Err(format!("is not valid JSON: {e}")),
    }
}

/// An AS3 property name (or prefix of one): `^[A-Za-z][0-9A-Za-z_.-]*$`.
pub fn is_as3_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// A Linux interface name as nftables matches it: 1 to 15 letters, digits, `-`, `_`, `.`, `@`.
pub fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

/// A Kubernetes namespace name (RFC 1123 label).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

const EMBEDDED_DEFAULT: &str = "\
clusterName: k8s
isSupportRouteDomain: false
tenant:
  - name: Common
    defaultAction: drop
";

#[cfg(test)]
mod tests;
