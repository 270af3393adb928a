//! The one sync loop of CES: source → snapshot → compile → backend.
//!
//! Every agent (`ces gateway` with the nftables backend, `ces controller` with the AS3 backend; the manifests-folder
//! and Kubernetes sources) runs this loop; sources and backends plug into it through [`Source`] and [`Backend`]. It is level triggered: each pass
//! hands the backend the whole current model; the backend decides how little to change.
//!
//! - **Churn** (pods, and Services' endpoints) takes a shorter path: the loop keeps the last snapshot and model; a
//!   source that can tell that only pods and endpoints changed moves them in that snapshot ([`Source::update`]), the
//!   compiler patches the model (`ces_compiler::recompile_churn`, which declines when the change could reach further),
//!   and the backend programs the delta ([`Backend::apply_pods`]). Everything else, every resync and every retry loads and compiles whole.
//! - **Changes** are noticed through [`Source::version`] (cheap, polled) and coalesced: after a change the loop waits
//!   until the version has been stable for `debounce` (at most `max_delay` after the first change, which for a change
//!   seen right after a pass counts from that pass's read of the version), so a burst of churn becomes one apply.
//! - **Resync**: every `resync`, the model is applied with `full = true`, which repairs changes made behind the
//!   backend's back.
//! - **Retry**: a failed load or apply is retried after a backoff that doubles from `retry_min` to `retry_max`, with
//!   `full = true`; an update that arrived meanwhile is never lost, since each pass reads the current state.
//! - **Expiry**: a backend may say its output is valid only until an instant (nft schedules are rendered in UTC
//!   until the next daylight-saving change); the loop applies again then.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ces_config::CesConfig;
use ces_model::{Diagnostic, ObjectRef, PodDelta, PolicyModel, Severity};
use ces_snapshot::{Churn, Snapshot};
use jiff::Timestamp;

/// Where the policy comes from.
pub trait Source {
    /// A value that changes whenever the inputs may have changed. Cheap: it is polled.
    fn version(&mut self) -> Result<u64, String>;
    /// The current inputs.
    fn load(&mut self) -> Result<(Snapshot, CesConfig), String>;
    /// Churn without a load: when only pods and Services' endpoints changed since the last `load` or `update`, moves
    /// them in `snapshot` (the snapshot those gave, kept by the loop) and returns the churn; `None` when something else
    /// changed or the source cannot tell (the loop then loads). Default: `None`.
    fn update(&mut self, _snapshot: &mut Snapshot) -> Result<Option<Churn>, String> {
        Ok(None)
    }
    /// After each pass that compiled a model: the model, and what the backend made of it. A source that can, writes
    /// it back where its objects came from (the Kubernetes source writes status). Default: nothing.
    fn report(&mut self, _model: &PolicyModel, _report: &Report<'_>) {}
    /// After a compile that left objects out for errors: the snapshot with each such object replaced by its last
    /// version that compiled, when the source keeps them, and which objects were replaced (with that version's
    /// generation). The loop compiles that snapshot instead, so an edit that breaks a rule does not take the rule
    /// off the data plane; the rule's status still says what is wrong. Default: `None`.
    fn last_good(&mut self, _snapshot: &Snapshot, _model: &PolicyModel) -> Option<(Snapshot, Vec<Kept>)> {
        None
    }
}

/// An object whose last good version was compiled in place of its current, invalid one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kept {
    pub object: ObjectRef,
    pub generation: Option<i64>,
}

/// The reason of the warning on an object whose last good version stays in force.
pub const LAST_GOOD_VERSION_KEPT: &str = "LastGoodVersionKept";

/// Compiles `snapshot`, and again with the last good versions the source offers; the result carries the current
/// versions' errors and a warning for each kept object.
pub fn compile_keeping_last_good(
    source: &mut dyn Source,
    snapshot: &Snapshot,
    config: &CesConfig,
    ces_namespace: &str,
) -> PolicyModel {
    let model = ces_compiler::compile(snapshot, config, ces_namespace);
    if model.errors().next().is_none() {
        return model;
    }
    let Some((snap, kept)) = source.last_good(snapshot, &model) else { return model };
    if kept.is_empty() {
        return model;
    }
    let mut fallback = ces_compiler::compile(&snap, config, ces_namespace);
    // Only what compiled in its last good version is in force; the rest stays out, as it is.
    let failed: Vec<&ObjectRef> = fallback.errors().filter_map(|d| d.object.as_ref()).collect();
    let kept: Vec<Kept> = kept.into_iter().filter(|k| !failed.contains(&&k.object)).collect();
    if kept.is_empty() {
        return model;
    }
    let is_kept = |d: &Diagnostic| d.object.as_ref().is_some_and(|o| kept.iter().any(|k| &k.object == o));
    fallback.diagnostics.retain(|d| !is_kept(d));
    fallback.diagnostics.extend(model.diagnostics.iter().filter(|d| is_kept(d)).cloned());
    for k in &kept {
        let generation = k.generation.map_or(String::new(), |g| format!(" (generation {g})"));
        fallback.diagnostics.push(Diagnostic {
            severity: Severity::Warning,
            object: Some(k.object.clone()),
            origin: None,
            reason: LAST_GOOD_VERSION_KEPT.into(),
            message: format!("the last version that compiled{generation} stays in force until this one is fixed"),
        });
    }
    fallback
}

/// What a backend made of a model, for [`Source::report`].
#[derive(Clone, Debug)]
pub struct Report<'a> {
    /// The backend's name (`as3`, `nft`).
    pub backend: &'a str,
    /// `Err` with the backend's error when the apply failed.
    pub result: Result<(), &'a str>,
    /// The backend's own problems with objects (refused declarations, what it cannot express), each naming its
    /// object.
    pub problems: &'a [Diagnostic],
}

/// What a backend did with a model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// A short account for the log, such as `replaced` or `updated 2 sets`.
    pub summary: String,
    /// Apply again at this instant even if nothing changes.
    pub valid_until: Option<Timestamp>,
}

/// A data plane.
pub trait Backend {
    fn name(&self) -> &str;
    /// Programs the data plane to `model`. With `full`, assume nothing about what was applied before.
    fn apply(&mut self, model: &PolicyModel, full: bool) -> Result<Applied, String>;
    /// Programs a model that differs from the one last applied only as `delta` says: address sets and pod entries
    /// (pod and endpoint churn). Default: `apply`.
    fn apply_pods(&mut self, model: &PolicyModel, _delta: &PodDelta) -> Result<Applied, String> {
        self.apply(model, false)
    }
    /// The problems of the last apply with particular objects (see [`Report::problems`]). Default: none.
    fn problems(&self) -> Vec<Diagnostic> {
        Vec::new()
    }
}

/// How long the stages of one pass took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timings {
    pub load: Duration,
    pub compile: Duration,
    pub apply: Duration,
}

#[derive(Clone, Debug)]
pub struct Options {
    /// How often the source's version is read.
    pub poll: Duration,
    /// How long the version must stay unchanged before a change is applied.
    pub debounce: Duration,
    /// The longest a change waits for the source to settle.
    pub max_delay: Duration,
    pub resync: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Where ClusterEgressRules find their ExternalServices.
    pub ces_namespace: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            poll: Duration::from_millis(100),
            debounce: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
            resync: Duration::from_secs(300),
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            ces_namespace: "kube-system".into(),
        }
    }
}

/// What the loop did, for the agent's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// An apply succeeded: why it ran, what the backend did, and how long loading, compiling and applying took.
    Applied { reason: &'static str, summary: String, problems: usize, timings: Timings },
    /// A load or apply failed; the loop retries after `retry_in`.
    Failed { reason: &'static str, error: String, retry_in: Duration },
}

/// Runs passes until `stop` is set. `events` hears about every apply and failure.
pub fn run(
    source: &mut dyn Source,
    backend: &mut dyn Backend,
    opts: &Options,
    stop: &AtomicBool,
    events: &mut dyn FnMut(Event),
) {
    let mut applied_version: Option<u64> = None;
    let mut next_resync = Instant::now() + opts.resync;
    let mut expires: Option<Timestamp> = None;
    let mut retry_at: Option<Instant> = None;
    let mut backoff = opts.retry_min;
    let mut state: Option<State> = None;
    // When the version of the last pass was read, and whether the loop has polled idly since: a change seen right
    // after a pass may have waited since that read, which counts against `max_delay`.
    let (mut read_at, mut idle) = (Instant::now(), true);
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let version = source.version();
        let changed = match (&version, applied_version) {
            (Ok(v), Some(a)) => *v != a,
            _ => true,
        };
        let reason = if retry_at.is_some_and(|r| now >= r) {
            Some("retry")
        } else if retry_at.is_some() {
            None
        } else if changed {
            Some("change")
        } else if now >= next_resync {
            Some("resync")
        } else if expires.is_some_and(|e| Timestamp::now() >= e) {
            Some("expiry")
        } else {
            None
        };
        let Some(reason) = reason else {
            std::thread::sleep(opts.poll);
            idle = true;
            continue;
        };
        let version = if reason == "change" {
            settle(source, opts, stop, if idle { Instant::now() } else { read_at })
        } else {
            version
        };
        (read_at, idle) = (Instant::now(), false);
        let full = matches!(reason, "retry" | "resync") || applied_version.is_none();
        let result = version.and_then(|v| {
            let passed = pass(source, backend, opts, &mut state, full);
            if passed.is_err() {
                state = None;
            }
            passed.map(|p| (v, p))
        });
        match result {
            // The files were touched but nothing in them moved (a change seen mid-write, which the pass before read
            // whole): nothing to apply and nothing to report; what was applied stays, with its expiry.
            Ok((v, None)) => {
                applied_version = Some(v);
                retry_at = None;
                backoff = opts.retry_min;
            }
            Ok((v, Some((applied, problems, timings)))) => {
                applied_version = Some(v);
                expires = applied.valid_until;
                retry_at = None;
                backoff = opts.retry_min;
                next_resync = Instant::now() + opts.resync;
                events(Event::Applied { reason, summary: applied.summary, problems, timings });
            }
            Err(error) => {
                retry_at = Some(Instant::now() + backoff);
                events(Event::Failed { reason, error, retry_in: backoff });
                backoff = (backoff * 2).min(opts.retry_max);
            }
        }
    }
}

/// What the last pass compiled, kept for churn: the source moves pods and endpoints in the snapshot, the compiler
/// patches the model.
struct State {
    snapshot: Snapshot,
    config: CesConfig,
    model: PolicyModel,
    /// The backend's problems at the last report of a successful apply: a pod-churn pass that leaves the model's
    /// diagnostics and these as they were has nothing new to report.
    reported: Option<Vec<Diagnostic>>,
}

/// One pass: churn through `Source::update`, `recompile_churn` and `Backend::apply_pods` when it can, else a
/// load, a whole compile and `Backend::apply`. Returns what the backend did, the model's error count and timings;
/// `None` when the source found that nothing moved (the backend is not called).
fn pass(
    source: &mut dyn Source,
    backend: &mut dyn Backend,
    opts: &Options,
    state: &mut Option<State>,
    full: bool,
) -> Result<Option<(Applied, usize, Timings)>, String> {
    let t = Instant::now();
    let keeps_last_good = |m: &PolicyModel| m.diagnostics.iter().any(|d| d.reason == LAST_GOOD_VERSION_KEPT);
    if !full
        && let Some(st) = state.as_mut()
        && !keeps_last_good(&st.model)
        && let Some(churn) = source.update(&mut st.snapshot)?
    {
        if churn.is_empty() {
            return Ok(None);
        }
        let load = t.elapsed();
        let delta = ces_compiler::recompile_churn(&mut st.model, &st.snapshot, &st.config, &churn);
        if delta.is_none() {
            st.model = compile_keeping_last_good(source, &st.snapshot, &st.config, &opts.ces_namespace);
        }
        let compile = t.elapsed() - load;
        let applied = match &delta {
            Some(d) => backend.apply_pods(&st.model, d),
            None => backend.apply(&st.model, false),
        };
        let applied = finish(source, backend, &st.model, applied, &mut st.reported, delta.is_some())?;
        let timings = Timings { load, compile, apply: t.elapsed() - load - compile };
        return Ok(Some((applied, st.model.errors().count(), timings)));
    }
    let (snapshot, config) = source.load()?;
    let load = t.elapsed();
    let model = compile_keeping_last_good(source, &snapshot, &config, &opts.ces_namespace);
    let compile = t.elapsed() - load;
    let applied = backend.apply(&model, full);
    let mut reported = None;
    let applied = finish(source, backend, &model, applied, &mut reported, false);
    let timings = Timings { load, compile, apply: t.elapsed() - load - compile };
    let errors = model.errors().count();
    *state = Some(State { snapshot, config, model, reported });
    Ok(Some((applied?, errors, timings)))
}

/// Reports the apply to the source, unless it would say again what was last reported (`diagnostics_kept`: the
/// model's diagnostics are those of the last report), and passes its result on.
fn finish(
    source: &mut dyn Source,
    backend: &mut dyn Backend,
    model: &PolicyModel,
    applied: Result<Applied, String>,
    reported: &mut Option<Vec<Diagnostic>>,
    diagnostics_kept: bool,
) -> Result<Applied, String> {
    let problems = backend.problems();
    let same = diagnostics_kept && applied.is_ok() && reported.as_ref() == Some(&problems);
    if !same {
        let report = Report {
            backend: backend.name(),
            result: applied.as_ref().map(|_| ()).map_err(String::as_str),
            problems: &problems,
        };
        source.report(model, &report);
    }
    *reported = applied.is_ok().then_some(problems);
    applied
}

/// Waits until the source's version has been stable for `debounce`, or until `max_delay` after `since` (when the
/// first change may have come); returns it.
fn settle(source: &mut dyn Source, opts: &Options, stop: &AtomicBool, since: Instant) -> Result<u64, String> {
    let deadline = since + opts.max_delay;
    let mut last = source.version()?;
    let mut stable_since = Instant::now();
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        std::thread::sleep(opts.poll.min(opts.debounce));
        let v = source.version()?;
        if v != last {
            last = v;
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= opts.debounce {
            break;
        }
    }
    Ok(last)
}

pub mod folder;

#[cfg(test)]
mod tests;
