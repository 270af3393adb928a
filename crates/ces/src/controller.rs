//! `ces controller`: keeps a BIG-IP's AFM configuration (through AS3) in step with the policy, through the sync loop.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ces_as3::As3Backend;
use ces_as3::client::{Client, Credentials, DryRun, Http, Transport};
use ces_flow::attribute::RuleInfo;
use ces_flow::listen::AfmSettings;
use ces_flow::pipeline::{Input, Pipeline};
use clap::Args;

use crate::inputs::Inputs;
use crate::{Failure, InputArgs};

#[derive(Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    inputs: InputArgs,
    #[command(flatten)]
    kube: crate::agent::KubeArgs,
    /// Run only while holding the `coordination.k8s.io` Lease (with --kubernetes): several replicas, one active.
    #[arg(long, requires = "kubernetes")]
    leader_elect: bool,
    /// Namespace of the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "ces-system", value_name = "NAMESPACE")]
    lease_namespace: String,
    #[arg(long, default_value = "ces-controller", value_name = "NAME")]
    lease_name: String,
    /// This replica's name in the Lease. Default: the host name and process id.
    #[arg(long, env = "POD_NAME", value_name = "NAME")]
    identity: Option<String>,
    /// A leader that has not renewed the Lease for this long is replaced.
    #[arg(long, value_name = "SECONDS", default_value_t = 15)]
    lease_duration_secs: u64,
    /// The BIG-IP: `host[:port]` or `https://host[:port]` (`http://` only to loopback, for a local double).
    #[arg(long, value_name = "URL", conflicts_with = "bigip_dry_run")]
    bigip_url: Option<String>,
    /// No BIG-IP: write each request that would be sent to DIR, in order (the default, into `ces-dry-run`).
    #[arg(long, value_name = "DIR")]
    bigip_dry_run: Option<PathBuf>,
    /// A folder with the files `username` and `password` (a mounted Secret). Default: the environment variables
    /// BIGIP_USERNAME and BIGIP_PASSWORD.
    #[arg(long, value_name = "DIR")]
    bigip_creds_dir: Option<PathBuf>,
    /// Trust only this CA (PEM) for the BIG-IP's certificate. Default: the WebPKI roots.
    #[arg(long, value_name = "FILE")]
    bigip_ca: Option<PathBuf>,
    /// Do not verify the BIG-IP's certificate. Only when asked for: anyone on the path could then take the
    /// credentials.
    #[arg(long)]
    bigip_insecure: bool,
    /// Timeout of one request to the BIG-IP.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    bigip_timeout_secs: u64,
    /// Attempts of one request while the BIG-IP answers 503 / "in progress", before the loop's own retry.
    #[arg(long, value_name = "N", default_value_t = 6)]
    bigip_attempts: u32,
    /// Folder of the official AS3 schema files; nothing is sent that they do not validate.
    #[arg(long, env = "CES_AS3_SCHEMA_DIR", value_name = "DIR")]
    as3_schema: Option<PathBuf>,
    /// Apply the current policy once and exit (status 1 if any tenant failed).
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    sync: crate::agent::LoopArgs,
    /// Receive AFM's firewall log messages as syslog on ADDR (UDP and TCP, e.g. 0.0.0.0:5140) and keep them as flow
    /// records: the log publisher's destination points here (docs/flows.md, "From the BIG-IP").
    #[arg(long, value_name = "ADDR")]
    afm_syslog_listen: Option<String>,
    #[command(flatten)]
    flows: crate::flows::FlowArgs,
}

/// The AS3 backend, with the flow pipeline told of each policy it applied: the pods (for attribution) and what
/// AFM's logs will call each rule.
pub struct Observed {
    pub inner: As3Backend,
    flows: Option<(Arc<Pipeline>, Arc<RwLock<AfmSettings>>)>,
}

impl Observed {
    fn applied(&self, model: &ces_model::PolicyModel) {
        let (Some((pipeline, settings)), Some(rendered)) = (&self.flows, self.inner.rendered()) else { return };
        pipeline.policy(model);
        *settings.write().unwrap_or_else(|p| p.into_inner()) = afm_settings(rendered, model);
    }
}

/// How AFM's messages about `rendered` are read.
pub fn afm_settings(rendered: &ces_as3::Rendered, model: &ces_model::PolicyModel) -> AfmSettings {
    let mut index = ces_flow::afm::AfmIndex::default();
    for r in ces_as3::logs::logged_rules(rendered, model) {
        let info = RuleInfo {
            rule: r.rule_id.clone().unwrap_or_else(|| format!("Tenant/{}", r.tenant)),
            tenant: r.tenant,
            context: r.context,
            action: r.action,
            mode: r.mode,
            external_service: r.external_service,
        };
        index.insert(&r.policy, &r.rule_list, &r.rule, info);
    }
    index.tenants = ces_as3::logs::route_domains(model).into_iter().collect();
    let (fields, delimiter) = ces_as3::logs::storage_format(model)
        .unwrap_or_else(|| (ces_flow::afm::ORIGINAL_FIELDS.iter().map(|f| f.to_string()).collect(), ','));
    AfmSettings { index, fields, delimiter }
}

impl ces_sync::Backend for Observed {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn apply(&mut self, model: &ces_model::PolicyModel, full: bool) -> Result<ces_sync::Applied, String> {
        let r = self.inner.apply(model, full);
        self.applied(model);
        r
    }

    fn apply_pods(
        &mut self,
        model: &ces_model::PolicyModel,
        delta: &ces_model::PodDelta,
    ) -> Result<ces_sync::Applied, String> {
        // The pods' history changes as of now, before the device does (see the gateway's apply_pods).
        if let Some((pipeline, _)) = &self.flows {
            pipeline.send(Input::PodChanges(delta.pods.clone(), jiff::Timestamp::now()));
        }
        self.inner.apply_pods(model, delta)
    }

    fn problems(&self) -> Vec<ces_model::Diagnostic> {
        self.inner.problems()
    }
}

fn client(args: &ControllerArgs) -> Result<Client, Failure> {
    let transport: Box<dyn Transport> = match &args.bigip_url {
        Some(url) => Box::new(
            Http::new(url, args.bigip_ca.as_deref(), args.bigip_insecure, Duration::from_secs(args.bigip_timeout_secs))
                .map_err(Failure::input)?,
        ),
        None => {
            let dir = args.bigip_dry_run.clone().unwrap_or_else(|| PathBuf::from("ces-dry-run"));
            let msg = format!("no --bigip-url: dry run, each request is written to {}", dir.display());
            crate::agent::log("info", "controller", &msg, serde_json::json!({}));
            Box::new(DryRun::new(&dir).map_err(Failure::input)?)
        }
    };
    let credentials = match (&args.bigip_creds_dir, &args.bigip_url) {
        (Some(dir), _) => Some(Credentials::from_dir(dir).map_err(Failure::input)?),
        (None, Some(_)) => Some(Credentials::from_env().ok_or_else(|| {
            Failure::input("no BIG-IP credentials: give --bigip-creds-dir DIR or set BIGIP_USERNAME and BIGIP_PASSWORD")
        })?),
        (None, None) => None,
    };
    let mut c = Client::new(transport, credentials);
    c.retry.attempts = args.bigip_attempts.max(1);
    c.retry.backoff_max = Duration::from_secs(args.sync.retry_max_secs.max(1));
    Ok(c)
}

pub fn run(args: &ControllerArgs) -> Result<(), Failure> {
    crate::agent::set_log_format(args.kube.log_format);
    if args.kube.kubernetes && !args.inputs.manifests.is_empty() {
        return Err(Failure::input("--kubernetes and --manifests are two sources: give one"));
    }
    if args.once && args.afm_syslog_listen.is_some() {
        return Err(Failure::input("--afm-syslog-listen receives logs until stopped: not with --once"));
    }
    if args.kube.kubernetes && (args.once || args.inputs.example) {
        return Err(Failure::input(
            "with --kubernetes the controller runs until stopped: --once and --example read files",
        ));
    }
    let mut backend = As3Backend::new(client(args)?, ces_as3::schema::schema_dir(args.as3_schema.as_deref()))
        .map_err(Failure::input)?;
    if args.once && !args.kube.kubernetes {
        let inputs = Inputs::load_unique(&args.inputs)?;
        let model = inputs.compile();
        let result = ces_sync::Backend::apply(&mut backend, &model, true);
        let s = backend.client.stats;
        return match result {
            Ok(a) => {
                eprintln!("ces controller: {}; {} request(s), {} bytes sent", a.summary, s.requests, s.bytes_sent);
                Ok(())
            }
            Err(e) => Err(Failure { code: 1, message: format!("controller: {e}") }),
        };
    }
    let health = std::sync::Arc::new(crate::health::Health::default());
    if let Some(addr) = &args.kube.health_addr {
        crate::health::serve(addr, health.clone(), "controller").map_err(Failure::input)?;
    }
    let opts = args.sync.options(&args.inputs.ces_namespace);
    let mut backend = Observed { inner: backend, flows: None };
    let stop_listener = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(addr) = &args.afm_syslog_listen {
        let a: std::net::SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(addr.as_str())
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| Failure::input(format!("--afm-syslog-listen: `{addr}` is not HOST:PORT")))?;
        let (pipeline, _) = args.flows.start(None)?;
        let settings = Arc::new(RwLock::new(AfmSettings::default()));
        let bound = ces_flow::listen::listen(a, settings.clone(), pipeline.clone(), stop_listener.clone())
            .map_err(Failure::input)?;
        crate::agent::log(
            "info",
            "controller",
            &format!("receiving AFM's logs on {bound} (UDP and TCP)"),
            serde_json::json!({"listen": bound.to_string()}),
        );
        let p = pipeline.clone();
        health.more_metrics.lock().unwrap_or_else(|e| e.into_inner()).push(Box::new(move || p.metrics("controller")));
        backend.flows = Some((pipeline, settings));
    }
    let mut backend = crate::agent::Counted::new(backend, health.clone(), |b: &Observed| {
        let b = &b.inner;
        let s = b.client.stats;
        let mut out = format!(
            "# HELP ces_backend_requests_total Requests sent to the BIG-IP.\n# TYPE ces_backend_requests_total counter\n\
             ces_backend_requests_total{{backend=\"as3\"}} {}\n\
             # HELP ces_backend_bytes_sent_total Bytes sent to the BIG-IP.\n# TYPE ces_backend_bytes_sent_total counter\n\
             ces_backend_bytes_sent_total{{backend=\"as3\"}} {}\n\
             # HELP ces_backend_problems Objects the BIG-IP refused or that could not be declared.\n# TYPE ces_backend_problems gauge\n\
             ces_backend_problems{{backend=\"as3\"}} {}\n\
             # HELP ces_backend_errors_total Failed BIG-IP calls, by kind (after the client's own retries).\n# TYPE ces_backend_errors_total counter\n",
            s.requests,
            s.bytes_sent,
            b.problems.len()
        );
        for (kind, n) in ces_as3::client::ERROR_KINDS.iter().zip(s.errors) {
            out.push_str(&format!("ces_backend_errors_total{{backend=\"as3\",kind=\"{kind}\"}} {n}\n"));
        }
        out
    });
    if args.kube.kubernetes {
        let mut source = crate::agent::kube_source(&args.kube, &args.inputs, Some("ces-controller"))?;
        *health.source_metrics.lock().unwrap_or_else(|p| p.into_inner()) = Some(source.metrics());
        if args.leader_elect {
            let identity = args.identity.clone().unwrap_or_else(crate::agent::default_identity);
            let elector = ces_kube::lease::Elector::new(
                source.client(),
                &args.lease_namespace,
                &args.lease_name,
                &identity,
                Duration::from_secs(args.lease_duration_secs.max(2)),
            );
            health.ready.store(true, std::sync::atomic::Ordering::Relaxed);
            crate::agent::lead(elector, source.runtime().handle().clone(), health.clone())?;
        }
        health.leader.store(true, std::sync::atomic::Ordering::Relaxed);
        crate::agent::log("info", "controller", "watching the Kubernetes API", serde_json::json!({}));
        crate::agent::run_loop("controller", &mut source, &mut backend, &opts, &health);
        stop_flows(backend.into_inner(), &stop_listener);
        return Ok(());
    }
    if args.inputs.example {
        return Err(Failure::input(
            "the controller watches files: give --manifests PATH... (and --config FILE), or --once",
        ));
    }
    let mut source = ces_sync::folder::Folder::new(args.inputs.manifests.clone(), args.inputs.config.clone());
    health.leader.store(true, std::sync::atomic::Ordering::Relaxed);
    crate::agent::log(
        "info",
        "controller",
        &format!("watching {} path(s)", args.inputs.manifests.len()),
        serde_json::json!({}),
    );
    crate::agent::run_loop("controller", &mut source, &mut backend, &opts, &health);
    stop_flows(backend.into_inner(), &stop_listener);
    Ok(())
}

/// Stopped: the listener first, then the pipeline stores what it holds.
fn stop_flows(backend: Observed, stop: &std::sync::atomic::AtomicBool) {
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some((pipeline, _)) = backend.flows {
        pipeline.close();
    }
}
