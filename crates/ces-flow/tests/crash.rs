//! The store survives a crash: a writer process (this binary, run with `--writer DIR`) appends batches of records to
//! a store with small shards (so sealing happens often), and is killed with SIGKILL at varied moments, mid-append and
//! mid-seal, again and again on the same folder. After every kill each file passes SQLite's integrity check, every
//! batch is there whole or not at all, nothing stored before is gone; a final clean open seals every shard the kills
//! left unsealed, and indexed queries read them.
//!
//! A test binary of its own (`harness = false`), so that it can run itself as the writer.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ces_flow::filter::Filter;
use ces_flow::record::{FlowRecord, Kind, RuleRef, Verdict};
use ces_flow::store::{Reader, StoreConfig, Writer};
use rusqlite::{Connection, OpenFlags};

const BATCH: u64 = 500;
const SHARD: u64 = 5_000;

fn cfg() -> StoreConfig {
    StoreConfig { shard_records: SHARD, ..StoreConfig::default() }
}

/// Batch `b`: every record carries its batch number in its source port.
fn batch(b: u64) -> Vec<FlowRecord> {
    let now = jiff::Timestamp::now();
    (0..BATCH)
        .map(|i| {
            let mut r = FlowRecord::packet(now, "payments", if i % 5 == 0 { Verdict::Drop } else { Verdict::Accept });
            r.kind = Kind::Connection;
            r.source.ip = Some(format!("10.10.{}.{}", (i / 250) % 250, i % 250 + 1).parse().unwrap());
            r.source.port = Some((b % 60_000) as u16 + 1);
            r.source.namespace = Some(format!("ns{}", i % 7));
            r.source.pod = Some(format!("pod-{}", i % 50));
            r.destination.ip = Some(format!("198.51.100.{}", i % 200 + 1).parse().unwrap());
            r.destination.port = Some(443);
            r.rule = Some(RuleRef {
                rule: format!("NamespaceEgressRule/ns{}/out", i % 7),
                context: "namespace".into(),
                mode: "enforce".into(),
            });
            r.bytes.out = i * 10;
            r
        })
        .collect()
}

/// The writer: appends batches until killed, numbering on from what the store holds.
fn writer(dir: &Path) -> ! {
    let mut w = Writer::open(dir, cfg()).unwrap();
    let mut b = Reader::open(dir).unwrap().count().unwrap() / BATCH;
    loop {
        w.append(&batch(b)).unwrap();
        b += 1;
    }
}

fn integrity(p: &Path) {
    let c = Connection::open_with_flags(p, OpenFlags::SQLITE_OPEN_READ_WRITE).unwrap();
    let r: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(r, "ok", "{} is corrupt", p.display());
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "db"))
        .collect();
    v.sort();
    v
}

/// Every batch in the store is whole: `BATCH` records of each batch number, in every shard.
fn whole_batches(dir: &Path) -> u64 {
    let mut total = 0;
    for p in files(dir).into_iter().filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("flows-")) {
        let c = Connection::open_with_flags(&p, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let mut st = c.prepare("SELECT sport, count(*) FROM flows GROUP BY sport").unwrap();
        let rows: Vec<(i64, i64)> =
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(|r| r.unwrap()).collect();
        for (port, n) in rows {
            assert_eq!(n as u64, BATCH, "batch {port} is in {} by halves ({n} records)", p.display());
            total += n as u64;
        }
    }
    total
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--writer") {
        writer(Path::new(&args[i + 1]));
    }
    // `cargo test` passes its own flags (--list among them, for test discovery): only a plain run is the test.
    if args.iter().any(|a| a == "--list") {
        println!("crash: test");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ces-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The store exists before the first kill (so the first writer's count reads it).
    Writer::open(&dir, cfg()).unwrap().close().unwrap();
    let mut before = 0;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let rounds = 12;
    for round in 0..rounds {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(150 + seed % 1200);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .arg("--writer")
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(status.code().is_none(), "the writer ended on its own: {status}");
        for f in files(&dir) {
            integrity(&f);
        }
        let n = whole_batches(&dir);
        let counted = Reader::open(&dir).unwrap().count().unwrap();
        assert_eq!(n, counted);
        assert!(n >= before, "round {round}: {n} records after the kill, {before} before: stored records were lost");
        println!("round {round}: killed after {delay:?}, {n} records in {} files, all whole", files(&dir).len());
        before = n;
    }
    assert!(before > 4 * SHARD, "the writers stored too little ({before}) to have sealed shards");
    // A clean open seals what the kills left unsealed; the sealed shards answer indexed queries.
    let start = Instant::now();
    Writer::open(&dir, cfg()).unwrap().close().unwrap();
    for f in files(&dir).into_iter().filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("flows-")) {
        integrity(&f);
        let c = Connection::open_with_flags(&f, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let sealed: i64 = c.query_row("SELECT v FROM meta WHERE k = 'sealed'", [], |r| r.get(0)).unwrap();
        assert_eq!(sealed, 1, "{} is not sealed after a clean open", f.display());
    }
    let r = Reader::open(&dir).unwrap();
    let f = Filter { namespace: Some("ns3".into()), verdict: Some(Verdict::Drop), ..Filter::default() };
    let got = r.query(&f, None).unwrap();
    // Of each batch's 500 records, those with i % 7 == 3 and i % 5 == 0: i = 10, 45, ... (i % 35 == 10): 14 or 15.
    let per_batch = (0..BATCH).filter(|i| i % 7 == 3 && i % 5 == 0).count() as u64;
    assert_eq!(got.len() as u64, before / BATCH * per_batch);
    println!("sealed on reopen in {:?}; {} records, query ok", start.elapsed(), before);
    let _ = std::fs::remove_dir_all(&dir);
    println!("test crash ... ok");
}
