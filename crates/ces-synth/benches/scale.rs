//! Scale benchmark: `cargo bench -p ces-synth --bench scale`.
//!
//! For each size it prints compile time and peak heap, and simulate throughput on one core. Every figure comes with
//! a baseline measured in the same run, because this machine is noisy:
//! - compile time against the time to clone the input snapshot (one pass over the same data);
//! - compile peak heap against the heap of the snapshot it reads;
//! - indexed simulate throughput against the full-scan evaluator (same decisions, every rule tested).
//!
//! Heap is counted by a global allocator wrapper: bytes live at the peak, so it is exact for this process and does
//! not depend on the RSS of anything else. Set CES_BENCH_QUICK=1 to run only the small size.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ces_compiler::compile;
use ces_eval::{Evaluator, Flow};
use ces_model::{Destination, Protocol, Verdict};
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

/// Flows from pods (and a few unknown addresses) to a mix of destinations that rules match and do not.
fn flows(s: &Synth, n: usize, seed: u64) -> Vec<Flow> {
    let mut rng = Rng::new(seed);
    let ns_count = s.namespaces.len();
    let at = "2026-11-26T12:00:00Z".parse().unwrap();
    (0..n)
        .map(|_| {
            let source = if rng.below(20) == 0 {
                "192.0.2.1".parse().unwrap()
            } else {
                let p = &s.pods[rng.below(s.pods.len())];
                p.ips[0]
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
            Flow { source, tenant: None, destination, protocol, port, at }
        })
        .collect()
}

fn scenario(pods: usize, rules: usize) {
    println!("\n== {pods} pods, {rules} rules ==");
    let synth = Synth::generate(pods, rules, 42);
    let config = synth.config();
    let (snapshot, snapshot_heap) = peak_of(|| synth.snapshot());
    println!(
        "input: {} namespaces, {} services, {} ExternalServices; snapshot heap {:.1} MB",
        synth.namespaces.len(),
        synth.services.len(),
        synth.external_services.len(),
        mb(snapshot_heap)
    );

    let clone = time(5, || snapshot.clone());
    let compile_time = time(5, || compile(&snapshot, &config, "kube-system"));
    let (model, compile_peak) = peak_of(|| compile(&snapshot, &config, "kube-system"));
    assert!(model.diagnostics.is_empty(), "the synthetic cluster compiles cleanly: {:?}", &model.diagnostics[..1]);
    let rules_out: usize = model.cluster_rules.len()
        + model.tenants.iter().map(|t| t.namespace_rules.len() + t.service_rules.len()).sum::<usize>();
    println!(
        "compile: {:>8.1} ms   (baseline: clone the snapshot {:.1} ms; ratio {:.1}x)   {} rules in the model",
        compile_time.as_secs_f64() * 1e3,
        clone.as_secs_f64() * 1e3,
        compile_time.as_secs_f64() / clone.as_secs_f64(),
        rules_out
    );
    println!(
        "compile peak heap: {:>6.1} MB   (baseline: snapshot {:.1} MB; ratio {:.2}x)",
        mb(compile_peak),
        mb(snapshot_heap),
        compile_peak as f64 / snapshot_heap as f64
    );
    println!("heap at the compile peak, input snapshot included: {:.1} MB", mb(snapshot_heap + compile_peak));

    let index_build = time(3, || Evaluator::new(&model));
    let evaluator = Evaluator::new(&model);
    let fast = flows(&synth, 200_000, 7);
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
    let slow = flows(&synth, 2_000, 7);
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
    println!("CES scale benchmark (release build, one thread; medians of 5 compiles)");
    scenario(10_000, 1_000);
    if quick {
        println!("\n(quick run: only the small size)");
        return;
    }
    scenario(100_000, 5_000);
    println!("\ntargets at 100k pods / 5k rules: compile < 1 s and < 300 MB; simulate > 100k flows/s on one core");
}
