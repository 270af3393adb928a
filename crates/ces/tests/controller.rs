//! Fault tests of the real `ces controller` binary against the BIG-IP double (ces-bigip-double): the device down
//! and back, 503 storms, tokens expiring mid-sync, one tenant refused, two controllers racing, the controller killed
//! mid-sync. In every case the device ends holding exactly the declarations rendered from the final inputs, and no
//! declaration the schema refuses was ever sent.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ces_bigip_double::Double;
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn schema_dir() -> PathBuf {
    ces_bigip_double::schema_dir()
}

/// A folder with the original's examples, its config, the cluster they assume, credentials, and the endpoints of
/// default/mysql-service in a file of their own (the churn).
struct World {
    dir: PathBuf,
}

impl World {
    fn new(name: &str) -> World {
        let dir = std::env::temp_dir().join(format!("ces-controller-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        std::fs::create_dir_all(dir.join("creds")).unwrap();
        let r = root();
        std::fs::copy(r.join("examples/original/examples.yaml"), dir.join("manifests/examples.yaml")).unwrap();
        std::fs::copy(r.join("examples/original/ces-conf.yaml"), dir.join("ces-conf.yaml")).unwrap();
        // The assumed cluster without the Endpoints of mysql-service: those are written by `endpoints`.
        let cluster = std::fs::read_to_string(r.join("examples/original-cluster.yaml")).unwrap();
        let docs: Vec<&str> = cluster
            .split("\n---\n")
            .filter(|d| !(d.contains("kind: Endpoints") && d.contains("mysql-service")))
            .collect();
        std::fs::write(dir.join("manifests/cluster.yaml"), docs.join("\n---\n")).unwrap();
        std::fs::write(dir.join("creds/username"), "admin\n").unwrap();
        std::fs::write(dir.join("creds/password"), "admin\n").unwrap();
        let w = World { dir };
        w.endpoints(&["10.16.0.11", "10.16.0.12"]);
        w
    }

    /// Replaces the endpoints of default/mysql-service (atomically, as a watch event would).
    fn endpoints(&self, ips: &[&str]) {
        let addrs: Vec<String> = ips.iter().map(|ip| format!("{{ip: {ip}}}")).collect();
        let text = format!(
            "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: mysql-service, namespace: default}}\nsubsets:\n  - addresses: [{}]\n",
            addrs.join(", ")
        );
        let tmp = self.dir.join("endpoints.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.join("manifests/endpoints.yaml")).unwrap();
    }

    /// What the device must hold for the current files: each tenant's declaration, rendered in-process.
    fn desired(&self) -> std::collections::BTreeMap<String, Value> {
        let (snap, _) = ces_snapshot::manifests::load_paths(&[self.dir.join("manifests")]).unwrap();
        let config = ces_config::CesConfig::from_file(&self.dir.join("ces-conf.yaml")).unwrap();
        let model = ces_compiler::compile(&snap, &config, "kube-system");
        ces_as3::render(&model, jiff::Timestamp::now()).declarations()
    }

    fn controller(&self, d: &Double, log: &str) -> Controller {
        let log = self.dir.join(log);
        let child = Command::new(env!("CARGO_BIN_EXE_ces"))
            .arg("controller")
            .arg("--manifests")
            .arg(self.dir.join("manifests"))
            .arg("--config")
            .arg(self.dir.join("ces-conf.yaml"))
            .args(["--bigip-url", &d.url()])
            .arg("--bigip-creds-dir")
            .arg(self.dir.join("creds"))
            .arg("--as3-schema")
            .arg(schema_dir())
            .args(["--debounce-ms", "50", "--poll-ms", "20", "--resync-secs", "2", "--retry-max-secs", "1"])
            .args(["--bigip-attempts", "3", "--bigip-timeout-secs", "5"])
            .env_remove("CES_NAMESPACE")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Controller { child, log }
    }
}

impl Drop for World {
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

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

fn double() -> Double {
    let d = Double::start(schema_dir());
    d.with(|s| {
        s.objects.insert("/mgmt/tm/net/route-domain/~project3~rd4".into(), json!({"name": "rd4", "id": 4}));
    });
    d
}

/// Waits until the device holds `want` (and every binding is made); panics with the controller's log if not.
fn converge(d: &Double, w: &World, c: &[&Controller]) {
    let want = w.desired();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let ok = d.with(|s| {
            s.tenants == want
                && s.objects.get("/mgmt/tm/security/firewall/global-rules").and_then(|g| g.get("enforcedPolicy"))
                    == Some(&json!("/Common/Shared/k8s_system_global_policy"))
        });
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let have = d.with(|s| s.tenants.clone());
    let logs: Vec<String> = c.iter().map(|c| c.log()).collect();
    panic!(
        "the device did not converge in 30 s\nwant {}\nhave {}\nlogs:\n{}",
        serde_json::to_string(&want).unwrap(),
        serde_json::to_string(&have).unwrap(),
        logs.join("\n----\n")
    );
}

/// Every declaration that reached the device was valid under the schema (the double refuses invalid ones with
/// "declaration is invalid"; none may have been sent).
fn assert_nothing_invalid_was_sent(d: &Double) {
    let schema = ces_as3::Schema::load(&schema_dir(), "3.29.0").unwrap();
    d.with(|s| {
        for r in &s.requests {
            if r.method == "POST" && r.path.starts_with("/mgmt/shared/appsvcs/declare/") {
                schema.validate(r.body.as_ref().unwrap()).unwrap_or_else(|e| panic!("invalid POST {}: {e:?}", r.path));
            }
            assert!(
                !(r.status == 422 && r.path.contains("appsvcs") && r.method == "PATCH"),
                "a PATCH was refused: {r:?}"
            );
        }
    });
}

#[test]
fn a_device_that_is_down_delays_updates_and_loses_none() {
    let w = World::new("down");
    let mut d = double();
    d.pause();
    let c = w.controller(&d, "c.log");
    std::thread::sleep(Duration::from_millis(800));
    // Changes while the device is down.
    w.endpoints(&["10.16.0.11", "10.16.0.13"]);
    std::thread::sleep(Duration::from_millis(300));
    w.endpoints(&["10.16.0.11", "10.16.0.13", "10.16.0.14"]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(c.log().contains("unreachable"), "the controller says the device is unreachable:\n{}", c.log());
    d.resume();
    converge(&d, &w, &[&c]);
    // And it goes on after the outage: one more change, one PATCH.
    let before = d.with(|s| s.writes().len());
    w.endpoints(&["10.16.0.15"]);
    converge(&d, &w, &[&c]);
    let after = d.with(|s| s.writes());
    assert_eq!(after[before..], ["PATCH /mgmt/shared/appsvcs/declare".to_string()], "{}", c.log());
    assert_nothing_invalid_was_sent(&d);
}

#[test]
fn a_503_storm_is_ridden_out() {
    let w = World::new("storm");
    let d = double();
    let c = w.controller(&d, "c.log");
    converge(&d, &w, &[&c]);
    d.with(|s| s.busy = 12);
    for (i, ips) in
        [["10.16.0.21", "10.16.0.22"], ["10.16.0.23", "10.16.0.24"], ["10.16.0.25", "10.16.0.26"]].iter().enumerate()
    {
        w.endpoints(ips);
        std::thread::sleep(Duration::from_millis(100 + 50 * i as u64));
    }
    converge(&d, &w, &[&c]);
    assert_eq!(d.with(|s| s.busy), 0, "the storm was met");
    assert!(d.with(|s| s.requests.iter().filter(|r| r.status == 503).count()) == 12);
    assert_nothing_invalid_was_sent(&d);
}

#[test]
fn tokens_expiring_mid_sync_are_renewed() {
    let w = World::new("token");
    let d = double();
    d.with(|s| s.token_lifetime = Duration::from_millis(300));
    let c = w.controller(&d, "c.log");
    converge(&d, &w, &[&c]);
    for ips in [["10.16.0.31"], ["10.16.0.32"], ["10.16.0.33"]] {
        std::thread::sleep(Duration::from_millis(400));
        w.endpoints(&ips);
    }
    converge(&d, &w, &[&c]);
    let (logins, expired) = d.with(|s| {
        (
            s.requests.iter().filter(|r| r.path == "/mgmt/shared/authn/login").count(),
            s.requests.iter().filter(|r| r.status == 401).count(),
        )
    });
    assert!(logins >= 3 && expired >= 1, "{logins} logins, {expired} requests with an expired token");
    assert!(!c.log().contains("admin\n") && !c.log().contains("password"), "no credentials in the log");
    assert_nothing_invalid_was_sent(&d);
}

#[test]
fn a_tenant_the_device_refuses_fails_alone_and_recovers() {
    let w = World::new("refuse");
    let d = double();
    d.with(|s| s.refuse.insert("p2".into(), "01070734:3: Configuration error: invalid route domain".into()));
    let c = w.controller(&d, "c.log");
    let want = w.desired();
    let start = Instant::now();
    while d.with(|s| s.tenants.get("project3") != want.get("project3") || s.tenants.get("Common") != want.get("Common"))
    {
        assert!(start.elapsed() < Duration::from_secs(20), "the other tenants were not declared:\n{}", c.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.with(|s| !s.tenants.contains_key("p2")));
    let log = c.log();
    assert!(log.contains("p2: FAILED") && log.contains("ServiceEgressRule/default/rule4"), "{log}");
    d.with(|s| s.refuse.clear());
    converge(&d, &w, &[&c]);
    assert_nothing_invalid_was_sent(&d);
}

#[test]
fn two_controllers_racing_on_one_tenant_lose_no_update() {
    let w = World::new("race");
    let d = double();
    let a = w.controller(&d, "a.log");
    let b = w.controller(&d, "b.log");
    for i in 0..8 {
        w.endpoints(&[&format!("10.16.0.{}", 40 + i), "10.16.0.11"]);
        std::thread::sleep(Duration::from_millis(60));
    }
    converge(&d, &w, &[&a, &b]);
    // Let both run a resync and check nothing flaps afterwards.
    std::thread::sleep(Duration::from_millis(2500));
    converge(&d, &w, &[&a, &b]);
    assert_nothing_invalid_was_sent(&d);
}

#[test]
fn a_controller_killed_mid_sync_and_restarted_converges() {
    let w = World::new("kill");
    let d = double();
    // Every declaration takes 600 ms and is answered with a task: the kill lands while one is in flight.
    d.with(|s| {
        s.processing = Duration::from_millis(600);
        s.sync_limit = Duration::ZERO;
    });
    let mut c = w.controller(&d, "c1.log");
    let start = Instant::now();
    while d.with(|s| !s.requests.iter().any(|r| r.method == "POST" && r.path.contains("declare/"))) {
        assert!(start.elapsed() < Duration::from_secs(20), "no POST:\n{}", c.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    c.kill();
    w.endpoints(&["10.16.0.61", "10.16.0.62"]);
    let c2 = w.controller(&d, "c2.log");
    converge(&d, &w, &[&c2]);
    assert_nothing_invalid_was_sent(&d);
}
