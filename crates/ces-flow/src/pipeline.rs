//! The flow pipeline of an agent: data-plane readers submit observations into one bounded queue, never waiting (a
//! full queue costs records, counted by source); one thread attributes them, appends the records to the store in
//! batches, and offers them to each exporter's own queue. Every loss is counted where it happens (the kernel's
//! sequence gaps and overruns reported by the readers, this queue, the store, each exporter), written into the
//! store once a second (so reports say "n records lost"), and shown on `/metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ces_model::PodEntry;
use jiff::Timestamp;

use crate::attribute::{Attributor, Observation};
use crate::export::Exporter;
use crate::record::FlowRecord;
use crate::store::Writer;

/// What goes into the pipeline.
pub enum Input {
    Observation(Observation),
    /// A record made elsewhere (imported).
    Record(FlowRecord),
    /// The pods now (after a policy pass): the history opens and closes assignments.
    Pods(Vec<PodEntry>, Timestamp),
    /// Pods that moved (pod churn).
    /// Pod changes, and when they took effect: taken before the data plane is changed, so that a connection the
    /// change lets through is never older than the change in the pods' history.
    PodChanges(Vec<(Option<PodEntry>, Option<PodEntry>)>, Timestamp),
    /// The rules of the policy now (for "rules never hit").
    Rules(Vec<String>),
    /// Sets how host names are found for destinations.
    Names(crate::attribute::NameLookup),
    /// Store and export what came before, then stop (`Pipeline::close`).
    Stop,
}

#[derive(Default)]
pub struct PipelineStats {
    pub received: AtomicU64,
    pub records: AtomicU64,
    pub stored: AtomicU64,
    /// Connection starts dropped on a full queue (their records still come, without audit hits seen before them).
    pub starts_lost: AtomicU64,
    /// `(source, reason)` to records lost.
    pub lost: Mutex<BTreeMap<(String, String), u64>>,
}

impl PipelineStats {
    pub fn lose(&self, source: &str, reason: &str, n: u64) {
        if n > 0 {
            *self
                .lost
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry((source.to_string(), reason.to_string()))
                .or_default() += n;
        }
    }

    pub fn total_lost(&self) -> u64 {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).values().sum()
    }
}

pub struct Pipeline {
    tx: SyncSender<Input>,
    pub stats: Arc<PipelineStats>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    exporter_stats: Vec<(String, Arc<crate::export::ExportStats>)>,
    /// Observations wait for room instead of being dropped: for imports and benchmarks, never on a data path.
    pub lossless: bool,
}

impl Pipeline {
    /// Starts the pipeline's thread. `queue`: how many observations may wait.
    pub fn start(store: Option<Writer>, exporters: Vec<Exporter>, attributor: Attributor, queue: usize) -> Pipeline {
        let (tx, rx) = sync_channel::<Input>(queue.max(1));
        let stats = Arc::new(PipelineStats::default());
        let exporter_stats = exporters.iter().map(|e| (e.name.clone(), e.stats.clone())).collect();
        let s = stats.clone();
        let thread = std::thread::Builder::new()
            .name("ces-flows".into())
            .spawn(move || run(rx, store, exporters, attributor, s))
            .expect("a thread");
        Pipeline { tx, stats, thread: Mutex::new(Some(thread)), exporter_stats, lossless: false }
    }

    /// Submits an observation; counted as lost when the queue is full (a connection's start, which makes no record
    /// of its own, is counted apart).
    pub fn observe(&self, source: &str, o: Observation) {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        if self.lossless {
            let _ = self.tx.send(Input::Observation(o));
            return;
        }
        let start = matches!(o, Observation::Opened { .. });
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(Input::Observation(o)) {
            if start {
                self.stats.starts_lost.fetch_add(1, Ordering::Relaxed);
            } else {
                self.stats.lose(source, "queue-full", 1);
            }
        }
    }

    /// Sends a control input (pods, rules, an imported record): waits for room, since these must not be lost.
    pub fn send(&self, i: Input) {
        let _ = self.tx.send(i);
    }

    /// The policy now: its pods for the history, its rules (and each tenant's default) for "rules never hit". Call
    /// it before the data plane changes, so that the history is never behind it.
    pub fn policy(&self, model: &ces_model::PolicyModel) {
        self.send(Input::Pods(model.pods.clone(), Timestamp::now()));
        let mut rules: Vec<String> = model.rules().map(|(_, r)| r.id.clone()).collect();
        rules.sort();
        rules.dedup();
        rules.extend(model.tenants.iter().map(|t| format!("Tenant/{}", t.name)));
        self.send(Input::Rules(rules));
    }

    /// Records a reader lost before they reached the pipeline (kernel overruns, sequence gaps).
    pub fn lost(&self, source: &str, reason: &str, n: u64) {
        self.stats.lose(source, reason, n);
    }

    /// Stops after everything queued is stored and offered to the exporters. Whoever still holds the pipeline may
    /// go on calling it: what they observe after is counted as lost.
    pub fn close(&self) {
        let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
        let _ = self.tx.send(Input::Stop);
        let _ = t.join();
    }

    /// `close`, for the pipeline's only holder.
    pub fn stop(self) {
        self.close();
    }

    /// Prometheus text lines.
    pub fn metrics(&self, component: &str) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = format!("component=\"{component}\"");
        let mut s = format!(
            "# HELP ces_flow_observations_total Observations the data plane's readers handed to the flow pipeline.\n# TYPE ces_flow_observations_total counter\nces_flow_observations_total{{{c}}} {}\n\
             # HELP ces_flow_records_total Flow records made.\n# TYPE ces_flow_records_total counter\nces_flow_records_total{{{c}}} {}\n\
             # HELP ces_flow_records_stored_total Flow records in the store.\n# TYPE ces_flow_records_stored_total counter\nces_flow_records_stored_total{{{c}}} {}\n\
             # HELP ces_flow_connection_starts_lost_total Connection starts dropped on a full queue (their records come without the audit hits logged before them).\n# TYPE ces_flow_connection_starts_lost_total counter\nces_flow_connection_starts_lost_total{{{c}}} {}\n\
             # HELP ces_flow_records_lost_total Records lost, by where (source) and why.\n# TYPE ces_flow_records_lost_total counter\n",
            g(&self.stats.received),
            g(&self.stats.records),
            g(&self.stats.stored),
            g(&self.stats.starts_lost)
        );
        for ((source, reason), n) in self.stats.lost.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            s += &format!("ces_flow_records_lost_total{{{c},source=\"{source}\",reason=\"{reason}\"}} {n}\n");
        }
        s += "# HELP ces_flow_records_exported_total Records sent to each exporter's collector.\n# TYPE ces_flow_records_exported_total counter\n";
        for (name, st) in &self.exporter_stats {
            s += &format!("ces_flow_records_exported_total{{{c},exporter=\"{name}\"}} {}\n", g(&st.sent));
        }
        s
    }
}

fn run(
    rx: Receiver<Input>,
    mut store: Option<Writer>,
    exporters: Vec<Exporter>,
    mut attr: Attributor,
    stats: Arc<PipelineStats>,
) {
    let mut written: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut exported_lost: Vec<u64> = vec![0; exporters.len()];
    let mut last_flush = Instant::now();
    let mut done = false;
    while !done {
        // The queue is drained without blocking, and polled every millisecond when empty: a reader handing over an
        // observation never has to wake this thread (a wake-up per observation cost more than the record).
        let mut inputs = Vec::new();
        while inputs.len() < 8192 {
            match rx.try_recv() {
                Ok(i) => inputs.push(i),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    done = true;
                    break;
                }
            }
        }
        if inputs.is_empty() && !done {
            std::thread::sleep(Duration::from_millis(1));
        }
        let now = Timestamp::now();
        let mut records = Vec::new();
        for i in inputs {
            match i {
                Input::Observation(o) => records.extend(attr.observe(o, now)),
                Input::Record(r) => records.push(r),
                Input::Pods(p, at) => attr.pods.sync(&p, at.as_microsecond()),
                Input::PodChanges(c, at) => attr.pods.apply(&c, at.as_microsecond()),
                Input::Rules(rules) => {
                    if let Some(w) = store.as_mut()
                        && let Err(e) = w.rules(&rules, now)
                    {
                        eprintln!("ces: {e}");
                    }
                }
                Input::Names(f) => attr.names = Some(f),
                Input::Stop => done = true,
            }
        }
        // Audit hits that waited long enough for a decision.
        records.extend(attr.tick(now));
        if !records.is_empty() {
            stats.records.fetch_add(records.len() as u64, Ordering::Relaxed);
            if let Some(w) = store.as_mut() {
                match w.append(&records) {
                    Ok(()) => {
                        stats.stored.fetch_add(records.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("ces: {e}");
                        stats.lose("store", "write-error", records.len() as u64);
                    }
                }
            }
            for e in &exporters {
                e.offer(&records);
            }
        }
        if last_flush.elapsed() >= Duration::from_secs(1) || done {
            last_flush = Instant::now();
            for (i, e) in exporters.iter().enumerate() {
                let lost = e.lost();
                stats.lose(&format!("export {}", e.name), "queue-full or send error", lost - exported_lost[i]);
                exported_lost[i] = lost;
            }
            if let Some(w) = store.as_mut() {
                if let Err(e) = w.flush_due() {
                    eprintln!("ces: {e}");
                }
                let lost = stats.lost.lock().unwrap_or_else(|p| p.into_inner()).clone();
                for (k, n) in lost {
                    let before = written.get(&k).copied().unwrap_or(0);
                    if n > before {
                        if let Err(e) = w.losses(now, &k.0, &k.1, n - before) {
                            eprintln!("ces: {e}");
                        }
                        written.insert(k, n);
                    }
                }
            }
        }
    }
    for e in exporters {
        e.stop(Duration::from_secs(2));
    }
    if let Some(w) = store {
        let _ = w.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Reader, StoreConfig};

    /// The last records before a quiet spell reach the report within about two seconds, without waiting for more
    /// records to come (the rollups wait in memory a second at most).
    #[test]
    fn the_report_counts_the_last_records_when_no_more_come() {
        let dir = std::env::temp_dir().join(format!("ces-pipeline-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let w = Writer::open(&dir, StoreConfig::default()).unwrap();
        let p = Pipeline::start(Some(w), Vec::new(), Attributor::new(crate::history::PodHistory::new(60)), 16);
        for i in 0..3 {
            p.send(Input::Record(crate::store::tests::rec(i, Timestamp::now())));
        }
        let reader = Reader::open(&dir).unwrap();
        let start = Instant::now();
        let counted = || reader.report(&crate::filter::Filter::default(), 5).unwrap().records;
        while counted() < 3 && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(counted(), 3, "the report counts every stored record while the pipeline still runs");
        p.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
