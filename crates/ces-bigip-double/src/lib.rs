//! A BIG-IP double for tests: an HTTP server on loopback that answers like AS3 on a BIG-IP.
//!
//! What it does as a device does (ces-original.md §4.6; AS3 docs: http-methods, as3-api, authentication,
//! burst-handling):
//! - `GET …/appsvcs/info` with the AS3 version it runs (`State::as3_version`, 3.56.0 unless a test sets it);
//! - token authentication (`POST /mgmt/shared/authn/login`, `X-F5-Auth-Token`), tokens that expire, 401 after;
//! - declarations kept per tenant; `GET …/declare` (every tenant), `DELETE …/declare/<tenant>`;
//!   `GET …/declare/<tenant>` (204 when there is none; `?showHash=true` adds the
//!   tenant's `optimisticLockKey`); `POST …/declare/<tenant>` replaces the tenant, refused with 422 when the key
//!   does not match what is stored;
//! - every POST and PATCH validated against the official AS3 schema of the declared `schemaVersion`: an invalid one
//!   gets AS3's 422 with one error per violation, and nothing is stored;
//! - `?async=true`, and synchronous requests slower than the sync limit (45 s on a device), answered 202 with a task
//!   to poll at `GET …/appsvcs/task/<id>` ("in progress" until it ends);
//! - 503 "Configuration operation in progress on device" bursts;
//! - AS3 PATCH (RFC 6902 `add`, `replace`, `remove`), the global firewall rules and route domains over iControl
//!   REST, `POST /mgmt/tm/sys/config`;
//! - every request recorded (method, path, body, status), so tests can assert what was sent.
//!
//! It is not a BIG-IP: it does not deploy anything, check pointers between objects, or run AS3's own custom schema
//! keywords. The README says so.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ces_as3::Schema;
use serde_json::{Value, json};

/// One request as the double saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub body: Option<Value>,
    /// Bytes of the request body.
    pub bytes: usize,
    pub status: u16,
    /// Bytes of the response body.
    pub response_bytes: usize,
    /// When the request arrived.
    pub at: std::time::Instant,
}

struct Task {
    done_at: Instant,
    result: (u16, Value),
}

/// The device's state, shared by the server thread and the test.
pub struct State {
    pub username: String,
    pub password: String,
    /// How long a token lives.
    pub token_lifetime: Duration,
    tokens: HashMap<String, Instant>,
    token_count: u64,
    /// Tenant declarations, without lock keys.
    pub tenants: BTreeMap<String, Value>,
    /// The `schemaVersion` each tenant was last declared with (a PATCH is validated against it).
    versions: BTreeMap<String, String>,
    /// iControl objects by path: `/mgmt/tm/net/route-domain/~p2~rd2`, `/mgmt/tm/security/firewall/global-rules`.
    pub objects: BTreeMap<String, Value>,
    pub requests: Vec<Recorded>,
    /// Answer the next this-many AS3 requests with 503.
    pub busy: u32,
    /// The AS3 version the device runs (`GET /mgmt/shared/appsvcs/info`); declarations of a newer `schemaVersion`
    /// are refused, as AS3 refuses them.
    pub as3_version: String,
    /// Refuse declarations of these tenants with a device-side 422 (as a failed deployment is refused).
    pub refuse: BTreeMap<String, String>,
    /// How long a declaration takes to process, and the longest a synchronous request may run before AS3 answers
    /// 202 with a task instead.
    pub processing: Duration,
    pub sync_limit: Duration,
    tasks: HashMap<String, Task>,
    schema_dir: PathBuf,
    schemas: HashMap<String, Arc<Schema>>,
}

impl State {
    /// Lets every token expire now (as a token's lifetime ending mid-sync).
    pub fn expire_tokens(&mut self) {
        self.tokens.clear();
    }

    /// The requests that changed something (not GETs, not logins), as `METHOD path`.
    pub fn writes(&self) -> Vec<String> {
        self.requests
            .iter()
            .filter(|r| r.method != "GET" && !r.path.starts_with("/mgmt/shared/authn"))
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    }

    fn schema(&mut self, version: &str) -> Result<Arc<Schema>, String> {
        if let Some(s) = self.schemas.get(version) {
            return Ok(s.clone());
        }
        let s = Arc::new(Schema::load(&self.schema_dir, version)?);
        self.schemas.insert(version.to_string(), s.clone());
        Ok(s)
    }
}

/// The folder of F5's AS3 schema files for tests and benchmarks: `CES_AS3_SCHEMA_DIR` (scripts/test.sh finds and
/// sets it), else `../shared/as3-schema` beside the repository. A missing schema fails loudly: validation is never
/// skipped.
pub fn schema_dir() -> PathBuf {
    let dir = std::env::var_os("CES_AS3_SCHEMA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/as3-schema"));
    assert!(
        dir.join("as3-schema-3.29.0-3.json").exists(),
        "the official AS3 schema files are not in {} (set CES_AS3_SCHEMA_DIR)",
        dir.display()
    );
    dir
}

/// The optimistic lock key of a tenant: a hash of its declaration.
pub fn lock_key(tenant: &Value) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tenant.to_string().bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

pub struct Double {
    pub port: u16,
    pub state: Arc<Mutex<State>>,
    server: Option<Arc<tiny_http::Server>>,
    thread: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Double {
    /// A double on a free loopback port, with user `admin`/`admin`, validating against the schemas in `schema_dir`.
    pub fn start(schema_dir: PathBuf) -> Double {
        let state = State {
            username: "admin".into(),
            password: "admin".into(),
            token_lifetime: Duration::from_secs(1200),
            tokens: HashMap::new(),
            token_count: 0,
            tenants: BTreeMap::new(),
            versions: BTreeMap::new(),
            objects: BTreeMap::new(),
            requests: Vec::new(),
            busy: 0,
            as3_version: "3.56.0".into(),
            refuse: BTreeMap::new(),
            processing: Duration::ZERO,
            sync_limit: Duration::from_secs(45),
            tasks: HashMap::new(),
            schema_dir,
            schemas: HashMap::new(),
        };
        let mut d = Double {
            port: 0,
            state: Arc::new(Mutex::new(state)),
            server: None,
            thread: None,
            stop: Arc::new(AtomicBool::new(false)),
        };
        d.listen(0);
        d
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn listen(&mut self, port: u16) {
        let server = Arc::new(tiny_http::Server::http(("127.0.0.1", port)).expect("bind the double"));
        self.port = server.server_addr().to_ip().expect("ip listener").port();
        self.stop = Arc::new(AtomicBool::new(false));
        let (s, state, stop) = (server.clone(), self.state.clone(), self.stop.clone());
        self.thread = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match s.recv_timeout(Duration::from_millis(50)) {
                    Ok(Some(req)) => handle(&state, req),
                    Ok(None) => {}
                    Err(_) => break,
                }
            }
        }));
        self.server = Some(server);
    }

    /// The device goes away: connections are refused until [`Double::resume`].
    pub fn pause(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.server.take() {
            s.unblock();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// The device comes back on the same port, with the same state.
    pub fn resume(&mut self) {
        let port = self.port;
        self.listen(port);
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().expect("double state"))
    }
}

impl Drop for Double {
    fn drop(&mut self) {
        self.pause();
    }
}

fn handle(state: &Arc<Mutex<State>>, mut req: tiny_http::Request) {
    let method = req.method().as_str().to_string();
    let url = req.url().to_string();
    let token = req.headers().iter().find(|h| h.field.equiv("X-F5-Auth-Token")).map(|h| h.value.as_str().to_string());
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(req.as_reader(), &mut text);
    let body: Option<Value> = if text.trim().is_empty() { None } else { serde_json::from_str(&text).ok() };
    let answer = {
        let mut st = state.lock().expect("double state");
        let (status, answer) = respond(&mut st, &method, &url, token.as_deref(), &text, body.as_ref());
        let answer = if answer.is_null() { String::new() } else { answer.to_string() };
        st.requests.push(Recorded {
            method: method.clone(),
            path: url.clone(),
            body,
            bytes: text.len(),
            status,
            response_bytes: answer.len(),
            at: Instant::now(),
        });
        (status, answer)
    };
    let (status, text) = answer;
    let resp = tiny_http::Response::from_string(text)
        .with_status_code(status)
        .with_header(tiny_http::Header::from_bytes("Content-Type", "application/json").expect("header"));
    let _ = req.respond(resp);
}

fn error(code: u16, message: &str) -> (u16, Value) {
    (code, json!({"code": code, "message": message}))
}

fn respond(
    st: &mut State,
    method: &str,
    url: &str,
    token: Option<&str>,
    text: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let flag = |name: &str| query.split('&').any(|q| q == format!("{name}=true"));
    if method == "POST" && path == "/mgmt/shared/authn/login" {
        let ok = body.is_some_and(|b| {
            b["username"].as_str() == Some(st.username.as_str()) && b["password"].as_str() == Some(st.password.as_str())
        });
        if !ok {
            return error(401, "Authentication failed.");
        }
        st.token_count += 1;
        let t = format!("double-token-{}", st.token_count);
        st.tokens.insert(t.clone(), Instant::now() + st.token_lifetime);
        return (200, json!({"token": {"token": t, "timeout": st.token_lifetime.as_secs()}}));
    }
    match token.and_then(|t| st.tokens.get(t)) {
        Some(exp) if *exp > Instant::now() => {}
        Some(_) => return error(401, "X-F5-Auth-Token has expired."),
        None => return error(401, "X-F5-Auth-Token does not exist."),
    }
    if !text.trim().is_empty() && body.is_none() {
        return error(400, "body is not JSON");
    }
    let as3 = path.starts_with("/mgmt/shared/appsvcs/");
    if as3 && st.busy > 0 && !path.starts_with("/mgmt/shared/appsvcs/task/") {
        st.busy -= 1;
        return error(503, "Configuration operation in progress on device, please try again in 2 minutes");
    }
    if path == "/mgmt/shared/appsvcs/info" && method == "GET" {
        let v = st.as3_version.clone();
        let release = if v == "3.56.0" { "10" } else { "3" };
        return (200, json!({"version": v, "release": release, "schemaCurrent": v, "schemaMinimum": "3.0.0"}));
    }
    if let Some(tenant) = path.strip_prefix("/mgmt/shared/appsvcs/declare/") {
        return match method {
            "GET" => match st.tenants.get(tenant) {
                None => (204, Value::Null),
                Some(t) => {
                    let mut t = t.clone();
                    if flag("showHash") {
                        t["optimisticLockKey"] = json!(lock_key(&t));
                    }
                    let version = st.versions.get(tenant).cloned().unwrap_or_else(|| "3.29.0".into());
                    (200, json!({"class": "ADC", "id": "double", "schemaVersion": version, tenant: t}))
                }
            },
            "POST" => {
                let r = declare(st, tenant, body, flag("showHash"));
                if flag("async") || st.processing > st.sync_limit { task(st, r) } else { r }
            }
            "DELETE" => match st.tenants.remove(tenant) {
                None => error(404, &format!("no tenant {tenant}")),
                Some(_) => {
                    st.versions.remove(tenant);
                    (200, json!({"results": [{"code": 200, "message": "success", "tenant": tenant}]}))
                }
            },
            _ => error(405, "method not allowed"),
        };
    }
    if path == "/mgmt/shared/appsvcs/declare" && method == "GET" {
        // Every tenant's declaration, as AS3 answers it.
        let mut adc = json!({"class": "ADC", "id": "double", "schemaVersion": "3.29.0"});
        for (t, d) in &st.tenants {
            adc[t] = d.clone();
        }
        return (200, adc);
    }
    if path == "/mgmt/shared/appsvcs/declare" && method == "PATCH" {
        return patch(st, body);
    }
    if let Some(id) = path.strip_prefix("/mgmt/shared/appsvcs/task/") {
        return match st.tasks.get(id) {
            None => error(404, "task not found"),
            Some(t) if t.done_at > Instant::now() => {
                (200, json!({"id": id, "results": [{"code": 0, "message": "in progress"}]}))
            }
            Some(t) => {
                let (code, mut b) = t.result.clone();
                b["id"] = json!(id);
                if code >= 300 && b.get("results").is_none() {
                    let msg = b["message"].clone();
                    b["results"] = json!([{"code": code, "message": msg}]);
                }
                (200, b)
            }
        };
    }
    if path == "/mgmt/tm/sys/config" && method == "POST" {
        return (200, json!({"kind": "tm:sys:config:runstate", "command": "save"}));
    }
    if path == "/mgmt/tm/security/firewall/global-rules" || path.starts_with("/mgmt/tm/net/route-domain/") {
        if path == "/mgmt/tm/security/firewall/global-rules" {
            st.objects
                .entry(path.to_string())
                .or_insert_with(|| json!({"kind": "tm:security:firewall:global-rules:global-rulesstate"}));
        }
        let Some(obj) = st.objects.get_mut(path) else { return error(404, &format!("Object not found - {path}")) };
        return match (method, body) {
            ("GET", _) => (200, obj.clone()),
            ("PATCH", Some(Value::Object(b))) => {
                for (k, v) in b {
                    obj[k] = v.clone();
                }
                (200, obj.clone())
            }
            _ => error(400, "bad request"),
        };
    }
    error(404, &format!("URI path {path} not registered"))
}

/// Runs `result` as an AS3 task: 202 now, the result when the processing time has passed.
fn task(st: &mut State, result: (u16, Value)) -> (u16, Value) {
    let id = format!("task-{}", st.tasks.len() + 1);
    st.tasks.insert(id.clone(), Task { done_at: Instant::now() + st.processing, result });
    (202, json!({"id": id, "results": [{"code": 0, "message": "Declaration successfully submitted"}]}))
}

fn validate(st: &mut State, doc: &Value) -> Result<(), (u16, Value)> {
    let version = doc.pointer("/declaration/schemaVersion").and_then(Value::as_str).unwrap_or("").to_string();
    let key = ces_as3::facts::version_key;
    if key(&version) > key(&st.as3_version) {
        let runs = &st.as3_version;
        return Err(error(422, &format!("/declaration/schemaVersion: {version} is newer than this AS3 ({runs})")));
    }
    let schema = st.schema(&version).map_err(|e| error(422, &e))?;
    schema.validate(doc).map_err(|errors| {
        let list: Vec<String> = errors
            .iter()
            .map(|e| match (&e.tenant, &e.object) {
                (Some(t), Some(o)) => format!("/{t}/Shared/{o}{}: {}", e.path, e.message),
                _ => format!("{}: {}", e.path, e.message),
            })
            .collect();
        (422, json!({"code": 422, "message": "declaration is invalid", "errors": list}))
    })
}

fn declare(st: &mut State, tenant: &str, body: Option<&Value>, show_hash: bool) -> (u16, Value) {
    let Some(doc) = body else { return error(400, "no declaration") };
    if let Err(e) = validate(st, doc) {
        return e;
    }
    let Some(mut t) = doc.pointer(&format!("/declaration/{tenant}")).cloned() else {
        return (200, json!({"results": [{"code": 200, "message": "no change", "tenant": tenant}]}));
    };
    if let Some(key) = t.as_object_mut().and_then(|o| o.remove("optimisticLockKey")) {
        let current = st.tenants.get(tenant).map(lock_key);
        if current.as_deref().is_some_and(|c| Some(c) != key.as_str()) {
            return (
                422,
                json!({"code": 422, "message": "declaration failed", "results": [{"code": 422, "tenant": tenant,
                    "message": "declaration failed", "response": "The optimisticLockKey of the tenant does not match: it was changed since it was read"}]}),
            );
        }
    }
    if let Some(msg) = st.refuse.get(tenant) {
        return (
            422,
            json!({"code": 422, "message": "declaration failed", "results": [{"code": 422, "tenant": tenant, "message": "declaration failed", "response": msg}]}),
        );
    }
    let mut out = t.clone();
    st.tenants.insert(tenant.to_string(), t);
    if let Some(v) = doc.pointer("/declaration/schemaVersion").and_then(Value::as_str) {
        st.versions.insert(tenant.to_string(), v.to_string());
    }
    if show_hash {
        out["optimisticLockKey"] = json!(lock_key(&out));
    }
    (200, json!({"results": [{"code": 200, "message": "success", "tenant": tenant}], "declaration": {tenant: out}}))
}

fn patch(st: &mut State, body: Option<&Value>) -> (u16, Value) {
    let Some(ops) = body.and_then(Value::as_array) else {
        return error(422, "PATCH body must be an array of operations");
    };
    // The touched tenants, copied once each: the operations apply to the copies, which replace the tenants only
    // when every operation and the validation succeed.
    let mut tenants: BTreeMap<String, Value> = BTreeMap::new();
    let mut touched: Vec<String> = Vec::new();
    for op in ops {
        let (Some(kind), Some(path)) = (op["op"].as_str(), op["path"].as_str()) else {
            return error(422, "each operation needs op and path");
        };
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if !tenants.contains_key(parts[0]) {
            let Some(t) = st.tenants.get(parts[0]) else {
                return error(422, &format!("{path}: tenant {} does not exist", parts[0]));
            };
            tenants.insert(parts[0].to_string(), t.clone());
        }
        let tenant = tenants.get_mut(parts[0]).expect("copied above");
        if !touched.contains(&parts[0].to_string()) {
            touched.push(parts[0].to_string());
        }
        let parent_ptr = format!("/{}", parts[1..parts.len() - 1].join("/"));
        let last = parts[parts.len() - 1];
        let parent = if parts.len() == 2 { Some(&mut *tenant) } else { tenant.pointer_mut(&parent_ptr) };
        let Some(Value::Object(parent)) = parent else { return error(422, &format!("{path}: no such path")) };
        match kind {
            "replace" if !parent.contains_key(last) => {
                return error(422, &format!("{path}: replace needs an existing path"));
            }
            "replace" | "add" => {
                parent.insert(last.to_string(), op["value"].clone());
            }
            "remove" => {
                if parent.remove(last).is_none() {
                    return error(422, &format!("{path}: no such path"));
                }
            }
            other => return error(422, &format!("op {other} is not supported")),
        }
    }
    for t in &touched {
        let version = st.versions.get(t).cloned().unwrap_or_else(|| "3.29.0".into());
        let mut doc = json!({"class": "AS3", "declaration": {"class": "ADC", "schemaVersion": version}});
        doc["declaration"][t] = tenants.remove(t).expect("touched");
        let valid = validate(st, &doc);
        tenants.insert(t.clone(), doc["declaration"][t].take());
        if let Err(e) = valid {
            return e;
        }
    }
    // Tenants are deployed one by one, as AS3 does: a refused one keeps what it had, the others change; the answer
    // is 207 when some were refused (422 when all were).
    let mut results = Vec::new();
    for t in &touched {
        match st.refuse.get(t) {
            Some(msg) => {
                results.push(json!({"code": 422, "message": "declaration failed", "response": msg, "tenant": t}))
            }
            None => {
                st.tenants.insert(t.clone(), tenants.remove(t).expect("touched"));
                results.push(json!({"code": 200, "message": "success", "tenant": t}));
            }
        }
    }
    let refused = results.iter().filter(|r| r["code"] == 422).count();
    let status = match refused {
        0 => 200,
        n if n == results.len() => 422,
        _ => 207,
    };
    (status, json!({"results": results}))
}
