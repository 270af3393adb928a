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
    /// The folder they were read from: read again at each login, so a rotated Secret needs no restart.
    dir: Option<PathBuf>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials {{ username: {:?}, password: <redacted> }}", self.username)
    }
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials { username: username.into(), password: password.into(), dir: None }
    }

    /// The files `username` and `password` of a folder (a mounted Secret, as the original's `--bigip-creds-dir`).
    pub fn from_dir(dir: &Path) -> Result<Credentials, String> {
        let read = |name: &str| -> Result<String, String> {
            let p = dir.join(name);
            let s = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            let s = s.trim_end_matches(['\n', '\r']).to_string();
            if s.is_empty() { Err(format!("{} is empty", p.display())) } else { Ok(s) }
        };
        Ok(Credentials { username: read("username")?, password: read("password")?, dir: Some(dir.to_path_buf()) })
    }

    /// As they are now: read again from their folder (a rotated Secret), else as they were given.
    pub fn current(&self) -> Result<Credentials, String> {
        match &self.dir {
            Some(d) => Credentials::from_dir(d),
            None => Ok(self.clone()),
        }
    }

    /// `BIGIP_USERNAME` and `BIGIP_PASSWORD`.
    pub fn from_env() -> Option<Credentials> {
        match (std::env::var("BIGIP_USERNAME"), std::env::var("BIGIP_PASSWORD")) {
            (Ok(u), Ok(p)) if !u.is_empty() && !p.is_empty() => {
                Some(Credentials { username: u, password: p, dir: None })
            }
            _ => None,
        }
    }
}

/// The largest answer read from the BIG-IP. The largest answers are a tenant's declaration (GET): the first sync of
/// 10k pods and 1k rules declares 2.9 MB over 4 tenants (`cargo bench -p ces --bench as3`), under 1 MB each; 64 MiB
/// holds one tenant fifty times that. A larger answer is an error, never read whole (a hostile device's 1 GiB answer
/// would otherwise cost gigabytes once parsed).
pub const MAX_RESPONSE_BYTES: u64 = 64 << 20;

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
        check_url(&base).map_err(|e| format!("{url}: {e}"))?;
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

/// A BIG-IP URL as a URL parser reads it: `https://`, or `http://` to a loopback address only; no user-info
/// (`http://[::1]@10.0.0.3/` is a request to 10.0.0.3), no query or fragment.
fn check_url(base: &str) -> Result<(), String> {
    let uri: ureq::http::Uri = base.parse().map_err(|e| format!("not a URL: {e}"))?;
    let authority = uri.authority().ok_or("no host")?;
    if authority.as_str().contains('@') {
        return Err("user-info in the BIG-IP URL is refused: credentials come from --bigip-creds-dir".into());
    }
    if uri.query().is_some() || base.contains('#') {
        return Err("the BIG-IP URL takes no query or fragment".into());
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") => {
            let loopback = host.eq_ignore_ascii_case("localhost")
                || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(())
            } else {
                Err(format!("plain HTTP is only allowed to a loopback address (not {host}); use https://"))
            }
        }
        _ => Err("the BIG-IP URL must be https:// (or host[:port])".into()),
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
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
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
        let mut body = req.body.clone();
        if let Some(b) = body.as_mut() {
            redact(b);
        }
        let record = json!({"method": req.method, "path": req.path, "body": body});
        write_private(&file, (serde_json::to_string_pretty(&record).expect("json") + "\n").as_bytes())
            .map_err(|e| format!("{}: {e}", file.display()))?;
        if req.path.ends_with("/authn/login") {
            // Recorded (with the password redacted) and answered, so a dry run with credentials goes on as a device.
            return Ok(Response { status: 200, body: json!({"token": {"token": "dry-run", "timeout": 1200}}) });
        }
        Ok(Response { status: 200, body: json!({"results": [{"code": 200, "message": "success (dry run)"}]}) })
    }

    fn is_device(&self) -> bool {
        false
    }
}

/// Every `password` (and `token`) value in a request body, replaced: what the dry run writes holds no secret.
fn redact(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("token") {
                    *x = Value::String("<redacted>".into());
                } else {
                    redact(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

/// Writes a file only its owner may read (0600), whatever the umask.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)
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
    /// When the token should be renewed (a minute, or a tenth of its lifetime, before it expires).
    renew_at: Option<Instant>,
    pub retry: RetryPolicy,
    pub stats: Stats,
    jitter: u64,
}

/// Every message of an AS3 or iControl error body.
pub fn messages(body: &Value) -> Vec<String> {
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
        Client {
            transport,
            credentials,
            token: None,
            renew_at: None,
            retry: RetryPolicy::default(),
            stats: Stats::default(),
            jitter,
        }
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
        let Some(c) = self.credentials.as_ref().map(Credentials::current) else { return Ok(()) };
        let c = c.map_err(ClientError::Auth)?;
        let req = Request {
            method: "POST",
            path: "/mgmt/shared/authn/login".into(),
            body: Some(json!({"username": c.username, "password": c.password, "loginProviderName": "tmos"})),
        };
        let r = self.raw(&req)?;
        match r.body.pointer("/token/token").and_then(Value::as_str) {
            Some(t) if r.status < 300 => {
                self.token = Some(t.to_string());
                // The device says how long the token lives (BIG-IP: 1200 s by default); a lifetime of 0 says nothing
                // usable, and the token is then renewed on its first 401.
                let life =
                    Duration::from_secs(r.body.pointer("/token/timeout").and_then(Value::as_u64).unwrap_or(1200));
                self.renew_at =
                    (!life.is_zero()).then(|| Instant::now() + life - (life / 10).min(Duration::from_secs(60)));
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
        // Up to half the pause again, so controllers that failed together do not retry together.
        base + base.mul_f64((self.jitter() % 1000) as f64 / 2000.0)
    }

    /// The next of this client's random numbers (xorshift, seeded from the clock at start), to spread retries.
    pub(crate) fn jitter(&mut self) -> u64 {
        self.jitter ^= self.jitter << 13;
        self.jitter ^= self.jitter >> 7;
        self.jitter ^= self.jitter << 17;
        self.jitter
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
        let expiring = self.renew_at.is_some_and(|t| Instant::now() >= t);
        if (self.token.is_none() || expiring) && self.credentials.is_some() {
            self.token = None;
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
        // A 401 right after a fresh login is the device refusing, not a token expiring.
        let mut relogged = false;
        loop {
            // The deadline holds whatever the device answers.
            if start.elapsed() > self.retry.task_timeout {
                return Err(ClientError::Busy(format!("task {id} not finished after {:?}", start.elapsed())));
            }
            std::thread::sleep(self.retry.task_poll);
            let r = self.raw(&req)?;
            if r.status == 401 {
                if relogged || self.credentials.is_none() {
                    return Err(ClientError::Auth(format!("polling task {id}: {}", messages(&r.body).join("; "))));
                }
                relogged = true;
                self.token = None;
                self.login()?;
                continue;
            }
            relogged = false;
            let results = r.body.get("results").and_then(Value::as_array).cloned().unwrap_or_default();
            let running = results.iter().any(|x| x.get("message").and_then(Value::as_str) == Some("in progress"));
            if !running && r.status < 300 {
                let worst = results.iter().filter_map(|x| x.get("code").and_then(Value::as_u64)).max().unwrap_or(200);
                return Ok(Response { status: worst as u16, body: r.body });
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
        assert!(Http::new("http://[::1]:8443", None, false, t).is_ok());
        // What a URL parser reads, not what the text starts with.
        for hostile in [
            "http://[::1]@127.0.0.3:18443",
            "http://[::1]@10.0.0.3:18443",
            "http://localhost@10.0.0.3",
            "http://127.0.0.1:80@10.0.0.3",
            "http://user:pw@127.0.0.1:8443",
            "https://admin:admin@bigip.example.net",
            "http://127.0.0.1.nip.io:8443",
            "http://localhost.example.net",
            "http://127.0.0.1:8443?x=1",
        ] {
            assert!(Http::new(hostile, None, false, t).is_err(), "{hostile} accepted");
        }
        let e = Http::new("http://[::1]@127.0.0.3:18443", None, false, t).err().unwrap();
        assert!(e.contains("user-info"), "{e}");
    }

    /// A device answering through a closure; it counts logins and 401s.
    struct Mock<F: FnMut(&Request, Option<&str>) -> Response + Send>(F);

    impl<F: FnMut(&Request, Option<&str>) -> Response + Send> Transport for Mock<F> {
        fn send(&mut self, req: &Request, token: Option<&str>) -> Result<Response, String> {
            Ok((self.0)(req, token))
        }
    }

    fn ok(body: Value) -> Response {
        Response { status: 200, body }
    }

    fn denied() -> Response {
        Response { status: 401, body: json!({"code": 401, "message": "Authentication required!"}) }
    }

    fn declare() -> Request {
        Request { method: "POST", path: "/mgmt/shared/appsvcs/declare".into(), body: Some(json!({})) }
    }

    #[test]
    fn endless_401_while_a_task_is_polled_ends() {
        use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
        let logins = std::sync::Arc::new(AtomicU32::new(0));
        let l = logins.clone();
        let mock = Mock(move |req: &Request, _t: Option<&str>| {
            if req.path.ends_with("/login") {
                l.fetch_add(1, Relaxed);
                return ok(json!({"token": {"token": "t", "timeout": 1200}}));
            }
            if req.method == "POST" {
                return Response { status: 202, body: json!({"id": "task-1"}) };
            }
            denied()
        });
        let mut c = Client::new(Box::new(mock), Some(Credentials::new("admin", "pw")));
        c.retry.task_poll = Duration::from_millis(5);
        let start = Instant::now();
        let r = c.call(&declare());
        assert!(matches!(r, Err(ClientError::Auth(_))), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(logins.load(Relaxed) <= 3, "{} logins", logins.load(Relaxed));
    }

    #[test]
    fn a_task_that_never_finishes_ends_at_the_deadline_whatever_the_device_answers() {
        // Every other poll is a 401 (a token that keeps expiring), the rest "in progress".
        let mut n = 0u64;
        let mock = Mock(move |req: &Request, _t: Option<&str>| {
            if req.path.ends_with("/login") {
                return ok(json!({"token": {"token": "t", "timeout": 1200}}));
            }
            if req.method == "POST" {
                return Response { status: 202, body: json!({"id": "task-1"}) };
            }
            n += 1;
            if n.is_multiple_of(2) { denied() } else { ok(json!({"results": [{"message": "in progress"}]})) }
        });
        let mut c = Client::new(Box::new(mock), Some(Credentials::new("admin", "pw")));
        c.retry.task_poll = Duration::from_millis(5);
        c.retry.task_timeout = Duration::from_millis(300);
        let start = Instant::now();
        let r = c.call(&declare());
        assert!(matches!(r, Err(ClientError::Busy(_))), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    }

    #[test]
    fn the_token_is_renewed_before_it_expires() {
        use std::sync::{Arc, Mutex};
        // Tokens live 2 s on this device; a request with an older one is a 401.
        let seen: Arc<Mutex<(u32, u32)>> = Arc::new(Mutex::new((0, 0)));
        let s = seen.clone();
        let mut issued: Vec<(String, Instant)> = Vec::new();
        let mock = Mock(move |req: &Request, t: Option<&str>| {
            let mut seen = s.lock().unwrap();
            if req.path.ends_with("/login") {
                seen.0 += 1;
                let tok = format!("t{}", seen.0);
                issued.push((tok.clone(), Instant::now()));
                return ok(json!({"token": {"token": tok, "timeout": 2}}));
            }
            let valid = issued.iter().any(|(k, at)| Some(k.as_str()) == t && at.elapsed() < Duration::from_secs(2));
            if !valid {
                seen.1 += 1;
                return denied();
            }
            ok(json!({}))
        });
        let mut c = Client::new(Box::new(mock), Some(Credentials::new("admin", "pw")));
        let get = Request { method: "GET", path: "/mgmt/tm/sys/version".into(), body: None };
        for _ in 0..12 {
            c.call(&get).unwrap();
            std::thread::sleep(Duration::from_millis(250));
        }
        let (logins, refused) = *seen.lock().unwrap();
        assert_eq!(refused, 0, "a request went out with an expired token");
        assert!(logins >= 2, "{logins} logins in 3 s of 2-second tokens");
    }

    #[test]
    fn rotated_credentials_are_read_at_the_next_login() {
        let dir = std::env::temp_dir().join(format!("ces-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("username"), "admin\n").unwrap();
        std::fs::write(dir.join("password"), "old\n").unwrap();
        // The device takes one password at a time; changing it ends the old sessions.
        let password = std::sync::Arc::new(std::sync::Mutex::new("old".to_string()));
        let p = password.clone();
        let mock = Mock(move |req: &Request, t: Option<&str>| {
            let now = p.lock().unwrap().clone();
            if req.path.ends_with("/login") {
                let body = req.body.as_ref().unwrap();
                return if body["password"] == now.as_str() {
                    ok(json!({"token": {"token": format!("tok-{now}"), "timeout": 1200}}))
                } else {
                    denied()
                };
            }
            if t == Some(format!("tok-{now}").as_str()) { ok(json!({})) } else { denied() }
        });
        let mut c = Client::new(Box::new(mock), Some(Credentials::from_dir(&dir).unwrap()));
        let get = Request { method: "GET", path: "/mgmt/tm/sys/version".into(), body: None };
        c.call(&get).unwrap();
        // The Secret is rotated: the device and the mounted files change; no restart.
        *password.lock().unwrap() = "new".into();
        std::fs::write(dir.join("password"), "new\n").unwrap();
        c.call(&get).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_dry_run_writes_no_secret_and_only_for_its_owner() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("ces-dry-run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut c = Client::new(Box::new(DryRun::new(&dir).unwrap()), Some(Credentials::new("admin", "s3cret-Pa55")));
        c.call(&declare()).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert!(files.len() >= 2, "the login and the declaration are recorded");
        for f in files {
            let text = std::fs::read_to_string(f.path()).unwrap();
            assert!(!text.contains("s3cret"), "{}: {text}", f.path().display());
            assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600, "{}", f.path().display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A server on loopback that answers each connection with `answer` (run on its own thread).
    fn device(answer: impl Fn(std::net::TcpStream) + Send + 'static) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                answer(s);
            }
        });
        format!("http://{addr}")
    }

    fn get_version(url: &str, timeout: Duration) -> Result<Response, String> {
        let mut h = Http::new(url, None, false, timeout).unwrap();
        h.send(&Request { method: "GET", path: "/mgmt/tm/sys/version".into(), body: None }, None)
    }

    #[test]
    fn a_huge_answer_is_refused_not_read_whole() {
        use std::io::{Read as _, Write as _};
        let url = device(|mut s| {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let size: u64 = 1 << 30;
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n");
            let chunk = vec![b' '; 1 << 20];
            for _ in 0..(size >> 20) {
                if s.write_all(&chunk).is_err() {
                    return;
                }
            }
        });
        let start = Instant::now();
        let e = get_version(&url, Duration::from_secs(60)).unwrap_err();
        assert!(e.contains("reading the answer"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn a_dripping_device_is_dropped_at_the_timeout() {
        use std::io::{Read as _, Write as _};
        let url = device(|mut s| {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n");
            for _ in 0..1000 {
                if s.write_all(b" ").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let start = Instant::now();
        assert!(get_version(&url, Duration::from_secs(1)).is_err());
        assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
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
