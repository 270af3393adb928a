//! The gateway's learned addresses: which addresses each tenant's resolvers gave each name that a rule of that
//! tenant names, until when, and which kernel set elements that makes.
//!
//! Pure: time comes in as milliseconds since the Unix epoch, and every change comes out as [`Op`]s for the kernel.
//! A kernel set ([`Target`]) belongs to one tenant and holds the addresses of the names its entries match (exact
//! names and wildcards, as in docs/semantics.md); an address stays in it until the latest expiry among those names
//! (`max(TTL, minTTL) + grace`, re-armed by every answer), which the kernel enforces itself through the element's
//! timeout. Each element's comment says its tenant and names, so that a restarted agent can adopt what the kernel
//! holds ([`Learner::adopt`]) instead of starting from nothing.
//!
//! Memory is bounded: a name keeps at most `max_addresses_per_name` addresses and a tenant at most `max_names`
//! names; the least recently seen go first, counted in [`Stats::evicted`]. Only names that some set's entries
//! match are kept at all.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use ces_model::{AddressEntry, Destination};

use crate::answer::Learned;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// TTLs below this count as this (seconds).
    pub min_ttl: u32,
    /// Added to every lifetime (seconds).
    pub grace: u32,
    pub max_addresses_per_name: usize,
    /// Names kept per tenant.
    pub max_names: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { min_ttl: 0, grace: 60, max_addresses_per_name: 256, max_names: 10_000 }
    }
}

/// A kernel set of learned addresses: one tenant, one address family, the host-name entries it answers for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub set: String,
    pub tenant: String,
    pub v6: bool,
    pub names: Vec<AddressEntry>,
}

impl Target {
    fn wants(&self, name: &str, ip: IpAddr) -> bool {
        let dest = Destination::Host(name.to_string());
        self.v6 == ip.is_ipv6() && self.names.iter().any(|e| e.matches(&dest))
    }
}

/// A change to the kernel's sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Add the element with this timeout and comment. `replace`: it is there already and must be deleted first, in
    /// the same batch, for the new timeout or comment to take (kernels before 6.12 ignore a re-add).
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

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Name and address pairs learned (a re-armed pair counts once).
    pub learned: u64,
    /// Pairs dropped to stay within the limits.
    pub evicted: u64,
}

#[derive(Clone, Copy, Debug)]
struct Addr {
    until: u64,
    seen: u64,
}

#[derive(Default)]
struct NameState {
    addrs: HashMap<IpAddr, Addr>,
    seen: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Held {
    until: u64,
    comment: String,
}

pub struct Learner {
    limits: Limits,
    /// Whether re-adding an element updates its timeout (Linux 6.12 and later).
    readd_refreshes: bool,
    targets: Vec<Target>,
    names: HashMap<(String, String), NameState>,
    /// Tenant and address to the names holding it.
    by_ip: HashMap<(String, IpAddr), BTreeSet<String>>,
    /// What each kernel set holds, as far as this learner made it so.
    kernel: HashMap<String, HashMap<IpAddr, Held>>,
    seq: u64,
    next_expiry_check: u64,
    pub stats: Stats,
}

/// Comments are at most this long (nft's own limit for element comments is 128 bytes with the NUL).
pub const MAX_COMMENT: usize = 127;

/// The milliseconds an address learned with `ttl` lives.
fn lifetime_ms(limits: &Limits, ttl: u32) -> u64 {
    (ttl.max(limits.min_ttl) as u64 + limits.grace as u64) * 1000
}

impl Learner {
    pub fn new(limits: Limits, readd_refreshes: bool) -> Learner {
        Learner {
            limits,
            readd_refreshes,
            targets: Vec::new(),
            names: HashMap::new(),
            by_ip: HashMap::new(),
            kernel: HashMap::new(),
            seq: 0,
            next_expiry_check: 0,
            stats: Stats::default(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Whether `tenant` has any set that learns names.
    pub fn learns_for(&self, tenant: &str) -> bool {
        self.targets.iter().any(|t| t.tenant == tenant)
    }

    /// Names and addresses held, and the elements in the kernel's sets.
    pub fn sizes(&self) -> (usize, usize, usize) {
        let addrs = self.names.values().map(|n| n.addrs.len()).sum();
        let elements = self.kernel.values().map(HashMap::len).sum();
        (self.names.len(), addrs, elements)
    }

    /// What `tenant`'s client was told: the kernel changes that make the addresses usable.
    pub fn observe(&mut self, tenant: &str, learned: &[Learned], now: u64) -> Vec<Op> {
        self.expire(now, false);
        let mut touched: BTreeSet<(String, IpAddr)> = BTreeSet::new();
        let mut gone: Vec<(String, IpAddr)> = Vec::new();
        for l in learned {
            if !self.targets.iter().any(|t| t.tenant == tenant && t.wants(&l.name, l.ip)) {
                continue;
            }
            self.seq += 1;
            let until = now + lifetime_ms(&self.limits, l.ttl);
            let key = (tenant.to_string(), l.name.clone());
            let state = self.names.entry(key).or_default();
            state.seen = self.seq;
            let a = state.addrs.entry(l.ip).or_insert_with(|| {
                self.stats.learned += 1;
                Addr { until, seen: self.seq }
            });
            a.until = a.until.max(until);
            a.seen = self.seq;
            self.by_ip.entry((tenant.to_string(), l.ip)).or_default().insert(l.name.clone());
            if state.addrs.len() > self.limits.max_addresses_per_name {
                let oldest = state.addrs.iter().min_by_key(|(_, a)| a.seen).map(|(ip, _)| *ip).expect("not empty");
                state.addrs.remove(&oldest);
                self.stats.evicted += 1;
                gone.push((l.name.clone(), oldest));
            }
            touched.insert((l.name.clone(), l.ip));
        }
        // Names beyond the tenant's limit: the least recently seen go, with every address.
        let count = self.names.keys().filter(|(t, _)| t == tenant).count();
        if count > self.limits.max_names {
            let mut by_age: Vec<(u64, String)> =
                self.names.iter().filter(|((t, _), _)| t == tenant).map(|((_, n), s)| (s.seen, n.clone())).collect();
            by_age.sort();
            for (_, name) in by_age.into_iter().take(count - self.limits.max_names) {
                let state = self.names.remove(&(tenant.to_string(), name.clone())).expect("listed");
                self.stats.evicted += state.addrs.len() as u64;
                gone.extend(state.addrs.into_keys().map(|ip| (name.clone(), ip)));
            }
        }
        for (name, ip) in &gone {
            let key = (tenant.to_string(), *ip);
            if let Some(names) = self.by_ip.get_mut(&key) {
                let still =
                    self.names.get(&(tenant.to_string(), name.clone())).is_some_and(|s| s.addrs.contains_key(ip));
                if !still {
                    names.remove(name);
                }
                if names.is_empty() {
                    self.by_ip.remove(&key);
                }
            }
        }
        let ips: BTreeSet<IpAddr> = touched.iter().chain(&gone).map(|(_, ip)| *ip).collect();
        let mut ops = Vec::new();
        for i in 0..self.targets.len() {
            if self.targets[i].tenant != tenant {
                continue;
            }
            for ip in &ips {
                ops.extend(self.reconcile(i, *ip, now));
            }
        }
        ops
    }

    /// The element `ip` of target `i` as the names make it, against what the kernel holds.
    fn reconcile(&mut self, i: usize, ip: IpAddr, now: u64) -> Option<Op> {
        let t = &self.targets[i];
        let mut until = 0u64;
        let mut names: Vec<&str> = Vec::new();
        if let Some(holders) = self.by_ip.get(&(t.tenant.clone(), ip)) {
            for name in holders {
                if !t.wants(name, ip) {
                    continue;
                }
                let Some(a) = self.names.get(&(t.tenant.clone(), name.clone())).and_then(|s| s.addrs.get(&ip)) else {
                    continue;
                };
                if a.until > now {
                    until = until.max(a.until);
                    names.push(name);
                }
            }
        }
        let set = t.set.clone();
        let comment = comment(&t.tenant, &names);
        let held = self.kernel.entry(set.clone()).or_default();
        let current = held.get(&ip).filter(|h| h.until > now).cloned();
        match (until > now, current) {
            (false, None) => {
                held.remove(&ip);
                None
            }
            (false, Some(_)) => {
                held.remove(&ip);
                Some(Op::Delete { set, ip })
            }
            (true, None) => {
                held.insert(ip, Held { until, comment: comment.clone() });
                Some(Op::Put { set, ip, timeout_ms: until - now, comment, replace: false })
            }
            (true, Some(h)) => {
                // Within a second is the same expiry: no kernel write per answer for a name asked every second.
                if h.comment == comment && until.abs_diff(h.until) < 1000 {
                    return None;
                }
                // A delete must find the element, or the whole batch fails: only when it surely still lives.
                let replace = (!self.readd_refreshes || h.comment != comment) && h.until > now + 2000;
                held.insert(ip, Held { until, comment: comment.clone() });
                Some(Op::Put { set, ip, timeout_ms: until - now, comment, replace })
            }
        }
    }

    /// Forgets what has expired (the kernel drops the elements itself). Runs at most once a second unless forced.
    fn expire(&mut self, now: u64, force: bool) {
        if !force && now < self.next_expiry_check {
            return;
        }
        self.next_expiry_check = now + 1000;
        let by_ip = &mut self.by_ip;
        self.names.retain(|(tenant, name), s| {
            s.addrs.retain(|ip, a| {
                let live = a.until > now;
                if !live && let Some(names) = by_ip.get_mut(&(tenant.clone(), *ip)) {
                    names.remove(name);
                    if names.is_empty() {
                        by_ip.remove(&(tenant.clone(), *ip));
                    }
                }
                live
            });
            !s.addrs.is_empty()
        });
        for held in self.kernel.values_mut() {
            held.retain(|_, h| h.until > now);
        }
    }

    /// The policy changed: these are the sets now. Keeps what was learned for names some set still matches, fills
    /// new sets from it, and empties what no longer belongs.
    pub fn retarget(&mut self, targets: Vec<Target>, now: u64) -> Vec<Op> {
        self.expire(now, true);
        let wanted: BTreeSet<&str> = targets.iter().map(|t| t.set.as_str()).collect();
        self.kernel.retain(|set, _| wanted.contains(set.as_str()));
        self.targets = targets;
        // Names no set of their tenant matches any more are forgotten.
        let targets = &self.targets;
        let mut dropped: Vec<(String, String, Vec<IpAddr>)> = Vec::new();
        self.names.retain(|(tenant, name), s| {
            let keep = s.addrs.keys().any(|ip| targets.iter().any(|t| &t.tenant == tenant && t.wants(name, *ip)));
            if !keep {
                dropped.push((tenant.clone(), name.clone(), s.addrs.keys().copied().collect()));
            }
            keep
        });
        for (tenant, name, ips) in dropped {
            for ip in ips {
                if let Some(names) = self.by_ip.get_mut(&(tenant.clone(), ip)) {
                    names.remove(&name);
                    if names.is_empty() {
                        self.by_ip.remove(&(tenant.clone(), ip));
                    }
                }
            }
        }
        let mut ops = Vec::new();
        for i in 0..self.targets.len() {
            let t = &self.targets[i];
            let mut ips: BTreeSet<IpAddr> =
                self.kernel.get(&t.set).map(|h| h.keys().copied().collect()).unwrap_or_default();
            ips.extend(
                self.by_ip.keys().filter(|(tenant, ip)| tenant == &t.tenant && ip.is_ipv6() == t.v6).map(|(_, ip)| *ip),
            );
            for ip in ips {
                ops.extend(self.reconcile(i, ip, now));
            }
        }
        ops
    }

    /// Takes over what a kernel set holds (after a restart): `(address, milliseconds left, comment)` per element.
    /// Elements whose comment does not say a tenant and names are left to expire in the kernel.
    pub fn adopt(&mut self, set: &str, elements: &[(IpAddr, u64, String)], now: u64) {
        for (ip, left, text) in elements {
            let mut words = text.split(' ');
            let Some(tenant) = words.next().filter(|t| !t.is_empty()) else { continue };
            let until = now + left;
            let mut any = false;
            for name in words.filter(|w| !w.is_empty()) {
                any = true;
                self.seq += 1;
                let state = self.names.entry((tenant.to_string(), name.to_string())).or_default();
                state.seen = self.seq;
                let a = state.addrs.entry(*ip).or_insert(Addr { until, seen: self.seq });
                a.until = a.until.max(until);
                self.by_ip.entry((tenant.to_string(), *ip)).or_default().insert(name.to_string());
            }
            if any {
                self.kernel.entry(set.to_string()).or_default().insert(*ip, Held { until, comment: text.clone() });
            }
        }
    }

    /// Every name and address held, with its expiry: `(tenant, name, address, until)`, sorted.
    pub fn entries(&self, now: u64) -> Vec<(String, String, IpAddr, u64)> {
        let mut out: Vec<_> = self
            .names
            .iter()
            .flat_map(|((t, n), s)| {
                s.addrs.iter().filter(|(_, a)| a.until > now).map(move |(ip, a)| (t.clone(), n.clone(), *ip, a.until))
            })
            .collect();
        out.sort();
        out
    }
}

/// `tenant name name ...`, as many names as fit in [`MAX_COMMENT`] bytes.
pub fn comment(tenant: &str, names: &[&str]) -> String {
    let mut c = tenant.to_string();
    let mut sorted: Vec<&str> = names.to_vec();
    sorted.sort_unstable();
    for n in sorted {
        if c.len() + 1 + n.len() > MAX_COMMENT {
            continue;
        }
        c.push(' ');
        c.push_str(n);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(s: &str) -> AddressEntry {
        s.parse().unwrap()
    }

    fn target(set: &str, tenant: &str, v6: bool, names: &[&str]) -> Target {
        Target { set: set.into(), tenant: tenant.into(), v6, names: names.iter().map(|n| entry(n)).collect() }
    }

    fn l(name: &str, ip: &str, ttl: u32) -> Learned {
        Learned { name: name.into(), ip: ip.parse().unwrap(), ttl }
    }

    fn puts(ops: &[Op]) -> Vec<(String, String, u64)> {
        ops.iter()
            .filter_map(|o| match o {
                Op::Put { set, ip, timeout_ms, .. } => Some((set.clone(), ip.to_string(), *timeout_ms)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_answer_opens_only_its_tenants_matching_sets_for_ttl_plus_grace() {
        let mut lr = Learner::new(Limits { min_ttl: 5, grace: 60, ..Limits::default() }, true);
        let ops = lr.retarget(
            vec![
                target("a4", "payments", false, &["api.stripe.com", "*.stripe.com"]),
                target("a6", "payments", true, &["api.stripe.com"]),
                target("b4", "analytics", false, &["api.stripe.com"]),
                target("c4", "payments", false, &["*.example"]),
            ],
            0,
        );
        assert!(ops.is_empty());
        let ops = lr.observe(
            "payments",
            &[
                l("api.stripe.com", "192.0.2.1", 1),
                l("api.stripe.com", "2001:db8::1", 30),
                l("other.net", "192.0.2.9", 30),
            ],
            1000,
        );
        assert_eq!(
            puts(&ops),
            [("a4".into(), "192.0.2.1".into(), 65_000), ("a6".into(), "2001:db8::1".into(), 90_000)],
            "min TTL 5 s + grace 60 s; the other tenant's set and the other family are not touched"
        );
        // The same name in analytics is learned separately.
        let ops = lr.observe("analytics", &[l("api.stripe.com", "198.51.100.1", 10)], 2000);
        assert_eq!(puts(&ops), [("b4".into(), "198.51.100.1".into(), 70_000)]);
        // A wildcard matches a deeper name, not the bare suffix.
        assert_eq!(puts(&lr.observe("payments", &[l("x.y.stripe.com", "192.0.2.2", 10)], 3000)).len(), 1);
        assert!(lr.observe("payments", &[l("example", "192.0.2.3", 10)], 3000).is_empty());
    }

    #[test]
    fn re_arming_writes_only_when_the_expiry_moves() {
        let mut lr = Learner::new(Limits { grace: 0, ..Limits::default() }, true);
        lr.retarget(vec![target("s", "T", false, &["a.example"])], 0);
        assert_eq!(lr.observe("T", &[l("a.example", "192.0.2.1", 10)], 0).len(), 1);
        assert!(lr.observe("T", &[l("a.example", "192.0.2.1", 10)], 500).is_empty(), "within a second");
        let ops = lr.observe("T", &[l("a.example", "192.0.2.1", 10)], 5000);
        assert_eq!(puts(&ops), [("s".into(), "192.0.2.1".into(), 10_000)]);
        assert!(matches!(ops[0], Op::Put { replace: false, .. }), "a re-add refreshes on this kernel");
        // On a kernel that ignores re-adds, the element is replaced.
        let mut old = Learner::new(Limits { grace: 0, ..Limits::default() }, false);
        old.retarget(vec![target("s", "T", false, &["a.example"])], 0);
        old.observe("T", &[l("a.example", "192.0.2.1", 10)], 0);
        assert!(matches!(old.observe("T", &[l("a.example", "192.0.2.1", 10)], 5000)[0], Op::Put { replace: true, .. }));
        // ... but not when it might have expired already: the delete would fail the batch.
        assert!(matches!(
            old.observe("T", &[l("a.example", "192.0.2.1", 10)], 14_500)[0],
            Op::Put { replace: false, .. }
        ));
    }

    #[test]
    fn limits_evict_the_least_recently_seen() {
        let mut lr = Learner::new(Limits { max_addresses_per_name: 2, max_names: 2, ..Limits::default() }, true);
        lr.retarget(vec![target("s", "T", false, &["*.example"])], 0);
        lr.observe("T", &[l("a.example", "192.0.2.1", 60), l("a.example", "192.0.2.2", 60)], 0);
        let ops = lr.observe("T", &[l("a.example", "192.0.2.3", 60)], 10);
        assert!(ops.contains(&Op::Delete { set: "s".into(), ip: "192.0.2.1".parse().unwrap() }), "{ops:?}");
        assert_eq!(lr.stats.evicted, 1);
        lr.observe("T", &[l("b.example", "192.0.2.4", 60)], 20);
        let ops = lr.observe("T", &[l("c.example", "192.0.2.5", 60)], 30);
        let deleted: Vec<String> = ops
            .iter()
            .filter_map(|o| if let Op::Delete { ip, .. } = o { Some(ip.to_string()) } else { None })
            .collect();
        assert_eq!(deleted, ["192.0.2.2", "192.0.2.3"], "a.example, seen least recently, goes whole");
        assert_eq!(lr.entries(30).len(), 2);
    }

    #[test]
    fn an_address_of_two_names_stays_while_either_holds_it() {
        let mut lr = Learner::new(Limits { grace: 0, max_names: 1, ..Limits::default() }, true);
        lr.retarget(vec![target("s", "T", false, &["a.example", "b.example"])], 0);
        lr.observe("T", &[l("a.example", "192.0.2.1", 100)], 0);
        let ops = lr.observe("T", &[l("b.example", "192.0.2.1", 10)], 0);
        // a.example is evicted (one name per tenant); b.example still holds the address, for less time.
        assert!(!ops.iter().any(|o| matches!(o, Op::Delete { .. })), "{ops:?}");
        assert_eq!(puts(&ops), [("s".into(), "192.0.2.1".into(), 10_000)]);
    }

    #[test]
    fn a_policy_change_keeps_names_that_remain_and_restarts_adopt_the_kernel() {
        let mut lr = Learner::new(Limits::default(), true);
        lr.retarget(vec![target("s1", "T", false, &["a.example", "b.example"])], 0);
        lr.observe("T", &[l("a.example", "192.0.2.1", 100), l("b.example", "192.0.2.2", 100)], 0);
        // b.example leaves the policy; a new set for a.example appears.
        let ops =
            lr.retarget(vec![target("s1", "T", false, &["a.example"]), target("s2", "T", false, &["a.example"])], 1000);
        assert!(ops.contains(&Op::Delete { set: "s1".into(), ip: "192.0.2.2".parse().unwrap() }), "{ops:?}");
        assert!(puts(&ops).contains(&("s2".into(), "192.0.2.1".into(), 159_000)), "{ops:?}");
        assert_eq!(lr.entries(1000).len(), 1);
        // A new agent adopts the kernel's element and its comment.
        let mut again = Learner::new(Limits::default(), true);
        again.adopt("s1", &[("192.0.2.1".parse().unwrap(), 50_000, "T a.example".into())], 2000);
        let ops = again.retarget(vec![target("s1", "T", false, &["a.example"])], 2000);
        assert!(ops.is_empty(), "what the kernel holds is what the names make: {ops:?}");
        assert_eq!(again.entries(2000), [("T".into(), "a.example".into(), "192.0.2.1".parse().unwrap(), 52_000)]);
    }

    #[test]
    fn comments_fit_nfts_limit() {
        let long = "x".repeat(100);
        let c = comment("payments", &["b.example", &long, "a.example"]);
        assert!(c.len() <= MAX_COMMENT);
        assert!(c.starts_with("payments a.example b.example"), "{c}");
    }
}
