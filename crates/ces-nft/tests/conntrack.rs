//! Conntrack events against the real kernel (root, nftables, iproute2): a connection accepted by a line that writes a
//! tag id into its label comes back, at its end, with that id, its counters both ways and its timestamps. Fails,
//! never skips, without them.

use std::process::Command;

use ces_nft::conntrack::{CtKind, EventSocket, Received};
use ces_nft::tags::{id_from_labels, label_statements};

fn sh(ns: &str, args: &[&str]) {
    let ok = Command::new("ip").args(["netns", "exec", ns]).args(args).status().is_ok_and(|s| s.success());
    assert!(ok, "`{}` failed in {ns} (this test needs root, iproute2 and nftables)", args.join(" "));
}

#[test]
fn a_connections_end_carries_the_tag_id_its_accepting_line_wrote() {
    let ns = format!("cesct{}", std::process::id() % 100_000);
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    let ok = Command::new("ip").args(["netns", "add", &ns]).status().is_ok_and(|s| s.success());
    assert!(ok, "this test needs root and iproute2 (`ip netns add` failed); scripts/test.sh installs them");
    sh(&ns, &["ip", "link", "set", "lo", "up"]);
    let id: u16 = 0x2a5;
    let table = format!(
        "table inet t {{\n chain out {{\n  type filter hook output priority 0;\n  ct state new udp dport 9 {} accept\n }}\n}}\n",
        label_statements(id)
    );
    std::fs::write(format!("/tmp/{ns}.nft"), &table).unwrap();
    sh(&ns, &["nft", "-f", &format!("/tmp/{ns}.nft")]);
    let path = format!("/run/netns/{ns}");
    let events = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: setns(2) on a namespace fd, for this thread only.
        assert_eq!(unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) }, 0);
        ces_nft::conntrack::enable_accounting().unwrap();
        let mut s = EventSocket::open().unwrap();
        // A datagram both ways on 127.0.0.1:9, then the connection is ended by a flush.
        let server = std::net::UdpSocket::bind("127.0.0.1:9").unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"hello", "127.0.0.1:9").unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = server.recv_from(&mut buf).unwrap();
        server.send_to(&buf[..n], from).unwrap();
        client.recv(&mut buf).unwrap();
        ces_nft::conntrack::flush().unwrap();
        let mut got = Vec::new();
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_secs(3) {
            if let Received::Events(e) = s.recv().unwrap() {
                got.extend(e);
            }
            if got.iter().any(|e| e.kind == CtKind::Destroy && e.orig.dport == Some(9)) {
                break;
            }
        }
        got
    })
    .join()
    .unwrap();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    let _ = std::fs::remove_file(format!("/tmp/{ns}.nft"));
    let new = events.iter().find(|e| e.kind == CtKind::New && e.orig.dport == Some(9));
    let end = events.iter().find(|e| e.kind == CtKind::Destroy && e.orig.dport == Some(9));
    let (new, end) = (new.expect("a NEW event"), end.unwrap_or_else(|| panic!("no DESTROY event in {events:?}")));
    assert_eq!(id_from_labels(&new.labels), id, "NEW carries the label: {:?}", new.labels);
    assert_eq!(new.id, end.id, "both events name the same connection");
    // The kernel does not repeat the labels at the end: the reader remembers them from the beginning.
    let mut open = ces_nft::flows::OpenConnections::default();
    assert_eq!((open.id(new), open.id(end)), (id, id));
    assert_eq!(end.counters_orig, (1, 33), "one datagram of 5 bytes out (IPv4 20 + UDP 8)");
    assert_eq!(end.counters_reply, (1, 33));
    assert!(end.start.is_some() && end.stop.is_some() && end.stop >= end.start, "{end:?}");
}
