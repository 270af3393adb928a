//! Set element updates over netlink (nf_tables), in one atomic batch, without the `nft` process.
//!
//! The `nft` command reads the elements of every interval set of the ruleset before it changes one element (it checks
//! overlaps in user space): on a table of two thousand sets that alone takes 90-100 ms. Pod churn only moves elements
//! between sets whose declarations stay as they are, so the agent sends those changes to the kernel itself, as `nft`
//! would: an interval `a-b` of an interval set is the element `a` and the element `b + 1` flagged as an interval end
//! (no end element when `b` is the family's last address). nf_tables applies a batch whole or not at all.
//!
//! Only what the kernel can take without knowing more is sent this way: intervals that neither start at the
//! family's first address nor end at its last (`nft` adds an end element at address zero to every interval set that
//! does not start there; an interval touching it is left to `nft`). The caller falls back to an `nft` transaction
//! otherwise.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::nl::{self, attr, message, nested};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
/// The type of a comment in an element's user data (libnftnl's `NFTNL_UDATA_SET_ELEM_COMMENT`).
const UDATA_COMMENT: u8 = 0;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFT_JUMP: i32 = -3;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
/// Elements per message: the element list is one attribute, whose length is 16 bits.
const CHUNK: usize = 512;

/// One interval of an interval set or map, with the chain a map element jumps to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Element {
    pub first: IpAddr,
    pub last: IpAddr,
    pub jump: Option<String>,
}

impl Element {
    /// Reads an element as the renderer writes it: `a`, `a-b`, optionally followed by ` : jump CHAIN`.
    pub fn parse(text: &str) -> Option<Element> {
        let (range, jump) = match text.split_once(" : ") {
            None => (text, None),
            Some((r, v)) => (r, Some(v.strip_prefix("jump ")?.to_string())),
        };
        let (first, last) = match range.split_once('-') {
            None => {
                let a: IpAddr = range.parse().ok()?;
                (a, a)
            }
            Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
        };
        (first.is_ipv4() == last.is_ipv4() && first <= last).then_some(Element { first, last, jump })
    }

    /// Whether the kernel form of this interval is exactly its start and end element (see the module's notes).
    pub fn plain(&self) -> bool {
        match (self.first, self.last) {
            (IpAddr::V4(a), IpAddr::V4(b)) => u32::from(a) != 0 && u32::from(b) != u32::MAX,
            (IpAddr::V6(a), IpAddr::V6(b)) => u128::from(a) != 0 && u128::from(b) != u128::MAX,
            _ => false,
        }
    }
}

/// The element changes of one set: removed first, then added.
#[derive(Clone, Debug, Default)]
pub struct SetUpdate {
    pub set: String,
    pub remove: Vec<Element>,
    pub add: Vec<Element>,
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn key_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The address after `ip` (the caller made sure there is one).
fn next(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(a) => IpAddr::V4((u32::from(a) + 1).into()),
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) + 1).into()),
    }
}

/// The kernel elements of one interval: its start (with the map's verdict) and its end.
fn kernel_elements(e: &Element) -> [Vec<u8>; 2] {
    let mut start = vec![nested(NFTA_SET_ELEM_KEY, &[attr(NFTA_DATA_VALUE, &key_bytes(e.first))])];
    if let Some(chain) = &e.jump {
        let verdict = nested(
            NFTA_DATA_VERDICT,
            &[attr(NFTA_VERDICT_CODE, &NFT_JUMP.to_be_bytes()), attr(NFTA_VERDICT_CHAIN, &cstr(chain))],
        );
        start.push(nested(NFTA_SET_ELEM_DATA, &[verdict]));
    }
    let end = [
        nested(NFTA_SET_ELEM_KEY, &[attr(NFTA_DATA_VALUE, &key_bytes(next(e.last)))]),
        attr(NFTA_SET_ELEM_FLAGS, &NFT_SET_ELEM_INTERVAL_END.to_be_bytes()),
    ];
    [nested(NFTA_LIST_ELEM, &start), nested(NFTA_LIST_ELEM, &end)]
}

/// The batch for these updates: every removal before any addition, so that an interval may be replaced by one that
/// overlaps it. Returns the bytes and the sequence numbers that expect an answer.
pub fn batch(table: &str, updates: &[SetUpdate]) -> (Vec<u8>, Vec<u32>) {
    let mut out = message(NFNL_MSG_BATCH_BEGIN, libc::NLM_F_REQUEST as u16, 0, 0, NFNL_SUBSYS_NFTABLES, &[]);
    let mut seqs = Vec::new();
    let mut seq = 1u32;
    let ack = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    for (ty, flags, pick) in [
        (NFT_MSG_DELSETELEM, ack, (|u: &SetUpdate| &u.remove) as fn(&SetUpdate) -> &Vec<Element>),
        (NFT_MSG_NEWSETELEM, ack | libc::NLM_F_CREATE as u16, |u: &SetUpdate| &u.add),
    ] {
        for u in updates {
            for chunk in pick(u).chunks(CHUNK) {
                let elements: Vec<Vec<u8>> = chunk.iter().flat_map(kernel_elements).collect();
                let attrs = [
                    attr(NFTA_SET_ELEM_LIST_TABLE, &cstr(table)),
                    attr(NFTA_SET_ELEM_LIST_SET, &cstr(&u.set)),
                    nested(NFTA_SET_ELEM_LIST_ELEMENTS, &elements),
                ];
                out.extend(message((NFNL_SUBSYS_NFTABLES << 8) | ty, flags, seq, NFPROTO_INET, 0, &attrs));
                seqs.push(seq);
                seq += 1;
            }
        }
    }
    out.extend(message(NFNL_MSG_BATCH_END, libc::NLM_F_REQUEST as u16, seq, 0, NFNL_SUBSYS_NFTABLES, &[]));
    (out, seqs)
}

/// A netfilter netlink socket in the named network namespace (`/run/netns/NAME`), opened from a thread that enters
/// it; the socket stays in that namespace.
fn socket_in(netns: &str) -> io::Result<OwnedFd> {
    let path = format!("/run/netns/{netns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(&path)?;
            // SAFETY: setns(2) on a namespace fd, for this thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            nl::socket()
        })
        .join()
        .map_err(|_| io::Error::other("the netns thread panicked"))?
    })
}

/// A connection to nf_tables that sends batches and waits for every answer. Kept open by the DNS path, which
/// writes a batch per held answer.
pub struct Conn {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl Conn {
    /// `netns`: the named network namespace to program, or this process's.
    pub fn open(netns: Option<&str>) -> io::Result<Conn> {
        let fd = match netns {
            Some(n) => socket_in(n)?,
            None => nl::socket()?,
        };
        nl::set_timeout(&fd, std::time::Duration::from_secs(5))?;
        Ok(Conn { fd, buf: vec![0u8; 1 << 16] })
    }

    /// Sends one batch and waits until the kernel has answered every message that expects an answer: all of it is
    /// applied, or (on the first error) none of it.
    pub fn send(&mut self, bytes: &[u8], seqs: Vec<u32>) -> io::Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        nl::send(&self.fd, bytes)?;
        let mut pending: std::collections::BTreeSet<u32> = seqs.into_iter().collect();
        let mut failure = None;
        while !pending.is_empty() {
            let n = nl::recv(&self.fd, &mut self.buf)?;
            for m in nl::messages(&self.buf[..n]) {
                match m.error() {
                    Some(0) => {
                        pending.remove(&m.seq);
                    }
                    Some(errno) => {
                        // The kernel answers each message of a refused batch: read them all, so that the next batch
                        // does not read this one's answers.
                        pending.remove(&m.seq);
                        let e = io::Error::from_raw_os_error(-errno);
                        failure.get_or_insert(io::Error::new(
                            e.kind(),
                            format!("nf_tables refused the element batch: {e}"),
                        ));
                    }
                    None => {}
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

/// Sends the updates as one batch and waits for the kernel's answer to each message. `netns`: the named network
/// namespace to program, or this process's.
pub fn apply(netns: Option<&str>, table: &str, updates: &[SetUpdate]) -> io::Result<()> {
    let (bytes, seqs) = batch(table, updates);
    if seqs.is_empty() {
        return Ok(());
    }
    Conn::open(netns)?.send(&bytes, seqs)
}

/// One change to a set of single addresses with timeouts (the learned sets of host names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TimedOp {
    /// Add with this timeout and comment; with `replace`, delete it first in the same batch.
    Put {
        set: String,
        ip: IpAddr,
        timeout_ms: u64,
        comment: String,
        replace: bool,
    },
    Delete {
        set: String,
        ip: IpAddr,
    },
}

/// An element's user data holding its comment (as nft writes it: type, length with the NUL, text, NUL).
fn comment_udata(comment: &str) -> Vec<u8> {
    let text: Vec<u8> = comment.bytes().filter(|b| *b != 0).take(127).collect();
    let mut v = vec![UDATA_COMMENT, text.len() as u8 + 1];
    v.extend_from_slice(&text);
    v.push(0);
    v
}

/// The batch for timed element changes: every deletion (plain, and of elements being replaced) before any addition.
/// Returns the bytes and the sequence numbers that expect an answer; `first_seq` numbers the messages.
pub fn timed_batch(table: &str, ops: &[TimedOp], first_seq: u32) -> (Vec<u8>, Vec<u32>) {
    let mut deletes: std::collections::BTreeMap<&str, Vec<Vec<u8>>> = Default::default();
    let mut adds: std::collections::BTreeMap<&str, Vec<Vec<u8>>> = Default::default();
    for op in ops {
        match op {
            TimedOp::Delete { set, ip } | TimedOp::Put { set, ip, replace: true, .. } => {
                let key = nested(NFTA_SET_ELEM_KEY, &[attr(NFTA_DATA_VALUE, &key_bytes(*ip))]);
                deletes.entry(set).or_default().push(nested(NFTA_LIST_ELEM, &[key]));
            }
            TimedOp::Put { .. } => {}
        }
        if let TimedOp::Put { set, ip, timeout_ms, comment, .. } = op {
            let parts = [
                nested(NFTA_SET_ELEM_KEY, &[attr(NFTA_DATA_VALUE, &key_bytes(*ip))]),
                attr(NFTA_SET_ELEM_TIMEOUT, &(*timeout_ms).max(1).to_be_bytes()),
                attr(NFTA_SET_ELEM_USERDATA, &comment_udata(comment)),
            ];
            adds.entry(set).or_default().push(nested(NFTA_LIST_ELEM, &parts));
        }
    }
    let mut out = message(NFNL_MSG_BATCH_BEGIN, libc::NLM_F_REQUEST as u16, first_seq, 0, NFNL_SUBSYS_NFTABLES, &[]);
    let mut seqs = Vec::new();
    let mut seq = first_seq + 1;
    let ack = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    for (ty, flags, groups) in
        [(NFT_MSG_DELSETELEM, ack, &deletes), (NFT_MSG_NEWSETELEM, ack | libc::NLM_F_CREATE as u16, &adds)]
    {
        for (set, elements) in groups {
            for chunk in elements.chunks(CHUNK) {
                let attrs = [
                    attr(NFTA_SET_ELEM_LIST_TABLE, &cstr(table)),
                    attr(NFTA_SET_ELEM_LIST_SET, &cstr(set)),
                    nested(NFTA_SET_ELEM_LIST_ELEMENTS, chunk),
                ];
                out.extend(message((NFNL_SUBSYS_NFTABLES << 8) | ty, flags, seq, NFPROTO_INET, 0, &attrs));
                seqs.push(seq);
                seq += 1;
            }
        }
    }
    out.extend(message(NFNL_MSG_BATCH_END, libc::NLM_F_REQUEST as u16, seq, 0, NFNL_SUBSYS_NFTABLES, &[]));
    (out, seqs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timed_batches_delete_before_adding_and_carry_timeout_and_comment() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let ops = [
            TimedOp::Put {
                set: "a".into(),
                ip,
                timeout_ms: 65_000,
                comment: "payments api.stripe.com".into(),
                replace: true,
            },
            TimedOp::Delete { set: "b".into(), ip },
        ];
        let (bytes, seqs) = timed_batch("ces", &ops, 10);
        assert_eq!(seqs, [11, 12, 13], "deletes of a and b, then the add to a");
        let msgs = nl::messages(&bytes);
        let types: Vec<u16> = msgs.iter().map(|m| m.ty & 0xff).collect();
        assert_eq!(
            types,
            [NFNL_MSG_BATCH_BEGIN, NFT_MSG_DELSETELEM, NFT_MSG_DELSETELEM, NFT_MSG_NEWSETELEM, NFNL_MSG_BATCH_END]
        );
        let add = msgs[3].payload;
        let find = |needle: &[u8]| add.windows(needle.len()).any(|w| w == needle);
        assert!(find(&65_000u64.to_be_bytes()), "the timeout in milliseconds, big-endian");
        assert!(find(b"\x00\x18payments api.stripe.com\x00"), "the comment as nft writes it");
        assert!(find(&[192, 0, 2, 7]));
    }

    #[test]
    fn elements_are_read_as_the_renderer_writes_them() {
        let e = Element::parse("10.0.0.1-10.0.0.9 : jump t3").unwrap();
        assert_eq!(e.first, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(e.last, "10.0.0.9".parse::<IpAddr>().unwrap());
        assert_eq!(e.jump.as_deref(), Some("t3"));
        assert_eq!(Element::parse("fd00::5").unwrap().last, "fd00::5".parse::<IpAddr>().unwrap());
        assert!(Element::parse("10.0.0.9-10.0.0.1").is_none(), "a reversed range");
        assert!(Element::parse("10.0.0.1-fd00::1").is_none(), "mixed families");
        assert!(Element::parse("10.0.0.1 : accept").is_none(), "only jumps are read");
        assert!(Element::parse("10.0.0.1").unwrap().plain());
        assert!(!Element::parse("0.0.0.0-10.0.0.1").unwrap().plain(), "starts at zero");
        assert!(!Element::parse("10.0.0.1-255.255.255.255").unwrap().plain(), "ends at the last address");
    }

    #[test]
    fn an_interval_is_a_start_and_an_end_one_past_it() {
        let e = Element::parse("10.0.0.1-10.0.0.255").unwrap();
        let [start, end] = kernel_elements(&e);
        let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        assert!(find(&start, &[10, 0, 0, 1]));
        assert!(find(&end, &[10, 0, 1, 0]), "the end element is the address after the interval");
        assert!(find(&end, &NFT_SET_ELEM_INTERVAL_END.to_be_bytes()));
        assert!(!find(&start, &NFT_SET_ELEM_INTERVAL_END.to_be_bytes()));
    }

    #[test]
    fn removals_come_before_additions_and_big_updates_are_split() {
        let many: Vec<Element> = (1..=1200u32)
            .map(|i| Element::parse(&std::net::Ipv4Addr::from(0x0a00_0000 + 2 * i).to_string()).unwrap())
            .collect();
        let u = SetUpdate { set: "s1_v4".into(), remove: vec![many[0].clone()], add: many };
        let (bytes, seqs) = batch("ces", &[u]);
        assert_eq!(seqs, [1, 2, 3, 4], "one removal message, then 1200 additions in chunks of {CHUNK}");
        let types: Vec<u16> = {
            let mut off = 0;
            let mut v = Vec::new();
            while off < bytes.len() {
                let len = u32::from_ne_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
                v.push(u16::from_ne_bytes(bytes[off + 4..off + 6].try_into().unwrap()) & 0xff);
                off += len.div_ceil(4) * 4;
            }
            v
        };
        assert_eq!(
            types,
            [
                NFNL_MSG_BATCH_BEGIN,
                NFT_MSG_DELSETELEM,
                NFT_MSG_NEWSETELEM,
                NFT_MSG_NEWSETELEM,
                NFT_MSG_NEWSETELEM,
                NFNL_MSG_BATCH_END
            ]
        );
    }
}
