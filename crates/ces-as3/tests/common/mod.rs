//! Shared by the ces-as3 tests: the original's examples compiled, and the official schema.

#![allow(dead_code)]

use std::path::PathBuf;

use ces_as3::Schema;
use ces_config::CesConfig;
use ces_model::PolicyModel;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The folder of the official AS3 schema files: `CES_AS3_SCHEMA_DIR` (scripts/test.sh finds and sets it), else
/// `../shared/as3-schema` beside the repository. Missing schemas fail the test: validation is never skipped.
pub fn schema_dir() -> PathBuf {
    ces_bigip_double::schema_dir()
}

/// The worked example's AS3 documents (`ces-as3-examples.json`), beside the schema folder in `../shared/reference`.
pub fn reference_examples() -> PathBuf {
    let p = schema_dir().join("../reference/ces-as3-examples.json");
    assert!(p.exists(), "{} is missing: the worked example cannot be compared", p.display());
    p
}

pub fn schema(version: &str) -> Schema {
    Schema::load(&schema_dir(), version).unwrap()
}

/// The original's examples.yaml + ces-conf.yaml, with the cluster they assume.
pub fn original_model() -> PolicyModel {
    let r = repo();
    let (snap, _) = ces_snapshot::manifests::load_paths(&[
        r.join("examples/original/examples.yaml"),
        r.join("examples/original-cluster.yaml"),
    ])
    .unwrap();
    let config = CesConfig::from_file(&r.join("examples/original/ces-conf.yaml")).unwrap();
    ces_compiler::compile(&snap, &config, "kube-system")
}

pub fn compile(manifests: &str, config: &str) -> PolicyModel {
    let snap = ces_snapshot::manifests::load_str(manifests, "test.yaml");
    let config = CesConfig::from_yaml(config, "ces-conf.yaml").unwrap();
    ces_compiler::compile(&snap, &config, "kube-system")
}

/// `doc` without the remarks that mark objects (and NAT rules) as a cluster's (`CES cluster <name>`); the tenant's
/// own remark stays.
pub fn without_cluster_remarks(doc: &serde_json::Value) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value, depth: usize) {
        match v {
            serde_json::Value::Object(o) => {
                let cluster = o.get("remark").and_then(|r| r.as_str()).is_some_and(|r| r.starts_with("CES cluster "));
                if cluster && depth > 3 {
                    o.remove("remark");
                }
                for x in o.values_mut() {
                    strip(x, depth + 1);
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|x| strip(x, depth + 1)),
            _ => {}
        }
    }
    let mut d = doc.clone();
    strip(&mut d, 0);
    d
}

/// The backend against the BIG-IP double at `url`, validating with the schema files in `schema_dir`, retrying fast.
pub fn backend_at(url: &str, schema_dir: PathBuf) -> ces_as3::As3Backend {
    use ces_as3::client::{Client, Credentials, Http};
    let http = Http::new(url, None, false, std::time::Duration::from_secs(10)).unwrap();
    let mut c = Client::new(Box::new(http), Some(Credentials::new("admin", "admin")));
    c.retry.backoff_min = std::time::Duration::from_millis(10);
    c.retry.backoff_max = std::time::Duration::from_millis(50);
    c.retry.task_poll = std::time::Duration::from_millis(20);
    ces_as3::As3Backend::new(c, Some(schema_dir)).unwrap()
}
