//! Tenants that several clusters declare into (Common always; any tenant two clusters' configs name): each cluster
//! declares its own objects and keeps the others' (docs/as3.md, "Clusters side by side").
//!
//! An object a rule made carries its cluster's remark (`CES cluster <clusterName>`). A tenant declaration is the
//! cluster's own objects, every object on the device that carries another cluster's remark, and the shared objects
//! (named after `masterCluster`): the policies list every cluster's rule lists (grouped by cluster, in the order of
//! their names; the shared deny-all last), and the other shared objects are the master cluster's (`clusterName ==
//! masterCluster`) — another cluster keeps what the device holds. Pure: the backend reads and posts.

use serde_json::{Map, Value};

use crate::render::staged_policy_name;

/// The cluster an object (or a NAT rule) was declared by, from its remark.
pub fn owner(object: &Value) -> Option<&str> {
    object.get("remark").and_then(Value::as_str).and_then(|r| r.strip_prefix("CES cluster "))
}

fn is_policy(o: &Value) -> bool {
    matches!(o.get("class").and_then(Value::as_str), Some("Firewall_Policy" | "NAT_Policy"))
}

/// The tenant declaration to send for cluster `cluster`: `ours` (its rendered declaration; `None` when it leaves the
/// tenant) merged with `current` (what the device holds). `None` when `ours` is to be sent as it is: the device holds
/// no other cluster's object.
pub fn merge(ours: Option<&Value>, current: Option<&Value>, cluster: &str, master: bool) -> Option<Value> {
    let current = current?;
    let empty = Map::new();
    let cur = current.get("Shared").and_then(Value::as_object).unwrap_or(&empty);
    let foreign = |o: &Value| owner(o).is_some_and(|c| c != cluster);
    let made_by_another = |remark: Option<&Value>| {
        let r = remark.and_then(Value::as_str);
        r.is_some_and(|r| r.starts_with("CES cluster "))
            && r != ours.and_then(|o| o.get("remark")).and_then(Value::as_str)
    };
    if ours.is_some() && !cur.values().any(foreign) && !made_by_another(current.get("remark")) {
        return None;
    }
    let mut out = match ours {
        Some(o) => o.clone(),
        None => {
            // Leaving: what the device holds, without this cluster's objects.
            let mut t = current.clone();
            if let Some(shared) = t.get_mut("Shared").and_then(Value::as_object_mut) {
                shared.retain(|_, o| owner(o) != Some(cluster));
            }
            t
        }
    };
    if let (Some(mine), Some(theirs)) = (out.get("remark").cloned(), current.get("remark")) {
        // The tenant stays marked by the cluster that made it.
        if theirs.as_str().is_some_and(|r| r.starts_with("CES cluster ")) && &mine != theirs {
            out["remark"] = theirs.clone();
        }
    }
    let Some(shared) = out.get_mut("Shared").and_then(Value::as_object_mut) else { return Some(out) };
    for (name, o) in cur {
        if foreign(o) {
            shared.insert(name.clone(), o.clone());
        } else if owner(o).is_none() && !is_policy(o) && ours.is_some() && !master && shared.contains_key(name) {
            // A shared object other than a policy: the master cluster's.
            shared.insert(name.clone(), o.clone());
        } else if is_policy(o) && !shared.contains_key(name) {
            // A policy only another cluster has (its audit rules' staged policy): kept with the others' entries.
            let mut p = o.clone();
            p["rules"] = Value::Array(Vec::new());
            shared.insert(name.clone(), p);
        }
    }
    // Each policy lists every cluster's entries: this cluster's as rendered, the others' as on the device.
    let names: Vec<String> = shared.iter().filter(|(_, o)| is_policy(o)).map(|(n, _)| n.clone()).collect();
    for name in names {
        let on_device = cur.get(&name).and_then(|p| p.get("rules")).and_then(Value::as_array);
        let entry_owner = |e: &Value, objects: &Map<String, Value>| -> Option<String> {
            match e.get("use").and_then(Value::as_str) {
                Some(path) => objects.get(path.rsplit('/').next().unwrap_or_default()).and_then(owner),
                None => owner(e),
            }
            .map(str::to_string)
        };
        let mut entries: Vec<(Option<String>, Value)> = Vec::new();
        let rendered = shared[&name]["rules"].take();
        // Leaving, this cluster's objects are gone from `shared`: who an entry is of is read on the device.
        let objects: &Map<String, Value> = if ours.is_some() { shared } else { cur };
        for e in rendered.as_array().into_iter().flatten() {
            let who = entry_owner(e, objects);
            // Leaving, this cluster's entries go with its objects.
            if ours.is_some() || who.as_deref() != Some(cluster) {
                entries.push((who, e.clone()));
            }
        }
        for e in on_device.into_iter().flatten() {
            let who = entry_owner(e, cur);
            if who.as_deref().is_some_and(|c| c != cluster) && !entries.iter().any(|(_, x)| x == e) {
                entries.push((who, e.clone()));
            }
        }
        // Grouped by cluster in the order of their names, stable within; shared entries (deny-all, automap) last.
        entries.sort_by(|(a, _), (b, _)| match (a, b) {
            (Some(a), Some(b)) => a.cmp(b),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        });
        shared[&name]["rules"] = Value::Array(entries.into_iter().map(|(_, e)| e).collect());
    }
    // A virtual server stages the staged policy of its enforced one while it lists entries (whichever cluster's
    // audit rules they are); one left without entries goes with the virtual server's reference to it.
    let servers: Vec<String> = shared
        .iter()
        .filter(|(_, o)| o.get("class").and_then(Value::as_str) == Some("Service_L4") && owner(o).is_none())
        .map(|(n, _)| n.clone())
        .collect();
    for vs in servers {
        let Some(enforced) = shared[&vs].pointer("/policyFirewallEnforced/use").and_then(Value::as_str) else {
            continue;
        };
        let (path, name) = enforced.rsplit_once('/').unwrap_or(("", enforced));
        let staged = staged_policy_name(name);
        let listed = shared.get(&staged).and_then(|p| p["rules"].as_array()).map(|r| !r.is_empty());
        if listed == Some(true) {
            shared[&vs]["policyFirewallStaged"] = serde_json::json!({"use": format!("{path}/{staged}")});
        } else {
            if listed == Some(false) {
                shared.remove(&staged);
            }
            if let Some(o) = shared[&vs].as_object_mut() {
                o.remove("policyFirewallStaged");
            }
        }
    }
    Some(out)
}

/// Whether a tenant on the device holds objects of a cluster other than `cluster`.
pub fn has_others(current: &Value, cluster: &str) -> bool {
    let theirs = |o: &Value| owner(o).is_some_and(|c| c != cluster);
    current.get("Shared").and_then(Value::as_object).is_some_and(|s| s.values().any(theirs))
}

/// Whether a tenant on the device holds objects of `cluster`.
pub fn has_own(current: &Value, cluster: &str) -> bool {
    current.get("Shared").and_then(Value::as_object).is_some_and(|s| s.values().any(|o| owner(o) == Some(cluster)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::tenant_remark as remark;
    use serde_json::json;

    fn list(cluster: &str) -> Value {
        json!({"class": "Firewall_Rule_List", "remark": remark(cluster), "rules": []})
    }

    fn tenant(objects: Value) -> Value {
        let mut t = json!({"class": "Tenant", "Shared": {"class": "Application", "template": "shared"}});
        for (k, v) in objects.as_object().unwrap() {
            t["Shared"][k] = v.clone();
        }
        t
    }

    fn uses(t: &Value, policy: &str) -> Vec<String> {
        t["Shared"][policy]["rules"].as_array().unwrap().iter().map(|e| e["use"].as_str().unwrap().into()).collect()
    }

    #[test]
    fn alone_on_the_device_a_cluster_sends_its_own_declaration() {
        let ours = tenant(json!({"east_a": list("east")}));
        assert_eq!(merge(Some(&ours), None, "east", true), None);
        let stale = tenant(json!({"east_old": list("east"), "unmarked": {"class": "Firewall_Address_List"}}));
        assert_eq!(merge(Some(&ours), Some(&stale), "east", true), None, "its own old objects go");
    }

    #[test]
    fn the_others_objects_and_policy_entries_are_kept_grouped_by_cluster_with_the_deny_all_last() {
        let p = |entries: &[&str]| {
            let rules: Vec<Value> = entries.iter().map(|e| json!({"use": format!("/Common/Shared/{e}")})).collect();
            json!({"class": "Firewall_Policy", "rules": rules})
        };
        let deny = json!({"class": "Firewall_Rule_List", "rules": []});
        let device = tenant(json!({
            "west_a": list("west"), "east_old": list("east"), "deny": deny,
            "pol": p(&["east_old", "west_a", "deny"]),
            "pool": {"class": "Pool", "members": ["master's"]},
        }));
        let ours = tenant(json!({
            "east_b": list("east"), "east_c": list("east"), "deny": deny,
            "pol": p(&["east_c", "east_b", "deny"]), "pool": {"class": "Pool", "members": ["east's"]},
        }));
        let m = merge(Some(&ours), Some(&device), "east", false).unwrap();
        let names: Vec<&String> = m["Shared"].as_object().unwrap().keys().collect();
        assert!(names.contains(&&"west_a".to_string()) && !names.contains(&&"east_old".to_string()), "{names:?}");
        let want = ["/Common/Shared/east_c", "/Common/Shared/east_b", "/Common/Shared/west_a", "/Common/Shared/deny"];
        assert_eq!(uses(&m, "pol"), want);
        assert_eq!(m["Shared"]["pool"]["members"], json!(["master's"]), "not the master: the device's shared pool");
        let m = merge(Some(&ours), Some(&device), "east", true).unwrap();
        assert_eq!(m["Shared"]["pool"]["members"], json!(["east's"]), "the master's own");
        // West merging east's result back: the same policy order (no flip-flop between the clusters).
        let west = tenant(json!({"west_a": list("west"), "deny": deny, "pol": p(&["west_a", "deny"])}));
        let back = merge(Some(&west), Some(&m), "west", false).unwrap();
        assert_eq!(uses(&back, "pol"), want);
        // East leaving: its objects and entries go, west's stay.
        let left = merge(None, Some(&m), "east", false).unwrap();
        assert_eq!(uses(&left, "pol"), ["/Common/Shared/west_a", "/Common/Shared/deny"]);
        assert!(left["Shared"].get("east_b").is_none() && left["Shared"].get("west_a").is_some());
        assert!(has_others(&m, "east") && !has_others(&left, "west"));
    }

    #[test]
    fn the_virtual_server_stages_the_audit_rules_of_whichever_cluster_has_them() {
        let p = |entries: &[&str]| {
            let rules: Vec<Value> = entries.iter().map(|e| json!({"use": format!("/Common/Shared/{e}")})).collect();
            json!({"class": "Firewall_Policy", "rules": rules})
        };
        let vs = |staged: bool| {
            let mut v =
                json!({"class": "Service_L4", "policyFirewallEnforced": {"use": "/Common/Shared/m_svc_policy_0"}});
            if staged {
                v["policyFirewallStaged"] = json!({"use": "/Common/Shared/m_svc_staged_policy_0"});
            }
            v
        };
        // West has an audit rule; east has none, and declares a virtual server without a staged policy.
        let device = tenant(json!({
            "west_audit": list("west"), "m_svc_staged_policy_0": p(&["west_audit"]),
            "m_svc_policy_0": p(&[]), "m_outbound_vs": vs(true),
        }));
        let ours =
            tenant(json!({"east_a": list("east"), "m_svc_policy_0": p(&["east_a"]), "m_outbound_vs": vs(false)}));
        let m = merge(Some(&ours), Some(&device), "east", true).unwrap();
        assert_eq!(uses(&m, "m_svc_staged_policy_0"), ["/Common/Shared/west_audit"]);
        assert_eq!(m["Shared"]["m_outbound_vs"], vs(true), "west's audit rules stay staged");
        // West leaves: its staged policy has no entry left, it goes, and the virtual server stages nothing.
        let left = merge(None, Some(&m), "west", true).unwrap();
        assert!(left["Shared"].get("m_svc_staged_policy_0").is_none(), "{left}");
        assert_eq!(left["Shared"]["m_outbound_vs"], vs(false));
    }

    #[test]
    fn nat_rules_inline_in_a_shared_policy_are_kept_by_their_remark() {
        let nat = |rules: Value| json!({"class": "NAT_Policy", "rules": rules});
        let device = tenant(json!({
            "west_t": {"class": "NAT_Source_Translation", "remark": remark("west")},
            "snat": nat(json!([{"name": "west_r", "remark": remark("west")}, {"name": "automap"}])),
        }));
        let ours =
            tenant(json!({"snat": nat(json!([{"name": "east_r", "remark": remark("east")}, {"name": "automap"}]))}));
        let m = merge(Some(&ours), Some(&device), "east", true).unwrap();
        let names: Vec<&str> =
            m["Shared"]["snat"]["rules"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["east_r", "west_r", "automap"]);
    }
}
