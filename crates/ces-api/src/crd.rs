//! The CRDs, generated from the Rust types so that the schema and the code never disagree.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::types::{ClusterEgressRule, ExternalIPRule, ExternalService, NamespaceEgressRule, ServiceEgressRule};

/// The five CRDs, in a stable order.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![
        ExternalService::crd(),
        ClusterEgressRule::crd(),
        NamespaceEgressRule::crd(),
        ServiceEgressRule::crd(),
        ExternalIPRule::crd(),
    ]
}

/// The CRDs as one multi-document YAML stream, as `ces crds` prints it.
pub fn crds_yaml() -> String {
    let mut out = String::new();
    for crd in all_crds() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd).expect("a CRD always serialises"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn crd_json(name: &str) -> Value {
        let crd = all_crds()
            .into_iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no CRD {name}"));
        serde_json::to_value(crd).unwrap()
    }

    fn spec_schema(crd: &Value) -> &Value {
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    }

    #[test]
    fn names_scopes_and_short_names_match_the_original() {
        let expect = [
            ("externalservices.kubeovn.io", "Namespaced", "exsvc", "ExternalService"),
            ("clusteregressrules.kubeovn.io", "Cluster", "cgr", "ClusterEgressRule"),
            ("namespaceegressrules.kubeovn.io", "Namespaced", "nsgr", "NamespaceEgressRule"),
            ("serviceegressrules.kubeovn.io", "Namespaced", "svcgr", "ServiceEgressRule"),
            ("externaliprules.bigip.io", "Namespaced", "eipr", "ExternalIPRule"),
        ];
        for (name, scope, short, kind) in expect {
            let crd = crd_json(name);
            assert_eq!(crd["spec"]["scope"], scope, "{name}");
            assert_eq!(crd["spec"]["names"]["shortNames"][0], short, "{name}");
            assert_eq!(crd["spec"]["names"]["kind"], kind, "{name}");
            assert_eq!(crd["spec"]["versions"][0]["name"], "v1alpha1");
        }
    }

    #[test]
    fn required_fields_and_action_enum_match_the_original() {
        let svc = crd_json("serviceegressrules.kubeovn.io");
        let spec = spec_schema(&svc);
        let mut required: Vec<&str> =
            spec["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        required.sort();
        assert_eq!(required, ["action", "externalServices", "service"]);
        let actions: Vec<&str> =
            spec["properties"]["action"]["enum"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(actions, ["accept", "drop", "accept-decisively", "reject"]);

        let exsvc = crd_json("externalservices.kubeovn.io");
        assert_eq!(spec_schema(&exsvc)["required"], serde_json::json!(["addresses"]));
        let port = &spec_schema(&exsvc)["properties"]["ports"]["items"]["properties"]["port"];
        assert_eq!(port["pattern"], crate::types::PORT_PATTERN);
    }

    #[test]
    fn printer_columns_keep_the_originals_first_and_add_the_scope() {
        for crd in ["clusteregressrules.kubeovn.io", "namespaceegressrules.kubeovn.io", "serviceegressrules.kubeovn.io"]
        {
            let crd = crd_json(crd);
            let cols = &crd["spec"]["versions"][0]["additionalPrinterColumns"];
            assert_eq!(cols[0]["jsonPath"], ".spec.action");
            assert_eq!(cols[1]["jsonPath"], ".status.phase");
            assert_eq!(cols[2]["jsonPath"], ".status.scope");
        }
        let exsvc = crd_json("externalservices.kubeovn.io");
        assert_eq!(exsvc["spec"]["versions"][0]["additionalPrinterColumns"][0]["jsonPath"], ".spec.addresses");
    }

    #[test]
    fn schema_is_structural_no_additional_properties_false() {
        let text = serde_json::to_string(&all_crds()).unwrap();
        assert!(!text.contains("\"additionalProperties\":false"));
    }
}
