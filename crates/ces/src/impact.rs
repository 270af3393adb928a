//! `ces impact`: recorded or listed flows decided again under a proposed policy, and what changes (docs/impact.md).
//! Exit codes as `terraform plan -detailed-exitcode`: 0 no change, 2 changes (those `--fail-on` counts), 1 error.

use std::io::{BufRead, Write as _};
use std::path::PathBuf;
use std::sync::mpsc;

use ces_eval::Evaluator;
use ces_flow::record::FlowRecord;
use ces_flow::store::Reader;
use ces_impact::{Change, FailOn, Group, Impact, Side, Subject};
use clap::Args;
use jiff::Timestamp;

use crate::flows::{FilterArgs, Format};
use crate::inputs::Inputs;
use crate::simulate::Resolver;
use crate::{Failure, InputArgs};

#[derive(Args)]
pub struct ImpactArgs {
    /// The proposed policy: --manifests PATH... [--config FILE] (or --example).
    #[command(flatten)]
    inputs: InputArgs,
    /// Flows to decide again: JSON lines, each a flow record or a line of `ces simulate --flows`
    /// ({"from", "to", "at", "tenant"}).
    #[arg(long, value_name = "FILE", required_unless_present = "store", conflicts_with = "store")]
    flows: Option<PathBuf>,
    /// A flow store: its records (narrowed by the filters) are decided again.
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    #[command(flatten)]
    filter: FilterArgs,
    /// The current policy. Default: for records, what each says was decided; listed flows need it.
    #[arg(long, num_args = 1.., value_name = "PATH")]
    current_manifests: Vec<PathBuf>,
    /// The current policy's ces-conf.yaml. Default: --config.
    #[arg(long, value_name = "FILE", requires = "current_manifests")]
    current_config: Option<PathBuf>,
    /// Which changes make the exit code 2: FROM->TO pairs of accept, drop, reject, deny (drop or reject), any,
    /// comma-separated, and `rule` (the deciding rule alone changed). Default: every change.
    #[arg(long, value_name = "CHANGES")]
    fail_on: Option<String>,
    /// Groups shown in the table.
    #[arg(long, default_value_t = 50)]
    top: usize,
    /// `table`: the changes grouped; `json`: one object per changed flow ({"flow", "before", "after"}).
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Format,
}

/// Errors of this command exit with 1 (2 means "changes").
fn error(f: Failure) -> Failure {
    Failure { code: 1, message: f.message }
}

/// Items handed to the deciding threads at a time.
const BATCH: usize = 4096;

/// A line of the flows file, with its number.
struct Item(usize, String);

/// A listed flow line (as `ces simulate --flows` reads them).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Listed {
    from: String,
    to: String,
    #[serde(default)]
    at: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
}

/// The flow of one line, and what was decided for it when it says.
fn subject(line: &str, resolver: Option<&Resolver>, now: Timestamp) -> Result<(Subject, Option<Side>), String> {
    // A flow record (one parse), else a listed flow, else a line of the gateway's older packet log.
    let record = match serde_json::from_str::<FlowRecord>(line) {
        Ok(r) if r.v == ces_flow::record::SCHEMA_VERSION => r,
        Ok(r) => return Err(format!("flow record version {} (this CES reads version 1)", r.v)),
        Err(_) => match serde_json::from_str::<Listed>(line) {
            Ok(l) => {
                let resolver = resolver
                    .ok_or("a listed flow has no recorded decision: give the current policy (--current-manifests)")?;
                let at = match &l.at {
                    Some(a) => a.parse().map_err(|e| format!("`{a}` is not an RFC 3339 time: {e}"))?,
                    None => now,
                };
                let r = resolver.resolve(&l.from, &l.to, l.tenant.as_deref(), at)?;
                let s = Subject {
                    tenant: r.flow.tenant.clone(),
                    source: r.flow.source,
                    namespace: r.source.namespace.clone(),
                    pod: r.source.pod.clone(),
                    destination: r.flow.destination.clone(),
                    protocol: r.flow.protocol,
                    port: r.flow.port,
                    at: r.flow.at,
                };
                return Ok((s, None));
            }
            Err(_) => FlowRecord::from_json_line(line)?,
        },
    };
    let (s, side) = Subject::from_record(&record)?;
    Ok((s, Some(side)))
}

pub fn run(args: &ImpactArgs) -> Result<(), Failure> {
    let fail_on = FailOn::parse(args.fail_on.as_deref().unwrap_or_default())
        .map_err(|e| error(Failure::input(format!("--fail-on: {e}"))))?;
    let proposed_inputs = Inputs::load_unique(&args.inputs).map_err(error)?;
    let proposed = proposed_inputs.compile();
    let current_inputs = if args.current_manifests.is_empty() {
        None
    } else {
        let a = InputArgs {
            manifests: args.current_manifests.clone(),
            config: args.current_config.clone().or_else(|| args.inputs.config.clone()),
            example: false,
            ces_namespace: args.inputs.ces_namespace.clone(),
        };
        Some(Inputs::load_unique(&a).map_err(error)?)
    };
    let current = current_inputs.as_ref().map(|i| i.compile());
    for (what, m) in [("proposed", Some(&proposed)), ("current", current.as_ref())] {
        if let Some(m) = m
            && m.errors().count() > 0
        {
            eprintln!(
                "ces impact: warning: {} problem(s) in the {what} policy; the objects concerned are left out (run `ces validate`)",
                m.errors().count()
            );
        }
    }
    let pe = Evaluator::new(&proposed);
    let ce = current.as_ref().map(Evaluator::new);
    // Listed flows name pods: found in the current policy's cluster, else the proposed one's.
    let (resolver_inputs, resolver_eval) = match (&current_inputs, &ce) {
        (Some(i), Some(e)) => (i, e),
        _ => (&proposed_inputs, &pe),
    };
    let resolver = Resolver::new(resolver_inputs, resolver_eval);
    let resolver = current_inputs.as_ref().map(|_| &resolver);
    let now = Timestamp::now();

    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8);
    let (tx, rx) = mpsc::sync_channel::<(usize, Vec<Item>)>(threads * 2);
    let rx = std::sync::Mutex::new(rx);
    let (out_tx, out_rx) = mpsc::channel::<(usize, Vec<Change>, Vec<String>)>();
    let out_tx_store = out_tx.clone();
    let json = args.output == Format::Json;
    let mut total = Impact::new(ce.as_ref(), &pe, fail_on.clone());
    let mut read_error: Option<String> = None;
    let mut bad_lines: Vec<String> = Vec::new();
    std::thread::scope(|scope| {
        let mut workers = Vec::new();
        for _ in 0..threads {
            let (rx, out_tx, fail_on) = (&rx, out_tx.clone(), fail_on.clone());
            let (ce, pe) = (ce.as_ref(), &pe);
            workers.push(scope.spawn(move || {
                let mut impact = Impact::new(ce, pe, fail_on);
                if !json {
                    impact = impact.quiet();
                }
                loop {
                    let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((n, items)) = next else { break };
                    let mut changes = Vec::new();
                    let mut bad = Vec::new();
                    for Item(l, line) in items {
                        match subject(&line, resolver, now) {
                            Ok((s, side)) => {
                                if let Some(c) = impact.add(&s, side.as_ref())
                                    && json
                                {
                                    changes.push(c);
                                }
                            }
                            Err(e) => bad.push(format!("line {l}: {e}")),
                        }
                    }
                    let _ = out_tx.send((n, changes, bad));
                }
                impact
            }));
        }
        drop(out_tx);
        // The printer: changes in input order.
        let printer = scope.spawn(move || {
            let mut pending = std::collections::BTreeMap::new();
            let mut next = 0;
            let mut bad = Vec::new();
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for (n, changes, b) in out_rx {
                pending.insert(n, (changes, b));
                while let Some((changes, b)) = pending.remove(&next) {
                    for c in changes {
                        let _ = writeln!(out, "{}", serde_json::to_string(&c).unwrap_or_default());
                    }
                    bad.extend(b);
                    next += 1;
                }
            }
            let _ = out.flush();
            bad
        });
        // The reader.
        let mut n = 0;
        let mut batch = Vec::with_capacity(BATCH);
        let mut send = |batch: &mut Vec<Item>| {
            if !batch.is_empty() {
                let _ = tx.send((n, std::mem::replace(batch, Vec::with_capacity(BATCH))));
                n += 1;
            }
        };
        if let Some(path) = &args.flows {
            match std::fs::File::open(path) {
                Ok(f) => {
                    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
                        match line {
                            Ok(l) if l.trim().is_empty() => {}
                            Ok(l) => {
                                batch.push(Item(i + 1, l));
                                if batch.len() == BATCH {
                                    send(&mut batch);
                                }
                            }
                            Err(e) => {
                                read_error = Some(format!("{}: line {}: {e}", path.display(), i + 1));
                                break;
                            }
                        }
                    }
                }
                Err(e) => read_error = Some(format!("{}: {e}", path.display())),
            }
        } else if let Some(dir) = &args.store {
            // Parts of the store are read and decided on every core; their changes go to the printer in the
            // store's order.
            let scanned = args.filter.filter().map_err(|e| e.message).and_then(|f| {
                let reader = Reader::open(dir)?;
                // Records alike are decided once: by minute only when a schedule could tell them apart.
                let by_minute = ces_impact::timed(current.as_ref(), &proposed);
                let out = &out_tx_store;
                let states = reader.scan_distinct(
                    &f,
                    by_minute,
                    || {
                        let i = Impact::new(ce.as_ref(), &pe, fail_on.clone());
                        if json { i } else { i.quiet() }
                    },
                    |impact, n, flows| {
                        let mut changes = Vec::new();
                        let mut bad = Vec::new();
                        for (r, count) in flows {
                            match Subject::from_record(&r) {
                                Ok((s, side)) => {
                                    if let Some(c) = impact.add_many(&s, Some(&side), count)
                                        && json
                                    {
                                        changes.push(c);
                                    }
                                }
                                Err(e) => bad.push(format!("a record: {e}")),
                            }
                        }
                        let _ = out.send((n, changes, bad));
                    },
                )?;
                for s in states {
                    total.merge(s);
                }
                Ok(())
            });
            if let Err(e) = scanned {
                read_error = Some(e);
            }
        }
        send(&mut batch);
        drop(tx);
        drop(out_tx_store);
        for w in workers {
            if let Ok(i) = w.join() {
                total.merge(i);
            }
        }
        bad_lines = printer.join().unwrap_or_default();
    });
    if let Some(e) = read_error {
        return Err(Failure { code: 1, message: e });
    }
    if !bad_lines.is_empty() {
        let shown: Vec<&String> = bad_lines.iter().take(20).collect();
        let more =
            if bad_lines.len() > 20 { format!("\n… and {} more", bad_lines.len() - 20) } else { String::new() };
        let what = args.flows.as_ref().map_or("the store".to_string(), |p| p.display().to_string());
        return Err(Failure {
            code: 1,
            message: format!(
                "{what}: {} flow(s) could not be read:\n{}{more}",
                bad_lines.len(),
                shown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
            ),
        });
    }
    if !json {
        print_table(&total, args.top);
    }
    if total.undecided > 0 {
        eprintln!(
            "ces impact: {} flow(s) could not be decided, e.g.:\n  {}",
            total.undecided,
            total.reasons.join("\n  ")
        );
    }
    eprintln!(
        "ces impact: {} flow(s) decided again, {} changed, {} counted by --fail-on",
        total.flows, total.changed, total.failing
    );
    if total.failing > 0 { Err(Failure { code: 2, message: String::new() }) } else { Ok(()) }
}

fn side(s: &Side) -> String {
    match &s.rule {
        Some(r) => format!("{} by {r}", s.verdict),
        None => s.verdict.clone(),
    }
}

fn print_table(total: &Impact, top: usize) {
    let groups: Vec<Group> = total.groups();
    if groups.is_empty() {
        println!("No change: {} flow(s) decided the same.", total.flows);
        return;
    }
    println!("{} of {} flow(s) change, in {} group(s):", total.changed, total.flows, groups.len());
    println!();
    println!(
        "{:>8}  {:<48} {:<48} {:<10} {:<18} {:<32} EXAMPLE",
        "FLOWS", "BEFORE", "AFTER", "TENANT", "NAMESPACE", "DESTINATION"
    );
    for g in groups.iter().take(top) {
        let ex = &g.example;
        let who = match (&ex.source.namespace, &ex.source.pod) {
            (Some(ns), Some(p)) => format!("{ns}/{p}"),
            _ => ex.source.ip.to_string(),
        };
        let port = ex.port.map(|p| format!(":{p}")).unwrap_or_default();
        println!(
            "{:>8}  {:<48} {:<48} {:<10} {:<18} {:<32} {who} -> {}{port}/{} at {}",
            g.flows,
            side(&g.before),
            side(&g.after),
            g.tenant,
            g.namespace,
            g.destination,
            ex.destination,
            ex.protocol,
            ex.at
        );
    }
    if groups.len() > top {
        println!("… {} more group(s) (--top N, or -o json for every changed flow)", groups.len() - top);
    }
}
