//! The BIG-IP client: token authentication, TLS verified by default, AS3 async tasks, retries on 503 and
//! "in progress", and error bodies turned into messages. Requests go through a [`Transport`]: HTTPS to a device, or
//! a dry-run folder that records what would have been sent.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// One request to the device.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub method: &'static str,
    /// Path and query, such as `/mgmt/shared/appsvcs/declare/p2?showHash=true`.
    pub path: String,
    pub body: Option<Value>,
}

/// The device's answer. `body` is `Null` when empty.
#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: Value,
}

/// How requests reach the device.
pub trait Transport: Send {
    /// Sends one request; `Err` when there is no answer at all (refused, reset, timed out).
    fn send(&mut self, req: &Request, token: Option<&str>) -> Result<Response, String>;
    /// Whether this transport talks to a device (a dry run does not).
    fn is_device(&self) -> bool {
        true
    }
}

/// A user name and password, read from files or the environment; never printed.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials {{ username: {:?}, password: <redacted> }}", self.username)
    }
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials { username: username.into(), password: password.into() }
    }

    /// The files `username` and `password` of a folder (a mounted Secret, as the original's `--bigip-creds-dir`).
    pub fn from_dir(dir: &Path) -> Result<Credentials, String> {
        let read = |name: &str| -> Result<String, String> {
            let p = dir.join(name);
            let s = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            let s = s.trim_end_matches(['\n', '\r']).to_string();
            if s.is_empty() { Err(format!("{} is empty", p.display())) } else { Ok(s) }
        };
        Ok(Credentials { username: read("username")?, password: read("password")? })
    }

    /// `BIGIP_USERNAME` and `BIGIP_PASSWORD`.
    pub fn from_env() -> Option<Credentials> {
        match (std::env::var("BIGIP_USERNAME"), std::env::var("BIGIP_PASSWORD")) {
            (Ok(u), Ok(p)) if !u.is_empty() && !p.is_empty() => Some(Credentials { username: u, password: p }),
            _ => None,
        }
    }
}

/// The largest answer read from the BIG-IP (a tenant's declaration of a very large cluster).
pub const MAX_RESPONSE_BYTES: u64 = 1 << 30;

/// HTTPS (or, to loopback only, plain HTTP) to a BIG-IP.
pub struct Http {
    agent: ureq::Agent,
    base: String,
}

impl Http {
    /// `url` is `host[:port]` (HTTPS, as the original's `--bigip-url`) or a full `https://` URL; `http://` is
    /// accepted only for loopback addresses (a local double). TLS is verified against the system's WebPKI roots, or
    /// only against `ca` (a PEM file) when given; `insecure` turns verification off.
    pub fn new(url: &str, ca: Option<&Path>, insecure: bool, timeout: Duration) -> Result<Http, String> {
        let base = if url.contains("://") { url.trim_end_matches('/').to_string() } else { format!("https://{url}") };
        if let Some(rest) = base.strip_prefix("http://") {
            let host = rest.split(['/', ':']).next().unwrap_or("");
            let loopback = host == "localhost"
                || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
                || rest.starts_with("[::1]");
            if !loopback {
                return Err(format!("{url}: plain HTTP is only allowed to a loopback address; use https://"));
            }
        } else if !base.starts_with("https://") {
            return Err(format!("{url}: the BIG-IP URL must be https:// (or host[:port])"));
        }
        let mut tls = ureq::tls::TlsConfig::builder().disable_verification(insecure);
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).map_err(|e| format!("--bigip-ca {}: {e}", ca.display()))?;
            let mut certs = Vec::new();
            for item in ureq::tls::parse_pem(&pem) {
                if let ureq::tls::PemItem::Certificate(c) = item.map_err(|e| format!("{}: {e}", ca.display()))? {
                    certs.push(c);
                }
            }
            if certs.is_empty() {
                return Err(format!("--bigip-ca {}: no certificate in the file", ca.display()));
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .tls_config(tls.build())
            .build()
            .new_agent();
        Ok(Http { agent, base })
    }
}

impl Transport for Http {
    fn send(&mut self, req: &Request, token: Option<&str>) -> Result<Response, String> {
        let url = format!("{}{}", self.base, req.path);
        let result = match (req.method, &req.body) {
            ("GET", _) => with_token(self.agent.get(&url), token).call(),
            ("DELETE", _) => with_token(self.agent.delete(&url), token).call(),
            (m, body) => {
                let b = match m {
                    "POST" => self.agent.post(&url),
                    "PATCH" => self.agent.patch(&url),
                    _ => self.agent.put(&url),
                };
                let text = body.as_ref().map(|b| b.to_string()).unwrap_or_default();
                with_token(b.header("Content-Type", "application/json"), token).send(text.as_bytes())
            }
        };
        let mut resp = result.map_err(|e| format!("{} {}: {e}", req.method, req.path))?;
        let status = resp.status().as_u16();
        // Declarations of large clusters are tens of megabytes: read them whole, and never take a cut-off or
        // unreadable answer for an empty one.
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES)
            .read_to_string()
            .map_err(|e| format!("{} {}: reading the answer: {e}", req.method, req.path))?;
        let body = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|_| json!({"message": text.chars().take(500).collect::<String>()}))
        };
        Ok(Response { status, body })
    }
}

fn with_token<B>(r: ureq::RequestBuilder<B>, token: Option<&str>) -> ureq::RequestBuilder<B> {
    match token {
        Some(t) => r.header("X-F5-Auth-Token", t),
        None => r,
    }
}

/// The dry-run sink: every request is written to `DIR/NNNN-METHOD-path.json`, in order, and answered as a device
/// with nothing configured would answer it.
pub struct DryRun {
    dir: PathBuf,
    count: usize,
}

impl DryRun {
    pub fn new(dir: &Path) -> Result<DryRun, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let count = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?.count();
        Ok(DryRun { dir: dir.to_path_buf(), count })
    }
}

impl Transport for DryRun {
    fn send(&mut self, req: &Request, _token: Option<&str>) -> Result<Response, String> {
        if req.method == "GET" {
            // Nothing is configured on a dry-run device (no declaration, no policy bound); reading changes nothing,
            // so it is not recorded.
            return Ok(if req.path.contains("/declare/") {
                Response { status: 204, body: Value::Null }
            } else {
                Response { status: 200, body: json!({}) }
            });
        }
        self.count += 1;
        let slug: String = req
            .path
            .split('?')
            .next()
            .unwrap_or("")
            .trim_start_matches("/mgmt/")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
            .collect();
        let file = self.dir.join(format!("{:04}-{}-{slug}.json", self.count, req.method));
        let record = json!({"method": req.method, "path": req.path, "body": req.body});
        std::fs::write(&file, serde_json::to_string_pretty(&record).expect("json") + "\n")
            .map_err(|e| format!("{}: {e}", file.display()))?;
        Ok(Response { status: 200, body: json!({"results": [{"code": 200, "message": "success (dry run)"}]}) })
    }

    fn is_device(&self) -> bool {
        false
    }
}

/// How hard the client tries before it gives a request up to the sync loop's own retry.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts of one request while the device answers 503 or "in progress".
    pub attempts: u32,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How often an AS3 task is polled, and for how long at most.
    pub task_poll: Duration,
    pub task_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            task_poll: Duration::from_secs(1),
            task_timeout: Duration::from_secs(600),
        }
    }
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientError {
    /// No answer (connection refused, reset, timeout).
    Unreachable(String),
    /// 401 after a fresh login, or the login itself refused.
    Auth(String),
    /// Still 503 / "in progress" after every attempt.
    Busy(String),
    /// The device refused the request (422 and other 4xx/5xx): its messages, one per error.
    Refused { status: u16, errors: Vec<String> },
    /// The tenant's optimisticLockKey no longer matches: someone else changed it since we read it.
    Conflict(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Unreachable(e) => write!(f, "BIG-IP unreachable: {e}"),
            ClientError::Auth(e) => write!(f, "BIG-IP authentication failed: {e}"),
            ClientError::Busy(e) => write!(f, "BIG-IP busy: {e}"),
            ClientError::Refused { status, errors } => write!(f, "BIG-IP refused ({status}): {}", errors.join("; ")),
            ClientError::Conflict(e) => write!(f, "conflict: {e}"),
        }
    }
}

/// What was sent, for logs and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub requests: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Failed calls by kind, in the order of [`ERROR_KINDS`].
    pub errors: [u64; 5],
}

/// The kinds of [`ClientError`], as metrics label them.
pub const ERROR_KINDS: [&str; 5] = ["unreachable", "auth", "busy", "refused", "conflict"];

impl ClientError {
    /// This error's index in [`ERROR_KINDS`].
    pub fn kind_index(&self) -> usize {
        match self {
            ClientError::Unreachable(_) => 0,
            ClientError::Auth(_) => 1,
            ClientError::Busy(_) => 2,
            ClientError::Refused { .. } => 3,
            ClientError::Conflict(_) => 4,
        }
    }
}

pub struct Client {
    transport: Box<dyn Transport>,
    credentials: Option<Credentials>,
    token: Option<String>,
    pub retry: RetryPolicy,
    pub stats: Stats,
    jitter: u64,
}

/// Every message of an AS3 or iControl error body.
fn messages(body: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(errors) = body.get("errors").and_then(Value::as_array) {
        out.extend(errors.iter().map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_string)));
    }
    if let Some(results) = body.get("results").and_then(Value::as_array) {
        for r in results {
            let code = r.get("code").and_then(Value::as_u64).unwrap_or(0);
            if code >= 300 || code == 0 {
                let tenant = r.get("tenant").and_then(Value::as_str).unwrap_or("");
                let msg = r.get("message").and_then(Value::as_str).unwrap_or("");
                let resp = r.get("response").and_then(Value::as_str).unwrap_or("");
                let text = [tenant, msg, resp].iter().filter(|s| !s.is_empty()).cloned().collect::<Vec<_>>().join(": ");
                if !text.is_empty() {
                    out.push(text);
                }
            }
        }
    }
    if out.is_empty()
        && let Some(m) = body.get("message").and_then(Value::as_str)
    {
        out.push(m.to_string());
    }
    out
}

fn is_busy(resp: &Response) -> bool {
    resp.status == 503
        || messages(&resp.body).iter().any(|m| m.contains("in progress") || m.contains("please try again"))
            && resp.status >= 400
}

fn is_conflict(resp: &Response) -> bool {
    resp.status >= 400 && messages(&resp.body).iter().any(|m| m.contains("optimisticLockKey"))
}

impl Client {
    pub fn new(transport: Box<dyn Transport>, credentials: Option<Credentials>) -> Client {
        let jitter =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        Client { transport, credentials, token: None, retry: RetryPolicy::default(), stats: Stats::default(), jitter }
    }

    pub fn is_device(&self) -> bool {
        self.transport.is_device()
    }

    fn raw(&mut self, req: &Request) -> Result<Response, ClientError> {
        self.stats.requests += 1;
        self.stats.bytes_sent += req.body.as_ref().map_or(0, |b| b.to_string().len() as u64) + req.path.len() as u64;
        let r = self.transport.send(req, self.token.as_deref()).map_err(ClientError::Unreachable)?;
        self.stats.bytes_received += if r.body.is_null() { 0 } else { r.body.to_string().len() as u64 };
        Ok(r)
    }

    /// `POST /mgmt/shared/authn/login`: a token for every later request.
    fn login(&mut self) -> Result<(), ClientError> {
        let Some(c) = self.credentials.clone() else { return Ok(()) };
        let req = Request {
            method: "POST",
            path: "/mgmt/shared/authn/login".into(),
            body: Some(json!({"username": c.username, "password": c.password, "loginProviderName": "tmos"})),
        };
        let r = self.raw(&req)?;
        match r.body.pointer("/token/token").and_then(Value::as_str) {
            Some(t) if r.status < 300 => {
                self.token = Some(t.to_string());
                Ok(())
            }
            _ => Err(ClientError::Auth(format!(
                "login as {} refused ({}): {}",
                c.username,
                r.status,
                messages(&r.body).join("; ")
            ))),
        }
    }

    fn pause(&mut self, attempt: u32) -> Duration {
        let base = self.retry.backoff_min.saturating_mul(1 << attempt.min(16)).min(self.retry.backoff_max);
        // xorshift jitter: up to half the pause again, so controllers that failed together do not retry together.
        self.jitter ^= self.jitter << 13;
        self.jitter ^= self.jitter >> 7;
        self.jitter ^= self.jitter << 17;
        base + base.mul_f64((self.jitter % 1000) as f64 / 2000.0)
    }

    /// Sends `req`: logs in when needed (and again once on 401), retries 503 and "in progress" with backoff and
    /// jitter, and follows an AS3 task to its end when the answer is 202.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let r = self.call_once(req);
        if let Err(e) = &r {
            self.stats.errors[e.kind_index()] += 1;
        }
        r
    }

    fn call_once(&mut self, req: &Request) -> Result<Response, ClientError> {
        if self.token.is_none() && self.credentials.is_some() {
            self.login()?;
        }
        let mut relogged = false;
        let mut attempt = 0;
        loop {
            let mut r = self.raw(req)?;
            if r.status == 401 && !relogged && self.credentials.is_some() {
                relogged = true;
                self.token = None;
                self.login()?;
                continue;
            }
            if r.status == 401 {
                return Err(ClientError::Auth(format!(
                    "{} {}: {}",
                    req.method,
                    req.path,
                    messages(&r.body).join("; ")
                )));
            }
            if r.status == 202 {
                r = self.follow_task(&r)?;
            }
            if is_conflict(&r) {
                return Err(ClientError::Conflict(messages(&r.body).join("; ")));
            }
            if is_busy(&r) {
                attempt += 1;
                if attempt >= self.retry.attempts {
                    return Err(ClientError::Busy(format!(
                        "{} {}: {} after {attempt} attempts",
                        req.method,
                        req.path,
                        messages(&r.body).join("; ")
                    )));
                }
                let p = self.pause(attempt - 1);
                std::thread::sleep(p);
                continue;
            }
            if r.status >= 400 && r.status != 404 {
                return Err(ClientError::Refused { status: r.status, errors: messages(&r.body) });
            }
            return Ok(r);
        }
    }

    /// Polls `GET /mgmt/shared/appsvcs/task/<id>` until the task is no longer "in progress"; returns its result as
    /// a response whose status is the worst code of its results.
    fn follow_task(&mut self, accepted: &Response) -> Result<Response, ClientError> {
        let Some(id) = accepted.body.get("id").and_then(Value::as_str).map(str::to_string) else {
            return Err(ClientError::Refused { status: 202, errors: vec!["202 without a task id".into()] });
        };
        let start = Instant::now();
        let req = Request { method: "GET", path: format!("/mgmt/shared/appsvcs/task/{id}"), body: None };
        loop {
            std::thread::sleep(self.retry.task_poll);
            let r = self.raw(&req)?;
            if r.status == 401 {
                self.token = None;
                self.login()?;
                continue;
            }
            let results = r.body.get("results").and_then(Value::as_array).cloned().unwrap_or_default();
            let running = results.iter().any(|x| x.get("message").and_then(Value::as_str) == Some("in progress"));
            if !running && r.status < 300 {
                let worst = results.iter().filter_map(|x| x.get("code").and_then(Value::as_u64)).max().unwrap_or(200);
                return Ok(Response { status: worst as u16, body: r.body });
            }
            if start.elapsed() > self.retry.task_timeout {
                return Err(ClientError::Busy(format!("task {id} still in progress after {:?}", start.elapsed())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_show_the_password() {
        let c = Credentials::new("admin", "s3cret-Pa55");
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn plain_http_only_to_loopback() {
        let t = Duration::from_secs(1);
        assert!(Http::new("http://127.0.0.1:8443", None, false, t).is_ok());
        assert!(Http::new("http://localhost:1", None, false, t).is_ok());
        let e = Http::new("http://10.0.0.1", None, false, t).err().unwrap();
        assert!(e.contains("loopback"), "{e}");
        assert!(Http::new("10.0.0.1:8443", None, false, t).is_ok(), "host:port means https");
        assert!(Http::new("ftp://x", None, false, t).is_err());
    }

    #[test]
    fn as3_error_bodies_become_messages() {
        let body = json!({"code": 422, "message": "declaration is invalid",
            "errors": ["/p2/Shared/x/rules/0/protocol: should be equal to one of the allowed values"]});
        assert_eq!(messages(&body), ["/p2/Shared/x/rules/0/protocol: should be equal to one of the allowed values"]);
        let body = json!({"results": [{"code": 200, "tenant": "a", "message": "success"},
            {"code": 422, "tenant": "p2", "message": "declaration failed", "response": "01020036:3: not found"}]});
        assert_eq!(messages(&body), ["p2: declaration failed: 01020036:3: not found"]);
    }
}
