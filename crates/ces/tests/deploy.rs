//! The install manifests (deploy/base, a kustomize base) and the Helm chart (charts/ces): generated CRDs identical to
//! `ces crds`, least-privilege RBAC, and every flag they pass known to the binary. kubectl renders the kustomize
//! base (it is on the machine); helm cannot be installed here, so the chart's templates are not rendered: its
//! Chart.yaml, its values against values.schema.json, and its CRDs are checked.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn ces(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_ces")).args(args).output().unwrap();
    assert!(o.status.success(), "ces {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn yaml_docs(text: &str) -> Vec<Value> {
    text.split("\n---\n")
        .filter(|d| d.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#') && l.trim() != "---"))
        .map(|d| serde_saphyr::from_str::<Value>(d).unwrap_or_else(|e| panic!("{e}\n{d}")))
        .collect()
}

#[test]
fn the_crds_of_the_install_and_the_chart_are_ces_crds() {
    let crds = ces(&["crds"]);
    for f in ["deploy/base/crds.yaml", "charts/ces/crds/crds.yaml"] {
        let text = std::fs::read_to_string(root().join(f)).unwrap();
        assert!(text == crds, "{f} differs from `ces crds`: regenerate it with `ces crds > {f}`");
    }
}

fn kustomize() -> Vec<Value> {
    let o = Command::new("kubectl")
        .args(["kustomize"])
        .arg(root().join("deploy/base"))
        .output()
        .expect("kubectl is needed to render deploy/base (it is installed on this machine as /usr/bin/kubectl)");
    assert!(o.status.success(), "kubectl kustomize: {}", String::from_utf8_lossy(&o.stderr));
    yaml_docs(&String::from_utf8(o.stdout).unwrap())
}

#[test]
fn the_kustomize_base_renders_the_whole_install_in_its_namespace() {
    let docs = kustomize();
    let mut kinds: Vec<String> = docs
        .iter()
        .map(|d| format!("{}/{}", d["kind"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap()))
        .collect();
    kinds.sort();
    for want in [
        "ConfigMap/ces-conf",
        "Deployment/ces-controller",
        "DaemonSet/ces-gateway",
        "Secret/bigip-credentials",
        "ServiceAccount/ces-controller",
        "ServiceAccount/ces-gateway",
        "Namespace/ces-system",
        "CustomResourceDefinition/clusteregressrules.kubeovn.io",
        "CustomResourceDefinition/externaliprules.bigip.io",
        "Role/ces-controller-leader-election",
    ] {
        assert!(kinds.iter().any(|k| k == want), "{want} missing from {kinds:?}");
    }
    for d in &docs {
        let kind = d["kind"].as_str().unwrap();
        let cluster_scoped =
            matches!(kind, "Namespace" | "CustomResourceDefinition" | "ClusterRole" | "ClusterRoleBinding");
        assert_eq!(d["metadata"]["namespace"].as_str().is_none(), cluster_scoped, "{kind} {}", d["metadata"]["name"]);
    }
}

#[test]
fn rbac_is_least_privilege() {
    for d in kustomize() {
        let kind = d["kind"].as_str().unwrap();
        if kind != "ClusterRole" && kind != "Role" {
            continue;
        }
        let name = d["metadata"]["name"].as_str().unwrap().to_string();
        for rule in d["rules"].as_array().unwrap() {
            for key in ["apiGroups", "resources", "verbs"] {
                for v in rule[key].as_array().unwrap() {
                    assert_ne!(v.as_str(), Some("*"), "{name}: no wildcards ({rule})");
                }
            }
            let resources: Vec<&str> =
                rule["resources"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
            let verbs: Vec<&str> = rule["verbs"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
            assert!(
                !resources.contains(&"secrets"),
                "{name}: CES never reads Secrets through the API (they are mounted)"
            );
            let writes =
                verbs.iter().any(|v| matches!(*v, "create" | "update" | "patch" | "delete" | "deletecollection"));
            if writes {
                let ok = resources.iter().all(|r| r.ends_with("/status") || *r == "events" || *r == "leases");
                assert!(ok, "{name} writes only status, events and its Lease: {rule}");
            }
            if resources.contains(&"leases") && verbs.iter().any(|v| matches!(*v, "get" | "update")) {
                assert_eq!(rule["resourceNames"], serde_json::json!(["ces-controller"]), "{name}: only its own Lease");
            }
            if verbs.contains(&"delete") {
                panic!("{name}: CES deletes nothing in the cluster");
            }
        }
    }
}

/// Every `--flag` the manifests pass to `ces <command>` is one the binary knows.
fn assert_flags_known(command: &str, args: &[Value], source: &str) {
    let help = ces(&[command, "--help"]);
    for a in args {
        let a = a.as_str().unwrap();
        if let Some(flag) = a.strip_prefix("--") {
            let name = flag.split('=').next().unwrap();
            assert!(help.contains(&format!("--{name}")), "{source}: `ces {command}` has no --{name}:\n{help}");
        }
    }
}

#[test]
fn every_flag_the_manifests_pass_is_known_to_the_binary() {
    for d in kustomize() {
        let kind = d["kind"].as_str().unwrap();
        if kind != "Deployment" && kind != "DaemonSet" {
            continue;
        }
        for c in d["spec"]["template"]["spec"]["containers"].as_array().unwrap() {
            let args = c["args"].as_array().unwrap();
            let command = args[0].as_str().unwrap();
            assert_flags_known(command, &args[1..], &format!("deploy/base {kind}"));
        }
    }
    // The chart's templates pass the same flags (read from the templates' text: helm is not installed here).
    for (file, command) in [("controller.yaml", "controller"), ("gateway.yaml", "gateway")] {
        let text = std::fs::read_to_string(root().join("charts/ces/templates").join(file)).unwrap();
        let args: Vec<Value> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- --"))
            .map(|f| Value::String(format!("--{}", f.split(['=', ' ']).next().unwrap())))
            .collect();
        assert!(args.len() >= 3, "{file}: {args:?}");
        assert_flags_known(command, &args, &format!("charts/ces/templates/{file}"));
    }
}

#[test]
fn the_chart_and_its_values_are_well_formed() {
    let chart: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(root().join("charts/ces/Chart.yaml")).unwrap()).unwrap();
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["name"], "ces");
    let version = chart["version"].as_str().unwrap();
    assert_eq!(version.split('.').count(), 3, "semver: {version}");
    assert_eq!(chart["appVersion"].as_str(), Some(env!("CARGO_PKG_VERSION")), "the chart installs this version");

    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("charts/ces/values.schema.json")).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let values: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(root().join("charts/ces/values.yaml")).unwrap()).unwrap();
    let errors: Vec<String> = validator.iter_errors(&values).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "values.yaml against values.schema.json: {errors:?}");
    // The default config is a valid ces-conf.yaml.
    ces_config::CesConfig::from_yaml(values["config"].as_str().unwrap(), "values.yaml config").unwrap();
    let conf_map = kustomize().into_iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    ces_config::CesConfig::from_yaml(conf_map["data"]["ces-conf.yaml"].as_str().unwrap(), "deploy/base").unwrap();

    // The schema refuses what would break: two replicas without leader election, a typo.
    let mut two = values.clone();
    two["controller"]["leaderElect"] = Value::Bool(false);
    assert!(!validator.is_valid(&two), "two replicas need leader election");
    let mut typo = values.clone();
    typo["controller"]["replica"] = Value::from(3);
    assert!(!validator.is_valid(&typo), "unknown keys are refused");
}

/// A chart template read as YAML with its template actions blanked (helm cannot be installed here): control lines
/// (`{{- if }}`, `{{- end }}`) are dropped, so every branch is kept, and an action in a value becomes `{}` (an
/// include or toYaml) or a placeholder string.
fn blanked_template(file: &str) -> Value {
    let text = std::fs::read_to_string(root().join("charts/ces/templates").join(file)).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("{{") && t.ends_with("}}") {
            continue;
        }
        let mut l = line.to_string();
        while let (Some(a), Some(b)) = (l.find("{{"), l.find("}}")) {
            let action = &l[a..b + 2];
            let with = if action.contains("toYaml") || action.contains("include \"ces.labels\"") { "{}" } else { "x" };
            l = format!("{}{with}{}", &l[..a], &l[b + 2..]);
        }
        out.push_str(&l);
        out.push('\n');
    }
    serde_saphyr::from_str(&out).unwrap_or_else(|e| panic!("charts/ces/templates/{file}: {e}\n{out}"))
}

/// What every CES pod must have (issue 20): seccomp RuntimeDefault, a read-only root file system, no privilege
/// escalation, every capability dropped (the gateway adds NET_ADMIN alone), liveness and readiness probes, and every
/// path it writes on a volume (the dry run's on a bounded emptyDir).
fn assert_hardened(what: &str, pod: &Value, limits: &Value) {
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault", "{what}: seccomp");
    for c in pod["containers"].as_array().unwrap() {
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}: readOnlyRootFilesystem");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}: allowPrivilegeEscalation");
        assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]), "{what}: capabilities");
        let added = sc["capabilities"]["add"].as_array().cloned().unwrap_or_default();
        assert!(added.iter().all(|a| a == "NET_ADMIN"), "{what}: adds {added:?}");
        for p in ["livenessProbe", "readinessProbe"] {
            assert!(c[p]["httpGet"]["path"].is_string(), "{what}: {p}");
        }
        assert!(limits["ephemeral-storage"].is_string(), "{what}: an ephemeral-storage limit: {limits}");
        assert!(limits["memory"].is_string(), "{what}: a memory limit");
        // Every folder it is told to write to is a mounted volume.
        let mounts: Vec<&str> =
            c["volumeMounts"].as_array().unwrap().iter().filter_map(|m| m["mountPath"].as_str()).collect();
        for a in c["args"].as_array().unwrap().iter().filter_map(|a| a.as_str()) {
            if let Some(dir) = a.strip_prefix("--bigip-dry-run=").or_else(|| a.strip_prefix("--flow-store=")) {
                assert!(mounts.iter().any(|m| dir.starts_with(m)), "{what}: {dir} is not on a volume: {mounts:?}");
            }
        }
        if c["args"][0] == "gateway" {
            assert!(mounts.contains(&"/var/lib/ces/flows"), "{what}: the flow store's default folder is a volume");
        }
    }
    for v in pod["volumes"].as_array().unwrap() {
        if v["emptyDir"].is_object() {
            assert!(v["emptyDir"]["sizeLimit"].is_string(), "{what}: emptyDir {} unbounded", v["name"]);
        }
    }
}

#[test]
fn every_pod_of_the_install_and_the_chart_is_hardened() {
    let mut seen = 0;
    for d in kustomize() {
        if matches!(d["kind"].as_str(), Some("Deployment" | "DaemonSet")) {
            let pod = &d["spec"]["template"]["spec"];
            let limits = &pod["containers"][0]["resources"]["limits"];
            assert_hardened(&format!("deploy/base {}", d["metadata"]["name"]), pod, limits);
            seen += 1;
        }
    }
    assert_eq!(seen, 2);
    let values: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(root().join("charts/ces/values.yaml")).unwrap()).unwrap();
    for (file, key) in [("controller.yaml", "controller"), ("gateway.yaml", "gateway")] {
        let t = blanked_template(file);
        assert_hardened(
            &format!("charts/ces/templates/{file}"),
            &t["spec"]["template"]["spec"],
            &values[key]["resources"]["limits"],
        );
    }
    // The controller's health port is admitted from labelled namespaces only, in both.
    let np = blanked_template("networkpolicy.yaml");
    let rendered: Vec<Value> = kustomize().into_iter().filter(|d| d["kind"] == "NetworkPolicy").collect();
    assert_eq!(rendered.len(), 1);
    for p in [&np, &rendered[0]] {
        assert_eq!(p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"], "ces-controller");
        assert_eq!(p["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
        assert_eq!(p["spec"]["ingress"][0]["ports"], serde_json::json!([{"port": 8080, "protocol": "TCP"}]));
        assert!(p["spec"]["ingress"][0]["from"][0]["namespaceSelector"].is_object());
    }
}
