//! Reading the packets the gateway logs, from the kernel's NFLOG group, over a netlink socket.
//!
//! The ruleset logs with `limit rate N/second log prefix "ces/<tag> " group G` lines that give no verdict, so a
//! flood can fill the log's rate limit but never slow forwarding. Each prefix names a [`crate::LogTag`]; the agent
//! turns a packet and its tag into one JSON line ([`LogEvent`]), naming the pod behind the source address from the
//! model's pods of the tag's tenant (the same address may be another pod in another tenant).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use ces_model::PolicyModel;

use crate::{LogTag, Ruleset};

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NLMSG_ERROR: u16 = 2;

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

fn attr(t: u16, data: &[u8]) -> Vec<u8> {
    let len = 4 + data.len();
    let mut v = Vec::with_capacity(len.div_ceil(4) * 4);
    v.extend_from_slice(&(len as u16).to_ne_bytes());
    v.extend_from_slice(&t.to_ne_bytes());
    v.extend_from_slice(data);
    v.resize(len.div_ceil(4) * 4, 0);
    v
}

fn config_message(group: u16, attrs: &[Vec<u8>], seq: u32) -> Vec<u8> {
    let mut body = vec![libc::AF_UNSPEC as u8, 0];
    body.extend_from_slice(&group.to_be_bytes());
    for a in attrs {
        body.extend_from_slice(a);
    }
    let mut m = Vec::with_capacity(16 + body.len());
    m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG).to_ne_bytes());
    m.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&body);
    m
}

/// Walks the netlink messages of one datagram: `(type, payload after the 16-byte header)`.
fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
        if len < 16 || off + len > buf.len() {
            break;
        }
        let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes"));
        out.push((ty, &buf[off + 16..off + len]));
        off += len.div_ceil(4) * 4;
    }
    out
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
        // SAFETY: plain socket(2); the fd is owned right away.
        let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_NETFILTER) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: a zeroed sockaddr_nl is valid; family set below.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: addr is a valid sockaddr_nl of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let s = NflogSocket { fd };
        let mut mode = 0xffffu32.to_be_bytes().to_vec();
        mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
        s.request(&config_message(group, &[attr(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND])], 1))?;
        s.request(&config_message(group, &[attr(NFULA_CFG_MODE, &mode)], 2))?;
        s.set_timeout(std::time::Duration::from_millis(200))?;
        Ok(s)
    }

    fn set_timeout(&self, d: std::time::Duration) -> io::Result<()> {
        let tv = libc::timeval { tv_sec: d.as_secs() as libc::time_t, tv_usec: d.subsec_micros() as libc::suseconds_t };
        // SAFETY: tv is a valid timeval for SO_RCVTIMEO.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    fn recv_raw(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
    }

    /// Sends a configuration request and waits for its acknowledgement.
    fn request(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: msg is valid for reads of its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr() as *const libc::c_void, msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 8192];
        let n = self.recv_raw(&mut buf)?;
        for (ty, body) in messages(&buf[..n]) {
            if ty == NLMSG_ERROR && body.len() >= 4 {
                let code = i32::from_ne_bytes(body[..4].try_into().expect("4 bytes"));
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
            }
        }
        Ok(())
    }

    /// The packets of the next datagram; empty after the receive timeout (200 ms), so callers can check for stop.
    pub fn recv(&self) -> io::Result<Vec<LoggedPacket>> {
        let mut buf = vec![0u8; 65536];
        match self.recv_raw(&mut buf) {
            Ok(n) => Ok(messages(&buf[..n])
                .into_iter()
                .filter(|(ty, _)| *ty == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET)
                .filter_map(|(_, body)| packet(body))
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
        let parsed = messages(&msg);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].0, (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG);
        assert_eq!(&parsed[0].1[2..4], &7u16.to_be_bytes(), "the group is big-endian in nfgenmsg");
        let mut body = vec![0, 0, 0, 0];
        body.extend(attr(NFULA_PREFIX, b"ces/3 \0"));
        body.extend(attr(NFULA_PAYLOAD, &[0x45, 1, 2]));
        assert_eq!(packet(&body).unwrap(), LoggedPacket { prefix: "ces/3 ".into(), payload: vec![0x45, 1, 2] });
        assert_eq!(json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
