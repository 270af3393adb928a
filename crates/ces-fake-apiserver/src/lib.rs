//! A fake Kubernetes API server for tests, in process, on loopback (plain HTTP).
//!
//! It behaves like the real one for what CES uses:
//! - the resources CES reads and writes (core Namespaces, Pods, Services, Endpoints; EndpointSlices; the five CES
//!   kinds; Leases; Events), namespaced or cluster scoped, at their real paths;
//! - list with a `resourceVersion`, and watch from a `resourceVersion` as newline-delimited `WatchEvent`s, with
//!   `BOOKMARK`s when asked for, and `410 Gone` (an `ERROR` event with a `Status`) when the version was compacted;
//! - create (409 when it exists), replace (409 on a stale `resourceVersion`), delete, merge patch, and server-side
//!   apply of `/status` with field ownership at the granularity of `status`'s top-level fields: `managedFields`
//!   (`operation: Apply`, `subresource: status`), 409 on a field another manager owns with another value unless
//!   `force`, which takes it over, shared ownership of equal values, removal of fields a manager stops applying
//!   (`generation` untouched, as for a status subresource; `managedFields` kept across updates of the object);
//! - kinds it can be told not to serve (404), as a cluster without the EndpointSlice API;
//! - `generation` bumped on spec changes, `uid` and `creationTimestamp` set on create;
//! - discovery (`/api`, `/apis`, resource lists) and `Table` answers with the CRDs' printer columns, so `kubectl get`
//!   works against it.
//!
//! Faults for tests: [`FakeApiServer::drop_watches`] ends every open watch, [`FakeApiServer::compact`] makes every
//! older `resourceVersion` answer 410, [`FakeApiServer::stop`] and [`FakeApiServer::start_again`] take the server
//! away and bring it back on the same port with the same objects.
//!
//! It is not an API server: no authentication, admission, validation against the CRD schemas, field selectors,
//! pagination tokens or strategic merge, and no field ownership finer than `status`'s top-level fields or outside
//! `/status` applies.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// A resource the server knows.
#[derive(Clone, Debug)]
pub struct Resource {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Printer columns: (name, JSON path) after NAME (and before AGE).
    pub columns: &'static [(&'static str, &'static str)],
}

impl Resource {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.to_string() } else { format!("{}/{}", self.group, self.version) }
    }
}

const RULE_COLUMNS: &[(&str, &str)] = &[("Action", ".spec.action"), ("Status", ".status.phase")];

/// Every resource the fake serves.
pub const RESOURCES: &[Resource] = &[
    Resource {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        namespaced: false,
        short_names: &["ns"],
        columns: &[],
    },
    Resource {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        namespaced: true,
        short_names: &["po"],
        columns: &[],
    },
    Resource {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        namespaced: true,
        short_names: &["svc"],
        columns: &[],
    },
    Resource {
        group: "",
        version: "v1",
        kind: "Endpoints",
        plural: "endpoints",
        namespaced: true,
        short_names: &["ep"],
        columns: &[],
    },
    Resource {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        namespaced: true,
        short_names: &[],
        columns: &[],
    },
    Resource {
        group: "kubeovn.io",
        version: "v1alpha1",
        kind: "ExternalService",
        plural: "externalservices",
        namespaced: true,
        short_names: &["exsvc"],
        columns: &[("Addresses", ".spec.addresses"), ("Status", ".status.phase")],
    },
    Resource {
        group: "kubeovn.io",
        version: "v1alpha1",
        kind: "ClusterEgressRule",
        plural: "clusteregressrules",
        namespaced: false,
        short_names: &["cgr"],
        columns: RULE_COLUMNS,
    },
    Resource {
        group: "kubeovn.io",
        version: "v1alpha1",
        kind: "NamespaceEgressRule",
        plural: "namespaceegressrules",
        namespaced: true,
        short_names: &["nsgr"],
        columns: RULE_COLUMNS,
    },
    Resource {
        group: "kubeovn.io",
        version: "v1alpha1",
        kind: "ServiceEgressRule",
        plural: "serviceegressrules",
        namespaced: true,
        short_names: &["svcgr"],
        columns: &[("Action", ".spec.action"), ("Service", ".spec.service"), ("Status", ".status.phase")],
    },
    Resource {
        group: "bigip.io",
        version: "v1alpha1",
        kind: "ExternalIPRule",
        plural: "externaliprules",
        namespaced: true,
        short_names: &["eipr"],
        columns: &[("ExternalIP", ".spec.externalAddresses"), ("Status", ".status.phase")],
    },
    Resource {
        group: "coordination.k8s.io",
        version: "v1",
        kind: "Lease",
        plural: "leases",
        namespaced: true,
        short_names: &[],
        columns: &[],
    },
    Resource {
        group: "events.k8s.io",
        version: "v1",
        kind: "Event",
        plural: "events",
        namespaced: true,
        short_names: &["ev"],
        columns: &[],
    },
];

pub fn resource(kind: &str) -> &'static Resource {
    RESOURCES.iter().find(|r| r.kind == kind).unwrap_or_else(|| panic!("the fake API server has no kind {kind}"))
}

/// One change, as watches see it.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: &'static str,
    event: &'static str,
    object: Value,
}

/// A request the server answered, for assertions.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
    pub body: Option<Value>,
}

pub struct Store {
    rv: u64,
    uid: u64,
    /// (kind, namespace, name) → object.
    pub objects: BTreeMap<(String, String, String), Value>,
    history: Vec<Change>,
    /// Versions at or below this are gone (410).
    compacted: u64,
    pub requests: Vec<Logged>,
    /// Watches answered 410 Gone.
    pub gone: u64,
    /// Printer columns of installed CRDs, by kind: (name, JSON path).
    columns: BTreeMap<String, Vec<(String, String)>>,
    /// Kinds this server does not serve (404), as a cluster without an API (EndpointSlices before Kubernetes 1.21).
    pub unserved: std::collections::BTreeSet<String>,
}

impl Store {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    pub fn get(&self, kind: &str, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&(kind.to_string(), ns.to_string(), name.to_string()))
    }

    pub fn list(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|((k, _, _), _)| k == kind).map(|(_, v)| v).collect()
    }
}

struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch.
    epoch: tokio::sync::watch::Sender<u64>,
}

pub struct FakeApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

fn now() -> String {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    // RFC 3339, seconds, UTC.
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, dd) = civil(days);
    format!("{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to (year, month, day) (H. Hinnant's algorithm).
fn civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl FakeApiServer {
    pub fn start() -> FakeApiServer {
        let (changes, _) = broadcast::channel(65_536);
        let (epoch, _) = tokio::sync::watch::channel(0);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 1,
                uid: 0,
                objects: BTreeMap::new(),
                history: Vec::new(),
                compacted: 0,
                requests: Vec::new(),
                gone: 0,
                columns: BTreeMap::new(),
                unserved: Default::default(),
            }),
            changes,
            epoch,
        });
        let mut s = FakeApiServer { addr: "127.0.0.1:0".parse().unwrap(), shared, runtime: None };
        s.serve(0);
        s
    }

    fn serve(&mut self, port: u16) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener =
            rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", port))).expect("bind the fake API server");
        self.addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(handle).with_state(self.shared.clone());
        rt.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        self.runtime = Some(rt);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig that points at this server, written to `path`.
    pub fn write_kubeconfig(&self, path: &std::path::Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake, namespace: default}}\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(path, text).unwrap();
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        f(&mut self.shared.store.lock().unwrap())
    }

    /// Creates or replaces an object (as `kubectl apply` would, for tests): `generation` is bumped when anything
    /// but the status changed.
    pub fn apply(&self, object: Value) {
        let kind = object["kind"].as_str().expect("kind").to_string();
        let r = resource(&kind);
        let ns = if r.namespaced {
            object["metadata"]["namespace"].as_str().unwrap_or("default").to_string()
        } else {
            String::new()
        };
        let name = object["metadata"]["name"].as_str().expect("name").to_string();
        let mut store = self.shared.store.lock().unwrap();
        let existing = store.get(&kind, &ns, &name).cloned();
        upsert(&mut store, r, &ns, &name, object, existing.as_ref());
        publish(&mut store, &self.shared.changes);
    }

    pub fn delete(&self, kind: &str, ns: &str, name: &str) -> bool {
        let r = resource(kind);
        let ns = if r.namespaced { ns } else { "" };
        let mut store = self.shared.store.lock().unwrap();
        remove(&mut store, &self.shared.changes, r, ns, name).is_some()
    }

    /// Installs a CustomResourceDefinition's printer columns (`additionalPrinterColumns` of its first version), so
    /// that `kubectl get` shows what it shows on a real cluster.
    pub fn install_crd(&self, crd: &Value) {
        let kind = crd["spec"]["names"]["kind"].as_str().expect("spec.names.kind").to_string();
        let cols: Vec<(String, String)> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["jsonPath"] != ".metadata.creationTimestamp")
            .map(|c| (c["name"].as_str().unwrap_or("").to_string(), c["jsonPath"].as_str().unwrap_or("").to_string()))
            .collect();
        self.shared.store.lock().unwrap().columns.insert(kind, cols);
    }

    /// Ends every open watch (as a network blip or an API server rolling update would).
    pub fn drop_watches(&self) {
        self.shared.epoch.send_modify(|e| *e += 1);
    }

    /// Forgets the history: a watch from any `resourceVersion` handed out so far gets 410 Gone (as after an etcd
    /// compaction that outran a client), and must list again.
    pub fn compact(&self) {
        let mut s = self.shared.store.lock().unwrap();
        s.compacted = s.rv + 1;
        s.history.clear();
    }

    /// The server goes away (connections refused) until [`FakeApiServer::start_again`].
    pub fn stop(&mut self) {
        self.drop_watches();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }

    pub fn start_again(&mut self) {
        let port = self.addr.port();
        self.serve(port);
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn upsert(store: &mut Store, r: &Resource, ns: &str, name: &str, mut object: Value, existing: Option<&Value>) -> Value {
    let rv = store.next_rv();
    let meta = object["metadata"].as_object_mut().expect("metadata");
    meta.insert("resourceVersion".into(), json!(rv.to_string()));
    if r.namespaced {
        meta.insert("namespace".into(), json!(ns));
    }
    let event = match existing {
        Some(old) => {
            for k in ["uid", "creationTimestamp"] {
                if let Some(v) = old["metadata"].get(k) {
                    meta.insert(k.into(), v.clone());
                }
            }
            // Field ownership is the server's record: an update does not erase it.
            if let Some(v) = old["metadata"].get("managedFields").filter(|_| !meta.contains_key("managedFields")) {
                meta.insert("managedFields".into(), v.clone());
            }
            let old_gen = old["metadata"]["generation"].as_i64().unwrap_or(1);
            let changed = |o: &Value| {
                let mut o = o.clone();
                if let Some(m) = o.as_object_mut() {
                    m.remove("status");
                    m.remove("metadata");
                }
                o
            };
            let generation = if changed(old) != changed(&object) { old_gen + 1 } else { old_gen };
            object["metadata"]["generation"] = json!(generation);
            "MODIFIED"
        }
        None => {
            store.uid += 1;
            meta.insert("uid".into(), json!(format!("00000000-0000-0000-0000-{:012}", store.uid)));
            meta.insert("creationTimestamp".into(), json!(now()));
            object["metadata"]["generation"] = json!(1);
            "ADDED"
        }
    };
    object["apiVersion"] = json!(r.api_version());
    object["kind"] = json!(r.kind);
    store.objects.insert((r.kind.to_string(), ns.to_string(), name.to_string()), object.clone());
    record(store, r.kind, event, &object, rv);
    object
}

fn record(store: &mut Store, kind: &'static str, event: &'static str, object: &Value, rv: u64) {
    store.history.push(Change { rv, kind, event, object: object.clone() });
}

fn remove(store: &mut Store, changes: &broadcast::Sender<Change>, r: &Resource, ns: &str, name: &str) -> Option<Value> {
    let mut obj = store.objects.remove(&(r.kind.to_string(), ns.to_string(), name.to_string()))?;
    let rv = store.next_rv();
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    record(store, r.kind, "DELETED", &obj, rv);
    publish(store, changes);
    Some(obj)
}

/// Sends the changes not yet sent to the open watches.
fn publish(store: &mut Store, changes: &broadcast::Sender<Change>) {
    // Called after each recorded change: the history keeps it for watches that start later.
    if let Some(last) = store.history.last() {
        let _ = changes.send(last.clone());
    }
}

/// Where a request goes.
struct Target {
    r: &'static Resource,
    ns: Option<String>,
    name: Option<String>,
    status: bool,
}

fn route(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let find = |plural: &str| RESOURCES.iter().find(|r| r.group == group && r.version == version && r.plural == plural);
    match rest {
        ["namespaces", ns, plural, more @ ..] if find(plural).is_some_and(|r| r.namespaced) => {
            let r = find(plural)?;
            match more {
                [] => Some(Target { r, ns: Some(ns.to_string()), name: None, status: false }),
                [name] => Some(Target { r, ns: Some(ns.to_string()), name: Some(name.to_string()), status: false }),
                [name, "status"] => {
                    Some(Target { r, ns: Some(ns.to_string()), name: Some(name.to_string()), status: true })
                }
                _ => None,
            }
        }
        [plural, more @ ..] => {
            let r = find(plural)?;
            match more {
                [] => Some(Target { r, ns: None, name: None, status: false }),
                [name] if !r.namespaced => Some(Target { r, ns: None, name: Some(name.to_string()), status: false }),
                [name, "status"] if !r.namespaced => {
                    Some(Target { r, ns: None, name: Some(name.to_string()), status: true })
                }
                _ => None,
            }
        }
        _ => None,
    }
}

fn status_error(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()});
    (code, [("content-type", "application/json")], body.to_string()).into_response()
}

/// The API server's 404 for an object of `r` named `name`.
fn not_found(r: &Resource, name: &str) -> Response {
    status_error(StatusCode::NOT_FOUND, "NotFound", &format!("{} \"{name}\" not found", r.plural))
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    (code, [("content-type", "application/json")], v.to_string()).into_response()
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    req: Request,
) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let accept = headers.get("accept").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let bytes = axum::body::to_bytes(req.into_body(), 64 << 20).await.unwrap_or_default();
    let body: Option<Value> = if bytes.is_empty() { None } else { serde_json::from_slice(&bytes).ok() };
    let resp = answer(&shared, &method, &path, &q, &content_type, &accept, body.clone()).await;
    let mut store = shared.store.lock().unwrap();
    store.requests.push(Logged { method: method.to_string(), path, query, status: resp.status().as_u16(), body });
    resp
}

async fn answer(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    q: &BTreeMap<String, String>,
    content_type: &str,
    accept: &str,
    body: Option<Value>,
) -> Response {
    if path == "/version" {
        return json_response(
            StatusCode::OK,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "platform": "linux/amd64"}),
        );
    }
    if let Some(r) = discovery(path) {
        return json_response(StatusCode::OK, &r);
    }
    let unserved = |t: &Target| shared.store.lock().unwrap().unserved.contains(t.r.kind);
    let Some(t) = route(path).filter(|t| !unserved(t)) else {
        return status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        );
    };
    let ns = if t.r.namespaced { t.ns.clone() } else { None };
    match (method.as_str(), &t.name) {
        ("GET", None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => watch(shared, t.r, ns, q),
        ("GET", None) => {
            let store = shared.store.lock().unwrap();
            if let Some(rv) = q.get("resourceVersion").and_then(|v| v.parse::<u64>().ok())
                && rv != 0
                && rv <= store.compacted
                && q.get("resourceVersionMatch").is_some_and(|m| m == "Exact")
            {
                return status_error(StatusCode::GONE, "Expired", "too old resource version");
            }
            let items: Vec<Value> = store
                .objects
                .iter()
                .filter(|((k, n, _), _)| k == t.r.kind && ns.as_ref().is_none_or(|ns| ns == n))
                .map(|(_, v)| v.clone())
                .collect();
            if accept.contains("as=Table") {
                return json_response(StatusCode::OK, &table(t.r, store.columns.get(t.r.kind), &items, store.rv));
            }
            json_response(
                StatusCode::OK,
                &json!({"kind": format!("{}List", t.r.kind), "apiVersion": t.r.api_version(), "metadata": {"resourceVersion": store.rv.to_string()}, "items": items}),
            )
        }
        ("GET", Some(name)) => {
            let store = shared.store.lock().unwrap();
            match store.get(t.r.kind, ns.as_deref().unwrap_or(""), name) {
                Some(o) if accept.contains("as=Table") => json_response(
                    StatusCode::OK,
                    &table(t.r, store.columns.get(t.r.kind), std::slice::from_ref(o), store.rv),
                ),
                Some(o) => json_response(StatusCode::OK, o),
                None => not_found(t.r, name),
            }
        }
        ("POST", None) => {
            let Some(obj) = body else { return status_error(StatusCode::BAD_REQUEST, "BadRequest", "no body") };
            let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
                return status_error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "metadata.name is required");
            };
            let nsv = ns.clone().unwrap_or_default();
            let mut store = shared.store.lock().unwrap();
            if store.get(t.r.kind, &nsv, &name).is_some() {
                return status_error(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("{} \"{name}\" already exists", t.r.plural),
                );
            }
            let o = upsert(&mut store, t.r, &nsv, &name, obj, None);
            publish(&mut store, &shared.changes);
            json_response(StatusCode::CREATED, &o)
        }
        ("PUT", Some(name)) => {
            let Some(obj) = body else { return status_error(StatusCode::BAD_REQUEST, "BadRequest", "no body") };
            let nsv = ns.clone().unwrap_or_default();
            let mut store = shared.store.lock().unwrap();
            let Some(old) = store.get(t.r.kind, &nsv, name).cloned() else {
                return not_found(t.r, name);
            };
            let sent = obj["metadata"]["resourceVersion"].as_str().unwrap_or("");
            if !sent.is_empty() && sent != old["metadata"]["resourceVersion"].as_str().unwrap_or("") {
                return status_error(
                    StatusCode::CONFLICT,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                );
            }
            let o = upsert(&mut store, t.r, &nsv, name, obj, Some(&old));
            publish(&mut store, &shared.changes);
            json_response(StatusCode::OK, &o)
        }
        ("PATCH", Some(name)) => {
            let Some(patch) = body else { return status_error(StatusCode::BAD_REQUEST, "BadRequest", "no body") };
            let nsv = ns.clone().unwrap_or_default();
            let mut store = shared.store.lock().unwrap();
            let Some(old) = store.get(t.r.kind, &nsv, name).cloned() else {
                return not_found(t.r, name);
            };
            if content_type.starts_with("application/apply-patch") && q.get("fieldManager").is_none_or(String::is_empty)
            {
                return status_error(StatusCode::BAD_REQUEST, "BadRequest", "fieldManager is required for apply patch");
            }
            let mut new = old.clone();
            let apply = content_type.starts_with("application/apply-patch");
            if t.status && apply {
                // Server-side apply of the status subresource, with field ownership.
                let manager = q.get("fieldManager").map(String::as_str).unwrap_or_default();
                let force = q.get("force").is_some_and(|f| f == "true");
                match apply_status(&old, &patch, manager, force, &t.r.api_version()) {
                    Ok(v) => new = v,
                    Err(conflict) => return status_error(StatusCode::CONFLICT, "Conflict", &conflict),
                }
            } else if t.status {
                // The status subresource: only the status changes.
                merge(&mut new["status"], patch.get("status").unwrap_or(&Value::Null));
            } else {
                merge(&mut new, &patch);
            }
            let o = if t.status {
                let rv = store.next_rv();
                new["metadata"]["resourceVersion"] = json!(rv.to_string());
                store.objects.insert((t.r.kind.to_string(), nsv.clone(), name.clone()), new.clone());
                record(&mut store, t.r.kind, "MODIFIED", &new, rv);
                new
            } else {
                upsert(&mut store, t.r, &nsv, name, new, Some(&old))
            };
            publish(&mut store, &shared.changes);
            json_response(StatusCode::OK, &o)
        }
        ("DELETE", Some(name)) => {
            let nsv = ns.clone().unwrap_or_default();
            let mut store = shared.store.lock().unwrap();
            match remove(&mut store, &shared.changes, t.r, &nsv, name) {
                Some(o) => json_response(StatusCode::OK, &o),
                None => not_found(t.r, name),
            }
        }
        _ => status_error(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "not supported by the fake API server"),
    }
}

/// The status fields an Apply entry of `managedFields` owns (top-level fields of `status`: the granularity the fake
/// tracks).
fn owned_status_fields(entry: &Value) -> Vec<String> {
    entry["fieldsV1"]["f:status"]
        .as_object()
        .map(|m| m.keys().filter_map(|k| k.strip_prefix("f:")).map(str::to_string).collect())
        .unwrap_or_default()
}

/// Server-side apply of `patch`'s status by `manager`, as the API server does it for the top-level fields of
/// `status`: a field another manager owns with a different value is a conflict (409) unless `force`, which takes it
/// over; a field the same value leaves shared; a field this manager applied before and no longer applies is removed,
/// unless another manager owns it too. `metadata.managedFields` records who owns what (`operation: Apply`,
/// `subresource: status`).
fn apply_status(old: &Value, patch: &Value, manager: &str, force: bool, api_version: &str) -> Result<Value, String> {
    let applied = patch.get("status").and_then(Value::as_object).cloned().unwrap_or_default();
    let mut status = old.get("status").and_then(Value::as_object).cloned().unwrap_or_default();
    let mut entries: Vec<Value> = old["metadata"]["managedFields"].as_array().cloned().unwrap_or_default();
    let is_status_apply = |e: &Value| e["operation"] == "Apply" && e["subresource"] == "status";
    let mut conflicts = Vec::new();
    for e in entries.iter().filter(|e| is_status_apply(e) && e["manager"] != manager) {
        for f in owned_status_fields(e) {
            if applied.get(&f).is_some_and(|v| status.get(&f) != Some(v)) {
                conflicts.push(format!("conflict with \"{}\": .status.{f}", e["manager"].as_str().unwrap_or("")));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        let n = conflicts.len();
        return Err(format!(
            "Apply failed with {n} conflict{}: {}",
            if n == 1 { "" } else { "s" },
            conflicts.join(", ")
        ));
    }
    let mine: Vec<String> = entries
        .iter()
        .find(|e| is_status_apply(e) && e["manager"] == manager)
        .map(owned_status_fields)
        .unwrap_or_default();
    // Others lose the fields whose values this apply changes (with force); fields left to nobody go.
    for e in entries.iter_mut().filter(|e| is_status_apply(e) && e["manager"] != manager) {
        if let Some(m) = e["fieldsV1"]["f:status"].as_object_mut() {
            m.retain(|k, _| {
                let f = k.trim_start_matches("f:");
                applied.get(f).is_none_or(|v| status.get(f) == Some(v))
            });
        }
    }
    let owned_by_others: Vec<String> = entries
        .iter()
        .filter(|e| is_status_apply(e) && e["manager"] != manager)
        .flat_map(owned_status_fields)
        .collect();
    for f in mine.iter().filter(|f| !applied.contains_key(*f) && !owned_by_others.contains(f)) {
        status.remove(f);
    }
    for (k, v) in &applied {
        status.insert(k.clone(), v.clone());
    }
    entries.retain(|e| !(is_status_apply(e) && (e["manager"] == manager || owned_status_fields(e).is_empty())));
    if !applied.is_empty() {
        let fields: serde_json::Map<String, Value> = applied.keys().map(|k| (format!("f:{k}"), json!({}))).collect();
        entries.push(json!({"manager": manager, "operation": "Apply", "apiVersion": api_version, "time": now(),
                            "fieldsType": "FieldsV1", "fieldsV1": {"f:status": fields}, "subresource": "status"}));
    }
    let mut new = old.clone();
    new["status"] = Value::Object(status);
    new["metadata"]["managedFields"] = Value::Array(entries);
    Ok(new)
}

/// RFC 7386 merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn watch(shared: &Arc<Shared>, r: &'static Resource, ns: Option<String>, q: &BTreeMap<String, String>) -> Response {
    let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = q.get("timeoutSeconds").and_then(|v| v.parse::<u64>().ok()).unwrap_or(300).min(300);
    let mut rx = shared.changes.subscribe();
    let mut epoch = shared.epoch.subscribe();
    let (tx, out) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(1024);
    let matches = move |c: &Change| {
        c.kind == r.kind && ns.as_ref().is_none_or(|n| c.object["metadata"]["namespace"].as_str() == Some(n))
    };
    // What happened since `from`, or 410 when that is compacted away.
    let (backlog, gone, current) = {
        let mut store = shared.store.lock().unwrap();
        if from != 0 && from < store.compacted {
            store.gone += 1;
            (Vec::new(), true, store.rv)
        } else {
            (store.history.iter().filter(|c| c.rv > from && matches(c)).cloned().collect::<Vec<_>>(), false, store.rv)
        }
    };
    tokio::spawn(async move {
        let line = |t: &str, o: &Value| format!("{}\n", json!({"type": t, "object": o}));
        if gone {
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("too old resource version: {from} ({current})"), "reason": "Expired", "code": 410});
            let _ = tx.send(Ok(line("ERROR", &status))).await;
            return;
        }
        let mut last = from;
        for c in backlog {
            last = c.rv;
            if tx.send(Ok(line(c.event, &c.object))).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = epoch.changed() => return,
                _ = tick.tick() => {
                    if bookmarks {
                        let b = json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": {"resourceVersion": last.max(current).to_string()}});
                        if tx.send(Ok(line("BOOKMARK", &b))).await.is_err() { return; }
                    }
                }
                c = rx.recv() => match c {
                    Ok(c) if c.rv > last && matches(&c) => {
                        last = c.rv;
                        if tx.send(Ok(line(c.event, &c.object))).await.is_err() { return; }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(_) => return,
                }
            }
        }
    });
    let stream = futures::stream::unfold(out, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn discovery(path: &str) -> Option<Value> {
    let groups = || {
        let mut gs: Vec<(&str, &str)> =
            RESOURCES.iter().filter(|r| !r.group.is_empty()).map(|r| (r.group, r.version)).collect();
        gs.dedup();
        gs
    };
    let list = |group: &str, version: &str| {
        let resources: Vec<Value> = RESOURCES
            .iter()
            .filter(|r| r.group == group && r.version == version)
            .flat_map(|r| {
                let mut v = vec![json!({"name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced, "kind": r.kind,
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"], "shortNames": r.short_names})];
                if !r.columns.is_empty() {
                    v.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}));
                }
                v
            })
            .collect();
        let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
    };
    match path.trim_end_matches('/') {
        "/api" => Some(json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})),
        "/api/v1" => Some(list("", "v1")),
        "/apis" => {
            let mut seen = Vec::new();
            let groups: Vec<Value> = groups()
                .into_iter()
                .filter(|(g, _)| {
                    let fresh = !seen.contains(g);
                    seen.push(*g);
                    fresh
                })
                .map(|(g, v)| json!({"name": g, "versions": [{"groupVersion": format!("{g}/{v}"), "version": v}], "preferredVersion": {"groupVersion": format!("{g}/{v}"), "version": v}}))
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        p => {
            let parts: Vec<&str> = p.trim_start_matches('/').split('/').collect();
            match parts.as_slice() {
                ["apis", g, v] if groups().iter().any(|(gg, vv)| gg == g && vv == v) => Some(list(g, v)),
                _ => None,
            }
        }
    }
}

/// A `meta.k8s.io/v1` Table of objects, with the installed CRD's printer columns (or the built-in ones), as kubectl
/// asks for. The age column is `<fixed>`, so that outputs can be compared.
fn table(r: &Resource, installed: Option<&Vec<(String, String)>>, items: &[Value], rv: u64) -> Value {
    let columns: Vec<(String, String)> = match installed {
        Some(c) => c.clone(),
        None => r.columns.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
    };
    let mut defs =
        vec![json!({"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0})];
    for (name, _) in &columns {
        defs.push(json!({"name": name, "type": "string", "format": "", "description": name, "priority": 0}));
    }
    defs.push(json!({"name": "Age", "type": "date", "format": "", "description": "Age", "priority": 0}));
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut cells = vec![o["metadata"]["name"].clone()];
            for (_, path) in &columns {
                let v = path.trim_start_matches('.').split('.').fold(o, |v, k| &v[k]);
                cells.push(match v {
                    Value::Null => Value::String(String::new()),
                    Value::String(s) => Value::String(s.clone()),
                    other => Value::String(other.to_string()),
                });
            }
            cells.push(json!("<fixed>"));
            json!({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv.to_string()}, "columnDefinitions": defs, "rows": rows})
}
