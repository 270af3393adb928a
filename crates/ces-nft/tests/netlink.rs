//! Element updates over netlink against the real kernel (root, nftables, iproute2): after each update the table
//! must list exactly as the same ruleset loaded whole by `nft` in a fresh namespace. Fails, never skips, without them.

use std::collections::BTreeMap;
use std::process::Command;

use ces_nft::apply::{Applied, Applier, Nft};
use ces_nft::{Chain, NftSet, Ruleset, SetKind};

struct Netns(String);

impl Netns {
    fn new(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        let ok = Command::new("ip").args(["netns", "add", name]).status().is_ok_and(|s| s.success());
        assert!(ok, "this test needs root and iproute2 (`ip netns add` failed); scripts/test.sh installs them");
        Netns(name.to_string())
    }

    /// The table's listing, its sets, maps and chains in name order (the kernel lists them in creation order).
    fn listing(&self, table: &str) -> String {
        let text = Nft::in_netns(&self.0).list_table(table).expect("nft runs").expect("the table exists");
        let mut blocks: Vec<&str> = text.split("\n\n").collect();
        blocks.sort_by_key(|b| b.trim_start_matches("table inet cesnl {\n").split_whitespace().nth(1).unwrap_or(""));
        blocks.join("\n\n")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn set(kind: SetKind, elements: &[String]) -> NftSet {
    NftSet { kind, elements: elements.to_vec() }
}

/// A table with plain sets of both families, a verdict map, and chains that use them.
fn ruleset(v4: &[String], v6: &[String], map: &[String], big: &[String]) -> Ruleset {
    let sets: BTreeMap<String, NftSet> = [
        ("s0_v4".to_string(), set(SetKind::V4, v4)),
        ("s0_v6".to_string(), set(SetKind::V6, v6)),
        ("s1_v4".to_string(), set(SetKind::V4, big)),
        ("tenants_v4".to_string(), set(SetKind::VerdictMapV4, map)),
    ]
    .into();
    Ruleset {
        table: "cesnl".into(),
        sets,
        chains: vec![
            Chain {
                name: "forward".into(),
                hook: Some("type filter hook forward priority filter; policy accept;".into()),
                rules: vec!["ip saddr vmap @tenants_v4".into()],
            },
            Chain {
                name: "t0".into(),
                hook: None,
                rules: vec![
                    "ip saddr @s0_v4 counter drop".into(),
                    "ip6 saddr @s0_v6 counter drop".into(),
                    "ip saddr @s1_v4 counter accept".into(),
                ],
            },
            Chain { name: "t1".into(), hook: None, rules: vec!["counter accept".into()] },
        ],
        ..Ruleset::default()
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// 10.200.x.y hosts, every other address, so that none coalesce.
fn hosts(from: u32, n: u32) -> Vec<String> {
    (from..from + n).map(|i| std::net::Ipv4Addr::from(0x0ac8_0000 + 2 * i).to_string()).collect()
}

#[test]
fn element_updates_over_netlink_leave_the_table_as_a_whole_load_would() {
    let live = Netns::new("cesnl-live");
    let fresh = Netns::new("cesnl-fresh");
    let mut applier = Applier::new(Nft::in_netns(&live.0));

    let steps = [
        ruleset(
            &strings(&["10.0.0.1", "10.0.1.0-10.0.1.255", "10.9.0.7"]),
            &strings(&["fd00::1", "fd00:1::-fd00:1::ff"]),
            &strings(&["10.0.0.0-10.0.255.255 : jump t0", "10.1.0.5 : jump t1"]),
            &hosts(0, 1500),
        ),
        // A pod moves; an interval grows over a host it now touches; a map element moves to another chain; a
        // thousand hosts come and go (more than one netlink message).
        ruleset(
            &strings(&["10.0.0.2", "10.0.1.0-10.0.2.0", "10.9.0.7"]),
            &strings(&["fd00::2", "fd00:1::-fd00:1::ff"]),
            &strings(&["10.0.0.0-10.0.255.255 : jump t1", "10.1.0.6 : jump t1"]),
            &hosts(1000, 1500),
        ),
        // Sets empty out, and fill again.
        ruleset(&[], &[], &[], &hosts(0, 3)),
        ruleset(
            &strings(&["10.0.0.3-10.0.0.4"]),
            &strings(&["fd00::3"]),
            &strings(&["10.1.0.0-10.1.255.255 : jump t0"]),
            &hosts(5, 2),
        ),
    ];
    assert_eq!(applier.apply(&steps[0], true).expect("first load"), Applied::Replaced);
    for (i, rs) in steps.iter().enumerate().skip(1) {
        let applied = applier.apply(rs, false).unwrap_or_else(|e| panic!("step {i}: {e}"));
        assert!(matches!(applied, Applied::Updated(_)), "step {i}: {applied:?}");
        let _ = Nft::in_netns(&fresh.0).run("delete table inet cesnl\n");
        Nft::in_netns(&fresh.0).run(&rs.to_text()).expect("a whole load");
        assert_eq!(live.listing("cesnl"), fresh.listing("cesnl"), "step {i}: netlink updates differ from a whole load");
    }

    // An update the kernel refuses (its set is gone) fails whole, and the next apply replaces the table.
    Nft::in_netns(&live.0)
        .run("flush chain inet cesnl t0\ndelete set inet cesnl s1_v4\n")
        .expect("tamper with the table");
    let next = ruleset(&[], &[], &[], &hosts(100, 2));
    let err = applier.apply(&next, false).expect_err("the set is gone");
    assert!(err.to_string().contains("refused"), "{err}");
    assert_eq!(applier.apply(&next, false).expect("replaced"), Applied::Replaced);
    let _ = Nft::in_netns(&fresh.0).run("delete table inet cesnl\n");
    Nft::in_netns(&fresh.0).run(&next.to_text()).unwrap();
    assert_eq!(live.listing("cesnl"), fresh.listing("cesnl"));
}

#[test]
fn intervals_at_the_ends_of_the_address_space_go_through_nft() {
    let live = Netns::new("cesnl-ends");
    let mut applier = Applier::new(Nft::in_netns(&live.0));
    let a = ruleset(&strings(&["10.0.0.1"]), &[], &[], &[]);
    let b = ruleset(&strings(&["0.0.0.0-10.0.0.1", "200.0.0.0-255.255.255.255"]), &strings(&["::-fd00::1"]), &[], &[]);
    applier.apply(&a, true).unwrap();
    for set in ["s0_v4", "s0_v6"] {
        let carried = ces_nft::set_update(set, &a.sets[set], &b.sets[set]);
        assert!(carried.is_none(), "netlink does not carry intervals touching either end ({set})");
    }
    assert!(matches!(applier.apply(&b, false).unwrap(), Applied::Updated(_)), "nft updates the elements instead");
    let listing = live.listing("cesnl");
    assert!(listing.contains("0.0.0.0-10.0.0.1"), "{listing}");
    assert!(listing.contains("200.0.0.0-255.255.255.255"), "{listing}");
}
