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
    ces_bigip_double::schema_dir()
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
        for crd in ces_api::all_crds() {
            api.install_crd(&serde_json::to_value(crd).unwrap());
        }
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
    // The API server records the controller as the owner of the status fields it writes, and of nothing else.
    let owned: Vec<(String, String, Vec<String>)> = env.api.with(|s| {
        let o = s.get("ServiceEgressRule", "default", "rule4").unwrap();
        o["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let fields =
                    e["fieldsV1"]["f:status"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
                (
                    e["manager"].as_str().unwrap_or("").to_string(),
                    e["subresource"].as_str().unwrap_or("").to_string(),
                    fields,
                )
            })
            .collect()
    });
    assert_eq!(owned.len(), 1, "{owned:?}");
    let (manager, subresource, fields) = &owned[0];
    assert_eq!((manager.as_str(), subresource.as_str()), ("ces-controller", "status"));
    for f in ["f:phase", "f:conditions", "f:scope"] {
        assert!(fields.iter().any(|x| x == f), "{f} in {fields:?}");
    }
    let before = writes();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(writes(), before, "no status write without a change:\n{}", c.log());
}

fn exsvc(name: &str, ns: &str, address: &str) -> Value {
    json!({"apiVersion": "kubeovn.io/v1alpha1", "kind": "ExternalService", "metadata": {"name": name, "namespace": ns},
           "spec": {"addresses": [address], "ports": [{"name": "https", "protocol": "TCP", "port": "443"}]}})
}

fn ns_rule(name: &str, ns: &str, exsvcs: &[&str]) -> Value {
    json!({"apiVersion": "kubeovn.io/v1alpha1", "kind": "NamespaceEgressRule", "metadata": {"name": name, "namespace": ns},
           "spec": {"action": "accept", "externalServices": exsvcs}})
}

fn base(env: &Env) {
    for d in docs("examples/original-cluster.yaml") {
        env.api.apply(d);
    }
}

const LIST: &str = "k8s_ns_project3_web_ext_api_rule_list";
const ADDR: &str = "k8s_ns_project3_web_ext_api_address";

#[test]
fn any_order_converges_and_a_failure_is_a_condition_with_a_useful_message() {
    let env = Env::new("order");
    base(&env);
    let c = env.controller("c.log", &[]);
    // The rule first, its ExternalService later (the original never noticed it).
    env.api.apply(ns_rule("web", "project3", &["api"]));
    env.wait("the rule refused", &[&c], |e| {
        condition(&e.status("NamespaceEgressRule", "project3", "web"), "Accepted")["status"] == "False"
    });
    let s = env.status("NamespaceEgressRule", "project3", "web");
    assert_eq!(s["phase"], "Failed");
    assert_eq!(condition(&s, "Accepted")["reason"], "ExternalServiceNotFound");
    assert!(
        condition(&s, "Accepted")["message"].as_str().unwrap().contains("ExternalService project3/api not found"),
        "{s}"
    );
    assert_eq!(condition(&s, "Programmed")["status"], "False");
    assert!(!env.has_object("project3", LIST));
    let events = |e: &Env, reason: &str| {
        e.api.with(|s| {
            s.list("Event")
                .iter()
                .filter(|ev| ev["regarding"]["name"] == "web" && ev["reason"] == reason)
                .map(|ev| ev["note"].as_str().unwrap_or("").to_string())
                .collect::<Vec<_>>()
        })
    };
    env.wait("a Warning event", &[&c], |e| !events(e, "InvalidReference").is_empty());
    assert!(events(&env, "InvalidReference")[0].contains("ExternalService project3/api not found"));

    env.api.apply(exsvc("api", "project3", "198.51.100.10"));
    env.wait("the rule programmed", &[&c], |e| e.has_object("project3", LIST));
    env.wait("the rule accepted", &[&c], |e| {
        condition(&e.status("NamespaceEgressRule", "project3", "web"), "Programmed")["status"] == "True"
    });
    env.wait("a Synced event", &[&c], |e| !events(e, "Synced").is_empty());
    assert_eq!(events(&env, "InvalidReference").len(), 1, "one event per change, not per pass");
    let es = env.status("ExternalService", "project3", "api");
    assert_eq!(es["phase"], "Success", "ExternalServices report status too: {es}");

    // The ExternalService edited while the rule uses it.
    env.api.apply(exsvc("api", "project3", "198.51.100.20"));
    env.wait("the new address on the BIG-IP", &[&c], |e| {
        e.bigip.with(|s| s.tenants["project3"]["Shared"][ADDR]["addresses"] == json!(["198.51.100.20"]))
    });

    // The rule edited: its generation is observed.
    let mut r = ns_rule("web", "project3", &["api"]);
    r["spec"]["logging"] = json!(true);
    env.api.apply(r);
    env.wait("generation 2 observed", &[&c], |e| {
        condition(&e.status("NamespaceEgressRule", "project3", "web"), "Accepted")["observedGeneration"] == 2
    });

    // Its ExternalService deleted while the rule uses it: the rule is refused (there is nothing left to allow) and
    // leaves the BIG-IP; the ExternalService back, the rule is back.
    env.api.delete("ExternalService", "project3", "api");
    env.wait("refused without its ExternalService", &[&c], |e| {
        condition(&e.status("NamespaceEgressRule", "project3", "web"), "Accepted")["reason"]
            == "ExternalServiceNotFound"
    });
    env.wait("off the BIG-IP", &[&c], |e| !e.has_object("project3", LIST));
    env.api.apply(exsvc("api", "project3", "198.51.100.20"));
    env.wait("back on the BIG-IP", &[&c], |e| e.has_object("project3", LIST));

    // The rule deleted: its objects leave the BIG-IP.
    env.api.delete("NamespaceEgressRule", "project3", "web");
    env.wait("the rule's objects removed", &[&c], |e| !e.has_object("project3", LIST));

    // A Service whose selector changes moves the sources of its rule.
    env.api.apply(json!({"apiVersion": "kubeovn.io/v1alpha1", "kind": "ExternalService", "metadata": {"name": "db", "namespace": "default"}, "spec": {"addresses": ["203.0.113.5"]}}));
    env.api.apply(json!({"apiVersion": "kubeovn.io/v1alpha1", "kind": "ServiceEgressRule", "metadata": {"name": "sel", "namespace": "default"},
        "spec": {"action": "accept", "service": "picked", "externalServices": ["db"]}}));
    env.api.apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "picked", "namespace": "default"}, "spec": {"selector": {"app": "web"}}}));
    let src = "k8s_svc_default_sel_ep_picked_src_address";
    env.wait("the web pod as source", &[&c], |e| {
        e.bigip.with(|s| s.tenants.get("p2").is_some_and(|t| t["Shared"][src]["addresses"] == json!(["10.16.0.20%2"])))
    });
    env.api.apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "picked", "namespace": "default"}, "spec": {"selector": {"app": "mysql"}}}));
    env.wait("the mysql pods as sources", &[&c], |e| {
        e.bigip.with(|s| s.tenants["p2"]["Shared"][src]["addresses"] == json!(["10.16.0.11%2", "10.16.0.12%2"]))
    });
    // A pod's new address (its status) reaches the BIG-IP.
    env.api.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "mysql-1", "namespace": "default", "labels": {"app": "mysql"}},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}], "podIPs": [{"ip": "10.16.0.13"}]}}));
    env.wait("the moved pod's new address", &[&c], |e| {
        e.bigip.with(|s| s.tenants["p2"]["Shared"][src]["addresses"] == json!(["10.16.0.11%2", "10.16.0.13%2"]))
    });

    // A namespace that goes away takes its pods' addresses with it.
    env.api.apply(ns_rule("web", "project3", &["api"]));
    env.wait("programmed again", &[&c], |e| e.has_object("project3", LIST));
    env.api.delete("NamespaceEgressRule", "project3", "web");
    env.api.delete("ExternalService", "project3", "api");
    env.api.delete("Pod", "project3", "app-1");
    env.api.delete("Namespace", "", "project3");
    env.wait("nothing of project3 left", &[&c], |e| !e.has_object("project3", LIST) && !e.has_object("project3", ADDR));
}

#[test]
fn dropped_watches_410_gone_and_an_api_server_restart_lose_nothing() {
    let mut env = Env::new("faults");
    base(&env);
    env.api.apply(exsvc("api", "project3", "198.51.100.10"));
    env.api.apply(ns_rule("web", "project3", &["api"]));
    let c = env.controller("c.log", &[]);
    env.wait("programmed", &[&c], |e| e.has_object("project3", LIST));

    // A dropped watch: the next change still arrives.
    env.api.drop_watches();
    env.api.apply(exsvc("api", "project3", "198.51.100.11"));
    env.wait("after a dropped watch", &[&c], |e| {
        e.bigip.with(|s| s.tenants["project3"]["Shared"][ADDR]["addresses"] == json!(["198.51.100.11"]))
    });

    // History compacted and watches dropped: the re-watch gets 410 Gone and the controller lists again; a change made
    // meanwhile, and a deletion, are both seen.
    let lists =
        |e: &Env| e.api.with(|s| s.requests.iter().filter(|r| r.method == "GET" && !r.query.contains("watch")).count());
    let lists_before = lists(&env);
    env.api.compact();
    env.api.drop_watches();
    env.api.apply(exsvc("api", "project3", "198.51.100.12"));
    env.wait("after 410 Gone", &[&c], |e| {
        e.bigip.with(|s| s.tenants["project3"]["Shared"][ADDR]["addresses"] == json!(["198.51.100.12"]))
    });

    // The API server goes away and comes back; what changed while it was away (from the API's side) arrives.
    env.api.stop();
    std::thread::sleep(Duration::from_millis(800));
    env.api.start_again();
    env.api.delete("NamespaceEgressRule", "project3", "web");
    env.wait("after a restart", &[&c], |e| !e.has_object("project3", LIST));
    assert!(env.api.with(|s| s.gone) >= 1, "a watch was answered 410 Gone");
    let relists = lists(&env) - lists_before;
    assert!(relists >= 1, "the controller listed again after 410 Gone ({relists} lists)\n{}", c.log());
}

#[test]
fn a_rule_that_turns_invalid_keeps_its_last_good_version_and_says_why() {
    let env = Env::new("lastgood");
    base(&env);
    env.api.apply(exsvc("api", "project3", "198.51.100.10"));
    env.api.apply(ns_rule("web", "project3", &["api"]));
    let c = env.controller("c.log", &[]);
    env.wait("programmed", &[&c], |e| e.has_object("project3", LIST));
    // An edit that breaks the rule: a reference to an ExternalService that does not exist.
    env.api.apply(ns_rule("web", "project3", &["api", "nope"]));
    env.wait("the rule refused", &[&c], |e| {
        condition(&e.status("NamespaceEgressRule", "project3", "web"), "Accepted")["status"] == "False"
    });
    let s = env.status("NamespaceEgressRule", "project3", "web");
    assert_eq!(condition(&s, "Accepted")["reason"], "ExternalServiceNotFound");
    assert_eq!(condition(&s, "Accepted")["observedGeneration"], 2);
    assert_eq!(condition(&s, "Programmed")["status"], "True", "{s}\n{}", c.log());
    assert_eq!(condition(&s, "Programmed")["reason"], "LastGoodVersionKept");
    assert!(condition(&s, "Programmed")["message"].as_str().unwrap().contains("generation 1"), "{s}");
    assert!(env.has_object("project3", LIST), "the last good version stays on the BIG-IP");
    // (The kept version is compiled with the current pods, Services and namespaces: only its spec is old.)
    // The rule fixed: the new version replaces the old.
    env.api.apply(exsvc("nope", "project3", "198.51.100.99"));
    env.wait("both ExternalServices programmed", &[&c], |e| {
        e.has_object("project3", "k8s_ns_project3_web_ext_nope_rule_list")
    });
    env.wait("accepted again", &[&c], |e| {
        condition(&e.status("NamespaceEgressRule", "project3", "web"), "Accepted")["status"] == "True"
    });
    // Deleted: gone from the BIG-IP, last good version or not.
    env.api.apply(ns_rule("web", "project3", &["missing-again"]));
    env.wait("refused again", &[&c], |e| {
        condition(&e.status("NamespaceEgressRule", "project3", "web"), "Accepted")["status"] == "False"
    });
    assert!(
        env.has_object("project3", "k8s_ns_project3_web_ext_nope_rule_list"),
        "the last good version is the fixed one"
    );
    env.api.delete("NamespaceEgressRule", "project3", "web");
    env.wait("removed", &[&c], |e| {
        !e.has_object("project3", LIST) && !e.has_object("project3", "k8s_ns_project3_web_ext_nope_rule_list")
    });
}

#[test]
fn two_replicas_elect_one_leader_and_the_standby_takes_over_when_it_stops() {
    let env = Env::new("leader");
    base(&env);
    env.api.apply(exsvc("api", "project3", "198.51.100.10"));
    env.api.apply(ns_rule("web", "project3", &["api"]));
    let lease = ["--leader-elect", "--lease-namespace", "ces-system", "--lease-duration-secs", "2"];
    let mut a = env.controller("a.log", &[&lease[..], &["--identity", "replica-a"]].concat());
    env.wait("a leads", &[&a], |e| e.api.with(|s| s.get("Lease", "ces-system", "ces-controller").is_some()));
    let b = env.controller("b.log", &[&lease[..], &["--identity", "replica-b"]].concat());
    env.wait("programmed", &[&a, &b], |e| e.has_object("project3", LIST));
    std::thread::sleep(Duration::from_secs(2));
    let holder = |e: &Env| {
        e.api.with(|s| s.get("Lease", "ces-system", "ces-controller").map(|l| l["spec"]["holderIdentity"].clone()))
    };
    assert_eq!(holder(&env), Some(json!("replica-a")));
    assert!(b.log().contains("standby: replica-a holds the lease"), "{}", b.log());
    assert!(!b.log().contains("change:"), "the standby applies nothing:\n{}", b.log());

    // The leader stops: the standby takes over within a few seconds and applies what changes.
    let stopped = Instant::now();
    let _ = a.child.kill();
    let _ = a.child.wait();
    env.wait("b leads", &[&b], |e| holder(e) == Some(json!("replica-b")));
    let took = stopped.elapsed();
    assert!(took < Duration::from_secs(8), "takeover took {took:?}");
    env.api.apply(exsvc("api", "project3", "198.51.100.77"));
    env.wait("b applies", &[&b], |e| {
        e.bigip.with(|s| s.tenants["project3"]["Shared"][ADDR]["addresses"] == json!(["198.51.100.77"]))
    });
    eprintln!("takeover after the leader stopped: {took:?}");
}

#[test]
fn kubectl_shows_the_printer_columns_and_the_status() {
    let env = Env::new("kubectl");
    for d in docs("examples/original-cluster.yaml").into_iter().chain(docs("examples/original/examples.yaml")) {
        env.api.apply(d);
    }
    env.api.apply(ns_rule("broken", "project3", &["nope"]));
    let c = env.controller("c.log", &[]);
    env.wait("statuses", &[&c], |e| {
        !e.status("ServiceEgressRule", "default", "rule4").is_null()
            && !e.status("NamespaceEgressRule", "project3", "broken").is_null()
    });
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(env.dir.join("kubeconfig"))
        .args(["get", "cgr,nsgr,svcgr,exsvc", "-A"])
        .output()
        .expect("kubectl is on this machine (/usr/bin/kubectl)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let path = root().join("crates/ces/tests/golden/kubectl-get.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let golden = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(text, golden, "kubectl get differs from {} (UPDATE_GOLDEN=1 to rewrite)", path.display());
    let describe = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(env.dir.join("kubeconfig"))
        .args(["get", "nsgr", "broken", "-n", "project3", "-o", "jsonpath={.status.conditions[0].message}"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&describe.stdout), "ExternalService project3/nope not found");
}

fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

#[test]
fn health_readiness_and_metrics_are_served() {
    let env = Env::new("health");
    base(&env);
    env.api.apply(exsvc("api", "project3", "198.51.100.10"));
    env.api.apply(ns_rule("web", "project3", &["api"]));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let c = env.controller("c.log", &["--health-addr", &addr, "--log-format", "json"]);
    env.wait("programmed", &[&c], |e| e.has_object("project3", LIST));
    env.wait("ready", &[&c], |_| http_get(port, "/readyz").0 == 200);
    assert_eq!(http_get(port, "/healthz"), (200, "ok\n".to_string()));
    let (code, metrics) = http_get(port, "/metrics");
    assert_eq!(code, 200);
    for m in [
        "ces_sync_passes_total{component=\"controller\",result=\"ok\"}",
        "ces_last_successful_sync_timestamp_seconds",
        "ces_backend_requests_total{backend=\"as3\"}",
        "ces_leader{component=\"controller\"} 1",
        "ces_backend_errors_total{backend=\"as3\",kind=\"busy\"} 0",
        "ces_watch_restarts_total{kind=\"Pod\"} 1",
        "ces_watched_objects{kind=\"NamespaceEgressRule\"} 1",
    ] {
        assert!(metrics.contains(m), "{m} missing:\n{metrics}");
    }
    let rules: u64 = metrics
        .lines()
        .find(|l| l.starts_with("ces_rules_programmed"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert_eq!(rules, 1, "one rule in the policy\n{metrics}");
    assert_eq!(http_get(port, "/nope").0, 404);
    // Structured logs: every line one JSON object; a pass says what it did and how long it took.
    let lines: Vec<Value> =
        c.log().lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert!(lines.iter().all(|l| l["ts"].is_string() && l["level"].is_string() && l["component"] == "controller"));
    let pass = lines.iter().find(|l| l["event"] == "applied").expect("a pass logged");
    assert!(pass["apply_ms"].is_number() && pass["summary"].as_str().unwrap().contains("project3"), "{pass}");
}

#[test]
fn a_leader_that_loses_its_lease_mid_pass_stops_and_the_next_one_converges() {
    let env = Env::new("leaderlost");
    base(&env);
    env.api.apply(exsvc("api", "project3", "198.51.100.10"));
    env.api.apply(ns_rule("web", "project3", &["api"]));
    // Every declaration takes 1.5 s and is answered with a task: a pass is in flight when the Lease goes.
    env.bigip.with(|s| {
        s.processing = Duration::from_millis(1500);
        s.sync_limit = Duration::ZERO;
    });
    let lease = ["--leader-elect", "--lease-namespace", "ces-system", "--lease-duration-secs", "2"];
    let holder = |e: &Env| {
        e.api.with(|s| s.get("Lease", "ces-system", "ces-controller").map(|l| l["spec"]["holderIdentity"].clone()))
    };
    let mut a = env.controller("a.log", &[&lease[..], &["--identity", "replica-a"]].concat());
    env.wait("a leads", &[&a], |e| holder(e) == Some(json!("replica-a")));
    let b = env.controller("b.log", &[&lease[..], &["--identity", "replica-b"]].concat());
    env.wait("a pass in flight", &[&a], |e| {
        e.bigip.with(|s| s.requests.iter().any(|r| r.method == "POST" && r.path.contains("/declare/")))
    });
    // Someone else holds the Lease now (as when this replica was cut off for longer than the Lease).
    let now = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    env.api.apply(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "ces-controller", "namespace": "ces-system"},
        "spec": {"holderIdentity": "intruder", "leaseDurationSeconds": 2, "acquireTime": now, "renewTime": now}}));
    let start = Instant::now();
    let code = loop {
        if let Some(status) = a.child.try_wait().unwrap() {
            break status.code();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "a did not stop:\n{}", a.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(3), "{}", a.log());
    assert!(a.log().contains("lost the lease to intruder"), "{}", a.log());
    // The intruder does not renew: b takes over once the Lease expires, and brings the BIG-IP in step.
    env.wait("b leads", &[&b], |e| holder(e) == Some(json!("replica-b")));
    env.wait("programmed by b", &[&b], |e| {
        e.has_object("project3", LIST)
            && condition(&e.status("NamespaceEgressRule", "project3", "web"), "Programmed")["status"] == "True"
    });
}
