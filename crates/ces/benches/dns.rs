//! DNS benchmark (root, nftables, iptables, dnsmasq): `cargo bench -p ces --bench dns`.
//!
//! A lab with one tenant on its own gateway interface, a real DNS server (dnsmasq) behind the gateway, and the real
//! `ces gateway` agent (release build) holding the answers that cross the gateway. Measured in one run:
//! - DNS answer latency seen by the client (query sent to answer received) at a steady 5k queries/s, each answer a
//!   name the agent has not seen (so each one is learned and written to the kernel before it is released), against
//!   the same kind of queries with no CES table and no hook in the same lab: p50, p99 and what the hold adds;
//! - first connections right after their answers: 10k names resolved one after another, each address connected to
//!   at once, failures counted;
//! - memory per 100k learned addresses: the agent's resident memory and the kernel's slab memory before and after
//!   learning 1000 names of 100 addresses each.
//!
//! Set CES_BENCH_QUICK=1 (or run it through `cargo test --benches`) for a short run.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ces_dns::wire::TYPE_A;
use ces_lab::{Lab, LabSpec, Outcome, Proto, Side, Zone};

const CLIENT: &str = "10.10.0.11";
const RESOLVER: &str = "10.255.0.53";
const HEALTH: u16 = 19_953;

/// The address of bench name `i`: 198.19.0.0/16, served by the server namespace as a whole (a local route).
fn bench_addr(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0xc613_0000u32 + 1 + i as u32))
}

fn mem_addr(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0xac10_0000u32 + 1 + i as u32))
}

fn policy() -> String {
    let mut m = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: payments}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: checkout-0, namespace: payments}\nstatus: {phase: Running, podIPs: [{ip: 10.10.0.11}]}\n---\n",
    );
    m += &format!(
        "apiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {{name: dns, namespace: kube-system}}\nspec: {{addresses: [{RESOLVER}], ports: [{{protocol: udp, port: \"53\"}}, {{protocol: tcp, port: \"53\"}}]}}\n---\n"
    );
    m += "apiVersion: kubeovn.io/v1alpha1\nkind: ClusterEgressRule\nmetadata: {name: dns}\nspec: {action: accept-decisively, externalServices: [dns]}\n---\n";
    m += "apiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {name: bench, namespace: payments}\nspec: {addresses: [\"*.bench.test\", \"*.mem.test\"], ports: [{protocol: tcp, port: \"443\"}]}\n---\n";
    m += "apiVersion: kubeovn.io/v1alpha1\nkind: NamespaceEgressRule\nmetadata: {name: bench, namespace: payments}\nspec: {action: accept-decisively, externalServices: [bench]}\n";
    m
}

/// `maxNames` above every name the run resolves, so that nothing is evicted while memory is measured.
const CONFIG: &str = "clusterName: k8s\nisSupportRouteDomain: true\ntenant:\n  - name: Common\n  - name: payments\n    namespaces: payments\n    routeDomain: {id: 10, name: rd10}\n    defaultAction: reject\n    gateway: {interfaces: [pay0]}\ngateway:\n  dns: {maxNames: 100000}\n";

/// The agent, killed when dropped (also when the run fails half-way).
struct Killed(std::process::Child);

impl std::ops::Deref for Killed {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Killed {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

/// Sends `n` queries for names `first..first + n` at `rate` per second from the client, over UDP; returns each
/// answer's latency in microseconds, and how many got no answer within a second.
fn load(lab: &Lab, first: usize, n: usize, rate: f64) -> (Vec<f64>, usize) {
    ces_lab::spawn_in(&lab.clients[0], move || {
        let s = UdpSocket::bind((CLIENT, 0)).unwrap();
        s.connect((RESOLVER, 53)).unwrap();
        let sent: Arc<Mutex<HashMap<u16, Instant>>> = Arc::default();
        let r = s.try_clone().unwrap();
        r.set_read_timeout(Some(Duration::from_millis(1000))).unwrap();
        let sent2 = sent.clone();
        let receiver = std::thread::spawn(move || {
            let mut lat = Vec::with_capacity(n);
            let mut buf = [0u8; 1500];
            while lat.len() < n {
                let Ok(k) = r.recv(&mut buf) else { break };
                let now = Instant::now();
                if k < 2 {
                    continue;
                }
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                if let Some(t) = sent2.lock().unwrap().remove(&id) {
                    lat.push(now.duration_since(t).as_secs_f64() * 1e6);
                }
            }
            lat
        });
        let start = Instant::now();
        for k in 0..n {
            // Sleep, not spin: on two cores a spinning client would take the CPU the resolver and the agent need.
            let due = start + Duration::from_secs_f64(k as f64 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let q = ces_lab::query(k as u16, &format!("n{}.bench.test", first + k), TYPE_A);
            sent.lock().unwrap().insert(k as u16, Instant::now());
            s.send(&q).unwrap();
        }
        let lat = receiver.join().unwrap();
        let lost = n - lat.len();
        (lat, lost)
    })
    .unwrap()
    .join()
    .unwrap()
    .unwrap()
}

fn slab_kib() -> u64 {
    let m = std::fs::read_to_string("/proc/meminfo").unwrap();
    m.lines().find(|l| l.starts_with("Slab:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}

fn metrics(lab: &Lab) -> String {
    ces_lab::spawn_in(&lab.gateway, || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", HEALTH)).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        Some(body)
    })
    .unwrap()
    .join()
    .unwrap()
    .unwrap()
    .unwrap_or_default()
}

fn metric(lab: &Lab, name: &str) -> f64 {
    metrics(lab)
        .lines()
        .find(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b'{'))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn main() {
    let quick =
        std::env::var("CES_BENCH_QUICK").is_ok_and(|v| !v.is_empty()) || !std::env::args().any(|a| a == "--bench");
    let (latency_queries, first_conns, mem_names) = if quick { (2_000, 500, 50) } else { (20_000, 10_000, 1_000) };
    let rate = 5_000.0;
    println!(
        "CES DNS benchmark: {latency_queries} queries at {rate:.0}/s, {first_conns} first connections, {mem_names} names x 100 addresses (release build)"
    );
    let dir = std::env::temp_dir().join(format!("ces-dns-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("policy.yaml"), policy()).unwrap();
    std::fs::write(dir.join("ces-conf.yaml"), CONFIG).unwrap();

    let mut lab = Lab::build(LabSpec {
        prefix: format!("cesn{}", std::process::id() % 100_000),
        sides: vec![Side { gateway_interface: "pay0".into(), addresses: vec![CLIENT.parse().unwrap()] }],
        servers: vec![RESOLVER.parse().unwrap()],
        tcp_ports: vec![443],
        dns: vec![RESOLVER.parse().unwrap()],
        ..LabSpec::default()
    })
    .expect("lab (root, nftables)");
    // Every bench address is the server's: a local route for the whole prefixes.
    for prefix in ["198.19.0.0/16", "172.16.0.0/12"] {
        ces_lab::run_in(&lab.server, &["ip", "route", "add", "local", prefix, "dev", "lo"]).unwrap();
    }
    // Names, each used once: the warm-up's, each round's baseline and held runs', the first connections'.
    let rounds = 3;
    let per_round = latency_queries / rounds;
    let warm = rate as usize / 2;
    let first = warm + 2 * rounds * per_round;
    let names = first + first_conns;
    let mut records: Vec<(String, IpAddr)> = (0..names).map(|i| (format!("n{i}.bench.test"), bench_addr(i))).collect();
    for i in 0..mem_names {
        records.extend((0..100).map(|k| (format!("m{i}.mem.test"), mem_addr(i * 100 + k))));
    }
    lab.start_dns(&Zone { listen: vec![RESOLVER.parse().unwrap()], records, cnames: Vec::new(), ttl: 300 })
        .expect("dnsmasq");

    let start_agent = |tag: usize| {
        let agent = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.gateway,
                env!("CARGO_BIN_EXE_ces"),
                "gateway",
                "--flow-store",
                "none",
                "--manifests",
            ])
            .arg(dir.join("policy.yaml"))
            .arg("--config")
            .arg(dir.join("ces-conf.yaml"))
            .args(["--health-addr", &format!("127.0.0.1:{HEALTH}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("agent{tag}.log"))).unwrap())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while metric(&lab, "ces_dns_queue_bound") != 1.0 {
            let log = std::fs::read_to_string(dir.join(format!("agent{tag}.log"))).unwrap_or_default();
            assert!(start.elapsed() < Duration::from_secs(30), "{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Killed(agent)
    };
    let cleanup = || {
        let out = Command::new("ip")
            .args(["netns", "exec", &lab.gateway, env!("CARGO_BIN_EXE_ces"), "gateway", "cleanup"])
            .output()
            .unwrap();
        assert!(out.status.success());
    };
    // Rounds of the same load, alternately with no CES table or hook at all (the baseline) and held by the agent,
    // so that the machine's drift during the run falls on both alike.
    load(&lab, 0, warm, rate); // warm-up
    let (mut base, mut held) = (Vec::new(), Vec::new());
    let (mut base_lost, mut held_lost) = (0, 0);
    let mut diffs = Vec::new();
    let mut agent: Option<Killed> = None;
    for r in 0..rounds {
        if let Some(mut a) = agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        cleanup();
        let (mut b, bl) = load(&lab, warm + 2 * r * per_round, per_round, rate);
        agent = Some(start_agent(r));
        let (mut h, hl) = load(&lab, warm + (2 * r + 1) * per_round, per_round, rate);
        let (bp, hp) = (pct(&mut b, 0.99), pct(&mut h, 0.99));
        println!("  round {}: p99 {bp:.0} us with no CES table, {hp:.0} us held ({:+.0} us)", r + 1, hp - bp);
        diffs.push(hp - bp);
        base.extend(b);
        held.extend(h);
        base_lost += bl;
        held_lost += hl;
    }
    let mut agent = agent.expect("the last round's agent");
    let learned = metric(&lab, "ces_dns_addresses_learned_total");
    let (b50, b99, h50, h99) = (pct(&mut base, 0.5), pct(&mut base, 0.99), pct(&mut held, 0.5), pct(&mut held, 0.99));
    println!(
        "DNS answer latency at {rate:.0} queries/s, client's view (query sent to answer received), {rounds} rounds:"
    );
    println!("  no CES table (baseline): p50 {b50:>6.0} us   p99 {b99:>6.0} us   {base_lost} unanswered");
    println!(
        "  held by the CES agent:   p50 {h50:>6.0} us   p99 {h99:>6.0} us   {held_lost} unanswered   (each answer a new name: {learned:.0} learned by the last agent)"
    );
    println!(
        "  added by the hold: p50 {:+.0} us, p99 {:+.0} us pooled (p99 ratio {:.2}x), median of the rounds' p99 differences {:+.0} us; the agent's own hold time: mean {:.0} us",
        h50 - b50,
        h99 - b99,
        h99 / b99,
        pct(&mut diffs, 0.5),
        1e6 * metric(&lab, "ces_dns_hold_seconds_sum") / metric(&lab, "ces_dns_hold_seconds_count")
    );

    // The agent's own view: how long it held answers (its histogram's buckets).
    let m = metrics(&lab);
    let buckets: Vec<(String, f64)> = m
        .lines()
        .filter(|l| l.starts_with("ces_dns_hold_seconds_bucket"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?.to_string();
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    let p99_bucket = buckets.iter().find(|(_, c)| *c >= 0.99 * total).map_or("?".to_string(), |b| b.0.clone());
    println!("  the agent's hold, p99 at most {p99_bucket} s; buckets (cumulative): {buckets:?}");

    // First connections: each name resolved, its address connected to at once.
    let from: IpAddr = CLIENT.parse().unwrap();
    let t = Instant::now();
    let mut failures = Vec::new();
    for i in first..first + first_conns {
        let name = format!("n{i}.bench.test");
        let addrs = lab.resolve(0, from, RESOLVER.parse().unwrap(), &name, TYPE_A, false).expect("resolve");
        let to = addrs[0];
        let outcome = lab.probe(0, from, to, Proto::Tcp, 443).expect("probe");
        if outcome != Outcome::Accept {
            failures.push(format!("{name} {to}: {}", outcome.as_str()));
        }
    }
    println!(
        "first connection right after its answer: {} of {first_conns} failed ({:.1} s for all)",
        failures.len(),
        t.elapsed().as_secs_f64()
    );
    for f in failures.iter().take(5) {
        println!("  failed: {f}");
    }

    // Memory per 100k learned addresses.
    let pid = agent.id();
    let (rss0, slab0, elements0) = (rss_kib(pid), slab_kib(), metric(&lab, "ces_dns_set_elements"));
    for i in 0..mem_names {
        let got = lab.resolve(0, from, RESOLVER.parse().unwrap(), &format!("m{i}.mem.test"), TYPE_A, true).unwrap();
        assert_eq!(got.len(), 100);
    }
    let start = Instant::now();
    while metric(&lab, "ces_dns_set_elements") < elements0 + (mem_names * 100) as f64 {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    let added = metric(&lab, "ces_dns_set_elements") - elements0;
    let (rss1, slab1) = (rss_kib(pid), slab_kib());
    let per = |kib: u64| kib as f64 * 1024.0 / added * 100_000.0 / (1024.0 * 1024.0);
    println!(
        "memory per 100k learned addresses ({added:.0} learned): agent {:.1} MiB resident ({} -> {} KiB), kernel slab {:.1} MiB ({} -> {} KiB; the whole machine's slab, so noisy)",
        per(rss1.saturating_sub(rss0)),
        rss0,
        rss1,
        per(slab1.saturating_sub(slab0)),
        slab0,
        slab1
    );
    let _ = agent.kill();
    let _ = agent.wait();
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
    println!("targets: added p99 < 1 ms at 5k queries/s; 0 first-connection failures");
    assert!(failures.is_empty(), "first connections failed right after their answers");
}
