//! `ces ui`: the web UI (docs/ui.md) over a flow store and the policy, read-only.

use std::path::PathBuf;

use ces_sync::Source as _;
use clap::Args;

use crate::inputs::Inputs;
use crate::{Failure, InputArgs};

#[derive(Args)]
pub struct UiArgs {
    /// The flow store's folder.
    #[arg(long, value_name = "DIR", default_value = ces_flow::store::DEFAULT_DIR)]
    store: PathBuf,
    /// The current policy: --manifests PATH... [--config FILE] (or --example, or --kubernetes).
    #[command(flatten)]
    inputs: InputArgs,
    /// Read the current policy from the Kubernetes API (in-cluster, or --kubeconfig), once at start.
    #[arg(long, conflicts_with_all = ["manifests", "example"])]
    kubernetes: bool,
    #[arg(long, value_name = "FILE", requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// A proposed policy (manifests, with the same config) for the Impact page.
    #[arg(long, num_args = 1.., value_name = "PATH")]
    proposed: Vec<PathBuf>,
    /// Where to listen. Beyond loopback, a token or TLS is required.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// A file holding the bearer token every page and API call must present (at least 16 characters).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM) ...
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// ... and this private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Show only this tenant's egress (and let it propose only its own namespaces' objects).
    #[arg(long, value_name = "TENANT")]
    tenant: Option<String>,
    /// Show only this namespace's egress.
    #[arg(long, value_name = "NAMESPACE")]
    namespace: Option<String>,
}

pub fn run(args: &UiArgs) -> Result<(), Failure> {
    let (snapshot, config) = if args.kubernetes {
        let k = crate::agent::KubeArgs {
            kubernetes: true,
            kubeconfig: args.kubeconfig.clone(),
            health_addr: None,
            log_format: crate::agent::LogFormat::Text,
        };
        let mut source = crate::agent::kube_source(&k, &args.inputs, None)?;
        source.load().map_err(Failure::input)?
    } else {
        let inputs = Inputs::load_unique(&args.inputs)?;
        (inputs.snapshot, inputs.config)
    };
    let model = ces_compiler::compile(&snapshot, &config, &args.inputs.ces_namespace);
    let proposed = if args.proposed.is_empty() {
        None
    } else {
        let (snap, _) =
            ces_snapshot::manifests::load_paths(&args.proposed).map_err(|e| Failure::input(e.to_string()))?;
        snap.refuse_duplicates().map_err(Failure::input)?;
        Some(ces_compiler::compile(&snap, &config, &args.inputs.ces_namespace))
    };
    let token = match &args.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| Failure::input(format!("--token-file {}: {e}", f.display())))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let ui = ces_ui::Ui {
        store: args.store.clone(),
        snapshot,
        config,
        ces_namespace: args.inputs.ces_namespace.clone(),
        model,
        proposed,
        scope: ces_ui::Scope { tenant: args.tenant.clone(), namespace: args.namespace.clone() },
    };
    let tls = args.tls_cert.clone().zip(args.tls_key.clone());
    let scheme = if tls.is_some() { "https" } else { "http" };
    let opts = ces_ui::Options { listen: args.listen, token, tls };
    ces_ui::check(&opts).map_err(Failure::input)?;
    ces_ui::serve(ui, opts, |addr| eprintln!("ces ui: serving {scheme}://{addr}/ (the store {})", args.store.display()))
        .map_err(Failure::input)
}
