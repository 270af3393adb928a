//! Two clusters side by side on one BIG-IP (docs/as3.md, "Clusters side by side"): each declares and churns its own
//! objects in the shared Common partition and in a tenant both configs name; neither removes or overwrites the
//! other's, and concurrent declarations never lose an update (AS3's optimistic lock, read-merge-retry on conflict).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};

use ces_as3::shared::owner;
use ces_as3::{As3Backend, render};
use ces_bigip_double::Double;
use ces_model::PolicyModel;
use ces_sync::Backend;
use serde_json::{Value, json};

fn backend(d: &Double) -> As3Backend {
    backend_at(&d.url())
}

fn backend_at(url: &str) -> As3Backend {
    common::backend_at(url, common::schema_dir())
}

fn double() -> Double {
    let d = Double::start(common::schema_dir());
    d.with(|s| {
        s.objects.insert("/mgmt/tm/net/route-domain/~shared1~rd5".into(), json!({"name": "rd5", "id": 5}));
        s.objects.insert("/mgmt/tm/net/route-domain/~Common~0".into(), json!({"name": "0", "id": 0}));
    });
    d
}

/// Cluster `cluster`'s policy at `step`: cluster rules r0..r5 of which a third come and go with the step (so each
/// step declares Common anew), and a namespace rule in tenant shared1 while `shared1` is in its config.
fn model(cluster: &str, step: usize, shared1: bool) -> PolicyModel {
    let mut m = String::new();
    for j in 0..6 {
        if (j + step).is_multiple_of(3) {
            continue;
        }
        m.push_str(&format!(
            "apiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {{name: ext{j}, namespace: kube-system}}\n\
             spec: {{addresses: [203.0.113.{j}], ports: [{{name: p, protocol: TCP, port: \"{}\"}}]}}\n---\n\
             apiVersion: kubeovn.io/v1alpha1\nkind: ClusterEgressRule\nmetadata: {{name: r{j}}}\n\
             spec: {{action: accept, externalServices: [ext{j}]}}\n---\n",
            8000 + step
        ));
    }
    m.push_str(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: team, annotations: {ovn.kubernetes.io/cidr: 10.66.0.0/16}}\n---\n\
         apiVersion: kubeovn.io/v1alpha1\nkind: ExternalService\nmetadata: {name: db, namespace: team}\n\
         spec: {addresses: [198.51.100.7], ports: [{name: p, protocol: TCP, port: \"5432\"}]}\n---\n\
         apiVersion: kubeovn.io/v1alpha1\nkind: NamespaceEgressRule\nmetadata: {name: to-db, namespace: team}\n\
         spec: {action: accept, externalServices: [db]}\n",
    );
    let tenants = if shared1 {
        "tenant: [{name: Common}, {name: shared1, namespaces: [team], routeDomain: {id: 5, name: rd5}}]"
    } else {
        "tenant: [{name: Common}]"
    };
    let config = format!(
        "clusterName: {cluster}\nmasterCluster: east\nisSupportRouteDomain: true\nschemaVersion: \"3.56.0\"\n{tenants}\n"
    );
    let model = common::compile(&m, &config);
    assert!(model.errors().next().is_none(), "{:?}", model.diagnostics);
    model
}

/// The objects of `cluster` in a tenant declaration, by name.
fn owned(decl: &Value, cluster: &str) -> BTreeMap<String, Value> {
    let shared = decl["Shared"].as_object().into_iter().flatten();
    shared.filter(|(_, o)| owner(o) == Some(cluster)).map(|(n, o)| (n.clone(), o.clone())).collect()
}

/// What `model` declares of its own in `tenant`.
fn own_objects(model: &PolicyModel, tenant: &str) -> BTreeMap<String, Value> {
    let decl = render(model, jiff::Timestamp::now()).declarations().remove(tenant).unwrap_or(Value::Null);
    owned(&decl, &model.settings.cluster_name)
}

#[test]
fn two_clusters_churning_at_once_in_common_never_lose_an_update() {
    const STEPS: usize = 24;
    let d = double();
    let barrier = Arc::new(Barrier::new(2));
    // (two waits: west declares after east, then both churn together)
    let threads: Vec<_> = ["east", "west"]
        .into_iter()
        .map(|cluster| {
            let (url, state, barrier) = (d.url(), d.state.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut b = backend_at(&url);
                // A tenant's first declaration has no lock key to send (AS3 has no create-if-absent): the
                // clusters declare theirs one after the other, then churn at once.
                if cluster == "west" {
                    barrier.wait();
                }
                b.apply(&model(cluster, 0, true), false).unwrap();
                if cluster == "east" {
                    barrier.wait();
                }
                barrier.wait();
                for step in 1..STEPS {
                    let m = model(cluster, step, true);
                    b.apply(&m, false).unwrap_or_else(|e| panic!("{cluster} step {step}: {e}"));
                    // Right after its pass, the device holds exactly this cluster's objects of this step: the other
                    // cluster's declarations meanwhile merged them, or were refused and merged them again.
                    for tenant in ["Common", "shared1"] {
                        let on_device = owned(&state.lock().unwrap().tenants[tenant], cluster);
                        assert_eq!(on_device, own_objects(&m, tenant), "{cluster} step {step}: /{tenant}");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Both clusters' last steps, side by side; the shared policy lists east's rule lists, then west's.
    let common = d.with(|s| s.tenants["Common"].clone());
    for cluster in ["east", "west"] {
        assert_eq!(owned(&common, cluster), own_objects(&model(cluster, STEPS - 1, true), "Common"));
    }
    let entries: Vec<&str> = common["Shared"]["east_system_global_policy"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["use"].as_str().unwrap())
        .collect();
    assert_eq!(entries.len(), 8, "{entries:?}");
    assert!(entries[..4].iter().all(|e| e.contains("/east_")) && entries[4..].iter().all(|e| e.contains("/west_")));
    // The declarations did collide: some were refused for a changed lock key and merged again.
    let conflicts = d.with(|s| s.requests.iter().filter(|r| r.method == "POST" && r.status == 422).count());
    println!("{conflicts} declarations refused for a changed lock key and sent again");
    assert!(conflicts > 0, "the two clusters never collided: the test did not test the lock");
}

#[test]
fn a_cluster_leaving_a_shared_tenant_takes_only_its_own_objects_and_the_last_one_deletes_it() {
    let d = double();
    let (mut east, mut west) = (backend(&d), backend(&d));
    east.apply(&model("east", 0, true), false).unwrap();
    west.apply(&model("west", 0, true), false).unwrap();
    let both = d.with(|s| s.tenants["shared1"].clone());
    assert!(!owned(&both, "east").is_empty() && !owned(&both, "west").is_empty());
    // East's config no longer names shared1: east's objects go, west's stay, the tenant stays.
    east.apply(&model("east", 0, false), false).unwrap();
    let left = d.with(|s| s.tenants["shared1"].clone());
    assert!(owned(&left, "east").is_empty(), "{left}");
    assert_eq!(owned(&left, "west"), owned(&both, "west"));
    let policy = left["Shared"]["east_ns_policy_rd5"]["rules"].to_string();
    assert!(!policy.contains("east_ns_team") && policy.contains("west_ns_team"), "{policy}");
    // West is unchanged by it: a pass finds nothing to do.
    let writes = d.with(|s| s.writes().len());
    west.apply(&model("west", 0, true), true).unwrap();
    assert_eq!(d.with(|s| s.writes().len()), writes, "{:?}", d.with(|s| s.writes()[writes..].to_vec()));
    // West leaves too: nobody's objects are left, the tenant is deleted.
    west.apply(&model("west", 0, false), false).unwrap();
    assert!(d.with(|s| !s.tenants.contains_key("shared1")));
    assert!(d.with(|s| s.writes().contains(&"DELETE /mgmt/shared/appsvcs/declare/shared1".to_string())));
}

/// `model` for AS3 `version`.
fn at_version(mut m: PolicyModel, version: &str) -> PolicyModel {
    m.settings.schema_version = version.into();
    m
}

#[test]
fn a_cluster_declaring_from_an_old_read_merges_the_others_changes_under_every_version() {
    // East read Common at its last pass; west declared since. East's next declaration starts from what it read:
    // under 3.56 its lock key is stale and the device refuses it (east reads, merges, sends again); under 3.29
    // Common takes no lock key, and east reads Common again right before it declares. Either way west's objects stay.
    for version in ["3.29.0", "3.56.0"] {
        let d = double();
        let (mut east, mut west) = (backend(&d), backend(&d));
        east.apply(&at_version(model("east", 0, false), version), false).unwrap();
        west.apply(&at_version(model("west", 0, false), version), false).unwrap();
        west.apply(&at_version(model("west", 1, false), version), false).unwrap();
        let west_now = d.with(|s| owned(&s.tenants["Common"], "west"));
        east.apply(&at_version(model("east", 1, false), version), false).unwrap();
        let common = d.with(|s| s.tenants["Common"].clone());
        assert_eq!(owned(&common, "west"), west_now, "AS3 {version}: west's objects were lost");
        assert_eq!(owned(&common, "east"), own_objects(&at_version(model("east", 1, false), version), "Common"));
        let refused = d.with(|s| s.requests.iter().filter(|r| r.method == "POST" && r.status == 422).count());
        assert_eq!(refused, usize::from(version == "3.56.0"), "AS3 {version}");
        // A declaration sent without a lock (a tenant's first, or Common under 3.29) can still overwrite another
        // cluster's at the same instant: here west's objects are lost as such a race would lose them. East is not
        // told; west's next full pass (the resync) reads Common, merges and declares them again.
        d.with(|s| {
            let shared = s.tenants.get_mut("Common").unwrap()["Shared"].as_object_mut().unwrap();
            shared.retain(|_, o| owner(o) != Some("west"));
        });
        west.apply(&at_version(model("west", 1, false), version), false).unwrap();
        assert!(d.with(|s| owned(&s.tenants["Common"], "west").is_empty()), "a pass that is not full trusts its read");
        west.apply(&at_version(model("west", 1, false), version), true).unwrap();
        let common = d.with(|s| s.tenants["Common"].clone());
        assert_eq!(owned(&common, "west"), west_now, "AS3 {version}: the resync repairs");
        assert!(!owned(&common, "east").is_empty());
    }
}
