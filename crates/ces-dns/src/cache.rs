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
//! match are kept at all. Tenants and names are interned (each string is held once, and freed with its last
//! holder), so an address costs a few dozen bytes in each index.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
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

/// Strings held once, by id, with the number of holders; an id is reused once its string is released.
#[derive(Default)]
struct Interner {
    ids: HashMap<Box<str>, u32>,
    strings: Vec<(Box<str>, u32)>,
    free: Vec<u32>,
}

impl Interner {
    fn get(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }

    fn str(&self, id: u32) -> &str {
        &self.strings[id as usize].0
    }

    /// The id of `s`, with one more holder.
    fn hold(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            self.strings[id as usize].1 += 1;
            return id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.strings[id as usize] = (s.into(), 1);
                id
            }
            None => {
                self.strings.push((s.into(), 1));
                (self.strings.len() - 1) as u32
            }
        };
        self.ids.insert(s.into(), id);
        id
    }

    /// One more holder of `id`.
    fn retain(&mut self, id: u32) {
        self.strings[id as usize].1 += 1;
    }

    fn release(&mut self, id: u32) {
        let slot = &mut self.strings[id as usize];
        slot.1 -= 1;
        if slot.1 == 0 {
            self.ids.remove(&slot.0);
            slot.0 = "".into();
            self.free.push(id);
        }
    }

    fn len(&self) -> usize {
        self.ids.len()
    }
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

/// An element as this learner made it: its expiry and a hash of its comment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    until: u64,
    comment: u64,
}

/// (tenant, name) ids.
type NameKey = (u32, u32);

pub struct Learner {
    limits: Limits,
    /// Whether re-adding an element updates its timeout (Linux 6.12 and later).
    readd_refreshes: bool,
    targets: Vec<Target>,
    tenants: Interner,
    strings: Interner,
    names: HashMap<NameKey, NameState>,
    /// Tenant and address to the names holding it (a short list, usually of one).
    by_ip: HashMap<(u32, IpAddr), Vec<u32>>,
    /// Each tenant's names by when they were last seen (the key is [`NameState::seen`]): the least recently seen
    /// first, for eviction and for sweeping expired names a few at a time.
    lru: HashMap<u32, BTreeMap<u64, u32>>,
    /// What each kernel set holds, as far as this learner made it so.
    kernel: HashMap<String, HashMap<IpAddr, Held>>,
    seq: u64,
    pub stats: Stats,
}

/// Comments are at most this long (nft's own limit for element comments is 128 bytes with the NUL).
pub const MAX_COMMENT: usize = 127;

/// The milliseconds an address learned with `ttl` lives.
fn lifetime_ms(limits: &Limits, ttl: u32) -> u64 {
    (ttl.max(limits.min_ttl) as u64 + limits.grace as u64) * 1000
}

fn hash(s: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

impl Learner {
    pub fn new(limits: Limits, readd_refreshes: bool) -> Learner {
        Learner {
            limits,
            readd_refreshes,
            targets: Vec::new(),
            tenants: Interner::default(),
            strings: Interner::default(),
            names: HashMap::new(),
            by_ip: HashMap::new(),
            lru: HashMap::new(),
            kernel: HashMap::new(),
            seq: 0,
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

    /// Records `ip` of name `key`, seen now; returns the addresses the name dropped (expired, or beyond the limit).
    fn record(&mut self, key: NameKey, ip: IpAddr, until: u64, now: u64) -> Vec<IpAddr> {
        self.seq += 1;
        let seq = self.seq;
        if !self.names.contains_key(&key) {
            // The state holds the tenant's and the name's strings.
            self.tenants.retain(key.0);
            self.strings.retain(key.1);
        }
        let state = self.names.entry(key).or_default();
        let lru = self.lru.entry(key.0).or_default();
        lru.remove(&state.seen);
        lru.insert(seq, key.1);
        state.seen = seq;
        let mut gone = Vec::new();
        state.addrs.retain(|a, x| {
            let live = x.until > now;
            if !live {
                gone.push(*a);
            }
            live
        });
        let a = state.addrs.entry(ip).or_insert_with(|| {
            self.stats.learned += 1;
            Addr { until, seen: seq }
        });
        a.until = a.until.max(until);
        a.seen = seq;
        let holders = self.by_ip.entry((key.0, ip)).or_default();
        if !holders.contains(&key.1) {
            holders.push(key.1);
        }
        if state.addrs.len() > self.limits.max_addresses_per_name {
            let oldest = state.addrs.iter().min_by_key(|(_, a)| a.seen).map(|(ip, _)| *ip).expect("not empty");
            state.addrs.remove(&oldest);
            self.stats.evicted += 1;
            gone.push(oldest);
        }
        // (An address that had expired and is answered again is held again: it stays in the index.)
        for a in gone.iter().filter(|a| **a != ip) {
            self.unindex(key, *a);
        }
        gone
    }

    /// Removes `ip` of name `key` from the address index.
    fn unindex(&mut self, key: NameKey, ip: IpAddr) {
        if let Some(holders) = self.by_ip.get_mut(&(key.0, ip)) {
            holders.retain(|n| *n != key.1);
            if holders.is_empty() {
                self.by_ip.remove(&(key.0, ip));
            }
        }
    }

    /// Removes name `key` whole; returns its addresses.
    fn forget(&mut self, key: NameKey) -> Vec<IpAddr> {
        let Some(state) = self.names.remove(&key) else { return Vec::new() };
        if let Some(l) = self.lru.get_mut(&key.0) {
            l.remove(&state.seen);
        }
        let ips: Vec<IpAddr> = state.addrs.into_keys().collect();
        for ip in &ips {
            self.unindex(key, *ip);
        }
        self.tenants.release(key.0);
        self.strings.release(key.1);
        ips
    }

    /// What `tenant`'s client was told: the kernel changes that make the addresses usable.
    pub fn observe(&mut self, tenant: &str, learned: &[Learned], now: u64) -> Vec<Op> {
        let mut touched: BTreeSet<IpAddr> = BTreeSet::new();
        // Held for the length of this call, so that the ids stay valid while names come and go.
        let t = self.tenants.hold(tenant);
        for l in learned {
            if !self.targets.iter().any(|x| x.tenant == tenant && x.wants(&l.name, l.ip)) {
                continue;
            }
            let n = self.strings.hold(&l.name);
            let until = now + lifetime_ms(&self.limits, l.ttl);
            touched.extend(self.record((t, n), l.ip, until, now));
            self.strings.release(n);
            touched.insert(l.ip);
        }
        // Names beyond the tenant's limit go, least recently seen first, with every address; and a few of the least
        // recently seen names whose addresses have all expired are swept (so memory follows what is live without a
        // scan of everything).
        let mut swept = 0;
        while let Some((_, &n)) = self.lru.get(&t).and_then(|l| l.first_key_value()) {
            let over = self.lru[&t].len() > self.limits.max_names;
            let expired = self.names.get(&(t, n)).is_none_or(|s| s.addrs.values().all(|a| a.until <= now));
            let sweep = expired && swept < 8;
            if !over && !sweep {
                break;
            }
            swept += usize::from(expired);
            let ips = self.forget((t, n));
            if !expired {
                self.stats.evicted += ips.len() as u64;
            }
            touched.extend(ips);
        }
        let mut ops = Vec::new();
        for i in 0..self.targets.len() {
            if self.targets[i].tenant != tenant {
                continue;
            }
            for ip in &touched {
                ops.extend(self.reconcile(i, *ip, now));
            }
        }
        self.tenants.release(t);
        ops
    }

    /// The element `ip` of target `i` as the names make it, against what the kernel holds.
    fn reconcile(&mut self, i: usize, ip: IpAddr, now: u64) -> Option<Op> {
        let t = &self.targets[i];
        let mut until = 0u64;
        let mut names: Vec<&str> = Vec::new();
        if let Some(tid) = self.tenants.get(&t.tenant)
            && let Some(holders) = self.by_ip.get(&(tid, ip))
        {
            for &n in holders {
                let name = self.strings.str(n);
                if !t.wants(name, ip) {
                    continue;
                }
                let Some(a) = self.names.get(&(tid, n)).and_then(|s| s.addrs.get(&ip)) else { continue };
                if a.until > now {
                    until = until.max(a.until);
                    names.push(name);
                }
            }
        }
        let set = t.set.clone();
        let comment = comment(&t.tenant, &names);
        let held = self.kernel.entry(set.clone()).or_default();
        let current = held.get(&ip).filter(|h| h.until > now).copied();
        let c = hash(&comment);
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
                held.insert(ip, Held { until, comment: c });
                Some(Op::Put { set, ip, timeout_ms: until - now, comment, replace: false })
            }
            (true, Some(h)) => {
                // Within a second is the same expiry: no kernel write per answer for a name asked every second.
                if h.comment == c && until.abs_diff(h.until) < 1000 {
                    return None;
                }
                // A delete must find the element, or the whole batch fails: only when it surely still lives.
                let replace = (!self.readd_refreshes || h.comment != c) && h.until > now + 2000;
                held.insert(ip, Held { until, comment: c });
                Some(Op::Put { set, ip, timeout_ms: until - now, comment, replace })
            }
        }
    }

    /// Forgets everything that has expired (the kernel drops the elements itself): a scan of every name, done when
    /// the policy changes; answers sweep a few names at a time.
    fn expire(&mut self, now: u64) {
        let keys: Vec<NameKey> = self.names.keys().copied().collect();
        for key in keys {
            let state = self.names.get_mut(&key).expect("listed");
            let mut gone = Vec::new();
            state.addrs.retain(|ip, a| {
                let live = a.until > now;
                if !live {
                    gone.push(*ip);
                }
                live
            });
            let empty = state.addrs.is_empty();
            for ip in gone {
                self.unindex(key, ip);
            }
            if empty {
                self.forget(key);
            }
        }
        for held in self.kernel.values_mut() {
            held.retain(|_, h| h.until > now);
        }
    }

    /// The policy changed: these are the sets now. Keeps what was learned for names some set still matches, fills
    /// new sets from it, and empties what no longer belongs.
    pub fn retarget(&mut self, targets: Vec<Target>, now: u64) -> Vec<Op> {
        self.expire(now);
        let wanted: BTreeSet<&str> = targets.iter().map(|t| t.set.as_str()).collect();
        self.kernel.retain(|set, _| wanted.contains(set.as_str()));
        self.targets = targets;
        // Names no set of their tenant matches any more are forgotten.
        let unwanted: Vec<NameKey> = self
            .names
            .iter()
            .filter(|((t, n), s)| {
                let (tenant, name) = (self.tenants.str(*t), self.strings.str(*n));
                !s.addrs.keys().any(|ip| self.targets.iter().any(|x| x.tenant == tenant && x.wants(name, *ip)))
            })
            .map(|(k, _)| *k)
            .collect();
        for key in unwanted {
            self.forget(key);
        }
        let mut ops = Vec::new();
        for i in 0..self.targets.len() {
            let t = &self.targets[i];
            let mut ips: BTreeSet<IpAddr> =
                self.kernel.get(&t.set).map(|h| h.keys().copied().collect()).unwrap_or_default();
            if let Some(tid) = self.tenants.get(&t.tenant) {
                ips.extend(self.by_ip.keys().filter(|(x, ip)| *x == tid && ip.is_ipv6() == t.v6).map(|(_, ip)| *ip));
            }
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
            let t = self.tenants.hold(tenant);
            let mut any = false;
            for name in words.filter(|w| !w.is_empty()) {
                any = true;
                let n = self.strings.hold(name);
                self.record((t, n), *ip, until, now);
                self.strings.release(n);
            }
            self.tenants.release(t);
            if any {
                self.kernel.entry(set.to_string()).or_default().insert(*ip, Held { until, comment: hash(text) });
            }
        }
    }

    /// Checks the learner's indexes against each other (for tests): every name is in its tenant's recency index
    /// under the time it was last seen, every address index entry names a name that holds the address, and every
    /// interned string is held by as many names as say so.
    pub fn check(&self) -> Result<(), String> {
        let indexed: usize = self.lru.values().map(|l| l.len()).sum();
        if indexed != self.names.len() {
            return Err(format!("{indexed} names indexed by recency, {} held", self.names.len()));
        }
        let mut holds: HashMap<u32, u32> = HashMap::new();
        let mut tenant_holds: HashMap<u32, u32> = HashMap::new();
        for (&(t, n), s) in &self.names {
            *holds.entry(n).or_default() += 1;
            *tenant_holds.entry(t).or_default() += 1;
            let (tenant, name) = (self.tenants.str(t), self.strings.str(n));
            if self.lru.get(&t).and_then(|l| l.get(&s.seen)) != Some(&n) {
                return Err(format!("{tenant} {name} is not indexed under its last sighting"));
            }
            if self.lru[&t].len() > self.limits.max_names {
                return Err(format!("{tenant} holds more than {} names", self.limits.max_names));
            }
            for ip in s.addrs.keys() {
                if !self.by_ip.get(&(t, *ip)).is_some_and(|h| h.contains(&n)) {
                    return Err(format!("{tenant} {name} {ip} is missing from the address index"));
                }
            }
        }
        for (&(t, ip), holders) in &self.by_ip {
            for n in holders {
                if !self.names.get(&(t, *n)).is_some_and(|s| s.addrs.contains_key(&ip)) {
                    return Err(format!("the address index says {} {n} holds {ip}; it does not", self.tenants.str(t)));
                }
            }
        }
        for (t, count) in &tenant_holds {
            if self.tenants.strings[*t as usize].1 != *count {
                return Err(format!("tenant {} is held {count} times, counted otherwise", self.tenants.str(*t)));
            }
        }
        if holds.len() != self.strings.len() || tenant_holds.len() != self.tenants.len() {
            return Err(format!("{} names interned, {} held", self.strings.len(), holds.len()));
        }
        for (n, count) in holds {
            if self.strings.strings[n as usize].1 != count {
                return Err(format!(
                    "{} is held {count} times, counted {}",
                    self.strings.str(n),
                    self.strings.strings[n as usize].1
                ));
            }
        }
        Ok(())
    }

    /// The names `tenant` holds `ip` for, sorted.
    pub fn names_of(&self, tenant: &str, ip: IpAddr) -> Vec<String> {
        let Some(t) = self.tenants.get(tenant) else { return Vec::new() };
        let mut v: Vec<String> = self
            .by_ip
            .get(&(t, ip))
            .map(|h| h.iter().map(|n| self.strings.str(*n).to_string()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Every name and address held, with its expiry: `(tenant, name, address, until)`, sorted.
    pub fn entries(&self, now: u64) -> Vec<(String, String, IpAddr, u64)> {
        let mut out: Vec<_> = self
            .names
            .iter()
            .flat_map(|(&(t, n), s)| {
                s.addrs.iter().filter(|(_, a)| a.until > now).map(move |(ip, a)| {
                    (self.tenants.str(t).to_string(), self.strings.str(n).to_string(), *ip, a.until)
                })
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
    fn an_address_answered_again_after_it_expired_is_put_back() {
        let mut lr = Learner::new(Limits { grace: 1, ..Limits::default() }, true);
        lr.retarget(vec![target("s", "T", false, &["a.example"])], 0);
        assert_eq!(puts(&lr.observe("T", &[l("a.example", "192.0.2.1", 1)], 0)).len(), 1);
        let again = lr.observe("T", &[l("a.example", "192.0.2.1", 1)], 5000);
        assert_eq!(puts(&again), [("s".into(), "192.0.2.1".into(), 2000)], "the kernel dropped it: add it again");
        lr.check().unwrap();
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
    fn many_names_keep_the_newest_within_the_limit_and_expired_ones_are_swept() {
        let mut lr = Learner::new(Limits { max_names: 1000, grace: 0, ..Limits::default() }, true);
        lr.retarget(vec![target("s", "T", false, &["*.example"])], 0);
        for i in 0..50_000u32 {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
            lr.observe("T", &[l(&format!("n{i}.example"), &ip, 100)], i as u64);
        }
        lr.check().unwrap();
        let held = lr.entries(50_000);
        assert_eq!(held.len(), 1000);
        assert!(held.iter().all(|(_, n, _, _)| n[1..n.len() - 8].parse::<u32>().unwrap() >= 49_000), "the newest stay");
        assert_eq!(lr.stats.evicted, 49_000);
        // Long after they expired, a few answers sweep the expired names a few at a time, evicting nothing.
        for i in 0..200u32 {
            lr.observe("T", &[l(&format!("late{i}.example"), "192.0.2.1", 100)], 10_000_000 + i as u64);
        }
        lr.check().unwrap();
        assert_eq!(lr.stats.evicted, 49_000, "expired names are swept, not evicted");
        assert_eq!(lr.sizes().0, 200, "only the late names are left");
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
