//! Reading the packets the gateway logs, from the kernel's NFLOG group, over a netlink socket.
//!
//! The ruleset logs with `limit rate N/second log prefix "ces/<tag> " group G` lines that give no verdict, so a
//! flood can fill the log's rate limit but never slow forwarding. Each prefix names a [`crate::LogTag`]; the agent
//! turns a packet and its tag into one JSON line ([`LogEvent`]), naming the pod behind the source address from the
//! model's pods of the tag's tenant (the same address may be another pod in another tenant).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;

use ces_model::PolicyModel;

use crate::nl::{self, attr};
use crate::{LogTag, Ruleset};

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;

/// One logged packet: its prefix and the packet from its network header on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedPacket {
    pub prefix: String,
    pub payload: Vec<u8>,
}

/// A socket bound to one NFLOG group.
pub struct NflogSocket {
    fd: OwnedFd,
}

fn config_message(group: u16, attrs: &[Vec<u8>], seq: u32) -> Vec<u8> {
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    nl::message((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG, flags, seq, libc::AF_UNSPEC as u8, group, attrs)
}

/// Parses the attributes of an NFLOG packet message (after its 4-byte nfgenmsg).
fn packet(body: &[u8]) -> Option<LoggedPacket> {
    let mut a = 4;
    let (mut prefix, mut payload) = (String::new(), Vec::new());
    while a + 4 <= body.len() {
        let len = u16::from_ne_bytes(body[a..a + 2].try_into().ok()?) as usize;
        let ty = u16::from_ne_bytes(body[a + 2..a + 4].try_into().ok()?) & 0x7fff;
        if len < 4 || a + len > body.len() {
            break;
        }
        let data = &body[a + 4..a + len];
        match ty {
            NFULA_PREFIX => prefix = String::from_utf8_lossy(data).trim_end_matches('\0').to_string(),
            NFULA_PAYLOAD => payload = data.to_vec(),
            _ => {}
        }
        a += len.div_ceil(4) * 4;
    }
    Some(LoggedPacket { prefix, payload })
}

impl NflogSocket {
    /// Binds NFLOG group `group` in this network namespace (needs CAP_NET_ADMIN).
    pub fn bind(group: u16) -> io::Result<NflogSocket> {
        let s = NflogSocket { fd: nl::socket()? };
        let mut mode = 0xffffu32.to_be_bytes().to_vec();
        mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
        s.request(&config_message(group, &[attr(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND])], 1))?;
        s.request(&config_message(group, &[attr(NFULA_CFG_MODE, &mode)], 2))?;
        nl::set_timeout(&s.fd, std::time::Duration::from_millis(200))?;
        Ok(s)
    }

    /// Sends a configuration request and waits for its acknowledgement.
    fn request(&self, msg: &[u8]) -> io::Result<()> {
        nl::send(&self.fd, msg)?;
        let mut buf = vec![0u8; 8192];
        let n = nl::recv(&self.fd, &mut buf)?;
        for m in nl::messages(&buf[..n]) {
            if let Some(code) = m.error().filter(|c| *c != 0) {
                return Err(io::Error::from_raw_os_error(-code));
            }
        }
        Ok(())
    }

    /// The packets of the next datagram; empty after the receive timeout (200 ms), so callers can check for stop.
    pub fn recv(&self) -> io::Result<Vec<LoggedPacket>> {
        let mut buf = vec![0u8; 65536];
        match nl::recv(&self.fd, &mut buf) {
            Ok(n) => Ok(nl::messages(&buf[..n])
                .into_iter()
                .filter(|m| m.ty == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET)
                .filter_map(|m| packet(m.payload))
                .collect()),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }
}

/// The addresses, protocol and destination port of an IPv4 or IPv6 packet.
pub fn parse_ip(p: &[u8]) -> Option<(IpAddr, IpAddr, u8, Option<u16>)> {
    let (src, dst, proto, l4) = match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let ihl = ((p[0] & 15) as usize) * 4;
            let s: [u8; 4] = p[12..16].try_into().ok()?;
            let d: [u8; 4] = p[16..20].try_into().ok()?;
            (IpAddr::V4(Ipv4Addr::from(s)), IpAddr::V4(Ipv4Addr::from(d)), p[9], ihl)
        }
        6 if p.len() >= 40 => {
            let s: [u8; 16] = p[8..24].try_into().ok()?;
            let d: [u8; 16] = p[24..40].try_into().ok()?;
            (IpAddr::V6(Ipv6Addr::from(s)), IpAddr::V6(Ipv6Addr::from(d)), p[6], 40)
        }
        _ => return None,
    };
    let port = (matches!(proto, 6 | 17) && p.len() >= l4 + 4).then(|| u16::from_be_bytes([p[l4 + 2], p[l4 + 3]]));
    Some((src, dst, proto, port))
}

/// What a log line needs from the last applied ruleset and model: the tags and who has each address.
#[derive(Clone, Debug, Default)]
pub struct LogIndex {
    /// The NFLOG group the ruleset logs to.
    pub group: Option<u16>,
    pub tags: Vec<LogTag>,
    pub pods: ces_model::PodIndex,
}

impl LogIndex {
    pub fn new(model: &PolicyModel, rs: &Ruleset) -> LogIndex {
        LogIndex {
            group: Some(model.settings.gateway.log_group),
            tags: rs.log_tags.clone(),
            pods: ces_model::PodIndex::new(&model.pods),
        }
    }

    /// The JSON line for a logged packet, or `None` when its prefix is not one of ours.
    pub fn event(&self, pkt: &LoggedPacket, time: jiff::Timestamp) -> Option<String> {
        let n: usize = pkt.prefix.trim().strip_prefix("ces/")?.parse().ok()?;
        let tag = self.tags.get(n)?;
        let (src, dst, proto, port) = parse_ip(&pkt.payload)?;
        let pod = self.pods.pod(&tag.tenant, src);
        let protocol = match proto {
            6 => "tcp".to_string(),
            17 => "udp".to_string(),
            1 | 58 => "icmp".to_string(),
            other => other.to_string(),
        };
        let mut source = format!("{{\"ip\":\"{src}\"");
        if let Some((ns, name)) = pod {
            source += &format!(",\"namespace\":{},\"pod\":{}", json_str(ns), json_str(name));
        }
        source.push('}');
        let mut line = format!(
            "{{\"time\":\"{time}\",\"tenant\":{},\"source\":{source},\"destination\":\"{dst}\",\"protocol\":\"{protocol}\"",
            json_str(&tag.tenant)
        );
        if let Some(p) = port {
            line += &format!(",\"port\":{p}");
        }
        line += &format!(
            ",\"action\":{},\"context\":\"{}\",\"rule\":{},\"mode\":\"{}\"",
            json_str(&tag.action),
            tag.context.as_str(),
            json_str(&tag.rule),
            tag.mode
        );
        if let Some(e) = &tag.external_service {
            line += &format!(",\"externalService\":{}", json_str(e));
        }
        line.push('}');
        Some(line)
    }
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_headers_parse() {
        // IPv4 TCP 10.0.0.1 -> 10.0.0.2:443.
        let mut v4 = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
        v4.extend_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
        let (s, d, p, port) = parse_ip(&v4).unwrap();
        assert_eq!((s.to_string(), d.to_string(), p, port), ("10.0.0.1".into(), "10.0.0.2".into(), 6, Some(443)));
        // IPv6 UDP to port 53.
        let mut v6 = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
        v6.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&"2001:db8::5".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0x30, 0x39, 0x00, 0x35]);
        let (s, d, p, port) = parse_ip(&v6).unwrap();
        assert_eq!((s.to_string(), d.to_string(), p, port), ("fd00::1".into(), "2001:db8::5".into(), 17, Some(53)));
        assert_eq!(parse_ip(&[0x45, 0]), None, "truncated");
    }

    #[test]
    fn netlink_messages_and_attributes_round_trip() {
        let msg = config_message(7, &[attr(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND])], 3);
        let parsed = nl::messages(&msg);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].ty, (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG);
        assert_eq!(parsed[0].seq, 3);
        assert_eq!(&parsed[0].payload[2..4], &7u16.to_be_bytes(), "the group is big-endian in nfgenmsg");
        let mut body = vec![0, 0, 0, 0];
        body.extend(attr(NFULA_PREFIX, b"ces/3 \0"));
        body.extend(attr(NFULA_PAYLOAD, &[0x45, 1, 2]));
        assert_eq!(packet(&body).unwrap(), LoggedPacket { prefix: "ces/3 ".into(), payload: vec![0x45, 1, 2] });
        assert_eq!(json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
