//! `ces impact`, the real binary: exit codes for CI (0 no change, 2 changes, 1 error), `--fail-on`, JSON per changed
//! flow, listed flows (the lines of `ces simulate --flows`) with the current policy, recorded flows from a file or a
//! store with what their data plane decided.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn ces(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ces")).args(args).output().unwrap()
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ces-impact-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The realistic example with `pci-no-paste` (reject paste sites for PCI namespaces) removed.
fn proposed(d: &Path) -> PathBuf {
    let p = d.join("proposed");
    std::fs::create_dir_all(&p).unwrap();
    let r = root().join("examples/realistic");
    std::fs::copy(r.join("cluster.yaml"), p.join("cluster.yaml")).unwrap();
    let policies = std::fs::read_to_string(r.join("policies.yaml")).unwrap();
    let kept: Vec<&str> = policies.split("\n---\n").filter(|d| !d.contains("name: pci-no-paste")).collect();
    assert!(kept.len() < policies.split("\n---\n").count(), "the example has pci-no-paste");
    std::fs::write(p.join("policies.yaml"), kept.join("\n---\n")).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Listed flows: to paste sites from payments pods (rejected by pci-no-paste now), and others.
fn listed(d: &Path) -> PathBuf {
    let f = d.join("flows.jsonl");
    let mut text = std::fs::read_to_string(root().join("examples/realistic/flows.jsonl")).unwrap();
    for line in [
        r#"{"from": "payments/checkout-0", "to": "paste.example.net:443/tcp", "at": "2026-11-26T10:00:00Z"}"#,
        r#"{"from": "payments/checkout-1", "to": "paste.example.net:443/tcp", "at": "2026-11-26T10:00:00Z"}"#,
    ] {
        text.push_str(line);
        text.push('\n');
    }
    std::fs::write(&f, text).unwrap();
    f
}

#[test]
fn listed_flows_against_the_current_policy_give_every_exit_code() {
    let d = dir("listed");
    let (flows, prop) = (listed(&d), proposed(&d));
    let r = root().join("examples/realistic");
    let conf = r.join("ces-conf.yaml");
    let base = ["impact", "--flows", s(&flows), "--config", s(&conf)];
    // The same policy: no change, exit 0.
    let same = ces(&[&base[..], &["--manifests", s(&r), "--current-manifests", s(&r)]].concat());
    assert_eq!(same.status.code(), Some(0), "{}", String::from_utf8_lossy(&same.stderr));
    assert!(String::from_utf8_lossy(&same.stdout).contains("No change"));
    // Without pci-no-paste: the paste flows change (reject by the rule -> reject by the tenant's default), exit 2.
    let changed = ces(&[&base[..], &["--manifests", s(&prop), "--current-manifests", s(&r)]].concat());
    assert_eq!(changed.status.code(), Some(2), "{}", String::from_utf8_lossy(&changed.stderr));
    let table = String::from_utf8_lossy(&changed.stdout);
    assert!(table.contains("ClusterEgressRule/pci-no-paste") && table.contains("paste.example.net"), "{table}");
    // JSON: one object per changed flow.
    let json = ces(&[&base[..], &["--manifests", s(&prop), "--current-manifests", s(&r), "-o", "json"]].concat());
    assert_eq!(json.status.code(), Some(2));
    let lines: Vec<Value> =
        String::from_utf8_lossy(&json.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // The payments flows to paste sites: lines 8 and 17 of the example's file (10.10.0.11 is checkout-0) and the two
    // added; the analytics ones never met pci-no-paste.
    assert_eq!(lines.len(), 4, "{lines:#?}");
    for l in &lines {
        assert_eq!(l["before"]["rule"], "ClusterEgressRule/pci-no-paste");
        assert_eq!(l["after"]["verdict"], "reject");
        assert_eq!(l["flow"]["source"]["namespace"], "payments");
        assert!(l["flow"]["destination"].as_str().unwrap().contains("paste"));
    }
    // A gate on newly denied traffic passes: the verdict stays reject.
    let gate =
        ces(&[&base[..], &["--manifests", s(&prop), "--current-manifests", s(&r), "--fail-on", "accept->deny"]]
            .concat());
    assert_eq!(gate.status.code(), Some(0), "{}", String::from_utf8_lossy(&gate.stderr));
    let gate =
        ces(&[&base[..], &["--manifests", s(&prop), "--current-manifests", s(&r), "--fail-on", "rule"]].concat());
    assert_eq!(gate.status.code(), Some(2));
    // Errors exit 1: listed flows without a current policy, a bad line (named), a bad --fail-on, a missing file.
    let no_current = ces(&[&base[..], &["--manifests", s(&prop)]].concat());
    assert_eq!(no_current.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_current.stderr).contains("--current-manifests"));
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "{\"from\": \"payments/checkout-0\", \"to\": \"x:1/tcp\"}\nnot json\n").unwrap();
    let out =
        ces(&["impact", "--flows", s(&bad), "--manifests", s(&r), "--current-manifests", s(&r), "--config", s(&conf)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"), "{}", String::from_utf8_lossy(&out.stderr));
    let out =
        ces(&[&base[..], &["--manifests", s(&r), "--current-manifests", s(&r), "--fail-on", "allow->drop"]].concat());
    assert_eq!(out.status.code(), Some(1));
    let out = ces(&["impact", "--flows", "/nonexistent/flows", "--example"]);
    assert_eq!(out.status.code(), Some(1));
    let _ = std::fs::remove_dir_all(&d);
}

/// Records made from `ces simulate` of the listed flows under the current policy: what a data plane enforcing it
/// would have recorded.
fn records(d: &Path, flows: &Path) -> PathBuf {
    let out = ces(&["simulate", "--example", "--flows", s(flows)]);
    assert!(out.status.success());
    let mut text = String::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        let to = v["to"].as_str().unwrap();
        let (hostport, proto) = to.split_once('/').unwrap();
        let (host, port) = hostport.rsplit_once(':').unwrap();
        let dst = if host.parse::<std::net::IpAddr>().is_ok() {
            serde_json::json!({"ip": host, "port": port.parse::<u16>().unwrap()})
        } else {
            serde_json::json!({"ip": "198.18.200.3", "port": port.parse::<u16>().unwrap(), "host": host})
        };
        let r = serde_json::json!({
            "v": 1, "kind": "packet", "origin": "gateway", "time": v["at"], "tenant": v["tenant"],
            "source": {"ip": v["source"]["ip"], "namespace": v["source"]["namespace"], "pod": v["source"]["pod"]},
            "destination": dst, "protocol": proto, "verdict": v["verdict"],
            "rule": {"rule": v["decidedBy"]["rule"], "context": v["decidedBy"]["context"], "mode": "enforce"},
            "outcome": "unknown", "packets": {"out": 1, "in": 0}, "bytes": {"out": 0, "in": 0}
        });
        text.push_str(&r.to_string());
        text.push('\n');
    }
    let f = d.join("records.jsonl");
    std::fs::write(&f, text).unwrap();
    f
}

#[test]
fn recorded_flows_compare_with_what_was_recorded_from_a_file_or_a_store() {
    let d = dir("recorded");
    let (flows, prop) = (listed(&d), proposed(&d));
    let recs = records(&d, &flows);
    let conf = root().join("examples/realistic/ces-conf.yaml");
    // What was recorded is what the example decides: no change.
    let same = ces(&["impact", "--flows", s(&recs), "--example"]);
    assert_eq!(
        same.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&same.stdout),
        String::from_utf8_lossy(&same.stderr)
    );
    let changed = ces(&["impact", "--flows", s(&recs), "--manifests", s(&prop), "--config", s(&conf), "-o", "json"]);
    assert_eq!(changed.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&changed.stdout).lines().count(), 4);
    // The same records in a store, narrowed by the filters.
    let store = d.join("store");
    let imp = ces(&["flows", "import", s(&recs), "--store", s(&store)]);
    assert!(imp.status.success(), "{}", String::from_utf8_lossy(&imp.stderr));
    let out = ces(&["impact", "--store", s(&store), "--manifests", s(&prop), "--config", s(&conf), "-o", "json"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    // From a store, records alike come as one object with the number of flows it stands for: the two records of
    // checkout-0 to x.pastebin.example (lines 8 and 17 of the example's flows) are one.
    let objects: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(objects.len(), 3, "{objects:#?}");
    assert_eq!(objects.iter().map(|o| o["flows"].as_u64().unwrap_or(1)).sum::<u64>(), 4);
    let out = ces(&[
        "impact",
        "--store",
        s(&store),
        "--manifests",
        s(&prop),
        "--config",
        s(&conf),
        "--namespace",
        "analytics",
    ]);
    assert_eq!(out.status.code(), Some(0), "no analytics flow changes: {}", String::from_utf8_lossy(&out.stdout));
    let _ = std::fs::remove_dir_all(&d);
}
