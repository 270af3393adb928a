//! The web UI in a real browser: the real `ces ui` serving a flow store, driven by Debian's chromium, headless.
//! Each page loads with no console message and no request off the machine (the browser's own network log is read:
//! every request a page starts goes to the UI); the overview's numbers equal `ces report -o json` on the same store;
//! the simulate page shows what `ces simulate` gives; new flows appear live on the flows page. A screenshot of each
//! page is written to `target/ui-screenshots/`. Also: the token, the limits, hostile cursors. Needs chromium
//! (`scripts/test.sh` installs it): fails, never skips, without it.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ces_flow::record::{FlowRecord, Kind, Outcome, RuleRef, Verdict};
use ces_flow::store::{StoreConfig, Writer};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn ces(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ces")).args(args).output().unwrap()
}

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(port: u16, args: &[&str]) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_ces"))
        .arg("ui")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let start = Instant::now();
    while TcpStream::connect(&addr).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "ces ui did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Server { child, addr }
}

/// A raw HTTP/1.1 exchange: the status and the body.
fn http(addr: &str, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn get(addr: &str, path: &str, extra: &str) -> (u16, String) {
    http(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n"))
}

/// What chromium did with a page: the DOM after scripts ran, its console messages, and where the page sent
/// requests.
struct Loaded {
    dom: String,
    console: Vec<String>,
    requests: Vec<String>,
}

fn chromium(url: &str, budget_ms: u32, screenshot: Option<&Path>) -> Loaded {
    let profile = tempdir("profile");
    let netlog = profile.join("netlog.json");
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-features=AutofillServerCommunication",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1400,1100",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg(format!("--log-net-log={}", netlog.display()))
    .arg(format!("--virtual-time-budget={budget_ms}"));
    match screenshot {
        Some(p) => cmd.arg(format!("--screenshot={}", p.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out =
        cmd.arg(url).output().unwrap_or_else(|e| panic!("chromium cannot run ({e}): scripts/test.sh installs it"));
    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    let console =
        String::from_utf8_lossy(&out.stderr).lines().filter(|l| l.contains(":CONSOLE")).map(str::to_string).collect();
    // Requests the page started (their initiator is the page's origin; the browser's own have none).
    let origin = url.split('/').take(3).collect::<Vec<_>>().join("/");
    let log: Value = serde_json::from_str(&std::fs::read_to_string(&netlog).unwrap_or_default()).unwrap_or_default();
    let start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"].as_i64();
    let mut requests = Vec::new();
    for e in log["events"].as_array().into_iter().flatten() {
        if e["type"].as_i64() == start_job && e["params"]["initiator"].as_str() == Some(origin.as_str()) {
            requests.push(e["params"]["url"].as_str().unwrap_or_default().to_string());
        }
    }
    let _ = std::fs::remove_dir_all(&profile);
    Loaded { dom: String::from_utf8_lossy(&out.stdout).into_owned(), console, requests }
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ces-ui-{name}-{}-{}", std::process::id(), rand_suffix()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// Records of the example's traffic in the last minutes: what `ces simulate` decides for its flows and for each pod
/// to a few destinations, as a gateway would have recorded them.
fn records() -> Vec<FlowRecord> {
    // The example's flows, 300 of them over the last ten minutes, decided at their own times.
    let now = jiff::Timestamp::now();
    let text = std::fs::read_to_string(root().join("examples/realistic/flows.jsonl")).unwrap();
    let mut lines = String::new();
    for (i, l) in text.lines().filter(|l| !l.trim().is_empty()).cycle().take(300).enumerate() {
        let mut v: Value = serde_json::from_str(l).unwrap();
        v["at"] = Value::from((now - Duration::from_secs(600 - i as u64)).to_string());
        lines.push_str(&v.to_string());
        lines.push('\n');
    }
    let file = tempdir("flows").join("flows.jsonl");
    std::fs::write(&file, lines).unwrap();
    let out = ces(&["simulate", "--example", "--flows", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut v = Vec::new();
    for (i, l) in String::from_utf8_lossy(&out.stdout).lines().enumerate() {
        let s: Value = serde_json::from_str(l).unwrap();
        let verdict = Verdict::parse(s["verdict"].as_str().unwrap()).unwrap();
        let at: jiff::Timestamp = s["at"].as_str().unwrap().parse().unwrap();
        let mut r = FlowRecord::packet(at, s["tenant"].as_str().unwrap(), verdict);
        r.kind = if verdict == Verdict::Accept { Kind::Connection } else { Kind::Packet };
        r.source.ip = s["source"]["ip"].as_str().map(|ip| ip.parse().unwrap());
        r.source.namespace = s["source"]["namespace"].as_str().map(str::to_string);
        r.source.pod = s["source"]["pod"].as_str().map(str::to_string);
        let to = s["to"].as_str().unwrap();
        let (hostport, proto) = to.split_once('/').unwrap();
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(':') && (h.starts_with('[') || !h.contains(':')) => (h, p),
            _ => (hostport, ""),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => r.destination.ip = Some(ip),
            Err(_) => {
                r.destination.host = Some(host.to_string());
                let ip = if r.source.ip.is_some_and(|s| s.is_ipv6()) {
                    format!("fd00:198::{}", 1 + i % 3)
                } else {
                    format!("198.18.200.{}", 1 + i % 3)
                };
                r.destination.ip = Some(ip.parse().unwrap());
            }
        }
        r.destination.port = port.parse().ok();
        r.destination.external_service = s["decidedBy"]["externalService"].as_str().map(str::to_string);
        r.protocol = proto.into();
        r.rule = Some(RuleRef {
            rule: s["decidedBy"]["rule"].as_str().unwrap().into(),
            context: s["decidedBy"]["context"].as_str().unwrap().into(),
            mode: "enforce".into(),
        });
        r.outcome = if i % 17 == 0 && verdict == Verdict::Accept { Outcome::Reset } else { Outcome::Completed };
        r.bytes.out = 100 + i as u64;
        r.bytes.back = 1000;
        v.push(r);
    }
    v
}

fn store() -> PathBuf {
    let dir = tempdir("store");
    let mut w = Writer::open(&dir, StoreConfig::default()).unwrap();
    w.append(&records()).unwrap();
    w.close().unwrap();
    dir
}

fn screenshots() -> PathBuf {
    let d = root().join("target/ui-screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn every_page_loads_in_chromium_with_no_console_message_and_no_request_off_the_machine() {
    let store = store();
    let proposed = tempdir("proposed");
    let r = root().join("examples/realistic");
    std::fs::copy(r.join("cluster.yaml"), proposed.join("cluster.yaml")).unwrap();
    let policies = std::fs::read_to_string(r.join("policies.yaml")).unwrap();
    let kept: Vec<&str> = policies.split("\n---\n").filter(|d| !d.contains("name: pci-no-paste")).collect();
    std::fs::write(proposed.join("policies.yaml"), kept.join("\n---\n")).unwrap();
    let s = serve(18181, &["--store", store.to_str().unwrap(), "--example", "--proposed", proposed.to_str().unwrap()]);
    let base = format!("http://{}", s.addr);
    let pages = [
        ("overview", "/?since=2h", "<h1>Overview</h1>"),
        ("map", "/map?since=2h", "<h1>Flow map</h1>"),
        ("map-namespace", "/map?since=2h&namespace=payments", "<h1>Flow map</h1>"),
        ("flows", "/flows?since=2h", "<h1>Flows</h1>"),
        ("rules", "/rules?since=2h", "<h1>Rules</h1>"),
        ("simulate", "/simulate?from=payments/checkout-0&to=api.stripe.com:443/tcp", "<h1>Simulate</h1>"),
        ("impact", "/impact?proposed=startup&since=2h", "<h1>Impact</h1>"),
    ];
    let shots = screenshots();
    for (name, path, marker) in pages {
        let url = format!("{base}{path}");
        let l = chromium(&url, 2000, None);
        assert!(l.dom.contains(marker), "{name}: {}", &l.dom[..l.dom.len().min(2000)]);
        assert!(!l.dom.contains("class=\"error\""), "{name} shows an error: {}", l.dom);
        assert!(l.console.is_empty(), "{name}: console messages: {:?}", l.console);
        assert!(!l.requests.is_empty(), "{name}: the network log shows none of the page's own requests");
        for u in &l.requests {
            assert!(u.starts_with(&base), "{name} sent a request off the UI: {u}");
        }
        let png = shots.join(format!("{name}.png"));
        let _ = std::fs::remove_file(&png);
        chromium(&url, 2000, Some(&png));
        assert!(std::fs::metadata(&png).map(|m| m.len() > 10_000).unwrap_or(false), "{name}: no screenshot");
    }
    // The map shows namespaces and destinations; the impact page the changes ces impact finds.
    let map = chromium(&format!("{base}/map?since=2h"), 1000, None).dom;
    assert!(map.contains("payments/payments") && map.contains("ExternalService payments/stripe"), "{map}");
    // The impact page: only the flows pci-no-paste decided change (as `ces impact` says of the same store).
    let impact = chromium(&format!("{base}/impact?proposed=startup&since=2h"), 1000, None).dom;
    assert!(impact.contains("ClusterEgressRule/pci-no-paste"), "{impact}");
    assert!(!impact.contains("could not be decided"), "{impact}");
    let out = ces(&[
        "impact",
        "--store",
        store.to_str().unwrap(),
        "--since",
        "2h",
        "--manifests",
        proposed.to_str().unwrap(),
        "--config",
        r.join("ces-conf.yaml").to_str().unwrap(),
        "-o",
        "json",
    ]);
    let changed: u64 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["flows"].as_u64().unwrap_or(1))
        .sum();
    assert!(changed > 0);
    assert!(
        impact.contains(&format!("id=\"changed\" data-value=\"{changed}\"")),
        "ces impact says {changed}: {impact}"
    );
    let _ = std::fs::remove_dir_all(&store);
    let _ = std::fs::remove_dir_all(&proposed);
}

fn value(dom: &str, id: &str) -> u64 {
    let at = dom.find(&format!("id=\"{id}\" data-value=\"")).unwrap_or_else(|| panic!("no #{id} in the page"));
    let rest = &dom[at + id.len() + 18..];
    rest[..rest.find('"').unwrap()].parse().unwrap()
}

#[test]
fn the_overview_says_what_ces_report_says_and_simulate_what_ces_simulate_says() {
    let store = store();
    let s = serve(18182, &["--store", store.to_str().unwrap(), "--example"]);
    let base = format!("http://{}", s.addr);
    let until = jiff::Timestamp::now().to_string();
    let since = (jiff::Timestamp::now() - Duration::from_secs(3600)).to_string();
    let dom = chromium(&format!("{base}/?since={since}&until={until}"), 1000, None).dom;
    let out = ces(&["report", "--store", store.to_str().unwrap(), "--since", &since, "--until", &until, "-o", "json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value(&dom, "records"), report["records"].as_u64().unwrap());
    for (id, v) in [("accepted", "accept"), ("dropped", "drop"), ("rejected", "reject")] {
        assert_eq!(value(&dom, id), report["byVerdict"][v].as_u64().unwrap_or(0), "{id}");
    }
    assert!(value(&dom, "records") >= 300, "every record is in the window");
    // The top destinations, in order, with their counts.
    let table = &dom[dom.find("id=\"top-destinations\"").unwrap()..];
    let table = &table[..table.find("</table>").unwrap()];
    let counts: Vec<u64> =
        table.split("data-records=\"").skip(1).map(|s| s[..s.find('"').unwrap()].parse().unwrap()).collect();
    let want: Vec<u64> =
        report["topDestinations"].as_array().unwrap().iter().map(|t| t["records"].as_u64().unwrap()).collect();
    assert_eq!(counts, want);
    // Simulate: the page against the command.
    for (from, to) in
        [("payments/checkout-0", "api.stripe.com:443/tcp"), ("analytics/notebook-0", "x.pastebin.example:443/tcp")]
    {
        let out = ces(&["simulate", "--example", "--from", from, "--to", to, "--output", "json"]);
        let want: Value = serde_json::from_slice(&out.stdout).unwrap();
        let dom = chromium(&format!("{base}/simulate?from={from}&to={to}"), 1000, None).dom;
        let verdict = want["verdict"].as_str().unwrap().to_uppercase();
        assert!(dom.contains(&format!("<span id=\"verdict\">{verdict}</span>")), "{from} -> {to}: {dom}");
        let rule = want["decidedBy"]["rule"].as_str().unwrap();
        assert!(dom.contains(&format!("<span id=\"decided-by\">{rule}</span>")), "{from} -> {to}: {rule}");
        assert!(dom.contains("<svg class=\"trail\""), "the trail is drawn");
    }
    let _ = std::fs::remove_dir_all(&store);
}

#[test]
fn new_flows_appear_live_on_the_flows_page() {
    let store = store();
    let s = serve(18183, &["--store", store.to_str().unwrap(), "--example"]);
    let base = format!("http://{}", s.addr);
    // A writer adds a record every 100 ms while the page follows.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (st, dir) = (stop.clone(), store.clone());
    let writer = std::thread::spawn(move || {
        let mut w = Writer::open(&dir, StoreConfig::default()).unwrap();
        let mut template = records()[0].clone();
        template.source.pod = Some("live-pod".into());
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            template.time = jiff::Timestamp::now();
            w.append(std::slice::from_ref(&template)).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        w.close().unwrap();
    });
    let l = chromium(&format!("{base}/flows?since=2h&last=50&follow=1"), 9000, None);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert!(l.console.is_empty(), "{:?}", l.console);
    assert!(l.dom.contains("following new flows: "), "{}", l.dom);
    assert!(l.dom.contains("live-pod"), "no live row appended: {}", l.dom);
    assert!(l.requests.iter().any(|u| u.contains("/api/flows?") && u.contains("after=")), "{:?}", l.requests);
    let _ = std::fs::remove_dir_all(&store);
}

#[test]
fn a_token_guards_everything_and_hostile_requests_cost_nothing() {
    let store = store();
    let dir = tempdir("token");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "0123456789abcdef-secret\n").unwrap();
    // Beyond loopback without a token or TLS: refused at start.
    let out = ces(&["ui", "--store", store.to_str().unwrap(), "--example", "--listen", "0.0.0.0:18185"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("beyond loopback"));
    let s =
        serve(18184, &["--store", store.to_str().unwrap(), "--example", "--token-file", token_file.to_str().unwrap()]);
    assert_eq!(get(&s.addr, "/api/report", "").0, 401);
    let (code, _) = get(&s.addr, "/", "");
    assert_eq!(code, 303, "pages send to /login");
    assert_eq!(get(&s.addr, "/api/report", "Authorization: Bearer wrong-token-wrong-token\r\n").0, 401);
    let (code, body) = get(&s.addr, "/api/report?since=2h", "Authorization: Bearer 0123456789abcdef-secret\r\n");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"records\":300"), "{body}");
    // The login form sets the cookie that opens the pages.
    let form = "token=0123456789abcdef-secret";
    let (code, _) = http(
        &s.addr,
        &format!(
            "POST /login HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        ),
    );
    assert_eq!(code, 303);
    assert_eq!(get(&s.addr, "/rules", "Cookie: ces_ui=0123456789abcdef-secret\r\n").0, 200);
    // A cursor naming a file outside the store is refused, not opened.
    let auth = "Authorization: Bearer 0123456789abcdef-secret\r\n";
    for bad in ["../../etc/passwd:1", "flows-1.db/../../x:1", "x:y"] {
        let (code, body) = get(&s.addr, &format!("/api/flows?after={bad}"), auth);
        assert_eq!(code, 400, "{bad}: {body}");
    }
    // A body beyond 1 MiB is refused; an unknown query parameter too.
    let big = "x".repeat(2 << 20);
    let (code, _) = http(
        &s.addr,
        &format!(
            "POST /api/impact HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n{big}",
            big.len()
        ),
    );
    assert_eq!(code, 413);
    assert_eq!(get(&s.addr, "/api/report?evil=1", auth).0, 400);
    // Pasted text that is not CES objects: a clear error, not a crash.
    let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: x}\n";
    let (code, body) = http(
        &s.addr,
        &format!(
            "POST /api/impact?since=2h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n{yaml}",
            yaml.len()
        ),
    );
    assert_eq!(code, 400);
    assert!(body.contains("CES objects only"), "{body}");
    // Headers: nothing from elsewhere, no framing.
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.write_all(format!("GET /api/report HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n").as_bytes()).unwrap();
    let mut head = String::new();
    let _ = c.read_to_string(&mut head);
    assert!(head.contains("content-security-policy: default-src 'none'"), "{head}");
    let _ = std::fs::remove_dir_all(&store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_namespaces_ui_shows_and_proposes_only_its_own() {
    let store = store();
    let s = serve(18186, &["--store", store.to_str().unwrap(), "--example", "--namespace", "analytics"]);
    let (code, body) = get(&s.addr, "/api/flows?since=2h&last=1000", "");
    assert_eq!(code, 200);
    let page: Value = serde_json::from_str(&body).unwrap();
    let records = page["records"].as_array().unwrap();
    assert!(!records.is_empty());
    assert!(records.iter().all(|r| r["source"]["namespace"] == "analytics"), "{body}");
    assert_eq!(get(&s.addr, "/api/flows?namespace=payments", "").0, 400);
    assert_eq!(get(&s.addr, "/api/report?tenant=payments&namespace=payments", "").0, 400);
    let (code, body) = get(&s.addr, "/api/simulate?from=payments/checkout-0&to=api.stripe.com:443/tcp", "");
    assert_eq!(code, 400, "{body}");
    let yaml = "apiVersion: kubeovn.io/v1alpha1\nkind: ClusterEgressRule\nmetadata: {name: all}\nspec: {action: accept, externalServices: [x]}\n";
    let (code, body) = http(
        &s.addr,
        &format!(
            "POST /api/impact HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{yaml}",
            yaml.len()
        ),
    );
    assert_eq!(code, 400);
    assert!(body.contains("cluster rules"), "{body}");
    let _ = std::fs::remove_dir_all(&store);
}
