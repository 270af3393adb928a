//! The AS3 backend against the BIG-IP double: what it sends, and that the device ends where the model says.

mod common;

use std::time::Duration;

use ces_as3::backend::TenantOutcome;
use ces_as3::client::Client;
use ces_as3::{As3Backend, render};
use ces_bigip_double::Double;
use ces_model::PolicyModel;
use ces_sync::Backend;
use serde_json::{Value, json};

fn double() -> Double {
    let d = Double::start(common::schema_dir());
    d.with(|s| {
        s.objects.insert("/mgmt/tm/net/route-domain/~project3~rd4".into(), json!({"name": "rd4", "id": 4}));
        s.objects.insert("/mgmt/tm/net/route-domain/~p2~rd2".into(), json!({"name": "rd2", "id": 2}));
    });
    d
}

fn backend(d: &Double) -> As3Backend {
    common::backend_at(&d.url(), common::schema_dir())
}

fn desired(model: &PolicyModel) -> std::collections::BTreeMap<String, Value> {
    render(model, jiff::Timestamp::now()).declarations()
}

/// The device holds exactly the desired tenants, and every write it received was valid under the schema.
fn assert_converged(d: &Double, model: &PolicyModel) {
    let want = desired(model);
    let schema = common::schema(&model.settings.schema_version);
    d.with(|s| {
        assert_eq!(s.tenants, want, "the device holds the desired tenants");
        for r in &s.requests {
            if r.method == "POST" && r.path.starts_with("/mgmt/shared/appsvcs/declare/") {
                let doc = r.body.as_ref().unwrap();
                schema.validate(doc).unwrap_or_else(|e| panic!("{} sent an invalid document: {e:?}", r.path));
            }
        }
    });
}

/// A model of the original's examples with one more endpoint address for mysql-service.
fn churned(extra_ip: &str) -> PolicyModel {
    let mut m = common::original_model();
    let set = m.address_sets.get_mut("service/default/mysql-service").unwrap();
    set.addresses.push(format!("{extra_ip}/32").parse().unwrap());
    set.addresses.sort();
    m
}

#[test]
fn first_sync_declares_each_tenant_binds_and_saves_then_nothing_more() {
    let d = double();
    let mut b = backend(&d);
    let model = common::original_model();
    b.apply(&model, true).unwrap();
    assert_converged(&d, &model);
    let writes = d.with(|s| s.writes());
    assert_eq!(
        writes,
        [
            "POST /mgmt/shared/appsvcs/declare/Common?showHash=true",
            "POST /mgmt/shared/appsvcs/declare/p2?showHash=true",
            "POST /mgmt/shared/appsvcs/declare/project3?showHash=true",
            "PATCH /mgmt/tm/net/route-domain/~project3~rd4",
            "PATCH /mgmt/tm/security/firewall/global-rules",
            "POST /mgmt/tm/sys/config",
        ]
    );
    assert_eq!(
        d.with(|s| s.objects["/mgmt/tm/net/route-domain/~project3~rd4"]["fwEnforcedPolicy"].clone()),
        json!("/project3/Shared/k8s_ns_policy_rd4")
    );
    // The same model again: not one request.
    let before = d.with(|s| s.requests.len());
    let summary = b.apply(&model, false).unwrap().summary;
    assert_eq!(d.with(|s| s.requests.len()), before, "{summary}");
    // A resync reads every tenant and binding back, and writes nothing.
    b.apply(&model, true).unwrap();
    assert_eq!(d.with(|s| s.writes().len()), writes.len(), "a resync of an unchanged device writes nothing");
}

#[test]
fn an_existing_configuration_is_adopted_without_a_post() {
    let d = double();
    let model = common::original_model();
    d.with(|s| {
        s.tenants = desired(&model);
        s.objects.insert(
            "/mgmt/tm/security/firewall/global-rules".into(),
            json!({"enforcedPolicy": "/Common/Shared/k8s_system_global_policy"}),
        );
        s.objects.get_mut("/mgmt/tm/net/route-domain/~project3~rd4").unwrap()["fwEnforcedPolicy"] =
            json!("/project3/Shared/k8s_ns_policy_rd4");
    });
    backend(&d).apply(&model, true).unwrap();
    assert_eq!(d.with(|s| s.writes()), Vec::<String>::new(), "nothing to change, nothing sent");
}

#[test]
fn pod_churn_is_one_patch_of_the_changed_address_lists() {
    let d = double();
    let mut b = backend(&d);
    b.apply(&common::original_model(), true).unwrap();
    let before = d.with(|s| s.requests.len());
    let model = churned("10.16.0.99");
    let (outcomes, _) = b.sync(&model, false);
    assert_eq!(outcomes["p2"], TenantOutcome::Patched(1));
    assert_eq!(outcomes["Common"], TenantOutcome::Unchanged);
    let new: Vec<(String, String, Value)> = d.with(|s| {
        s.requests[before..]
            .iter()
            .map(|r| (r.method.clone(), r.path.clone(), r.body.clone().unwrap_or(Value::Null)))
            .collect()
    });
    assert_eq!(new.len(), 1, "one request: {new:?}");
    assert_eq!(new[0].0, "PATCH");
    assert_eq!(
        new[0].2,
        json!([{"op": "replace", "path": "/p2/Shared/k8s_svc_default_rule4_ep_mysql-service_src_address",
                "value": {"class": "Firewall_Address_List", "addresses": ["10.16.0.11%2", "10.16.0.12%2", "10.16.0.99%2"], "remark": "CES cluster k8s"}}])
    );
    assert_converged(&d, &model);
}

#[test]
fn drift_made_behind_our_back_is_repaired_by_the_resync() {
    let d = double();
    let mut b = backend(&d);
    let model = common::original_model();
    b.apply(&model, true).unwrap();
    d.with(|s| {
        let app = s.tenants.get_mut("p2").unwrap()["Shared"].as_object_mut().unwrap();
        app.insert("rogue".into(), json!({"class": "Firewall_Address_List", "addresses": ["0.0.0.0/0"]}));
        app["k8s_svc_policy_rd2"]["rules"] = json!([]);
    });
    b.apply(&model, false).unwrap();
    assert!(d.with(|s| s.tenants["p2"]["Shared"].get("rogue").is_some()), "an incremental pass trusts what it sent");
    b.apply(&model, true).unwrap();
    assert_converged(&d, &model);
}

#[test]
fn busy_device_is_retried_with_backoff_and_a_storm_longer_than_the_attempts_fails_the_pass() {
    let d = double();
    let mut b = backend(&d);
    let model = common::original_model();
    d.with(|s| s.busy = 3);
    b.apply(&model, true).unwrap();
    assert_converged(&d, &model);
    assert_eq!(d.with(|s| s.requests.iter().filter(|r| r.status == 503).count()), 3);

    let d = double();
    let mut b = backend(&d);
    d.with(|s| s.busy = 100);
    let e = b.apply(&model, true).unwrap_err();
    assert!(e.contains("busy") && e.contains("in progress"), "{e}");
    d.with(|s| s.busy = 0);
    b.apply(&model, true).unwrap();
    assert_converged(&d, &model);
}

#[test]
fn an_expired_token_is_replaced_and_the_request_goes_through() {
    let d = double();
    let mut b = backend(&d);
    let model = common::original_model();
    b.apply(&model, true).unwrap();
    d.with(|s| s.expire_tokens());
    let churn = churned("10.16.0.77");
    b.apply(&churn, false).unwrap();
    assert_converged(&d, &churn);
    let logins = d.with(|s| s.requests.iter().filter(|r| r.path == "/mgmt/shared/authn/login").count());
    assert_eq!(logins, 2, "one login at the start, one after the 401");
    // Credentials never travel anywhere but the login.
    d.with(|s| {
        for r in &s.requests {
            if r.path != "/mgmt/shared/authn/login" {
                assert!(!r.body.as_ref().is_some_and(|b| b.to_string().contains("\"password\"")));
            }
        }
    });
}

#[test]
fn a_refused_tenant_fails_alone_and_names_its_rules() {
    let d = double();
    d.with(|s| {
        s.refuse.insert("p2".into(), "01070734:3: Configuration error: /p2/Shared/k8s_svc_default_rule4_ext_exsvc4_rule_list refers to a missing object".into());
    });
    let mut b = backend(&d);
    let mut model = common::original_model();
    // A second rule in p2, which the device's message does not name.
    let p2 = model.tenants.iter_mut().find(|t| t.name == "p2").unwrap();
    let mut second = p2.service_rules[0].clone();
    (second.name, second.id) = ("rule4b".into(), "ServiceEgressRule/default/rule4b".into());
    p2.service_rules.push(second);
    let (outcomes, rendered) = b.sync(&model, true);
    assert!(matches!(outcomes["p2"], TenantOutcome::Failed(_)), "{outcomes:?}");
    assert_eq!(outcomes["Common"], TenantOutcome::Posted);
    assert_eq!(outcomes["project3"], TenantOutcome::Posted);
    let p = b.problems.iter().find(|p| p.reason == "NotProgrammed").expect("a problem");
    assert_eq!(p.object.as_ref().unwrap().to_string(), "ServiceEgressRule/default/rule4");
    assert!(p.message.contains("refers to a missing object"), "{p}");
    every_rule_of_the_tenant_is_told(&b, &rendered, "p2");
    d.with(|s| s.refuse.clear());
    b.apply(&model, false).unwrap();
    assert_converged(&d, &model);
}

#[test]
fn a_tenant_changed_between_our_read_and_our_post_is_read_again_not_overwritten_blindly() {
    let d = double();
    let mut b = backend(&d);
    let model = common::original_model();
    b.apply(&model, true).unwrap();
    // Another writer changes p2 after our last read.
    d.with(|s| {
        s.tenants.get_mut("p2").unwrap()["Shared"]["k8s_svc_policy_rd2"]["rules"] = json!([]);
    });
    // A change that needs a POST of p2 (a new rule list order): the stale lock key is refused, p2 is read again.
    let mut m2 = model.clone();
    m2.tenants.iter_mut().find(|t| t.name == "p2").unwrap().service_rules[0].logging = true;
    let (outcomes, _) = b.sync(&m2, false);
    assert_eq!(outcomes["p2"], TenantOutcome::Posted, "{:?}", b.problems);
    let statuses: Vec<u16> = d.with(|s| {
        s.requests.iter().filter(|r| r.method == "POST" && r.path.contains("declare/p2")).map(|r| r.status).collect()
    });
    assert_eq!(statuses, [200, 422, 200], "the stale POST was refused by the lock, then declared over a fresh read");
    assert_converged(&d, &m2);
}

#[test]
fn a_slow_declaration_becomes_a_task_that_is_followed_to_its_end() {
    let d = double();
    d.with(|s| {
        s.processing = Duration::from_millis(150);
        s.sync_limit = Duration::from_millis(100);
    });
    let mut b = backend(&d);
    let model = common::original_model();
    b.apply(&model, true).unwrap();
    assert_converged(&d, &model);
    let polls = d.with(|s| s.requests.iter().filter(|r| r.path.starts_with("/mgmt/shared/appsvcs/task/")).count());
    assert!(polls >= 3, "each of the three POSTs was answered 202 and polled ({polls} polls)");
}

/// Issue 20, finding 3: a tenant's declaration is taken whole or not at all, so when it is not, every rule in it must
/// say so (its status then reads Programmed=False), not only the rules an error names.
fn every_rule_of_the_tenant_is_told(b: &As3Backend, rendered: &ces_as3::Rendered, tenant: &str) {
    let mut rules: Vec<String> = rendered.origins[tenant].values().flatten().map(|o| o.to_string()).collect();
    rules.sort();
    rules.dedup();
    assert!(rules.len() >= 2, "the test needs a tenant with several rules: {rules:?}");
    for r in rules {
        let told = b.problems.iter().any(|p| {
            p.object.as_ref().is_some_and(|o| o.to_string() == r)
                && matches!(p.reason.as_str(), "InvalidDeclaration" | "NotProgrammed")
        });
        assert!(told, "{r} of tenant {tenant} is not told it was not programmed: {:?}", b.problems);
    }
}

/// A schema folder holding F5's 3.29 schema with one change, for what the facts of a version do not cover.
fn tweaked_schema(tweak: impl Fn(&mut Value)) -> TempDir {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = TempDir(std::env::temp_dir().join(format!("ces-as3-schema-{}-{n}", std::process::id())));
    std::fs::create_dir_all(dir.path()).unwrap();
    let name = "as3-schema-3.29.0-3.json";
    let mut raw: Value =
        serde_json::from_str(&std::fs::read_to_string(common::schema_dir().join(name)).unwrap()).unwrap();
    tweak(&mut raw["definitions"]);
    std::fs::write(dir.path().join(name), raw.to_string()).unwrap();
    dir
}

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn backend_with_schema(d: &Double, dir: &std::path::Path) -> As3Backend {
    common::backend_at(&d.url(), dir.to_path_buf())
}

#[test]
fn a_rule_whose_objects_the_schema_refuses_is_left_out_or_widened_and_the_tenant_is_declared() {
    // A schema that takes no port list: the rules with ports fail the schema, the others do not.
    let dir = tweaked_schema(|defs| defs["Firewall_Port_List"]["properties"]["ports"]["maxItems"] = json!(0));
    let d = Double::start(dir.path().to_path_buf());
    d.with(|s| {
        s.objects.insert("/mgmt/tm/net/route-domain/~project3~rd4".into(), json!({"name": "rd4", "id": 4}));
        s.objects.insert("/mgmt/tm/net/route-domain/~p2~rd2".into(), json!({"name": "rd2", "id": 2}));
    });
    let mut b = backend_with_schema(&d, dir.path());
    let mut model = common::original_model();
    // A second cluster rule, without ports, and the first one refusing.
    let mut copy = model.destination_sets["kube-system/exsvc1"].clone();
    assert!(!copy.ports.is_empty(), "the test needs a rule with a port list");
    (copy.ports, copy.name) = (vec![], "exsvc1b".into());
    model.destination_sets.insert("kube-system/exsvc1b".into(), copy);
    let mut second = model.cluster_rules[0].clone();
    (second.name, second.id, second.destinations) =
        ("rule1b".into(), "ClusterEgressRule/rule1b".into(), vec!["kube-system/exsvc1b".into()]);
    model.cluster_rules.push(second);
    model.cluster_rules[0].action = ces_api::Action::Drop;
    b.apply(&model, true).unwrap();
    assert!(b.problems.is_empty(), "{:?}", b.problems);
    let common = d.with(|s| s.tenants["Common"]["Shared"].clone());
    // rule1b is declared as it is; rule1 refuses every protocol and port to its destination instead of its ports.
    assert!(common.get("k8s_global_rule1b_ext_exsvc1b_rule_list").is_some(), "{common}");
    let widened = &common["k8s_global_rule1_ext_exsvc1_rule_list"]["rules"];
    assert_eq!(widened.as_array().unwrap().len(), 1, "{widened}");
    assert_eq!((&widened[0]["action"], &widened[0]["protocol"]), (&json!("drop"), &json!("any")), "{widened}");
    assert_eq!(widened[0]["destination"]["portLists"], Value::Null, "{widened}");
    assert_eq!(
        widened[0]["destination"]["addressLists"][0]["use"],
        "/Common/Shared/k8s_global_rule1_ext_exsvc1_address"
    );
    let told = b.render_diagnostics.iter().find(|p| p.object.as_ref().is_some_and(|o| o.name == "rule1")).unwrap();
    assert_eq!(told.reason, "InvalidDeclaration");
    assert!(told.message.contains("/ports") && told.message.contains("refuses more, not less"), "{told}");
    // Accepting, the rule is left out whole.
    model.cluster_rules[0].action = ces_api::Action::Accept;
    b.apply(&model, false).unwrap();
    let common = d.with(|s| s.tenants["Common"]["Shared"].clone());
    assert!(!common.as_object().unwrap().keys().any(|k| k.contains("_rule1_")), "{common}");
    assert!(common.get("k8s_global_rule1b_ext_exsvc1b_rule_list").is_some(), "{common}");
    let told = b.render_diagnostics.iter().find(|p| p.object.as_ref().is_some_and(|o| o.name == "rule1")).unwrap();
    assert!(told.message.starts_with("left out of the as3 declaration: invalid under AS3 schema 3.29.0"), "{told}");
}

#[test]
fn a_tenants_own_invalid_object_keeps_that_tenant_off_the_device_and_every_rule_is_told() {
    // A schema whose Service_Address has no arpEnabled: the tenant's own virtual address is invalid.
    let dir = tweaked_schema(|defs| {
        defs["Service_Address"]["properties"].as_object_mut().unwrap().remove("arpEnabled");
    });
    let d = Double::start(dir.path().to_path_buf());
    d.with(|s| s.objects.insert("/mgmt/tm/net/route-domain/~p2~rd2".into(), json!({"name": "rd2", "id": 2})));
    let mut b = backend_with_schema(&d, dir.path());
    let mut model = common::original_model();
    let mut second = model.cluster_rules[0].clone();
    (second.name, second.id) = ("rule1b".into(), "ClusterEgressRule/rule1b".into());
    model.cluster_rules.push(second);
    let (outcomes, rendered) = b.sync(&model, true);
    assert!(outcomes.values().all(|o| *o == TenantOutcome::Invalid), "{outcomes:?}");
    every_rule_of_the_tenant_is_told(&b, &rendered, "Common");
    assert!(d.with(|s| s.requests.iter().all(|r| !r.path.contains("/declare/"))), "nothing left CES");
    let p = b.problems.iter().find(|p| p.reason == "InvalidDeclaration").unwrap();
    assert!(p.message.contains("k8s_outbound_va") && p.message.contains("arpEnabled"), "{p}");
}

#[test]
fn a_declaration_larger_than_ten_megabytes_is_read_back_whole() {
    // A tenant declaration of a large cluster (here 14 MB of sources) is read back on adoption and resync: an
    // answer cut at an HTTP client's default limit would look like an empty tenant and be POSTed again.
    let d = double();
    let mut model = common::original_model();
    let set = model.address_sets.get_mut("service/default/mysql-service").unwrap();
    for i in 0..800_000u32 {
        let ip = std::net::Ipv6Addr::from(0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + u128::from(i) * 3);
        set.addresses.push(ipnet::IpNet::from(std::net::IpAddr::V6(ip)));
    }
    set.addresses.sort();
    let mut b = backend(&d);
    b.apply(&model, true).unwrap();
    let stored = d.with(|s| s.tenants["p2"].to_string().len());
    assert!(stored > 10 << 20, "the tenant is {stored} bytes");
    let writes = d.with(|s| s.writes().len());
    // A fresh controller adopts it without a POST; a resync reads it back and writes nothing.
    let mut fresh = backend(&d);
    fresh.apply(&model, true).unwrap();
    fresh.apply(&model, true).unwrap();
    assert_eq!(d.with(|s| s.writes().len()), writes, "{:?}", &d.with(|s| s.writes())[writes..]);
}

fn delta(sets: &[&str]) -> ces_model::PodDelta {
    ces_model::PodDelta { sets: sets.iter().map(|s| s.to_string()).collect(), pods: vec![] }
}

#[test]
fn apply_pods_patches_only_the_lists_of_the_moved_sets() {
    let d = double();
    let mut b = backend(&d);
    b.apply(&common::original_model(), true).unwrap();
    let before = d.with(|s| s.requests.len());
    let model = churned("10.16.0.99");
    let summary = b.apply_pods(&model, &delta(&["service/default/mysql-service"])).unwrap().summary;
    assert_eq!(summary, "p2: patched 1 address list(s) (pod churn)");
    let new: Vec<(String, Value)> = d.with(|s| {
        s.requests[before..].iter().map(|r| (r.method.clone(), r.body.clone().unwrap_or(Value::Null))).collect()
    });
    assert_eq!(new.len(), 1, "one request, no read: {new:?}");
    assert_eq!(
        new[0],
        (
            "PATCH".to_string(),
            json!([{"op": "replace", "path": "/p2/Shared/k8s_svc_default_rule4_ep_mysql-service_src_address",
                    "value": {"class": "Firewall_Address_List", "addresses": ["10.16.0.11%2", "10.16.0.12%2", "10.16.0.99%2"], "remark": "CES cluster k8s"}}])
        )
    );
    assert_converged(&d, &model);
    // And back; then the whole path agrees that nothing is left to do.
    let model = common::original_model();
    b.apply_pods(&model, &delta(&["service/default/mysql-service"])).unwrap();
    assert_converged(&d, &model);
    let before = d.with(|s| s.requests.len());
    b.apply(&model, false).unwrap();
    assert_eq!(d.with(|s| s.requests.len()), before, "the kept documents are what a whole render gives");
}

#[test]
fn a_source_list_that_empties_or_an_unknown_device_takes_the_whole_path() {
    let d = double();
    let mut b = backend(&d);
    // Nothing applied yet: the whole path.
    let model = common::original_model();
    b.apply_pods(&model, &delta(&["service/default/mysql-service"])).unwrap();
    assert_converged(&d, &model);
    // The Service loses its last endpoint: its rule leaves the declaration, which a PATCH of lists cannot say.
    let mut empty = common::original_model();
    empty.address_sets.get_mut("service/default/mysql-service").unwrap().addresses.clear();
    let before = d.with(|s| s.requests.len());
    b.apply_pods(&empty, &delta(&["service/default/mysql-service"])).unwrap();
    assert!(
        d.with(|s| s.requests[before..].iter().any(|r| r.method == "POST" && r.path.contains("/declare/p2"))),
        "the tenant is declared whole"
    );
    assert_converged(&d, &empty);
}

/// A synthetic cluster of four tenants (600 pods, 60 rules) compiled and applied to a fresh double.
fn synthetic_world() -> (Double, As3Backend, ces_config::CesConfig, ces_snapshot::Snapshot, ces_model::PolicyModel) {
    let d = Double::start(common::schema_dir());
    d.with(|s| {
        for t in ["tenant-a~rd10", "tenant-b~rd20", "tenant-c~rd30", "Common~0"] {
            s.objects.insert(format!("/mgmt/tm/net/route-domain/~{t}"), json!({}));
        }
    });
    let mut b = backend(&d);
    let synth = ces_synth::Synth::generate(600, 60, 3);
    let mut config = synth.config();
    config.schema_version = Some("3.56.0".into());
    let snap = synth.snapshot();
    let model = ces_compiler::compile(&snap, &config, "kube-system");
    b.apply(&model, true).unwrap();
    (d, b, config, snap, model)
}

#[test]
fn pod_churn_through_recompile_and_apply_pods_ends_where_a_whole_compile_does() {
    let (d, mut b, config, mut snap, mut model) = synthetic_world();
    assert_converged(&d, &model);
    let mut rng = ces_synth::Rng::new(11);
    let (mut patched, mut whole, mut with_endpoints, mut multi_tenant) = (0, 0, 0, 0);
    for step in 0..30 {
        // A few pods move to another address of their namespace's subnet.
        let mut changes = Vec::new();
        let mut endpoints: std::collections::BTreeMap<ces_snapshot::Key, Vec<ces_snapshot::Endpoint>> =
            Default::default();
        for _ in 0..1 + rng.below(3) {
            let p = &snap.pods[rng.below(snap.pods.len())];
            if p.host_network
                || p.ips.is_empty()
                || changes.iter().any(|c: &ces_snapshot::PodChange| c.key() == Some((&p.namespace, &p.name)))
            {
                continue;
            }
            let mut q = p.clone();
            let std::net::IpAddr::V4(a) = q.ips[0] else { continue };
            let o = a.octets();
            q.ips = vec![std::net::Ipv4Addr::new(o[0], o[1], o[2], 200 + (step as u8 % 50)).into()];
            // The Service's EndpointSlice follows the pod, as the endpoints controller updates it.
            for (key, eps) in &snap.endpoints {
                let before = endpoints.get(key).unwrap_or(eps);
                if let Some(i) =
                    before.iter().position(|e| e.pod.as_ref() == Some(&(p.namespace.clone(), p.name.clone())))
                {
                    let mut after = before.clone();
                    after[i].ip = q.ips[0];
                    after.sort();
                    endpoints.insert(key.clone(), after);
                }
            }
            changes.push(ces_snapshot::PodChange { before: Some(p.clone()), after: Some(q) });
        }
        let endpoints = endpoints
            .into_iter()
            .map(|(service, after)| ces_snapshot::EndpointsChange {
                before: snap.endpoints.get(&service).cloned(),
                after: Some(after),
                service,
            })
            .collect();
        let churn = ces_snapshot::Churn { pods: changes, endpoints };
        snap.apply_churn(&churn).unwrap();
        match ces_compiler::recompile_churn(&mut model, &snap, &config, &churn) {
            Some(delta) => {
                patched += 1;
                with_endpoints += usize::from(!churn.endpoints.is_empty());
                let n = d.with(|s| s.requests.len());
                let applied = b.apply_pods(&model, &delta).unwrap();
                // However many tenants moved, one PATCH (the device's state is known: no reads, no POSTs).
                let sent: Vec<String> =
                    d.with(|s| s.requests[n..].iter().map(|r| format!("{} {}", r.method, r.path)).collect());
                let tenants = applied.summary.matches("patched").count();
                if tenants > 0 {
                    assert_eq!(sent, ["PATCH /mgmt/shared/appsvcs/declare"], "step {step}: {}", applied.summary);
                }
                multi_tenant += usize::from(tenants > 1);
            }
            None => {
                whole += 1;
                model = ces_compiler::compile(&snap, &config, "kube-system");
                b.apply(&model, false).unwrap();
            }
        }
        assert_eq!(model, ces_compiler::compile(&snap, &config, "kube-system"), "step {step}");
        assert_converged(&d, &model);
    }
    assert!(patched >= 10, "the patch path ran {patched} times, the whole path {whole}");
    assert!(with_endpoints >= 10, "the patch path ran {with_endpoints} times with EndpointSlices following the pods");
    assert!(multi_tenant >= 5, "{multi_tenant} steps patched several tenants at once");
}

/// One PATCH carries several tenants' lists; when the device refuses one of them (AS3 answers 207 and deploys the
/// others), the pass fails with that tenant's error, and the next apply reads the device again and converges.
#[test]
fn a_tenant_refused_in_a_multi_tenant_patch_fails_the_pass_and_the_next_apply_repairs() {
    let (d, mut b, config, mut snap, mut model) = synthetic_world();
    // One pod of each of two tenants moves: a pod whose address a source list of its tenant holds.
    let mut changes = Vec::new();
    for tenant in ["tenant-a", "tenant-b"] {
        let listed: Vec<String> = d.with(|s| {
            s.tenants[tenant]["Shared"]
                .as_object()
                .unwrap()
                .values()
                .filter(|o| o["class"] == "Firewall_Address_List")
                .flat_map(|o| o["addresses"].as_array().cloned().unwrap_or_default())
                .filter_map(|a| a.as_str().and_then(|a| a.split('%').next()).map(str::to_string))
                .collect()
        });
        let p = snap
            .pods
            .iter()
            .find(|p| {
                config.tenant_of(&p.namespace) == tenant
                    && !p.host_network
                    && p.ips.first().is_some_and(|ip| listed.contains(&ip.to_string()))
            })
            .unwrap()
            .clone();
        let mut q = p.clone();
        let std::net::IpAddr::V4(a) = q.ips[0] else { panic!("IPv4") };
        let o = a.octets();
        q.ips = vec![std::net::Ipv4Addr::new(o[0], o[1], o[2], 250).into()];
        changes.push(ces_snapshot::PodChange { before: Some(p), after: Some(q) });
    }
    let churn = ces_snapshot::Churn { pods: changes, endpoints: Vec::new() };
    snap.apply_churn(&churn).unwrap();
    let delta = ces_compiler::recompile_churn(&mut model, &snap, &config, &churn).expect("plain churn is patched");
    d.with(|s| s.refuse.insert("tenant-b".into(), "the device says no".into()));
    let n = d.with(|s| s.requests.len());
    let err = b.apply_pods(&model, &delta).unwrap_err();
    assert!(err.contains("tenant-b") && err.contains("the device says no"), "{err}");
    let writes: Vec<String> =
        d.with(|s| s.requests[n..].iter().map(|r| format!("{} {}", r.method, r.status)).collect());
    assert_eq!(writes, ["PATCH 207"], "one PATCH for both tenants");
    d.with(|s| s.refuse.clear());
    b.apply(&model, false).unwrap();
    assert_converged(&d, &model);
}

/// Issue 18, item 4: a tenant gone from ces-conf.yaml is deleted from the device, but only one this cluster declared
/// (it carries the cluster's remark); another tool's or another cluster's partition stays, and Common always does.
#[test]
fn a_tenant_gone_from_the_config_is_deleted_only_when_this_cluster_declared_it() {
    let d = double();
    let mut b = backend(&d);
    let model = common::original_model();
    b.apply(&model, true).unwrap();
    assert_converged(&d, &model);
    let p2 = d.with(|s| s.tenants["p2"].clone());
    assert_eq!(p2["remark"], format!("CES cluster {}", model.settings.cluster_name));
    d.with(|s| {
        s.tenants.insert("by-hand".into(), json!({"class": "Tenant", "Shared": {"class": "Application"}}));
        s.tenants.insert(
            "peer".into(),
            json!({"class": "Tenant", "remark": "CES cluster another-cluster", "Shared": {"class": "Application"}}),
        );
    });
    let mut without = model.clone();
    without.tenants.retain(|t| t.name != "p2");
    let (outcomes, _) = b.sync(&without, false);
    assert_eq!(outcomes.get("p2"), Some(&TenantOutcome::Deleted), "{outcomes:?}");
    let left: Vec<String> = d.with(|s| s.tenants.keys().cloned().collect());
    assert_eq!(left, ["Common", "by-hand", "peer", "project3"]);
    let deletes = d.with(|s| s.requests.iter().filter(|r| r.method == "DELETE").count());
    assert_eq!(deletes, 1);
    // Nothing more on the next passes.
    b.apply(&without, false).unwrap();
    b.apply(&without, true).unwrap();
    assert_eq!(d.with(|s| s.requests.iter().filter(|r| r.method == "DELETE").count()), 1);

    // A dry run shows the DELETE of a tenant it declared earlier in its run.
    let dir = std::env::temp_dir().join(format!("ces-dry-delete-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dry = ces_as3::client::DryRun::new(&dir).unwrap();
    let mut b = As3Backend::new(Client::new(Box::new(dry), None), Some(common::schema_dir())).unwrap();
    b.apply(&model, true).unwrap();
    b.apply(&without, false).unwrap();
    let files: Vec<String> =
        std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(files.iter().any(|f| f.contains("DELETE") && f.contains("p2")), "{files:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_device_running_an_older_as3_than_configured_is_refused_clearly_until_it_is_upgraded() {
    let d = double();
    d.with(|s| s.as3_version = "3.28.0".into());
    let mut b = backend(&d);
    let model = common::original_model();
    assert_eq!(model.settings.schema_version, "3.29.0");
    let e = b.apply(&model, false).unwrap_err();
    assert!(e.contains("ces-conf.yaml asks for AS3 schemaVersion 3.29.0, but the BIG-IP runs AS3 3.28.0"), "{e}");
    assert!(d.with(|s| s.requests.iter().all(|r| !r.path.contains("/declare"))), "nothing declared");
    // Every rule is told it is not programmed, and why.
    let told = b.problems.iter().filter(|p| p.reason == "NotProgrammed" && p.message.contains("3.28.0")).count();
    assert!(told >= 3, "{:?}", b.problems);
    // The version is read once, not on every pass; a full pass reads it again and sees the upgrade.
    d.with(|s| s.as3_version = "3.29.0".into());
    assert!(b.apply(&model, false).is_err(), "a pass that is not full keeps the version it read");
    b.apply(&model, true).unwrap();
    let infos = d.with(|s| s.requests.iter().filter(|r| r.path == "/mgmt/shared/appsvcs/info").count());
    assert_eq!(infos, 2);
    assert_eq!(b.device_version.as_deref(), Some("3.29.0"));
    assert!(d.with(|s| s.tenants.contains_key("Common")));
}
