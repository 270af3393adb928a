//! The `ces` command line, run as a user runs it: the real binary, real files, exit codes and output.
//!
//! Golden files live in `tests/golden/`; regenerate them with `UPDATE_GOLDEN=1 cargo test -p ces` and review the
//! diff before committing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn ces(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ces"))
        .args(args)
        .current_dir(root())
        .env_remove("CES_NAMESPACE")
        .output()
        .expect("run ces")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run with UPDATE_GOLDEN=1 to create it", path.display()));
    if expected != actual {
        let line = expected.lines().zip(actual.lines()).position(|(a, b)| a != b).unwrap_or(0) + 1;
        panic!(
            "{} differs from the output at line {line}; if the change is intended, run with UPDATE_GOLDEN=1 and review the diff",
            path.display()
        );
    }
}

#[test]
fn crds_are_golden() {
    let o = ces(&["crds"]);
    assert!(o.status.success(), "{}", stderr(&o));
    golden("crds.yaml", &stdout(&o));
}

#[test]
fn the_model_of_the_example_is_golden() {
    let o = ces(&["compile", "--backend", "model", "--example"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let model: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(model["diagnostics"], serde_json::json!([]));
    assert_eq!(model["tenants"].as_array().unwrap().len(), 3);
    golden("realistic-model.json", &stdout(&o));
}

#[test]
fn simulating_the_example_flows_is_golden_and_keeps_the_contract() {
    let o = ces(&["simulate", "--example", "--flows", "examples/realistic/flows.jsonl"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let results: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let inputs = std::fs::read_to_string(root().join("examples/realistic/flows.jsonl")).unwrap();
    assert_eq!(results.len(), inputs.lines().count(), "one result per flow, in order");
    for (r, line) in results.iter().zip(inputs.lines()) {
        let input: Value = serde_json::from_str(line).unwrap();
        assert_eq!(r["from"], input["from"]);
        assert!(matches!(r["verdict"].as_str(), Some("accept" | "drop" | "reject")));
        assert!(r["tenant"].is_string());
        assert!(matches!(r["decidedBy"]["context"].as_str(), Some("cluster" | "namespace" | "service" | "default")));
        assert!(r["decidedBy"]["rule"].is_string());
        assert!(r["trail"].is_array());
    }
    let verdicts: Vec<&str> = results.iter().map(|r| r["verdict"].as_str().unwrap()).collect();
    assert_eq!(
        verdicts,
        [
            "accept", "reject", "accept", "reject", "drop", "accept", "reject", "reject", "drop", "accept", "drop",
            "accept", "accept", "accept", "drop", "drop", "reject"
        ]
    );
    golden("realistic-flows.jsonl", &out);
}

#[test]
fn the_original_examples_simulate_through_the_cli() {
    let base = [
        "simulate",
        "--manifests",
        "examples/original/examples.yaml",
        "examples/original-cluster.yaml",
        "--config",
        "examples/original/ces-conf.yaml",
        "--output",
        "json",
    ];
    let run = |from: &str, to: &str| -> Value {
        let mut args = base.to_vec();
        args.extend(["--from", from, "--to", to]);
        let o = ces(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str(&stdout(&o)).unwrap()
    };
    let r = run("default/mysql-0", "211.6.6.7:9090/udp");
    assert_eq!(r["verdict"], "accept");
    assert_eq!(r["tenant"], "p2");
    assert_eq!(r["decidedBy"]["rule"], "ServiceEgressRule/default/rule4");
    assert_eq!(r["source"]["ip"], "10.16.0.11");
    let r = run("default/web-1", "211.6.6.7:9090/udp");
    assert_eq!((r["verdict"].as_str(), r["decidedBy"]["context"].as_str()), (Some("drop"), Some("default")));
    let r = run("10.66.0.5", "22.6.6.5:9090/tcp");
    assert_eq!(r["verdict"], "drop");
    assert_eq!(r["tenant"], "project3");
    assert_eq!(r["trail"][0]["rule"], "ClusterEgressRule/rule1");
    assert_eq!(r["trail"][0]["effect"], "next-context");
}

#[test]
fn flows_print_json_lines_unless_text_is_asked_for() {
    let o = ces(&["simulate", "--example", "--flows", "examples/realistic/flows.jsonl", "--output", "text"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("ACCEPT  payments/checkout-0 -> api.stripe.com:443/tcp\n"), "{out}");
    assert_eq!(out.lines().filter(|l| !l.starts_with(' ')).count(), 17, "one block per flow:\n{out}");
}

#[test]
fn an_address_source_names_its_pod_when_one_pod_has_it() {
    let json = |from: &str| -> Value {
        let o = ces(&["simulate", "--example", "--from", from, "--to", "api.stripe.com:443/tcp", "--output", "json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str(&stdout(&o)).unwrap()
    };
    let r = json("10.11.0.5");
    assert_eq!(
        (r["source"]["namespace"].as_str(), r["source"]["pod"].as_str()),
        (Some("payments-batch"), Some("settle-0"))
    );
    assert_eq!(r["tenant"], "payments");
    let r = json("10.99.0.1");
    assert!(r["source"].get("pod").is_none(), "{r}");
    assert_eq!(r["tenant"], "Common");
}

#[test]
fn text_output_names_verdict_rule_and_trail() {
    let o = ces(&[
        "simulate",
        "--example",
        "--from",
        "analytics/notebook-0",
        "--to",
        "x.pastebin.example:443/tcp",
        "--at",
        "2026-11-26T10:00:00Z",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("DROP  analytics/notebook-0 -> x.pastebin.example:443/tcp\n"), "{out}");
    assert!(out.contains("tenant analytics, route domain 20"), "{out}");
    assert!(out.contains("by Tenant/analytics in the default context"), "{out}");
    assert!(out.contains("audit") && out.contains("ClusterEgressRule/audit-paste"), "{out}");
}

/// Each `simulate --example ARGS` exits 2, says `want` on stderr and prints nothing on stdout.
fn simulate_refuses(cases: &[(&[&str], &str)]) {
    for (args, want) in cases {
        let mut full = vec!["simulate", "--example"];
        full.extend_from_slice(args);
        let o = ces(&full);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: stderr `{}` lacks `{want}`", stderr(&o));
        assert!(stdout(&o).is_empty(), "nothing half-printed on bad input");
    }
}

#[test]
fn bad_simulate_input_exits_2_with_a_clear_message() {
    let cases: [(&[&str], &str); 7] = [
        (&["--from", "payments/ghost", "--to", "1.1.1.1:443/tcp"], "no pod ghost in namespace payments"),
        (&["--from", "not-a-source", "--to", "1.1.1.1:443/tcp"], "neither NAMESPACE/POD nor an IP address"),
        (&["--from", "10.0.0.1", "--to", "1.1.1.1:443"], "expected HOST:PORT/tcp"),
        (&["--from", "10.0.0.1", "--to", "1.1.1.1:99999/tcp"], "not a number in 1-65535"),
        (&["--from", "10.0.0.1", "--to", "1.1.1.1:443/tcp", "--at", "noon"], "is not an RFC 3339 time"),
        (&["--from", "10.0.0.1", "--to", "1.1.1.1/icmp", "--flows", "x"], "cannot be used with"),
        (&["--to", "1.1.1.1/icmp"], "--from"),
    ];
    simulate_refuses(&cases);
}

#[test]
fn a_bad_flows_file_names_every_bad_line_and_prints_nothing() {
    let dir = std::env::temp_dir().join(format!("ces-flows-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("flows.jsonl");
    std::fs::write(
        &file,
        "{\"from\": \"10.0.0.1\", \"to\": \"1.1.1.1:443/tcp\"}\n\n{\"from\": \"10.0.0.1\"}\nnot json\n{\"from\": \"10.0.0.1\", \"to\": \"1.1.1.1/icmp\", \"when\": 1}\n",
    )
    .unwrap();
    let o = ces(&["simulate", "--example", "--flows", file.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("flows.jsonl:3: missing field `to`"), "{err}");
    assert!(err.contains("flows.jsonl:4: "), "{err}");
    assert!(err.contains("flows.jsonl:5: unknown field `when`"), "{err}");
    assert!(stdout(&o).is_empty());
}

#[test]
fn a_bad_config_names_the_file_and_the_key() {
    let dir = std::env::temp_dir().join(format!("ces-conf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("ces-conf.yaml");
    std::fs::write(&conf, "clusterName: k8s\ntenant:\n- name: Common\n  routeDomain: {id: 99999}\n").unwrap();
    let o = ces(&[
        "simulate",
        "--manifests",
        "examples/realistic",
        "--config",
        conf.to_str().unwrap(),
        "--from",
        "10.0.0.1",
        "--to",
        "1.1.1.1/icmp",
    ]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("ces-conf.yaml: tenant[0].routeDomain.id: "), "{err}");
}

#[test]
fn validate_reports_every_kind_of_bad_input_and_exits_1() {
    let o = ces(&["validate", "--manifests", "crates/ces/tests/fixtures/bad"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out = stdout(&o);
    for want in [
        "malformed.yaml:1: ",
        "(InvalidYAML)",
        "ExternalService/kube-system/typo: spec.adresses: unknown field `adresses`",
        "ExternalService/kube-system/bad-cidr: spec.addresses[0]: `10.0.0.0/33` is not a valid CIDR (InvalidAddress)",
        "ExternalService/kube-system/bad-port: spec.ports[0].port: port list `99999`: port 99999 is out of range 1-65535 (InvalidPort)",
        "ExternalService/kube-system/reversed: spec.addresses[0]: range `10.0.0.9-10.0.0.1` is reversed",
        "ExternalService/kube-system/reversed: spec.ports[0].port: port list `9000-8000`: range 9000-8000 is reversed",
        "ClusterEgressRule/bad-action: spec.action: unknown variant `allow`",
        "ClusterEgressRule/missing-ref: ExternalService kube-system/does-not-exist not found (ExternalServiceNotFound)",
        "ExternalService/kube-system/ok: defined more than once; the first definition, at crates/ces/tests/fixtures/bad/objects.yaml:41, is kept (DuplicateName)",
    ] {
        assert!(out.contains(want), "validate output lacks `{want}`:\n{out}");
    }
    assert!(!out.contains("ClusterEgressRule/fine"), "the good rule has no problem:\n{out}");
    assert!(out.trim_end().ends_with("problem(s), 0 warning(s)"), "{out}");

    let o = ces(&["validate", "--manifests", "crates/ces/tests/fixtures/bad", "--output", "json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["problems"].as_array().unwrap().len(), out.lines().count() - 1);
}

#[test]
fn validate_passes_the_examples() {
    for args in [
        vec!["validate", "--example"],
        vec![
            "validate",
            "--manifests",
            "examples/original/examples.yaml",
            "examples/original-cluster.yaml",
            "--config",
            "examples/original/ces-conf.yaml",
        ],
        vec![
            "validate",
            "--manifests",
            "examples/original/examples-0.6.2.yaml",
            "examples/original-cluster.yaml",
            "--config",
            "examples/original/ces-conf.yaml",
        ],
    ] {
        let o = ces(&args);
        assert!(o.status.success(), "{args:?}:\n{}{}", stdout(&o), stderr(&o));
    }
}

#[test]
fn a_missing_manifest_path_is_bad_input() {
    let o = ces(&["compile", "--manifests", "no/such/dir"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no/such/dir: "), "{}", stderr(&o));
}

#[test]
fn ces_namespace_flag_and_env_move_cluster_external_services() {
    let dir = std::env::temp_dir().join(format!("ces-ns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("m.yaml"),
        "apiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {name: e, namespace: ces}\nspec: {addresses: [1.1.1.1]}\n---\napiVersion: kubeovn.io/v1alpha1\nkind: ClusterEgressRule\nmetadata: {name: r}\nspec: {action: accept-decisively, externalServices: [e]}\n",
    )
    .unwrap();
    let m = dir.join("m.yaml");
    let args = [
        "simulate",
        "--manifests",
        m.to_str().unwrap(),
        "--from",
        "10.0.0.1",
        "--to",
        "1.1.1.1/icmp",
        "--output",
        "json",
    ];
    let verdict = |o: Output| -> String {
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        v["verdict"].as_str().unwrap().to_string()
    };
    assert_eq!(verdict(ces(&args)), "drop", "default kube-system: the rule is left out");
    let mut with_flag = args.to_vec();
    with_flag.extend(["--ces-namespace", "ces"]);
    assert_eq!(verdict(ces(&with_flag)), "accept");
    let o = Command::new(env!("CARGO_BIN_EXE_ces")).args(args).env("CES_NAMESPACE", "ces").output().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(verdict(o), "accept");
}

#[test]
fn simulate_mistakes_get_messages_that_name_the_mistake() {
    // Each of these was accepted, or answered with a misleading message, by issue 2's simulate.
    let cases: [(&[&str], &str); 8] = [
        (&["--from", "10.0.0.1", "--to", "1.2.3.4:+80/tcp"], "port `+80` is not a number"),
        (&["--from", "10.0.0.1", "--to", "api.example.com:443/icmp"], "ICMP has no port; write HOST/icmp"),
        (&["--from", "10.0.0.1", "--to", "10.0.0.0/8:443/tcp"], "a target is one address or host name, not a network"),
        (&["--from", "10.0.0.1/32", "--to", "1.1.1.1:443/tcp"], "a source is one address, not a network"),
        (&["--from", "10.0.0.1", "--to", "[2001:db8::1]:443/tcp"], "source 10.0.0.1 is IPv4 but destination"),
        (&["--from", "10.10.0.11", "--to", "1.1.1.1:443/tcp"], "several tenants (analytics, payments)"),
        (&["--from", "10.10.0.11", "--tenant", "nope", "--to", "1.1.1.1:443/tcp"], "no tenant `nope` (the tenants are"),
        (
            &["--from", "payments/checkout-0", "--tenant", "analytics", "--to", "1.1.1.1:443/tcp"],
            "in tenant payments, not analytics",
        ),
    ];
    simulate_refuses(&cases);
}

#[test]
fn an_ip_source_takes_the_tenant_it_enters_in() {
    // 10.10.0.11 is payments/checkout-0 in route domain 10 and analytics-dev/jupyter-0 in route domain 20. The PCI
    // cluster rule selects payments' pods; the same address in analytics is another pod, which it must not reach.
    let run = |tenant: &str| {
        let o = ces(&[
            "simulate",
            "--example",
            "--from",
            "10.10.0.11",
            "--tenant",
            tenant,
            "--to",
            "x.pastebin.example:443/tcp",
            "--at",
            "2026-11-26T10:00:00Z",
            "--output",
            "json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str::<Value>(&stdout(&o)).unwrap()
    };
    let p = run("payments");
    assert_eq!(
        (p["verdict"].as_str(), p["decidedBy"]["rule"].as_str()),
        (Some("reject"), Some("ClusterEgressRule/pci-no-paste"))
    );
    assert_eq!(p["source"]["pod"], "checkout-0");
    let a = run("analytics");
    assert_eq!((a["verdict"].as_str(), a["decidedBy"]["rule"].as_str()), (Some("drop"), Some("Tenant/analytics")));
    assert_eq!(a["source"]["pod"], "jupyter-0");
}

#[test]
fn flows_lines_take_a_tenant_and_every_error_names_its_line() {
    let dir = std::env::temp_dir().join(format!("ces-flows-tenant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("flows.jsonl");
    std::fs::write(
        &file,
        "{\"from\": \"10.10.0.11\", \"tenant\": \"analytics\", \"to\": \"1.1.1.1:443/tcp\"}\n\
         {\"from\": \"10.10.0.11\", \"to\": \"1.1.1.1:443/tcp\"}\n\
         {\"from\": \"10.0.0.1\", \"to\": \"[::1]:443/tcp\"}\n",
    )
    .unwrap();
    let o = ces(&["simulate", "--example", "--flows", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(!err.contains("flows.jsonl:1:"), "line 1 is fine: {err}");
    assert!(err.contains("flows.jsonl:2: `10.10.0.11`: 10.10.0.11 is a source address of several tenants"), "{err}");
    assert!(err.contains("flows.jsonl:3: `10.0.0.1` -> `[::1]:443/tcp`: source 10.0.0.1 is IPv4"), "{err}");
    std::fs::write(&file, "{\"from\": \"10.10.0.11\", \"tenant\": \"analytics\", \"to\": \"1.1.1.1:443/tcp\"}\n")
        .unwrap();
    let o = ces(&["simulate", "--example", "--flows", file.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!((v["tenant"].as_str(), v["source"]["pod"].as_str()), (Some("analytics"), Some("jupyter-0")));
}

#[test]
fn an_object_defined_twice_is_an_error_for_every_command() {
    let dir = std::env::temp_dir().join(format!("ces-dup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let es = "apiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {name: e, namespace: kube-system}\nspec: {addresses: [1.1.1.1]}\n";
    std::fs::write(dir.join("a.yaml"), es).unwrap();
    std::fs::write(dir.join("b.yaml"), es.replace("1.1.1.1", "2.2.2.2")).unwrap();
    let d = dir.to_str().unwrap();
    let sim = ces(&["simulate", "--manifests", d, "--from", "10.0.0.1", "--to", "1.1.1.1:443/tcp"]);
    let compile = ces(&["compile", "--manifests", d]);
    let validate = ces(&["validate", "--manifests", d]);
    std::fs::remove_dir_all(&dir).unwrap();
    for o in [&sim, &compile] {
        assert_eq!(o.status.code(), Some(2), "{}", stderr(o));
        assert!(stderr(o).contains("defined more than once") && stderr(o).contains("a.yaml:1"), "{}", stderr(o));
        assert!(stdout(o).is_empty());
    }
    assert_eq!(validate.status.code(), Some(1));
    assert!(stdout(&validate).contains("(DuplicateName)"), "{}", stdout(&validate));
}

#[test]
fn a_config_in_the_manifest_folder_is_recognised() {
    // The README's own command read examples/realistic/ces-conf.yaml as a manifest and failed, in issue 2.
    let o = ces(&["validate", "--manifests", "examples/realistic", "--config", "examples/realistic/ces-conf.yaml"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(!stderr(&o).contains("note:"), "the config was given: {}", stderr(&o));
    // Without --config, the user is told that the file is not used.
    let o = ces(&["validate", "--manifests", "examples/realistic"]);
    assert!(
        stderr(&o).contains("examples/realistic/ces-conf.yaml:1 is a ces-conf.yaml, not a manifest"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_synth_folder_compiles_as_written() {
    let dir = std::env::temp_dir().join(format!("ces-synth-cli-{}", std::process::id()));
    let d = dir.to_str().unwrap();
    let o = ces(&["synth", "--pods", "400", "--rules", "40", "--out", d]);
    assert!(o.status.success(), "{}", stderr(&o));
    let conf = dir.join("ces-conf.yaml");
    let o = ces(&["validate", "--manifests", d, "--config", conf.to_str().unwrap()]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let o = ces(&["compile", "--manifests", d, "--config", conf.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let model: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(model["tenants"].as_array().unwrap().len(), 4);
}

#[test]
fn the_peak_rss_hook_reports_a_plausible_figure() {
    let o = Command::new(env!("CARGO_BIN_EXE_ces"))
        .args(["validate", "--example"])
        .current_dir(root())
        .env("CES_REPORT_PEAK_RSS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let kb: u64 = stderr(&o)
        .lines()
        .find_map(|l| l.strip_prefix("ces: peak RSS ")?.strip_suffix(" kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}", stderr(&o)));
    assert!((500..2_000_000).contains(&kb), "{kb} kB");
    assert!(!stderr(&ces(&["validate", "--example"])).contains("peak RSS"), "only when asked for");
}

/// The names of the files in a folder, sorted.
fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    names.sort();
    names
}

fn as3_schema_dir() -> PathBuf {
    ces_bigip_double::schema_dir()
}

#[test]
fn compile_as3_writes_one_valid_document_per_tenant_and_refuses_invalid_ones() {
    let out = std::env::temp_dir().join(format!("ces-cli-as3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let schema = as3_schema_dir();
    let o = ces(&[
        "compile",
        "--backend",
        "as3",
        "--manifests",
        "examples/original/examples.yaml",
        "examples/original-cluster.yaml",
        "--config",
        "examples/original/ces-conf.yaml",
        "--as3-schema",
        schema.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let files = file_names(&out);
    assert_eq!(files, ["Common.json", "p2.json", "project3.json"]);
    let p2: Value = serde_json::from_str(&std::fs::read_to_string(out.join("p2.json")).unwrap()).unwrap();
    assert_eq!(p2["declaration"]["p2"]["defaultRouteDomain"], 2);
    assert!(stderr(&o).contains("each valid under AS3 schema 3.29.0"), "{}", stderr(&o));

    let _ = std::fs::remove_dir_all(&out);
}

/// `ces` without `CES_AS3_SCHEMA_DIR` in its environment.
fn ces_without_schema_env(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ces"))
        .args(args)
        .current_dir(root())
        .env_remove("CES_NAMESPACE")
        .env_remove("CES_AS3_SCHEMA_DIR")
        .output()
        .expect("run ces")
}

#[test]
fn compile_as3_leaves_out_what_the_version_cannot_express_with_or_without_the_schema_folder() {
    let dir = std::env::temp_dir().join(format!("ces-cli-as3-versions-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let schema = as3_schema_dir();
    // An ICMP rule and a TCP rule in Common, under 3.29 (no ICMP in firewall rules).
    std::fs::write(
        dir.join("m.yaml"),
        "apiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {name: pinger, namespace: kube-system}\nspec: {addresses: [203.0.113.9], ports: [{name: ping, protocol: ICMP}]}\n---\napiVersion: kubeovn.io/v1alpha1\nkind: ClusterEgressRule\nmetadata: {name: allow-ping}\nspec: {action: accept, externalServices: [pinger]}\n---\napiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {name: web, namespace: kube-system}\nspec: {addresses: [203.0.113.10], ports: [{name: https, protocol: TCP, port: \"443\"}]}\n---\napiVersion: kubeovn.io/v1alpha1\nkind: ClusterEgressRule\nmetadata: {name: allow-web}\nspec: {action: accept, externalServices: [web]}\n",
    )
    .unwrap();
    let config = "clusterName: k8s\nschemaVersion: \"3.29.0\"\ntenant: [{name: Common}]\n";
    std::fs::write(dir.join("c.yaml"), config).unwrap();
    let run = |out: &str, extra: &[&str], with_schema: bool| {
        let (m, c, o) = (dir.join("m.yaml"), dir.join("c.yaml"), dir.join(out));
        let mut args = vec!["compile", "--backend", "as3", "--manifests", m.to_str().unwrap()];
        args.extend(["--config", c.to_str().unwrap(), "--out", o.to_str().unwrap()]);
        if with_schema {
            args.extend(["--as3-schema", schema.to_str().unwrap()]);
        }
        args.extend(extra);
        ces_without_schema_env(&args)
    };
    let warnings = |o: &Output| -> Vec<String> {
        stderr(o).lines().filter(|l| l.starts_with("ces: warning")).map(str::to_string).collect()
    };
    let validated = run("validated", &[], true);
    assert!(validated.status.success(), "{}", stderr(&validated));
    let w = warnings(&validated);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("ClusterEgressRule/allow-ping") && w[0].contains("Firewall_Rule.protocol `icmp`"), "{w:?}");
    assert!(w[0].contains("AS3 3.29.0") && w[0].contains("left out"), "{w:?}");
    let doc = std::fs::read_to_string(dir.join("validated/Common.json")).unwrap();
    assert!(doc.contains("k8s_global_allow-web_ext_web_rule_list") && !doc.contains("allow-ping"), "{doc}");
    // Without the schema folder: the same documents, the same warnings, and it says it did not validate.
    let known = run("known", &[], false);
    assert!(known.status.success(), "{}", stderr(&known));
    assert_eq!(warnings(&known), w);
    assert_eq!(std::fs::read_to_string(dir.join("known/Common.json")).unwrap(), doc);
    assert!(stderr(&known).contains("NOT validated"), "{}", stderr(&known));
    // --strict: a rule left out fails the command (the documents are still written).
    for with_schema in [true, false] {
        let strict = run("strict", &["--strict"], with_schema);
        assert_eq!(strict.status.code(), Some(1), "{}", stderr(&strict));
        assert!(stderr(&strict).contains("--strict: 1 rule(s)"), "{}", stderr(&strict));
    }
    // A device running an older AS3 than the config asks for.
    let older = run("older", &["--as3-version", "3.28.0"], false);
    assert_eq!(older.status.code(), Some(2), "{}", stderr(&older));
    assert!(
        stderr(&older).contains("asks for AS3 schemaVersion 3.29.0, but --as3-version says the device runs AS3 3.28.0"),
        "{}",
        stderr(&older)
    );
    assert!(!dir.join("older").exists(), "nothing is written for a device that cannot take it");
    assert!(run("newer", &["--as3-version", "3.56.0"], false).status.success());
    // What is wrong is the tenant's own (its virtual server, from the config): its document is not written, and
    // an earlier run's file of it is removed.
    std::fs::create_dir_all(dir.join("own")).unwrap();
    std::fs::write(dir.join("own/Common.json"), "{}").unwrap();
    let bad_vs = config.replace(
        "tenant: [{name: Common}]",
        "tenant: [{name: Common, virtualService: {template: '{\"class\": \"Service_L4\", \"virtualPort\": \"any\"}'}}]",
    );
    std::fs::write(dir.join("c.yaml"), bad_vs).unwrap();
    let own = run("own", &[], true);
    assert_eq!(own.status.code(), Some(1), "{}", stderr(&own));
    assert!(
        stderr(&own).contains("Common: not written") && stderr(&own).contains("k8s_outbound_vs"),
        "{}",
        stderr(&own)
    );
    assert!(!dir.join("own/Common.json").exists(), "an invalid document is not written");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_controller_dry_run_writes_each_request_in_order() {
    let out = std::env::temp_dir().join(format!("ces-cli-dry-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let schema = as3_schema_dir();
    let o = ces(&[
        "controller",
        "--once",
        "--manifests",
        "examples/original/examples.yaml",
        "examples/original-cluster.yaml",
        "--config",
        "examples/original/ces-conf.yaml",
        "--as3-schema",
        schema.to_str().unwrap(),
        "--bigip-dry-run",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let files = file_names(&out);
    assert_eq!(
        files,
        [
            "0001-POST-shared-appsvcs-declare-Common.json",
            "0002-POST-shared-appsvcs-declare-p2.json",
            "0003-POST-shared-appsvcs-declare-project3.json",
            "0004-PATCH-tm-net-route-domain--project3-rd4.json",
            "0005-PATCH-tm-security-firewall-global-rules.json",
            "0006-POST-tm-sys-config.json",
        ]
    );
    let rd: Value = serde_json::from_str(&std::fs::read_to_string(out.join(&files[3])).unwrap()).unwrap();
    assert_eq!(rd["body"], serde_json::json!({"fwEnforcedPolicy": "/project3/Shared/k8s_ns_policy_rd4"}));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn the_controller_will_not_talk_to_a_device_without_credentials_or_schema() {
    let o = Command::new(env!("CARGO_BIN_EXE_ces"))
        .args(["controller", "--once", "--example", "--bigip-url", "bigip.invalid"])
        .current_dir(root())
        .env_remove("BIGIP_USERNAME")
        .env_remove("BIGIP_PASSWORD")
        .env_remove("CES_AS3_SCHEMA_DIR")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no BIG-IP credentials"), "{}", stderr(&o));
    let o = Command::new(env!("CARGO_BIN_EXE_ces"))
        .args(["controller", "--once", "--example", "--bigip-url", "bigip.invalid"])
        .current_dir(root())
        .env("BIGIP_USERNAME", "u")
        .env("BIGIP_PASSWORD", "p")
        .env_remove("CES_AS3_SCHEMA_DIR")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("never sends a declaration it has not validated"), "{}", stderr(&o));
}

#[test]
fn commands_without_inputs_are_usage_errors() {
    for cmd in [&["validate"][..], &["compile"], &["simulate", "--from", "a/b", "--to", "x.example:443/tcp"]] {
        let o = ces(cmd);
        assert_eq!(o.status.code(), Some(2), "{cmd:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("give --manifests PATH... (or --example)"), "{cmd:?}: {}", stderr(&o));
    }
}

#[test]
fn the_nft_table_holds_dns_answers_as_the_hook_says() {
    let dir = std::env::temp_dir().join(format!("ces-cli-nft-{}", std::process::id()));
    let table = |hook: &str| -> (String, String) {
        let out = dir.join(hook);
        let o = ces(&["compile", "--backend", "nft", "--example", "--dns-hook", hook, "--out", out.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        (std::fs::read_to_string(out.join("ruleset.nft")).unwrap(), stderr(&o))
    };
    let (native, warnings) = table("native");
    assert!(native.contains("ct direction reply queue num 53 bypass"), "{native}");
    assert!(native.contains("flags timeout"), "learned sets: {native}");
    assert!(!warnings.contains("host name"), "names are enforced: {warnings}");
    let (iptables, _) = table("iptables");
    assert!(!iptables.contains(" queue ") && iptables.contains("flags timeout"), "{iptables}");
    let (off, warnings) = table("off");
    assert!(!off.contains(" queue ") && !off.contains("flags timeout"), "{off}");
    assert!(warnings.contains("not enforced without the gateway agent: host name api.stripe.com"), "{warnings}");
    let o = ces(&["compile", "--backend", "nft", "--example", "--dns-hook", "sometimes", "--out", "/tmp"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Issue 20, finding 1, through the command line and both backends: namespace `evil` lists team-a's VM and a node's
/// address in its own Endpoints, under a higher-priority rule. validate says so; simulate decides the VM by no
/// rule of evil's; neither backend puts either address in any source list. With `endpointAddresses` the VM is
/// team-a's again.
#[test]
fn hostile_endpoints_claim_nothing_through_validate_simulate_and_both_backends() {
    let dir = std::env::temp_dir().join(format!("ces-hostile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("m")).unwrap();
    let mut y = String::new();
    for ns in ["team-a", "evil"] {
        y += &format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n");
        y += &format!(
            "---\napiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {{name: out, namespace: {ns}}}\nspec: {{addresses: [198.51.100.7]}}\n"
        );
    }
    y += "---\napiVersion: v1\nkind: Pod\nmetadata: {name: node-agent, namespace: kube-system}\nspec: {hostNetwork: true, containers: []}\nstatus: {phase: Running, podIPs: [{ip: 192.168.50.1}]}\n";
    y += "---\napiVersion: v1\nkind: Service\nmetadata: {name: vm, namespace: team-a}\n";
    y += "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: vm, namespace: team-a}\nsubsets: [{addresses: [{ip: 172.16.5.5}]}]\n";
    y += "---\napiVersion: kubeovn.io/v1alpha1\nkind: ServiceEgressRule\nmetadata: {name: vm-out, namespace: team-a}\nspec: {action: accept, priority: 50, service: vm, externalServices: [out]}\n";
    y += "---\napiVersion: v1\nkind: Service\nmetadata: {name: grab, namespace: evil}\n";
    y += "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: grab, namespace: evil}\nsubsets: [{addresses: [{ip: 172.16.5.5}, {ip: 192.168.50.1}]}]\n";
    y += "---\napiVersion: kubeovn.io/v1alpha1\nkind: ServiceEgressRule\nmetadata: {name: grab, namespace: evil}\nspec: {action: drop, priority: 1, service: grab, externalServices: [out]}\n";
    std::fs::write(dir.join("m/m.yaml"), y).unwrap();
    let conf = "clusterName: k8s\ntenant:\n  - {name: Common, namespaces: ''}\n";
    std::fs::write(dir.join("conf.yaml"), conf).unwrap();
    std::fs::write(dir.join("given.yaml"), format!("{conf}endpointAddresses:\n  team-a: [172.16.5.5]\n")).unwrap();
    let m = dir.join("m");
    let (m, c, g) = (m.to_str().unwrap(), dir.join("conf.yaml"), dir.join("given.yaml"));
    let (c, g) = (c.to_str().unwrap(), g.to_str().unwrap());

    let o = ces(&["validate", "--manifests", m, "--config", c]);
    let out = stdout(&o) + &stderr(&o);
    assert!(o.status.success(), "warnings only: {out}");
    for want in ["ServiceEgressRule/evil/grab", "ServiceEgressRule/team-a/vm-out", "ContestedEndpoint", "NodeAddress"] {
        assert!(out.contains(want), "{want} not in {out}");
    }
    let decided = |conf: &str| -> String {
        let o = ces(&[
            "simulate",
            "--manifests",
            m,
            "--config",
            conf,
            "--from",
            "172.16.5.5",
            "--to",
            "198.51.100.7:443/tcp",
            "--output",
            "json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        v["decidedBy"]["rule"].as_str().unwrap().to_string()
    };
    assert_eq!(decided(c), "Tenant/Common", "contested: a source of neither");
    assert_eq!(decided(g), "ServiceEgressRule/team-a/vm-out", "given to team-a by the config");

    let nft = dir.join("nft");
    let o = ces(&["compile", "--backend", "nft", "--manifests", m, "--config", c, "--out", nft.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ruleset = std::fs::read_to_string(nft.join("ruleset.nft")).unwrap();
    let as3 = dir.join("as3");
    let schema = as3_schema_dir();
    let o = ces(&[
        "compile",
        "--backend",
        "as3",
        "--manifests",
        m,
        "--config",
        c,
        "--as3-schema",
        schema.to_str().unwrap(),
        "--out",
        as3.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc = std::fs::read_to_string(as3.join("Common.json")).unwrap();
    for (what, text) in [("nft", &ruleset), ("as3", &doc)] {
        assert!(!text.contains("172.16.5.5"), "{what}: the contested VM is in a source list");
        assert!(!text.contains("192.168.50.1"), "{what}: the node's address is in a source list");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
