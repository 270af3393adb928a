//! `KubeSource::update` against the fake API server: pod and EndpointSlice events move pods and endpoints in the
//! loop's snapshot, which must then equal a fresh load; an event of any other kind, or an object that does not read
//! cleanly, leaves the work to `load`.

use std::time::{Duration, Instant};

use ces_fake_apiserver::FakeApiServer;
use ces_kube::KubeSource;
use ces_sync::Source;
use serde_json::{Value, json};

fn pod(name: &str, ip: &str, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "shop", "labels": {"app": app}},
           "status": {"phase": "Running", "podIPs": [{"ip": ip}]}})
}

fn service(selector: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
           "spec": {"selector": {"app": selector}}})
}

/// An EndpointSlice of Service `web` listing these pods as ready endpoints.
fn slice(name: &str, endpoints: &[(&str, &str)]) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(pod, ip)| {
            json!({"addresses": [ip], "conditions": {"ready": true},
                   "targetRef": {"kind": "Pod", "namespace": "shop", "name": pod}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
           "addressType": "IPv4", "endpoints": eps})
}

/// A source watching `api` (its kubeconfig written in `dir`), and its first load.
fn start_and_load(api: &FakeApiServer, dir: &std::path::Path) -> (KubeSource, ces_snapshot::Snapshot) {
    std::fs::create_dir_all(dir).unwrap();
    api.write_kubeconfig(&dir.join("kubeconfig"));
    let mut src = KubeSource::start(Some(dir.join("kubeconfig")), None, None).unwrap();
    let start = Instant::now();
    loop {
        match src.load() {
            Ok((snap, _)) => return (src, snap),
            Err(e) => assert!(start.elapsed() < Duration::from_secs(10), "{e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the source has seen `n` more events than at `from`.
fn wait_events(src: &mut KubeSource, from: u64, n: u64) {
    let start = Instant::now();
    while src.version().unwrap() < from + n {
        assert!(start.elapsed() < Duration::from_secs(10), "events did not arrive");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn pod_events_move_pods_in_place_and_other_events_ask_for_a_load() {
    let api = FakeApiServer::start();
    for crd in ces_api::all_crds() {
        api.install_crd(&serde_json::to_value(crd).unwrap());
    }
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}));
    api.apply(service("web"));
    for (name, ip) in [("a", "10.0.0.1"), ("b", "10.0.0.2")] {
        api.apply(pod(name, ip, "web"));
    }
    let dir = std::env::temp_dir().join(format!("ces-kube-update-{}", std::process::id()));
    let (mut src, mut snap) = start_and_load(&api, &dir);
    assert_eq!(snap.pods.len(), 2);

    // Pod events: one moves, one comes, one goes.
    let v = src.version().unwrap();
    api.apply(pod("a", "10.0.0.11", "web"));
    api.apply(pod("c", "10.0.0.3", "db"));
    assert!(api.delete("Pod", "shop", "b"));
    wait_events(&mut src, v, 3);
    let churn = src.update(&mut snap).unwrap().expect("pod events alone are followed");
    assert_eq!((churn.pods.len(), churn.endpoints.len()), (3, 0), "{churn:?}");
    let (fresh, _) = src.load().unwrap();
    assert_eq!(snap, fresh, "the moved snapshot equals a fresh load");

    // Nothing new: an empty update.
    assert_eq!(src.update(&mut snap).unwrap(), Some(Default::default()));

    // EndpointSlices: one comes, a pod moves and its slice follows, a second slice of the same Service comes (its
    // endpoints are both slices'), the first goes.
    let steps: Vec<(Vec<Value>, Option<&str>, usize, usize)> = vec![
        (vec![slice("web-1", &[("a", "10.0.0.11")])], None, 0, 1),
        (vec![pod("a", "10.0.0.21", "web"), slice("web-1", &[("a", "10.0.0.21")])], None, 1, 1),
        (vec![slice("web-2", &[("c", "10.0.0.3")])], None, 0, 1),
        (vec![], Some("web-1"), 0, 1),
    ];
    for (i, (objects, delete, pods, endpoints)) in steps.into_iter().enumerate() {
        let v = src.version().unwrap();
        let n = objects.len() as u64 + u64::from(delete.is_some());
        for o in objects {
            api.apply(o);
        }
        if let Some(name) = delete {
            assert!(api.delete("EndpointSlice", "shop", name));
        }
        wait_events(&mut src, v, n);
        let churn = src.update(&mut snap).unwrap().expect("pod and EndpointSlice events are followed");
        assert_eq!((churn.pods.len(), churn.endpoints.len()), (pods, endpoints), "step {i}: {churn:?}");
        let (fresh, _) = src.load().unwrap();
        assert_eq!(snap, fresh, "step {i}: the moved snapshot equals a fresh load");
    }
    let web = ("shop".to_string(), "web".to_string());
    let ips: Vec<String> = snap.endpoints[&web].iter().map(|e| e.ip.to_string()).collect();
    assert_eq!(ips, ["10.0.0.3"], "the endpoints of the slice that is left");

    // A slice that does not read cleanly (an address that is none) is left to a load, which reports it.
    let v = src.version().unwrap();
    api.apply(slice("web-3", &[("c", "10.0.0.300")]));
    wait_events(&mut src, v, 1);
    assert_eq!(src.update(&mut snap).unwrap(), None);
    let (fresh, _) = src.load().unwrap();
    assert!(
        fresh.diagnostics.iter().any(|d| d.object.as_ref().is_some_and(|o| o.name == "web-3")),
        "{:?}",
        fresh.diagnostics
    );
    snap = fresh;
    // While the snapshot holds a problem with the namespace's slices, their events are left to a load too.
    let v = src.version().unwrap();
    api.apply(slice("web-2", &[("c", "10.0.0.4")]));
    wait_events(&mut src, v, 1);
    assert_eq!(src.update(&mut snap).unwrap(), None);
    let (fresh, _) = src.load().unwrap();
    snap = fresh;

    // A Service changes: a load is needed, and until then every update says so.
    let v = src.version().unwrap();
    api.apply(service("db"));
    api.apply(pod("a", "10.0.0.12", "web"));
    wait_events(&mut src, v, 2);
    assert_eq!(src.update(&mut snap).unwrap(), None);
    assert_eq!(src.update(&mut snap).unwrap(), None);
    let (fresh, _) = src.load().unwrap();
    assert_eq!(fresh.pod("shop", "a").unwrap().ips, ["10.0.0.12".parse::<std::net::IpAddr>().unwrap()]);
    let mut snap = fresh;
    assert_eq!(src.update(&mut snap).unwrap(), Some(Default::default()), "a load starts afresh");
    let _ = std::fs::remove_dir_all(&dir);
}

/// On a cluster without the EndpointSlice API, the source watches Endpoints, and their events are followed the same way.
#[test]
fn endpoints_events_are_followed_where_the_cluster_has_no_endpoint_slices() {
    let api = FakeApiServer::start();
    api.with(|s| s.unserved.insert("EndpointSlice".into()));
    for crd in ces_api::all_crds() {
        api.install_crd(&serde_json::to_value(crd).unwrap());
    }
    let endpoints = |ips: &[(&str, &str)]| {
        let addresses: Vec<Value> = ips
            .iter()
            .map(|(pod, ip)| json!({"ip": ip, "targetRef": {"kind": "Pod", "namespace": "shop", "name": pod}}))
            .collect();
        json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "web", "namespace": "shop"},
               "subsets": [{"addresses": addresses}]})
    };
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}));
    api.apply(service("web"));
    api.apply(pod("a", "10.0.0.1", "web"));
    api.apply(endpoints(&[("a", "10.0.0.1")]));
    let dir = std::env::temp_dir().join(format!("ces-kube-update-ep-{}", std::process::id()));
    let (mut src, mut snap) = start_and_load(&api, &dir);
    let web = ("shop".to_string(), "web".to_string());
    assert_eq!(snap.endpoints[&web].len(), 1, "the Endpoints object is read");
    let v = src.version().unwrap();
    api.apply(pod("a", "10.0.0.7", "web"));
    api.apply(endpoints(&[("a", "10.0.0.7")]));
    wait_events(&mut src, v, 2);
    let churn = src.update(&mut snap).unwrap().expect("pod and Endpoints events are followed");
    assert_eq!((churn.pods.len(), churn.endpoints.len()), (1, 1), "{churn:?}");
    let (fresh, _) = src.load().unwrap();
    assert_eq!(snap, fresh, "the moved snapshot equals a fresh load");
    assert!(
        api.with(|s| s.requests.iter().any(|r| r.path.contains("endpointslices") && r.status == 404)),
        "the source asked for EndpointSlices first"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
