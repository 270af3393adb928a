//! Host names on the nftables gateway, with real packets and a real DNS server (dnsmasq) in network namespaces.
//!
//! The real `ces gateway` agent runs in the gateway namespace and holds the DNS answers that cross it until their
//! addresses are in the learned sets; clients in the tenants' namespaces (whose pod networks overlap) resolve a name
//! through the gateway and connect to the address at once. Every such flow must get the verdict that the real
//! `ces simulate` gives the same flow written as a name. Needs root, iproute2, nftables, iptables (for kernels
//! without nft's `queue`) and dnsmasq: without them the test fails and says what is missing (`scripts/test.sh`
//! installs them).

mod common;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ces_dns::wire::{TYPE_A, TYPE_AAAA};
use ces_lab::{Lab, LabSpec, Outcome, Proto, Side, Zone};
use serde_json::Value;

const PAY: usize = 0;
const ANA: usize = 1;
const SIDES: [(&str, &str); 2] = [("pay0", "payments"), ("ana0", "analytics")];
/// Payments' resolver (also over IPv6), analytics' resolver, and one that answers garbage.
const RESOLVER_A: &str = "10.255.0.53";
const RESOLVER_A6: &str = "fd99:53::53";
const RESOLVER_B: &str = "10.255.0.54";
const GARBAGE: &str = "10.255.0.55";

use common::{Agent, ip, wait_until};

/// `HH:MM` of the current UTC time shifted by `hours`.
fn utc_hhmm(hours: i64) -> String {
    let now = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(hours);
    let t = jiff::tz::TimeZone::UTC.to_datetime(now);
    format!("{:02}:{:02}", t.hour(), t.minute())
}

fn manifests() -> String {
    let es = |name: &str, ns: &str, addrs: &str, ports: &str| {
        format!(
            "apiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{addresses: [{addrs}]{ports}}}\n---\n"
        )
    };
    let web = ", ports: [{protocol: tcp, port: \"443\"}, {protocol: udp, port: \"7\"}]";
    let mut m = String::from(
        r#"apiVersion: v1
kind: Namespace
metadata: {name: payments, labels: {pci: "true"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: analytics}
---
apiVersion: v1
kind: Pod
metadata: {name: checkout-0, namespace: payments, labels: {app: checkout}}
status: {phase: Running, conditions: [{type: Ready, status: "True"}], podIPs: [{ip: 10.10.0.11}, {ip: "fd00:10::11"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: ledger-0, namespace: payments, labels: {app: ledger}}
status: {phase: Running, conditions: [{type: Ready, status: "True"}], podIPs: [{ip: 10.10.0.21}]}
---
apiVersion: v1
kind: Pod
metadata: {name: notebook-0, namespace: analytics, labels: {app: notebook}}
status: {phase: Running, conditions: [{type: Ready, status: "True"}], podIPs: [{ip: 10.10.0.11}]}
---
apiVersion: v1
kind: Service
metadata: {name: checkout, namespace: payments}
spec: {selector: {app: checkout}}
---
"#,
    );
    m += &es(
        "dns",
        "kube-system",
        &format!("{RESOLVER_A}, {RESOLVER_B}, {GARBAGE}, \"{RESOLVER_A6}\""),
        ", ports: [{protocol: udp, port: \"53\"}, {protocol: tcp, port: \"53\"}]",
    );
    m += "apiVersion: kubeovn.io/v1alpha1\nkind: ClusterEgressRule\nmetadata: {name: dns}\nspec: {action: accept-decisively, priority: 1, externalServices: [dns]}\n---\n";
    // A deny list of names, before an accept of their addresses.
    m += &es("blocked", "kube-system", "blocked.test", "");
    m += "apiVersion: kubeovn.io/v1alpha1\nkind: ClusterEgressRule\nmetadata: {name: block-names}\nspec: {action: drop, priority: 10, externalServices: [blocked]}\n---\n";
    m += &es("rejected", "kube-system", "rejected.test", "");
    m += "apiVersion: kubeovn.io/v1alpha1\nkind: ClusterEgressRule\nmetadata: {name: reject-names}\nspec: {action: reject, priority: 11, externalServices: [rejected]}\n---\n";
    m += &es("audited", "kube-system", "audited.test", "");
    m += "apiVersion: kubeovn.io/v1alpha1\nkind: ClusterEgressRule\nmetadata: {name: audit-names}\nspec: {action: drop, mode: audit, logging: true, priority: 12, externalServices: [audited]}\n---\n";
    // Payments.
    m += &es("stripe", "payments", "api.stripe.com", ", ports: [{protocol: tcp, port: \"443\"}]");
    m += "apiVersion: kubeovn.io/v1alpha1\nkind: NamespaceEgressRule\nmetadata: {name: stripe, namespace: payments}\nspec: {action: accept-decisively, externalServices: [stripe]}\n---\n";
    m += &es("shop", "payments", "cdn-alias.shop.test, \"*.pay.test\", audited.test", web);
    m += "apiVersion: kubeovn.io/v1alpha1\nkind: NamespaceEgressRule\nmetadata: {name: shop, namespace: payments}\nspec: {action: accept-decisively, externalServices: [shop]}\n---\n";
    m += &es("lab-ips", "payments", "198.18.62.0/24", "");
    m += "apiVersion: kubeovn.io/v1alpha1\nkind: NamespaceEgressRule\nmetadata: {name: lab-ips, namespace: payments}\nspec: {action: accept-decisively, externalServices: [lab-ips]}\n---\n";
    m += &es("now", "payments", "now.test", "");
    m += &es("later", "payments", "later.test", "");
    m += &format!(
        "apiVersion: kubeovn.io/v1alpha1\nkind: NamespaceEgressRule\nmetadata: {{name: window-now, namespace: payments}}\nspec: {{action: accept-decisively, externalServices: [now], schedule: {{timezone: UTC, windows: [{{start: \"{}\", end: \"{}\"}}]}}}}\n---\n",
        utc_hhmm(-2),
        utc_hhmm(2)
    );
    m += &format!(
        "apiVersion: kubeovn.io/v1alpha1\nkind: NamespaceEgressRule\nmetadata: {{name: window-later, namespace: payments}}\nspec: {{action: accept-decisively, externalServices: [later], schedule: {{timezone: UTC, windows: [{{start: \"{}\", end: \"{}\"}}]}}}}\n---\n",
        utc_hhmm(3),
        utc_hhmm(5)
    );
    m += &es("svc-dest", "payments", "checkout.svc-dest.test", ", ports: [{protocol: tcp, port: \"443\"}]");
    m += "apiVersion: kubeovn.io/v1alpha1\nkind: ServiceEgressRule\nmetadata: {name: checkout-dest, namespace: payments}\nspec: {action: accept, service: checkout, externalServices: [svc-dest]}\n---\n";
    // Analytics.
    m += &es("stripe", "analytics", "api.stripe.com", ", ports: [{protocol: tcp, port: \"443\"}]");
    m += "apiVersion: kubeovn.io/v1alpha1\nkind: NamespaceEgressRule\nmetadata: {name: stripe, namespace: analytics}\nspec: {action: accept-decisively, externalServices: [stripe]}\n";
    m
}

fn config(dns: &str) -> String {
    format!(
        r#"clusterName: k8s
isSupportRouteDomain: true
tenant:
  - name: Common
  - name: payments
    namespaces: payments
    routeDomain: {{id: 10, name: rd10}}
    defaultAction: reject
    gateway: {{interfaces: [pay0]}}
  - name: analytics
    namespaces: analytics
    routeDomain: {{id: 20, name: rd20}}
    gateway: {{interfaces: [ana0]}}
gateway:
  logDefault: false
{dns}"#
    )
}

/// Zone A, payments' resolver: every name of the test.
fn zone_a(ttl: u32) -> Zone {
    let mut records: Vec<(String, IpAddr)> = [
        ("api.stripe.com", "198.18.61.1"),
        ("api.stripe.com", "2001:db8:61::1"),
        ("edge.cdn.test", "198.18.61.2"),
        ("a.pay.test", "198.18.61.3"),
        ("b.c.pay.test", "198.18.61.4"),
        ("pay.test", "198.18.61.5"),
        ("audited.test", "198.18.61.8"),
        ("unresolved.pay.test", "198.18.61.10"),
        ("now.test", "198.18.61.11"),
        ("later.test", "198.18.61.12"),
        ("checkout.svc-dest.test", "198.18.61.13"),
        ("blocked.test", "198.18.62.6"),
        ("rejected.test", "198.18.62.7"),
    ]
    .iter()
    .map(|(n, a)| (n.to_string(), ip(a)))
    .collect();
    for i in 1..=40 {
        records.push(("many.pay.test".into(), ip(&format!("198.18.63.{i}"))));
    }
    Zone {
        listen: vec![ip(RESOLVER_A), ip(RESOLVER_A6)],
        records,
        cnames: vec![("cdn-alias.shop.test".into(), "edge.cdn.test".into())],
        ttl,
    }
}

/// Zone B, analytics' resolver: the same name, another address.
fn zone_b() -> Zone {
    Zone {
        listen: vec![ip(RESOLVER_B)],
        records: vec![("api.stripe.com".into(), ip("198.18.61.9"))],
        cnames: Vec::new(),
        ttl: 60,
    }
}

fn lab(prefix: &str, ttl: u32) -> Lab {
    let mut servers: Vec<IpAddr> = [RESOLVER_A, RESOLVER_A6, RESOLVER_B, GARBAGE].iter().map(|a| ip(a)).collect();
    servers.extend(zone_a(ttl).records.iter().map(|(_, a)| *a));
    servers.extend(zone_b().records.iter().map(|(_, a)| *a));
    servers.push(ip("198.18.62.20"));
    servers.sort();
    servers.dedup();
    let spec = LabSpec {
        prefix: prefix.into(),
        sides: vec![
            Side {
                gateway_interface: "pay0".into(),
                addresses: vec![ip("10.10.0.11"), ip("10.10.0.21"), ip("fd00:10::11")],
            },
            Side { gateway_interface: "ana0".into(), addresses: vec![ip("10.10.0.11")] },
        ],
        servers,
        tcp_ports: vec![443],
        udp_ports: vec![7],
        sink_ports: Vec::new(),
        dns: [RESOLVER_A, RESOLVER_A6, RESOLVER_B, GARBAGE].iter().map(|a| ip(a)).collect(),
    };
    let mut lab = Lab::build(spec).unwrap_or_else(|e| panic!("cannot build the network-namespace lab: {e}"));
    lab.start_dns(&zone_a(ttl)).unwrap_or_else(|e| panic!("cannot start the DNS server: {e}"));
    lab.start_dns(&zone_b()).unwrap_or_else(|e| panic!("cannot start the DNS server: {e}"));
    lab
}

/// The agent's flow records: JSON lines next to the test's files, no store.
fn dns_args(dir: &Path) -> Vec<&'static str> {
    let log: &'static str = Box::leak(dir.join("packets.jsonl").to_string_lossy().into_owned().into_boxed_str());
    vec!["--flow-store", "none", "--log-file", log]
}

fn setup(name: &str, dns_config: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ces-dns-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("policy.yaml"), manifests()).unwrap();
    std::fs::write(dir.join("ces-conf.yaml"), config(dns_config)).unwrap();
    dir
}

/// `ces gateway names` in the gateway namespace: `(tenant, name, address)`.
fn names(lab: &Lab) -> Vec<(String, String, IpAddr)> {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.gateway, env!("CARGO_BIN_EXE_ces"), "gateway", "names"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ces gateway names: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["tenant"].as_str().unwrap().into(),
                v["name"].as_str().unwrap().into(),
                ip(v["address"].as_str().unwrap()),
            )
        })
        .collect()
}

/// A flow written as a name: resolved on its side through `resolver`, then opened to the first address at once.
#[derive(Clone, Debug)]
struct NameFlow {
    side: usize,
    from: &'static str,
    name: &'static str,
    proto: Proto,
    port: u16,
    resolver: &'static str,
    tcp_dns: bool,
}

fn nf(side: usize, from: &'static str, name: &'static str, proto: Proto, port: u16) -> NameFlow {
    let resolver = if side == ANA {
        RESOLVER_B
    } else if from.contains(':') {
        RESOLVER_A6
    } else {
        RESOLVER_A
    };
    NameFlow { side, from, name, proto, port, resolver, tcp_dns: false }
}

fn target(host: &str, proto: Proto, port: u16) -> String {
    match proto {
        Proto::Tcp => format!("{host}:{port}/tcp"),
        Proto::Udp => format!("{host}:{port}/udp"),
        Proto::Icmp => format!("{host}/icmp"),
    }
}

/// `ces simulate --flows` on the test's files: `verdict by rule` per flow.
fn simulate(dir: &Path, flows: &[(usize, &str, String)]) -> Vec<String> {
    let mut lines = String::new();
    for (side, from, to) in flows {
        lines += &format!("{}\n", serde_json::json!({"from": from, "tenant": SIDES[*side].1, "to": to}));
    }
    std::fs::write(dir.join("flows.jsonl"), lines).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ces"))
        .args(["simulate", "--flows"])
        .arg(dir.join("flows.jsonl"))
        .arg("--manifests")
        .arg(dir.join("policy.yaml"))
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

/// Resolves and connects each flow; returns `(address, outcome)`.
fn run_flows(lab: &Lab, flows: &[NameFlow]) -> Vec<(IpAddr, Outcome)> {
    flows
        .iter()
        .map(|f| {
            let qtype = if f.from.contains(':') { TYPE_AAAA } else { TYPE_A };
            let addrs = lab
                .resolve(f.side, ip(f.from), ip(f.resolver), f.name, qtype, f.tcp_dns)
                .unwrap_or_else(|e| panic!("resolving {} from {}: {e}", f.name, f.from));
            let to = *addrs.first().unwrap_or_else(|| panic!("{} has no address", f.name));
            let outcome = lab.probe(f.side, ip(f.from), to, f.proto, f.port).unwrap();
            (to, outcome)
        })
        .collect()
}

fn agree(dir: &Path, flows: &[NameFlow], real: &[(IpAddr, Outcome)]) -> Vec<String> {
    let sim: Vec<(usize, &str, String)> =
        flows.iter().map(|f| (f.side, f.from, target(f.name, f.proto, f.port))).collect();
    let predicted = simulate(dir, &sim);
    let mut bad = Vec::new();
    for ((f, p), (to, r)) in flows.iter().zip(&predicted).zip(real) {
        if p.split(' ').next().unwrap() != r.as_str() {
            bad.push(format!(
                "{} {} -> {} ({to}): simulate says {p}, the network did {}",
                SIDES[f.side].1,
                f.from,
                f.name,
                r.as_str()
            ));
        }
    }
    assert!(bad.is_empty(), "{} of {} name flows differ:\n{}", bad.len(), flows.len(), bad.join("\n"));
    predicted
}

#[test]
fn names_are_learned_where_the_packets_are_and_every_verdict_agrees_with_simulate() {
    let dir = setup("conf", "");
    let mut lab = lab(&format!("cesd{}", std::process::id() % 100_000), 60);
    // A resolver that answers every query with garbage: released unchanged, nothing learned.
    let garbage: Vec<u8> = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 9, 0, 0, 0, 0, 0xc0, 0x0c, 0xff];
    let g = garbage.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let server = ces_lab::spawn_in(&lab.server, move || {
        let s = std::net::UdpSocket::bind((ip(GARBAGE), 53)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut buf = [0u8; 512];
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((_, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&g, from);
            }
        }
    })
    .unwrap();
    common::fast_conntrack(&lab.gateway);
    let agent = Agent::start(&lab.gateway, &dir, 19853, "1", &dns_args(&dir), true);
    assert!(!agent.log().contains("NotEnforced"), "the agent enforces names: {}", agent.log());

    let mut flows = vec![
        nf(PAY, "10.10.0.11", "api.stripe.com", Proto::Tcp, 443),
        nf(PAY, "fd00:10::11", "api.stripe.com", Proto::Tcp, 443),
        NameFlow { tcp_dns: true, ..nf(PAY, "10.10.0.21", "api.stripe.com", Proto::Tcp, 443) },
        nf(PAY, "10.10.0.11", "cdn-alias.shop.test", Proto::Tcp, 443),
        nf(PAY, "10.10.0.11", "a.pay.test", Proto::Tcp, 443),
        nf(PAY, "10.10.0.11", "a.pay.test", Proto::Udp, 7),
        nf(PAY, "10.10.0.21", "b.c.pay.test", Proto::Tcp, 443),
        nf(PAY, "10.10.0.11", "pay.test", Proto::Tcp, 443),
        nf(PAY, "10.10.0.11", "blocked.test", Proto::Tcp, 443),
        nf(PAY, "10.10.0.11", "rejected.test", Proto::Tcp, 443),
        nf(PAY, "10.10.0.11", "audited.test", Proto::Tcp, 443),
        nf(PAY, "10.10.0.11", "now.test", Proto::Tcp, 443),
        nf(PAY, "10.10.0.11", "later.test", Proto::Tcp, 443),
        nf(PAY, "10.10.0.11", "checkout.svc-dest.test", Proto::Tcp, 443),
        nf(PAY, "10.10.0.21", "checkout.svc-dest.test", Proto::Tcp, 443),
        nf(ANA, "10.10.0.11", "api.stripe.com", Proto::Tcp, 443),
    ];
    let real = run_flows(&lab, &flows);
    let predicted = agree(&dir, &flows, &real);
    for want in [
        "accept by NamespaceEgressRule/payments/stripe",
        "accept by NamespaceEgressRule/payments/shop",
        "reject by Tenant/payments",
        "drop by ClusterEgressRule/block-names",
        "reject by ClusterEgressRule/reject-names",
        "accept by NamespaceEgressRule/payments/window-now",
        "accept by ServiceEgressRule/payments/checkout-dest",
        "accept by NamespaceEgressRule/analytics/stripe",
    ] {
        assert!(predicted.iter().any(|p| p == want), "no flow decided `{want}`: {predicted:?}");
    }
    // The two tenants resolved the same name to different addresses, each through its own resolver.
    assert_eq!(real[0].0, ip("198.18.61.1"));
    assert_eq!(real[1].0, ip("2001:db8:61::1"), "AAAA");
    assert_eq!(real[3].0, ip("198.18.61.2"), "through the CNAME chain");
    assert_eq!(real[15].0, ip("198.18.61.9"));

    // Addresses never resolved in a tenant are the tenant's default (or an address rule's), as simulate says of the
    // address: payments never learned analytics' address for api.stripe.com, nor the reverse; nobody resolved
    // unresolved.pay.test; 198.18.62.20 is accepted by an address rule.
    let ip_flows = [
        (PAY, "10.10.0.11", ip("198.18.61.9")),
        (ANA, "10.10.0.11", ip("198.18.61.1")),
        (PAY, "10.10.0.11", ip("198.18.61.10")),
        (PAY, "10.10.0.11", ip("198.18.62.20")),
    ];
    let sim: Vec<(usize, &str, String)> =
        ip_flows.iter().map(|(s, f, to)| (*s, *f, target(&to.to_string(), Proto::Tcp, 443))).collect();
    let predicted = simulate(&dir, &sim);
    for ((side, from, to), p) in ip_flows.iter().zip(&predicted) {
        let r = lab.probe(*side, ip(from), *to, Proto::Tcp, 443).unwrap();
        assert_eq!(p.split(' ').next().unwrap(), r.as_str(), "{from} -> {to}: simulate says {p}");
    }
    assert_eq!(predicted[3], "accept by NamespaceEgressRule/payments/lab-ips");
    assert_ne!(predicted[0].split(' ').next(), Some("accept"));

    // A truncated UDP answer teaches what it carries; the retry over TCP teaches all 40 addresses, and each opens at
    // once.
    let partial = lab.resolve(PAY, ip("10.10.0.11"), ip(RESOLVER_A), "many.pay.test", TYPE_A, false);
    assert!(partial.is_err(), "40 records do not fit a UDP answer without EDNS: {partial:?}");
    let all = lab.resolve(PAY, ip("10.10.0.11"), ip(RESOLVER_A), "many.pay.test", TYPE_A, true).unwrap();
    assert_eq!(all.len(), 40);
    let refused: Vec<IpAddr> = all
        .iter()
        .filter(|a| lab.probe(PAY, ip("10.10.0.11"), **a, Proto::Tcp, 443).unwrap() != Outcome::Accept)
        .copied()
        .collect();
    assert!(refused.is_empty(), "addresses of a TCP answer refused: {refused:?}");

    // What was learned, per tenant: the same name twice, apart.
    let learned = names(&lab);
    for (t, n, a) in [
        ("payments", "api.stripe.com", "198.18.61.1"),
        ("payments", "api.stripe.com", "2001:db8:61::1"),
        ("analytics", "api.stripe.com", "198.18.61.9"),
        ("payments", "cdn-alias.shop.test", "198.18.61.2"),
        ("payments", "many.pay.test", "198.18.63.40"),
    ] {
        assert!(learned.contains(&(t.into(), n.into(), ip(a))), "{t} {n} {a} not in {learned:?}");
    }
    assert!(!learned.iter().any(|(t, _, a)| t == "analytics" && *a == ip("198.18.61.1")), "{learned:?}");
    assert!(!learned.iter().any(|(_, n, _)| n == "edge.cdn.test"), "only names a rule names are kept: {learned:?}");

    // Garbage from a resolver reaches the client unchanged, and teaches nothing.
    let before = agent.metric("ces_dns_malformed_total");
    let q = ces_lab::query(0x1234, "api.stripe.com", TYPE_A);
    let got = ces_lab::spawn_in(&lab.clients[PAY], move || {
        ces_lab::exchange(ip("10.10.0.11"), ip(GARBAGE), &q, false, Duration::from_secs(2))
    })
    .unwrap()
    .join()
    .unwrap()
    .unwrap()
    .unwrap();
    assert_eq!(got, garbage, "a message that cannot be read is released unchanged");
    wait_until(|| agent.metric("ces_dns_malformed_total") > before, || agent.metrics());
    assert!(agent.metric("ces_dns_answers_held_total") >= 18.0);
    assert_eq!(agent.metric("ces_dns_kernel_errors_total"), 0.0);

    // The audit rule's hit is in the connection's flow record, with the name the client resolved. (Connections are
    // recorded when conntrack reaps them, up to a minute after they end on a table this small: reaped now.)
    std::thread::sleep(Duration::from_millis(1500));
    let flushed = ces_lab::spawn_in(&lab.gateway, ces_nft::conntrack::flush).unwrap().join().unwrap();
    assert!(matches!(flushed, Ok(Ok(()))), "{flushed:?}");
    let packets = || std::fs::read_to_string(dir.join("packets.jsonl")).unwrap_or_default();
    wait_until(
        || {
            packets().lines().any(|l| {
                l.contains("ClusterEgressRule/audit-names")
                    && l.contains("198.18.61.8")
                    && l.contains("\"host\":\"audited.test\"")
            })
        },
        || format!("no record with the audit hit for audited.test:\n{}", packets()),
    );

    flows.clear();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().unwrap().unwrap();
    drop(agent);
    // The agent's cleanup removes its table and its DNS hook.
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.gateway, env!("CARGO_BIN_EXE_ces"), "gateway", "cleanup"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rules = ces_lab::run_in(&lab.gateway, &["nft", "list", "ruleset"]).unwrap();
    assert!(!rules.contains("CES-DNS") && !rules.lines().any(|l| l == "table inet ces {"), "{rules}");
    lab.start_dns(&Zone::default()).expect_err("a zone with no address is refused");
    drop(lab);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn learned_addresses_expire_after_ttl_plus_grace_and_established_flows_live_on() {
    let dir = setup("ttl", "  dns: {minTTL: 0, grace: 1}\n");
    let lab = lab(&format!("cest{}", std::process::id() % 100_000), 1);
    let agent = Agent::start(&lab.gateway, &dir, 19854, "1", &dns_args(&dir), true);
    let addr = lab.resolve(PAY, ip("10.10.0.11"), ip(RESOLVER_A), "a.pay.test", TYPE_A, false).unwrap()[0];
    assert_eq!(lab.probe(PAY, ip("10.10.0.11"), addr, Proto::Tcp, 443).unwrap(), Outcome::Accept);
    // A UDP flow opened now is established in conntrack.
    let client = lab.clients[PAY].clone();
    let udp = ces_lab::spawn_in(&client, move || {
        let s = std::net::UdpSocket::bind(("10.10.0.11", 0)).unwrap();
        s.connect((addr, 7)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s
    })
    .unwrap()
    .join()
    .unwrap()
    .unwrap();
    let echo = |s: &std::net::UdpSocket| {
        let mut buf = [0u8; 16];
        s.send(b"ping").is_ok() && s.recv(&mut buf).is_ok()
    };
    assert!(echo(&udp));
    // TTL 1 s + grace 1 s: gone from the kernel's set within a few seconds, with no agent action needed.
    let start = Instant::now();
    wait_until(|| !names(&lab).iter().any(|(_, n, _)| n == "a.pay.test"), || format!("{:?}", names(&lab)));
    let took = start.elapsed();
    assert!(took < Duration::from_secs(4), "expired after {took:?}");
    assert_eq!(lab.probe(PAY, ip("10.10.0.11"), addr, Proto::Tcp, 443).unwrap(), Outcome::Reject, "a new connection");
    assert!(echo(&udp), "an established flow is never cut by expiry");
    // Another answer re-arms it.
    lab.resolve(PAY, ip("10.10.0.11"), ip(RESOLVER_A), "a.pay.test", TYPE_A, false).unwrap();
    assert_eq!(lab.probe(PAY, ip("10.10.0.11"), addr, Proto::Tcp, 443).unwrap(), Outcome::Accept);
    drop(agent);
    drop(lab);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_restarted_agent_adopts_what_the_kernel_learned_and_dns_does_what_the_config_says_while_it_is_down() {
    let dir = setup("restart", "");
    let lab = lab(&format!("cesr{}", std::process::id() % 100_000), 60);
    let agent = Agent::start(&lab.gateway, &dir, 19855, "1", &dns_args(&dir), true);
    let from = ip("10.10.0.11");
    let addr = lab.resolve(PAY, from, ip(RESOLVER_A), "api.stripe.com", TYPE_A, false).unwrap()[0];
    assert_eq!(lab.probe(PAY, from, addr, Proto::Tcp, 443).unwrap(), Outcome::Accept);
    let shop = lab.resolve(PAY, from, ip(RESOLVER_A), "a.pay.test", TYPE_A, false).unwrap()[0];
    let client = lab.clients[PAY].clone();
    let udp = ces_lab::spawn_in(&client, move || {
        let s = std::net::UdpSocket::bind(("10.10.0.11", 0)).unwrap();
        s.connect((shop, 7)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s
    })
    .unwrap()
    .join()
    .unwrap()
    .unwrap();
    let echo = |s: &std::net::UdpSocket| {
        let mut buf = [0u8; 16];
        s.send(b"ping").is_ok() && s.recv(&mut buf).is_ok()
    };
    assert!(echo(&udp));

    // Killed: the learned addresses stay in the kernel (fail-static), and answers pass unheld (the default).
    agent.kill();
    assert!(names(&lab).iter().any(|(_, n, a)| n == "api.stripe.com" && *a == addr));
    assert_eq!(lab.probe(PAY, from, addr, Proto::Tcp, 443).unwrap(), Outcome::Accept);
    assert!(lab.resolve(PAY, from, ip(RESOLVER_A), "now.test", TYPE_A, false).is_ok(), "DNS works while it is down");
    assert!(echo(&udp));

    // Started again: it adopts what the kernel holds, before any new answer.
    let agent = Agent::start(&lab.gateway, &dir, 19855, "2", &dns_args(&dir), true);
    assert!(agent.metric("ces_dns_names") >= 2.0, "adopted: {}", agent.metrics());
    assert_eq!(agent.metric("ces_dns_answers_held_total"), 0.0);
    assert_eq!(lab.probe(PAY, from, addr, Proto::Tcp, 443).unwrap(), Outcome::Accept);
    assert!(echo(&udp), "no connection lost across the restart");
    // A policy change keeps what was learned for names that remain: the shop rule goes, stripe stays.
    let policy = std::fs::read_to_string(dir.join("policy.yaml")).unwrap();
    std::fs::write(
        dir.join("policy.yaml"),
        policy.replace(
            "name: shop, namespace: payments}\nspec: {action: accept-decisively",
            "name: shop, namespace: payments}\nspec: {action: reject",
        ),
    )
    .unwrap();
    wait_until(|| agent.log().matches("replaced").count() >= 2, || agent.log());
    let learned = names(&lab);
    assert!(learned.iter().any(|(_, n, _)| n == "api.stripe.com"), "{learned:?}");
    assert_eq!(lab.probe(PAY, from, addr, Proto::Tcp, 443).unwrap(), Outcome::Accept);
    assert_eq!(lab.probe(PAY, from, shop, Proto::Tcp, 443).unwrap(), Outcome::Reject, "the rule now rejects");
    std::fs::write(dir.join("policy.yaml"), policy).unwrap();
    agent.kill();

    // With `whenAgentDown: drop`, answers are dropped while no agent holds them, and flow again once one does.
    std::fs::write(dir.join("ces-conf.yaml"), config("  dns: {whenAgentDown: drop}\n")).unwrap();
    let agent = Agent::start(&lab.gateway, &dir, 19855, "3", &dns_args(&dir), true);
    assert!(lab.resolve(PAY, from, ip(RESOLVER_A), "now.test", TYPE_A, false).is_ok());
    agent.kill();
    let down = lab.resolve(PAY, from, ip(RESOLVER_A), "now.test", TYPE_A, false);
    assert!(down.is_err(), "answers are dropped while the agent is down: {down:?}");
    let agent = Agent::start(&lab.gateway, &dir, 19855, "4", &dns_args(&dir), true);
    assert!(lab.resolve(PAY, from, ip(RESOLVER_A), "now.test", TYPE_A, false).is_ok());
    drop(agent);
    drop(lab);
    std::fs::remove_dir_all(&dir).unwrap();
}
