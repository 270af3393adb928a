//! Server-side apply of the status subresource with field ownership, as a real API server does it for the top-level
//! fields of `status`: conflicts between managers (409 unless forced), shared ownership of equal values, removal of
//! fields a manager stops applying, and `managedFields` kept across updates of the object.

use std::io::{Read, Write};

use ces_fake_apiserver::FakeApiServer;
use serde_json::{Value, json};

const PATH: &str = "/apis/kubeovn.io/v1alpha1/namespaces/shop/namespaceegressrules/web/status";

/// An apply patch of `status` by `manager`; the status code and the answer.
fn apply(api: &FakeApiServer, manager: &str, force: bool, status: Value) -> (u16, Value) {
    let port = api.addr.port();
    let body = json!({"apiVersion": "kubeovn.io/v1alpha1", "kind": "NamespaceEgressRule",
                      "metadata": {"name": "web", "namespace": "shop"}, "status": status})
    .to_string();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "PATCH {PATH}?fieldManager={manager}{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/apply-patch+yaml\r\nContent-Length: {}\r\n\r\n{body}",
        if force { "&force=true" } else { "" },
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let text = out.split("\r\n\r\n").nth(1).unwrap_or("");
    (code, serde_json::from_str(text).unwrap_or(Value::Null))
}

fn object(api: &FakeApiServer) -> Value {
    api.with(|s| s.get("NamespaceEgressRule", "shop", "web").cloned().unwrap())
}

/// Who owns which status fields, sorted.
fn owners(api: &FakeApiServer) -> Vec<(String, String)> {
    let o = object(api);
    let mut out: Vec<(String, String)> = o["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["subresource"] == "status" && e["operation"] == "Apply")
        .flat_map(|e| {
            let m = e["manager"].as_str().unwrap().to_string();
            e["fieldsV1"]["f:status"]
                .as_object()
                .unwrap()
                .keys()
                .map(move |k| (m.clone(), k.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort();
    out
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

#[test]
fn status_apply_tracks_field_owners_and_refuses_conflicts_unless_forced() {
    let api = FakeApiServer::start();
    let rule = json!({"apiVersion": "kubeovn.io/v1alpha1", "kind": "NamespaceEgressRule",
                      "metadata": {"name": "web", "namespace": "shop"},
                      "spec": {"action": "accept", "externalServices": ["api"]}});
    api.apply(rule.clone());
    let conditions = json!([{"type": "Accepted", "status": "True"}]);

    let (code, _) = apply(&api, "ces", false, json!({"phase": "Success", "conditions": conditions}));
    assert_eq!(code, 200);
    assert_eq!(owners(&api), pairs(&[("ces", "f:conditions"), ("ces", "f:phase")]));

    // Another manager changing a field CES owns: a conflict, and nothing changes.
    let (code, answer) = apply(&api, "other", false, json!({"phase": "Failed"}));
    assert_eq!(code, 409, "{answer}");
    let message = answer["message"].as_str().unwrap();
    assert!(message.contains("conflict with \"ces\": .status.phase"), "{message}");
    assert_eq!(object(&api)["status"]["phase"], "Success");

    // The same value is no conflict: both own it.
    assert_eq!(apply(&api, "other", false, json!({"phase": "Success"})).0, 200);
    assert_eq!(owners(&api), pairs(&[("ces", "f:conditions"), ("ces", "f:phase"), ("other", "f:phase")]));

    // Forced, the field changes hands.
    assert_eq!(apply(&api, "other", true, json!({"phase": "Failed"})).0, 200);
    assert_eq!(object(&api)["status"]["phase"], "Failed");
    assert_eq!(owners(&api), pairs(&[("ces", "f:conditions"), ("other", "f:phase")]));

    // A manager that stops applying a field it no longer owns leaves it; the field's last owner removes it.
    assert_eq!(apply(&api, "ces", false, json!({"conditions": conditions})).0, 200);
    assert_eq!(object(&api)["status"]["phase"], "Failed");
    assert_eq!(apply(&api, "other", false, json!({})).0, 200);
    assert_eq!(object(&api)["status"], json!({"conditions": conditions}));
    assert_eq!(owners(&api), pairs(&[("ces", "f:conditions")]));

    // An update of the object keeps the record.
    let mut edited = rule;
    edited["spec"]["action"] = json!("drop");
    api.apply(edited);
    assert_eq!(owners(&api), pairs(&[("ces", "f:conditions")]));

    // Apply needs a manager.
    assert_eq!(apply(&api, "", false, json!({"phase": "x"})).0, 400);
}
