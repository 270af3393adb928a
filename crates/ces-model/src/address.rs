//! Destination addresses of an ExternalService: IP, CIDR, range `a-b`, host name, wildcard `*.example.com`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One parsed `ExternalService.spec.addresses` entry. Host names are stored lower-case without a trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddressEntry {
    /// A single address is a /32 or /128 network.
    Net(IpNet),
    /// An inclusive range of one address family.
    Range(IpAddr, IpAddr),
    /// A fully-qualified host name, matched exactly.
    Host(String),
    /// `*.suffix`: matches names with one or more labels before `suffix`. Holds the suffix.
    Wildcard(String),
}

/// A destination: an address or a host name (as in `--to api.example.com:443/tcp`), or both: a connection to an
/// address its client resolved from a name (a recorded flow), which IP entries match by the address and name entries
/// by the name (docs/semantics.md §5).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    Ip(IpAddr),
    Host(String),
    Resolved { host: String, ip: IpAddr },
}

impl Destination {
    /// Parses an IP address, or else a host name (normalised to lower case, no trailing dot).
    pub fn parse(s: &str) -> Result<Destination, String> {
        let t = s.strip_prefix('[').and_then(|x| x.strip_suffix(']')).unwrap_or(s);
        if let Ok(ip) = t.parse::<IpAddr>() {
            return Ok(Destination::Ip(ip));
        }
        Ok(Destination::Host(parse_host(s)?))
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Ip(ip) => write!(f, "{ip}"),
            Destination::Host(h) => f.write_str(h),
            Destination::Resolved { host, ip } => write!(f, "{host} ({ip})"),
        }
    }
}

impl AddressEntry {
    /// Does this entry match the destination? IP entries match addresses; name entries match names, ignoring case
    /// and a trailing dot (the destination is already normalised by [`Destination::parse`]).
    pub fn matches(&self, dst: &Destination) -> bool {
        match dst {
            Destination::Ip(ip) => self.matches_ip(*ip),
            Destination::Host(d) => self.matches_name(d),
            Destination::Resolved { host, ip } => self.matches_ip(*ip) || self.matches_name(host),
        }
    }

    fn matches_ip(&self, ip: IpAddr) -> bool {
        match self {
            AddressEntry::Net(n) => n.contains(&ip),
            AddressEntry::Range(a, b) => a.is_ipv4() == ip.is_ipv4() && *a <= ip && ip <= *b,
            _ => false,
        }
    }

    fn matches_name(&self, d: &str) -> bool {
        match self {
            AddressEntry::Host(h) => h == d,
            AddressEntry::Wildcard(suffix) => {
                d.len() > suffix.len() + 1
                    && d.ends_with(suffix.as_str())
                    && d.as_bytes()[d.len() - suffix.len() - 1] == b'.'
            }
            _ => false,
        }
    }

    pub fn is_name(&self) -> bool {
        matches!(self, AddressEntry::Host(_) | AddressEntry::Wildcard(_))
    }
}

impl FromStr for AddressEntry {
    type Err = String;

    fn from_str(raw: &str) -> Result<AddressEntry, String> {
        let s = raw.trim();
        if s.is_empty() {
            return Err("empty address".into());
        }
        if s.contains('/') {
            let net: IpNet = s.parse().map_err(|_| format!("`{s}` is not a valid CIDR"))?;
            if net.trunc() != net {
                return Err(format!("`{s}` has host bits set; did you mean `{}`?", net.trunc()));
            }
            return Ok(AddressEntry::Net(net));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(AddressEntry::Net(IpNet::from(ip)));
        }
        if let Some((a, b)) = s.split_once('-') {
            match (a.trim().parse::<IpAddr>(), b.trim().parse::<IpAddr>()) {
                (Ok(a), Ok(b)) => {
                    if a.is_ipv4() != b.is_ipv4() {
                        return Err(format!("range `{s}` mixes IPv4 and IPv6"));
                    }
                    if a > b {
                        return Err(format!("range `{s}` is reversed (start is after end)"));
                    }
                    return Ok(AddressEntry::Range(a, b));
                }
                (Ok(_), Err(_)) | (Err(_), Ok(_)) => {
                    return Err(format!("`{s}` is not a valid address range `a-b`"));
                }
                _ => {}
            }
        }
        if let Some(suffix) = s.strip_prefix("*.") {
            return Ok(AddressEntry::Wildcard(parse_host(suffix).map_err(|e| format!("wildcard `{s}`: {e}"))?));
        }
        if s.contains('*') {
            return Err(format!("`{s}`: a wildcard must be written `*.domain`"));
        }
        Ok(AddressEntry::Host(parse_host(s)?))
    }
}

/// Validates a DNS host name and normalises it (lower case, no trailing dot).
pub fn parse_host(raw: &str) -> Result<String, String> {
    let s = raw.strip_suffix('.').unwrap_or(raw);
    if s.is_empty() || s.len() > 253 {
        return Err(format!("`{raw}` is not a valid host name (1 to 253 characters)"));
    }
    if s.contains(':') {
        return Err(format!("`{raw}` is not a valid IP address"));
    }
    let labels: Vec<&str> = s.split('.').collect();
    for label in &labels {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("`{raw}` is not a valid host name, IP address or CIDR"));
        }
    }
    if labels.iter().all(|l| l.bytes().all(|c| c.is_ascii_digit())) {
        return Err(format!("`{raw}` is not a valid IP address"));
    }
    Ok(s.to_ascii_lowercase())
}

impl fmt::Display for AddressEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressEntry::Net(n) if n.prefix_len() == n.max_prefix_len() => {
                write!(f, "{}", n.addr())
            }
            AddressEntry::Net(n) => write!(f, "{n}"),
            AddressEntry::Range(a, b) => write!(f, "{a}-{b}"),
            AddressEntry::Host(h) => f.write_str(h),
            AddressEntry::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

impl Serialize for AddressEntry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AddressEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> AddressEntry {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    fn ip(s: &str) -> Destination {
        Destination::parse(s).unwrap()
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(p("22.6.6.5"), AddressEntry::Net("22.6.6.5/32".parse().unwrap()));
        assert_eq!(p("2001:db8::1"), AddressEntry::Net("2001:db8::1/128".parse().unwrap()));
        assert_eq!(p("10.0.0.0/8"), AddressEntry::Net("10.0.0.0/8".parse().unwrap()));
        assert_eq!(p("10.0.0.1-10.0.0.9"), AddressEntry::Range(ip_addr("10.0.0.1"), ip_addr("10.0.0.9")));
        assert_eq!(p("WWW.Example.COM."), AddressEntry::Host("www.example.com".into()));
        assert_eq!(p("*.Example.com"), AddressEntry::Wildcard("example.com".into()));
        assert_eq!(p("my-host-1.internal"), AddressEntry::Host("my-host-1.internal".into()));
    }

    fn ip_addr(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rejects_bad_entries_with_clear_messages() {
        let cases = [
            ("10.0.0.0/33", "not a valid CIDR"),
            ("10.0.0.1/24", "host bits set; did you mean `10.0.0.0/24`"),
            ("300.1.1.1", "not a valid IP address"),
            ("10.0.0", "not a valid IP address"),
            ("10.0.0.9-10.0.0.1", "reversed"),
            ("10.0.0.1-::1", "mixes IPv4 and IPv6"),
            ("10.0.0.1-nope", "not a valid address range"),
            ("*", "wildcard must be written"),
            ("a.*.com", "wildcard must be written"),
            ("bad_name.com", "not a valid host name"),
            ("-bad.com", "not a valid host name"),
            ("", "empty"),
            ("fe80::zz", "not a valid IP address"),
        ];
        for (input, want) in cases {
            let err = input.parse::<AddressEntry>().expect_err(input);
            assert!(err.contains(want), "{input}: got `{err}`, want `{want}`");
        }
    }

    #[test]
    fn ip_matching() {
        assert!(p("10.0.0.0/8").matches(&ip("10.1.2.3")));
        assert!(!p("10.0.0.0/8").matches(&ip("11.0.0.1")));
        assert!(p("10.0.0.1-10.0.0.9").matches(&ip("10.0.0.9")));
        assert!(!p("10.0.0.1-10.0.0.9").matches(&ip("10.0.0.10")));
        assert!(!p("10.0.0.1-10.0.0.9").matches(&ip("::1")));
        assert!(p("2001:db8::/32").matches(&ip("2001:db8::5")));
        assert!(!p("10.0.0.0/8").matches(&ip("api.example.com")));
    }

    #[test]
    fn name_matching_ignores_case_and_trailing_dot() {
        assert!(p("api.example.com").matches(&ip("API.Example.Com.")));
        assert!(!p("api.example.com").matches(&ip("x.api.example.com")));
        let w = p("*.example.com");
        assert!(w.matches(&ip("a.example.com")));
        assert!(w.matches(&ip("a.b.EXAMPLE.com.")));
        assert!(!w.matches(&ip("example.com")), "the wildcard needs at least one label before the suffix");
        assert!(!w.matches(&ip("badexample.com")));
        assert!(!w.matches(&ip("10.0.0.1")));
    }

    #[test]
    fn display_round_trips() {
        for s in ["1.2.3.4", "10.0.0.0/8", "1.1.1.1-1.1.1.5", "a.b", "*.a.b", "::1", "2001:db8::/32"] {
            assert_eq!(p(s).to_string(), s);
            assert_eq!(p(&p(s).to_string()), p(s));
        }
    }
}
