//! The pages, rendered on the server: plain HTML with SVG pictures, labelled forms that work with the keyboard, one
//! small script (following new flows live). Every text from the store, the policy or the request is escaped.

use std::fmt::Write as _;

use ces_flow::record::FlowRecord;
use ces_flow::rollup::{Count, DestRow};

use crate::data::{FlowsPage, ImpactPage, Overview, Query, RuleRow, Simulated};
use crate::svg;

/// Escapes text for HTML (element content and quoted attributes alike).
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Percent-encodes a query-string value.
pub fn url(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:".contains(&b) {
            o.push(b as char);
        } else {
            let _ = write!(o, "%{b:02X}");
        }
    }
    o
}

/// An SVG link around `inner` (none when `href` is empty).
pub fn link(href: &str, inner: &str) -> String {
    if href.is_empty() { inner.to_string() } else { format!("<a href=\"{}\">{inner}</a>", esc(href)) }
}

/// The query string of the filters a page keeps when it links to another view.
pub fn query_base(q: &Query) -> String {
    let mut parts = Vec::new();
    for (k, v) in [("since", &q.since), ("until", &q.until), ("tenant", &q.tenant)] {
        if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
            parts.push(format!("{k}={}", url(v)));
        }
    }
    parts.join("&")
}

const PAGES: [(&str, &str); 6] = [
    ("/", "Overview"),
    ("/map", "Flow map"),
    ("/flows", "Flows"),
    ("/rules", "Rules"),
    ("/simulate", "Simulate"),
    ("/impact", "Impact"),
];

/// A whole page.
pub fn page(title: &str, active: &str, scope: &str, body: &str) -> String {
    let mut nav = String::new();
    for (href, name) in PAGES {
        let current = if href == active { " aria-current=\"page\"" } else { "" };
        let _ = write!(nav, "<li><a href=\"{href}\"{current}>{name}</a></li>");
    }
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{} · CES</title><link rel=\"stylesheet\" href=\"/assets/style.css\"><link rel=\"icon\" href=\"data:,\"></head><body><a class=\"skip\" href=\"#main\">Skip to the content</a><header><span class=\"brand\">CES egress</span>{}<nav aria-label=\"Pages\"><ul>{nav}</ul></nav></header><main id=\"main\"><h1>{}</h1>{body}</main><script src=\"/assets/app.js\"></script></body></html>\n",
        esc(title),
        if scope.is_empty() { String::new() } else { format!("<span class=\"scope\">{}</span>", esc(scope)) },
        esc(title)
    )
}

pub fn error(message: &str) -> String {
    format!("<p class=\"error\" role=\"alert\">{}</p>", esc(message))
}

fn input(name: &str, label: &str, value: &Option<String>, hint: &str) -> String {
    format!(
        "<div class=\"field\"><label for=\"f-{name}\">{label}</label><input id=\"f-{name}\" name=\"{name}\" value=\"{}\" placeholder=\"{}\"></div>",
        esc(value.as_deref().unwrap_or_default()),
        esc(hint)
    )
}

/// At most `n` characters, with an ellipsis when cut.
pub fn short(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_string() } else { format!("{}…", s.chars().take(n - 1).collect::<String>()) }
}

/// The filter form of a page (GET: the view's address is its link).
pub fn filters(action: &str, q: &Query, extra: &[(&str, &str, &Option<String>, &str)]) -> String {
    let mut f = format!("<form class=\"filters\" method=\"get\" action=\"{action}\" aria-label=\"Filters\">");
    f += &input("since", "Since", &q.since, crate::data::DEFAULT_SINCE);
    f += &input("until", "Until", &q.until, "now");
    f += &input("tenant", "Tenant", &q.tenant, "any");
    f += &input("namespace", "Namespace", &q.namespace, "any");
    for (name, label, value, hint) in extra {
        f += &input(name, label, value, hint);
    }
    f += "<button type=\"submit\">Show</button></form>";
    f
}

fn count_table(caption: &str, head: &[&str], rows: &[Count], id: &str) -> String {
    let mut t = format!("<table id=\"{id}\"><caption>{}</caption><thead><tr>", esc(caption));
    for h in head {
        let _ = write!(t, "<th scope=\"col\">{h}</th>");
    }
    t += "<th scope=\"col\" class=\"n\">Records</th></tr></thead><tbody>";
    if rows.is_empty() {
        let _ = write!(t, "<tr><td colspan=\"{}\">None</td></tr>", head.len() + 1);
    }
    for r in rows {
        t += "<tr>";
        for k in &r.key {
            let _ = write!(t, "<td>{}</td>", esc(k));
        }
        let _ = write!(t, "<td class=\"n\" data-records=\"{}\">{}</td></tr>", r.records, r.records);
    }
    t += "</tbody></table>";
    t
}

pub fn overview(q: &Query, o: &Overview) -> String {
    let d = &o.report;
    let v = |k: &str| d.by_verdict.get(k).copied().unwrap_or(0);
    let lost: u64 = d.lost.iter().map(|c| c.records).sum();
    let mut b = filters("/", q, &[("pod", "Pod", &q.pod, "namespace/name"), ("rule", "Rule", &q.rule, "Kind/ns/name")]);
    if let Some(n) = o.from_records {
        let _ = write!(
            b,
            "<p class=\"note\">Counted from the newest {n} records (the pod and rule filters are not in the rollups).</p>"
        );
    }
    let _ = write!(
        b,
        "<section aria-label=\"Totals\" class=\"totals\"><p><span class=\"big\" id=\"records\" data-value=\"{}\">{}</span> records: <span id=\"accepted\" data-value=\"{}\">{}</span> accepted, <span id=\"dropped\" data-value=\"{}\">{}</span> dropped, <span id=\"rejected\" data-value=\"{}\">{}</span> rejected; <span id=\"lost\" data-value=\"{lost}\">{lost}</span> lost</p></section>",
        d.records,
        d.records,
        v("accept"),
        v("accept"),
        v("drop"),
        v("drop"),
        v("reject"),
        v("reject")
    );
    b += "<section><h2>Records over time</h2>";
    b += &svg::timeline(&d.timeline, d.timeline_step);
    b += "</section><section class=\"grid\">";
    let mut t = String::from(
        "<table id=\"top-destinations\"><caption>Top destinations per tenant and namespace</caption><thead><tr><th scope=\"col\">Tenant</th><th scope=\"col\">Namespace</th><th scope=\"col\">Destination</th><th scope=\"col\" class=\"n\">Records</th><th scope=\"col\" class=\"n\">Bytes</th></tr></thead><tbody>",
    );
    for x in &d.top_destinations {
        let _ = write!(
            t,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"n\" data-records=\"{}\">{}</td><td class=\"n\">{}</td></tr>",
            esc(&x.tenant),
            esc(&x.namespace),
            esc(&x.destination),
            x.records,
            x.records,
            x.bytes
        );
    }
    if d.top_destinations.is_empty() {
        t += "<tr><td colspan=\"5\">None</td></tr>";
    }
    t += "</tbody></table>";
    b += &t;
    b += &count_table("Drops and rejects by rule", &["Rule", "Verdict"], &d.drops_by_rule, "drops-by-rule");
    b += &count_table(
        "Drops and rejects by pod",
        &["Tenant", "Namespace", "Pod", "Verdict"],
        &d.drops_by_pod,
        "drops-by-pod",
    );
    b += &count_table(
        "Audit hits by rule (what it would have done instead)",
        &["Audit rule", "Decided by", "Verdict"],
        &d.audit_by_rule,
        "audit-by-rule",
    );
    b += &count_table("Protocols and ports", &["Protocol", "Port"], &d.protocols, "protocols");
    b += &count_table(
        "TCP/IP errors by destination",
        &["Destination", "Port", "Outcome"],
        &d.errors_by_destination,
        "errors",
    );
    b += &count_table("Records lost", &["Where", "Why"], &d.lost, "lost-table");
    b += "<table id=\"never-hit\"><caption>Rules never hit in the window</caption><tbody>";
    for r in &d.rules_never_hit {
        let _ = write!(b, "<tr><td>{}</td></tr>", esc(r));
    }
    if d.rules_never_hit.is_empty() {
        b += "<tr><td>None</td></tr>";
    }
    b += "</tbody></table></section>";
    b
}

pub fn map(q: &Query, rows: &[DestRow]) -> String {
    let mut b = filters("/map", q, &[("destination", "Destination", &q.destination, "address or name")]);
    let open_ns = q.namespace.as_deref().filter(|n| !n.is_empty()).map(|n| {
        if n.contains('/') {
            n.to_string()
        } else {
            // A namespace alone: the tenant of its rows.
            rows.iter().find(|r| r.namespace == n).map(|r| format!("{}/{}", r.tenant, n)).unwrap_or_default()
        }
    });
    b += "<p class=\"note\">Namespaces on the left, destinations on the right (by ExternalService; open a namespace for its addresses and names). Edges are as wide as their records, green when all were accepted, orange when some were denied, red when most were. Select a node to open it.</p>";
    b += &svg::map(rows, open_ns.as_deref(), q.destination.as_deref().filter(|d| !d.is_empty()), &query_base(q));
    b
}

pub fn flow_row(r: &FlowRecord) -> String {
    let src = match (&r.source.namespace, &r.source.pod) {
        (Some(ns), Some(p)) => format!("{ns}/{p}"),
        _ => r.source.ip.map(|i| i.to_string()).unwrap_or_default(),
    };
    let host = r.destination.host.clone().or_else(|| r.destination.ip.map(|i| i.to_string())).unwrap_or_default();
    let dst = match r.destination.port {
        Some(p) => format!("{host}:{p}/{}", r.protocol),
        None => format!("{host}/{}", r.protocol),
    };
    format!(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"v-{}\">{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td></tr>",
        esc(&r.time.strftime("%Y-%m-%d %H:%M:%S%.3f").to_string()),
        esc(&r.tenant),
        esc(&src),
        esc(&dst),
        r.verdict.as_str(),
        r.verdict.as_str(),
        esc(&r.rule.as_ref().map(|x| x.rule.clone()).unwrap_or_default()),
        r.outcome.as_str(),
        r.bytes.out + r.bytes.back
    )
}

pub fn flows(q: &Query, p: &FlowsPage) -> String {
    let mut b = filters(
        "/flows",
        q,
        &[
            ("pod", "Pod", &q.pod, "namespace/name"),
            ("rule", "Rule", &q.rule, "Kind/ns/name"),
            ("verdict", "Verdict", &q.verdict, "accept, drop, reject"),
            ("to", "To", &q.to, "address, CIDR or name"),
            ("protocol", "Protocol", &q.protocol, "tcp, udp, icmp"),
            ("port", "Port", &q.port, "443"),
            ("last", "Newest", &q.last, "100"),
        ],
    );
    let follow = q.follow.as_deref() == Some("1");
    let _ = write!(
        b,
        "<p><a href=\"?{}&follow={}\" id=\"follow-link\">{}</a> <span id=\"follow-state\" aria-live=\"polite\">{}</span></p>",
        esc(&query_string(q)),
        if follow { "0" } else { "1" },
        if follow { "Stop following" } else { "Follow new flows live" },
        if follow { "following new flows" } else { "" }
    );
    let _ = write!(
        b,
        "<table id=\"flows\" data-cursor=\"{}\" data-follow=\"{}\" data-query=\"{}\"><caption>{} records, newest last</caption><thead><tr><th scope=\"col\">Time (UTC)</th><th scope=\"col\">Tenant</th><th scope=\"col\">Source</th><th scope=\"col\">Destination</th><th scope=\"col\">Verdict</th><th scope=\"col\">Rule</th><th scope=\"col\">Outcome</th><th scope=\"col\" class=\"n\">Bytes</th></tr></thead><tbody>",
        esc(&p.cursor),
        follow,
        esc(&query_string(q)),
        p.records.len()
    );
    for r in &p.records {
        b += &flow_row(r);
    }
    b += "</tbody></table>";
    b
}

/// The filters of a query as a query string (for links and the live follow).
fn query_string(q: &Query) -> String {
    let mut parts = Vec::new();
    for (k, v) in [
        ("since", &q.since),
        ("until", &q.until),
        ("tenant", &q.tenant),
        ("namespace", &q.namespace),
        ("pod", &q.pod),
        ("rule", &q.rule),
        ("verdict", &q.verdict),
        ("to", &q.to),
        ("protocol", &q.protocol),
        ("port", &q.port),
        ("last", &q.last),
    ] {
        if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
            parts.push(format!("{k}={}", url(v)));
        }
    }
    parts.join("&")
}

pub fn rules(q: &Query, rows: &[RuleRow]) -> String {
    let mut b = filters("/rules", q, &[]);
    let _ = write!(
        b,
        "<table id=\"rules\"><caption>{} rules and tenant defaults; hits in the window (to the minute, or hour beyond six hours)</caption><thead><tr><th scope=\"col\">Rule</th><th scope=\"col\">Tenant</th><th scope=\"col\">Action</th><th scope=\"col\">Mode</th><th scope=\"col\" class=\"n\">Decided</th><th scope=\"col\">Last decided</th><th scope=\"col\" class=\"n\">Audit hits</th><th scope=\"col\">Last audit hit</th><th scope=\"col\">Status</th></tr></thead><tbody>",
        rows.len()
    );
    for r in rows {
        let never = r.hits.decided == 0 && r.hits.audited == 0;
        let when = |t: &Option<jiff::Timestamp>| {
            t.map(|t| t.strftime("%Y-%m-%d %H:%M").to_string()).unwrap_or_else(|| "never".into())
        };
        let _ = write!(
            b,
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td></tr>",
            if never { " class=\"never\"" } else { "" },
            esc(&r.rule),
            esc(&r.tenant),
            esc(&r.action),
            esc(&r.mode),
            r.hits.decided,
            esc(&when(&r.hits.last_decided)),
            r.hits.audited,
            esc(&when(&r.hits.last_audited)),
            esc(format!("{} {}: {}", r.phase, r.reason, r.message).trim())
        );
    }
    b += "</tbody></table>";
    b
}

pub fn simulate(q: &Query, result: Option<Result<Simulated, String>>) -> String {
    let mut b =
        String::from("<form class=\"filters\" method=\"get\" action=\"/simulate\" aria-label=\"Flow to decide\">");
    b += &input("from", "From", &q.from, "namespace/pod or address");
    b += &input("tenant", "Tenant (for an address)", &q.tenant, "the one that holds it");
    b += &input("to", "To", &q.to, "api.example.com:443/tcp");
    b += &input("at", "At", &q.at, "now (RFC 3339)");
    b += "<button type=\"submit\">Decide</button></form>";
    match result {
        None => {}
        Some(Err(e)) => b += &error(&e),
        Some(Ok(s)) => {
            let d = &s.decision;
            let who = match (&s.namespace, &s.pod) {
                (Some(n), Some(p)) => format!("pod {n}/{p}, "),
                _ => String::new(),
            };
            let _ = write!(
                b,
                "<section aria-label=\"Decision\"><p class=\"verdict v-{}\"><span id=\"verdict\">{}</span> by <span id=\"decided-by\">{}</span> in the {} context</p><p>{} → {} at {} · source {} ({who}tenant {})</p>",
                d.verdict.as_str(),
                d.verdict.as_str().to_uppercase(),
                esc(&d.decided_by.rule),
                d.decided_by.context.as_str(),
                esc(&s.from),
                esc(&s.to),
                esc(&s.at.to_string()),
                s.source,
                esc(&d.tenant)
            );
            b += &svg::trail(d);
            b += "<table id=\"trail\"><caption>The rules met on the way</caption><thead><tr><th scope=\"col\">Context</th><th scope=\"col\">Rule</th><th scope=\"col\">Action</th><th scope=\"col\">Effect</th></tr></thead><tbody>";
            for t in &d.trail {
                let _ = write!(
                    b,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    t.context.as_str(),
                    esc(&t.rule),
                    t.action.as_str(),
                    t.effect.as_str()
                );
            }
            b += "</tbody></table></section>";
        }
    }
    b
}

pub fn impact(q: &Query, has_startup: bool, result: Option<Result<ImpactPage, String>>, pasted: &str) -> String {
    let mut b = String::new();
    if has_startup {
        b += "<form class=\"filters\" method=\"get\" action=\"/impact\" aria-label=\"Impact of the proposed policy given at start\"><input type=\"hidden\" name=\"proposed\" value=\"startup\">";
        b += &input("since", "Since", &q.since, crate::data::DEFAULT_SINCE);
        b += &input("failOn", "Count only", &q.fail_on, "accept->deny");
        b += "<button type=\"submit\">Decide the window's flows under the proposed policy</button></form>";
    }
    b += "<form class=\"paste\" method=\"post\" action=\"/impact\" aria-label=\"Impact of pasted objects\"><label for=\"f-manifests\">CES objects to add to the current policy (YAML; objects of the same kind and name replace the current ones)</label><textarea id=\"f-manifests\" name=\"manifests\" rows=\"12\">";
    b += &esc(pasted);
    b += "</textarea>";
    b += &input("since", "Since", &q.since, crate::data::DEFAULT_SINCE);
    b += "<button type=\"submit\">Decide the window's flows under it</button></form>";
    match result {
        None => {}
        Some(Err(e)) => b += &error(&e),
        Some(Ok(r)) => {
            let _ = write!(
                b,
                "<section aria-label=\"Impact\"><p>Under {}: <span id=\"changed\" data-value=\"{}\">{}</span> of <span id=\"impact-flows\" data-value=\"{}\">{}</span> recorded flows change ({} counted){}.</p>",
                esc(&r.what),
                r.changed,
                r.changed,
                r.flows,
                r.flows,
                r.failing,
                if r.undecided > 0 { format!("; {} could not be decided", r.undecided) } else { String::new() }
            );
            b += "<table id=\"impact\"><caption>Changes, grouped</caption><thead><tr><th scope=\"col\" class=\"n\">Flows</th><th scope=\"col\">Before</th><th scope=\"col\">After</th><th scope=\"col\">Tenant</th><th scope=\"col\">Namespace</th><th scope=\"col\">Destination</th><th scope=\"col\">Example</th></tr></thead><tbody>";
            let side = |s: &ces_impact::Side| match &s.rule {
                Some(r) => format!("{} by {r}", s.verdict),
                None => s.verdict.clone(),
            };
            for g in &r.groups {
                let ex = &g.example;
                let who = match (&ex.source.namespace, &ex.source.pod) {
                    (Some(n), Some(p)) => format!("{n}/{p}"),
                    _ => ex.source.ip.to_string(),
                };
                let _ = write!(
                    b,
                    "<tr><td class=\"n\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} → {} at {}</td></tr>",
                    g.flows,
                    esc(&side(&g.before)),
                    esc(&side(&g.after)),
                    esc(&g.tenant),
                    esc(&g.namespace),
                    esc(&g.destination),
                    esc(&who),
                    esc(&ex.destination),
                    esc(&ex.at.to_string())
                );
            }
            if r.groups.is_empty() {
                b += "<tr><td colspan=\"7\">No change</td></tr>";
            }
            b += "</tbody></table></section>";
        }
    }
    b
}

pub fn login(failed: bool) -> String {
    let mut b = String::new();
    if failed {
        b += &error("That token is not this UI's.");
    }
    b += "<form class=\"paste\" method=\"post\" action=\"/login\" aria-label=\"Sign in\"><label for=\"f-token\">Token</label><input id=\"f-token\" name=\"token\" type=\"password\" autocomplete=\"current-password\"><button type=\"submit\">Sign in</button></form>";
    b
}
