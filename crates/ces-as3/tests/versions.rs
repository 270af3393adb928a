//! One rule never blocks another (docs/as3.md, "One rule never blocks another"): on generated clusters, one rule
//! that the target AS3 version cannot express, in Common or in a route-domain tenant, accepting or refusing, is left
//! out (accepting) or widened (refusing), and every other rule is declared — through the backend to the BIG-IP double,
//! which validates every declaration against F5's schema file of its version.

mod common;

use std::collections::BTreeMap;

use ces_api::{Action, Mode};
use ces_as3::render::{Target, render_for};
use ces_as3::{As3Backend, Facts};
use ces_bigip_double::Double;
use ces_model::{DestinationSet, ObjectRef, PolicyModel, PortMatch, Protocol, Rule};
use jiff::Timestamp;
use serde_json::{Value, json};

fn backend(d: &Double) -> As3Backend {
    common::backend_at(&d.url(), common::schema_dir())
}

/// A generated cluster (overlapping pod networks across route-domain tenants, IPv6, host names) for `version`.
fn world(seed: u64, version: &str) -> PolicyModel {
    let synth = ces_synth::Synth::generate(300, 30, seed);
    let mut config = synth.config();
    config.schema_version = Some(version.into());
    ces_compiler::compile(&synth.snapshot(), &config, "kube-system")
}

/// `model` with one more rule in `tenant` (a cluster rule in Common, else a namespace rule), first of its list so
/// that later accepts follow it, to an ExternalService with an ICMP port; returns the rule's reference.
fn with_icmp_rule(model: &PolicyModel, tenant: &str, action: Action) -> (PolicyModel, ObjectRef) {
    let mut m = model.clone();
    let dest = DestinationSet {
        name: "pinger".into(),
        ports: vec![PortMatch { name: Some("ping".into()), protocol: Protocol::Icmp, ports: vec![], bandwidth: None }],
        ..m.destination_sets.values().next().unwrap().clone()
    };
    m.destination_sets.insert("kube-system/pinger".into(), dest);
    let list: &mut Vec<Rule> = if tenant == "Common" {
        &mut m.cluster_rules
    } else {
        &mut m.tenants.iter_mut().find(|t| t.name == tenant).unwrap().namespace_rules
    };
    let mut rule = list[0].clone();
    (rule.name, rule.action, rule.mode, rule.schedule) = ("icmp-injected".into(), action, Mode::Enforce, None);
    rule.id = format!("{}/icmp-injected", rule.kind.as_str());
    rule.destinations = vec!["kube-system/pinger".into()];
    list.insert(0, rule.clone());
    (m, ObjectRef::new(rule.kind.as_str(), rule.namespace.as_deref(), &rule.name))
}

fn shared(decl: &Value) -> &serde_json::Map<String, Value> {
    decl["Shared"].as_object().unwrap()
}

#[test]
fn one_rule_a_version_cannot_express_never_keeps_the_others_off_the_device() {
    let at = Timestamp::now();
    let mut cases = 0;
    for version in ["3.29.0", "3.56.0"] {
        let facts = Facts::known(version).unwrap();
        let icmp_ok = facts.allows("Firewall_Rule", "protocol", "icmp");
        for seed in [3u64, 8] {
            let base = world(seed, version);
            let rd_tenant = base
                .tenants
                .iter()
                .find(|t| t.name != "Common" && !t.namespace_rules.is_empty())
                .map(|t| t.name.clone())
                .expect("the generator made a route-domain tenant with namespace rules");
            assert!(!base.cluster_rules.is_empty());
            for tenant in ["Common", rd_tenant.as_str()] {
                for action in [Action::Accept, Action::Drop] {
                    cases += 1;
                    let what = format!("AS3 {version}, seed {seed}, tenant {tenant}, {action:?}");
                    let (model, injected) = with_icmp_rule(&base, tenant, action);
                    // What the other rules make, rendered without the rule for the same version.
                    let target = Target { facts: facts.clone(), refused: BTreeMap::new() };
                    let without = render_for(&base, at, &target).declarations();

                    let d = Double::start(common::schema_dir());
                    for t in &model.tenants {
                        let path = format!("/mgmt/tm/net/route-domain/~{}~{}", t.name, t.route_domain.name);
                        d.with(|s| s.objects.insert(path, json!({"id": t.route_domain.id})));
                    }
                    let mut b = backend(&d);
                    b.at = Some(at);
                    let (outcomes, rendered) = b.sync(&model, true);
                    for (t, o) in &outcomes {
                        assert_eq!(*o, ces_as3::backend::TenantOutcome::Posted, "{what}: tenant {t}: {:?}", b.problems);
                    }
                    assert!(b.problems.is_empty(), "{what}: {:?}", b.problems);
                    let device = d.with(|s| s.tenants.clone());
                    // Every other tenant is exactly what it is without the rule.
                    for (t, decl) in &without {
                        if t != tenant {
                            assert_eq!(&device[t], decl, "{what}: tenant {t} changed");
                        }
                    }
                    let on_device = shared(&device[tenant]);
                    let others = shared(&without[tenant]);
                    // Every object of every other rule is declared as it is without the rule (the policies list
                    // one entry more when the rule is declared).
                    for (name, o) in others {
                        if o.get("class").and_then(Value::as_str) != Some("Firewall_Policy") {
                            assert_eq!(on_device.get(name), Some(o), "{what}: /{tenant}/Shared/{name}");
                        }
                    }
                    let notes: Vec<_> =
                        rendered.diagnostics.iter().filter(|x| x.object.as_ref() == Some(&injected)).collect();
                    let lists: Vec<(&String, &Value)> = on_device
                        .iter()
                        .filter(|(n, o)| n.contains("icmp-injected") && o["class"] == "Firewall_Rule_List")
                        .collect();
                    match (icmp_ok, action) {
                        (true, _) => {
                            assert!(notes.is_empty(), "{what}: {notes:?}");
                            assert_eq!(lists.len(), 1, "{what}");
                            assert_eq!(lists[0].1["rules"][0]["protocol"], "icmp", "{what}");
                        }
                        (false, Action::Accept) => {
                            assert_eq!(on_device.len(), others.len(), "{what}: nothing of the rule is declared");
                            assert!(lists.is_empty(), "{what}");
                            assert_eq!(notes.len(), 1, "{what}: {notes:?}");
                            assert_eq!(notes[0].reason, "NotSupported");
                            let m = &notes[0].message;
                            assert!(m.contains("Firewall_Rule.protocol `icmp`") && m.contains("AS3 3.29.0"), "{m}");
                            assert!(m.contains("left out"), "{m}");
                        }
                        (false, _) => {
                            // Refusing: declared for every protocol to the same destination, first in its policy.
                            assert_eq!(lists.len(), 1, "{what}");
                            let fw = &lists[0].1["rules"][0];
                            assert_eq!((&fw["protocol"], &fw["action"]), (&json!("any"), &json!("drop")), "{what}");
                            assert!(fw["destination"].get("portLists").is_none(), "{what}");
                            assert!(fw["destination"]["addressLists"].is_array(), "{what}: not widened to everywhere");
                            let first = on_device
                                .values()
                                .filter(|o| o["class"] == "Firewall_Policy")
                                .filter_map(|o| o["rules"][0]["use"].as_str())
                                .any(|u| u.ends_with(lists[0].0.as_str()));
                            assert!(first, "{what}: the widened rule keeps its place before the accepts");
                            assert_eq!(notes.len(), 1, "{what}: {notes:?}");
                            assert!(notes[0].message.contains("refuses more, not less"), "{}", notes[0].message);
                        }
                    }
                }
            }
        }
    }
    assert_eq!(cases, 16);
}

#[test]
fn an_icmp_nat_rule_is_left_out_under_every_version_and_the_rest_of_the_nat_policy_is_declared() {
    let r = common::repo();
    let conf = std::fs::read_to_string(r.join("examples/original/ces-conf.yaml")).unwrap()
        + "externalIPAddresses: [10.5.0.20]\n";
    let endpoints = "apiVersion: v1\nkind: Endpoints\nmetadata: {name: busybox-svc, namespace: default}\nsubsets: [{addresses: [{ip: 10.16.0.21}]}]\n";
    let texts = [
        std::fs::read_to_string(r.join("examples/original/examples-0.6.2.yaml")).unwrap(),
        std::fs::read_to_string(r.join("examples/original-cluster.yaml")).unwrap(),
        endpoints.to_string(),
    ];
    for version in ["3.29.0", "3.56.0"] {
        let conf = conf.replace("3.29.0", version);
        let mut model = common::compile(&texts.join("\n---\n"), &conf);
        let p2 = model.tenants.iter_mut().find(|t| t.name == "p2").unwrap();
        assert!(!p2.nat_rules.is_empty());
        p2.nat_rules[0].destination_protocol = Some(Protocol::Icmp);
        let nat = ObjectRef::new("ExternalIPRule", Some(&p2.nat_rules[0].namespace), &p2.nat_rules[0].name);
        let out = ces_as3::render(&model, Timestamp::now());
        let doc = &out.documents["p2"];
        common::schema(version).validate(doc).unwrap();
        let policy = &doc["declaration"]["p2"]["Shared"]["k8s_snat_policy"]["rules"];
        let names: Vec<&str> = policy.as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["k8s_snat_automap"], "AS3 {version}: the ICMP rule is out, the default translation in");
        let note = out.diagnostics.iter().find(|x| x.object.as_ref() == Some(&nat)).unwrap();
        assert!(note.message.contains("NAT_Rule.protocol `icmp`"), "{note}");
    }
}
