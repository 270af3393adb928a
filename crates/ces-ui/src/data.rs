//! What the pages and the API show, computed from the flow store, the policy model and the one evaluator; every
//! query narrowed to the UI's scope (`--tenant`, `--namespace`).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;

use ces_config::CesConfig;
use ces_eval::{Decision, Evaluator, Flow, parse_target};
use ces_flow::filter::{Filter, To, parse_time};
use ces_flow::record::{FlowRecord, Verdict};
use ces_flow::rollup::{DestRow, ReportData, RuleHits};
use ces_flow::store::{Cursor, Reader};
use ces_impact::{FailOn, Group, Impact, Subject};
use ces_model::{Destination, ObjectRef, PolicyModel};
use ces_snapshot::Snapshot;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// What one UI may show: everything, or one tenant's, or one namespace's egress.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    pub tenant: Option<String>,
    pub namespace: Option<String>,
}

/// The UI's state: the store it reads, the current policy (as the cluster and config it was compiled from, for
/// pasted proposals), and a proposed policy given at start.
pub struct Ui {
    pub store: PathBuf,
    pub snapshot: Snapshot,
    pub config: CesConfig,
    pub ces_namespace: String,
    pub model: PolicyModel,
    pub proposed: Option<PolicyModel>,
    pub scope: Scope,
}

/// The query string every page and API call takes (all optional).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    pub since: Option<String>,
    pub until: Option<String>,
    pub tenant: Option<String>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub rule: Option<String>,
    pub verdict: Option<String>,
    pub to: Option<String>,
    pub protocol: Option<String>,
    pub port: Option<String>,
    pub last: Option<String>,
    /// Flows: a cursor (`shard:row`) to follow from.
    pub after: Option<String>,
    pub follow: Option<String>,
    /// Flow map: the node opened.
    pub destination: Option<String>,
    /// Simulate.
    pub from: Option<String>,
    pub at: Option<String>,
    /// Impact: `startup` for the proposed policy given at start.
    pub proposed: Option<String>,
    #[serde(rename = "failOn")]
    pub fail_on: Option<String>,
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// The default window of the pages: the last day.
pub const DEFAULT_SINCE: &str = "24h";

impl Ui {
    /// The store's filter for a query, inside the scope (a query for another tenant or namespace is refused).
    pub fn filter(&self, q: &Query, default_since: bool) -> Result<Filter, String> {
        let now = Timestamp::now();
        let time = |s: Option<&str>, what: &str| -> Result<Option<Timestamp>, String> {
            s.map(|s| parse_time(s, now).map_err(|e| format!("{what}: {e}"))).transpose()
        };
        let since = match nonempty(&q.since) {
            Some(s) => time(Some(s), "since")?,
            None if default_since => time(Some(DEFAULT_SINCE), "since")?,
            None => None,
        };
        let scoped = |asked: Option<&str>, scope: &Option<String>, what: &str| -> Result<Option<String>, String> {
            match (asked, scope) {
                (Some(a), Some(s)) if a != s => Err(format!("this UI shows {what} {s} only")),
                (_, Some(s)) => Ok(Some(s.clone())),
                (a, None) => Ok(a.map(str::to_string)),
            }
        };
        let verdict = match nonempty(&q.verdict) {
            None => None,
            Some(v) => Some(Verdict::parse(v).ok_or_else(|| format!("verdict: `{v}` is accept, drop or reject"))?),
        };
        let port = match nonempty(&q.port) {
            None => None,
            Some(p) => Some(p.parse::<u16>().map_err(|_| format!("port: `{p}` is no port"))?),
        };
        let mut namespace = scoped(nonempty(&q.namespace), &self.scope.namespace, "namespace")?;
        let pod = nonempty(&q.pod).map(str::to_string);
        if let (Some(p), Some(ns)) = (&pod, &self.scope.namespace)
            && let Some((pns, _)) = p.split_once('/')
            && pns != ns
        {
            return Err(format!("this UI shows namespace {ns} only"));
        }
        if namespace.is_none()
            && let Some((pns, _)) = pod.as_deref().and_then(|p| p.split_once('/'))
        {
            namespace = Some(pns.to_string());
        }
        Ok(Filter {
            since,
            until: time(nonempty(&q.until), "until")?,
            tenant: scoped(nonempty(&q.tenant), &self.scope.tenant, "tenant")?,
            namespace,
            pod,
            rule: nonempty(&q.rule).map(str::to_string),
            verdict,
            to: nonempty(&q.to).map(To::parse).transpose().map_err(|e| format!("to: {e}"))?,
            protocol: nonempty(&q.protocol).map(str::to_string),
            port,
            nat: None,
            nat_port: None,
        })
    }

    fn reader(&self) -> Result<Reader, String> {
        Reader::open(&self.store)
    }

    /// The overview: `ces report` over the window; with a pod or rule filter (which the rollups do not keep), counted
    /// from the newest records instead (at most [`RECORDS_FOR_OVERVIEW`]).
    pub fn overview(&self, q: &Query) -> Result<Overview, String> {
        let f = self.filter(q, true)?;
        let r = self.reader()?;
        if f.pod.is_none() && f.rule.is_none() {
            return Ok(Overview { report: r.report(&f, 10)?, from_records: None });
        }
        let records = r.query(&f, Some(RECORDS_FOR_OVERVIEW))?;
        let n = records.len();
        let mut report = report_of(&records, 10);
        report.since = f.since;
        report.until = f.until;
        Ok(Overview { report, from_records: Some(n) })
    }

    /// Records, newest `last` (default 100, at most 1000), or those stored after a cursor.
    pub fn flows(&self, q: &Query) -> Result<FlowsPage, String> {
        let f = self.filter(q, false)?;
        let r = self.reader()?;
        if let Some(after) = nonempty(&q.after) {
            let cursor = self.parse_cursor(after)?;
            let (records, next) = r.follow(&f, &cursor)?;
            return Ok(FlowsPage { records, cursor: cursor_text(&next) });
        }
        let last = match nonempty(&q.last) {
            None => 100,
            Some(l) => l.parse::<usize>().map_err(|_| format!("last: `{l}` is no count"))?.clamp(1, 1000),
        };
        let cursor = r.end()?;
        let records = r.query(&f, Some(last))?;
        Ok(FlowsPage { records, cursor: cursor_text(&cursor) })
    }

    /// A cursor from the page: the shard is a file name of this store (nothing else is ever opened).
    fn parse_cursor(&self, s: &str) -> Result<Cursor, String> {
        let (shard, row) = s.rsplit_once(':').ok_or("after: not a cursor")?;
        let row: i64 = row.parse().map_err(|_| "after: not a cursor")?;
        if shard.is_empty() {
            return Ok(Cursor { shard: None, row });
        }
        let ok = shard.starts_with("flows-")
            && shard.ends_with(".db")
            && shard[6..shard.len() - 3].bytes().all(|b| b.is_ascii_digit());
        if !ok {
            return Err("after: not a cursor".into());
        }
        Ok(Cursor { shard: Some(self.store.join(shard)), row })
    }

    /// The flow map's rows over the window.
    pub fn destinations(&self, q: &Query) -> Result<Vec<DestRow>, String> {
        let f = self.filter(q, true)?;
        self.reader()?.destinations(&f)
    }

    /// Every rule of the policy in scope, with what it did over the window and its status.
    pub fn rules(&self, q: &Query) -> Result<Vec<RuleRow>, String> {
        let f = self.filter(q, true)?;
        // No store yet: every rule is listed with no hits; a store that cannot be read is an error, never zeros.
        let hits = if self.store.exists() { self.reader()?.rule_hits(&f)? } else { Default::default() };
        let mut out = Vec::new();
        for (tenant, rule) in self.model.rules() {
            // Cluster rules (no tenant of their own) apply to every tenant's traffic.
            let tenant = tenant.map_or("Common", |t| t.name.as_str());
            if !ces_flow::rollup::in_scope(&rule.id, self.scope.tenant.as_deref(), self.scope.namespace.as_deref())
                || self.scope.tenant.as_ref().is_some_and(|t| t != tenant && tenant != "Common")
            {
                continue;
            }
            let object = ObjectRef::new(rule.kind.as_str(), rule.namespace.as_deref(), &rule.name);
            let status = self.model.status_of(&object, None);
            let condition = status.conditions.first();
            out.push(RuleRow {
                rule: rule.id.clone(),
                tenant: tenant.to_string(),
                kind: rule.kind.as_str().to_string(),
                action: rule.action.as_str().to_string(),
                mode: if rule.mode == ces_api::Mode::Audit { "audit" } else { "enforce" }.to_string(),
                hits: hits.get(&rule.id).cloned().unwrap_or_default(),
                phase: status.phase.as_ref().map(|p| format!("{p:?}")).unwrap_or_default(),
                reason: condition.map(|c| c.reason.clone()).unwrap_or_default(),
                message: condition.map(|c| c.message.clone()).unwrap_or_default(),
            });
        }
        for t in &self.model.tenants {
            if self.scope.tenant.as_ref().is_some_and(|s| s != &t.name) || self.scope.namespace.is_some() {
                continue;
            }
            let id = format!("Tenant/{}", t.name);
            out.push(RuleRow {
                hits: hits.get(&id).cloned().unwrap_or_default(),
                rule: id,
                tenant: t.name.clone(),
                kind: "Tenant".into(),
                action: t.default_action.as_str().into(),
                mode: "enforce".into(),
                phase: String::new(),
                reason: "Default".into(),
                message: "the tenant's default action".into(),
            });
        }
        out.dedup_by(|a, b| a.rule == b.rule && a.tenant == b.tenant);
        Ok(out)
    }

    /// Decides a flow as `ces simulate` does: from `NAMESPACE/POD` or an address (with its tenant, or the one that
    /// holds it), to `HOST:PORT/PROTO`.
    pub fn simulate(&self, q: &Query) -> Result<Simulated, String> {
        let from = nonempty(&q.from).ok_or("from: give NAMESPACE/POD or an address")?;
        let to = nonempty(&q.to).ok_or("to: give HOST:PORT/tcp, HOST:PORT/udp or HOST/icmp")?;
        let at = match nonempty(&q.at) {
            None => Timestamp::now(),
            Some(a) => a.parse().map_err(|e| format!("at: `{a}` is not an RFC 3339 time: {e}"))?,
        };
        let (destination, protocol, port) = parse_target(to)?;
        let ev = Evaluator::new(&self.model);
        let (source, tenant, namespace, pod) = if let Ok(ip) = from.parse::<IpAddr>() {
            let tenant = match nonempty(&q.tenant) {
                Some(t) => t.to_string(),
                None => ev.tenant_of(ip).map_err(|e| e.to_string())?.to_string(),
            };
            let pod = self.model.pods.iter().find(|p| p.tenant == tenant && p.ips.contains(&ip));
            (ip, tenant, pod.map(|p| p.namespace.clone()), pod.map(|p| p.name.clone()))
        } else {
            let (ns, name) = from.split_once('/').ok_or("from: give NAMESPACE/POD or an address")?;
            let pod = self
                .model
                .pods
                .iter()
                .find(|p| p.namespace == ns && p.name == name)
                .ok_or_else(|| format!("from: no pod {name} in namespace {ns} (or it has no address)"))?;
            let want_v4 = match &destination {
                Destination::Ip(ip) | Destination::Resolved { ip, .. } => ip.is_ipv4(),
                Destination::Host(_) => true,
            };
            let ip = pod
                .ips
                .iter()
                .find(|ip| ip.is_ipv4() == want_v4)
                .or(pod.ips.first())
                .copied()
                .ok_or("the pod has no address")?;
            (ip, pod.tenant.clone(), Some(pod.namespace.clone()), Some(pod.name.clone()))
        };
        if let Some(t) = &self.scope.tenant
            && t != &tenant
        {
            return Err(format!("this UI shows tenant {t} only"));
        }
        if let Some(n) = &self.scope.namespace
            && namespace.as_ref() != Some(n)
        {
            return Err(format!("this UI shows namespace {n}'s pods only"));
        }
        let flow = Flow { source, tenant, destination, protocol, port, at };
        let decision = ev.decide(&flow).map_err(|e| e.to_string())?;
        Ok(Simulated { from: from.to_string(), to: to.to_string(), at, source, namespace, pod, decision })
    }

    /// The impact of a proposed policy on the window's records: the one given at start, or `pasted` manifests whose
    /// CES objects are added to the current policy (replacing those of the same kind and name).
    pub fn impact(&self, q: &Query, pasted: Option<&str>) -> Result<ImpactPage, String> {
        let f = self.filter(q, true)?;
        let (model, what) = match pasted {
            Some(text) => (self.compile_pasted(text)?, "the pasted objects added to the current policy".to_string()),
            None => match &self.proposed {
                Some(m) => (m.clone(), "the proposed policy given at start (--proposed)".to_string()),
                None => return Err("no proposed policy: paste one, or start the UI with --proposed DIR".into()),
            },
        };
        let fail_on = FailOn::parse(nonempty(&q.fail_on).unwrap_or_default())?;
        let pe = Evaluator::new(&model);
        let by_minute = ces_impact::timed(None, &model);
        let states = self.reader()?.scan_distinct(
            &f,
            by_minute,
            || Impact::new(None, &pe, fail_on.clone()).quiet(),
            |impact, _, flows| {
                for (r, n) in flows {
                    if let Ok((s, side)) = Subject::from_record(&r) {
                        impact.add_many(&s, Some(&side), n);
                    }
                }
            },
        )?;
        let mut it = states.into_iter();
        let mut total = it.next().unwrap_or_else(|| Impact::new(None, &pe, fail_on.clone()));
        for s in it {
            total.merge(s);
        }
        Ok(ImpactPage {
            what,
            flows: total.flows,
            changed: total.changed,
            failing: total.failing,
            undecided: total.undecided,
            groups: total.groups().into_iter().take(200).collect(),
        })
    }

    fn compile_pasted(&self, text: &str) -> Result<PolicyModel, String> {
        if text.len() > MAX_PASTE {
            return Err(format!("the pasted text is over {} KiB", MAX_PASTE / 1024));
        }
        let pasted = ces_snapshot::manifests::load_str(text, "pasted");
        if let Some(d) = pasted.diagnostics.iter().find(|d| d.is_error()) {
            return Err(format!("the pasted text: {}", d.message));
        }
        if !pasted.pods.is_empty() || !pasted.namespaces.is_empty() || !pasted.services.is_empty() {
            return Err("paste CES objects only (ExternalServices and rules): the cluster stays as it is".into());
        }
        // A tenant's or a namespace's UI may propose only its own namespaces' objects, never cluster rules.
        if self.scope.tenant.is_some() || self.scope.namespace.is_some() {
            if !pasted.cluster_rules.is_empty() {
                return Err("this UI may not propose cluster rules".into());
            }
            let namespaces = pasted
                .external_services
                .keys()
                .chain(pasted.namespace_rules.keys())
                .chain(pasted.service_rules.keys())
                .chain(pasted.external_ip_rules.keys())
                .map(|(ns, _)| ns.as_str());
            for ns in namespaces {
                let theirs = self.scope.namespace.as_deref().is_none_or(|s| s == ns)
                    && self.scope.tenant.as_deref().is_none_or(|t| self.config.tenant_of(ns) == t);
                if !theirs {
                    return Err(format!("this UI may not propose objects of namespace {ns}"));
                }
            }
        }
        let mut s = self.snapshot.clone();
        s.external_services.extend(pasted.external_services);
        s.cluster_rules.extend(pasted.cluster_rules);
        s.namespace_rules.extend(pasted.namespace_rules);
        s.service_rules.extend(pasted.service_rules);
        s.external_ip_rules.extend(pasted.external_ip_rules);
        Ok(ces_compiler::compile(&s, &self.config, &self.ces_namespace))
    }
}

/// The most records the overview counts itself (filters the rollups do not keep).
pub const RECORDS_FOR_OVERVIEW: usize = 200_000;
/// The longest pasted proposal.
pub const MAX_PASTE: usize = 512 * 1024;

fn cursor_text(c: &Cursor) -> String {
    let shard =
        c.shard.as_ref().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{shard}:{}", c.row)
}

#[derive(Serialize)]
pub struct Overview {
    #[serde(flatten)]
    pub report: ReportData,
    /// Counted from this many of the newest records (a pod or rule filter), not from the rollups.
    #[serde(skip_serializing_if = "Option::is_none", rename = "fromRecords")]
    pub from_records: Option<usize>,
}

#[derive(Serialize)]
pub struct FlowsPage {
    pub records: Vec<FlowRecord>,
    /// Where to follow on from (`after`).
    pub cursor: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleRow {
    pub rule: String,
    pub tenant: String,
    pub kind: String,
    pub action: String,
    pub mode: String,
    pub hits: RuleHits,
    pub phase: String,
    pub reason: String,
    pub message: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Simulated {
    pub from: String,
    pub to: String,
    pub at: Timestamp,
    pub source: IpAddr,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    #[serde(flatten)]
    pub decision: Decision,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImpactPage {
    pub what: String,
    pub flows: u64,
    pub changed: u64,
    pub failing: u64,
    pub undecided: u64,
    pub groups: Vec<Group>,
}

/// A report counted from records (what `ces report` gives from the rollups, for filters they do not keep).
pub fn report_of(records: &[FlowRecord], top: usize) -> ReportData {
    use ces_flow::rollup::{Count, Top};
    let mut d = ReportData { timeline_step: 60, ..ReportData::default() };
    let mut dest: HashMap<(String, String, String), (u64, u64)> = HashMap::new();
    let mut by_rule: HashMap<(String, String), u64> = HashMap::new();
    let mut by_pod: HashMap<(String, String, String, String), u64> = HashMap::new();
    let mut protocols: HashMap<(String, String), u64> = HashMap::new();
    let mut errors: HashMap<(String, String, String), u64> = HashMap::new();
    let mut audit: HashMap<(String, String, String), u64> = HashMap::new();
    let mut timeline: BTreeMap<(i64, String), u64> = BTreeMap::new();
    for r in records {
        d.records += 1;
        let v = r.verdict.as_str().to_string();
        *d.by_verdict.entry(v.clone()).or_default() += 1;
        let ns = r.source.namespace.clone().unwrap_or_default();
        let dst = r.destination.host.clone().or_else(|| r.destination.ip.map(|i| i.to_string())).unwrap_or_default();
        let rule = r.rule.as_ref().map(|x| x.rule.clone()).unwrap_or_default();
        let port = r.destination.port.map_or("0".to_string(), |p| p.to_string());
        let e = dest.entry((r.tenant.clone(), ns.clone(), dst.clone())).or_default();
        e.0 += 1;
        e.1 += r.bytes.out + r.bytes.back;
        if r.verdict != Verdict::Accept {
            *by_rule.entry((rule.clone(), v.clone())).or_default() += 1;
            *by_pod
                .entry((r.tenant.clone(), ns.clone(), r.source.pod.clone().unwrap_or_default(), v.clone()))
                .or_default() += 1;
        }
        *protocols.entry((r.protocol.clone(), port.clone())).or_default() += 1;
        if r.outcome.is_error() {
            *errors.entry((dst.clone(), port.clone(), r.outcome.as_str().to_string())).or_default() += 1;
        }
        for a in &r.audit {
            *audit.entry((a.clone(), rule.clone(), v.clone())).or_default() += 1;
        }
        let m = r.time.as_second().div_euclid(60) * 60;
        *timeline.entry((m, v)).or_default() += 1;
    }
    fn counts<K: Ord + Clone>(m: HashMap<K, u64>, top: usize, key: impl Fn(K) -> Vec<String>) -> Vec<Count> {
        let mut v: Vec<(K, u64)> = m.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.into_iter().take(top).map(|(k, n)| Count { key: key(k), records: n }).collect()
    }
    type Row = ((String, String, String), (u64, u64));
    let mut tops: Vec<Row> = dest.into_iter().collect();
    tops.sort_by(|a, b| (&a.0.0, &a.0.1).cmp(&(&b.0.0, &b.0.1)).then(b.1.0.cmp(&a.1.0)).then(a.0.2.cmp(&b.0.2)));
    let mut per: HashMap<(String, String), usize> = HashMap::new();
    for ((tenant, namespace, destination), (records, bytes)) in tops {
        let seen = per.entry((tenant.clone(), namespace.clone())).or_default();
        if *seen < top {
            *seen += 1;
            d.top_destinations.push(Top { tenant, namespace, destination, records, bytes });
        }
    }
    d.drops_by_rule = counts(by_rule, top, |(a, b)| vec![a, b]);
    d.drops_by_pod = counts(by_pod, top, |(a, b, c, e)| vec![a, b, c, e]);
    d.protocols = counts(protocols, top, |(a, b)| vec![a, b]);
    d.errors_by_destination = counts(errors, top, |(a, b, c)| vec![a, b, c]);
    d.audit_by_rule = counts(audit, top, |(a, b, c)| vec![a, b, c]);
    d.timeline = timeline
        .into_iter()
        .map(|((m, v), n)| (Timestamp::from_second(m).unwrap_or(Timestamp::UNIX_EPOCH), v, n))
        .collect();
    d
}
