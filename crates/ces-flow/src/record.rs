//! The flow record: one attributed traffic log for both data planes (docs/flows.md, field by field;
//! `docs/flow-record.schema.json` is its JSON schema). Version 1.

use std::collections::BTreeMap;
use std::net::IpAddr;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// The version of the record's JSON form; readers refuse records of a version they do not know.
pub const SCHEMA_VERSION: u32 = 1;

/// The JSON schema of the record's JSON form (`docs/flow-record.schema.json`).
pub const JSON_SCHEMA: &str = include_str!("../../../docs/flow-record.schema.json");

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A connection as conntrack saw it, from start to end, with its counters (accepted traffic).
    Connection,
    /// One logged packet: a drop, a reject, an audit hit, or a logged accept.
    Packet,
}

/// Which data plane saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Gateway,
    Bigip,
    Import,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Accept,
    Drop,
    Reject,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Accept => "accept",
            Verdict::Drop => "drop",
            Verdict::Reject => "reject",
        }
    }

    pub fn parse(s: &str) -> Option<Verdict> {
        match s.to_ascii_lowercase().as_str() {
            "accept" | "accept-decisively" | "allow" | "accepted" | "permit" => Some(Verdict::Accept),
            "drop" | "dropped" | "deny" => Some(Verdict::Drop),
            "reject" | "rejected" => Some(Verdict::Reject),
            _ => None,
        }
    }
}

/// What became of a connection at the TCP/IP level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// TCP: established and closed in order (FIN). UDP, ICMP: answered.
    Completed,
    /// TCP: reset, by the peer or on the way (a connection to a closed port, or one torn down).
    Reset,
    /// Nothing came back.
    NoAnswer,
    /// An ICMP destination-unreachable came back.
    IcmpUnreachable,
    /// Still open when it was recorded, or not known.
    Unknown,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Reset => "reset",
            Outcome::NoAnswer => "no-answer",
            Outcome::IcmpUnreachable => "icmp-unreachable",
            Outcome::Unknown => "unknown",
        }
    }

    pub fn is_error(self) -> bool {
        matches!(self, Outcome::Reset | Outcome::NoAnswer | Outcome::IcmpUnreachable)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    pub ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The pod's labels (its workload).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    pub ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The host name the client resolved this address from, when the data plane knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `namespace/name` of the ExternalService of the deciding rule that the destination matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_service: Option<String>,
}

/// The rule that decided: `Kind/namespace/name` (or `Tenant/<name>` for a tenant's default action), the context it
/// sits in, and whether it enforces or audits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleRef {
    pub rule: String,
    /// `cluster`, `namespace`, `service`, `default`.
    pub context: String,
    /// `enforce` or `audit`.
    pub mode: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Towards the destination (the connection's original direction).
    pub out: u64,
    /// Back from it.
    #[serde(rename = "in")]
    pub back: u64,
}

/// A source address translation: what the destination saw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Nat {
    pub ip: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowRecord {
    /// The schema version ([`SCHEMA_VERSION`]).
    pub v: u32,
    pub kind: Kind,
    pub origin: Origin,
    /// When the connection started, or when the packet was seen.
    pub time: Timestamp,
    /// When the connection ended (connections only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<Timestamp>,
    pub tenant: String,
    pub source: Source,
    pub destination: Destination,
    /// `tcp`, `udp`, `icmp`, or the IP protocol number.
    pub protocol: String,
    pub verdict: Verdict,
    /// The deciding rule; absent when the data plane could not say (a rule of an older table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleRef>,
    /// Audit rules that also matched (what they would have done is in their own log lines).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audit: Vec<String>,
    #[serde(default)]
    pub packets: Counts,
    #[serde(default)]
    pub bytes: Counts,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<Nat>,
}

/// The protocol's name as records write it.
pub fn protocol_name(proto: u8) -> String {
    match proto {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 | 58 => "icmp".into(),
        other => other.to_string(),
    }
}

/// The protocol number of a record's protocol, for storage (`icmp` is 1 whatever the family).
pub fn protocol_number(name: &str) -> Option<u8> {
    match name.to_ascii_lowercase().as_str() {
        "tcp" => Some(6),
        "udp" => Some(17),
        "icmp" | "ipv6-icmp" | "icmpv6" => Some(1),
        other => other.parse().ok(),
    }
}

impl FlowRecord {
    /// A record of one logged packet.
    pub fn packet(time: Timestamp, tenant: &str, verdict: Verdict) -> FlowRecord {
        FlowRecord {
            v: SCHEMA_VERSION,
            kind: Kind::Packet,
            origin: Origin::Gateway,
            time,
            end: None,
            tenant: tenant.to_string(),
            source: Source::default(),
            destination: Destination::default(),
            protocol: String::new(),
            verdict,
            rule: None,
            audit: Vec::new(),
            packets: Counts { out: 1, back: 0 },
            bytes: Counts::default(),
            outcome: Outcome::Unknown,
            nat: None,
        }
    }

    /// Reads one JSON line: a flow record, or a line of the gateway's packet log (`ces gateway --log-file`, before
    /// flow records), which maps onto a packet record.
    pub fn from_json_line(line: &str) -> Result<FlowRecord, String> {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
        if v.get("v").is_some() {
            let r: FlowRecord = serde_json::from_value(v).map_err(|e| format!("not a flow record: {e}"))?;
            if r.v != SCHEMA_VERSION {
                return Err(format!("flow record version {} (this CES reads version {SCHEMA_VERSION})", r.v));
            }
            return Ok(r);
        }
        // The gateway's packet log: {"time","tenant","source":{ip,namespace,pod},"destination","protocol","port",
        // "action","context","rule","mode","externalService"}.
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let time: Timestamp = s("time").ok_or("no `time`")?.parse().map_err(|e| format!("`time`: {e}"))?;
        let tenant = s("tenant").ok_or("no `tenant`")?;
        let action = s("action").ok_or("no `action`")?;
        let mode = s("mode").unwrap_or_else(|| "enforce".into());
        let verdict = Verdict::parse(&action).ok_or_else(|| format!("`action`: `{action}` is no verdict"))?;
        let src = v.get("source").cloned().unwrap_or_default();
        let ip = |x: Option<&serde_json::Value>| -> Result<Option<IpAddr>, String> {
            match x.and_then(|x| x.as_str()) {
                None => Ok(None),
                Some(t) => t.parse().map(Some).map_err(|_| format!("`{t}` is not an IP address")),
            }
        };
        let mut r = FlowRecord::packet(time, &tenant, verdict);
        r.origin = Origin::Import;
        r.source = Source {
            ip: ip(src.get("ip"))?,
            port: None,
            namespace: src.get("namespace").and_then(|x| x.as_str()).map(str::to_string),
            pod: src.get("pod").and_then(|x| x.as_str()).map(str::to_string),
            labels: BTreeMap::new(),
        };
        r.destination = Destination {
            ip: ip(v.get("destination"))?,
            port: v.get("port").and_then(|p| p.as_u64()).and_then(|p| u16::try_from(p).ok()),
            host: None,
            external_service: s("externalService"),
        };
        r.protocol = s("protocol").unwrap_or_default();
        let rule = s("rule").ok_or("no `rule`")?;
        let context = s("context").unwrap_or_default();
        if mode == "audit" {
            // An audit line: the rule did not decide; what did is not in the line.
            r.audit = vec![rule];
            r.verdict = Verdict::Accept;
            r.rule = None;
        } else {
            r.rule = Some(RuleRef { rule, context, mode });
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_the_gateways_packet_lines_map_onto_them() {
        let line = r#"{"time":"2026-11-29T18:46:50.364999426Z","tenant":"payments","source":{"ip":"10.10.0.21","namespace":"payments","pod":"ledger-0"},"destination":"198.51.100.5","protocol":"tcp","port":8443,"action":"accept-decisively","context":"namespace","rule":"NamespaceEgressRule/payments/ledger-card-network","mode":"enforce","externalService":"payments/card-network"}"#;
        let r = FlowRecord::from_json_line(line).unwrap();
        assert_eq!(r.verdict, Verdict::Accept);
        assert_eq!(r.source.pod.as_deref(), Some("ledger-0"));
        assert_eq!(r.destination.port, Some(8443));
        assert_eq!(r.rule.as_ref().unwrap().rule, "NamespaceEgressRule/payments/ledger-card-network");
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(FlowRecord::from_json_line(&json).unwrap(), r);
        let audit = line.replace("\"enforce\"", "\"audit\"").replace("accept-decisively", "reject");
        let a = FlowRecord::from_json_line(&audit).unwrap();
        assert_eq!((a.rule, a.audit.len()), (None, 1), "an audit line names no deciding rule");
        let newer = json.replace("\"v\":1", "\"v\":2");
        assert!(FlowRecord::from_json_line(&newer).unwrap_err().contains("version 2"));
        assert!(FlowRecord::from_json_line("{\"time\":\"x\"}").is_err());
    }
}
