//! Flow records on the command line: the agents' pipeline flags, `ces flows` (query, follow, import) and
//! `ces report` (docs/flows.md).

use std::path::PathBuf;
use std::sync::Arc;

use ces_flow::filter::{Filter, To, parse_time};
use ces_flow::pipeline::Pipeline;
use ces_flow::record::{FlowRecord, Verdict};
use ces_flow::store::{Reader, StoreConfig, Writer};
use clap::{Args, Subcommand};

use crate::{Failure, InputArgs};

/// Where an agent keeps and sends its flow records.
#[derive(Args, Clone, Debug)]
pub struct FlowArgs {
    /// The flow store's folder (created if missing); `none` for no store.
    #[arg(long, value_name = "DIR", default_value = ces_flow::store::DEFAULT_DIR)]
    pub flow_store: String,
    /// Records older than this are deleted (a duration: 7d, 12h).
    #[arg(long, value_name = "AGE", default_value = "7d")]
    pub flow_retention: String,
    /// The store's size limit in bytes (suffixes K, M, G): the oldest records go beyond it.
    #[arg(long, value_name = "BYTES", default_value = "10G")]
    pub flow_max_bytes: String,
    /// Send every record as RFC 5424 syslog with structured data: tcp://HOST:PORT, or tls://HOST:PORT (the server's
    /// certificate verified against --flow-export-ca, or the WebPKI roots).
    #[arg(long, value_name = "URL")]
    pub flow_export_syslog: Option<String>,
    /// PEM file of the CA that signed the syslog server's certificate.
    #[arg(long, value_name = "FILE")]
    pub flow_export_ca: Option<PathBuf>,
    /// Do not verify the syslog server's certificate (never the default).
    #[arg(long)]
    pub flow_export_insecure: bool,
    /// Send every record as IPFIX over UDP to this collector (HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    pub flow_export_ipfix: Option<String>,
    /// The enterprise number of CES's syslog structured data and IPFIX elements (32473, IANA's number for
    /// documentation, until CES has its own).
    #[arg(long, value_name = "PEN", default_value_t = ces_flow::export::DEFAULT_PEN)]
    pub flow_export_pen: u32,
    /// How many observations may wait for the pipeline (beyond: dropped and counted).
    #[arg(long, value_name = "N", default_value_t = 65_536)]
    pub flow_queue: usize,
}

/// `30s`, `15m`, `2h`, `7d` in seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a duration like 7d or 12h"))?;
    Ok(n * match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{s}`: a duration ends in s, m, h or d")),
    })
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size like 10G"))?;
    Ok(n << match unit {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        _ => return Err(format!("`{s}`: a size ends in K, M or G")),
    })
}

impl FlowArgs {
    pub fn store(&self) -> Result<Option<(PathBuf, StoreConfig)>, Failure> {
        if self.flow_store == "none" {
            return Ok(None);
        }
        let cfg = StoreConfig {
            max_age_secs: parse_duration(&self.flow_retention)
                .map_err(|e| Failure::input(format!("--flow-retention: {e}")))?,
            max_bytes: parse_bytes(&self.flow_max_bytes)
                .map_err(|e| Failure::input(format!("--flow-max-bytes: {e}")))?,
            ..StoreConfig::default()
        };
        Ok(Some((PathBuf::from(&self.flow_store), cfg)))
    }

    /// Starts the pipeline: the store, the exporters, and `log` (JSON lines of every record) when given.
    pub fn start(
        &self,
        log: Option<Box<dyn std::io::Write + Send>>,
    ) -> Result<(Arc<Pipeline>, Option<PathBuf>), Failure> {
        let store = self.store()?;
        let writer = match &store {
            Some((dir, cfg)) => Some(Writer::open(dir, *cfg).map_err(Failure::input)?),
            None => None,
        };
        let mut exporters = Vec::new();
        if let Some(url) = &self.flow_export_syslog {
            let mut target =
                ces_flow::export::SyslogTarget::parse(url, self.flow_export_ca.clone(), self.flow_export_insecure)
                    .map_err(|e| Failure::input(format!("--flow-export-syslog: {e}")))?;
            target.pen = self.flow_export_pen;
            exporters.push(ces_flow::export::syslog(target, 65_536).map_err(Failure::input)?);
        }
        if let Some(addr) = &self.flow_export_ipfix {
            let a: std::net::SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(addr.as_str())
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| Failure::input(format!("--flow-export-ipfix: `{addr}` is not HOST:PORT")))?;
            exporters.push(ces_flow::export::ipfix(a, self.flow_export_pen, 1, 65_536).map_err(Failure::input)?);
        }
        if let Some(out) = log {
            exporters.push(ces_flow::export::json_lines(out, 65_536).map_err(Failure::input)?);
        }
        let attributor = ces_flow::attribute::Attributor::new(ces_flow::history::PodHistory::new(3600));
        let pipeline = Pipeline::start(writer, exporters, attributor, self.flow_queue);
        Ok((Arc::new(pipeline), store.map(|(d, _)| d)))
    }
}

#[derive(Args, Clone, Debug)]
pub struct FilterArgs {
    /// Records of this time or later: RFC 3339, or a duration before now (30s, 15m, 2h, 7d).
    #[arg(long)]
    since: Option<String>,
    /// Records of this time or earlier.
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    tenant: Option<String>,
    /// The source pod's namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// The source pod: NAME or NAMESPACE/NAME.
    #[arg(long)]
    pod: Option<String>,
    /// The deciding or an auditing rule: Kind/namespace/name, or its last parts.
    #[arg(long)]
    rule: Option<String>,
    #[arg(long, value_parser = ["accept", "drop", "reject"])]
    verdict: Option<String>,
    /// The destination: an address, a CIDR, or a host name.
    #[arg(long)]
    to: Option<String>,
    #[arg(long)]
    protocol: Option<String>,
    /// The destination port.
    #[arg(long)]
    port: Option<u16>,
    /// The translated source (source NAT), `IP` or `IP:PORT` (`[IPv6]:PORT`): who was behind it.
    #[arg(long, value_name = "IP[:PORT]")]
    nat: Option<String>,
}

/// `IP`, `IP:PORT` or `[IPv6]:PORT`.
fn parse_nat(s: &str) -> Result<(std::net::IpAddr, Option<u16>), String> {
    if let Ok(ip) = s.parse() {
        return Ok((ip, None));
    }
    let a: std::net::SocketAddr = s.parse().map_err(|_| format!("`{s}` is not IP, IP:PORT or [IPv6]:PORT"))?;
    Ok((a.ip(), Some(a.port())))
}

impl FilterArgs {
    pub fn filter(&self) -> Result<Filter, Failure> {
        let now = jiff::Timestamp::now();
        let time = |s: &Option<String>, what: &str| -> Result<Option<jiff::Timestamp>, Failure> {
            s.as_deref().map(|s| parse_time(s, now).map_err(|e| Failure::input(format!("--{what}: {e}")))).transpose()
        };
        let nat = self.nat.as_deref().map(parse_nat).transpose().map_err(|e| Failure::input(format!("--nat: {e}")))?;
        Ok(Filter {
            since: time(&self.since, "since")?,
            until: time(&self.until, "until")?,
            tenant: self.tenant.clone(),
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
            rule: self.rule.clone(),
            verdict: self.verdict.as_deref().and_then(Verdict::parse),
            to: self.to.as_deref().map(To::parse).transpose().map_err(|e| Failure::input(format!("--to: {e}")))?,
            protocol: self.protocol.clone(),
            port: self.port,
            nat: nat.map(|n| n.0),
            nat_port: nat.and_then(|n| n.1),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct FlowsArgs {
    #[command(subcommand)]
    action: Option<FlowsAction>,
    /// The flow store's folder.
    #[arg(long, value_name = "DIR", default_value = ces_flow::store::DEFAULT_DIR)]
    store: PathBuf,
    #[command(flatten)]
    filter: FilterArgs,
    /// Only the newest N records.
    #[arg(long, value_name = "N")]
    last: Option<usize>,
    /// Keep printing records as they arrive.
    #[arg(long)]
    follow: bool,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Format,
}

#[derive(Subcommand)]
enum FlowsAction {
    /// Load records into the store from files: flow records (JSON lines), or the gateway's older packet lines;
    /// records without a pod get it from --manifests/--config (or the Kubernetes API).
    Import {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long, value_name = "DIR", default_value = ces_flow::store::DEFAULT_DIR)]
        store: PathBuf,
        #[command(flatten)]
        inputs: Option<InputArgs>,
        #[command(flatten)]
        kube: crate::agent::KubeArgs,
    },
}

fn cell(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        format!("{s:<w$}")
    } else {
        format!("{}…", s.chars().take(w - 1).collect::<String>())
    }
}

/// One record as a table line.
pub fn table_line(r: &FlowRecord) -> String {
    let src = match (&r.source.namespace, &r.source.pod) {
        (Some(ns), Some(p)) => format!("{ns}/{p}"),
        _ => r.source.ip.map(|i| i.to_string()).unwrap_or_default(),
    };
    let host = r.destination.host.clone().or_else(|| r.destination.ip.map(|i| i.to_string())).unwrap_or_default();
    let dst = match r.destination.port {
        Some(p) => format!("{host}:{p}/{}", r.protocol),
        None => format!("{host}/{}", r.protocol),
    };
    let rule = r.rule.as_ref().map(|x| x.rule.clone()).unwrap_or_else(|| "-".into());
    let audit = if r.audit.is_empty() { String::new() } else { format!(" (audit: {})", r.audit.join(", ")) };
    format!(
        "{} {} {} {} {:<7} {} {:<16} {}",
        cell(&r.time.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(), 24),
        cell(&r.tenant, 10),
        cell(&src, 30),
        cell(&dst, 34),
        r.verdict.as_str(),
        cell(&format!("{rule}{audit}"), 50),
        r.outcome.as_str(),
        r.bytes.out + r.bytes.back
    )
}

pub fn table_header() -> String {
    format!(
        "{} {} {} {} {:<7} {} {:<16} {}",
        cell("TIME", 24),
        cell("TENANT", 10),
        cell("SOURCE", 30),
        cell("DESTINATION", 34),
        "VERDICT",
        cell("RULE", 50),
        "OUTCOME",
        "BYTES"
    )
}

fn print(records: &[FlowRecord], format: Format) {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for r in records {
        let _ = match format {
            Format::Json => writeln!(out, "{}", serde_json::to_string(r).unwrap_or_default()),
            Format::Table => writeln!(out, "{}", table_line(r)),
        };
    }
    let _ = out.flush();
}

pub fn run(args: &FlowsArgs) -> Result<(), Failure> {
    if let Some(FlowsAction::Import { files, store, inputs, kube }) = &args.action {
        return import(files, store, inputs.as_ref(), kube);
    }
    let reader = Reader::open(&args.store).map_err(Failure::input)?;
    let filter = args.filter.filter()?;
    if args.output == Format::Table {
        println!("{}", table_header());
    }
    let mut cursor = if args.follow { Some(reader.end().map_err(Failure::input)?) } else { None };
    let records = reader.query(&filter, args.last).map_err(Failure::input)?;
    print(&records, args.output);
    while let Some(c) = cursor.as_mut() {
        std::thread::sleep(std::time::Duration::from_millis(250));
        let (records, next) = reader.follow(&filter, c).map_err(Failure::input)?;
        print(&records, args.output);
        *c = next;
    }
    Ok(())
}

fn import(
    files: &[PathBuf],
    store: &std::path::Path,
    inputs: Option<&InputArgs>,
    kube: &crate::agent::KubeArgs,
) -> Result<(), Failure> {
    // The policy, to name the pods of records that lack them.
    let model = match (inputs.filter(|i| !i.manifests.is_empty() || i.example), kube.kubernetes) {
        (Some(_), true) => return Err(Failure::input("--kubernetes and --manifests are two sources: give one")),
        (Some(i), false) => Some(crate::inputs::Inputs::load_unique(i)?.compile()),
        (None, true) => {
            let inputs = inputs.cloned().unwrap_or_else(|| InputArgs {
                manifests: Vec::new(),
                config: None,
                example: false,
                ces_namespace: ces_compiler::DEFAULT_CES_NAMESPACE.to_string(),
            });
            let mut source = crate::agent::kube_source(kube, &inputs, None)?;
            let (snapshot, config) = ces_sync::Source::load(&mut source).map_err(Failure::input)?;
            Some(ces_compiler::compile(&snapshot, &config, &inputs.ces_namespace))
        }
        (None, false) => None,
    };
    let pods = model.as_ref().map(|m| ces_model::PodIndex::new(&m.pods));
    let mut records = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| Failure::input(format!("{}: {e}", f.display())))?;
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let mut r = FlowRecord::from_json_line(line)
                .map_err(|e| Failure::input(format!("{}:{}: {e}", f.display(), i + 1)))?;
            if r.source.pod.is_none()
                && let (Some(pods), Some(ip)) = (&pods, r.source.ip)
                && let Some((ns, name)) = pods.pod(&r.tenant, ip)
            {
                r.source.namespace = Some(ns.to_string());
                r.source.pod = Some(name.to_string());
            }
            records.push(r);
        }
    }
    let mut w = Writer::open(store, StoreConfig::default()).map_err(Failure::input)?;
    for chunk in records.chunks(10_000) {
        w.append(chunk).map_err(Failure::input)?;
    }
    if let Some(m) = &model {
        let mut rules: Vec<String> = m.rules().map(|(_, r)| r.id.clone()).collect();
        rules.sort();
        rules.dedup();
        w.rules(&rules, jiff::Timestamp::now()).map_err(Failure::input)?;
    }
    w.close().map_err(Failure::input)?;
    eprintln!("ces: {} record(s) imported into {}", records.len(), store.display());
    Ok(())
}

#[derive(Args)]
pub struct ReportArgs {
    /// The flow store's folder.
    #[arg(long, value_name = "DIR", default_value = ces_flow::store::DEFAULT_DIR)]
    store: PathBuf,
    /// The window's start: RFC 3339, or a duration before now (default: everything).
    #[arg(long)]
    since: Option<String>,
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long)]
    namespace: Option<String>,
    /// Rows per table.
    #[arg(long, default_value_t = 10)]
    top: usize,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Format,
}

pub fn report(args: &ReportArgs) -> Result<(), Failure> {
    let reader = Reader::open(&args.store).map_err(Failure::input)?;
    let now = jiff::Timestamp::now();
    let time = |s: &Option<String>, what: &str| -> Result<Option<jiff::Timestamp>, Failure> {
        s.as_deref().map(|s| parse_time(s, now).map_err(|e| Failure::input(format!("--{what}: {e}")))).transpose()
    };
    let f = Filter {
        since: time(&args.since, "since")?,
        until: time(&args.until, "until")?,
        tenant: args.tenant.clone(),
        namespace: args.namespace.clone(),
        ..Filter::default()
    };
    let d = reader.report(&f, args.top).map_err(Failure::input)?;
    if args.output == Format::Json {
        println!("{}", serde_json::to_string_pretty(&d).unwrap_or_default());
        return Ok(());
    }
    let lost: u64 = d.lost.iter().map(|c| c.records).sum();
    println!(
        "{} record(s): {} accepted, {} dropped, {} rejected; {lost} record(s) lost",
        d.records,
        d.by_verdict.get("accept").copied().unwrap_or(0),
        d.by_verdict.get("drop").copied().unwrap_or(0),
        d.by_verdict.get("reject").copied().unwrap_or(0)
    );
    let section = |title: &str, head: &[&str], rows: Vec<Vec<String>>| {
        println!("\n{title}");
        if rows.is_empty() {
            println!("  (none)");
            return;
        }
        let widths: Vec<usize> = (0..head.len())
            .map(|i| rows.iter().map(|r| r[i].chars().count()).chain([head[i].len()]).max().unwrap_or(0).min(60))
            .collect();
        let line = |cells: Vec<String>| {
            let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| cell(c, *w)).collect();
            println!("  {}", parts.join("  ").trim_end());
        };
        line(head.iter().map(|s| s.to_string()).collect());
        for r in rows {
            line(r);
        }
    };
    let count = |c: &ces_flow::store::Count| -> Vec<String> {
        let mut v = c.key.clone();
        v.push(c.records.to_string());
        v
    };
    section(
        "Top destinations per tenant and namespace",
        &["TENANT", "NAMESPACE", "DESTINATION", "RECORDS", "BYTES"],
        d.top_destinations
            .iter()
            .map(|t| {
                vec![
                    t.tenant.clone(),
                    t.namespace.clone(),
                    t.destination.clone(),
                    t.records.to_string(),
                    t.bytes.to_string(),
                ]
            })
            .collect(),
    );
    section("Drops and rejects by rule", &["RULE", "VERDICT", "RECORDS"], d.drops_by_rule.iter().map(count).collect());
    section(
        "Drops and rejects by pod",
        &["TENANT", "NAMESPACE", "POD", "VERDICT", "RECORDS"],
        d.drops_by_pod.iter().map(count).collect(),
    );
    section(
        "Audit hits by rule (what an audit rule would have done, and what decided instead)",
        &["AUDIT RULE", "DECIDED BY", "VERDICT", "RECORDS"],
        d.audit_by_rule.iter().map(count).collect(),
    );
    section("Protocols and ports", &["PROTOCOL", "PORT", "RECORDS"], d.protocols.iter().map(count).collect());
    section(
        "TCP/IP errors by destination",
        &["DESTINATION", "PORT", "OUTCOME", "RECORDS"],
        d.errors_by_destination.iter().map(count).collect(),
    );
    section("Rules never hit in the window", &["RULE"], d.rules_never_hit.iter().map(|r| vec![r.clone()]).collect());
    section("Records lost", &["WHERE", "WHY", "RECORDS"], d.lost.iter().map(count).collect());
    Ok(())
}
