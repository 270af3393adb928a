//! `ces`: the CES command line.
//!
//! Exit codes: 0 success (a `drop` verdict is a success), 1 `validate` found problems, 2 bad input or usage.

mod agent;
mod as3;
mod controller;
mod flows;
mod gateway;
mod health;
mod impact;
mod inputs;
mod lab;
mod simulate;
mod ui;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::inputs::Inputs;

#[derive(Parser)]
#[command(name = "ces", version, about = "CES: Kubernetes egress policy for BIG-IP AFM and Linux nftables")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the policy comes from.
#[derive(Args, Clone, Debug)]
pub struct InputArgs {
    /// Manifest files or folders (YAML or JSON, multi-document; folders are read recursively).
    #[arg(long, num_args = 1.., value_name = "PATH")]
    pub manifests: Vec<PathBuf>,
    /// ces-conf.yaml. Default: one Common tenant, no route domains, default action drop.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Use the embedded example cluster and config (examples/realistic) instead of files.
    #[arg(long, conflicts_with_all = ["manifests", "config"])]
    pub example: bool,
    /// Namespace of the ExternalServices that ClusterEgressRules reference.
    #[arg(long, env = "CES_NAMESPACE", default_value = ces_compiler::DEFAULT_CES_NAMESPACE, value_name = "NAMESPACE")]
    pub ces_namespace: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// The intermediate policy model, as JSON.
    Model,
    /// The nftables gateway's table: DIR/ruleset.nft, which `nft -f` loads (needs --out).
    Nft,
    /// BIG-IP AS3: DIR/<tenant>.json, one full AS3 request document per tenant (needs --out).
    As3,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML.
    Crds,
    /// Report every problem in a set of manifests and a config; exit 1 if there is any.
    Validate {
        #[command(flatten)]
        inputs: InputArgs,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Compile manifests and config for a backend and print (model) or write (--out) the result.
    Compile {
        #[command(flatten)]
        inputs: InputArgs,
        #[arg(long, value_enum, default_value = "model")]
        backend: Backend,
        /// Folder to write the backend's files into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// For time-based rules: the instant the output is rendered for (RFC 3339). Default: now.
        #[arg(long, value_name = "RFC3339")]
        at: Option<String>,
        /// Folder of the official AS3 schema files (as3-schema-<version>-<build>.json) to validate against.
        #[arg(long, env = "CES_AS3_SCHEMA_DIR", value_name = "DIR")]
        as3_schema: Option<PathBuf>,
        /// With --backend as3: the AS3 version the device runs (`version` of /mgmt/shared/appsvcs/info); a config
        /// asking for a newer schemaVersion is refused.
        #[arg(long, value_name = "VERSION")]
        as3_version: Option<String>,
        /// With --backend as3: fail (exit 1) when a rule is left out of the declarations or declared otherwise too,
        /// not only when a tenant document cannot be written.
        #[arg(long)]
        strict: bool,
        /// With --backend nft: how DNS answers reach the agent that learns host names (docs/nft.md, "Host names"):
        /// `native`, the table's own `queue` line (kernels with nft_queue); `iptables`, the agent's iptables-nft hook
        /// (the table has no queue line); `off`, no learning (name entries reported as not enforced).
        #[arg(long, value_enum, default_value = "native")]
        dns_hook: DnsHookArg,
    },
    /// The BIG-IP controller: keeps AFM (through AS3) in step with the policy; a dry run without --bigip-url.
    Controller(controller::ControllerArgs),
    /// The nftables egress gateway: programs this host's (this network namespace's) nftables from the policy.
    Gateway(gateway::GatewayArgs),
    /// On Linux as root: the policy on a real nftables gateway in network namespaces, real packets from every pod,
    /// each flow's real outcome next to simulate's prediction. Cleans up after itself. Needs nftables.
    Lab {
        #[command(flatten)]
        inputs: InputArgs,
        /// Also record the lab's traffic as flow records in this store (then: ces flows --store DIR).
        #[arg(long, value_name = "DIR")]
        flow_store: Option<PathBuf>,
    },
    /// Flow records: query the store (filters as `hubble observe`), follow it, or import records into it.
    Flows(flows::FlowsArgs),
    /// What egress traffic did: top destinations, drops and rejects, audit hits, protocols, errors, rules never
    /// hit, records lost (from the flow store).
    Report(flows::ReportArgs),
    /// Decide flows: the verdict, the rule that decided it, and the rules met on the way.
    Simulate(simulate::SimulateArgs),
    /// What a proposed policy would change: recorded or listed flows decided again (exit 0 no change, 2 changes, 1
    /// error).
    Impact(impact::ImpactArgs),
    /// The web UI: overview, flow map, flows (live), rules, simulate, impact; read-only, over a flow store.
    Ui(ui::UiArgs),
    /// Write a synthetic cluster (cluster.yaml, policies.yaml, ces-conf.yaml) for scale experiments.
    Synth {
        #[arg(long, default_value_t = 1000)]
        pods: usize,
        #[arg(long, default_value_t = 100)]
        rules: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Folder to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// A failure with its exit code.
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn input(message: impl Into<String>) -> Failure {
        Failure { code: 2, message: message.into() }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that print (not the agents, which write to sockets): a reader that goes away (`| head`) ends the
    // process quietly, as for any Unix filter.
    if matches!(
        cli.command,
        Command::Flows(_)
            | Command::Report(_)
            | Command::Simulate(_)
            | Command::Impact(_)
            | Command::Crds
            | Command::Validate { .. }
    ) {
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let code = match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("ces: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    };
    if std::env::var_os("CES_REPORT_PEAK_RSS").is_some() {
        report_peak_rss();
    }
    code
}

/// Prints this process's peak resident memory (`VmHWM`) to stderr, for benchmarks: a parent cannot measure it with
/// `getrusage`, which carries the parent's own peak into the child at exec.
fn report_peak_rss() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    match status.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
        Some(v) => eprintln!("ces: peak RSS {}", v.trim()),
        None => eprintln!("ces: peak RSS unknown (no VmHWM in /proc/self/status)"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DnsHookArg {
    Native,
    Iptables,
    Off,
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Crds => {
            print!("{}", ces_api::crds_yaml());
            Ok(())
        }
        Command::Validate { inputs, output } => validate(&inputs, output),
        Command::Compile { inputs, backend: Backend::As3, out, at, as3_schema, as3_version, strict, .. } => {
            let out = out.ok_or_else(|| Failure::input("--backend as3 writes files: give --out DIR"))?;
            let at = gateway::parse_at(at.as_deref())?;
            let inputs = Inputs::load_unique(&inputs)?;
            as3::compile(&inputs, &out, as3_schema.as_deref(), at, as3_version.as_deref(), strict)
        }
        Command::Compile { inputs, backend: Backend::Nft, out, at, dns_hook, .. } => {
            let out = out.ok_or_else(|| Failure::input("--backend nft writes files: give --out DIR"))?;
            let at = gateway::parse_at(at.as_deref())?;
            let inputs = Inputs::load_unique(&inputs)?;
            let model = inputs.compile();
            let hook = match dns_hook {
                DnsHookArg::Native => ces_nft::DnsHook::Native,
                DnsHookArg::Iptables => ces_nft::DnsHook::External,
                DnsHookArg::Off => ces_nft::DnsHook::Off,
            };
            let rs = ces_nft::render_with(&model, at, hook).map_err(|e| Failure::input(e.to_string()))?;
            std::fs::create_dir_all(&out).map_err(|e| Failure::input(format!("{}: {e}", out.display())))?;
            let file = out.join("ruleset.nft");
            std::fs::write(&file, rs.to_text()).map_err(|e| Failure::input(format!("{}: {e}", file.display())))?;
            gateway::report(&model, &rs);
            eprintln!("ces: wrote {} (load it with: TZ=UTC nft -f {})", file.display(), file.display());
            Ok(())
        }
        Command::Compile { inputs, backend: Backend::Model, .. } => {
            let inputs = Inputs::load_unique(&inputs)?;
            let model = inputs.compile();
            // Streamed: the model of a large cluster is tens of megabytes of JSON.
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            serde_json::to_writer_pretty(&mut out, &model).expect("the model serialises");
            std::io::Write::write_all(&mut out, b"\n")
                .and_then(|_| std::io::Write::flush(&mut out))
                .map_err(|e| Failure::input(format!("writing the model: {e}")))?;
            let errors = model.errors().count();
            if errors > 0 {
                eprintln!(
                    "ces: {errors} problem(s) left objects out of the model; see `diagnostics` or run `ces validate`"
                );
            }
            Ok(())
        }
        Command::Simulate(args) => simulate::run(&args),
        Command::Impact(args) => impact::run(&args),
        Command::Ui(args) => ui::run(&args),
        Command::Gateway(args) => gateway::run(&args),
        Command::Controller(args) => controller::run(&args),
        Command::Lab { inputs, flow_store } => lab::run(&inputs, flow_store.as_deref()),
        Command::Flows(args) => flows::run(&args),
        Command::Report(args) => flows::report(&args),
        Command::Synth { pods, rules, seed, out } => {
            if pods > 6_553_600 {
                return Err(Failure::input("--pods: at most 6553600 (65536 namespaces of 100 pods)"));
            }
            ces_synth::Synth::generate(pods, rules, seed)
                .write_yaml(&out)
                .map_err(|e| Failure::input(format!("{}: {e}", out.display())))?;
            eprintln!("ces: wrote {pods} pods and {rules} rules to {}", out.display());
            Ok(())
        }
    }
}

fn validate(args: &InputArgs, output: Output) -> Result<(), Failure> {
    if args.manifests.is_empty() && !args.example {
        return Err(Failure::input("give --manifests PATH... (or --example)"));
    }
    // A broken config is a validation finding too, reported the same way.
    let inputs = match Inputs::load(args) {
        Ok(i) => i,
        Err(f) if f.code == 2 && output == Output::Json => {
            println!("{}", serde_json::json!({ "problems": [{ "reason": "InvalidConfig", "message": f.message }] }));
            return Err(Failure { code: 1, message: String::new() });
        }
        Err(f) => return Err(Failure { code: 1, ..f }),
    };
    let model = inputs.compile();
    let errors = model.errors().count();
    match output {
        Output::Json => {
            println!("{}", serde_json::json!({ "objects": inputs.object_count(), "problems": model.diagnostics }));
        }
        Output::Text => {
            for d in &model.diagnostics {
                println!("{d}");
            }
            println!(
                "{} object(s) in {} file(s): {errors} problem(s), {} warning(s)",
                inputs.object_count(),
                inputs.stats.files,
                model.diagnostics.len() - errors
            );
        }
    }
    // Warnings (a rule with no source yet, an endpoint not trusted) leave the objects applied: not a failure.
    if errors == 0 { Ok(()) } else { Err(Failure { code: 1, message: String::new() }) }
}
