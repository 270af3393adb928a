//! Export to the collectors people already run (docs/flows.md, "Export"): RFC 5424 syslog with structured data
//! over TCP (RFC 6587 octet counting) or TLS (RFC 5425, the server verified by default), and IPFIX (RFC 7011) over
//! UDP with IANA elements, RFC 5103 reverse counters and CES enterprise elements.
//!
//! An exporter never blocks the pipeline: records wait in its own bounded queue, sent by its own thread; a full
//! queue (a slow or absent receiver) costs records, counted ([`Exporter::lost`]), never a stall. A broken
//! connection is made again with backoff, and what was queued meanwhile is sent when it is back, up to the queue's
//! size.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use crate::record::{FlowRecord, Kind, Verdict, protocol_number};

/// The enterprise number of CES's own structured-data id and IPFIX elements: 32473 is IANA's number for
/// documentation (RFC 5612), used until CES has its own; a deployment may set another.
pub const DEFAULT_PEN: u32 = 32473;

/// Counters of one exporter.
#[derive(Default)]
pub struct ExportStats {
    pub sent: AtomicU64,
    pub lost: AtomicU64,
    pub errors: AtomicU64,
    pub connected: AtomicBool,
}

/// A running exporter: a bounded queue and the thread that empties it.
pub struct Exporter {
    pub name: String,
    tx: Option<SyncSender<FlowRecord>>,
    pub stats: Arc<ExportStats>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Exporter {
    /// Offers records; those that do not fit in the queue are counted as lost.
    pub fn offer(&self, records: &[FlowRecord]) {
        let Some(tx) = &self.tx else { return };
        for r in records {
            if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(r.clone()) {
                self.stats.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn lost(&self) -> u64 {
        self.stats.lost.load(Ordering::Relaxed)
    }

    /// Stops taking records and gives the thread `wait` to send what is queued; then stops it.
    pub fn stop(mut self, wait: Duration) {
        drop(self.tx.take());
        let deadline = Instant::now() + wait;
        while self.thread.as_ref().is_some_and(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Where and how to send syslog.
#[derive(Clone, Debug)]
pub struct SyslogTarget {
    pub addr: SocketAddr,
    /// With TLS: the name the server's certificate must carry.
    pub tls: Option<TlsSettings>,
    pub pen: u32,
}

#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub server_name: String,
    /// PEM file of the CA(s) to verify the server with; the WebPKI roots without one.
    pub ca: Option<PathBuf>,
    /// Skip verification (never the default).
    pub insecure: bool,
}

impl SyslogTarget {
    /// `tcp://host:port` or `tls://host:port` (the server name is the host).
    pub fn parse(url: &str, ca: Option<PathBuf>, insecure: bool) -> Result<SyslogTarget, String> {
        let (scheme, rest) =
            url.split_once("://").ok_or_else(|| format!("`{url}`: give tcp://HOST:PORT or tls://HOST:PORT"))?;
        let host = rest.rsplit_once(':').map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']')).unwrap_or(rest);
        let addr = std::net::ToSocketAddrs::to_socket_addrs(rest)
            .map_err(|e| format!("`{url}`: {e}"))?
            .next()
            .ok_or_else(|| format!("`{url}`: no address"))?;
        let tls = match scheme {
            "tcp" => None,
            "tls" => Some(TlsSettings { server_name: host.to_string(), ca, insecure }),
            other => return Err(format!("`{url}`: `{other}` is not tcp or tls")),
        };
        Ok(SyslogTarget { addr, tls, pen: DEFAULT_PEN })
    }
}

/// RFC 5424 structured-data value escaping: `"`, `\` and `]` get a backslash.
fn sd_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            o.push('\\');
        }
        o.push(c);
    }
    o
}

/// One record as an RFC 5424 message: `<PRI>1 TIME HOST ces - flow [ces@PEN k="v" ...] JSON`.
pub fn syslog_message(r: &FlowRecord, hostname: &str, pen: u32) -> String {
    let severity = match r.verdict {
        Verdict::Accept => 6,
        Verdict::Drop | Verdict::Reject => 4,
    };
    let pri = 16 * 8 + severity;
    let mut sd = format!("[ces@{pen}");
    let mut p = |k: &str, v: &str| {
        if !v.is_empty() {
            sd += &format!(" {k}=\"{}\"", sd_escape(v));
        }
    };
    let opt = |v: Option<String>| v.unwrap_or_default();
    p("v", &r.v.to_string());
    p("kind", if r.kind == Kind::Connection { "connection" } else { "packet" });
    p("tenant", &r.tenant);
    p("src", &opt(r.source.ip.map(|i| i.to_string())));
    p("sport", &opt(r.source.port.map(|x| x.to_string())));
    p("namespace", &opt(r.source.namespace.clone()));
    p("pod", &opt(r.source.pod.clone()));
    p("dst", &opt(r.destination.ip.map(|i| i.to_string())));
    p("dport", &opt(r.destination.port.map(|x| x.to_string())));
    p("host", &opt(r.destination.host.clone()));
    p("externalService", &opt(r.destination.external_service.clone()));
    p("protocol", &r.protocol);
    p("verdict", r.verdict.as_str());
    p("rule", &opt(r.rule.as_ref().map(|x| x.rule.clone())));
    p("context", &opt(r.rule.as_ref().map(|x| x.context.clone())));
    p("mode", &opt(r.rule.as_ref().map(|x| x.mode.clone())));
    p("audit", &r.audit.join(","));
    p("outcome", r.outcome.as_str());
    p("packetsOut", &r.packets.out.to_string());
    p("packetsIn", &r.packets.back.to_string());
    p("bytesOut", &r.bytes.out.to_string());
    p("bytesIn", &r.bytes.back.to_string());
    p("start", &r.time.to_string());
    p("end", &opt(r.end.map(|e| e.to_string())));
    p("natIp", &opt(r.nat.as_ref().map(|n| n.ip.to_string())));
    p("natPort", &opt(r.nat.as_ref().and_then(|n| n.port).map(|x| x.to_string())));
    sd.push(']');
    let json = serde_json::to_string(r).unwrap_or_default();
    let host = if hostname.is_empty() { "-" } else { hostname };
    format!("<{pri}>1 {} {host} ces - flow {sd} {json}", r.end.unwrap_or(r.time))
}

/// Octet-counting framing (RFC 6587 §3.4.1): `LEN SP MSG`.
pub fn octet_counted(msg: &str) -> Vec<u8> {
    let mut v = format!("{} ", msg.len()).into_bytes();
    v.extend_from_slice(msg.as_bytes());
    v
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// A TLS client configuration: the server verified against `ca` (or the WebPKI roots), unless `insecure`.
fn tls_config(t: &TlsSettings) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    if t.insecure {
        #[derive(Debug)]
        struct Any(Arc<rustls::crypto::CryptoProvider>);
        impl rustls::client::danger::ServerCertVerifier for Any {
            fn verify_server_cert(
                &self,
                _: &CertificateDer<'_>,
                _: &[CertificateDer<'_>],
                _: &rustls::pki_types::ServerName<'_>,
                _: &[u8],
                _: rustls::pki_types::UnixTime,
            ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            fn verify_tls12_signature(
                &self,
                m: &[u8],
                c: &CertificateDer<'_>,
                d: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
                rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
            }
            fn verify_tls13_signature(
                &self,
                m: &[u8],
                c: &CertificateDer<'_>,
                d: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
                rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
            }
            fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
                self.0.signature_verification_algorithms.supported_schemes()
            }
        }
        let cfg = builder.dangerous().with_custom_certificate_verifier(Arc::new(Any(provider))).with_no_client_auth();
        return Ok(Arc::new(cfg));
    }
    let mut roots = rustls::RootCertStore::empty();
    match &t.ca {
        Some(path) => {
            for c in CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))? {
                roots
                    .add(c.map_err(|e| format!("{}: {e}", path.display()))?)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("{}: no certificate in the file", path.display()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(Arc::new(builder.with_root_certificates(roots).with_no_client_auth()))
}

enum Conn {
    Tcp(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.write_all(b),
            Conn::Tls(s) => s.write_all(b).and_then(|_| s.flush()),
        }
    }
}

fn connect(target: &SyslogTarget, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Conn, String> {
    let tcp = TcpStream::connect_timeout(&target.addr, Duration::from_secs(5))
        .map_err(|e| format!("{}: {e}", target.addr))?;
    tcp.set_write_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    match (&target.tls, tls) {
        (Some(t), Some(cfg)) => {
            let name = rustls::pki_types::ServerName::try_from(t.server_name.clone())
                .map_err(|e| format!("{}: {e}", t.server_name))?;
            let mut conn = rustls::ClientConnection::new(cfg.clone(), name).map_err(|e| e.to_string())?;
            let mut tcp = tcp;
            // Complete the handshake now, so that a server that fails verification is an error here.
            while conn.is_handshaking() {
                conn.complete_io(&mut tcp).map_err(|e| format!("TLS with {}: {e}", target.addr))?;
            }
            Ok(Conn::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))))
        }
        _ => Ok(Conn::Tcp(tcp)),
    }
}

/// Starts a syslog exporter with a queue of `queue` records.
pub fn syslog(target: SyslogTarget, queue: usize) -> Result<Exporter, String> {
    let tls = target.tls.as_ref().map(tls_config).transpose()?;
    let (tx, rx) = sync_channel::<FlowRecord>(queue.max(1));
    let stats = Arc::new(ExportStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (s, st) = (stats.clone(), stop.clone());
    let name = format!("syslog {}{}", if target.tls.is_some() { "tls://" } else { "tcp://" }, target.addr);
    let host = hostname();
    let thread = std::thread::Builder::new()
        .name("ces-export-syslog".into())
        .spawn(move || {
            let mut conn: Option<Conn> = None;
            let mut backoff = Duration::from_millis(200);
            let mut pending: Option<Vec<u8>> = None;
            while !st.load(Ordering::Relaxed) {
                let bytes = match pending.take() {
                    Some(b) => b,
                    None => match rx.recv_timeout(Duration::from_millis(100)) {
                        Ok(r) => octet_counted(&syslog_message(&r, &host, target.pen)),
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => break,
                    },
                };
                if conn.is_none() {
                    match connect(&target, tls.as_ref()) {
                        Ok(c) => {
                            conn = Some(c);
                            s.connected.store(true, Ordering::Relaxed);
                            backoff = Duration::from_millis(200);
                        }
                        Err(e) => {
                            s.errors.fetch_add(1, Ordering::Relaxed);
                            eprintln!("ces: flow export to syslog: {e}; retrying in {} ms", backoff.as_millis());
                            pending = Some(bytes);
                            std::thread::sleep(backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                            continue;
                        }
                    }
                }
                match conn.as_mut().expect("connected").write_all(&bytes) {
                    Ok(()) => {
                        s.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        s.errors.fetch_add(1, Ordering::Relaxed);
                        s.connected.store(false, Ordering::Relaxed);
                        eprintln!("ces: flow export to syslog: {e}; reconnecting");
                        conn = None;
                        pending = Some(bytes);
                    }
                }
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(Exporter { name, tx: Some(tx), stats, stop, thread: Some(thread) })
}

/// Starts a sink that writes each record as one JSON line to `out` (`ces gateway --log-file`), flushed per batch.
pub fn json_lines(mut out: Box<dyn Write + Send>, queue: usize) -> Result<Exporter, String> {
    let (tx, rx) = sync_channel::<FlowRecord>(queue.max(1));
    let stats = Arc::new(ExportStats::default());
    stats.connected.store(true, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let (s, st) = (stats.clone(), stop.clone());
    let thread = std::thread::Builder::new()
        .name("ces-export-jsonl".into())
        .spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let first = match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(r) => r,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                };
                let mut n = 0u64;
                let mut ok = true;
                for r in std::iter::once(first).chain(rx.try_iter()) {
                    let line = serde_json::to_string(&r).unwrap_or_default();
                    ok &= writeln!(out, "{line}").is_ok();
                    n += 1;
                }
                ok &= out.flush().is_ok();
                if ok {
                    s.sent.fetch_add(n, Ordering::Relaxed);
                } else {
                    s.errors.fetch_add(1, Ordering::Relaxed);
                    s.lost.fetch_add(n, Ordering::Relaxed);
                }
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(Exporter { name: "json-lines".into(), tx: Some(tx), stats, stop, thread: Some(thread) })
}

/// IPFIX information elements (IANA), and CES's enterprise elements.
mod ie {
    pub const OCTET_DELTA: u16 = 1;
    pub const PACKET_DELTA: u16 = 2;
    pub const PROTOCOL: u16 = 4;
    pub const SRC_PORT: u16 = 7;
    pub const SRC_V4: u16 = 8;
    pub const DST_PORT: u16 = 11;
    pub const DST_V4: u16 = 12;
    pub const SRC_V6: u16 = 27;
    pub const DST_V6: u16 = 28;
    pub const FLOW_START_MS: u16 = 152;
    pub const FLOW_END_MS: u16 = 153;
    pub const POST_NAT_SRC_V4: u16 = 225;
    pub const POST_NAPT_SRC_PORT: u16 = 227;
    pub const FIREWALL_EVENT: u16 = 233;
    pub const POST_NAT_SRC_V6: u16 = 281;
    /// RFC 5103: reverse elements are the forward ones under this enterprise number.
    pub const REVERSE_PEN: u32 = 29305;
    /// CES's own, under the configured enterprise number (variable-length strings). Numbered from 101, so that no
    /// number is also an IANA element of the same template (collectors such as pmacct key a template's fields by
    /// number and would confuse them).
    pub const CES_TENANT: u16 = 101;
    pub const CES_NAMESPACE: u16 = 102;
    pub const CES_POD: u16 = 103;
    pub const CES_RULE: u16 = 104;
    pub const CES_VERDICT: u16 = 105;
    pub const CES_CONTEXT: u16 = 106;
    pub const CES_MODE: u16 = 107;
    pub const CES_HOST: u16 = 108;
    pub const CES_EXTERNAL_SERVICE: u16 = 109;
    pub const CES_OUTCOME: u16 = 110;
    pub const CES_AUDIT: u16 = 111;
}

/// The template of a family: `(element, length, enterprise)`; length 65535 is variable.
fn template(v6: bool, pen: u32) -> Vec<(u16, u16, u32)> {
    let a = if v6 { 16 } else { 4 };
    let (src, dst, nat) =
        if v6 { (ie::SRC_V6, ie::DST_V6, ie::POST_NAT_SRC_V6) } else { (ie::SRC_V4, ie::DST_V4, ie::POST_NAT_SRC_V4) };
    vec![
        (ie::FLOW_START_MS, 8, 0),
        (ie::FLOW_END_MS, 8, 0),
        (src, a, 0),
        (dst, a, 0),
        (ie::SRC_PORT, 2, 0),
        (ie::DST_PORT, 2, 0),
        (ie::PROTOCOL, 1, 0),
        (ie::PACKET_DELTA, 8, 0),
        (ie::OCTET_DELTA, 8, 0),
        (ie::PACKET_DELTA, 8, ie::REVERSE_PEN),
        (ie::OCTET_DELTA, 8, ie::REVERSE_PEN),
        (nat, a, 0),
        (ie::POST_NAPT_SRC_PORT, 2, 0),
        (ie::FIREWALL_EVENT, 1, 0),
        (ie::CES_TENANT, 65535, pen),
        (ie::CES_NAMESPACE, 65535, pen),
        (ie::CES_POD, 65535, pen),
        (ie::CES_RULE, 65535, pen),
        (ie::CES_VERDICT, 65535, pen),
        (ie::CES_CONTEXT, 65535, pen),
        (ie::CES_MODE, 65535, pen),
        (ie::CES_HOST, 65535, pen),
        (ie::CES_EXTERNAL_SERVICE, 65535, pen),
        (ie::CES_OUTCOME, 65535, pen),
        (ie::CES_AUDIT, 65535, pen),
    ]
}

const TEMPLATE_V4: u16 = 256;
const TEMPLATE_V6: u16 = 257;

/// The template set announcing both templates.
pub fn ipfix_template_set(pen: u32) -> Vec<u8> {
    let mut body = Vec::new();
    for (id, v6) in [(TEMPLATE_V4, false), (TEMPLATE_V6, true)] {
        let fields = template(v6, pen);
        body.extend_from_slice(&id.to_be_bytes());
        body.extend_from_slice(&(fields.len() as u16).to_be_bytes());
        for (e, len, pen) in fields {
            if pen == 0 {
                body.extend_from_slice(&e.to_be_bytes());
                body.extend_from_slice(&len.to_be_bytes());
            } else {
                body.extend_from_slice(&(e | 0x8000).to_be_bytes());
                body.extend_from_slice(&len.to_be_bytes());
                body.extend_from_slice(&pen.to_be_bytes());
            }
        }
    }
    let mut set = 2u16.to_be_bytes().to_vec();
    set.extend_from_slice(&((4 + body.len()) as u16).to_be_bytes());
    set.extend(body);
    set
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let b = &b[..b.len().min(65_000)];
    if b.len() < 255 {
        out.push(b.len() as u8);
    } else {
        out.push(255);
        out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(b);
}

fn put_ip(out: &mut Vec<u8>, ip: Option<IpAddr>, v6: bool) {
    match ip {
        Some(IpAddr::V4(a)) if !v6 => out.extend_from_slice(&a.octets()),
        Some(IpAddr::V6(a)) if v6 => out.extend_from_slice(&a.octets()),
        _ => out.extend(std::iter::repeat_n(0u8, if v6 { 16 } else { 4 })),
    }
}

/// One record as a data record of its family's template; `None` for a record without addresses.
pub fn ipfix_data_record(r: &FlowRecord) -> Option<(u16, Vec<u8>)> {
    let dst = r.destination.ip?;
    let v6 = dst.is_ipv6();
    let ms = |t: jiff::Timestamp| t.as_millisecond() as u64;
    let mut o = Vec::with_capacity(160);
    o.extend_from_slice(&ms(r.time).to_be_bytes());
    o.extend_from_slice(&ms(r.end.unwrap_or(r.time)).to_be_bytes());
    put_ip(&mut o, r.source.ip, v6);
    put_ip(&mut o, Some(dst), v6);
    o.extend_from_slice(&r.source.port.unwrap_or(0).to_be_bytes());
    o.extend_from_slice(&r.destination.port.unwrap_or(0).to_be_bytes());
    o.push(protocol_number(&r.protocol).unwrap_or(0));
    o.extend_from_slice(&r.packets.out.to_be_bytes());
    o.extend_from_slice(&r.bytes.out.to_be_bytes());
    o.extend_from_slice(&r.packets.back.to_be_bytes());
    o.extend_from_slice(&r.bytes.back.to_be_bytes());
    put_ip(&mut o, r.nat.as_ref().map(|n| n.ip), v6);
    o.extend_from_slice(&r.nat.as_ref().and_then(|n| n.port).unwrap_or(0).to_be_bytes());
    // firewallEvent: 2 flow deleted (a connection that ended), 3 flow denied, 1 flow created (a logged accept).
    o.push(match (r.kind, r.verdict) {
        (_, Verdict::Drop | Verdict::Reject) => 3,
        (Kind::Connection, _) => 2,
        (Kind::Packet, _) => 1,
    });
    let rule = r.rule.as_ref();
    for s in [
        r.tenant.as_str(),
        r.source.namespace.as_deref().unwrap_or(""),
        r.source.pod.as_deref().unwrap_or(""),
        rule.map_or("", |x| x.rule.as_str()),
        r.verdict.as_str(),
        rule.map_or("", |x| x.context.as_str()),
        rule.map_or("", |x| x.mode.as_str()),
        r.destination.host.as_deref().unwrap_or(""),
        r.destination.external_service.as_deref().unwrap_or(""),
        r.outcome.as_str(),
        &r.audit.join(","),
    ] {
        put_str(&mut o, s);
    }
    Some((if v6 { TEMPLATE_V6 } else { TEMPLATE_V4 }, o))
}

/// An IPFIX message: header, then `sets`.
pub fn ipfix_message(sets: &[Vec<u8>], sequence: u32, domain: u32, export_time: u32) -> Vec<u8> {
    let len = 16 + sets.iter().map(Vec::len).sum::<usize>();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&10u16.to_be_bytes());
    m.extend_from_slice(&(len as u16).to_be_bytes());
    m.extend_from_slice(&export_time.to_be_bytes());
    m.extend_from_slice(&sequence.to_be_bytes());
    m.extend_from_slice(&domain.to_be_bytes());
    for s in sets {
        m.extend_from_slice(s);
    }
    m
}

/// Starts an IPFIX exporter over UDP to `addr`, with a queue of `queue` records. Templates go out first, then with
/// every 20th message and at least every 10 seconds (UDP loses them like anything else).
pub fn ipfix(addr: SocketAddr, pen: u32, domain: u32, queue: usize) -> Result<Exporter, String> {
    let bind: SocketAddr =
        if addr.is_ipv6() { "[::]:0".parse().expect("valid") } else { "0.0.0.0:0".parse().expect("valid") };
    let sock = UdpSocket::bind(bind).map_err(|e| format!("IPFIX to {addr}: {e}"))?;
    sock.connect(addr).map_err(|e| format!("IPFIX to {addr}: {e}"))?;
    let (tx, rx): (SyncSender<FlowRecord>, Receiver<FlowRecord>) = sync_channel(queue.max(1));
    let stats = Arc::new(ExportStats::default());
    stats.connected.store(true, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let (s, st) = (stats.clone(), stop.clone());
    let thread = std::thread::Builder::new()
        .name("ces-export-ipfix".into())
        .spawn(move || {
            let templates = ipfix_template_set(pen);
            let mut sequence: u32 = 0;
            let mut messages = 0u64;
            let mut last_template: Option<Instant> = None;
            let now_s = || jiff::Timestamp::now().as_second() as u32;
            while !st.load(Ordering::Relaxed) {
                let first = match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(r) => r,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                };
                let mut batch = vec![first];
                while batch.len() < 64 {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                // Group by template, and fit each message in 1400 bytes.
                let mut data: Vec<(u16, Vec<u8>)> = batch.iter().filter_map(ipfix_data_record).collect();
                data.sort_by_key(|(t, _)| *t);
                let mut i = 0;
                while i < data.len() {
                    let mut sets = Vec::new();
                    if last_template.is_none_or(|t| t.elapsed() > Duration::from_secs(10))
                        || messages.is_multiple_of(20)
                    {
                        sets.push(templates.clone());
                        last_template = Some(Instant::now());
                    }
                    let tid = data[i].0;
                    let mut set = tid.to_be_bytes().to_vec();
                    set.extend_from_slice(&[0, 0]);
                    let mut n = 0u32;
                    let room = 1400 - 16 - sets.iter().map(Vec::len).sum::<usize>();
                    while i < data.len() && data[i].0 == tid && set.len() + data[i].1.len() <= room {
                        set.extend_from_slice(&data[i].1);
                        i += 1;
                        n += 1;
                    }
                    if n == 0 {
                        // A record larger than a message alone (very long names): sent alone.
                        set.extend_from_slice(&data[i].1);
                        i += 1;
                        n = 1;
                    }
                    let len = set.len() as u16;
                    set[2..4].copy_from_slice(&len.to_be_bytes());
                    sets.push(set);
                    let msg = ipfix_message(&sets, sequence, domain, now_s());
                    match sock.send(&msg) {
                        Ok(_) => {
                            s.sent.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(_) => {
                            s.errors.fetch_add(1, Ordering::Relaxed);
                            s.lost.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                    sequence = sequence.wrapping_add(n);
                    messages += 1;
                }
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(Exporter { name: format!("ipfix udp://{addr}"), tx: Some(tx), stats, stop, thread: Some(thread) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Counts, Outcome, RuleRef};

    fn record() -> FlowRecord {
        let mut r = FlowRecord::packet("2026-12-06T10:00:00Z".parse().unwrap(), "payments", Verdict::Reject);
        r.source.ip = Some("10.10.0.11".parse().unwrap());
        r.source.namespace = Some("payments".into());
        r.source.pod = Some("checkout-0".into());
        r.destination.ip = Some("198.51.100.7".parse().unwrap());
        r.destination.port = Some(443);
        r.protocol = "tcp".into();
        r.rule = Some(RuleRef {
            rule: "ClusterEgressRule/a\"b]c".into(),
            context: "cluster".into(),
            mode: "enforce".into(),
        });
        r.packets = Counts { out: 1, back: 0 };
        r.outcome = Outcome::Unknown;
        r
    }

    #[test]
    fn syslog_messages_are_rfc5424_with_escaped_structured_data_and_octet_counting() {
        let m = syslog_message(&record(), "gw1", 32473);
        assert!(m.starts_with("<132>1 2026-12-06T10:00:00Z gw1 ces - flow [ces@32473 v=\"1\" kind=\"packet\""), "{m}");
        assert!(m.contains(r#"rule="ClusterEgressRule/a\"b\]c""#), "{m}");
        let json = m.split("] ").last().unwrap();
        assert_eq!(FlowRecord::from_json_line(json).unwrap(), record(), "the MSG is the record");
        let framed = octet_counted(&m);
        let (len, rest) = std::str::from_utf8(&framed).unwrap().split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), rest.len());
    }

    #[test]
    fn ipfix_data_records_follow_their_template() {
        let (tid, data) = ipfix_data_record(&record()).unwrap();
        assert_eq!(tid, TEMPLATE_V4);
        let fixed: usize = template(false, DEFAULT_PEN).iter().filter(|f| f.1 != 65535).map(|f| f.1 as usize).sum();
        // The fixed part, then 11 strings each with a one-byte length.
        let strings: usize = [
            "payments",
            "payments",
            "checkout-0",
            "ClusterEgressRule/a\"b]c",
            "reject",
            "cluster",
            "enforce",
            "",
            "",
            "unknown",
            "",
        ]
        .iter()
        .map(|s| 1 + s.len())
        .sum();
        assert_eq!(data.len(), fixed + strings);
        let set = ipfix_template_set(DEFAULT_PEN);
        assert_eq!(u16::from_be_bytes([set[0], set[1]]), 2);
        assert_eq!(u16::from_be_bytes([set[2], set[3]]) as usize, set.len());
        let msg = ipfix_message(&[set], 7, 1, 0);
        assert_eq!(u16::from_be_bytes([msg[0], msg[1]]), 10);
        assert_eq!(u16::from_be_bytes([msg[2], msg[3]]) as usize, msg.len());
    }
}
