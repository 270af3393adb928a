//! What a DNS answer teaches: which addresses each name has, for how long.
//!
//! Only what the asking client will believe is taken: starting from each question's name, the answer section's
//! CNAME chain is followed, and the A and AAAA records of the chain's last name are the addresses of every name on
//! the chain (the queried name and each alias). Records about other names, which a hostile server can add to any
//! answer, teach nothing. A name's lifetime is the shortest TTL on its part of the chain: the client holds the
//! mapping only while every link of it is cached.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::wire::{Data, Message};

/// A chain followed further than this is refused (resolvers stop at 8-16 hops).
pub const MAX_CHAIN: usize = 16;

/// One name's address, valid for `ttl` seconds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Learned {
    pub name: String,
    pub ip: IpAddr,
    pub ttl: u32,
}

/// The addresses a response gives its questions' names (and their aliases), one entry per name and address with the
/// longest TTL given. Nothing for a query, an error response, or an opcode other than QUERY.
pub fn learned(msg: &Message) -> Vec<Learned> {
    if !msg.response || msg.opcode != 0 || msg.rcode != 0 {
        return Vec::new();
    }
    let mut out: BTreeMap<(String, IpAddr), u32> = BTreeMap::new();
    for q in &msg.questions {
        // The chain: names and the TTL of the CNAME record leaving each.
        let mut chain: Vec<(&str, u32)> = vec![(q.name.as_str(), u32::MAX)];
        loop {
            let (current, _) = *chain.last().expect("starts with the question");
            let next = msg.answers.iter().find_map(|r| match &r.data {
                Data::Cname(target) if r.name == current => Some((target.as_str(), r.ttl)),
                _ => None,
            });
            let Some((target, ttl)) = next else { break };
            if chain.iter().any(|(n, _)| *n == target) || chain.len() > MAX_CHAIN {
                // A loop or an endless chain: the client resolves nothing through it.
                chain.clear();
                break;
            }
            chain.last_mut().expect("not empty").1 = ttl;
            chain.push((target, u32::MAX));
        }
        let Some((last, _)) = chain.last().copied() else { continue };
        for r in msg.answers.iter().filter(|r| r.name == last) {
            let ip = match r.data {
                Data::A(a) => IpAddr::V4(a),
                Data::Aaaa(a) => IpAddr::V6(a),
                _ => continue,
            };
            // From the chain's end backwards: each name's lifetime is the least of its links' and the record's.
            let mut ttl = r.ttl;
            for (name, link) in chain.iter().rev() {
                ttl = ttl.min(*link);
                let slot = out.entry((name.to_string(), ip)).or_insert(0);
                *slot = (*slot).max(ttl);
            }
        }
    }
    out.into_iter().map(|((name, ip), ttl)| Learned { name, ip, ttl }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Builder, BuiltData, TYPE_A, TYPE_AAAA, parse};

    fn l(name: &str, ip: &str, ttl: u32) -> Learned {
        Learned { name: name.into(), ip: ip.parse().unwrap(), ttl }
    }

    fn a(ip: &str) -> BuiltData {
        BuiltData::A(ip.parse().unwrap())
    }

    #[test]
    fn a_cname_chain_gives_every_name_its_addresses_with_the_least_ttl_of_its_part() {
        let m = Builder::response(1)
            .question("api.stripe.com", TYPE_A)
            .answer("api.stripe.com", 300, BuiltData::Cname("edge.cdn.example".into()))
            .answer("edge.cdn.example", 20, BuiltData::Cname("pop7.cdn.example".into()))
            .answer("pop7.cdn.example", 60, a("192.0.2.7"))
            .answer("pop7.cdn.example", 60, a("192.0.2.8"))
            .build();
        let got = learned(&parse(&m).unwrap());
        assert_eq!(
            got,
            [
                l("api.stripe.com", "192.0.2.7", 20),
                l("api.stripe.com", "192.0.2.8", 20),
                l("edge.cdn.example", "192.0.2.7", 20),
                l("edge.cdn.example", "192.0.2.8", 20),
                l("pop7.cdn.example", "192.0.2.7", 60),
                l("pop7.cdn.example", "192.0.2.8", 60),
            ]
        );
    }

    #[test]
    fn records_off_the_chain_teach_nothing() {
        // A hostile server answers a question about its own name and slips in an address for another.
        let m = Builder::response(1)
            .question("evil.example", TYPE_A)
            .answer("evil.example", 60, a("198.51.100.1"))
            .answer("api.stripe.com", 60, a("198.51.100.66"))
            .build();
        assert_eq!(learned(&parse(&m).unwrap()), [l("evil.example", "198.51.100.1", 60)]);
    }

    #[test]
    fn loops_errors_and_queries_teach_nothing() {
        let looped = Builder::response(1)
            .question("a.example", TYPE_A)
            .answer("a.example", 60, BuiltData::Cname("b.example".into()))
            .answer("b.example", 60, BuiltData::Cname("a.example".into()))
            .answer("a.example", 60, a("192.0.2.1"))
            .build();
        assert!(learned(&parse(&looped).unwrap()).is_empty());
        let mut nxdomain = Builder::response(1).question("a.example", TYPE_A).answer("a.example", 60, a("192.0.2.1"));
        nxdomain.flags |= 3;
        assert!(learned(&parse(&nxdomain.build()).unwrap()).is_empty());
        let mut query = Builder::response(1).question("a.example", TYPE_A).answer("a.example", 60, a("192.0.2.1"));
        query.flags = 0x0100;
        assert!(learned(&parse(&query.build()).unwrap()).is_empty());
    }

    #[test]
    fn an_edns_opt_record_in_the_additional_section_changes_nothing() {
        let mut m = Builder::response(1).question("a.example", TYPE_A).answer("a.example", 30, a("192.0.2.1")).build();
        m[11] = 1; // ARCOUNT
        // OPT: root owner, type 41, UDP size 1232, extended flags (DO), no options.
        m.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0x80, 0, 0, 0]);
        assert_eq!(learned(&parse(&m).unwrap()), [l("a.example", "192.0.2.1", 30)]);
    }

    #[test]
    fn several_questions_and_both_families() {
        let m = Builder::response(1)
            .question("a.example", TYPE_A)
            .question("b.example", TYPE_AAAA)
            .answer("a.example", 5, a("192.0.2.1"))
            .answer("b.example", 7, BuiltData::Aaaa("2001:db8::b".parse().unwrap()))
            .answer("a.example", 9, a("192.0.2.1"))
            .build();
        assert_eq!(
            learned(&parse(&m).unwrap()),
            [l("a.example", "192.0.2.1", 9), l("b.example", "2001:db8::b", 7)],
            "one entry per name and address, with the longest TTL"
        );
    }
}
