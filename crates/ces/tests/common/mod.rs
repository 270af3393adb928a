//! What the real-packet tests share: waiting, and the real `ces gateway` agent run in a lab's gateway namespace.
#![allow(dead_code)]

use std::io::{Read as _, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Waits until `what` holds, up to 20 s; fails with `describe` after that.
pub fn wait_until(what: impl Fn() -> bool, describe: impl Fn() -> String) {
    wait_for(Duration::from_secs(20), what, describe)
}

pub fn wait_for(limit: Duration, what: impl Fn() -> bool, describe: impl Fn() -> String) {
    let start = Instant::now();
    while !what() {
        assert!(start.elapsed() < limit, "timed out waiting: {}", describe());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The real `ces gateway` agent in a lab's gateway namespace, killed when dropped.
pub struct Agent {
    pub child: std::process::Child,
    pub log: PathBuf,
    pub health: u16,
    pub gateway: String,
}

impl Agent {
    /// Starts the agent on `dir`'s `policy.yaml` and `ces-conf.yaml` with `extra` arguments, and waits for its first
    /// apply (and, with `dns`, for its DNS queue to be bound).
    pub fn start(gateway: &str, dir: &Path, health: u16, tag: &str, extra: &[&str], dns: bool) -> Agent {
        let log = dir.join(format!("agent-{tag}.log"));
        let child = Command::new("ip")
            .args(["netns", "exec", gateway, env!("CARGO_BIN_EXE_ces"), "gateway", "--debounce-ms", "50"])
            .arg("--manifests")
            .arg(dir.join("policy.yaml"))
            .arg("--config")
            .arg(dir.join("ces-conf.yaml"))
            .args(["--health-addr", &format!("127.0.0.1:{health}")])
            .args(extra)
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let a = Agent { child, log, health, gateway: gateway.to_string() };
        wait_until(|| a.log().contains("replaced"), || a.log());
        if dns {
            wait_until(|| a.metrics().contains("ces_dns_queue_bound{component=\"gateway\"} 1"), || a.log());
        }
        a
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/metrics`, read from inside the gateway namespace.
    pub fn metrics(&self) -> String {
        let port = self.health;
        ces_lab::spawn_in(&self.gateway, move || {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").ok()?;
            let mut body = String::new();
            s.read_to_string(&mut body).ok()?;
            Some(body)
        })
        .unwrap()
        .join()
        .unwrap()
        .unwrap()
        .unwrap_or_default()
    }

    /// The value of a metric (its first series).
    pub fn metric(&self, name: &str) -> f64 {
        let m = self.metrics();
        m.lines()
            .find(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b'{'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{m}"))
    }

    /// Stops it with SIGTERM (it finishes its pass and stores what it holds), waiting up to 10 s.
    pub fn terminate(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Short conntrack timeouts in the gateway namespace, so that connections end (and are recorded) within seconds:
/// TIME_WAIT and CLOSE 1 s, an unanswered SYN 3 s, UDP and ICMP 2 s.
pub fn fast_conntrack(gateway: &str) {
    for (k, v) in [
        ("nf_conntrack_tcp_timeout_time_wait", "1"),
        ("nf_conntrack_tcp_timeout_close", "1"),
        ("nf_conntrack_tcp_timeout_syn_sent", "3"),
        ("nf_conntrack_udp_timeout", "2"),
        ("nf_conntrack_icmp_timeout", "2"),
    ] {
        ces_lab::run_in(gateway, &["sysctl", "-qw", &format!("net.netfilter.{k}={v}")])
            .unwrap_or_else(|e| panic!("setting {k} in {gateway}: {e}"));
    }
}

/// `ces flows` on a store with `args`, as JSON records, each checked against docs/flow-record.schema.json; the
/// command's error when it fails.
pub fn try_flows(store: &Path, args: &[&str]) -> Result<Vec<serde_json::Value>, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_ces"))
        .args(["flows", "--store"])
        .arg(store)
        .args(["-o", "json"])
        .args(args)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let schema: serde_json::Value = serde_json::from_str(ces_flow::record::JSON_SCHEMA).unwrap();
    let schema = jsonschema::options().build(&schema).unwrap();
    let records: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for r in &records {
        // Every record CES makes is one the schema describes.
        if let Err(e) = schema.validate(r) {
            panic!("{r:#}\ndoes not match the schema: {e}");
        }
    }
    Ok(records)
}

/// [`try_flows`], failing the test when the command fails.
pub fn flows(store: &Path, args: &[&str]) -> Vec<serde_json::Value> {
    try_flows(store, args).unwrap_or_else(|e| panic!("ces flows: {e}"))
}
