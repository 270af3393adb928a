//! The CES web UI (docs/ui.md): read-only pages rendered on the server (HTML with SVG pictures) over the flow store,
//! the policy model and the one evaluator, and the JSON API under `/api/` that gives the same data. The assets are
//! in the binary; the pages load nothing from anywhere else (the Content-Security-Policy says so to the browser).
//!
//! Hostile requests: bodies are bounded (1 MiB), headers must arrive within 10 s, a request is answered within 60 s
//! or gets 503, at most 256 connections and 16 requests are served at once (beyond: refused). Beyond loopback the
//! server needs a bearer token or TLS (`check`).

mod data;
pub mod html;
mod svg;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Form, Query as Q, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
pub use data::{Query, Scope, Ui};
use serde::Deserialize;

/// How the server listens.
pub struct Options {
    pub listen: SocketAddr,
    /// The bearer token (read from a file by the caller); required beyond loopback unless TLS is on.
    pub token: Option<String>,
    /// A certificate chain and its key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// Refuses to listen beyond loopback with neither a token nor TLS.
pub fn check(o: &Options) -> Result<(), String> {
    if !o.listen.ip().is_loopback() && o.token.is_none() && o.tls.is_none() {
        return Err(format!(
            "{} is beyond loopback: give a bearer token (--token-file) or TLS (--tls-cert and --tls-key)",
            o.listen
        ));
    }
    if o.token.as_deref().is_some_and(|t| t.len() < 16) {
        return Err("the token is shorter than 16 characters".into());
    }
    Ok(())
}

struct App {
    ui: Ui,
    token: Option<String>,
    secure_cookie: bool,
    busy: tokio::sync::Semaphore,
}

type S = State<Arc<App>>;

const CSS: &str = include_str!("../assets/style.css");
const JS: &str = include_str!("../assets/app.js");

fn scope_label(ui: &Ui) -> String {
    match (&ui.scope.tenant, &ui.scope.namespace) {
        (Some(t), Some(n)) => format!("tenant {t}, namespace {n}"),
        (Some(t), None) => format!("tenant {t}"),
        (None, Some(n)) => format!("namespace {n}"),
        (None, None) => String::new(),
    }
}

fn page(app: &App, title: &str, active: &str, body: &str) -> Response {
    Html(html::page(title, active, &scope_label(&app.ui), body)).into_response()
}

/// Runs blocking work (the store, the evaluator) off the async threads.
async fn blocking<T: Send + 'static>(app: &Arc<App>, f: impl FnOnce(&Ui) -> T + Send + 'static) -> T {
    let app = app.clone();
    tokio::task::spawn_blocking(move || f(&app.ui)).await.expect("a UI task panicked")
}

async fn overview(State(app): S, Q(q): Q<Query>) -> Response {
    let q2 = q.clone();
    let r = blocking(&app, move |ui| ui.overview(&q2)).await;
    let body = match r {
        Ok(o) => html::overview(&q, &o),
        Err(e) => html::filters("/", &q, &[]) + &html::error(&e),
    };
    page(&app, "Overview", "/", &body)
}

async fn map(State(app): S, Q(q): Q<Query>) -> Response {
    // The map's namespace is a node to open, not a filter of the window's rows.
    let mut window = q.clone();
    window.namespace = None;
    window.destination = None;
    let r = blocking(&app, move |ui| ui.destinations(&window)).await;
    let body = match r {
        Ok(rows) => html::map(&q, &rows),
        Err(e) => html::error(&e),
    };
    page(&app, "Flow map", "/map", &body)
}

async fn flows(State(app): S, Q(q): Q<Query>) -> Response {
    let q2 = q.clone();
    let r = blocking(&app, move |ui| ui.flows(&q2)).await;
    let body = match r {
        Ok(p) => html::flows(&q, &p),
        Err(e) => html::filters("/flows", &q, &[]) + &html::error(&e),
    };
    page(&app, "Flows", "/flows", &body)
}

async fn rules(State(app): S, Q(q): Q<Query>) -> Response {
    let q2 = q.clone();
    let r = blocking(&app, move |ui| ui.rules(&q2)).await;
    let body = match r {
        Ok(rows) => html::rules(&q, &rows),
        Err(e) => html::error(&e),
    };
    page(&app, "Rules", "/rules", &body)
}

async fn simulate(State(app): S, Q(q): Q<Query>) -> Response {
    let asked = q.from.is_some() || q.to.is_some();
    let q2 = q.clone();
    let r = if asked { Some(blocking(&app, move |ui| ui.simulate(&q2)).await) } else { None };
    page(&app, "Simulate", "/simulate", &html::simulate(&q, r))
}

async fn impact_get(State(app): S, Q(q): Q<Query>) -> Response {
    let has = app.ui.proposed.is_some();
    let r = if q.proposed.as_deref() == Some("startup") {
        let q2 = q.clone();
        Some(blocking(&app, move |ui| ui.impact(&q2, None)).await)
    } else {
        None
    };
    page(&app, "Impact", "/impact", &html::impact(&q, has, r, ""))
}

#[derive(Deserialize)]
struct Pasted {
    manifests: String,
    #[serde(default)]
    since: Option<String>,
}

async fn impact_post(State(app): S, Form(p): Form<Pasted>) -> Response {
    let q = Query { since: p.since.clone(), ..Query::default() };
    let (q2, text) = (q.clone(), p.manifests.clone());
    let r = blocking(&app, move |ui| ui.impact(&q2, Some(&text))).await;
    page(&app, "Impact", "/impact", &html::impact(&q, app.ui.proposed.is_some(), Some(r), &p.manifests))
}

fn json<T: serde::Serialize>(r: Result<T, String>) -> Response {
    match r {
        Ok(v) => (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_string(&v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
        )
            .into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({"error": e}).to_string(),
        )
            .into_response(),
    }
}

async fn api_report(State(app): S, Q(q): Q<Query>) -> Response {
    json(blocking(&app, move |ui| ui.overview(&q)).await)
}

async fn api_flows(State(app): S, Q(q): Q<Query>) -> Response {
    json(blocking(&app, move |ui| ui.flows(&q)).await)
}

async fn api_map(State(app): S, Q(q): Q<Query>) -> Response {
    json(blocking(&app, move |ui| ui.destinations(&q)).await)
}

async fn api_rules(State(app): S, Q(q): Q<Query>) -> Response {
    json(blocking(&app, move |ui| ui.rules(&q)).await)
}

async fn api_simulate(State(app): S, Q(q): Q<Query>) -> Response {
    json(blocking(&app, move |ui| ui.simulate(&q)).await)
}

async fn api_impact(State(app): S, Q(q): Q<Query>, body: String) -> Response {
    let pasted = if body.trim().is_empty() { None } else { Some(body) };
    json(blocking(&app, move |ui| ui.impact(&q, pasted.as_deref())).await)
}

async fn login_get() -> Response {
    Html(html::page("Sign in", "", "", &html::login(false))).into_response()
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

/// Compares in time that does not depend on where the strings differ.
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= (a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

async fn login_post(State(app): S, Form(l): Form<Login>) -> Response {
    match &app.token {
        Some(t) if same(t, &l.token) => {
            let secure = if app.secure_cookie { "; Secure" } else { "" };
            let cookie = format!("ces_ui={}; HttpOnly; SameSite=Strict; Path=/{secure}", l.token);
            let mut r = Redirect::to("/").into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        _ => (StatusCode::UNAUTHORIZED, Html(html::page("Sign in", "", "", &html::login(true)))).into_response(),
    }
}

fn presented(headers: &HeaderMap) -> Option<String> {
    if let Some(b) =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(b.trim().to_string());
    }
    let cookies = headers.get(header::COOKIE).and_then(|v| v.to_str().ok())?;
    cookies.split(';').map(str::trim).find_map(|c| c.strip_prefix("ces_ui=")).map(str::to_string)
}

/// With a token: every page and API call presents it (the cookie `/login` sets, or `Authorization: Bearer`).
async fn auth(State(app): S, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let open = path == "/login" || path.starts_with("/assets/");
    if let (Some(t), false) = (&app.token, open) {
        let ok = presented(req.headers()).is_some_and(|p| same(t, &p));
        if !ok {
            return if path.starts_with("/api/") {
                (StatusCode::UNAUTHORIZED, "a bearer token is needed\n").into_response()
            } else {
                Redirect::to("/login").into_response()
            };
        }
    }
    next.run(req).await
}

/// At most 16 requests at work at once (beyond: 503), each answered within 60 s.
async fn limit(State(app): S, req: Request, next: Next) -> Response {
    let Ok(_permit) = app.busy.try_acquire() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "busy: try again\n").into_response();
    };
    match tokio::time::timeout(Duration::from_secs(60), next.run(req)).await {
        Ok(r) => r,
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "took too long\n").into_response(),
    }
}

/// What every answer says to the browser: load nothing from elsewhere, run no inline script, never be framed.
async fn headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    let set = |h: &mut HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    );
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::REFERRER_POLICY, "no-referrer");
    set(h, header::CACHE_CONTROL, "no-store");
    r
}

/// The UI's routes (for tests in process, and `serve`).
pub fn router(ui: Ui, token: Option<String>, secure_cookie: bool) -> Router {
    let app = Arc::new(App { ui, token, secure_cookie, busy: tokio::sync::Semaphore::new(16) });
    Router::new()
        .route("/", get(overview))
        .route("/map", get(map))
        .route("/flows", get(flows))
        .route("/rules", get(rules))
        .route("/simulate", get(simulate))
        .route("/impact", get(impact_get).post(impact_post))
        .route("/login", get(login_get).post(login_post))
        .route("/api/report", get(api_report))
        .route("/api/flows", get(api_flows))
        .route("/api/map", get(api_map))
        .route("/api/rules", get(api_rules))
        .route("/api/simulate", get(api_simulate))
        .route("/api/impact", get(api_impact).post(api_impact))
        .route("/assets/style.css", get(|| async { ([(header::CONTENT_TYPE, "text/css")], CSS) }))
        .route("/assets/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], JS) }))
        .layer(from_fn_with_state(app.clone(), auth))
        .layer(from_fn_with_state(app.clone(), limit))
        .layer(from_fn(headers))
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(app)
}

fn tls_config(cert: &PathBuf, key: &PathBuf) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let c = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key: {e}"))?;
    Ok(Arc::new(c))
}

/// Serves until the process ends. Returns the address bound once listening (`ready`).
pub fn serve(ui: Ui, o: Options, ready: impl FnOnce(SocketAddr)) -> Result<(), String> {
    check(&o)?;
    let tls = match &o.tls {
        Some((c, k)) => Some(tokio_rustls::TlsAcceptor::from(tls_config(c, k)?)),
        None => None,
    };
    let router = router(ui, o.token.clone(), tls.is_some());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(o.listen).await.map_err(|e| format!("{}: {e}", o.listen))?;
        ready(listener.local_addr().map_err(|e| e.to_string())?);
        let conns = Arc::new(tokio::sync::Semaphore::new(256));
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let Ok(permit) = conns.clone().try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let (router, tls) = (router.clone(), tls.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let service = hyper_util::service::TowerToHyperService::new(router);
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
                match tls {
                    Some(acceptor) => {
                        let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
                        else {
                            return;
                        };
                        let _ = http.serve_connection(hyper_util::rt::TokioIo::new(s), service).await;
                    }
                    None => {
                        let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                    }
                }
            });
        }
    })
}
