//! AFM's firewall logs into flow records: the real `ces controller` (dry run: no BIG-IP runs here) listens for the
//! log publisher's syslog, and each message becomes a record naming the CES rule, tenant and pod behind it. The
//! messages are written as AFM writes them (afm-log-format.md): RFC 5424 with structured data over UDP, BSD with the
//! log profile's field list over TCP (newline and octet-counted framing). Two tenants share a pod network.

mod common;

use std::io::Write as _;
use std::net::{TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use common::{flows, try_flows, wait_until};
use serde_json::Value;

const CONFIG: &str = r#"
clusterName: k8s
isSupportRouteDomain: true
schemaVersion: "3.29.0"
tenant:
  - name: Common
  - {name: alpha, namespaces: [a1], routeDomain: {id: 11, name: rd11}}
  - {name: beta, namespaces: [b1], routeDomain: {id: 12, name: rd12}}
"#;

/// One address, 10.10.0.5, for a pod of each tenant; the same rule name in both, audited in beta.
const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a1}
---
apiVersion: v1
kind: Namespace
metadata: {name: b1}
---
apiVersion: v1
kind: Pod
metadata: {name: pod-a, namespace: a1, labels: {app: shop}}
status: {phase: Running, podIPs: [{ip: 10.10.0.5}]}
---
apiVersion: v1
kind: Pod
metadata: {name: pod-b, namespace: b1}
status: {phase: Running, podIPs: [{ip: 10.10.0.5}]}
---
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {name: web, namespace: a1}
spec: {addresses: [198.51.100.7], ports: [{protocol: TCP, port: "443"}]}
---
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {name: web, namespace: b1}
spec: {addresses: [198.51.100.8], ports: [{protocol: TCP, port: "443"}]}
---
apiVersion: kubeovn.io/v1alpha1
kind: NamespaceEgressRule
metadata: {name: out, namespace: a1}
spec: {action: accept, externalServices: [web]}
---
apiVersion: kubeovn.io/v1alpha1
kind: NamespaceEgressRule
metadata: {name: out, namespace: b1}
spec: {action: drop, mode: audit, externalServices: [web]}
"#;

struct Controller {
    child: Child,
    log: PathBuf,
}

impl Controller {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The policy and rule names AFM logs for a CES rule: those the renderer declared.
fn afm_names(model: &ces_model::PolicyModel, tenant: &str, rule_id: &str) -> (String, String) {
    let rendered = ces_as3::render(model, jiff::Timestamp::now());
    let r = ces_as3::logs::logged_rules(&rendered, model)
        .into_iter()
        .find(|r| r.tenant == tenant && r.rule_id.as_deref() == Some(rule_id))
        .unwrap_or_else(|| panic!("{rule_id} is not declared in {tenant}"));
    (r.policy, r.rule)
}

#[test]
fn afm_log_messages_become_records_of_the_right_tenant_rule_and_pod() {
    let dir = std::env::temp_dir().join(format!("ces-afm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    std::fs::write(dir.join("manifests/policy.yaml"), MANIFESTS).unwrap();
    std::fs::write(dir.join("ces-conf.yaml"), CONFIG).unwrap();
    let store = dir.join("flows");
    let log = dir.join("controller.log");
    let c = Controller {
        child: Command::new(env!("CARGO_BIN_EXE_ces"))
            .arg("controller")
            .arg("--manifests")
            .arg(dir.join("manifests"))
            .arg("--config")
            .arg(dir.join("ces-conf.yaml"))
            .arg("--bigip-dry-run")
            .arg(dir.join("dry-run"))
            .args(["--afm-syslog-listen", "127.0.0.1:0", "--debounce-ms", "50", "--health-addr", "127.0.0.1:19871"])
            .arg("--flow-store")
            .arg(&store)
            .env_remove("CES_AS3_SCHEMA_DIR")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
        log,
    };
    wait_until(|| c.log().contains("receiving AFM's logs on") && c.log().contains("alpha"), || c.log());
    let text = c.log();
    let addr: std::net::SocketAddr = text
        .split("receiving AFM's logs on ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no address in the log:\n{text}"));

    let snap = ces_snapshot::manifests::load_str(MANIFESTS, "policy.yaml");
    let config = ces_config::CesConfig::from_yaml(CONFIG, "ces-conf.yaml").unwrap();
    let model = ces_compiler::compile(&snap, &config, "kube-system");
    let (a_policy, a_rule) = afm_names(&model, "alpha", "NamespaceEgressRule/a1/out");
    let (b_policy, b_rule) = afm_names(&model, "beta", "NamespaceEgressRule/b1/out");
    let now = jiff::Timestamp::now();

    // 1. RFC 5424 over UDP: alpha's pod accepted by alpha's rule.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let m1 = format!(
        r#"<134>1 {now} bigip1 tmm 14807 23003137 [F5@12276 acl_policy_name="{a_policy}" acl_policy_type="Enforced" acl_rule_name="{a_rule}" action="Accept" context_type="Route Domain" dest_ip="198.51.100.7" dest_port="443" ip_protocol="TCP" route_domain="11" source_ip="10.10.0.5%11" source_port="40001"] -"#
    );
    udp.send_to(m1.as_bytes(), addr).unwrap();
    // 2. Not an AFM message at all: counted, nothing else.
    udp.send_to(b"<13>Dec  6 12:00:00 host sshd[1]: session opened", addr).unwrap();

    // 3. BSD over TCP, one message per line, the original's 16-field storage format: beta's staged (audit) rule.
    let mut tcp = TcpStream::connect(addr).unwrap();
    let m3 = format!(
        "<134>Dec  6 18:00:00 bigip1 warning tmm[2314]: bigip1,{b_rule},{b_policy},Staged,TCP,Drop,Policy,/beta/Shared/k8s_outbound_vs,Virtual Server,\"Dec 06 2026 18:00:00\",10.10.0.5%12,40002,/beta/vlan12,12,198.51.100.8,443\n"
    );
    tcp.write_all(m3.as_bytes()).unwrap();
    // 4. Octet-counted: alpha's default (deny_all_rule), and a message that names beta's policy from alpha's route
    // domain: it must not be put down to beta's rule.
    let policy_of_alpha = a_policy.replace("_ns_policy_", "_svc_policy_");
    let m4 = format!(
        r#"<134>1 {now} bigip1 tmm 1 23003137 [F5@12276 acl_policy_name="{policy_of_alpha}" acl_policy_type="Enforced" acl_rule_name="deny_all_rule" action="Drop" dest_ip="203.0.113.9" dest_port="22" ip_protocol="TCP" route_domain="11" source_ip="10.10.0.5%11" source_port="40003"] -"#
    );
    let m5 = format!(
        r#"<134>1 {now} bigip1 tmm 1 23003137 [F5@12276 acl_policy_name="{b_policy}" acl_policy_type="Staged" acl_rule_name="{b_rule}" action="Drop" dest_ip="198.51.100.8" dest_port="443" ip_protocol="TCP" route_domain="11" source_ip="10.10.0.5%11" source_port="40004"] -"#
    );
    for m in [&m4, &m5] {
        write!(tcp, "{} {m}", m.len()).unwrap();
    }
    tcp.flush().unwrap();

    // The audit hits wait 2 s for a decision, then the pipeline stores within a second.
    wait_until(
        || try_flows(&store, &[]).is_ok_and(|r| r.len() >= 4),
        || format!("{:#?}\n{}", try_flows(&store, &[]), c.log()),
    );
    let all = flows(&store, &[]);
    assert_eq!(all.len(), 4, "{all:#?}");
    let by_port = |p: u64| {
        all.iter().find(|r| r["source"]["port"] == p).unwrap_or_else(|| panic!("no record from port {p}: {all:#?}"))
    };
    let r1 = by_port(40001);
    assert_eq!(r1["origin"], "bigip");
    assert_eq!((&r1["tenant"], &r1["verdict"]), (&Value::from("alpha"), &Value::from("accept")));
    assert_eq!(r1["rule"]["rule"], "NamespaceEgressRule/a1/out");
    assert_eq!((&r1["source"]["namespace"], &r1["source"]["pod"]), (&Value::from("a1"), &Value::from("pod-a")));
    assert_eq!(r1["destination"]["externalService"], "a1/web");
    let r3 = by_port(40002);
    assert_eq!((&r3["tenant"], &r3["source"]["pod"]), (&Value::from("beta"), &Value::from("pod-b")));
    assert_eq!(r3["audit"], serde_json::json!(["NamespaceEgressRule/b1/out"]), "{r3:#}");
    let r4 = by_port(40003);
    assert_eq!((&r4["verdict"], &r4["rule"]["rule"]), (&Value::from("drop"), &Value::from("Tenant/alpha")));
    let r5 = by_port(40004);
    assert_eq!(r5["tenant"], "alpha");
    assert_eq!(r5["source"]["pod"], "pod-a");
    assert!(!r5.to_string().contains("b1/out"), "beta's rule named for alpha's traffic: {r5:#}");

    // Queries by pod and rule see them; the unreadable message is counted as lost.
    assert_eq!(flows(&store, &["--namespace", "b1"]).len(), 1);
    assert_eq!(flows(&store, &["--rule", "NamespaceEgressRule/a1/out"]).len(), 1);
    let report =
        Command::new(env!("CARGO_BIN_EXE_ces")).args(["report", "-o", "json", "--store"]).arg(&store).output().unwrap();
    let report: Value = serde_json::from_slice(&report.stdout).unwrap();
    let lost = report["lost"].to_string();
    assert!(lost.contains("afm-syslog") && lost.contains("malformed"), "{report:#}");
    // The controller's /metrics count what came in, what was stored, and what was lost.
    let metrics = {
        use std::io::Read as _;
        let mut s = TcpStream::connect("127.0.0.1:19871").unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    for line in [
        "ces_flow_records_stored_total{component=\"controller\"} 4",
        "ces_flow_records_lost_total{component=\"controller\",source=\"afm-syslog\",reason=\"malformed\"} 1",
    ] {
        assert!(metrics.contains(line), "no `{line}` in\n{metrics}");
    }
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}
