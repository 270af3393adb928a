//! Host names on the gateway (docs/nft.md, "Host names"): the DNS answers that cross the gateway are held in
//! NFQUEUE until every address they give a name that a rule of the client's tenant names is in that tenant's learned
//! sets, then released. A connection the client opens once it has the answer finds the address in the set: no
//! first-packet drop.
//!
//! The pure parts are `ces-dns` (parsing, CNAME chains, TCP reassembly, the learner). This module is the edge: the
//! queue, the tenant of each answer (the forward chain's tenant classification, reversed:
//! [`crate::AnswerTenants`]), the nf_tables batches, adoption of what the kernel holds after a restart, and the
//! metrics.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ces_dns::cache::{Learner, Limits, Op, Target};
use ces_dns::tcp::Reassembler;
use ces_model::DnsSettings;

use crate::apply::Nft;
use crate::netlink::{Conn, TimedOp, timed_batch};
use crate::nfqueue::{self, NF_ACCEPT, Queue};
use crate::{AnswerTenants, Ruleset};

/// Upper bounds of the hold-time histogram, in microseconds.
pub const HOLD_BUCKETS_US: [u64; 10] = [50, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000, 250_000];

/// What the DNS path did, for `/metrics`.
#[derive(Default)]
pub struct DnsStats {
    /// Queued packets that carried DNS answers, held and released.
    pub answers_held: AtomicU64,
    /// Queued packets released at once: no DNS in them (TCP handshakes, acknowledgements).
    pub passed: AtomicU64,
    pub malformed: AtomicU64,
    /// TCP answer streams that could not be followed (a gap), whose further answers pass unlearned.
    pub tcp_lost: AtomicU64,
    /// Element batches the kernel refused (the answer is released anyway).
    pub kernel_errors: AtomicU64,
    pub hold_buckets: [AtomicU64; HOLD_BUCKETS_US.len() + 1],
    pub hold_sum_us: AtomicU64,
}

impl DnsStats {
    fn hold(&self, us: u64, n: u64) {
        let i = HOLD_BUCKETS_US.iter().position(|b| us <= *b).unwrap_or(HOLD_BUCKETS_US.len());
        self.hold_buckets[i].fetch_add(n, Ordering::Relaxed);
        self.hold_sum_us.fetch_add(us * n, Ordering::Relaxed);
    }
}

/// The gateway's DNS learning: shared by the backend (which applies the table) and the thread holding answers.
pub struct Dns {
    pub learner: Mutex<Learner>,
    tenants: RwLock<(String, AnswerTenants)>,
    /// The queue to hold answers in, and whether to fail open: `None` while the policy names no host.
    queue: Mutex<Option<(u16, bool)>>,
    /// The queue the holding thread has bound.
    bound: Mutex<Option<(u16, bool)>>,
    bound_changed: std::sync::Condvar,
    adopted: AtomicBool,
    pub stats: DnsStats,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Whether this kernel refreshes a set element's timeout when it is added again (Linux 6.12 and later); older
/// kernels keep the first timeout, so the learner replaces the element instead.
pub fn readd_refreshes() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 12)
}

fn limits(s: &DnsSettings) -> Limits {
    Limits {
        min_ttl: s.min_ttl,
        grace: s.grace,
        max_addresses_per_name: s.max_addresses_per_name as usize,
        max_names: s.max_names as usize,
    }
}

/// One element of a learned set as the kernel lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelElement {
    pub set: String,
    pub ip: IpAddr,
    /// Seconds until it expires.
    pub expires: u64,
    pub comment: String,
}

/// The elements of the learned sets in `nft -j list table` output.
pub fn learned_elements(listing_json: &str) -> Vec<KernelElement> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(listing_json) else { return Vec::new() };
    let mut out = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let set = &item["set"];
        let Some(name) = set["name"].as_str().filter(|n| crate::is_learned_set_name(n)) else { continue };
        for e in set["elem"].as_array().into_iter().flatten() {
            // An element with attributes is `{"elem": {"val": ..., "expires": ..., "comment": ...}}`.
            let inner = &e["elem"];
            let Some(ip) = inner["val"].as_str().and_then(|s| s.parse().ok()) else { continue };
            out.push(KernelElement {
                set: name.to_string(),
                ip,
                expires: inner["expires"].as_u64().unwrap_or(0),
                comment: inner["comment"].as_str().unwrap_or("").to_string(),
            });
        }
    }
    out
}

fn to_timed(ops: Vec<Op>) -> Vec<TimedOp> {
    ops.into_iter()
        .map(|o| match o {
            Op::Put { set, ip, timeout_ms, comment, replace } => TimedOp::Put { set, ip, timeout_ms, comment, replace },
            Op::Delete { set, ip } => TimedOp::Delete { set, ip },
        })
        .collect()
}

/// Sends timed element changes; if the kernel refuses the batch (an element to delete was gone already, a set that
/// a concurrent replace removed), the additions alone are tried once more.
fn send_ops(conn: &mut Conn, table: &str, ops: &[TimedOp], seq: &mut u32) -> std::io::Result<()> {
    if ops.is_empty() {
        return Ok(());
    }
    *seq = seq.wrapping_add(1000);
    let (bytes, seqs) = timed_batch(table, ops, *seq);
    match conn.send(&bytes, seqs) {
        Ok(()) => Ok(()),
        Err(first) => {
            let adds: Vec<TimedOp> = ops
                .iter()
                .filter_map(|o| match o {
                    TimedOp::Put { set, ip, timeout_ms, comment, .. } => Some(TimedOp::Put {
                        set: set.clone(),
                        ip: *ip,
                        timeout_ms: *timeout_ms,
                        comment: comment.clone(),
                        replace: false,
                    }),
                    TimedOp::Delete { .. } => None,
                })
                .collect();
            *seq = seq.wrapping_add(1000);
            let (bytes, seqs) = timed_batch(table, &adds, *seq);
            conn.send(&bytes, seqs).map_err(|_| first)
        }
    }
}

/// Answers wait while this thread waits for a CPU: it asks for a real-time class (`SCHED_FIFO`, low priority, so
/// that it runs as soon as an answer arrives; it only ever blocks in `recv`), or failing that (no CAP_SYS_NICE) a
/// higher nice level. Says what it got.
fn raise_priority() -> &'static str {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: sched_setscheduler on this thread (0) with a valid parameter.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
        return "with real-time priority (SCHED_FIFO 10)";
    }
    // SAFETY: setpriority on this thread's id.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, -10) } == 0 {
        return "at nice -10";
    }
    "at normal priority (no CAP_SYS_NICE)"
}

impl Dns {
    pub fn new(settings: &DnsSettings) -> Arc<Dns> {
        Arc::new(Dns {
            learner: Mutex::new(Learner::new(limits(settings), readd_refreshes())),
            tenants: RwLock::new((String::new(), AnswerTenants::default())),
            queue: Mutex::new(None),
            bound: Mutex::new(None),
            bound_changed: std::sync::Condvar::new(),
            adopted: AtomicBool::new(false),
            stats: DnsStats::default(),
        })
    }

    /// Asks the holding thread for the queue `rs` holds answers in, and waits (up to a second) until it has bound
    /// it: called before the table or the hook that sends answers to the queue goes in, so that answers are not
    /// passed (or, without bypass, dropped) while nobody holds the queue.
    pub fn want_queue(&self, rs: &Ruleset, settings: &DnsSettings) {
        let want = rs.dns_queue.map(|q| (q.num, settings.pass_when_agent_down));
        *self.queue.lock().unwrap_or_else(|p| p.into_inner()) = want;
        let bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self
            .bound_changed
            .wait_timeout_while(bound, Duration::from_secs(1), |b| want.is_some() && *b != want)
            .unwrap_or_else(|p| p.into_inner());
    }

    fn set_bound(&self, q: Option<(u16, bool)>) {
        *self.bound.lock().unwrap_or_else(|p| p.into_inner()) = q;
        self.bound_changed.notify_all();
    }

    /// The table `rs` is in the kernel now: its learned sets are the learner's targets. The first time, what the
    /// kernel's learned sets already hold (a previous agent's answers) is adopted. Sends the element changes.
    pub fn applied(&self, rs: &Ruleset, settings: &DnsSettings, nft: &Nft) -> Result<(), String> {
        *self.tenants.write().unwrap_or_else(|p| p.into_inner()) = (rs.table.clone(), rs.answer_tenants.clone());
        *self.queue.lock().unwrap_or_else(|p| p.into_inner()) =
            rs.dns_queue.map(|q| (q.num, settings.pass_when_agent_down));
        let targets: Vec<Target> = rs
            .learned
            .iter()
            .map(|(set, l)| Target { set: set.clone(), tenant: l.tenant.clone(), v6: l.v6, names: l.names.clone() })
            .collect();
        let now = now_ms();
        let mut learner = self.learner.lock().unwrap_or_else(|p| p.into_inner());
        if learner.limits() != limits(settings) {
            *learner = Learner::new(limits(settings), readd_refreshes());
            self.adopted.store(false, Ordering::Relaxed);
        }
        if !self.adopted.swap(true, Ordering::Relaxed) && !rs.learned.is_empty() {
            let listing = nft.list_table_json(&rs.table).map_err(|e| e.to_string())?.unwrap_or_default();
            let mut by_set: HashMap<String, Vec<(IpAddr, u64, String)>> = HashMap::new();
            for e in learned_elements(&listing) {
                by_set.entry(e.set).or_default().push((e.ip, e.expires * 1000, e.comment));
            }
            for (set, elements) in by_set {
                learner.adopt(&set, &elements, now);
            }
        }
        let ops = to_timed(learner.retarget(targets, now));
        if ops.is_empty() {
            return Ok(());
        }
        let mut conn = Conn::open(nft.netns.as_deref()).map_err(|e| e.to_string())?;
        let mut seq = 0;
        send_ops(&mut conn, &rs.table, &ops, &mut seq).map_err(|e| format!("learned host-name addresses: {e}"))
    }

    /// Holds DNS answers until `stop`: binds the queue the applied table names (and binds again when it changes),
    /// learns from each batch of answers, writes the set elements, then releases the answers. Runs in the calling
    /// thread's network namespace, or in the named one.
    pub fn run(self: &Arc<Self>, netns: Option<&str>, stop: &AtomicBool) -> Result<(), String> {
        if let Some(ns) = netns {
            let path = format!("/run/netns/{ns}");
            let f = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            // SAFETY: setns(2) on a namespace fd changes only this thread's network namespace.
            if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns {ns}: {}", std::io::Error::last_os_error()));
            }
        }
        let priority = raise_priority();
        eprintln!("ces gateway: the thread holding DNS answers runs {priority}");
        let mut conn = Conn::open(None).map_err(|e| e.to_string())?;
        let mut reassembler = Reassembler::new(4096);
        let mut bound: Option<((u16, bool), Queue)> = None;
        let mut names: HashMap<u32, String> = HashMap::new();
        let mut seq = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let wanted = *self.queue.lock().unwrap_or_else(|p| p.into_inner());
            let Some(wanted) = wanted else {
                if bound.take().is_some() {
                    self.set_bound(None);
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            if bound.as_ref().is_none_or(|(q, _)| *q != wanted) {
                bound = None;
                self.set_bound(None);
                match Queue::bind(wanted.0, wanted.1, 4096) {
                    Ok(q) => {
                        bound = Some((wanted, q));
                        self.set_bound(Some(wanted));
                    }
                    Err(e) => {
                        eprintln!("ces gateway: cannot hold DNS answers in queue {}: {e}; retrying", wanted.0);
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                }
            }
            let (_, queue) = bound.as_mut().expect("bound above");
            let packets = match queue.recv(256) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("ces gateway: reading the DNS queue: {e}");
                    bound = None;
                    self.set_bound(None);
                    continue;
                }
            };
            if packets.is_empty() {
                continue;
            }
            let start = Instant::now();
            let verdicts: Vec<(u32, u32)> = packets.iter().map(|p| (p.id, NF_ACCEPT)).collect();
            let held = self.learn(&packets, &mut reassembler, &mut names, &mut conn, &mut seq);
            let result = queue.verdicts(&verdicts);
            let us = start.elapsed().as_micros() as u64;
            self.stats.answers_held.fetch_add(held, Ordering::Relaxed);
            self.stats.passed.fetch_add(packets.len() as u64 - held, Ordering::Relaxed);
            self.stats.hold(us, held);
            if let Err(e) = result {
                eprintln!("ces gateway: releasing DNS answers: {e}");
                bound = None;
                self.set_bound(None);
            }
        }
        Ok(())
    }

    /// Learns from a batch of queued packets and writes the kernel changes; returns how many carried DNS answers.
    fn learn(
        &self,
        packets: &[nfqueue::Packet],
        reassembler: &mut Reassembler,
        names: &mut HashMap<u32, String>,
        conn: &mut Conn,
        seq: &mut u32,
    ) -> u64 {
        let tenants = self.tenants.read().unwrap_or_else(|p| p.into_inner());
        let (table, tenants) = (&tenants.0, &tenants.1);
        let mut held = 0;
        let mut learned: Vec<(String, Vec<ces_dns::Learned>)> = Vec::new();
        for p in packets {
            let Some(crate::nflog::Header { tuple, l4 }) = crate::nflog::header(&p.payload) else { continue };
            let (src, dst, proto) = (tuple.src, tuple.dst, tuple.proto);
            let t = &p.payload[l4.min(p.payload.len())..];
            let messages: Vec<Vec<u8>> = match proto {
                17 if t.len() >= 8 => vec![t[8..].to_vec()],
                6 if t.len() >= 20 => {
                    let (sport, dport) = (u16::from_be_bytes([t[0], t[1]]), u16::from_be_bytes([t[2], t[3]]));
                    let seqno = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
                    let off = ((t[12] >> 4) as usize) * 4;
                    let flags = t[13];
                    let data = t.get(off..).unwrap_or(&[]);
                    let o = reassembler.segment(
                        (src, sport, dst, dport),
                        seqno,
                        flags & 0x02 != 0,
                        flags & 0x05 != 0,
                        data,
                    );
                    if o.lost {
                        self.stats.tcp_lost.fetch_add(1, Ordering::Relaxed);
                    }
                    o.messages
                }
                _ => Vec::new(),
            };
            if messages.is_empty() {
                continue;
            }
            held += 1;
            let out = p.outdev.and_then(|i| match names.entry(i) {
                std::collections::hash_map::Entry::Occupied(e) => Some(e.get().clone()),
                std::collections::hash_map::Entry::Vacant(e) => Some(e.insert(nfqueue::interface_name(i)?).clone()),
            });
            let Some(tenant) = tenants.tenant(out.as_deref(), dst) else { continue };
            for m in messages {
                match ces_dns::learn_from(&m) {
                    Ok(l) if !l.is_empty() => learned.push((tenant.to_string(), l)),
                    Ok(_) => {}
                    Err(_) => {
                        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if learned.is_empty() {
            return held;
        }
        let now = now_ms();
        let mut learner = self.learner.lock().unwrap_or_else(|p| p.into_inner());
        let ops: Vec<Op> = learned.iter().flat_map(|(t, l)| learner.observe(t, l, now)).collect();
        if let Err(e) = send_ops(conn, table, &to_timed(ops), seq) {
            self.stats.kernel_errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("ces gateway: writing learned addresses: {e}");
        }
        held
    }

    /// The name `tenant`'s clients resolved `ip` from (one of them, when several), for flow records.
    pub fn name_of(&self, tenant: &str, ip: IpAddr) -> Option<String> {
        self.learner.lock().unwrap_or_else(|p| p.into_inner()).names_of(tenant, ip).into_iter().next()
    }

    /// Prometheus text lines.
    pub fn metrics(&self, component: &str) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (names, addrs, elements, learned, evicted) = {
            let l = self.learner.lock().unwrap_or_else(|p| p.into_inner());
            let (n, a, e) = l.sizes();
            (n, a, e, l.stats.learned, l.stats.evicted)
        };
        let c = format!("component=\"{component}\"");
        let mut s = format!(
            "# HELP ces_dns_answers_held_total DNS answers held until their addresses were in the learned sets.\n# TYPE ces_dns_answers_held_total counter\nces_dns_answers_held_total{{{c}}} {}\n\
             # HELP ces_dns_packets_passed_total Queued packets released at once (no DNS answer in them).\n# TYPE ces_dns_packets_passed_total counter\nces_dns_packets_passed_total{{{c}}} {}\n\
             # HELP ces_dns_malformed_total DNS messages that could not be read; released unchanged, nothing learned.\n# TYPE ces_dns_malformed_total counter\nces_dns_malformed_total{{{c}}} {}\n\
             # HELP ces_dns_tcp_streams_lost_total DNS-over-TCP streams that could not be followed (their later answers pass unlearned).\n# TYPE ces_dns_tcp_streams_lost_total counter\nces_dns_tcp_streams_lost_total{{{c}}} {}\n\
             # HELP ces_dns_kernel_errors_total Learned-address batches the kernel refused.\n# TYPE ces_dns_kernel_errors_total counter\nces_dns_kernel_errors_total{{{c}}} {}\n\
             # HELP ces_dns_addresses_learned_total Name and address pairs learned.\n# TYPE ces_dns_addresses_learned_total counter\nces_dns_addresses_learned_total{{{c}}} {learned}\n\
             # HELP ces_dns_addresses_evicted_total Name and address pairs dropped to stay within gateway.dns limits.\n# TYPE ces_dns_addresses_evicted_total counter\nces_dns_addresses_evicted_total{{{c}}} {evicted}\n\
             # HELP ces_dns_names Names held.\n# TYPE ces_dns_names gauge\nces_dns_names{{{c}}} {names}\n\
             # HELP ces_dns_addresses Name and address pairs held.\n# TYPE ces_dns_addresses gauge\nces_dns_addresses{{{c}}} {addrs}\n\
             # HELP ces_dns_set_elements Elements of the learned sets.\n# TYPE ces_dns_set_elements gauge\nces_dns_set_elements{{{c}}} {elements}\n\
             # HELP ces_dns_queue_bound Whether this agent holds the DNS queue the table sends answers to.\n# TYPE ces_dns_queue_bound gauge\nces_dns_queue_bound{{{c}}} {}\n\
             # HELP ces_dns_hold_seconds How long answers were held.\n# TYPE ces_dns_hold_seconds histogram\n",
            g(&self.stats.answers_held),
            g(&self.stats.passed),
            g(&self.stats.malformed),
            g(&self.stats.tcp_lost),
            g(&self.stats.kernel_errors),
            u8::from(self.bound.lock().unwrap_or_else(|p| p.into_inner()).is_some()),
        );
        let mut cumulative = 0;
        for (i, b) in HOLD_BUCKETS_US.iter().enumerate() {
            cumulative += g(&self.stats.hold_buckets[i]);
            s += &format!("ces_dns_hold_seconds_bucket{{{c},le=\"{}\"}} {cumulative}\n", *b as f64 / 1e6);
        }
        cumulative += g(&self.stats.hold_buckets[HOLD_BUCKETS_US.len()]);
        s += &format!("ces_dns_hold_seconds_bucket{{{c},le=\"+Inf\"}} {cumulative}\n");
        s += &format!("ces_dns_hold_seconds_sum{{{c}}} {}\n", g(&self.stats.hold_sum_us) as f64 / 1e6);
        s += &format!("ces_dns_hold_seconds_count{{{c}}} {cumulative}\n");
        if let Some((num, _)) = *self.queue.lock().unwrap_or_else(|p| p.into_inner())
            && let Some((_, full, user)) = nfqueue::counters(num)
        {
            s += &format!(
                "# HELP ces_dns_queue_dropped_total Answers the kernel could not queue (queue or socket full).\n# TYPE ces_dns_queue_dropped_total counter\nces_dns_queue_dropped_total{{{c}}} {}\n",
                full + user
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_learned_elements_are_read_back() {
        let json = r#"{"nftables": [{"metainfo": {}}, {"set": {"family": "inet", "name": "n0123456789abcdef_v4", "table": "ces", "type": "ipv4_addr", "flags": ["timeout"], "elem": [{"elem": {"val": "192.0.2.1", "timeout": 90, "expires": 61, "comment": "payments api.stripe.com"}}, "192.0.2.9"]}}, {"set": {"name": "s0_v4", "elem": [{"elem": {"val": "10.0.0.1", "expires": 5}}]}}]}"#;
        assert_eq!(
            learned_elements(json),
            [KernelElement {
                set: "n0123456789abcdef_v4".into(),
                ip: "192.0.2.1".parse().unwrap(),
                expires: 61,
                comment: "payments api.stripe.com".into()
            }],
            "only learned sets; an element without attributes has no expiry to adopt"
        );
    }
}
