//! The gateway's flow sources (docs/flows.md, "From the nftables gateway"): logged packets from NFLOG and
//! connections from conntrack, read in the gateway's network namespace and handed to the flow pipeline as
//! observations, each with the rule its tag id names. Nothing here slows forwarding: the kernel's rate limits and
//! queues stay, and what the kernel could not hand over (NFLOG sequence gaps, socket overruns) is counted.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use ces_flow::attribute::{Observation, RuleInfo, Tuple};
use ces_flow::pipeline::Pipeline;
use ces_flow::record::{Counts, Nat, Origin, Outcome};
use jiff::Timestamp;

use crate::LogTag;
use crate::conntrack::{self, CtEvent, CtKind, Received, STATUS_ASSURED, TCP_CLOSE, TCP_ESTABLISHED, TCP_TIME_WAIT};
use crate::nflog::{self, NflogSocket};
use crate::tags::{TagIds, id_from_labels};

/// What a tag says of its rule.
pub fn rule_info(t: &LogTag) -> RuleInfo {
    RuleInfo {
        tenant: t.tenant.clone(),
        rule: t.rule.clone(),
        context: t.context.as_str().to_string(),
        action: t.action.clone(),
        mode: t.mode.clone(),
        external_service: t.external_service.clone(),
    }
}

/// How a connection ended, from what conntrack says of it at its end.
pub fn outcome(e: &CtEvent) -> Outcome {
    let answered = e.counters_reply.0 > 0;
    match (e.orig.proto, e.tcp_state) {
        (6, _) if !answered => Outcome::NoAnswer,
        (6, Some(TCP_CLOSE)) => Outcome::Reset,
        (6, Some(s)) if (TCP_ESTABLISHED..=TCP_TIME_WAIT).contains(&s) => {
            if e.status & STATUS_ASSURED != 0 || s == TCP_TIME_WAIT { Outcome::Completed } else { Outcome::Reset }
        }
        (6, _) => Outcome::Unknown,
        _ if answered => Outcome::Completed,
        _ => Outcome::NoAnswer,
    }
}

fn time(ns: Option<u64>) -> Timestamp {
    ns.and_then(|n| Timestamp::from_nanosecond(n as i128).ok()).unwrap_or_else(Timestamp::now)
}

/// The tag ids of the connections open now, by conntrack id: the kernel reports a connection's labels when it
/// begins, not when it ends.
#[derive(Default)]
pub struct OpenConnections {
    ids: std::collections::HashMap<u32, u16>,
}

/// Connections remembered at most (beyond, the oldest are not told from the newest: the map is cleared and counted).
const MAX_OPEN: usize = 1 << 20;

impl OpenConnections {
    /// The tag id of the connection of this event: from its labels when it begins, from memory when it ends.
    pub fn id(&mut self, e: &CtEvent) -> u16 {
        match e.kind {
            CtKind::New => {
                let id = id_from_labels(&e.labels);
                if id != 0 {
                    if self.ids.len() >= MAX_OPEN {
                        self.ids.clear();
                    }
                    self.ids.insert(e.id, id);
                }
                id
            }
            CtKind::Destroy => self.ids.remove(&e.id).unwrap_or_else(|| id_from_labels(&e.labels)),
        }
    }
}

/// The observation a conntrack event makes, when a rule of the table decided the connection (`id`, the tag id its
/// label holds); `None` for connections CES did not decide (the gateway's own, or older than its table).
pub fn observation(e: &CtEvent, id: u16, tags: &TagIds) -> Option<Observation> {
    let (tag, _) = tags.get(id).filter(|_| id != 0)?;
    let tuple =
        Tuple { src: e.orig.src?, dst: e.orig.dst?, proto: e.orig.proto, sport: e.orig.sport, dport: e.orig.dport };
    Some(match e.kind {
        // A connection's start is only needed to join the audit hits of its first packet.
        CtKind::New if !tags.audits() => return None,
        CtKind::New => Observation::Opened { tuple, tenant: tag.tenant.clone() },
        CtKind::Destroy => {
            // Source NAT shows in the reply: it goes back to the translated address.
            let nat = match (e.reply.dst, e.orig.src) {
                (Some(r), Some(o)) if r != o || e.reply.dport != e.orig.sport => {
                    Some(Nat { ip: r, port: e.reply.dport })
                }
                _ => None,
            };
            let start = time(e.start);
            Observation::Connection {
                start,
                end: e.stop.map(|s| time(Some(s))).unwrap_or_else(Timestamp::now).max(start),
                tuple,
                rule: Some(rule_info(tag)),
                packets: Counts { out: e.counters_orig.0, back: e.counters_reply.0 },
                bytes: Counts { out: e.counters_orig.1, back: e.counters_reply.1 },
                outcome: outcome(e),
                nat,
            }
        }
    })
}

fn enter(netns: Option<&str>) -> Result<(), String> {
    let Some(ns) = netns else { return Ok(()) };
    let path = format!("/run/netns/{ns}");
    let f = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: setns(2) on a namespace fd changes only this thread's network namespace.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns {ns}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Starts the NFLOG and conntrack readers (in the named network namespace, or this one) until `stop`.
/// `group`: the NFLOG group of the applied table (`u32::MAX` until one is applied).
pub fn start(
    pipeline: Arc<Pipeline>,
    tags: Arc<RwLock<TagIds>>,
    group: Arc<AtomicU32>,
    netns: Option<String>,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut threads = Vec::new();
    let (p, t, ns, st) = (pipeline.clone(), tags.clone(), netns.clone(), stop.clone());
    threads.push(
        std::thread::Builder::new()
            .name("ces-nflog".into())
            .spawn(move || {
                if let Err(e) = enter(ns.as_deref()) {
                    eprintln!("ces gateway: reading NFLOG: {e}");
                    return;
                }
                read_nflog(&p, &t, &group, &st)
            })
            .expect("a thread"),
    );
    let (p, t, st) = (pipeline, tags, stop);
    threads.push(
        std::thread::Builder::new()
            .name("ces-conntrack".into())
            .spawn(move || {
                if let Err(e) = enter(netns.as_deref()) {
                    eprintln!("ces gateway: reading conntrack: {e}");
                    return;
                }
                read_conntrack(&p, &t, &st)
            })
            .expect("a thread"),
    );
    threads
}

fn read_nflog(p: &Pipeline, tags: &RwLock<TagIds>, group: &AtomicU32, stop: &AtomicBool) {
    let mut bound: Option<(u32, NflogSocket)> = None;
    let mut last_seq: Option<u32> = None;
    let mut buf = vec![0u8; 1 << 17];
    while !stop.load(Ordering::Relaxed) {
        let g = group.load(Ordering::Relaxed);
        if g > u16::MAX as u32 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            continue;
        }
        if bound.as_ref().is_none_or(|(b, _)| *b != g) {
            match NflogSocket::bind(g as u16) {
                Ok(s) => {
                    bound = Some((g, s));
                    last_seq = None;
                }
                Err(e) => {
                    eprintln!("ces gateway: cannot read NFLOG group {g}: {e}; retrying");
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    continue;
                }
            }
        }
        let (_, socket) = bound.as_ref().expect("bound above");
        let packets = match socket.recv_datagram(&mut buf) {
            Ok(d) => nflog::packets(d),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                // How many: the sequence numbers will say.
                continue;
            }
            Err(e) => {
                eprintln!("ces gateway: reading NFLOG: {e}");
                bound = None;
                continue;
            }
        };
        let tags = tags.read().unwrap_or_else(|e| e.into_inner());
        nflog_packets(packets, &mut last_seq, &tags, p);
    }
}

/// Hands the packets of one NFLOG datagram to the pipeline: drops, rejects and audit hits with their rules, ICMP
/// errors for the flows they are about; sequence gaps counted as lost.
pub fn nflog_packets(packets: Vec<nflog::LoggedPacket>, last_seq: &mut Option<u32>, tags: &TagIds, p: &Pipeline) {
    let now = Timestamp::now();
    for pkt in packets {
        if let Some(s) = pkt.seq {
            if let Some(l) = *last_seq
                && s > l.wrapping_add(1)
                && s.wrapping_sub(l) < u32::MAX / 2
            {
                p.lost("nflog", "sequence-gap", (s - l - 1) as u64);
            }
            *last_seq = Some(s);
        }
        let Some(id) = pkt.prefix.trim().strip_prefix("ces/").and_then(|n| n.parse::<u16>().ok()) else { continue };
        let time = pkt.time.unwrap_or(now);
        if id == 0 {
            if let Some(about) = nflog::icmp_error_about(&pkt.payload) {
                p.observe("nflog", Observation::IcmpError { time, about });
            }
            continue;
        }
        let Some((tag, _)) = tags.get(id) else {
            p.lost("nflog", "unknown-tag", 1);
            continue;
        };
        let Some(h) = nflog::header(&pkt.payload) else { continue };
        let tuple = h.tuple;
        p.observe("nflog", Observation::Packet { time, tuple, rule: rule_info(tag), origin: Origin::Gateway });
    }
}

/// Hands the events of one conntrack datagram to the pipeline: connections CES decided, as they begin and end.
pub fn conntrack_events(events: Vec<CtEvent>, open: &mut OpenConnections, tags: &TagIds, p: &Pipeline) {
    for e in events {
        let id = open.id(&e);
        if let Some(o) = observation(&e, id, tags) {
            p.observe("conntrack", o);
        }
    }
}

fn read_conntrack(p: &Pipeline, tags: &RwLock<TagIds>, stop: &AtomicBool) {
    if let Err(e) = conntrack::enable_accounting() {
        eprintln!("ces gateway: connection records need conntrack accounting: {e}");
    }
    let mut socket = match conntrack::EventSocket::open() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ces gateway: cannot read conntrack events: {e}; no connection records");
            return;
        }
    };
    // Connections older than this reader: their labels, for their ends.
    let mut open = OpenConnections::default();
    match conntrack::dump() {
        Ok(existing) => {
            for e in &existing {
                open.id(e);
            }
        }
        Err(e) => eprintln!("ces gateway: reading the connections open now: {e}"),
    }
    while !stop.load(Ordering::Relaxed) {
        match socket.recv() {
            Ok(Received::Events(events)) => {
                let tags = tags.read().unwrap_or_else(|e| e.into_inner());
                conntrack_events(events, &mut open, &tags, p);
            }
            Ok(Received::Overrun) => p.lost("conntrack", "socket-overrun", 1),
            Err(e) => {
                eprintln!("ces gateway: reading conntrack events: {e}");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
}
