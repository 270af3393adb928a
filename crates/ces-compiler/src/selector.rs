//! Kubernetes label selectors: validation and matching.

use ces_api::{LabelSelector, SelectorOperator};
use ces_snapshot::Labels;

/// Checks the selector's shape: `In`/`NotIn` need values, `Exists`/`DoesNotExist` take none.
pub fn validate(sel: &LabelSelector) -> Result<(), String> {
    for (i, req) in sel.match_expressions.iter().enumerate() {
        if req.key.is_empty() {
            return Err(format!("matchExpressions[{i}]: key is empty"));
        }
        match req.operator {
            SelectorOperator::In | SelectorOperator::NotIn if req.values.is_empty() => {
                return Err(format!("matchExpressions[{i}]: operator {:?} needs values", req.operator));
            }
            SelectorOperator::Exists | SelectorOperator::DoesNotExist if !req.values.is_empty() => {
                return Err(format!("matchExpressions[{i}]: operator {:?} takes no values", req.operator));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Does the selector select an object with these labels? An empty selector selects everything.
pub fn matches(sel: &LabelSelector, labels: &Labels) -> bool {
    sel.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
        && sel.match_expressions.iter().all(|req| {
            let value = labels.get(&req.key);
            match req.operator {
                SelectorOperator::In => value.is_some_and(|v| req.values.contains(v)),
                SelectorOperator::NotIn => value.is_none_or(|v| !req.values.contains(v)),
                SelectorOperator::Exists => value.is_some(),
                SelectorOperator::DoesNotExist => value.is_none(),
            }
        })
}

/// Does a Service selector (plain equality map) select these labels? A Service with an empty selector selects
/// nothing, as in Kubernetes.
pub fn service_selects(selector: &Labels, labels: &Labels) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ces_api::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn expr(key: &str, op: SelectorOperator, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_labels: Default::default(),
            match_expressions: vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op,
                values: values.iter().map(|s| s.to_string()).collect(),
            }],
        }
    }

    #[test]
    fn operators() {
        let l = labels(&[("team", "a"), ("env", "prod")]);
        assert!(matches(&LabelSelector::default(), &l));
        assert!(matches(&expr("team", SelectorOperator::In, &["a", "b"]), &l));
        assert!(!matches(&expr("team", SelectorOperator::In, &["c"]), &l));
        assert!(matches(&expr("team", SelectorOperator::NotIn, &["c"]), &l));
        assert!(matches(&expr("tier", SelectorOperator::NotIn, &["c"]), &l), "NotIn holds when the label is absent");
        assert!(matches(&expr("env", SelectorOperator::Exists, &[]), &l));
        assert!(!matches(&expr("env", SelectorOperator::DoesNotExist, &[]), &l));
        let mut sel = expr("env", SelectorOperator::Exists, &[]);
        sel.match_labels.insert("team".into(), "b".into());
        assert!(!matches(&sel, &l), "matchLabels and matchExpressions must both hold");
    }

    #[test]
    fn shape_errors() {
        assert!(validate(&expr("a", SelectorOperator::In, &[])).unwrap_err().contains("needs values"));
        assert!(validate(&expr("a", SelectorOperator::Exists, &["x"])).unwrap_err().contains("takes no values"));
        assert!(validate(&expr("", SelectorOperator::Exists, &[])).is_err());
    }

    #[test]
    fn empty_service_selector_selects_nothing() {
        assert!(!service_selects(&Labels::new(), &labels(&[("a", "b")])));
        assert!(service_selects(&labels(&[("a", "b")]), &labels(&[("a", "b"), ("c", "d")])));
    }
}
