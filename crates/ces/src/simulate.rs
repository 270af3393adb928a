//! `ces simulate`: decide flows against manifests, before anything is deployed.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use ces_eval::{Decision, Evaluator, Flow, parse_target};
use ces_model::{Destination, PodIndex, PolicyModel};
use clap::Args;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::inputs::Inputs;
use crate::{Failure, InputArgs, Output};

#[derive(Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    inputs: InputArgs,
    /// Source: NAMESPACE/POD (a pod of the manifests) or an IP address.
    #[arg(long, value_name = "NAMESPACE/POD|IP", required_unless_present = "flows", conflicts_with = "flows")]
    from: Option<String>,
    /// The tenant the flow enters the data plane in (its route domain, or the gateway's ingress interface), for an
    /// IP source. Default: the one tenant whose pods, subnets or endpoints hold the address, else Common.
    #[arg(long, value_name = "TENANT", conflicts_with = "flows")]
    tenant: Option<String>,
    /// Destination: HOST:PORT/tcp, HOST:PORT/udp or HOST/icmp; HOST is an IP ([v6] with a port) or a host name.
    #[arg(long, value_name = "HOST:PORT/PROTO", required_unless_present = "flows", conflicts_with = "flows")]
    to: Option<String>,
    /// When the flow happens (RFC 3339), for scheduled rules. Default: now.
    #[arg(long, value_name = "RFC3339")]
    at: Option<String>,
    /// A file of flows, one JSON object {"from", "to", "at"} per line; prints one JSON result per line.
    #[arg(long, value_name = "FILE")]
    flows: Option<PathBuf>,
    /// Default: text for one flow, JSON lines with --flows.
    #[arg(long, value_enum)]
    output: Option<Output>,
}

/// One line of a `--flows` file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlowLine {
    from: String,
    to: String,
    #[serde(default)]
    at: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Source {
    pub ip: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SimResult {
    from: String,
    to: String,
    at: String,
    source: Source,
    #[serde(flatten)]
    decision: Decision,
    /// The source translation of an accepted flow an ExternalIPRule covers.
    #[serde(skip_serializing_if = "Option::is_none")]
    nat: Option<ces_eval::Translation>,
}

pub(crate) struct Request {
    from: String,
    to: String,
    pub flow: Flow,
    pub source: Source,
    decision: Decision,
}

fn parse_at(s: Option<&str>, default: Timestamp) -> Result<Timestamp, String> {
    match s {
        None => Ok(default),
        Some(s) => s.parse().map_err(|e| format!("`{s}` is not an RFC 3339 time: {e}")),
    }
}

/// Turns `--from`/`--to` into flows, with the pods of the manifests indexed by address once.
pub(crate) struct Resolver<'a> {
    inputs: &'a Inputs,
    evaluator: &'a Evaluator<'a>,
    pods: PodIndex,
}

impl<'a> Resolver<'a> {
    pub fn new(inputs: &'a Inputs, evaluator: &'a Evaluator<'a>) -> Resolver<'a> {
        Resolver { inputs, evaluator, pods: PodIndex::new(&evaluator.model().pods) }
    }

    /// Resolves a source: a pod by name (its tenant is its namespace's), or an address in the given tenant, or else
    /// in the tenant that holds it (docs/semantics.md §2). An address names its pod when one pod of that tenant has it.
    pub fn resolve(&self, from: &str, to: &str, tenant: Option<&str>, at: Timestamp) -> Result<Request, String> {
        let inputs = self.inputs;
        let (destination, protocol, port) = parse_target(to)?;
        let (source, tenant) = if let Ok(ip) = from.parse::<IpAddr>() {
            let tenant = match tenant {
                Some(t) => {
                    self.evaluator.model().tenant(t).ok_or_else(|| {
                        let known: Vec<&str> = self.evaluator.model().tenants.iter().map(|t| t.name.as_str()).collect();
                        format!("--tenant: no tenant `{t}` (the tenants are {})", known.join(", "))
                    })?;
                    t.to_string()
                }
                None => self.evaluator.tenant_of(ip).map_err(|e| format!("`{from}`: {e}"))?.to_string(),
            };
            let (namespace, pod) = match self.pods.pod(&tenant, ip) {
                Some((ns, name)) => (Some(ns.to_string()), Some(name.to_string())),
                None => (None, None),
            };
            (Source { ip, namespace, pod }, tenant)
        } else if from.split_once('/').is_some_and(|(a, len)| a.parse::<IpAddr>().is_ok() && len.parse::<u8>().is_ok())
        {
            return Err(format!(
                "`{from}`: a source is one address, not a network; write it without the prefix length"
            ));
        } else if let Some((ns, name)) = from.split_once('/') {
            let pod = inputs
                .snapshot
                .pod(ns, name)
                .ok_or_else(|| format!("`{from}`: no pod {name} in namespace {ns} in the manifests"))?;
            if pod.host_network {
                return Err(format!(
                    "`{from}`: the pod uses the host network, so its traffic leaves with the node's address and is no \
                     CES source; give the node's address with --from IP --tenant TENANT"
                ));
            }
            let want_v4 = match &destination {
                Destination::Ip(ip) | Destination::Resolved { ip, .. } => ip.is_ipv4(),
                Destination::Host(_) => true,
            };
            let ip = pod
                .ips
                .iter()
                .find(|ip| ip.is_ipv4() == want_v4)
                .or(pod.ips.first())
                .copied()
                .ok_or_else(|| format!("`{from}`: the pod has no IP address (not running?)"))?;
            let own = inputs.config.tenant_of(ns);
            if let Some(t) = tenant.filter(|t| *t != own) {
                return Err(format!("`{from}`: the pod is in tenant {own}, not {t}"));
            }
            (Source { ip, namespace: Some(ns.to_string()), pod: Some(name.to_string()) }, own.to_string())
        } else {
            return Err(format!("`{from}` is neither NAMESPACE/POD nor an IP address"));
        };
        let flow = Flow { source: source.ip, tenant, destination, protocol, port, at };
        // Decide now, so that a flow no data plane can see (IPv4 to IPv6) is an error of this line.
        let decision = self.evaluator.decide(&flow).map_err(|e| format!("`{from}` -> `{to}`: {e}"))?;
        Ok(Request { from: from.to_string(), to: to.to_string(), flow, source, decision })
    }
}

fn read_flows(path: &PathBuf, resolver: &Resolver, default_at: Timestamp) -> Result<Vec<Request>, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| Failure::input(format!("{}: {e}", path.display())))?;
    let mut requests = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<FlowLine>(line).map_err(|e| e.to_string()).and_then(|f| {
            let at = parse_at(f.at.as_deref(), default_at)?;
            resolver.resolve(&f.from, &f.to, f.tenant.as_deref(), at)
        });
        match parsed {
            Ok(r) => requests.push(r),
            Err(e) => errors.push(format!("{}:{}: {e}", path.display(), i + 1)),
        }
    }
    if errors.is_empty() { Ok(requests) } else { Err(Failure::input(errors.join("\n"))) }
}

pub fn run(args: &SimulateArgs) -> Result<(), Failure> {
    let inputs = Inputs::load_unique(&args.inputs)?;
    let model = inputs.compile();
    let errors = model.errors().count();
    if errors > 0 {
        eprintln!(
            "ces: warning: {errors} problem(s) in the manifests; the objects concerned are left out (run `ces validate`)"
        );
    }
    let default_at = parse_at(args.at.as_deref(), Timestamp::now()).map_err(Failure::input)?;
    let evaluator = Evaluator::new(&model);
    let resolver = Resolver::new(&inputs, &evaluator);
    let (requests, output) = match &args.flows {
        Some(path) => (read_flows(path, &resolver, default_at)?, args.output.unwrap_or(Output::Json)),
        None => {
            let (from, to) = (args.from.as_deref().unwrap_or_default(), args.to.as_deref().unwrap_or_default());
            let request = resolver.resolve(from, to, args.tenant.as_deref(), default_at).map_err(Failure::input)?;
            (vec![request], args.output.unwrap_or(Output::Text))
        }
    };
    let mut out = String::new();
    for r in requests {
        // A refused flow is never translated.
        let nat = if r.decision.verdict == ces_model::Verdict::Accept {
            evaluator.translate(&r.flow).map_err(|e| Failure::input(e.to_string()))?
        } else {
            None
        };
        let result = SimResult {
            from: r.from,
            to: r.to,
            at: r.flow.at.to_string(),
            source: r.source,
            decision: r.decision,
            nat,
        };
        match output {
            Output::Json => {
                out.push_str(&serde_json::to_string(&result).expect("results serialise"));
                out.push('\n');
            }
            Output::Text => out.push_str(&text(&result, &model)),
        }
    }
    print!("{out}");
    Ok(())
}

fn text(r: &SimResult, model: &PolicyModel) -> String {
    let d = &r.decision;
    let mut s = String::new();
    let _ = writeln!(s, "{}  {} -> {}", d.verdict.as_str().to_uppercase(), r.from, r.to);
    let _ = writeln!(s, "  at       {}", r.at);
    let who = match (&r.source.namespace, &r.source.pod) {
        (Some(ns), Some(pod)) => format!("pod {ns}/{pod}, "),
        _ => "no known pod, ".to_string(),
    };
    let rd = model.tenant(&d.tenant).map(|t| format!(", route domain {}", t.route_domain.id)).unwrap_or_default();
    let _ = writeln!(s, "  source   {} ({who}tenant {}{rd})", r.source.ip, d.tenant);
    let by = &d.decided_by;
    let what = match (&by.external_service, &by.port) {
        (Some(e), Some(p)) => format!(" (ExternalService {e}, port {p})"),
        (Some(e), None) => format!(" (ExternalService {e})"),
        _ => " (no rule matched)".to_string(),
    };
    let _ = writeln!(s, "  decided  by {} in the {} context{what}", by.rule, by.context.as_str());
    if let Some(n) = &r.nat {
        let _ = writeln!(s, "  nat      source translated to {} by {}", n.to.join(" or "), n.rule);
    }
    for (i, t) in d.trail.iter().enumerate() {
        let label = if i == 0 { "trail" } else { "" };
        let (ctx, action, effect) = (t.context.as_str(), t.action.as_str(), t.effect.as_str());
        let _ = writeln!(s, "  {label:<8} {ctx:<9} {action:<17} {effect:<16} {}", t.rule);
    }
    s
}
