//! Records as JSON match `docs/flow-record.schema.json`: generated records of every shape (IPv4 and IPv6, NAT, audit
//! rules, labels, every kind, origin, verdict and outcome) validate; the schema is strict enough to refuse what a
//! record may not be, and a field the code adds without the schema fails here.

use ces_flow::record::{Counts, FlowRecord, JSON_SCHEMA, Kind, Nat, Origin, Outcome, RuleRef, Verdict};
use serde_json::{Value, json};

fn validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(JSON_SCHEMA).expect("the schema is JSON");
    jsonschema::options().build(&schema).expect("a usable schema")
}

/// A small deterministic generator (xorshift).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[(self.next() % v.len() as u64) as usize]
    }

    fn maybe(&mut self) -> bool {
        self.next().is_multiple_of(2)
    }
}

fn record(g: &mut Gen) -> FlowRecord {
    let t: jiff::Timestamp = "2026-12-06T10:00:00Z".parse().unwrap();
    let t = t + jiff::SignedDuration::from_micros((g.next() % 10_000_000_000) as i64);
    let mut r = FlowRecord::packet(
        t,
        g.pick(&["payments", "Common", "t-ü"]),
        g.pick(&[Verdict::Accept, Verdict::Drop, Verdict::Reject]),
    );
    r.kind = g.pick(&[Kind::Connection, Kind::Packet]);
    r.origin = g.pick(&[Origin::Gateway, Origin::Bigip, Origin::Import]);
    let v6 = g.maybe();
    let ip = |g: &mut Gen, v6: bool| -> std::net::IpAddr {
        if v6 {
            std::net::Ipv6Addr::from((g.next() as u128) << 64 | g.next() as u128).into()
        } else {
            std::net::Ipv4Addr::from(g.next() as u32).into()
        }
    };
    r.source.ip = if g.next().is_multiple_of(10) { None } else { Some(ip(g, v6)) };
    r.destination.ip = Some(ip(g, v6));
    if g.maybe() {
        r.source.port = Some(g.next() as u16);
        r.destination.port = Some(g.next() as u16);
    }
    if g.maybe() {
        r.source.namespace = Some("payments".into());
        r.source.pod = Some(format!("checkout-{}", g.next() % 100));
        r.source.labels.insert("app".into(), "checkout".into());
    }
    if g.maybe() {
        r.destination.host = Some("api.stripe.com".into());
        r.destination.external_service = Some("payments/stripe".into());
    }
    r.protocol = g.pick(&["tcp", "udp", "icmp", "132"]).to_string();
    if !g.next().is_multiple_of(5) {
        r.rule = Some(RuleRef {
            rule: g.pick(&["NamespaceEgressRule/payments/out", "ClusterEgressRule/dns", "Tenant/payments"]).into(),
            context: g.pick(&["cluster", "namespace", "service", "default"]).into(),
            mode: g.pick(&["enforce", "audit"]).into(),
        });
    }
    if g.maybe() {
        r.audit = vec!["ClusterEgressRule/watch".into()];
    }
    if r.kind == Kind::Connection {
        r.end = Some(t + jiff::SignedDuration::from_secs(3));
        r.packets = Counts { out: g.next() % 1000, back: g.next() % 1000 };
        r.bytes = Counts { out: g.next(), back: g.next() % 1_000_000 };
        r.outcome = g.pick(&[
            Outcome::Completed,
            Outcome::Reset,
            Outcome::NoAnswer,
            Outcome::IcmpUnreachable,
            Outcome::Unknown,
        ]);
        if g.maybe() {
            r.nat = Some(Nat { ip: ip(g, v6), port: if g.maybe() { Some(g.next() as u16) } else { None } });
        }
    }
    r
}

#[test]
fn generated_records_match_the_schema_and_read_back_the_same() {
    let v = validator();
    let mut g = Gen(0x2545_f491_4f6c_dd1d);
    for _ in 0..5000 {
        let r = record(&mut g);
        let j = serde_json::to_value(&r).unwrap();
        if let Err(e) = v.validate(&j) {
            panic!("{j:#}\ndoes not match the schema: {e}");
        }
        assert_eq!(FlowRecord::from_json_line(&j.to_string()).unwrap(), r);
    }
}

#[test]
fn the_schema_refuses_what_a_record_may_not_be() {
    let v = validator();
    let good = serde_json::to_value(record(&mut Gen(7))).unwrap();
    assert!(v.is_valid(&good));
    type Change = Box<dyn Fn(&mut Value)>;
    let bad: Vec<(&str, Change)> = vec![
        ("another version", Box::new(|r| r["v"] = json!(2))),
        ("an unknown verdict", Box::new(|r| r["verdict"] = json!("maybe"))),
        ("no tenant", Box::new(|r| drop(r.as_object_mut().unwrap().remove("tenant")))),
        ("an unknown field", Box::new(|r| r["extra"] = json!(1))),
        ("a port beyond 65535", Box::new(|r| r["destination"]["port"] = json!(70000))),
        ("a time with an offset", Box::new(|r| r["time"] = json!("2026-12-06T10:00:00+01:00"))),
        ("an address that is none", Box::new(|r| r["destination"]["ip"] = json!("example.com"))),
        ("negative bytes", Box::new(|r| r["bytes"] = json!({"out": -1, "in": 0}))),
        ("an unknown mode", Box::new(|r| r["rule"] = json!({"rule": "X/y", "context": "namespace", "mode": "dry"}))),
    ];
    for (what, change) in bad {
        let mut r = good.clone();
        change(&mut r);
        assert!(!v.is_valid(&r), "the schema took {what}: {r:#}");
    }
}
