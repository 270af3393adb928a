//! The cluster snapshot: the objects CES reads, reduced to the fields it uses, immutable once built.
//!
//! Sources fill a [`SnapshotBuilder`]: [`manifests`] from YAML files (offline use, tests, `ces simulate`), and the
//! Kubernetes source (ces-kube) from watched objects through the same reading (`manifests::parse_object`). The builder rejects duplicates and records every problem as a [`Diagnostic`] that names
//! its object, so one bad object never keeps the others out.

pub mod manifests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ces_api::{
    ClusterEgressRuleSpec, ExternalIPRuleSpec, ExternalServiceSpec, NamespaceEgressRuleSpec, ServiceEgressRuleSpec,
};
use ces_model::{Diagnostic, ObjectRef, Severity};
use ipnet::IpNet;

/// The kube-ovn annotation holding a namespace's subnet CIDR(s), separated by `,` (dual stack) or `;` (several
/// subnets, current kube-ovn).
pub const OVN_CIDR_ANNOTATION: &str = "ovn.kubernetes.io/cidr";

pub type Labels = BTreeMap<String, String>;
/// `(namespace, name)`.
pub type Key = (String, String);

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
    /// Parsed from the `ovn.kubernetes.io/cidr` annotation.
    pub cidrs: Vec<IpNet>,
}

/// One ready endpoint address of a Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// The pod the endpoint says it is (`targetRef` of kind Pod), as `(namespace, name)`. Claimed by whoever wrote
    /// the Endpoints object, so the compiler checks it.
    pub pod: Option<Key>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// `status.podIPs`, or `status.podIP`. Empty for pods that have finished (their IPs are reused).
    pub ips: Vec<IpAddr>,
    /// The `Ready` condition is `True` (or, with no conditions reported, the pod is `Running`).
    pub ready: bool,
    /// `spec.hostNetwork`: the pod has its node's address, so it is never a CES source.
    pub host_network: bool,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// `spec.selector`; `None` for a Service without selector (endpoints managed by hand).
    pub selector: Option<Labels>,
}

/// A custom resource as CES sees it: identity, where it came from, and its spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Object<S> {
    pub namespace: Option<String>,
    pub name: String,
    pub uid: Option<String>,
    pub generation: Option<i64>,
    pub origin: Option<String>,
    pub spec: S,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Namespace>,
    /// Sorted by namespace, then name.
    pub pods: Vec<Pod>,
    pub services: BTreeMap<Key, Service>,
    /// Ready endpoints per Service, from Endpoints and EndpointSlices together, sorted. A Service with endpoint
    /// objects that list no ready address has an empty entry; a Service with no endpoint object has none.
    pub endpoints: BTreeMap<Key, Vec<Endpoint>>,
    pub external_services: BTreeMap<Key, Object<ExternalServiceSpec>>,
    pub cluster_rules: BTreeMap<String, Object<ClusterEgressRuleSpec>>,
    pub namespace_rules: BTreeMap<Key, Object<NamespaceEgressRuleSpec>>,
    pub service_rules: BTreeMap<Key, Object<ServiceEgressRuleSpec>>,
    pub external_ip_rules: BTreeMap<Key, Object<ExternalIPRuleSpec>>,
    /// Problems found while loading (malformed documents, duplicates, bad annotations).
    pub diagnostics: Vec<Diagnostic>,
}

impl Snapshot {
    /// Pods of one namespace (the slice of the sorted pod list).
    pub fn pods_in(&self, namespace: &str) -> &[Pod] {
        let start = self.pods.partition_point(|p| p.namespace.as_str() < namespace);
        let end = start + self.pods[start..].partition_point(|p| p.namespace == namespace);
        &self.pods[start..end]
    }

    /// Looks a pod up by namespace and name.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        let pods = self.pods_in(namespace);
        pods.binary_search_by(|p| p.name.as_str().cmp(name)).ok().map(|i| &pods[i])
    }

    /// Whether anything but a pod names namespace `ns`: a Namespace object, a Service or a namespaced CES object (what
    /// [`Snapshot::all_namespace_names`] counts, pods aside). Keep the two together.
    pub fn names_namespace_apart_from_pods(&self, ns: &str) -> bool {
        fn has<V>(m: &BTreeMap<Key, V>, ns: &str) -> bool {
            m.range((ns.to_string(), String::new())..).next().is_some_and(|((n, _), _)| n == ns)
        }
        self.namespaces.contains_key(ns)
            || has(&self.services, ns)
            || has(&self.namespace_rules, ns)
            || has(&self.service_rules, ns)
            || has(&self.external_services, ns)
            || has(&self.external_ip_rules, ns)
    }

    /// Every namespace named anywhere: by a Namespace object, a pod, a Service or a namespaced CES object.
    pub fn all_namespace_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.namespaces.keys().cloned().collect();
        names.extend(self.pods.iter().map(|p| p.namespace.clone()));
        names.extend(self.services.keys().map(|k| k.0.clone()));
        names.extend(self.namespace_rules.keys().map(|k| k.0.clone()));
        names.extend(self.service_rules.keys().map(|k| k.0.clone()));
        names.extend(self.external_services.keys().map(|k| k.0.clone()));
        names.extend(self.external_ip_rules.keys().map(|k| k.0.clone()));
        names.sort_unstable();
        names.dedup();
        names
    }
}

/// A pod as it was and as it is now (`None`: absent). Both name the same pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodChange {
    pub before: Option<Pod>,
    pub after: Option<Pod>,
}

impl PodChange {
    /// The namespace and name of the pod.
    pub fn key(&self) -> Option<(&str, &str)> {
        let p = self.after.as_ref().or(self.before.as_ref())?;
        Some((&p.namespace, &p.name))
    }
}

/// A Service's ready endpoints as they were and as they are now (`None`: the Service has no endpoint object). A
/// list is sorted and without duplicates, as the snapshot keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointsChange {
    pub service: Key,
    pub before: Option<Vec<Endpoint>>,
    pub after: Option<Vec<Endpoint>>,
}

/// What moved in a snapshot when only pods and Services' endpoints changed: the churn a source follows per event.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Churn {
    pub pods: Vec<PodChange>,
    pub endpoints: Vec<EndpointsChange>,
}

impl Churn {
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty() && self.endpoints.is_empty()
    }
}

impl Snapshot {
    fn pod_position(&self, namespace: &str, name: &str) -> Result<usize, usize> {
        self.pods.binary_search_by(|p| (p.namespace.as_str(), p.name.as_str()).cmp(&(namespace, name)))
    }

    /// Whether two snapshots hold the same objects, pods and endpoints aside.
    pub fn same_but_churn(&self, other: &Snapshot) -> bool {
        self.namespaces == other.namespaces
            && self.services == other.services
            && self.external_services == other.external_services
            && self.cluster_rules == other.cluster_rules
            && self.namespace_rules == other.namespace_rules
            && self.service_rules == other.service_rules
            && self.external_ip_rules == other.external_ip_rules
            && self.diagnostics == other.diagnostics
    }

    /// The churn from `self` to `other`, or `None` when anything else differs.
    pub fn churn(&self, other: &Snapshot) -> Option<Churn> {
        self.same_but_churn(other)
            .then(|| Churn { pods: self.pod_changes(other), endpoints: self.endpoint_changes(other) })
    }

    /// The endpoint changes from `self` to `other`: one walk over both maps.
    pub fn endpoint_changes(&self, other: &Snapshot) -> Vec<EndpointsChange> {
        endpoint_changes_between(&self.endpoints, &other.endpoints)
    }

    /// Applies churn in place: its pod changes ([`Snapshot::apply_pod_changes`]) and its endpoint changes, all or none.
    /// Refused, with the snapshot unchanged, when a pod change is refused, a Service's endpoints change twice, an
    /// endpoint change's `before` is not what the snapshot holds, or its `after` is not sorted and without duplicates.
    pub fn apply_churn(&mut self, churn: &Churn) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        for c in &churn.endpoints {
            let (ns, svc) = &c.service;
            if !seen.insert(&c.service) {
                return Err(format!("the endpoints of Service {ns}/{svc} change twice in one update"));
            }
            if self.endpoints.get(&c.service) != c.before.as_ref() {
                return Err(format!("the endpoints of Service {ns}/{svc} are not what the update expects"));
            }
            if c.after.as_ref().is_some_and(|eps| eps.windows(2).any(|w| w[0] >= w[1])) {
                return Err(format!("the endpoints of Service {ns}/{svc} are not sorted, or listed twice"));
            }
        }
        self.apply_pod_changes(&churn.pods)?;
        for c in &churn.endpoints {
            match &c.after {
                Some(eps) => self.endpoints.insert(c.service.clone(), eps.clone()),
                None => self.endpoints.remove(&c.service),
            };
        }
        Ok(())
    }

    /// The pod changes from `self` to `other`: one walk over both sorted pod lists, copying only what differs.
    pub fn pod_changes(&self, other: &Snapshot) -> Vec<PodChange> {
        fn keyed(pods: &[Pod]) -> impl Iterator<Item = ((&str, &str), &Pod)> {
            pods.iter().map(|p| ((p.namespace.as_str(), p.name.as_str()), p))
        }
        differences(keyed(&self.pods), keyed(&other.pods))
            .into_iter()
            .map(|(_, before, after)| PodChange { before: before.cloned(), after: after.cloned() })
            .collect()
    }

    /// Applies pod changes in place, keeping the pods sorted. Refused, with the snapshot unchanged, when a change
    /// names two pods, a `before` is not what the snapshot holds, an `after` would define a pod twice, or two changes
    /// name the same pod.
    pub fn apply_pod_changes(&mut self, changes: &[PodChange]) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        for c in changes {
            let (ns, name) = c.key().ok_or("a pod change without a pod")?;
            if let (Some(b), Some(a)) = (&c.before, &c.after)
                && (b.namespace != a.namespace || b.name != a.name)
            {
                return Err(format!("a pod change names {}/{} and {}/{}", b.namespace, b.name, a.namespace, a.name));
            }
            if !seen.insert((ns, name)) {
                return Err(format!("pod {ns}/{name} changes twice in one update"));
            }
            let held = self.pod(ns, name);
            if held != c.before.as_ref() {
                return Err(format!("pod {ns}/{name} is not what the update expects"));
            }
        }
        for c in changes {
            let (ns, name) = c.key().expect("checked");
            match (self.pod_position(ns, name), &c.after) {
                (Ok(i), Some(p)) => self.pods[i] = p.clone(),
                (Ok(i), None) => {
                    self.pods.remove(i);
                }
                (Err(i), Some(p)) => self.pods.insert(i, p.clone()),
                (Err(_), None) => {}
            }
        }
        Ok(())
    }
}

/// The entries that differ between two sequences sorted by key, as `(key, before, after)`: one walk over both.
fn differences<'a, K: Ord, V: PartialEq + 'a>(
    a: impl IntoIterator<Item = (K, &'a V)>,
    b: impl IntoIterator<Item = (K, &'a V)>,
) -> Vec<(K, Option<&'a V>, Option<&'a V>)> {
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    let mut out = Vec::new();
    loop {
        let take_a = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((ka, x)), Some((kb, y))) if ka == kb => {
                let (x, y) = (*x, *y);
                let (k, _) = a.next().expect("peeked");
                b.next();
                if x != y {
                    out.push((k, Some(x), Some(y)));
                }
                continue;
            }
            (Some((ka, _)), kb) => kb.is_none_or(|(kb, _)| ka < kb),
            (None, Some(_)) => false,
        };
        if take_a {
            let (k, x) = a.next().expect("peeked");
            out.push((k, Some(x), None));
        } else {
            let (k, y) = b.next().expect("peeked");
            out.push((k, None, Some(y)));
        }
    }
    out
}

/// The changes between two runs of Services' endpoints, each sorted by Service (a snapshot's map, or a part of it).
pub fn endpoint_changes_between<'a>(
    before: impl IntoIterator<Item = (&'a Key, &'a Vec<Endpoint>)>,
    after: impl IntoIterator<Item = (&'a Key, &'a Vec<Endpoint>)>,
) -> Vec<EndpointsChange> {
    differences(before, after)
        .into_iter()
        .map(|(service, before, after)| EndpointsChange {
            service: service.clone(),
            before: before.cloned(),
            after: after.cloned(),
        })
        .collect()
}

/// The reason code of an object defined twice.
pub const DUPLICATE_NAME: &str = "DuplicateName";

impl Snapshot {
    /// Refuses a snapshot with objects defined more than once: which definition counts would depend on file order.
    /// The error lists every duplicate with both places.
    pub fn refuse_duplicates(&self) -> Result<(), String> {
        let dups: Vec<String> =
            self.diagnostics.iter().filter(|d| d.reason == DUPLICATE_NAME).map(|d| d.to_string()).collect();
        if dups.is_empty() {
            Ok(())
        } else {
            Err(format!("objects defined more than once (remove one of each):\n{}", dups.join("\n")))
        }
    }
}

/// Collects objects into a [`Snapshot`], rejecting duplicates.
#[derive(Default)]
pub struct SnapshotBuilder {
    snap: Snapshot,
    pod_origin: BTreeMap<Key, Option<String>>,
}

fn duplicate(object: ObjectRef, origin: Option<String>, first: Option<&String>) -> Diagnostic {
    let message = match first {
        Some(f) => format!("defined more than once; the first definition, at {f}, is kept"),
        None => "defined more than once; the first definition is kept".to_string(),
    };
    Diagnostic { severity: Severity::Error, object: Some(object), origin, reason: DUPLICATE_NAME.into(), message }
}

macro_rules! add_object {
    ($fn:ident, $field:ident, $spec:ty, $kind:literal, namespaced) => {
        pub fn $fn(&mut self, obj: Object<$spec>) {
            let ns = obj.namespace.clone().unwrap_or_else(|| "default".to_string());
            let key = (ns.clone(), obj.name.clone());
            if let Some(first) = self.snap.$field.get(&key) {
                let d =
                    duplicate(ObjectRef::new($kind, Some(&ns), &obj.name), obj.origin.clone(), first.origin.as_ref());
                self.snap.diagnostics.push(d);
                return;
            }
            self.snap.$field.insert(key, Object { namespace: Some(ns), ..obj });
        }
    };
}

impl SnapshotBuilder {
    pub fn new() -> SnapshotBuilder {
        SnapshotBuilder::default()
    }

    pub fn diagnostic(&mut self, d: Diagnostic) {
        self.snap.diagnostics.push(d);
    }

    pub fn add_namespace(&mut self, ns: Namespace, origin: Option<String>) {
        if self.snap.namespaces.contains_key(&ns.name) {
            self.diagnostic(duplicate(ObjectRef::new("Namespace", None, &ns.name), origin, None));
            return;
        }
        self.snap.namespaces.insert(ns.name.clone(), ns);
    }

    pub fn add_pod(&mut self, pod: Pod, origin: Option<String>) {
        let key = (pod.namespace.clone(), pod.name.clone());
        if let Some(first) = self.pod_origin.get(&key) {
            let d = duplicate(ObjectRef::new("Pod", Some(&pod.namespace), &pod.name), origin, first.as_ref());
            self.diagnostic(d);
            return;
        }
        self.pod_origin.insert(key, origin);
        self.snap.pods.push(pod);
    }

    pub fn add_service(&mut self, svc: Service, origin: Option<String>) {
        let key = (svc.namespace.clone(), svc.name.clone());
        if self.snap.services.contains_key(&key) {
            self.diagnostic(duplicate(ObjectRef::new("Service", Some(&svc.namespace), &svc.name), origin, None));
            return;
        }
        self.snap.services.insert(key, svc);
    }

    /// Adds ready endpoints of a Service (from an Endpoints object or one EndpointSlice).
    pub fn add_endpoints(&mut self, namespace: &str, service: &str, ready: impl IntoIterator<Item = Endpoint>) {
        self.snap.endpoints.entry((namespace.to_string(), service.to_string())).or_default().extend(ready);
    }

    add_object!(add_external_service, external_services, ExternalServiceSpec, "ExternalService", namespaced);
    add_object!(add_namespace_rule, namespace_rules, NamespaceEgressRuleSpec, "NamespaceEgressRule", namespaced);
    add_object!(add_service_rule, service_rules, ServiceEgressRuleSpec, "ServiceEgressRule", namespaced);
    add_object!(add_external_ip_rule, external_ip_rules, ExternalIPRuleSpec, "ExternalIPRule", namespaced);

    pub fn add_cluster_rule(&mut self, obj: Object<ClusterEgressRuleSpec>) {
        if let Some(first) = self.snap.cluster_rules.get(&obj.name) {
            let d = duplicate(
                ObjectRef::new("ClusterEgressRule", None, &obj.name),
                obj.origin.clone(),
                first.origin.as_ref(),
            );
            self.diagnostic(d);
            return;
        }
        self.snap.cluster_rules.insert(obj.name.clone(), Object { namespace: None, ..obj });
    }

    pub fn build(mut self) -> Snapshot {
        self.snap.pods.sort_unstable_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for ips in self.snap.endpoints.values_mut() {
            ips.sort_unstable();
            ips.dedup();
        }
        self.snap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str) -> Pod {
        Pod { namespace: ns.into(), name: name.into(), ..Default::default() }
    }

    #[test]
    fn pods_are_found_by_namespace_and_name() {
        let mut b = SnapshotBuilder::new();
        for (ns, n) in [("b", "x"), ("a", "z"), ("a", "y"), ("c", "w")] {
            b.add_pod(pod(ns, n), None);
        }
        let s = b.build();
        let names: Vec<_> = s.pods_in("a").iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["y", "z"]);
        assert!(s.pods_in("nope").is_empty());
        assert!(s.pod("b", "x").is_some());
        assert!(s.pod("b", "y").is_none());
    }

    #[test]
    fn pod_changes_name_what_was_removed_added_and_changed() {
        let snap = |pods: &[(&str, &str, bool)]| {
            let mut b = SnapshotBuilder::new();
            for (ns, n, ready) in pods {
                b.add_pod(Pod { ready: *ready, ..pod(ns, n) }, None);
            }
            b.build()
        };
        let before = snap(&[("a", "x", true), ("a", "y", true), ("b", "z", true), ("c", "w", true)]);
        let after = snap(&[("a", "y", false), ("b", "a", true), ("b", "z", true), ("d", "v", true)]);
        let changes = before.pod_changes(&after);
        let got: Vec<(Option<&str>, Option<&str>, Option<bool>)> = changes
            .iter()
            .map(|c| {
                (
                    c.before.as_ref().map(|p| p.name.as_str()),
                    c.after.as_ref().map(|p| p.name.as_str()),
                    c.after.as_ref().map(|p| p.ready),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (Some("x"), None, None),
                (Some("y"), Some("y"), Some(false)),
                (None, Some("a"), Some(true)),
                (Some("w"), None, None),
                (None, Some("v"), Some(true)),
            ]
        );
        let mut moved = before.clone();
        moved.apply_pod_changes(&changes).unwrap();
        assert_eq!(moved, after);
    }

    #[test]
    fn churn_names_endpoint_changes_and_is_applied_whole_or_not_at_all() {
        let ep = |ip: &str| Endpoint { ip: ip.parse().unwrap(), pod: None };
        let key = |svc: &str| ("ns".to_string(), svc.to_string());
        let snap = |eps: &[(&str, &[&str])], pods: &[&str]| {
            let mut b = SnapshotBuilder::new();
            for (svc, ips) in eps {
                b.add_endpoints("ns", svc, ips.iter().map(|i| ep(i)));
            }
            for p in pods {
                b.add_pod(pod("ns", p), None);
            }
            b.build()
        };
        let before = snap(&[("a", &["10.0.0.1"]), ("b", &["10.0.0.2"]), ("c", &[])], &["x"]);
        let after = snap(&[("a", &["10.0.0.1"]), ("b", &["10.0.0.3", "10.0.0.2"]), ("d", &[])], &["y"]);
        let churn = before.churn(&after).expect("only pods and endpoints differ");
        let got: Vec<(&str, Option<usize>, Option<usize>)> = churn
            .endpoints
            .iter()
            .map(|c| (c.service.1.as_str(), c.before.as_ref().map(Vec::len), c.after.as_ref().map(Vec::len)))
            .collect();
        assert_eq!(got, [("b", Some(1), Some(2)), ("c", Some(0), None), ("d", None, Some(0))]);
        assert_eq!(churn.pods.len(), 2);
        let mut moved = before.clone();
        moved.apply_churn(&churn).unwrap();
        assert_eq!(moved, after);

        // Refused, and nothing applied: a stale `before`, an unsorted `after`, a Service twice, a stale pod.
        let change = |svc: &str, before: Option<Vec<Endpoint>>, after: Option<Vec<Endpoint>>| EndpointsChange {
            service: key(svc),
            before,
            after,
        };
        let stale = Churn { pods: vec![], endpoints: vec![change("a", Some(vec![ep("10.0.0.9")]), None)] };
        let unsorted = Churn {
            pods: vec![],
            endpoints: vec![change("a", Some(vec![ep("10.0.0.1")]), Some(vec![ep("10.0.0.5"), ep("10.0.0.4")]))],
        };
        let twice = Churn {
            pods: vec![],
            endpoints: vec![change("a", Some(vec![ep("10.0.0.1")]), None), change("a", None, Some(vec![]))],
        };
        let stale_pod = Churn {
            pods: vec![PodChange { before: Some(pod("ns", "zz")), after: None }],
            endpoints: vec![change("a", Some(vec![ep("10.0.0.1")]), None)],
        };
        let mut s = before.clone();
        for bad in [stale, unsorted, twice, stale_pod] {
            assert!(s.apply_churn(&bad).is_err(), "{bad:?}");
            assert_eq!(s, before);
        }
        assert!(before.churn(&Snapshot { services: after.services.clone(), ..after.clone() }).is_some());
        let mut other = after.clone();
        other.namespaces.insert("ns".into(), Namespace { name: "ns".into(), ..Default::default() });
        assert_eq!(before.churn(&other), None, "anything else differs: no churn");
    }

    #[test]
    fn duplicates_keep_the_first_and_report_both_places() {
        let mut b = SnapshotBuilder::new();
        let obj = |origin: &str| Object {
            namespace: Some("ns".into()),
            name: "e".into(),
            uid: None,
            generation: None,
            origin: Some(origin.into()),
            spec: ExternalServiceSpec { addresses: vec![origin.into()], ports: vec![] },
        };
        b.add_external_service(obj("a.yaml:1"));
        b.add_external_service(obj("b.yaml:7"));
        let s = b.build();
        assert_eq!(s.external_services.len(), 1);
        assert_eq!(s.external_services.values().next().unwrap().spec.addresses, ["a.yaml:1"]);
        let d = &s.diagnostics[0];
        assert_eq!(d.reason, "DuplicateName");
        assert_eq!(d.origin.as_deref(), Some("b.yaml:7"));
        assert!(d.message.contains("a.yaml:1"), "{}", d.message);
    }
}
