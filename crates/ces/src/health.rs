//! `--health-addr`: `/healthz`, `/readyz` and Prometheus `/metrics` for the agents, on a small HTTP server thread.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What the agent tells the world. Updated by the sync loop's events.
#[derive(Default)]
pub struct Health {
    /// A pass has succeeded (or this replica is a standby, which is ready to take over).
    pub ready: AtomicBool,
    pub leader: AtomicBool,
    pub passes_ok: AtomicU64,
    pub passes_failed: AtomicU64,
    pub last_success_unix: AtomicU64,
    /// Sum of pass durations, in microseconds, and their count (for the mean).
    pub pass_micros: AtomicU64,
    pub rules: AtomicU64,
    pub problems: AtomicU64,
    /// Extra metric lines of the backend (requests, errors), rewritten after each apply.
    pub extra: Mutex<String>,
    /// The source's metric lines (watch restarts), read at each scrape.
    pub source_metrics: Mutex<Option<MetricsFn>>,
    /// Other parts' metric lines (the gateway's DNS path), read at each scrape.
    pub more_metrics: Mutex<Vec<MetricsFn>>,
}

/// A source's metrics, as Prometheus text lines.
pub type MetricsFn = Box<dyn Fn() -> String + Send>;

impl Health {
    fn metrics(&self, component: &str) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let ok = g(&self.passes_ok);
        let failed = g(&self.passes_failed);
        let mut out = format!(
            "# HELP ces_sync_passes_total Sync passes (source, compile, backend), by result.\n# TYPE ces_sync_passes_total counter\n\
             ces_sync_passes_total{{component=\"{component}\",result=\"ok\"}} {ok}\n\
             ces_sync_passes_total{{component=\"{component}\",result=\"failed\"}} {failed}\n\
             # HELP ces_sync_pass_seconds Duration of the successful passes.\n# TYPE ces_sync_pass_seconds summary\n\
             ces_sync_pass_seconds_sum{{component=\"{component}\"}} {}\n\
             ces_sync_pass_seconds_count{{component=\"{component}\"}} {ok}\n\
             # HELP ces_last_successful_sync_timestamp_seconds When the data plane was last brought in step.\n# TYPE ces_last_successful_sync_timestamp_seconds gauge\n\
             ces_last_successful_sync_timestamp_seconds{{component=\"{component}\"}} {}\n\
             # HELP ces_rules_programmed Rules in the policy the data plane holds.\n# TYPE ces_rules_programmed gauge\n\
             ces_rules_programmed{{component=\"{component}\"}} {}\n\
             # HELP ces_policy_problems Objects left out of the policy for an error.\n# TYPE ces_policy_problems gauge\n\
             ces_policy_problems{{component=\"{component}\"}} {}\n\
             # HELP ces_leader Whether this replica is the leader (1) or a standby (0).\n# TYPE ces_leader gauge\n\
             ces_leader{{component=\"{component}\"}} {}\n",
            g(&self.pass_micros) as f64 / 1e6,
            g(&self.last_success_unix),
            g(&self.rules),
            g(&self.problems),
            u8::from(self.leader.load(Ordering::Relaxed)),
        );
        out.push_str(&self.extra.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(f) = &*self.source_metrics.lock().unwrap_or_else(|p| p.into_inner()) {
            out.push_str(&f());
        }
        for f in self.more_metrics.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            out.push_str(&f());
        }
        out
    }
}

/// Serves `/healthz` (the process is up), `/readyz` (503 until a first pass succeeded) and `/metrics`.
pub fn serve(addr: &str, health: Arc<Health>, component: &'static str) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("--health-addr {addr}: {e}"))?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let health = health.clone();
            std::thread::spawn(move || {
                let mut line = String::new();
                let mut reader = BufReader::new(&stream);
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                // Drain the headers.
                let mut h = String::new();
                while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
                    h.clear();
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/");
                let (code, body) = match path {
                    "/healthz" => ("200 OK", "ok\n".to_string()),
                    "/readyz" if health.ready.load(Ordering::Relaxed) => ("200 OK", "ready\n".to_string()),
                    "/readyz" => ("503 Service Unavailable", "not ready: no successful pass yet\n".to_string()),
                    "/metrics" => ("200 OK", health.metrics(component)),
                    _ => ("404 Not Found", "not found\n".to_string()),
                };
                let mut s = &stream;
                let _ = write!(
                    s,
                    "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    Ok(())
}

/// Records a sync-loop event.
pub fn observe(health: &Health, e: &ces_sync::Event) {
    match e {
        ces_sync::Event::Applied { timings, problems, .. } => {
            health.passes_ok.fetch_add(1, Ordering::Relaxed);
            let d = timings.load + timings.compile + timings.apply;
            health.pass_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            health.last_success_unix.store(now, Ordering::Relaxed);
            health.problems.store(*problems as u64, Ordering::Relaxed);
            health.ready.store(true, Ordering::Relaxed);
        }
        ces_sync::Event::Failed { .. } => {
            health.passes_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}
