//! `ces gateway`: the nftables egress gateway agent.

use ces_model::PolicyModel;
use ces_nft::apply::{Applier, Nft};
use ces_nft::{DnsHook, Ruleset, render_with};
use clap::{Args, Subcommand};
use jiff::Timestamp;

use crate::inputs::Inputs;
use crate::{Failure, InputArgs};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct GatewayArgs {
    #[command(subcommand)]
    action: Option<GatewayAction>,
    #[command(flatten)]
    inputs: Option<InputArgs>,
    #[command(flatten)]
    kube: crate::agent::KubeArgs,
    /// Apply the current policy once and exit, leaving the rules in place.
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    sync: crate::agent::LoopArgs,
    /// Without --once: also write every flow record as one JSON line here (`-`: standard output).
    #[arg(long, value_name = "FILE")]
    log_file: Option<String>,
    #[command(flatten)]
    flows: crate::flows::FlowArgs,
}

#[derive(Subcommand)]
enum GatewayAction {
    /// Print the packet and byte counters of every rule (JSON lines), from the kernel's table.
    Counters {
        #[arg(long, default_value = "ces")]
        table: String,
    },
    /// Print what the gateway has learned of host names: one JSON line per tenant, name and address, with its expiry
    /// (from the kernel's learned sets, so it works while the agent is down).
    Names {
        #[arg(long, default_value = "ces")]
        table: String,
    },
    /// Remove the gateway's table (and so every CES rule) from this host, and the shaping on its uplinks.
    Cleanup {
        /// The table to remove. Default: the config's (`ces` without one).
        #[arg(long)]
        table: Option<String>,
        /// The ces-conf.yaml the gateway ran with: its table, and its uplinks, whose HTB qdiscs are removed too.
        #[arg(long, value_name = "FILE")]
        config: Option<std::path::PathBuf>,
    },
}

pub fn parse_at(at: Option<&str>) -> Result<Timestamp, Failure> {
    match at {
        None => Ok(Timestamp::now()),
        Some(s) => s.parse().map_err(|e| Failure::input(format!("--at: `{s}` is not an RFC 3339 time: {e}"))),
    }
}

/// Prints what the gateway does not enforce, and the policy's own problems, to stderr.
pub fn report(model: &PolicyModel, rs: &Ruleset) {
    let errors = model.errors().count();
    if errors > 0 {
        eprintln!("ces: {errors} problem(s) left objects out of the policy (run `ces validate`)");
    }
    for d in &rs.diagnostics {
        eprintln!("ces: {d}");
    }
}

pub fn run(args: &GatewayArgs) -> Result<(), Failure> {
    crate::agent::set_log_format(args.kube.log_format);
    if let Some(GatewayAction::Counters { table }) = &args.action {
        return counters(table);
    }
    if let Some(GatewayAction::Names { table }) = &args.action {
        return names(table);
    }
    if let Some(GatewayAction::Cleanup { table, config }) = &args.action {
        let config = match config {
            Some(p) => Some(ces_config::CesConfig::from_file(p).map_err(|e| Failure::input(e.to_string()))?),
            None => None,
        };
        let table = table.clone().unwrap_or_else(|| config.as_ref().map_or("ces", |c| c.gateway_table()).to_string());
        let nft = Nft::default();
        let removed = nft.delete_table(&table).map_err(|e| Failure::input(e.to_string()))?;
        eprintln!("ces: table inet {table} {}", if removed { "removed" } else { "was not there" });
        // The DNS hook of kernels without nft's `queue` lives outside the table.
        if nft.external_dns_hook(&table, None).is_ok() {
            eprintln!("ces: DNS hook {} removed (if there was one)", Nft::dns_chain(&table));
        }
        let uplinks: Vec<String> =
            config.iter().flat_map(|c| c.gateway.iter().flat_map(|g| g.uplinks.clone())).collect();
        if !uplinks.is_empty() {
            nft.unshape(&uplinks).map_err(|e| Failure::input(e.to_string()))?;
            eprintln!("ces: shaping removed from {}", uplinks.join(", "));
        }
        return Ok(());
    }
    if args.kube.kubernetes && args.once {
        return Err(Failure::input("with --kubernetes the gateway runs until stopped: --once reads files"));
    }
    if args.kube.kubernetes {
        let inputs = args.inputs.clone().unwrap_or_else(|| InputArgs {
            manifests: Vec::new(),
            config: None,
            example: false,
            ces_namespace: std::env::var("CES_NAMESPACE")
                .unwrap_or_else(|_| ces_compiler::DEFAULT_CES_NAMESPACE.to_string()),
        });
        if !inputs.manifests.is_empty() {
            return Err(Failure::input("--kubernetes and --manifests are two sources: give one"));
        }
        let mut source = crate::agent::kube_source(&args.kube, &inputs, None)?;
        let metrics = source.metrics();
        return watch_with(&mut source, &inputs, args, "the Kubernetes API".into(), Some(metrics));
    }
    let inputs = args.inputs.as_ref().ok_or_else(|| Failure::input("give --manifests PATH... or --example"))?;
    if !args.once {
        return watch(inputs, args);
    }
    let inputs = Inputs::load_unique(inputs)?;
    let model = inputs.compile();
    // No agent stays to learn host names' addresses: their entries are reported as not enforced.
    let rs = render_with(&model, Timestamp::now(), DnsHook::Off).map_err(|e| Failure::input(e.to_string()))?;
    report(&model, &rs);
    let applied =
        Applier::new(Nft::default()).apply(&rs, true).map_err(|e| Failure { code: 1, message: e.to_string() })?;
    eprintln!("ces: table inet {}: {applied:?}", rs.table);
    Ok(())
}

/// The agent: watches the manifests (and config) and keeps this host's table in step, through the sync loop.
fn watch(inputs: &InputArgs, args: &GatewayArgs) -> Result<(), Failure> {
    if inputs.example {
        return Err(Failure::input("the agent watches files: give --manifests PATH... (and --config FILE)"));
    }
    let mut source = ces_sync::folder::Folder::new(inputs.manifests.clone(), inputs.config.clone());
    let what = format!("{} path(s)", inputs.manifests.len());
    watch_with(&mut source, inputs, args, what, None)
}

fn watch_with(
    source: &mut dyn ces_sync::Source,
    inputs: &InputArgs,
    args: &GatewayArgs,
    what: String,
    source_metrics: Option<crate::health::MetricsFn>,
) -> Result<(), Failure> {
    let nft = Nft::default();
    let hook = if nft.supports_queue() { DnsHook::Native } else { DnsHook::External };
    crate::agent::log(
        "info",
        "gateway",
        match hook {
            DnsHook::Native => "DNS answers are held with nft's queue statement",
            _ => "this kernel has no nft queue statement: DNS answers are held through iptables-nft's NFQUEUE target",
        },
        serde_json::json!({"dnsHook": format!("{hook:?}")}),
    );
    let backend = ces_nft::NftBackend::with_dns(nft, hook, &ces_model::DnsSettings::default());
    let mut backend = backend;
    let opts = args.sync.options(&inputs.ces_namespace);
    let log: Option<Box<dyn std::io::Write + Send>> = match args.log_file.as_deref() {
        None => None,
        Some("-") => Some(Box::new(std::io::stdout())),
        Some(path) => Some(Box::new(
            // Every namespace's traffic: readable by its owner alone (0600 when created).
            std::os::unix::fs::OpenOptionsExt::mode(std::fs::OpenOptions::new().create(true).append(true), 0o600)
                .open(path)
                .map_err(|e| Failure::input(format!("--log-file {path}: {e}")))?,
        )),
    };
    // The flow pipeline: conntrack and NFLOG through attribution into the store and the exporters.
    let (pipeline, store) = args.flows.start(log)?;
    backend.tags_file = store.map(|d| d.join("gateway-tags.json"));
    if let Some(f) = &backend.tags_file {
        *backend.tags.write().unwrap_or_else(|p| p.into_inner()) = ces_nft::tags::TagIds::load(f);
    }
    backend.flows = Some(pipeline.clone());
    if let Some(dns) = backend.dns.clone() {
        pipeline.send(ces_flow::pipeline::Input::Names(Box::new(move |tenant, ip| dns.name_of(tenant, ip))));
    }
    let stop_readers = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers = ces_nft::flows::start(
        pipeline.clone(),
        backend.tags.clone(),
        backend.log_group.clone(),
        None,
        stop_readers.clone(),
    );
    let health = std::sync::Arc::new(crate::health::Health::default());
    *health.source_metrics.lock().unwrap_or_else(|p| p.into_inner()) = source_metrics;
    let p = pipeline.clone();
    health.more_metrics.lock().unwrap_or_else(|e| e.into_inner()).push(Box::new(move || p.metrics("gateway")));
    if let Some(dns) = backend.dns.clone() {
        let d = dns.clone();
        health.more_metrics.lock().unwrap_or_else(|p| p.into_inner()).push(Box::new(move || d.metrics("gateway")));
        std::thread::spawn(move || {
            if let Err(e) = dns.run(None, &crate::agent::STOP) {
                crate::agent::log("error", "gateway", &format!("holding DNS answers: {e}"), serde_json::json!({}));
            }
        });
    }
    if let Some(addr) = &args.kube.health_addr {
        crate::health::serve(addr, health.clone(), "gateway").map_err(Failure::input)?;
    }
    let mut backend = crate::agent::Counted::new(backend, health.clone(), |_: &ces_nft::NftBackend| String::new());
    let msg = format!("watching {what}; the rules stay in place if this agent stops");
    crate::agent::log("info", "gateway", &msg, serde_json::json!({}));
    crate::agent::run_loop("gateway", source, &mut backend, &opts, &health);
    // Stopped: the readers first, then the pipeline stores what it holds.
    stop_readers.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        let _ = r.join();
    }
    drop(backend);
    pipeline.close();
    Ok(())
}

/// `ces gateway names`: the learned sets' elements, one line per tenant, name and address.
fn names(table: &str) -> Result<(), Failure> {
    let listing = Nft::default()
        .list_table_json(table)
        .map_err(|e| Failure::input(e.to_string()))?
        .ok_or_else(|| Failure::input(format!("there is no table inet {table} on this host")))?;
    let now = Timestamp::now();
    let mut lines = std::collections::BTreeSet::new();
    for e in ces_nft::dns::learned_elements(&listing) {
        let mut words = e.comment.split(' ');
        let tenant = words.next().unwrap_or("");
        let expires = now + jiff::SignedDuration::from_secs(e.expires as i64);
        for name in words.filter(|w| !w.is_empty()) {
            lines.insert((tenant.to_string(), name.to_string(), e.ip, e.set.clone(), expires, e.expires));
        }
    }
    for (tenant, name, ip, set, expires, left) in lines {
        println!(
            "{}",
            serde_json::json!({"tenant": tenant, "name": name, "address": ip.to_string(), "expires": expires.to_string(), "expiresInSeconds": left, "set": set})
        );
    }
    Ok(())
}

/// `ces gateway counters`: sums the counters of the table's rules by rule (their comment).
fn counters(table: &str) -> Result<(), Failure> {
    let listing = Nft::default()
        .list_table_json(table)
        .map_err(|e| Failure::input(e.to_string()))?
        .ok_or_else(|| Failure::input(format!("there is no table inet {table} on this host")))?;
    let v: serde_json::Value =
        serde_json::from_str(&listing).map_err(|e| Failure::input(format!("nft -j output: {e}")))?;
    let mut sums: std::collections::BTreeMap<String, (u64, u64)> = std::collections::BTreeMap::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let rule = &item["rule"];
        let (Some(comment), Some(exprs)) = (rule["comment"].as_str(), rule["expr"].as_array()) else { continue };
        for e in exprs {
            if let Some(c) = e.get("counter") {
                let s = sums.entry(comment.to_string()).or_default();
                s.0 += c["packets"].as_u64().unwrap_or(0);
                s.1 += c["bytes"].as_u64().unwrap_or(0);
            }
        }
    }
    for (rule, (packets, bytes)) in sums {
        println!("{}", serde_json::json!({"rule": rule, "packets": packets, "bytes": bytes}));
    }
    Ok(())
}
