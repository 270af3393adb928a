//! Protocols, port lists and bandwidth of an ExternalService port entry.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The protocol of a port entry, or of a flow (a flow is never `Any`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Any,
}

impl Protocol {
    /// Parses `tcp`, `udp`, `icmp` or `any` in any case; empty means `any` (the original ignored such entries).
    pub fn parse(s: &str) -> Result<Protocol, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "icmp" => Ok(Protocol::Icmp),
            "any" | "" => Ok(Protocol::Any),
            other => Err(format!("unknown protocol `{other}`; expected tcp, udp, icmp or any")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
            Protocol::Any => "any",
        }
    }

    /// Does a flow's protocol carry ports?
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An inclusive port range; a single port has `start == end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub fn contains(self, port: u16) -> bool {
        self.start <= port && port <= self.end
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end { write!(f, "{}", self.start) } else { write!(f, "{}-{}", self.start, self.end) }
    }
}

/// Parses a decimal number of ASCII digits only, as the CRD patterns allow: no sign, no spaces, no `_`.
/// (Rust's `str::parse` accepts a leading `+`.)
pub fn parse_decimal<T: FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_port(s: &str, whole: &str) -> Result<u16, String> {
    let n: u64 = parse_decimal(s.trim()).ok_or_else(|| format!("port list `{whole}`: `{s}` is not a port number"))?;
    if n == 0 || n > 65535 {
        return Err(format!("port list `{whole}`: port {n} is out of range 1-65535"));
    }
    Ok(n as u16)
}

/// Parses the original's syntax: `80`, `8000-8080`, `80,443,8000-8080`.
pub fn parse_port_list(whole: &str) -> Result<Vec<PortRange>, String> {
    if whole.trim().is_empty() {
        return Err("empty port list".into());
    }
    whole
        .split(',')
        .map(|part| {
            let part = part.trim();
            if part.is_empty() {
                return Err(format!("port list `{whole}` has an empty item"));
            }
            match part.split_once('-') {
                None => {
                    let p = parse_port(part, whole)?;
                    Ok(PortRange { start: p, end: p })
                }
                Some((a, b)) => {
                    let (start, end) = (parse_port(a, whole)?, parse_port(b, whole)?);
                    if start > end {
                        return Err(format!("port list `{whole}`: range {part} is reversed"));
                    }
                    Ok(PortRange { start, end })
                }
            }
        })
        .collect()
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<PortRange, String> {
        match parse_port_list(s)?.as_slice() {
            [one] => Ok(*one),
            _ => Err(format!("`{s}` is not a single port or range")),
        }
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// `ports[].bandwidth`: the name of a BIG-IP iRule (the original's meaning) or a rate in bits per second.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Bandwidth {
    IRule(String),
    BitsPerSecond(u64),
}

impl Bandwidth {
    /// A value that starts with a digit is a rate (`10Mbps`, `1.5 Gbps`, `500kbps`, `64000bps`); anything else names
    /// an iRule, which must be listed in the config's `iRule`.
    pub fn parse(s: &str, irules: &[String]) -> Result<Bandwidth, String> {
        let s = s.trim();
        if s.starts_with(|c: char| c.is_ascii_digit()) {
            return parse_rate(s).map(Bandwidth::BitsPerSecond);
        }
        if irules.iter().any(|r| r == s) {
            Ok(Bandwidth::IRule(s.to_string()))
        } else {
            Err(format!(
                "bandwidth `{s}` is neither a rate such as 10Mbps nor an iRule listed in ces-conf.yaml `iRule` ({})",
                if irules.is_empty() { "none listed".to_string() } else { irules.join(", ") }
            ))
        }
    }
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = (&s[..split], s[split..].trim());
    let mult: f64 = match unit {
        "bps" => 1.0,
        "kbps" | "Kbps" => 1e3,
        "mbps" | "Mbps" => 1e6,
        "gbps" | "Gbps" => 1e9,
        _ => {
            return Err(format!("bandwidth `{s}`: unit must be bps, kbps, Mbps or Gbps (bits per second)"));
        }
    };
    let n: f64 = num.parse().map_err(|_| format!("bandwidth `{s}`: `{num}` is not a number"))?;
    let bps = n * mult;
    if !(1.0..=1e12).contains(&bps) {
        return Err(format!("bandwidth `{s}` is out of range 1bps-1000Gbps"));
    }
    Ok(bps.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_lists() {
        let r = parse_port_list("80,443,8000-8080").unwrap();
        assert_eq!(r.len(), 3);
        assert!(r[2].contains(8000) && r[2].contains(8080) && !r[2].contains(8081));
        for (bad, want) in [
            ("99999", "out of range 1-65535"),
            ("0", "out of range"),
            ("8080-8000", "reversed"),
            ("80,,81", "empty item"),
            ("http", "not a port number"),
            ("", "empty port list"),
            // The CRD pattern allows digits only; `str::parse` would take a sign.
            ("+443", "not a port number"),
            ("80-+90", "not a port number"),
        ] {
            let e = parse_port_list(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn protocols_in_any_case() {
        assert_eq!(Protocol::parse("UDP").unwrap(), Protocol::Udp);
        assert_eq!(Protocol::parse("Tcp").unwrap(), Protocol::Tcp);
        assert_eq!(Protocol::parse("ICMP").unwrap(), Protocol::Icmp);
        assert_eq!(Protocol::parse("").unwrap(), Protocol::Any);
        assert!(Protocol::parse("sctp").unwrap_err().contains("unknown protocol `sctp`"));
    }

    #[test]
    fn bandwidth_rate_or_irule() {
        let irules = vec!["bwc-1mbps-irule".to_string()];
        assert_eq!(Bandwidth::parse("10Mbps", &irules).unwrap(), Bandwidth::BitsPerSecond(10_000_000));
        assert_eq!(Bandwidth::parse("1.5 Gbps", &irules).unwrap(), Bandwidth::BitsPerSecond(1_500_000_000));
        assert_eq!(Bandwidth::parse("bwc-1mbps-irule", &irules).unwrap(), Bandwidth::IRule("bwc-1mbps-irule".into()));
        // The original used a substring test; `bwc-1mbps` is not a listed iRule.
        assert!(Bandwidth::parse("bwc-1mbps", &irules).is_err());
        assert!(Bandwidth::parse("10MBps", &irules).unwrap_err().contains("unit must be"));
        assert!(Bandwidth::parse("0bps", &irules).unwrap_err().contains("out of range"));
    }
}
