//! Synthetic clusters for scale tests and benchmarks.
//!
//! A cluster of `pods` pods and `rules` egress rules, deterministic for a given seed. Its shape follows a large
//! multi-team cluster: 100 pods per namespace, five Services per namespace (each with an EndpointSlice of its ready
//! pods), one namespace in four in each of three route-domain tenants, and rules split 5% cluster, 47.5% namespace,
//! 47.5% service, with selectors, priorities, audit rules and schedules mixed in. The tenants' pod networks overlap,
//! as route domains allow: the n-th namespace of every tenant has the same subnet and pod addresses. One namespace in
//! ten also runs a hostNetwork pod with its node's address. [`Synth::snapshot`] builds the snapshot directly (for benchmarks);
//! [`Synth::write_yaml`] writes the same cluster as manifests and a config (for `ces synth` and the CLI).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use ces_api::{
    Action, ClusterEgressRuleSpec, ExternalServicePort, ExternalServiceSpec, LabelSelector, Mode,
    NamespaceEgressRuleSpec, Schedule, ServiceEgressRuleSpec, TimeWindow, Weekday,
};
use ces_config::CesConfig;
use ces_snapshot::{Endpoint, Namespace, Object, Pod, Service, Snapshot, SnapshotBuilder};

pub const PODS_PER_NAMESPACE: usize = 100;
pub const SERVICES_PER_NAMESPACE: usize = 5;
pub const CLUSTER_EXTERNAL_SERVICES: usize = 50;
pub const TENANTS: [&str; 4] = ["Common", "tenant-a", "tenant-b", "tenant-c"];

/// A small deterministic generator (xorshift64*), so runs are reproducible without a dependency.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

pub struct Synth {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    /// Ready endpoints of each Service, as its EndpointSlice lists them (with `targetRef`s).
    pub endpoints: Vec<(String, String, Vec<Endpoint>)>,
    pub external_services: Vec<Object<ExternalServiceSpec>>,
    pub cluster_rules: Vec<Object<ClusterEgressRuleSpec>>,
    pub namespace_rules: Vec<Object<NamespaceEgressRuleSpec>>,
    pub service_rules: Vec<Object<ServiceEgressRuleSpec>>,
}

fn obj<S>(namespace: Option<&str>, name: String, spec: S) -> Object<S> {
    Object { namespace: namespace.map(str::to_string), name, uid: None, generation: Some(1), origin: None, spec }
}

fn labels(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn selector(key: &str, value: String) -> LabelSelector {
    LabelSelector { match_labels: labels(&[(key, value)]), match_expressions: vec![] }
}

fn port(name: &str, protocol: &str, port: &str) -> ExternalServicePort {
    ExternalServicePort {
        name: Some(name.into()),
        protocol: Some(protocol.into()),
        port: Some(port.into()),
        bandwidth: None,
    }
}

/// The index of namespace `i` inside its tenant: namespaces are dealt to the tenants in turn.
pub fn index_in_tenant(i: usize) -> usize {
    i / TENANTS.len()
}

/// The pod IP of pod `j` of namespace `i`: 10.(l/256).(l%256).(j+1), where `l` is the namespace's index in its
/// tenant. Unique inside a tenant; the same in every tenant (overlapping pod networks).
pub fn pod_ip(i: usize, j: usize) -> IpAddr {
    let l = index_in_tenant(i);
    IpAddr::V4(Ipv4Addr::new(10, (l / 256) as u8, (l % 256) as u8, (j + 1) as u8))
}

/// The node address of the hostNetwork pod of namespace `i` (one namespace in ten has one).
pub fn node_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(172, 31, (i / 256) as u8, (i % 256) as u8))
}

pub fn namespace_name(i: usize) -> String {
    format!("ns-{i:05}")
}

impl Synth {
    pub fn generate(pods: usize, rules: usize, seed: u64) -> Synth {
        let mut rng = Rng::new(seed);
        let ns_count = pods.div_ceil(PODS_PER_NAMESPACE).max(1);
        assert!(ns_count <= 4 * 65536, "at most 262144 namespaces");
        let mut s = Synth {
            namespaces: Vec::with_capacity(ns_count),
            pods: Vec::with_capacity(pods),
            services: Vec::new(),
            endpoints: Vec::new(),
            external_services: Vec::new(),
            cluster_rules: Vec::new(),
            namespace_rules: Vec::new(),
            service_rules: Vec::new(),
        };
        for i in 0..ns_count {
            let name = namespace_name(i);
            let l = index_in_tenant(i);
            let cidr = format!("10.{}.{}.0/24", l / 256, l % 256).parse().unwrap();
            s.namespaces.push(Namespace {
                name: name.clone(),
                labels: labels(&[("team", format!("team-{}", i % 10)), ("env", ["prod", "dev", "test"][i % 3].into())]),
                cidrs: vec![cidr],
            });
            let here = PODS_PER_NAMESPACE.min(pods - i * PODS_PER_NAMESPACE);
            for j in 0..here {
                s.pods.push(Pod {
                    namespace: name.clone(),
                    name: format!("pod-{j}"),
                    labels: labels(&[("app", format!("app-{}", j % SERVICES_PER_NAMESPACE))]),
                    ips: vec![pod_ip(i, j)],
                    ready: j % 17 != 0,
                    host_network: false,
                });
            }
            if i % 10 == 0 {
                s.pods.push(Pod {
                    namespace: name.clone(),
                    name: "node-agent".into(),
                    labels: labels(&[("app", "node-agent".into())]),
                    ips: vec![node_ip(i)],
                    ready: true,
                    host_network: true,
                });
            }
            for k in 0..SERVICES_PER_NAMESPACE {
                s.services.push(Service {
                    namespace: name.clone(),
                    name: format!("svc-{k}"),
                    selector: Some(labels(&[("app", format!("app-{k}"))])),
                });
                let ready = (0..here)
                    .filter(|j| j % SERVICES_PER_NAMESPACE == k && j % 17 != 0)
                    .map(|j| Endpoint { ip: pod_ip(i, j), pod: Some((name.clone(), format!("pod-{j}"))) })
                    .collect();
                s.endpoints.push((name.clone(), format!("svc-{k}"), ready));
            }
            s.external_services.push(obj(
                Some(&name),
                "ext-ip".into(),
                ExternalServiceSpec {
                    addresses: vec![
                        format!("203.0.{}.0/26", i % 256),
                        format!("198.51.{}.10-198.51.{}.20", i % 256, i % 256),
                    ],
                    ports: vec![port("https", "tcp", "443,8443"), port("dns", "UDP", "53")],
                },
            ));
            s.external_services.push(obj(
                Some(&name),
                "ext-fqdn".into(),
                ExternalServiceSpec {
                    addresses: vec![format!("api{i}.example.com"), format!("*.svc{i}.example.net")],
                    ports: vec![port("https", "tcp", "443")],
                },
            ));
        }
        for k in 0..CLUSTER_EXTERNAL_SERVICES {
            s.external_services.push(obj(
                Some("kube-system"),
                format!("global-{k}"),
                ExternalServiceSpec {
                    addresses: vec![format!("198.18.{k}.0/24")],
                    ports: vec![port("https", "tcp", "443"), port("ntp", "udp", "123")],
                },
            ));
        }

        let actions = [Action::Drop, Action::AcceptDecisively, Action::Reject, Action::Accept];
        let cluster = (rules / 20).max(1).min(rules);
        let namespace = (rules - cluster) / 2;
        let service = rules - cluster - namespace;
        for k in 0..cluster {
            s.cluster_rules.push(obj(
                None,
                format!("cluster-{k}"),
                ClusterEgressRuleSpec {
                    action: actions[k % 4],
                    logging: Some(k % 3 == 0),
                    external_services: vec![format!("global-{}", k % CLUSTER_EXTERNAL_SERVICES)],
                    priority: Some((k % 7) as i32 * 10),
                    mode: (k % 10 == 9).then_some(Mode::Audit),
                    schedule: None,
                    namespace_selector: (k % 5 == 0).then(|| selector("team", format!("team-{}", k % 10))),
                },
            ));
        }
        let office_hours = Schedule {
            timezone: Some("Europe/Paris".into()),
            windows: vec![TimeWindow {
                days: vec![Weekday::Mon, Weekday::Tue, Weekday::Wed, Weekday::Thu, Weekday::Fri],
                start: "08:00".into(),
                end: "18:00".into(),
            }],
        };
        for k in 0..namespace {
            let ns = namespace_name(rng.below(ns_count));
            let exts = match k % 3 {
                0 => vec!["ext-ip".to_string()],
                1 => vec!["ext-fqdn".to_string()],
                _ => vec!["ext-fqdn".to_string(), "ext-ip".to_string()],
            };
            s.namespace_rules.push(obj(
                Some(&ns),
                format!("nsr-{k}"),
                NamespaceEgressRuleSpec {
                    action: actions[rng.below(4)],
                    logging: None,
                    external_services: exts,
                    priority: (k % 4 == 0).then_some(rng.below(2000) as i32),
                    mode: (k % 25 == 0).then_some(Mode::Audit),
                    schedule: (k % 8 == 0).then(|| office_hours.clone()),
                    pod_selector: (k % 4 == 1).then(|| selector("app", format!("app-{}", k % SERVICES_PER_NAMESPACE))),
                },
            ));
        }
        for k in 0..service {
            let ns = namespace_name(rng.below(ns_count));
            s.service_rules.push(obj(
                Some(&ns),
                format!("svcr-{k}"),
                ServiceEgressRuleSpec {
                    action: if k % 6 == 0 { Action::Drop } else { Action::Accept },
                    logging: None,
                    service: format!("svc-{}", k % SERVICES_PER_NAMESPACE),
                    external_services: vec![if k % 2 == 0 { "ext-ip" } else { "ext-fqdn" }.to_string()],
                    priority: None,
                    mode: None,
                    schedule: None,
                },
            ));
        }
        s
    }

    /// The config of a synthetic cluster: route domains on, namespaces spread over four tenants.
    pub fn config(&self) -> CesConfig {
        let mut yaml = String::from("clusterName: synth\nisSupportRouteDomain: true\ntenant:\n");
        for (t, name) in TENANTS.iter().enumerate() {
            let nss: Vec<&str> = self
                .namespaces
                .iter()
                .enumerate()
                .filter(|(i, _)| i % TENANTS.len() == t)
                .map(|(_, n)| n.name.as_str())
                .collect();
            let _ = writeln!(yaml, "  - name: {name}\n    namespaces: \"{}\"", nss.join(","));
            if t > 0 {
                let _ = writeln!(yaml, "    routeDomain: {{id: {}, name: rd{}}}", t * 10, t * 10);
            }
        }
        CesConfig::from_yaml(&yaml, "<synthetic>").expect("the synthetic config is valid")
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut b = SnapshotBuilder::new();
        b.add_namespace(Namespace { name: "kube-system".into(), ..Default::default() }, None);
        for n in &self.namespaces {
            b.add_namespace(n.clone(), None);
        }
        for p in &self.pods {
            b.add_pod(p.clone(), None);
        }
        for svc in &self.services {
            b.add_service(svc.clone(), None);
        }
        for (ns, svc, eps) in &self.endpoints {
            b.add_endpoints(ns, svc, eps.iter().cloned());
        }
        for e in &self.external_services {
            b.add_external_service(e.clone());
        }
        for r in &self.cluster_rules {
            b.add_cluster_rule(r.clone());
        }
        for r in &self.namespace_rules {
            b.add_namespace_rule(r.clone());
        }
        for r in &self.service_rules {
            b.add_service_rule(r.clone());
        }
        b.build()
    }

    /// Writes `cluster.yaml`, `policies.yaml` and `ces-conf.yaml` into `dir`.
    pub fn write_yaml(&self, dir: &std::path::Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut cluster = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: kube-system}\n");
        for n in &self.namespaces {
            let cidrs: Vec<String> = n.cidrs.iter().map(|c| c.to_string()).collect();
            let _ = write!(
                cluster,
                "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n  labels: {}\n  annotations: {{ovn.kubernetes.io/cidr: \"{}\"}}\n",
                n.name,
                flow_map(&n.labels),
                cidrs.join(",")
            );
        }
        for p in &self.pods {
            let ips: Vec<String> = p.ips.iter().map(|ip| format!("{{ip: \"{ip}\"}}")).collect();
            let _ = write!(
                cluster,
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, labels: {}}}\nspec: {{hostNetwork: {}, containers: [{{name: app, image: app}}]}}\nstatus: {{phase: Running, conditions: [{{type: Ready, status: \"{}\"}}], podIPs: [{}]}}\n",
                p.name,
                p.namespace,
                flow_map(&p.labels),
                p.host_network,
                if p.ready { "True" } else { "False" },
                ips.join(", ")
            );
        }
        for (ns, svc, eps) in &self.endpoints {
            let _ = write!(
                cluster,
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nendpoints:\n"
            );
            for e in eps {
                let (pns, pname) = e.pod.as_ref().expect("synthetic endpoints are pods");
                let _ = writeln!(
                    cluster,
                    "- {{addresses: [\"{}\"], conditions: {{ready: true}}, targetRef: {{kind: Pod, namespace: {pns}, name: {pname}}}}}",
                    e.ip
                );
            }
        }
        for svc in &self.services {
            let sel = svc.selector.as_ref().map(flow_map).unwrap_or_else(|| "{}".into());
            let _ = write!(
                cluster,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec: {{selector: {sel}}}\n",
                svc.name, svc.namespace
            );
        }
        std::fs::write(dir.join("cluster.yaml"), cluster)?;

        let mut policies = String::new();
        let mut doc = |kind: &str, o_ns: Option<&String>, name: &str, spec: String| {
            let meta = match o_ns {
                Some(ns) => format!("{{name: {name}, namespace: {ns}, generation: 1}}"),
                None => format!("{{name: {name}, generation: 1}}"),
            };
            let _ = write!(
                policies,
                "---\napiVersion: kubeovn.io/v1alpha1\nkind: {kind}\nmetadata: {meta}\nspec: {spec}\n"
            );
        };
        for e in &self.external_services {
            doc("ExternalService", e.namespace.as_ref(), &e.name, to_json(&e.spec));
        }
        for r in &self.cluster_rules {
            doc("ClusterEgressRule", None, &r.name, to_json(&r.spec));
        }
        for r in &self.namespace_rules {
            doc("NamespaceEgressRule", r.namespace.as_ref(), &r.name, to_json(&r.spec));
        }
        for r in &self.service_rules {
            doc("ServiceEgressRule", r.namespace.as_ref(), &r.name, to_json(&r.spec));
        }
        std::fs::write(dir.join("policies.yaml"), policies)?;

        let conf = serde_json::to_string(&self.config()).expect("config serialises");
        std::fs::write(dir.join("ces-conf.yaml"), conf)
    }
}

/// A spec as JSON text, which is valid YAML.
fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("specs serialise")
}

fn flow_map(m: &BTreeMap<String, String>) -> String {
    let items: Vec<String> = m.iter().map(|(k, v)| format!("{k}: \"{v}\"")).collect();
    format!("{{{}}}", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_and_determinism() {
        let a = Synth::generate(1_000, 200, 7);
        assert_eq!(a.pods.len(), 1_000 + 1, "and one hostNetwork pod");
        assert_eq!(a.namespaces.len(), 10);
        assert_eq!(a.cluster_rules.len() + a.namespace_rules.len() + a.service_rules.len(), 200);
        assert_eq!(a.cluster_rules.len(), 10);
        let b = Synth::generate(1_000, 200, 7);
        assert_eq!(a.namespace_rules, b.namespace_rules);
        let c = Synth::generate(1_000, 200, 8);
        assert_ne!(a.namespace_rules, c.namespace_rules, "the seed matters");
        let snap = a.snapshot();
        assert!(snap.diagnostics.is_empty());
        assert_eq!(snap.pods.len(), 1_001);
    }

    #[test]
    fn written_manifests_compile_to_the_same_model_as_the_direct_snapshot() {
        let s = Synth::generate(600, 120, 3);
        let dir = std::env::temp_dir().join(format!("ces-synth-{}", std::process::id()));
        s.write_yaml(&dir).unwrap();
        let (loaded, _) =
            ces_snapshot::manifests::load_paths(&[dir.join("cluster.yaml"), dir.join("policies.yaml")]).unwrap();
        let config = CesConfig::from_file(&dir.join("ces-conf.yaml")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(config, s.config());
        let from_yaml = ces_compiler::compile(&loaded, &config, "kube-system");
        let direct = ces_compiler::compile(&s.snapshot(), &s.config(), "kube-system");
        assert!(from_yaml.errors().next().is_none(), "{:?}", from_yaml.diagnostics);
        // Compared as JSON text, so that a failure prints a readable first difference rather than two whole models.
        let (a, b) =
            (serde_json::to_string_pretty(&from_yaml).unwrap(), serde_json::to_string_pretty(&direct).unwrap());
        if let Some((i, (x, y))) = a.lines().zip(b.lines()).enumerate().find(|(_, (x, y))| x != y) {
            panic!("the models differ at line {i}: `{x}` (from YAML) vs `{y}` (direct)");
        }
        assert_eq!(from_yaml, direct);
        assert_eq!(direct.cluster_rules.len(), 6);
    }

    #[test]
    fn config_spreads_namespaces_over_tenants() {
        let s = Synth::generate(800, 10, 1);
        let c = s.config();
        assert_eq!(c.tenant_of(&namespace_name(0)), "Common");
        assert_eq!(c.tenant_of(&namespace_name(1)), "tenant-a");
        assert_eq!(c.tenant_of(&namespace_name(7)), "tenant-c");
    }

    #[test]
    fn pod_networks_overlap_across_tenants_and_not_inside_one() {
        let s = Synth::generate(2_000, 10, 1);
        let c = s.config();
        let mut seen: BTreeMap<(String, IpAddr), String> = BTreeMap::new();
        let mut across = 0;
        for p in s.pods.iter().filter(|p| !p.host_network) {
            let t = c.tenant_of(&p.namespace).to_string();
            if let Some(other) = seen.insert((t, p.ips[0]), p.name.clone()) {
                panic!("{} and {other} share {} inside one tenant", p.name, p.ips[0]);
            }
        }
        for (t, ip) in seen.keys() {
            across += seen.keys().filter(|(u, i)| u != t && i == ip).count();
        }
        assert!(across > 1000, "the tenants' pod networks should overlap: {across}");
    }
}
