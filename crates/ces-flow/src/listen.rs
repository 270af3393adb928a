//! The syslog listener for AFM's log publisher (docs/flows.md, "From the BIG-IP"): UDP datagrams, and TCP with
//! either framing (RFC 6587 octet counting, or one message per line). Every message is hostile input: messages are
//! bounded (64 KiB), connections are bounded (64 at once; idle ones are closed after 5 minutes), and a line that
//! does not read as an AFM network event is counted (`afm-syslog`, `malformed`), never fatal.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jiff::Timestamp;

use crate::afm::{self, AfmIndex};
use crate::pipeline::Pipeline;

/// The longest message taken.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// TCP connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// How AFM's messages are read, and what their names mean: kept up to date by the controller after each apply.
#[derive(Clone, Debug, Default)]
pub struct AfmSettings {
    pub index: AfmIndex,
    /// The log profile's storage format (for a delimited body), and its delimiter.
    pub fields: Vec<String>,
    pub delimiter: char,
}

fn handle(msg: &str, settings: &RwLock<AfmSettings>, p: &Pipeline) {
    let s = settings.read().unwrap_or_else(|e| e.into_inner());
    let obs = afm::parse(msg, &s.fields, s.delimiter).and_then(|ev| s.index.observation(&ev, Timestamp::now()));
    match obs {
        Ok(o) => p.observe("afm-syslog", o),
        Err(_) => p.lost("afm-syslog", "malformed", 1),
    }
}

/// Reads the messages of one TCP connection until it ends.
fn serve(stream: TcpStream, settings: &RwLock<AfmSettings>, p: &Pipeline, stop: &AtomicBool) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(300)));
    let mut r = BufReader::with_capacity(MAX_MESSAGE, stream);
    while !stop.load(Ordering::Relaxed) {
        let head = match r.fill_buf() {
            Ok([]) | Err(_) => return,
            Ok(b) => b[0],
        };
        if head.is_ascii_digit() {
            // Octet counting: LEN SP MSG.
            let mut len = Vec::new();
            if r.by_ref().take(8).read_until(b' ', &mut len).is_err() || len.last() != Some(&b' ') {
                p.lost("afm-syslog", "malformed", 1);
                return;
            }
            let n: usize = match std::str::from_utf8(&len[..len.len() - 1]).ok().and_then(|s| s.parse().ok()) {
                Some(n) if n <= MAX_MESSAGE => n,
                _ => {
                    p.lost("afm-syslog", "malformed", 1);
                    return;
                }
            };
            let mut msg = vec![0u8; n];
            if r.read_exact(&mut msg).is_err() {
                return;
            }
            handle(&String::from_utf8_lossy(&msg), settings, p);
        } else {
            let mut line = Vec::new();
            match r.by_ref().take(MAX_MESSAGE as u64 + 1).read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line.len() > MAX_MESSAGE => {
                    p.lost("afm-syslog", "malformed", 1);
                    return;
                }
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    if !text.trim().is_empty() {
                        handle(text.trim_end(), settings, p);
                    }
                }
            }
        }
    }
}

/// Listens on `addr`, UDP and TCP, until `stop`. Returns the address bound (a port 0 gets one).
pub fn listen(
    addr: SocketAddr,
    settings: Arc<RwLock<AfmSettings>>,
    pipeline: Arc<Pipeline>,
    stop: Arc<AtomicBool>,
) -> Result<SocketAddr, String> {
    let tcp = TcpListener::bind(addr).map_err(|e| format!("syslog listener {addr}: {e}"))?;
    let bound = tcp.local_addr().map_err(|e| e.to_string())?;
    let udp = UdpSocket::bind(bound).map_err(|e| format!("syslog listener {bound} (udp): {e}"))?;
    udp.set_read_timeout(Some(Duration::from_millis(200))).map_err(|e| e.to_string())?;
    let (s, p, st) = (settings.clone(), pipeline.clone(), stop.clone());
    std::thread::Builder::new()
        .name("ces-syslog-udp".into())
        .spawn(move || {
            let mut buf = vec![0u8; MAX_MESSAGE];
            while !st.load(Ordering::Relaxed) {
                if let Ok(n) = udp.recv(&mut buf) {
                    handle(&String::from_utf8_lossy(&buf[..n]), &s, &p);
                }
            }
        })
        .map_err(|e| e.to_string())?;
    tcp.set_nonblocking(true).map_err(|e| e.to_string())?;
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("ces-syslog-tcp".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((conn, _)) => {
                        if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                            pipeline.lost("afm-syslog", "too-many-connections", 1);
                            continue;
                        }
                        let _ = conn.set_nonblocking(false);
                        open.fetch_add(1, Ordering::Relaxed);
                        let (s, p, st, o) = (settings.clone(), pipeline.clone(), stop.clone(), open.clone());
                        let spawned = std::thread::Builder::new().name("ces-syslog-conn".into()).spawn(move || {
                            serve(conn, &s, &p, &st);
                            o.fetch_sub(1, Ordering::Relaxed);
                        });
                        if spawned.is_err() {
                            open.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::attribute::Attributor;
    use crate::history::PodHistory;

    fn lost(p: &Pipeline, reason: &str) -> u64 {
        let l = p.stats.lost.lock().unwrap();
        l.get(&("afm-syslog".to_string(), reason.to_string())).copied().unwrap_or(0)
    }

    #[test]
    fn oversized_and_garbled_messages_are_counted_and_the_listener_goes_on() {
        let p = Arc::new(Pipeline::start(None, Vec::new(), Attributor::new(PodHistory::new(60)), 1024));
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::new(RwLock::new(AfmSettings::default()));
        let addr = listen("127.0.0.1:0".parse().unwrap(), s, p.clone(), stop.clone()).unwrap();
        let wait = |what: &dyn Fn() -> bool| {
            let t = std::time::Instant::now();
            while !what() {
                assert!(t.elapsed() < Duration::from_secs(10), "timed out");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        // An octet count beyond the bound closes the connection.
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"99999999 x").unwrap();
        wait(&|| lost(&p, "malformed") == 1);
        // A line longer than 64 KiB.
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(&vec![b'a'; MAX_MESSAGE + 10]).unwrap();
        c.write_all(b"\n").unwrap();
        wait(&|| lost(&p, "malformed") == 2);
        // Binary junk over UDP.
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        u.send_to(&[0xff, 0x00, 0x13, 0x37], addr).unwrap();
        wait(&|| lost(&p, "malformed") == 3);
        // A good message still reads afterwards.
        let good = r#"<134>1 2026-12-06T18:00:00Z b tmm 1 1 [F5@12276 action="Drop" acl_rule_name="r" dest_ip="192.0.2.1" dest_port="1" ip_protocol="TCP" source_ip="10.0.0.1" source_port="2"] -"#;
        u.send_to(good.as_bytes(), addr).unwrap();
        wait(&|| p.stats.received.load(Ordering::Relaxed) == 1);
        assert_eq!(lost(&p, "malformed"), 3);
        stop.store(true, Ordering::Relaxed);
        p.close();
    }
}
