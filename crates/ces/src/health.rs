//! `--health-addr`: `/healthz`, `/readyz` and Prometheus `/metrics` for the agents, on a small HTTP server thread.

use std::io::Write;
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

/// Connections served at once; beyond, a new connection is closed at once (a flood costs refused connections,
/// never threads or memory without end).
const MAX_CONNECTIONS: usize = 32;
/// The request line and headers, at most (a probe or a scrape sends a few hundred bytes).
const MAX_HEAD: usize = 8 * 1024;
/// The whole request must have arrived by then, however slowly it drips.
const REQUEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads a request's head (through the empty line) within [`MAX_HEAD`] bytes and [`REQUEST_DEADLINE`]; its first
/// line, or `None` for a request too long, too slow, or cut off.
fn read_head(stream: &std::net::TcpStream) -> Option<String> {
    use std::io::Read as _;
    let deadline = std::time::Instant::now() + REQUEST_DEADLINE;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let mut s = stream;
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let left = deadline.checked_duration_since(std::time::Instant::now()).filter(|d| !d.is_zero())?;
        stream.set_read_timeout(Some(left)).ok()?;
        let n = s.read(&mut buf).ok()?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let end = head.iter().position(|b| *b == b'\n').unwrap_or(head.len());
    Some(String::from_utf8_lossy(&head[..end]).into_owned())
}

/// Serves `/healthz` (the process is up), `/readyz` (503 until a first pass succeeded) and `/metrics`. Returns the
/// address bound.
pub fn serve(addr: &str, health: Arc<Health>, component: &'static str) -> Result<std::net::SocketAddr, String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("--health-addr {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| format!("--health-addr {addr}: {e}"))?;
    let busy = Arc::new(AtomicU64::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            if busy.load(Ordering::Relaxed) >= MAX_CONNECTIONS as u64 {
                drop(stream);
                continue;
            }
            busy.fetch_add(1, Ordering::Relaxed);
            let (health, done) = (health.clone(), busy.clone());
            let spawned = std::thread::Builder::new().name("ces-health".into()).spawn(move || {
                answer(&stream, &health, component);
                done.fetch_sub(1, Ordering::Relaxed);
            });
            if spawned.is_err() {
                // No thread to be had: the connection is dropped with the closure.
                busy.fetch_sub(1, Ordering::Relaxed);
            }
        }
    });
    Ok(bound)
}

fn answer(stream: &std::net::TcpStream, health: &Health, component: &str) {
    let Some(line) = read_head(stream) else { return };
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let (code, body) = match path {
        "/healthz" => ("200 OK", "ok\n".to_string()),
        "/readyz" if health.ready.load(Ordering::Relaxed) => ("200 OK", "ready\n".to_string()),
        "/readyz" => ("503 Service Unavailable", "not ready: no successful pass yet\n".to_string()),
        "/metrics" => ("200 OK", health.metrics(component)),
        _ => ("404 Not Found", "not found\n".to_string()),
    };
    let _ = stream.set_write_timeout(Some(REQUEST_DEADLINE));
    let mut s = stream;
    let _ = write!(
        s,
        "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    fn start() -> std::net::SocketAddr {
        serve("127.0.0.1:0", Arc::new(Health::default()), "test").unwrap()
    }

    fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// The health server's connection threads in this process (other tests' threads are not counted).
    fn threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "ces-health"))
            .count()
    }

    /// Whether the server closed `s` (read gives end of file or an error) within `within`.
    fn closed(s: &mut TcpStream, within: Duration) -> bool {
        s.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return false;
                }
                Err(_) => return true,
            }
        }
    }

    #[test]
    fn answers_health_readiness_and_metrics() {
        let addr = start();
        assert!(get(addr, "/healthz").starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").starts_with("HTTP/1.1 503"));
        assert!(get(addr, "/metrics").contains("ces_sync_passes_total{component=\"test\",result=\"ok\"} 0"));
        assert!(get(addr, "/nothing").starts_with("HTTP/1.1 404"));
    }

    /// A request line with no end is refused once it passes the limit: memory stays bounded.
    #[test]
    fn an_endless_request_line_is_cut_off() {
        let addr = start();
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let chunk = vec![b'a'; 64 * 1024];
        let mut sent = 0usize;
        // The server stops reading (and closes) long before 64 MiB; a write then fails.
        while sent < 64 << 20 {
            if s.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len();
        }
        assert!(sent < 64 << 20, "the server read 64 MiB of one request line");
        assert!(get(addr, "/healthz").starts_with("HTTP/1.1 200"), "still serving");
    }

    /// A client that sends a byte now and then is dropped at the deadline, not kept for ever.
    #[test]
    fn a_slow_drip_is_dropped_at_the_deadline() {
        let addr = start();
        let mut s = TcpStream::connect(addr).unwrap();
        let start = Instant::now();
        let mut dropped = false;
        while start.elapsed() < Duration::from_secs(20) {
            if s.write_all(b"G").is_err() || closed(&mut s, Duration::from_millis(500)) {
                dropped = true;
                break;
            }
        }
        assert!(dropped, "a dripping client was kept 20 s");
        assert!(start.elapsed() < Duration::from_secs(REQUEST_DEADLINE.as_secs() + 3), "{:?}", start.elapsed());
    }

    /// Many idle connections cost a bounded number of threads; the excess is refused; the server still answers.
    #[test]
    fn idle_connections_are_bounded() {
        let addr = start();
        let mut idle: Vec<TcpStream> = (0..300).filter_map(|_| TcpStream::connect(addr).ok()).collect();
        std::thread::sleep(Duration::from_millis(500));
        // Other tests' servers may hold a few of their own.
        let grown = threads();
        assert!((MAX_CONNECTIONS..=MAX_CONNECTIONS + 4).contains(&grown), "{grown} threads for 300 idle connections");
        let refused = idle.iter_mut().map(|s| closed(s, Duration::from_millis(20))).filter(|c| *c).count();
        assert!(refused >= 300 - MAX_CONNECTIONS, "{refused} refused");
        drop(idle);
        let start = Instant::now();
        while !get(addr, "/healthz").starts_with("HTTP/1.1 200") {
            assert!(start.elapsed() < Duration::from_secs(10), "not serving after the idle connections went");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
