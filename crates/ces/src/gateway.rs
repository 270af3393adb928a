//! `ces gateway`: the nftables egress gateway agent.

use ces_model::PolicyModel;
use ces_nft::apply::{Applier, Nft};
use ces_nft::{Ruleset, render};
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
    /// Apply the current policy once and exit, leaving the rules in place.
    #[arg(long)]
    once: bool,
    /// Without --once: how long the inputs must be unchanged before a change is applied (coalescing churn).
    #[arg(long, value_name = "MS", default_value_t = 200)]
    debounce_ms: u64,
    /// Without --once: how often the whole table is applied again, repairing changes made behind CES's back.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    resync_secs: u64,
}

#[derive(Subcommand)]
enum GatewayAction {
    /// Remove the gateway's table (and so every CES rule) from this host.
    Cleanup {
        /// The table to remove (default: the embedded config's, `ces`).
        #[arg(long, default_value = "ces")]
        table: String,
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
    if let Some(GatewayAction::Cleanup { table }) = &args.action {
        let removed = Nft::default().delete_table(table).map_err(|e| Failure::input(e.to_string()))?;
        eprintln!("ces: table inet {table} {}", if removed { "removed" } else { "was not there" });
        return Ok(());
    }
    let inputs = args.inputs.as_ref().ok_or_else(|| Failure::input("give --manifests PATH... or --example"))?;
    if !args.once {
        return watch(inputs, args);
    }
    let inputs = Inputs::load_unique(inputs)?;
    let model = inputs.compile();
    let rs = render(&model, Timestamp::now()).map_err(|e| Failure::input(e.to_string()))?;
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
    let mut source = ces_sync::folder::Folder { manifests: inputs.manifests.clone(), config: inputs.config.clone() };
    let mut backend = ces_nft::NftBackend::new(Nft::default());
    let opts = ces_sync::Options {
        debounce: std::time::Duration::from_millis(args.debounce_ms),
        resync: std::time::Duration::from_secs(args.resync_secs.max(1)),
        ces_namespace: inputs.ces_namespace.clone(),
        ..Default::default()
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    eprintln!("ces gateway: watching {} path(s); the rules stay in place if this agent stops", inputs.manifests.len());
    ces_sync::run(&mut source, &mut backend, &opts, &stop, &mut |e| match e {
        ces_sync::Event::Applied { reason, summary, problems } => {
            eprintln!("ces gateway: {reason}: {summary}; {problems} problem(s) in the policy");
        }
        ces_sync::Event::Failed { reason, error, retry_in } => {
            eprintln!("ces gateway: {reason} failed, retrying in {} ms: {error}", retry_in.as_millis());
        }
    });
    Ok(())
}
