//! What AFM's logs call the rules CES declared: for each tenant's firewall policies, the rules of their rule lists,
//! with the CES rule that made each (from the renderer's own record of origins). The flow pipeline maps AFM's
//! `acl_policy_name` and `acl_rule_name` back to CES rules with this (docs/flows.md, "From the BIG-IP").

use crate::Rendered;
use ces_api::Mode;
use ces_model::{ObjectRef, PolicyModel, Rule};

/// One rule as AFM names it in its log messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedRule {
    pub tenant: String,
    /// The policy's full path, as `acl_policy_name` says it: `/tenant/Shared/name`.
    pub policy: String,
    /// The rule list the rule is in (its name) and the rule's name in it.
    pub rule_list: String,
    pub rule: String,
    /// The id of the CES rule behind it (`Kind/namespace/name`); `None` for the tenant's own rule
    /// (`deny_all_rule`: its default action).
    pub rule_id: Option<String>,
    /// `enforce`, or `audit` for a rule of a staged policy.
    pub mode: String,
    /// `accept`, `accept-decisively`, `drop`, `reject`.
    pub action: String,
    /// `cluster`, `namespace`, `service`, or `default`.
    pub context: String,
    /// `namespace/name` of the ExternalService the rule is for.
    pub external_service: Option<String>,
}

fn last(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Every rule of every policy of the rendered documents.
pub fn logged_rules(rendered: &Rendered, model: &PolicyModel) -> Vec<LoggedRule> {
    let mut out = Vec::new();
    for (tenant, doc) in &rendered.documents {
        let Some(decl) = doc["declaration"][tenant].as_object() else { continue };
        let origins = rendered.origins.get(tenant);
        for (app, objects) in decl {
            let Some(objects) = objects.as_object() else { continue };
            for (name, policy) in objects.iter().filter(|(_, o)| o["class"] == "Firewall_Policy") {
                for r in policy["rules"].as_array().into_iter().flatten() {
                    let Some(list_path) = r["use"].as_str() else { continue };
                    let list_name = last(list_path);
                    let Some(list) = objects.get(list_name) else { continue };
                    let origin = origins.and_then(|o| o.get(list_name)).and_then(|v| v.first());
                    let model_rule = origin.and_then(|o| rule_of(model, o));
                    for fw in list["rules"].as_array().into_iter().flatten() {
                        let rule = fw["name"].as_str().unwrap_or_default().to_string();
                        let action = fw["action"].as_str().unwrap_or_default().to_string();
                        let context = match origin.map(|o| o.kind.as_str()) {
                            Some("ClusterEgressRule") => "cluster",
                            Some("NamespaceEgressRule") => "namespace",
                            Some("ServiceEgressRule") => "service",
                            _ => "default",
                        };
                        out.push(LoggedRule {
                            tenant: tenant.clone(),
                            policy: format!("/{tenant}/{app}/{name}"),
                            rule_list: list_name.to_string(),
                            external_service: model_rule.and_then(|r| external_service(model, r, list_name)),
                            rule,
                            rule_id: model_rule.map(|r| r.id.clone()),
                            mode: match model_rule.map(|r| r.mode) {
                                Some(Mode::Audit) => "audit".into(),
                                _ => "enforce".into(),
                            },
                            action,
                            context: context.to_string(),
                        });
                    }
                }
            }
        }
    }
    out
}

fn rule_of<'m>(model: &'m PolicyModel, origin: &ObjectRef) -> Option<&'m Rule> {
    model.rules().map(|(_, r)| r).find(|r| {
        r.kind.as_str() == origin.kind && r.name == origin.name && r.namespace.as_deref() == origin.namespace.as_deref()
    })
}

/// The ExternalService a rule list of `rule` is for: the rule list is named `..._ext_<name>_rule_list`.
fn external_service(model: &PolicyModel, rule: &Rule, list: &str) -> Option<String> {
    rule.destinations
        .iter()
        .find(|d| model.destination_sets.get(*d).is_some_and(|s| list.ends_with(&format!("_ext_{}_rule_list", s.name))))
        .cloned()
}

/// The route domain of each tenant, as AFM logs it (`route_domain`).
pub fn route_domains(model: &PolicyModel) -> Vec<(u16, String)> {
    model.tenants.iter().map(|t| (t.route_domain.id, t.name.clone())).collect()
}

/// The field list and delimiter of the log profile's `network.storageFormat` in the `logPool` template, when it has
/// the object form (a user-defined string has no fields to read by position). An omitted delimiter is BIG-IP's `,`
/// (AS3's schema says `.`, but its defaults do not apply inside `anyOf`: afm-log-format.md §4).
pub fn storage_format(model: &PolicyModel) -> Option<(Vec<String>, char)> {
    let template = model.settings.log_pool.as_ref()?.template.as_ref()?;
    let profile = template.values().find(|o| o["class"] == "Security_Log_Profile")?;
    let format = profile["network"]["storageFormat"].as_object()?;
    let fields: Vec<String> =
        format.get("fields")?.as_array()?.iter().filter_map(|f| f.as_str().map(str::to_string)).collect();
    let delimiter = format.get("delimiter").and_then(|d| d.as_str()).and_then(|d| d.chars().next()).unwrap_or(',');
    (!fields.is_empty()).then_some((fields, delimiter))
}
