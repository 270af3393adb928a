//! Netfilter netlink, the little of it the gateway speaks: a bound socket, attributes, messages with their
//! `nfgenmsg` header, and walking the messages of a datagram. Used by [`crate::nflog`] (reading logged packets) and
//! [`crate::netlink`] (set element batches).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const NETLINK_NETFILTER: libc::c_int = 12;
pub const NLMSG_ERROR: u16 = 2;
pub const NLA_F_NESTED: u16 = 0x8000;

/// A netfilter netlink socket in this thread's network namespace, bound (the kernel picks the port id).
pub fn socket() -> io::Result<OwnedFd> {
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
    Ok(fd)
}

/// How long a receive on `fd` waits before it fails with `WouldBlock`.
pub fn set_timeout(fd: &OwnedFd, d: Duration) -> io::Result<()> {
    let tv = libc::timeval { tv_sec: d.as_secs() as libc::time_t, tv_usec: d.subsec_micros() as libc::suseconds_t };
    // SAFETY: tv is a valid timeval for SO_RCVTIMEO.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Sends `bytes` whole to the kernel.
pub fn send(fd: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: bytes is valid for reads of its length.
    let n = unsafe { libc::send(fd.as_raw_fd(), bytes.as_ptr() as *const libc::c_void, bytes.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != bytes.len() {
        return Err(io::Error::other("netlink: a message was sent in part"));
    }
    Ok(())
}

/// Receives one datagram into `buf`; returns its length.
pub fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// One attribute, padded to four bytes.
pub fn attr(t: u16, data: &[u8]) -> Vec<u8> {
    let len = 4 + data.len();
    let mut v = Vec::with_capacity(len.div_ceil(4) * 4);
    v.extend_from_slice(&(len as u16).to_ne_bytes());
    v.extend_from_slice(&t.to_ne_bytes());
    v.extend_from_slice(data);
    v.resize(len.div_ceil(4) * 4, 0);
    v
}

/// A nested attribute holding `parts`.
pub fn nested(t: u16, parts: &[Vec<u8>]) -> Vec<u8> {
    attr(t | NLA_F_NESTED, &parts.concat())
}

/// A message: the netlink header, the `nfgenmsg` header (family, version 0, `res_id` big-endian) and attributes.
pub fn message(ty: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &[Vec<u8>]) -> Vec<u8> {
    let body_len: usize = 4 + attrs.iter().map(Vec::len).sum::<usize>();
    let mut m = Vec::with_capacity(16 + body_len);
    m.extend_from_slice(&((16 + body_len) as u32).to_ne_bytes());
    m.extend_from_slice(&ty.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, 0]);
    m.extend_from_slice(&res_id.to_be_bytes());
    for a in attrs {
        m.extend_from_slice(a);
    }
    m
}

/// One message of a datagram: its type, sequence number and payload (after the 16-byte header).
pub struct Message<'a> {
    pub ty: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

impl Message<'_> {
    /// For an `NLMSG_ERROR` message (an acknowledgement when 0): the error code, negative errno.
    pub fn error(&self) -> Option<i32> {
        (self.ty == NLMSG_ERROR && self.payload.len() >= 4)
            .then(|| i32::from_ne_bytes(self.payload[..4].try_into().expect("4 bytes")))
    }
}

/// Walks the messages of one datagram.
pub fn messages(buf: &[u8]) -> Vec<Message<'_>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
        if len < 16 || off + len > buf.len() {
            break;
        }
        let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes"));
        let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().expect("4 bytes"));
        out.push(Message { ty, seq, payload: &buf[off + 16..off + len] });
        off += len.div_ceil(4) * 4;
    }
    out
}
