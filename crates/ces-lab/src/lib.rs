//! Network-namespace labs: real packets through a real nftables gateway.
//!
//! A [`Lab`] is built from a [`LabSpec`] and torn down when dropped:
//! - one client namespace per tenant side (`<prefix>-c<i>`), holding that side's pod addresses on `eth0`, whose
//!   peer in the gateway is named as the side says (`pay0`, `ana0`, ...);
//! - the gateway namespace (`<prefix>-gw`), forwarding, with an uplink `srv0` to the server namespace. Sides may use
//!   the same addresses (overlapping pod networks): the gateway marks each connection with its side and routes the
//!   replies, and its own resets and ICMP errors, back by that mark;
//! - the server namespace (`<prefix>-srv`), holding every destination address, with TCP listeners that accept and
//!   UDP servers that echo, on the given ports.
//!
//! [`Lab::probe`] sends one real TCP connection, UDP datagram or ICMP echo from a client address and says what came
//! back: an answer ([`Outcome::Accept`]), a reset or ICMP error ([`Outcome::Reject`]), or nothing ([`Outcome::Drop`]).
//! Everything needs root, `ip` (iproute2), `nft` (nftables) and `ping` (iputils-ping); a missing piece is an error
//! that says what to install, never a silent skip.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// A flow target in `ces simulate`'s syntax: `HOST:PORT/tcp`, `HOST:PORT/udp` (IPv6 in brackets) or `HOST/icmp`.
pub fn target(to: IpAddr, proto: Proto, port: u16) -> String {
    let host = if to.is_ipv6() { format!("[{to}]") } else { to.to_string() };
    match proto {
        Proto::Tcp => format!("{host}:{port}/tcp"),
        Proto::Udp => format!("{host}:{port}/udp"),
        Proto::Icmp => format!("{to}/icmp"),
    }
}

/// What happened to a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Accept,
    Drop,
    Reject,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accept => "accept",
            Outcome::Drop => "drop",
            Outcome::Reject => "reject",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

/// One tenant side: the gateway interface its traffic arrives on, and its pod addresses.
#[derive(Clone, Debug)]
pub struct Side {
    pub gateway_interface: String,
    pub addresses: Vec<IpAddr>,
}

#[derive(Clone, Debug, Default)]
pub struct LabSpec {
    /// Namespace name prefix; keep it short and unique per run (namespaces are global on the host).
    pub prefix: String,
    pub sides: Vec<Side>,
    /// Addresses the server namespace answers on.
    pub servers: Vec<IpAddr>,
    pub tcp_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
    /// TCP ports whose servers read everything sent to them (for throughput).
    pub sink_ports: Vec<u16>,
    /// Server addresses whose port 53 (TCP and UDP) is left to a DNS server ([`Lab::start_dns`]).
    pub dns: Vec<IpAddr>,
}

pub struct Lab {
    pub spec: LabSpec,
    pub gateway: String,
    pub server: String,
    pub clients: Vec<String>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// DNS servers running in the server namespace, stopped with the lab.
    dns_servers: Vec<std::process::Child>,
    dns_dirs: Vec<std::path::PathBuf>,
}

/// A DNS zone for [`Lab::start_dns`]: what a real DNS server (dnsmasq) in the server namespace answers.
#[derive(Clone, Debug, Default)]
pub struct Zone {
    /// Addresses it listens on (each must be one of the lab's server addresses).
    pub listen: Vec<IpAddr>,
    /// Names and their addresses (A and AAAA records).
    pub records: Vec<(String, IpAddr)>,
    /// Aliases: `(alias, target)` CNAME records.
    pub cnames: Vec<(String, String)>,
    /// The TTL of every answer, in seconds.
    pub ttl: u32,
}

/// Runs a command; an error names it and carries its stderr.
pub fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0]).args(&args[1..]).stdin(Stdio::null()).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!("`{}` is not installed (the lab needs iproute2, nftables and iputils-ping)", args[0])
        } else {
            format!("{}: {e}", args.join(" "))
        }
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Runs a command inside a network namespace.
pub fn run_in(ns: &str, args: &[&str]) -> Result<String, String> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    run(&full)
}

/// Runs `f` on a thread that has entered network namespace `ns`: sockets it opens live there.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<Result<T, String>>, String> {
    let path = format!("/var/run/netns/{ns}");
    let file = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    Ok(std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd changes only this thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        Ok(f())
    }))
}

fn v6(ip: &IpAddr) -> bool {
    ip.is_ipv6()
}

impl Lab {
    /// Builds the lab. Fails loudly without root or without the tools.
    pub fn build(spec: LabSpec) -> Result<Lab, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("the lab needs root (network namespaces, nftables)".into());
        }
        let p = &spec.prefix;
        let mut lab = Lab {
            gateway: format!("{p}-gw"),
            server: format!("{p}-srv"),
            clients: (0..spec.sides.len()).map(|i| format!("{p}-c{i}")).collect(),
            spec: spec.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            dns_servers: Vec::new(),
            dns_dirs: Vec::new(),
        };
        lab.setup()?;
        Ok(lab)
    }

    fn setup(&mut self) -> Result<(), String> {
        let (gw, srv) = (self.gateway.clone(), self.server.clone());
        for ns in self.clients.iter().chain([&gw, &srv]) {
            let _ = run(&["ip", "netns", "del", ns]);
            run(&["ip", "netns", "add", ns])?;
            run_in(ns, &["ip", "link", "set", "lo", "up"])?;
            // No duplicate address detection: a fresh link-local address would hold the first IPv6 packets back
            // for a second or more (the interfaces are created below, and take the namespace's defaults).
            for k in ["net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"] {
                run_in(ns, &["sysctl", "-qw", &format!("{k}=0")])?;
            }
        }
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.fwmark_reflect", "1"),
            ("net.ipv6.fwmark_reflect", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            run_in(&gw, &["sysctl", "-qw", &format!("{k}={v}")])?;
        }
        // Uplink to the servers.
        run(&["ip", "link", "add", "srv0", "netns", &gw, "type", "veth", "peer", "name", "eth0", "netns", &srv])?;
        run_in(&gw, &["ip", "addr", "add", "100.64.250.1/30", "dev", "srv0"])?;
        run_in(&gw, &["ip", "-6", "addr", "add", "fd99:fa::1/64", "dev", "srv0", "nodad"])?;
        run_in(&srv, &["ip", "addr", "add", "100.64.250.2/30", "dev", "eth0"])?;
        run_in(&srv, &["ip", "-6", "addr", "add", "fd99:fa::2/64", "dev", "eth0", "nodad"])?;
        for ns in [&gw, &srv] {
            run_in(ns, &["ip", "link", "set", if ns == &gw { "srv0" } else { "eth0" }, "up"])?;
        }
        run_in(&gw, &["ip", "route", "add", "default", "via", "100.64.250.2"])?;
        run_in(&gw, &["ip", "-6", "route", "add", "default", "via", "fd99:fa::2"])?;
        run_in(&srv, &["ip", "route", "add", "default", "via", "100.64.250.1"])?;
        run_in(&srv, &["ip", "-6", "route", "add", "default", "via", "fd99:fa::1"])?;
        for a in &self.spec.servers {
            let a = a.to_string();
            if a.contains(':') {
                run_in(&srv, &["ip", "-6", "addr", "add", &format!("{a}/128"), "dev", "eth0", "nodad"])?;
            } else {
                run_in(&srv, &["ip", "addr", "add", &format!("{a}/32"), "dev", "eth0"])?;
            }
        }
        // Tenant sides. Connections are marked with their side on the way out; replies take the mark back from
        // conntrack, and the mark picks the side's routing table (the gateway's own resets and ICMP errors carry
        // the mark of the packet they answer: fwmark_reflect).
        let mut lab_nft = String::from(
            "table inet ceslab {\n chain pre {\n  type filter hook prerouting priority mangle; policy accept;\n",
        );
        for (i, side) in self.spec.sides.clone().iter().enumerate() {
            let c = self.clients[i].clone();
            let gi = side.gateway_interface.as_str();
            let mark = (i + 1).to_string();
            let table = (100 + i).to_string();
            run(&["ip", "link", "add", gi, "netns", &gw, "type", "veth", "peer", "name", "eth0", "netns", &c])?;
            run_in(&gw, &["ip", "addr", "add", &format!("100.64.{i}.1/30"), "dev", gi])?;
            run_in(&gw, &["ip", "-6", "addr", "add", &format!("fd99:{i}::1/64"), "dev", gi, "nodad"])?;
            run_in(&gw, &["ip", "link", "set", gi, "up"])?;
            run_in(&c, &["ip", "addr", "add", &format!("100.64.{i}.2/30"), "dev", "eth0"])?;
            run_in(&c, &["ip", "-6", "addr", "add", &format!("fd99:{i}::2/64"), "dev", "eth0", "nodad"])?;
            run_in(&c, &["ip", "link", "set", "eth0", "up"])?;
            run_in(&c, &["ip", "route", "add", "default", "via", &format!("100.64.{i}.1")])?;
            run_in(&c, &["ip", "-6", "route", "add", "default", "via", &format!("fd99:{i}::1")])?;
            for fam in ["-4", "-6"] {
                run_in(&gw, &["ip", fam, "rule", "add", "fwmark", &mark, "table", &table, "priority", &table])?;
            }
            for a in &side.addresses {
                let a = a.to_string();
                if a.contains(':') {
                    run_in(&c, &["ip", "-6", "addr", "add", &format!("{a}/128"), "dev", "eth0", "nodad"])?;
                    run_in(&gw, &["ip", "-6", "route", "add", &a, "via", &format!("fd99:{i}::2"), "table", &table])?;
                } else {
                    run_in(&c, &["ip", "addr", "add", &format!("{a}/32"), "dev", "eth0"])?;
                    run_in(&gw, &["ip", "route", "add", &a, "via", &format!("100.64.{i}.2"), "table", &table])?;
                }
            }
            // Only the low byte of the conntrack mark: CES owns bits 16-23.
            lab_nft +=
                &format!("  iifname \"{gi}\" meta mark set {mark} ct mark set ct mark and 0xffffff00 or {mark}\n");
        }
        lab_nft += "  iifname \"srv0\" meta mark set ct mark and 0xff\n }\n}\n";
        let mut child = Command::new("ip")
            .args(["netns", "exec", &gw, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("ip netns exec nft: {e}"))?;
        use std::io::Write as _;
        child.stdin.take().expect("piped").write_all(lab_nft.as_bytes()).map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "loading the lab's routing marks failed (is nftables installed?): {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        self.start_servers()
    }

    /// Runs a server on a thread in the server namespace: `open` makes its socket (an error fails the build), then
    /// `serve` handles one request at a time until the lab is dropped (the socket's timeouts let it see that).
    fn serve(
        &mut self,
        open: impl FnOnce() -> Result<Socket, String> + Send + 'static,
        mut serve: impl FnMut(&Socket) + Send + 'static,
    ) -> Result<(), String> {
        let stop = self.stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let h = spawn_in(&self.server, move || {
            let s = match open() {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(()));
            while !stop.load(Ordering::Relaxed) {
                serve(&s);
            }
        })?;
        rx.recv().map_err(|e| e.to_string())??;
        self.threads.push(std::thread::spawn(move || {
            let _ = h.join();
        }));
        Ok(())
    }

    fn start_servers(&mut self) -> Result<(), String> {
        // TCP that accepts and closes; port 53 of the DNS servers' addresses is theirs.
        for port in self.spec.tcp_ports.clone() {
            if port == 53 && !self.spec.dns.is_empty() {
                let addrs: Vec<IpAddr> =
                    self.spec.servers.iter().filter(|a| !self.spec.dns.contains(a)).copied().collect();
                for addr in addrs {
                    self.serve(move || tcp_listener_at(addr, port), |s| drop(s.accept()))?;
                }
                continue;
            }
            self.serve(move || tcp_listener(port), |s| drop(s.accept()))?;
        }
        // TCP that reads everything (throughput).
        for port in self.spec.sink_ports.clone() {
            self.serve(
                move || tcp_listener(port),
                |s| {
                    if let Ok((c, _)) = s.accept() {
                        std::thread::spawn(move || {
                            // Accepted sockets inherit the listener's timeout; a slow (shaped) sender must not
                            // look finished.
                            let _ = c.set_read_timeout(None);
                            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 65536];
                            while matches!(c.recv(&mut buf), Ok(n) if n > 0) {}
                        });
                    }
                },
            )?;
        }
        // UDP echo: one socket per address and port, so that a reply leaves from the address the probe was sent to
        // (a connected client socket ignores datagrams from any other).
        for port in self.spec.udp_ports.clone() {
            let addrs: Vec<IpAddr> =
                self.spec.servers.iter().filter(|a| port != 53 || !self.spec.dns.contains(a)).copied().collect();
            for addr in addrs {
                self.serve(
                    move || udp_server(addr, port),
                    |s| {
                        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
                        if let Ok((n, from)) = s.recv_from(&mut buf) {
                            // SAFETY: recv_from initialised the first n bytes.
                            let data: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
                            let _ = s.send_to(&data, &from);
                        }
                    },
                )?;
            }
        }
        Ok(())
    }

    /// The client namespace of the side that holds `source` through interface `side`.
    pub fn client_of(&self, side: usize) -> &str {
        &self.clients[side]
    }

    /// Sends one probe from `source` (an address of side `side`) and says what came back.
    pub fn probe(&self, side: usize, source: IpAddr, dst: IpAddr, proto: Proto, port: u16) -> Result<Outcome, String> {
        let ns = self.clients[side].clone();
        let timeout = Duration::from_millis(400);
        match proto {
            Proto::Icmp => {
                let out = Command::new("ip")
                    .args(["netns", "exec", &ns, "ping", "-n", "-c1", "-W1", "-I", &source.to_string()])
                    .arg(dst.to_string())
                    .output()
                    .map_err(|e| format!("ping: {e}"))?;
                let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
                if out.status.success() {
                    Ok(Outcome::Accept)
                } else if text.contains("Prohibited") || text.contains("filtered") || text.contains("Unreachable") {
                    Ok(Outcome::Reject)
                } else if text.contains("100% packet loss") {
                    Ok(Outcome::Drop)
                } else {
                    Err(format!("ping from {source} to {dst}: {text}"))
                }
            }
            Proto::Tcp | Proto::Udp => spawn_in(&ns, move || probe_socket(source, dst, proto, port, timeout))?
                .join()
                .map_err(|_| "probe thread panicked".to_string())??,
        }
    }
}

fn tcp_listener(port: u16) -> Result<Socket, String> {
    let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).map_err(|e| e.to_string())?;
    s.set_only_v6(false).map_err(|e| e.to_string())?;
    s.set_reuse_address(true).map_err(|e| e.to_string())?;
    s.bind(&SockAddr::from(SocketAddr::from(([0u16; 8], port)))).map_err(|e| format!("tcp {port}: {e}"))?;
    s.listen(4096).map_err(|e| e.to_string())?;
    // accept() waits at most this long, so the thread sees the stop flag.
    s.set_read_timeout(Some(Duration::from_millis(50))).map_err(|e| e.to_string())?;
    Ok(s)
}

fn tcp_listener_at(addr: IpAddr, port: u16) -> Result<Socket, String> {
    let domain = if v6(&addr) { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).map_err(|e| e.to_string())?;
    s.set_reuse_address(true).map_err(|e| e.to_string())?;
    s.bind(&SockAddr::from(SocketAddr::new(addr, port))).map_err(|e| format!("tcp {addr}:{port}: {e}"))?;
    s.listen(4096).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(50))).map_err(|e| e.to_string())?;
    Ok(s)
}

fn udp_server(addr: IpAddr, port: u16) -> Result<Socket, String> {
    let domain = if v6(&addr) { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)).map_err(|e| e.to_string())?;
    s.bind(&SockAddr::from(SocketAddr::new(addr, port))).map_err(|e| format!("udp {addr}:{port}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_millis(50))).map_err(|e| e.to_string())?;
    Ok(s)
}

fn probe_socket(source: IpAddr, dst: IpAddr, proto: Proto, port: u16, timeout: Duration) -> Result<Outcome, String> {
    let domain = if v6(&dst) { Domain::IPV6 } else { Domain::IPV4 };
    let (ty, pr) = if proto == Proto::Tcp { (Type::STREAM, Protocol::TCP) } else { (Type::DGRAM, Protocol::UDP) };
    let s = Socket::new(domain, ty, Some(pr)).map_err(|e| e.to_string())?;
    s.bind(&SockAddr::from(SocketAddr::new(source, 0))).map_err(|e| format!("bind {source}: {e}"))?;
    let to = SockAddr::from(SocketAddr::new(dst, port));
    let classify = |e: std::io::Error| -> Result<Outcome, String> {
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EACCES | libc::EPERM) => {
                Ok(Outcome::Reject)
            }
            Some(libc::ETIMEDOUT | libc::EAGAIN | libc::EINPROGRESS) => Ok(Outcome::Drop),
            _ if e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock => {
                Ok(Outcome::Drop)
            }
            _ => Err(format!("{proto:?} {source} -> {dst}:{port}: {e}")),
        }
    };
    match proto {
        Proto::Tcp => match s.connect_timeout(&to, timeout) {
            Ok(()) => Ok(Outcome::Accept),
            Err(e) => classify(e),
        },
        _ => {
            s.connect(&to).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
            // To port 53 a DNS query, which a DNS server answers (and the lab's echo servers echo).
            let payload =
                if port == 53 { query(0xce5, "probe.ces-lab", ces_dns::wire::TYPE_A) } else { b"ces-probe".to_vec() };
            s.send(&payload).map_err(|e| e.to_string())?;
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
            match s.recv(&mut buf) {
                Ok(_) => Ok(Outcome::Accept),
                Err(e) => classify(e),
            }
        }
    }
}

impl Lab {
    /// Sends data over one TCP connection for `secs` seconds and waits until the server has read all of it; returns
    /// the bits per second that arrived (goodput, not what the local socket buffer accepted).
    pub fn throughput(&self, side: usize, source: IpAddr, dst: IpAddr, port: u16, secs: f64) -> Result<f64, String> {
        let ns = self.clients[side].clone();
        spawn_in(&ns, move || -> Result<f64, String> {
            let domain = if v6(&dst) { Domain::IPV6 } else { Domain::IPV4 };
            let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).map_err(|e| e.to_string())?;
            s.bind(&SockAddr::from(SocketAddr::new(source, 0))).map_err(|e| e.to_string())?;
            s.connect_timeout(&SockAddr::from(SocketAddr::new(dst, port)), Duration::from_secs(2))
                .map_err(|e| format!("throughput connect: {e}"))?;
            let chunk = vec![0u8; 256 * 1024];
            let start = std::time::Instant::now();
            let mut sent = 0u64;
            while start.elapsed().as_secs_f64() < secs {
                sent += s.send(&chunk).map_err(|e| e.to_string())? as u64;
            }
            // The server closes once it has read everything: wait for that.
            s.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
            while matches!(s.recv(&mut buf), Ok(n) if n > 0) {}
            Ok(sent as f64 * 8.0 / start.elapsed().as_secs_f64())
        })?
        .join()
        .map_err(|_| "throughput thread panicked".to_string())??
    }

    /// Opens and closes TCP connections for `secs` seconds, cycling over `ports` (so that no address and port pair
    /// is reused while the server still holds it); returns connections per second.
    pub fn connection_rate(
        &self,
        side: usize,
        source: IpAddr,
        dst: IpAddr,
        ports: Vec<u16>,
        secs: f64,
    ) -> Result<f64, String> {
        let ns = self.clients[side].clone();
        spawn_in(&ns, move || -> Result<f64, String> {
            let start = std::time::Instant::now();
            let mut n = 0u64;
            while start.elapsed().as_secs_f64() < secs {
                let domain = if v6(&dst) { Domain::IPV6 } else { Domain::IPV4 };
                let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP)).map_err(|e| e.to_string())?;
                s.set_reuse_address(true).map_err(|e| e.to_string())?;
                s.set_linger(Some(Duration::ZERO)).map_err(|e| e.to_string())?;
                s.bind(&SockAddr::from(SocketAddr::new(source, 0))).map_err(|e| e.to_string())?;
                let port = ports[n as usize % ports.len()];
                s.connect_timeout(&SockAddr::from(SocketAddr::new(dst, port)), Duration::from_secs(2))
                    .map_err(|e| format!("connection {n}: {e}"))?;
                n += 1;
            }
            Ok(n as f64 / start.elapsed().as_secs_f64())
        })?
        .join()
        .map_err(|_| "connection thread panicked".to_string())??
    }
}

impl Lab {
    /// Starts a real DNS server (dnsmasq, authoritative for the zone's names, no recursion, no other data) in the
    /// server namespace, answering on the zone's addresses. Fails loudly when dnsmasq is missing.
    pub fn start_dns(&mut self, zone: &Zone) -> Result<(), String> {
        let dir = std::env::temp_dir().join(format!("ces-lab-dns-{}-{}", self.spec.prefix, self.dns_servers.len()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut conf = String::from("no-resolv\nno-hosts\nbind-interfaces\nno-negcache\nlog-facility=-\n");
        conf += &format!("local-ttl={}\nport=53\npid-file={}\n", zone.ttl, dir.join("pid").display());
        for a in &zone.listen {
            conf += &format!("listen-address={a}\n");
        }
        // Authoritative for every name's parent domain: a name it does not know is NXDOMAIN, never forwarded.
        let mut domains: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        for n in zone.records.iter().map(|(n, _)| n).chain(zone.cnames.iter().flat_map(|(a, t)| [a, t])) {
            domains.insert(n.split_once('.').map_or(n.clone(), |(_, d)| d.to_string()));
        }
        for d in &domains {
            conf += &format!("local=/{d}/\n");
        }
        // Many records per name go through a hosts file (one host-record line per address would do too).
        let mut hosts = String::new();
        for (name, ip) in &zone.records {
            hosts += &format!("{ip} {name}\n");
        }
        std::fs::write(dir.join("hosts"), hosts).map_err(|e| e.to_string())?;
        conf += &format!("addn-hosts={}\n", dir.join("hosts").display());
        for (alias, target) in &zone.cnames {
            conf += &format!("cname={alias},{target}\n");
        }
        std::fs::write(dir.join("dnsmasq.conf"), conf).map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.server, "dnsmasq", "--keep-in-foreground"])
            .arg(format!("--conf-file={}", dir.join("dnsmasq.conf").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start dnsmasq: {e}"))?;
        self.dns_servers.push(child);
        self.dns_dirs.push(dir);
        // Ready when it answers a name it knows, from inside the server namespace.
        let probe = zone.records.first().map(|(n, ip)| (n.clone(), *ip));
        let server = zone.listen.first().copied().ok_or("a zone listens on at least one address")?;
        let ns = self.server.clone();
        for _ in 0..100 {
            if let Some(child) = self.dns_servers.last_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read as _;
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!(
                    "dnsmasq exited ({status}) (is it installed? Debian: apt-get install dnsmasq-base): {}",
                    err.trim()
                ));
            }
            let Some((name, ip)) = probe.clone() else { return Ok(()) };
            let qtype = if ip.is_ipv6() { ces_dns::wire::TYPE_AAAA } else { ces_dns::wire::TYPE_A };
            let src = if server.is_ipv6() { "::".parse().unwrap() } else { "0.0.0.0".parse().unwrap() };
            let got = spawn_in(&ns, move || resolve(src, server, &name, qtype, false, Duration::from_millis(100)))?
                .join()
                .map_err(|_| "resolver thread panicked".to_string())??;
            if got.is_ok_and(|a| a.contains(&ip)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("dnsmasq did not answer within 5 s".into())
    }

    /// Resolves `name` (`A` or `AAAA` as `qtype` says) from `source` on client side `side`, through the gateway, over
    /// UDP or TCP; the answer's addresses for the name, in order (after its CNAME chain).
    pub fn resolve(
        &self,
        side: usize,
        source: IpAddr,
        server: IpAddr,
        name: &str,
        qtype: u16,
        tcp: bool,
    ) -> Result<Vec<IpAddr>, String> {
        let name = name.to_string();
        spawn_in(&self.clients[side], move || resolve(source, server, &name, qtype, tcp, Duration::from_secs(2)))?
            .join()
            .map_err(|_| "resolver thread panicked".to_string())??
    }
}

/// A DNS query for `name`, as a stub resolver sends it (RD set, no EDNS: a large answer over UDP comes truncated).
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(&ces_dns::wire::name_bytes(name));
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m
}

/// The raw answer to one query from `source` to `server`, over UDP or TCP (in this thread's namespace).
pub fn exchange(source: IpAddr, server: IpAddr, q: &[u8], tcp: bool, timeout: Duration) -> Result<Vec<u8>, String> {
    let domain = if server.is_ipv6() { Domain::IPV6 } else { Domain::IPV4 };
    let (ty, pr) = if tcp { (Type::STREAM, Protocol::TCP) } else { (Type::DGRAM, Protocol::UDP) };
    let s = Socket::new(domain, ty, Some(pr)).map_err(|e| e.to_string())?;
    s.bind(&SockAddr::from(SocketAddr::new(source, 0))).map_err(|e| format!("bind {source}: {e}"))?;
    let to = SockAddr::from(SocketAddr::new(server, 53));
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let read_exact = |n: usize| -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(n);
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 65536];
        while out.len() < n {
            let k = s.recv(&mut buf[..(n - out.len()).min(65536)]).map_err(|e| format!("DNS over TCP: {e}"))?;
            if k == 0 {
                return Err("DNS over TCP: the server closed the connection".into());
            }
            // SAFETY: recv initialised the first k bytes.
            out.extend(buf[..k].iter().map(|b| unsafe { b.assume_init() }));
        }
        Ok(out)
    };
    if tcp {
        s.connect_timeout(&to, timeout).map_err(|e| format!("DNS over TCP to {server}: {e}"))?;
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(q);
        s.send(&framed).map_err(|e| e.to_string())?;
        let len = read_exact(2)?;
        read_exact(u16::from_be_bytes([len[0], len[1]]) as usize)
    } else {
        s.connect(&to).map_err(|e| e.to_string())?;
        s.send(q).map_err(|e| e.to_string())?;
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 65536];
        let n = s.recv(&mut buf).map_err(|e| format!("DNS to {server}: {e}"))?;
        // SAFETY: recv initialised the first n bytes.
        Ok(buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect())
    }
}

/// Resolves `name` from `source` through `server` (in this thread's namespace): the addresses the answer gives the
/// name; an error for no answer, or a truncated UDP answer (ask again over TCP).
pub fn resolve(
    source: IpAddr,
    server: IpAddr,
    name: &str,
    qtype: u16,
    tcp: bool,
    timeout: Duration,
) -> Result<Vec<IpAddr>, String> {
    let id = (std::process::id() as u16) ^ (name.len() as u16).rotate_left(7);
    let answer = exchange(source, server, &query(id, name, qtype), tcp, timeout)?;
    let msg = ces_dns::wire::parse(&answer).map_err(|e| format!("the answer for {name}: {e}"))?;
    if msg.truncated && !tcp {
        return Err(format!("the answer for {name} came truncated"));
    }
    let want = name.trim_end_matches('.').to_ascii_lowercase();
    Ok(ces_dns::learned(&msg).into_iter().filter(|l| l.name == want).map(|l| l.ip).collect())
}

impl Drop for Lab {
    fn drop(&mut self) {
        for mut c in self.dns_servers.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in self.dns_dirs.drain(..) {
            let _ = std::fs::remove_dir_all(d);
        }
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for ns in self.clients.iter().chain([&self.gateway, &self.server]) {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}
