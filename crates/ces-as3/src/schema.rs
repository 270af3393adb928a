//! Validation against the official AS3 schema (F5Networks/f5-appsvcs-extension, JSON Schema draft-07).
//!
//! The schema files are not part of CES: they are read from a folder (`CES_AS3_SCHEMA_DIR`, or `--as3-schema`),
//! one file per version, named as F5 names them (`as3-schema-3.29.0-3.json`). A declaration is validated twice: as a
//! whole against the schema's root, and object by object against the definition of its class, so that a message
//! names the tenant, the object and the field rather than "not valid under any of the schemas".

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use jsonschema::Validator;
use serde_json::Value;

/// The environment variable naming the folder of schema files.
pub const SCHEMA_DIR_ENV: &str = "CES_AS3_SCHEMA_DIR";

/// One schema violation, located as precisely as the schema allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaError {
    pub tenant: Option<String>,
    /// The object in the tenant's `Shared` application, when the error is inside one.
    pub object: Option<String>,
    /// JSON pointer of the offending value inside the object (or the document).
    pub path: String,
    pub message: String,
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.tenant, &self.object) {
            (Some(t), Some(o)) => write!(f, "/{t}/Shared/{o}")?,
            (Some(t), None) => write!(f, "tenant {t}")?,
            _ => write!(f, "declaration")?,
        }
        if !self.path.is_empty() {
            write!(f, " at {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The schema of one AS3 version, compiled.
pub struct Schema {
    version: String,
    file: PathBuf,
    raw: Value,
    root: Validator,
    classes: Mutex<HashMap<String, Arc<Validator>>>,
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schema").field("version", &self.version).field("file", &self.file).finish()
    }
}

/// The folder of schema files: the argument, else `CES_AS3_SCHEMA_DIR`.
pub fn schema_dir(arg: Option<&Path>) -> Option<PathBuf> {
    arg.map(Path::to_path_buf).or_else(|| std::env::var_os(SCHEMA_DIR_ENV).map(PathBuf::from))
}

impl Schema {
    /// Loads the schema of `version` (`3.29.0`) from `dir`: the file `as3-schema-<version>-<build>.json`.
    pub fn load(dir: &Path, version: &str) -> Result<Schema, String> {
        let prefix = format!("as3-schema-{version}-");
        let entries = std::fs::read_dir(dir).map_err(|e| format!("AS3 schema folder {}: {e}", dir.display()))?;
        let mut found: Vec<PathBuf> = Vec::new();
        let mut available: Vec<String> = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("as3-schema-") && name.ends_with(".json") {
                available.push(name.clone());
                if name.starts_with(&prefix) {
                    found.push(e.path());
                }
            }
        }
        found.sort();
        available.sort();
        let Some(file) = found.pop() else {
            return Err(format!(
                "no AS3 schema for schemaVersion {version} in {} (it has: {})",
                dir.display(),
                if available.is_empty() { "none".to_string() } else { available.join(", ") }
            ));
        };
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        let root = jsonschema::options()
            .build(&raw)
            .map_err(|e| format!("{}: not a usable JSON schema: {e}", file.display()))?;
        Ok(Schema { version: version.to_string(), file, raw, root, classes: Mutex::new(HashMap::new()) })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    /// What this version can express of what the renderer writes, read out of the schema itself.
    pub fn facts(&self) -> crate::Facts {
        crate::Facts::from_schema(&self.raw, &self.version)
    }

    /// The validator of one class definition (`Firewall_Rule_List`), compiled on first use.
    fn class(&self, class: &str) -> Result<Arc<Validator>, String> {
        let mut cache = self.classes.lock().expect("schema cache");
        if let Some(v) = cache.get(class) {
            return Ok(v.clone());
        }
        let defs = self.raw.get("definitions").and_then(Value::as_object).ok_or("schema has no definitions")?;
        if !defs.contains_key(class) {
            return Err(format!("class {class} is not defined in AS3 schema {}", self.version));
        }
        let mut sub = self.raw.clone();
        let obj = sub.as_object_mut().expect("schema is an object");
        obj.remove("oneOf");
        obj.remove("$id");
        obj.insert("$ref".into(), Value::String(format!("#/definitions/{class}")));
        let v = Arc::new(jsonschema::options().build(&sub).map_err(|e| format!("schema of class {class}: {e}"))?);
        cache.insert(class.to_string(), v.clone());
        Ok(v)
    }

    /// The errors of one object of a tenant's `Shared` application under its class (none for the application's own
    /// properties).
    pub fn validate_object(&self, tenant: &str, name: &str, object: &Value) -> Vec<SchemaError> {
        let Some(class) = object.get("class").and_then(Value::as_str) else { return Vec::new() };
        if class == "Application" {
            return Vec::new();
        }
        let at = |path: String, message: String| SchemaError {
            tenant: Some(tenant.to_string()),
            object: Some(name.to_string()),
            path,
            message,
        };
        match self.class(class) {
            Err(message) => vec![at("/class".into(), message)],
            Ok(v) => v.iter_errors(object).map(|e| at(e.instance_path().to_string(), e.to_string())).collect(),
        }
    }

    /// Validates a full AS3 request document (`{"class":"AS3","declaration":{…}}`) or a bare ADC declaration.
    /// Every error is returned, each object's against its own class first.
    pub fn validate(&self, doc: &Value) -> Result<(), Vec<SchemaError>> {
        let mut errors = Vec::new();
        let decl = doc.get("declaration").unwrap_or(doc);
        if let Some(map) = decl.as_object() {
            if let Some(v) = map.get("schemaVersion").and_then(Value::as_str)
                && v != self.version
            {
                errors.push(SchemaError {
                    tenant: None,
                    object: None,
                    path: "/declaration/schemaVersion".into(),
                    message: format!("declares schemaVersion {v} but is validated against {}", self.version),
                });
            }
            for (tenant, t) in map {
                let Some(app) = t.get("Shared").and_then(Value::as_object) else { continue };
                for (name, object) in app {
                    errors.extend(self.validate_object(tenant, name, object));
                }
            }
        }
        if errors.is_empty() && !self.root.is_valid(doc) {
            for e in self.root.iter_errors(doc).take(5) {
                let path = e.instance_path().to_string();
                let mut parts = path.trim_start_matches('/').split('/');
                let tenant = match (parts.next(), parts.next()) {
                    (Some("declaration"), Some(t)) if !t.is_empty() => Some(t.to_string()),
                    _ => None,
                };
                errors.push(SchemaError { tenant, object: None, path, message: e.to_string() });
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }
}
