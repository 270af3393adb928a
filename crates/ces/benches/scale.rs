//! Scale benchmark: `cargo bench -p ces --bench scale`.
//!
//! It starts where the user starts: a synthetic cluster written as YAML files (`ces synth`), and for each size prints
//! every figure next to a baseline measured in the same run, because this machine is noisy:
//! - `ces compile` as a user runs it (the release binary, files on disk, JSON model on stdout): wall time and peak
//!   RSS of the process; baseline: the same files parsed to untyped values by the same YAML parser as the loader
//!   (its libyaml fast path, then serde-saphyr), one thread, in this process; serde-saphyr alone is printed too;
//! - load + compile in process, split in its stages, against the same baseline;
//! - compile alone from a loaded snapshot against the time to clone that snapshot, and its peak heap;
//! - indexed simulate throughput against the full-scan evaluator (same decisions, every rule tested).
//!
//! Heap is counted by a global allocator wrapper (bytes live at the peak, exact for this process); the peak RSS of
//! `ces compile` is what the process reports of itself (`VmHWM`, with CES_REPORT_PEAK_RSS set): a parent's
//! `getrusage(RUSAGE_CHILDREN)` would include the parent's own peak. Set CES_BENCH_QUICK=1 to run only the small size.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ces_compiler::compile;
use ces_config::CesConfig;
use ces_eval::{Evaluator, Flow};
use ces_model::{Destination, Protocol, Verdict};
use ces_snapshot::manifests::load_paths;
use ces_synth::{Rng, Synth};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size > layout.size() {
                let now = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size - layout.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Runs `f` and returns its result with the peak heap above the heap live when it started.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = live();
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed) - base)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                black_box(f());
                t.elapsed()
            })
            .collect(),
    )
}

fn mb(bytes: usize) -> f64 {
    bytes as f64 / 1e6
}

/// Flows from pods (each in its own tenant: the pod networks of the tenants overlap) and a few unknown addresses, to
/// a mix of destinations that rules match and do not.
fn flows(s: &Synth, config: &CesConfig, n: usize, seed: u64) -> Vec<Flow> {
    let mut rng = Rng::new(seed);
    let ns_count = s.namespaces.len();
    let at = "2026-11-26T12:00:00Z".parse().unwrap();
    let pods: Vec<_> = s.pods.iter().filter(|p| !p.host_network).collect();
    (0..n)
        .map(|_| {
            let (source, tenant) = if rng.below(20) == 0 {
                ("192.0.2.1".parse().unwrap(), "Common".to_string())
            } else {
                let p = pods[rng.below(pods.len())];
                (p.ips[0], config.tenant_of(&p.namespace).to_string())
            };
            let i = rng.below(ns_count);
            let (destination, protocol, port) = match rng.below(10) {
                0..=3 => (
                    Destination::Ip(format!("203.0.{}.{}", i % 256, rng.below(64)).parse().unwrap()),
                    Protocol::Tcp,
                    Some(443),
                ),
                4 => (Destination::Ip(format!("198.51.{}.15", i % 256).parse().unwrap()), Protocol::Udp, Some(53)),
                5 | 6 => {
                    (Destination::Ip(format!("198.18.{}.9", rng.below(60)).parse().unwrap()), Protocol::Tcp, Some(443))
                }
                7 => (Destination::Host(format!("api{i}.example.com")), Protocol::Tcp, Some(443)),
                8 => (Destination::Host(format!("x.svc{i}.example.net")), Protocol::Tcp, Some(443)),
                _ => (Destination::Ip("93.184.216.34".parse().unwrap()), Protocol::Tcp, Some(80)),
            };
            Flow { source, tenant, destination, protocol, port, at }
        })
        .collect()
}

/// The baseline for loading: every YAML document parsed to an untyped value by the same parser as the loader (or by
/// serde-saphyr alone), one thread, nothing else. (Documents one by one: serde-saphyr's multi-document API is slower
/// on these files, which would flatter us.)
fn parse_untyped(files: &[PathBuf], saphyr_only: bool) -> usize {
    let mut docs = 0;
    for f in files {
        let text = std::fs::read_to_string(f).unwrap();
        let mut doc = String::new();
        for line in text.lines().chain(std::iter::once("---")) {
            if line == "---" {
                if !doc.trim().is_empty() {
                    if saphyr_only {
                        let _: serde_json::Value = serde_saphyr::from_str(&doc).unwrap();
                    } else {
                        ces_snapshot::manifests::parse_document(&doc).unwrap();
                    }
                    docs += 1;
                }
                doc.clear();
            } else {
                doc.push_str(line);
                doc.push('\n');
            }
        }
    }
    docs
}

/// Runs `ces compile` on the folder as a user would, its output thrown away; returns the wall time and the peak RSS
/// in bytes that the process reports of itself (`CES_REPORT_PEAK_RSS`).
fn ces_compile(dir: &Path) -> (Duration, usize) {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_ces"))
        .args(["compile", "--manifests"])
        .arg(dir.join("cluster.yaml"))
        .arg(dir.join("policies.yaml"))
        .arg("--config")
        .arg(dir.join("ces-conf.yaml"))
        .env("CES_REPORT_PEAK_RSS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run ces compile");
    let elapsed = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ces compile failed: {stderr}");
    let kb: usize = stderr
        .lines()
        .find_map(|l| l.strip_prefix("ces: peak RSS ")?.strip_suffix(" kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in: {stderr}"));
    (elapsed, kb * 1024)
}

fn scenario(pods: usize, rules: usize) {
    println!("\n== {pods} pods, {rules} rules ==");
    let synth = Synth::generate(pods, rules, 42);
    let dir = std::env::temp_dir().join(format!("ces-bench-{pods}-{}", std::process::id()));
    synth.write_yaml(&dir).unwrap();
    let files = vec![dir.join("cluster.yaml"), dir.join("policies.yaml")];
    let bytes: u64 = files.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
    println!(
        "input: {} namespaces, {} pods, {} services, {} ExternalServices; {:.1} MB of YAML",
        synth.namespaces.len(),
        synth.pods.len(),
        synth.services.len(),
        synth.external_services.len(),
        bytes as f64 / 1e6
    );

    // The baseline: the same files to untyped values, same parser; and serde-saphyr alone, for reference.
    let mut docs = 0;
    let baseline = time(3, || docs = parse_untyped(&files, false));
    let saphyr = time(1, || {
        parse_untyped(&files, true);
    });
    println!(
        "parsing alone, one thread: {:.0} ms with the loader's parser (libyaml fast path, serde-saphyr fallback), {:.0} ms with serde-saphyr alone",
        baseline.as_secs_f64() * 1e3,
        saphyr.as_secs_f64() * 1e3
    );

    // The user's path: the release binary, files on disk, the model printed.
    let mut rss = 0;
    let cli = time(3, || {
        let (t, r) = ces_compile(&dir);
        rss = rss.max(r);
        t
    });
    println!(
        "ces compile (process, files to JSON model): {:>7.0} ms, peak RSS {:>5.0} MB   (baseline: parse {docs} documents \
         to untyped values {:.0} ms; ratio {:.2}x)",
        cli.as_secs_f64() * 1e3,
        mb(rss),
        baseline.as_secs_f64() * 1e3,
        cli.as_secs_f64() / baseline.as_secs_f64()
    );

    // The same path in process, by stage.
    let config_path = dir.join("ces-conf.yaml");
    let load = time(3, || load_paths(&files).unwrap());
    let (snapshot, _) = load_paths(&files).unwrap();
    let config = CesConfig::from_file(&config_path).unwrap();
    let compile_time = time(5, || compile(&snapshot, &config, "kube-system"));
    let clone = time(5, || snapshot.clone());
    println!(
        "load (YAML to snapshot): {:>7.0} ms   compile: {:>5.0} ms   total {:.0} ms   (baseline: parse {:.0} ms; \
         total ratio {:.2}x)",
        load.as_secs_f64() * 1e3,
        compile_time.as_secs_f64() * 1e3,
        (load + compile_time).as_secs_f64() * 1e3,
        baseline.as_secs_f64() * 1e3,
        (load + compile_time).as_secs_f64() / baseline.as_secs_f64()
    );
    let (model, compile_peak) = peak_of(|| compile(&snapshot, &config, "kube-system"));
    assert!(model.errors().next().is_none(), "the synthetic cluster compiles cleanly: {:?}", &model.diagnostics[..1]);
    let (_, snapshot_heap) = peak_of(|| snapshot.clone());
    let rules_out: usize = model.cluster_rules.len()
        + model.tenants.iter().map(|t| t.namespace_rules.len() + t.service_rules.len()).sum::<usize>();
    println!(
        "compile alone: {:>6.1} ms   (baseline: clone the snapshot {:.1} ms; ratio {:.1}x)   peak heap {:.1} MB \
         (snapshot {:.1} MB)   {} rules in the model",
        compile_time.as_secs_f64() * 1e3,
        clone.as_secs_f64() * 1e3,
        compile_time.as_secs_f64() / clone.as_secs_f64(),
        mb(compile_peak),
        mb(snapshot_heap),
        rules_out
    );
    std::fs::remove_dir_all(&dir).unwrap();

    let index_build = time(3, || Evaluator::new(&model));
    let evaluator = Evaluator::new(&model);
    let fast = flows(&synth, &config, 200_000, 7);
    let (mut accept, mut drop, mut reject) = (0, 0, 0);
    let t = Instant::now();
    for f in &fast {
        match evaluator.decide(f).expect("every synthetic flow decides").verdict {
            Verdict::Accept => accept += 1,
            Verdict::Drop => drop += 1,
            Verdict::Reject => reject += 1,
        }
    }
    let fast_rate = fast.len() as f64 / t.elapsed().as_secs_f64();
    let slow = flows(&synth, &config, 2_000, 7);
    let t = Instant::now();
    for f in &slow {
        black_box(evaluator.decide_by_scan(f).expect("decides"));
    }
    let slow_rate = slow.len() as f64 / t.elapsed().as_secs_f64();
    println!(
        "simulate: {:>9.0} flows/s on one core   (baseline: full scan {:.0} flows/s; ratio {:.0}x)   index built in {:.1} ms",
        fast_rate,
        slow_rate,
        fast_rate / slow_rate,
        index_build.as_secs_f64() * 1e3
    );
    println!("verdicts over {} flows: {accept} accept, {drop} drop, {reject} reject", fast.len());
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run the quick size then.
    let quick =
        std::env::var("CES_BENCH_QUICK").is_ok_and(|v| !v.is_empty()) || !std::env::args().any(|a| a == "--bench");
    println!(
        "CES scale benchmark (release build; loading parses on every core, the baseline and compile on one; medians of \
         3 loads and 5 compiles)"
    );
    scenario(10_000, 1_000);
    if quick {
        println!("\n(quick run: only the small size)");
        return;
    }
    scenario(100_000, 5_000);
    println!(
        "\ntargets at 100k pods / 5k rules: `ces compile` from YAML < 2 s and < 500 MB peak RSS; load + compile within \
         3x of parsing the same files to untyped values; simulate > 100k flows/s on one core"
    );
}
