//! What to select from the flow records, as `hubble observe` filters: every given field must match (AND). One filter
//! for `ces flows`, `ces report`, the exporters and the web UI; parsed once.

use std::net::IpAddr;

use ipnet::IpNet;
use jiff::Timestamp;

use crate::record::{FlowRecord, Verdict};

/// `--to`: an address, a network, or a host name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum To {
    Net(IpNet),
    Host(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    pub tenant: Option<String>,
    pub namespace: Option<String>,
    /// `NAME` or `NAMESPACE/NAME`.
    pub pod: Option<String>,
    /// `Kind/namespace/name` (or a suffix of it, such as `namespace/name` or `name`).
    pub rule: Option<String>,
    pub verdict: Option<Verdict>,
    pub to: Option<To>,
    pub protocol: Option<String>,
    pub port: Option<u16>,
    /// The translated source address (`--nat`).
    pub nat: Option<IpAddr>,
    /// And its port (`--nat IP:PORT`).
    pub nat_port: Option<u16>,
}

/// Parses `--since`/`--until`: an RFC 3339 time, or a duration before now (`30s`, `15m`, `2h`, `7d`).
pub fn parse_time(s: &str, now: Timestamp) -> Result<Timestamp, String> {
    if let Ok(t) = s.parse::<Timestamp>() {
        return Ok(t);
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num.parse().map_err(|_| format!("`{s}` is neither an RFC 3339 time nor a duration like 15m"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("`{s}`: a duration ends in s, m, h or d")),
    };
    Ok(now - jiff::SignedDuration::from_secs(secs))
}

impl To {
    pub fn parse(s: &str) -> Result<To, String> {
        if let Ok(n) = s.parse::<IpNet>() {
            return Ok(To::Net(n.trunc()));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(To::Net(IpNet::from(ip)));
        }
        ces_model::address::parse_host(s).map(To::Host)
    }
}

impl Filter {
    /// Whether a record passes.
    pub fn matches(&self, r: &FlowRecord) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| want.as_deref().is_none_or(|w| have == Some(w));
        if self.since.is_some_and(|s| r.end.unwrap_or(r.time) < s) || self.until.is_some_and(|u| r.time > u) {
            return false;
        }
        if !eq(&self.tenant, Some(&r.tenant)) || !eq(&self.namespace, r.source.namespace.as_deref()) {
            return false;
        }
        if let Some(p) = &self.pod {
            let ok = match p.split_once('/') {
                Some((ns, name)) => r.source.namespace.as_deref() == Some(ns) && r.source.pod.as_deref() == Some(name),
                None => r.source.pod.as_deref() == Some(p),
            };
            if !ok {
                return false;
            }
        }
        if let Some(want) = &self.rule {
            let mut rules = r.rule.iter().map(|x| x.rule.as_str()).chain(r.audit.iter().map(String::as_str));
            if !rules.any(|x| rule_matches(want, x)) {
                return false;
            }
        }
        if self.verdict.is_some_and(|v| v != r.verdict) {
            return false;
        }
        let to = match &self.to {
            None => true,
            Some(To::Net(n)) => r.destination.ip.is_some_and(|ip| n.contains(&ip)),
            Some(To::Host(h)) => r.destination.host.as_deref() == Some(h),
        };
        if !to {
            return false;
        }
        if let Some(p) = &self.protocol
            && !r.protocol.eq_ignore_ascii_case(p)
        {
            return false;
        }
        if self.port.is_some() && self.port != r.destination.port {
            return false;
        }
        if self.nat_port.is_some() && self.nat_port != r.nat.as_ref().and_then(|n| n.port) {
            return false;
        }
        if self.nat.is_some() && self.nat != r.nat.as_ref().map(|n| n.ip) {
            return false;
        }
        true
    }
}

/// `want` names `rule` whole, or its last parts (`payments/stripe` or `stripe` for
/// `NamespaceEgressRule/payments/stripe`).
pub fn rule_matches(want: &str, rule: &str) -> bool {
    rule == want || rule.ends_with(&format!("/{want}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RuleRef;

    #[test]
    fn every_field_must_match() {
        let t: Timestamp = "2026-12-06T10:00:00Z".parse().unwrap();
        let mut r = FlowRecord::packet(t, "payments", Verdict::Drop);
        r.source.namespace = Some("payments".into());
        r.source.pod = Some("checkout-0".into());
        r.destination.ip = Some("198.51.100.7".parse().unwrap());
        r.destination.port = Some(443);
        r.destination.host = Some("api.stripe.com".into());
        r.protocol = "tcp".into();
        r.rule =
            Some(RuleRef { rule: "ClusterEgressRule/block".into(), context: "cluster".into(), mode: "enforce".into() });
        r.audit = vec!["ClusterEgressRule/audit-paste".into()];
        let ok = |f: Filter| f.matches(&r);
        assert!(ok(Filter::default()));
        assert!(ok(Filter { pod: Some("payments/checkout-0".into()), ..Filter::default() }));
        assert!(!ok(Filter { pod: Some("analytics/checkout-0".into()), ..Filter::default() }));
        assert!(ok(Filter { to: Some(To::parse("198.51.100.0/24").unwrap()), ..Filter::default() }));
        assert!(!ok(Filter { to: Some(To::parse("198.51.101.0/24").unwrap()), ..Filter::default() }));
        assert!(ok(Filter { to: Some(To::parse("API.stripe.com.").unwrap()), ..Filter::default() }));
        assert!(ok(Filter { rule: Some("block".into()), ..Filter::default() }));
        assert!(ok(Filter { rule: Some("audit-paste".into()), ..Filter::default() }), "audit rules count");
        assert!(!ok(Filter { rule: Some("lock".into()), ..Filter::default() }), "whole parts only");
        assert!(!ok(Filter { verdict: Some(Verdict::Accept), ..Filter::default() }));
        assert!(!ok(Filter { port: Some(80), ..Filter::default() }));
        assert!(!ok(Filter { tenant: Some("analytics".into()), ..Filter::default() }));
        assert!(!ok(Filter { since: Some(t + jiff::SignedDuration::from_secs(1)), ..Filter::default() }));
        assert!(ok(Filter { until: Some(t), ..Filter::default() }));
        let now: Timestamp = "2026-12-06T12:00:00Z".parse().unwrap();
        assert_eq!(parse_time("2h", now).unwrap(), t);
        assert!(parse_time("2 weeks", now).is_err());
    }
}
