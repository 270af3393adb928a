//! `ces-impact`: changes found and grouped right — tenants with overlapping pod networks, schedules, audit rules,
//! host names — and no change when the proposed policy is the current one.

use ces_eval::Evaluator;
use ces_flow::record::{FlowRecord, RuleRef, Verdict};
use ces_impact::{FailOn, Impact, Side, Subject};
use ces_model::{Destination, PolicyModel, Protocol};

const CONFIG: &str = r#"
clusterName: k8s
isSupportRouteDomain: true
tenant:
  - name: Common
  - {name: alpha, namespaces: [a1], routeDomain: {id: 11, name: rd11}}
  - {name: beta, namespaces: [b1], routeDomain: {id: 12, name: rd12}}
"#;

/// Both tenants have a pod at 10.10.0.5; each may reach its own web service.
const BASE: &str = r#"
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
metadata: {name: pa, namespace: a1}
status: {phase: Running, podIPs: [{ip: 10.10.0.5}]}
---
apiVersion: v1
kind: Pod
metadata: {name: pb, namespace: b1}
status: {phase: Running, podIPs: [{ip: 10.10.0.5}]}
---
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {name: web, namespace: a1}
spec: {addresses: [198.51.100.0/24, api.example.com], ports: [{protocol: tcp, port: "443"}]}
---
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {name: web, namespace: b1}
spec: {addresses: [198.51.100.0/24], ports: [{protocol: tcp, port: "443"}]}
---
apiVersion: kubeovn.io/v1alpha1
kind: NamespaceEgressRule
metadata: {name: web, namespace: b1}
spec: {action: accept-decisively, externalServices: [web]}
"#;

fn model(extra: &str) -> PolicyModel {
    let snap = ces_snapshot::manifests::load_str(&format!("{BASE}\n---\n{extra}"), "policy.yaml");
    let config = ces_config::CesConfig::from_yaml(CONFIG, "ces-conf.yaml").unwrap();
    let m = ces_compiler::compile(&snap, &config, "kube-system");
    assert_eq!(m.errors().count(), 0, "{:?}", m.diagnostics);
    m
}

const ALLOW_A: &str = "apiVersion: kubeovn.io/v1alpha1\nkind: NamespaceEgressRule\nmetadata: {name: web, namespace: a1}\nspec: {action: accept-decisively, externalServices: [web]}\n";

fn subject(tenant: &str, ns: &str, pod: &str, dst: Destination, at: &str) -> Subject {
    Subject {
        tenant: tenant.into(),
        source: "10.10.0.5".parse().unwrap(),
        namespace: Some(ns.into()),
        pod: Some(pod.into()),
        destination: dst,
        protocol: Protocol::Tcp,
        port: Some(443),
        at: at.parse().unwrap(),
    }
}

fn ip(s: &str) -> Destination {
    Destination::Ip(s.parse().unwrap())
}

/// Many flows of both tenants to a few destinations at a few times.
fn flows() -> Vec<Subject> {
    let mut v = Vec::new();
    for (i, at) in ["2026-12-07T03:00:00Z", "2026-12-07T12:00:00Z", "2026-12-07T12:00:30Z"].iter().enumerate() {
        for d in 1..=5 {
            v.push(subject("alpha", "a1", "pa", ip(&format!("198.51.100.{d}")), at));
            v.push(subject("beta", "b1", "pb", ip(&format!("198.51.100.{d}")), at));
        }
        v.push(subject("alpha", "a1", "pa", ip("203.0.113.9"), at));
        v.push(subject(
            "alpha",
            "a1",
            "pa",
            Destination::Resolved { host: "api.example.com".into(), ip: format!("192.0.2.{i}").parse().unwrap() },
            at,
        ));
    }
    v
}

/// What one run of the impact found.
struct Found {
    flows: u64,
    changed: u64,
    failing: u64,
    undecided: u64,
    groups: Vec<ces_impact::Group>,
}

fn run(current: &PolicyModel, proposed: &PolicyModel, fail_on: &str) -> (Found, Vec<ces_impact::Change>) {
    let (ce, pe) = (Evaluator::new(current), Evaluator::new(proposed));
    let mut i = Impact::new(Some(&ce), &pe, FailOn::parse(fail_on).unwrap());
    let changes = flows().iter().filter_map(|s| i.add(s, None)).collect();
    let found =
        Found { flows: i.flows, changed: i.changed, failing: i.failing, undecided: i.undecided, groups: i.groups() };
    (found, changes)
}

#[test]
fn the_same_policy_changes_nothing() {
    let m = model(ALLOW_A);
    let (i, changes) = run(&m, &m, "");
    assert_eq!((i.flows, i.changed, i.failing, i.undecided), (flows().len() as u64, 0, 0, 0));
    assert!(changes.is_empty() && i.groups.is_empty());
}

#[test]
fn a_tenants_change_never_shows_on_the_other_tenant_sharing_its_addresses() {
    // alpha loses its rule: its flows to 198.51.100.0/24 fall to its default (accept in Common's default? the
    // tenant's default); beta's flows from the same address are untouched.
    let (i, changes) = run(&model(ALLOW_A), &model(""), "");
    assert!(i.changed > 0);
    for c in &changes {
        assert_eq!(c.flow.tenant, "alpha", "{c:?}");
        assert_eq!(c.before.rule.as_deref(), Some("NamespaceEgressRule/a1/web"));
        assert_eq!(c.after.rule.as_deref(), Some("Tenant/alpha"));
    }
    // 5 network destinations and the host name, at three times: 18 flows, grouped by destination.
    assert_eq!(i.changed, 18);
    let groups = &i.groups;
    assert_eq!(groups.len(), 8, "{groups:#?}");
    assert!(groups.iter().all(|g| g.tenant == "alpha" && g.namespace == "a1"));
    let g = groups.iter().find(|g| g.destination == "198.51.100.3").unwrap();
    assert_eq!((g.flows, g.example.source.pod.as_deref()), (3, Some("pa")));
}

#[test]
fn a_schedule_changes_only_the_flows_outside_its_window() {
    let scheduled = ALLOW_A.replace(
        "spec: {action: accept-decisively, externalServices: [web]}",
        "spec: {action: accept-decisively, externalServices: [web], schedule: {windows: [{start: \"09:00\", end: \"17:00\"}]}}",
    );
    let (i, changes) = run(&model(ALLOW_A), &model(&scheduled), "");
    assert!(i.changed > 0);
    for c in &changes {
        assert!(c.flow.at.to_string().starts_with("2026-12-07T03:00"), "only the night flows change: {c:?}");
    }
    assert_eq!(i.changed, 6, "five addresses and the host name at 03:00");
}

#[test]
fn an_audit_rule_never_decides_so_making_a_rule_audit_changes_its_flows() {
    let deny = "apiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {name: bad, namespace: kube-system}\nspec: {addresses: [203.0.113.9]}\n---\napiVersion: kubeovn.io/v1alpha1\nkind: ClusterEgressRule\nmetadata: {name: bad}\nspec: {action: reject, priority: 1, externalServices: [bad]}\n";
    let audited = deny.replace("action: reject,", "action: reject, mode: audit,");
    let current = model(&format!("{ALLOW_A}---\n{deny}"));
    let proposed = model(&format!("{ALLOW_A}---\n{audited}"));
    // Audited, the rule no longer decides: the flows fall to alpha's default (drop).
    let (i, changes) = run(&current, &proposed, "reject->drop");
    assert_eq!(i.changed, 3, "the three flows to 203.0.113.9: {changes:#?}");
    assert_eq!(i.failing, 3);
    assert!(changes.iter().all(|c| c.before.verdict == "reject"
        && c.before.rule.as_deref() == Some("ClusterEgressRule/bad")
        && c.after.rule.as_deref() == Some("Tenant/alpha")));
    // The same changes do not count for a gate on newly accepted traffic.
    let (i, _) = run(&current, &proposed, "deny->accept");
    assert_eq!((i.changed, i.failing), (3, 0));
}

#[test]
fn a_rule_on_a_host_name_changes_the_flows_resolved_from_it_whatever_their_address() {
    let deny = "apiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {name: api, namespace: kube-system}\nspec: {addresses: [api.example.com]}\n---\napiVersion: kubeovn.io/v1alpha1\nkind: ClusterEgressRule\nmetadata: {name: no-api}\nspec: {action: drop, priority: 1, externalServices: [api]}\n";
    let (i, changes) = run(&model(ALLOW_A), &model(&format!("{ALLOW_A}---\n{deny}")), "accept->deny");
    assert_eq!((i.changed, i.failing), (3, 3), "{changes:#?}");
    assert!(changes.iter().all(|c| c.flow.destination.starts_with("api.example.com")));
}

#[test]
fn recorded_decisions_are_the_current_policy_when_none_is_given() {
    let m = model(ALLOW_A);
    let e = Evaluator::new(&m);
    // Records as the gateway writes them, with the decision the evaluator gives (what the data plane enforced).
    let mut records = Vec::new();
    for s in flows() {
        let d = e
            .decide(&ces_eval::Flow {
                source: s.source,
                tenant: s.tenant.clone(),
                destination: s.destination.clone(),
                protocol: s.protocol,
                port: s.port,
                at: s.at,
            })
            .unwrap();
        let mut r = FlowRecord::packet(s.at, &s.tenant, Verdict::parse(d.verdict.as_str()).unwrap());
        r.source.ip = Some(s.source);
        match &s.destination {
            Destination::Ip(a) => r.destination.ip = Some(*a),
            Destination::Resolved { host, ip } => {
                r.destination.ip = Some(*ip);
                r.destination.host = Some(host.clone());
            }
            Destination::Host(_) => unreachable!(),
        }
        r.destination.port = s.port;
        r.protocol = "tcp".into();
        r.rule = Some(RuleRef { rule: d.decided_by.rule.clone(), context: String::new(), mode: "enforce".into() });
        records.push(r);
    }
    let mut same = Impact::new(None, &e, FailOn::default());
    for r in &records {
        let (s, side) = Subject::from_record(r).unwrap();
        assert!(same.add(&s, Some(&side)).is_none(), "{r:?}");
    }
    assert_eq!((same.changed, same.undecided), (0, 0));
    // Under a policy without alpha's rule, alpha's accepted records change.
    let none = model("");
    let pe = Evaluator::new(&none);
    let mut i = Impact::new(None, &pe, FailOn::default());
    for r in &records {
        let (s, side) = Subject::from_record(r).unwrap();
        i.add(&s, Some(&side));
    }
    assert_eq!(i.changed, 18);
    // A record whose rule is not known compares its verdict only.
    let mut r = records[0].clone();
    r.rule = None;
    let (s, side) = Subject::from_record(&r).unwrap();
    assert_eq!(side, Side { verdict: "accept".into(), rule: None });
    let mut same = Impact::new(None, &e, FailOn::default());
    assert!(same.add(&s, Some(&side)).is_none());
}

#[test]
fn fail_on_reads_and_counts() {
    let s = |v: &str, r: &str| Side { verdict: v.into(), rule: Some(r.into()) };
    let f = FailOn::parse("accept->deny").unwrap();
    assert!(f.counts(&s("accept", "a"), &s("drop", "b")));
    assert!(f.counts(&s("accept", "a"), &s("reject", "b")));
    assert!(!f.counts(&s("drop", "a"), &s("accept", "b")));
    assert!(!f.counts(&s("accept", "a"), &s("accept", "b")), "a rule change alone counts only with `rule`");
    assert!(FailOn::parse("rule").unwrap().counts(&s("accept", "a"), &s("accept", "b")));
    assert!(FailOn::default().counts(&s("accept", "a"), &s("accept", "b")));
    assert!(FailOn::parse("any->any").unwrap().counts(&s("drop", "a"), &s("reject", "a")));
    for bad in ["accept", "allow->drop", "accept->"] {
        assert!(FailOn::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn flows_of_another_family_or_tenant_are_undecided_and_said() {
    let m = model(ALLOW_A);
    let e = Evaluator::new(&m);
    let mut i = Impact::new(Some(&e), &e, FailOn::default());
    let mut s = subject("gamma", "g", "x", ip("198.51.100.1"), "2026-12-07T03:00:00Z");
    assert!(i.add(&s, None).is_none());
    s.tenant = "alpha".into();
    s.destination = ip("2001:db8::1");
    assert!(i.add(&s, None).is_none());
    assert_eq!(i.undecided, 2);
    assert!(i.reasons[0].contains("gamma"), "{:?}", i.reasons);
}

/// Flows decided on several threads and merged, quietly, group and count as one run that lists every change.
#[test]
fn quiet_runs_merged_equal_one_run() {
    let (current, proposed) = (model(ALLOW_A), model(""));
    let (one, changes) = run(&current, &proposed, "accept->any");
    let (ce, pe) = (Evaluator::new(&current), Evaluator::new(&proposed));
    let all = flows();
    let mut merged = Impact::new(Some(&ce), &pe, FailOn::parse("accept->any").unwrap()).quiet();
    for part in all.chunks(5) {
        let mut i = Impact::new(Some(&ce), &pe, FailOn::parse("accept->any").unwrap()).quiet();
        assert!(part.iter().all(|s| i.add(s, None).is_none()), "quiet lists no change");
        merged.merge(i);
    }
    assert!(!changes.is_empty());
    assert_eq!(
        (merged.flows, merged.changed, merged.failing, merged.undecided),
        (one.flows, one.changed, one.failing, one.undecided)
    );
    assert_eq!(format!("{:?}", merged.groups()), format!("{:?}", one.groups));
}
