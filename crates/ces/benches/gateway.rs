//! Gateway benchmark (root, nftables): `cargo bench -p ces --bench gateway`.
//!
//! A synthetic cluster (50k pods, 1k rules, four tenants on their own gateway interfaces) is written as YAML, compiled
//! and rendered as the gateway's table, and loaded into a gateway namespace of a lab. From one pod, through the
//! gateway, to a server (accepted by a cluster rule placed last, so a new flow meets every rule of its tenant first):
//! - TCP throughput of one connection, and new TCP connections per second, with no ruleset (the baseline), with the
//!   CES table, and with an equivalent naive linear chain (one rule per source address and destination, iptables
//!   style, no connection-tracking shortcut), all measured in this run;
//! - the same with 100 ExternalIPRules (source NAT), the client's translated by the last of its tenant's;
//! - the latency from a manifest change (one pod's address) to the agent having applied it, p50 and p99.
//!
//! Set CES_BENCH_QUICK=1 (or run it through `cargo test --benches`) for a small cluster.

use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ces_config::TenantGateway;
use ces_lab::{Lab, LabSpec, Side};
use ces_nft::apply::{Applier, Nft};

const SERVER: &str = "198.18.99.1";
const SINK: u16 = 5201;
/// Servers that accept and close, one per port; the connection test cycles over them.
const CONNECT: std::ops::Range<u16> = 5300..5340;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn measure(lab: &Lab, from: IpAddr, secs: f64) -> (f64, f64) {
    let to: IpAddr = SERVER.parse().unwrap();
    let tput = median((0..3).map(|_| lab.throughput(0, from, to, SINK, secs).expect("throughput")).collect());
    let conns = median(
        (0..3).map(|_| lab.connection_rate(0, from, to, CONNECT.collect(), secs).expect("connections")).collect(),
    );
    (tput, conns)
}

/// The naive equivalent of the tenant's chains: every set reference expanded into one rule per address (up to 256
/// per interval), verdicts kept, no counters or logs, no connection-tracking shortcut; then the benchmark's accept.
fn naive_chain(rs: &ces_nft::Ruleset, tenant: usize, client: IpAddr, cap: usize) -> (String, usize) {
    let expand = |set: &str| -> Vec<String> {
        let Some(s) = rs.sets.get(set) else { return Vec::new() };
        let mut out = Vec::new();
        for e in &s.elements {
            match e.split_once('-') {
                Some((a, b)) if !a.contains(':') => {
                    let (a, b): (u32, u32) = (
                        a.parse::<std::net::Ipv4Addr>().unwrap().into(),
                        b.parse::<std::net::Ipv4Addr>().unwrap().into(),
                    );
                    for x in a..=b.min(a + 255) {
                        out.push(std::net::Ipv4Addr::from(x).to_string());
                    }
                }
                _ => out.push(e.clone()),
            }
        }
        out
    };
    let mut lines = Vec::new();
    for label in ["cluster", "namespace", "service"] {
        let chain = rs.chains.iter().find(|c| c.name == format!("t{tenant}_{label}")).unwrap();
        for line in &chain.rules {
            if line.contains(" log ") || line.contains("ip6 ") {
                continue;
            }
            let words: Vec<&str> =
                line.split(" comment ").next().unwrap().split(' ').filter(|w| *w != "counter").collect();
            let line = words.join(" ").replace(" return", " accept");
            let sets: Vec<&str> = line.split(' ').filter_map(|w| w.strip_prefix('@')).collect();
            let mut variants = vec![line.clone()];
            for set in sets {
                let elems = expand(set);
                variants =
                    variants.iter().flat_map(|v| elems.iter().map(move |e| v.replace(&format!("@{set}"), e))).collect();
            }
            lines.extend(variants);
            if lines.len() >= cap {
                break;
            }
        }
    }
    lines.truncate(cap);
    let n = lines.len();
    let mut text = String::from(
        "table inet naive {\n chain forward {\n  type filter hook forward priority filter; policy accept;\n",
    );
    for l in lines {
        text += &format!("  {l}\n");
    }
    // The replies traverse the whole chain too (no connection-tracking shortcut), then meet their own rule.
    text += &format!(
        "  ip saddr {client} ip daddr {SERVER} accept\n  ip saddr {SERVER} ip daddr {client} accept\n  drop\n }}\n}}\n"
    );
    (text, n)
}

fn nft_in(lab: &Lab, text: &str) -> Duration {
    let t = Instant::now();
    Nft::in_netns(&lab.gateway).run(text).expect("nft load");
    t.elapsed()
}

fn main() {
    let quick =
        std::env::var("CES_BENCH_QUICK").is_ok_and(|v| !v.is_empty()) || !std::env::args().any(|a| a == "--bench");
    let (pods, rules, secs) = if quick { (5_000, 200, 0.3) } else { (50_000, 1_000, 2.0) };
    println!("CES gateway benchmark: {pods} pods, {rules} rules (release build; medians of 3 runs of {secs} s)");
    let dir = std::env::temp_dir().join(format!("ces-gw-bench-{}", std::process::id()));
    let synth = ces_synth::Synth::generate(pods, rules, 42);
    synth.write_yaml(&dir).unwrap();
    let mut config = synth.config();
    for (i, t) in config.tenant.iter_mut().enumerate() {
        t.gateway = Some(TenantGateway { interfaces: vec![format!("t{i}")] });
    }
    std::fs::write(dir.join("ces-conf.yaml"), serde_json::to_string(&config).unwrap()).unwrap();
    let bench_rule = format!(
        "---\napiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {{name: bench-dst, namespace: kube-system}}\nspec: {{addresses: [{SERVER}]}}\n---\napiVersion: kubeovn.io/v1alpha1\nkind: ClusterEgressRule\nmetadata: {{name: zz-bench}}\nspec: {{action: accept-decisively, priority: 1000000, externalServices: [bench-dst]}}\n"
    );
    std::fs::write(dir.join("bench.yaml"), &bench_rule).unwrap();
    let files: Vec<_> = ["cluster.yaml", "policies.yaml", "bench.yaml"].map(|f| dir.join(f)).to_vec();
    let (snapshot, _) = ces_snapshot::manifests::load_paths(&files).unwrap();
    let model = ces_compiler::compile(&snapshot, &config, "kube-system");
    let t = Instant::now();
    // The table the agent loads: learned host-name sets, and the DNS queue line where the kernel has nft's `queue`.
    let hook = if Nft::default().supports_queue() { ces_nft::DnsHook::Native } else { ces_nft::DnsHook::External };
    let rs = ces_nft::render_with(&model, jiff::Timestamp::now(), hook).expect("render");
    let render_time = t.elapsed();
    let common = model.tenants.iter().position(|t| t.name == "Common").unwrap();
    let client = ces_synth::pod_ip(0, 1);
    let source_ips: usize = model.pods.iter().map(|p| p.ips.len()).sum();
    let lines: usize = rs.chains.iter().map(|c| c.rules.len()).sum();
    let elements: usize = rs.sets.values().map(|s| s.elements.len()).sum();
    println!(
        "CES table: {lines} rule lines in {} chains, {} sets with {elements} coalesced elements, for {source_ips} source addresses; rendered in {:.0} ms",
        rs.chains.len(),
        rs.sets.len(),
        render_time.as_secs_f64() * 1e3
    );

    let lab = Lab::build(LabSpec {
        prefix: format!("cesb{}", std::process::id() % 100_000),
        sides: vec![Side { gateway_interface: format!("t{common}"), addresses: vec![client] }],
        servers: vec![SERVER.parse().unwrap()],
        tcp_ports: CONNECT.collect(),
        udp_ports: vec![],
        sink_ports: vec![SINK],
        dns: Vec::new(),
    })
    .expect("lab (root, nftables)");

    measure(&lab, client, secs / 2.0); // warm-up: neighbour discovery, caches
    let (base_t, base_c) = measure(&lab, client, secs);
    println!("no ruleset (baseline):  {:>7.2} Gbit/s   {:>7.0} new connections/s", base_t / 1e9, base_c);

    let load = {
        let t = Instant::now();
        Applier::new(Nft::in_netns(&lab.gateway)).apply(&rs, true).expect("apply");
        t.elapsed()
    };
    let (ces_t, ces_c) = measure(&lab, client, secs);
    println!(
        "CES table:              {:>7.2} Gbit/s ({:.0}% of baseline)   {:>7.0} new connections/s ({:.0}%)   loaded in {:.0} ms",
        ces_t / 1e9,
        100.0 * ces_t / base_t,
        ces_c,
        100.0 * ces_c / base_c,
        load.as_secs_f64() * 1e3
    );
    nft_in(&lab, &format!("delete table inet {}\n", rs.table));

    // Source NAT: 100 ExternalIPRules of the client's tenant (Common: every fourth namespace), on other pods' Services
    // with their own egress addresses, and last the one that translates the client (pod-1 of ns-00000, Service svc-1).
    let mut nat = String::new();
    for k in 0..99 {
        let _ = std::fmt::Write::write_fmt(
            &mut nat,
            format_args!(
                "---\napiVersion: bigip.io/v1alpha1\nkind: ExternalIPRule\nmetadata: {{name: bench-{k}, namespace: {}}}\nspec: {{priority: {k}, externalAddresses: [198.51.100.{}], services: [svc-0]}}\n",
                ces_synth::namespace_name(4 * (k % 12)),
                k + 1
            ),
        );
    }
    nat += "---\napiVersion: bigip.io/v1alpha1\nkind: ExternalIPRule\nmetadata: {name: bench-client, namespace: ns-00000}\nspec: {priority: 5000, externalAddresses: [192.0.2.200], services: [svc-1]}\n";
    std::fs::write(dir.join("nat.yaml"), &nat).unwrap();
    let mut nat_files = files.clone();
    nat_files.push(dir.join("nat.yaml"));
    let (nat_snapshot, _) = ces_snapshot::manifests::load_paths(&nat_files).unwrap();
    let nat_model = ces_compiler::compile(&nat_snapshot, &config, "kube-system");
    let nat_rules: usize = nat_model.tenants.iter().map(|t| t.nat_rules.len()).sum();
    assert_eq!(nat_rules, 100, "{:?}", nat_model.errors().take(3).collect::<Vec<_>>());
    let nat_rs = ces_nft::render_with(&nat_model, jiff::Timestamp::now(), hook).expect("render");
    let nat_lines = nat_rs.chains.iter().find(|c| c.name == "postrouting").map_or(0, |c| c.rules.len());
    Applier::new(Nft::in_netns(&lab.gateway)).apply(&nat_rs, true).expect("apply");
    let (nat_t, nat_c) = measure(&lab, client, secs);
    println!(
        "CES table + source NAT: {:>7.2} Gbit/s ({:.0}% of baseline)   {:>7.0} new connections/s ({:.0}%)   {nat_rules} ExternalIPRules, {nat_lines} nat lines",
        nat_t / 1e9,
        100.0 * nat_t / base_t,
        nat_c,
        100.0 * nat_c / base_c,
    );
    nft_in(&lab, &format!("delete table inet {}\n", nat_rs.table));

    let (naive, n) = naive_chain(&rs, common, client, if quick { 5_000 } else { 50_000 });
    let naive_load = nft_in(&lab, &naive);
    let (nv_t, nv_c) = measure(&lab, client, secs);
    println!(
        "naive linear chain:     {:>7.2} Gbit/s ({:.0}% of baseline)   {:>7.0} new connections/s ({:.0}%)   {n} rules, loaded in {:.0} ms",
        nv_t / 1e9,
        100.0 * nv_t / base_t,
        nv_c,
        100.0 * nv_c / base_c,
        naive_load.as_secs_f64() * 1e3
    );
    nft_in(&lab, "delete table inet naive\n");
    let (again_t, again_c) = measure(&lab, client, secs);
    println!(
        "no ruleset, again:      {:>7.2} Gbit/s   {:>7.0} new connections/s   (the machine's drift during this run)",
        again_t / 1e9,
        again_c
    );

    // Latency: the agent follows the files; one pod's address changes at a time.
    let churn = |i: u32| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: churn, namespace: ns-00000, labels: {{app: app-0}}}}\nstatus: {{phase: Running, podIPs: [{{ip: 10.0.200.{}}}]}}\n",
            1 + i % 250
        )
    };
    std::fs::write(dir.join("churn.yaml"), churn(0)).unwrap();
    let log = dir.join("agent.log");
    let mut agent = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.gateway,
            env!("CARGO_BIN_EXE_ces"),
            "gateway",
            "--debounce-ms",
            "1",
            "--poll-ms",
            "2",
            "--flow-store",
            "none",
            "--manifests",
        ])
        .args(&files)
        .arg(dir.join("churn.yaml"))
        .arg("--config")
        .arg(dir.join("ces-conf.yaml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let count = |needle: &str| std::fs::read_to_string(&log).unwrap_or_default().matches(needle).count();
    let wait = |needle: &str, n: usize| {
        let start = Instant::now();
        while count(needle) < n {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "agent: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        start.elapsed()
    };
    wait("replaced", 1);
    let samples = if quick { 5 } else { 20 };
    let mut lat = Vec::new();
    for i in 1..=samples {
        let before = count("set(s) updated");
        std::thread::sleep(Duration::from_millis(50));
        std::fs::write(dir.join("churn.yaml"), churn(i)).unwrap();
        lat.push(wait("set(s) updated", before + 1).as_secs_f64() * 1e3);
    }
    // Baseline, same agent, same run: a change that is not pod churn (the benchmark's ExternalService gains an
    // address) takes a load of every file, a whole compile and a whole render; its elements go out the same way.
    let mut whole = Vec::new();
    for i in 1..=samples.min(10) {
        // Any applied change (an element update, or a replace, whose reason is printed below).
        let before = count("change: ");
        std::thread::sleep(Duration::from_millis(50));
        let rule = bench_rule.replace(&format!("[{SERVER}]"), &format!("[{SERVER}, 198.18.98.{i}]"));
        std::fs::write(dir.join("bench.yaml"), rule).unwrap();
        whole.push(wait("change: ", before + 1).as_secs_f64() * 1e3);
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    // The agent's first pass (the table loaded at start) is reported as a change too: it is not counted.
    for l in text.lines().filter(|l| l.contains("change: ") && l.contains("replaced")).skip(1) {
        println!("a change replaced the table (not expected of an address change): {l}");
    }
    let _ = agent.kill();
    let _ = agent.wait();
    // Where a pod-churn pass spends its time, from the agent's own account of each update.
    let stage = |name: &str| -> f64 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        median(
            text.lines()
                .filter(|l| l.contains("set(s) updated (pod churn)"))
                .filter_map(|l| l.split(&format!("{name} ")).nth(1)?.split(" ms").next()?.parse::<f64>().ok())
                .collect(),
        )
    };
    let (load_ms, compile_ms, apply_ms) = (stage("load"), stage("compile"), stage("apply"));
    let churned = std::fs::read_to_string(&log).unwrap_or_default().matches("(pod churn)").count();
    assert_eq!(churned, samples as usize, "every pod change took the pod-churn path");
    let pct = |v: &mut Vec<f64>, q: f64| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
    };
    println!(
        "manifest change to rules applied, single-pod churn ({samples} samples): p50 {:.0} ms, p99 {:.0} ms; median pass: \
         load {load_ms:.0} ms (the changed file parsed, its pods moved in the kept snapshot), compile {compile_ms:.0} ms \
         (the model patched for the pods' namespaces and tenant), apply {apply_ms:.0} ms (the source sets built from \
         the moved sets re-rendered, one netlink batch)",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );
    println!(
        "baseline, same agent: a change that is not pod churn (an ExternalService address; {} samples, every file \
         loaded, the whole cluster compiled and rendered): p50 {:.0} ms, p99 {:.0} ms",
        whole.len(),
        pct(&mut whole, 0.5),
        pct(&mut whole, 0.99)
    );
    drop(lab);
    let _ = std::fs::remove_dir_all(Path::new(&dir));
    println!(
        "targets: CES >= 90% of the no-ruleset throughput while the linear chain falls far behind; change-to-applied p99 < 50 ms"
    );
}
