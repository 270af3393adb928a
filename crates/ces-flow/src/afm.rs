//! BIG-IP AFM network-firewall log messages, as AFM's log publisher sends them (docs/flows.md, "From the BIG-IP";
//! formats from F5's documentation and published samples, `../shared/reference/afm-log-format.md`):
//!
//! - RFC 5424: `<PRI>1 TIME HOST tmm PID 23003137 [F5@12276 key="value" ...] MSG`: the fields are the structured
//!   data's;
//! - BSD (RFC 3164, AS3's default): `<PRI>Mmm dd hh:mm:ss HOST [severity] tmm[PID]: BODY`;
//! - a body (either format) of `key="value"` pairs, or the fields of the log profile's `storageFormat` joined by its
//!   delimiter (the original CES's template lists 16 fields, comma-joined), values optionally quoted.
//!
//! Field names are read in both of AFM's vocabularies (`src_ip` or `source_ip`, `acl-rule-name` or
//! `acl_rule_name`). Addresses may carry a route domain (`10.10.0.5%10`): it is stripped, and the `route_domain`
//! field decides the tenant. Nothing here trusts the line: a malformed one is an error, counted by the listener.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use jiff::Timestamp;

use crate::attribute::{Observation, RuleInfo, Tuple};
use crate::record::Origin;

/// The original CES's storage format (its `logPool.template`): the fields, in order, of a comma-joined body.
pub const ORIGINAL_FIELDS: [&str; 16] = [
    "bigip-hostname",
    "acl-rule-name",
    "acl-policy-name",
    "acl-policy-type",
    "protocol",
    "action",
    "drop-reason",
    "context-name",
    "context-type",
    "date-time",
    "src-ip",
    "src-port",
    "vlan",
    "route-domain",
    "dest-ip",
    "dest-port",
];

/// One AFM log message: its fields under the key=value names, and the time in its syslog header (when it has a
/// zone).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AfmEvent {
    pub time: Option<Timestamp>,
    pub fields: BTreeMap<String, String>,
}

/// A storage-format field name as the key=value output names it.
pub fn kv_name(field: &str) -> String {
    let f = field.trim().to_ascii_lowercase().replace('-', "_");
    match f.as_str() {
        "src_ip" => "source_ip".into(),
        "src_port" => "source_port".into(),
        "protocol" => "ip_protocol".into(),
        "bigip_hostname" => "hostname".into(),
        "management_ip_address" => "bigip_mgmt_ip".into(),
        "translated_src_ip" => "translated_source_ip".into(),
        "translated_src_port" => "translated_source_port".into(),
        _ => f,
    }
}

/// Splits `a,"b,c",d` on `delim`, honouring double quotes (a quote inside is doubled or backslashed).
fn split_fields(body: &str, delim: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '"' => quoted = !quoted,
            c if c == delim && !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Reads `key="value"` pairs (separated by spaces or commas; values in quotes with `\"` escapes, or bare).
fn key_values(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b' ' || b[i] == b',') {
            i += 1;
        }
        let k0 = i;
        while i < b.len() && b[i] != b'=' && b[i] != b' ' && b[i] != b',' {
            i += 1;
        }
        if i >= b.len() || b[i] != b'=' {
            // Not a pair: skip the word.
            while i < b.len() && b[i] != b' ' && b[i] != b',' {
                i += 1;
            }
            continue;
        }
        let key = String::from_utf8_lossy(&b[k0..i]).to_string();
        i += 1;
        let mut value = String::new();
        if i < b.len() && b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i] as char);
                i += 1;
            }
            i += 1;
        } else {
            while i < b.len() && b[i] != b' ' && b[i] != b',' {
                value.push(b[i] as char);
                i += 1;
            }
        }
        if !key.is_empty() {
            out.insert(kv_name(&key), value);
        }
    }
    out
}

/// The structured data of an RFC 5424 message (after the header): the params of its elements, and the rest (MSG).
fn structured_data(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut fields = BTreeMap::new();
    let mut rest = s;
    if let Some(r) = rest.strip_prefix('-') {
        return Ok((fields, r.trim_start()));
    }
    while let Some(r) = rest.strip_prefix('[') {
        // Find the element's end: a `]` outside quotes.
        let b = r.as_bytes();
        let (mut i, mut quoted) = (0, false);
        while i < b.len() {
            match b[i] {
                b'\\' if quoted => i += 1,
                b'"' => quoted = !quoted,
                b']' if !quoted => break,
                _ => {}
            }
            i += 1;
        }
        if i >= b.len() {
            return Err("structured data without its closing `]`".into());
        }
        let element = &r[..i];
        let params = element.split_once(' ').map_or("", |(_, p)| p);
        fields.extend(key_values(params));
        rest = &r[i + 1..];
    }
    Ok((fields, rest.trim_start()))
}

/// Parses one syslog message from AFM. `storage_fields`: the log profile's storage format, for a delimited body.
pub fn parse(line: &str, storage_fields: &[String], delimiter: char) -> Result<AfmEvent, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    let mut rest = line;
    if let Some(r) = rest.strip_prefix('<') {
        let end = r.find('>').filter(|e| *e <= 3).ok_or("a PRI without its `>`")?;
        r[..end].parse::<u8>().map_err(|_| "a PRI that is not a number")?;
        rest = &r[end + 1..];
    }
    let mut ev = AfmEvent::default();
    let body: &str;
    if let Some(r) = rest.strip_prefix("1 ") {
        // RFC 5424: TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG.
        let mut parts = r.splitn(6, ' ');
        let ts = parts.next().ok_or("no timestamp")?;
        ev.time = ts.parse::<Timestamp>().ok();
        for what in ["hostname", "app-name", "procid", "msgid"] {
            parts.next().ok_or_else(|| format!("no {what}"))?;
        }
        let (sd, msg) = structured_data(parts.next().unwrap_or("-"))?;
        ev.fields = sd;
        body = msg;
    } else {
        // BSD: `Mmm dd hh:mm:ss host [word] tag[pid]: body`; the body is after the first `: ` following a tag.
        body = match rest.find("]: ").or_else(|| rest.find(": ")) {
            Some(i) => rest[i..].split_once(": ").map_or("", |(_, b)| b),
            None => rest,
        };
    }
    if !ev.fields.contains_key("action") {
        let kv = key_values(body);
        if kv.contains_key("action") {
            ev.fields.extend(kv);
        } else if !storage_fields.is_empty() {
            let values = split_fields(body.trim(), delimiter);
            if values.len() != storage_fields.len() {
                return Err(format!(
                    "{} values where the storage format has {} fields",
                    values.len(),
                    storage_fields.len()
                ));
            }
            for (f, v) in storage_fields.iter().zip(values) {
                ev.fields.insert(kv_name(f), v.trim().to_string());
            }
        }
    }
    if !ev.fields.contains_key("action") {
        return Err("no `action`: not an AFM network event".into());
    }
    Ok(ev)
}

/// What maps AFM's names back to CES: for each tenant's policies and their rule lists' rules, the CES rule that made
/// them; route domains to tenants.
#[derive(Clone, Debug, Default)]
pub struct AfmIndex {
    /// `(policy name as logged, rule name as logged)` to the rules it may be. The policy name is the full path
    /// (`/tenant/Shared/policy`); rule names are indexed both alone and as `rule-list:rule`.
    pub rules: HashMap<(String, String), Vec<RuleInfo>>,
    /// Route domain id to tenant.
    pub tenants: HashMap<u16, String>,
}

fn address(v: Option<&String>) -> Option<IpAddr> {
    let v = v?;
    v.split('%').next()?.trim().parse().ok()
}

const COMMON: &str = "Common";

impl AfmIndex {
    /// Indexes one declared rule: under its policy and its name alone, as `rule-list:rule`, and (for messages
    /// without a policy name) under its name only.
    pub fn insert(&mut self, policy: &str, rule_list: &str, rule: &str, info: RuleInfo) {
        for key in [
            (policy.to_string(), rule.to_string()),
            (policy.to_string(), format!("{rule_list}:{rule}")),
            (String::new(), rule.to_string()),
        ] {
            let v = self.rules.entry(key).or_default();
            if !v.contains(&info) {
                v.push(info.clone());
            }
        }
    }

    /// The observation an AFM event makes. `received`: when it arrived (the time when the message's own has no zone).
    pub fn observation(&self, ev: &AfmEvent, received: Timestamp) -> Result<Observation, String> {
        let f = &ev.fields;
        let src = address(f.get("source_ip")).ok_or("no source address")?;
        let dst = address(f.get("dest_ip")).ok_or("no destination address")?;
        let proto = match f.get("ip_protocol").map(|p| p.to_ascii_lowercase()).as_deref() {
            Some("tcp") => 6,
            Some("udp") => 17,
            Some("icmp") | Some("icmpv6") | Some("ipv6-icmp") => 1,
            Some(other) => other.parse().unwrap_or(0),
            None => 0,
        };
        let port = |k: &str| f.get(k).and_then(|p| p.parse::<u16>().ok()).filter(|p| *p != 0);
        let rd = f
            .get("route_domain")
            .and_then(|r| r.parse::<u16>().ok())
            .or_else(|| f.get("source_ip").and_then(|s| s.split_once('%')?.1.parse().ok()))
            .unwrap_or(0);
        let tenant = self.tenants.get(&rd).cloned().unwrap_or_else(|| COMMON.to_string());
        let action = f.get("action").cloned().unwrap_or_default().to_ascii_lowercase();
        let staged = f.get("acl_policy_type").is_some_and(|t| t.eq_ignore_ascii_case("staged"));
        let policy = f.get("acl_policy_name").cloned().unwrap_or_default();
        let rule_name = f.get("acl_rule_name").cloned().unwrap_or_default();
        let candidates = self
            .rules
            .get(&(policy.clone(), rule_name.clone()))
            .or_else(|| self.rules.get(&(String::new(), rule_name.clone())))
            .cloned()
            .unwrap_or_default();
        // The tenant's own rules, and Common's (the global context applies to every tenant's traffic).
        let mut candidates: Vec<RuleInfo> =
            candidates.into_iter().filter(|r| r.tenant == tenant || r.tenant == COMMON).collect();
        // Of several rules AFM names alike, those whose action is what AFM did.
        if candidates.len() > 1 {
            let same: Vec<RuleInfo> = candidates
                .iter()
                .filter(|r| r.action == action || (action == "accept" && r.action.starts_with("accept")))
                .cloned()
                .collect();
            if !same.is_empty() {
                candidates = same;
            }
        }
        let rule = match candidates.first() {
            Some(r) => {
                let mut r = r.clone();
                r.tenant = tenant.clone();
                if staged {
                    r.mode = "audit".into();
                }
                r
            }
            None => RuleInfo {
                tenant: tenant.clone(),
                rule: if rule_name.is_empty() {
                    format!("Tenant/{tenant}")
                } else {
                    format!("AFM/{policy}/{rule_name}")
                },
                context: if rule_name.is_empty() { "default".into() } else { String::new() },
                action: action.clone(),
                mode: if staged { "audit".into() } else { "enforce".into() },
                external_service: None,
            },
        };
        let time = ev.time.unwrap_or(received);
        let tuple = Tuple { src, dst, proto, sport: port("source_port"), dport: port("dest_port") };
        Ok(Observation::Packet { time, tuple, rule, origin: Origin::Bigip })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// F5's documented RFC 5424 sample (afm-log-format.md §3.1), with its PRI.
    const RFC5424: &str = r#"<134>1 2015-03-14T20:24:34-07:00 big207.f5jp.local tmm 14807 23003137 [F5@12276 acl_policy_name="" acl_policy_type="Enforced" acl_rule_name="Global-Reject-ALL" action="Reject" hostname="big207.f5jp.local" bigip_mgmt_ip="10.99.88.207" context_name="" context_type="Global" date_time="Mar 14 2015 20:24:33" dest_ip="224.0.0.251" dst_geo="No-lookup" dest_port="5353" device_product="Advanced Firewall Module" device_vendor="F5" device_version="" drop_reason="Policy" errdefs_msgno="23003137" errdefs_msg_name="Network Event" flow_id="0000000000000000" ip_protocol="UDP" severity="8" partition_name="Common" route_domain="0" sa_translation_pool="" sa_translation_type="" source_ip="10.99.5.239" src_geo="No-lookup" source_port="5353" translated_dest_ip="" translated_dest_port="" translated_ip_protocol="" translated_route_domain="" translated_source_ip="" translated_source_port="" translated_vlan="" vlan="/Common/Ovserve"] 224.0.0.251,10.99.5.239,5353,5353"#;

    #[test]
    fn f5s_rfc5424_sample_reads() {
        let ev = parse(RFC5424, &[], ',').unwrap();
        assert_eq!(ev.fields["acl_rule_name"], "Global-Reject-ALL");
        assert_eq!(ev.fields["source_ip"], "10.99.5.239");
        assert_eq!(ev.time, Some("2015-03-15T03:24:34Z".parse().unwrap()));
        let o = AfmIndex::default().observation(&ev, Timestamp::UNIX_EPOCH).unwrap();
        let Observation::Packet { tuple, rule, .. } = o else { panic!() };
        assert_eq!((tuple.proto, tuple.dport), (17, Some(5353)));
        assert_eq!((rule.tenant.as_str(), rule.action.as_str()), ("Common", "reject"));
    }

    #[test]
    fn bsd_lines_with_the_originals_field_list_or_key_values_read() {
        let fields: Vec<String> = ORIGINAL_FIELDS.iter().map(|s| s.to_string()).collect();
        let line = r#"<134>Dec  6 18:00:00 bigip1 warning tmm[2314]: bigip1.example,accept_stripe_https,/payments/Shared/k8s_svc_policy_rd10,Enforced,TCP,Accept,,/payments/Shared/k8s_outbound_vs,Virtual Server,"Dec 06 2026 18:00:00",10.10.0.11%10,40112,/payments/vlan10,10,198.51.100.5,443"#;
        let ev = parse(line, &fields, ',').unwrap();
        assert_eq!(ev.fields["acl_rule_name"], "accept_stripe_https");
        assert_eq!(ev.fields["source_ip"], "10.10.0.11%10");
        assert_eq!(ev.fields["date_time"], "Dec 06 2026 18:00:00");
        let kv = r#"<134>Dec  6 18:00:00 bigip1 tmm[2314]: action="Drop",acl_policy_name="/p/Shared/x",acl_rule_name="r",source_ip="10.0.0.1",source_port="1",dest_ip="10.0.0.2",dest_port="2",ip_protocol="TCP",route_domain="10""#;
        assert_eq!(parse(kv, &fields, ',').unwrap().fields["action"], "Drop");
        // Hostile or broken lines are errors, never panics.
        for bad in [
            "",
            "<999999>1 x",
            "<134>1 2026-12-06T10:00:00Z h tmm 1 2 [F5@12276 action=\"Drop",
            "<134>Dec  6 18:00:00 bigip1 tmm[1]: only,three,values",
            "<134>1 2026-12-06T10:00:00Z",
        ] {
            assert!(parse(bad, &fields, ',').is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rule_names_map_back_to_ces_rules_in_the_events_tenant() {
        let info = |tenant: &str, rule: &str, action: &str| RuleInfo {
            tenant: tenant.into(),
            rule: rule.into(),
            context: "service".into(),
            action: action.into(),
            mode: "enforce".into(),
            external_service: Some("payments/stripe".into()),
        };
        let mut idx = AfmIndex::default();
        idx.tenants.insert(10, "payments".into());
        idx.rules.insert(
            ("/payments/Shared/k8s_svc_policy_rd10".into(), "accept_stripe_https".into()),
            vec![info("payments", "ServiceEgressRule/payments/checkout-stripe", "accept")],
        );
        let fields: Vec<String> = ORIGINAL_FIELDS.iter().map(|s| s.to_string()).collect();
        let line = "<134>Dec  6 18:00:00 bigip1 tmm[2314]: bigip1,accept_stripe_https,/payments/Shared/k8s_svc_policy_rd10,Enforced,TCP,Accept,,vs,Virtual Server,Dec 06 2026 18:00:00,10.10.0.11%10,40112,v,10,198.51.100.5,443";
        let ev = parse(line, &fields, ',').unwrap();
        let Observation::Packet { tuple, rule, origin, .. } = idx.observation(&ev, Timestamp::UNIX_EPOCH).unwrap()
        else {
            panic!()
        };
        assert_eq!(rule.rule, "ServiceEgressRule/payments/checkout-stripe");
        assert_eq!(tuple.src, "10.10.0.11".parse::<IpAddr>().unwrap(), "the route domain is stripped");
        assert_eq!(origin, Origin::Bigip);
        // The same names logged in route domain 0 are Common's, and name no payments rule.
        let other = line.replace("%10", "").replace(",v,10,", ",v,0,");
        let ev = parse(&other, &fields, ',').unwrap();
        let Observation::Packet { rule, .. } = idx.observation(&ev, Timestamp::UNIX_EPOCH).unwrap() else { panic!() };
        assert_eq!((rule.tenant.as_str(), rule.rule.starts_with("AFM/")), ("Common", true));
    }
}
