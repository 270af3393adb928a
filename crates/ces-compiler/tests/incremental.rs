//! `recompile_churn` against the whole compile, on generated pod and endpoint churn in a world built to make it hard:
//! two route-domain tenants whose subnets overlap, a subnet shared inside a tenant, IPv6, a namespace only pods name,
//! Services with and without endpoint objects (endpoints naming pods by address and by `targetRef`, of their own
//! namespace and of others, at addresses of no pod, in another namespace's subnet), pod and namespace selectors, a
//! host name and a schedule among the rules, hostNetwork and unready pods, several pods sharing an address, endpoints
//! of Services that do not exist, and changes in any order; in some cases the endpoints follow the pods as the
//! endpoints controller keeps them. Either the patched model equals the whole compile exactly, or the patch declines
//! and leaves the model untouched; both must happen often.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::IpAddr;

use ces_compiler::{compile, recompile_churn};
use ces_config::CesConfig;
use ces_snapshot::{Churn, Endpoint, Key, Pod, PodChange, Snapshot};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const CONFIG: &str = r#"
clusterName: k8s
isSupportRouteDomain: true
tenant:
  - name: Common
    namespaces: "c1"
  - name: ta
    namespaces: "a1,a2,a3,a4"
    routeDomain: {id: 2, name: rd2}
  - name: tb
    namespaces: "b1,b2"
    routeDomain: {id: 3, name: rd3}
"#;

/// Namespaces: name, kube-ovn subnets, team label. a1 and a3 share a subnet inside tenant ta; b1 has the same subnet
/// in tenant tb; a4's subnet is a single address, its Service web's endpoint; x9 has no Namespace object (only its
/// pods name it). a4 has no pods (its pods' churn always takes the whole path).
const NAMESPACES: [(&str, &str, &str); 7] = [
    ("a1", "10.1.0.0/24,fd00:1::/120", "red"),
    ("a2", "10.2.0.0/24", "blue"),
    ("a3", "10.1.0.0/24", "red"),
    ("b1", "10.1.0.0/24", "red"),
    ("b2", "", "blue"),
    ("c1", "10.3.0.0/24", "blue"),
    ("a4", "10.9.0.7/32", "blue"),
];
const POD_NAMESPACES: [&str; 7] = ["a1", "a2", "a3", "b1", "b2", "c1", "x9"];

/// The addresses pods take: in subnets, outside any, endpoint addresses, IPv6.
const POOL: [&str; 16] = [
    "10.1.0.1",
    "10.1.0.2",
    "10.1.0.3",
    "10.1.0.5",
    "10.2.0.1",
    "10.2.0.2",
    "10.3.0.1",
    "10.3.0.2",
    "10.9.0.1",
    "10.9.0.2",
    "10.9.0.3",
    "10.9.0.4",
    "10.9.0.7",
    "fd00:1::1",
    "fd00:1::2",
    "fd00:9::1",
];

fn world() -> String {
    let mut y = String::new();
    let exsvc = |ns: &str| {
        format!(
            "---\napiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {{name: api, namespace: {ns}}}\nspec: {{addresses: [203.0.113.0/24, 2001:db8::1, api.example.com], ports: [{{protocol: tcp, port: \"443\"}}]}}\n"
        )
    };
    y += &exsvc("kube-system");
    for (i, (ns, cidr, team)) in NAMESPACES.into_iter().enumerate() {
        let annotations = if cidr.is_empty() {
            String::new()
        } else {
            format!(", annotations: {{ovn.kubernetes.io/cidr: \"{cidr}\"}}")
        };
        y += &format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{team: {team}}}{annotations}}}\n"
        );
        y += &exsvc(ns);
        for (svc, selector) in [("web", "{app: web}"), ("db", "{app: db}")] {
            y += &format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {svc}, namespace: {ns}}}\nspec: {{selector: {selector}}}\n"
            );
        }
        y += &format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: none, namespace: {ns}}}\nspec: {{}}\n");
        // web has endpoints: an address of the pool of its own (10.9.0.1 to .6), one that names a pod of this
        // namespace (the same address in every namespace), and, in c1, an address no namespace's pods usually have.
        let extra = if ns == "c1" { "\n  - {ip: 10.9.0.7}" } else { "" };
        y += &format!(
            "---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: web, namespace: {ns}}}\nsubsets:\n- addresses:\n  - {{ip: 10.9.0.{}}}\n  - {{ip: 10.1.0.5, targetRef: {{kind: Pod, namespace: {ns}, name: p1}}}}{extra}\n",
            i + 1
        );
        for (rule, selector) in [
            ("all", ""),
            ("web", "\n  podSelector: {matchLabels: {app: web}}"),
            ("db", "\n  podSelector: {matchExpressions: [{key: app, operator: In, values: [db]}]}"),
        ] {
            y += &format!(
                "---\napiVersion: kubeovn.io/v1alpha1\nkind: NamespaceEgressRule\nmetadata: {{name: {rule}, namespace: {ns}}}\nspec:\n  action: accept\n  externalServices: [api]{selector}\n"
            );
        }
        for svc in ["web", "db", "none"] {
            y += &format!(
                "---\napiVersion: kubeovn.io/v1alpha1\nkind: ServiceEgressRule\nmetadata: {{name: to-{svc}, namespace: {ns}}}\nspec: {{action: drop, service: {svc}, externalServices: [api]}}\n"
            );
        }
    }
    for (name, selector) in [
        ("red", "\n  namespaceSelector: {matchLabels: {team: red}}"),
        ("blue", "\n  namespaceSelector: {matchLabels: {team: blue}}"),
        // Only in office hours, Berlin time.
        (
            "everyone",
            "\n  schedule: {timezone: Europe/Berlin, windows: [{days: [Mon, Tue], start: \"09:00\", end: \"17:00\"}]}",
        ),
    ] {
        y += &format!(
            "---\napiVersion: kubeovn.io/v1alpha1\nkind: ClusterEgressRule\nmetadata: {{name: {name}}}\nspec:\n  action: drop\n  externalServices: [api]{selector}\n"
        );
    }
    y
}

/// A generated pod: namespace, name, addresses (indexes into POOL), app label, ready, hostNetwork.
type PodSpec = (usize, usize, Vec<usize>, usize, bool, bool);

fn pod((ns, name, ips, app, ready, host): &PodSpec) -> Pod {
    let mut labels = BTreeMap::new();
    match app % 3 {
        0 => {}
        1 => {
            labels.insert("app".to_string(), "web".to_string());
        }
        _ => {
            labels.insert("app".to_string(), "db".to_string());
        }
    }
    let mut addrs: Vec<IpAddr> = ips.iter().map(|i| POOL[*i].parse().unwrap()).collect();
    addrs.dedup();
    Pod {
        namespace: POD_NAMESPACES[*ns].to_string(),
        name: format!("p{name}"),
        labels,
        ips: addrs,
        ready: *ready,
        host_network: *host,
    }
}

fn pod_spec() -> impl Strategy<Value = PodSpec> {
    (
        0..POD_NAMESPACES.len(),
        0usize..5,
        prop::collection::vec(0..POOL.len(), 0..3),
        0usize..3,
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.05),
    )
}

/// A generated endpoint: an address (index into POOL), and the pod it names, if any: (same namespace as its Service,
/// else this namespace index; pod name).
type EpSpec = (usize, Option<(bool, usize, usize)>);
/// A Service's endpoints set to a list (`None`: no endpoint object): namespace (index into NAMESPACES), Service
/// (`web`, `db`, `none`, or `ghost`, which does not exist).
type EndpointsSpec = (usize, usize, Option<Vec<EpSpec>>);
const SERVICES: [&str; 4] = ["web", "db", "none", "ghost"];

fn endpoints_spec() -> impl Strategy<Value = EndpointsSpec> {
    let ep =
        (0..POOL.len(), prop::option::weighted(0.6, (prop::bool::weighted(0.8), 0..POD_NAMESPACES.len(), 0usize..5)));
    (0..NAMESPACES.len(), 0..SERVICES.len(), prop::option::weighted(0.85, prop::collection::vec(ep, 0..4)))
}

fn endpoints((ns, svc, list): &EndpointsSpec) -> (Key, Option<Vec<Endpoint>>) {
    let ns = NAMESPACES[*ns].0;
    let list = list.as_ref().map(|eps| {
        let mut v: Vec<Endpoint> = eps
            .iter()
            .map(|(ip, pod)| Endpoint {
                ip: POOL[*ip].parse().unwrap(),
                pod: pod.map(|(same, pns, name)| {
                    ((if same { ns } else { POD_NAMESPACES[pns] }).to_string(), format!("p{name}"))
                }),
            })
            .collect();
        v.sort();
        v.dedup();
        v
    });
    ((ns.to_string(), SERVICES[*svc].to_string()), list)
}

/// The endpoints the endpoints controller keeps for `web` and `db` of every namespace: the ready pods their selectors
/// pick (not on the host network), by address, naming the pod.
fn controller_endpoints(snap: &Snapshot) -> BTreeMap<Key, Vec<Endpoint>> {
    let mut out = BTreeMap::new();
    for (ns, _, _) in NAMESPACES {
        for app in ["web", "db"] {
            let mut v: Vec<Endpoint> = snap
                .pods_in(ns)
                .iter()
                .filter(|p| p.ready && !p.host_network && p.labels.get("app").map(String::as_str) == Some(app))
                .flat_map(|p| {
                    p.ips.iter().map(|ip| Endpoint { ip: *ip, pod: Some((p.namespace.clone(), p.name.clone())) })
                })
                .collect();
            v.sort();
            v.dedup();
            out.insert((ns.to_string(), app.to_string()), v);
        }
    }
    out
}

/// A case: pods, endpoints set before, then the churn: pod changes (a new version of a pod, possibly a new pod, or a
/// deletion), endpoint changes, and whether the endpoints follow the pods as the endpoints controller keeps them.
/// The last element rotates the churn's lists, so that their order is not always the snapshot's.
type Case = (Vec<PodSpec>, Vec<EndpointsSpec>, Vec<(PodSpec, bool)>, Vec<EndpointsSpec>, bool, usize);

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(pod_spec(), 0..24),
        prop::collection::vec(endpoints_spec(), 0..3),
        prop::collection::vec((pod_spec(), prop::bool::weighted(0.2)), 0..4),
        prop::collection::vec(endpoints_spec(), 0..3),
        prop::bool::weighted(0.5),
        0usize..8,
    )
}

fn with_pods(base: &Snapshot, specs: &[PodSpec]) -> Snapshot {
    let mut s = base.clone();
    let mut pods: BTreeMap<(String, String), Pod> = BTreeMap::new();
    for spec in specs {
        let p = pod(spec);
        pods.insert((p.namespace.clone(), p.name.clone()), p);
    }
    s.pods = pods.into_values().collect();
    s
}

fn set_endpoints(s: &mut Snapshot, (key, list): (Key, Option<Vec<Endpoint>>)) {
    match list {
        Some(v) => s.endpoints.insert(key, v),
        None => s.endpoints.remove(&key),
    };
}

#[test]
fn patched_models_equal_whole_compiles_on_generated_churn() {
    let base = ces_snapshot::manifests::load_str(&world(), "world.yaml");
    assert!(base.diagnostics.is_empty(), "{:?}", base.diagnostics);
    let config = CesConfig::from_yaml(CONFIG, "ces-conf.yaml").unwrap();
    let m = compile(&base, &config, "kube-system");
    assert!(
        m.cluster_rules.iter().any(|r| r.schedule.is_some()),
        "the world has a scheduled rule: {:?}",
        m.diagnostics
    );
    assert!(m.destination_sets.values().any(|d| d.addresses.iter().any(|a| a.is_name())), "and a host name");
    // Patched and declined: all cases, cases with endpoint changes, cases where the endpoints follow the pods.
    let counts: Cell<[usize; 6]> = Cell::new([0; 6]);
    let count = |i: usize| {
        let mut c = counts.get();
        c[i] += 1;
        counts.set(c);
    };
    let mut runner = TestRunner::new(Config { cases: 2500, ..Config::default() });
    runner
        .run(&case(), |(pods, initial, change_specs, endpoint_specs, follow, rotate)| {
            let mut before = with_pods(&base, &pods);
            if follow {
                before.endpoints.extend(controller_endpoints(&before));
            }
            for e in &initial {
                set_endpoints(&mut before, endpoints(e));
            }
            let mut changes: Vec<PodChange> = Vec::new();
            for (spec, delete) in &change_specs {
                let p = pod(spec);
                if changes.iter().any(|c| c.key() == Some((&p.namespace, &p.name))) {
                    continue;
                }
                let held = before.pod(&p.namespace, &p.name).cloned();
                let after = if *delete { None } else { Some(p) };
                if held.is_none() && after.is_none() {
                    continue;
                }
                changes.push(PodChange { before: held, after });
            }
            let mut moved = before.clone();
            moved.apply_pod_changes(&changes).map_err(TestCaseError::fail)?;
            if follow {
                moved.endpoints.extend(controller_endpoints(&moved));
            }
            for e in &endpoint_specs {
                set_endpoints(&mut moved, endpoints(e));
            }
            // The churn as a source would find it, in the generator's order of pod changes, both lists rotated.
            let mut churn = Churn { pods: changes, endpoints: before.endpoint_changes(&moved) };
            let (np, ne) = (churn.pods.len().max(1), churn.endpoints.len().max(1));
            churn.pods.rotate_left(rotate % np);
            churn.endpoints.rotate_left(rotate % ne);
            let mut after = before.clone();
            after.apply_churn(&churn).map_err(TestCaseError::fail)?;
            prop_assert_eq!(&after, &moved, "the churn moves the snapshot where it went");
            // Patched or declined, then the same among cases with endpoint changes, and among pods with their
            // endpoints following.
            let tally = |declined: usize| {
                count(declined);
                if !churn.endpoints.is_empty() {
                    count(2 + declined);
                }
                if follow && !churn.pods.is_empty() {
                    count(4 + declined);
                }
            };
            let m0 = compile(&before, &config, "kube-system");
            let m1 = compile(&after, &config, "kube-system");
            let mut m = m0.clone();
            match recompile_churn(&mut m, &after, &config, &churn) {
                Some(delta) => {
                    tally(0);
                    prop_assert_eq!(&m, &m1, "the patched model differs from the whole compile");
                    let mut moved: Vec<&String> = m1
                        .address_sets
                        .iter()
                        .filter(|(n, s)| m0.address_sets.get(*n) != Some(s))
                        .map(|(n, _)| n)
                        .collect();
                    moved.sort();
                    let mut said: Vec<&String> = delta.sets.iter().collect();
                    said.sort();
                    prop_assert_eq!(said, moved, "the delta names exactly the sets that changed");
                    let pods_moved = delta.pods.iter().all(|(b, a)| b != a);
                    prop_assert!(pods_moved);
                }
                None => {
                    tally(1);
                    prop_assert_eq!(&m, &m0, "a declined patch leaves the model as it was");
                }
            }
            Ok(())
        })
        .unwrap();
    let [p, d, pe, de, pf, df] = counts.get();
    let all = format!("patched {p}, declined {d}; with endpoint changes {pe} / {de}; following the pods {pf} / {df}");
    eprintln!("{all}");
    assert!(p >= 400, "the patch must apply to plain churn: {all}");
    assert!(d >= 100, "the generator must reach the cases the patch declines: {all}");
    assert!(pe >= 150 && de >= 50, "endpoint churn must be patched and declined: {all}");
    assert!(pf >= 50, "pods with their endpoints following must be patched: {all}");
}

#[test]
fn pod_changes_are_applied_in_place_and_refused_whole() {
    let mut s = Snapshot::default();
    let p = |ns: &str, name: &str, ip: &str| Pod {
        namespace: ns.into(),
        name: name.into(),
        ips: vec![ip.parse().unwrap()],
        ..Pod::default()
    };
    let add = |x: Pod| PodChange { before: None, after: Some(x) };
    s.apply_pod_changes(&[add(p("b", "x", "10.0.0.1")), add(p("a", "y", "10.0.0.2")), add(p("a", "b", "10.0.0.3"))])
        .unwrap();
    let keys: Vec<(&str, &str)> = s.pods.iter().map(|p| (p.namespace.as_str(), p.name.as_str())).collect();
    assert_eq!(keys, [("a", "b"), ("a", "y"), ("b", "x")], "kept sorted");
    let moved = PodChange { before: Some(p("a", "y", "10.0.0.2")), after: Some(p("a", "y", "10.0.0.9")) };
    s.apply_pod_changes(std::slice::from_ref(&moved)).unwrap();
    assert_eq!(s.pod("a", "y").unwrap().ips, ["10.0.0.9".parse::<IpAddr>().unwrap()]);
    let held = s.clone();
    // A stale `before`, a duplicate, and the same pod twice are refused, and nothing of them applied.
    let deleted = PodChange { before: Some(p("a", "b", "10.0.0.3")), after: None };
    assert!(s.apply_pod_changes(&[deleted.clone(), moved]).is_err(), "stale before");
    assert!(s.apply_pod_changes(&[deleted.clone(), add(p("b", "x", "10.0.0.4"))]).is_err(), "a duplicate");
    assert!(s.apply_pod_changes(&[deleted.clone(), deleted.clone()]).is_err(), "twice");
    assert_eq!(s, held);
    s.apply_pod_changes(&[deleted]).unwrap();
    assert!(s.pod("a", "b").is_none());
}
