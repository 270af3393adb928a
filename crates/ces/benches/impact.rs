//! Impact benchmark: `cargo bench -p ces --bench impact`.
//!
//! A synthetic cluster (10k pods, 1k rules, four tenants with overlapping pod networks) as YAML files, and a proposed
//! policy with one more cluster rule (dropping 203.0.0.0/16, which many flows reach). Measured in one run, the real
//! binary as a user runs it:
//! 1. `ces impact --flows` on listed flows (the lines `ces simulate --flows` reads) against `ces simulate --flows` on
//!    the same lines: flows per second of each (the baseline decides each flow once, impact twice);
//! 2. `ces impact --store` on a 10M-record store of the same cluster's traffic (each record with the decision the
//!    current policy gives it): the whole store decided again (target: seconds).
//!
//! Set CES_BENCH_QUICK=1 (or run it through `cargo test --benches`) for 100k flows and 1M records.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ces_eval::{Evaluator, Flow};
use ces_flow::record::{FlowRecord, Kind, Outcome, RuleRef, Verdict};
use ces_flow::store::{StoreConfig, Writer};
use ces_model::{Destination, Protocol};
use ces_synth::{Rng, Synth};

fn quick() -> bool {
    std::env::var_os("CES_BENCH_QUICK").is_some() || !std::env::args().any(|a| a == "--bench")
}

const PROPOSED_RULE: &str = "---\napiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {name: bench-block, namespace: kube-system}\nspec: {addresses: [203.0.0.0/16]}\n---\napiVersion: kubeovn.io/v1alpha1\nkind: ClusterEgressRule\nmetadata: {name: bench-block}\nspec: {action: drop, priority: 0, externalServices: [bench-block]}\n";

/// A flow of the synthetic cluster: source pod (namespace, name, address, tenant), destination, protocol, port.
struct Gen<'a> {
    s: &'a Synth,
    config: &'a ces_config::CesConfig,
    rng: Rng,
}

impl Gen<'_> {
    /// `habits`: each pod mostly (19 times in 20) reaches one of 20 destinations of its own, as real workloads do;
    /// else every flow is drawn at random (nearly every record distinct: the worst case).
    fn next(&mut self, habits: bool) -> (String, String, std::net::IpAddr, String, Destination, Protocol, Option<u16>) {
        let pods = &self.s.pods;
        let k = loop {
            let k = self.rng.below(pods.len());
            if !pods[k].host_network {
                break k;
            }
        };
        let p = &pods[k];
        // The destination is drawn from its own generator: one of the pod's 20 usual ones, or any.
        let seed = if habits && self.rng.below(20) != 0 {
            (k as u64) << 8 | self.rng.below(20) as u64
        } else {
            self.rng.next_u64()
        };
        let mut r = Rng::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        r.next_u64();
        let i = r.below(self.s.namespaces.len());
        let (d, proto, port) = match r.below(10) {
            0..=3 => (
                Destination::Ip(format!("203.0.{}.{}", i % 256, r.below(64)).parse().unwrap()),
                Protocol::Tcp,
                Some(443),
            ),
            4 => (Destination::Ip(format!("198.51.{}.15", i % 256).parse().unwrap()), Protocol::Udp, Some(53)),
            5 | 6 => (Destination::Ip(format!("198.18.{}.9", r.below(60)).parse().unwrap()), Protocol::Tcp, Some(443)),
            7 => (Destination::Host(format!("api{i}.example.com")), Protocol::Tcp, Some(443)),
            _ => (Destination::Ip("93.184.216.34".parse().unwrap()), Protocol::Tcp, Some(80)),
        };
        let tenant = self.config.tenant_of(&p.namespace).to_string();
        (p.namespace.clone(), p.name.clone(), p.ips[0], tenant, d, proto, port)
    }
}

fn target(d: &Destination, proto: Protocol, port: Option<u16>) -> String {
    match port {
        Some(p) => format!("{d}:{p}/{}", proto.as_str()),
        None => format!("{d}/{}", proto.as_str()),
    }
}

fn run(args: &[&str]) -> Duration {
    let start = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_ces"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    let t = start.elapsed();
    assert!(matches!(status.code(), Some(0) | Some(2)), "ces {}: {status}", args.join(" "));
    t
}

fn main() {
    let (n_listed, n_records) = if quick() { (100_000, 1_000_000) } else { (1_000_000, 10_000_000) };
    let base = std::path::PathBuf::from("/var/tmp").join(format!("ces-bench-impact-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (cur, prop) = (base.join("current"), base.join("proposed"));
    let synth = Synth::generate(10_000, 1_000, 42);
    synth.write_yaml(&cur).unwrap();
    synth.write_yaml(&prop).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(prop.join("policies.yaml"))
        .unwrap()
        .write_all(PROPOSED_RULE.as_bytes())
        .unwrap();
    let config = synth.config();
    let conf = cur.join("ces-conf.yaml");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (cur_s, prop_s, conf_s) = (s(&cur), s(&prop), s(&conf));

    // 1. Listed flows.
    let listed = base.join("flows.jsonl");
    let mut g = Gen { s: &synth, config: &config, rng: Rng::new(7) };
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&listed).unwrap());
        for _ in 0..n_listed {
            let (ns, pod, _, _, d, proto, port) = g.next(false);
            writeln!(
                f,
                "{{\"from\": \"{ns}/{pod}\", \"to\": \"{}\", \"at\": \"2026-11-26T12:00:00Z\"}}",
                target(&d, proto, port)
            )
            .unwrap();
        }
    }
    let listed_s = s(&listed);
    let sim = run(&["simulate", "--flows", &listed_s, "--manifests", &cur_s, "--config", &conf_s, "--output", "json"]);
    let imp = run(&[
        "impact",
        "--flows",
        &listed_s,
        "--manifests",
        &prop_s,
        "--current-manifests",
        &cur_s,
        "--config",
        &conf_s,
    ]);
    let rate = |n: usize, t: Duration| n as f64 / t.as_secs_f64();
    println!("CES impact benchmark: synthetic cluster of 10k pods and 1k rules (YAML), the real binary, release build");
    println!(
        "{n_listed} listed flows: ces simulate --flows {:.2} s ({:.0} flows/s, the baseline), ces impact --flows {:.2} s ({:.0} flows/s, {:.2}x the baseline's rate); both times include loading and compiling the YAML (impact: two policies)",
        sim.as_secs_f64(),
        rate(n_listed, sim),
        imp.as_secs_f64(),
        rate(n_listed, imp),
        rate(n_listed, imp) / rate(n_listed, sim)
    );

    // 2. Stores of recorded flows, each record with the decision the current policy gives it: traffic with habits
    // (each pod mostly reaching its 20 usual destinations), and every record drawn at random (the worst case).
    let snap = synth.snapshot();
    let model = ces_compiler::compile(&snap, &config, "kube-system");
    let ev = Evaluator::new(&model);
    let worst = if quick() { 200_000 } else { 2_000_000 };
    for (habits, n) in [(true, n_records), (false, worst)] {
        let store = base.join(if habits { "store" } else { "store-random" });
        let start = Instant::now();
        let distinct = build_store(&store, n, habits, &synth, &config, &ev);
        let what = if habits { "with habits" } else { "drawn at random" };
        println!(
            "store: {n} records {what} ({distinct} distinct flows), written in {:.1} s",
            start.elapsed().as_secs_f64()
        );
        let store_s = s(&store);
        let same = run(&["impact", "--store", &store_s, "--manifests", &cur_s, "--config", &conf_s]);
        let changed = run(&["impact", "--store", &store_s, "--manifests", &prop_s, "--config", &conf_s]);
        let out = Command::new(env!("CARGO_BIN_EXE_ces"))
            .args(["impact", "--store", &store_s, "--manifests", &prop_s, "--config", &conf_s])
            .output()
            .unwrap();
        let summary = String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default().to_string();
        println!(
            "  ces impact --store: against the current policy itself {:.1} s ({:.0} records/s); against the proposed one {:.1} s ({:.0} records/s); {summary}",
            same.as_secs_f64(),
            rate(n, same),
            changed.as_secs_f64(),
            rate(n, changed)
        );
    }
    if std::env::var_os("CES_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
}

/// Writes `n` records of the cluster's traffic into a store at `dir`, each with the decision the current policy
/// (`ev`) gives it; returns how many distinct flows they are.
fn build_store(
    dir: &Path,
    n: usize,
    habits: bool,
    synth: &Synth,
    config: &ces_config::CesConfig,
    ev: &Evaluator,
) -> usize {
    let mut w = Writer::open(dir, StoreConfig::default()).unwrap();
    let mut cache = std::collections::HashMap::new();
    let mut batch = Vec::with_capacity(10_000);
    let end = jiff::Timestamp::now();
    let mut g = Gen { s: synth, config, rng: Rng::new(if habits { 11 } else { 13 }) };
    for i in 0..n {
        let (ns, pod, ip, tenant, d, proto, port) = g.next(habits);
        let key = (tenant.clone(), ip, d.clone(), proto, port);
        let (verdict, rule) = cache
            .entry(key)
            .or_insert_with(|| {
                let f =
                    Flow { source: ip, tenant: tenant.clone(), destination: d.clone(), protocol: proto, port, at: end };
                let dec = ev.decide(&f).unwrap();
                (Verdict::parse(dec.verdict.as_str()).unwrap(), dec.decided_by.rule)
            })
            .clone();
        let t = end - Duration::from_micros(((n - i) as u64) * 8);
        let mut r = FlowRecord::packet(t, &tenant, verdict);
        r.kind = if verdict == Verdict::Accept { Kind::Connection } else { Kind::Packet };
        r.source.ip = Some(ip);
        r.source.namespace = Some(ns);
        r.source.pod = Some(pod);
        match d {
            Destination::Ip(a) => r.destination.ip = Some(a),
            Destination::Host(h) => {
                r.destination.host = Some(h);
                r.destination.ip = Some("198.18.250.1".parse().unwrap());
            }
            Destination::Resolved { .. } => unreachable!(),
        }
        r.destination.port = port;
        r.protocol = proto.as_str().to_string();
        r.rule = Some(RuleRef { rule, context: String::new(), mode: "enforce".into() });
        r.outcome = Outcome::Completed;
        batch.push(r);
        if batch.len() == 10_000 {
            w.append(&batch).unwrap();
            batch.clear();
        }
    }
    w.append(&batch).unwrap();
    w.close().unwrap();
    cache.len()
}
