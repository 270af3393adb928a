//! The sync loop on a real manifests folder: pod churn goes through `Source::update`, `recompile_pods` and
//! `Backend::apply_pods`, everything else through a load and a whole compile, and after every pass the backend holds
//! exactly what a whole compile of the files gives.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ces_config::CesConfig;
use ces_model::{PodDelta, PolicyModel};
use ces_sync::{Applied, Backend, Event, Options, folder::Folder};

/// `apply` or `pods`, with the model the backend was given, and the delta.
type Call = (&'static str, PolicyModel, Option<PodDelta>);

#[derive(Clone, Default)]
struct Seen {
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Backend for Seen {
    fn name(&self) -> &str {
        "seen"
    }
    fn apply(&mut self, model: &PolicyModel, _full: bool) -> Result<Applied, String> {
        self.calls.lock().unwrap().push(("apply", model.clone(), None));
        Ok(Applied::default())
    }
    fn apply_pods(&mut self, model: &PolicyModel, delta: &PodDelta) -> Result<Applied, String> {
        self.calls.lock().unwrap().push(("pods", model.clone(), Some(delta.clone())));
        Ok(Applied::default())
    }
}

fn pod(name: &str, ip: &str, app: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: {app}}}}}\nstatus: {{phase: Running, podIPs: [{{ip: {ip}}}]}}\n"
    )
}

const RULES: &str = "---
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {name: api, namespace: shop}
spec: {addresses: [203.0.113.7]}
---
apiVersion: kubeovn.io/v1alpha1
kind: NamespaceEgressRule
metadata: {name: web, namespace: shop}
spec: {action: accept, externalServices: [api], podSelector: {matchLabels: {app: web}}}
";

fn whole(files: &[PathBuf]) -> PolicyModel {
    let (snapshot, _) = ces_snapshot::manifests::load_paths(files).unwrap();
    ces_compiler::compile(&snapshot, &CesConfig::embedded_default(), "kube-system")
}

fn write(path: &Path, text: &str) {
    // A different size each time, so the change is seen whatever the clock's resolution.
    std::fs::write(path, text).unwrap();
}

#[test]
fn pod_churn_is_patched_and_everything_else_compiled_whole() {
    let dir = std::env::temp_dir().join(format!("ces-sync-pods-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (cluster, churn, rules) = (dir.join("cluster.yaml"), dir.join("churn.yaml"), dir.join("rules.yaml"));
    write(&cluster, &(pod("a", "10.0.0.1", "web") + &pod("b", "10.0.0.2", "db")));
    write(&churn, &pod("c", "10.0.0.3", "web"));
    write(&rules, RULES);
    let files = vec![cluster.clone(), churn.clone(), rules.clone()];

    let backend = Seen::default();
    let calls = backend.calls.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let events = Arc::new(Mutex::new(Vec::<Event>::new()));
    let (s2, e2, f2) = (stop.clone(), events.clone(), files.clone());
    let opts = Options {
        poll: Duration::from_millis(5),
        debounce: Duration::from_millis(20),
        resync: Duration::from_secs(3600),
        ..Options::default()
    };
    let h = std::thread::spawn(move || {
        let mut source = Folder::new(f2, None);
        let mut backend = backend;
        ces_sync::run(&mut source, &mut backend, &opts, &s2, &mut |e| e2.lock().unwrap().push(e));
    });
    let wait_calls = |n: usize| {
        let start = Instant::now();
        while calls.lock().unwrap().len() < n {
            assert!(start.elapsed() < Duration::from_secs(10), "events: {:?}", events.lock().unwrap());
            std::thread::sleep(Duration::from_millis(5));
        }
        calls.lock().unwrap()[n - 1].clone()
    };

    let (how, model, _) = wait_calls(1);
    assert_eq!(how, "apply");
    assert_eq!(model, whole(&files));

    // A pod moves and another comes: patched.
    write(&churn, &(pod("c", "10.0.0.33", "web") + &pod("d", "10.0.0.4", "web")));
    let (how, model, delta) = wait_calls(2);
    assert_eq!(how, "pods", "pod churn takes the patch");
    assert_eq!(model, whole(&files), "and gives what a whole compile gives");
    let delta = delta.unwrap();
    assert!(delta.sets.contains(&"pods/shop/web".to_string()), "{delta:?}");
    assert_eq!(delta.pods.len(), 2, "{delta:?}");

    // A rule changes: a load and a whole compile.
    write(&rules, &RULES.replace("app: web", "app: db"));
    let (how, model, _) = wait_calls(3);
    assert_eq!(how, "apply");
    assert_eq!(model, whole(&files));

    // Churn again after the whole compile: patched from the new state.
    write(&churn, &pod("d", "10.0.0.44", "db"));
    let (how, model, _) = wait_calls(4);
    assert_eq!(how, "pods");
    assert_eq!(model, whole(&files));

    // A pod defined in two files: refused whole, as a load refuses it; fixing it converges.
    write(&churn, &(pod("d", "10.0.0.44", "db") + &pod("a", "10.0.0.9", "web")));
    let start = Instant::now();
    while !events
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, Event::Failed { error, .. } if error.contains("more than once")))
    {
        assert!(start.elapsed() < Duration::from_secs(10), "events: {:?}", events.lock().unwrap());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(calls.lock().unwrap().len(), 4, "nothing applied from a refused input");
    write(&churn, &pod("d", "10.0.0.45", "db"));
    let (how, model, _) = wait_calls(5);
    assert_eq!(how, "apply", "after a failure the loop applies whole");
    assert_eq!(model, whole(&files));

    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
