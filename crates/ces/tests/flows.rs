//! Flow records from the nftables gateway, with real packets (docs/flows.md): the real `ces gateway` agent records
//! connections from conntrack and drops, rejects and audit hits from NFLOG into its store; `ces flows` and
//! `ces report` read them back. Tenants' pod networks overlap; a pod moves away while its connection is open. Needs
//! root, iproute2, nftables and iptables (`scripts/test.sh` installs them); fails, never skips, without them.

mod common;

use std::path::PathBuf;
use std::process::Command;

use ces_lab::{Lab, LabSpec, Outcome, Proto, Side};
use common::{Agent, flows, ip, wait_for, wait_until};
use serde_json::Value;

const POLICY: &str = r#"apiVersion: v1
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
status: {phase: Running, podIPs: [{ip: 10.10.0.11}]}
---
apiVersion: v1
kind: Pod
metadata: {name: ledger-0, namespace: payments, labels: {app: ledger}}
status: {phase: Running, podIPs: [{ip: 10.10.0.21}]}
---
apiVersion: v1
kind: Pod
metadata: {name: jupyter-0, namespace: analytics, labels: {app: jupyter}}
status: {phase: Running, podIPs: [{ip: 10.10.0.11}]}
---
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {name: blocked, namespace: kube-system}
spec: {addresses: [203.0.113.9]}
---
apiVersion: kubeovn.io/v1alpha1
kind: ClusterEgressRule
metadata: {name: block}
spec: {action: drop, priority: 1, externalServices: [blocked]}
---
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {name: audited, namespace: kube-system}
spec: {addresses: [198.18.70.5]}
---
apiVersion: kubeovn.io/v1alpha1
kind: ClusterEgressRule
metadata: {name: audited}
spec: {action: reject, mode: audit, priority: 2, externalServices: [audited]}
---
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {name: lab, namespace: payments}
spec: {addresses: [198.18.70.0/24]}
---
apiVersion: kubeovn.io/v1alpha1
kind: NamespaceEgressRule
metadata: {name: lab, namespace: payments}
spec: {action: accept-decisively, externalServices: [lab]}
---
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {name: lab, namespace: analytics}
spec: {addresses: [198.18.70.1]}
---
apiVersion: kubeovn.io/v1alpha1
kind: NamespaceEgressRule
metadata: {name: lab, namespace: analytics}
spec: {action: accept-decisively, externalServices: [lab]}
---
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {name: never, namespace: payments}
spec: {addresses: [198.51.100.200]}
---
apiVersion: kubeovn.io/v1alpha1
kind: NamespaceEgressRule
metadata: {name: never-used, namespace: payments}
spec: {action: accept-decisively, externalServices: [never]}
"#;

const CONFIG: &str = "clusterName: k8s\nisSupportRouteDomain: true\ntenant:\n  - name: Common\n  - name: payments\n    namespaces: payments\n    routeDomain: {id: 10, name: rd10}\n    defaultAction: reject\n    gateway: {interfaces: [pay0]}\n  - name: analytics\n    namespaces: analytics\n    routeDomain: {id: 20, name: rd20}\n    gateway: {interfaces: [ana0]}\n";

const PAY: usize = 0;
const ANA: usize = 1;

fn lab(prefix: &str) -> Lab {
    let spec = LabSpec {
        prefix: prefix.into(),
        sides: vec![
            Side {
                gateway_interface: "pay0".into(),
                addresses: vec![ip("10.10.0.11"), ip("10.10.0.21"), ip("10.10.0.12")],
            },
            Side { gateway_interface: "ana0".into(), addresses: vec![ip("10.10.0.11")] },
        ],
        servers: [
            "198.18.70.1",
            "198.18.70.2",
            "198.18.70.5",
            "198.18.70.98",
            "198.18.70.99",
            "203.0.113.9",
            "198.51.100.1",
        ]
        .iter()
        .map(|a| ip(a))
        .collect(),
        tcp_ports: vec![443],
        udp_ports: vec![7],
        ..LabSpec::default()
    };
    let lab = Lab::build(spec).unwrap_or_else(|e| panic!("cannot build the network-namespace lab: {e}"));
    // 198.18.70.98 answers with ICMP host unreachable; 198.18.70.99 answers nothing.
    let srv = "table inet lab {\n chain input {\n  type filter hook input priority 0;\n  ip daddr 198.18.70.98 reject with icmp type host-unreachable\n  ip daddr 198.18.70.99 drop\n }\n}\n";
    let f = std::env::temp_dir().join(format!("{prefix}-srv.nft"));
    std::fs::write(&f, srv).unwrap();
    ces_lab::run_in(&lab.server, &["nft", "-f", f.to_str().unwrap()]).unwrap();
    common::fast_conntrack(&lab.gateway);
    lab
}

fn setup(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ces-flows-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("policy.yaml"), POLICY).unwrap();
    std::fs::write(dir.join("ces-conf.yaml"), CONFIG).unwrap();
    dir
}

fn is(r: &Value, pod: &str, dst: &str, port: u64) -> bool {
    r["source"]["pod"] == pod && r["destination"]["ip"] == dst && r["destination"]["port"] == port
}

#[test]
fn the_gateway_records_what_each_connection_did_and_who_made_it() {
    let dir = setup("rec");
    let lab = lab(&format!("cesf{}", std::process::id() % 100_000));
    let store = dir.join("store");
    let store_arg = store.to_string_lossy().into_owned();
    let agent = Agent::start(&lab.gateway, &dir, 19861, "1", &["--flow-store", &store_arg], false);
    let probe = |side, from: &str, to: &str, proto, port| lab.probe(side, ip(from), ip(to), proto, port).unwrap();

    // A UDP flow of checkout-0, open while the pod moves away and another takes its address.
    let client = lab.clients[PAY].clone();
    let udp = ces_lab::spawn_in(&client, move || {
        let s = std::net::UdpSocket::bind(("10.10.0.11", 0)).unwrap();
        s.connect(("198.18.70.1", 7)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(1))).unwrap();
        let mut buf = [0u8; 16];
        s.send(b"before").unwrap();
        s.recv(&mut buf).unwrap();
        s
    })
    .unwrap()
    .join()
    .unwrap()
    .unwrap();

    assert_eq!(probe(PAY, "10.10.0.11", "198.18.70.1", Proto::Tcp, 443), Outcome::Accept);
    assert_eq!(probe(ANA, "10.10.0.11", "198.18.70.1", Proto::Tcp, 443), Outcome::Accept);
    assert_eq!(probe(PAY, "10.10.0.11", "198.18.70.2", Proto::Tcp, 8080), Outcome::Reject, "a closed port");
    assert_eq!(probe(PAY, "10.10.0.11", "198.18.70.99", Proto::Tcp, 443), Outcome::Drop, "a silent address");
    assert_eq!(probe(PAY, "10.10.0.11", "198.18.70.98", Proto::Tcp, 443), Outcome::Reject, "host unreachable");
    assert_eq!(probe(PAY, "10.10.0.11", "203.0.113.9", Proto::Tcp, 443), Outcome::Drop);
    assert_eq!(probe(PAY, "10.10.0.21", "198.51.100.1", Proto::Tcp, 443), Outcome::Reject);
    assert_eq!(probe(PAY, "10.10.0.11", "198.18.70.5", Proto::Tcp, 443), Outcome::Accept, "audited, then accepted");
    assert_eq!(probe(ANA, "10.10.0.11", "198.18.70.5", Proto::Tcp, 443), Outcome::Drop, "audited, then dropped");

    // Churn: checkout-0 moves to 10.10.0.12 and checkout-9 takes 10.10.0.11; then the UDP flow ends.
    let policy = POLICY.replace("name: checkout-0, namespace: payments, labels: {app: checkout}}\nstatus: {phase: Running, podIPs: [{ip: 10.10.0.11}]}", "name: checkout-0, namespace: payments, labels: {app: checkout}}\nstatus: {phase: Running, podIPs: [{ip: 10.10.0.12}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: checkout-9, namespace: payments, labels: {app: checkout}}\nstatus: {phase: Running, podIPs: [{ip: 10.10.0.11}]}");
    assert_ne!(policy, POLICY);
    std::fs::write(dir.join("policy.yaml"), policy).unwrap();
    wait_until(|| agent.log().matches("problem(s) in the policy").count() >= 2, || agent.log());
    drop(udp);
    assert_eq!(probe(PAY, "10.10.0.11", "198.18.70.1", Proto::Tcp, 443), Outcome::Accept, "checkout-9 now");

    // Every connection has ended within 3 s (short conntrack timeouts); conntrack reports an expired connection only
    // when its garbage collector reaps it, up to a minute later on a table this small, so the test reaps them now.
    std::thread::sleep(std::time::Duration::from_millis(3500));
    let flushed = ces_lab::spawn_in(&lab.gateway, ces_nft::conntrack::flush).unwrap().join().unwrap();
    assert!(matches!(flushed, Ok(Ok(()))), "{flushed:?}");
    wait_for(
        std::time::Duration::from_secs(30),
        // Eight connections and three refused packets: the report below is compared with every record, so all
        // of them must have landed first.
        || {
            let all = flows(&store, &[]);
            all.iter().filter(|r| r["kind"] == "connection").count() >= 8
                && all.iter().filter(|r| r["kind"] == "packet").count() >= 3
        },
        || format!("{:#?}\n{}", flows(&store, &[]), agent.log()),
    );
    let all = flows(&store, &[]);
    let find = |pod: &str, dst: &str, port: u64, kind: &str| -> Vec<Value> {
        all.iter().filter(|r| is(r, pod, dst, port) && r["kind"] == kind).cloned().collect()
    };
    // Accepted connections: once each, with pod, tenant, rule, bytes both ways and how they ended.
    let c = find("checkout-0", "198.18.70.1", 443, "connection");
    assert_eq!(c.len(), 1, "once: {all:#?}");
    let c = &c[0];
    assert_eq!(
        (c["tenant"].as_str(), c["verdict"].as_str(), c["outcome"].as_str()),
        (Some("payments"), Some("accept"), Some("completed"))
    );
    assert_eq!(c["rule"]["rule"], "NamespaceEgressRule/payments/lab");
    assert_eq!(c["source"]["labels"]["app"], "checkout");
    assert!(c["bytes"]["out"].as_u64().unwrap() > 0 && c["bytes"]["in"].as_u64().unwrap() > 0, "{c}");
    assert!(c["end"].as_str().unwrap() >= c["time"].as_str().unwrap());
    let j = find("jupyter-0", "198.18.70.1", 443, "connection");
    assert_eq!(j.len(), 1, "the other tenant's pod at the same address: {all:#?}");
    assert_eq!(
        (j[0]["tenant"].as_str(), j[0]["rule"]["rule"].as_str()),
        (Some("analytics"), Some("NamespaceEgressRule/analytics/lab"))
    );
    // How connections failed.
    let outcome =
        |dst: &str, port: u64| find("checkout-0", dst, port, "connection").first().map(|r| r["outcome"].clone());
    assert_eq!(outcome("198.18.70.2", 8080), Some(Value::from("reset")), "{all:#?}");
    assert_eq!(outcome("198.18.70.99", 443), Some(Value::from("no-answer")), "{all:#?}");
    assert_eq!(outcome("198.18.70.98", 443), Some(Value::from("icmp-unreachable")), "{all:#?}");
    // Drops and rejects, with their rule.
    let d = find("checkout-0", "203.0.113.9", 443, "packet");
    assert_eq!(
        (d[0]["verdict"].as_str(), d[0]["rule"]["rule"].as_str()),
        (Some("drop"), Some("ClusterEgressRule/block"))
    );
    let r = find("ledger-0", "198.51.100.1", 443, "packet");
    assert_eq!((r[0]["verdict"].as_str(), r[0]["rule"]["rule"].as_str()), (Some("reject"), Some("Tenant/payments")));
    // Audit hits, with what decided.
    let a = find("checkout-0", "198.18.70.5", 443, "connection");
    assert_eq!(
        (a[0]["rule"]["rule"].as_str(), a[0]["audit"][0].as_str()),
        (Some("NamespaceEgressRule/payments/lab"), Some("ClusterEgressRule/audited"))
    );
    let a = find("jupyter-0", "198.18.70.5", 443, "packet");
    assert_eq!(
        (a[0]["rule"]["rule"].as_str(), a[0]["audit"][0].as_str()),
        (Some("Tenant/analytics"), Some("ClusterEgressRule/audited"))
    );
    // The UDP flow that outlived its pod's address names the pod that opened it; the new holder has its own.
    let u = find("checkout-0", "198.18.70.1", 7, "connection");
    assert_eq!(u.len(), 1, "{all:#?}");
    assert!(!find("checkout-9", "198.18.70.1", 443, "connection").is_empty(), "{all:#?}");

    // Queries, like hubble observe.
    let ns = flows(&store, &["--namespace", "analytics"]);
    assert!(!ns.is_empty() && ns.iter().all(|r| r["source"]["namespace"] == "analytics"));
    let rejects = flows(&store, &["--verdict", "reject"]);
    assert!(rejects.iter().all(|r| r["verdict"] == "reject") && !rejects.is_empty());
    assert!(
        flows(&store, &["--to", "198.18.70.0/30", "--port", "443", "--protocol", "tcp", "--tenant", "payments"])
            .iter()
            .all(|r| r["tenant"] == "payments" && r["destination"]["port"] == 443)
    );
    assert_eq!(flows(&store, &["--rule", "audited"]).len(), 2, "audit rules are found too");
    assert_eq!(flows(&store, &["--last", "2"]).len(), 2);
    assert!(flows(&store, &["--since", "1s", "--until", "1970-01-01T00:00:00Z"]).is_empty());

    // The report: numbers equal what the records say; the rule nothing hit is named. Its rollups are written once
    // a second, so it may trail the records by that.
    let report = || {
        let out = Command::new(env!("CARGO_BIN_EXE_ces"))
            .args(["report", "--store"])
            .arg(&store)
            .args(["-o", "json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let all = flows(&store, &[]);
    wait_for(
        std::time::Duration::from_secs(5),
        || report()["records"].as_u64() == Some(all.len() as u64),
        || format!("{} records, report: {}", all.len(), report()),
    );
    let rep = report();
    let drops = all.iter().filter(|r| r["verdict"] == "drop").count() as u64;
    assert_eq!(rep["byVerdict"]["drop"].as_u64(), Some(drops));
    assert!(
        rep["rulesNeverHit"].as_array().unwrap().iter().any(|r| r == "NamespaceEgressRule/payments/never-used"),
        "{rep}"
    );
    assert!(!rep["rulesNeverHit"].as_array().unwrap().iter().any(|r| r == "NamespaceEgressRule/payments/lab"));
    let errors: Vec<String> = rep["errorsByDestination"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["key"][2].as_str().unwrap().to_string())
        .collect();
    for want in ["reset", "no-answer", "icmp-unreachable"] {
        assert!(errors.iter().any(|e| e == want), "{want} not in {errors:?}");
    }
    assert!(agent.metric("ces_flow_records_stored_total") >= all.len() as f64);
    agent.terminate();
    drop(lab);
    std::fs::remove_dir_all(&dir).unwrap();
}
