//! What `ces controller` and `ces gateway` share: the Kubernetes source's flags, leader election, the loop with
//! its log lines, metrics and graceful shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ces_model::{Diagnostic, PolicyModel};
use clap::Args;

use crate::health::Health;
use crate::{Failure, InputArgs};

#[derive(Args, Clone, Debug)]
pub struct KubeArgs {
    /// Read the policy from the Kubernetes API (watches) instead of files: in-cluster, or as --kubeconfig (or
    /// KUBECONFIG, ~/.kube/config) says.
    #[arg(long)]
    pub kubernetes: bool,
    /// The kubeconfig file to use with --kubernetes.
    #[arg(long, value_name = "FILE", requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// Serve /healthz, /readyz and Prometheus /metrics on this address (such as 0.0.0.0:8080).
    #[arg(long, value_name = "ADDR")]
    pub health_addr: Option<String>,
    /// How the agent logs on stderr: `text`, or `json` (one object per line: ts, level, component, msg, and the
    /// pass's fields).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// How an agent's sync loop coalesces, resyncs and retries (without `--once`).
#[derive(Args, Clone, Debug)]
pub struct LoopArgs {
    /// How long the inputs must be unchanged before a change is applied (coalescing churn into one update).
    #[arg(long, value_name = "MS", default_value_t = 200)]
    pub debounce_ms: u64,
    /// How often the inputs are checked for changes.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub poll_ms: u64,
    /// The longest a change waits while changes keep coming (continuous churn is applied at least this often).
    #[arg(long, value_name = "MS", default_value_t = 500)]
    pub max_delay_ms: u64,
    /// How often everything is applied again from scratch, repairing changes made behind CES's back.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub resync_secs: u64,
    /// The longest wait between retries after a failure (the wait doubles from 0.5 s up to this).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub retry_max_secs: u64,
}

impl LoopArgs {
    pub fn options(&self, ces_namespace: &str) -> ces_sync::Options {
        ces_sync::Options {
            debounce: Duration::from_millis(self.debounce_ms),
            max_delay: Duration::from_millis(self.max_delay_ms.max(self.debounce_ms)),
            poll: Duration::from_millis(self.poll_ms.max(1)),
            resync: Duration::from_secs(self.resync_secs.max(1)),
            retry_max: Duration::from_secs(self.retry_max_secs.max(1)),
            ces_namespace: ces_namespace.to_string(),
            ..Default::default()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

static JSON_LOGS: AtomicBool = AtomicBool::new(false);

pub fn set_log_format(f: LogFormat) {
    JSON_LOGS.store(f == LogFormat::Json, Ordering::Relaxed);
}

/// One log line on stderr: `ces <who>: <msg>`, or a JSON object with `fields`.
pub fn log(level: &str, who: &str, msg: &str, fields: serde_json::Value) {
    if JSON_LOGS.load(Ordering::Relaxed) {
        let mut line = serde_json::json!({
            "ts": jiff::Timestamp::now().to_string(),
            "level": level,
            "component": who,
            "msg": msg,
        });
        if let (Some(l), serde_json::Value::Object(f)) = (line.as_object_mut(), fields) {
            l.extend(f);
        }
        eprintln!("{line}");
    } else {
        eprintln!("ces {who}: {msg}");
    }
}

pub fn kube_source(
    k: &KubeArgs,
    inputs: &InputArgs,
    field_manager: Option<&str>,
) -> Result<ces_kube::KubeSource, Failure> {
    let mut source =
        ces_kube::KubeSource::start(k.kubeconfig.clone(), inputs.config.clone(), field_manager.map(str::to_string))
            .map_err(Failure::input)?;
    let who = if field_manager.is_some() { "controller" } else { "gateway" };
    source.warn = Box::new(move |m| log("warn", who, m, serde_json::json!({})));
    Ok(source)
}

pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

/// SIGTERM and SIGINT set this: the loop finishes its pass and stops.
pub static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Blocks until this replica holds the Lease, then keeps renewing it on a thread; if it cannot renew for a whole
/// Lease duration, the process exits (the sync in flight is abandoned; the next leader reads everything back).
pub fn lead(elector: ces_kube::lease::Elector, rt: tokio::runtime::Handle, health: Arc<Health>) -> Result<(), Failure> {
    let retry = (elector.duration / 3).max(Duration::from_millis(500));
    let mut said = String::new();
    loop {
        if STOP.load(Ordering::Relaxed) {
            return Err(Failure { code: 0, message: String::new() });
        }
        match rt.block_on(elector.try_acquire()) {
            Ok(ces_kube::lease::Leadership::Leader) => break,
            Ok(ces_kube::lease::Leadership::Follower(holder)) => {
                if said != holder {
                    log("info", "controller", &format!("standby: {holder} holds the lease"), serde_json::json!({}));
                    said = holder;
                }
            }
            Err(e) => log("warn", "controller", &format!("leader election: {e}"), serde_json::json!({})),
        }
        std::thread::sleep(retry);
    }
    log("info", "controller", &format!("leader: {} holds the lease", elector.identity), serde_json::json!({}));
    health.leader.store(true, Ordering::Relaxed);
    std::thread::spawn(move || {
        let mut last_renewed = std::time::Instant::now();
        loop {
            std::thread::sleep(retry);
            match rt.block_on(elector.try_acquire()) {
                Ok(ces_kube::lease::Leadership::Leader) => last_renewed = std::time::Instant::now(),
                Ok(ces_kube::lease::Leadership::Follower(holder)) => {
                    let msg = format!("lost the lease to {holder}; exiting so that only one controller acts");
                    log("error", "controller", &msg, serde_json::json!({}));
                    std::process::exit(3);
                }
                Err(e) => {
                    log("warn", "controller", &format!("renewing the lease: {e}"), serde_json::json!({}));
                    if last_renewed.elapsed() > elector.duration {
                        let msg = format!("the lease was not renewed for {:?}; exiting", elector.duration);
                        log("error", "controller", &msg, serde_json::json!({}));
                        std::process::exit(3);
                    }
                }
            }
        }
    });
    Ok(())
}

/// A backend that also keeps the metrics up to date.
pub struct Counted<B, F> {
    inner: B,
    health: Arc<Health>,
    extra: F,
}

impl<B: ces_sync::Backend, F: Fn(&B) -> String> Counted<B, F> {
    pub fn new(inner: B, health: Arc<Health>, extra: F) -> Counted<B, F> {
        Counted { inner, health, extra }
    }

    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: ces_sync::Backend, F: Fn(&B) -> String> ces_sync::Backend for Counted<B, F> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn apply(&mut self, model: &PolicyModel, full: bool) -> Result<ces_sync::Applied, String> {
        let r = self.inner.apply(model, full);
        if r.is_ok() {
            self.health.rules.store(model.rules().count() as u64, Ordering::Relaxed);
        }
        *self.health.extra.lock().unwrap_or_else(|p| p.into_inner()) = (self.extra)(&self.inner);
        r
    }

    fn apply_pods(&mut self, model: &PolicyModel, delta: &ces_model::PodDelta) -> Result<ces_sync::Applied, String> {
        let r = self.inner.apply_pods(model, delta);
        *self.health.extra.lock().unwrap_or_else(|p| p.into_inner()) = (self.extra)(&self.inner);
        r
    }

    fn problems(&self) -> Vec<Diagnostic> {
        self.inner.problems()
    }
}

/// The sync loop with the agent's log lines, metrics, and SIGTERM/SIGINT ending it after the pass in flight.
pub fn run_loop(
    who: &str,
    source: &mut dyn ces_sync::Source,
    backend: &mut dyn ces_sync::Backend,
    opts: &ces_sync::Options,
    health: &Health,
) {
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    ces_sync::run(source, backend, opts, &STOP, &mut |e| {
        crate::health::observe(health, &e);
        match e {
            ces_sync::Event::Applied { reason, summary, problems, timings } => {
                let ms = |d: Duration| (d.as_secs_f64() * 1e3).round();
                let msg = format!(
                    "{reason}: {summary}; {problems} problem(s) in the policy; load {:.0} ms, compile {:.0} ms, apply {:.0} ms",
                    ms(timings.load),
                    ms(timings.compile),
                    ms(timings.apply)
                );
                let fields = serde_json::json!({"event": "applied", "reason": reason, "summary": summary, "problems": problems,
                    "load_ms": ms(timings.load), "compile_ms": ms(timings.compile), "apply_ms": ms(timings.apply)});
                log("info", who, &msg, fields);
            }
            ces_sync::Event::Failed { reason, error, retry_in } => {
                let msg = format!("{reason} failed, retrying in {} ms: {error}", retry_in.as_millis());
                let fields = serde_json::json!({"event": "failed", "reason": reason, "error": error, "retry_in_ms": retry_in.as_millis() as u64});
                log("warn", who, &msg, fields);
            }
        }
    });
    log("info", who, "stopped", serde_json::json!({}));
}
