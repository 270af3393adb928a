//! From what a data plane observed to flow records: the deciding rule from the rule the data plane names (the
//! gateway's connection mark or log prefix, AFM's policy and rule names), the pod from the history of its tenant's
//! addresses at the traffic's time, the host name from the names the tenant's clients resolved, and audit hits joined
//! to the decision they came with.

use std::collections::HashMap;
use std::net::IpAddr;

use jiff::Timestamp;

use crate::history::PodHistory;
use crate::record::{
    Counts, Destination, FlowRecord, Kind, Nat, Origin, Outcome, RuleRef, Source, Verdict, protocol_name,
};

/// A rule as a data plane names it (one line of the gateway's table, one AFM rule).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RuleInfo {
    pub tenant: String,
    /// `Kind/namespace/name`, or `Tenant/<name>`.
    pub rule: String,
    pub context: String,
    /// What it does (or would do, audited): `accept`, `accept-decisively`, `drop`, `reject`.
    pub action: String,
    /// `enforce` or `audit`.
    pub mode: String,
    pub external_service: Option<String>,
}

/// The five-tuple of a flow, in its original direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
}

/// What a data plane saw.
#[derive(Clone, Debug, PartialEq)]
pub enum Observation {
    /// A connection ended (conntrack DESTROY): its counters and how it ended.
    Connection {
        start: Timestamp,
        end: Timestamp,
        tuple: Tuple,
        /// The rule whose line accepted it, when the data plane names one.
        rule: Option<RuleInfo>,
        packets: Counts,
        bytes: Counts,
        outcome: Outcome,
        nat: Option<Nat>,
    },
    /// A logged packet, with the rule whose line logged it.
    Packet { time: Timestamp, tuple: Tuple, rule: RuleInfo, origin: Origin },
    /// A connection began (conntrack NEW): audit hits logged for its first packet are kept for its record.
    Opened { tuple: Tuple, tenant: String },
    /// An ICMP error (destination unreachable, ...) came back for the flow `about` (as its packet was sent).
    IcmpError { time: Timestamp, about: Tuple },
}

/// How a record finds the host name a tenant's client resolved a destination address from.
pub type NameLookup = Box<dyn Fn(&str, IpAddr) -> Option<String> + Send>;

/// What turns observations into records.
pub struct Attributor {
    pub pods: PodHistory,
    /// Host names the tenant's clients resolved an address from (the gateway's DNS learner).
    pub names: Option<NameLookup>,
    /// Audit hits waiting for the decision on their packet: (tenant, tuple) to (rules, when, which data plane).
    audits: HashMap<(String, Tuple), (Vec<String>, Timestamp, Origin)>,
    /// Connections open now (conntrack NEW seen) with the audit hits of their first packet, kept for their end. The
    /// NEW event may come before or after the audit line (NFLOG batches its messages): either order joins.
    open: HashMap<(String, Tuple), Vec<String>>,
    /// Flows an ICMP error came back for, and when.
    icmp_errors: HashMap<Tuple, Timestamp>,
}

/// How long an audit hit waits for the line that decides its packet before it is recorded on its own.
const AUDIT_WAIT_SECS: i64 = 2;
/// Open connections remembered at most.
const MAX_OPEN: usize = 1 << 20;

fn micros(t: Timestamp) -> i64 {
    (t.as_nanosecond() / 1000) as i64
}

impl Attributor {
    pub fn new(pods: PodHistory) -> Attributor {
        Attributor { pods, names: None, audits: HashMap::new(), open: HashMap::new(), icmp_errors: HashMap::new() }
    }

    fn source(&self, tenant: &str, ip: IpAddr, port: Option<u16>, at: Timestamp) -> Source {
        let pod = self.pods.at(tenant, ip, micros(at));
        Source {
            ip: Some(ip),
            port,
            namespace: pod.map(|p| p.namespace.clone()),
            pod: pod.map(|p| p.name.clone()),
            labels: pod.map(|p| p.labels.clone()).unwrap_or_default(),
        }
    }

    fn record(
        &self,
        kind: Kind,
        origin: Origin,
        time: Timestamp,
        tuple: &Tuple,
        tenant: &str,
        rule: Option<&RuleInfo>,
    ) -> FlowRecord {
        let verdict = rule.and_then(|r| Verdict::parse(&r.action)).unwrap_or(Verdict::Accept);
        FlowRecord {
            v: crate::record::SCHEMA_VERSION,
            kind,
            origin,
            time,
            end: None,
            tenant: tenant.to_string(),
            source: self.source(tenant, tuple.src, tuple.sport, time),
            destination: Destination {
                ip: Some(tuple.dst),
                port: tuple.dport,
                host: self.names.as_ref().and_then(|n| n(tenant, tuple.dst)),
                external_service: rule.and_then(|r| r.external_service.clone()),
            },
            protocol: protocol_name(tuple.proto),
            verdict,
            rule: rule.map(|r| RuleRef { rule: r.rule.clone(), context: r.context.clone(), mode: r.mode.clone() }),
            audit: Vec::new(),
            packets: Counts::default(),
            bytes: Counts::default(),
            outcome: Outcome::Unknown,
            nat: None,
        }
    }

    /// The records an observation makes (none while an audit hit waits for its decision). Audit hits that waited too
    /// long come out of [`Attributor::tick`].
    pub fn observe(&mut self, o: Observation, _now: Timestamp) -> Vec<FlowRecord> {
        let mut out = Vec::new();
        match o {
            Observation::IcmpError { time, about } => {
                if self.icmp_errors.len() < 100_000 {
                    self.icmp_errors.insert(about, time);
                }
            }
            Observation::Opened { tuple, tenant } => {
                let rules = self.audits.remove(&(tenant.clone(), tuple)).map(|(r, ..)| r).unwrap_or_default();
                if self.open.len() >= MAX_OPEN {
                    // Connections whose end never came (a lost event) do not stay for ever.
                    self.open.clear();
                }
                self.open.insert((tenant, tuple), rules);
            }
            Observation::Packet { time, tuple, rule, origin } => {
                if rule.mode == "audit" {
                    if let Some(rules) = self.open.get_mut(&(rule.tenant.clone(), tuple)) {
                        if !rules.contains(&rule.rule) {
                            rules.push(rule.rule.clone());
                        }
                        return out;
                    }
                    let e = self.audits.entry((rule.tenant.clone(), tuple)).or_insert((Vec::new(), time, origin));
                    if !e.0.contains(&rule.rule) {
                        e.0.push(rule.rule.clone());
                    }
                    return out;
                }
                let mut r = self.record(Kind::Packet, origin, time, &tuple, &rule.tenant, Some(&rule));
                r.packets = Counts { out: 1, back: 0 };
                if let Some((rules, ..)) = self.audits.remove(&(rule.tenant.clone(), tuple)) {
                    r.audit = rules;
                }
                out.push(r);
            }
            Observation::Connection { start, end, tuple, rule, packets, bytes, outcome, nat } => {
                let tenant = match &rule {
                    Some(r) => r.tenant.clone(),
                    None => return out,
                };
                let mut r = self.record(Kind::Connection, Origin::Gateway, start, &tuple, &tenant, rule.as_ref());
                r.end = Some(end);
                r.packets = packets;
                r.bytes = bytes;
                // Nothing came back but an ICMP error: say so.
                r.outcome = match (outcome, self.icmp_errors.remove(&tuple)) {
                    (Outcome::NoAnswer | Outcome::Reset | Outcome::Unknown, Some(_)) if packets.back == 0 => {
                        Outcome::IcmpUnreachable
                    }
                    (o, _) => o,
                };
                r.nat = nat;
                if let Some(rules) = self.open.remove(&(tenant.clone(), tuple)) {
                    r.audit = rules;
                } else if let Some((rules, ..)) = self.audits.remove(&(tenant, tuple)) {
                    r.audit = rules;
                }
                out.push(r);
            }
        }
        out
    }

    /// Audit hits whose packet no decision followed in time: recorded as accepted by an unnamed rule (a dropping
    /// or rejecting line would have logged).
    fn expire(&mut self, now: Timestamp) -> Vec<FlowRecord> {
        let horizon = now - jiff::SignedDuration::from_secs(AUDIT_WAIT_SECS);
        let stale: Vec<(String, Tuple)> =
            self.audits.iter().filter(|(_, (_, t, _))| *t < horizon).map(|(k, _)| k.clone()).collect();
        let mut out = Vec::new();
        for k in stale {
            let (rules, time, origin) = self.audits.remove(&k).expect("listed");
            let mut r = self.record(Kind::Packet, origin, time, &k.1, &k.0, None);
            r.packets = Counts { out: 1, back: 0 };
            r.audit = rules;
            out.push(r);
        }
        // ICMP errors whose connection was not CES's do not stay for ever.
        let old = now - jiff::SignedDuration::from_secs(600);
        self.icmp_errors.retain(|_, t| *t > old);
        out
    }

    /// Audit hits that waited too long for a decision, as records of their own.
    pub fn tick(&mut self, now: Timestamp) -> Vec<FlowRecord> {
        self.expire(now)
    }

    /// Audit hits waiting, and connections open (for metrics and tests).
    pub fn waiting(&self) -> usize {
        self.audits.len() + self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ces_model::PodEntry;

    fn tuple(src: &str, dst: &str) -> Tuple {
        Tuple { src: src.parse().unwrap(), dst: dst.parse().unwrap(), proto: 6, sport: Some(40000), dport: Some(443) }
    }

    fn rule(tenant: &str, name: &str, action: &str, mode: &str) -> RuleInfo {
        RuleInfo {
            tenant: tenant.into(),
            rule: name.into(),
            context: "cluster".into(),
            action: action.into(),
            mode: mode.into(),
            external_service: Some("kube-system/x".into()),
        }
    }

    #[test]
    fn audit_hits_join_the_decision_on_their_packet_or_connection() {
        let mut h = PodHistory::new(60);
        let pods = [
            PodEntry {
                tenant: "payments".into(),
                namespace: "payments".into(),
                name: "checkout-0".into(),
                ips: vec!["10.10.0.11".parse().unwrap()],
                labels: Default::default(),
            },
            PodEntry {
                tenant: "analytics".into(),
                namespace: "analytics-dev".into(),
                name: "jupyter-0".into(),
                ips: vec!["10.10.0.11".parse().unwrap()],
                labels: Default::default(),
            },
        ];
        h.sync(&pods, 0);
        let mut a = Attributor::new(h);
        let t: Timestamp = "2026-12-06T10:00:00Z".parse().unwrap();
        let tp = tuple("10.10.0.11", "198.51.100.7");
        // Dropped: the audit line, then the drop line of the same packet.
        let audit = Observation::Packet {
            time: t,
            tuple: tp,
            rule: rule("payments", "ClusterEgressRule/audit", "reject", "audit"),
            origin: Origin::Gateway,
        };
        assert!(a.observe(audit.clone(), t).is_empty(), "waits for its decision");
        let drop = Observation::Packet {
            time: t,
            tuple: tp,
            rule: rule("payments", "Tenant/payments", "drop", "enforce"),
            origin: Origin::Gateway,
        };
        let r = a.observe(drop, t);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].verdict, r[0].audit.clone()), (Verdict::Drop, vec!["ClusterEgressRule/audit".to_string()]));
        assert_eq!(r[0].source.pod.as_deref(), Some("checkout-0"), "the pod of the record's tenant");
        // Accepted: the audit line, conntrack NEW, then the connection's end.
        let audit_b = Observation::Packet {
            time: t,
            tuple: tp,
            rule: rule("analytics", "ClusterEgressRule/audit", "reject", "audit"),
            origin: Origin::Gateway,
        };
        a.observe(audit_b, t);
        a.observe(Observation::Opened { tuple: tp, tenant: "analytics".into() }, t);
        let end = t + jiff::SignedDuration::from_secs(600);
        let conn = Observation::Connection {
            start: t,
            end,
            tuple: tp,
            rule: Some(rule("analytics", "NamespaceEgressRule/analytics/x", "accept-decisively", "enforce")),
            packets: Counts { out: 3, back: 2 },
            bytes: Counts { out: 180, back: 120 },
            outcome: Outcome::Completed,
            nat: None,
        };
        let r = a.observe(conn, end);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].source.pod.as_deref(), Some("jupyter-0"));
        assert_eq!(r[0].audit, ["ClusterEgressRule/audit"]);
        assert_eq!(a.waiting(), 0);
        // NEW before the audit line (NFLOG batches its messages): joined all the same.
        a.observe(Observation::Opened { tuple: tp, tenant: "analytics".into() }, t);
        a.observe(
            Observation::Packet {
                time: t,
                tuple: tp,
                rule: rule("analytics", "ClusterEgressRule/audit", "reject", "audit"),
                origin: Origin::Gateway,
            },
            t,
        );
        let conn = Observation::Connection {
            start: t,
            end,
            tuple: tp,
            rule: Some(rule("analytics", "NamespaceEgressRule/analytics/x", "accept-decisively", "enforce")),
            packets: Counts::default(),
            bytes: Counts::default(),
            outcome: Outcome::Completed,
            nat: None,
        };
        assert_eq!(a.observe(conn, end + jiff::SignedDuration::from_secs(5))[0].audit, ["ClusterEgressRule/audit"]);
        assert_eq!(a.waiting(), 0);
        // An audit hit no decision follows is recorded on its own after two seconds.
        a.observe(audit, t);
        assert!(a.tick(t + jiff::SignedDuration::from_secs(1)).is_empty());
        let r = a.tick(t + jiff::SignedDuration::from_secs(3));
        assert_eq!((r.len(), r[0].rule.clone(), r[0].audit.len()), (1, None, 1));
    }
}
