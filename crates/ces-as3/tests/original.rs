//! The original CES's worked example (ces-original.md §3.14, ces-as3-examples.json): the same objects, with the
//! same names and contents, but for the deviations docs/as3.md lists.

mod common;

use std::collections::BTreeSet;

use ces_as3::render;
use serde_json::{Value, json};

fn reference() -> Value {
    let path = common::reference_examples();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn shared<'a>(doc: &'a Value, tenant: &str) -> &'a serde_json::Map<String, Value> {
    doc["declaration"][tenant]["Shared"].as_object().unwrap_or_else(|| panic!("no /{tenant}/Shared in {doc}"))
}

/// Compares two tenant documents object by object; `deviations` maps an object name to the value we expect instead
/// of the original's.
fn compare(ours: &Value, theirs: &Value, tenant: &str, deviations: &[(&str, Value)]) {
    // One deviation on every object a rule made (docs/as3.md, "Clusters side by side"): the remark of its cluster.
    let ours = &common::without_cluster_remarks(ours);
    let (a, b) = (shared(ours, tenant), shared(theirs, tenant));
    let names = |m: &serde_json::Map<String, Value>| m.keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(names(a), names(b), "/{tenant}/Shared: the same objects, by name");
    for (name, theirs) in b {
        let expected = deviations.iter().find(|(n, _)| n == name).map(|(_, v)| v).unwrap_or(theirs);
        assert_eq!(&a[name], expected, "/{tenant}/Shared/{name}");
    }
    // The tenant's own properties and the declaration's.
    let strip = |d: &Value| {
        let mut d = d.clone();
        d["declaration"][tenant].as_object_mut().unwrap().remove("Shared");
        d
    };
    // One deviation around Shared (docs/as3.md): the remark that marks a partition as this cluster's.
    let mut ours = strip(ours);
    let remark = ours["declaration"][tenant].as_object_mut().unwrap().remove("remark");
    if tenant == "Common" {
        assert_eq!(remark, None, "Common carries no cluster's remark");
    } else {
        assert!(remark.as_ref().and_then(Value::as_str).is_some_and(|r| r.starts_with("CES cluster ")), "{remark:?}");
    }
    assert_eq!(ours, strip(theirs), "the declaration around /{tenant}/Shared");
}

#[test]
fn the_worked_example_is_declared_with_the_originals_names_and_objects() {
    let model = common::original_model();
    assert!(model.errors().next().is_none(), "{:?}", model.diagnostics);
    let out = render(&model, jiff::Timestamp::now());
    let reference = reference();
    let steps = &reference["master_0.5.3.2"];
    assert_eq!(out.documents.keys().cloned().collect::<Vec<_>>(), ["Common", "p2", "project3"]);

    compare(&out.documents["Common"], &steps["1_rule1_POST_declare_Common"], "Common", &[]);
    // Deviation: source addresses carry the tenant's route domain.
    compare(
        &out.documents["project3"],
        &steps["2_rule3_POST_declare_project3"],
        "project3",
        &[(
            "k8s_ns_project3_rule3_src_address",
            json!({"class": "Firewall_Address_List", "addresses": ["10.66.0.0%4/16"]}),
        )],
    );
    compare(
        &out.documents["p2"],
        &steps["3_rule4_POST_declare_p2"],
        "p2",
        &[(
            "k8s_svc_default_rule4_ep_mysql-service_src_address",
            json!({"class": "Firewall_Address_List", "addresses": ["10.16.0.11%2", "10.16.0.12%2"]}),
        )],
    );
}

#[test]
fn policies_are_bound_as_the_original_binds_them() {
    let out = render(&common::original_model(), jiff::Timestamp::now());
    let b: Vec<(String, String, String)> =
        out.bindings.iter().map(|b| (b.path.clone(), b.field.clone(), b.policy.clone())).collect();
    assert_eq!(
        b,
        [
            (
                "/mgmt/tm/net/route-domain/~project3~rd4".to_string(),
                "fwEnforcedPolicy".to_string(),
                "/project3/Shared/k8s_ns_policy_rd4".to_string()
            ),
            (
                "/mgmt/tm/security/firewall/global-rules".to_string(),
                "enforcedPolicy".to_string(),
                "/Common/Shared/k8s_system_global_policy".to_string()
            ),
        ]
    );
}

#[test]
fn every_document_of_the_worked_example_is_valid_under_its_schema() {
    let model = common::original_model();
    let schema = common::schema(&model.settings.schema_version);
    for (tenant, doc) in render(&model, jiff::Timestamp::now()).documents {
        schema.validate(&doc).unwrap_or_else(|e| panic!("{tenant}: {e:?}"));
    }
}

#[test]
fn the_references_own_documents_are_valid_so_the_validator_is_not_too_strict() {
    let schema = common::schema("3.29.0");
    for (step, doc) in reference()["master_0.5.3.2"].as_object().unwrap() {
        schema.validate(doc).unwrap_or_else(|e| panic!("{step}: {e:?}"));
    }
}

#[test]
fn an_icmp_rule_under_3_29_is_left_out_naming_the_field_and_version_and_the_schema_would_catch_it() {
    let model = common::compile(
        r#"
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {name: pinger, namespace: kube-system}
spec:
  addresses: [203.0.113.9]
  ports: [{name: ping, protocol: ICMP}]
---
apiVersion: kubeovn.io/v1alpha1
kind: ClusterEgressRule
metadata: {name: allow-ping}
spec: {action: accept, externalServices: [pinger]}
"#,
        "clusterName: k8s\nschemaVersion: \"3.29.0\"\ntenant: [{name: Common}]\n",
    );
    assert!(model.errors().next().is_none(), "{:?}", model.diagnostics);
    let rule = ces_model::ObjectRef::new("ClusterEgressRule", None, "allow-ping");
    // Rendered for 3.29: the rule is left out, saying which field and version, and the document is valid.
    let out = render(&model, jiff::Timestamp::now());
    let doc = &out.documents["Common"];
    common::schema("3.29.0").validate(doc).unwrap();
    assert!(doc["declaration"]["Common"]["Shared"].get("k8s_global_allow-ping_ext_pinger_rule_list").is_none());
    let note = out.diagnostics.iter().find(|d| d.object.as_ref() == Some(&rule)).unwrap();
    assert_eq!(note.reason, "NotSupported");
    assert!(note.message.contains("Firewall_Rule.protocol `icmp`") && note.message.contains("AS3 3.29.0"), "{note}");
    // Rendered as 3.56 can express it, the 3.29 schema catches it on the object and field (what the schema round of
    // `render_checked` relies on for what the facts do not cover), and the 3.56 schema takes it.
    let facts56 = ces_as3::Facts::known("3.56.0").unwrap();
    let target = ces_as3::render::Target { facts: facts56, refused: Default::default() };
    let out = ces_as3::render::render_for(&model, jiff::Timestamp::now(), &target);
    let doc = &out.documents["Common"];
    let errors = common::schema("3.29.0").validate(doc).unwrap_err();
    let e = &errors[0];
    assert_eq!(e.tenant.as_deref(), Some("Common"));
    assert_eq!(e.object.as_deref(), Some("k8s_global_allow-ping_ext_pinger_rule_list"));
    assert_eq!(e.path, "/rules/0/protocol");
    assert!(e.message.contains("icmp"), "{e}");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(out.origins["Common"]["k8s_global_allow-ping_ext_pinger_rule_list"], [rule]);
    let mut doc56 = doc.clone();
    doc56["declaration"]["schemaVersion"] = json!("3.56.0");
    common::schema("3.56.0").validate(&doc56).unwrap();
}

#[test]
fn example_c_an_fqdn_and_a_bandwidth_port_are_declared_as_the_original_declares_them() {
    // Step 5 of the worked example: rule5 (drop, logging) added after rule4, its ExternalService exsvc5 with a host
    // name and a 443/TCP port limited by an iRule.
    let r = common::repo();
    let extra = r#"
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {name: exsvc5, namespace: default}
spec:
  addresses: [www.example.com]
  ports:
    - {name: https, protocol: TCP, port: "443", bandwidth: bwc-1mbps-irule}
    - {name: http, protocol: TCP, port: "80"}
---
apiVersion: kubeovn.io/v1alpha1
kind: ServiceEgressRule
metadata: {name: rule5, namespace: default}
spec: {action: drop, logging: true, service: mysql-service, externalServices: [exsvc5]}
"#;
    let texts = [
        std::fs::read_to_string(r.join("examples/original/examples.yaml")).unwrap(),
        std::fs::read_to_string(r.join("examples/original-cluster.yaml")).unwrap(),
        extra.to_string(),
    ];
    let conf = std::fs::read_to_string(r.join("examples/original/ces-conf.yaml")).unwrap();
    let model = common::compile(&texts.join("\n---\n"), &conf);
    assert!(model.errors().next().is_none(), "{:?}", model.diagnostics);
    let out = render(&model, jiff::Timestamp::now());
    let src = |rule: &str| {
        (
            format!("k8s_svc_default_{rule}_ep_mysql-service_src_address"),
            json!({"class": "Firewall_Address_List", "addresses": ["10.16.0.11%2", "10.16.0.12%2"]}),
        )
    };
    let (a, b) = (src("rule4"), src("rule5"));
    compare(
        &out.documents["p2"],
        &reference()["master_0.5.3.2"]["5_rule5_added_after_rule4_POST_declare_p2"],
        "p2",
        &[(a.0.as_str(), a.1), (b.0.as_str(), b.1)],
    );
    common::schema("3.29.0").validate(&out.documents["p2"]).unwrap();
}
