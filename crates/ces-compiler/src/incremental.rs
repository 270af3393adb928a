//! Churn without a whole compile: [`recompile_churn`] patches a model into the one [`crate::compile`] would give
//! after pods and Services' endpoints changed, touching only the sets built from the changed pods' namespaces, the
//! sets of the Services whose endpoints are judged again, and the tenants' member sets.
//!
//! It follows a change only as far as it can prove that nothing else moves, and otherwise says `None` (the caller
//! then compiles whole). What it requires of each changed pod (before and after):
//! - none of its addresses lies in a kube-ovn subnet of another namespace of its tenant that its own namespace's
//!   subnets do not overlap (that would change which subnets are shared, and with whom; namespaces on kube-ovn's
//!   default subnet all overlap it, so their pods pass), and its namespace has no subnet of a single address (which
//!   could not be told apart from a pod's address in the namespace's set);
//! - its namespace is named by something else too, or stays named by pods (the tenants' namespace lists stay).
//!
//! Endpoints are judged again, before and after, exactly as the compiler judges them, for every Service whose
//! endpoints changed and every Service with an endpoint at an address that changed in its tenant (a changed pod's
//! address, a changed endpoint's address). A Service whose set is in the model must keep its refusals (they are
//! warnings on the rules that use it).
//!
//! Every set it recomputes must keep being empty or non-empty, so no "matches nothing yet" warning comes or goes.
//!
//! Property tests (`tests/incremental.rs`) hold the result equal to a whole compile on generated churn.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ces_config::CesConfig;
use ces_model::{AddressSet, PodDelta, PodEntry, PolicyModel, TenantRef};
use ces_snapshot::{Churn, Endpoint, EndpointsChange, Key, Pod, Snapshot};
use ipnet::IpNet;

use crate::{
    Claims, endpoint_refusal, is_source, namespace_pods_set, namespace_set, overlaps, pod_entry, pod_nets,
    pod_selector_set, selected_pod_nets, service_pod_nets, service_set, tenant_set,
};

/// A set of the same tenant as `old`, with these addresses.
fn like(old: &AddressSet, addresses: Vec<IpNet>) -> AddressSet {
    AddressSet::new(&TenantRef { name: old.tenant.clone(), route_domain: old.route_domain }, addresses)
}

/// A Service's endpoints judged: the addresses CES trusts, and why it refuses the others.
#[derive(Default)]
struct Trust {
    trusted: Vec<IpNet>,
    refused: Vec<String>,
}

/// Patches `model` (compiled from the snapshot before `churn`) into the model of `snap` (the snapshot after it).
/// Returns what changed, or `None`, with `model` untouched, when the churn reaches further than this follows.
pub fn recompile_churn(
    model: &mut PolicyModel,
    snap: &Snapshot,
    config: &CesConfig,
    churn: &Churn,
) -> Option<PodDelta> {
    let changes = &churn.pods;
    let kube_ovn = config.cni_type() == ces_config::DEFAULT_CNI_TYPE;
    // The changed addresses, by the namespace of the pod that has or had them.
    let mut by_namespace: BTreeMap<&str, BTreeSet<IpAddr>> = BTreeMap::new();
    let mut keys = BTreeSet::new();
    for c in changes {
        let (ns, name) = c.key()?;
        if !keys.insert((ns, name)) {
            return None;
        }
        let mine = by_namespace.entry(ns).or_default();
        for p in c.before.iter().chain(&c.after) {
            // A hostNetwork pod's addresses are its node's: which endpoints they refuse is left to a whole compile.
            if (p.namespace.as_str(), p.name.as_str()) != (ns, name) || p.host_network {
                return None;
            }
            mine.extend(p.ips.iter().copied());
        }
    }
    let namespaces: BTreeSet<&str> = by_namespace.keys().copied().collect();
    let in_model = |ns: &str| model.tenants.iter().any(|t| t.namespaces.iter().any(|n| n == ns));
    for (ns, mine) in &by_namespace {
        let tenant = config.tenant_of(ns);
        let listed = config.tenant.iter().any(|t| t.namespaces.iter().any(|n| n == ns));
        if in_model(ns) != (listed || snap.names_namespace_apart_from_pods(ns) || !snap.pods_in(ns).is_empty()) {
            return None;
        }
        if kube_ovn {
            let own: &[IpNet] = snap.namespaces.get(*ns).map_or(&[], |n| &n.cidrs);
            if own.iter().any(|c| c.prefix_len() == c.max_prefix_len()) {
                return None;
            }
            // A pod in another namespace's subnet makes that subnet shared, unless its own namespace's subnet
            // overlaps it already (as every namespace on kube-ovn's default subnet does).
            // (The tenant is asked last: `tenant_of` reads the config's namespace lists.)
            for n in snap.namespaces.values().filter(|n| n.name != **ns) {
                if n.cidrs.iter().any(|c| mine.iter().any(|a| c.contains(a)) && !own.iter().any(|o| overlaps(o, c)))
                    && config.tenant_of(&n.name) == tenant
                {
                    return None;
                }
            }
        }
    }
    // The endpoint changes: each Service once, and the snapshot holds what they say. Those of Services the snapshot
    // does not have change nothing (the compiler reads the endpoints of Services only).
    let mut endpoint_changes: BTreeMap<&Key, &EndpointsChange> = BTreeMap::new();
    for c in &churn.endpoints {
        if endpoint_changes.insert(&c.service, c).is_some() || snap.endpoints.get(&c.service) != c.after.as_ref() {
            return None;
        }
    }
    endpoint_changes.retain(|k, _| snap.services.contains_key(*k));
    let before_endpoints =
        |key: &Key| endpoint_changes.get(key).map_or_else(|| snap.endpoints.get(key), |c| c.before.as_ref());

    // The addresses that changed in each tenant: changed pods' addresses, changed endpoints' addresses.
    let mut changed_in_tenant: BTreeSet<(&str, IpAddr)> =
        by_namespace.iter().flat_map(|(ns, ips)| ips.iter().map(|ip| (config.tenant_of(ns), *ip))).collect();
    for (key, c) in &endpoint_changes {
        let tenant = config.tenant_of(&key.0);
        changed_in_tenant.extend(c.before.iter().chain(&c.after).flatten().map(|ep| (tenant, ep.ip)));
    }
    // The Services judged again: those whose endpoints changed, and those with an endpoint at a changed address of
    // their tenant (an endpoint is judged by the pods of its own tenant; one elsewhere keeps its verdict). Every
    // endpoint is visited: its address is looked up first (in a sorted list of the few that changed), its tenant only
    // when the address changed.
    let mut addresses: Vec<IpAddr> = changed_in_tenant.iter().map(|(_, ip)| *ip).collect();
    addresses.sort_unstable();
    addresses.dedup();
    let has = |addresses: &[IpAddr], ip: &IpAddr| addresses.binary_search(ip).is_ok();
    let mut judged: BTreeSet<&Key> = endpoint_changes.keys().copied().collect();
    for (key, eps) in &snap.endpoints {
        let mut at = eps.iter().filter(|ep| has(&addresses, &ep.ip)).peekable();
        if at.peek().is_none() || !snap.services.contains_key(key) {
            continue;
        }
        let tenant = config.tenant_of(&key.0);
        if at.any(|ep| changed_in_tenant.contains(&(tenant, ep.ip))) {
            judged.insert(key);
        }
    }
    // Source pods at the changed addresses and at every endpoint address of the judged Services, before and after,
    // in snapshot order: one pass over the pods.
    for key in &judged {
        addresses.extend(before_endpoints(key).into_iter().chain(snap.endpoints.get(*key)).flatten().map(|ep| ep.ip));
    }
    addresses.sort_unstable();
    addresses.dedup();
    let mut after_at: BTreeMap<IpAddr, Vec<&Pod>> = BTreeMap::new();
    for p in snap.pods.iter() {
        if p.host_network {
            // A node's address among the judged ones: left to a whole compile.
            if p.ips.iter().any(|ip| has(&addresses, ip)) {
                return None;
            }
            continue;
        }
        if !is_source(p) {
            continue;
        }
        for ip in p.ips.iter().filter(|ip| has(&addresses, ip)) {
            after_at.entry(*ip).or_default().push(p);
        }
    }
    let changed_key = |p: &Pod| keys.contains(&(p.namespace.as_str(), p.name.as_str()));
    let before_at = |ip: IpAddr| -> Vec<&Pod> {
        let mut v: Vec<&Pod> = after_at.get(&ip).into_iter().flatten().copied().filter(|p| !changed_key(p)).collect();
        v.extend(changes.iter().filter_map(|c| c.before.as_ref()).filter(|p| is_source(p) && p.ips.contains(&ip)));
        v.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        v
    };
    let after_pods = |ip: IpAddr| after_at.get(&ip).cloned().unwrap_or_default();
    // Addresses of judged endpoints that are no source pod's (before or after): whether the config gives them to a
    // namespace or another namespace lists them too (contested) is left to a whole compile.
    let given = config.endpoint_addresses();
    let mut no_pod: BTreeMap<IpAddr, BTreeSet<&str>> = BTreeMap::new();
    for key in &judged {
        let tenant = config.tenant_of(&key.0);
        let theirs = |pods: &[&Pod]| pods.iter().any(|p| config.tenant_of(&p.namespace) == tenant);
        for ep in before_endpoints(key).into_iter().chain(snap.endpoints.get(*key)).flatten() {
            if theirs(&after_pods(ep.ip)) || theirs(&before_at(ep.ip)) {
                continue;
            }
            if given.iter().any(|(n, _)| n.contains(&ep.ip)) {
                return None;
            }
            no_pod.entry(ep.ip).or_default().insert(key.0.as_str());
        }
    }
    if !no_pod.is_empty() {
        let befores = endpoint_changes.iter().filter_map(|(k, c)| c.before.as_ref().map(|e| (*k, e)));
        for (key, eps) in snap.endpoints.iter().chain(befores) {
            for ep in eps {
                if no_pod.get(&ep.ip).is_some_and(|ns| ns.iter().any(|n| *n != key.0)) {
                    return None;
                }
            }
        }
    }
    let mut trust: BTreeMap<&Key, (Trust, Trust)> = BTreeMap::new();
    for key in &judged {
        // The changed pods make no subnet of another namespace of their tenant shared that was not, so the subnets'
        // classification is the same before and after.
        let then = judge(snap, config, key, before_endpoints(key), before_at);
        let now = judge(snap, config, key, snap.endpoints.get(*key), after_pods);
        // The refusals are warnings on the rules that use the Service's set.
        if then.refused != now.refused && model.address_sets.contains_key(&service_set(&key.0, &key.1)) {
            return None;
        }
        trust.insert(key, (then, now));
    }

    // The sets of the changed namespaces, computed again as the compiler computes them.
    let mut new_sets: BTreeMap<String, AddressSet> = BTreeMap::new();
    let mut put = |name: String, addrs: Vec<IpNet>| {
        if let Some(old) = model.address_sets.get(&name) {
            new_sets.insert(name, like(old, addrs));
        }
    };
    for ns in &namespaces {
        let pods = snap.pods_in(ns);
        put(namespace_pods_set(ns), pod_nets(pods));
        if let Some(old) = model.address_sets.get(&namespace_set(ns)) {
            // The namespace's own subnets are those of its subnets the set holds (pods are single addresses; a
            // subnet of a single address was refused above).
            let own: Vec<IpNet> = snap
                .namespaces
                .get(*ns)
                .filter(|_| kube_ovn)
                .map(|n| n.cidrs.iter().filter(|c| old.addresses.binary_search(c).is_ok()).copied().collect())
                .unwrap_or_default();
            let mut addrs = pod_nets(pods);
            addrs.extend(own);
            put(namespace_set(ns), addrs);
        }
        let rules = snap.namespace_rules.range((ns.to_string(), String::new())..).take_while(|((n, _), _)| n == ns);
        for ((_, rule), obj) in rules {
            if let Some(sel) = &obj.spec.pod_selector {
                put(pod_selector_set(ns, rule), selected_pod_nets(pods, sel));
            }
        }
        let services = snap.services.range((ns.to_string(), String::new())..).take_while(|((n, _), _)| n == ns);
        for (key, svc) in services {
            if snap.endpoints.contains_key(key) || judged.contains(key) {
                continue; // its set is its trusted endpoints, which these pods are not; or it is judged below
            }
            put(
                service_set(ns, &key.1),
                svc.selector.as_ref().map_or_else(Vec::new, |sel| service_pod_nets(pods, sel)),
            );
        }
    }
    // The sets of the judged Services: their trusted endpoints, or, without endpoint objects, the ready pods their
    // selectors pick.
    for (key, (_, now)) in &trust {
        let addrs = match (snap.endpoints.contains_key(*key), &snap.services[*key].selector) {
            (true, _) => now.trusted.clone(),
            (false, Some(sel)) => service_pod_nets(snap.pods_in(&key.0), sel),
            (false, None) => Vec::new(),
        };
        put(service_set(&key.0, &key.1), addrs);
    }
    // Tenants' member sets: the changed pods' and the judged endpoints' old addresses out (unless the tenant still
    // holds them), the new ones in.
    let mut members: BTreeMap<&str, (BTreeSet<IpNet>, BTreeSet<IpNet>)> = BTreeMap::new();
    for c in changes {
        for (p, added) in c.before.iter().map(|p| (p, false)).chain(c.after.iter().map(|p| (p, true))) {
            if !is_source(p) {
                continue;
            }
            let slot = members.entry(config.tenant_of(&p.namespace)).or_default();
            let nets = p.ips.iter().map(|ip| IpNet::from(*ip));
            if added { slot.1.extend(nets) } else { slot.0.extend(nets) }
        }
    }
    // The addresses going out that the tenant still holds: a source pod of it has them, or a trusted endpoint (every
    // Service of the tenant with an endpoint at such an address is judged, so its trusted addresses go in), or a
    // subnet of a single address.
    let mut held: BTreeSet<(&str, IpAddr)> = BTreeSet::new();
    for (key, (then, now)) in &trust {
        let slot = members.entry(config.tenant_of(&key.0)).or_default();
        slot.0.extend(&then.trusted);
        slot.1.extend(&now.trusted);
    }
    for (ip, pods) in &after_at {
        for p in pods {
            held.insert((config.tenant_of(&p.namespace), *ip));
        }
    }
    let subnet_of_one = |tenant: &str, n: &IpNet| {
        kube_ovn && snap.namespaces.values().any(|ns| ns.cidrs.contains(n) && config.tenant_of(&ns.name) == tenant)
    };
    for (tenant, (out, into)) in members {
        let name = tenant_set(tenant);
        let old = model.address_sets.get(&name)?;
        let kept = old
            .addresses
            .iter()
            .filter(|n| !out.contains(n) || held.contains(&(tenant, n.addr())) || subnet_of_one(tenant, n));
        new_sets.insert(name, like(old, kept.copied().chain(into).collect()));
    }
    if new_sets.iter().any(|(name, s)| model.address_sets[name].addresses.is_empty() != s.addresses.is_empty()) {
        return None;
    }

    // The pod entries.
    let mut pods = Vec::with_capacity(changes.len());
    for c in changes {
        let entry = |p: &Pod| is_source(p).then(|| pod_entry(config.tenant_of(&p.namespace), p));
        let (before, after) = (c.before.as_ref().and_then(entry), c.after.as_ref().and_then(entry));
        if before != after {
            pods.push((before, after));
        }
    }
    let position = |entries: &[PodEntry], e: &PodEntry| {
        entries.binary_search_by(|x| (&x.namespace, &x.name).cmp(&(&e.namespace, &e.name)))
    };
    for (before, after) in &pods {
        let consistent = match (before, after) {
            (Some(b), _) => position(&model.pods, b).map(|i| &model.pods[i]) == Ok(b),
            (None, Some(a)) => position(&model.pods, a).is_err(),
            (None, None) => true,
        };
        if !consistent {
            return None;
        }
    }

    // Nothing can fail from here: patch.
    let mut delta = PodDelta { sets: Vec::new(), pods };
    for (name, set) in new_sets {
        let slot = model.address_sets.get_mut(&name).expect("only existing sets are recomputed");
        if *slot != set {
            *slot = set;
            delta.sets.push(name);
        }
    }
    for (before, after) in &delta.pods {
        match (before, after) {
            (Some(b), _) => {
                let i = position(&model.pods, b).expect("checked");
                match after {
                    Some(a) => model.pods[i] = a.clone(),
                    None => {
                        model.pods.remove(i);
                    }
                }
            }
            (None, Some(a)) => {
                let i = position(&model.pods, a).expect_err("checked");
                model.pods.insert(i, a.clone());
            }
            (None, None) => {}
        }
    }
    Some(delta)
}

/// Judges a Service's endpoints as the compiler does, with the source pods at each address (`pods_at`, in snapshot
/// order) of the moment.
fn judge<'p>(
    snap: &Snapshot,
    config: &CesConfig,
    key: &Key,
    eps: Option<&Vec<Endpoint>>,
    pods_at: impl Fn(IpAddr) -> Vec<&'p Pod>,
) -> Trust {
    let (ns, svc) = (key.0.as_str(), key.1.as_str());
    let tenant = config.tenant_of(ns);
    let mut out = Trust::default();
    for ep in eps.into_iter().flatten() {
        let mut pods = pods_at(ep.ip);
        pods.retain(|p| config.tenant_of(&p.namespace) == tenant);
        // No node's address and no claimed address reaches here (`recompile_churn` leaves them to a whole compile).
        let other_subnet = || other_own_subnet(snap, config, ns, ep.ip);
        match endpoint_refusal(ns, svc, ep, &pods, None, other_subnet, Claims::default) {
            None => out.trusted.push(IpNet::from(ep.ip)),
            Some((_, why)) => out.refused.push(why),
        }
    }
    out
}

/// Another namespace of `ns`'s tenant with a kube-ovn subnet of its own that holds `ip`, as the compiler classifies
/// subnets: one no other namespace of the tenant overlaps and no source pod of another namespace of the tenant is in.
/// The first such subnet in namespace order, as the compiler finds it.
fn other_own_subnet(snap: &Snapshot, config: &CesConfig, ns: &str, ip: IpAddr) -> Option<(String, IpNet)> {
    if config.cni_type() != ces_config::DEFAULT_CNI_TYPE {
        return None;
    }
    let tenant = config.tenant_of(ns);
    let of_tenant = |name: &str| config.tenant_of(name) == tenant;
    let own = |owner: &str, net: &IpNet| {
        let overlapped = snap
            .namespaces
            .values()
            .any(|m| m.name != owner && of_tenant(&m.name) && m.cidrs.iter().any(|c| overlaps(c, net)));
        !overlapped
            && !snap.pods.iter().any(|p| {
                p.namespace != owner && is_source(p) && of_tenant(&p.namespace) && p.ips.iter().any(|a| net.contains(a))
            })
    };
    snap.namespaces
        .values()
        .filter(|n| n.name != ns && n.cidrs.iter().any(|c| c.contains(&ip)) && of_tenant(&n.name))
        .find_map(|n| n.cidrs.iter().find(|c| c.contains(&ip) && own(&n.name, c)).map(|c| (n.name.clone(), *c)))
}
