//! Loading what a command works on: manifests and config from files, or the embedded example.

use ces_config::CesConfig;
use ces_model::PolicyModel;
use ces_snapshot::Snapshot;
use ces_snapshot::manifests::{LoadStats, load_paths, load_strs};

use crate::{Failure, InputArgs};

/// The embedded example (examples/realistic), so the tool runs on a fresh machine with nothing but itself.
const EXAMPLE_FILES: [(&str, &str); 2] = [
    ("examples/realistic/cluster.yaml", include_str!("../../../examples/realistic/cluster.yaml")),
    ("examples/realistic/policies.yaml", include_str!("../../../examples/realistic/policies.yaml")),
];
const EXAMPLE_CONFIG: &str = include_str!("../../../examples/realistic/ces-conf.yaml");

pub struct Inputs {
    pub snapshot: Snapshot,
    pub config: CesConfig,
    pub stats: LoadStats,
    pub ces_namespace: String,
}

impl Inputs {
    pub fn load(args: &InputArgs) -> Result<Inputs, Failure> {
        if args.manifests.is_empty() && !args.example {
            return Err(Failure::input("give --manifests PATH... (or --example)"));
        }
        let (snapshot, stats, config) = if args.example {
            let snap = load_strs(&EXAMPLE_FILES);
            let stats = LoadStats { files: EXAMPLE_FILES.len(), ..Default::default() };
            let config = CesConfig::from_yaml(EXAMPLE_CONFIG, "examples/realistic/ces-conf.yaml")
                .map_err(|e| Failure::input(e.to_string()))?;
            (snap, stats, config)
        } else {
            let (snap, stats) = load_paths(&args.manifests).map_err(|e| Failure::input(e.to_string()))?;
            let config = match &args.config {
                Some(path) => CesConfig::from_file(path).map_err(|e| Failure::input(e.to_string()))?,
                None => CesConfig::embedded_default(),
            };
            (snap, stats, config)
        };
        if args.config.is_none() {
            for at in &stats.configs {
                eprintln!(
                    "ces: note: {at} is a ces-conf.yaml, not a manifest; it is not used unless given with --config"
                );
            }
        }
        Ok(Inputs { snapshot, config, stats, ces_namespace: args.ces_namespace.clone() })
    }

    /// Like [`Inputs::load`], and refuses inputs that define an object twice: which definition counts would depend
    /// on file order. (`validate` reports them as problems instead.)
    pub fn load_unique(args: &InputArgs) -> Result<Inputs, Failure> {
        let inputs = Inputs::load(args)?;
        inputs.snapshot.refuse_duplicates().map_err(Failure::input)?;
        Ok(inputs)
    }

    pub fn compile(&self) -> PolicyModel {
        ces_compiler::compile(&self.snapshot, &self.config, &self.ces_namespace)
    }

    /// Objects CES read (core objects and CES resources), for summaries.
    pub fn object_count(&self) -> usize {
        let s = &self.snapshot;
        s.namespaces.len()
            + s.pods.len()
            + s.services.len()
            + s.external_services.len()
            + s.cluster_rules.len()
            + s.namespace_rules.len()
            + s.service_rules.len()
            + s.external_ip_rules.len()
    }
}
