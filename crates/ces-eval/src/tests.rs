//! One test per clause of the semantics (docs/semantics.md), then the original examples, then properties.

use super::*;
use ces_compiler::{DEFAULT_CES_NAMESPACE, compile};
use ces_config::CesConfig;
use ces_snapshot::manifests::load_str;
use proptest::prelude::*;

const NOON: &str = "2026-11-26T12:00:00Z";

/// Two tenants: `Common` (namespaces a, b and everything unlisted) and `t2` (namespace c, route domain 2).
const CONF: &str = "
clusterName: k8s
isSupportRouteDomain: true
tenant:
  - name: Common
    namespaces: a,b
  - name: t2
    namespaces: c
    routeDomain: {id: 2, name: rd2}
";

const CLUSTER: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {team: red}, annotations: {ovn.kubernetes.io/cidr: 10.1.0.0/16}}
---
apiVersion: v1
kind: Namespace
metadata: {name: b, labels: {team: blue}}
---
apiVersion: v1
kind: Namespace
metadata: {name: c, labels: {team: red}, annotations: {ovn.kubernetes.io/cidr: 10.3.0.0/16}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: a, labels: {app: web}}
status: {phase: Running, podIPs: [{ip: 10.1.0.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: a, labels: {app: db}}
status: {phase: Running, podIPs: [{ip: 10.1.0.20}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: b, labels: {app: api}}
status: {phase: Running, podIPs: [{ip: 10.2.0.10}]}
---
apiVersion: v1
kind: Pod
metadata: {name: job, namespace: c, labels: {app: job}}
status: {phase: Running, podIPs: [{ip: 10.3.0.10}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: b}
spec: {selector: {app: api}}
---
apiVersion: v1
kind: Service
metadata: {name: job, namespace: c}
spec: {selector: {app: job}}
";

struct World {
    model: PolicyModel,
}

impl World {
    fn new(rules: &str) -> World {
        World::with_conf(rules, CONF)
    }

    fn with_conf(rules: &str, conf: &str) -> World {
        let snap = load_str(&format!("{CLUSTER}\n---\n{rules}"), "t.yaml");
        let config = CesConfig::from_yaml(conf, "c").unwrap();
        let model = compile(&snap, &config, DEFAULT_CES_NAMESPACE);
        assert!(model.diagnostics.is_empty(), "{:#?}", model.diagnostics);
        World { model }
    }

    /// Decides a flow whose tenant is found from its source address, as `simulate --from IP` does.
    fn decide_at(&self, from: &str, to: &str, at: &str) -> Decision {
        let tenant = Evaluator::new(&self.model).tenant_of(from.parse().unwrap()).unwrap().to_string();
        self.decide_in(&tenant, from, to, at)
    }

    /// Decides a flow entering the data plane in `tenant`.
    fn decide_in(&self, tenant: &str, from: &str, to: &str, at: &str) -> Decision {
        let (destination, protocol, port) = parse_target(to).unwrap();
        let flow = Flow {
            source: from.parse().unwrap(),
            tenant: tenant.into(),
            destination,
            protocol,
            port,
            at: at.parse().unwrap(),
        };
        let ev = Evaluator::new(&self.model);
        let d = ev.decide(&flow).unwrap();
        assert_eq!(d, ev.decide_by_scan(&flow).unwrap(), "index and scan disagree");
        d
    }

    fn says_in(&self, tenant: &str, from: &str, to: &str) -> String {
        let d = self.decide_in(tenant, from, to, NOON);
        format!("{} by {}", d.verdict.as_str(), d.decided_by.rule)
    }

    fn decide(&self, from: &str, to: &str) -> Decision {
        self.decide_at(from, to, NOON)
    }

    /// `verdict by rule` for short assertions.
    fn says(&self, from: &str, to: &str) -> String {
        let d = self.decide(from, to);
        format!("{} by {}", d.verdict.as_str(), d.decided_by.rule)
    }
}

fn es(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}
fn cgr(name: &str, spec: &str) -> String {
    format!("---\napiVersion: kubeovn.io/v1alpha1\nkind: ClusterEgressRule\nmetadata: {{name: {name}}}\nspec: {spec}\n")
}
fn nsgr(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: kubeovn.io/v1alpha1\nkind: NamespaceEgressRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}
fn svcgr(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: kubeovn.io/v1alpha1\nkind: ServiceEgressRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

/// ExternalService `x` (1.1.1.1, tcp 443) in every namespace, including kube-system for cluster rules.
fn x_everywhere() -> String {
    ["kube-system", "a", "b", "c"]
        .iter()
        .map(|ns| es(ns, "x", "{addresses: [1.1.1.1], ports: [{protocol: tcp, port: '443'}]}"))
        .collect()
}

// ---- tenants ----

#[test]
fn an_address_is_in_the_one_tenant_whose_pods_subnets_or_endpoints_hold_it() {
    let w = World::new(&x_everywhere());
    let ev = Evaluator::new(&w.model);
    let t = |ip: &str| ev.tenant_of(ip.parse().unwrap()).map(str::to_string);
    assert_eq!(t("10.3.0.10").unwrap(), "t2", "a pod of namespace c");
    assert_eq!(t("10.1.0.10").unwrap(), "Common");
    assert_eq!(t("192.0.2.1").unwrap(), "Common", "no tenant holds it");
    // An address in namespace c's own subnet is no pod, but it enters in c's tenant (issue 2 put it in Common).
    assert_eq!(t("10.3.99.99").unwrap(), "t2");
    assert_eq!(w.decide("10.3.99.99", "1.1.1.1:443/tcp").tenant, "t2");
}

#[test]
fn a_flow_carries_its_tenant_which_must_exist() {
    let w = World::new(&x_everywhere());
    let (destination, protocol, port) = parse_target("1.1.1.1:443/tcp").unwrap();
    let mut flow = Flow {
        source: "192.0.2.1".parse().unwrap(),
        tenant: "t2".into(),
        destination,
        protocol,
        port,
        at: NOON.parse().unwrap(),
    };
    assert_eq!(Evaluator::new(&w.model).decide(&flow).unwrap().tenant, "t2");
    flow.tenant = "nope".into();
    assert_eq!(Evaluator::new(&w.model).decide(&flow).unwrap_err(), EvalError::UnknownTenant("nope".into()));
}

#[test]
fn an_ipv4_source_never_reaches_an_ipv6_destination() {
    let w = World::new(&x_everywhere());
    let (destination, protocol, port) = parse_target("[2001:db8::1]:443/tcp").unwrap();
    let flow = Flow {
        source: "10.1.0.10".parse().unwrap(),
        tenant: "Common".into(),
        destination,
        protocol,
        port,
        at: NOON.parse().unwrap(),
    };
    let e = Evaluator::new(&w.model).decide(&flow).unwrap_err();
    assert!(matches!(e, EvalError::FamilyMismatch(..)), "{e:?}");
    assert!(e.to_string().contains("is IPv4 but destination 2001:db8::1 is IPv6"), "{e}");
}

/// Two tenants whose pod networks overlap: pod nx/p and pod ny/q both have 10.9.0.5 (and 2001:db8::5).
const OVERLAP_CONF: &str = "
clusterName: k8s
isSupportRouteDomain: true
tenant:
  - name: Common
  - name: t1
    namespaces: nx
    routeDomain: {id: 11, name: rd11}
  - name: t2
    namespaces: ny
    routeDomain: {id: 12, name: rd12}
";

fn overlap_world(rules: &str) -> World {
    let cluster = "
apiVersion: v1
kind: Namespace
metadata: {name: nx, labels: {pci: 'yes'}}
---
apiVersion: v1
kind: Namespace
metadata: {name: ny}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: nx}
status: {phase: Running, podIPs: [{ip: 10.9.0.5}, {ip: '2001:db8::5'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: q, namespace: ny}
status: {phase: Running, podIPs: [{ip: 10.9.0.5}, {ip: '2001:db8::5'}]}
";
    let snap = load_str(&format!("{cluster}\n---\n{rules}"), "t.yaml");
    let config = CesConfig::from_yaml(OVERLAP_CONF, "c").unwrap();
    let model = compile(&snap, &config, DEFAULT_CES_NAMESPACE);
    assert!(model.errors().next().is_none(), "{:#?}", model.diagnostics);
    World { model }
}

#[test]
fn a_namespace_selector_never_reaches_a_pod_of_another_tenant_with_the_same_ip() {
    // Issue 2: the cluster rule selecting nx's pods also rejected ny's pod, which has the same address in another
    // route domain.
    let rules = es("kube-system", "x", "{addresses: [1.1.1.1, '2001:db8:ff::1']}")
        + &cgr("pci", "{action: reject, externalServices: [x], namespaceSelector: {matchLabels: {pci: 'yes'}}}");
    let w = overlap_world(&rules);
    for (src, dst) in [("10.9.0.5", "1.1.1.1:443/tcp"), ("2001:db8::5", "[2001:db8:ff::1]:443/tcp")] {
        assert_eq!(w.says_in("t1", src, dst), "reject by ClusterEgressRule/pci");
        assert_eq!(w.says_in("t2", src, dst), "drop by Tenant/t2", "{src} in t2 is pod ny/q, not nx/p");
    }
    // Without a tenant, the address is ambiguous: the evaluator names both tenants rather than guess.
    let e = Evaluator::new(&w.model).tenant_of("10.9.0.5".parse().unwrap()).unwrap_err();
    assert_eq!(e, EvalError::AmbiguousSource("10.9.0.5".parse().unwrap(), vec!["t1".into(), "t2".into()]));
    assert!(e.to_string().contains("--tenant"), "{e}");
}

#[test]
fn a_cluster_rule_without_selector_matches_every_tenant() {
    let rules = es("kube-system", "x", "{addresses: [1.1.1.1]}") + &cgr("all", "{action: drop, externalServices: [x]}");
    let w = overlap_world(&rules);
    for t in ["t1", "t2", "Common"] {
        assert_eq!(w.says_in(t, "10.9.0.5", "1.1.1.1:443/tcp"), "drop by ClusterEgressRule/all");
    }
}

#[test]
fn a_non_pod_endpoint_is_in_its_services_tenant() {
    // A VM behind a selector-less Service of namespace ny: its address is no pod's, so it enters in ny's tenant and
    // ny's service rule decides it. Issue 2 put it in Common, where the rule never applied.
    let rules = es("ny", "x", "{addresses: [1.1.1.1]}")
        + "---\napiVersion: v1\nkind: Service\nmetadata: {name: vm, namespace: ny}\n"
        + "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: vm, namespace: ny}\nsubsets: [{addresses: [{ip: 172.20.0.9}]}]\n"
        + &svcgr("ny", "vm", "{action: accept, service: vm, externalServices: [x]}");
    let w = overlap_world(&rules);
    assert_eq!(w.decide("172.20.0.9", "1.1.1.1:443/tcp").tenant, "t2");
    assert_eq!(w.says("172.20.0.9", "1.1.1.1:443/tcp"), "accept by ServiceEgressRule/ny/vm");
    assert_eq!(w.says_in("t1", "172.20.0.9", "1.1.1.1:443/tcp"), "drop by Tenant/t1");
}

// ---- contexts and actions ----

#[test]
fn no_rule_means_the_default_action_drop() {
    let w = World::new(&x_everywhere());
    let d = w.decide("10.1.0.10", "1.1.1.1:443/tcp");
    assert_eq!(d.verdict, Verdict::Drop);
    assert_eq!(d.decided_by.context, Context::Default);
    assert_eq!(d.decided_by.rule, "Tenant/Common");
    assert!(d.trail.is_empty());
}

#[test]
fn default_action_is_per_tenant() {
    let conf = format!("{CONF}    defaultAction: reject\n");
    let w = World::with_conf(&x_everywhere(), &conf);
    assert_eq!(w.says("10.3.0.10", "1.1.1.1:443/tcp"), "reject by Tenant/t2");
    assert_eq!(w.says("10.1.0.10", "1.1.1.1:443/tcp"), "drop by Tenant/Common");
}

#[test]
fn cluster_accept_alone_does_not_let_traffic_out() {
    let w = World::new(&(x_everywhere() + &cgr("allow", "{action: accept, externalServices: [x]}")));
    let d = w.decide("10.1.0.10", "1.1.1.1:443/tcp");
    assert_eq!((d.verdict, d.decided_by.context), (Verdict::Drop, Context::Default));
    assert_eq!(d.trail[0].effect, Effect::NextContext);
    assert_eq!(d.trail[0].rule, "ClusterEgressRule/allow");
}

#[test]
fn accept_decisively_skips_the_later_contexts() {
    let rules = x_everywhere()
        + &cgr("allow", "{action: accept-decisively, externalServices: [x]}")
        + &nsgr("a", "deny", "{action: drop, externalServices: [x]}");
    let w = World::new(&rules);
    let d = w.decide("10.1.0.10", "1.1.1.1:443/tcp");
    assert_eq!((d.verdict, d.decided_by.rule.as_str()), (Verdict::Accept, "ClusterEgressRule/allow"));
    assert_eq!(d.trail.len(), 1, "the namespace rule is never reached");
}

#[test]
fn accept_in_each_context_then_service_accept_lets_it_out() {
    let rules = x_everywhere()
        + &cgr("c", "{action: accept, externalServices: [x]}")
        + &nsgr("b", "nsr", "{action: accept, externalServices: [x]}")
        + &svcgr("b", "s", "{action: accept, service: api, externalServices: [x]}");
    let w = World::new(&rules);
    let d = w.decide("10.2.0.10", "1.1.1.1:443/tcp");
    assert_eq!((d.verdict, d.decided_by.context), (Verdict::Accept, Context::Service));
    let effects: Vec<(Context, Effect)> = d.trail.iter().map(|t| (t.context, t.effect)).collect();
    assert_eq!(
        effects,
        [
            (Context::Cluster, Effect::NextContext),
            (Context::Namespace, Effect::NextContext),
            (Context::Service, Effect::Decided)
        ]
    );
}

#[test]
fn drop_and_reject_decide_at_once() {
    let rules = x_everywhere()
        + &cgr("deny", "{action: reject, externalServices: [x]}")
        + &svcgr("b", "s", "{action: accept, service: api, externalServices: [x]}");
    let w = World::new(&rules);
    assert_eq!(w.says("10.2.0.10", "1.1.1.1:443/tcp"), "reject by ClusterEgressRule/deny");
    let rules = x_everywhere()
        + &nsgr("b", "nsr", "{action: drop, externalServices: [x]}")
        + &svcgr("b", "s", "{action: accept, service: api, externalServices: [x]}");
    assert_eq!(World::new(&rules).says("10.2.0.10", "1.1.1.1:443/tcp"), "drop by NamespaceEgressRule/b/nsr");
}

#[test]
fn the_namespace_context_is_the_source_tenants() {
    // Namespace c is in tenant t2; a rule there never sees Common's traffic and vice versa.
    let rules = x_everywhere() + &nsgr("c", "deny", "{action: reject, externalServices: [x]}");
    let w = World::new(&rules);
    assert_eq!(w.says("10.3.0.10", "1.1.1.1:443/tcp"), "reject by NamespaceEgressRule/c/deny");
    assert_eq!(w.says("10.1.0.10", "1.1.1.1:443/tcp"), "drop by Tenant/Common");
}

#[test]
fn a_namespace_rule_matches_only_its_own_namespace_pods_and_cidr() {
    let rules = x_everywhere() + &nsgr("a", "deny", "{action: reject, externalServices: [x]}");
    let w = World::new(&rules);
    assert_eq!(w.says("10.1.0.10", "1.1.1.1:443/tcp"), "reject by NamespaceEgressRule/a/deny");
    assert_eq!(w.says("10.2.0.10", "1.1.1.1:443/tcp"), "drop by Tenant/Common", "same tenant, other namespace");
    // 10.1.99.99 is no pod but lies in a's kube-ovn CIDR; it is in Common, as a is.
    assert_eq!(w.says("10.1.99.99", "1.1.1.1:443/tcp"), "reject by NamespaceEgressRule/a/deny");
}

#[test]
fn pod_selector_narrows_a_namespace_rule() {
    let rules = x_everywhere()
        + &nsgr("a", "web", "{action: reject, externalServices: [x], podSelector: {matchLabels: {app: web}}}");
    let w = World::new(&rules);
    assert_eq!(w.says("10.1.0.10", "1.1.1.1:443/tcp"), "reject by NamespaceEgressRule/a/web");
    assert_eq!(w.says("10.1.0.20", "1.1.1.1:443/tcp"), "drop by Tenant/Common");
    assert_eq!(w.says("10.1.99.99", "1.1.1.1:443/tcp"), "drop by Tenant/Common", "the CIDR is not a selected pod");
}

#[test]
fn namespace_selector_narrows_a_cluster_rule() {
    let rules = x_everywhere()
        + &cgr("red", "{action: reject, externalServices: [x], namespaceSelector: {matchLabels: {team: red}}}");
    let w = World::new(&rules);
    assert_eq!(w.says("10.1.0.10", "1.1.1.1:443/tcp"), "reject by ClusterEgressRule/red");
    assert_eq!(w.says("10.3.0.10", "1.1.1.1:443/tcp"), "reject by ClusterEgressRule/red", "across tenants");
    assert_eq!(w.says("10.2.0.10", "1.1.1.1:443/tcp"), "drop by Tenant/Common");
    assert_eq!(w.says("192.0.2.1", "1.1.1.1:443/tcp"), "drop by Tenant/Common");
    // Namespace a (team red) has the kube-ovn CIDR 10.1.0.0/16, but the selector picks pods, not subnets.
    assert_eq!(w.says("10.1.99.99", "1.1.1.1:443/tcp"), "drop by Tenant/Common");
}

#[test]
fn a_service_rule_matches_only_endpoints_of_its_service() {
    let rules = x_everywhere() + &svcgr("b", "s", "{action: accept, service: api, externalServices: [x]}");
    let w = World::new(&rules);
    assert_eq!(w.says("10.2.0.10", "1.1.1.1:443/tcp"), "accept by ServiceEgressRule/b/s");
    assert_eq!(w.says("10.1.0.10", "1.1.1.1:443/tcp"), "drop by Tenant/Common");
}

#[test]
fn the_service_context_is_the_flow_tenants() {
    // Service c/job (tenant t2) lists 10.2.0.10, which is pod b/api in Common but no pod in t2. Entering in t2 it
    // is an endpoint of c/job; entering in Common it is b's pod, and t2's rule is never consulted.
    let rules = x_everywhere()
        + "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: job, namespace: c}\nsubsets: [{addresses: [{ip: 10.3.0.10}, {ip: 10.2.0.10}]}]\n"
        + &svcgr("c", "s", "{action: accept, service: job, externalServices: [x]}");
    let w = World::new(&rules);
    assert_eq!(w.says("10.3.0.10", "1.1.1.1:443/tcp"), "accept by ServiceEgressRule/c/s");
    assert_eq!(w.says_in("t2", "10.2.0.10", "1.1.1.1:443/tcp"), "accept by ServiceEgressRule/c/s");
    assert_eq!(w.says_in("Common", "10.2.0.10", "1.1.1.1:443/tcp"), "drop by Tenant/Common");
}

// ---- ordering ----

#[test]
fn inside_a_context_priority_then_namespace_then_name_decides() {
    let rules = x_everywhere()
        + &cgr("b-accept", "{action: accept-decisively, externalServices: [x]}")
        + &cgr("a-drop", "{action: drop, externalServices: [x]}");
    assert_eq!(World::new(&rules).says("10.1.0.10", "1.1.1.1:443/tcp"), "drop by ClusterEgressRule/a-drop", "by name");
    let rules = x_everywhere()
        + &cgr("b-accept", "{action: accept-decisively, externalServices: [x], priority: 999}")
        + &cgr("a-drop", "{action: drop, externalServices: [x]}");
    assert_eq!(
        World::new(&rules).says("10.1.0.10", "1.1.1.1:443/tcp"),
        "accept by ClusterEgressRule/b-accept",
        "by priority"
    );
}

#[test]
fn inside_a_rule_external_services_then_ports_run_in_order() {
    let rules = es(
        "kube-system",
        "first",
        "{addresses: [1.1.1.0/24], ports: [{name: web, protocol: tcp, port: '80,443'}, {name: tls, protocol: tcp, port: '443'}]}",
    ) + &es("kube-system", "second", "{addresses: [1.1.1.1]}")
        + &cgr("r", "{action: drop, externalServices: [second, first]}");
    let w = World::new(&rules);
    let d = w.decide("10.1.0.10", "1.1.1.1:443/tcp");
    assert_eq!(d.decided_by.external_service.as_deref(), Some("kube-system/second"));
    let d = w.decide("10.1.0.10", "1.1.1.2:443/tcp");
    assert_eq!(d.decided_by.external_service.as_deref(), Some("kube-system/first"));
    assert_eq!(d.decided_by.port.as_deref(), Some("web"));
}

// ---- destinations ----

#[test]
fn destinations_ip_cidr_range_host_and_wildcard() {
    let rules = es(
        "kube-system",
        "d",
        "{addresses: [203.0.113.0/28, 198.51.100.10-198.51.100.20, 'api.example.com', '*.corp.example', '2001:db8::/32']}",
    ) + &cgr("r", "{action: reject, externalServices: [d]}");
    let w = World::new(&rules);
    let yes = [
        "203.0.113.15:1/tcp",
        "198.51.100.20:1/udp",
        "API.Example.com.:443/tcp",
        "a.b.corp.example:1/tcp",
        "[2001:db8::1]:53/udp",
        "203.0.113.1/icmp",
    ];
    let no = [
        "203.0.113.16:1/tcp",
        "198.51.100.21:1/tcp",
        "x.api.example.com:443/tcp",
        "corp.example:1/tcp",
        "evilcorp.example:1/tcp",
        "[2001:db9::1]:53/udp",
    ];
    // A source of the destination's family (an IPv4 source never reaches an IPv6 destination).
    let from = |to: &str| if to.starts_with('[') { "fd00::10" } else { "10.1.0.10" };
    for to in yes {
        assert_eq!(w.decide(from(to), to).verdict, Verdict::Reject, "{to} should match");
    }
    for to in no {
        assert_eq!(w.decide(from(to), to).decided_by.context, Context::Default, "{to} should not match");
    }
}

/// A connection to an address its client resolved from a name (a recorded flow) is a flow to both: the first rule in
/// evaluation order that matches either way decides (§5).
#[test]
fn a_resolved_destination_matches_by_address_and_by_name() {
    let rules = es("kube-system", "byname", "{addresses: ['api.example.com']}")
        + &es("kube-system", "bynet", "{addresses: [203.0.113.0/28]}")
        + &cgr("deny-name", "{action: reject, priority: 1, externalServices: [byname]}")
        + &cgr("allow-net", "{action: accept-decisively, priority: 2, externalServices: [bynet]}");
    let w = World::new(&rules);
    let ev = Evaluator::new(&w.model);
    let tenant = ev.tenant_of("10.1.0.10".parse().unwrap()).unwrap().to_string();
    let decide = |destination: Destination| {
        let flow = Flow {
            source: "10.1.0.10".parse().unwrap(),
            tenant: tenant.clone(),
            destination,
            protocol: Protocol::Tcp,
            port: Some(443),
            at: NOON.parse().unwrap(),
        };
        let d = ev.decide(&flow).unwrap();
        assert_eq!(d, ev.decide_by_scan(&flow).unwrap());
        format!("{} by {}", d.verdict.as_str(), d.decided_by.rule)
    };
    let resolved = |host: &str, ip: &str| Destination::Resolved { host: host.into(), ip: ip.parse().unwrap() };
    // The name's rule comes first: it decides, whatever the address.
    assert_eq!(decide(resolved("api.example.com", "203.0.113.5")), "reject by ClusterEgressRule/deny-name");
    // Another name to an address of the network: the address decides.
    assert_eq!(decide(resolved("www.example.com", "203.0.113.5")), "accept by ClusterEgressRule/allow-net");
    assert_eq!(decide(Destination::Ip("203.0.113.5".parse().unwrap())), "accept by ClusterEgressRule/allow-net");
    // Neither: the default.
    assert_eq!(decide(resolved("www.example.com", "198.51.100.1")).split(' ').nth(2), Some("Tenant/Common"));
}

#[test]
fn protocols_and_ports() {
    let rules = es(
        "kube-system",
        "p",
        "{addresses: [1.1.1.1], ports: [{protocol: UDP, port: '53'}, {protocol: tcp, port: '8000-8080'}, {protocol: icmp}]}",
    ) + &es("kube-system", "anyport", "{addresses: [2.2.2.2], ports: [{protocol: any, port: '22'}]}")
        + &es("kube-system", "all", "{addresses: [3.3.3.3]}")
        + &es("kube-system", "alltcp", "{addresses: [4.4.4.4], ports: [{protocol: tcp}]}")
        + &cgr("r", "{action: reject, externalServices: [p, anyport, all, alltcp]}");
    let w = World::new(&rules);
    let check = |to: &str, hit: bool| {
        let d = w.decide("10.1.0.10", to);
        assert_eq!(d.verdict == Verdict::Reject, hit, "{to}");
    };
    check("1.1.1.1:53/udp", true);
    check("1.1.1.1:53/tcp", false);
    check("1.1.1.1:8080/tcp", true);
    check("1.1.1.1:8081/tcp", false);
    check("1.1.1.1/icmp", true);
    check("2.2.2.2:22/tcp", true);
    check("2.2.2.2:22/udp", true);
    check("2.2.2.2:23/tcp", false);
    check("2.2.2.2/icmp", false);
    check("3.3.3.3:9/udp", true);
    check("3.3.3.3/icmp", true);
    check("4.4.4.4:1/tcp", true);
    check("4.4.4.4:1/udp", false);
}

// ---- schedules and audit ----

#[test]
fn a_rule_outside_its_schedule_does_not_take_part() {
    let rules = x_everywhere()
        + &cgr(
            "night",
            "{action: reject, externalServices: [x], schedule: {timezone: Europe/Paris, windows: [{days: [Fri], start: '22:00', end: '06:00'}]}}",
        );
    let w = World::new(&rules);
    // 2026-11-27 is a Friday; Paris is UTC+1 in November.
    let inside = w.decide_at("10.1.0.10", "1.1.1.1:443/tcp", "2026-11-28T04:30:00Z");
    assert_eq!(inside.verdict, Verdict::Reject, "Saturday 05:30 Paris, in Friday's window");
    let outside = w.decide_at("10.1.0.10", "1.1.1.1:443/tcp", "2026-11-28T05:30:00Z");
    assert_eq!(outside.decided_by.context, Context::Default, "Saturday 06:30 Paris");
    assert_eq!(outside.trail[0].effect, Effect::OutsideSchedule);
}

#[test]
fn an_audit_rule_is_reported_but_never_changes_the_verdict() {
    let rules = x_everywhere()
        + &cgr("watch", "{action: reject, mode: audit, externalServices: [x]}")
        + &svcgr("b", "s", "{action: accept, service: api, externalServices: [x]}");
    let w = World::new(&rules);
    let d = w.decide("10.2.0.10", "1.1.1.1:443/tcp");
    assert_eq!(d.verdict, Verdict::Accept);
    assert_eq!(d.trail[0].rule, "ClusterEgressRule/watch");
    assert_eq!((d.trail[0].effect, d.trail[0].action), (Effect::Audit, ces_api::Action::Reject));
}

// ---- targets ----

#[test]
fn target_parsing() {
    assert_eq!(
        parse_target("1.2.3.4:443/TCP").unwrap(),
        (Destination::Ip("1.2.3.4".parse().unwrap()), Protocol::Tcp, Some(443))
    );
    assert_eq!(parse_target("[::1]:53/udp").unwrap().2, Some(53));
    assert_eq!(parse_target("Example.COM/icmp").unwrap().0, Destination::Host("example.com".into()));
    for (bad, want) in [
        ("1.2.3.4:443", "expected HOST:PORT/tcp"),
        ("1.2.3.4:443/sctp", "protocol `sctp`"),
        ("1.2.3.4/tcp", "needs a port"),
        ("1.2.3.4:99999/tcp", "not a number in 1-65535"),
        ("1.2.3.4:+80/tcp", "port `+80` is not a number"),
        ("::1:53/udp", "[ADDRESS]:PORT"),
        ("bad_host:1/tcp", "not a valid host name"),
        ("api.example.com:443/icmp", "ICMP has no port; write HOST/icmp"),
        ("[::1]:443/icmp", "ICMP has no port"),
        ("10.0.0.0/8:443/tcp", "not a network (`10.0.0.0/8`)"),
        ("10.0.0.0/8/icmp", "not a network"),
    ] {
        let e = parse_target(bad).unwrap_err();
        assert!(e.contains(want), "{bad}: {e}");
    }
}

// ---- the original examples ----

#[test]
fn the_original_examples_give_the_verdicts_afm_would() {
    let snap = load_str(
        &format!(
            "{}\n---\n{}",
            include_str!("../../../examples/original/examples.yaml"),
            include_str!("../../../examples/original-cluster.yaml")
        ),
        "e",
    );
    let conf = CesConfig::from_yaml(include_str!("../../../examples/original/ces-conf.yaml"), "c").unwrap();
    let w = World { model: compile(&snap, &conf, DEFAULT_CES_NAMESPACE) };
    // rule4: mysql endpoints may reach 211.6.6.7:9090 (UDP and TCP).
    assert_eq!(w.says("10.16.0.11", "211.6.6.7:9090/udp"), "accept by ServiceEgressRule/default/rule4");
    assert_eq!(w.says("10.16.0.12", "211.6.6.7:9090/tcp"), "accept by ServiceEgressRule/default/rule4");
    // Not an endpoint of mysql-service, or another port: the deny-all of tenant p2.
    assert_eq!(w.says("10.16.0.20", "211.6.6.7:9090/tcp"), "drop by Tenant/p2");
    assert_eq!(w.says("10.16.0.11", "211.6.6.7:9091/tcp"), "drop by Tenant/p2");
    // rule1 and rule3 are plain accepts: they pass their context, and the VS deny-all still drops.
    let d = w.decide("10.66.0.5", "22.6.6.5:9090/udp");
    assert_eq!((d.verdict, d.tenant.as_str()), (Verdict::Drop, "project3"));
    assert_eq!(d.trail[0].rule, "ClusterEgressRule/rule1");
    let d = w.decide("10.66.0.5", "100.100.1.1:9090/tcp");
    assert_eq!(d.verdict, Verdict::Drop);
    assert_eq!(
        (d.trail[0].rule.as_str(), d.trail[0].effect),
        ("NamespaceEgressRule/project3/rule3", Effect::NextContext)
    );
}

// ---- properties: the index agrees with the scan on random policies and flows ----

fn arb_world() -> impl Strategy<Value = String> {
    let rule = (0u8..3, 0u8..4, 0u8..4, 0usize..3, prop::option::of(0i32..3), any::<bool>(), 0u8..3);
    prop::collection::vec(rule, 1..20).prop_map(|rules| {
        let mut y = String::new();
        let dests = [
            "{addresses: [1.1.1.0/30]}",
            "{addresses: [1.1.1.1], ports: [{protocol: tcp, port: '443'}]}",
            "{addresses: [1.1.1.2-1.1.1.9], ports: [{protocol: udp}]}",
        ];
        for ns in ["kube-system", "a", "b", "c"] {
            for (i, d) in dests.iter().enumerate() {
                y += &es(ns, &format!("e{i}"), d);
            }
        }
        y += "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: a}\nspec: {selector: {app: web}}\n";
        for (i, (kind, action, ns, dest, prio, audit, sel)) in rules.into_iter().enumerate() {
            let action = ["accept", "accept-decisively", "drop", "reject"][action as usize];
            let ns = ["a", "b", "c", "a"][ns as usize];
            let mut spec = format!("action: {action}, externalServices: [e{dest}]");
            if let Some(p) = prio {
                spec += &format!(", priority: {p}");
            }
            if audit {
                spec += ", mode: audit";
            }
            y += &match kind {
                0 if sel == 1 => {
                    cgr(&format!("r{i}"), &format!("{{{spec}, namespaceSelector: {{matchLabels: {{team: red}}}}}}"))
                }
                0 => cgr(&format!("r{i}"), &format!("{{{spec}}}")),
                1 => nsgr(ns, &format!("r{i}"), &format!("{{{spec}}}")),
                _ => svcgr("a", &format!("r{i}"), &format!("{{{spec}, service: web}}")),
            };
        }
        y
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn index_and_scan_always_agree(world in arb_world(), flows in prop::collection::vec((0usize..6, 0u8..12, 0u8..3, prop::sample::select(vec![443u16, 53, 80])), 1..40)) {
        let w = World::new(&world);
        let ev = Evaluator::new(&w.model);
        let sources = ["10.1.0.10", "10.1.0.20", "10.2.0.10", "10.3.0.10", "10.1.99.1", "192.0.2.1"];
        for (src, dst, proto, port) in flows {
            let protocol = [Protocol::Tcp, Protocol::Udp, Protocol::Icmp][proto as usize];
            let source: IpAddr = sources[src].parse().unwrap();
            let flow = Flow {
                source,
                tenant: ev.tenant_of(source).unwrap().to_string(),
                destination: Destination::Ip(format!("1.1.1.{dst}").parse().unwrap()),
                protocol,
                port: (protocol != Protocol::Icmp).then_some(port),
                at: NOON.parse().unwrap(),
            };
            let a = ev.decide(&flow).unwrap();
            prop_assert_eq!(&a, &ev.decide_by_scan(&flow).unwrap());
            // A decision is always explained: a non-default verdict comes from the last trail entry.
            if a.decided_by.context != Context::Default {
                let last = a.trail.last().unwrap();
                prop_assert_eq!(&last.rule, &a.decided_by.rule);
                prop_assert_eq!(last.effect, Effect::Decided);
            }
        }
    }
}

#[test]
fn as_str_names_match_the_json_names() {
    for c in [Context::Cluster, Context::Namespace, Context::Service, Context::Default] {
        assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
    }
    for e in [Effect::Decided, Effect::NextContext, Effect::Audit, Effect::OutsideSchedule] {
        assert_eq!(serde_json::to_value(e).unwrap(), e.as_str());
    }
}

/// Issue 19: the source translation of an accepted flow; the first ExternalIPRule of the flow's tenant in priority
/// order whose sources hold it and whose destinationMatch it meets; the egress addresses of the flow's family.
#[test]
fn translation_is_the_tenants_first_matching_external_ip_rule() {
    // A Service of each namespace whose endpoints are its pod (both families).
    let svc = |ns: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: {ns}}}\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: s, namespace: {ns}}}\nsubsets: [{{addresses: [{{ip: 10.9.0.5}}, {{ip: '2001:db8::5'}}]}}]\n---\n"
        )
    };
    let eip = |ns: &str, name: &str, spec: &str| {
        format!(
            "apiVersion: bigip.io/v1alpha1\nkind: ExternalIPRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n---\n"
        )
    };
    let rules = svc("nx")
        + &svc("ny")
        + &eip(
            "nx",
            "narrow",
            "{priority: 1, externalAddresses: [203.0.113.1], services: [s], destinationMatch: {addresses: [198.51.100.0/24], destinationMatchPorts: {protocol: tcp, ports: ['443']}}}",
        )
        + &eip(
            "nx",
            "wide",
            "{priority: 5, externalAddresses: [203.0.113.2-203.0.113.3, '2001:db8:e::2'], services: [s]}",
        )
        + &eip("ny", "theirs", "{externalAddresses: [203.0.113.9], services: [s]}");
    let w = overlap_world(&rules);
    let ev = Evaluator::new(&w.model);
    let tr = |tenant: &str, from: &str, to: &str| {
        let (destination, protocol, port) = parse_target(to).unwrap();
        let flow = Flow {
            source: from.parse().unwrap(),
            tenant: tenant.into(),
            destination,
            protocol,
            port,
            at: "2026-12-06T10:00:00Z".parse().unwrap(),
        };
        ev.translate(&flow).unwrap().map(|t| format!("{} {}", t.rule, t.to.join(",")))
    };
    let (narrow, wide) = ("ExternalIPRule/nx/narrow 203.0.113.1", "ExternalIPRule/nx/wide 203.0.113.2-203.0.113.3");
    assert_eq!(tr("t1", "10.9.0.5", "198.51.100.7:443/tcp").as_deref(), Some(narrow));
    assert_eq!(tr("t1", "10.9.0.5", "198.51.100.7:80/tcp").as_deref(), Some(wide), "port not met: the next rule");
    assert_eq!(tr("t1", "10.9.0.5", "198.51.100.7:443/udp").as_deref(), Some(wide), "protocol not met");
    assert_eq!(tr("t1", "10.9.0.5", "192.0.2.1:443/tcp").as_deref(), Some(wide), "address not met");
    assert_eq!(tr("t1", "10.9.0.5", "api.example.com:443/tcp").as_deref(), Some(wide), "a bare name meets no address");
    assert_eq!(
        tr("t1", "2001:db8::5", "[2001:db8:ff::1]:443/tcp").as_deref(),
        Some("ExternalIPRule/nx/wide 2001:db8:e::2"),
        "the egress address of the flow's family"
    );
    // The same address in the other tenant is that tenant's pod: its own rule.
    assert_eq!(tr("t2", "10.9.0.5", "198.51.100.7:443/tcp").as_deref(), Some("ExternalIPRule/ny/theirs 203.0.113.9"));
    assert_eq!(tr("t2", "2001:db8::5", "[2001:db8:ff::1]:443/tcp"), None, "no egress address of that family");
    assert_eq!(tr("Common", "10.9.0.5", "198.51.100.7:443/tcp"), None);
}
