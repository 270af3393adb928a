//! Conformance of the nftables gateway with `ces simulate`, with real packets.
//!
//! The real `ces gateway --once` programs a gateway network namespace; the same flow table goes through the real
//! `ces simulate --flows` and through real TCP connections, UDP datagrams and ICMP echoes from client namespaces (one
//! per tenant side, the tenants' pod networks overlapping) to a server namespace. Every flow must get the same
//! verdict. Needs root, iproute2, nftables and iputils-ping: without them the test fails and says what is missing
//! (`.ci/install` installs them).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use ces_lab::{Lab, LabSpec, Outcome, Proto, Side};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn ces() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ces"));
    c.current_dir(root()).env_remove("CES_NAMESPACE");
    c
}

/// Tenant sides of the realistic example, as its config names the gateway interfaces.
const SIDES: [(&str, &str, &[&str]); 3] = [
    ("pay0", "payments", &["10.10.0.11", "10.10.0.12", "10.10.0.13", "10.10.0.21", "10.11.0.5"]),
    ("ana0", "analytics", &["10.20.0.5", "fd00:20::5", "10.20.0.9", "10.10.0.11"]),
    // Not a named interface: the gateway finds the tenant by address (Common here).
    ("com0", "Common", &["10.0.0.10", "10.99.0.1"]),
];

const SERVERS: [&str; 16] = [
    "203.0.113.7",
    "198.51.100.66",
    "10.255.0.53",
    "10.255.0.123",
    "198.51.100.5",
    "192.0.2.105",
    "2001:db8:5::10",
    "2001:db8:9::1",
    "93.184.216.34",
    "198.18.0.10",
    "198.18.1.10",
    "198.18.2.10",
    "198.18.3.10",
    "192.0.2.200",
    "198.18.4.10",
    "198.18.5.10",
];
const TCP_PORTS: [u16; 5] = [22, 53, 80, 443, 8443];
const UDP_PORTS: [u16; 2] = [53, 123];

#[derive(Clone, Debug)]
struct Case {
    side: usize,
    from: IpAddr,
    to: IpAddr,
    proto: Proto,
    port: u16,
}

impl Case {
    fn target(&self) -> String {
        ces_lab::target(self.to, self.proto, self.port)
    }
}

/// `HH:MM` of the current UTC time shifted by `hours`.
fn utc_hhmm(hours: i64) -> String {
    let now = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(hours);
    let t = jiff::tz::TimeZone::UTC.to_datetime(now);
    format!("{:02}:{:02}", t.hour(), t.minute())
}

/// Lab-only rules next to the example: an audit rule and an accept on one destination, and two schedules, one
/// holding now and one not (the time zone and windows are chosen around the clock: no waiting for 9 a.m.).
fn extra_rules() -> String {
    format!(
        r#"apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {{name: lab-audit, namespace: kube-system}}
spec: {{addresses: [198.18.0.10], ports: [{{protocol: tcp, port: "443"}}]}}
---
apiVersion: kubeovn.io/v1alpha1
kind: ClusterEgressRule
metadata: {{name: lab-audit-reject}}
spec: {{action: reject, mode: audit, priority: 1, externalServices: [lab-audit]}}
---
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {{name: lab-audit, namespace: payments}}
spec: {{addresses: [198.18.0.10]}}
---
apiVersion: kubeovn.io/v1alpha1
kind: NamespaceEgressRule
metadata: {{name: lab-audited, namespace: payments}}
spec: {{action: accept-decisively, externalServices: [lab-audit]}}
---
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {{name: lab-svc, namespace: payments}}
spec: {{addresses: [198.18.3.10], ports: [{{protocol: tcp, port: "443"}}, {{protocol: udp, port: "53"}}]}}
---
apiVersion: kubeovn.io/v1alpha1
kind: ServiceEgressRule
metadata: {{name: lab-checkout, namespace: payments}}
spec: {{action: accept, service: checkout, externalServices: [lab-svc]}}
---
# Plain accepts in the cluster and namespace contexts only pass the flow on: the service context or the tenant's
# default still decides.
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {{name: lab-svc, namespace: kube-system}}
spec: {{addresses: [198.18.3.10]}}
---
apiVersion: kubeovn.io/v1alpha1
kind: ClusterEgressRule
metadata: {{name: lab-pass}}
spec: {{action: accept, priority: 2, externalServices: [lab-svc]}}
---
apiVersion: kubeovn.io/v1alpha1
kind: NamespaceEgressRule
metadata: {{name: lab-pass, namespace: payments}}
spec: {{action: accept, externalServices: [lab-svc]}}
---
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {{name: lab-now, namespace: payments}}
spec: {{addresses: [198.18.1.10]}}
---
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {{name: lab-later, namespace: payments}}
spec: {{addresses: [198.18.2.10]}}
---
apiVersion: kubeovn.io/v1alpha1
kind: NamespaceEgressRule
metadata: {{name: lab-window-now, namespace: payments}}
spec:
  action: accept-decisively
  externalServices: [lab-now]
  schedule: {{timezone: UTC, windows: [{{start: "{}", end: "{}"}}]}}
---
apiVersion: kubeovn.io/v1alpha1
kind: NamespaceEgressRule
metadata: {{name: lab-window-later, namespace: payments}}
spec:
  action: accept-decisively
  externalServices: [lab-later]
  schedule: {{timezone: UTC, windows: [{{start: "{}", end: "{}"}}]}}
"#,
        utc_hhmm(-2),
        utc_hhmm(2),
        utc_hhmm(3),
        utc_hhmm(5)
    )
}

/// Hand-written flows (every context, action, the default, both tenants on the overlapping address, IPv6) and
/// `generated` more from a seeded generator.
fn cases(generated: usize) -> Vec<Case> {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let c = |side, from: &str, to: &str, proto, port| Case { side, from: ip(from), to: ip(to), proto, port };
    let mut out = vec![
        c(0, "10.10.0.11", "203.0.113.7", Proto::Tcp, 443), // cluster drop (threat intel)
        c(1, "10.10.0.11", "203.0.113.7", Proto::Tcp, 443), // same address, other tenant: same cluster drop
        c(2, "10.0.0.10", "10.255.0.53", Proto::Udp, 53),   // cluster accept, then Common's default
        c(0, "10.10.0.21", "198.51.100.5", Proto::Tcp, 8443), // namespace accept, then payments' default reject
        c(0, "10.10.0.12", "198.51.100.5", Proto::Tcp, 8443), // not the ledger: reject
        c(0, "10.10.0.11", "198.18.0.10", Proto::Tcp, 443), // audit reject, then accept-decisively
        c(1, "10.10.0.11", "198.18.0.10", Proto::Tcp, 443), // analytics: no such rule: drop
        c(0, "10.10.0.11", "198.18.1.10", Proto::Tcp, 443), // inside its window
        c(0, "10.10.0.11", "198.18.2.10", Proto::Tcp, 443), // outside its window
        c(0, "10.10.0.11", "198.18.1.10", Proto::Udp, 53),
        c(0, "10.10.0.11", "198.18.2.10", Proto::Udp, 53),
        c(0, "10.10.0.11", "198.18.1.10", Proto::Icmp, 0),
        c(0, "10.10.0.11", "198.18.2.10", Proto::Icmp, 0),
        c(1, "fd00:20::5", "2001:db8:5::10", Proto::Tcp, 443), // IPv6, office hours in Berlin
        c(1, "fd00:20::5", "2001:db8:9::1", Proto::Tcp, 443),
        c(2, "10.99.0.1", "93.184.216.34", Proto::Tcp, 80), // nobody's address: Common's default
        c(0, "10.11.0.5", "192.0.2.105", Proto::Tcp, 22),   // nightly window
        c(0, "10.10.0.11", "198.18.3.10", Proto::Tcp, 443), // service accept: checkout-0 is an endpoint
        c(0, "10.10.0.12", "198.18.3.10", Proto::Udp, 53),  // checkout-1 too
        c(0, "10.10.0.21", "198.18.3.10", Proto::Tcp, 443), // the ledger is not: payments' default reject
        c(1, "10.10.0.11", "198.18.3.10", Proto::Tcp, 443), // same address in analytics: its default drop
    ];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    while out.len() < 21 + generated {
        let side = next(SIDES.len());
        let addrs = SIDES[side].2;
        let from = ip(addrs[next(addrs.len())]);
        let candidates: Vec<IpAddr> = SERVERS.iter().map(|s| ip(s)).filter(|s| s.is_ipv4() == from.is_ipv4()).collect();
        let to = candidates[next(candidates.len())];
        let (proto, port) = match next(3) {
            0 => (Proto::Tcp, TCP_PORTS[next(TCP_PORTS.len())]),
            1 => (Proto::Udp, UDP_PORTS[next(UDP_PORTS.len())]),
            _ => (Proto::Icmp, 0),
        };
        out.push(Case { side, from, to, proto, port });
    }
    out
}

fn apply(lab: &Lab, dir: &Path) {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.gateway, env!("CARGO_BIN_EXE_ces"), "gateway", "--once", "--manifests"])
        .arg(dir.join("cluster.yaml"))
        .arg(dir.join("policies.yaml"))
        .arg(dir.join("extra.yaml"))
        .arg("--config")
        .arg(dir.join("ces-conf.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "ces gateway --once: {}", String::from_utf8_lossy(&out.stderr));
}

/// Simulate's verdict for every case, through `ces simulate --flows` on the same files.
fn simulate(dir: &Path, cases: &[Case]) -> Vec<String> {
    let mut lines = String::new();
    for c in cases {
        let line = serde_json::json!({"from": c.from.to_string(), "tenant": SIDES[c.side].1, "to": c.target()});
        lines += &format!("{line}\n");
    }
    let flows = dir.join("flows.jsonl");
    std::fs::write(&flows, lines).unwrap();
    let out = ces()
        .args(["simulate", "--flows"])
        .arg(&flows)
        .arg("--manifests")
        .args(["cluster.yaml", "policies.yaml", "extra.yaml"].map(|f| dir.join(f)))
        .arg("--config")
        .arg(dir.join("ces-conf.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "ces simulate: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            format!("{} by {}", v["verdict"].as_str().unwrap(), v["decidedBy"]["rule"].as_str().unwrap())
        })
        .collect()
}

/// Probes every case with real packets, several at a time.
fn probe_all(lab: &Lab, cases: &[Case]) -> Vec<Outcome> {
    let mut out = vec![Outcome::Drop; cases.len()];
    for (chunk_cases, chunk_out) in cases.chunks(12).zip(out.chunks_mut(12)) {
        std::thread::scope(|s| {
            let handles: Vec<_> =
                chunk_cases.iter().map(|c| s.spawn(move || lab.probe(c.side, c.from, c.to, c.proto, c.port))).collect();
            for (h, slot) in handles.into_iter().zip(chunk_out.iter_mut()) {
                *slot = h.join().unwrap().unwrap_or_else(|e| panic!("probe failed: {e}"));
            }
        });
    }
    out
}

fn compare(lab: &Lab, dir: &Path, cases: &[Case], stage: &str) -> BTreeSet<String> {
    let predicted = simulate(dir, cases);
    let real = probe_all(lab, cases);
    let mut mismatches = Vec::new();
    let mut seen = BTreeSet::new();
    for ((c, p), r) in cases.iter().zip(&predicted).zip(&real) {
        let verdict = p.split(' ').next().unwrap();
        seen.insert(format!("{verdict}:{}", p.split(" by ").nth(1).unwrap()));
        if verdict != r.as_str() {
            mismatches.push(format!(
                "{} {} -> {}: simulate says {p}, the network did {}",
                SIDES[c.side].1,
                c.from,
                c.target(),
                r.as_str()
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{stage}: {} of {} flows differ:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
    seen
}

fn lab(prefix: &str) -> Lab {
    lab_with(prefix, Vec::new())
}

fn lab_with(prefix: &str, sink_ports: Vec<u16>) -> Lab {
    let spec = LabSpec {
        prefix: prefix.into(),
        sides: SIDES
            .iter()
            .map(|(iface, _, addrs)| Side {
                gateway_interface: iface.to_string(),
                addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            })
            .collect(),
        servers: SERVERS.iter().map(|a| a.parse().unwrap()).collect(),
        tcp_ports: TCP_PORTS.to_vec(),
        udp_ports: UDP_PORTS.to_vec(),
        sink_ports,
        dns: Vec::new(),
    };
    Lab::build(spec).unwrap_or_else(|e| panic!("cannot build the network-namespace lab: {e}"))
}

fn example_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ces-gw-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["cluster.yaml", "policies.yaml", "ces-conf.yaml"] {
        std::fs::copy(root().join("examples/realistic").join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("extra.yaml"), extra_rules()).unwrap();
    dir
}

#[test]
fn the_gateway_does_what_simulate_says_with_real_packets_through_churn() {
    let dir = example_dir("conf");
    let lab = lab(&format!("cesc{}", std::process::id() % 100_000));
    apply(&lab, &dir);
    let cases = cases(220);
    let seen = compare(&lab, &dir, &cases, "first apply");
    // The table must exercise every kind of decision, or the comparison proves little.
    for want in
        ["accept:", "drop:", "reject:", "drop:ClusterEgressRule/", "reject:Tenant/payments", "drop:Tenant/Common"]
    {
        assert!(seen.iter().any(|s| s.starts_with(want)), "no flow decided `{want}`: {seen:?}");
    }
    for rule in [
        "NamespaceEgressRule/payments/lab-audited",
        "NamespaceEgressRule/payments/lab-window-now",
        "ServiceEgressRule/payments/lab-checkout",
    ] {
        assert!(seen.iter().any(|s| s.ends_with(rule)), "no flow decided by {rule}: {seen:?}");
    }

    // Churn: checkout-1 moves from 10.10.0.12 to 10.10.0.13; the ledger's rule goes; a new rule lets the
    // ledger reach the outside address; then the same flows again.
    let cluster = std::fs::read_to_string(dir.join("cluster.yaml")).unwrap();
    std::fs::write(dir.join("cluster.yaml"), cluster.replace("{ip: 10.10.0.12}", "{ip: 10.10.0.13}")).unwrap();
    let policies = std::fs::read_to_string(dir.join("policies.yaml")).unwrap();
    let start =
        policies.find("kind: NamespaceEgressRule\nmetadata: {name: ledger-card-network").expect("the ledger rule");
    let end = start + policies[start..].find("\n---").unwrap();
    let mut edited =
        policies[..start].to_string() + "kind: ConfigMap\nmetadata: {name: removed-rule}" + &policies[end..];
    edited += "\n---\napiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {name: outside, namespace: payments}\nspec: {addresses: [93.184.216.34]}\n---\napiVersion: kubeovn.io/v1alpha1\nkind: NamespaceEgressRule\nmetadata: {name: lab-new, namespace: payments}\nspec: {action: accept-decisively, externalServices: [outside]}\n";
    std::fs::write(dir.join("policies.yaml"), edited).unwrap();
    apply(&lab, &dir);
    let mut churn = cases.clone();
    churn.push(Case {
        side: 0,
        from: "10.10.0.13".parse().unwrap(),
        to: "93.184.216.34".parse().unwrap(),
        proto: Proto::Tcp,
        port: 80,
    });
    churn.push(Case {
        side: 0,
        from: "10.10.0.21".parse().unwrap(),
        to: "198.51.100.5".parse().unwrap(),
        proto: Proto::Tcp,
        port: 8443,
    });
    let seen = compare(&lab, &dir, &churn, "after churn");
    assert!(seen.iter().any(|s| s == "accept:NamespaceEgressRule/payments/lab-new"), "{seen:?}");
    assert!(!seen.iter().any(|s| s.ends_with("ledger-card-network")), "the deleted rule still decides: {seen:?}");

    // Cleanup removes the table; nothing is left that filters.
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.gateway, env!("CARGO_BIN_EXE_ces"), "gateway", "cleanup"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tables = ces_lab::run_in(&lab.gateway, &["nft", "list", "tables"]).unwrap();
    assert!(!tables.lines().any(|l| l.trim() == "table inet ces"), "{tables}");
    assert!(tables.lines().any(|l| l.trim() == "table inet ceslab"), "other tables are left alone: {tables}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Waits until `what` holds, up to 20 s.
fn wait_until(what: impl Fn() -> bool, describe: impl Fn() -> String) {
    let start = std::time::Instant::now();
    while !what() {
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "timed out waiting: {}", describe());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A child process killed when the test ends, also when it fails (else it would keep cargo's pipes open).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Agent {
    child: std::process::Child,
    log: PathBuf,
}

impl Agent {
    /// Starts `ces gateway` (the watching agent) in the gateway namespace, with `path_dir` first on its PATH.
    fn start(lab: &Lab, dir: &Path, path_dir: &Path, log: PathBuf) -> Agent {
        let path = format!("{}:{}", path_dir.display(), std::env::var("PATH").unwrap_or_default());
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.gateway, "env", &format!("PATH={path}"), env!("CARGO_BIN_EXE_ces")])
            .args(["gateway", "--debounce-ms", "50", "--flow-store", "none", "--manifests"])
            .args(["cluster.yaml", "policies.yaml", "extra.yaml"].map(|f| dir.join(f)))
            .arg("--config")
            .arg(dir.join("ces-conf.yaml"))
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Agent { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_agent_follows_churn_with_element_updates_survives_kill_and_retries_failed_transactions() {
    let dir = example_dir("agent");
    let lab = lab(&format!("cesa{}", std::process::id() % 100_000));
    // An nft that fails while the flag file exists: a transaction failure on demand.
    let shim = dir.join("shim");
    std::fs::create_dir_all(&shim).unwrap();
    let flag = dir.join("fail-nft");
    let real_nft =
        ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"].into_iter().find(|p| Path::new(p).exists()).expect("nft");
    std::fs::write(
        shim.join("nft"),
        format!(
            "#!/bin/sh\nif [ -e {} ]; then echo injected failure >&2; exit 1; fi\nexec {real_nft} \"$@\"\n",
            flag.display()
        ),
    )
    .unwrap();
    Command::new("chmod").args(["+x"]).arg(shim.join("nft")).status().unwrap();

    let agent = Agent::start(&lab, &dir, &shim, dir.join("agent1.log"));
    wait_until(|| agent.count("replaced") >= 1, || agent.log());
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let svc = |from: &str| Case { side: 0, from: ip(from), to: ip("198.18.3.10"), proto: Proto::Tcp, port: 443 };
    let flows = [svc("10.10.0.12"), svc("10.10.0.13"), svc("10.10.0.21")];
    compare(&lab, &dir, &flows, "agent started");

    // Pod churn: checkout-1 moves to 10.10.0.13. Only set elements change.
    let move_pod = |from: &str, to: &str| {
        let cluster = std::fs::read_to_string(dir.join("cluster.yaml")).unwrap();
        std::fs::write(dir.join("cluster.yaml"), cluster.replace(&format!("{{ip: {from}}}"), &format!("{{ip: {to}}}")))
            .unwrap();
    };
    move_pod("10.10.0.12", "10.10.0.13");
    wait_until(|| agent.count("set(s) updated") >= 1, || agent.log());
    assert_eq!(agent.count("replaced"), 1, "pod churn must not replace the table: {}", agent.log());
    assert!(agent.log().contains("set(s) updated (pod churn)"), "pod churn takes the patch: {}", agent.log());
    let seen = compare(&lab, &dir, &flows, "after churn");
    assert!(seen.contains("accept:ServiceEgressRule/payments/lab-checkout"), "{seen:?}");

    // A transaction fails while a change arrives: the agent retries until it succeeds, and the change lands. The
    // element update goes over netlink, not through nft: someone deletes the table behind the agent's back, so the
    // kernel refuses it; the agent's retries replace the table whole with nft, which fails until the flag is gone.
    std::fs::write(&flag, "").unwrap();
    let tamper = Command::new("ip")
        .args(["netns", "exec", &lab.gateway, real_nft, "delete", "table", "inet", "ces"])
        .status()
        .unwrap();
    assert!(tamper.success());
    move_pod("10.10.0.13", "10.10.0.12");
    wait_until(|| agent.count("failed, retrying") >= 2, || agent.log());
    std::fs::remove_file(&flag).unwrap();
    wait_until(
        || agent.log().lines().last().is_some_and(|l| l.contains("retry: table inet ces replaced")),
        || agent.log(),
    );
    compare(&lab, &dir, &flows, "after a failed transaction");

    // Killed: the rules stay (fail-static).
    drop(agent);
    compare(&lab, &dir, &flows, "agent killed");
    // While it is down, the policy changes; a restarted agent adopts the table and converges.
    move_pod("10.10.0.12", "10.10.0.13");
    let agent = Agent::start(&lab, &dir, &shim, dir.join("agent2.log"));
    wait_until(|| agent.count("replaced") >= 1, || agent.log());
    compare(&lab, &dir, &flows, "agent restarted");
    drop(agent);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ces_lab_runs_the_example_and_every_flow_agrees() {
    let out = ces().args(["lab", "--example"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().unwrap_or_default();
    let total: usize = last.split(' ').next().unwrap().parse().unwrap();
    assert!(total >= 50, "{last}");
    assert_eq!(last, format!("{total} flows: {total} agree, 0 differ"));
    for verdict in ["accept by", "drop by", "reject by"] {
        assert!(stdout.contains(verdict), "no `{verdict}` flow in the lab's table:\n{stdout}");
    }
    let left: Vec<String> = ces_lab::run(&["ip", "netns", "list"])
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("ceslab"))
        .map(str::to_string)
        .collect();
    assert!(left.is_empty(), "the lab left namespaces behind: {left:?}");
}

#[test]
fn a_bandwidth_rate_is_shaped_on_the_uplink() {
    let dir = example_dir("bw");
    let conf = std::fs::read_to_string(dir.join("ces-conf.yaml")).unwrap();
    std::fs::write(dir.join("ces-conf.yaml"), conf + "gateway: {uplinks: [srv0]}\n").unwrap();
    let extra = std::fs::read_to_string(dir.join("extra.yaml")).unwrap();
    std::fs::write(
        dir.join("extra.yaml"),
        extra
            + "---\napiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {name: lab-slow, namespace: payments}\nspec: {addresses: [198.18.4.10], ports: [{protocol: tcp, port: '5201', bandwidth: 2Mbps}]}\n\
               ---\napiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {name: lab-fast, namespace: payments}\nspec: {addresses: [198.18.5.10]}\n\
               ---\napiVersion: kubeovn.io/v1alpha1\nkind: NamespaceEgressRule\nmetadata: {name: lab-limits, namespace: payments}\nspec: {action: accept-decisively, externalServices: [lab-slow, lab-fast]}\n",
    )
    .unwrap();
    let lab = lab_with(&format!("cesw{}", std::process::id() % 100_000), vec![5201]);
    apply(&lab, &dir);
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let slow = lab.throughput(0, ip("10.10.0.11"), ip("198.18.4.10"), 5201, 3.0).unwrap();
    let fast = lab.throughput(0, ip("10.10.0.11"), ip("198.18.5.10"), 5201, 1.0).unwrap();
    // HTB shapes to the rate over the run; TCP's first window and the send buffer let a little more through.
    eprintln!("shaped to 2 Mbit/s: {:.2} Mbit/s; not limited: {:.0} Mbit/s", slow / 1e6, fast / 1e6);
    assert!((1.4e6..2.8e6).contains(&slow), "2 Mbit/s shaped: measured {:.2} Mbit/s", slow / 1e6);
    assert!(fast > 50e6, "not rate-limited: measured {:.2} Mbit/s", fast / 1e6);
    let classes = ces_lab::run_in(&lab.gateway, &["tc", "class", "show", "dev", "srv0"]).unwrap();
    assert!(classes.contains("rate 2Mbit"), "{classes}");
    // Cleanup with the config removes the table and the shaping.
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.gateway, env!("CARGO_BIN_EXE_ces"), "gateway", "cleanup", "--config"])
        .arg(dir.join("ces-conf.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let qdiscs = ces_lab::run_in(&lab.gateway, &["tc", "qdisc", "show", "dev", "srv0"]).unwrap();
    assert!(!qdiscs.contains("htb"), "{qdiscs}");
    let tables = ces_lab::run_in(&lab.gateway, &["nft", "list", "tables"]).unwrap();
    assert!(!tables.lines().any(|l| l.trim() == "table inet ces"), "{tables}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn restarts_and_resyncs_open_no_window() {
    // While the agent is restarted again and again (each start replaces the table's content) probes run without
    // pause: an accepted flow must never be refused and a refused one never let through. Deleting and recreating the
    // table in one transaction failed this (new interval sets were empty for an instant after the new rules went
    // live); adopting the table passes.
    let dir = example_dir("window");
    let lab = lab(&format!("cesn{}", std::process::id() % 100_000));
    apply(&lab, &dir);
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let accepted = Case { side: 0, from: ip("10.10.0.11"), to: ip("198.18.3.10"), proto: Proto::Tcp, port: 443 };
    let refused = Case { side: 0, from: ip("10.10.0.21"), to: ip("198.18.3.10"), proto: Proto::Tcp, port: 443 };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let shim = dir.join("no-shim");
    std::fs::create_dir_all(&shim).unwrap();
    let (results, restarts) = std::thread::scope(|s| {
        let prober = s.spawn(|| {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for c in [&accepted, &refused] {
                    seen.push((c.from, lab.probe(c.side, c.from, c.to, c.proto, c.port).unwrap()));
                }
            }
            seen
        });
        let mut restarts = 0;
        for i in 0..10 {
            let agent = Agent::start(&lab, &dir, &shim, dir.join(format!("agent-{i}.log")));
            wait_until(|| agent.count("replaced") >= 1, || agent.log());
            restarts += 1;
            drop(agent);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (prober.join().unwrap(), restarts)
    });
    assert_eq!(restarts, 10);
    assert!(results.len() >= 20, "too few probes ran during the restarts: {}", results.len());
    for (from, outcome) in &results {
        let want = if *from == accepted.from { Outcome::Accept } else { Outcome::Reject };
        assert_eq!(*outcome, want, "{from}: a window opened during a restart ({} probes)", results.len());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every document of a manifest file, as JSON objects (for the fake API server).
fn manifest_objects(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.split("\n---")
        .filter(|d| d.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')))
        .filter_map(|d| serde_saphyr::from_str::<serde_json::Value>(d.trim_start_matches('\n')).ok())
        .filter(|v| v.get("kind").is_some())
        .collect()
}

#[test]
fn the_gateway_follows_the_kubernetes_api_with_real_packets() {
    let dir = example_dir("kube");
    let lab = lab(&format!("cesk{}", std::process::id() % 100_000));
    // The fake API server listens on the gateway namespace's loopback, where `ces gateway --kubernetes` runs.
    let api = ces_lab::spawn_in(&lab.gateway, || {
        let _ = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status();
        ces_fake_apiserver::FakeApiServer::start()
    })
    .unwrap()
    .join()
    .unwrap()
    .unwrap();
    for f in ["cluster.yaml", "policies.yaml", "extra.yaml"] {
        for o in manifest_objects(&dir.join(f)) {
            api.apply(o);
        }
    }
    api.write_kubeconfig(&dir.join("kubeconfig"));
    let log = dir.join("kube-agent.log");
    let _agent = KillOnDrop(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.gateway,
                env!("CARGO_BIN_EXE_ces"),
                "gateway",
                "--flow-store",
                "none",
                "--kubernetes",
            ])
            .arg("--kubeconfig")
            .arg(dir.join("kubeconfig"))
            .arg("--config")
            .arg(dir.join("ces-conf.yaml"))
            .args(["--debounce-ms", "50", "--log-file", "/dev/null"])
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(|| agent_log().contains("replaced"), agent_log);
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let svc = |from: &str| Case { side: 0, from: ip(from), to: ip("198.18.3.10"), proto: Proto::Tcp, port: 443 };
    let flows = [svc("10.10.0.12"), svc("10.10.0.13"), svc("10.10.0.21")];
    compare(&lab, &dir, &flows, "gateway fed by the Kubernetes API");

    // A pod moves (its status in the API server): the table follows, and packets agree with simulate on the files
    // that say the same.
    let mut pod = api.with(|s| s.get("Pod", "payments", "checkout-1").cloned()).expect("checkout-1 in the example");
    pod["status"]["podIPs"] = serde_json::json!([{"ip": "10.10.0.13"}]);
    pod["status"]["podIP"] = serde_json::json!("10.10.0.13");
    api.apply(pod);
    let cluster = std::fs::read_to_string(dir.join("cluster.yaml")).unwrap();
    std::fs::write(dir.join("cluster.yaml"), cluster.replace("{ip: 10.10.0.12}", "{ip: 10.10.0.13}")).unwrap();
    wait_until(|| agent_log().contains("set(s) updated"), agent_log);
    assert!(
        agent_log().contains("set(s) updated (pod churn)"),
        "the pod event takes the pod-churn path: {}",
        agent_log()
    );
    let seen = compare(&lab, &dir, &flows, "after the pod moved in the API");
    assert!(seen.contains("accept:ServiceEgressRule/payments/lab-checkout"), "{seen:?}");

    // The checkout Service gains an EndpointSlice listing checkout-1 alone, then loses it: its rule's sources follow
    // (its endpoints, then its selector's pods again), each time through the churn path, and packets agree with
    // simulate on files that say the same.
    let churn_passes = || agent_log().matches("(pod churn)").count();
    let whole_passes = || agent_log().lines().filter(|l| l.contains("change:") && !l.contains("(pod churn)")).count();
    let checkout_0 = [svc("10.10.0.11")];
    assert!(
        compare(&lab, &dir, &checkout_0, "checkout-0 before the slice")
            .contains("accept:ServiceEgressRule/payments/lab-checkout")
    );
    let slice = serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "checkout-x1", "namespace": "payments", "labels": {"kubernetes.io/service-name": "checkout"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.10.0.13"], "conditions": {"ready": true},
                       "targetRef": {"kind": "Pod", "namespace": "payments", "name": "checkout-1"}}]});
    let extra = std::fs::read_to_string(dir.join("extra.yaml")).unwrap();
    for (step, present) in [("came", true), ("went", false)] {
        let (churned, whole) = (churn_passes(), whole_passes());
        if present {
            api.apply(slice.clone());
            std::fs::write(dir.join("extra.yaml"), format!("{extra}\n---\n{slice}\n")).unwrap();
        } else {
            assert!(api.delete("EndpointSlice", "payments", "checkout-x1"));
            std::fs::write(dir.join("extra.yaml"), &extra).unwrap();
        }
        wait_until(|| churn_passes() > churned, agent_log);
        assert_eq!(whole_passes(), whole, "the slice {step}: the churn path, not a whole pass: {}", agent_log());
        compare(&lab, &dir, &flows, &format!("after the checkout slice {step}"));
        let seen = compare(&lab, &dir, &checkout_0, &format!("checkout-0 after the slice {step}"));
        assert_eq!(
            seen.contains("accept:ServiceEgressRule/payments/lab-checkout"),
            !present,
            "the slice {step}: {seen:?}"
        );
    }
    drop(api);
    std::fs::remove_dir_all(&dir).unwrap();
}
