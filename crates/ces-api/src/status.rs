//! Status of CES objects: the original's `phase` (`Syncing`, `Success`), plus `Failed` and standard conditions.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The condition CES sets on every object it compiles: `True` when the object is valid and in the policy model
/// (its reason may still be a warning such as `NoSources`), `False` with the error's reason otherwise.
pub const CONDITION_ACCEPTED: &str = "Accepted";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    Syncing,
    Success,
    Failed,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// For rules, what they apply to, as `kubectl get` shows it: `all namespaces`, `namespaces team=red`, `all pods`,
    /// `pods app=web`, `service web`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// A standard Kubernetes condition (the shape of `metav1.Condition`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// RFC 3339 time of the last change of `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// A CamelCase reason code, such as `ExternalServiceNotFound`.
    pub reason: String,
    pub message: String,
}

fn status(phase: Phase, generation: Option<i64>, accepted: bool, reason: &str, message: &str) -> ResourceStatus {
    ResourceStatus {
        phase: Some(phase),
        observed_generation: generation,
        conditions: vec![Condition {
            type_: CONDITION_ACCEPTED.to_string(),
            status: if accepted { "True" } else { "False" }.to_string(),
            observed_generation: generation,
            last_transition_time: None,
            reason: reason.to_string(),
            message: message.to_string(),
        }],
        scope: None,
    }
}

/// Status of an object that compiled into the policy model; `reason` is `Accepted`, or a warning such as
/// `NoSources`.
pub fn accepted_status(generation: Option<i64>, reason: &str, message: &str) -> ResourceStatus {
    status(Phase::Success, generation, true, reason, message)
}

/// Status of an object rejected with `reason` (a CamelCase code) and a human `message`.
pub fn rejected_status(generation: Option<i64>, reason: &str, message: &str) -> ResourceStatus {
    status(Phase::Failed, generation, false, reason, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejected_status_carries_reason_and_generation() {
        let s = rejected_status(Some(7), "ExternalServiceNotFound", "ExternalService default/x not found");
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(s.observed_generation, Some(7));
        let c = &s.conditions[0];
        assert_eq!((c.type_.as_str(), c.status.as_str()), ("Accepted", "False"));
        assert_eq!(c.reason, "ExternalServiceNotFound");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["phase"], "Failed");
        assert_eq!(json["conditions"][0]["observedGeneration"], 7);
    }

    #[test]
    fn original_phases_still_parse() {
        for p in ["Syncing", "Success"] {
            let s: ResourceStatus = serde_json::from_value(serde_json::json!({ "phase": p })).unwrap();
            assert!(s.phase.is_some());
        }
    }
}
