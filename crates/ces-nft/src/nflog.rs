//! Reading the packets the gateway logs, from the kernel's NFLOG group, over a netlink socket.
//!
//! The ruleset logs with `limit rate N/second log prefix "ces/<tag id> " group G` lines that give no verdict, so a
//! flood can fill the log's rate limit but never slow forwarding. Each prefix names a tag ([`crate::tags`]); the
//! agent's flow pipeline turns a packet and its tag into a flow record. The group is bound with per-instance
//! sequence numbers, so that packets the kernel could not hand over (a full socket) show as gaps, counted.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;

use ces_flow::attribute::Tuple;

use crate::nl::{self, attr};

const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_TIMEOUT: u16 = 3;
const NFULA_CFG_FLAGS: u16 = 6;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULNL_CFG_F_SEQ: u16 = 1;
const NFULA_TIMESTAMP: u16 = 3;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NFULA_SEQ: u16 = 13;

/// One logged packet: its prefix, the packet from its network header on, the group's sequence number, and the
/// kernel's timestamp when the packet had one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoggedPacket {
    pub prefix: String,
    pub payload: Vec<u8>,
    pub seq: Option<u32>,
    pub time: Option<jiff::Timestamp>,
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
    let mut p = LoggedPacket::default();
    while a + 4 <= body.len() {
        let len = u16::from_ne_bytes(body[a..a + 2].try_into().ok()?) as usize;
        let ty = u16::from_ne_bytes(body[a + 2..a + 4].try_into().ok()?) & 0x7fff;
        if len < 4 || a + len > body.len() {
            break;
        }
        let data = &body[a + 4..a + len];
        match ty {
            NFULA_PREFIX => p.prefix = String::from_utf8_lossy(data).trim_end_matches('\0').to_string(),
            NFULA_PAYLOAD => p.payload = data.to_vec(),
            NFULA_SEQ if data.len() >= 4 => p.seq = Some(u32::from_be_bytes([data[0], data[1], data[2], data[3]])),
            NFULA_TIMESTAMP if data.len() >= 16 => {
                let sec = u64::from_be_bytes(data[0..8].try_into().ok()?);
                let usec = u64::from_be_bytes(data[8..16].try_into().ok()?);
                // A hostile or broken timestamp is no time, never an overflow.
                let micros = sec.checked_mul(1_000_000).and_then(|m| m.checked_add(usec));
                p.time =
                    micros.and_then(|m| i64::try_from(m).ok()).and_then(|m| jiff::Timestamp::from_microsecond(m).ok());
            }
            _ => {}
        }
        a += len.div_ceil(4) * 4;
    }
    Some(p)
}

impl NflogSocket {
    /// Binds NFLOG group `group` in this network namespace (needs CAP_NET_ADMIN).
    pub fn bind(group: u16) -> io::Result<NflogSocket> {
        let s = NflogSocket { fd: nl::socket()? };
        let mut mode = 0xffffu32.to_be_bytes().to_vec();
        mode.extend_from_slice(&[NFULNL_COPY_PACKET, 0]);
        s.request(&config_message(group, &[attr(NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND])], 1))?;
        s.request(&config_message(group, &[attr(NFULA_CFG_MODE, &mode)], 2))?;
        // Sequence numbers, to see what was lost; a flush every 10 ms (not the default second), so records are
        // fresh.
        s.request(&config_message(group, &[attr(NFULA_CFG_FLAGS, &NFULNL_CFG_F_SEQ.to_be_bytes())], 3))?;
        s.request(&config_message(group, &[attr(NFULA_CFG_TIMEOUT, &1u32.to_be_bytes())], 4))?;
        let size: libc::c_int = 8 << 20;
        // SAFETY: setsockopt with a c_int value of the right size.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s.fd),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
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

    /// The next datagram as the kernel sent it (empty after the receive timeout, 200 ms, so callers can check for
    /// stop). `ENOBUFS` comes back as an error (the socket overflowed: packets were lost, and the sequence numbers
    /// show how many).
    pub fn recv_datagram<'b>(&self, buf: &'b mut [u8]) -> io::Result<&'b [u8]> {
        match nl::recv(&self.fd, buf) {
            Ok(n) => Ok(&buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Ok(&buf[..0]),
            Err(e) => Err(e),
        }
    }

    /// The packets of the next datagram (see `recv_datagram`).
    pub fn recv(&self) -> io::Result<Vec<LoggedPacket>> {
        let mut buf = vec![0u8; 65536];
        Ok(packets(self.recv_datagram(&mut buf)?))
    }
}

/// The logged packets of one datagram from an NFLOG socket.
pub fn packets(datagram: &[u8]) -> Vec<LoggedPacket> {
    nl::messages(datagram)
        .into_iter()
        .filter(|m| m.ty == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET)
        .filter_map(|m| packet(m.payload))
        .collect()
}

/// A packet's flow and where its transport header starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub tuple: Tuple,
    /// Offset of the transport header.
    pub l4: usize,
}

/// The addresses, protocol, ports and transport header offset of an IPv4 or IPv6 packet (IPv6 without extension
/// headers).
pub fn header(p: &[u8]) -> Option<Header> {
    let (src, dst, proto, l4) = match p.first()? >> 4 {
        4 if p.len() >= 20 => {
            let ihl = ((p[0] & 15) as usize) * 4;
            let s: [u8; 4] = p[12..16].try_into().ok()?;
            let d: [u8; 4] = p[16..20].try_into().ok()?;
            if ihl < 20 {
                return None;
            }
            (IpAddr::V4(Ipv4Addr::from(s)), IpAddr::V4(Ipv4Addr::from(d)), p[9], ihl)
        }
        6 if p.len() >= 40 => {
            let s: [u8; 16] = p[8..24].try_into().ok()?;
            let d: [u8; 16] = p[24..40].try_into().ok()?;
            (IpAddr::V6(Ipv6Addr::from(s)), IpAddr::V6(Ipv6Addr::from(d)), p[6], 40)
        }
        _ => return None,
    };
    let ports = matches!(proto, 6 | 17) && p.len() >= l4 + 4;
    let sport = ports.then(|| u16::from_be_bytes([p[l4], p[l4 + 1]]));
    let dport = ports.then(|| u16::from_be_bytes([p[l4 + 2], p[l4 + 3]]));
    Some(Header { tuple: Tuple { src, dst, proto, sport, dport }, l4 })
}

/// For an ICMP or ICMPv6 error (destination unreachable, time exceeded, ...), the flow of the packet it is about
/// (from its quoted header), as that packet was sent.
pub fn icmp_error_about(p: &[u8]) -> Option<Tuple> {
    let h = header(p)?;
    let ty = *p.get(h.l4)?;
    let error = match h.tuple.proto {
        1 => matches!(ty, 3 | 11 | 12),
        58 => matches!(ty, 1..=4),
        _ => false,
    };
    if !error {
        return None;
    }
    header(p.get(h.l4 + 8..)?).map(|inner| inner.tuple)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timestamp_past_every_clock_is_no_time_and_no_panic() {
        // Found by `cargo fuzz` (scripts/fuzz.sh, nflog): seconds that overflow when turned into microseconds.
        let crash = include_bytes!("fuzz-nflog-timestamp-overflow.bin");
        let _ = packets(crash);
        let mut body = vec![0u8; 4];
        body.extend_from_slice(&attr(NFULA_TIMESTAMP, &[[0xff; 8], [0; 8]].concat()));
        body.extend_from_slice(&attr(NFULA_PREFIX, b"ces/7 \0"));
        let p = packet(&body).unwrap();
        assert_eq!((p.time, p.prefix.as_str()), (None, "ces/7 "));
        let mut ok = vec![0u8; 4];
        ok.extend_from_slice(&attr(NFULA_TIMESTAMP, &[1_700_000_000u64.to_be_bytes(), 5u64.to_be_bytes()].concat()));
        assert_eq!(packet(&ok).unwrap().time.map(|t| t.as_microsecond()), Some(1_700_000_000_000_005));
    }

    #[test]
    fn ip_headers_parse() {
        // IPv4 TCP 10.0.0.1 -> 10.0.0.2:443.
        let mut v4 = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
        v4.extend_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
        let t = header(&v4).unwrap().tuple;
        assert_eq!(
            (t.src.to_string(), t.dst.to_string(), t.proto, t.sport, t.dport),
            ("10.0.0.1".into(), "10.0.0.2".into(), 6, Some(40000), Some(443))
        );
        // An ICMP port unreachable about that packet.
        let mut icmp = vec![0x45, 0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1];
        icmp.extend_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
        icmp.extend_from_slice(&v4);
        assert_eq!(icmp_error_about(&icmp), Some(t), "the packet the error is about");
        assert_eq!(icmp_error_about(&v4), None, "not ICMP");
        // IPv6 UDP to port 53.
        let mut v6 = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
        v6.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&"2001:db8::5".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0x30, 0x39, 0x00, 0x35]);
        let t = header(&v6).unwrap().tuple;
        assert_eq!(
            (t.src.to_string(), t.dst.to_string(), t.proto, t.dport),
            ("fd00::1".into(), "2001:db8::5".into(), 17, Some(53))
        );
        assert_eq!(header(&[0x45, 0]), None, "truncated");
        assert_eq!(header(&[0x44; 20]), None, "a header length below 20");
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
        body.extend(attr(NFULA_SEQ, &7u32.to_be_bytes()));
        let p = packet(&body).unwrap();
        assert_eq!((p.prefix.as_str(), p.payload.as_slice(), p.seq), ("ces/3 ", &[0x45, 1, 2][..], Some(7)));
    }
}
