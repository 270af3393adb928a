//! The policy model as AS3 declarations: one request document per tenant, with the original's object names and
//! layout (ces-original.md §3), and the deviations docs/as3.md lists.

use std::collections::{BTreeMap, BTreeSet};

use ces_api::{Action, Mode};
use ces_model::{
    AddressEntry, Bandwidth, Diagnostic, NatRule, ObjectRef, PolicyModel, Protocol, Rule, RuleKind, Severity, Sources,
    TenantPolicy, Verdict,
};
use ipnet::IpNet;
use jiff::Timestamp;
use serde_json::{Map, Value, json};

use crate::facts::Facts;
use crate::names::fit;
use crate::schema::{Schema, SchemaError};

/// The `$schema` the original writes into every document.
pub const SCHEMA_URL: &str =
    "https://raw.githubusercontent.com/F5Networks/f5-appsvcs-extension/master/schema/latest/as3-schema.json";
/// `declaration.id`, as the original.
pub const DECLARATION_ID: &str = "k8s-ces-controller";

/// What the AS3 backend makes of a model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rendered {
    /// One full AS3 request document per tenant, by tenant name.
    pub documents: BTreeMap<String, Value>,
    /// For each tenant and object, the Kubernetes objects it came from (empty for the tenant's shared objects), so
    /// that an error on an object is reported on the rules that made it.
    pub origins: BTreeMap<String, BTreeMap<String, Vec<ObjectRef>>>,
    /// Policies to bind to the AFM global and route-domain contexts over iControl REST (AS3 cannot, before 3.49).
    pub bindings: Vec<Binding>,
    /// What this backend left out or cannot express, each naming its rule.
    pub diagnostics: Vec<Diagnostic>,
    /// Render again at this instant: a schedule window opens or closes then.
    pub valid_until: Option<Timestamp>,
    /// Every source address list a rendered rule has or would have, with the model sets it lists, so that pod churn
    /// re-renders just the lists of the sets that moved ([`source_addresses`]).
    pub source_lists: Vec<SourceList>,
    /// Tenants whose document is invalid for a reason of the tenant's own (an object no rule made, the tenant's
    /// properties): such a document is not sent. Filled by [`render_checked`].
    pub invalid: BTreeMap<String, Vec<SchemaError>>,
}

/// What the documents are rendered for: the AS3 version's facts, and the rules whose objects the schema refused
/// in an earlier round, with why ([`render_checked`]).
#[derive(Clone, Debug)]
pub struct Target {
    pub facts: Facts,
    pub refused: BTreeMap<ObjectRef, Refusal>,
}

/// Why the schema refused a rule's objects, and how far a refusing rule is widened: first to every protocol of its
/// destinations' addresses, then (when that is refused too) to everything from its sources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub why: String,
    pub everything: bool,
}

impl Target {
    /// The facts CES knows of the model's `schemaVersion` (the oldest row's for a version older than every row).
    pub fn of(model: &PolicyModel) -> Target {
        let facts = Facts::known(&model.settings.schema_version)
            .unwrap_or_else(|_| Facts::known(crate::facts::TABLE[0].0).expect("the table's own row"));
        Target { facts, refused: BTreeMap::new() }
    }
}

/// A rule's source address list in a tenant: its object name when declared (`None`: left out, its sets were empty),
/// and the model address sets it lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceList {
    pub tenant: String,
    pub object: Option<String>,
    pub sets: Vec<String>,
}

impl Rendered {
    /// Each tenant's declaration (`declaration.<tenant>` of its document): what the device holds for the tenant once
    /// it took the document.
    pub fn declarations(&self) -> BTreeMap<String, Value> {
        self.documents.iter().map(|(t, d)| (t.clone(), d["declaration"][t].clone())).collect()
    }
}

/// One policy binding: `PATCH path {field: policy}` when the device's value differs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Binding {
    /// iControl REST path, such as `/mgmt/tm/net/route-domain/~p2~rd2`.
    pub path: String,
    /// `enforcedPolicy`, `stagedPolicy`, `fwEnforcedPolicy` or `fwStagedPolicy`.
    pub field: String,
    /// The policy's full path, such as `/p2/Shared/k8s_ns_policy_rd2`.
    pub policy: String,
}

/// The scope part of per-rule names.
enum Scope {
    Global,
    Namespace(String),
    Service(String),
}

impl Scope {
    fn part(&self) -> String {
        match self {
            Scope::Global => "global".into(),
            Scope::Namespace(ns) => format!("ns_{ns}"),
            Scope::Service(ns) => format!("svc_{ns}"),
        }
    }
}

/// The objects of one tenant's `Shared` application, as they are built.
struct App<'m> {
    tenant: &'m TenantPolicy,
    /// What marks the objects a rule made as this cluster's, where the object's class takes a remark.
    owner: String,
    facts: &'m Facts,
    objects: Map<String, Value>,
    origins: BTreeMap<String, Vec<ObjectRef>>,
}

impl App<'_> {
    fn path(&self, name: &str) -> String {
        format!("/{}/Shared/{name}", self.tenant.name)
    }

    fn use_of(&self, name: &str) -> Value {
        json!({ "use": self.path(name) })
    }

    /// Adds an object; one a rule made (`origin`) is marked as this cluster's (docs/as3.md, "Clusters side by side").
    fn add(&mut self, name: &str, mut object: Value, origin: Option<&ObjectRef>) {
        if origin.is_some() {
            let class = object.get("class").and_then(Value::as_str).unwrap_or_default();
            if self.facts.has(class, "remark") {
                object["remark"] = json!(self.owner);
            }
        }
        self.objects.insert(name.to_string(), object);
        let o = self.origins.entry(name.to_string()).or_default();
        if let Some(r) = origin
            && !o.contains(r)
        {
            o.push(r.clone());
        }
    }
}

struct Renderer<'m> {
    model: &'m PolicyModel,
    target: &'m Target,
    at: Timestamp,
    cluster: &'m str,
    master: &'m str,
    out: Rendered,
}

/// Renders `model` for the instant `at` (rules with a schedule are declared only while their window is open), with
/// the facts CES knows of the model's `schemaVersion` ([`Target::of`]).
pub fn render(model: &PolicyModel, at: Timestamp) -> Rendered {
    render_for(model, at, &Target::of(model))
}

/// Renders `model` for `target`: what its AS3 version cannot express is left out rule by rule (a refusing rule is
/// widened instead, docs/as3.md "One rule never blocks another"), as are the rules `target` refuses.
pub fn render_for(model: &PolicyModel, at: Timestamp, target: &Target) -> Rendered {
    let s = &model.settings;
    let mut r =
        Renderer { model, target, at, cluster: &s.cluster_name, master: &s.master_cluster, out: Rendered::default() };
    for tenant in &model.tenants {
        r.tenant(tenant);
    }
    r.out.bindings.sort();
    r.out
}

/// Renders `model` for `facts` and, with a schema, validates every document object by object: the rules behind an
/// object the schema refuses are rendered again as refused (left out, or a refusing rule widened), until every
/// document is valid or what is left invalid is the tenant's own ([`Rendered::invalid`]; such a tenant is not sent).
pub fn render_checked(model: &PolicyModel, at: Timestamp, facts: &Facts, schema: Option<&Schema>) -> Rendered {
    let mut target = Target { facts: facts.clone(), refused: BTreeMap::new() };
    let version = &model.settings.schema_version;
    loop {
        let mut out = render_for(model, at, &target);
        let Some(schema) = schema else { return out };
        let mut more = false;
        // The rules refused (or widened further) in this round: a rule's several errors widen it once a round.
        let mut this_round: BTreeSet<ObjectRef> = BTreeSet::new();
        for (tenant, doc) in &out.documents {
            let Err(errors) = schema.validate(doc) else { continue };
            let mut own = Vec::new();
            for e in errors {
                let origins = e.object.as_ref().and_then(|o| out.origins.get(tenant).and_then(|m| m.get(o))).cloned();
                // An object a rule made: render the rule as refused, and a refused rule whose widened form is refused
                // too as refusing everything from its sources. Otherwise (the tenant's shared objects, or a rule
                // refusing everything that is still refused) the tenant's own.
                let why = format!("invalid under AS3 schema {version}: {e}");
                let mut widened = false;
                for r in origins.into_iter().flatten() {
                    if this_round.contains(&r) {
                        widened = true;
                        continue;
                    }
                    this_round.insert(r.clone());
                    match target.refused.get_mut(&r) {
                        None => {
                            target.refused.insert(r, Refusal { why: why.clone(), everything: false });
                            widened = true;
                        }
                        Some(x) if !x.everything => {
                            (x.why, x.everything) = (why.clone(), true);
                            widened = true;
                        }
                        Some(_) => {
                            this_round.remove(&r);
                        }
                    }
                }
                if widened {
                    more = true;
                } else {
                    own.push(e);
                }
            }
            if !own.is_empty() {
                out.invalid.insert(tenant.clone(), own);
            }
        }
        if !more {
            return out;
        }
    }
}

fn rule_ref(rule: &Rule) -> ObjectRef {
    ObjectRef::new(rule.kind.as_str(), rule.namespace.as_deref(), &rule.name)
}

fn action_str(a: Action) -> &'static str {
    match a {
        Action::Accept => "accept",
        Action::Drop => "drop",
        Action::AcceptDecisively => "accept-decisively",
        Action::Reject => "reject",
    }
}

/// The addresses of a source list of these model sets, each with its set's route domain (without route domains,
/// none), minimal and sorted: what a rule's `..._src_address` list holds.
pub fn source_addresses(model: &PolicyModel, sets: &[String]) -> Vec<String> {
    let mut by_rd: BTreeMap<Option<u16>, Vec<IpNet>> = BTreeMap::new();
    for name in sets {
        if let Some(set) = model.address_sets.get(name) {
            let rd = (model.settings.route_domains && set.route_domain != 0).then_some(set.route_domain);
            by_rd.entry(rd).or_default().extend(set.addresses.iter().copied());
        }
    }
    let mut out = Vec::new();
    for (rd, mut nets) in by_rd {
        minimal_cover(&mut nets);
        out.extend(nets.iter().map(|n| address(n, rd)));
    }
    out
}

/// An address as BIG-IP writes it: a host without `/32`, a route domain after the address (`10.66.0.0%4/16`).
fn address(net: &IpNet, rd: Option<u16>) -> String {
    let suffix = rd.map(|id| format!("%{id}")).unwrap_or_default();
    if net.prefix_len() == net.max_prefix_len() {
        format!("{}{suffix}", net.addr())
    } else {
        format!("{}{suffix}/{}", net.network(), net.prefix_len())
    }
}

/// The nets of a sorted list that no other net of the list contains (a pod /32 inside its namespace's subnet adds
/// nothing to an address list and would only churn it).
fn minimal_cover(nets: &mut Vec<IpNet>) {
    nets.sort_unstable_by_key(|n| (n.network(), n.prefix_len()));
    nets.dedup();
    let mut kept: Vec<IpNet> = Vec::with_capacity(nets.len());
    for n in nets.drain(..) {
        if kept.last().is_some_and(|k| k.contains(&n)) {
            continue;
        }
        kept.push(n);
    }
    *nets = kept;
}

/// One port list of a destination, grouped as the original groups ports (§3.4): all ports of a protocol without a
/// bandwidth share a list named after the protocol; a port with a bandwidth gets its own, named after the port.
struct PortGroup {
    key: String,
    protocol: Option<Protocol>,
    /// `None`: every port of the protocol.
    ports: Option<Vec<String>>,
    bandwidth: Option<Bandwidth>,
}

fn port_groups(dest: &ces_model::DestinationSet) -> Vec<PortGroup> {
    let mut groups: Vec<PortGroup> = Vec::new();
    if dest.ports.is_empty() {
        groups.push(PortGroup { key: "any".into(), protocol: None, ports: None, bandwidth: None });
        return groups;
    }
    for (i, pm) in dest.ports.iter().enumerate() {
        let p = pm.protocol.as_str().to_string();
        let own_name = || pm.name.clone().unwrap_or_else(|| format!("{p}{i}"));
        let key = match groups.iter().find(|g| g.key == p) {
            Some(g) if g.bandwidth != pm.bandwidth => own_name(),
            None if pm.bandwidth.is_some() => own_name(),
            _ => p.clone(),
        };
        let ports: Option<Vec<String>> =
            if pm.ports.is_empty() { None } else { Some(pm.ports.iter().map(ToString::to_string).collect()) };
        match groups.iter_mut().find(|g| g.key == key) {
            Some(g) => {
                g.ports = match (g.ports.take(), ports) {
                    (Some(mut a), Some(b)) => {
                        for x in b {
                            if !a.contains(&x) {
                                a.push(x);
                            }
                        }
                        Some(a)
                    }
                    _ => None,
                };
            }
            None => groups.push(PortGroup { key, protocol: Some(pm.protocol), ports, bandwidth: pm.bandwidth.clone() }),
        }
    }
    groups
}

/// `k8s` → masterCluster at the start of names, `{{tenant}}` → the tenant, in a template object.
fn substitute(v: &Value, master: &str, tenant: &str) -> Value {
    let name = |s: &str| -> String {
        let s = s.replace("{{tenant}}", tenant);
        if let Some((head, last)) = s.rsplit_once('/') {
            match last.strip_prefix("k8s") {
                Some(rest) => format!("{head}/{master}{rest}"),
                None => s,
            }
        } else if let Some(rest) = s.strip_prefix("k8s_") {
            format!("{master}_{rest}")
        } else {
            s
        }
    };
    match v {
        Value::String(s) => Value::String(name(s)),
        Value::Array(a) => Value::Array(a.iter().map(|x| substitute(x, master, tenant)).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, x)| (name(k), substitute(x, master, tenant))).collect()),
        other => other.clone(),
    }
}

impl<'m> Renderer<'m> {
    fn warn(&mut self, rule: &ObjectRef, reason: &str, message: String) {
        self.out.diagnostics.push(Diagnostic {
            severity: Severity::Warning,
            object: Some(rule.clone()),
            origin: None,
            reason: reason.into(),
            message,
        });
    }

    fn until(&mut self, t: Option<Timestamp>) {
        if let Some(t) = t {
            self.out.valid_until = Some(self.out.valid_until.map_or(t, |v| v.min(t)));
        }
    }

    /// The route-domain part of policy names: the tenant's route-domain name, `rd` without route domains.
    fn rd_part(&self, t: &TenantPolicy) -> String {
        if self.model.settings.route_domains { t.route_domain.name.clone() } else { "rd".into() }
    }

    fn tenant(&mut self, t: &'m TenantPolicy) {
        let m = self.master.to_string();
        let rd = self.rd_part(t);
        let owner = tenant_remark(self.cluster);
        let mut app =
            App { tenant: t, owner, facts: &self.target.facts, objects: Map::new(), origins: BTreeMap::new() };
        app.objects.insert("class".into(), json!("Application"));
        app.objects.insert("template".into(), json!("shared"));

        // The three contexts, each an enforced and (for audit rules) a staged policy.
        let mut policies: Vec<(String, Vec<Value>, Vec<Value>)> = Vec::new();
        if t.name == ces_model::COMMON_TENANT {
            let (enforced, staged) = self.rules(&mut app, &self.model.cluster_rules, |_| Scope::Global);
            policies.push((format!("{m}_system_global_policy"), enforced, staged));
        }
        let (ns_enforced, ns_staged) =
            self.rules(&mut app, &t.namespace_rules, |r| Scope::Namespace(r.namespace.clone().unwrap_or_default()));
        let (mut svc_enforced, svc_staged) =
            self.rules(&mut app, &t.service_rules, |r| Scope::Service(r.namespace.clone().unwrap_or_default()));
        let deny_all = format!("{m}_svc_deny_all_rule_list");
        app.add(
            &deny_all,
            json!({"class": "Firewall_Rule_List", "rules": [{
                "protocol": "any", "name": "deny_all_rule", "destination": {}, "source": {},
                "action": match t.default_action { Verdict::Accept => "accept", Verdict::Drop => "drop", Verdict::Reject => "reject" },
            }]}),
            None,
        );
        svc_enforced.push(app.use_of(&deny_all));
        let ns_has_rules = !t.namespace_rules.is_empty();
        policies.push((format!("{m}_ns_policy_{rd}"), ns_enforced, ns_staged));
        policies.push((format!("{m}_svc_policy_{rd}"), svc_enforced, svc_staged));

        let mut staged_names: Vec<Option<String>> = Vec::new();
        for (name, enforced, staged) in policies {
            app.add(&name, json!({"class": "Firewall_Policy", "rules": enforced}), None);
            if staged.is_empty() {
                staged_names.push(None);
            } else {
                let staged_name = staged_policy_name(&name);
                app.add(&staged_name, json!({"class": "Firewall_Policy", "rules": staged}), None);
                staged_names.push(Some(staged_name));
            }
        }
        // Bindings of the global and route-domain policies, as the original makes them (§3.7).
        if t.name == ces_model::COMMON_TENANT && !self.model.cluster_rules.is_empty() {
            self.bind(
                "/mgmt/tm/security/firewall/global-rules",
                "enforcedPolicy",
                app.path(&format!("{m}_system_global_policy")),
            );
            if let Some(s) = &staged_names[0] {
                self.bind("/mgmt/tm/security/firewall/global-rules", "stagedPolicy", app.path(s));
            }
        }
        let svc_staged = staged_names.pop().flatten();
        let ns_staged = staged_names.pop().flatten();
        if ns_has_rules {
            let rd_path = format!("/mgmt/tm/net/route-domain/~{}~{}", t.name, t.route_domain.name);
            self.bind(&rd_path, "fwEnforcedPolicy", app.path(&format!("{m}_ns_policy_{rd}")));
            if let Some(s) = &ns_staged {
                self.bind(&rd_path, "fwStagedPolicy", app.path(s));
            }
        }

        let nat_policy = self.nat(&mut app, &t.nat_rules);
        self.shared_objects(&mut app, &rd, svc_staged.as_deref(), nat_policy);

        let mut tenant = Map::new();
        tenant.insert("class".into(), json!("Tenant"));
        if self.model.settings.route_domains && t.name != ces_model::COMMON_TENANT {
            tenant.insert("defaultRouteDomain".into(), json!(t.route_domain.id));
        }
        if t.name != ces_model::COMMON_TENANT {
            // What marks the partition as this cluster's: a tenant gone from ces-conf.yaml is deleted from the device
            // only when it carries it (docs/as3.md, "Tenants that go").
            tenant.insert("remark".into(), json!(tenant_remark(self.cluster)));
        }
        tenant.insert("Shared".into(), Value::Object(app.objects));
        let doc = request_document(&self.model.settings.schema_version, &t.name, Value::Object(tenant));
        self.out.documents.insert(t.name.clone(), doc);
        self.out.origins.insert(t.name.clone(), app.origins);
    }

    fn bind(&mut self, path: &str, field: &str, policy: String) {
        self.out.bindings.push(Binding { path: path.into(), field: field.into(), policy });
    }

    /// Declares each rule's objects; returns the `use` entries of the enforced and the staged (audit) policy.
    fn rules(
        &mut self,
        app: &mut App<'_>,
        rules: &'m [Rule],
        scope: impl Fn(&Rule) -> Scope,
    ) -> (Vec<Value>, Vec<Value>) {
        let (mut enforced, mut staged) = (Vec::new(), Vec::new());
        for rule in rules {
            if let Some(s) = &rule.schedule {
                self.until(s.next_change(self.at));
                if !s.active_at(self.at) {
                    continue;
                }
            }
            let lists = self.rule(app, rule, &scope(rule));
            match rule.mode {
                Mode::Enforce => enforced.extend(lists),
                Mode::Audit => staged.extend(lists),
            }
        }
        (enforced, staged)
    }

    /// One rule's objects; returns the `use` entries of its rule lists.
    /// The AS3 version in messages: the one asked for, and the row of facts used when CES knows an older one.
    fn version(&self) -> String {
        let asked = &self.model.settings.schema_version;
        let known = &self.target.facts.version;
        if asked == known { format!("AS3 {asked}") } else { format!("AS3 {asked} (as CES knows it: as {known})") }
    }

    /// What of `rule` the target version cannot express, and whether all of it is protocols.
    fn inexpressible(&self, rule: &Rule) -> (Vec<String>, bool) {
        let facts = &self.target.facts;
        let (mut what, mut only_protocols) = (Vec::new(), true);
        for dest_id in &rule.destinations {
            let Some(dest) = self.model.destination_sets.get(dest_id) else { continue };
            for g in port_groups(dest) {
                if let Some(p) = g.protocol
                    && !facts.allows("Firewall_Rule", "protocol", p.as_str())
                {
                    what.push(format!("Firewall_Rule.protocol `{}` (ExternalService {dest_id})", p.as_str()));
                }
            }
            let hosts = dest.addresses.iter().any(|a| matches!(a, AddressEntry::Host(_)));
            if hosts && !facts.has("Firewall_Address_List", "fqdns") {
                what.push(format!("Firewall_Address_List.fqdns (ExternalService {dest_id})"));
                only_protocols = false;
            }
        }
        (what, only_protocols)
    }

    fn rule(&mut self, app: &mut App<'_>, rule: &Rule, scope: &Scope) -> Vec<Value> {
        let c = self.cluster;
        let me = rule_ref(rule);
        let r = &rule.name;
        // A rule that cannot be declared as written is left out whole; but a refusing rule (drop, reject; enforced)
        // left out would let later accepts match what it refuses, so it is widened instead: it refuses more, never
        // less (docs/as3.md, "One rule never blocks another").
        let refusing = rule.mode == Mode::Enforce && matches!(rule.action, Action::Drop | Action::Reject);
        let (mut widen_all, mut widen_protocols, mut widen_ports) = (false, false, false);
        if let Some(Refusal { why, everything }) = self.target.refused.get(&me).cloned() {
            if !refusing {
                self.warn(&me, "InvalidDeclaration", format!("left out of the as3 declaration: {why}"));
                return Vec::new();
            }
            let instead = if everything {
                widen_all = true;
                "for everything from its sources (every destination and protocol)"
            } else {
                widen_ports = true;
                "for every protocol and port to its destinations' addresses"
            };
            self.warn(
                &me,
                "InvalidDeclaration",
                format!(
                    "{why}; the {} rule is declared {instead} instead, so that it refuses more, not less",
                    action_str(rule.action)
                ),
            );
        }
        let (what, only_protocols) = self.inexpressible(rule);
        if !what.is_empty() && !widen_all {
            let what = what.join(", ");
            let version = self.version();
            if !refusing {
                self.warn(
                    &me,
                    "NotSupported",
                    format!("not supported by {version}: {what}; the rule is left out of the as3 declaration"),
                );
                return Vec::new();
            }
            let instead = if only_protocols {
                widen_protocols = true;
                "for every protocol to those destinations"
            } else {
                widen_all = true;
                "for everything from its sources (every destination and protocol)"
            };
            self.warn(
                &me,
                "NotSupported",
                format!(
                    "not supported by {version}: {what}; the {} rule is declared {instead} instead, so that it refuses \
                     more, not less",
                    action_str(rule.action)
                ),
            );
        }
        // The source list, or `{}` for a rule of every source.
        let source = match &rule.sources {
            Sources::Any => json!({}),
            Sources::Sets(sets) => {
                let name = || {
                    fit(match (scope, rule.kind, &rule.service) {
                        (Scope::Service(ns), RuleKind::ServiceEgressRule, Some(svc)) => {
                            format!("{c}_svc_{ns}_{r}_ep_{svc}_src_address")
                        }
                        _ => format!("{c}_{}_{r}_src_address", scope.part()),
                    })
                };
                let (addresses, name) = self.source_list(app, sets, name);
                let Some(name) = name else {
                    self.warn(
                        &me,
                        "NotDeclared",
                        "left out of the as3 declaration: the rule has no source address yet (an empty address \
                         list is never declared)"
                            .into(),
                    );
                    return Vec::new();
                };
                app.add(&name, json!({"class": "Firewall_Address_List", "addresses": addresses}), Some(&me));
                json!({"addressLists": [app.use_of(&name)]})
            }
        };
        let mut lists = Vec::new();
        if widen_all {
            let mut fw = Map::new();
            fw.insert("protocol".into(), json!("any"));
            fw.insert("name".into(), json!(format!("{}_all", action_str(rule.action))));
            fw.insert("destination".into(), json!({}));
            fw.insert("source".into(), source);
            fw.insert("action".into(), json!(action_str(rule.action)));
            if rule.logging && self.target.facts.has("Firewall_Rule", "loggingEnabled") {
                fw.insert("loggingEnabled".into(), json!(true));
            }
            let rule_list = fit(format!("{c}_{}_{r}_refuse_all_rule_list", scope.part()));
            app.add(&rule_list, json!({"class": "Firewall_Rule_List", "rules": [fw]}), Some(&me));
            lists.push(app.use_of(&rule_list));
            return lists;
        }
        for dest_id in &rule.destinations {
            let Some(dest) = self.model.destination_sets.get(dest_id) else { continue };
            let e = &dest.name;
            let base = format!("{c}_{}_{r}_ext_{e}", scope.part());
            let (mut addresses, mut fqdns) = (Vec::new(), Vec::new());
            for a in &dest.addresses {
                match a {
                    AddressEntry::Net(n) => addresses.push(address(n, None)),
                    AddressEntry::Range(x, y) => addresses.push(format!("{x}-{y}")),
                    AddressEntry::Host(h) => fqdns.push(h.clone()),
                    AddressEntry::Wildcard(w) => self.warn(
                        &me,
                        "NotSupported",
                        format!(
                            "not supported by the as3 backend: the wildcard `*.{w}` of ExternalService {dest_id} \
                             (AFM matches host names exactly); it is not declared"
                        ),
                    ),
                }
            }
            if addresses.is_empty() && fqdns.is_empty() {
                self.warn(
                    &me,
                    "NotDeclared",
                    format!(
                        "ExternalService {dest_id} is left out of the as3 declaration: none of its addresses can be \
                         declared"
                    ),
                );
                continue;
            }
            let address_list = fit(format!("{base}_address"));
            let mut list = Map::new();
            list.insert("class".into(), json!("Firewall_Address_List"));
            if !addresses.is_empty() {
                list.insert("addresses".into(), json!(addresses));
            }
            if !fqdns.is_empty() {
                list.insert("fqdns".into(), json!(fqdns));
            }
            app.add(&address_list, Value::Object(list), Some(&me));

            let mut fw_rules = Vec::new();
            let groups = if widen_ports {
                vec![PortGroup { key: "any".into(), protocol: Some(Protocol::Any), ports: None, bandwidth: None }]
            } else {
                port_groups(dest)
            };
            for mut g in groups {
                let unsupported =
                    g.protocol.is_some_and(|p| !self.target.facts.allows("Firewall_Rule", "protocol", p.as_str()));
                if widen_protocols && unsupported {
                    (g.protocol, g.ports, g.bandwidth) = (Some(Protocol::Any), None, None);
                }
                let mut destination = Map::new();
                destination.insert("addressLists".into(), json!([app.use_of(&address_list)]));
                if let (Some(_), Some(ports)) = (g.protocol, &g.ports) {
                    let port_list = fit(format!("{base}_ports_{}", g.key));
                    app.add(&port_list, json!({"class": "Firewall_Port_List", "ports": ports}), Some(&me));
                    destination.insert("portLists".into(), json!([app.use_of(&port_list)]));
                }
                let mut fw = Map::new();
                if let Some(p) = g.protocol {
                    fw.insert("protocol".into(), json!(p.as_str()));
                }
                fw.insert("name".into(), json!(format!("{}_{e}_{}", action_str(rule.action), g.key)));
                match &g.bandwidth {
                    Some(Bandwidth::IRule(i)) => {
                        fw.insert("iRule".into(), json!({"bigip": format!("/Common/{i}")}));
                    }
                    Some(Bandwidth::BitsPerSecond(bps)) => self.warn(
                        &me,
                        "NotSupported",
                        format!(
                            "not supported by the as3 backend: the bandwidth {bps} bit/s of ExternalService {dest_id} \
                             port `{}` (AFM limits bandwidth only through an iRule named in `iRule`); the rule is \
                             declared without the limit",
                            g.key
                        ),
                    ),
                    None => {}
                }
                fw.insert("destination".into(), Value::Object(destination));
                fw.insert("source".into(), source.clone());
                fw.insert("action".into(), json!(action_str(rule.action)));
                if rule.logging && self.target.facts.has("Firewall_Rule", "loggingEnabled") {
                    fw.insert("loggingEnabled".into(), json!(true));
                }
                fw_rules.push(Value::Object(fw));
            }
            let rule_list = fit(format!("{base}_rule_list"));
            app.add(&rule_list, json!({"class": "Firewall_Rule_List", "rules": fw_rules}), Some(&me));
            lists.push(app.use_of(&rule_list));
        }
        lists
    }

    /// The addresses of a source list in tenant `app` listing these sets ([`source_addresses`]), noted in
    /// `source_lists` with the list's name when it is declared (`name` is called only when there are addresses).
    fn source_list(
        &mut self,
        app: &App<'_>,
        sets: &[String],
        name: impl FnOnce() -> String,
    ) -> (Vec<String>, Option<String>) {
        let addresses = source_addresses(self.model, sets);
        let object = (!addresses.is_empty()).then(name);
        self.out.source_lists.push(SourceList {
            tenant: app.tenant.name.clone(),
            object: object.clone(),
            sets: sets.to_vec(),
        });
        (addresses, object)
    }

    /// ExternalIPRules as the 0.6.x NAT objects (§3.13); returns the NAT policy's name when one is declared.
    fn nat(&mut self, app: &mut App<'_>, rules: &[NatRule]) -> Option<String> {
        if rules.is_empty() {
            return None;
        }
        let (c, m) = (self.cluster, self.master);
        let policy = format!("{m}_snat_policy");
        let mut nat_rules = Vec::new();
        for rule in rules {
            let me = ObjectRef::new("ExternalIPRule", Some(&rule.namespace), &rule.name);
            if let Some(Refusal { why, .. }) = self.target.refused.get(&me).cloned() {
                self.warn(&me, "InvalidDeclaration", format!("left out of the as3 declaration: {why}"));
                continue;
            }
            let protocol = rule.destination_protocol.map_or("any", Protocol::as_str);
            if !self.target.facts.allows("NAT_Rule", "protocol", protocol) {
                let version = self.version();
                self.warn(
                    &me,
                    "NotSupported",
                    format!(
                        "not supported by {version}: NAT_Rule.protocol `{protocol}`; the rule is left out of the as3 \
                         declaration (its traffic is not translated by it)"
                    ),
                );
                continue;
            }
            let base = format!("{c}_snat_{}_{}", rule.namespace, rule.name);
            let mut sources = Vec::new();
            for (i, set) in rule.sources.iter().enumerate() {
                let svc = rule.services.get(i).cloned().unwrap_or_else(|| format!("service{i}"));
                let name = || fit(format!("{base}_ep_{svc}_src_address"));
                let (addresses, name) = self.source_list(app, std::slice::from_ref(set), name);
                let Some(name) = name else { continue };
                app.add(&name, json!({"class": "Firewall_Address_List", "addresses": addresses}), Some(&me));
                sources.push(app.use_of(&name));
            }
            if sources.is_empty() {
                self.warn(
                    &me,
                    "NotDeclared",
                    "left out of the as3 declaration: its Services have no source address yet".into(),
                );
                continue;
            }
            let suffix = rule.destination_name.as_ref().map(|n| format!("_{n}")).unwrap_or_default();
            let mut destination = Map::new();
            if !rule.destination_addresses.is_empty() {
                let name = fit(format!("{base}_dest_addr{suffix}"));
                let addrs: Vec<String> = rule.destination_addresses.iter().map(entry_string).collect();
                app.add(&name, json!({"class": "Firewall_Address_List", "addresses": addrs}), Some(&me));
                destination.insert("addressLists".into(), json!([app.use_of(&name)]));
            }
            if !rule.destination_ports.is_empty() {
                let name = fit(format!("{base}_dest_port{suffix}"));
                let ports: Vec<String> = rule.destination_ports.iter().map(ToString::to_string).collect();
                app.add(&name, json!({"class": "Firewall_Port_List", "ports": ports}), Some(&me));
                destination.insert("portLists".into(), json!([app.use_of(&name)]));
            }
            let trans = fit(format!("{base}_src_trans"));
            let external: Vec<String> = rule.external_addresses.iter().map(entry_string).collect();
            app.add(
                &trans,
                json!({"class": "NAT_Source_Translation", "type": "dynamic-pat", "addresses": external, "ports": ["10000-50000"]}),
                Some(&me),
            );
            let mut nr = Map::new();
            nr.insert("name".into(), json!(fit(base.clone())));
            if self.target.facts.has("NAT_Rule", "remark") {
                nr.insert("remark".into(), json!(app.owner));
            }
            nr.insert("protocol".into(), json!(rule.destination_protocol.map_or("any", Protocol::as_str)));
            if !destination.is_empty() {
                nr.insert("destination".into(), Value::Object(destination));
            }
            nr.insert("source".into(), json!({"addressLists": sources}));
            nr.insert("sourceTranslation".into(), app.use_of(&trans));
            nat_rules.push(Value::Object(nr));
        }
        let snat = &self.model.settings.snat_addresses;
        if !snat.is_empty() {
            let trans = format!("{m}_snat_default_translation");
            let addrs: Vec<String> = snat.iter().map(entry_string).collect();
            app.add(
                &trans,
                json!({"class": "NAT_Source_Translation", "type": "dynamic-pat", "addresses": addrs, "ports": ["10000-50000"]}),
                None,
            );
            nat_rules.push(json!({"name": format!("{m}_snat_automap"), "protocol": "any", "sourceTranslation": app.use_of(&trans)}));
        }
        if nat_rules.is_empty() {
            return None;
        }
        app.add(&policy, json!({"class": "NAT_Policy", "rules": nat_rules}), None);
        Some(policy)
    }

    /// The gateway pool, virtual address, virtual server and log objects of a tenant (§3.3).
    fn shared_objects(&mut self, app: &mut App<'_>, rd: &str, svc_staged: Option<&str>, nat_policy: Option<String>) {
        let m = self.master;
        let t = app.tenant;
        let backend = &t.backend;
        let mut pool = Map::new();
        pool.insert("class".into(), json!("Pool"));
        if !backend.gateway_pool.is_empty() {
            let addrs: Vec<String> = backend.gateway_pool.iter().map(ToString::to_string).collect();
            pool.insert("members".into(), json!([{"serverAddresses": addrs, "enable": true, "servicePort": 0}]));
        }
        pool.insert("monitors".into(), json!([{"bigip": "/Common/gateway_icmp"}]));
        app.add(&format!("{m}_gw_pool"), Value::Object(pool), None);

        let vs_settings = &backend.virtual_server;
        let va = format!("{m}_outbound_va");
        app.add(
            &va,
            json!({"class": "Service_Address", "virtualAddress": vs_settings.virtual_address.to_string(),
                   "icmpEcho": vs_settings.icmp_echo, "arpEnabled": vs_settings.arp_enabled}),
            None,
        );

        let log = self.model.settings.log_pool.as_ref().filter(|l| l.logging_enabled && l.template.is_some());
        let mut vs = match &vs_settings.template {
            Some(tpl) => match substitute(&Value::Object(tpl.clone()), m, &t.name) {
                Value::Object(o) => o,
                _ => Map::new(),
            },
            None => {
                let mut o = Map::new();
                o.insert("layer4".into(), json!("any"));
                o.insert("translateServerAddress".into(), json!(false));
                o.insert("translateServerPort".into(), json!(false));
                o.insert("securityLogProfiles".into(), json!([app.use_of(&format!("{m}_afm_hsl_log_profile"))]));
                o.insert("virtualPort".into(), json!(0));
                o.insert("snat".into(), json!("auto"));
                o.insert("class".into(), json!("Service_L4"));
                o
            }
        };
        vs.insert("virtualAddresses".into(), json!([app.use_of(&va)]));
        vs.insert("policyFirewallEnforced".into(), app.use_of(&format!("{m}_svc_policy_{rd}")));
        if let Some(s) = svc_staged {
            vs.insert("policyFirewallStaged".into(), app.use_of(s));
        }
        vs.insert("pool".into(), json!(format!("{m}_gw_pool")));
        if log.is_none() {
            vs.remove("securityLogProfiles");
        }
        if let Some(p) = nat_policy {
            vs.insert("policyNAT".into(), app.use_of(&p));
            if !self.model.settings.snat_addresses.is_empty() {
                vs.insert("snat".into(), json!("none"));
            }
        }
        app.add(&format!("{m}_outbound_vs"), Value::Object(vs), None);

        let Some(log) = log else { return };
        let template = substitute(&Value::Object(log.template.clone().unwrap_or_default()), m, &t.name);
        if let Value::Object(objects) = template {
            for (name, mut object) in objects {
                let class = object.get("class").and_then(Value::as_str).unwrap_or("").to_string();
                if !log.enable_remote_log {
                    match class.as_str() {
                        "Security_Log_Profile" => {}
                        "Log_Publisher" => {
                            object["destinations"] = json!([{"bigip": "/Common/local-db"}]);
                        }
                        _ => continue,
                    }
                }
                app.add(&name, object, None);
            }
        }
        let mut by_port: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        for s in &log.servers {
            by_port.entry(s.port()).or_default().push(s.ip().to_string());
        }
        let members: Vec<Value> = by_port
            .into_iter()
            .map(|(port, addrs)| json!({"serverAddresses": addrs, "enable": true, "servicePort": port}))
            .collect();
        let mut pool = Map::new();
        pool.insert("class".into(), json!("Pool"));
        pool.insert("members".into(), json!(members));
        if !log.health_monitor.is_empty() {
            pool.insert("monitors".into(), json!([{"bigip": format!("/Common/{}", log.health_monitor)}]));
        }
        app.add(&format!("{m}_log_pool"), Value::Object(pool), None);
    }
}

fn entry_string(a: &AddressEntry) -> String {
    match a {
        AddressEntry::Net(n) => address(n, None),
        AddressEntry::Range(x, y) => format!("{x}-{y}"),
        AddressEntry::Host(h) => h.clone(),
        AddressEntry::Wildcard(w) => format!("*.{w}"),
    }
}

/// The AS3 request document that declares one tenant, as the original writes it.
pub fn request_document(schema_version: &str, tenant: &str, declaration: Value) -> Value {
    json!({
        "$schema": SCHEMA_URL,
        "class": "AS3",
        "declaration": {
            "class": "ADC",
            "id": DECLARATION_ID,
            "schemaVersion": schema_version,
            "updateMode": "selective",
            tenant: declaration,
        }
    })
}

/// The staged (audit) policy of an enforced policy: `k8s_svc_policy_rd2` → `k8s_svc_staged_policy_rd2`.
pub fn staged_policy_name(enforced: &str) -> String {
    enforced.replacen("_policy", "_staged_policy", 1)
}

/// The remark CES writes on every tenant (partition) it declares for cluster `cluster` (`clusterName`).
pub fn tenant_remark(cluster: &str) -> String {
    format!("CES cluster {cluster}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_big_ip_writes_them() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(address(&n("10.16.0.11/32"), Some(2)), "10.16.0.11%2");
        assert_eq!(address(&n("10.66.0.0/16"), Some(4)), "10.66.0.0%4/16");
        assert_eq!(address(&n("fd00::5/128"), None), "fd00::5");
        assert_eq!(address(&n("fd00::/64"), Some(3)), "fd00::%3/64");
    }

    #[test]
    fn a_net_inside_another_of_the_list_is_dropped() {
        let mut v: Vec<IpNet> =
            ["10.66.0.5/32", "10.66.0.0/16", "10.67.0.1/32", "10.66.255.255/32", "fd00::1/128", "fd00::/64"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect();
        minimal_cover(&mut v);
        let s: Vec<String> = v.iter().map(ToString::to_string).collect();
        assert_eq!(s, ["10.66.0.0/16", "10.67.0.1/32", "fd00::/64"]);
    }

    #[test]
    fn template_names_are_substituted_only_where_they_are_names() {
        let v = json!({"k8s_a": {"use": "/{{tenant}}/Shared/k8s_b", "remark": "k8s stays", "pool": "k8s_gw_pool"}});
        assert_eq!(
            substitute(&v, "prod", "p2"),
            json!({"prod_a": {"use": "/p2/Shared/prod_b", "remark": "k8s stays", "pool": "prod_gw_pool"}})
        );
    }
}
