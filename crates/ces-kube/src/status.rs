//! The status CES writes on its objects: the original's `phase`, and the conditions `Accepted` (the object is valid
//! and in the policy) and `Programmed` (the backend holds it), each with `observedGeneration`.

use ces_api::{Condition, Phase, ResourceStatus};
use ces_model::{Diagnostic, ObjectRef, PolicyModel, Severity};
use ces_sync::Report;

pub const CONDITION_PROGRAMMED: &str = "Programmed";

/// What a rule applies to (`status.scope`), from its kind and spec; `None` for objects that are not rules.
pub fn scope_of(kind: &str, spec: &serde_json::Value) -> Option<String> {
    let (field, all, some) = match kind {
        "ClusterEgressRule" => ("namespaceSelector", "all namespaces", "namespaces"),
        "NamespaceEgressRule" => ("podSelector", "all pods", "pods"),
        "ServiceEgressRule" => return Some(format!("service {}", spec.get("service")?.as_str()?)),
        _ => return None,
    };
    let Some(sel) = spec.get(field).filter(|s| !s.is_null()) else { return Some(all.to_string()) };
    let mut parts: Vec<String> = Vec::new();
    for (k, v) in sel.get("matchLabels").and_then(serde_json::Value::as_object).into_iter().flatten() {
        parts.push(format!("{k}={}", v.as_str().unwrap_or_default()));
    }
    for e in sel.get("matchExpressions").and_then(serde_json::Value::as_array).into_iter().flatten() {
        let key = e.get("key").and_then(serde_json::Value::as_str).unwrap_or_default();
        let values: Vec<&str> = e
            .get("values")
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_str)
            .collect();
        parts.push(match e.get("operator").and_then(serde_json::Value::as_str).unwrap_or_default() {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_string(),
            "DoesNotExist" => format!("!{key}"),
            other => format!("{key} {other}"),
        });
    }
    Some(if parts.is_empty() { all.to_string() } else { format!("{some} {}", parts.join(",")) })
}

/// Backend reasons that mean the object is not on the data plane at all.
const NOT_PROGRAMMED: &[&str] = &["NotDeclared", "InvalidDeclaration", "NotProgrammed", "NotBound"];

/// The status of `object` after a pass. `previous` is what the object has now: a condition whose status did not
/// change keeps its `lastTransitionTime`.
pub fn status_of(
    model: &PolicyModel,
    report: &Report<'_>,
    object: &ObjectRef,
    generation: Option<i64>,
    previous: Option<&ResourceStatus>,
    now: &str,
) -> ResourceStatus {
    let mut status = model.status_of(object, generation);
    let accepted = status.phase != Some(Phase::Failed);
    let mine: Vec<&Diagnostic> = report.problems.iter().filter(|d| d.object.as_ref() == Some(object)).collect();
    let backend = report.backend;
    let kept = model
        .diagnostics
        .iter()
        .find(|d| d.object.as_ref() == Some(object) && d.reason == ces_sync::LAST_GOOD_VERSION_KEPT);
    let (ok, reason, message) = if let (false, Some(k)) = (accepted, kept) {
        (report.result.is_ok(), k.reason.clone(), format!("{backend}: {}", k.message))
    } else if !accepted {
        (false, "NotAccepted".to_string(), "not programmed: the object is not accepted (see Accepted)".to_string())
    } else if let Some(d) =
        mine.iter().find(|d| d.severity == Severity::Error || NOT_PROGRAMMED.contains(&d.reason.as_str()))
    {
        (false, d.reason.clone(), format!("{backend}: {}", d.message))
    } else if let Err(e) = report.result {
        let e: String = e.chars().take(1000).collect();
        (false, "BackendError".to_string(), format!("{backend}: the last apply failed: {e}"))
    } else if let Some(w) = mine.first() {
        (true, w.reason.clone(), format!("{backend}: programmed, but: {}", w.message))
    } else {
        (true, "Programmed".to_string(), format!("{backend}: programmed"))
    };
    if accepted && !ok {
        status.phase = Some(Phase::Failed);
    }
    status.conditions.push(Condition {
        type_: CONDITION_PROGRAMMED.into(),
        status: if ok { "True" } else { "False" }.into(),
        observed_generation: generation,
        last_transition_time: None,
        reason,
        message,
    });
    for c in &mut status.conditions {
        let before = previous.and_then(|p| p.conditions.iter().find(|x| x.type_ == c.type_));
        c.last_transition_time = match before {
            Some(b) if b.status == c.status => b.last_transition_time.clone().or_else(|| Some(now.to_string())),
            _ => Some(now.to_string()),
        };
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scope_says_what_a_rule_applies_to() {
        let spec = |v: serde_json::Value| v;
        assert_eq!(
            scope_of("ClusterEgressRule", &spec(serde_json::json!({"action": "drop"}))).unwrap(),
            "all namespaces"
        );
        assert_eq!(
            scope_of(
                "ClusterEgressRule",
                &spec(serde_json::json!({"namespaceSelector": {"matchLabels": {"team": "red", "env": "prod"},
                    "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]},
                                         {"key": "legacy", "operator": "DoesNotExist"}]}}))
            )
            .unwrap(),
            "namespaces env=prod,team=red,tier in (a,b),!legacy"
        );
        assert_eq!(scope_of("NamespaceEgressRule", &spec(serde_json::json!({}))).unwrap(), "all pods");
        assert_eq!(
            scope_of("NamespaceEgressRule", &spec(serde_json::json!({"podSelector": {"matchLabels": {"app": "web"}}})))
                .unwrap(),
            "pods app=web"
        );
        assert_eq!(scope_of("ServiceEgressRule", &spec(serde_json::json!({"service": "web"}))).unwrap(), "service web");
        assert_eq!(scope_of("ExternalService", &spec(serde_json::json!({"addresses": []}))), None);
    }

    fn model() -> PolicyModel {
        let snap = ces_snapshot::manifests::load_str(
            r#"
apiVersion: kubeovn.io/v1alpha1
kind: ExternalService
metadata: {name: web, namespace: kube-system}
spec: {addresses: [192.0.2.1]}
---
apiVersion: kubeovn.io/v1alpha1
kind: ClusterEgressRule
metadata: {name: good}
spec: {action: accept, externalServices: [web]}
---
apiVersion: kubeovn.io/v1alpha1
kind: ClusterEgressRule
metadata: {name: broken}
spec: {action: accept, externalServices: [missing]}
"#,
            "t.yaml",
        );
        ces_compiler::compile(&snap, &ces_config::CesConfig::embedded_default(), "kube-system")
    }

    fn report<'a>(result: Result<(), &'a str>, problems: &'a [Diagnostic]) -> Report<'a> {
        Report { backend: "as3", result, problems }
    }

    #[test]
    fn accepted_and_programmed_each_say_why() {
        let m = model();
        let good = ObjectRef::new("ClusterEgressRule", None, "good");
        let broken = ObjectRef::new("ClusterEgressRule", None, "broken");
        let s = status_of(&m, &report(Ok(()), &[]), &good, Some(3), None, "T1");
        assert_eq!(s.phase, Some(Phase::Success));
        assert_eq!(s.conditions.len(), 2);
        assert_eq!((s.conditions[1].type_.as_str(), s.conditions[1].status.as_str()), ("Programmed", "True"));
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(3) && c.last_transition_time.as_deref() == Some("T1"))
        );

        let s = status_of(&m, &report(Ok(()), &[]), &broken, Some(1), None, "T1");
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(s.conditions[0].reason, "ExternalServiceNotFound");
        assert!(s.conditions[0].message.contains("kube-system/missing"), "{:?}", s.conditions[0]);
        assert_eq!((s.conditions[1].status.as_str(), s.conditions[1].reason.as_str()), ("False", "NotAccepted"));

        let refused = [Diagnostic {
            severity: Severity::Error,
            object: Some(good.clone()),
            origin: None,
            reason: "NotProgrammed".into(),
            message: "tenant Common: BIG-IP refused (422): …".into(),
        }];
        let s2 = status_of(&m, &report(Err("Common: FAILED"), &refused), &good, Some(3), Some(&s), "T2");
        assert_eq!(s2.phase, Some(Phase::Failed));
        assert_eq!(s2.conditions[1].reason, "NotProgrammed");
        assert!(s2.conditions[1].message.starts_with("as3: tenant Common: BIG-IP refused (422)"));

        // A whole-backend failure without a problem of this object still says the object is not programmed.
        let s3 = status_of(&m, &report(Err("BIG-IP unreachable"), &[]), &good, Some(3), None, "T3");
        assert_eq!(s3.conditions[1].reason, "BackendError");
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let m = model();
        let good = ObjectRef::new("ClusterEgressRule", None, "good");
        let first = status_of(&m, &report(Ok(()), &[]), &good, Some(1), None, "T1");
        let again = status_of(&m, &report(Ok(()), &[]), &good, Some(2), Some(&first), "T2");
        assert_eq!(again.conditions[0].last_transition_time.as_deref(), Some("T1"));
        let failed = status_of(&m, &report(Err("x"), &[]), &good, Some(2), Some(&again), "T3");
        assert_eq!(failed.conditions[0].last_transition_time.as_deref(), Some("T1"), "Accepted did not change");
        assert_eq!(failed.conditions[1].last_transition_time.as_deref(), Some("T3"), "Programmed did");
    }

    #[test]
    fn events_have_stable_reasons_and_come_only_with_news() {
        let m = model();
        let good = ObjectRef::new("ClusterEgressRule", None, "good");
        let broken = ObjectRef::new("ClusterEgressRule", None, "broken");
        let ok = status_of(&m, &report(Ok(()), &[]), &good, Some(1), None, "T");
        assert_eq!(crate::event_for(None, &ok).map(|e| (e.0, e.1)), Some(("Normal", "Synced")));
        let next_generation = status_of(&m, &report(Ok(()), &[]), &good, Some(2), Some(&ok), "T");
        assert_eq!(crate::event_for(Some(&ok), &next_generation), None);
        let bad = status_of(&m, &report(Ok(()), &[]), &broken, Some(1), None, "T");
        let e = crate::event_for(Some(&ok), &bad).unwrap();
        assert_eq!((e.0, e.1), ("Warning", "InvalidReference"));
        assert!(e.2.contains("kube-system/missing"));
        let down = status_of(&m, &report(Err("BIG-IP unreachable"), &[]), &good, Some(1), Some(&ok), "T");
        assert_eq!(crate::event_for(Some(&ok), &down).map(|e| e.1), Some("BackendRejected"));
    }
}
