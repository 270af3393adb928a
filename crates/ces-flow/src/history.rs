//! Who held each address, when: a record that arrives after churn (a connection's end comes minutes after its
//! start; a BIG-IP's log line seconds after the packet) names the pod that held the address when the traffic
//! happened, not the one that holds it now. Per tenant, since tenants' pod networks may overlap.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ces_model::PodEntry;

/// A pod as records name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
struct Span {
    /// Microseconds since the epoch; `i64::MIN` for pods known since before this history began.
    from: i64,
    /// `None` while the pod still holds the address.
    to: Option<i64>,
    pod: Arc<PodInfo>,
}

/// Address assignments over time, per tenant; closed assignments are kept for `retention_us`.
pub struct PodHistory {
    spans: HashMap<(String, IpAddr), Vec<Span>>,
    retention_us: i64,
    started: bool,
}

fn key(p: &PodEntry, ip: IpAddr) -> (String, IpAddr) {
    (p.tenant.clone(), ip)
}

impl PodHistory {
    /// A history that remembers an address's earlier holders for `retention_secs` after they let it go.
    pub fn new(retention_secs: u64) -> PodHistory {
        PodHistory { spans: HashMap::new(), retention_us: retention_secs as i64 * 1_000_000, started: false }
    }

    /// The pods now (`now` in microseconds): a pod that appeared opens an assignment, one that went (or moved)
    /// closes its. The first call's pods are taken to have held their addresses since before anything this history
    /// will be asked about.
    pub fn sync(&mut self, pods: &[PodEntry], now: i64) {
        let from = if self.started { now } else { i64::MIN };
        self.started = true;
        let mut current: HashMap<(String, IpAddr), Vec<&PodEntry>> = HashMap::new();
        for p in pods {
            for ip in &p.ips {
                current.entry(key(p, *ip)).or_default().push(p);
            }
        }
        // Close what is no longer so.
        for (k, spans) in self.spans.iter_mut() {
            let holders = current.get(k);
            for s in spans.iter_mut().filter(|s| s.to.is_none()) {
                let still =
                    holders.is_some_and(|h| h.iter().any(|p| p.namespace == s.pod.namespace && p.name == s.pod.name));
                if !still {
                    s.to = Some(now);
                }
            }
        }
        // Open what is new, or changed its labels.
        for (k, holders) in current {
            let spans = self.spans.entry(k).or_default();
            for p in holders {
                let open = spans.iter().any(|s| {
                    s.to.is_none() && s.pod.namespace == p.namespace && s.pod.name == p.name && s.pod.labels == p.labels
                });
                if !open {
                    for s in spans
                        .iter_mut()
                        .filter(|s| s.to.is_none() && s.pod.namespace == p.namespace && s.pod.name == p.name)
                    {
                        s.to = Some(now);
                    }
                    let pod = Arc::new(PodInfo {
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        labels: p.labels.clone(),
                    });
                    spans.push(Span { from, to: None, pod });
                }
            }
        }
        self.prune(now);
    }

    /// Pods that changed (`(before, after)`, as a pod-churn delta says), at `now`.
    pub fn apply(&mut self, changes: &[(Option<PodEntry>, Option<PodEntry>)], now: i64) {
        for (before, after) in changes {
            if let Some(b) = before {
                for ip in &b.ips {
                    if let Some(spans) = self.spans.get_mut(&key(b, *ip)) {
                        for s in spans
                            .iter_mut()
                            .filter(|s| s.to.is_none() && s.pod.namespace == b.namespace && s.pod.name == b.name)
                        {
                            s.to = Some(now);
                        }
                    }
                }
            }
            if let Some(a) = after {
                let pod = Arc::new(PodInfo {
                    namespace: a.namespace.clone(),
                    name: a.name.clone(),
                    labels: a.labels.clone(),
                });
                for ip in &a.ips {
                    self.spans.entry(key(a, *ip)).or_default().push(Span { from: now, to: None, pod: pod.clone() });
                }
            }
        }
    }

    /// The pod of `tenant` that held `ip` at `t` (microseconds): the one whose assignment covers `t`, the latest to
    /// take the address if several do.
    pub fn at(&self, tenant: &str, ip: IpAddr, t: i64) -> Option<&PodInfo> {
        let spans = self.spans.get(&(tenant.to_string(), ip))?;
        spans
            .iter()
            .filter(|s| s.from <= t && s.to.is_none_or(|to| t < to))
            .max_by_key(|s| s.from)
            .map(|s| s.pod.as_ref())
    }

    /// Drops assignments closed longer ago than the retention.
    pub fn prune(&mut self, now: i64) {
        let horizon = now - self.retention_us;
        self.spans.retain(|_, spans| {
            spans.retain(|s| s.to.is_none_or(|to| to > horizon));
            !spans.is_empty()
        });
    }

    /// Addresses with at least one assignment held.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(tenant: &str, ns: &str, name: &str, ip: &str) -> PodEntry {
        PodEntry {
            tenant: tenant.into(),
            namespace: ns.into(),
            name: name.into(),
            ips: vec![ip.parse().unwrap()],
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn a_record_after_churn_names_the_pod_that_held_the_address_then() {
        let ip: IpAddr = "10.10.0.11".parse().unwrap();
        let mut h = PodHistory::new(3600);
        let a = pod("payments", "payments", "checkout-0", "10.10.0.11");
        let overlap = pod("analytics", "analytics-dev", "jupyter-0", "10.10.0.11");
        h.sync(&[a.clone(), overlap.clone()], 1_000);
        // checkout-0 goes at 2000; checkout-9 gets its address at 3000.
        let b = pod("payments", "payments", "checkout-9", "10.10.0.11");
        h.sync(std::slice::from_ref(&overlap), 2_000);
        h.apply(&[(None, Some(b.clone()))], 3_000);
        let name = |h: &PodHistory, t: &str, at: i64| h.at(t, ip, at).map(|p| p.name.clone());
        assert_eq!(name(&h, "payments", 500).as_deref(), Some("checkout-0"), "known since before the history began");
        assert_eq!(name(&h, "payments", 1_999).as_deref(), Some("checkout-0"));
        assert_eq!(name(&h, "payments", 2_500), None, "nobody held it");
        assert_eq!(name(&h, "payments", 3_000).as_deref(), Some("checkout-9"));
        assert_eq!(
            name(&h, "analytics", 2_500).as_deref(),
            Some("jupyter-0"),
            "the other tenant's pod at the same address"
        );
        // After the retention, the closed assignment is gone.
        h.prune(2_000 + 3_600 * 1_000_000 + 1);
        assert_eq!(name(&h, "payments", 1_999), None);
        assert_eq!(name(&h, "payments", 4_000).as_deref(), Some("checkout-9"));
    }
}
