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
        return Err(Failure::input("only --once is available: the watching agent is not built yet"));
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
