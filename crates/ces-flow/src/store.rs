//! The embedded flow store: one folder of SQLite files (docs/flows.md, "The store").
//!
//! - **Shards** `flows-<created µs>.db` hold the records. The newest ("hot") shard has no secondary index, so
//!   appends run at close to SQLite's raw insert speed; once it holds `shard_records` records or is `shard_secs` old,
//!   it is sealed: a background thread builds its indexes in bulk (time; namespace, pod, rule, destination, verdict,
//!   each with time; audit rules) and it is never written again. Strings (tenants, namespaces, pods, rules, names)
//!   are stored once per shard in a dictionary; addresses as 4- or 16-byte blobs, so a network is a range.
//! - **Retention**: the oldest sealed shards are deleted, whole files, once the folder outgrows `max_bytes` or
//!   their newest record is older than `max_age_secs`.
//! - **Rollups** (`rollups.db`): per-minute counts for reports, audit hits, losses, and the catalogue of rules the
//!   agent knew (for "rules never hit").
//! - **Crash safety**: every file is in WAL mode with `synchronous=NORMAL`: a crash loses at most the last batches,
//!   never the file; a shard whose sealing was cut short is sealed again when the store is opened.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use jiff::Timestamp;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::filter::{Filter, To, rule_matches};
use crate::record::{
    Counts, Destination, FlowRecord, Kind, Nat, Origin, Outcome, RuleRef, SCHEMA_VERSION, Source, protocol_name,
    protocol_number,
};
use crate::rollup::{self, code_verdict, outcome_code, verdict_code};
pub use crate::rollup::{Count, ReportData, Top};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// The folder's size limit: the oldest shards go beyond it.
    pub max_bytes: u64,
    /// Records older than this go (whole shards at a time).
    pub max_age_secs: u64,
    /// A hot shard is sealed once it holds this many records...
    pub shard_records: u64,
    /// ... or is this old.
    pub shard_secs: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { max_bytes: 10 << 30, max_age_secs: 7 * 86_400, shard_records: 1_000_000, shard_secs: 600 }
    }
}

/// Where a store lives unless told otherwise.
pub const DEFAULT_DIR: &str = "/var/lib/ces/flows";

type Result<T> = std::result::Result<T, String>;

fn err(what: &str) -> impl Fn(rusqlite::Error) -> String + '_ {
    move |e| format!("flow store: {what}: {e}")
}

fn us(t: Timestamp) -> i64 {
    (t.as_nanosecond() / 1000) as i64
}

fn from_us(v: i64) -> Timestamp {
    Timestamp::from_microsecond(v).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn ip_blob(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn blob_ip(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

fn code_outcome(c: i64) -> Outcome {
    match c {
        0 => Outcome::Completed,
        1 => Outcome::Reset,
        2 => Outcome::NoAnswer,
        3 => Outcome::IcmpUnreachable,
        _ => Outcome::Unknown,
    }
}

const SHARD_SCHEMA: &str = "
PRAGMA journal_mode=WAL;
PRAGMA synchronous=NORMAL;
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dict(id INTEGER PRIMARY KEY, s TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS flows(
  t INTEGER NOT NULL, e INTEGER, kind INTEGER NOT NULL, origin INTEGER NOT NULL, tenant INTEGER NOT NULL,
  sip BLOB, sport INTEGER, ns INTEGER, pod INTEGER, labels INTEGER,
  dip BLOB, dport INTEGER, host INTEGER, es INTEGER,
  proto INTEGER, verdict INTEGER NOT NULL, rule INTEGER, ctx INTEGER, mode INTEGER,
  po INTEGER NOT NULL, pi INTEGER NOT NULL, bo INTEGER NOT NULL, bi INTEGER NOT NULL,
  outcome INTEGER NOT NULL, nat_ip BLOB, nat_port INTEGER);
CREATE TABLE IF NOT EXISTS flow_audit(flow INTEGER NOT NULL, rule INTEGER NOT NULL);
";

const SEAL_INDEXES: &str = "
CREATE INDEX IF NOT EXISTS i_t ON flows(t);
CREATE INDEX IF NOT EXISTS i_ns ON flows(ns, t);
CREATE INDEX IF NOT EXISTS i_pod ON flows(pod, t);
CREATE INDEX IF NOT EXISTS i_rule ON flows(rule, t);
CREATE INDEX IF NOT EXISTS i_dip ON flows(dip, t);
CREATE INDEX IF NOT EXISTS i_verdict ON flows(verdict, t);
CREATE INDEX IF NOT EXISTS i_nat ON flows(nat_ip, t);
CREATE INDEX IF NOT EXISTS i_audit ON flow_audit(rule, flow);
";

/// Minute (µs since the epoch, floored) of a time in µs.
fn minute(t: i64) -> i64 {
    t.div_euclid(60_000_000) * 60_000_000
}

fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("flow store {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("flows-") && n.ends_with(".db"))
        })
        .collect();
    v.sort();
    Ok(v)
}

fn meta(conn: &Connection, k: &str) -> Option<i64> {
    conn.query_row("SELECT v FROM meta WHERE k = ?1", [k], |r| r.get(0)).optional().ok().flatten()
}

fn file_size(p: &Path) -> u64 {
    let mut n = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    for suffix in ["-wal", "-shm"] {
        let mut s = p.as_os_str().to_owned();
        s.push(suffix);
        n += std::fs::metadata(PathBuf::from(s)).map(|m| m.len()).unwrap_or(0);
    }
    n
}

/// Builds the indexes of a shard that is written no more, and marks it sealed.
pub fn seal(path: &Path) -> Result<()> {
    let conn = Connection::open(path).map_err(err("opening a shard to seal"))?;
    conn.busy_timeout(std::time::Duration::from_secs(30)).map_err(err("busy timeout"))?;
    conn.execute_batch(&format!("BEGIN; {SEAL_INDEXES} INSERT OR REPLACE INTO meta VALUES('sealed', 1); COMMIT;"))
        .map_err(err("sealing a shard"))?;
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").map_err(err("checkpoint"))?;
    Ok(())
}

/// Work for the store's background thread.
enum Job {
    /// A shard written no more: build its indexes.
    Seal(PathBuf),
    /// The shard now being written: its write-ahead log is checkpointed every second from here, not by the writer.
    Hot(PathBuf),
}

/// The store's background thread: seals shards, and checkpoints the hot one (a passive checkpoint never waits for
/// the writer, and its file writes and syncs stay off the pipeline's thread).
fn background(rx: mpsc::Receiver<Job>) {
    let mut hot: Option<(PathBuf, Connection)> = None;
    loop {
        match rx.recv_timeout(std::time::Duration::from_secs(1)) {
            Ok(Job::Seal(p)) => {
                if hot.as_ref().is_some_and(|(h, _)| *h == p) {
                    hot = None;
                }
                if let Err(e) = seal(&p) {
                    eprintln!("ces: {e} ({})", p.display());
                }
            }
            Ok(Job::Hot(p)) => hot = Connection::open(&p).ok().map(|c| (p, c)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some((_, c)) = &hot {
                    let _ = c.execute_batch("PRAGMA wal_checkpoint(PASSIVE);");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
    }
}

struct Hot {
    path: PathBuf,
    conn: Connection,
    dict: HashMap<String, i64>,
    /// Label sets already in the dictionary (as JSON), by value: most records repeat their pod's.
    labels: HashMap<std::collections::BTreeMap<String, String>, i64>,
    count: u64,
    opened: i64,
}

impl Hot {
    fn create(dir: &Path, now: i64) -> Result<Hot> {
        // A name that sorts after every earlier shard's, even when two are made in one microsecond.
        let mut t = now;
        let path = loop {
            let p = dir.join(format!("flows-{t:020}.db"));
            if !p.exists() {
                break p;
            }
            t += 1;
        };
        // Made under a temporary name and renamed once whole: a crash never leaves a shard without its tables.
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            let conn = Connection::open(&tmp).map_err(err("creating a shard"))?;
            conn.execute_batch(SHARD_SCHEMA).map_err(err("creating a shard's tables"))?;
            conn.execute(
                "INSERT OR REPLACE INTO meta VALUES('sealed', 0), ('count', 0), ('version', ?1)",
                [SCHEMA_VERSION],
            )
            .map_err(err("shard meta"))?;
            // Closing checkpoints the write-ahead log into the file: nothing is left beside it to rename.
            conn.close().map_err(|(_, e)| format!("flow store: creating a shard: {e}"))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| format!("flow store: {}: {e}", path.display()))?;
        let conn = Connection::open(&path).map_err(err("opening a new shard"))?;
        // Checkpoints are the background thread's (`background`).
        conn.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA wal_autocheckpoint=0;")
            .map_err(err("opening a new shard"))?;
        Ok(Hot { path, conn, dict: HashMap::new(), labels: HashMap::new(), count: 0, opened: now })
    }

    fn id(&mut self, s: &str) -> Result<i64> {
        if let Some(id) = self.dict.get(s) {
            return Ok(*id);
        }
        self.conn.execute("INSERT OR IGNORE INTO dict(s) VALUES(?1)", [s]).map_err(err("dictionary"))?;
        let id: i64 =
            self.conn.query_row("SELECT id FROM dict WHERE s = ?1", [s], |r| r.get(0)).map_err(err("dictionary"))?;
        self.dict.insert(s.to_string(), id);
        Ok(id)
    }

    fn opt(&mut self, s: Option<&str>) -> Result<Option<i64>> {
        s.map(|s| self.id(s)).transpose()
    }
}

/// Appends records; one writer per store.
pub struct Writer {
    dir: PathBuf,
    cfg: StoreConfig,
    hot: Option<Hot>,
    rollups: Connection,
    sealer: Option<(mpsc::Sender<Job>, JoinHandle<()>)>,
    appended_since_check: u64,
    last_check: i64,
    /// Rollup rows not yet written, and since when.
    pending: rollup::Batch,
    pending_since: std::time::Instant,
}

impl Writer {
    /// Opens (or creates) the store in `dir`. Shards a previous writer left unsealed (it stopped or crashed) are
    /// sealed in the background.
    pub fn open(dir: &Path, cfg: StoreConfig) -> Result<Writer> {
        // Every namespace's traffic is in here: the folder is its owner's alone (0700 when created).
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(dir)
            .map_err(|e| format!("flow store {}: {e}", dir.display()))?;
        let rollups = Connection::open(dir.join("rollups.db")).map_err(err("opening rollups.db"))?;
        check_version(&rollups, &dir.join("rollups.db"))?;
        rollups.execute_batch(&rollup::schema()).map_err(err("rollups.db tables"))?;
        rollups.execute_batch(&format!("PRAGMA user_version = {STORE_VERSION};")).map_err(err("rollups.db version"))?;
        rollups.busy_timeout(std::time::Duration::from_secs(5)).map_err(err("busy timeout"))?;
        let (tx, rx) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name("ces-flow-sealer".into())
            .spawn(move || background(rx))
            .map_err(|e| format!("flow store: {e}"))?;
        let w = Writer {
            dir: dir.to_path_buf(),
            cfg,
            hot: None,
            rollups,
            sealer: Some((tx, handle)),
            appended_since_check: 0,
            last_check: 0,
            pending: rollup::Batch::default(),
            pending_since: std::time::Instant::now(),
        };
        // A shard a crash cut short while it was being made.
        for e in std::fs::read_dir(dir).map_err(|e| format!("flow store {}: {e}", dir.display()))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("flows-") && name.contains(".db.tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        for p in shard_files(dir)? {
            let sealed = Connection::open_with_flags(&p, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .ok()
                .and_then(|c| meta(&c, "sealed"))
                .unwrap_or(0);
            if sealed == 0 {
                w.sealer.as_ref().expect("just made").0.send(Job::Seal(p)).map_err(|e| format!("flow store: {e}"))?;
            }
        }
        Ok(w)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends records, in one transaction, and adds them to the rollups.
    pub fn append(&mut self, records: &[FlowRecord]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let now = us(Timestamp::now());
        let roll = match &self.hot {
            Some(h) => h.count >= self.cfg.shard_records || now - h.opened >= self.cfg.shard_secs as i64 * 1_000_000,
            None => true,
        };
        if roll {
            self.roll(now)?;
        }
        let hot = self.hot.as_mut().expect("rolled");
        let mut rollup = rollup::Batch::default();
        hot.conn.execute_batch("BEGIN").map_err(err("begin"))?;
        let result = (|| -> Result<()> {
            let (mut min_t, mut max_t, mut max_dur) = (i64::MAX, i64::MIN, 0);
            for r in records {
                let t = us(r.time);
                min_t = min_t.min(t);
                max_t = max_t.max(r.end.map_or(t, us));
                max_dur = max_dur.max(r.end.map_or(t, us) - t);
                let tenant = hot.id(&r.tenant)?;
                let ns = hot.opt(r.source.namespace.as_deref())?;
                let pod = hot.opt(r.source.pod.as_deref())?;
                let labels = if r.source.labels.is_empty() {
                    None
                } else if let Some(id) = hot.labels.get(&r.source.labels) {
                    Some(*id)
                } else {
                    let id = hot.id(&serde_json::to_string(&r.source.labels).unwrap_or_default())?;
                    hot.labels.insert(r.source.labels.clone(), id);
                    Some(id)
                };
                let host = hot.opt(r.destination.host.as_deref())?;
                let es = hot.opt(r.destination.external_service.as_deref())?;
                let (rule, ctx, mode) = match &r.rule {
                    Some(x) => (Some(hot.id(&x.rule)?), Some(hot.id(&x.context)?), Some(hot.id(&x.mode)?)),
                    None => (None, None, None),
                };
                let proto = protocol_number(&r.protocol).map(i64::from);
                let kind = match r.kind {
                    Kind::Connection => 0,
                    Kind::Packet => 1,
                };
                let origin = match r.origin {
                    Origin::Gateway => 0,
                    Origin::Bigip => 1,
                    Origin::Import => 2,
                };
                {
                    let mut st = hot
                        .conn
                        .prepare_cached(
                            "INSERT INTO flows VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20,?21,?22,?23,?24,?25,?26)",
                        )
                        .map_err(err("insert"))?;
                    st.execute(params![
                        t,
                        r.end.map(us),
                        kind,
                        origin,
                        tenant,
                        r.source.ip.map(ip_blob),
                        r.source.port,
                        ns,
                        pod,
                        labels,
                        r.destination.ip.map(ip_blob),
                        r.destination.port,
                        host,
                        es,
                        proto,
                        verdict_code(r.verdict),
                        rule,
                        ctx,
                        mode,
                        r.packets.out as i64,
                        r.packets.back as i64,
                        r.bytes.out as i64,
                        r.bytes.back as i64,
                        outcome_code(r.outcome),
                        r.nat.as_ref().map(|n| ip_blob(n.ip)),
                        r.nat.as_ref().and_then(|n| n.port),
                    ])
                    .map_err(err("insert"))?;
                }
                if !r.audit.is_empty() {
                    let flow = hot.conn.last_insert_rowid();
                    for a in &r.audit {
                        let id = hot.id(a)?;
                        hot.conn
                            .prepare_cached("INSERT INTO flow_audit VALUES(?1, ?2)")
                            .and_then(|mut s| s.execute(params![flow, id]))
                            .map_err(err("audit"))?;
                    }
                }
                rollup.add(r);
            }
            hot.count += records.len() as u64;
            hot.conn
                .execute(
                    "INSERT INTO meta VALUES('count', ?1), ('min_t', ?2), ('max_t', ?3), ('max_dur', ?4) ON CONFLICT(k) DO UPDATE SET v = CASE k WHEN 'min_t' THEN min(v, excluded.v) WHEN 'max_t' THEN max(v, excluded.v) WHEN 'max_dur' THEN max(v, excluded.v) ELSE excluded.v END",
                    params![hot.count as i64, min_t, max_t, max_dur],
                )
                .map_err(err("shard meta"))?;
            Ok(())
        })();
        match result {
            Ok(()) => hot.conn.execute_batch("COMMIT").map_err(err("commit"))?,
            Err(e) => {
                let _ = hot.conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
        // The rollups are written once a second (or beyond 50k rows): records of the same minutes, arriving in many
        // batches, add up in memory first. A crash costs the rollups (not the records) that last second.
        self.pending.merge(rollup);
        if self.pending.len() >= 50_000 || self.pending_since.elapsed() >= std::time::Duration::from_secs(1) {
            self.flush_rollups()?;
        }
        self.appended_since_check += records.len() as u64;
        if self.appended_since_check >= 100_000 || now - self.last_check > 10_000_000 {
            self.retention(now)?;
        }
        Ok(())
    }

    /// Writes the rollups waiting in memory if they have waited a second: called once a second by the pipeline, so
    /// a report counts the last records even when no more arrive.
    pub fn flush_due(&mut self) -> Result<()> {
        if self.pending.len() > 0 && self.pending_since.elapsed() >= std::time::Duration::from_secs(1) {
            self.flush_rollups()?;
        }
        Ok(())
    }

    /// Writes the rollups waiting in memory.
    pub fn flush_rollups(&mut self) -> Result<()> {
        self.pending_since = std::time::Instant::now();
        std::mem::take(&mut self.pending).write(&self.rollups)
    }

    /// Seals the hot shard (its indexes are built in the background) and starts a new one.
    fn roll(&mut self, now: i64) -> Result<()> {
        if let Some(h) = self.hot.take() {
            let path = h.path.clone();
            drop(h.conn);
            if let Some((tx, _)) = &self.sealer {
                tx.send(Job::Seal(path)).map_err(|e| format!("flow store: {e}"))?;
            }
        }
        let hot = Hot::create(&self.dir, now)?;
        if let Some((tx, _)) = &self.sealer {
            tx.send(Job::Hot(hot.path.clone())).map_err(|e| format!("flow store: {e}"))?;
        }
        self.hot = Some(hot);
        Ok(())
    }

    /// Records lost before they reached the store, counted per minute, source and reason.
    pub fn losses(&mut self, at: Timestamp, source: &str, reason: &str, n: u64) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.rollups
            .execute(
                "INSERT INTO losses VALUES(?1, ?2, ?3, ?4) ON CONFLICT DO UPDATE SET n = n + excluded.n",
                params![minute(us(at)), source, reason, n as i64],
            )
            .map_err(err("losses"))?;
        Ok(())
    }

    /// The rules the policy has now (for "rules never hit").
    pub fn rules(&mut self, rules: &[String], at: Timestamp) -> Result<()> {
        let t = us(at);
        let tx = self.rollups.unchecked_transaction().map_err(err("rules"))?;
        for r in rules {
            tx.execute(
                "INSERT INTO rules VALUES(?1, ?2, ?2) ON CONFLICT DO UPDATE SET last = excluded.last",
                params![r, t],
            )
            .map_err(err("rules"))?;
        }
        tx.commit().map_err(err("rules"))
    }

    /// Deletes the oldest sealed shards while the folder is too large or they are too old, and old rollups.
    fn retention(&mut self, now: i64) -> Result<()> {
        self.appended_since_check = 0;
        self.last_check = now;
        let horizon = now - self.cfg.max_age_secs as i64 * 1_000_000;
        let hot = self.hot.as_ref().map(|h| h.path.clone());
        let shards: Vec<PathBuf> = shard_files(&self.dir)?.into_iter().filter(|p| Some(p) != hot.as_ref()).collect();
        let mut total: u64 = shards.iter().map(|p| file_size(p)).sum::<u64>()
            + hot.as_ref().map_or(0, |p| file_size(p))
            + file_size(&self.dir.join("rollups.db"));
        for p in shards {
            let (sealed, max_t) = match Connection::open_with_flags(&p, OpenFlags::SQLITE_OPEN_READ_ONLY) {
                Ok(c) => (meta(&c, "sealed").unwrap_or(0), meta(&c, "max_t").unwrap_or(i64::MIN)),
                Err(_) => (1, i64::MIN),
            };
            if sealed == 0 {
                continue;
            }
            if total > self.cfg.max_bytes || max_t < horizon {
                let size = file_size(&p);
                for suffix in ["", "-wal", "-shm"] {
                    let mut s = p.as_os_str().to_owned();
                    s.push(suffix);
                    let _ = std::fs::remove_file(PathBuf::from(s));
                }
                total = total.saturating_sub(size);
            } else {
                break;
            }
        }
        rollup::retain(&self.rollups, now, horizon)
    }

    /// Seals the hot shard and waits for every sealing to finish (for a clean stop, and tests).
    pub fn close(mut self) -> Result<()> {
        self.flush_rollups()?;
        if let Some(h) = self.hot.take() {
            let path = h.path.clone();
            drop(h.conn);
            if let Some((tx, _)) = &self.sealer {
                tx.send(Job::Seal(path)).map_err(|e| format!("flow store: {e}"))?;
            }
        }
        if let Some((tx, handle)) = self.sealer.take() {
            drop(tx);
            let _ = handle.join();
        }
        Ok(())
    }

    /// Forces the current hot shard to be sealed now (tests).
    pub fn seal_now(&mut self) -> Result<()> {
        self.flush_rollups()?;
        self.roll(us(Timestamp::now()))?;
        self.hot = None;
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Err(e) = self.flush_rollups() {
            eprintln!("ces: {e}");
        }
        if let Some((tx, handle)) = self.sealer.take() {
            drop(tx);
            let _ = handle.join();
        }
    }
}

/// Reads a store (any number of readers, next to its writer).
pub struct Reader {
    dir: PathBuf,
}

/// Where `--follow` left off: the shard and the last row read in it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    pub shard: Option<PathBuf>,
    pub row: i64,
}

/// What makes flows alike for [`Reader::scan_distinct`]: tenant, source address (length, then bytes: no allocation
/// per row), namespace, pod, destination address, port, host, protocol, verdict, rule, minute (dictionary ids).
type DistinctKey =
    (i64, [u8; 17], Option<i64>, Option<i64>, [u8; 17], Option<i64>, Option<i64>, Option<i64>, i64, Option<i64>, i64);

/// The distinct flows of the rows `lo < rowid <= hi` of a shard that pass the conditions `w` (parameters `p`).
fn distinct_rows(
    path: &Path,
    w: &[String],
    p: Vec<rusqlite::types::Value>,
    lo: i64,
    hi: i64,
    by_minute: bool,
) -> Result<HashMap<DistinctKey, (u64, i64)>> {
    fn addr(v: rusqlite::types::ValueRef<'_>) -> [u8; 17] {
        let mut a = [0u8; 17];
        if let rusqlite::types::ValueRef::Blob(b) = v
            && b.len() <= 16
        {
            a[0] = b.len() as u8;
            a[1..=b.len()].copy_from_slice(b);
        }
        a
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(err("opening a shard"))?;
    let mut w = w.to_vec();
    w.push(format!("rowid > {lo} AND rowid <= {hi}"));
    let sql = format!(
        "SELECT t, tenant, sip, ns, pod, dip, dport, host, proto, verdict, rule FROM flows WHERE {}",
        w.join(" AND ")
    );
    let mut seen: HashMap<DistinctKey, (u64, i64)> = HashMap::new();
    let mut st = conn.prepare(&sql).map_err(err("scan"))?;
    let mut rows = st.query(rusqlite::params_from_iter(p)).map_err(err("scan"))?;
    while let Some(r) = rows.next().map_err(err("scan"))? {
        let e = err("scan");
        let t: i64 = r.get(0).map_err(&e)?;
        let key: DistinctKey = (
            r.get(1).map_err(&e)?,
            addr(r.get_ref(2).map_err(&e)?),
            r.get(3).map_err(&e)?,
            r.get(4).map_err(&e)?,
            addr(r.get_ref(5).map_err(&e)?),
            r.get(6).map_err(&e)?,
            r.get(7).map_err(&e)?,
            r.get(8).map_err(&e)?,
            r.get(9).map_err(&e)?,
            r.get(10).map_err(&e)?,
            if by_minute { t.div_euclid(60_000_000) } else { 0 },
        );
        let v = seen.entry(key).or_insert((0, t));
        v.0 += 1;
        v.1 = v.1.min(t);
    }
    Ok(seen)
}

/// The records of a part's distinct flows (see [`Reader::scan_distinct`]), by time, then by flow; `names`: the
/// shard's strings by id.
fn distinct_records(seen: HashMap<DistinctKey, (u64, i64)>, names: &HashMap<i64, String>) -> Vec<(FlowRecord, u64)> {
    let ip = |a: &[u8; 17]| blob_ip(&a[1..=a[0] as usize]);
    let port = |p: Option<i64>| p.and_then(|p| u16::try_from(p).ok());
    let name = |id: Option<i64>| id.and_then(|id| names.get(&id).cloned());
    // Sorted before the records are made (they are large).
    let mut keys: Vec<(i64, DistinctKey, u64)> = seen.into_iter().map(|(k, (n, t))| (t, k, n)).collect();
    keys.sort_unstable();
    let mut out = Vec::with_capacity(keys.len());
    for (t, (tenant, sip, ns, pod, dip, dport, host, proto, verdict, rule, _), n) in keys {
        let mut r = FlowRecord::packet(from_us(t), &name(Some(tenant)).unwrap_or_default(), code_verdict(verdict));
        r.source.ip = ip(&sip);
        r.source.namespace = name(ns);
        r.source.pod = name(pod);
        r.destination.ip = ip(&dip);
        r.destination.port = port(dport);
        r.destination.host = name(host);
        r.protocol = proto.map_or(String::new(), |p| protocol_name(p as u8));
        r.rule = name(rule).map(|rule| RuleRef { rule, context: String::new(), mode: String::new() });
        out.push((r, n));
    }
    out
}

/// The most records [`Reader::scan_distinct`] reads as one part.
pub const DISTINCT_PART: i64 = 50_000;

struct ShardReader {
    conn: Connection,
    names: HashMap<i64, String>,
    path: PathBuf,
}

const COLUMNS: &str = "rowid, t, e, kind, origin, tenant, sip, sport, ns, pod, labels, dip, dport, host, es, proto, verdict, rule, ctx, mode, po, pi, bo, bi, outcome, nat_ip, nat_port";

impl ShardReader {
    fn open(path: &Path) -> Result<ShardReader> {
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(err("opening a shard"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(err("busy timeout"))?;
        Ok(ShardReader { conn, names: HashMap::new(), path: path.to_path_buf() })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn name(&mut self, id: Option<i64>) -> Option<String> {
        let id = id?;
        if let Some(s) = self.names.get(&id) {
            return Some(s.clone());
        }
        let s: String = self.conn.query_row("SELECT s FROM dict WHERE id = ?1", [id], |r| r.get(0)).ok()?;
        self.names.insert(id, s.clone());
        Some(s)
    }

    /// The dictionary ids of strings equal to `s`, or (for rules) ending in `/s`.
    fn ids(&self, s: &str, suffix: bool) -> Result<Vec<i64>> {
        let sql = if suffix {
            "SELECT id FROM dict WHERE s = ?1 OR s LIKE '%/' || ?1"
        } else {
            "SELECT id FROM dict WHERE s = ?1"
        };
        let mut st = self.conn.prepare_cached(sql).map_err(err("dictionary"))?;
        let ids = st.query_map([s], |r| r.get(0)).map_err(err("dictionary"))?.collect::<std::result::Result<_, _>>();
        let mut ids: Vec<i64> = ids.map_err(err("dictionary"))?;
        if suffix {
            // LIKE treats `_` and `%` in `s` as wildcards: keep only true suffix matches.
            let mut keep = Vec::new();
            for id in ids.drain(..) {
                let name: String = self
                    .conn
                    .query_row("SELECT s FROM dict WHERE id = ?1", [id], |r| r.get(0))
                    .map_err(err("dictionary"))?;
                if rule_matches(s, &name) {
                    keep.push(id);
                }
            }
            ids = keep;
        }
        Ok(ids)
    }

    /// SQL conditions and parameters for a filter; `None` when the shard cannot hold a match.
    fn conditions(&self, f: &Filter) -> Result<Option<(Vec<String>, Vec<rusqlite::types::Value>)>> {
        use rusqlite::types::Value as V;
        let mut w: Vec<String> = Vec::new();
        let mut p: Vec<V> = Vec::new();
        let eq = |col: &str, ids: Vec<i64>, w: &mut Vec<String>| -> bool {
            if ids.is_empty() {
                return false;
            }
            w.push(format!("{col} IN ({})", ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")));
            true
        };
        if let Some(s) = f.since {
            // A connection counts from its start to its end. No connection of this shard lasted longer than
            // `max_dur`: so the time index can narrow the rows first.
            if let Some(d) = meta(&self.conn, "max_dur") {
                w.push(format!("t >= ?{}", p.len() + 1));
                p.push(V::Integer(us(s).saturating_sub(d)));
            }
            w.push(format!("coalesce(e, t) >= ?{}", p.len() + 1));
            p.push(V::Integer(us(s)));
        }
        if let Some(u) = f.until {
            w.push(format!("t <= ?{}", p.len() + 1));
            p.push(V::Integer(us(u)));
        }
        if let Some(t) = &f.tenant
            && !eq("tenant", self.ids(t, false)?, &mut w)
        {
            return Ok(None);
        }
        if let Some(ns) = &f.namespace
            && !eq("ns", self.ids(ns, false)?, &mut w)
        {
            return Ok(None);
        }
        if let Some(pod) = &f.pod {
            let (ns, name) = match pod.split_once('/') {
                Some((a, b)) => (Some(a), b),
                None => (None, pod.as_str()),
            };
            if !eq("pod", self.ids(name, false)?, &mut w) {
                return Ok(None);
            }
            if let Some(ns) = ns
                && !eq("ns", self.ids(ns, false)?, &mut w)
            {
                return Ok(None);
            }
        }
        if let Some(rule) = &f.rule {
            let ids = self.ids(rule, true)?;
            if ids.is_empty() {
                return Ok(None);
            }
            let list = ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
            w.push(format!("(rule IN ({list}) OR rowid IN (SELECT flow FROM flow_audit WHERE rule IN ({list})))"));
        }
        if let Some(v) = f.verdict {
            w.push(format!("verdict = {}", verdict_code(v)));
        }
        match &f.to {
            None => {}
            Some(To::Net(n)) => {
                w.push(format!("dip BETWEEN ?{} AND ?{}", p.len() + 1, p.len() + 2));
                p.push(V::Blob(ip_blob(n.network())));
                p.push(V::Blob(ip_blob(n.broadcast())));
                w.push(format!("length(dip) = {}", if n.network().is_ipv4() { 4 } else { 16 }));
            }
            Some(To::Host(h)) if !eq("host", self.ids(h, false)?, &mut w) => return Ok(None),
            Some(To::Host(_)) => {}
        }
        if let Some(proto) = &f.protocol {
            match protocol_number(proto) {
                Some(n) => w.push(format!("proto = {n}")),
                None => return Ok(None),
            }
        }
        if let Some(port) = f.port {
            w.push(format!("dport = {port}"));
        }
        if let Some(nat) = f.nat {
            w.push(format!("nat_ip = ?{}", p.len() + 1));
            p.push(V::Blob(ip_blob(nat)));
        }
        if let Some(port) = f.nat_port {
            w.push(format!("nat_port = {port}"));
        }
        Ok(Some((w, p)))
    }

    fn decode(&mut self, raw: RawRow) -> (i64, FlowRecord) {
        let port = |p: Option<i64>| p.and_then(|p| u16::try_from(p).ok());
        let rec = FlowRecord {
            v: SCHEMA_VERSION,
            kind: if raw.kind == 0 { Kind::Connection } else { Kind::Packet },
            origin: match raw.origin {
                0 => Origin::Gateway,
                1 => Origin::Bigip,
                _ => Origin::Import,
            },
            time: from_us(raw.t),
            end: raw.e.map(from_us),
            tenant: self.name(Some(raw.tenant)).unwrap_or_default(),
            source: Source {
                ip: raw.sip.as_deref().and_then(blob_ip),
                port: port(raw.sport),
                namespace: self.name(raw.ns),
                pod: self.name(raw.pod),
                labels: self.name(raw.labels).and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default(),
            },
            destination: Destination {
                ip: raw.dip.as_deref().and_then(blob_ip),
                port: port(raw.dport),
                host: self.name(raw.host),
                external_service: self.name(raw.es),
            },
            protocol: raw.proto.map_or(String::new(), |p| protocol_name(p as u8)),
            verdict: code_verdict(raw.verdict),
            rule: self.name(raw.rule).map(|rule| RuleRef {
                rule,
                context: self.name(raw.ctx).unwrap_or_default(),
                mode: self.name(raw.mode).unwrap_or_default(),
            }),
            audit: Vec::new(),
            packets: Counts { out: raw.po as u64, back: raw.pi as u64 },
            bytes: Counts { out: raw.bo as u64, back: raw.bi as u64 },
            outcome: code_outcome(raw.outcome),
            nat: raw.nat_ip.as_deref().and_then(blob_ip).map(|ip| Nat { ip, port: port(raw.nat_port) }),
        };
        (raw.rowid, rec)
    }

    /// Records of this shard that pass `f` with a row id after `after`; the newest `last` when given.
    fn select(&mut self, f: &Filter, last: Option<usize>, after: i64) -> Result<Vec<(i64, FlowRecord)>> {
        let Some((mut w, p)) = self.conditions(f)? else { return Ok(Vec::new()) };
        w.push(format!("rowid > {after}"));
        let order = match last {
            Some(n) => format!("ORDER BY t DESC LIMIT {n}"),
            None => "ORDER BY rowid".to_string(),
        };
        let sql = format!("SELECT {COLUMNS} FROM flows WHERE {} {order}", w.join(" AND "));
        let rows: Vec<(i64, FlowRecord)> = {
            let mut st = self.conn.prepare(&sql).map_err(err("query"))?;
            let mut rows = st.query(rusqlite::params_from_iter(p)).map_err(err("query"))?;
            let mut raw = Vec::new();
            while let Some(r) = rows.next().map_err(err("query"))? {
                // Dictionary lookups need the connection: collect the row first.
                raw.push(RawRow::read(r).map_err(err("query"))?);
            }
            drop(rows);
            drop(st);
            raw.into_iter().map(|raw| self.decode(raw)).collect()
        };
        let mut rows = rows;
        let any: bool =
            self.conn.query_row("SELECT EXISTS(SELECT 1 FROM flow_audit)", [], |r| r.get(0)).map_err(err("audit"))?;
        if !any {
            return Ok(rows);
        }
        // Audit rules, for the rows that have some.
        let mut st = self
            .conn
            .prepare_cached("SELECT d.s FROM flow_audit a JOIN dict d ON d.id = a.rule WHERE a.flow = ?1")
            .map_err(err("audit"))?;
        for (rowid, rec) in rows.iter_mut() {
            let names = st.query_map([*rowid], |r| r.get::<_, String>(0)).map_err(err("audit"))?;
            rec.audit = names.collect::<std::result::Result<_, _>>().map_err(err("audit"))?;
        }
        Ok(rows)
    }
}

/// A row's raw values, read before decoding (decoding needs the shard's dictionary).
struct RawRow {
    rowid: i64,
    t: i64,
    e: Option<i64>,
    kind: i64,
    origin: i64,
    tenant: i64,
    sip: Option<Vec<u8>>,
    sport: Option<i64>,
    ns: Option<i64>,
    pod: Option<i64>,
    labels: Option<i64>,
    dip: Option<Vec<u8>>,
    dport: Option<i64>,
    host: Option<i64>,
    es: Option<i64>,
    proto: Option<i64>,
    verdict: i64,
    rule: Option<i64>,
    ctx: Option<i64>,
    mode: Option<i64>,
    po: i64,
    pi: i64,
    bo: i64,
    bi: i64,
    outcome: i64,
    nat_ip: Option<Vec<u8>>,
    nat_port: Option<i64>,
}

impl RawRow {
    /// The columns of [`COLUMNS`], in order.
    fn read(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
        Ok(RawRow {
            rowid: r.get(0)?,
            t: r.get(1)?,
            e: r.get(2)?,
            kind: r.get(3)?,
            origin: r.get(4)?,
            tenant: r.get(5)?,
            sip: r.get(6)?,
            sport: r.get(7)?,
            ns: r.get(8)?,
            pod: r.get(9)?,
            labels: r.get(10)?,
            dip: r.get(11)?,
            dport: r.get(12)?,
            host: r.get(13)?,
            es: r.get(14)?,
            proto: r.get(15)?,
            verdict: r.get(16)?,
            rule: r.get(17)?,
            ctx: r.get(18)?,
            mode: r.get(19)?,
            po: r.get(20)?,
            pi: r.get(21)?,
            bo: r.get(22)?,
            bi: r.get(23)?,
            outcome: r.get(24)?,
            nat_ip: r.get(25)?,
            nat_port: r.get(26)?,
        })
    }
}

/// The layout of the store's files: a store of another layout is refused with a clear message, never misread.
pub const STORE_VERSION: i64 = 2;

/// Refuses a `rollups.db` of another layout (an empty one is new).
fn check_version(conn: &Connection, path: &Path) -> Result<()> {
    let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(err("rollups.db version"))?;
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table'", [], |r| r.get(0))
        .map_err(err("rollups.db version"))?;
    if tables > 0 && v != STORE_VERSION {
        return Err(format!(
            "{}: a flow store of layout {v}, this CES reads layout {STORE_VERSION}: give it a new folder (or remove this one)",
            path.display()
        ));
    }
    Ok(())
}

impl Reader {
    /// Opens the store in `dir`; an error when the folder holds no store, or one of another layout.
    pub fn open(dir: &Path) -> Result<Reader> {
        if !dir.join("rollups.db").exists() {
            return Err(format!(
                "{} holds no flow store (no rollups.db): give the store's folder (--store DIR)",
                dir.display()
            ));
        }
        let conn = Connection::open_with_flags(dir.join("rollups.db"), OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(err("opening rollups.db"))?;
        check_version(&conn, &dir.join("rollups.db"))?;
        Ok(Reader { dir: dir.to_path_buf() })
    }

    fn shards(&self, f: &Filter) -> Result<Vec<ShardReader>> {
        let mut out = Vec::new();
        for p in shard_files(&self.dir)? {
            let Ok(s) = ShardReader::open(&p) else { continue };
            // Shards wholly outside the time window are skipped.
            let (min_t, max_t) = (meta(&s.conn, "min_t"), meta(&s.conn, "max_t"));
            if let (Some(since), Some(max_t)) = (f.since, max_t)
                && max_t < us(since)
            {
                continue;
            }
            if let (Some(until), Some(min_t)) = (f.until, min_t)
                && min_t > us(until)
            {
                continue;
            }
            out.push(s);
        }
        Ok(out)
    }

    /// The records that pass `f`, in time order; with `last`, only the newest `last`.
    pub fn query(&self, f: &Filter, last: Option<usize>) -> Result<Vec<FlowRecord>> {
        let mut shards = self.shards(f)?;
        let mut out: Vec<FlowRecord> = Vec::new();
        // A record's time is when its traffic began, and connections are recorded when they end: any shard may hold
        // the newest records, so each gives its newest `last`, and the newest of those are kept.
        for s in shards.iter_mut() {
            out.extend(s.select(f, last, 0)?.into_iter().map(|(_, r)| r));
        }
        out.sort_by_key(|r| r.time);
        if let Some(n) = last {
            let skip = out.len().saturating_sub(n);
            out.drain(..skip);
        }
        Ok(out)
    }

    /// Every record that passes `f`, shard by shard in arrival order, handed to `each` as it is read (nothing is
    /// collected: for passes over the whole store). The records come without their audit rules. `each` returns
    /// false to stop.
    pub fn scan(&self, f: &Filter, mut each: impl FnMut(FlowRecord) -> bool) -> Result<()> {
        for mut s in self.shards(f)? {
            let Some((w, p)) = s.conditions(f)? else { continue };
            // The whole dictionary first: decoding then needs no query of its own.
            {
                let mut st = s.conn.prepare("SELECT id, s FROM dict").map_err(err("dictionary"))?;
                let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)));
                for row in rows.map_err(err("dictionary"))? {
                    let (id, name) = row.map_err(err("dictionary"))?;
                    s.names.insert(id, name);
                }
            }
            let sql = format!(
                "SELECT {COLUMNS} FROM flows{} ORDER BY rowid",
                if w.is_empty() { String::new() } else { format!(" WHERE {}", w.join(" AND ")) }
            );
            let conn = Connection::open_with_flags(s.path(), OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(err("opening a shard"))?;
            let mut st = conn.prepare(&sql).map_err(err("scan"))?;
            let mut rows = st.query(rusqlite::params_from_iter(p)).map_err(err("scan"))?;
            while let Some(r) = rows.next().map_err(err("scan"))? {
                let raw = RawRow::read(r).map_err(err("scan"))?;
                if !each(s.decode(raw).1) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// The distinct flows among the records that pass `f`, part by part: within a part of the store (at most
    /// [`DISTINCT_PART`] records of one shard), records with the same tenant, source (address, namespace, pod),
    /// destination (address, host name, port), protocol, verdict and deciding rule (and, with `by_minute`, the same
    /// minute) are one, with the number of records it stands for; its time is the earliest record's. Only those
    /// fields are filled in. Parts are read on every core, by their integer columns (strings are looked up once per
    /// distinct flow): each thread makes its state with `init` and hands it each part it read, numbered in the
    /// store's order, with `each`; the states come back at the end. For passes that decide every record again
    /// (`ces impact`), in bounded memory.
    pub fn scan_distinct<S: Send>(
        &self,
        f: &Filter,
        by_minute: bool,
        init: impl Fn() -> S + Sync,
        each: impl Fn(&mut S, usize, Vec<(FlowRecord, u64)>) + Sync,
    ) -> Result<Vec<S>> {
        let shards = self.shards(f)?;
        // (part number, shard, conditions, their parameters, rows after, rows up to).
        type Part = (usize, usize, Vec<String>, Vec<rusqlite::types::Value>, i64, i64);
        let mut jobs: Vec<Part> = Vec::new();
        for (i, s) in shards.iter().enumerate() {
            let Some((w, p)) = s.conditions(f)? else { continue };
            let max: i64 =
                s.conn.query_row("SELECT coalesce(max(rowid), 0) FROM flows", [], |r| r.get(0)).map_err(err("scan"))?;
            let mut lo = 0;
            while lo < max {
                jobs.push((jobs.len(), i, w.clone(), p.clone(), lo, lo + DISTINCT_PART));
                lo += DISTINCT_PART;
            }
        }
        jobs.reverse();
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8);
        let queue = std::sync::Mutex::new(jobs);
        let shards = std::sync::Mutex::new(shards);
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| -> Result<S> {
                        let mut state = init();
                        loop {
                            let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop();
                            let Some((n, i, w, p, lo, hi)) = next else { return Ok(state) };
                            let path = shards.lock().unwrap_or_else(|p| p.into_inner())[i].path.clone();
                            let seen = distinct_rows(&path, &w, p, lo, hi, by_minute)?;
                            // The strings of the part's flows, from the shard's dictionary (ids are per shard).
                            let names = {
                                let mut guard = shards.lock().unwrap_or_else(|p| p.into_inner());
                                let s = &mut guard[i];
                                let mut ids: Vec<i64> = Vec::new();
                                for k in seen.keys() {
                                    ids.push(k.0);
                                    ids.extend([k.2, k.3, k.6, k.9].into_iter().flatten());
                                }
                                ids.sort_unstable();
                                ids.dedup();
                                ids.into_iter().filter_map(|id| Some((id, s.name(Some(id))?))).collect()
                            };
                            each(&mut state, n, distinct_records(seen, &names));
                        }
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap_or_else(|_| Err("a reading thread failed".into()))).collect()
        })
    }

    /// Records that arrived after `cursor` and pass `f`, in arrival order, and the new cursor.
    pub fn follow(&self, f: &Filter, cursor: &Cursor) -> Result<(Vec<FlowRecord>, Cursor)> {
        let files = shard_files(&self.dir)?;
        let mut out = Vec::new();
        let mut next = cursor.clone();
        for p in files.iter().filter(|p| cursor.shard.as_ref().is_none_or(|c| *p >= c)) {
            let Ok(mut s) = ShardReader::open(p) else { continue };
            let after = if cursor.shard.as_ref() == Some(p) { cursor.row } else { 0 };
            for (row, r) in s.select(f, None, after)? {
                next = Cursor { shard: Some(p.clone()), row };
                out.push(r);
            }
            // Rows the filter left out still move the cursor.
            let max: i64 = s
                .conn
                .query_row("SELECT coalesce(max(rowid), 0) FROM flows", [], |r| r.get(0))
                .map_err(err("follow"))?;
            if max > after {
                next = Cursor { shard: Some(p.clone()), row: max };
            }
        }
        Ok((out, next))
    }

    /// The cursor at the end of the store: `follow` from it returns only what arrives later.
    pub fn end(&self) -> Result<Cursor> {
        let Some(p) = shard_files(&self.dir)?.pop() else { return Ok(Cursor::default()) };
        let s = ShardReader::open(&p)?;
        let max: i64 =
            s.conn.query_row("SELECT coalesce(max(rowid), 0) FROM flows", [], |r| r.get(0)).map_err(err("end"))?;
        Ok(Cursor { shard: Some(p), row: max })
    }

    /// Records in the store (every shard).
    pub fn count(&self) -> Result<u64> {
        let mut n = 0;
        for p in shard_files(&self.dir)? {
            let s = ShardReader::open(&p)?;
            n += s.conn.query_row("SELECT count(*) FROM flows", [], |r| r.get::<_, i64>(0)).map_err(err("count"))?
                as u64;
        }
        Ok(n)
    }

    /// Bytes the store takes on disk.
    pub fn bytes(&self) -> Result<u64> {
        Ok(shard_files(&self.dir)?.iter().map(|p| file_size(p)).sum::<u64>() + file_size(&self.dir.join("rollups.db")))
    }

    fn rollups(&self) -> Result<Connection> {
        let conn = Connection::open_with_flags(self.dir.join("rollups.db"), OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(err("opening rollups.db"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(err("busy timeout"))?;
        Ok(conn)
    }

    /// The report over a window (`tenant`/`namespace` narrow it), from the rollups.
    pub fn report(&self, f: &Filter, top: usize) -> Result<ReportData> {
        rollup::report(&self.rollups()?, f, top)
    }

    /// Records per tenant, namespace, destination, ExternalService and verdict over a window (the flow map).
    pub fn destinations(&self, f: &Filter) -> Result<Vec<rollup::DestRow>> {
        rollup::destinations(&self.rollups()?, f, us(Timestamp::now()))
    }

    /// What each rule decided and audited over a window, by rule id.
    pub fn rule_hits(&self, f: &Filter) -> Result<BTreeMap<String, rollup::RuleHits>> {
        rollup::rule_hits(&self.rollups()?, f, us(Timestamp::now()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::record::Verdict;

    pub(crate) fn rec(i: u32, t: Timestamp) -> FlowRecord {
        let mut r = FlowRecord::packet(t, if i.is_multiple_of(2) { "payments" } else { "analytics" }, Verdict::Accept);
        r.kind = Kind::Connection;
        r.source.ip = Some(IpAddr::from([10, 10, 0, (i % 250) as u8]));
        r.source.namespace = Some(format!("ns{}", i % 3));
        r.source.pod = Some(format!("pod-{}", i % 7));
        r.destination.ip = Some(IpAddr::from([198, 51, 100, (i % 9) as u8]));
        r.destination.port = Some(443);
        r.protocol = "tcp".into();
        r.verdict = if i.is_multiple_of(5) { Verdict::Drop } else { Verdict::Accept };
        r.rule = Some(RuleRef {
            rule: format!("NamespaceEgressRule/ns{}/r{}", i % 3, i % 4),
            context: "namespace".into(),
            mode: "enforce".into(),
        });
        if i.is_multiple_of(11) {
            r.audit = vec!["ClusterEgressRule/audit-all".into()];
        }
        r.bytes = Counts { out: 100, back: 1000 };
        r.outcome = if i.is_multiple_of(13) { Outcome::Reset } else { Outcome::Completed };
        r
    }

    #[test]
    fn records_come_back_as_written_through_sealed_and_hot_shards() {
        let dir = std::env::temp_dir().join(format!("ces-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t0: Timestamp = "2026-12-06T10:00:00Z".parse().unwrap();
        let records: Vec<FlowRecord> =
            (0..1000).map(|i| rec(i, t0 + jiff::SignedDuration::from_millis(i as i64))).collect();
        let cfg = StoreConfig { shard_records: 300, ..StoreConfig::default() };
        let mut w = Writer::open(&dir, cfg).unwrap();
        for chunk in records.chunks(100) {
            w.append(chunk).unwrap();
        }
        w.rules(&["NamespaceEgressRule/ns0/r0".into(), "ClusterEgressRule/never".into()], t0).unwrap();
        w.losses(t0, "nflog", "sequence-gap", 7).unwrap();
        w.close().unwrap();
        assert!(shard_files(&dir).unwrap().len() >= 4, "sealed shards and the last");
        let r = Reader::open(&dir).unwrap();
        assert_eq!(r.count().unwrap(), 1000);
        let all = r.query(&Filter::default(), None).unwrap();
        assert_eq!(all, records, "every field comes back");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700, "the store is its owner's");
        let f = Filter { namespace: Some("ns1".into()), verdict: Some(Verdict::Drop), ..Filter::default() };
        let want: Vec<FlowRecord> = records.iter().filter(|x| f.matches(x)).cloned().collect();
        assert_eq!(r.query(&f, None).unwrap(), want);
        let f = Filter { rule: Some("audit-all".into()), ..Filter::default() };
        assert_eq!(r.query(&f, None).unwrap().len(), records.iter().filter(|x| f.matches(x)).count());
        let f = Filter { to: Some(To::parse("198.51.100.0/30").unwrap()), ..Filter::default() };
        assert_eq!(r.query(&f, None).unwrap().len(), records.iter().filter(|x| f.matches(x)).count());
        let last = r.query(&Filter::default(), Some(5)).unwrap();
        assert_eq!(last, records[995..].to_vec(), "the newest five, in time order");
        let rep = r.report(&Filter::default(), 100).unwrap();
        assert_eq!(rep.records, 1000);
        assert_eq!(rep.by_verdict["drop"], 200);
        assert_eq!(rep.rules_never_hit, ["ClusterEgressRule/never"]);
        assert_eq!(rep.lost, [Count { key: vec!["nflog".into(), "sequence-gap".into()], records: 7 }]);
        assert_eq!(rep.audit_by_rule.iter().map(|c| c.records).sum::<u64>(), 91);
        assert!(rep.errors_by_destination.iter().all(|c| c.key[2] == "reset"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
