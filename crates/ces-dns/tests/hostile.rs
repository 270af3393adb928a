//! Hostile DNS messages: random bytes, valid answers mutated byte by byte, truncated, with pointers aimed anywhere.
//! Whatever arrives, nothing panics, and nothing is learned that the message does not say: every learned name is a
//! question's name or on its CNAME chain, every learned address is an A or AAAA record of the message, and a
//! tenant's answer never changes another tenant's sets.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ces_dns::cache::{Learner, Limits, Op, Target};
use ces_dns::tcp::Reassembler;
use ces_dns::wire::{Builder, BuiltData, Data, TYPE_A, TYPE_AAAA, parse};
use proptest::prelude::*;

fn name() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec!["api", "stripe", "com", "x", "cdn", "a-b", "EXAMPLE"]), 1..5)
        .prop_map(|labels| labels.join("."))
}

fn data() -> impl Strategy<Value = BuiltData> {
    prop_oneof![
        any::<u32>().prop_map(|a| BuiltData::A(Ipv4Addr::from(a))),
        // A small pool, so that tenants' answers share addresses.
        (1..6u8).prop_map(|a| BuiltData::A(Ipv4Addr::new(192, 0, 2, a))),
        any::<u128>().prop_map(|a| BuiltData::Aaaa(Ipv6Addr::from(a))),
        name().prop_map(BuiltData::Cname),
        (any::<u16>(), prop::collection::vec(any::<u8>(), 0..20)).prop_map(|(t, d)| BuiltData::Raw(t, d)),
    ]
}

fn message() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u16>(),
        prop::collection::vec((name(), prop::sample::select(vec![TYPE_A, TYPE_AAAA, 255])), 0..3),
        prop::collection::vec((name(), 0..100_000u32, data()), 0..12),
        any::<bool>(),
    )
        .prop_map(|(id, qs, ans, compress)| {
            let mut b = Builder { compress, ..Builder::response(id) };
            for (n, t) in qs {
                b = b.question(&n, t);
            }
            for (n, ttl, d) in ans {
                b = b.answer(&n, ttl, d);
            }
            b.build()
        })
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    /// A compression pointer written anywhere, aimed anywhere.
    Pointer(usize, u16),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), any::<u16>()).prop_map(|(i, p)| Mutation::Pointer(i, p)),
    ]
}

fn mutate(mut m: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for mu in ms {
        if m.is_empty() {
            break;
        }
        match *mu {
            Mutation::Flip(i, b) => {
                let n = m.len();
                m[i % n] ^= b;
            }
            Mutation::Truncate(i) => m.truncate(i % m.len()),
            Mutation::Insert(i, b) => {
                let n = m.len();
                m.insert(i % n, b)
            }
            Mutation::Pointer(i, p) => {
                let i = i % m.len();
                let p = (0xc000 | (p & 0x3fff)).to_be_bytes();
                m[i] = p[0];
                if i + 1 < m.len() {
                    m[i + 1] = p[1];
                }
            }
        }
    }
    m
}

/// Every learned pair is said by the message: a question's name or a CNAME target, and an address record.
fn check_says(m: &[u8]) {
    let Ok(msg) = parse(m) else {
        assert!(ces_dns::learn_from(m).is_err());
        return;
    };
    let mut names: BTreeSet<&str> = msg.questions.iter().map(|q| q.name.as_str()).collect();
    for r in &msg.answers {
        if let Data::Cname(t) = &r.data {
            names.insert(t);
        }
    }
    let addrs: BTreeSet<IpAddr> = msg
        .answers
        .iter()
        .filter_map(|r| match r.data {
            Data::A(a) => Some(IpAddr::V4(a)),
            Data::Aaaa(a) => Some(IpAddr::V6(a)),
            _ => None,
        })
        .collect();
    for l in ces_dns::learned(&msg) {
        assert!(names.contains(l.name.as_str()), "{} is neither asked for nor an alias", l.name);
        assert!(addrs.contains(&l.ip), "{} is no record of the message", l.ip);
        let max_ttl = msg.answers.iter().map(|r| r.ttl).max().unwrap_or(0);
        assert!(l.ttl <= max_ttl);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        check_says(&bytes);
    }

    #[test]
    fn mutated_answers_never_panic_and_teach_only_what_they_say(
        m in message(),
        ms in prop::collection::vec(mutation(), 0..6),
    ) {
        check_says(&mutate(m, &ms));
    }

    #[test]
    fn a_tenants_answers_never_touch_another_tenants_sets(
        msgs in prop::collection::vec((any::<bool>(), message(), prop::collection::vec(mutation(), 0..3)), 1..20),
    ) {
        let entries = |names: &[&str]| names.iter().map(|n| n.parse().unwrap()).collect::<Vec<_>>();
        let mut lr = Learner::new(Limits { max_addresses_per_name: 3, max_names: 4, ..Limits::default() }, true);
        let targets = vec![
            Target { set: "a4".into(), tenant: "A".into(), v6: false, names: entries(&["*.com", "api.stripe.com"]) },
            Target { set: "a6".into(), tenant: "A".into(), v6: true, names: entries(&["*.com"]) },
            Target { set: "b4".into(), tenant: "B".into(), v6: false, names: entries(&["*.com", "x.cdn"]) },
        ];
        lr.retarget(targets, 0);
        let mut now = 0;
        // What each tenant's answers said: an address may be in a tenant's set only if that tenant was told it.
        let mut told: [BTreeSet<IpAddr>; 2] = Default::default();
        for (to_a, m, ms) in msgs {
            now += 700;
            let Ok(learned) = ces_dns::learn_from(&mutate(m, &ms)) else { continue };
            let tenant = if to_a { "A" } else { "B" };
            told[usize::from(!to_a)].extend(learned.iter().map(|l| l.ip));
            for op in lr.observe(tenant, &learned, now) {
                let set = match &op { Op::Put { set, .. } | Op::Delete { set, .. } => set.clone() };
                prop_assert_eq!(set.starts_with('a'), to_a, "{:?} for tenant {}", op, tenant);
                if let Op::Put { ip, comment, .. } = &op {
                    prop_assert_eq!(ip.is_ipv6(), set.ends_with('6'));
                    prop_assert!(comment.starts_with(tenant));
                    prop_assert!(told[usize::from(!to_a)].contains(ip), "{} was never told to {}", ip, tenant);
                }
            }
            // Whatever is held for a tenant, that tenant was told.
            for (t, _, ip, _) in lr.entries(now) {
                prop_assert!(told[usize::from(t != "A")].contains(&ip), "{} holds {} it was never told", t, ip);
            }
        }
        let (names, _, _) = lr.sizes();
        prop_assert!(names <= 8, "at most 4 names per tenant: {}", names);
        lr.check().map_err(TestCaseError::fail)?;
    }

    #[test]
    fn tcp_streams_of_any_segmentation_give_back_the_messages(
        msgs in prop::collection::vec(message(), 1..5),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        isn in any::<u32>(),
    ) {
        let mut stream = Vec::new();
        for m in &msgs {
            stream.extend_from_slice(&(m.len() as u16).to_be_bytes());
            stream.extend_from_slice(m);
        }
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.push(stream.len());
        cuts.sort_unstable();
        let key = ("192.0.2.53".parse().unwrap(), 53, "10.0.0.1".parse().unwrap(), 5353);
        let mut r = Reassembler::new(4);
        r.segment(key, isn, true, false, &[]);
        let (mut at, mut got) = (0, Vec::new());
        for c in cuts {
            let o = r.segment(key, isn.wrapping_add(1).wrapping_add(at as u32), false, false, &stream[at..c]);
            prop_assert!(!o.lost);
            got.extend(o.messages);
            at = c;
        }
        prop_assert_eq!(got, msgs);
    }
}
