//! The real `ces controller --kubernetes` against the fake API server (ces-fake-apiserver) and the BIG-IP double:
//! objects created, edited and deleted in awkward orders, status as `kubectl` shows it, and faults (watches
//! dropped, 410 Gone, the API server restarted, a leader stopped). No real API server runs here; the README says
//! how to run the same binary against a kind cluster.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ces_bigip_double::Double;
use ces_fake_apiserver::FakeApiServer;
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn schema_dir() -> PathBuf {
    let dir = std::env::var_os("CES_AS3_SCHEMA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/as3-schema"));
    assert!(
        dir.join("as3-schema-3.29.0-3.json").exists(),
        "no AS3 schema in {} (set CES_AS3_SCHEMA_DIR)",
        dir.display()
    );
    dir
}

fn docs(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    text.split("\n---")
        .filter(|d| d.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')))
        .map(|d| serde_saphyr::from_str::<Value>(d.trim_start_matches('\n')).unwrap())
        .filter(|v| v.get("kind").is_some())
        .collect()
}

struct Env {
    dir: PathBuf,
    api: FakeApiServer,
    bigip: Double,
}

impl Env {
    fn new(name: &str) -> Env {
        let dir = std::env::temp_dir().join(format!("ces-kube-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("creds")).unwrap();
        std::fs::write(dir.join("creds/username"), "admin").unwrap();
        std::fs::write(dir.join("creds/password"), "admin").unwrap();
        std::fs::copy(root().join("examples/original/ces-conf.yaml"), dir.join("ces-conf.yaml")).unwrap();
        let api = FakeApiServer::start();
        api.write_kubeconfig(&dir.join("kubeconfig"));
        let bigip = Double::start(schema_dir());
        bigip.with(|s| {
            s.objects.insert("/mgmt/tm/net/route-domain/~project3~rd4".into(), json!({}));
        });
        Env { dir, api, bigip }
    }

    fn controller(&self, log: &str, extra: &[&str]) -> Controller {
        let log = self.dir.join(log);
        let child = Command::new(env!("CARGO_BIN_EXE_ces"))
            .args(["controller", "--kubernetes", "--kubeconfig"])
            .arg(self.dir.join("kubeconfig"))
            .arg("--config")
            .arg(self.dir.join("ces-conf.yaml"))
            .args(["--bigip-url", &self.bigip.url(), "--bigip-creds-dir"])
            .arg(self.dir.join("creds"))
            .arg("--as3-schema")
            .arg(schema_dir())
            .args(["--debounce-ms", "50", "--poll-ms", "20", "--resync-secs", "30", "--retry-max-secs", "1"])
            .args(extra)
            .env("CES_NAMESPACE", "kube-system")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Controller { child, log }
    }

    fn status(&self, kind: &str, ns: &str, name: &str) -> Value {
        self.api.with(|s| s.get(kind, ns, name).map(|o| o["status"].clone()).unwrap_or(Value::Null))
    }

    /// Waits for `cond`; panics with the logs after 20 s.
    fn wait(&self, what: &str, c: &[&Controller], mut cond: impl FnMut(&Env) -> bool) {
        let start = Instant::now();
        while !cond(self) {
            if start.elapsed() > Duration::from_secs(20) {
                let logs: Vec<String> = c.iter().map(|c| c.log()).collect();
                panic!("timed out waiting for {what}\n{}", logs.join("\n----\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn has_object(&self, tenant: &str, object: &str) -> bool {
        self.bigip.with(|s| s.tenants.get(tenant).is_some_and(|t| t["Shared"].get(object).is_some()))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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

fn condition<'a>(status: &'a Value, t: &str) -> &'a Value {
    status["conditions"].as_array().and_then(|cs| cs.iter().find(|c| c["type"] == t)).unwrap_or(&Value::Null)
}

#[test]
fn the_original_examples_are_programmed_and_their_status_says_so() {
    let env = Env::new("examples");
    for d in docs("examples/original-cluster.yaml").into_iter().chain(docs("examples/original/examples.yaml")) {
        env.api.apply(d);
    }
    let c = env.controller("c.log", &[]);
    env.wait("rule4 programmed", &[&c], |e| e.has_object("p2", "k8s_svc_default_rule4_ext_exsvc4_rule_list"));
    env.wait("rule4's status", &[&c], |e| {
        condition(&e.status("ServiceEgressRule", "default", "rule4"), "Programmed")["status"] == "True"
    });
    let s = env.status("ServiceEgressRule", "default", "rule4");
    assert_eq!(s["phase"], "Success");
    assert_eq!(condition(&s, "Accepted")["status"], "True");
    assert_eq!(condition(&s, "Accepted")["observedGeneration"], 1);
    assert!(env.has_object("Common", "k8s_global_rule1_ext_exsvc1_rule_list"));
    assert!(env.has_object("project3", "k8s_ns_project3_rule3_ext_exsvc3_rule_list"));
    // Status is written with server-side apply by the controller's field manager, and only when it changes.
    let writes =
        || env.api.with(|s| s.requests.iter().filter(|r| r.method == "PATCH" && r.path.ends_with("/status")).count());
    let applies = env.api.with(|s| {
        s.requests
            .iter()
            .filter(|r| r.method == "PATCH" && r.path.ends_with("/status"))
            .all(|r| r.query.contains("fieldManager=ces-controller") && r.query.contains("force=true"))
    });
    assert!(applies);
    let before = writes();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(writes(), before, "no status write without a change:\n{}", c.log());
}
