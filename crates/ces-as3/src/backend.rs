//! The AS3 backend of the sync loop: the least traffic that brings each tenant to the desired declaration.
//!
//! - A tenant is read (`GET …/declare/<tenant>?showHash=true`) when the backend knows nothing of it (start, retry,
//!   resync): the declaration on the device is compared with the desired one, so an existing configuration is
//!   adopted without a POST when it already matches, and drift is repaired when it does not.
//! - When only address lists changed (pod churn), they are replaced with one AS3 `PATCH` per tenant.
//! - Otherwise the tenant is POSTed whole, with the `optimisticLockKey` read from the device, so a tenant changed by
//!   someone else meanwhile is re-read rather than overwritten blindly.
//! - Nothing is sent for a tenant whose document is invalid under the schema; the other tenants proceed.
//! - Policy bindings (global context, route domains) are read and patched only when they differ.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ces_model::{Diagnostic, ObjectRef, PolicyModel, Severity};
use jiff::Timestamp;
use serde_json::{Value, json};

use crate::client::{Client, ClientError, Request};
use crate::facts::{Facts, version_key};
use crate::render::{Binding, Rendered, render_checked, source_addresses};
use crate::schema::Schema;

pub struct As3Backend {
    pub client: Client,
    schemas: BTreeMap<String, Arc<Schema>>,
    schema_dir: Option<std::path::PathBuf>,
    /// What each tenant holds on the device, as far as we know (without its lock key), and that key.
    device: BTreeMap<String, (Option<Value>, Option<String>)>,
    bound: BTreeSet<Binding>,
    /// Problems of the last apply, each naming the rules behind it: invalid documents, refused declarations.
    pub problems: Vec<Diagnostic>,
    /// The instant documents are rendered for; `None`: now (tests pin it).
    pub at: Option<Timestamp>,
    /// What the renderer could not declare in the last apply (wildcards, rates, rules without sources).
    pub render_diagnostics: Vec<Diagnostic>,
    /// The documents of the last apply that every tenant took, kept for pod churn (`apply_pods`).
    last: Option<Rendered>,
    /// The AS3 version the device runs (`GET /mgmt/shared/appsvcs/info`), read at the first pass and every full one.
    pub device_version: Option<String>,
    /// What the version of the last pass can express (whether Common takes a lock key).
    facts: Option<Facts>,
    /// This cluster's `clusterName`, and whether it is the master cluster (`clusterName == masterCluster`).
    cluster: String,
    master: bool,
    /// How many times a declaration refused for a changed lock key is read, merged and sent again in one pass.
    pub conflict_attempts: u32,
}

/// What was done to one tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TenantOutcome {
    Unchanged,
    Patched(usize),
    Posted,
    Invalid,
    Failed(String),
    /// Gone from ces-conf.yaml, and deleted from the device (it carried this cluster's remark).
    Deleted,
}

impl As3Backend {
    /// The documents of the last apply that every tenant took.
    pub fn rendered(&self) -> Option<&Rendered> {
        self.last.as_ref()
    }

    /// `schema_dir` holds the official schema files; without it nothing is sent to a device (a dry run may go on,
    /// unvalidated, and says so).
    pub fn new(client: Client, schema_dir: Option<std::path::PathBuf>) -> Result<As3Backend, String> {
        if schema_dir.is_none() && client.is_device() {
            return Err("no AS3 schema folder (--as3-schema or CES_AS3_SCHEMA_DIR): CES never sends a declaration \
                        it has not validated"
                .into());
        }
        Ok(As3Backend {
            client,
            schemas: BTreeMap::new(),
            schema_dir,
            device: BTreeMap::new(),
            bound: BTreeSet::new(),
            problems: Vec::new(),
            at: None,
            render_diagnostics: Vec::new(),
            last: None,
            device_version: None,
            facts: None,
            cluster: String::new(),
            master: true,
            conflict_attempts: 8,
        })
    }

    fn schema(&mut self, version: &str) -> Result<Option<Arc<Schema>>, String> {
        let Some(dir) = &self.schema_dir else { return Ok(None) };
        if !self.schemas.contains_key(version) {
            let s = Schema::load(dir, version)?;
            self.schemas.insert(version.to_string(), Arc::new(s));
        }
        Ok(self.schemas.get(version).cloned())
    }

    fn problem(&mut self, origins: Vec<ObjectRef>, reason: &str, message: String) {
        if origins.is_empty() {
            self.problems.push(Diagnostic {
                severity: Severity::Error,
                object: None,
                origin: None,
                reason: reason.into(),
                message: message.clone(),
            });
        }
        for o in origins {
            self.problems.push(Diagnostic {
                severity: Severity::Error,
                object: Some(o),
                origin: None,
                reason: reason.into(),
                message: message.clone(),
            });
        }
    }

    /// The rules behind the objects an error message names (`/tenant/Shared/object…`); all the tenant's rules when
    /// it names none.
    fn origins_in(rendered: &Rendered, tenant: &str, text: &str) -> Vec<ObjectRef> {
        let mut out: Vec<ObjectRef> = Vec::new();
        if let Some(objects) = rendered.origins.get(tenant) {
            let marker = format!("/{tenant}/Shared/");
            for (i, _) in text.match_indices(&marker) {
                let rest = &text[i + marker.len()..];
                let name: String =
                    rest.chars().take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')).collect();
                for o in objects.get(&name).into_iter().flatten() {
                    if !out.contains(o) {
                        out.push(o.clone());
                    }
                }
            }
            if out.is_empty() {
                // The device named no object of ours: every rule of the tenant is not programmed.
                for o in objects.values().flatten() {
                    if !out.contains(o) {
                        out.push(o.clone());
                    }
                }
            }
        }
        out
    }

    /// Deletes the tenants this cluster declared (they carry its remark, or its objects) that the policy no longer
    /// has: those on the device, and those this backend declared itself (a dry run shows their DELETE). Common is
    /// never deleted. A tenant another cluster or tool declared is left alone; one that holds another cluster's
    /// objects too is declared again without this cluster's ([`crate::shared::merge`]).
    fn delete_gone_tenants(
        &mut self,
        model: &PolicyModel,
        rendered: &Rendered,
        full: bool,
        outcomes: &mut BTreeMap<String, TenantOutcome>,
    ) {
        let cluster = model.settings.cluster_name.clone();
        let remark = crate::render::tenant_remark(&cluster);
        let ours = |decl: &Value| {
            decl.get("remark").and_then(Value::as_str) == Some(remark.as_str())
                || crate::shared::has_own(decl, &cluster)
        };
        let mut gone: BTreeSet<String> = self
            .device
            .iter()
            .filter(|(t, (current, _))| current.as_ref().is_some_and(ours) && !rendered.documents.contains_key(*t))
            .map(|(t, _)| t.clone())
            .collect();
        // The device is listed on full passes (the resync) and when the policy's tenants change: a GET of every
        // declaration is not for every pass.
        let tenants_changed = self.last.as_ref().is_none_or(|l| l.documents.keys().ne(rendered.documents.keys()));
        if self.client.is_device() && (full || tenants_changed) {
            match self.client.call(&Request { method: "GET", path: "/mgmt/shared/appsvcs/declare".into(), body: None })
            {
                Ok(r) => {
                    for (t, decl) in r.body.as_object().into_iter().flatten() {
                        let tenant = decl.get("class").and_then(Value::as_str) == Some("Tenant");
                        if tenant && ours(decl) && !rendered.documents.contains_key(t) {
                            gone.insert(t.clone());
                        }
                    }
                }
                Err(e) => self.problem(Vec::new(), "NotDeleted", format!("listing the device's tenants: {e}")),
            }
        }
        gone.remove(ces_model::COMMON_TENANT);
        for t in gone {
            if self.client.is_device() {
                match self.leave_shared(model, &t) {
                    Ok(true) => {
                        outcomes.insert(t, TenantOutcome::Posted);
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        self.problem(Vec::new(), "NotDeleted", format!("tenant {t}: {e}"));
                        outcomes.insert(t, TenantOutcome::Failed(e.to_string()));
                        continue;
                    }
                }
            }
            let r = self.client.call(&Request {
                method: "DELETE",
                path: format!("/mgmt/shared/appsvcs/declare/{t}"),
                body: None,
            });
            match r {
                Ok(_) => {
                    self.device.remove(&t);
                    self.bound.retain(|b| !b.policy.starts_with(&format!("/{t}/")));
                    outcomes.insert(t, TenantOutcome::Deleted);
                }
                Err(e) => {
                    self.problem(Vec::new(), "NotDeleted", format!("tenant {t}: {e}"));
                    outcomes.insert(t, TenantOutcome::Failed(e.to_string()));
                }
            }
        }
    }

    /// A tenant this cluster leaves that holds another cluster's objects: declared again without this cluster's
    /// (read, merged, sent with the lock key; again on a conflict). `false`: no other cluster's objects, delete it.
    fn leave_shared(&mut self, model: &PolicyModel, tenant: &str) -> Result<bool, ClientError> {
        let cluster = model.settings.cluster_name.clone();
        for attempt in 1.. {
            let (current, key) = self.read(tenant)?;
            let Some(current) = current.filter(|c| crate::shared::has_others(c, &cluster)) else { return Ok(false) };
            let Some(without) = crate::shared::merge(None, Some(&current), &cluster, self.master) else {
                return Ok(false);
            };
            let mut decl = without.clone();
            if let Some(k) = key {
                decl["optimisticLockKey"] = json!(k);
            }
            let body = crate::render::request_document(&model.settings.schema_version, tenant, decl);
            let path = format!("/mgmt/shared/appsvcs/declare/{tenant}?showHash=true");
            match self.client.call(&Request { method: "POST", path, body: Some(body) }) {
                Ok(_) => {
                    self.device.remove(tenant);
                    return Ok(true);
                }
                Err(ClientError::Conflict(_)) if attempt < self.conflict_attempts => continue,
                Err(e) => return Err(e),
            }
        }
        unreachable!("the loop returns")
    }

    /// Every rule behind an object of the tenant's document.
    fn tenant_origins(rendered: &Rendered, tenant: &str) -> Vec<ObjectRef> {
        let mut out: Vec<ObjectRef> = Vec::new();
        for o in rendered.origins.get(tenant).into_iter().flat_map(|m| m.values().flatten()) {
            if !out.contains(o) {
                out.push(o.clone());
            }
        }
        out
    }

    /// Marks every rule of `tenant` not yet named by a problem as not programmed: a tenant's declaration is sent, and
    /// taken, whole or not at all, so when it is not, none of its rules reached the device.
    fn tenant_not_programmed(&mut self, rendered: &Rendered, tenant: &str, why: &str) {
        let rest: Vec<ObjectRef> = Self::tenant_origins(rendered, tenant)
            .into_iter()
            .filter(|o| !self.problems.iter().any(|p| p.object.as_ref() == Some(o)))
            .collect();
        self.problem(rest, "NotProgrammed", format!("tenant {tenant}: {why}"));
    }

    /// Reads a tenant's declaration and lock key from the device.
    fn read(&mut self, tenant: &str) -> Result<(Option<Value>, Option<String>), ClientError> {
        let r = self.client.call(&Request {
            method: "GET",
            path: format!("/mgmt/shared/appsvcs/declare/{tenant}?showHash=true"),
            body: None,
        })?;
        let mut t = if r.status == 200 { r.body.get(tenant).cloned() } else { None };
        let key = t.as_mut().and_then(|t| t.as_object_mut()).and_then(|o| o.remove("optimisticLockKey"));
        Ok((t, key.and_then(|k| k.as_str().map(str::to_string))))
    }

    /// The PATCH operations that turn `current` into `desired` when they differ only in address lists.
    fn address_patch(tenant: &str, current: &Value, desired: &Value) -> Option<Vec<Value>> {
        // Compared in place: tenants of large clusters are tens of megabytes, and this runs on every pass.
        let is_list = |o: &Value| o.get("class").and_then(Value::as_str) == Some("Firewall_Address_List");
        let (Value::Object(cur), Value::Object(des)) = (current, desired) else { return None };
        if cur.len() != des.len() || cur.iter().any(|(k, v)| k != "Shared" && des.get(k) != Some(v)) {
            return None;
        }
        let (Some(a), Some(b)) =
            (cur.get("Shared").and_then(Value::as_object), des.get("Shared").and_then(Value::as_object))
        else {
            return None;
        };
        if a.len() != b.len() {
            return None;
        }
        let mut ops = Vec::new();
        for (k, v) in b {
            let old = a.get(k)?;
            if old == v {
                continue;
            }
            if !(is_list(old) && is_list(v)) {
                return None;
            }
            ops.push(json!({"op": "replace", "path": format!("/{tenant}/Shared/{k}"), "value": v}));
        }
        Some(ops)
    }

    /// The operations that bring `tenant` from what the device holds to `doc` when only address lists differ (empty:
    /// nothing differs); `None` when it needs a POST. Reads the device first when its state is not known (or `full`).
    fn list_ops(&mut self, tenant: &str, doc: &Value, full: bool) -> Result<Option<Vec<Value>>, ClientError> {
        if full || !self.device.contains_key(tenant) {
            let state = self.read(tenant)?;
            self.device.insert(tenant.to_string(), state);
        }
        // One walk over the tenant tells both: nothing differs (no operation), or only address lists do.
        let (current, _) = &self.device[tenant];
        let desired = self.desired(tenant, doc);
        Ok(current.as_ref().and_then(|cur| Self::address_patch(tenant, cur, &desired)))
    }

    /// The declaration to send for `tenant`: this cluster's, merged with the other clusters' objects the device
    /// holds ([`crate::shared::merge`]).
    fn desired<'d>(&self, tenant: &str, doc: &'d Value) -> std::borrow::Cow<'d, Value> {
        let ours = &doc["declaration"][tenant];
        let current = self.device.get(tenant).and_then(|(c, _)| c.as_ref());
        match crate::shared::merge(Some(ours), current, &self.cluster, self.master) {
            Some(merged) => std::borrow::Cow::Owned(merged),
            None => std::borrow::Cow::Borrowed(ours),
        }
    }

    /// Sends the address-list operations of one or more tenants as one PATCH (AS3 takes operations across tenants),
    /// so a pass costs the device one request, however many tenants it touches. A tenant whose result is an error
    /// fails the whole call; what the device holds is then read again before the next change.
    fn patch_lists(&mut self, ops: Vec<(String, Vec<Value>)>) -> Result<(), ClientError> {
        let body = Value::Array(ops.iter().flat_map(|(_, o)| o.iter().cloned()).collect());
        let r = self.client.call(&Request {
            method: "PATCH",
            path: "/mgmt/shared/appsvcs/declare".into(),
            body: Some(body),
        });
        let refused: Vec<String> = match &r {
            Ok(resp) => resp.body["results"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|x| x["code"].as_u64().is_some_and(|c| c >= 300))
                .map(|x| {
                    let parts = [&x["tenant"], &x["message"], &x["response"]];
                    parts.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(": ")
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        if r.is_err() || !refused.is_empty() {
            for (tenant, _) in &ops {
                self.device.remove(tenant);
            }
            r?;
            return Err(ClientError::Refused { status: 422, errors: refused });
        }
        // The device holds the patched lists now (kept in place: a tenant is megabytes); the lock key changed with
        // them, and the next POST reads it again.
        for (tenant, ops) in ops {
            if let Some((Some(cur), key)) = self.device.get_mut(&tenant) {
                for op in ops {
                    let name = op["path"].as_str().and_then(|p| p.rsplit('/').next()).unwrap_or_default().to_string();
                    cur["Shared"][name] = op["value"].clone();
                }
                *key = None;
            }
        }
        Ok(())
    }

    fn sync_tenant(&mut self, tenant: &str, doc: &Value, full: bool) -> Result<TenantOutcome, ClientError> {
        match self.list_ops(tenant, doc, full)? {
            Some(ops) if ops.is_empty() => return Ok(TenantOutcome::Unchanged),
            Some(ops) => {
                let n = ops.len();
                self.patch_lists(vec![(tenant.to_string(), ops)])?;
                return Ok(TenantOutcome::Patched(n));
            }
            None => {}
        }
        self.declare(tenant, doc)
    }

    /// Whether the tenant's declaration takes a lock key under this pass's AS3 version (Common does not before
    /// some version: 3.29 has none, 3.56 has it).
    fn lockable(&self, tenant: &str) -> bool {
        tenant != ces_model::COMMON_TENANT || self.facts.as_ref().is_none_or(|f| f.has("Common", "optimisticLockKey"))
    }

    /// POSTs the tenant whole, after reading its lock key when a PATCH left it unknown. A tenant that takes no lock
    /// key is read again right before, so what another cluster declared since the last pass is merged, not lost
    /// (what it declares between this read and the POST is: docs/as3.md, "Clusters side by side").
    fn declare(&mut self, tenant: &str, doc: &Value) -> Result<TenantOutcome, ClientError> {
        let (current, key) = &self.device[tenant];
        if ((current.is_some() && key.is_none()) || !self.lockable(tenant)) && self.client.is_device() {
            let state = self.read(tenant)?;
            self.device.insert(tenant.to_string(), state);
        }
        self.post(tenant, doc)
    }

    fn post(&mut self, tenant: &str, doc: &Value) -> Result<TenantOutcome, ClientError> {
        let desired = self.desired(tenant, doc).into_owned();
        let key = match self.device.get(tenant) {
            Some((current, _)) if current.as_ref() == Some(&desired) => return Ok(TenantOutcome::Unchanged),
            Some((_, key)) => key.clone(),
            None => None,
        };
        let mut body = doc.clone();
        body["declaration"][tenant] = desired.clone();
        // The Common tenant takes a lock key only from some AS3 version on (not 3.29): without one, it was read
        // right before ([`Self::declare`]).
        if let Some(k) = key.as_ref().filter(|_| self.lockable(tenant)) {
            body["declaration"][tenant]["optimisticLockKey"] = json!(k);
        }
        let r = self.client.call(&Request {
            method: "POST",
            path: format!("/mgmt/shared/appsvcs/declare/{tenant}?showHash=true"),
            body: Some(body),
        });
        match r {
            Ok(resp) => {
                let key = resp
                    .body
                    .pointer(&format!("/declaration/{tenant}/optimisticLockKey"))
                    .and_then(Value::as_str)
                    .map(str::to_string);
                self.device.insert(tenant.to_string(), (Some(desired), key));
                Ok(TenantOutcome::Posted)
            }
            Err(e) => {
                // Whatever happened, what the device holds is no longer known.
                self.device.remove(tenant);
                Err(e)
            }
        }
    }

    fn bind(&mut self, b: &Binding, full: bool) -> Result<bool, ClientError> {
        if !full && self.bound.contains(b) {
            return Ok(false);
        }
        let r = self.client.call(&Request { method: "GET", path: b.path.clone(), body: None })?;
        if r.status == 404 {
            return Err(ClientError::Refused {
                status: 404,
                errors: vec![format!("{} does not exist on the BIG-IP (create it; CES binds, never creates)", b.path)],
            });
        }
        let changed = r.body.get(&b.field).and_then(Value::as_str) != Some(b.policy.as_str());
        if changed {
            self.client.call(&Request {
                method: "PATCH",
                path: b.path.clone(),
                body: Some(json!({ &b.field: b.policy })),
            })?;
        }
        self.bound.retain(|x| !(x.path == b.path && x.field == b.field));
        self.bound.insert(b.clone());
        Ok(changed)
    }

    /// The AS3 version the device runs, read when not known yet (and on full passes); `Ok(None)` without a device.
    fn read_device_version(&mut self, full: bool) -> Result<Option<String>, String> {
        if !self.client.is_device() {
            return Ok(None);
        }
        if full || self.device_version.is_none() {
            let r = self
                .client
                .call(&Request { method: "GET", path: "/mgmt/shared/appsvcs/info".into(), body: None })
                .map_err(|e| format!("reading the device's AS3 version (/mgmt/shared/appsvcs/info): {e}"))?;
            let v = r.body.get("version").and_then(Value::as_str).filter(|v| version_key(v).is_some());
            let v =
                v.ok_or_else(|| format!("the device's /mgmt/shared/appsvcs/info names no AS3 version: {}", r.body))?;
            self.device_version = Some(v.to_string());
        }
        Ok(self.device_version.clone())
    }

    /// The facts and schema to render and validate for: the schema of the config's `schemaVersion` (its facts read
    /// out of it), or without a schema folder the facts CES knows. An error when the device runs an older AS3 than
    /// the config asks for, or when neither the schema nor the facts of the version are known.
    fn target(&mut self, model: &PolicyModel, full: bool) -> Result<(Facts, Option<Arc<Schema>>), String> {
        let version = &model.settings.schema_version;
        if let Some(device) = self.read_device_version(full)? {
            check_version(version, &device, "the BIG-IP runs")?;
        }
        let schema = self.schema(version)?;
        let facts = match &schema {
            Some(s) => s.facts(),
            None => Facts::known(version)?,
        };
        Ok((facts, schema))
    }

    /// Brings the device to `model`; returns what was done to each tenant.
    pub fn sync(&mut self, model: &PolicyModel, full: bool) -> (BTreeMap<String, TenantOutcome>, Rendered) {
        self.problems.clear();
        self.cluster = model.settings.cluster_name.clone();
        self.master = model.settings.cluster_name == model.settings.master_cluster;
        let at = self.at.unwrap_or_else(Timestamp::now);
        let mut outcomes = BTreeMap::new();
        let (facts, schema) = match self.target(model, full) {
            Ok(t) => t,
            Err(e) => {
                let rendered = crate::render(model, at);
                for t in rendered.documents.keys() {
                    self.tenant_not_programmed(&rendered, t, &format!("not sent: {e}"));
                    outcomes.insert(t.clone(), TenantOutcome::Failed(e.clone()));
                }
                return (outcomes, rendered);
            }
        };
        let rendered = render_checked(model, at, &facts, schema.as_deref());
        self.facts = Some(facts);
        for (tenant, doc) in &rendered.documents {
            if let Some(errors) = rendered.invalid.get(tenant) {
                // What is invalid is the tenant's own (its shared objects, its properties): nothing of it is sent.
                for e in errors.clone() {
                    self.problem(
                        Vec::new(),
                        "InvalidDeclaration",
                        format!(
                            "tenant {tenant} not sent: invalid under AS3 schema {}: {e}",
                            model.settings.schema_version
                        ),
                    );
                }
                let why = format!(
                    "not sent: the tenant's own objects are invalid under AS3 schema {}",
                    model.settings.schema_version
                );
                self.tenant_not_programmed(&rendered, tenant, &why);
                outcomes.insert(tenant.clone(), TenantOutcome::Invalid);
                continue;
            }
            let mut result = self.sync_tenant(tenant, doc, full);
            let mut attempt = 1;
            while let Err(ClientError::Conflict(_)) = &result
                && attempt < self.conflict_attempts
            {
                // Someone (another cluster) changed the tenant since we read it: read it again, merge, declare.
                attempt += 1;
                self.device.remove(tenant);
                // Backs off at random, doubling: two clusters that collided do not collide again in step.
                std::thread::sleep(std::time::Duration::from_millis(self.client.jitter() % (10 << attempt.min(7))));
                result = self.sync_tenant(tenant, doc, true);
            }
            let outcome = match result {
                Ok(o) => o,
                Err(e) => {
                    let text = e.to_string();
                    let origins = Self::origins_in(&rendered, tenant, &text);
                    self.problem(origins, "NotProgrammed", format!("tenant {tenant}: {text}"));
                    self.tenant_not_programmed(&rendered, tenant, &format!("the declaration was not taken: {text}"));
                    TenantOutcome::Failed(text)
                }
            };
            outcomes.insert(tenant.clone(), outcome);
        }
        self.delete_gone_tenants(model, &rendered, full, &mut outcomes);
        let mut saved = false;
        for b in rendered.bindings.clone() {
            let tenant_ok = outcomes.iter().all(|(t, o)| {
                !b.policy.starts_with(&format!("/{t}/"))
                    || !matches!(o, TenantOutcome::Failed(_) | TenantOutcome::Invalid)
            });
            if !tenant_ok {
                continue;
            }
            match self.bind(&b, full) {
                Ok(changed) => saved |= changed,
                Err(e) => {
                    let t = b.policy.split('/').nth(1).unwrap_or("").to_string();
                    // The policy is on the device but does not act: none of its rules is programmed.
                    let origins = Self::tenant_origins(&rendered, &t);
                    let message = format!("{} {}: {e}", b.path, b.field);
                    if origins.is_empty() {
                        self.problem(Vec::new(), "NotBound", message);
                    } else {
                        self.problem(origins, "NotBound", message);
                    }
                    outcomes.insert(t, TenantOutcome::Failed(e.to_string()));
                }
            }
        }
        if saved {
            let r = self.client.call(&Request {
                method: "POST",
                path: "/mgmt/tm/sys/config".into(),
                body: Some(json!({"command": "save"})),
            });
            if let Err(e) = r {
                self.problem(Vec::new(), "NotSaved", format!("save config: {e}"));
            }
        }
        (outcomes, rendered)
    }
}

/// An error when `asked` (the config's `schemaVersion`) is newer than `runs` (the AS3 the device runs, or
/// `--as3-version`): a declaration of a newer schema is refused by an older AS3, and what it could express is not known.
pub fn check_version(asked: &str, runs: &str, who: &str) -> Result<(), String> {
    match (version_key(asked), version_key(runs)) {
        (Some(a), Some(r)) if a > r => Err(format!(
            "ces-conf.yaml asks for AS3 schemaVersion {asked}, but {who} AS3 {runs}: lower schemaVersion to {runs} \
             or older, or upgrade AS3 on the device"
        )),
        (Some(_), Some(_)) => Ok(()),
        _ => Err(format!("cannot compare AS3 versions `{asked}` and `{runs}` (expected such as 3.29.0)")),
    }
}

impl ces_sync::Backend for As3Backend {
    fn name(&self) -> &str {
        "as3"
    }

    fn problems(&self) -> Vec<Diagnostic> {
        self.problems.iter().chain(&self.render_diagnostics).cloned().collect()
    }

    fn apply(&mut self, model: &PolicyModel, full: bool) -> Result<ces_sync::Applied, String> {
        let (outcomes, rendered) = self.sync(model, full);
        self.render_diagnostics = rendered.diagnostics.clone();
        let summary = outcomes
            .iter()
            .map(|(t, o)| match o {
                TenantOutcome::Unchanged => format!("{t}: unchanged"),
                TenantOutcome::Patched(n) => format!("{t}: patched {n} address list(s)"),
                TenantOutcome::Posted => format!("{t}: declared"),
                TenantOutcome::Invalid => format!("{t}: NOT SENT (invalid under the schema)"),
                TenantOutcome::Failed(e) => format!("{t}: FAILED ({e})"),
                TenantOutcome::Deleted => format!("{t}: deleted (gone from ces-conf.yaml)"),
            })
            .collect::<Vec<_>>()
            .join("; ");
        let mut details: Vec<String> = self.problems.iter().map(ToString::to_string).collect();
        details.extend(rendered.diagnostics.iter().map(ToString::to_string));
        let summary = if details.is_empty() { summary } else { format!("{summary}\n  {}", details.join("\n  ")) };
        let valid_until = rendered.valid_until;
        let all_taken = outcomes.values().all(|o| !matches!(o, TenantOutcome::Failed(_) | TenantOutcome::Invalid));
        self.last = all_taken.then_some(rendered);
        if outcomes.values().any(|o| matches!(o, TenantOutcome::Failed(_))) {
            return Err(summary);
        }
        Ok(ces_sync::Applied { summary, valid_until })
    }

    /// Pod and endpoint churn: only the source address lists of the sets that moved are rendered again in the kept
    /// documents and validated against their class; the lists of every tenant they change go in one PATCH (a tenant
    /// whose device state is not known is read first; one that differs in more than lists is declared whole). A list
    /// that would appear or go (a rule gaining its first source or losing its last) changes the rule's objects: that
    /// takes `apply`.
    fn apply_pods(&mut self, model: &PolicyModel, delta: &ces_model::PodDelta) -> Result<ces_sync::Applied, String> {
        let Some(mut last) = self.last.take() else { return self.apply(model, false) };
        let mut lists: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
        for l in last.source_lists.iter().filter(|l| l.sets.iter().any(|s| delta.sets.contains(s))) {
            let addresses = source_addresses(model, &l.sets);
            match &l.object {
                Some(object) if !addresses.is_empty() => {
                    lists.entry(l.tenant.clone()).or_default().insert(object.clone(), addresses);
                }
                None if addresses.is_empty() => {}
                _ => return self.apply(model, false),
            }
        }
        let schema = self.schema(&model.settings.schema_version)?;
        let (mut outcomes, mut patches) = (Vec::new(), Vec::new());
        for (tenant, changed) in lists {
            let Some(shared) =
                last.documents.get_mut(&tenant).and_then(|d| d.pointer_mut(&format!("/declaration/{tenant}/Shared")))
            else {
                return self.apply(model, false);
            };
            let mut moved = false;
            for (name, addresses) in changed {
                let Some(object) = shared.get_mut(&name).filter(|o| o.get("class").is_some()) else {
                    return self.apply(model, false);
                };
                let addresses = json!(addresses);
                if object["addresses"] == addresses {
                    continue;
                }
                object["addresses"] = addresses;
                moved = true;
                if let Some(s) = &schema
                    && !s.validate_object(&tenant, &name, object).is_empty()
                {
                    return self.apply(model, false); // it reports the error on the rules
                }
            }
            if !moved {
                continue;
            }
            // Against what the device holds, only address lists differ: their operations join the pass's one PATCH.
            // (Otherwise the tenant is declared whole.)
            let doc = &last.documents[&tenant];
            match self.list_ops(&tenant, doc, false) {
                Ok(Some(ops)) if ops.is_empty() => outcomes.push(format!("{tenant}: unchanged (pod churn)")),
                Ok(Some(ops)) => {
                    outcomes.push(format!("{tenant}: patched {} address list(s) (pod churn)", ops.len()));
                    patches.push((tenant.clone(), ops));
                }
                Ok(None) => match self.declare(&tenant, doc) {
                    Ok(outcome) => outcomes.push(format!("{tenant}: {outcome:?} (pod churn)")),
                    Err(e) => return Err(format!("tenant {tenant}: {e}")),
                },
                Err(e) => return Err(format!("tenant {tenant}: {e}")),
            }
        }
        if !patches.is_empty() {
            let tenants: Vec<&str> = patches.iter().map(|(t, _)| t.as_str()).collect();
            let tenants = tenants.join(", ");
            self.patch_lists(patches).map_err(|e| format!("tenants {tenants}: {e}"))?;
        }
        let valid_until = last.valid_until;
        self.last = Some(last);
        let summary = if outcomes.is_empty() { "unchanged (pod churn)".to_string() } else { outcomes.join("; ") };
        Ok(ces_sync::Applied { summary, valid_until })
    }
}
