//! Connection events from conntrack (ctnetlink): NEW when a connection is confirmed, DESTROY when it ends, with the
//! counters and timestamps the kernel keeps when `nf_conntrack_acct` and `nf_conntrack_timestamp` are on (the
//! agent turns them on in its namespace, with `nf_conntrack_events`). Each event carries the connection's labels,
//! where the gateway's accepting line wrote its tag id ([`crate::tags`]).
//!
//! A socket that cannot keep up gets `ENOBUFS`: events were lost, which the reader counts (the kernel does not say
//! how many).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::nl;

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NFNLGRP_CONNTRACK_NEW: u32 = 1;
const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_MARK: u16 = 8;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_ID: u16 = 12;
const CTA_TIMESTAMP: u16 = 20;
const CTA_LABELS: u16 = 22;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_COUNTERS_PACKETS: u16 = 1;
const CTA_COUNTERS_BYTES: u16 = 2;
const CTA_TIMESTAMP_START: u16 = 1;
const CTA_TIMESTAMP_STOP: u16 = 2;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
/// conntrack's TCP states (`enum tcp_conntrack`).
pub const TCP_SYN_SENT: u8 = 1;
pub const TCP_ESTABLISHED: u8 = 3;
pub const TCP_TIME_WAIT: u8 = 7;
pub const TCP_CLOSE: u8 = 8;
/// `IPS_ASSURED`: traffic was seen both ways (and, for TCP, the handshake completed).
pub const STATUS_ASSURED: u32 = 1 << 2;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtTuple {
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub proto: u8,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtKind {
    New,
    Destroy,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtEvent {
    pub kind: CtKind,
    pub orig: CtTuple,
    pub reply: CtTuple,
    pub status: u32,
    pub mark: u32,
    pub id: u32,
    pub labels: Vec<u8>,
    /// `(packets, bytes)` each way.
    pub counters_orig: (u64, u64),
    pub counters_reply: (u64, u64),
    /// Nanoseconds since the epoch.
    pub start: Option<u64>,
    pub stop: Option<u64>,
    pub tcp_state: Option<u8>,
}

/// The attributes of a netlink attribute area: `(type, data)`.
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((ty, &b[4..len]));
        b = &b[(len.div_ceil(4) * 4).min(b.len())..];
    }
    out
}

fn be16(d: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(d.get(..2)?.try_into().ok()?))
}

fn be32(d: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(d.get(..4)?.try_into().ok()?))
}

fn be64(d: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(d.get(..8)?.try_into().ok()?))
}

fn tuple(d: &[u8]) -> CtTuple {
    let mut t = CtTuple::default();
    for (ty, v) in attrs(d) {
        match ty {
            CTA_TUPLE_IP => {
                for (k, a) in attrs(v) {
                    let ip = match (k, a.len()) {
                        (CTA_IP_V4_SRC | CTA_IP_V4_DST, 4) => IpAddr::from(<[u8; 4]>::try_from(a).expect("4 bytes")),
                        (CTA_IP_V6_SRC | CTA_IP_V6_DST, 16) => IpAddr::from(<[u8; 16]>::try_from(a).expect("16 bytes")),
                        _ => continue,
                    };
                    if matches!(k, CTA_IP_V4_SRC | CTA_IP_V6_SRC) {
                        t.src = Some(ip);
                    } else {
                        t.dst = Some(ip);
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (k, a) in attrs(v) {
                    match k {
                        CTA_PROTO_NUM => t.proto = a.first().copied().unwrap_or(0),
                        CTA_PROTO_SRC_PORT => t.sport = be16(a),
                        CTA_PROTO_DST_PORT => t.dport = be16(a),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    t
}

fn counters(d: &[u8]) -> (u64, u64) {
    let mut c = (0, 0);
    for (k, v) in attrs(d) {
        match k {
            CTA_COUNTERS_PACKETS => c.0 = be64(v).unwrap_or(0),
            CTA_COUNTERS_BYTES => c.1 = be64(v).unwrap_or(0),
            _ => {}
        }
    }
    c
}

/// Parses one ctnetlink message (`ty`: the netlink message type; `payload`: after the netlink header).
pub fn parse(ty: u16, payload: &[u8]) -> Option<CtEvent> {
    if ty >> 8 != NFNL_SUBSYS_CTNETLINK {
        return None;
    }
    let kind = match ty & 0xff {
        IPCTNL_MSG_CT_NEW => CtKind::New,
        IPCTNL_MSG_CT_DELETE => CtKind::Destroy,
        _ => return None,
    };
    let mut e = CtEvent {
        kind,
        orig: CtTuple::default(),
        reply: CtTuple::default(),
        status: 0,
        mark: 0,
        id: 0,
        labels: Vec::new(),
        counters_orig: (0, 0),
        counters_reply: (0, 0),
        start: None,
        stop: None,
        tcp_state: None,
    };
    for (k, v) in attrs(payload.get(4..)?) {
        match k {
            CTA_TUPLE_ORIG => e.orig = tuple(v),
            CTA_TUPLE_REPLY => e.reply = tuple(v),
            CTA_STATUS => e.status = be32(v).unwrap_or(0),
            CTA_MARK => e.mark = be32(v).unwrap_or(0),
            CTA_ID => e.id = be32(v).unwrap_or(0),
            CTA_LABELS => e.labels = v.to_vec(),
            CTA_COUNTERS_ORIG => e.counters_orig = counters(v),
            CTA_COUNTERS_REPLY => e.counters_reply = counters(v),
            CTA_TIMESTAMP => {
                for (t, x) in attrs(v) {
                    match t {
                        CTA_TIMESTAMP_START => e.start = be64(x),
                        CTA_TIMESTAMP_STOP => e.stop = be64(x),
                        _ => {}
                    }
                }
            }
            CTA_PROTOINFO => {
                for (p, x) in attrs(v) {
                    if p == CTA_PROTOINFO_TCP {
                        for (t, y) in attrs(x) {
                            if t == CTA_PROTOINFO_TCP_STATE {
                                e.tcp_state = y.first().copied();
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    e.orig.src?;
    Some(e)
}

/// A ctnetlink socket subscribed to NEW and DESTROY events in this thread's network namespace.
pub struct EventSocket {
    fd: OwnedFd,
    buf: Vec<u8>,
}

/// What a receive gave.
pub enum Received {
    Events(Vec<CtEvent>),
    /// The socket overflowed: events were lost.
    Overrun,
}

impl EventSocket {
    /// Subscribes (needs CAP_NET_ADMIN), with a large receive buffer.
    pub fn open() -> io::Result<EventSocket> {
        let fd = nl::socket()?;
        for group in [NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY] {
            // SAFETY: setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP) with a u32 group number.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_NETLINK,
                    libc::NETLINK_ADD_MEMBERSHIP,
                    &group as *const u32 as *const libc::c_void,
                    std::mem::size_of::<u32>() as u32,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let size: libc::c_int = 16 << 20;
        // SAFETY: setsockopt with a c_int value of the right size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
        nl::set_timeout(&fd, std::time::Duration::from_millis(200))?;
        Ok(EventSocket { fd, buf: vec![0u8; 1 << 17] })
    }

    /// The next datagram as the kernel sent it (empty after 200 ms, so callers can check for stop); `Ok(None)`: the
    /// socket overflowed and events were lost.
    pub fn recv_datagram(&mut self) -> io::Result<Option<&[u8]>> {
        match nl::recv(&self.fd, &mut self.buf) {
            Ok(n) => Ok(Some(&self.buf[..n])),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(None),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                Ok(Some(&self.buf[..0]))
            }
            Err(e) => Err(e),
        }
    }

    /// The events of the next datagram (none after 200 ms, so callers can check for stop).
    pub fn recv(&mut self) -> io::Result<Received> {
        Ok(match self.recv_datagram()? {
            Some(d) => Received::Events(events(d)),
            None => Received::Overrun,
        })
    }
}

/// The events of one datagram from a conntrack event socket.
pub fn events(datagram: &[u8]) -> Vec<CtEvent> {
    nl::messages(datagram).into_iter().filter_map(|m| parse(m.ty, m.payload)).collect()
}

/// Every tracked connection of this thread's network namespace now (a dump: each as a NEW event), so that a reader
/// that starts late knows the labels of connections older than itself.
pub fn dump() -> io::Result<Vec<CtEvent>> {
    let fd = nl::socket()?;
    nl::set_timeout(&fd, std::time::Duration::from_secs(5))?;
    let mut out = Vec::new();
    for (seq, family) in [(1u32, libc::AF_INET as u8), (2, libc::AF_INET6 as u8)] {
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        let msg = nl::message((NFNL_SUBSYS_CTNETLINK << 8) | 1, flags, seq, family, 0, &[]);
        nl::send(&fd, &msg)?;
        let mut buf = vec![0u8; 1 << 16];
        'reading: loop {
            let n = nl::recv(&fd, &mut buf)?;
            for m in nl::messages(&buf[..n]) {
                if m.ty == libc::NLMSG_DONE as u16 {
                    break 'reading;
                }
                if let Some(code) = m.error().filter(|c| *c != 0) {
                    return Err(io::Error::from_raw_os_error(-code));
                }
                // A dump answers IPCTNL_MSG_CT_NEW messages.
                if let Some(mut e) = parse(m.ty, m.payload) {
                    e.kind = CtKind::New;
                    out.push(e);
                }
            }
        }
    }
    Ok(out)
}

/// Ends every tracked connection in this thread's network namespace (as `conntrack -F`): each gives its DESTROY
/// event, with its counters, now.
pub fn flush() -> io::Result<()> {
    let fd = nl::socket()?;
    nl::set_timeout(&fd, std::time::Duration::from_secs(5))?;
    for (seq, family) in [(1u32, libc::AF_INET as u8), (2, libc::AF_INET6 as u8)] {
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        let msg = nl::message((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE, flags, seq, family, 0, &[]);
        nl::send(&fd, &msg)?;
        let mut buf = vec![0u8; 8192];
        let n = nl::recv(&fd, &mut buf)?;
        for m in nl::messages(&buf[..n]) {
            if let Some(code) = m.error().filter(|c| *c != 0) {
                return Err(io::Error::from_raw_os_error(-code));
            }
        }
    }
    Ok(())
}

/// Turns on what events need in this network namespace: accounting, timestamps, and events for every connection.
pub fn enable_accounting() -> io::Result<()> {
    for (k, v) in [("nf_conntrack_acct", "1"), ("nf_conntrack_timestamp", "1"), ("nf_conntrack_events", "1")] {
        let path = format!("/proc/sys/net/netfilter/{k}");
        std::fs::write(&path, v).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nl::{attr, nested};

    #[test]
    fn a_destroy_event_reads_back() {
        let ip = |t: u16, a: [u8; 4]| attr(t, &a);
        let orig = nested(
            CTA_TUPLE_ORIG,
            &[
                nested(CTA_TUPLE_IP, &[ip(CTA_IP_V4_SRC, [10, 10, 0, 11]), ip(CTA_IP_V4_DST, [198, 51, 100, 7])]),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        attr(CTA_PROTO_NUM, &[6]),
                        attr(CTA_PROTO_SRC_PORT, &40000u16.to_be_bytes()),
                        attr(CTA_PROTO_DST_PORT, &443u16.to_be_bytes()),
                    ],
                ),
            ],
        );
        let counters = nested(
            CTA_COUNTERS_REPLY,
            &[attr(CTA_COUNTERS_PACKETS, &3u64.to_be_bytes()), attr(CTA_COUNTERS_BYTES, &300u64.to_be_bytes())],
        );
        let ts = nested(CTA_TIMESTAMP, &[attr(CTA_TIMESTAMP_START, &5u64.to_be_bytes())]);
        let info =
            nested(CTA_PROTOINFO, &[nested(CTA_PROTOINFO_TCP, &[attr(CTA_PROTOINFO_TCP_STATE, &[TCP_TIME_WAIT])])]);
        let mut labels = vec![0u8; 16];
        labels[8] = 9;
        let mut payload = vec![2, 0, 0, 0];
        for a in [orig, counters, ts, info, attr(CTA_LABELS, &labels), attr(CTA_STATUS, &STATUS_ASSURED.to_be_bytes())]
        {
            payload.extend(a);
        }
        let e = parse((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE, &payload).unwrap();
        assert_eq!(e.kind, CtKind::Destroy);
        assert_eq!(e.orig.dst, Some("198.51.100.7".parse().unwrap()));
        assert_eq!((e.orig.sport, e.orig.dport, e.orig.proto), (Some(40000), Some(443), 6));
        assert_eq!(e.counters_reply, (3, 300));
        assert_eq!((e.start, e.tcp_state, e.status), (Some(5), Some(TCP_TIME_WAIT), STATUS_ASSURED));
        assert_eq!(crate::tags::id_from_labels(&e.labels), if cfg!(target_endian = "little") { 9 } else { 0 });
        assert!(parse((NFNL_SUBSYS_CTNETLINK << 8) | 1, &payload).is_none(), "not an event we read");
        assert!(parse((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE, &payload[..10]).is_none(), "cut short");
    }
}
