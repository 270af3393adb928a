//! The facts table (what each AS3 version can express of what the renderer writes) against F5's schema files: every
//! row equals what its version's file says, and every file in the folder has its row.
//! `CES_AS3_FACTS_PRINT=1 cargo test -p ces-as3 --test facts -- --nocapture` prints the rows for the files present.

mod common;

use ces_as3::facts::{Facts, TABLE, version_key};

/// The schema files in the folder, as (version, file name).
fn files() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(common::schema_dir()).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(v) = name.strip_prefix("as3-schema-").and_then(|r| r.strip_suffix(".json")) {
            let version = v.split('-').next().unwrap().to_string();
            out.push((version, name));
        }
    }
    out.sort_by_key(|(v, _)| version_key(v));
    out
}

#[test]
fn every_row_of_the_table_is_what_f5s_schema_file_of_its_version_says() {
    let files = files();
    assert!(files.len() >= 3, "expected the 3.28, 3.29 and 3.56 schema files, found {files:?}");
    let mut printed = String::new();
    for (version, _) in &files {
        let derived = common::schema(version).facts();
        printed.push_str(&derived.row_source());
        printed.push('\n');
        if std::env::var_os("CES_AS3_FACTS_PRINT").is_some() {
            continue;
        }
        let row = TABLE.iter().find(|(v, _, _)| v == version);
        let row = row.unwrap_or_else(|| panic!("the schema file of {version} has no row in facts::TABLE"));
        assert_eq!(Facts::known(row.0).unwrap(), derived, "facts::TABLE row {version} differs from F5's schema file");
    }
    println!("{printed}");
    for (v, _, _) in TABLE {
        assert!(files.iter().any(|(f, _)| f == v), "facts::TABLE row {v} has no schema file to be checked against");
    }
}

#[test]
fn the_facts_read_from_a_schema_see_what_a_version_lacks() {
    // A schema whose Firewall_Rule takes only tcp, and whose Firewall_Address_List has no fqdns: the facts say so.
    let mut raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::schema_dir().join("as3-schema-3.56.0-10.json")).unwrap())
            .unwrap();
    raw["definitions"]["Firewall_Rule"]["properties"]["protocol"]["enum"] = serde_json::json!(["tcp"]);
    raw["definitions"]["Firewall_Address_List"]["properties"].as_object_mut().unwrap().remove("fqdns");
    let f = Facts::from_schema(&raw, "3.56.0");
    assert!(f.allows("Firewall_Rule", "protocol", "tcp"));
    assert!(!f.allows("Firewall_Rule", "protocol", "icmp"));
    assert!(!f.has("Firewall_Address_List", "fqdns"));
    assert!(f.has("Service_L4", "policyNAT"), "a property of Service_L4_Core is found through the class's `then`");
}
