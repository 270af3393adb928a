//! The rollups of a flow store (`rollups.db`): what reports read instead of the records (docs/flows.md, "The
//! store").
//!
//! - One narrow table per question a report asks, so that each holds few rows: destinations per namespace, verdicts
//!   and rules per namespace, drops and rejects per pod, protocols and ports, failed connections per destination,
//!   audit hits per rule.
//! - Two resolutions of each, both written with every batch: per minute (`<table>_m`), kept two days, and per hour
//!   (`<table>_h`), kept as long as the records.
//! - A report over up to six hours of the last two days reads the minutes, exactly its window; a longer or older one
//!   reads the hours, its window widened to whole hours (the report says which window it counted).
//! - `losses` (records lost, per minute, source and reason), `rules` (the catalogue of rules the agent knew, for
//!   "rules never hit") and `state`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use jiff::Timestamp;
use rusqlite::types::{ToSqlOutput, Value};
use rusqlite::{Connection, ToSql, params};

use crate::filter::Filter;
use crate::record::{FlowRecord, Outcome, Verdict};

type Result<T> = std::result::Result<T, String>;

fn err(what: &str) -> impl Fn(rusqlite::Error) -> String + '_ {
    move |e| format!("flow store: {what}: {e}")
}

pub(crate) const MINUTE: i64 = 60_000_000;
pub(crate) const HOUR: i64 = 3_600_000_000;
/// How long per-minute rows are kept (µs); older windows are read from the hours.
const MINUTES_KEPT: i64 = 48 * HOUR;

fn floor(t: i64, unit: i64) -> i64 {
    t.div_euclid(unit).saturating_mul(unit)
}

fn ceil(t: i64, unit: i64) -> i64 {
    floor(t, unit).saturating_add(if t.rem_euclid(unit) == 0 { 0 } else { unit })
}

fn us(t: Timestamp) -> i64 {
    (t.as_nanosecond() / 1000) as i64
}

fn from_us(v: i64) -> Timestamp {
    Timestamp::from_microsecond(v).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// One part of a rollup key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum K {
    S(String),
    I(i64),
}

impl ToSql for K {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            K::S(s) => ToSqlOutput::from(s.as_str()),
            K::I(i) => ToSqlOutput::from(*i),
        })
    }
}

struct Table {
    name: &'static str,
    cols: &'static [&'static str],
}

const DEST: usize = 0;
const VERDICTS: usize = 1;
const PODS: usize = 2;
const PORTS: usize = 3;
const ERRORS: usize = 4;
const AUDIT: usize = 5;

const TABLES: [Table; 6] = [
    // The verdict and ExternalService: for the flow map's edges.
    Table { name: "dest", cols: &["tenant", "ns", "dst", "verdict", "es"] },
    Table { name: "verdicts", cols: &["tenant", "ns", "verdict", "rule"] },
    // Drops and rejects only.
    Table { name: "pods", cols: &["tenant", "ns", "pod", "verdict"] },
    Table { name: "ports", cols: &["tenant", "ns", "proto", "dport"] },
    // Failed connections only (reset, no answer, ICMP unreachable).
    Table { name: "errors", cols: &["tenant", "ns", "dst", "dport", "outcome"] },
    Table { name: "audit", cols: &["tenant", "ns", "pod", "rule", "decided", "verdict"] },
];

pub(crate) fn schema() -> String {
    let mut s = String::from("PRAGMA journal_mode=WAL;\nPRAGMA synchronous=NORMAL;\n");
    for t in &TABLES {
        for res in ["m", "h"] {
            s += &format!(
                "CREATE TABLE IF NOT EXISTS {}_{res}(m INTEGER NOT NULL, {}, n INTEGER NOT NULL, bytes INTEGER NOT NULL, PRIMARY KEY(m, {})) WITHOUT ROWID;\n",
                t.name,
                t.cols.iter().map(|c| format!("{c} NOT NULL")).collect::<Vec<_>>().join(", "),
                t.cols.join(", ")
            );
        }
    }
    s += "CREATE TABLE IF NOT EXISTS losses(m INTEGER NOT NULL, source TEXT NOT NULL, reason TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY(m, source, reason)) WITHOUT ROWID;\n";
    s += "CREATE TABLE IF NOT EXISTS rules(rule TEXT PRIMARY KEY, first INTEGER NOT NULL, last INTEGER NOT NULL) WITHOUT ROWID;\n";
    s
}

pub(crate) fn verdict_code(v: Verdict) -> i64 {
    match v {
        Verdict::Accept => 0,
        Verdict::Drop => 1,
        Verdict::Reject => 2,
    }
}

pub(crate) fn code_verdict(c: i64) -> Verdict {
    match c {
        1 => Verdict::Drop,
        2 => Verdict::Reject,
        _ => Verdict::Accept,
    }
}

pub(crate) fn outcome_code(o: Outcome) -> i64 {
    match o {
        Outcome::Completed => 0,
        Outcome::Reset => 1,
        Outcome::NoAnswer => 2,
        Outcome::IcmpUnreachable => 3,
        Outcome::Unknown => 4,
    }
}

/// The rollup rows of one batch of records, summed before they are written.
#[derive(Default)]
pub(crate) struct Batch {
    rows: HashMap<(usize, i64, Vec<K>), (i64, i64)>,
}

impl Batch {
    /// Rows waiting to be written.
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    pub(crate) fn merge(&mut self, other: Batch) {
        for (k, (n, b)) in other.rows {
            let e = self.rows.entry(k).or_default();
            e.0 += n;
            e.1 += b;
        }
    }

    pub(crate) fn add(&mut self, r: &FlowRecord) {
        let m = floor(us(r.time), MINUTE);
        let s = |v: &Option<String>| K::S(v.clone().unwrap_or_default());
        let (tenant, ns) = (K::S(r.tenant.clone()), s(&r.source.namespace));
        let dst =
            K::S(r.destination.host.clone().or_else(|| r.destination.ip.map(|i| i.to_string())).unwrap_or_default());
        let rule = K::S(r.rule.as_ref().map(|x| x.rule.clone()).unwrap_or_default());
        let v = K::I(verdict_code(r.verdict));
        let port = K::I(r.destination.port.map_or(0, i64::from));
        let bytes = (r.bytes.out + r.bytes.back) as i64;
        let mut put = |table: usize, key: Vec<K>, bytes: i64| {
            let e = self.rows.entry((table, m, key)).or_default();
            e.0 += 1;
            e.1 += bytes;
        };
        put(DEST, vec![tenant.clone(), ns.clone(), dst.clone(), v.clone(), s(&r.destination.external_service)], bytes);
        put(VERDICTS, vec![tenant.clone(), ns.clone(), v.clone(), rule.clone()], 0);
        if r.verdict != Verdict::Accept {
            put(PODS, vec![tenant.clone(), ns.clone(), s(&r.source.pod), v.clone()], 0);
        }
        put(PORTS, vec![tenant.clone(), ns.clone(), K::S(r.protocol.clone()), port.clone()], 0);
        if r.outcome.is_error() {
            put(ERRORS, vec![tenant.clone(), ns.clone(), dst, port, K::I(outcome_code(r.outcome))], 0);
        }
        for a in &r.audit {
            put(AUDIT, vec![tenant.clone(), ns.clone(), s(&r.source.pod), K::S(a.clone()), rule.clone(), v.clone()], 0);
        }
    }

    /// Adds the batch to the minutes and to the hours.
    pub(crate) fn write(self, conn: &Connection) -> Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let sql: Vec<[String; 2]> = TABLES
            .iter()
            .map(|t| {
                let marks = (0..t.cols.len() + 3).map(|i| format!("?{}", i + 1)).collect::<Vec<_>>().join(",");
                ["m", "h"].map(|res| {
                    format!(
                        "INSERT INTO {}_{res} VALUES({marks}) ON CONFLICT DO UPDATE SET n = n + excluded.n, bytes = bytes + excluded.bytes",
                        t.name
                    )
                })
            })
            .collect();
        // The hours' rows of the batch, summed first: many minutes fall in one hour.
        let mut hours: HashMap<(usize, i64, Vec<K>), (i64, i64)> = HashMap::new();
        let tx = conn.unchecked_transaction().map_err(err("rollups"))?;
        let put = |res: usize, table: usize, at: i64, key: &[K], n: i64, bytes: i64| -> Result<()> {
            let mut st = tx.prepare_cached(&sql[table][res]).map_err(err("rollups"))?;
            let mut args: Vec<&dyn ToSql> = vec![&at];
            args.extend(key.iter().map(|k| k as &dyn ToSql));
            args.push(&n);
            args.push(&bytes);
            st.execute(args.as_slice()).map_err(err("rollups"))?;
            Ok(())
        };
        for ((table, m, key), (n, bytes)) in self.rows {
            put(0, table, m, &key, n, bytes)?;
            let e = hours.entry((table, floor(m, HOUR), key)).or_default();
            e.0 += n;
            e.1 += bytes;
        }
        for ((table, h, key), (n, bytes)) in hours {
            put(1, table, h, &key, n, bytes)?;
        }
        tx.commit().map_err(err("rollups"))
    }
}

/// Drops minutes older than two days before `now`, and every rollup older than `horizon` (µs).
pub(crate) fn retain(conn: &Connection, now: i64, horizon: i64) -> Result<()> {
    for t in &TABLES {
        let minutes = floor(horizon.max(now - MINUTES_KEPT), MINUTE);
        conn.execute(&format!("DELETE FROM {}_m WHERE m < ?1", t.name), [minutes]).map_err(err("retention"))?;
        conn.execute(&format!("DELETE FROM {}_h WHERE m < ?1", t.name), [floor(horizon, HOUR)])
            .map_err(err("retention"))?;
    }
    conn.execute("DELETE FROM losses WHERE m < ?1", [floor(horizon, MINUTE)]).map_err(err("retention"))?;
    Ok(())
}

/// Report figures over a window, from the rollups.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportData {
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    pub records: u64,
    pub by_verdict: BTreeMap<String, u64>,
    /// Per tenant and namespace, the destinations with most records.
    pub top_destinations: Vec<Top>,
    pub drops_by_rule: Vec<Count>,
    pub drops_by_pod: Vec<Count>,
    pub audit_by_rule: Vec<Count>,
    pub protocols: Vec<Count>,
    pub errors_by_destination: Vec<Count>,
    /// Rules the policy had in the window that decided nothing and audited nothing.
    pub rules_never_hit: Vec<String>,
    pub lost: Vec<Count>,
    /// Records per interval and verdict (for charts): `(start, verdict, records)`.
    pub timeline: Vec<(Timestamp, String, u64)>,
    /// The resolution of the figures, in seconds: 60 for windows of up to six hours within the last two days (read
    /// exactly), else 3600 (the window widened to whole hours; `since` and `until` say which).
    pub timeline_step: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Top {
    pub tenant: String,
    pub namespace: String,
    pub destination: String,
    pub records: u64,
    pub bytes: u64,
}

/// One row of a count table: what it is about, and how many.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Count {
    pub key: Vec<String>,
    pub records: u64,
}

fn text(v: Value) -> String {
    match v {
        Value::Integer(i) => i.to_string(),
        Value::Text(t) => t,
        _ => String::new(),
    }
}

/// How a window is read: from one resolution, `[since, until]` (µs; for hours, `since` is an hour's start).
struct Window {
    res: &'static str,
    since: i64,
    until: i64,
    tenant: Option<String>,
    ns: Option<String>,
}

/// The longest window read from the minutes.
const MINUTE_WINDOW: i64 = 6 * HOUR;

impl Window {
    fn new(f: &Filter, now: i64) -> Window {
        let since = f.since.map(us);
        let until = f.until.map_or(i64::MAX, us);
        let (res, since) = match since {
            Some(s) if until.min(now).saturating_sub(s) <= MINUTE_WINDOW && s >= now - MINUTES_KEPT + MINUTE => {
                ("m", floor(s, MINUTE))
            }
            Some(s) => ("h", floor(s, HOUR)),
            None => ("h", i64::MIN),
        };
        Window { res, since, until, tenant: f.tenant.clone(), ns: f.namespace.clone() }
    }

    /// The step of the window's rows, in µs.
    fn step(&self) -> i64 {
        if self.res == "m" { MINUTE } else { HOUR }
    }

    /// A subquery of table `t`'s rows in the window (and its tenant and namespace).
    fn source(&self, t: usize) -> String {
        let mut extra = String::new();
        if self.tenant.is_some() {
            extra += " AND tenant = ?3";
        }
        if self.ns.is_some() {
            extra += " AND ns = ?4";
        }
        format!("(SELECT * FROM {}_{} WHERE m >= ?1 AND m <= ?2{extra})", TABLES[t].name, self.res)
    }

    fn params(&self) -> Vec<Value> {
        vec![
            Value::Integer(self.since),
            Value::Integer(self.until),
            Value::Text(self.tenant.clone().unwrap_or_default()),
            Value::Text(self.ns.clone().unwrap_or_default()),
        ]
    }
}

/// The rows of `sql` (with the window's parameters): `n` key columns, then a count and a byte sum.
fn rows(conn: &Connection, w: &Window, sql: &str, n: usize) -> Result<Vec<(Vec<String>, u64, u64)>> {
    let mut st = conn.prepare(sql).map_err(err("report"))?;
    // As many of the window's parameters as the statement numbers.
    let mut p = w.params();
    p.truncate(st.parameter_count());
    let mapped = st
        .query_map(rusqlite::params_from_iter(p), |r| {
            let mut key = Vec::with_capacity(n);
            for i in 0..n {
                key.push(text(r.get(i)?));
            }
            Ok((key, r.get::<_, i64>(n)? as u64, r.get::<_, Option<i64>>(n + 1)?.unwrap_or(0) as u64))
        })
        .map_err(err("report"))?;
    mapped.collect::<std::result::Result<_, _>>().map_err(err("report"))
}

fn count(v: Vec<(Vec<String>, u64, u64)>) -> Vec<Count> {
    v.into_iter().map(|(key, records, _)| Count { key, records }).collect()
}

/// The report over `f`'s window (its tenant and namespace narrow it), `top` rows per table.
pub(crate) fn report(conn: &Connection, f: &Filter, top: usize) -> Result<ReportData> {
    report_at(conn, f, top, us(Timestamp::now()))
}

/// [`report`] as if it were `now` (µs).
pub(crate) fn report_at(conn: &Connection, f: &Filter, top: usize, now: i64) -> Result<ReportData> {
    let w = Window::new(f, now);
    // The window counted: widened to whole hours when read from the hours.
    let mut d = ReportData {
        since: f.since.map(|_| from_us(w.since)),
        until: f.until.map(|u| if w.res == "h" { from_us(ceil(us(u), HOUR)) } else { u }),
        timeline_step: (w.step() / 1_000_000) as u64,
        ..ReportData::default()
    };
    let verdicts = w.source(VERDICTS);
    let drop_or_reject = "CASE verdict WHEN 1 THEN 'drop' ELSE 'reject' END";
    let by_rule =
        rows(conn, &w, &format!("SELECT verdict, rule, sum(n), 0 FROM {verdicts} GROUP BY verdict, rule"), 2)?;
    let mut hit: BTreeSet<String> = BTreeSet::new();
    let mut drops: Vec<(Vec<String>, u64, u64)> = Vec::new();
    for (k, n, _) in by_rule {
        let v = code_verdict(k[0].parse().unwrap_or(0));
        d.records += n;
        *d.by_verdict.entry(v.as_str().to_string()).or_default() += n;
        if v != Verdict::Accept {
            drops.push((vec![k[1].clone(), v.as_str().to_string()], n, 0));
        }
        hit.insert(k[1].clone());
    }
    drops.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    drops.truncate(top);
    d.drops_by_rule = count(drops);
    let all = rows(
        conn,
        &w,
        &format!(
            "SELECT tenant, ns, dst, sum(n), sum(bytes) FROM {} GROUP BY tenant, ns, dst ORDER BY tenant, ns, sum(n) DESC, dst",
            w.source(DEST)
        ),
        3,
    )?;
    let mut per: HashMap<(String, String), usize> = HashMap::new();
    for (k, n, bytes) in all {
        let seen = per.entry((k[0].clone(), k[1].clone())).or_default();
        if *seen < top {
            *seen += 1;
            let [tenant, namespace, destination]: [String; 3] = k.try_into().unwrap_or_default();
            d.top_destinations.push(Top { tenant, namespace, destination, records: n, bytes });
        }
    }
    d.drops_by_pod = count(rows(
        conn,
        &w,
        &format!(
            "SELECT tenant, ns, pod, {drop_or_reject}, sum(n), 0 FROM {} GROUP BY tenant, ns, pod, verdict ORDER BY sum(n) DESC, pod LIMIT {top}",
            w.source(PODS)
        ),
        4,
    )?);
    let audit = rows(
        conn,
        &w,
        &format!(
            "SELECT rule, decided, CASE verdict WHEN 0 THEN 'accept' WHEN 1 THEN 'drop' ELSE 'reject' END, sum(n), 0 FROM {} GROUP BY rule, decided, verdict ORDER BY sum(n) DESC, rule",
            w.source(AUDIT)
        ),
        3,
    )?;
    hit.extend(audit.iter().map(|(k, ..)| k[0].clone()));
    d.audit_by_rule = count(audit.into_iter().take(top).collect());
    d.protocols = count(rows(
        conn,
        &w,
        &format!(
            "SELECT proto, dport, sum(n), 0 FROM {} GROUP BY proto, dport ORDER BY sum(n) DESC, proto, dport LIMIT {top}",
            w.source(PORTS)
        ),
        2,
    )?);
    d.errors_by_destination = count(rows(
        conn,
        &w,
        &format!(
            "SELECT dst, dport, CASE outcome WHEN 1 THEN 'reset' WHEN 2 THEN 'no-answer' ELSE 'icmp-unreachable' END, sum(n), 0 FROM {} GROUP BY dst, dport, outcome ORDER BY sum(n) DESC, dst LIMIT {top}",
            w.source(ERRORS)
        ),
        3,
    )?);
    d.lost = count(rows(
        conn,
        &w,
        "SELECT source, reason, sum(n), 0 FROM losses WHERE m >= ?1 AND m <= ?2 GROUP BY source, reason ORDER BY sum(n) DESC",
        2,
    )?);
    // Rules the policy had during the window (first seen before its end, last seen after its start) that decided
    // and audited nothing in it. A tenant or namespace narrows the catalogue to rules of that scope.
    let mut st =
        conn.prepare("SELECT rule FROM rules WHERE first <= ?2 AND last >= ?1 ORDER BY rule").map_err(err("report"))?;
    let known: Vec<String> = st
        .query_map(params![w.since, w.until], |r| r.get(0))
        .map_err(err("report"))?
        .collect::<std::result::Result<_, _>>()
        .map_err(err("report"))?;
    d.rules_never_hit = known
        .into_iter()
        .filter(|r| !hit.contains(r))
        .filter(|r| in_scope(r, f.tenant.as_deref(), f.namespace.as_deref()))
        .collect();
    // The timeline, per step of the window's rows.
    for (k, n, _) in rows(
        conn,
        &w,
        &format!("SELECT m, verdict, sum(n), 0 FROM {} GROUP BY m, verdict ORDER BY m", w.source(VERDICTS)),
        2,
    )? {
        let m: i64 = k[0].parse().unwrap_or(0);
        d.timeline.push((from_us(m), code_verdict(k[1].parse().unwrap_or(0)).as_str().to_string(), n));
    }
    Ok(d)
}

/// Records per tenant, namespace, destination, ExternalService and verdict over a window (the flow map's edges).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestRow {
    pub tenant: String,
    pub namespace: String,
    pub destination: String,
    pub external_service: String,
    pub verdict: String,
    pub records: u64,
    pub bytes: u64,
}

pub(crate) fn destinations(conn: &Connection, f: &Filter, now: i64) -> Result<Vec<DestRow>> {
    let w = Window::new(f, now);
    let rows = rows(
        conn,
        &w,
        &format!(
            "SELECT tenant, ns, dst, es, verdict, sum(n), sum(bytes) FROM {} GROUP BY tenant, ns, dst, es, verdict",
            w.source(DEST)
        ),
        5,
    )?;
    Ok(rows
        .into_iter()
        .map(|(k, records, bytes)| DestRow {
            tenant: k[0].clone(),
            namespace: k[1].clone(),
            destination: k[2].clone(),
            external_service: k[3].clone(),
            verdict: code_verdict(k[4].parse().unwrap_or(0)).as_str().to_string(),
            records,
            bytes,
        })
        .collect())
}

/// What a rule did over a window: records it decided and audit hits, with the last of each (to the minute or hour
/// of the rollups).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleHits {
    pub decided: u64,
    pub last_decided: Option<Timestamp>,
    pub audited: u64,
    pub last_audited: Option<Timestamp>,
}

pub(crate) fn rule_hits(conn: &Connection, f: &Filter, now: i64) -> Result<BTreeMap<String, RuleHits>> {
    let w = Window::new(f, now);
    let mut out: BTreeMap<String, RuleHits> = BTreeMap::new();
    for (k, n, last) in
        rows(conn, &w, &format!("SELECT rule, sum(n), max(m) FROM {} GROUP BY rule", w.source(VERDICTS)), 1)?
    {
        let h = out.entry(k[0].clone()).or_default();
        h.decided += n;
        h.last_decided = Some(from_us(last as i64));
    }
    for (k, n, last) in
        rows(conn, &w, &format!("SELECT rule, sum(n), max(m) FROM {} GROUP BY rule", w.source(AUDIT)), 1)?
    {
        let h = out.entry(k[0].clone()).or_default();
        h.audited += n;
        h.last_audited = Some(from_us(last as i64));
    }
    Ok(out)
}

/// Whether a rule id belongs to a report narrowed to a tenant or namespace: `Tenant/<t>` to its tenant, namespaced
/// rules (`Kind/ns/name`) to their namespace; cluster rules to any.
pub fn in_scope(rule: &str, tenant: Option<&str>, ns: Option<&str>) -> bool {
    let parts: Vec<&str> = rule.split('/').collect();
    match parts.as_slice() {
        ["Tenant", t] => tenant.is_none_or(|x| x == *t) && ns.is_none(),
        [_, n, _] => ns.is_none_or(|x| x == *n),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_and_ceilings() {
        assert_eq!(floor(-1, HOUR), -HOUR);
        assert_eq!(ceil(HOUR, HOUR), HOUR);
        assert_eq!(ceil(HOUR + 1, HOUR), 2 * HOUR);
    }

    /// Reports equal what the records say: exactly their window from the minutes (up to six hours of the last two
    /// days), widened to whole hours from the hours otherwise; records written in any order.
    #[test]
    fn reports_equal_counting_the_records() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(&schema()).unwrap();
        let t0: i64 = 1_800_000_000 * 1_000_000;
        let now = t0 + 30 * HOUR;
        let mut g: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            g ^= g << 13;
            g ^= g >> 7;
            g ^= g << 17;
            g
        };
        let mut records = Vec::new();
        for _ in 0..6000 {
            let t = t0 + (next() % (30 * HOUR as u64)) as i64;
            let v = [Verdict::Accept, Verdict::Accept, Verdict::Drop, Verdict::Reject][(next() % 4) as usize];
            let mut r = FlowRecord::packet(from_us(t), ["a", "b"][(next() % 2) as usize], v);
            r.source.namespace = Some(format!("ns{}", next() % 3));
            r.source.pod = Some(format!("p{}", next() % 5));
            r.destination.ip = Some(std::net::IpAddr::from([198, 51, 100, (next() % 7) as u8]));
            r.destination.port = Some(443);
            r.protocol = "tcp".into();
            r.outcome = if next() % 5 == 0 { Outcome::Reset } else { Outcome::Completed };
            r.rule = Some(crate::record::RuleRef {
                rule: format!("R/{}", next() % 4),
                context: "namespace".into(),
                mode: "enforce".into(),
            });
            records.push(r);
        }
        // Written in three batches of shuffled times.
        for part in records.chunks(2000) {
            let mut b = Batch::default();
            for r in part {
                b.add(r);
            }
            b.write(&conn).unwrap();
        }
        let windows = [
            (None, None, HOUR),
            (Some(t0 + 90 * MINUTE + 17), Some(t0 + 26 * HOUR + 5 * MINUTE), HOUR),
            (Some(t0 + 2 * HOUR + 7 * MINUTE + 3), Some(t0 + 5 * HOUR - 1), MINUTE),
            (Some(t0 + 29 * HOUR + 30 * MINUTE), None, MINUTE),
            (Some(t0 + 20 * HOUR + 30 * MINUTE), None, HOUR),
            (Some(t0 + 7 * MINUTE), Some(t0 + 9 * MINUTE), MINUTE),
        ];
        for (since, until, step) in windows {
            let f = Filter { since: since.map(from_us), until: until.map(from_us), ..Filter::default() };
            let d = report_at(&conn, &f, 1000, now).unwrap();
            assert_eq!(d.timeline_step as i64 * 1_000_000, step, "window {since:?}..{until:?}");
            let lo = since.map_or(i64::MIN, |s| floor(s, step));
            let hi = match until {
                Some(u) if step == HOUR => ceil(u + 1, HOUR) - 1,
                Some(u) => u,
                None => i64::MAX,
            };
            let inside: Vec<&FlowRecord> =
                records.iter().filter(|r| (lo..=hi).contains(&floor(us(r.time), step))).collect();
            assert_eq!(d.records, inside.len() as u64, "window {since:?}..{until:?}");
            let drops = inside.iter().filter(|r| r.verdict == Verdict::Drop).count() as u64;
            assert_eq!(d.by_verdict.get("drop").copied().unwrap_or(0), drops);
            let errors = inside.iter().filter(|r| r.outcome == Outcome::Reset).count() as u64;
            assert_eq!(d.errors_by_destination.iter().map(|c| c.records).sum::<u64>(), errors);
            let top: u64 = d.top_destinations.iter().map(|t| t.records).sum();
            assert_eq!(top, inside.len() as u64);
            let pods = inside.iter().filter(|r| r.verdict != Verdict::Accept).count() as u64;
            assert_eq!(d.drops_by_pod.iter().map(|c| c.records).sum::<u64>(), pods);
            assert_eq!(d.timeline.iter().map(|x| x.2).sum::<u64>(), inside.len() as u64);
            if step == HOUR && since.is_some() {
                assert_eq!(d.since.map(us), Some(lo), "the report says the window it counted");
            }
        }
    }

    #[test]
    fn scope_of_rules() {
        assert!(in_scope("NamespaceEgressRule/a/x", None, Some("a")));
        assert!(!in_scope("NamespaceEgressRule/b/x", None, Some("a")));
        assert!(in_scope("ClusterEgressRule/x", Some("t"), Some("a")));
        assert!(!in_scope("Tenant/u", Some("t"), None));
    }
}
