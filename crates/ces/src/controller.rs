//! `ces controller`: keeps a BIG-IP's AFM configuration (through AS3) in step with the policy, through the sync loop.

use std::path::PathBuf;
use std::time::Duration;

use ces_as3::As3Backend;
use ces_as3::client::{Client, Credentials, DryRun, Http, Transport};
use clap::Args;

use crate::inputs::Inputs;
use crate::{Failure, InputArgs};

#[derive(Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    inputs: InputArgs,
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
    /// How long the inputs must be unchanged before a change is sent (coalescing churn into one request per tenant).
    #[arg(long, value_name = "MS", default_value_t = 200)]
    debounce_ms: u64,
    /// How often the files are checked for changes.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    poll_ms: u64,
    /// How often every tenant is read back and compared, repairing changes made behind CES's back.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    resync_secs: u64,
    /// The longest wait between retries after a failure (the wait doubles from 0.5 s up to this).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    retry_max_secs: u64,
}

fn client(args: &ControllerArgs) -> Result<Client, Failure> {
    let transport: Box<dyn Transport> = match &args.bigip_url {
        Some(url) => Box::new(
            Http::new(url, args.bigip_ca.as_deref(), args.bigip_insecure, Duration::from_secs(args.bigip_timeout_secs))
                .map_err(Failure::input)?,
        ),
        None => {
            let dir = args.bigip_dry_run.clone().unwrap_or_else(|| PathBuf::from("ces-dry-run"));
            eprintln!("ces controller: no --bigip-url: dry run, each request is written to {}", dir.display());
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
    c.retry.backoff_max = Duration::from_secs(args.retry_max_secs.max(1));
    Ok(c)
}

pub fn run(args: &ControllerArgs) -> Result<(), Failure> {
    let mut backend = As3Backend::new(client(args)?, ces_as3::schema::schema_dir(args.as3_schema.as_deref()))
        .map_err(Failure::input)?;
    if args.once {
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
    if args.inputs.example {
        return Err(Failure::input(
            "the controller watches files: give --manifests PATH... (and --config FILE), or --once",
        ));
    }
    let mut source = ces_sync::folder::Folder::new(args.inputs.manifests.clone(), args.inputs.config.clone());
    let opts = ces_sync::Options {
        debounce: Duration::from_millis(args.debounce_ms),
        poll: Duration::from_millis(args.poll_ms.max(1)),
        resync: Duration::from_secs(args.resync_secs.max(1)),
        retry_max: Duration::from_secs(args.retry_max_secs.max(1)),
        ces_namespace: args.inputs.ces_namespace.clone(),
        ..Default::default()
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    eprintln!("ces controller: watching {} path(s)", args.inputs.manifests.len());
    ces_sync::run(&mut source, &mut backend, &opts, &stop, &mut |e| match e {
        ces_sync::Event::Applied { reason, summary, problems, timings } => {
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            eprintln!(
                "ces controller: {reason}: {summary}; {problems} problem(s) in the policy; load {:.0} ms, compile {:.0} ms, apply {:.0} ms",
                ms(timings.load),
                ms(timings.compile),
                ms(timings.apply)
            );
        }
        ces_sync::Event::Failed { reason, error, retry_in } => {
            eprintln!("ces controller: {reason} failed, retrying in {} ms: {error}", retry_in.as_millis());
        }
    });
    Ok(())
}
