//! What each AS3 version can express of what the renderer writes, so that a rule a version cannot express is left
//! out (or, a refusing rule, widened) by the renderer, with or without the schema files at hand.
//!
//! The facts come from F5's schema files: [`Facts::from_schema`] reads them out of a schema, and [`TABLE`] holds
//! them for the versions CES knows, written by `CES_AS3_FACTS_PRINT=1 cargo test -p ces-as3 --test facts` and
//! checked against every schema file in the folder by the same test. With a schema file, its own facts are used;
//! without, the table's newest version not newer than the one asked for.

use std::collections::BTreeSet;

use serde_json::Value;

/// Every (class, property) the renderer writes. Those a version lacks are [`Facts::missing`]. `Common` is the
/// Common tenant (`ADC.properties.Common` in the schema), which takes fewer properties than other tenants.
pub const USED: &[(&str, &str)] = &[
    ("Common", "optimisticLockKey"),
    ("Tenant", "defaultRouteDomain"),
    ("Tenant", "remark"),
    ("Tenant", "optimisticLockKey"),
    ("Firewall_Policy", "rules"),
    ("Firewall_Policy", "remark"),
    ("Firewall_Rule_List", "rules"),
    ("Firewall_Rule_List", "remark"),
    ("Firewall_Rule", "name"),
    ("Firewall_Rule", "protocol"),
    ("Firewall_Rule", "action"),
    ("Firewall_Rule", "source"),
    ("Firewall_Rule", "destination"),
    ("Firewall_Rule", "iRule"),
    ("Firewall_Rule", "loggingEnabled"),
    ("Firewall_Rule_Source", "addressLists"),
    ("Firewall_Rule_Destination", "addressLists"),
    ("Firewall_Rule_Destination", "portLists"),
    ("Firewall_Address_List", "addresses"),
    ("Firewall_Address_List", "fqdns"),
    ("Firewall_Address_List", "remark"),
    ("Firewall_Port_List", "ports"),
    ("Firewall_Port_List", "remark"),
    ("NAT_Policy", "rules"),
    ("NAT_Policy", "remark"),
    ("NAT_Rule", "name"),
    ("NAT_Rule", "protocol"),
    ("NAT_Rule", "source"),
    ("NAT_Rule", "destination"),
    ("NAT_Rule", "sourceTranslation"),
    ("NAT_Rule", "remark"),
    ("NAT_Rule_Source", "addressLists"),
    ("NAT_Rule_Destination", "addressLists"),
    ("NAT_Rule_Destination", "portLists"),
    ("NAT_Source_Translation", "type"),
    ("NAT_Source_Translation", "addresses"),
    ("NAT_Source_Translation", "ports"),
    ("NAT_Source_Translation", "remark"),
    ("Pool", "members"),
    ("Pool", "monitors"),
    ("Service_Address", "virtualAddress"),
    ("Service_Address", "icmpEcho"),
    ("Service_Address", "arpEnabled"),
    ("Service_L4", "virtualAddresses"),
    ("Service_L4", "virtualPort"),
    ("Service_L4", "layer4"),
    ("Service_L4", "pool"),
    ("Service_L4", "snat"),
    ("Service_L4", "translateServerAddress"),
    ("Service_L4", "translateServerPort"),
    ("Service_L4", "securityLogProfiles"),
    ("Service_L4", "policyFirewallEnforced"),
    ("Service_L4", "policyFirewallStaged"),
    ("Service_L4", "policyNAT"),
];

/// The enumerated properties the renderer writes, with the values it may write into them.
pub const ENUMS: &[(&str, &str, &[&str])] = &[
    ("Firewall_Rule", "protocol", &["any", "icmp", "tcp", "udp"]),
    ("Firewall_Rule", "action", &["accept", "accept-decisively", "drop", "reject"]),
    ("NAT_Rule", "protocol", &["any", "icmp", "tcp", "udp"]),
    ("NAT_Source_Translation", "type", &["dynamic-pat"]),
];

/// One row of [`TABLE`]: a version, the [`ENUMS`] values it takes (in [`ENUMS`] order), the [`USED`] pairs it lacks.
pub type Row = (&'static str, &'static [&'static [&'static str]], &'static [(&'static str, &'static str)]);

/// The facts of the versions CES knows, from F5's schema files (`as3-schema-<version>-<build>.json`).
pub const TABLE: &[Row] = &[
    (
        "3.28.0",
        &[
            &["any", "tcp", "udp"],
            &["accept", "accept-decisively", "drop", "reject"],
            &["any", "tcp", "udp"],
            &["dynamic-pat"],
        ],
        &[("Common", "optimisticLockKey")],
    ),
    (
        "3.29.0",
        &[
            &["any", "tcp", "udp"],
            &["accept", "accept-decisively", "drop", "reject"],
            &["any", "tcp", "udp"],
            &["dynamic-pat"],
        ],
        &[("Common", "optimisticLockKey")],
    ),
    (
        "3.56.0",
        &[
            &["any", "icmp", "tcp", "udp"],
            &["accept", "accept-decisively", "drop", "reject"],
            &["any", "tcp", "udp"],
            &["dynamic-pat"],
        ],
        &[],
    ),
];

/// What one AS3 version can express of what the renderer writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    /// The version the facts are of (the table's row, or the schema file's version).
    pub version: String,
    /// For each of [`ENUMS`], in its order, the values this version takes.
    pub enums: Vec<Vec<String>>,
    /// The [`USED`] pairs this version lacks.
    pub missing: BTreeSet<(String, String)>,
}

/// `3.29.0` as numbers, for ordering; `None` when it is not three numbers.
pub fn version_key(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|n| n.parse::<u32>().ok());
    let key = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(key)
}

impl Facts {
    /// The table's facts for `version`: its newest row not newer than `version` (a version between two rows may
    /// express more than the older one: CES uses only what it knows). An error when `version` is older than every row.
    pub fn known(version: &str) -> Result<Facts, String> {
        let want = version_key(version).ok_or_else(|| format!("`{version}` is not an AS3 version such as 3.29.0"))?;
        let row = TABLE
            .iter()
            .filter(|(v, _, _)| version_key(v).is_some_and(|k| k <= want))
            .max_by_key(|(v, _, _)| version_key(v));
        let Some((v, enums, missing)) = row else {
            return Err(format!(
                "AS3 {version} is older than every version CES knows the facts of (the oldest is {})",
                TABLE[0].0
            ));
        };
        Ok(Facts {
            version: v.to_string(),
            enums: enums.iter().map(|vals| vals.iter().map(ToString::to_string).collect()).collect(),
            missing: missing.iter().map(|(c, p)| (c.to_string(), p.to_string())).collect(),
        })
    }

    /// The facts read out of one of F5's schema files (its parsed JSON).
    pub fn from_schema(schema: &Value, version: &str) -> Facts {
        let defs = schema.get("definitions").cloned().unwrap_or(Value::Null);
        let mut missing = BTreeSet::new();
        for (class, prop) in USED {
            if property(&defs, class, prop).is_none() {
                missing.insert((class.to_string(), prop.to_string()));
            }
        }
        let enums = ENUMS
            .iter()
            .map(|(class, prop, ours)| {
                let taken = property(&defs, class, prop).map(|p| enum_values(&defs, &p, 0)).unwrap_or_default();
                ours.iter().filter(|v| taken.contains(**v)).map(ToString::to_string).collect()
            })
            .collect();
        Facts { version: version.to_string(), enums, missing }
    }

    /// Whether `class.prop` may hold `value` (an enumerated property of [`ENUMS`]).
    pub fn allows(&self, class: &str, prop: &str, value: &str) -> bool {
        ENUMS
            .iter()
            .position(|(c, p, _)| *c == class && *p == prop)
            .is_none_or(|i| self.enums.get(i).is_some_and(|vals| vals.iter().any(|v| v == value)))
    }

    /// Whether this version has `class.prop`.
    pub fn has(&self, class: &str, prop: &str) -> bool {
        !self.missing.contains(&(class.to_string(), prop.to_string()))
    }

    /// The table row of these facts, as Rust source for [`TABLE`].
    pub fn row_source(&self) -> String {
        let enums: Vec<String> = self
            .enums
            .iter()
            .map(|vals| format!("&[{}]", vals.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>().join(", ")))
            .collect();
        let missing: Vec<String> = self.missing.iter().map(|(c, p)| format!("({c:?}, {p:?})")).collect();
        format!("({:?}, &[{}], &[{}]),", self.version, enums.join(", "), missing.join(", "))
    }
}

/// Follows a local `$ref` (`#/definitions/X`).
fn deref<'a>(defs: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix("#/definitions/")) {
        Some(name) => defs.get(name).unwrap_or(v),
        None => v,
    }
}

/// The schema of `class.prop`, looked for in the class's own properties and in what it is combined with (`$ref`,
/// `allOf`, `anyOf`, `oneOf`, `then`, `else`), as AS3's service classes are built.
fn property(defs: &Value, class: &str, prop: &str) -> Option<Value> {
    fn find(defs: &Value, v: &Value, prop: &str, depth: usize) -> Option<Value> {
        if depth > 8 {
            return None;
        }
        let v = deref(defs, v);
        if let Some(p) = v.get("properties").and_then(|p| p.get(prop)) {
            return Some(p.clone());
        }
        for key in ["allOf", "anyOf", "oneOf"] {
            for sub in v.get(key).and_then(Value::as_array).into_iter().flatten() {
                if let Some(p) = find(defs, sub, prop, depth + 1) {
                    return Some(p);
                }
            }
        }
        for key in ["then", "else"] {
            if let Some(p) = v.get(key).and_then(|sub| find(defs, sub, prop, depth + 1)) {
                return Some(p);
            }
        }
        None
    }
    let start = if class == "Common" { defs.get("ADC")?.get("properties")?.get("Common")? } else { defs.get(class)? };
    find(defs, start, prop, 0)
}

/// The values an enumerated property's schema takes (its `enum` or `const`, through `$ref`, `anyOf`, `oneOf`).
fn enum_values(defs: &Value, v: &Value, depth: usize) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if depth > 8 {
        return out;
    }
    let v = deref(defs, v);
    for e in v.get("enum").and_then(Value::as_array).into_iter().flatten() {
        if let Some(s) = e.as_str() {
            out.insert(s.to_string());
        }
    }
    if let Some(s) = v.get("const").and_then(Value::as_str) {
        out.insert(s.to_string());
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        for sub in v.get(key).and_then(Value::as_array).into_iter().flatten() {
            out.extend(enum_values(defs, sub, depth + 1));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_between_rows_takes_the_older_row_and_one_before_every_row_is_refused() {
        assert_eq!(Facts::known("3.40.1").unwrap().version, "3.29.0");
        assert_eq!(Facts::known("3.29.0").unwrap().version, "3.29.0");
        assert_eq!(Facts::known("3.99.0").unwrap().version, "3.56.0");
        assert!(Facts::known("3.27.9").unwrap_err().contains("older than every version"));
        assert!(Facts::known("latest").is_err());
        let f = Facts::known("3.29.0").unwrap();
        assert!(!f.allows("Firewall_Rule", "protocol", "icmp"));
        assert!(f.allows("Firewall_Rule", "protocol", "tcp"));
        assert!(Facts::known("3.56.0").unwrap().allows("Firewall_Rule", "protocol", "icmp"));
    }

    #[test]
    fn versions_order_as_numbers() {
        assert!(version_key("3.100.0") > version_key("3.29.0"));
        assert_eq!(version_key("3.29"), None);
        assert_eq!(version_key("3.29.0.1"), None);
    }
}
