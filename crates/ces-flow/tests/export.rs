//! Export against real receivers from Debian (docs/flows.md, "Export"): rsyslog over TCP with octet counting, and over
//! TLS with a private CA; pmacct's nfacctd for IPFIX, with CES's enterprise elements defined as custom primitives.
//! Records of both families and every field go through the real exporters; what the receivers wrote is read back
//! and compared field by field. Needs rsyslog, rsyslog-gnutls and pmacct (`scripts/test.sh` installs them); fails,
//! never skips, without them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ces_flow::export::{self, SyslogTarget, TlsSettings};
use ces_flow::record::{Counts, FlowRecord, Kind, Nat, Outcome, RuleRef, Verdict};

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ces-export-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn wait(what: impl Fn() -> bool, describe: impl Fn() -> String) {
    let start = Instant::now();
    while !what() {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out waiting: {}", describe());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Records with every field, both families, a translated source, audit hits, odd characters.
fn records() -> Vec<FlowRecord> {
    (0..40u32)
        .map(|i| {
            let t: jiff::Timestamp = "2026-12-06T10:00:00Z".parse().unwrap();
            let mut r =
                FlowRecord::packet(t + jiff::SignedDuration::from_millis(i as i64 * 37), "payments", Verdict::Accept);
            r.kind = if i % 3 == 0 { Kind::Packet } else { Kind::Connection };
            let v6 = i % 4 == 0;
            r.source.ip =
                Some(if v6 { format!("fd00:10::{}", i + 1) } else { format!("10.10.0.{}", i + 1) }.parse().unwrap());
            r.source.port = Some(40_000 + i as u16);
            r.source.namespace = Some("payments".into());
            r.source.pod = Some(format!("checkout-{i}"));
            r.destination.ip = Some(
                if v6 { format!("2001:db8::{}", i + 1) } else { format!("198.51.100.{}", i + 1) }.parse().unwrap(),
            );
            r.destination.port = Some(443);
            r.destination.host = (i % 2 == 0).then(|| "api.stripe.com".to_string());
            r.destination.external_service = Some("payments/stripe".into());
            r.protocol = if i % 5 == 0 { "udp" } else { "tcp" }.into();
            r.verdict = match i % 3 {
                0 => Verdict::Drop,
                1 => Verdict::Accept,
                _ => Verdict::Reject,
            };
            r.rule = Some(RuleRef {
                rule: format!("ServiceEgressRule/payments/checkout-\"q\"]-{i}"),
                context: "service".into(),
                mode: "enforce".into(),
            });
            if i % 7 == 0 {
                r.audit = vec!["ClusterEgressRule/audit-a".into(), "ClusterEgressRule/audit-b".into()];
            }
            if r.kind == Kind::Connection {
                r.end = Some(r.time + jiff::SignedDuration::from_secs(3));
                r.packets = Counts { out: 3 + i as u64, back: 2 + i as u64 };
                r.bytes = Counts { out: 300 + i as u64, back: 2000 + i as u64 };
            }
            r.outcome =
                [Outcome::Completed, Outcome::Reset, Outcome::NoAnswer, Outcome::IcmpUnreachable][i as usize % 4];
            if i % 6 == 0 && !v6 {
                r.nat = Some(Nat { ip: "203.0.113.7".parse().unwrap(), port: Some(41_000 + i as u16) });
            }
            r
        })
        .collect()
}

fn rsyslog(d: &Path, port: u16, tls: Option<(&Path, &Path, &Path)>) -> Daemon {
    let out = d.join("out.log");
    let mut conf = format!("global(workDirectory=\"{}\"", d.display());
    if let Some((ca, cert, key)) = tls {
        conf += &format!(
            " defaultNetstreamDriver=\"gtls\" defaultNetstreamDriverCAFile=\"{}\" defaultNetstreamDriverCertFile=\"{}\" defaultNetstreamDriverKeyFile=\"{}\"",
            ca.display(),
            cert.display(),
            key.display()
        );
    }
    conf += ")\n";
    if tls.is_some() {
        conf += "module(load=\"imtcp\" streamDriver.name=\"gtls\" streamDriver.mode=\"1\" streamDriver.authMode=\"anon\")\n";
    } else {
        conf += "module(load=\"imtcp\")\n";
    }
    conf += &format!("input(type=\"imtcp\" port=\"{port}\" address=\"127.0.0.1\")\n");
    conf += "template(name=\"raw\" type=\"string\" string=\"%rawmsg%\\n\")\n";
    conf += &format!("*.* action(type=\"omfile\" file=\"{}\" template=\"raw\")\n", out.display());
    std::fs::write(d.join("rsyslog.conf"), conf).unwrap();
    let child = Command::new("rsyslogd")
        .args(["-n", "-f"])
        .arg(d.join("rsyslog.conf"))
        .arg("-i")
        .arg(d.join("rsyslog.pid"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("rsyslog.err")).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("rsyslogd: {e} (scripts/test.sh installs rsyslog and rsyslog-gnutls)"));
    let daemon = Daemon(child);
    wait(
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        || std::fs::read_to_string(d.join("rsyslog.err")).unwrap_or_default(),
    );
    daemon
}

/// The records rsyslog wrote: each line's MSG is the record; its structured data is compared with it too.
fn received(d: &Path) -> Vec<FlowRecord> {
    std::fs::read_to_string(d.join("out.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let (head, json) = l.split_once("] {").map(|(h, j)| (h, format!("{{{j}"))).expect("SD then MSG");
            let r = FlowRecord::from_json_line(&json).unwrap_or_else(|e| panic!("{e}: {l}"));
            assert!(head.starts_with(&format!("<{}>1 ", if r.verdict == Verdict::Accept { 134 } else { 132 })), "{l}");
            // The structured data says the same as the record.
            let sd = &head[head.find("[ces@32473 ").expect("CES's SD element")..];
            let rule = r.rule.as_ref().unwrap().rule.replace('"', "\\\"").replace(']', "\\]");
            assert!(sd.contains(&format!("rule=\"{rule}\"")), "{sd}");
            assert!(sd.contains(&format!("pod=\"{}\"", r.source.pod.as_deref().unwrap())), "{sd}");
            assert!(sd.contains(&format!("verdict=\"{}\"", r.verdict.as_str())), "{sd}");
            assert!(sd.contains(&format!("bytesIn=\"{}\"", r.bytes.back)), "{sd}");
            r
        })
        .collect()
}

#[test]
fn rsyslog_receives_every_record_over_tcp_and_verified_tls() {
    let want = records();
    // TCP, octet-counted.
    let d = dir("tcp");
    let port = free_tcp_port();
    let _rs = rsyslog(&d, port, None);
    let e =
        export::syslog(SyslogTarget::parse(&format!("tcp://127.0.0.1:{port}"), None, false).unwrap(), 1000).unwrap();
    e.offer(&want);
    wait(|| received(&d).len() >= want.len(), || format!("{} of {}", received(&d).len(), want.len()));
    e.stop(Duration::from_secs(1));
    assert_eq!(received(&d), want, "field by field");

    // TLS: the server's certificate is signed by a private CA, for the name localhost.
    let d = dir("tls");
    let ca = rcgen::generate_simple_self_signed(vec!["CES test CA".into()]).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca.key_pair).unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca.key_pair).unwrap();
    let (ca_pem, cert_pem, key_pem) = (d.join("ca.pem"), d.join("cert.pem"), d.join("key.pem"));
    std::fs::write(&ca_pem, ca_cert.pem()).unwrap();
    std::fs::write(&cert_pem, server_cert.pem()).unwrap();
    std::fs::write(&key_pem, server_key.serialize_pem()).unwrap();
    let port = free_tcp_port();
    let _rs = rsyslog(&d, port, Some((&ca_pem, &cert_pem, &key_pem)));
    // Verified by default: without the CA, the WebPKI roots refuse the certificate and nothing is sent.
    let unverified = SyslogTarget::parse(&format!("tls://localhost:{port}"), None, false).unwrap();
    let e = export::syslog(unverified, 1000).unwrap();
    e.offer(&want[..3]);
    wait(|| e.stats.errors.load(std::sync::atomic::Ordering::Relaxed) > 0, || "no verification error".into());
    std::thread::sleep(Duration::from_millis(500));
    assert!(received(&d).is_empty(), "an unverified server got records");
    e.stop(Duration::from_millis(100));
    let mut t = SyslogTarget::parse(&format!("tls://localhost:{port}"), Some(ca_pem.clone()), false).unwrap();
    assert_eq!(t.tls.as_ref().map(|s| s.server_name.as_str()), Some("localhost"));
    t.tls = Some(TlsSettings { server_name: "localhost".into(), ca: Some(ca_pem), insecure: false });
    let e = export::syslog(t, 1000).unwrap();
    e.offer(&want);
    wait(
        || received(&d).len() >= want.len(),
        || {
            format!(
                "{} of {}: {}",
                received(&d).len(),
                want.len(),
                std::fs::read_to_string(d.join("rsyslog.err")).unwrap_or_default()
            )
        },
    );
    e.stop(Duration::from_secs(1));
    assert_eq!(received(&d), want, "field by field, over TLS");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn a_receiver_that_is_not_there_costs_counted_records_never_a_stall() {
    // Nobody listens: the exporter's queue of 10 fills, everything beyond is counted as lost, and offering returns
    // at once.
    let port = free_tcp_port();
    let e = export::syslog(SyslogTarget::parse(&format!("tcp://127.0.0.1:{port}"), None, false).unwrap(), 10).unwrap();
    let many: Vec<FlowRecord> = records().into_iter().cycle().take(5000).collect();
    let start = Instant::now();
    e.offer(&many);
    assert!(start.elapsed() < Duration::from_secs(1), "offering waited {:?}", start.elapsed());
    assert!(e.lost() >= 5000 - 11, "lost {}", e.lost());
    e.stop(Duration::from_millis(50));
}

/// pmacct prints raw values as dash-separated hex bytes.
fn hex_text(s: &str) -> String {
    let s: String = s.trim().chars().filter(|c| c.is_ascii_hexdigit()).collect();
    let bytes: Vec<u8> = (0..s.len() / 2).filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[test]
fn an_ipfix_collector_decodes_every_record_with_the_ces_elements() {
    let d = dir("ipfix");
    let port = free_udp_port();
    let primitives = [
        ("ces_tenant", 101),
        ("ces_namespace", 102),
        ("ces_pod", 103),
        ("ces_rule", 104),
        ("ces_verdict", 105),
        ("ces_outcome", 110),
    ];
    let mut lst = String::new();
    for (name, id) in primitives {
        lst += &format!("name={name} field_type=32473:{id} len=vlen semantics=raw\n");
    }
    std::fs::write(d.join("primitives.lst"), lst).unwrap();
    let aggregate: Vec<&str> = ["src_host", "dst_host", "src_port", "dst_port", "proto"]
        .into_iter()
        .chain(primitives.iter().map(|p| p.0))
        .collect();
    let conf = format!(
        "daemonize: false\npidfile: {0}/nfacctd.pid\nnfacctd_ip: 127.0.0.1\nnfacctd_port: {port}\nplugins: print\nprint_output: csv\nprint_output_file: {0}/ipfix.csv\nprint_refresh_time: 1\naggregate: {1}\naggregate_primitives: {0}/primitives.lst\n",
        d.display(),
        aggregate.join(", ")
    );
    std::fs::write(d.join("nfacctd.conf"), conf).unwrap();
    let _collector = Daemon(
        Command::new("nfacctd")
            .arg("-f")
            .arg(d.join("nfacctd.conf"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("nfacctd.err")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("nfacctd: {e} (scripts/test.sh installs pmacct)")),
    );
    std::thread::sleep(Duration::from_millis(500));
    let want = records();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let e = export::ipfix(addr, export::DEFAULT_PEN, 7, 1000).unwrap();
    e.offer(&want);
    let read = || -> Vec<BTreeMap<String, String>> {
        let text = std::fs::read_to_string(d.join("ipfix.csv")).unwrap_or_default();
        let mut lines = text.lines();
        let Some(head) = lines.next() else { return Vec::new() };
        let cols: Vec<String> = head.split(',').map(|c| c.to_ascii_lowercase()).collect();
        lines.map(|l| cols.iter().cloned().zip(l.split(',').map(str::to_string)).collect()).collect()
    };
    wait(
        || read().len() >= want.len(),
        || format!("{:?}\n{}", read(), std::fs::read_to_string(d.join("nfacctd.err")).unwrap_or_default()),
    );
    e.stop(Duration::from_millis(200));
    let rows = read();
    for r in &want {
        let row = rows
            .iter()
            .find(|row| {
                row["src_ip"].parse::<IpAddr>().ok() == r.source.ip && row["src_port"].parse().ok() == r.source.port
            })
            .unwrap_or_else(|| panic!("{r:?} not in {rows:?}"));
        assert_eq!(row["dst_ip"].parse::<IpAddr>().ok(), r.destination.ip);
        assert_eq!(row["dst_port"].parse().ok(), r.destination.port);
        assert_eq!(row["protocol"].to_ascii_lowercase(), r.protocol);
        assert_eq!(row["packets"].parse::<u64>().unwrap(), r.packets.out);
        assert_eq!(row["bytes"].parse::<u64>().unwrap(), r.bytes.out);
        assert_eq!(hex_text(&row["ces_tenant"]), r.tenant);
        assert_eq!(hex_text(&row["ces_namespace"]), r.source.namespace.clone().unwrap());
        assert_eq!(hex_text(&row["ces_pod"]), r.source.pod.clone().unwrap());
        assert_eq!(hex_text(&row["ces_rule"]), r.rule.as_ref().unwrap().rule);
        assert_eq!(hex_text(&row["ces_verdict"]), r.verdict.as_str());
        assert_eq!(hex_text(&row["ces_outcome"]), r.outcome.as_str());
    }
    let _ = std::fs::remove_dir_all(d);
}
