//! AFM's log messages name policies and rules by the names CES declared; `logged_rules` maps them back to CES rules.

mod common;

use ces_as3::logs::{logged_rules, route_domains};
use jiff::Timestamp;

const CONFIG: &str = r#"
clusterName: k8s
isSupportRouteDomain: true
schemaVersion: "3.29.0"
tenant:
  - name: Common
  - {name: alpha, namespaces: [a1], routeDomain: {id: 11, name: rd11}}
  - {name: beta, namespaces: [b1], routeDomain: {id: 12, name: rd12}}
"#;

/// The same rule names in two tenants, an audited rule, and a cluster rule.
const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a1}
---
apiVersion: v1
kind: Namespace
metadata: {name: b1}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: a1}
status: {phase: Running, podIPs: [{ip: 10.10.0.5}]}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: b1}
status: {phase: Running, podIPs: [{ip: 10.10.0.5}]}
---
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {name: web, namespace: a1}
spec: {addresses: [198.51.100.7], ports: [{protocol: TCP, port: "443"}]}
---
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {name: web, namespace: b1}
spec: {addresses: [198.51.100.8], ports: [{protocol: TCP, port: "443"}]}
---
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {name: dns, namespace: kube-system}
spec: {addresses: [192.0.2.53], ports: [{protocol: UDP, port: "53"}]}
---
apiVersion: kubeovn.io/v1alpha1
kind: NamespaceEgressRule
metadata: {name: out, namespace: a1}
spec: {action: accept, externalServices: [web]}
---
apiVersion: kubeovn.io/v1alpha1
kind: NamespaceEgressRule
metadata: {name: out, namespace: b1}
spec: {action: drop, mode: audit, externalServices: [web]}
---
apiVersion: kubeovn.io/v1alpha1
kind: ClusterEgressRule
metadata: {name: resolvers}
spec: {action: accept, externalServices: [dns]}
"#;

#[test]
fn every_declared_rule_names_its_tenant_ces_rule_mode_and_external_service() {
    let model = common::compile(MANIFESTS, CONFIG);
    let rendered = ces_as3::render(&model, Timestamp::UNIX_EPOCH);
    let rules = logged_rules(&rendered, &model);
    let find = |tenant: &str, id: &str| {
        rules
            .iter()
            .find(|r| r.tenant == tenant && r.rule_id.as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no logged rule of {id} in {tenant}: {rules:#?}"))
    };
    let a = find("alpha", "NamespaceEgressRule/a1/out");
    assert_eq!((a.mode.as_str(), a.action.as_str(), a.context.as_str()), ("enforce", "accept", "namespace"));
    assert_eq!(a.external_service.as_deref(), Some("a1/web"));
    assert!(a.policy.starts_with("/alpha/Shared/") && a.policy.contains("_ns_policy_rd11"), "{}", a.policy);
    let b = find("beta", "NamespaceEgressRule/b1/out");
    assert_eq!((b.mode.as_str(), b.action.as_str()), ("audit", "drop"));
    assert!(b.policy.contains("_ns_staged_policy_rd12"), "{}", b.policy);
    assert_eq!(b.external_service.as_deref(), Some("b1/web"));
    let c = find("Common", "ClusterEgressRule/resolvers");
    assert_eq!((c.context.as_str(), c.external_service.as_deref()), ("cluster", Some("kube-system/dns")));
    // Each tenant's own last rule is its default action, with no CES rule behind it.
    for t in ["alpha", "beta"] {
        assert!(
            rules.iter().any(|r| r.tenant == t && r.rule == "deny_all_rule" && r.rule_id.is_none()),
            "{t} has no deny_all_rule"
        );
    }
    // Nothing of one tenant is named under another's policies.
    for r in &rules {
        assert!(r.policy.starts_with(&format!("/{}/", r.tenant)), "{r:?}");
        if let Some(id) = &r.rule_id {
            let ns = id.split('/').nth(1).unwrap_or("");
            let foreign = matches!((r.tenant.as_str(), ns), ("alpha", "b1") | ("beta", "a1"));
            assert!(!foreign, "{r:?}");
        }
    }
    let rds = route_domains(&model);
    assert!(rds.contains(&(11, "alpha".into())) && rds.contains(&(12, "beta".into())), "{rds:?}");
}

#[test]
fn the_log_profiles_storage_format_gives_the_fields_in_order() {
    let model = common::original_model();
    let (fields, delimiter) = ces_as3::logs::storage_format(&model).expect("the original's template has a field list");
    assert_eq!(delimiter, ',');
    assert_eq!(fields.len(), 16, "{fields:?}");
    assert_eq!((fields[0].as_str(), fields[1].as_str()), ("bigip-hostname", "acl-rule-name"));
    // Without a template there is nothing to read by position.
    assert!(ces_as3::logs::storage_format(&common::compile(MANIFESTS, CONFIG)).is_none());
}
