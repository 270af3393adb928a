//! Source NAT on the gateway (ExternalIPRule), with real packets in network namespaces: the real `ces gateway`
//! translates, a server in the lab's server namespace says which source address it saw, `ces simulate` predicts the
//! same, and the flow records carry the translation. Needs root and nftables (scripts/test.sh installs it).

mod common;

use std::net::{IpAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ces_lab::{Lab, LabSpec, Side};
use common::{Agent, flows, ip, wait_for, wait_until};
use serde_json::Value;

/// Two tenants whose pods share 10.10.0.11. payments: checkout (10.10.0.11) is translated to 203.0.113.10 towards
/// 198.18.70.1 only (destinationMatch); ledger (10.10.0.13) is not covered; traffic to port 9998 is dropped.
/// analytics: its notebook (the other 10.10.0.11) is translated to 203.0.113.20 everywhere.
const POLICY: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: payments}
---
apiVersion: v1
kind: Namespace
metadata: {name: analytics}
---
apiVersion: v1
kind: Pod
metadata: {name: checkout-0, namespace: payments, labels: {app: checkout}}
status: {phase: Running, podIPs: [{ip: 10.10.0.11}]}
---
apiVersion: v1
kind: Pod
metadata: {name: ledger-0, namespace: payments, labels: {app: ledger}}
status: {phase: Running, podIPs: [{ip: 10.10.0.13}]}
---
apiVersion: v1
kind: Pod
metadata: {name: jupyter-0, namespace: analytics, labels: {app: nb}}
status: {phase: Running, podIPs: [{ip: 10.10.0.11}]}
---
apiVersion: v1
kind: Service
metadata: {name: checkout, namespace: payments}
spec: {selector: {app: checkout}}
---
apiVersion: v1
kind: Service
metadata: {name: nb, namespace: analytics}
spec: {selector: {app: nb}}
---
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {name: blocked, namespace: payments}
spec: {addresses: [198.18.70.0/24], ports: [{name: blocked, protocol: udp, port: "9998"}]}
---
apiVersion: kubeovn.io/v1alpha1
kind: NamespaceEgressRule
metadata: {name: blocked, namespace: payments}
spec: {action: drop, externalServices: [blocked]}
---
apiVersion: bigip.io/v1alpha1
kind: ExternalIPRule
metadata: {name: partner, namespace: payments}
spec: {externalAddresses: [203.0.113.10], services: [checkout], destinationMatch: {addresses: [198.18.70.1]}}
---
apiVersion: bigip.io/v1alpha1
kind: ExternalIPRule
metadata: {name: egress, namespace: analytics}
spec: {externalAddresses: [203.0.113.20], services: [nb]}
"#;

const CONFIG: &str = "clusterName: k8s\nisSupportRouteDomain: true\ntenant:\n  - name: Common\n  - name: payments\n    namespaces: payments\n    routeDomain: {id: 10, name: rd10}\n    defaultAction: accept\n    egressAddresses: [203.0.113.8/29]\n    gateway: {interfaces: [pay0]}\n  - name: analytics\n    namespaces: analytics\n    routeDomain: {id: 20, name: rd20}\n    defaultAction: accept\n    gateway: {interfaces: [ana0]}\n";

const PAY: usize = 0;
const ANA: usize = 1;
/// The port of the servers that answer with the source address they saw.
const WHO: u16 = 9999;
const BLOCKED: u16 = 9998;

fn lab(prefix: &str) -> Lab {
    let spec = LabSpec {
        prefix: prefix.into(),
        sides: vec![
            Side {
                gateway_interface: "pay0".into(),
                addresses: vec![ip("10.10.0.11"), ip("10.10.0.12"), ip("10.10.0.13")],
            },
            Side { gateway_interface: "ana0".into(), addresses: vec![ip("10.10.0.11")] },
        ],
        servers: vec![ip("198.18.70.1"), ip("198.18.70.2")],
        tcp_ports: vec![443],
        udp_ports: vec![7],
        ..LabSpec::default()
    };
    let lab = Lab::build(spec).unwrap_or_else(|e| panic!("cannot build the network-namespace lab: {e}"));
    common::fast_conntrack(&lab.gateway);
    // Servers that answer each datagram with the source address they saw (ports WHO and BLOCKED).
    for server in ["198.18.70.1", "198.18.70.2"] {
        for port in [WHO, BLOCKED] {
            let addr = ip(server);
            ces_lab::spawn_in(&lab.server, move || {
                let s = UdpSocket::bind((addr, port)).unwrap();
                let mut buf = [0u8; 64];
                while let Ok((_, peer)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(peer.ip().to_string().as_bytes(), peer);
                }
            })
            .unwrap();
        }
    }
    lab
}

/// The source address the server saw for a datagram from `source` on side `side` to `server:port`; `None` when
/// nothing came back (a dropped flow).
fn seen(lab: &Lab, side: usize, source: &str, server: &str, port: u16) -> Option<IpAddr> {
    let (source, server) = (ip(source), ip(server));
    ces_lab::spawn_in(&lab.clients[side], move || {
        let s = UdpSocket::bind((source, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(700))).unwrap();
        s.connect((server, port)).unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            s.send(b"who am I").unwrap();
            if let Ok(n) = s.recv(&mut buf) {
                return std::str::from_utf8(&buf[..n]).ok()?.parse().ok();
            }
        }
        None
    })
    .unwrap()
    .join()
    .unwrap()
    .unwrap()
}

/// What `ces simulate` says the source becomes (`None`: untranslated), and its verdict.
fn simulated(dir: &Path, from: &str, tenant: Option<&str>, to: &str) -> (String, Option<Vec<String>>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ces"));
    cmd.args(["simulate", "--manifests"]).arg(dir.join("policy.yaml")).arg("--config").arg(dir.join("ces-conf.yaml"));
    cmd.args(["--from", from, "--to", to, "--output", "json"]);
    if let Some(t) = tenant {
        cmd.args(["--tenant", t]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let to = v["nat"]["to"].as_array().map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect());
    (v["verdict"].as_str().unwrap().to_string(), to)
}

fn setup() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ces-nat-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("policy.yaml"), POLICY).unwrap();
    std::fs::write(dir.join("ces-conf.yaml"), CONFIG).unwrap();
    dir
}

#[test]
fn covered_pods_leave_with_their_egress_address_and_simulate_and_the_records_agree() {
    let dir = setup();
    let lab = lab(&format!("cesn{}", std::process::id() % 100_000));
    let store = dir.join("store");
    let store_arg = store.to_string_lossy().into_owned();
    // analytics' egress address is on the gateway's uplink; payments' is only routed to it by the server side.
    ces_lab::run_in(&lab.gateway, &["ip", "addr", "add", "203.0.113.20/32", "dev", "srv0"]).unwrap();
    let agent = Agent::start(&lab.gateway, &dir, 19871, "1", &["--flow-store", &store_arg], false);
    // The agent says which egress addresses are not its own.
    let log = agent.log();
    assert!(log.contains("egress address 203.0.113.10 is not an address of this gateway"), "{log}");
    assert!(!log.contains("egress address 203.0.113.20 is not"), "{log}");

    // (side, source, tenant, server, port, what the server must see; None: nothing arrives).
    type Case<'a> = (usize, &'a str, &'a str, &'a str, u16, Option<&'a str>);
    let cases: [Case; 6] = [
        (PAY, "10.10.0.11", "payments", "198.18.70.1", WHO, Some("203.0.113.10")),
        // destinationMatch: towards another server the pod keeps its own address.
        (PAY, "10.10.0.11", "payments", "198.18.70.2", WHO, Some("10.10.0.11")),
        // A pod no rule covers.
        (PAY, "10.10.0.13", "payments", "198.18.70.1", WHO, Some("10.10.0.13")),
        // The other tenant's pod at the same address gets its own tenant's egress address.
        (ANA, "10.10.0.11", "analytics", "198.18.70.1", WHO, Some("203.0.113.20")),
        (ANA, "10.10.0.11", "analytics", "198.18.70.2", WHO, Some("203.0.113.20")),
        // A dropped flow is never translated: nothing arrives.
        (PAY, "10.10.0.11", "payments", "198.18.70.1", BLOCKED, None),
    ];
    for (side, src, tenant, server, port, want) in cases {
        let got = seen(&lab, side, src, server, port);
        assert_eq!(got, want.map(ip), "{tenant} {src} -> {server}:{port}\n{}", agent.log());
        // simulate predicts the same.
        let (verdict, to) = simulated(&dir, src, Some(tenant), &format!("{server}:{port}/udp"));
        match want {
            None => assert_eq!((verdict.as_str(), &to), ("drop", &None)),
            Some(w) if w == src => assert_eq!((verdict.as_str(), &to), ("accept", &None), "{src} -> {server}"),
            Some(w) => assert_eq!((verdict.as_str(), to), ("accept", Some(vec![w.to_string()]))),
        }
    }

    // Churn: checkout-0 moves to 10.10.0.12; its new address is translated, its old one (now nobody's) is not.
    let moved = POLICY.replace(
        "name: checkout-0, namespace: payments, labels: {app: checkout}}\nstatus: {phase: Running, podIPs: [{ip: 10.10.0.11}]}",
        "name: checkout-0, namespace: payments, labels: {app: checkout}}\nstatus: {phase: Running, podIPs: [{ip: 10.10.0.12}]}",
    );
    assert_ne!(moved, POLICY);
    std::fs::write(dir.join("policy.yaml"), moved).unwrap();
    wait_until(|| seen(&lab, PAY, "10.10.0.12", "198.18.70.1", WHO) == Some(ip("203.0.113.10")), || agent.log());
    assert_eq!(seen(&lab, PAY, "10.10.0.11", "198.18.70.1", WHO), Some(ip("10.10.0.11")));
    assert!(agent.log().matches("replaced").count() == 1, "churn moved set elements only:\n{}", agent.log());

    // The records carry the translation: who was 203.0.113.10?
    std::thread::sleep(Duration::from_millis(3500));
    let flushed = ces_lab::spawn_in(&lab.gateway, ces_nft::conntrack::flush).unwrap().join().unwrap();
    assert!(matches!(flushed, Ok(Ok(()))), "{flushed:?}");
    wait_for(
        Duration::from_secs(30),
        || flows(&store, &["--nat", "203.0.113.10"]).len() >= 2,
        || format!("{:#?}\n{}", flows(&store, &[]), agent.log()),
    );
    let by_egress = flows(&store, &["--nat", "203.0.113.10"]);
    let pods: std::collections::BTreeSet<&str> =
        by_egress.iter().map(|r| r["source"]["pod"].as_str().unwrap_or("?")).collect();
    assert_eq!(pods.into_iter().collect::<Vec<_>>(), ["checkout-0"], "{by_egress:#?}");
    for r in &by_egress {
        assert_eq!(r["tenant"], "payments");
        let port = r["nat"]["port"].as_u64().unwrap_or_else(|| panic!("the translated port is kept: {r}"));
        // Found again by egress address and port: that connection, with the pod's own address and port.
        let found = flows(&store, &["--nat", &format!("203.0.113.10:{port}")]);
        assert!(!found.is_empty() && found.iter().all(|x| x["nat"]["port"] == port), "{found:#?}");
        assert!(found.iter().any(|x| x["source"] == r["source"]), "{found:#?}");
    }
    assert!(flows(&store, &["--nat", "203.0.113.10:1"]).is_empty(), "no connection left through port 1");
    let ana = flows(&store, &["--nat", "203.0.113.20"]);
    assert!(!ana.is_empty() && ana.iter().all(|r| r["tenant"] == "analytics" && r["source"]["pod"] == "jupyter-0"));
    assert!(flows(&store, &["--nat", "10.10.0.13"]).is_empty());
}
