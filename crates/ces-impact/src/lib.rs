//! Policy-change impact (docs/impact.md): flows, recorded by a data plane or listed by hand, decided again by the one
//! evaluator under a proposed policy; a flow has changed when its verdict or its deciding rule changes.
//!
//! Pure: the caller reads the flows and compiles the policies. The same flow (tenant, source, destination, protocol,
//! port, and the minute when a policy has schedules) is decided once: recorded traffic repeats itself.

use std::collections::HashMap;
use std::net::IpAddr;

use ces_eval::{Evaluator, Flow};
use ces_flow::record::FlowRecord;
use ces_model::{Destination, PolicyModel, Protocol};
use jiff::Timestamp;
use serde::Serialize;

/// A flow to decide again.
#[derive(Clone, Debug, PartialEq)]
pub struct Subject {
    pub tenant: String,
    pub source: IpAddr,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub destination: Destination,
    pub protocol: Protocol,
    pub port: Option<u16>,
    pub at: Timestamp,
}

/// A decision: the verdict, and the rule that gave it (`None`: not known, as in a record whose data plane could not
/// say; then only the verdict is compared).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Side {
    pub verdict: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

/// A flow as the output shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowView {
    pub tenant: String,
    pub source: SourceView,
    pub destination: String,
    pub protocol: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourceView {
    pub ip: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// One changed flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub flow: FlowView,
    pub before: Side,
    pub after: Side,
    /// How many recorded flows this one stands for (records alike, read together from a store), when more than one.
    #[serde(skip_serializing_if = "is_one")]
    pub flows: u64,
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

/// Changed flows alike: the same change, tenant, namespace and destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Group {
    pub before: Side,
    pub after: Side,
    pub tenant: String,
    pub namespace: String,
    pub destination: String,
    pub flows: u64,
    pub example: FlowView,
}

fn protocol_of(name: &str) -> Option<Protocol> {
    match name.to_ascii_lowercase().as_str() {
        "tcp" | "6" => Some(Protocol::Tcp),
        "udp" | "17" => Some(Protocol::Udp),
        "icmp" | "1" | "58" | "ipv6-icmp" | "icmpv6" => Some(Protocol::Icmp),
        _ => None,
    }
}

impl Subject {
    /// The flow of a record, and what its data plane decided.
    pub fn from_record(r: &FlowRecord) -> Result<(Subject, Side), String> {
        let source = r.source.ip.ok_or("the record has no source address")?;
        let destination = match (&r.destination.host, r.destination.ip) {
            (Some(h), Some(ip)) => Destination::Resolved { host: h.to_ascii_lowercase(), ip },
            (Some(h), None) => Destination::Host(h.to_ascii_lowercase()),
            (None, Some(ip)) => Destination::Ip(ip),
            (None, None) => return Err("the record has no destination".into()),
        };
        let protocol =
            protocol_of(&r.protocol).ok_or_else(|| format!("protocol `{}` is not one CES decides", r.protocol))?;
        let subject = Subject {
            tenant: r.tenant.clone(),
            source,
            namespace: r.source.namespace.clone(),
            pod: r.source.pod.clone(),
            destination,
            protocol,
            port: if protocol == Protocol::Icmp { None } else { r.destination.port },
            at: r.time,
        };
        let side = Side { verdict: r.verdict.as_str().to_string(), rule: r.rule.as_ref().map(|x| x.rule.clone()) };
        Ok((subject, side))
    }

    fn view(&self) -> FlowView {
        FlowView {
            tenant: self.tenant.clone(),
            source: SourceView { ip: self.source, namespace: self.namespace.clone(), pod: self.pod.clone() },
            destination: self.destination.to_string(),
            protocol: self.protocol.as_str().to_string(),
            port: self.port,
            at: self.at,
        }
    }
}

/// Which changes count (`--fail-on`): `FROM->TO` pairs of `accept`, `drop`, `reject`, `deny` (drop or reject) and
/// `any`, comma-separated; `rule` for a change of the deciding rule alone. Empty: every change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FailOn {
    pairs: Vec<(String, String)>,
    rule: bool,
}

fn verdict_pattern(p: &str) -> Result<String, String> {
    match p {
        "accept" | "drop" | "reject" | "deny" | "any" => Ok(p.to_string()),
        _ => Err(format!("`{p}`: a verdict is accept, drop, reject, deny (drop or reject) or any")),
    }
}

fn fits(pattern: &str, verdict: &str) -> bool {
    pattern == "any" || pattern == verdict || (pattern == "deny" && (verdict == "drop" || verdict == "reject"))
}

impl FailOn {
    pub fn parse(s: &str) -> Result<FailOn, String> {
        let mut f = FailOn::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part == "rule" {
                f.rule = true;
                continue;
            }
            let (a, b) =
                part.split_once("->").ok_or_else(|| format!("`{part}`: write FROM->TO (accept->deny), or `rule`"))?;
            f.pairs.push((verdict_pattern(a.trim())?, verdict_pattern(b.trim())?));
        }
        Ok(f)
    }

    /// Whether a change counts.
    pub fn counts(&self, before: &Side, after: &Side) -> bool {
        if self.pairs.is_empty() && !self.rule {
            return true;
        }
        if before.verdict == after.verdict {
            return self.rule;
        }
        self.pairs.iter().any(|(a, b)| fits(a, &before.verdict) && fits(b, &after.verdict))
    }
}

/// The flow a decision is cached for.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    tenant: String,
    source: IpAddr,
    destination: Destination,
    protocol: Protocol,
    port: Option<u16>,
    minute: i64,
}

impl Key {
    fn of(s: &Subject, minute: i64) -> Key {
        Key {
            tenant: s.tenant.clone(),
            source: s.source,
            destination: s.destination.clone(),
            protocol: s.protocol,
            port: s.port,
            minute,
        }
    }

    fn is(&self, s: &Subject, minute: i64) -> bool {
        self.source == s.source
            && self.port == s.port
            && self.minute == minute
            && self.protocol == s.protocol
            && self.tenant == s.tenant
            && self.destination == s.destination
    }
}

fn hash_of(s: &Subject, minute: i64) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&s.tenant, s.source, &s.destination, s.protocol, s.port, minute).hash(&mut h);
    h.finish()
}

/// What the policies decide for a flow: the current one's decision (when a current policy is given) and the
/// proposed one's.
type Decided = Result<(Option<Side>, Side), String>;

/// The changed flows alike, counted (found by a hash of their key, compared in full).
struct GroupEntry {
    before: Side,
    after: Side,
    tenant: String,
    namespace: Option<String>,
    destination: Destination,
    flows: u64,
    example: FlowView,
}

fn group_hash(before: &Side, after: &Side, tenant: &str, namespace: &Option<String>, d: &Destination) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (before, after, tenant, namespace, d).hash(&mut h);
    h.finish()
}

/// Decided decisions kept at most (beyond, the cache starts again).
const CACHE: usize = 1 << 18;

fn has_schedules(m: &PolicyModel) -> bool {
    m.rules().any(|(_, r)| r.schedule.is_some())
}

/// Whether a flow's minute can change its decision under either policy (a rule has a schedule).
pub fn timed(current: Option<&PolicyModel>, proposed: &PolicyModel) -> bool {
    has_schedules(proposed) || current.is_some_and(has_schedules)
}

/// Flows decided again, and what changed.
pub struct Impact<'e, 'm> {
    current: Option<&'e Evaluator<'m>>,
    proposed: &'e Evaluator<'m>,
    timed: bool,
    fail_on: FailOn,
    /// Decisions by the flow's hash, each with its flow (compared in full: a hash never stands for a flow). Looked
    /// up without copying the flow.
    cache: HashMap<u64, Vec<(Key, Decided)>>,
    cached: usize,
    groups: HashMap<u64, Vec<GroupEntry>>,
    /// Whether `add` and `add_many` make a [`Change`] of each changed flow (`quiet` turns it off: counts and groups
    /// only).
    changes: bool,
    /// Flows decided.
    pub flows: u64,
    /// Flows whose verdict or rule changed, and of those the ones `fail_on` counts.
    pub changed: u64,
    pub failing: u64,
    /// Flows the evaluator could not decide (an unknown tenant, a family mismatch), with the first reasons.
    pub undecided: u64,
    pub reasons: Vec<String>,
}

impl<'e, 'm> Impact<'e, 'm> {
    /// `current`: the policy the flows were decided under (`None`: what each record says was decided).
    pub fn new(current: Option<&'e Evaluator<'m>>, proposed: &'e Evaluator<'m>, fail_on: FailOn) -> Impact<'e, 'm> {
        let timed = timed(current.map(|c| c.model()), proposed.model());
        Impact {
            current,
            proposed,
            timed,
            fail_on,
            cache: HashMap::new(),
            cached: 0,
            groups: HashMap::new(),
            changes: true,
            flows: 0,
            changed: 0,
            failing: 0,
            undecided: 0,
            reasons: Vec::new(),
        }
    }

    fn decide(&self, s: &Subject) -> Decided {
        let flow = Flow {
            source: s.source,
            tenant: s.tenant.clone(),
            destination: s.destination.clone(),
            protocol: s.protocol,
            port: s.port,
            at: s.at,
        };
        let side = |e: &Evaluator| -> Result<Side, String> {
            let d = e.decide(&flow).map_err(|e| e.to_string())?;
            Ok(Side { verdict: d.verdict.as_str().to_string(), rule: Some(d.decided_by.rule) })
        };
        let current = match self.current {
            Some(c) => Some(side(c).map_err(|e| format!("under the current policy: {e}"))?),
            None => None,
        };
        let proposed = side(self.proposed).map_err(|e| format!("under the proposed policy: {e}"))?;
        Ok((current, proposed))
    }

    /// Decides one flow again: the change, when its verdict or its rule changed.
    pub fn add(&mut self, s: &Subject, recorded: Option<&Side>) -> Option<Change> {
        self.add_many(s, recorded, 1)
    }

    /// Decides `n` flows alike at once (records read together from a store): counted `n` times.
    pub fn add_many(&mut self, s: &Subject, recorded: Option<&Side>, n: u64) -> Option<Change> {
        self.flows += n;
        let minute = if self.timed { s.at.as_second().div_euclid(60) } else { 0 };
        let h = hash_of(s, minute);
        let found = self.cache.get(&h).and_then(|v| v.iter().position(|(k, _)| k.is(s, minute)));
        let (bucket, i) = match found {
            Some(i) => (h, i),
            None => {
                if self.cached >= CACHE {
                    self.cache.clear();
                    self.cached = 0;
                }
                let d = self.decide(s);
                let v = self.cache.entry(h).or_default();
                v.push((Key::of(s, minute), d));
                self.cached += 1;
                (h, v.len() - 1)
            }
        };
        let decided = &self.cache[&bucket][i].1;
        let (before, after) = match decided {
            Ok((current, proposed)) => match (current, recorded) {
                (Some(c), _) => (c, proposed),
                (None, Some(r)) => (r, proposed),
                (None, None) => {
                    self.undecided += n;
                    if self.reasons.len() < 10 {
                        self.reasons.push(format!(
                            "{} -> {}: no current policy and no recorded decision to compare with",
                            s.source, s.destination
                        ));
                    }
                    return None;
                }
            },
            Err(e) => {
                let e = e.clone();
                self.undecided += n;
                if self.reasons.len() < 10 {
                    self.reasons.push(format!("{} -> {}: {e}", s.source, s.destination));
                }
                return None;
            }
        };
        let changed = before.verdict != after.verdict || (before.rule.is_some() && before.rule != after.rule);
        if !changed {
            return None;
        }
        self.changed += n;
        if self.fail_on.counts(before, after) {
            self.failing += n;
        }
        let h = group_hash(before, after, &s.tenant, &s.namespace, &s.destination);
        let bucket = self.groups.entry(h).or_default();
        match bucket.iter_mut().find(|g| {
            g.before == *before
                && g.after == *after
                && g.tenant == s.tenant
                && g.namespace == s.namespace
                && g.destination == s.destination
        }) {
            Some(g) => g.flows += n,
            None => bucket.push(GroupEntry {
                before: before.clone(),
                after: after.clone(),
                tenant: s.tenant.clone(),
                namespace: s.namespace.clone(),
                destination: s.destination.clone(),
                flows: n,
                example: s.view(),
            }),
        }
        if !self.changes {
            return None;
        }
        Some(Change { flow: s.view(), before: before.clone(), after: after.clone(), flows: n })
    }

    /// Counts and groups only: `add` and `add_many` make no [`Change`].
    pub fn quiet(mut self) -> Self {
        self.changes = false;
        self
    }

    /// Adds another's counts and groups (for flows decided on several threads).
    pub fn merge(&mut self, other: Impact) {
        self.flows += other.flows;
        self.changed += other.changed;
        self.failing += other.failing;
        self.undecided += other.undecided;
        for r in other.reasons {
            if self.reasons.len() < 10 {
                self.reasons.push(r);
            }
        }
        for (h, entries) in other.groups {
            let bucket = self.groups.entry(h).or_default();
            for e in entries {
                match bucket.iter_mut().find(|g| {
                    g.before == e.before
                        && g.after == e.after
                        && g.tenant == e.tenant
                        && g.namespace == e.namespace
                        && g.destination == e.destination
                }) {
                    Some(g) => g.flows += e.flows,
                    None => bucket.push(e),
                }
            }
        }
    }

    /// The changed flows grouped, most flows first (then by tenant, namespace, destination).
    pub fn groups(&self) -> Vec<Group> {
        let mut v: Vec<Group> = self
            .groups
            .values()
            .flatten()
            .map(|g| Group {
                before: g.before.clone(),
                after: g.after.clone(),
                tenant: g.tenant.clone(),
                namespace: g.namespace.clone().unwrap_or_default(),
                destination: g.destination.to_string(),
                flows: g.flows,
                example: g.example.clone(),
            })
            .collect();
        v.sort_by(|a, b| {
            b.flows.cmp(&a.flows).then_with(|| {
                (&a.tenant, &a.namespace, &a.destination, &a.before, &a.after).cmp(&(
                    &b.tenant,
                    &b.namespace,
                    &b.destination,
                    &b.before,
                    &b.after,
                ))
            })
        });
        v
    }
}
