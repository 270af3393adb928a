//! Address intervals: CIDRs, ranges and single addresses merged into sorted, non-overlapping intervals per family.
//!
//! nftables interval sets reject overlapping elements (a pod /32 inside its namespace's subnet, two rules' CIDRs that
//! overlap), so everything is coalesced before it is loaded.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ces_model::AddressEntry;
use ipnet::IpNet;

/// Sorted, non-overlapping, non-adjacent inclusive intervals of one family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Intervals {
    pub v4: Vec<(u32, u32)>,
    pub v6: Vec<(u128, u128)>,
}

fn net_bounds(n: &IpNet) -> (IpAddr, IpAddr) {
    (n.network(), n.broadcast())
}

impl Intervals {
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// From networks (pod /32s, subnets).
    pub fn from_nets<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> Intervals {
        let mut out = Intervals::default();
        for n in nets {
            let (a, b) = net_bounds(n);
            out.push(a, b);
        }
        out.merge()
    }

    /// From destination entries; host names and wildcards are not addresses and are left out (the caller reports
    /// them).
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = &'a AddressEntry>) -> Intervals {
        let mut out = Intervals::default();
        for e in entries {
            match e {
                AddressEntry::Net(n) => {
                    let (a, b) = net_bounds(n);
                    out.push(a, b);
                }
                AddressEntry::Range(a, b) => out.push(*a, *b),
                AddressEntry::Host(_) | AddressEntry::Wildcard(_) => {}
            }
        }
        out.merge()
    }

    fn push(&mut self, a: IpAddr, b: IpAddr) {
        match (a, b) {
            (IpAddr::V4(a), IpAddr::V4(b)) => self.v4.push((a.into(), b.into())),
            (IpAddr::V6(a), IpAddr::V6(b)) => self.v6.push((a.into(), b.into())),
            _ => {}
        }
    }

    fn merge(mut self) -> Intervals {
        self.v4 = merge(std::mem::take(&mut self.v4));
        self.v6 = merge(std::mem::take(&mut self.v6));
        self
    }

    /// Whether `ip` is in one of the intervals.
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn find<T: Ord + Copy>(v: &[(T, T)], x: T) -> bool {
            let i = v.partition_point(|&(a, _)| a <= x);
            i > 0 && v[i - 1].1 >= x
        }
        match ip {
            IpAddr::V4(a) => find(&self.v4, u32::from(a)),
            IpAddr::V6(a) => find(&self.v6, u128::from(a)),
        }
    }

    /// The union of several interval lists.
    pub fn union<'a>(all: impl IntoIterator<Item = &'a Intervals>) -> Intervals {
        let mut out = Intervals::default();
        for i in all {
            out.v4.extend_from_slice(&i.v4);
            out.v6.extend_from_slice(&i.v6);
        }
        out.merge()
    }

    /// nft elements (`a`, or `a-b`) of one family.
    pub fn elements_v4(&self) -> Vec<String> {
        self.v4.iter().map(|&(a, b)| element(Ipv4Addr::from(a), Ipv4Addr::from(b), a == b)).collect()
    }

    pub fn elements_v6(&self) -> Vec<String> {
        self.v6.iter().map(|&(a, b)| element(Ipv6Addr::from(a), Ipv6Addr::from(b), a == b)).collect()
    }
}

fn element<T: std::fmt::Display>(a: T, b: T, single: bool) -> String {
    if single { a.to_string() } else { format!("{a}-{b}") }
}

/// Sorts and merges overlapping or adjacent intervals.
fn merge<T: Copy + Ord + Bound>(mut v: Vec<(T, T)>) -> Vec<(T, T)> {
    v.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some((_, end)) if a <= end.next_or_max() => {
                if b > *end {
                    *end = b;
                }
            }
            _ => out.push((a, b)),
        }
    }
    out
}

trait Bound {
    fn next_or_max(self) -> Self;
}

impl Bound for u32 {
    fn next_or_max(self) -> Self {
        self.saturating_add(1)
    }
}

impl Bound for u128 {
    fn next_or_max(self) -> Self {
        self.saturating_add(1)
    }
}

/// The first address that two interval lists share, if any.
pub fn first_overlap(a: &Intervals, b: &Intervals) -> Option<IpAddr> {
    fn first<T: Copy + Ord>(a: &[(T, T)], b: &[(T, T)]) -> Option<T> {
        let (mut i, mut j) = (0, 0);
        while i < a.len() && j < b.len() {
            let (lo, hi) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
            if lo <= hi {
                return Some(lo);
            }
            if a[i].1 < b[j].1 { i += 1 } else { j += 1 }
        }
        None
    }
    first(&a.v4, &b.v4).map(|x| IpAddr::V4(x.into())).or_else(|| first(&a.v6, &b.v6).map(|x| IpAddr::V6(x.into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn pods_inside_their_subnet_and_adjacent_ranges_coalesce() {
        let i = Intervals::from_nets(&nets(&[
            "10.1.0.0/16",
            "10.1.0.5/32",
            "10.2.0.0/24",
            "10.2.1.0/24",
            "10.9.0.1/32",
            "fd00::1/128",
            "fd00::/127",
        ]));
        assert_eq!(i.elements_v4(), ["10.1.0.0-10.2.1.255", "10.9.0.1"], "adjacent intervals merge too");
        assert_eq!(i.elements_v6(), ["fd00::-fd00::1"]);
    }

    #[test]
    fn contains_finds_addresses_at_the_edges_only_inside() {
        let i = Intervals::from_nets(&nets(&["10.1.0.0/16", "10.9.0.1/32", "fd00::/127"]));
        for (ip, want) in [
            ("10.1.0.0", true),
            ("10.1.255.255", true),
            ("10.2.0.0", false),
            ("10.0.255.255", false),
            ("10.9.0.1", true),
            ("10.9.0.2", false),
            ("fd00::1", true),
            ("fd00::2", false),
            ("0.0.0.0", false),
        ] {
            assert_eq!(i.contains(ip.parse().unwrap()), want, "{ip}");
        }
    }

    #[test]
    fn entries_keep_addresses_and_leave_names_out() {
        let entries: Vec<AddressEntry> =
            ["203.0.113.0/28", "203.0.113.10-203.0.113.20", "api.example.com", "*.corp.example", "2001:db8::1"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect();
        let i = Intervals::from_entries(&entries);
        assert_eq!(i.elements_v4(), ["203.0.113.0-203.0.113.20"]);
        assert_eq!(i.elements_v6(), ["2001:db8::1"]);
    }

    #[test]
    fn overlap_is_found_or_not() {
        let a = Intervals::from_nets(&nets(&["10.0.0.0/24", "10.5.0.0/16"]));
        let b = Intervals::from_nets(&nets(&["10.5.3.4/32"]));
        let c = Intervals::from_nets(&nets(&["10.6.0.0/16", "fd00::/64"]));
        assert_eq!(first_overlap(&a, &b), Some("10.5.3.4".parse().unwrap()));
        assert_eq!(first_overlap(&a, &c), None);
        assert_eq!(first_overlap(&b, &a), Some("10.5.3.4".parse().unwrap()));
    }
}
