use super::*;
use ces_snapshot::manifests::load_str;
use proptest::prelude::*;

const ORIGINAL: &str = include_str!("../../../examples/original/examples.yaml");
const ORIGINAL_CLUSTER: &str = include_str!("../../../examples/original-cluster.yaml");
const ORIGINAL_CONF: &str = include_str!("../../../examples/original/ces-conf.yaml");

fn original_model() -> PolicyModel {
    let snap = load_str(&format!("{ORIGINAL}\n---\n{ORIGINAL_CLUSTER}"), "examples");
    let config = CesConfig::from_yaml(ORIGINAL_CONF, "ces-conf.yaml").unwrap();
    compile(&snap, &config, DEFAULT_CES_NAMESPACE)
}

fn default_model(yaml: &str) -> PolicyModel {
    compile(&load_str(yaml, "t.yaml"), &CesConfig::embedded_default(), DEFAULT_CES_NAMESPACE)
}

/// The addresses of a set; none when the set was not built.
fn set(m: &PolicyModel, name: &str) -> Vec<String> {
    m.address_sets.get(name).map(|s| s.addresses.iter().map(|a| a.to_string()).collect()).unwrap_or_default()
}

fn diags(m: &PolicyModel) -> Vec<(String, String, String)> {
    m.diagnostics
        .iter()
        .map(|d| (d.object.as_ref().map(|o| o.to_string()).unwrap_or_default(), d.reason.clone(), d.message.clone()))
        .collect()
}

fn exsvc(ns: &str, name: &str, body: &str) -> String {
    format!(
        "---\napiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}\n"
    )
}

fn cgr(name: &str, body: &str) -> String {
    format!(
        "---\napiVersion: kubeovn.io/v1alpha1\nkind: ClusterEgressRule\nmetadata: {{name: {name}}}\nspec:\n{body}\n"
    )
}

fn nsgr(ns: &str, name: &str, body: &str) -> String {
    format!(
        "---\napiVersion: kubeovn.io/v1alpha1\nkind: NamespaceEgressRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}\n"
    )
}

fn svcgr(ns: &str, name: &str, body: &str) -> String {
    format!(
        "---\napiVersion: kubeovn.io/v1alpha1\nkind: ServiceEgressRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}\n"
    )
}

fn pod(ns: &str, name: &str, ip: &str, labels: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nstatus: {{phase: Running, podIPs: [{{ip: {ip}}}]}}\n"
    )
}

#[test]
fn the_original_examples_compile_into_three_contexts_and_tenants() {
    let m = original_model();
    assert!(m.diagnostics.is_empty(), "{:?}", diags(&m));

    assert_eq!(m.cluster_rules.len(), 1);
    let r1 = &m.cluster_rules[0];
    assert_eq!(r1.id, "ClusterEgressRule/rule1");
    assert_eq!(r1.sources, Sources::Any);
    assert!(r1.logging);
    assert_eq!(r1.destinations[0], "kube-system/exsvc1");
    let protos: Vec<Protocol> = m.destination_sets[&r1.destinations[0]].ports.iter().map(|p| p.protocol).collect();
    assert_eq!(protos, [Protocol::Udp, Protocol::Tcp], "UDP/TCP in upper case, in the order listed");

    let names: Vec<&str> = m.tenants.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["Common", "p2", "project3"]);
    let p3 = m.tenant("project3").unwrap();
    assert_eq!(p3.route_domain, RouteDomainRef { id: 4, name: "rd4".into() });
    assert_eq!(p3.namespaces, ["project3", "test-ns-a"]);
    assert_eq!(p3.namespace_rules[0].id, "NamespaceEgressRule/project3/rule3");
    assert_eq!(set(&m, "namespace/project3"), ["10.66.0.0/16", "10.66.0.5/32"]);

    let p2 = m.tenant("p2").unwrap();
    assert_eq!(p2.service_rules[0].id, "ServiceEgressRule/default/rule4");
    assert_eq!(p2.service_rules[0].sources, Sources::Sets(vec!["service/default/mysql-service".into()]));
    assert_eq!(set(&m, "service/default/mysql-service"), ["10.16.0.11/32", "10.16.0.12/32"]);
    assert_eq!(set(&m, "tenant/p2"), ["10.16.0.11/32", "10.16.0.12/32", "10.16.0.20/32", "10.16.0.21/32"]);
    let common = m.tenant("Common").unwrap();
    assert!(common.namespaces.contains(&"kube-system".to_string()), "unlisted namespaces fall to Common");
    assert_eq!(common.default_action, Verdict::Drop);
}

#[test]
fn rules_are_ordered_by_priority_then_namespace_then_name() {
    let mut y = exsvc("a", "e", "  addresses: [1.1.1.1]") + &exsvc("b", "e", "  addresses: [1.1.1.1]");
    y += &nsgr("b", "z", "  action: drop\n  externalServices: [e]\n  priority: 10");
    y += &nsgr("a", "m", "  action: drop\n  externalServices: [e]");
    y += &nsgr("b", "a", "  action: drop\n  externalServices: [e]");
    y += &nsgr("a", "x", "  action: drop\n  externalServices: [e]\n  priority: 1000");
    y += &nsgr("a", "w", "  action: drop\n  externalServices: [e]\n  priority: -5");
    let m = default_model(&y);
    assert!(m.errors().next().is_none(), "{:?}", diags(&m));
    let ids: Vec<&str> = m.tenants[0].namespace_rules.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "NamespaceEgressRule/a/w",
            "NamespaceEgressRule/b/z",
            "NamespaceEgressRule/a/m",
            "NamespaceEgressRule/a/x",
            "NamespaceEgressRule/b/a"
        ]
    );
}

#[test]
fn cluster_rules_resolve_external_services_in_the_ces_namespace_only() {
    let y = exsvc("default", "e", "  addresses: [1.1.1.1]") + &cgr("r", "  action: drop\n  externalServices: [e]");
    let m = default_model(&y);
    assert!(m.cluster_rules.is_empty());
    assert_eq!(
        diags(&m),
        [(
            "ClusterEgressRule/r".into(),
            "ExternalServiceNotFound".into(),
            "ExternalService kube-system/e not found".into()
        )]
    );
    let snap = load_str(&y, "t");
    let m = compile(&snap, &CesConfig::embedded_default(), "default");
    assert_eq!(m.cluster_rules.len(), 1, "with CES_NAMESPACE=default it resolves");
}

#[test]
fn namespaced_rules_resolve_external_services_in_their_own_namespace() {
    let mut y = exsvc("other", "e", "  addresses: [1.1.1.1]") + &exsvc("kube-system", "e", "  addresses: [1.1.1.1]");
    y += &nsgr("mine", "r", "  action: drop\n  externalServices: [e]");
    y += &svcgr("mine", "s", "  action: drop\n  service: x\n  externalServices: [e]");
    y += "---\napiVersion: v1\nkind: Service\nmetadata: {name: x, namespace: mine}\n";
    let m = default_model(&y);
    assert!(m.tenants[0].namespace_rules.is_empty() && m.tenants[0].service_rules.is_empty());
    assert_eq!(
        diags(&m),
        [
            (
                "NamespaceEgressRule/mine/r".into(),
                "ExternalServiceNotFound".into(),
                "ExternalService mine/e not found".into()
            ),
            (
                "ServiceEgressRule/mine/s".into(),
                "ExternalServiceNotFound".into(),
                "ExternalService mine/e not found".into()
            ),
        ]
    );
}

#[test]
fn one_bad_object_never_blocks_the_others() {
    let mut y = exsvc("kube-system", "good", "  addresses: [1.1.1.1]");
    y += &exsvc(
        "kube-system",
        "bad",
        "  addresses: [10.0.0.1/24, 10.0.0.9-10.0.0.1, '*']\n  ports:\n  - {protocol: tcp, port: '99999'}\n  - {protocol: sctp, port: '1'}\n  - {protocol: icmp, port: '1'}\n  - {protocol: tcp, port: '90-80'}\n  - {protocol: tcp, port: '80', bandwidth: fast-irule}",
    );
    y += &cgr("uses-good", "  action: accept-decisively\n  externalServices: [good]");
    y += &cgr("uses-bad", "  action: drop\n  externalServices: [good, bad]");
    y += &cgr("uses-missing", "  action: drop\n  externalServices: [nope]");
    y += &cgr(
        "bad-schedule",
        "  action: drop\n  externalServices: [good]\n  schedule: {timezone: Nowhere/City, windows: [{start: '01:00', end: '02:00'}]}",
    );
    y += &cgr("no-ns", "  action: drop\n  externalServices: [good]\n  namespaceSelector: {matchLabels: {team: ghost}}");
    let m = default_model(&y);
    let ids: Vec<&str> = m.cluster_rules.iter().map(|r| r.id.as_str()).collect();
    // A selector that matches nothing yet is not an error: the rule is in, and waits for a namespace.
    assert_eq!(ids, ["ClusterEgressRule/no-ns", "ClusterEgressRule/uses-good"]);

    let d = diags(&m);
    let has = |obj: &str, reason: &str, text: &str| {
        assert!(
            d.iter().any(|(o, r, msg)| o == obj && r == reason && msg.contains(text)),
            "missing {obj} {reason} `{text}` in {d:#?}"
        )
    };
    let bad = "ExternalService/kube-system/bad";
    has(bad, "InvalidAddress", "spec.addresses[0]: `10.0.0.1/24` has host bits set");
    has(bad, "InvalidAddress", "spec.addresses[1]: range `10.0.0.9-10.0.0.1` is reversed");
    has(bad, "InvalidAddress", "spec.addresses[2]");
    has(bad, "InvalidPort", "spec.ports[0].port: port list `99999`: port 99999 is out of range 1-65535");
    has(bad, "UnknownProtocol", "spec.ports[1].protocol: unknown protocol `sctp`");
    has(bad, "InvalidPort", "spec.ports[2].port: ICMP has no ports");
    has(bad, "InvalidPort", "spec.ports[3].port: port list `90-80`: range 90-80 is reversed");
    has(bad, "InvalidBandwidth", "spec.ports[4].bandwidth: bandwidth `fast-irule` is neither a rate");
    has("ClusterEgressRule/uses-bad", "ExternalServiceInvalid", "ExternalService kube-system/bad is invalid");
    has("ClusterEgressRule/uses-missing", "ExternalServiceNotFound", "kube-system/nope not found");
    has("ClusterEgressRule/bad-schedule", "InvalidSchedule", "unknown time zone `Nowhere/City`");
    has("ClusterEgressRule/no-ns", "NoSources", "selects no namespace yet");

    let status = m.status_of(&ObjectRef::new("ClusterEgressRule", None, "uses-missing"), Some(3));
    assert_eq!(status.phase, Some(ces_api::Phase::Failed));
    assert_eq!(status.conditions[0].reason, "ExternalServiceNotFound");
    let ok = m.status_of(&ObjectRef::new("ClusterEgressRule", None, "uses-good"), Some(1));
    assert_eq!(ok.phase, Some(ces_api::Phase::Success));
    assert_eq!((ok.conditions[0].type_.as_str(), ok.conditions[0].reason.as_str()), ("Accepted", "Accepted"));
    let waiting = m.status_of(&ObjectRef::new("ClusterEgressRule", None, "no-ns"), Some(2));
    assert_eq!(waiting.phase, Some(ces_api::Phase::Success));
    let c = &waiting.conditions[0];
    assert_eq!((c.status.as_str(), c.reason.as_str(), c.observed_generation), ("True", "NoSources", Some(2)));
}

#[test]
fn namespace_rules_match_their_pods_and_pod_selector_narrows() {
    let mut y = exsvc("a", "e", "  addresses: [1.1.1.1]");
    y += &pod("a", "web", "10.0.0.1", "app: web");
    y += &pod("a", "db", "10.0.0.2", "app: db");
    y += &pod("b", "web", "10.0.1.1", "app: web");
    y += &nsgr("a", "all", "  action: drop\n  externalServices: [e]");
    y += &nsgr("a", "web-only", "  action: drop\n  externalServices: [e]\n  podSelector: {matchLabels: {app: web}}");
    y += &nsgr("a", "nobody", "  action: drop\n  externalServices: [e]\n  podSelector: {matchLabels: {app: ghost}}");
    y += &nsgr(
        "a",
        "bad-sel",
        "  action: drop\n  externalServices: [e]\n  podSelector: {matchExpressions: [{key: app, operator: In}]}",
    );
    let m = default_model(&y);
    assert_eq!(set(&m, "namespace/a"), ["10.0.0.1/32", "10.0.0.2/32"]);
    assert_eq!(set(&m, "pods/a/web-only"), ["10.0.0.1/32"]);
    let d = diags(&m);
    assert!(d.iter().any(|(o, r, _)| o == "NamespaceEgressRule/a/nobody" && r == "NoSources"), "{d:?}");
    assert!(d.iter().any(|(o, r, _)| o == "NamespaceEgressRule/a/bad-sel" && r == "InvalidSelector"), "{d:?}");
    let ids: Vec<&str> = m.tenants[0].namespace_rules.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["NamespaceEgressRule/a/all", "NamespaceEgressRule/a/nobody", "NamespaceEgressRule/a/web-only"]);
}

#[test]
fn a_rule_whose_selector_matches_nothing_stays_and_applies_when_a_pod_appears() {
    // Issue 2 marked such a rule Failed and left it out, so it flapped as a Deployment scaled to zero and back.
    let rules = exsvc("a", "e", "  addresses: [1.1.1.1]")
        + &nsgr("a", "web", "  action: drop\n  externalServices: [e]\n  podSelector: {matchLabels: {app: web}}");
    let object = ObjectRef::new("NamespaceEgressRule", Some("a"), "web");
    let scaled_to_zero = default_model(&rules);
    assert_eq!(scaled_to_zero.tenants[0].namespace_rules.len(), 1);
    assert!(set(&scaled_to_zero, "pods/a/web").is_empty());
    assert_eq!(scaled_to_zero.errors().count(), 0);
    assert_eq!(scaled_to_zero.status_of(&object, None).conditions[0].reason, "NoSources");

    let scaled_up = default_model(&(rules + &pod("a", "web-1", "10.0.0.7", "app: web")));
    assert_eq!(set(&scaled_up, "pods/a/web"), ["10.0.0.7/32"]);
    assert!(scaled_up.diagnostics.is_empty(), "{:?}", diags(&scaled_up));
    assert_eq!(scaled_up.status_of(&object, None).conditions[0].reason, "Accepted");
}

/// Two namespaces of one tenant (a, b), one of another (c); pods in each; b with its own subnet.
fn hostile_world() -> String {
    let mut y = String::new();
    y += "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
    y += "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: b, annotations: {ovn.kubernetes.io/cidr: 10.2.0.0/16}}\n";
    y += "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: c}\n";
    y += &pod("a", "app", "10.1.0.1", "app: x");
    y += &pod("b", "victim", "10.2.0.5", "app: v");
    y += &pod("c", "other", "10.1.0.9", "app: o");
    y += &exsvc("a", "e", "  addresses: [1.1.1.1]");
    y
}

const TWO_TENANTS: &str = "clusterName: k\nisSupportRouteDomain: true\ntenant:\n- {name: Common, namespaces: 'a,b'}\n- {name: t2, namespaces: c, routeDomain: {id: 2, name: rd2}}\n";

fn two_tenant_model(yaml: &str) -> PolicyModel {
    compile(&load_str(yaml, "t.yaml"), &CesConfig::from_yaml(TWO_TENANTS, "c").unwrap(), DEFAULT_CES_NAMESPACE)
}

#[test]
fn endpoints_naming_another_namespaces_pods_are_never_sources() {
    // Whoever can write Endpoints in namespace a must not make b's pods sources of a's rules (CVE-2021-25740's
    // shape). Refused: b's pod by address, b's pod by targetRef, an address in b's own subnet. Kept: a's own pod, an
    // address that is no pod's (a VM), and 10.1.0.9, which is a pod of c, but c is in another tenant, so in this
    // tenant's address space it is nobody's.
    let mut y = hostile_world();
    y += "---\napiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: a}\n";
    y += "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: s, namespace: a}\nsubsets: [{addresses: [\
          {ip: 10.1.0.1}, {ip: 10.2.0.5}, {ip: 172.16.0.4}, {ip: 10.1.0.9},\
          {ip: 172.16.0.5, targetRef: {kind: Pod, namespace: b, name: victim}}, {ip: 10.2.7.7}]}]\n";
    y += &svcgr("a", "r", "  action: accept\n  service: s\n  externalServices: [e]");
    y += "---\napiVersion: bigip.io/v1alpha1\nkind: ExternalIPRule\nmetadata: {name: nat, namespace: a}\nspec: {externalAddresses: [192.0.2.9], services: [s]}\n";
    let m = two_tenant_model(&y);
    assert_eq!(set(&m, "service/a/s"), ["10.1.0.1/32", "10.1.0.9/32", "172.16.0.4/32"]);
    assert_eq!(m.address_sets["service/a/s"].tenant, "Common");
    assert_eq!(m.tenants[0].service_rules.len(), 1, "the rule stays in: what it may use, it uses");
    assert_eq!(m.tenants[0].nat_rules.len(), 1);
    for object in ["ServiceEgressRule/a/r", "ExternalIPRule/a/nat"] {
        let warnings: Vec<String> = diags(&m)
            .into_iter()
            .filter(|(o, r, _)| o == object && r == "ForeignEndpoint")
            .map(|(_, _, msg)| msg)
            .collect();
        let joined = warnings.join("\n");
        assert_eq!(warnings.len(), 3, "{object}: {joined}");
        for needle in [
            "endpoint 10.2.0.5 of Service a/s is the address of pod b/victim of another namespace",
            "endpoint 172.16.0.5 of Service a/s names pod b/victim of another namespace",
            "endpoint 10.2.7.7 of Service a/s lies in subnet 10.2.0.0/16 of namespace b",
        ] {
            assert!(joined.contains(needle), "{object}: missing `{needle}` in {joined}");
        }
    }
    assert!(m.errors().next().is_none(), "{:?}", diags(&m));
}

#[test]
fn a_subnet_that_several_namespaces_share_is_not_a_source() {
    // kube-ovn writes the default subnet's CIDR on every namespace without a subnet of its own: a namespace rule of
    // one of them must not decide the others' traffic. Several subnets are joined by `;` (and `,` for dual stack).
    let mut y = String::new();
    for (ns, cidr) in [("a", "10.16.0.0/16"), ("b", "10.16.0.0/16"), ("d", "10.20.0.0/16;10.21.0.0/16,fd00:21::/64")] {
        y += &format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, annotations: {{ovn.kubernetes.io/cidr: '{cidr}'}}}}\n"
        );
    }
    y += &pod("a", "p", "10.16.0.7", "app: p");
    y += &exsvc("a", "e", "  addresses: [1.1.1.1]");
    y += &exsvc("d", "e", "  addresses: [1.1.1.1]");
    y += &nsgr("a", "r", "  action: drop\n  externalServices: [e]");
    y += &nsgr("d", "r", "  action: drop\n  externalServices: [e]");
    let m = default_model(&y);
    assert_eq!(set(&m, "namespace/a"), ["10.16.0.7/32"], "the shared default subnet is not a's");
    assert_eq!(set(&m, "namespace/d"), ["10.20.0.0/16", "10.21.0.0/16", "fd00:21::/64"]);
    let d = diags(&m);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!((d[0].0.as_str(), d[0].1.as_str()), ("NamespaceEgressRule/a/r", "SharedSubnet"));
    assert!(d[0].2.contains("subnet 10.16.0.0/16 of namespace a") && d[0].2.contains("namespace(s) b "), "{}", d[0].2);
    // The shared subnet still belongs to the tenant: an address in it enters there.
    assert!(set(&m, "tenant/Common").contains(&"10.16.0.0/16".to_string()));
}

#[test]
fn a_subnet_that_holds_a_pod_of_another_namespace_is_not_a_source() {
    // Found by the namespace-isolation property: b's pod has an address in a's annotated subnet, so a's namespace
    // rule would have decided b's pod.
    let mut y = String::new();
    y += "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a, annotations: {ovn.kubernetes.io/cidr: 'fd00:1::/64'}}\n";
    y += &pod("b", "p", "fd00:1::4", "app: p");
    y += &pod("a", "q", "fd00:1::5", "app: q");
    y += &exsvc("a", "e", "  addresses: [1.1.1.1]");
    y += &nsgr("a", "r", "  action: drop\n  externalServices: [e]");
    let m = default_model(&y);
    assert_eq!(set(&m, "namespace/a"), ["fd00:1::5/128"]);
    let d = diags(&m);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(d[0].1, "SharedSubnet");
    assert!(d[0].2.contains("namespace(s) b of tenant Common"), "{}", d[0].2);
}

#[test]
fn the_same_subnet_in_two_tenants_is_each_namespaces_own() {
    // Overlapping pod networks across tenants are what route domains are for: not shared.
    let mut y = String::new();
    for ns in ["a", "c"] {
        y += &format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, annotations: {{ovn.kubernetes.io/cidr: 10.16.0.0/16}}}}\n"
        );
    }
    let m = two_tenant_model(&y);
    assert_eq!(set(&m, "namespace/a").len(), 0, "not built: no rule uses it");
    assert_eq!(set(&m, "tenant/Common"), ["10.16.0.0/16"]);
    assert_eq!(set(&m, "tenant/t2"), ["10.16.0.0/16"]);
    assert_eq!((m.address_sets["tenant/t2"].tenant.as_str(), m.address_sets["tenant/t2"].route_domain), ("t2", 2));
}

#[test]
fn host_network_pods_are_never_sources() {
    let mut y = hostile_world();
    y += "---\napiVersion: v1\nkind: Pod\nmetadata: {name: agent, namespace: a, labels: {app: x}}\nspec: {hostNetwork: true, containers: []}\nstatus: {phase: Running, podIPs: [{ip: 192.168.1.10}]}\n";
    y += &nsgr("a", "r", "  action: drop\n  externalServices: [e]");
    y += &nsgr("a", "sel", "  action: drop\n  externalServices: [e]\n  podSelector: {matchLabels: {app: x}}");
    let m = two_tenant_model(&y);
    assert_eq!(set(&m, "namespace/a"), ["10.1.0.1/32"]);
    assert_eq!(set(&m, "pods/a/sel"), ["10.1.0.1/32"]);
    assert!(!set(&m, "tenant/Common").contains(&"192.168.1.10/32".to_string()), "the node's address is no tenant's");
}

/// Namespace `ns`'s selector-less Service `s` with these endpoint addresses, and a service rule on it.
fn manual_service(ns: &str, ips: &[&str], action: &str) -> String {
    let addrs: Vec<String> = ips.iter().map(|ip| format!("{{ip: {ip}}}")).collect();
    let mut y = exsvc(ns, "e", "  addresses: [1.1.1.1]");
    y += &format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: {ns}}}\n");
    y += &format!(
        "---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: s, namespace: {ns}}}\nsubsets: [{{addresses: [{}]}}]\n",
        addrs.join(", ")
    );
    y += &svcgr(ns, "r", &format!("  action: {action}\n  priority: 1\n  service: s\n  externalServices: [e]"));
    y
}

fn reasons(m: &PolicyModel, object: &str) -> Vec<(String, String)> {
    diags(m).into_iter().filter(|(o, _, _)| o == object).map(|(_, r, msg)| (r, msg)).collect()
}

#[test]
fn a_nodes_address_is_never_a_services_source() {
    // Issue 20, finding 1: Endpoints in `evil` listing a node's address (the address of a hostNetwork pod) made the
    // node's traffic a source of evil's rules.
    let mut y = hostile_world();
    y += "---\napiVersion: v1\nkind: Pod\nmetadata: {name: node-exporter, namespace: c, labels: {app: x}}\nspec: {hostNetwork: true, containers: []}\nstatus: {phase: Running, podIPs: [{ip: 192.168.1.10}]}\n";
    y += &manual_service("a", &["192.168.1.10", "10.1.0.1"], "drop");
    let m = two_tenant_model(&y);
    assert_eq!(set(&m, "service/a/s"), ["10.1.0.1/32"]);
    let r = reasons(&m, "ServiceEgressRule/a/r");
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].0, "NodeAddress");
    assert!(r[0].1.contains("192.168.1.10") && r[0].1.contains("hostNetwork pod c/node-exporter"), "{}", r[0].1);
    assert!(!set(&m, "tenant/Common").contains(&"192.168.1.10/32".to_string()));
}

#[test]
fn a_non_pod_address_two_namespaces_list_is_a_source_for_neither() {
    // Issue 20, finding 1: listing another team's VM let evil's higher-priority rule decide that VM's egress.
    let vm = "172.16.0.4";
    let mut y = hostile_world();
    y += &manual_service("a", &[vm], "accept");
    y += &manual_service("b", &[vm, "10.2.0.5"], "drop");
    let m = two_tenant_model(&y);
    assert!(set(&m, "service/a/s").is_empty(), "{:?}", set(&m, "service/a/s"));
    assert_eq!(set(&m, "service/b/s"), ["10.2.0.5/32"], "b's own pod stays");
    for (rule, other) in [("ServiceEgressRule/a/r", "b"), ("ServiceEgressRule/b/r", "a")] {
        let r = reasons(&m, rule);
        let c: Vec<_> = r.iter().filter(|(code, _)| code == "ContestedEndpoint").collect();
        assert_eq!(c.len(), 1, "{rule}: {r:?}");
        assert!(c[0].1.contains(&format!("namespace(s) {other} ")), "{}", c[0].1);
    }
    // The VM is in no namespace's sources, so its flows fall to the tenant (simulate: decided by Tenant/Common).
    assert!(!set(&m, "tenant/Common").contains(&format!("{vm}/32")), "a contested address belongs to no one");

    // In another tenant, the same address is not contested: tenants have address spaces of their own.
    let mut y = hostile_world();
    y += &manual_service("a", &[vm], "accept");
    y += &manual_service("c", &[vm], "drop");
    let m = two_tenant_model(&y);
    assert_eq!(set(&m, "service/a/s"), [format!("{vm}/32")]);
    assert_eq!(set(&m, "service/c/s"), [format!("{vm}/32")]);

    // Uncontested, a VM behind a selector-less Service works as before.
    let mut y = hostile_world();
    y += &manual_service("a", &[vm], "accept");
    let m = two_tenant_model(&y);
    assert_eq!(set(&m, "service/a/s"), [format!("{vm}/32")]);
    assert!(reasons(&m, "ServiceEgressRule/a/r").is_empty());
}

#[test]
fn the_config_gives_a_non_pod_address_to_one_namespace() {
    let vm = "172.16.0.4";
    let mut y = hostile_world();
    y += &manual_service("a", &[vm], "accept");
    y += &manual_service("b", &[vm], "drop");
    let conf = format!("{TWO_TENANTS}endpointAddresses:\n  a: [172.16.0.0/29]\n");
    let m = compile(&load_str(&y, "t.yaml"), &CesConfig::from_yaml(&conf, "c").unwrap(), DEFAULT_CES_NAMESPACE);
    assert_eq!(set(&m, "service/a/s"), [format!("{vm}/32")]);
    assert!(set(&m, "service/b/s").is_empty());
    let r = reasons(&m, "ServiceEgressRule/b/r");
    assert!(r.iter().any(|(c, msg)| c == "ForeignEndpoint" && msg.contains("given to namespace a")), "{r:?}");
    assert!(reasons(&m, "ServiceEgressRule/a/r").is_empty());
    // An address has one owner; a bad entry is a config error.
    for bad in
        ["  a: [172.16.0.4]\n  b: [172.16.0.0/24]\n", "  a: [172.16.0.1/24]\n", "  a: [nope]\n", "  A_: [1.2.3.4]\n"]
    {
        let conf = format!("{TWO_TENANTS}endpointAddresses:\n{bad}");
        assert!(CesConfig::from_yaml(&conf, "c").is_err(), "{bad}");
    }
}

#[test]
fn service_sources_come_from_endpoints_or_else_ready_selected_pods() {
    let mut y = exsvc("a", "e", "  addresses: [1.1.1.1]");
    y += &pod("a", "api-1", "10.0.0.1", "app: api");
    y += "---\napiVersion: v1\nkind: Pod\nmetadata: {name: api-2, namespace: a, labels: {app: api}}\nstatus: {phase: Running, conditions: [{type: Ready, status: 'False'}], podIPs: [{ip: 10.0.0.2}]}\n";
    y += "---\napiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: a}\nspec: {selector: {app: api}}\n";
    y += "---\napiVersion: v1\nkind: Service\nmetadata: {name: manual, namespace: a}\n";
    y += "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: manual, namespace: a}\nsubsets: [{addresses: [{ip: 10.9.9.9}], notReadyAddresses: [{ip: 10.9.9.8}]}]\n";
    y += &svcgr("a", "r-api", "  action: accept\n  service: api\n  externalServices: [e]");
    y += &svcgr("a", "r-manual", "  action: accept\n  service: manual\n  externalServices: [e]");
    y += &svcgr("a", "r-ghost", "  action: accept\n  service: ghost\n  externalServices: [e]");
    let m = default_model(&y);
    assert_eq!(set(&m, "service/a/api"), ["10.0.0.1/32"], "not-ready pods are not sources");
    assert_eq!(set(&m, "service/a/manual"), ["10.9.9.9/32"]);
    assert_eq!(
        diags(&m),
        [("ServiceEgressRule/a/r-ghost".into(), "ServiceNotFound".into(), "Service a/ghost not found".into())]
    );
}

#[test]
fn without_route_domains_everything_is_common() {
    let mut conf = CesConfig::from_yaml(ORIGINAL_CONF, "c").unwrap();
    conf.is_support_route_domain = false;
    let snap = load_str(&format!("{ORIGINAL}\n---\n{ORIGINAL_CLUSTER}"), "examples");
    let m = compile(&snap, &conf, DEFAULT_CES_NAMESPACE);
    assert_eq!(m.tenants.len(), 1);
    assert_eq!(m.tenants[0].name, "Common");
    assert_eq!(m.tenants[0].namespace_rules.len(), 1);
    assert_eq!(m.tenants[0].service_rules.len(), 1);
}

#[test]
fn non_kube_ovn_cni_ignores_the_subnet_annotation() {
    let mut conf = CesConfig::from_yaml(ORIGINAL_CONF, "c").unwrap();
    conf.cni_type = Some("calico".into());
    let snap = load_str(&format!("{ORIGINAL}\n---\n{ORIGINAL_CLUSTER}"), "examples");
    let m = compile(&snap, &conf, DEFAULT_CES_NAMESPACE);
    assert_eq!(set(&m, "namespace/project3"), ["10.66.0.5/32"]);
}

#[test]
fn external_ip_rules_compile_into_their_tenant() {
    let snap = load_str(
        &format!("{}\n---\n{ORIGINAL_CLUSTER}", include_str!("../../../examples/original/examples-0.6.2.yaml")),
        "e",
    );
    let conf = CesConfig::from_yaml(ORIGINAL_CONF, "c").unwrap();
    let m = compile(&snap, &conf, DEFAULT_CES_NAMESPACE);
    assert!(m.diagnostics.is_empty(), "{:?}", diags(&m));
    let nat = &m.tenant("p2").unwrap().nat_rules[0];
    assert_eq!(nat.id, "ExternalIPRule/default/busybox-test-rule");
    assert_eq!(nat.sources, ["service/default/busybox-svc"]);
    assert_eq!(nat.destination_protocol, Some(Protocol::Tcp));
    assert_eq!(set(&m, "service/default/busybox-svc"), ["10.16.0.21/32"]);
}

// ---- properties ----

#[derive(Clone, Debug)]
struct GenRule {
    ns: usize,
    name: usize,
    priority: Option<i32>,
    kind: u8,
}

fn gen_docs(rules: &[GenRule]) -> Vec<String> {
    let mut docs = Vec::new();
    for ns in 0..3 {
        docs.push(exsvc(
            &format!("ns{ns}"),
            "e",
            "  addresses: [1.1.1.1, '*.example.com']\n  ports: [{protocol: tcp, port: '443'}]",
        ));
        docs.push(pod(&format!("ns{ns}"), "p", &format!("10.0.{ns}.1"), "app: x"));
        docs.push(format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: ns{ns}}}\nspec: {{selector: {{app: x}}}}\n"));
    }
    docs.push(exsvc("kube-system", "e", "  addresses: [2.2.2.2]"));
    let mut seen = std::collections::HashSet::new();
    for r in rules {
        if !seen.insert((r.kind, r.ns, r.name)) {
            continue;
        }
        let prio = r.priority.map(|p| format!("\n  priority: {p}")).unwrap_or_default();
        let body = format!("  action: drop\n  externalServices: [e]{prio}");
        let (ns, name) = (format!("ns{}", r.ns), format!("r{}", r.name));
        docs.push(match r.kind {
            0 => cgr(&format!("{ns}-{name}"), &body),
            1 => nsgr(&ns, &name, &body),
            _ => svcgr(&ns, &name, &format!("{body}\n  service: s")),
        });
    }
    docs
}

fn arb_rules() -> impl Strategy<Value = Vec<GenRule>> {
    prop::collection::vec(
        (0usize..3, 0usize..6, prop::option::of(-3i32..3), 0u8..3).prop_map(|(ns, name, priority, kind)| GenRule {
            ns,
            name,
            priority,
            kind,
        }),
        0..25,
    )
}

fn key(r: &Rule) -> (i32, Option<String>, String) {
    (r.priority, r.namespace.clone(), r.name.clone())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The model does not depend on the order objects arrive in, and every context is sorted.
    #[test]
    fn compile_is_deterministic_and_ordered(rules in arb_rules(), seed in any::<u64>()) {
        let docs = gen_docs(&rules);
        let mut shuffled = docs.clone();
        // A seeded Fisher-Yates shuffle, so the property is reproducible.
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let a = default_model(&docs.concat());
        let b = default_model(&shuffled.concat());
        prop_assert!(a.errors().next().is_none(), "{:?}", diags(&a));
        prop_assert_eq!(&a.cluster_rules, &b.cluster_rules);
        prop_assert_eq!(&a.tenants, &b.tenants);
        prop_assert_eq!(&a.address_sets, &b.address_sets);
        prop_assert_eq!(serde_json::to_string(&a.tenants).unwrap(), serde_json::to_string(&b.tenants).unwrap());
        for list in [&a.cluster_rules, &a.tenants[0].namespace_rules, &a.tenants[0].service_rules] {
            prop_assert!(list.windows(2).all(|w| key(&w[0]) < key(&w[1])), "not sorted: {:?}", list.iter().map(key).collect::<Vec<_>>());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Hostile input: random edits of real manifests never panic the loader or the compiler, and every rule the
    /// model keeps still refers only to address sets the model has.
    #[test]
    fn mutated_manifests_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..4, prop::sample::select(vec![
        "", "-", "*", "/", ":", "{", "}", "[", "]", "\n", "99999", "::", " ", "'", "\"", "&a", "*a", "---\n", "0.0.0.0/0", "~", "é",
    ])), 1..12)) {
        let mut text: Vec<char> = format!("{ORIGINAL}\n---\n{ORIGINAL_CLUSTER}").chars().collect();
        for (at, op, piece) in edits {
            let i = at.index(text.len().max(1));
            match op {
                0 => { text.splice(i..i, piece.chars()); }
                1 => { let end = (i + 3).min(text.len()); text.drain(i..end); }
                2 => { if i < text.len() { text[i] = piece.chars().next().unwrap_or(' '); } }
                _ => { let end = (i + piece.len()).min(text.len()); text.splice(i..end, piece.chars()); }
            }
        }
        let text: String = text.into_iter().collect();
        let config = CesConfig::from_yaml(ORIGINAL_CONF, "c").unwrap();
        let model = compile(&load_str(&text, "mutated.yaml"), &config, DEFAULT_CES_NAMESPACE);
        for (tenant, rule) in model.rules() {
            if let Sources::Sets(sets) = &rule.sources {
                for s in sets {
                    let set = model.address_sets.get(s);
                    prop_assert!(set.is_some(), "{} refers to missing set {s}", rule.id);
                    // A namespaced rule's sets are its own tenant's.
                    if let Some(t) = tenant {
                        prop_assert_eq!(&set.unwrap().tenant, &t.name, "{} uses set {} of another tenant", rule.id, s);
                    }
                }
            }
            for d in &rule.destinations {
                prop_assert!(model.destination_sets.contains_key(d), "{} refers to missing destination {d}", rule.id);
            }
        }
    }
}

/// An ExternalIPRule `name` of `ns` translating Service `s` (with one own pod as its endpoint) to `addrs`.
fn egress(ns: &str, name: &str, addrs: &str) -> String {
    format!(
        "---\napiVersion: bigip.io/v1alpha1\nkind: ExternalIPRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{externalAddresses: [{addrs}], services: [s]}}\n"
    )
}

fn egress_world(extra: &str) -> String {
    let mut y = hostile_world();
    for ns in ["a", "b", "c"] {
        y += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: {ns}}}\nspec: {{selector: {{app: x}}}}\n"
        );
    }
    y + extra
}

fn egress_model(y: &str, conf_extra: &str) -> PolicyModel {
    let conf = CesConfig::from_yaml(&format!("{TWO_TENANTS}{conf_extra}"), "c").unwrap();
    compile(&load_str(y, "t.yaml"), &conf, DEFAULT_CES_NAMESPACE)
}

fn nat_ids(m: &PolicyModel) -> Vec<String> {
    let mut v: Vec<String> = m.tenants.iter().flat_map(|t| t.nat_rules.iter().map(|r| r.id.clone())).collect();
    v.sort();
    v
}

#[test]
fn an_egress_address_claimed_in_two_namespaces_is_refused_in_both() {
    // Issue 20, finding 2: any namespace could name another team's egress address. No first-come race: both lose.
    let y = egress_world(
        &(egress("a", "mine", "203.0.113.7")
            + &egress("b", "theirs", "203.0.113.5-203.0.113.9")
            + &egress("a", "also-mine", "203.0.113.7")
            + &egress("c", "other-tenant", "198.51.100.1")),
    );
    let m = egress_model(&y, "");
    assert_eq!(nat_ids(&m), ["ExternalIPRule/c/other-tenant"]);
    for (ns, name, other) in [("a", "mine", "b/theirs"), ("b", "theirs", "a/mine")] {
        let rule = &format!("ExternalIPRule/{ns}/{name}");
        let r = reasons(&m, rule);
        assert!(r.iter().any(|(c, msg)| c == "EgressAddressConflict" && msg.contains(other)), "{rule}: {r:?}");
        let object = ObjectRef::new("ExternalIPRule", Some(ns), name);
        assert_eq!(m.status_of(&object, None).phase, Some(ces_api::Phase::Failed));
    }
    // One namespace's two rules on one address: priority decides, as for any overlap; no conflict.
    let y = egress_world(&(egress("a", "mine", "203.0.113.7") + &egress("a", "also-mine", "203.0.113.7")));
    assert_eq!(nat_ids(&egress_model(&y, "")), ["ExternalIPRule/a/also-mine", "ExternalIPRule/a/mine"]);
}

#[test]
fn egress_addresses_stay_in_the_pools_the_config_gives() {
    let y = egress_world(
        &(egress("a", "inside", "203.0.113.7")
            + &egress("b", "outside", "198.51.100.9")
            + &egress("c", "own-pool", "192.0.2.10")),
    );
    // Common's pool is 203.0.113.0/24; namespace c (tenant t2) has a pool of its own.
    let conf = "egressAddresses:\n  c: [192.0.2.10-192.0.2.20]\n";
    let with_tenant_pool = TWO_TENANTS.replace(
        "{name: Common, namespaces: 'a,b'}",
        "{name: Common, namespaces: 'a,b', egressAddresses: [203.0.113.0/24]}",
    );
    assert_ne!(with_tenant_pool, TWO_TENANTS);
    let cfg = CesConfig::from_yaml(&format!("{with_tenant_pool}{conf}"), "c").unwrap();
    let m = compile(&load_str(&y, "t.yaml"), &cfg, DEFAULT_CES_NAMESPACE);
    assert_eq!(nat_ids(&m), ["ExternalIPRule/a/inside", "ExternalIPRule/c/own-pool"]);
    let r = reasons(&m, "ExternalIPRule/b/outside");
    assert!(r.iter().any(|(c, msg)| c == "EgressAddressNotInPool" && msg.contains("tenant Common")), "{r:?}");
    // Pools are the administrator's: one address, one owner; a namespace's pool lies in its own tenant's, if any.
    for bad in [
        "egressAddresses:\n  a: [203.0.113.1]\n  b: [203.0.113.0/30]\n",
        "egressAddresses:\n  c: [203.0.113.0/28]\n",
        "egressAddresses:\n  a: [not-an-address]\n",
        "egressAddresses:\n  a: [203.0.113.9-203.0.113.1]\n",
        "egressAddresses:\n  a: [203.0.113.1/24]\n",
    ] {
        assert!(CesConfig::from_yaml(&format!("{with_tenant_pool}{bad}"), "c").is_err(), "{bad}");
    }
    let two_pools =
        with_tenant_pool.replace("routeDomain: {id: 2", "egressAddresses: [203.0.113.128/25], routeDomain: {id: 2");
    assert!(CesConfig::from_yaml(&two_pools, "c").is_err(), "two tenants' pools overlap");
    assert!(CesConfig::from_yaml(&format!("{with_tenant_pool}egressAddresses:\n  a: [203.0.113.8/29]\n"), "c").is_ok());
}
