//! AS3 churn benchmark: `cargo bench -p ces --bench as3`.
//!
//! It starts where the user starts and ends where the user's result appears: a synthetic cluster of 10k pods and 1k
//! rules as YAML files, the real `ces controller` binary watching them, the BIG-IP double (ces-bigip-double) as the
//! device. After the first sync, 100 pod IPs change in one write of the cluster file (as a burst of pod churn
//! would); the figures are the requests and bytes that reached the device for that change, and the time from the
//! write to the device holding the new declarations.
//!
//! Baseline, computed in the same run from the same declarations: the original CES's strategy, which for each rule
//! touched by the change GETs the tenant's declaration and POSTs the whole tenant back (ces-original.md §3.8). Its
//! GET answers and POST bodies are taken as the size of the tenant's declaration before and after the change (the
//! original declares the same objects under the same names). Target: at least 10x fewer bytes, and one request per
//! changed tenant per coalescing window.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ces_as3::Rendered;
use ces_bigip_double::Double;
use ces_synth::{PODS_PER_NAMESPACE, Synth, namespace_name, pod_ip};
use serde_json::{Value, json};

fn schema_dir() -> PathBuf {
    ces_bigip_double::schema_dir()
}

fn render(dir: &Path) -> Rendered {
    let (snap, _) =
        ces_snapshot::manifests::load_paths(&[dir.join("cluster.yaml"), dir.join("policies.yaml")]).unwrap();
    let config = ces_config::CesConfig::from_file(&dir.join("ces-conf.yaml")).unwrap();
    let model = ces_compiler::compile(&snap, &config, "kube-system");
    ces_as3::render(&model, jiff::Timestamp::now())
}

fn tenants(r: &Rendered) -> BTreeMap<String, Value> {
    r.documents.iter().map(|(t, d)| (t.clone(), d["declaration"][t].clone())).collect()
}

/// Changes the IP of pod `j` of namespace `i` to `new`, in its Pod and in the EndpointSlices that name it.
fn move_pods(text: &str, moves: &[(usize, usize, String, String)]) -> String {
    let mut by_pod: BTreeMap<(String, String), (&str, &str)> = BTreeMap::new();
    for (i, j, old, new) in moves {
        by_pod.insert((namespace_name(*i), format!("pod-{j}")), (old.as_str(), new.as_str()));
    }
    let mut out = String::with_capacity(text.len());
    let mut current: Option<(&str, &str)> = None;
    for line in text.lines() {
        let mut line = line.to_string();
        if let Some(rest) = line.strip_prefix("metadata: {name: pod-") {
            let name = format!("pod-{}", rest.split(',').next().unwrap());
            let ns =
                rest.split("namespace: ").nth(1).and_then(|s| s.split([',', '}']).next()).unwrap_or("").to_string();
            current = by_pod.get(&(ns, name)).copied();
        } else if line.starts_with("kind: ") {
            current = None;
        }
        if line.starts_with("status:")
            && let Some((old, new)) = current
        {
            line = line.replace(&format!("\"{old}\""), &format!("\"{new}\""));
        }
        if let Some(t) = line.split("targetRef: {kind: Pod, namespace: ").nth(1) {
            let ns = t.split(',').next().unwrap().to_string();
            let name = t.split("name: ").nth(1).and_then(|s| s.split('}').next()).unwrap_or("").to_string();
            if let Some((old, new)) = by_pod.get(&(ns, name)) {
                line = line.replace(&format!("\"{old}\""), &format!("\"{new}\""));
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn wait_for(d: &Double, want: &BTreeMap<String, Value>, log: &Path) -> Duration {
    let start = Instant::now();
    while d.with(|s| &s.tenants != want) {
        if start.elapsed() > Duration::from_secs(300) {
            panic!("no convergence in 300 s; controller log:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

fn main() {
    let (pods, rules, changes) = (10_000, 1_000, 100);
    let dir = std::env::temp_dir().join(format!("ces-bench-as3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let synth = Synth::generate(pods, rules, 42);
    synth.write_yaml(&dir).unwrap();
    // The synthetic rules include ICMP, which AS3 accepts from 3.56 on.
    let conf = std::fs::read_to_string(dir.join("ces-conf.yaml")).unwrap();
    std::fs::write(dir.join("ces-conf.yaml"), conf.replacen('{', "{\"schemaVersion\":\"3.56.0\",", 1)).unwrap();
    std::fs::create_dir_all(dir.join("creds")).unwrap();
    std::fs::write(dir.join("creds/username"), "admin").unwrap();
    std::fs::write(dir.join("creds/password"), "admin").unwrap();

    let before = render(&dir);
    let d = Double::start(schema_dir());
    d.with(|s| {
        for t in ["tenant-a~rd10", "tenant-b~rd20", "tenant-c~rd30", "Common~0"] {
            s.objects.insert(format!("/mgmt/tm/net/route-domain/~{t}"), json!({}));
        }
    });
    let log = dir.join("controller.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ces"))
        .args(["controller", "--manifests"])
        .arg(dir.join("cluster.yaml"))
        .arg(dir.join("policies.yaml"))
        .arg("--config")
        .arg(dir.join("ces-conf.yaml"))
        .args(["--bigip-url", &d.url(), "--bigip-creds-dir"])
        .arg(dir.join("creds"))
        .arg("--as3-schema")
        .arg(schema_dir())
        .args(["--debounce-ms", "200", "--resync-secs", "3600"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let first = wait_for(&d, &tenants(&before), &log);
    // The pass goes on after the tenants (bindings, save): wait until the device has heard nothing for a second.
    let mut n0 = d.with(|s| s.requests.len());
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let n = d.with(|s| s.requests.len());
        if n == n0 {
            break;
        }
        n0 = n;
    }
    let first_bytes: usize = d.with(|s| s.requests.iter().map(|r| r.bytes + r.response_bytes).sum());
    println!("as3 churn benchmark: {pods} pods, {rules} rules, {} tenants", before.documents.len());
    println!(
        "  first sync: {n0} requests, {first_bytes} bytes, {:.2} s from start to the device holding all tenants",
        first.as_secs_f64()
    );

    // 100 pods move: pod 5 of the first 100 namespaces (spread over the four tenants) gets a new address.
    let moves: Vec<(usize, usize, String, String)> = (0..changes)
        .map(|i| {
            let j = 5;
            let old = pod_ip(i, j).to_string();
            let new = pod_ip(i, j + PODS_PER_NAMESPACE + 20).to_string();
            (i, j, old, new)
        })
        .collect();
    let cluster = std::fs::read_to_string(dir.join("cluster.yaml")).unwrap();
    let moved = move_pods(&cluster, &moves);
    assert_ne!(moved, cluster);
    let tmp = dir.join("cluster.tmp");
    std::fs::write(&tmp, &moved).unwrap();
    let after_files = dir.join("after");
    std::fs::create_dir_all(&after_files).unwrap();
    std::fs::write(after_files.join("cluster.yaml"), &moved).unwrap();
    std::fs::copy(dir.join("policies.yaml"), after_files.join("policies.yaml")).unwrap();
    std::fs::copy(dir.join("ces-conf.yaml"), after_files.join("ces-conf.yaml")).unwrap();
    let after = render(&after_files);
    let want = tenants(&after);
    let t0 = Instant::now();
    std::fs::rename(&tmp, dir.join("cluster.yaml")).unwrap();
    let _ = t0;
    let took = wait_for(&d, &want, &log);

    // Ours: everything that reached the device for the change.
    let (ours_requests, ours_bytes, methods) = d.with(|s| {
        let new = &s.requests[n0..];
        let m: Vec<String> = new.iter().map(|r| format!("{} {}", r.method, r.path)).collect();
        (new.len(), new.iter().map(|r| r.bytes + r.response_bytes).sum::<usize>(), m)
    });
    // The original's: for each rule whose objects changed, GET the tenant + POST the whole tenant.
    let mut touched: BTreeSet<(String, String)> = BTreeSet::new();
    let mut changed_tenants = BTreeSet::new();
    for (t, doc) in &after.documents {
        let (a, b) = (&before.documents[t]["declaration"][t]["Shared"], &doc["declaration"][t]["Shared"]);
        for (name, v) in b.as_object().unwrap() {
            if a.get(name) != Some(v) {
                changed_tenants.insert(t.clone());
                for o in after.origins[t].get(name).into_iter().flatten() {
                    touched.insert((t.clone(), o.to_string()));
                }
            }
        }
    }
    let size = |v: &Value| v.to_string().len();
    let original_bytes: usize = touched
        .iter()
        .map(|(t, _)| {
            let get = size(&json!({"class": "ADC", t.clone(): before.documents[t]["declaration"][t].clone()}));
            get + size(&after.documents[t])
        })
        .sum();
    let original_requests = touched.len() * 2;
    println!(
        "  change: {changes} pod IPs in one write; {} rules touched in {} tenants",
        touched.len(),
        changed_tenants.len()
    );
    println!(
        "  this client:        {ours_requests:>6} requests {ours_bytes:>12} bytes   ({:.2} s from the write to the device holding it)",
        took.as_secs_f64()
    );
    println!(
        "  original strategy:  {original_requests:>6} requests {original_bytes:>12} bytes   (GET + full-tenant POST per touched rule)"
    );
    let ratio = original_bytes as f64 / ours_bytes.max(1) as f64;
    println!(
        "  bytes: {ratio:.0}x fewer (target >= 10x: {}); requests per changed tenant: {:.2} (target 1 per window: {})",
        if ratio >= 10.0 { "met" } else { "NOT met" },
        ours_requests as f64 / changed_tenants.len().max(1) as f64,
        if ours_requests <= changed_tenants.len() { "met" } else { "NOT met" }
    );
    for m in methods {
        println!("    {m}");
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if let Some(p) = text.lines().rfind(|l| l.contains("problem(s) in the policy; load")) {
        println!("  the change's pass (controller log): {}", p.split("in the policy; ").nth(1).unwrap_or(p));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
