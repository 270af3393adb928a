//! Flow pipeline benchmark (root, nftables): `cargo bench -p ces --bench flows`.
//!
//! Measured in one run, each against a baseline of the same run:
//! 1. Records per second from the kernel's events into the store. A lab gateway with the CES table forwards real
//!    connections and drops; the conntrack and NFLOG datagrams the kernel sends are captured as they are, then
//!    replayed through the gateway's own code (datagram parsing, tag lookup, attribution with pod history, the
//!    SQLite store with its rollups), at full speed (the pipeline saturated: losses counted) and paced at the target
//!    rate (no loss allowed). Baselines: the same datagrams written to /dev/null, and only parsed.
//! 2. `ces flows` and `ces report`, the real binary as a user runs it, over a 10M-record store (a day of a busy
//!    gateway's connections: 1000 pods in 40 namespaces), against the same commands on an empty store.
//! 3. Bytes on disk per record.
//!
//! Set CES_BENCH_QUICK=1 (or run it through `cargo test --benches`) for a short run (1M records).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ces_flow::attribute::Attributor;
use ces_flow::history::PodHistory;
use ces_flow::pipeline::Pipeline;
use ces_flow::record::{Counts, FlowRecord, Kind, Outcome, RuleRef, Verdict};
use ces_flow::store::{Reader, StoreConfig, Writer};
use ces_lab::{Lab, LabSpec, Side};
use ces_nft::tags::TagIds;
use ces_sync::Backend as _;

fn quick() -> bool {
    std::env::var_os("CES_BENCH_QUICK").is_some() || !std::env::args().any(|a| a == "--bench")
}

/// A small deterministic generator (xorshift).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const NAMESPACES: u64 = 40;
const PODS_PER_NS: u64 = 25;
const DESTINATIONS: u64 = 2000;

/// Record `i` of `n` spread over `span` ending at `end`: each pod mostly reaches its namespace's usual destinations
/// (20 per namespace), sometimes any of 2000; 5% drops and 1% rejects by their rules, a few failed connections.
fn record(g: &mut Gen, i: u64, n: u64, end: jiff::Timestamp, span: Duration) -> FlowRecord {
    let t = end - span + Duration::from_nanos((span.as_nanos() as u64 / n) * i);
    let ns = g.below(NAMESPACES);
    let pod = g.below(PODS_PER_NS);
    let roll = g.below(100);
    let verdict = match roll {
        0 => Verdict::Reject,
        1..=5 => Verdict::Drop,
        _ => Verdict::Accept,
    };
    let dst = if g.below(100) < 95 { ns * 20 + g.below(20) } else { g.below(DESTINATIONS) };
    let mut r = FlowRecord::packet(t, if ns < 20 { "payments" } else { "analytics" }, verdict);
    r.source.ip = Some(std::net::Ipv4Addr::from(0x0a0a_0000 + (ns * PODS_PER_NS + pod) as u32).into());
    r.source.port = Some(32768 + g.below(28000) as u16);
    r.source.namespace = Some(format!("ns{ns}"));
    r.source.pod = Some(format!("app{ns}-{pod}"));
    r.destination.ip = Some(std::net::Ipv4Addr::from(0xc633_0000 + dst as u32).into());
    r.destination.port = Some(if dst % 10 == 0 { 80 } else { 443 });
    r.protocol = "tcp".into();
    r.rule = Some(RuleRef {
        rule: match verdict {
            Verdict::Accept => format!("NamespaceEgressRule/ns{ns}/allow"),
            Verdict::Drop => "ClusterEgressRule/block".into(),
            Verdict::Reject => format!("Tenant/{}", r.tenant),
        },
        context: "namespace".into(),
        mode: "enforce".into(),
    });
    if verdict == Verdict::Accept {
        r.kind = Kind::Connection;
        r.end = Some(t + Duration::from_millis(g.below(5000)));
        r.packets = Counts { out: 10 + g.below(50), back: 10 + g.below(80) };
        r.bytes = Counts { out: 500 + g.below(5000), back: 1000 + g.below(500_000) };
        r.outcome = match g.below(200) {
            0 => Outcome::Reset,
            1 => Outcome::NoAnswer,
            _ => Outcome::Completed,
        };
    }
    r
}

const PODS: usize = 20;

fn pod_ip(i: usize) -> IpAddr {
    format!("10.10.0.{}", 11 + i).parse().unwrap()
}

fn lab_policy() -> String {
    let mut m = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: payments}\n---\n");
    for i in 0..PODS {
        m += &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: checkout-{i}, namespace: payments, labels: {{app: checkout}}}}\nstatus: {{phase: Running, podIPs: [{{ip: {}}}]}}\n---\n",
            pod_ip(i)
        );
    }
    m += "apiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {name: blocked, namespace: kube-system}\nspec: {addresses: [203.0.113.9]}\n---\n";
    m += "apiVersion: kubeovn.io/v1alpha1\nkind: ClusterEgressRule\nmetadata: {name: block}\nspec: {action: drop, priority: 1, externalServices: [blocked]}\n---\n";
    m += "apiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {name: lab, namespace: payments}\nspec: {addresses: [198.18.70.0/24], ports: [{protocol: tcp, port: \"443\"}]}\n---\n";
    m += "apiVersion: kubeovn.io/v1alpha1\nkind: NamespaceEgressRule\nmetadata: {name: lab, namespace: payments}\nspec: {action: accept-decisively, externalServices: [lab]}\n";
    m
}

/// The drop line logs every packet here (the default, 100 a second, would keep the capture small).
const LAB_CONFIG: &str = "clusterName: k8s\nisSupportRouteDomain: true\ntenant:\n  - name: Common\n  - name: payments\n    namespaces: payments\n    routeDomain: {id: 10, name: rd10}\n    defaultAction: reject\n    gateway: {interfaces: [pay0]}\ngateway: {logRate: 1000000}\n";

/// What the kernel sent while the lab's traffic crossed the gateway, as it sent it.
struct Captured {
    conntrack: Vec<Vec<u8>>,
    nflog: Vec<Vec<u8>>,
    overruns: u64,
    tags: TagIds,
    model: ces_model::PolicyModel,
    connections: u64,
    drops: u64,
}

fn capture() -> Captured {
    let secs = if quick() { 0.15 } else { 0.5 };
    let drops = if quick() { 2_000 } else { 20_000 };
    let spec = LabSpec {
        prefix: "cesfb".into(),
        sides: vec![Side { gateway_interface: "pay0".into(), addresses: (0..PODS).map(pod_ip).collect() }],
        servers: vec!["198.18.70.1".parse().unwrap(), "203.0.113.9".parse().unwrap()],
        tcp_ports: vec![443],
        udp_ports: vec![7],
        ..LabSpec::default()
    };
    let lab = Lab::build(spec).unwrap_or_else(|e| panic!("cannot build the network-namespace lab: {e}"));
    let snap = ces_snapshot::manifests::load_str(&lab_policy(), "policy.yaml");
    let config = ces_config::CesConfig::from_yaml(LAB_CONFIG, "ces-conf.yaml").unwrap();
    let model = ces_compiler::compile(&snap, &config, "kube-system");
    let mut backend = ces_nft::NftBackend::new(ces_nft::apply::Nft::in_netns(&lab.gateway));
    backend.apply(&model, true).unwrap();
    let group = backend.log_group.load(Ordering::Relaxed) as u16;
    let stop = Arc::new(AtomicBool::new(false));
    let ct: Arc<Mutex<(Vec<Vec<u8>>, u64)>> = Arc::default();
    let log: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let (st, c) = (stop.clone(), ct.clone());
    let ct_reader = ces_lab::spawn_in(&lab.gateway, move || {
        ces_nft::conntrack::enable_accounting().unwrap();
        let mut s = ces_nft::conntrack::EventSocket::open().unwrap();
        while !st.load(Ordering::Relaxed) {
            match s.recv_datagram().unwrap() {
                Some([]) => {}
                Some(d) => c.lock().unwrap().0.push(d.to_vec()),
                None => c.lock().unwrap().1 += 1,
            }
        }
    })
    .unwrap();
    let (st, l) = (stop.clone(), log.clone());
    let log_reader = ces_lab::spawn_in(&lab.gateway, move || {
        let s = ces_nft::nflog::NflogSocket::bind(group).unwrap();
        let mut buf = vec![0u8; 1 << 17];
        while !st.load(Ordering::Relaxed) {
            match s.recv_datagram(&mut buf) {
                Ok([]) | Err(_) => {}
                Ok(d) => l.lock().unwrap().push(d.to_vec()),
            }
        }
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut connections = 0.0;
    for i in 0..PODS {
        let rate = lab.connection_rate(0, pod_ip(i), "198.18.70.1".parse().unwrap(), vec![443], secs).unwrap();
        connections += rate * secs;
    }
    let client = lab.clients[0].clone();
    ces_lab::spawn_in(&client, move || {
        for i in 0..drops {
            let s = std::net::UdpSocket::bind((pod_ip(i % PODS), 0)).unwrap();
            let _ = s.send_to(b"x", ("203.0.113.9", 7));
        }
    })
    .unwrap()
    .join()
    .unwrap()
    .unwrap();
    // Every connection ends now: conntrack reports each as destroyed.
    ces_lab::spawn_in(&lab.gateway, || ces_nft::conntrack::flush().unwrap()).unwrap().join().unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    ct_reader.join().unwrap().unwrap();
    log_reader.join().unwrap().unwrap();
    let tags = backend.tags.read().unwrap().clone();
    let (conntrack, overruns) = std::mem::take(&mut *ct.lock().unwrap());
    let nflog = std::mem::take(&mut *log.lock().unwrap());
    drop(lab);
    Captured { conntrack, nflog, overruns, tags, model, connections: connections as u64, drops: drops as u64 }
}

/// How the replay offers the datagrams.
#[derive(Clone, Copy)]
enum Offer {
    /// Waiting for room in the pipeline's queue: its capacity, nothing lost.
    Capacity,
    /// As the agent does (never waiting), at most this many records a second.
    Paced(f64),
    /// As the agent does, as fast as the replay goes: overload, losses counted.
    Flood,
}

/// Replays the captured datagrams `rounds` times through the gateway's own readers' code into `p`.
fn replay(c: &Captured, rounds: usize, p: &Pipeline, offer: Offer, records_per_round: usize) {
    let mut open = ces_nft::flows::OpenConnections::default();
    let mut seq = None;
    let start = Instant::now();
    let per_datagram = records_per_round as f64 / (c.conntrack.len() + c.nflog.len()) as f64;
    let mut sent = 0u64;
    for _ in 0..rounds {
        for (i, d) in c.conntrack.iter().chain(&c.nflog).enumerate() {
            if i < c.conntrack.len() {
                ces_nft::flows::conntrack_events(ces_nft::conntrack::events(d), &mut open, &c.tags, p);
            } else {
                ces_nft::flows::nflog_packets(ces_nft::nflog::packets(d), &mut seq, &c.tags, p);
            }
            sent += 1;
            // Paced in steps of 1000 datagrams (a sleep per datagram would be the slower part).
            if let Offer::Paced(rate) = offer
                && sent.is_multiple_of(1000)
            {
                let due = Duration::from_secs_f64(sent as f64 * per_datagram / rate);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
    }
}

/// Replays into a fresh store: (records stored, seconds until the last was stored, records lost). `expect`: the
/// records the replay makes (`None`: wait for the pipeline to stop instead).
fn through_pipeline(
    c: &Captured,
    rounds: usize,
    dir: Option<&Path>,
    offer: Offer,
    per_round: usize,
    expect: Option<u64>,
) -> (u64, f64, u64) {
    let writer = dir.map(|dir| {
        let _ = std::fs::remove_dir_all(dir);
        Writer::open(dir, StoreConfig::default()).unwrap()
    });
    let mut p = Pipeline::start(writer, Vec::new(), Attributor::new(PodHistory::new(3600)), 65_536);
    p.lossless = matches!(offer, Offer::Capacity);
    p.policy(&c.model);
    let start = Instant::now();
    replay(c, rounds, &p, offer, per_round);
    let done =
        || if dir.is_some() { p.stats.stored.load(Ordering::Relaxed) } else { p.stats.records.load(Ordering::Relaxed) };
    let mut secs = start.elapsed().as_secs_f64();
    if let Some(n) = expect {
        // Stored, not sealed: sealing the last shard (its indexes) is background work, once per million records.
        while done() + p.stats.total_lost() < n && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(1));
        }
        secs = start.elapsed().as_secs_f64();
        p.close();
    } else {
        p.close();
        secs = secs.max(start.elapsed().as_secs_f64());
    }
    (done(), secs, p.stats.total_lost())
}

fn pipeline_part(base: &Path) -> bool {
    let c = capture();
    let events: usize = c.conntrack.iter().map(|d| ces_nft::conntrack::events(d).len()).sum();
    let logged: usize = c.nflog.iter().map(|d| ces_nft::nflog::packets(d).len()).sum();
    let bytes: usize = c.conntrack.iter().chain(&c.nflog).map(Vec::len).sum();
    println!(
        "captured from the lab gateway: {} connections and {} dropped packets sent; the kernel sent {events} conntrack events in {} datagrams ({} overruns) and {logged} logged packets in {} datagrams, {} KiB",
        c.connections,
        c.drops,
        c.conntrack.len(),
        c.overruns,
        c.nflog.len(),
        bytes >> 10
    );
    // One connection is two events (NEW, DESTROY) and one record; one logged drop is one record.
    let per_round = events / 2 + logged;
    let rounds = ((if quick() { 300_000 } else { 2_000_000 }) / per_round.max(1)).max(1);
    let total_events = (events + logged) * rounds;
    // Baselines: the same datagrams written to /dev/null, and only parsed.
    let mut null = std::fs::OpenOptions::new().write(true).open("/dev/null").unwrap();
    let start = Instant::now();
    for _ in 0..rounds {
        for d in c.conntrack.iter().chain(&c.nflog) {
            std::io::Write::write_all(&mut null, d).unwrap();
        }
    }
    let null_rate = total_events as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut parsed = 0usize;
    for _ in 0..rounds {
        parsed += c.conntrack.iter().map(|d| ces_nft::conntrack::events(d).len()).sum::<usize>();
        parsed += c.nflog.iter().map(|d| ces_nft::nflog::packets(d).len()).sum::<usize>();
    }
    let parse_rate = parsed as f64 / start.elapsed().as_secs_f64();
    let (made, secs, _) = through_pipeline(&c, rounds, None, Offer::Capacity, per_round, None);
    let records = made as usize;
    println!("replayed {rounds} times: {total_events} kernel events, {records} records");
    println!("  baseline, written to /dev/null:     {null_rate:>10.0} events/s");
    println!("  baseline, parsed only:              {parse_rate:>10.0} events/s");
    println!("  baseline, attributed, no store:     {:>10.0} records/s", made as f64 / secs);
    let (stored, secs, _) =
        through_pipeline(&c, rounds, Some(&base.join("capacity")), Offer::Capacity, per_round, Some(made));
    let rate = stored as f64 / secs;
    let events_rate = rate * total_events as f64 / records as f64;
    println!(
        "  CES capacity (into the store):      {rate:>10.0} records/s = {events_rate:.0} events/s: {:.4} of /dev/null, {:.3} of parsing; {stored} of {records} stored",
        events_rate / null_rate,
        events_rate / parse_rate
    );
    let target = 100_000.0;
    let (stored_p, secs_p, lost_p) =
        through_pipeline(&c, rounds, Some(&base.join("paced")), Offer::Paced(target), per_round, Some(made));
    println!(
        "  offered at {target:.0} records/s:       {:>10.0} records/s stored, {lost_p} lost (target: none lost)",
        stored_p as f64 / secs_p
    );
    let (stored_f, secs_f, lost_f) =
        through_pipeline(&c, rounds, Some(&base.join("flood")), Offer::Flood, per_round, Some(made));
    println!(
        "  offered as fast as replayed:        {:>10.0} records/s stored, {lost_f} lost and counted ({} stored + {lost_f} lost of {records})",
        stored_f as f64 / secs_f,
        stored_f
    );
    let ok = rate >= target && lost_p == 0 && stored_f + lost_f == records as u64;
    println!("  {}", if ok { "ok" } else { "MISSED" });
    ok
}

fn ces() -> &'static str {
    env!("CARGO_BIN_EXE_ces")
}

/// Runs `ces args` `runs` times; the median wall time, and what the last run printed (its line count).
fn timed(args: &[&str], runs: usize) -> (Duration, usize) {
    let mut times = Vec::new();
    let mut lines = 0;
    for _ in 0..runs {
        let start = Instant::now();
        let out = Command::new(ces()).args(args).stderr(Stdio::inherit()).output().unwrap();
        times.push(start.elapsed());
        assert!(out.status.success(), "ces {}: failed", args.join(" "));
        lines = out.stdout.iter().filter(|b| **b == b'\n').count();
    }
    times.sort();
    (times[times.len() / 2], lines)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn store_part(base: &Path) -> bool {
    let n: u64 = if quick() { 1_000_000 } else { 10_000_000 };
    let dir = base.join("store");
    let empty = base.join("empty");
    Writer::open(&empty, StoreConfig::default()).unwrap().close().unwrap();
    let end = jiff::Timestamp::now();
    let span = Duration::from_secs(86_400);
    let start = Instant::now();
    let mut w = Writer::open(&dir, StoreConfig::default()).unwrap();
    let mut g = Gen(0x9e37_79b9_7f4a_7c15);
    let mut batch = Vec::with_capacity(10_000);
    let mut in_append = Duration::ZERO;
    for i in 0..n {
        batch.push(record(&mut g, i, n, end, span));
        if batch.len() == 10_000 || i + 1 == n {
            let t = Instant::now();
            w.append(&batch).unwrap();
            in_append += t.elapsed();
            batch.clear();
        }
    }
    let appended = in_append;
    w.close().unwrap();
    let built = start.elapsed();
    let r = Reader::open(&dir).unwrap();
    let (count, bytes) = (r.count().unwrap(), r.bytes().unwrap());
    println!(
        "store: {count} records over a day (1000 pods, 40 namespaces), appended in {:.1} s ({:.0} records/s, the store's own time), sealed (indexes built) by {:.1} s",
        appended.as_secs_f64(),
        n as f64 / appended.as_secs_f64(),
        built.as_secs_f64()
    );
    println!(
        "bytes on disk per record: {:.0} ({} MiB for {count} records, rollups included)",
        bytes as f64 / count as f64,
        bytes >> 20
    );
    let d = dir.to_str().unwrap();
    let e = empty.to_str().unwrap();
    let queries: Vec<(&str, Vec<&str>)> = vec![
        ("the newest 100 of a namespace", vec!["flows", "--namespace", "ns7", "--last", "100"]),
        ("a pod's last hour", vec!["flows", "--pod", "ns7/app7-3", "--since", "1h"]),
        (
            "a rule's drops, newest 100",
            vec!["flows", "--rule", "ClusterEgressRule/block", "--verdict", "drop", "--last", "100"],
        ),
        ("to an address, newest 100", vec!["flows", "--to", "198.51.0.147", "--last", "100"]),
        ("a network's last 10 minutes", vec!["flows", "--to", "198.51.0.0/24", "--since", "10m"]),
        ("everything of the last minute", vec!["flows", "--since", "1m"]),
        ("report, the last 24 h", vec!["report", "--since", "24h"]),
        ("report of a namespace, 24 h", vec!["report", "--since", "24h", "--namespace", "ns7"]),
        ("report, the last hour", vec!["report", "--since", "1h"]),
    ];
    let mut ok = true;
    println!(
        "\n{:<34} {:>10} {:>12} {:>8}   target < 1000 ms",
        "query (ces, as a user runs it)",
        if quick() { "1M store" } else { "10M store" },
        "empty store",
        "lines"
    );
    for (what, args) in &queries {
        let mut full = args.clone();
        full.extend(["--store", d, "-o", "json"]);
        let mut base = args.clone();
        base.extend(["--store", e, "-o", "json"]);
        let (t_empty, _) = timed(&base, 3);
        let (t, lines) = timed(&full, 3);
        let pass = t < Duration::from_secs(1);
        ok &= pass;
        println!(
            "{what:<34} {:>8.0} ms {:>9.0} ms {lines:>8}   {}",
            ms(t),
            ms(t_empty),
            if pass { "ok" } else { "MISSED" }
        );
    }
    ok &= ui_part(d, e);
    ok
}

/// A `ces ui` serving `store` on loopback (a free port), stopped when dropped.
struct Ui(std::process::Child, String);

impl Ui {
    fn start(store: &str) -> Ui {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(ces())
            .args(["ui", "--example", "--store", store, "--listen", &addr])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "ces ui did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ui(child, addr)
    }

    /// The median time of 3 GETs of `path`, from the request to the last byte; the body's length.
    fn get(&self, path: &str) -> (Duration, usize) {
        use std::io::{Read as _, Write as _};
        let mut times = Vec::new();
        let mut len = 0;
        for _ in 0..3 {
            let start = Instant::now();
            let mut s = std::net::TcpStream::connect(&self.1).unwrap();
            write!(s, "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out).unwrap();
            times.push(start.elapsed());
            assert!(
                out.starts_with(b"HTTP/1.1 200"),
                "GET {path}: {}",
                String::from_utf8_lossy(&out[..out.len().min(200)])
            );
            len = out.len();
        }
        times.sort();
        (times[1], len)
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The web UI's pages over the same store, served by the real `ces ui` and fetched over HTTP as a browser does
/// (server time: request to last byte; the browser's drawing is not counted), against the same pages over an empty
/// store.
fn ui_part(store: &str, empty: &str) -> bool {
    let (full, base) = (Ui::start(store), Ui::start(empty));
    let pages = [
        ("overview page (24 h)", "/"),
        ("flow map page (24 h)", "/map"),
        ("rules page (24 h)", "/rules"),
        ("flows page (newest 100)", "/flows"),
        ("/api/report (24 h)", "/api/report"),
        ("/api/map (24 h)", "/api/map"),
    ];
    let mut ok = true;
    println!(
        "\n{:<34} {:>10} {:>12} {:>8}   target < 1000 ms",
        "ces ui, GET",
        if quick() { "1M store" } else { "10M store" },
        "empty store",
        "bytes"
    );
    for (what, path) in pages {
        let (t_empty, _) = base.get(path);
        let (t, len) = full.get(path);
        let pass = t < Duration::from_secs(1);
        ok &= pass;
        println!(
            "{what:<34} {:>8.0} ms {:>9.0} ms {len:>8}   {}",
            ms(t),
            ms(t_empty),
            if pass { "ok" } else { "MISSED" }
        );
    }
    ok
}

fn main() {
    let base = PathBuf::from("/var/tmp").join(format!("ces-bench-flows-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    // CES_BENCH_PART=pipeline or store runs one part.
    let part = std::env::var("CES_BENCH_PART").unwrap_or_default();
    let mut ok = true;
    if part != "store" {
        ok &= pipeline_part(&base);
        println!();
    }
    if part != "pipeline" {
        ok &= store_part(&base);
    }
    let _ = std::fs::remove_dir_all(&base);
    if !ok {
        eprintln!("a target was missed");
        std::process::exit(1);
    }
}
