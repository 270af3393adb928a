//! The Kubernetes source of the sync loop.
//!
//! Watchers (kube-rs, list then watch from the list's `resourceVersion`, relisting after 410 Gone) follow Namespaces,
//! Pods, Services, EndpointSlices (Endpoints when the cluster has no EndpointSlice API) and the five CES kinds. Each
//! object is reduced on arrival to the fields CES reads (memory stays proportional to what CES needs), and kept by
//! kind and name; every event bumps the source's version, so the loop's debounce coalesces bursts. A load reads the
//! kept objects through the same code as manifest files, so both sources give the same snapshot.
//!
//! After each pass the source writes the status of every CES object whose status changed (`phase`, `Accepted`,
//! `Programmed`), with server-side apply, when it was built with a field manager (the controller; gateways do not
//! write status).

pub mod lease;
pub mod status;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ces_api::ResourceStatus;
use ces_config::CesConfig;
use ces_model::{ObjectRef, PolicyModel};
use ces_snapshot::manifests::{ParsedObject, parse_object};
use ces_snapshot::{Churn, Endpoint, Key, PodChange, Snapshot};
use ces_sync::{Report, Source};
use futures::StreamExt;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::{Value, json};

/// A watched kind: how to reach it, and whether CES writes its status.
#[derive(Clone, Copy, Debug)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
    pub ces: bool,
}

impl Kind {
    fn resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(self.group, self.version, self.kind), self.plural)
    }

    fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.into() } else { format!("{}/{}", self.group, self.version) }
    }
}

const fn k(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    ces: bool,
) -> Kind {
    Kind { group, version, kind, plural, namespaced, ces }
}

pub const NAMESPACE: Kind = k("", "v1", "Namespace", "namespaces", false, false);
pub const POD: Kind = k("", "v1", "Pod", "pods", true, false);
pub const SERVICE: Kind = k("", "v1", "Service", "services", true, false);
pub const ENDPOINTS: Kind = k("", "v1", "Endpoints", "endpoints", true, false);
pub const ENDPOINT_SLICE: Kind = k("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", true, false);
pub const CES_KINDS: [Kind; 5] = [
    k("kubeovn.io", "v1alpha1", "ExternalService", "externalservices", true, true),
    k("kubeovn.io", "v1alpha1", "ClusterEgressRule", "clusteregressrules", false, true),
    k("kubeovn.io", "v1alpha1", "NamespaceEgressRule", "namespaceegressrules", true, true),
    k("kubeovn.io", "v1alpha1", "ServiceEgressRule", "serviceegressrules", true, true),
    k("bigip.io", "v1alpha1", "ExternalIPRule", "externaliprules", true, true),
];

/// The fields CES reads of an object; everything else (managedFields, most of the spec and status) is dropped.
pub fn reduce(kind: &Kind, mut v: Value) -> Value {
    let meta = v.get("metadata").cloned().unwrap_or(Value::Null);
    let mut m = serde_json::Map::new();
    for key in ["name", "namespace", "uid", "generation", "labels", "resourceVersion"] {
        if let Some(x) = meta.get(key) {
            m.insert(key.into(), x.clone());
        }
    }
    if let Some(Value::Object(a)) = meta.get("annotations") {
        let kept: serde_json::Map<String, Value> = a
            .iter()
            .filter(|(k, _)| k.starts_with("ovn.kubernetes.io/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !kept.is_empty() {
            m.insert("annotations".into(), Value::Object(kept));
        }
    }
    let mut out = json!({"apiVersion": kind.api_version(), "kind": kind.kind, "metadata": m});
    let take = |out: &mut Value, v: &mut Value, path: &[&str]| {
        let mut src = &mut *v;
        for p in path {
            match src.get_mut(*p) {
                Some(x) => src = x,
                None => return,
            }
        }
        let val = src.take();
        let mut dst = &mut *out;
        for p in &path[..path.len() - 1] {
            if dst.get(*p).is_none() {
                dst[*p] = json!({});
            }
            dst = &mut dst[*p];
        }
        dst[path[path.len() - 1]] = val;
    };
    match kind.kind {
        "Pod" => {
            for p in [&["spec", "hostNetwork"][..], &["status", "phase"], &["status", "podIP"], &["status", "podIPs"]] {
                take(&mut out, &mut v, p);
            }
            if let Some(Value::Array(cs)) = v.pointer("/status/conditions") {
                let ready: Vec<Value> = cs.iter().filter(|c| c["type"] == "Ready").cloned().collect();
                out["status"]["conditions"] = Value::Array(ready);
            }
        }
        "Service" => take(&mut out, &mut v, &["spec", "selector"]),
        "Endpoints" => take(&mut out, &mut v, &["subsets"]),
        "EndpointSlice" => {
            take(&mut out, &mut v, &["addressType"]);
            take(&mut out, &mut v, &["endpoints"]);
        }
        "Namespace" => {}
        _ => {
            take(&mut out, &mut v, &["spec"]);
            take(&mut out, &mut v, &["status"]);
        }
    }
    out
}

#[derive(Default)]
struct Objects {
    /// kind → (namespace, name) → reduced object.
    by_kind: BTreeMap<&'static str, BTreeMap<(String, String), Value>>,
    /// The same objects, parsed when they arrived (a load only assembles them).
    parsed: BTreeMap<&'static str, BTreeMap<(String, String), ParsedObject>>,
    /// Kinds whose initial list is complete.
    synced: BTreeSet<&'static str>,
    /// The last watch error of each kind, for the log.
    errors: BTreeMap<&'static str, String>,
    /// Watch restarts (relists) per kind, for metrics.
    restarts: BTreeMap<&'static str, u64>,
    /// Since the last load: the pods that changed, the namespaces whose endpoint objects changed, and whether
    /// anything else did (`Source::update`).
    dirty_pods: BTreeSet<(String, String)>,
    dirty_endpoints: BTreeSet<String>,
    other_changed: bool,
}

impl Objects {
    /// Notes a change of an object of `kind` for `Source::update`.
    fn changed(&mut self, kind: &str, key: &(String, String)) {
        if kind == POD.kind {
            self.dirty_pods.insert(key.clone());
        } else if kind == ENDPOINT_SLICE.kind || kind == ENDPOINTS.kind {
            self.dirty_endpoints.insert(key.0.clone());
        } else {
            self.other_changed = true;
        }
    }

    /// The endpoints of namespace `ns`'s Services as a load reads them (an EndpointSlice names its Service by label,
    /// so the namespace's endpoint objects are read together); `None` when one of them does not read cleanly.
    fn endpoints_in(&self, ns: &str) -> Option<BTreeMap<Key, Vec<Endpoint>>> {
        let objects = [ENDPOINTS.kind, ENDPOINT_SLICE.kind]
            .into_iter()
            .filter_map(|k| self.parsed.get(k))
            .flat_map(|m| m.range((ns.to_string(), String::new())..).take_while(|((n, _), _)| n == ns).map(|(_, p)| p));
        let built = ces_snapshot::manifests::build_objects(objects);
        built.diagnostics.is_empty().then_some(built.endpoints)
    }
}

pub struct KubeSource {
    runtime: tokio::runtime::Runtime,
    client: Client,
    objects: Arc<Mutex<Objects>>,
    events: Arc<AtomicU64>,
    kinds: Vec<Kind>,
    config: Option<PathBuf>,
    field_manager: Option<String>,
    /// The status CES last wrote (or found) on each object.
    written: HashMap<(String, String, String), ResourceStatus>,
    /// The last version of each CES object that compiled without an error.
    good: HashMap<(String, String, String), Value>,
    /// The objects whose last good version was compiled in the last pass.
    kept: Vec<(String, String, String)>,
    /// The CES objects as the last load read them (events may change the kept objects during a pass).
    loaded: HashMap<(String, String, String), Value>,
    /// The config file's stamp at the last load.
    config_stamp: Option<u64>,
    /// Where the source's own warnings go (a status or event it could not write). Default: stderr.
    pub warn: Box<dyn Fn(&str) + Send>,
    /// Status writes that failed, for the log.
    pub status_errors: u64,
    pub status_writes: u64,
}

fn origin(kind: &str, ns: &str, name: &str) -> String {
    if ns.is_empty() { format!("{kind}/{name}") } else { format!("{kind}/{ns}/{name}") }
}

fn stamp(path: &std::path::Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    if let Ok(m) = std::fs::metadata(path) {
        m.len().hash(&mut h);
        if let Ok(t) = m.modified() {
            t.hash(&mut h);
        }
    }
    h.finish()
}

impl KubeSource {
    /// Connects (`kubeconfig`, else `KUBECONFIG` / `~/.kube/config`, else in-cluster) and starts the watchers.
    /// `field_manager`: write status under this server-side-apply manager (`None`: never write).
    pub fn start(
        kubeconfig: Option<PathBuf>,
        config: Option<PathBuf>,
        field_manager: Option<String>,
    ) -> Result<KubeSource, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("tokio: {e}"))?;
        let client = runtime.block_on(client(kubeconfig))?;
        // EndpointSlices, or Endpoints on a cluster without them.
        let slices_api: Api<DynamicObject> = Api::all_with(client.clone(), &ENDPOINT_SLICE.resource());
        let has_slices = runtime
            .block_on(slices_api.list(&kube::api::ListParams::default().limit(1)))
            .map(|_| true)
            .or_else(|e| match e {
                kube::Error::Api(s) if s.code == 404 => Ok(false),
                e => Err(format!("cannot reach the API server: {e}")),
            })?;
        let mut kinds = vec![NAMESPACE, POD, SERVICE, if has_slices { ENDPOINT_SLICE } else { ENDPOINTS }];
        kinds.extend(CES_KINDS);
        let objects: Arc<Mutex<Objects>> = Default::default();
        let events = Arc::new(AtomicU64::new(0));
        for kind in &kinds {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.resource());
            let (objects, events, kind) = (objects.clone(), events.clone(), *kind);
            runtime.spawn(async move {
                let mut stream = watcher::watcher(api, watcher::Config::default()).boxed();
                let mut pending: Option<BTreeMap<(String, String), Value>> = None;
                while let Some(e) = stream.next().await {
                    if let Err(e) = &e {
                        objects.lock().unwrap_or_else(|p| p.into_inner()).errors.insert(kind.kind, e.to_string());
                        // The watcher retries by itself; do not spin.
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        continue;
                    }
                    let mut o = objects.lock().unwrap_or_else(|p| p.into_inner());
                    let key = |d: &DynamicObject| {
                        (d.metadata.namespace.clone().unwrap_or_default(), d.metadata.name.clone().unwrap_or_default())
                    };
                    let value = |d: DynamicObject| reduce(&kind, serde_json::to_value(d).unwrap_or(Value::Null));
                    match e {
                        Ok(watcher::Event::Init) => {
                            pending = Some(BTreeMap::new());
                            *o.restarts.entry(kind.kind).or_default() += 1;
                        }
                        Ok(watcher::Event::InitApply(d)) => {
                            let k = key(&d);
                            pending.get_or_insert_with(BTreeMap::new).insert(k, value(d));
                        }
                        Ok(watcher::Event::InitDone) => {
                            // The complete list replaces what was kept: objects deleted while the watch was down go.
                            let all = pending.take().unwrap_or_default();
                            let parsed = all
                                .iter()
                                .map(|((ns, name), v)| {
                                    ((ns.clone(), name.clone()), parse_object(v.clone(), &origin(kind.kind, ns, name)))
                                })
                                .collect();
                            o.parsed.insert(kind.kind, parsed);
                            o.by_kind.insert(kind.kind, all);
                            o.synced.insert(kind.kind);
                            o.errors.remove(kind.kind);
                            o.other_changed = true;
                            events.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(watcher::Event::Apply(d)) => {
                            let k = key(&d);
                            let v = value(d);
                            let without_status = |v: &Value| {
                                let mut v = v.clone();
                                if let Some(m) = v.as_object_mut() {
                                    m.remove("status");
                                }
                                if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                                    m.remove("resourceVersion");
                                }
                                v
                            };
                            let map = o.by_kind.entry(kind.kind).or_default();
                            // A change of a CES object's status alone (CES's own writes) changes nothing CES compiles.
                            // (A pod's status holds its addresses: every pod change counts.)
                            let relevant =
                                !kind.ces || map.get(&k).is_none_or(|old| without_status(old) != without_status(&v));
                            map.insert(k.clone(), v.clone());
                            if relevant {
                                let p = parse_object(v, &origin(kind.kind, &k.0, &k.1));
                                o.changed(kind.kind, &k);
                                o.parsed.entry(kind.kind).or_default().insert(k, p);
                                events.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(watcher::Event::Delete(d)) => {
                            let k = key(&d);
                            o.by_kind.entry(kind.kind).or_default().remove(&k);
                            o.parsed.entry(kind.kind).or_default().remove(&k);
                            o.changed(kind.kind, &k);
                            events.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {}
                    }
                }
            });
        }
        Ok(KubeSource {
            runtime,
            client,
            objects,
            events,
            kinds,
            config,
            field_manager,
            written: HashMap::new(),
            good: HashMap::new(),
            kept: Vec::new(),
            loaded: HashMap::new(),
            config_stamp: None,
            warn: Box::new(|m| eprintln!("ces: {m}")),
            status_errors: 0,
            status_writes: 0,
        })
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Records an `events.k8s.io/v1` Event about an object; failures are only logged.
    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        kind: &Kind,
        ns: &str,
        name: &str,
        object: &Value,
        type_: &str,
        reason: &str,
        note: &str,
        manager: &str,
    ) {
        let namespace = if kind.namespaced { ns } else { "default" };
        let now = jiff::Timestamp::now();
        let body = json!({
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": format!("{}.{:x}", name, now.as_nanosecond() as u64), "namespace": namespace},
            "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            "reportingController": format!("ces.io/{manager}"),
            "reportingInstance": manager,
            "action": "Reconcile",
            "reason": reason,
            "type": type_,
            "note": note.chars().take(1024).collect::<String>(),
            "regarding": {"apiVersion": kind.api_version(), "kind": kind.kind, "name": name,
                          "namespace": if kind.namespaced { Some(ns) } else { None },
                          "uid": object.pointer("/metadata/uid")},
        });
        let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("events.k8s.io", "v1", "Event"), "events");
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, &ar);
        let obj: DynamicObject = match serde_json::from_value(body) {
            Ok(o) => o,
            Err(_) => return,
        };
        if let Err(e) = self.runtime.block_on(api.create(&kube::api::PostParams::default(), &obj)) {
            (self.warn)(&format!("event on {} {ns}/{name} not recorded: {e}", kind.kind));
        }
    }

    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    /// The source's metrics as Prometheus text, for a scrape at any time: watch (re)starts by kind, objects kept.
    pub fn metrics(&self) -> Box<dyn Fn() -> String + Send> {
        let objects = self.objects.clone();
        Box::new(move || {
            let o = objects.lock().unwrap_or_else(|p| p.into_inner());
            let mut out = String::from(
                "# HELP ces_watch_restarts_total Lists of a kind: the first, and each after a watch could not resume (410 Gone, errors).\n# TYPE ces_watch_restarts_total counter\n",
            );
            for (kind, n) in &o.restarts {
                out.push_str(&format!("ces_watch_restarts_total{{kind=\"{kind}\"}} {n}\n"));
            }
            out.push_str("# HELP ces_watched_objects Objects kept from the watches, by kind.\n# TYPE ces_watched_objects gauge\n");
            for (kind, m) in &o.by_kind {
                out.push_str(&format!("ces_watched_objects{{kind=\"{kind}\"}} {}\n", m.len()));
            }
            out
        })
    }
}

/// The Event a status change deserves: `(type, reason, note)` with a stable reason code, or `None` when the
/// conditions' statuses and reasons did not change (an observed generation alone is not news).
pub fn event_for(
    before: Option<&ResourceStatus>,
    after: &ResourceStatus,
) -> Option<(&'static str, &'static str, String)> {
    let sig = |s: &ResourceStatus| {
        s.conditions.iter().map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone())).collect::<Vec<_>>()
    };
    if before.is_some_and(|b| sig(b) == sig(after)) {
        return None;
    }
    let cond = |t: &str| after.conditions.iter().find(|c| c.type_ == t);
    let accepted = cond(ces_api::CONDITION_ACCEPTED);
    let programmed = cond(status::CONDITION_PROGRAMMED);
    match (accepted, programmed) {
        (Some(a), _) if a.status == "False" => {
            let reason = match a.reason.as_str() {
                "ExternalServiceNotFound" | "ExternalServiceInvalid" | "ServiceNotFound" => "InvalidReference",
                _ => "InvalidSpec",
            };
            let kept =
                programmed.filter(|p| p.reason == ces_sync::LAST_GOOD_VERSION_KEPT).map(|p| format!("; {}", p.message));
            Some(("Warning", reason, format!("{}: {}{}", a.reason, a.message, kept.unwrap_or_default())))
        }
        (_, Some(p)) if p.status == "False" => {
            Some(("Warning", "BackendRejected", format!("{}: {}", p.reason, p.message)))
        }
        (_, Some(p)) => Some(("Normal", "Synced", p.message.clone())),
        _ => None,
    }
}

async fn client(kubeconfig: Option<PathBuf>) -> Result<Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| format!("no Kubernetes configuration: {e}"))?,
    };
    Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))
}

impl Source for KubeSource {
    fn version(&mut self) -> Result<u64, String> {
        let mut v = self.events.load(Ordering::Relaxed);
        if let Some(c) = &self.config {
            v = v.wrapping_mul(31).wrapping_add(stamp(c));
        }
        Ok(v)
    }

    fn load(&mut self) -> Result<(Snapshot, CesConfig), String> {
        let config = match &self.config {
            Some(p) => CesConfig::from_file(p).map_err(|e| e.to_string())?,
            None => CesConfig::embedded_default(),
        };
        let mut o = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        let missing: Vec<&str> = self.kinds.iter().map(|k| k.kind).filter(|k| !o.synced.contains(k)).collect();
        if !missing.is_empty() {
            let why: Vec<String> =
                missing.iter().filter_map(|k| o.errors.get(k).map(|e| format!("{k}: {e}"))).collect();
            return Err(format!(
                "waiting for the first list of {}{}",
                missing.join(", "),
                if why.is_empty() { String::new() } else { format!(" ({})", why.join("; ")) }
            ));
        }
        let snapshot = ces_snapshot::manifests::build_objects(o.parsed.values().flat_map(|m| m.values()));
        o.dirty_pods.clear();
        o.dirty_endpoints.clear();
        o.other_changed = false;
        self.config_stamp = self.config.as_deref().map(stamp);
        self.kept.clear();
        self.loaded = CES_KINDS
            .iter()
            .flat_map(|k| {
                o.by_kind
                    .get(k.kind)
                    .into_iter()
                    .flatten()
                    .map(|((ns, name), v)| ((k.kind.to_string(), ns.clone(), name.clone()), v.clone()))
            })
            .collect();
        Ok((snapshot, config))
    }

    /// Churn: the pods whose events arrived since the last load or update, and the endpoints of the namespaces whose
    /// EndpointSlices (or Endpoints) changed, moved in the loop's snapshot; each object parsed when its event arrived.
    /// Any other change (another kind, a relist, the config, an object that does not read cleanly) leaves it to
    /// `load`.
    fn update(&mut self, snapshot: &mut Snapshot) -> Result<Option<Churn>, String> {
        if self.config.as_deref().map(stamp) != self.config_stamp {
            return Ok(None);
        }
        let mut o = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        if o.other_changed {
            return Ok(None);
        }
        let names = |d: &ces_model::Diagnostic, kinds: &[&str], ns: &str, name: Option<&str>| {
            d.object.as_ref().is_some_and(|r| {
                kinds.contains(&r.kind.as_str())
                    && r.namespace.as_deref() == Some(ns)
                    && name.is_none_or(|n| r.name == n)
            })
        };
        let mut churn = Churn::default();
        for (ns, name) in std::mem::take(&mut o.dirty_pods) {
            let after = match o.parsed.get(POD.kind).and_then(|m| m.get(&(ns.clone(), name.clone()))) {
                None => None,
                Some(p) => {
                    let one = ces_snapshot::manifests::build_objects([p]);
                    if !one.diagnostics.is_empty() {
                        return Ok(None);
                    }
                    one.pods.into_iter().next()
                }
            };
            if snapshot.diagnostics.iter().any(|d| names(d, &[POD.kind], &ns, Some(&name))) {
                return Ok(None);
            }
            let before = snapshot.pod(&ns, &name).cloned();
            if before != after {
                churn.pods.push(PodChange { before, after });
            }
        }
        for ns in std::mem::take(&mut o.dirty_endpoints) {
            let Some(after) = o.endpoints_in(&ns) else { return Ok(None) };
            if snapshot.diagnostics.iter().any(|d| names(d, &[ENDPOINTS.kind, ENDPOINT_SLICE.kind], &ns, None)) {
                return Ok(None);
            }
            let before = snapshot.endpoints.range((ns.clone(), String::new())..).take_while(|((n, _), _)| *n == ns);
            churn.endpoints.extend(ces_snapshot::endpoint_changes_between(before, &after));
        }
        if snapshot.apply_churn(&churn).is_err() {
            return Ok(None);
        }
        Ok(Some(churn))
    }

    fn last_good(&mut self, _snapshot: &Snapshot, model: &PolicyModel) -> Option<(Snapshot, Vec<ces_sync::Kept>)> {
        let o = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        let mut swap: HashMap<(String, String, String), Value> = HashMap::new();
        let mut kept = Vec::new();
        for d in model.errors() {
            let Some(obj) = &d.object else { continue };
            let Some(kind) = CES_KINDS.iter().find(|k| k.kind == obj.kind) else { continue };
            let key = (
                kind.kind.to_string(),
                obj.namespace.clone().filter(|_| kind.namespaced).unwrap_or_default(),
                obj.name.clone(),
            );
            let (Some(good), Some(current)) =
                (self.good.get(&key), o.by_kind.get(kind.kind).and_then(|m| m.get(&(key.1.clone(), key.2.clone()))))
            else {
                continue;
            };
            if good != current && !swap.contains_key(&key) {
                kept.push(ces_sync::Kept {
                    object: obj.clone(),
                    generation: good.pointer("/metadata/generation").and_then(Value::as_i64),
                });
                swap.insert(key, good.clone());
            }
        }
        self.kept = swap.keys().cloned().collect();
        if swap.is_empty() {
            return None;
        }
        let swapped: HashMap<(String, String, String), ParsedObject> =
            swap.iter().map(|(k, v)| (k.clone(), parse_object(v.clone(), &origin(&k.0, &k.1, &k.2)))).collect();
        let snapshot = ces_snapshot::manifests::build_objects(o.parsed.iter().flat_map(|(kind, m)| {
            let swapped = &swapped;
            m.iter().map(move |((ns, name), p)| swapped.get(&(kind.to_string(), ns.clone(), name.clone())).unwrap_or(p))
        }));
        Some((snapshot, kept))
    }

    fn report(&mut self, model: &PolicyModel, report: &Report<'_>) {
        // Remember what compiled (as it was loaded), for the next time an edit breaks it.
        {
            let failing: std::collections::HashSet<&ObjectRef> =
                model.errors().filter_map(|d| d.object.as_ref()).collect();
            for (key, v) in &self.loaded {
                let namespaced = CES_KINDS.iter().any(|k| k.kind == key.0 && k.namespaced);
                let object = ObjectRef::new(&key.0, namespaced.then_some(key.1.as_str()), &key.2);
                if !failing.contains(&object) && !self.kept.contains(key) {
                    self.good.insert(key.clone(), v.clone());
                }
            }
            let loaded = &self.loaded;
            self.good.retain(|k, _| loaded.contains_key(k));
        }
        let Some(manager) = self.field_manager.clone() else { return };
        let now = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        // What to write: every CES object whose status differs from what it has.
        let mut writes: Vec<(Kind, String, String, Value, ResourceStatus)> = Vec::new();
        {
            let o = self.objects.lock().unwrap_or_else(|p| p.into_inner());
            for kind in CES_KINDS {
                for ((ns, name), v) in o.by_kind.get(kind.kind).into_iter().flatten() {
                    let key = (kind.kind.to_string(), ns.clone(), name.clone());
                    let object = ObjectRef::new(kind.kind, kind.namespaced.then_some(ns.as_str()), name);
                    let generation = v.pointer("/metadata/generation").and_then(Value::as_i64);
                    let current: Option<ResourceStatus> =
                        v.get("status").and_then(|s| serde_json::from_value(s.clone()).ok());
                    let previous = self.written.get(&key).cloned().or(current.clone());
                    let mut status = status::status_of(model, report, &object, generation, previous.as_ref(), &now);
                    status.scope = status::scope_of(kind.kind, &v["spec"]);
                    if current.as_ref() == Some(&status) || self.written.get(&key) == Some(&status) {
                        continue;
                    }
                    writes.push((kind, ns.clone(), name.clone(), v.clone(), status));
                }
            }
        }
        for (kind, ns, name, _v, status) in writes {
            let api: Api<DynamicObject> = if kind.namespaced {
                Api::namespaced_with(self.client.clone(), &ns, &kind.resource())
            } else {
                Api::all_with(self.client.clone(), &kind.resource())
            };
            let mut metadata = json!({"name": name});
            if kind.namespaced {
                metadata["namespace"] = json!(ns);
            }
            let body =
                json!({"apiVersion": kind.api_version(), "kind": kind.kind, "metadata": metadata, "status": status});
            let params = PatchParams::apply(&manager).force();
            let r = self.runtime.block_on(api.patch_status(&name, &params, &Patch::Apply(&body)));
            match r {
                Ok(_) => {
                    self.status_writes += 1;
                    let key = (kind.kind.to_string(), ns.clone(), name.clone());
                    let before = self.written.get(&key).cloned().or_else(|| {
                        _v.get("status").and_then(|s| serde_json::from_value::<ResourceStatus>(s.clone()).ok())
                    });
                    if let Some((kind_of_event, reason, note)) = event_for(before.as_ref(), &status) {
                        self.event(&kind, &ns, &name, &_v, kind_of_event, reason, &note, &manager);
                    }
                    self.written.insert(key, status);
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    self.status_errors += 1;
                    (self.warn)(&format!("status of {} {ns}/{name} not written: {e}", kind.kind));
                }
            }
        }
        // Forget objects that are gone.
        let o = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        self.written.retain(|(k, ns, n), _| {
            o.by_kind.get(k.as_str()).is_some_and(|m| m.contains_key(&(ns.clone(), n.clone())))
        });
    }
}
