//! Kubernetes churn benchmark: `cargo bench -p ces --bench kube` (CES_BENCH_PODS=N to change the size; default
//! 100k pods, 1k rules).
//!
//! It starts where the user's change starts, a pod event in the API server, and ends where its result appears, the
//! request that carries the pod's new address reaching the BIG-IP: the synthetic cluster is loaded into the fake API
//! server (ces-fake-apiserver), the real `ces controller --kubernetes` watches it and programs the BIG-IP double;
//! then pods that ServiceEgressRules' Services select change address at 100 events per second, each followed by its
//! EndpointSlice (as the endpoints controller writes it). For each event, two times: from the pod's write to the first
//! BIG-IP request holding the new address, and from the slice's write to the first request holding it in the
//! Service's source list.
//!
//! Pod and EndpointSlice events take the churn path (the source moves pods and endpoints in the kept snapshot, the
//! compiler patches the model, the backend PATCHes the address lists built from the moved sets). Baselines, in the same run: a change that takes
//! the whole path (an ExternalService address: every object assembled, the whole cluster compiled and rendered), from
//! the API server's write to the BIG-IP request; and a pass's snapshot built the full-rebuild way (every kept object
//! parsed again, as the manifests source does) against objects parsed once, when their event arrives.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ces_bigip_double::Double;
use ces_fake_apiserver::FakeApiServer;
use ces_synth::Synth;
use serde_json::{Value, json};

fn schema_dir() -> PathBuf {
    ces_bigip_double::schema_dir()
}

fn docs(text: &str) -> Vec<Value> {
    text.split("\n---\n")
        .filter(|d| d.contains("kind:"))
        .map(|d| serde_saphyr::from_str::<Value>(d.trim_start_matches("---\n")).unwrap())
        .collect()
}

/// Whether an AS3 request body holds `needle` (a quoted address) in a Service's source list (`..._ep_..._src_address`):
/// a PATCH operation on such a list, or such a list in a declaration.
fn in_service_list(body: &Value, needle: &str) -> bool {
    let list = |name: &str| name.contains("_ep_") && name.ends_with("_src_address");
    match body {
        Value::Array(ops) if ops.iter().all(|op| op.get("op").is_some()) => ops.iter().any(|op| {
            op["path"].as_str().is_some_and(|p| list(p.rsplit('/').next().unwrap_or_default()))
                && op["value"].to_string().contains(needle)
        }),
        Value::Object(m) => {
            m.iter().any(|(k, v)| if list(k) { v.to_string().contains(needle) } else { in_service_list(v, needle) })
        }
        Value::Array(items) => items.iter().any(|v| in_service_list(v, needle)),
        _ => false,
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

fn main() {
    let pods: usize = std::env::var("CES_BENCH_PODS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let rules = 1_000;
    let dir = std::env::temp_dir().join(format!("ces-bench-kube-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    Synth::generate(pods, rules, 7).write_yaml(&dir).unwrap();
    let conf = std::fs::read_to_string(dir.join("ces-conf.yaml")).unwrap();
    std::fs::write(dir.join("ces-conf.yaml"), conf.replacen('{', "{\"schemaVersion\":\"3.56.0\",", 1)).unwrap();
    std::fs::create_dir_all(dir.join("creds")).unwrap();
    std::fs::write(dir.join("creds/username"), "admin").unwrap();
    std::fs::write(dir.join("creds/password"), "admin").unwrap();

    let t = Instant::now();
    let objects: Vec<Value> = ["cluster.yaml", "policies.yaml"]
        .iter()
        .flat_map(|f| docs(&std::fs::read_to_string(dir.join(f)).unwrap()))
        .collect();
    let api = FakeApiServer::start();
    for crd in ces_api::all_crds() {
        api.install_crd(&serde_json::to_value(crd).unwrap());
    }
    for o in &objects {
        api.apply(o.clone());
    }
    api.write_kubeconfig(&dir.join("kubeconfig"));
    println!(
        "kube churn benchmark: {pods} pods, {rules} rules, {} objects in the fake API server ({:.1} s to load)",
        objects.len(),
        t.elapsed().as_secs_f64()
    );

    // Baseline in the same run: a snapshot rebuilt from every object, parsed again, vs assembled from parsed ones.
    let reduced: Vec<(Value, String)> = objects
        .iter()
        .map(|o| {
            let kind = o["kind"].as_str().unwrap();
            let k = [ces_kube::NAMESPACE, ces_kube::POD, ces_kube::SERVICE, ces_kube::ENDPOINT_SLICE]
                .into_iter()
                .chain(ces_kube::CES_KINDS)
                .find(|k| k.kind == kind)
                .unwrap();
            (ces_kube::reduce(&k, o.clone()), format!("{kind}/{}", o["metadata"]["name"]))
        })
        .collect();
    let parsed: Vec<_> = reduced.iter().map(|(v, o)| ces_snapshot::manifests::parse_object(v.clone(), o)).collect();
    let (mut full, mut incremental) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        std::hint::black_box(ces_snapshot::manifests::load_objects(reduced.iter().map(|(v, o)| (v, o.clone()))));
        full.push(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(ces_snapshot::manifests::build_objects(parsed.iter()));
        incremental.push(t.elapsed());
    }
    let (f, i) = (pct(&mut full, 0.5), pct(&mut incremental, 0.5));
    println!(
        "  snapshot per pass: {:.0} ms from objects parsed at their events vs {:.0} ms rebuilt the full way (baseline): {:.2}x",
        i.as_secs_f64() * 1e3,
        f.as_secs_f64() * 1e3,
        i.as_secs_f64() / f.as_secs_f64()
    );

    let bigip = Double::start(schema_dir());
    bigip.with(|s| {
        for t in ["tenant-a~rd10", "tenant-b~rd20", "tenant-c~rd30", "Common~0"] {
            s.objects.insert(format!("/mgmt/tm/net/route-domain/~{t}"), json!({}));
        }
    });
    let log = dir.join("controller.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ces"))
        .args(["controller", "--kubernetes", "--kubeconfig"])
        .arg(dir.join("kubeconfig"))
        .arg("--config")
        .arg(dir.join("ces-conf.yaml"))
        .args(["--bigip-url", &bigip.url(), "--bigip-creds-dir"])
        .arg(dir.join("creds"))
        .arg("--as3-schema")
        .arg(schema_dir())
        .args(["--debounce-ms", "50", "--max-delay-ms", "200", "--poll-ms", "10", "--resync-secs", "3600"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while bigip.with(|s| s.tenants.len()) < 4 {
        assert!(t.elapsed() < Duration::from_secs(600), "{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut n = bigip.with(|s| s.requests.len());
    loop {
        std::thread::sleep(Duration::from_secs(2));
        let m = bigip.with(|s| s.requests.len());
        if m == n {
            break;
        }
        n = m;
    }
    println!("  first sync: {:.1} s from start to the BIG-IP holding every tenant", t.elapsed().as_secs_f64());

    // Pods whose addresses are in ServiceEgressRules' source lists (`..._ep_<service>_src_address`): their Services'
    // EndpointSlices list them, so each move is a pod event and an EndpointSlice event, as in a cluster.
    let mut targets: BTreeSet<String> = BTreeSet::new();
    bigip.with(|s| {
        for tenant in s.tenants.values() {
            for (name, o) in tenant["Shared"].as_object().into_iter().flatten() {
                if name.contains("_ep_") && name.ends_with("_src_address") {
                    for a in o["addresses"].as_array().into_iter().flatten() {
                        targets.extend(a.as_str().filter(|a| !a.contains('/')).map(str::to_string));
                    }
                }
            }
        }
    });
    // Address (with %rd) → the pod that has it.
    let rd_of = |ns: &str| (ns.trim_start_matches("ns-").parse::<usize>().unwrap() % 4) * 10;
    let with_rd = |ip: &str, ns: &str| if rd_of(ns) == 0 { ip.to_string() } else { format!("{ip}%{}", rd_of(ns)) };
    let by_ip: std::collections::HashMap<String, Value> = objects
        .iter()
        .filter(|o| o["kind"] == "Pod")
        .filter_map(|o| {
            let ip = o.pointer("/status/podIPs/0/ip")?.as_str()?;
            Some((with_rd(ip, o["metadata"]["namespace"].as_str()?), o.clone()))
        })
        .collect();
    // Each pod's EndpointSlice, kept as it is now in the API server.
    let mut slices: std::collections::HashMap<(String, String), Value> = objects
        .iter()
        .filter(|o| o["kind"] == "EndpointSlice")
        .map(|o| {
            let key = (
                o["metadata"]["namespace"].as_str().unwrap().to_string(),
                o["metadata"]["name"].as_str().unwrap().to_string(),
            );
            (key, o.clone())
        })
        .collect();
    let mut slice_of: std::collections::HashMap<(String, String), (String, String)> = Default::default();
    for (key, o) in &slices {
        for e in o["endpoints"].as_array().into_iter().flatten() {
            let pod = e["targetRef"]["name"].as_str().unwrap().to_string();
            slice_of.insert((key.0.clone(), pod), key.clone());
        }
    }
    let chosen: Vec<Value> = targets.iter().filter_map(|a| by_ip.get(a).cloned()).take(1000).collect();
    assert!(chosen.len() >= 100, "only {} pods in ServiceEgressRules' source lists", chosen.len());

    // 100 pod events per second: each chosen pod moves to a new address in its subnet, and its EndpointSlice follows
    // right after, as the endpoints controller writes it.
    let rate = 100.0;
    let events = chosen.len().min(1000);
    // Per event: when the pod and the slice were written, and the new address as the BIG-IP shows it.
    let mut sent: Vec<(Instant, Instant, String)> = Vec::with_capacity(events);
    let start = Instant::now();
    let n0 = bigip.with(|s| s.requests.len());
    for (k, pod) in chosen.iter().take(events).enumerate() {
        let due = start + Duration::from_secs_f64(k as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let mut p = pod.clone();
        let ip = p.pointer("/status/podIPs/0/ip").unwrap().as_str().unwrap().to_string();
        let mut parts: Vec<u8> = ip.split('.').map(|x| x.parse().unwrap()).collect();
        parts[3] = parts[3].wrapping_add(120).max(1);
        let new_ip = format!("{}.{}.{}.{}", parts[0], parts[1], parts[2], parts[3]);
        p["status"]["podIPs"] = json!([{"ip": new_ip}]);
        let ns = p["metadata"]["namespace"].as_str().unwrap().to_string();
        let name = p["metadata"]["name"].as_str().unwrap().to_string();
        let needle = format!("\"{}\"", with_rd(&new_ip, &ns));
        api.apply(p);
        let pod_at = Instant::now();
        let slice = slices.get_mut(&slice_of[&(ns, name.clone())]).unwrap();
        for e in slice["endpoints"].as_array_mut().unwrap() {
            if e["targetRef"]["name"] == name.as_str() {
                e["addresses"] = json!([new_ip]);
            }
        }
        api.apply(slice.clone());
        sent.push((pod_at, Instant::now(), needle));
    }
    let offered = start.elapsed();
    // Wait for the last ones, then match each event to the first request that holds its address (anywhere: the
    // pod's own lists), and to the first that holds it in a Service's list (from the slice's write).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut latencies, mut via_slice): (Vec<Duration>, Vec<Duration>) = (Vec::new(), Vec::new());
    let mut missing;
    loop {
        let reqs: Vec<(Instant, Value)> =
            bigip.with(|s| s.requests[n0..].iter().filter_map(|r| r.body.clone().map(|b| (r.at, b))).collect());
        let texts: Vec<String> = reqs.iter().map(|(_, b)| b.to_string()).collect();
        latencies.clear();
        via_slice.clear();
        missing = 0;
        for (pod_at, slice_at, needle) in &sent {
            let first = reqs.iter().zip(&texts).find(|((t, _), body)| t >= pod_at && body.contains(needle.as_str()));
            let in_service = reqs
                .iter()
                .zip(&texts)
                .find(|((t, b), body)| t >= slice_at && body.contains(needle.as_str()) && in_service_list(b, needle));
            match (first, in_service) {
                (Some(((t, _), _)), Some(((u, _), _))) => {
                    latencies.push(t.duration_since(*pod_at));
                    via_slice.push(u.duration_since(*slice_at));
                }
                _ => missing += 1,
            }
        }
        if missing == 0 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let requests = bigip.with(|s| s.requests.len()) - n0;

    // Baseline, same run, same controller: a change that is not pod churn (an ExternalService of the cluster rules
    // gains an address) takes the whole path: the snapshot assembled from every object, the whole cluster compiled and
    // rendered, the tenants compared. From the API server's write to the BIG-IP request that holds the address.
    let exsvc = objects
        .iter()
        .find(|o| o["kind"] == "ExternalService" && o["metadata"]["namespace"] == "kube-system")
        .cloned()
        .expect("an ExternalService of the cluster rules");
    let mut whole: Vec<Duration> = Vec::new();
    for i in 1..=10 {
        let mut e = exsvc.clone();
        e["spec"]["addresses"].as_array_mut().unwrap().push(json!(format!("198.18.77.{i}")));
        let needle = format!("\"198.18.77.{i}\"");
        let n = bigip.with(|s| s.requests.len());
        let at = Instant::now();
        api.apply(e);
        loop {
            let seen = bigip.with(|s| {
                s.requests[n..]
                    .iter()
                    .find(|r| r.body.as_ref().is_some_and(|b| b.to_string().contains(&needle)))
                    .map(|r| r.at)
            });
            if let Some(t) = seen {
                whole.push(t.duration_since(at));
                break;
            }
            assert!(at.elapsed() < Duration::from_secs(60), "{}", std::fs::read_to_string(&log).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "  {events} pod events (each with its EndpointSlice) offered at {rate:.0}/s (in {:.1} s); {requests} BIG-IP requests; {missing} events never reached the BIG-IP",
        offered.as_secs_f64()
    );
    if !latencies.is_empty() {
        for (what, v) in [
            ("pod event to BIG-IP request", &mut latencies),
            ("EndpointSlice event to BIG-IP request with the address in the Service's list", &mut via_slice),
        ] {
            let (p50, p99, max) = (pct(v, 0.5), pct(v, 0.99), pct(v, 1.0));
            println!(
                "  {what}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (target p99 < 500 ms: {})",
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3,
                max.as_secs_f64() * 1e3,
                if p99 < Duration::from_millis(500) && missing == 0 { "met" } else { "NOT met" }
            );
        }
    }
    let (w50, w99) = (pct(&mut whole, 0.5), pct(&mut whole, 0.99));
    println!(
        "  baseline, same run: a change that takes the whole path (an ExternalService address, {} samples): p50 {:.0} ms, p99 {:.0} ms",
        whole.len(),
        w50.as_secs_f64() * 1e3,
        w99.as_secs_f64() * 1e3
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let passes: Vec<&str> = text.lines().filter(|l| l.contains("problem(s) in the policy; load")).collect();
    if let Some(p) = passes.last() {
        println!("  last pass (controller log): {}", p.split("in the policy; ").nth(1).unwrap_or(p));
    }
    if std::env::var_os("CES_BENCH_DEBUG").is_some() {
        println!(
            "{}",
            text.lines()
                .filter(|l| l.starts_with("ces"))
                .map(|l| l.chars().take(300).collect::<String>())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
