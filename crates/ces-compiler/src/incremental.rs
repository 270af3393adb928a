//! Pod churn without a whole compile: [`recompile_pods`] patches a model into the one [`crate::compile`] would give
//! after pods changed, touching only the sets built from those pods' namespaces and their tenants' member sets.
//!
//! It follows a change only as far as it can prove that nothing else moves, and otherwise says `None` (the caller
//! then compiles whole). What it requires of each changed pod (before and after):
//! - none of its addresses lies in a kube-ovn subnet of another namespace of its tenant (that would change which
//!   subnets are shared), and its namespace has no subnet of a single address (which could not be told apart from
//!   a pod's address in the namespace's set);
//! - an endpoint at one of its addresses belongs to a Service of a changed pod's namespace and is trusted, or refused
//!   for the same reason, before and after (so the Services' sets, refusals and the tenants' endpoint members stay);
//! - its namespace is named by something else too, or stays named by pods (the tenants' namespace lists stay);
//! - every set it recomputes keeps being empty or non-empty, so no "matches nothing yet" warning comes or goes.
//!
//! Property tests (`tests/incremental.rs`) hold the result equal to a whole compile on generated churn.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ces_config::CesConfig;
use ces_model::{AddressSet, PodDelta, PodEntry, PolicyModel, TenantRef};
use ces_snapshot::{Pod, PodChange, Snapshot};
use ipnet::IpNet;

use crate::{
    endpoint_refusal, is_source, namespace_pods_set, namespace_set, pod_entry, pod_nets, pod_selector_set,
    selected_pod_nets, service_pod_nets, service_set, tenant_set,
};

/// A set of the same tenant as `old`, with these addresses.
fn like(old: &AddressSet, addresses: Vec<IpNet>) -> AddressSet {
    AddressSet::new(&TenantRef { name: old.tenant.clone(), route_domain: old.route_domain }, addresses)
}

/// Patches `model` (compiled from the snapshot before `changes`) into the model of `snap` (the snapshot after them).
/// Returns what changed, or `None`, with `model` untouched, when the changes reach further than this follows.
pub fn recompile_pods(
    model: &mut PolicyModel,
    snap: &Snapshot,
    config: &CesConfig,
    changes: &[PodChange],
) -> Option<PodDelta> {
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
            if (p.namespace.as_str(), p.name.as_str()) != (ns, name) {
                return None;
            }
            mine.extend(p.ips.iter().copied());
        }
    }
    let namespaces: BTreeSet<&str> = by_namespace.keys().copied().collect();
    let addresses: BTreeSet<IpAddr> = by_namespace.values().flatten().copied().collect();
    let in_model = |ns: &str| model.tenants.iter().any(|t| t.namespaces.iter().any(|n| n == ns));
    for (ns, mine) in &by_namespace {
        let tenant = config.tenant_of(ns);
        let listed = config.tenant.iter().any(|t| t.namespaces.iter().any(|n| n == ns));
        if in_model(ns) != (listed || snap.names_namespace_apart_from_pods(ns) || !snap.pods_in(ns).is_empty()) {
            return None;
        }
        if kube_ovn {
            for n in snap.namespaces.values() {
                if n.name == **ns {
                    if n.cidrs.iter().any(|c| c.prefix_len() == c.max_prefix_len()) {
                        return None;
                    }
                } else if config.tenant_of(&n.name) == tenant
                    && n.cidrs.iter().any(|c| mine.iter().any(|a| c.contains(a)))
                {
                    return None;
                }
            }
        }
    }
    // Source pods at the changed addresses, before and after, in snapshot order: one pass over the pods.
    let mut after_at: BTreeMap<IpAddr, Vec<&Pod>> = BTreeMap::new();
    for p in snap.pods.iter().filter(|p| is_source(p)) {
        for ip in p.ips.iter().filter(|ip| addresses.contains(ip)) {
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
    // Endpoints at a changed address must be trusted, or refused for the same reason, before and after: then the
    // Services' sets, the refusals and the tenants' endpoint members stay. Their last check, another namespace's own
    // subnet, cannot hold the address of a changed pod of the Service's own namespace (refused above); an endpoint at
    // the address of a changed pod of another namespace declines rather than work that check out.
    // An endpoint is judged by the pods of its own tenant: one at an address no changed pod of its tenant has or had
    // stays as it is.
    let changed_in_tenant: BTreeSet<(&str, IpAddr)> =
        by_namespace.iter().flat_map(|(ns, ips)| ips.iter().map(|ip| (config.tenant_of(ns), *ip))).collect();
    let mut trusted_at: BTreeSet<(&str, IpAddr)> = BTreeSet::new();
    for (key, eps) in snap.endpoints.iter().filter(|(k, _)| snap.services.contains_key(*k)) {
        for ep in eps.iter().filter(|ep| addresses.contains(&ep.ip)) {
            let (ns, svc) = (key.0.as_str(), key.1.as_str());
            let tenant = config.tenant_of(ns);
            if !changed_in_tenant.contains(&(tenant, ep.ip)) {
                continue;
            }
            if !by_namespace.get(ns).is_some_and(|mine| mine.contains(&ep.ip)) {
                return None;
            }
            let mut now = after_at.get(&ep.ip).cloned().unwrap_or_default();
            let mut then = before_at(ep.ip);
            now.retain(|p| config.tenant_of(&p.namespace) == tenant);
            then.retain(|p| config.tenant_of(&p.namespace) == tenant);
            let verdict = endpoint_refusal(ns, svc, ep, &now, || None);
            if verdict != endpoint_refusal(ns, svc, ep, &then, || None) {
                return None;
            }
            if verdict.is_none() {
                trusted_at.insert((tenant, ep.ip));
            }
        }
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
            if snap.endpoints.contains_key(key) {
                continue; // its set is its trusted endpoints, which these pods are not
            }
            put(
                service_set(ns, &key.1),
                svc.selector.as_ref().map_or_else(Vec::new, |sel| service_pod_nets(pods, sel)),
            );
        }
    }
    // Tenants' member sets: the changed pods' old addresses out (unless another pod of the tenant still has them),
    // the new ones in.
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
    // The addresses going out that the tenant still holds: another source pod of it has them, or a trusted endpoint.
    let mut held = trusted_at;
    for (ip, pods) in &after_at {
        for p in pods {
            held.insert((config.tenant_of(&p.namespace), *ip));
        }
    }
    for (tenant, (out, into)) in members {
        let name = tenant_set(tenant);
        let old = model.address_sets.get(&name)?;
        let kept = old.addresses.iter().filter(|n| !out.contains(n) || held.contains(&(tenant, n.addr())));
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
