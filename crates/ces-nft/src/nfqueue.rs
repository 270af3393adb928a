//! Holding packets in userspace: an NFQUEUE queue bound over netfilter netlink. The kernel hands each queued packet
//! to the socket and keeps it until a verdict comes back; the gateway holds DNS answers this way until their
//! addresses are in the learned sets (docs/nft.md, "Host names").
//!
//! The queue is bound with `FAIL_OPEN` when answers are to pass while nobody holds them: a full queue then lets
//! packets through unheld instead of dropping them.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use crate::nl::{self, attr};

const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_PACKET: u8 = 2;
const NFQA_CFG_F_FAIL_OPEN: u32 = 1;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_IFINDEX_INDEV: u16 = 5;
const NFQA_IFINDEX_OUTDEV: u16 = 6;
const NFQA_PAYLOAD: u16 = 10;
pub const NF_DROP: u32 = 0;
pub const NF_ACCEPT: u32 = 1;

/// One queued packet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Packet {
    pub id: u32,
    pub indev: Option<u32>,
    pub outdev: Option<u32>,
    /// From the network header on.
    pub payload: Vec<u8>,
}

/// Parses the attributes of a packet message (after its 4-byte nfgenmsg).
fn packet(body: &[u8]) -> Option<Packet> {
    let mut p = Packet::default();
    let mut have_id = false;
    let mut a = 4;
    while a + 4 <= body.len() {
        let len = u16::from_ne_bytes([body[a], body[a + 1]]) as usize;
        let ty = u16::from_ne_bytes([body[a + 2], body[a + 3]]) & 0x7fff;
        if len < 4 || a + len > body.len() {
            break;
        }
        let data = &body[a + 4..a + len];
        let be32 = || data.get(..4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        match ty {
            NFQA_PACKET_HDR => {
                p.id = be32()?;
                have_id = true;
            }
            NFQA_IFINDEX_INDEV => p.indev = be32(),
            NFQA_IFINDEX_OUTDEV => p.outdev = be32(),
            NFQA_PAYLOAD => p.payload = data.to_vec(),
            _ => {}
        }
        a += len.div_ceil(4) * 4;
    }
    have_id.then_some(p)
}

pub struct Queue {
    fd: OwnedFd,
    num: u16,
    buf: Vec<u8>,
}

fn config(num: u16, attrs: &[Vec<u8>], seq: u32) -> Vec<u8> {
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    nl::message((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG, flags, seq, libc::AF_UNSPEC as u8, num, attrs)
}

impl Queue {
    /// Binds queue `num` in this thread's network namespace (needs CAP_NET_ADMIN), copying whole packets; with
    /// `fail_open`, a full queue lets packets pass instead of dropping them. At most `maxlen` packets wait.
    pub fn bind(num: u16, fail_open: bool, maxlen: u32) -> io::Result<Queue> {
        let q = Queue { fd: nl::socket()?, num, buf: vec![0u8; 1 << 17] };
        q.request(&config(num, &[attr(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0])], 1))?;
        let mut params = 0xffffu32.to_be_bytes().to_vec();
        params.push(NFQNL_COPY_PACKET);
        q.request(&config(num, &[attr(NFQA_CFG_PARAMS, &params)], 2))?;
        q.request(&config(num, &[attr(NFQA_CFG_QUEUE_MAXLEN, &maxlen.to_be_bytes())], 3))?;
        let flags = if fail_open { NFQA_CFG_F_FAIL_OPEN } else { 0 };
        q.request(&config(
            num,
            &[attr(NFQA_CFG_MASK, &NFQA_CFG_F_FAIL_OPEN.to_be_bytes()), attr(NFQA_CFG_FLAGS, &flags.to_be_bytes())],
            4,
        ))?;
        // A large receive buffer: a burst of answers waits here, not in drops.
        let size: libc::c_int = 8 << 20;
        // SAFETY: setsockopt with a c_int value of the right size.
        unsafe {
            libc::setsockopt(
                q.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
        nl::set_timeout(&q.fd, Duration::from_millis(200))?;
        Ok(q)
    }

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

    /// The packets waiting: blocks up to 200 ms for the first (then returns none, so callers can check for stop),
    /// then takes what else is already there, up to `max`.
    pub fn recv(&mut self, max: usize) -> io::Result<Vec<Packet>> {
        let mut out = Vec::new();
        let mut flags = 0;
        while out.len() < max {
            // SAFETY: buf is valid for writes of its length.
            let n = unsafe {
                libc::recv(self.fd.as_raw_fd(), self.buf.as_mut_ptr() as *mut libc::c_void, self.buf.len(), flags)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Ok(out),
                    // The socket's buffer overflowed: packets were lost to this reader (the kernel counts them and,
                    // failing open, let them pass). Go on with what comes next.
                    _ if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(out),
                    _ => Err(e),
                };
            }
            for m in nl::messages(&self.buf[..n as usize]) {
                if m.ty == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
                    && let Some(p) = packet(m.payload)
                {
                    out.push(p);
                }
            }
            flags = libc::MSG_DONTWAIT;
        }
        Ok(out)
    }

    /// Gives verdicts (`NF_ACCEPT`, `NF_DROP`) to queued packets, in one send.
    pub fn verdicts(&self, verdicts: &[(u32, u32)]) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(verdicts.len() * 32);
        for &(id, verdict) in verdicts {
            let mut hdr = verdict.to_be_bytes().to_vec();
            hdr.extend_from_slice(&id.to_be_bytes());
            bytes.extend(nl::message(
                (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT,
                libc::NLM_F_REQUEST as u16,
                0,
                libc::AF_UNSPEC as u8,
                self.num,
                &[attr(NFQA_VERDICT_HDR, &hdr)],
            ));
        }
        if bytes.is_empty() { Ok(()) } else { nl::send(&self.fd, &bytes) }
    }
}

/// The name of interface `index` in this network namespace.
pub fn interface_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The kernel's counters of queue `num` in this network namespace (`/proc/net/netfilter/nfnetlink_queue`): packets
/// waiting, dropped because the queue was full, dropped because this reader's socket was.
pub fn counters(num: u16) -> Option<(u64, u64, u64)> {
    let text = std::fs::read_to_string("/proc/net/netfilter/nfnetlink_queue").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<u64> = l.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        (f.len() >= 7 && f[0] == num as u64).then(|| (f[2], f[5], f[6]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_messages_parse() {
        let mut body = vec![0, 0, 0, 53];
        let mut hdr = 77u32.to_be_bytes().to_vec();
        hdr.extend_from_slice(&[0x08, 0x00, 2]);
        body.extend(attr(NFQA_PACKET_HDR, &hdr));
        body.extend(attr(NFQA_IFINDEX_OUTDEV, &9u32.to_be_bytes()));
        body.extend(attr(NFQA_PAYLOAD, &[0x45, 0, 0, 20]));
        let p = packet(&body).unwrap();
        assert_eq!(p, Packet { id: 77, indev: None, outdev: Some(9), payload: vec![0x45, 0, 0, 20] });
        assert_eq!(packet(&[0, 0, 0, 0]), None, "no packet header: no id to give a verdict to");
        // An attribute claiming more than there is ends the walk without reading past the end.
        let mut bad = vec![0, 0, 0, 0];
        bad.extend(attr(NFQA_PACKET_HDR, &hdr));
        bad.extend_from_slice(&[200, 0, 10, 0, 1]);
        assert_eq!(packet(&bad).unwrap().id, 77);
    }
}
