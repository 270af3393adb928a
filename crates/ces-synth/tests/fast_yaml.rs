//! The fast YAML path (ces-snapshot's fastyaml.rs) changes nothing but the speed: synthetic clusters written as
//! manifests (overlapping tenants, EndpointSlices, hostNetwork pods, selectors, schedules) and the examples compile
//! to the same model with and without it. One test in its own binary: it switches a process-wide setting.

use std::path::{Path, PathBuf};

use ces_snapshot::manifests::{load_paths, set_fast_yaml};

fn model(paths: &[PathBuf], config: &ces_config::CesConfig, fast: bool) -> ces_model::PolicyModel {
    set_fast_yaml(fast);
    let (snap, _) = load_paths(paths).unwrap();
    ces_compiler::compile(&snap, config, "kube-system")
}

#[test]
fn the_fast_yaml_path_changes_no_model() {
    for seed in 1..=3u64 {
        let dir = std::env::temp_dir().join(format!("ces-fastyaml-{seed}-{}", std::process::id()));
        let synth = ces_synth::Synth::generate(3000, 300, seed);
        synth.write_yaml(&dir).unwrap();
        let config = ces_config::CesConfig::from_file(&dir.join("ces-conf.yaml")).unwrap();
        let paths = [dir.join("cluster.yaml"), dir.join("policies.yaml")];
        let (slow, fast) = (model(&paths, &config, false), model(&paths, &config, true));
        assert!(slow.rules().count() > 100 && slow.pods.len() > 2000, "seed {seed}: a real cluster");
        assert!(slow == fast, "seed {seed}: the fast YAML path changed the model");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for (manifests, config) in [
        (
            vec![root.join("examples/realistic/cluster.yaml"), root.join("examples/realistic/policies.yaml")],
            root.join("examples/realistic/ces-conf.yaml"),
        ),
        (
            vec![root.join("examples/original/examples.yaml"), root.join("examples/original-cluster.yaml")],
            root.join("examples/original/ces-conf.yaml"),
        ),
    ] {
        let config = ces_config::CesConfig::from_file(&config).unwrap();
        assert!(model(&manifests, &config, false) == model(&manifests, &config, true), "{manifests:?}");
    }
    set_fast_yaml(true);
}
