//! The offline source: YAML (or JSON) manifest files and folders into a [`Snapshot`].
//!
//! Each document parses on its own, so one malformed document is reported and the others still load. Kinds CES does
//! not read (Deployments, ConfigMaps, ...) are skipped; an unknown kind in a CES API group is an error.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ces_api::{ClusterEgressRule, ExternalIPRule, ExternalService, NamespaceEgressRule, ServiceEgressRule};
use ces_model::{Diagnostic, ObjectRef, Severity};
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use kube::core::ObjectMeta;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{Endpoint, Namespace, OVN_CIDR_ANNOTATION, Object, Pod, Service, Snapshot, SnapshotBuilder};

/// Files larger than this are refused rather than read into memory.
pub const MAX_FILE_BYTES: u64 = 256 * 1024 * 1024;

/// A path given to the loader that cannot be read at all. Problems inside files are diagnostics instead.
#[derive(Debug)]
pub struct LoadError {
    pub path: PathBuf,
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for LoadError {}

/// Counts of what a load read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadStats {
    pub files: usize,
    pub documents: usize,
    /// Documents of kinds CES does not read.
    pub skipped: usize,
    /// Where `ces-conf.yaml` documents were found among the manifests (`file:line`). They are not manifests and are
    /// not loaded as such; a config is given on its own (`--config`).
    pub configs: Vec<String>,
}

/// Loads every `.yaml`, `.yml` and `.json` file under the given files and folders (folders recursively, in name
/// order) into one snapshot.
pub fn load_paths(paths: &[PathBuf]) -> Result<(Snapshot, LoadStats), LoadError> {
    let mut b = SnapshotBuilder::new();
    let mut stats = LoadStats::default();
    for f in files(paths)? {
        stats.files += 1;
        for run in parse_file(&f)?.runs {
            run.apply(&mut b, &mut stats);
        }
    }
    Ok((b.build(), stats))
}

/// Every manifest file under the given files and folders (folders recursively, in name order).
pub fn files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, LoadError> {
    let mut files = Vec::new();
    for p in paths {
        collect_files(p, &mut files)?;
    }
    Ok(files)
}

/// One file's documents, parsed and typed but not yet in a snapshot. A source that watches files keeps them and
/// parses again only the files that change.
#[derive(Clone, Default)]
pub struct ParsedFile {
    runs: Vec<Items>,
}

/// Reads and parses one manifest file.
pub fn parse_file(f: &Path) -> Result<ParsedFile, LoadError> {
    let meta = std::fs::metadata(f).map_err(|e| LoadError { path: f.to_path_buf(), message: e.to_string() })?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(LoadError { path: f.to_path_buf(), message: format!("larger than {MAX_FILE_BYTES} bytes") });
    }
    let text = std::fs::read_to_string(f).map_err(|e| LoadError { path: f.to_path_buf(), message: e.to_string() })?;
    Ok(ParsedFile { runs: parse_text(&text, &f.display().to_string(), workers_for(&text)) })
}

/// The snapshot of several parsed files, in the order given (which decides, for duplicates, the one kept). The files
/// are kept (their documents are copied into the snapshot), for a source that parses again only what changes.
pub fn build(files: &[&ParsedFile]) -> (Snapshot, LoadStats) {
    let mut b = SnapshotBuilder::new();
    let mut stats = LoadStats::default();
    for f in files {
        stats.files += 1;
        for run in &f.runs {
            run.clone().apply(&mut b, &mut stats);
        }
    }
    (b.build(), stats)
}

/// Loads one manifest text; `name` is used in origins (`name:LINE`).
pub fn load_str(text: &str, name: &str) -> Snapshot {
    load_strs(&[(name, text)])
}

/// Loads several named manifest texts into one snapshot, as if they were files.
pub fn load_strs(texts: &[(&str, &str)]) -> Snapshot {
    let mut b = SnapshotBuilder::new();
    for (name, text) in texts {
        load_text(&mut b, text, name, &mut LoadStats::default());
    }
    b.build()
}

/// One object as an API server returns it, parsed and typed but not yet in a snapshot: a source that follows watch
/// events parses each object once, when it arrives, and builds snapshots from the parsed objects.
#[derive(Clone, Default)]
pub struct ParsedObject(Items);

/// Parses one object (a JSON value with `apiVersion` and `kind`); `origin` names it in diagnostics.
pub fn parse_object(value: Value, origin: &str) -> ParsedObject {
    let mut items = Items::default();
    load_value(&mut items, value, origin);
    ParsedObject(items)
}

/// The snapshot of parsed objects.
pub fn build_objects<'a>(objects: impl IntoIterator<Item = &'a ParsedObject>) -> Snapshot {
    let mut b = SnapshotBuilder::new();
    let mut stats = LoadStats::default();
    for o in objects {
        o.0.clone().apply(&mut b, &mut stats);
    }
    b.build()
}

/// Objects as an API server returns them (JSON values with `apiVersion` and `kind`), each with where it came from
/// (for diagnostics), into one snapshot: the same reading as manifests, so every source yields the same snapshot.
pub fn load_objects<'a>(objects: impl IntoIterator<Item = (&'a Value, String)>) -> Snapshot {
    let mut items = Items::default();
    for (value, origin) in objects {
        load_value(&mut items, value.clone(), &origin);
    }
    let mut b = SnapshotBuilder::new();
    items.apply(&mut b, &mut LoadStats::default());
    b.build()
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let err = |e: std::io::Error| LoadError { path: path.to_path_buf(), message: e.to_string() };
    let meta = std::fs::metadata(path).map_err(err)?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(path).map_err(err)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>().map_err(err)?;
    entries.sort();
    for e in entries {
        if e.is_dir() {
            collect_files(&e, out)?;
        } else if matches!(e.extension().and_then(|x| x.to_str()), Some("yaml" | "yml" | "json")) {
            out.push(e);
        }
    }
    Ok(())
}

/// Splits a YAML stream at `---` lines, in one pass. Returns each document's text with the 0-based line it starts
/// on. A document is a slice of the input, except when content follows `--- ` on the marker line.
fn split_documents(text: &str) -> Vec<(usize, std::borrow::Cow<'_, str>)> {
    use std::borrow::Cow;
    let mut docs = Vec::new();
    // The current document: its first line, where its text starts, and text put before it on its marker line.
    let (mut start_line, mut start_byte, mut head): (usize, usize, Option<&str>) = (0, 0, None);
    let mut offset = 0;
    fn close<'t>(docs: &mut Vec<(usize, Cow<'t, str>)>, line: usize, body: &'t str, head: Option<&str>) {
        docs.push((
            line,
            match head {
                None => Cow::Borrowed(body),
                Some(h) => Cow::Owned(format!("{h}\n{body}")),
            },
        ));
    }
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker = bare.starts_with("---") && bare[3..].chars().next().is_none_or(char::is_whitespace);
        if marker || bare == "..." {
            close(&mut docs, start_line, &text[start_byte..offset], head);
            // Content after `--- ` on the marker line belongs to the new document.
            head = (marker && bare.len() > 3).then(|| &bare[3..]);
            start_line = if head.is_some() { i } else { i + 1 };
            start_byte = offset + line.len();
        }
        offset += line.len();
    }
    close(&mut docs, start_line, &text[start_byte..], head);
    docs
}

/// Parse options for one document of `len` bytes. The node and event budgets grow with the text: a document without
/// aliases has at most about one node per byte, so real inputs (a `kubectl get -o yaml` List of thousands of pods)
/// always fit, while aliases that expand far beyond the text (an "alias bomb") are still refused.
fn parse_options(len: usize) -> serde_saphyr::Options {
    let defaults = serde_saphyr::Budget::default();
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_nodes: defaults.max_nodes.max(len + 64),
            max_events: defaults.max_events.max(2 * len + 128),
            max_total_scalar_bytes: defaults.max_total_scalar_bytes.max(len),
        },
    }
}

/// What loading a run of documents found, in document order: applied to the builder afterwards, so documents can
/// be parsed on several threads while duplicates and diagnostics keep the order of the files.
#[derive(Clone, Default)]
struct Items {
    items: Vec<Item>,
    stats: LoadStats,
}

#[derive(Clone)]
enum Item {
    Diagnostic(Diagnostic),
    Namespace(Namespace, String),
    Pod(Pod, String),
    Service(Service, String),
    Endpoints(String, String, Vec<Endpoint>),
    ExternalService(Object<ces_api::ExternalServiceSpec>),
    ClusterRule(Object<ces_api::ClusterEgressRuleSpec>),
    NamespaceRule(Object<ces_api::NamespaceEgressRuleSpec>),
    ServiceRule(Object<ces_api::ServiceEgressRuleSpec>),
    ExternalIpRule(Object<ces_api::ExternalIPRuleSpec>),
}

impl Items {
    fn diagnostic(&mut self, d: Diagnostic) {
        self.items.push(Item::Diagnostic(d));
    }

    fn apply(self, b: &mut SnapshotBuilder, stats: &mut LoadStats) {
        stats.documents += self.stats.documents;
        stats.skipped += self.stats.skipped;
        stats.configs.extend(self.stats.configs);
        for item in self.items {
            match item {
                Item::Diagnostic(d) => b.diagnostic(d),
                Item::Namespace(n, origin) => b.add_namespace(n, Some(origin)),
                Item::Pod(p, origin) => b.add_pod(p, Some(origin)),
                Item::Service(svc, origin) => b.add_service(svc, Some(origin)),
                Item::Endpoints(ns, svc, eps) => b.add_endpoints(&ns, &svc, eps),
                Item::ExternalService(o) => b.add_external_service(o),
                Item::ClusterRule(o) => b.add_cluster_rule(o),
                Item::NamespaceRule(o) => b.add_namespace_rule(o),
                Item::ServiceRule(o) => b.add_service_rule(o),
                Item::ExternalIpRule(o) => b.add_external_ip_rule(o),
            }
        }
    }
}

/// Whether documents go through the fast path first (on by default; tests and benchmarks compare both ways).
static FAST_YAML: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the fast YAML path (fastyaml.rs) on or off for this process: for tests and benchmarks that compare it with
/// serde-saphyr alone. The result is the same either way; only the speed differs.
pub fn set_fast_yaml(on: bool) {
    FAST_YAML.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// One YAML document to an untyped value, parsed as the loader parses it (the fast path, then serde-saphyr): the
/// scale benchmark's baseline.
pub fn parse_document(doc: &str) -> Result<Value, String> {
    parse_value(doc).map_err(|e| e.to_string())
}

/// One document: the fast path when it is on and decides it, else serde-saphyr (whose errors the loader reports).
fn parse_value(doc: &str) -> Result<Value, serde_saphyr::Error> {
    if FAST_YAML.load(std::sync::atomic::Ordering::Relaxed)
        && let Some(v) = fastyaml::parse(doc)
    {
        return Ok(v);
    }
    serde_saphyr::from_str_with_options::<Value>(doc, parse_options(doc.len()))
}

/// Below this many bytes a text is loaded on the calling thread: threads would cost more than they save.
const PARALLEL_BYTES: usize = 256 * 1024;

fn workers_for(text: &str) -> usize {
    if text.len() < PARALLEL_BYTES { 1 } else { std::thread::available_parallelism().map_or(1, |n| n.get()) }
}

fn load_text(b: &mut SnapshotBuilder, text: &str, file: &str, stats: &mut LoadStats) {
    load_text_on(b, text, file, stats, workers_for(text));
}

/// Loads a text with up to `workers` threads.
fn load_text_on(b: &mut SnapshotBuilder, text: &str, file: &str, stats: &mut LoadStats, workers: usize) {
    for items in parse_text(text, file, workers) {
        items.apply(b, stats);
    }
}

/// Parses a text into runs of items, in document order, with up to `workers` threads.
fn parse_text(text: &str, file: &str, workers: usize) -> Vec<Items> {
    let docs = split_documents(text);
    let workers = workers.min(docs.len()).max(1);
    if workers == 1 {
        return vec![load_documents(&docs, file)];
    }
    // Contiguous runs of about equal size, one per worker.
    let per = text.len().div_ceil(workers);
    let mut runs: Vec<&[(usize, std::borrow::Cow<'_, str>)]> = Vec::with_capacity(workers);
    let (mut from, mut bytes) = (0, 0);
    for (i, (_, d)) in docs.iter().enumerate() {
        bytes += d.len();
        if bytes >= per && runs.len() + 1 < workers {
            runs.push(&docs[from..=i]);
            (from, bytes) = (i + 1, 0);
        }
    }
    runs.push(&docs[from..]);
    std::thread::scope(|scope| {
        let handles: Vec<_> = runs.into_iter().map(|run| scope.spawn(move || load_documents(run, file))).collect();
        handles.into_iter().map(|h| h.join().expect("a loader thread panicked")).collect()
    })
}

#[cfg(test)]
thread_local! {
    /// Bytes handed to the YAML parser on this thread: the tests check that loading is linear in the input.
    static PARSER_BYTES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn load_documents(docs: &[(usize, std::borrow::Cow<'_, str>)], file: &str) -> Items {
    let mut out = Items::default();
    for (start, doc) in docs {
        if doc.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
            continue;
        }
        let origin = format!("{file}:{}", start + 1);
        #[cfg(test)]
        PARSER_BYTES.with(|b| b.set(b.get() + doc.len()));
        // The fast path decides most documents; what it does not decide exactly as serde-saphyr does, and every
        // error, is parsed by serde-saphyr (fastyaml.rs).
        match parse_value(doc) {
            Ok(Value::Null) => {}
            Ok(value) if is_config(&value) => out.stats.configs.push(origin),
            Ok(value) => {
                out.stats.documents += 1;
                load_value(&mut out, value, &origin);
            }
            Err(e) => out.diagnostic(Diagnostic {
                severity: Severity::Error,
                object: None,
                origin: Some(origin),
                reason: "InvalidYAML".into(),
                message: yaml_error_message(&e, *start),
            }),
        }
    }
    out
}

/// A parse error in the file's terms: its own line numbers, and a budget breach said plainly.
fn yaml_error_message(e: &serde_saphyr::Error, start: usize) -> String {
    let options = serde_saphyr::render_options! { line_offset: start as u64, snippets: serde_saphyr::SnippetMode::Off };
    let message = first_line(&e.render_with_options(options));
    if message.contains("budget") {
        format!(
            "the document expands to far more YAML nodes than its text holds (aliases that multiply, an \"alias bomb\"?); refused ({message})"
        )
    } else {
        message
    }
}

/// A `ces-conf.yaml` that sits among the manifests: no apiVersion or kind, and the config's own keys.
fn is_config(v: &Value) -> bool {
    v.get("apiVersion").is_none()
        && v.get("kind").is_none()
        && (v.get("clusterName").is_some() || v.get("tenant").is_some())
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).trim_start_matches("error: ").to_string()
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn load_value(b: &mut Items, value: Value, origin: &str) {
    let bad = |reason: &str, message: String| Diagnostic {
        severity: Severity::Error,
        object: None,
        origin: Some(origin.to_string()),
        reason: reason.into(),
        message,
    };
    if !value.is_object() {
        b.diagnostic(bad("InvalidManifest", "a manifest must be a mapping with apiVersion and kind".into()));
        return;
    }
    let (Some(api_version), Some(kind)) = (str_field(&value, "apiVersion"), str_field(&value, "kind")) else {
        b.diagnostic(bad("InvalidManifest", "apiVersion and kind are required".into()));
        return;
    };
    let (api_version, kind) = (api_version.to_string(), kind.to_string());
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);

    if kind.ends_with("List") && value.get("items").is_some_and(Value::is_array) {
        if let Value::Object(mut map) = value
            && let Some(Value::Array(items)) = map.remove("items")
        {
            for item in items {
                load_value(b, item, origin);
            }
        }
        return;
    }

    let name = value.pointer("/metadata/name").and_then(Value::as_str).map(str::to_string);
    let namespace = value.pointer("/metadata/namespace").and_then(Value::as_str).map(str::to_string);
    let object_ref =
        |kind: &str| ObjectRef::new(kind, namespace.as_deref().or(Some("default")), name.as_deref().unwrap_or(""));

    macro_rules! typed {
        ($t:ty, $kind:literal, $cluster_scoped:expr) => {{
            let obj = if $cluster_scoped {
                ObjectRef::new($kind, None, name.as_deref().unwrap_or(""))
            } else {
                object_ref($kind)
            };
            match parse::<$t>(value, origin, &obj) {
                Ok(o) => Some(o),
                Err(d) => {
                    b.diagnostic(*d);
                    None
                }
            }
        }};
    }

    if name.as_deref().is_none_or(str::is_empty) {
        let message = match value.pointer("/metadata/name") {
            Some(v) if !v.is_null() && !v.is_string() => format!(
                "{kind}: metadata.name must be a string, not `{v}` (YAML reads unquoted y, n, yes, no, on, off as booleans: quote the name)"
            ),
            _ => format!("{kind}: metadata.name is required"),
        };
        b.diagnostic(bad("InvalidManifest", message));
        return;
    }

    match (api_version.as_str(), kind.as_str()) {
        ("kubeovn.io/v1alpha1", "ExternalService") => {
            if let Some(o) = typed!(ExternalService, "ExternalService", false) {
                b.items.push(Item::ExternalService(object(o.metadata, o.spec, origin)));
            }
        }
        ("kubeovn.io/v1alpha1", "ClusterEgressRule") => {
            if let Some(o) = typed!(ClusterEgressRule, "ClusterEgressRule", true) {
                b.items.push(Item::ClusterRule(object(o.metadata, o.spec, origin)));
            }
        }
        ("kubeovn.io/v1alpha1", "NamespaceEgressRule") => {
            if let Some(o) = typed!(NamespaceEgressRule, "NamespaceEgressRule", false) {
                b.items.push(Item::NamespaceRule(object(o.metadata, o.spec, origin)));
            }
        }
        ("kubeovn.io/v1alpha1", "ServiceEgressRule") => {
            if let Some(o) = typed!(ServiceEgressRule, "ServiceEgressRule", false) {
                b.items.push(Item::ServiceRule(object(o.metadata, o.spec, origin)));
            }
        }
        ("bigip.io/v1alpha1", "ExternalIPRule") => {
            if let Some(o) = typed!(ExternalIPRule, "ExternalIPRule", false) {
                b.items.push(Item::ExternalIpRule(object(o.metadata, o.spec, origin)));
            }
        }
        ("v1", "Namespace") => {
            if let Some(o) = typed!(core::Namespace, "Namespace", true) {
                add_namespace(b, o.metadata, origin);
            }
        }
        ("v1", "Pod") => {
            if let Some(o) = typed!(core::Pod, "Pod", false) {
                b.items.push(Item::Pod(pod(o), origin.to_string()));
            }
        }
        ("v1", "Service") => {
            if let Some(o) = typed!(core::Service, "Service", false) {
                let selector = o.spec.and_then(|s| s.selector).map(|m| m.into_iter().collect());
                let svc = Service { namespace: ns_of(&o.metadata), name: o.metadata.name.unwrap_or_default(), selector };
                b.items.push(Item::Service(svc, origin.to_string()));
            }
        }
        ("v1", "Endpoints") => {
            if let Some(o) = typed!(core::Endpoints, "Endpoints", false) {
                let ns = ns_of(&o.metadata);
                let ready = o.subsets.unwrap_or_default().into_iter().flat_map(|s| s.addresses.unwrap_or_default());
                let raw = ready.map(|a| (a.ip, target_pod(a.target_ref.as_ref(), &ns)));
                let eps = parse_endpoints(b, raw, origin, &object_ref("Endpoints"));
                let name = o.metadata.name.unwrap_or_default();
                b.items.push(Item::Endpoints(ns, name, eps));
            }
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            if let Some(o) = typed!(discovery::EndpointSlice, "EndpointSlice", false) {
                let service = o.metadata.labels.as_ref().and_then(|l| l.get("kubernetes.io/service-name")).cloned();
                if let Some(service) = service {
                    let ns = ns_of(&o.metadata);
                    // An endpoint whose ready condition is unknown (absent) counts as ready, as kube-proxy does.
                    let ready = o
                        .endpoints
                        .into_iter()
                        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                        .flat_map(|e| {
                            let pod = target_pod(e.target_ref.as_ref(), &ns);
                            e.addresses.into_iter().map(move |a| (a, pod.clone()))
                        });
                    let eps = parse_endpoints(b, ready, origin, &object_ref("EndpointSlice"));
                    b.items.push(Item::Endpoints(ns, service, eps));
                }
            }
        }
        _ if matches!(group, "kubeovn.io" | "bigip.io") => b.diagnostic(bad(
            "UnknownKind",
            format!("{api_version} {kind} is not a CES kind (expected kubeovn.io/v1alpha1 ExternalService, ClusterEgressRule, NamespaceEgressRule, ServiceEgressRule or bigip.io/v1alpha1 ExternalIPRule)"),
        )),
        _ => b.stats.skipped += 1,
    }
}

fn parse<T: DeserializeOwned>(value: Value, origin: &str, obj: &ObjectRef) -> Result<T, Box<Diagnostic>> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        Box::new(Diagnostic {
            severity: Severity::Error,
            object: Some(obj.clone()),
            origin: Some(origin.to_string()),
            reason: "InvalidSpec".into(),
            message: if path == "." { inner } else { format!("{path}: {inner}") },
        })
    })
}

fn ns_of(meta: &ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_else(|| "default".to_string())
}

fn object<S>(meta: ObjectMeta, spec: S, origin: &str) -> Object<S> {
    Object {
        namespace: meta.namespace,
        name: meta.name.unwrap_or_default(),
        uid: meta.uid,
        generation: meta.generation,
        origin: Some(origin.to_string()),
        spec,
    }
}

/// The pod an endpoint's `targetRef` names, as `(namespace, name)`; its namespace defaults to the endpoint's.
fn target_pod(r: Option<&core::ObjectReference>, ns: &str) -> Option<crate::Key> {
    let r = r.filter(|r| r.kind.as_deref() == Some("Pod"))?;
    Some((r.namespace.clone().unwrap_or_else(|| ns.to_string()), r.name.clone()?))
}

fn parse_endpoints(
    b: &mut Items,
    raw: impl Iterator<Item = (String, Option<crate::Key>)>,
    origin: &str,
    obj: &ObjectRef,
) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for (s, pod) in raw {
        match s.parse::<IpAddr>() {
            Ok(ip) => out.push(Endpoint { ip, pod }),
            Err(_) => b.diagnostic(Diagnostic {
                severity: Severity::Warning,
                object: Some(obj.clone()),
                origin: Some(origin.to_string()),
                reason: "InvalidAddress".into(),
                message: format!("`{s}` is not an IP address; ignored"),
            }),
        }
    }
    out
}

fn add_namespace(b: &mut Items, meta: ObjectMeta, origin: &str) {
    let name = meta.name.unwrap_or_default();
    let mut cidrs = Vec::new();
    if let Some(raw) = meta.annotations.as_ref().and_then(|a| a.get(OVN_CIDR_ANNOTATION)) {
        for part in raw.split([',', ';']).map(str::trim).filter(|p| !p.is_empty()) {
            match part.parse::<ipnet::IpNet>() {
                Ok(n) => cidrs.push(n.trunc()),
                Err(_) => b.diagnostic(Diagnostic {
                    severity: Severity::Warning,
                    object: Some(ObjectRef::new("Namespace", None, &name)),
                    origin: Some(origin.to_string()),
                    reason: "InvalidAnnotation".into(),
                    message: format!("{OVN_CIDR_ANNOTATION}: `{part}` is not a CIDR; ignored"),
                }),
            }
        }
    }
    let labels = meta.labels.unwrap_or_default().into_iter().collect();
    b.items.push(Item::Namespace(Namespace { name, labels, cidrs }, origin.to_string()));
}

fn pod(p: core::Pod) -> Pod {
    let status = p.status.unwrap_or_default();
    let finished = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    let mut ips: Vec<IpAddr> = status.pod_ips.unwrap_or_default().iter().filter_map(|i| i.ip.parse().ok()).collect();
    if ips.is_empty()
        && let Some(ip) = status.pod_ip.as_deref().and_then(|s| s.parse().ok())
    {
        ips.push(ip);
    }
    if finished {
        ips.clear();
    }
    let ready = match &status.conditions {
        Some(c) if !c.is_empty() => c.iter().any(|c| c.type_ == "Ready" && c.status == "True"),
        _ => status.phase.as_deref() == Some("Running"),
    };
    Pod {
        namespace: ns_of(&p.metadata),
        name: p.metadata.name.unwrap_or_default(),
        labels: p.metadata.labels.unwrap_or_default().into_iter().collect(),
        ips,
        ready: ready && !finished,
        host_network: p.spec.and_then(|s| s.host_network).unwrap_or(false),
    }
}

mod fastyaml;

#[cfg(test)]
mod tests;
