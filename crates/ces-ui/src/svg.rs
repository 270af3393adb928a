//! Pictures drawn on the server as SVG: the records over time, the flow map, a decision's trail. Every text is
//! escaped; no script, no external reference.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use ces_eval::{Decision, Effect};
use ces_flow::rollup::DestRow;
use jiff::Timestamp;

use crate::html::{esc, link, short};

fn colour(verdict: &str) -> &'static str {
    match verdict {
        "accept" => "#2e7d32",
        "drop" => "#c62828",
        _ => "#ef6c00",
    }
}

/// Records over time, stacked by verdict: one bar per step.
pub fn timeline(points: &[(Timestamp, String, u64)], step_secs: u64) -> String {
    if points.is_empty() {
        return "<p>No records in this window.</p>".into();
    }
    let mut bars: BTreeMap<i64, BTreeMap<&str, u64>> = BTreeMap::new();
    for (t, v, n) in points {
        *bars.entry(t.as_second()).or_default().entry(v.as_str()).or_default() += n;
    }
    let (first, last) = (*bars.keys().next().unwrap_or(&0), *bars.keys().last().unwrap_or(&0));
    let step = step_secs.max(1) as i64;
    let slots = ((last - first) / step + 1).clamp(1, 2000) as usize;
    let max = bars.values().map(|b| b.values().sum::<u64>()).max().unwrap_or(1).max(1);
    let (w, h) = (900.0, 160.0);
    let bw = w / slots as f64;
    let mut s = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {w} {}\" role=\"img\" aria-label=\"Records over time by verdict, {} per bar\" xmlns=\"http://www.w3.org/2000/svg\">",
        h + 20.0,
        if step_secs >= 3600 { "an hour" } else { "a minute" }
    );
    for (t, by) in &bars {
        let x = ((t - first) / step) as f64 * bw;
        let mut y = h;
        for v in ["accept", "drop", "reject"] {
            let n = by.get(v).copied().unwrap_or(0);
            if n == 0 {
                continue;
            }
            let bh = n as f64 / max as f64 * h;
            y -= bh;
            let when = Timestamp::from_second(*t).map(|t| t.to_string()).unwrap_or_default();
            let _ = write!(
                s,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{} {n} {v}</title></rect>",
                (bw - 0.5).max(0.5),
                colour(v),
                esc(&when)
            );
        }
    }
    let label =
        |t: i64| Timestamp::from_second(t).map(|t| t.strftime("%Y-%m-%d %H:%M").to_string()).unwrap_or_default();
    let _ = write!(
        s,
        "<text x=\"0\" y=\"{}\" class=\"axis\">{}</text><text x=\"{w}\" y=\"{}\" text-anchor=\"end\" class=\"axis\">{} (UTC)</text><text x=\"0\" y=\"12\" class=\"axis\">{max}</text></svg>",
        h + 16.0,
        esc(&label(first)),
        h + 16.0,
        esc(&label(last))
    );
    s
}

/// A node of the flow map.
struct Node {
    label: String,
    href: String,
    records: u64,
}

/// An edge's counts by verdict.
#[derive(Default)]
struct Edge {
    accept: u64,
    deny: u64,
}

/// The flow map: sources (namespaces) on the left, destinations (ExternalServices, or addresses and names no
/// ExternalService holds) on the right, edges as wide as their records (log scale) and coloured by the share denied.
/// Only the busiest nodes are drawn; the rest are one node each side ("k more"), and every node opens its own map.
/// `open_ns`/`open_dst`: a node opened (its own destinations, or who reaches it).
pub fn map(rows: &[DestRow], open_ns: Option<&str>, open_dst: Option<&str>, query_base: &str) -> String {
    const LEFT: usize = 30;
    const RIGHT: usize = 40;
    // Destinations are shown by ExternalService, unless a namespace is open (then by address or name).
    let target = |r: &DestRow| -> String {
        if open_ns.is_some() || open_dst.is_some() || r.external_service.is_empty() {
            r.destination.clone()
        } else {
            format!("ExternalService {}", r.external_service)
        }
    };
    let rows: Vec<&DestRow> = rows
        .iter()
        .filter(|r| open_ns.is_none_or(|n| format!("{}/{}", r.tenant, r.namespace) == n))
        .filter(|r| open_dst.is_none_or(|d| r.destination == d))
        .collect();
    if rows.is_empty() {
        return "<p>No records in this window.</p>".into();
    }
    let mut left: HashMap<String, u64> = HashMap::new();
    let mut right: HashMap<String, u64> = HashMap::new();
    for r in &rows {
        *left.entry(format!("{}/{}", r.tenant, r.namespace)).or_default() += r.records;
        *right.entry(target(r)).or_default() += r.records;
    }
    let busiest = |m: &HashMap<String, u64>, n: usize| -> Vec<String> {
        let mut v: Vec<(&String, &u64)> = m.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        v.into_iter().take(n).map(|(k, _)| k.clone()).collect()
    };
    let (lk, rk) = (busiest(&left, LEFT), busiest(&right, RIGHT));
    let other_l = format!("{} more namespaces", left.len().saturating_sub(lk.len()));
    let other_r = format!("{} more destinations", right.len().saturating_sub(rk.len()));
    let li: HashMap<&String, usize> = lk.iter().enumerate().map(|(i, k)| (k, i)).collect();
    let ri: HashMap<&String, usize> = rk.iter().enumerate().map(|(i, k)| (k, i)).collect();
    let mut edges: BTreeMap<(usize, usize), Edge> = BTreeMap::new();
    for r in &rows {
        let a = li.get(&format!("{}/{}", r.tenant, r.namespace)).copied().unwrap_or(lk.len());
        let b = ri.get(&target(r)).copied().unwrap_or(rk.len());
        let e = edges.entry((a, b)).or_default();
        if r.verdict == "accept" {
            e.accept += r.records;
        } else {
            e.deny += r.records;
        }
    }
    let node = |label: &str, records: u64, left_side: bool| -> Node {
        let href = if left_side {
            format!("/map?{query_base}&namespace={}", crate::html::url(label))
        } else if let Some(es) = label.strip_prefix("ExternalService ") {
            format!("/flows?{query_base}&to={}", crate::html::url(es))
        } else {
            format!("/map?{query_base}&destination={}", crate::html::url(label))
        };
        Node { label: label.to_string(), href, records }
    };
    let mut lnodes: Vec<Node> = lk.iter().map(|k| node(k, left[k], true)).collect();
    if left.len() > lk.len() {
        let n = left.iter().filter(|(k, _)| !li.contains_key(k)).map(|(_, v)| v).sum();
        lnodes.push(Node { label: other_l, href: String::new(), records: n });
    }
    let mut rnodes: Vec<Node> = rk.iter().map(|k| node(k, right[k], false)).collect();
    if right.len() > rk.len() {
        let n = right.iter().filter(|(k, _)| !ri.contains_key(k)).map(|(_, v)| v).sum();
        rnodes.push(Node { label: other_r, href: String::new(), records: n });
    }
    let row_h = 22.0;
    let h = (lnodes.len().max(rnodes.len()) as f64 * row_h + 20.0).max(80.0);
    let (xl, xr, w) = (300.0, 620.0, 1000.0);
    let ly = |i: usize| 20.0 + i as f64 * (h - 20.0) / lnodes.len().max(1) as f64;
    let ry = |i: usize| 20.0 + i as f64 * (h - 20.0) / rnodes.len().max(1) as f64;
    let max = edges.values().map(|e| e.accept + e.deny).max().unwrap_or(1).max(1) as f64;
    let mut s = format!(
        "<svg class=\"map\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"Flow map: {} sources, {} destinations\" xmlns=\"http://www.w3.org/2000/svg\">",
        lnodes.len(),
        rnodes.len()
    );
    for ((a, b), e) in &edges {
        let total = e.accept + e.deny;
        let width = 1.0 + 7.0 * ((total as f64).ln_1p() / max.ln_1p());
        let denied = e.deny as f64 / total.max(1) as f64;
        let c = if denied == 0.0 {
            "#2e7d32"
        } else if denied <= 0.5 {
            "#ef6c00"
        } else {
            "#c62828"
        };
        let (y1, y2) = (ly(*a) - 4.0, ry(*b) - 4.0);
        let _ = write!(
            s,
            "<path d=\"M{xl} {y1:.1} C{:.1} {y1:.1} {:.1} {y2:.1} {xr} {y2:.1}\" stroke=\"{c}\" stroke-width=\"{width:.1}\" fill=\"none\" opacity=\"0.7\"><title>{} -> {}: {} accepted, {} denied</title></path>",
            (xl + xr) / 2.0,
            (xl + xr) / 2.0,
            esc(lnodes.get(*a).map_or("", |n| n.label.as_str())),
            esc(rnodes.get(*b).map_or("", |n| n.label.as_str())),
            e.accept,
            e.deny
        );
    }
    let shown = |n: &Node| {
        // Sources that are no pod (a node's address, a VM) have no namespace.
        let label = n.label.strip_suffix('/').map(|t| format!("{t}/(no pod)")).unwrap_or_else(|| n.label.clone());
        (format!("{} ({})", short(&label, 44), n.records), format!("{label}: {} records", n.records))
    };
    for (i, n) in lnodes.iter().enumerate() {
        let (text, title) = shown(n);
        let t = format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\"><title>{}</title>{}</text>",
            xl - 6.0,
            ly(i),
            esc(&title),
            esc(&text)
        );
        s += &link(&n.href, &t);
    }
    for (i, n) in rnodes.iter().enumerate() {
        let (text, title) = shown(n);
        let t =
            format!("<text x=\"{}\" y=\"{:.1}\"><title>{}</title>{}</text>", xr + 6.0, ry(i), esc(&title), esc(&text));
        s += &link(&n.href, &t);
    }
    s += "</svg>";
    s
}

/// A decision drawn: the contexts in order, each with the rules the flow met there, and the one that decided.
pub fn trail(d: &Decision) -> String {
    let contexts = ["cluster", "namespace", "service", "default"];
    let (bw, gap, top) = (210.0, 20.0, 30.0);
    let rows =
        contexts.iter().map(|c| d.trail.iter().filter(|t| t.context.as_str() == *c).count()).max().unwrap_or(0).max(1);
    let h = top + 40.0 + rows as f64 * 44.0;
    let w = 4.0 * bw + 3.0 * gap;
    let mut s = format!(
        "<svg class=\"trail\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"The trail of the decision: {} by {}\" xmlns=\"http://www.w3.org/2000/svg\">",
        d.verdict.as_str(),
        esc(&d.decided_by.rule)
    );
    for (i, c) in contexts.iter().enumerate() {
        let x = i as f64 * (bw + gap);
        let reached = *c == "default" && d.decided_by.context.as_str() == "default"
            || d.trail.iter().any(|t| t.context.as_str() == *c)
            || contexts.iter().position(|x| *x == d.decided_by.context.as_str()).is_some_and(|p| p >= i);
        let _ = write!(
            s,
            "<rect x=\"{x}\" y=\"0\" width=\"{bw}\" height=\"{h}\" rx=\"6\" class=\"{}\"/><text x=\"{}\" y=\"20\" text-anchor=\"middle\" class=\"ctx\">{c}</text>",
            if reached { "ctx-box" } else { "ctx-box skipped" },
            x + bw / 2.0
        );
        if i < 3 {
            let _ = write!(s, "<path d=\"M{} {} l{gap} 0\" class=\"arrow\"/>", x + bw, top + 10.0);
        }
        let mut y = top + 10.0;
        if *c == "default" {
            if d.decided_by.context.as_str() == "default" {
                let _ = write!(
                    s,
                    "<rect x=\"{}\" y=\"{y}\" width=\"{}\" height=\"36\" rx=\"4\" fill=\"{}\"/><text x=\"{}\" y=\"{}\" class=\"rule-text\">{} ({})</text>",
                    x + 6.0,
                    bw - 12.0,
                    colour(d.verdict.as_str()),
                    x + 12.0,
                    y + 22.0,
                    esc(&d.decided_by.rule),
                    d.verdict.as_str()
                );
            }
            continue;
        }
        for t in d.trail.iter().filter(|t| t.context.as_str() == *c) {
            let decided = t.effect == Effect::Decided;
            let fill = if decided { colour(d.verdict.as_str()) } else { "#90a4ae" };
            let _ = write!(
                s,
                "<rect x=\"{}\" y=\"{y}\" width=\"{}\" height=\"36\" rx=\"4\" fill=\"{fill}\"><title>{}</title></rect><text x=\"{}\" y=\"{}\" class=\"rule-text\">{}</text><text x=\"{}\" y=\"{}\" class=\"rule-sub\">{} · {}</text>",
                x + 6.0,
                bw - 12.0,
                esc(&t.rule),
                x + 12.0,
                y + 15.0,
                esc(&short(t.rule.split_once('/').map_or(t.rule.as_str(), |(_, r)| r), 30)),
                x + 12.0,
                y + 30.0,
                t.action.as_str(),
                t.effect.as_str()
            );
            y += 44.0;
        }
    }
    s += "</svg>";
    s
}
