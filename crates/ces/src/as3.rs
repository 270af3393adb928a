//! `ces compile --backend as3`: one AS3 request document per tenant, validated against the official schema.

use std::path::{Path, PathBuf};

use ces_as3::Schema;

use crate::Failure;
use crate::inputs::Inputs;

/// Loads the schema of the model's `schemaVersion` from `dir` (or `CES_AS3_SCHEMA_DIR`); `None` without either.
pub fn load_schema(dir: Option<&Path>, version: &str) -> Result<Option<Schema>, Failure> {
    match ces_as3::schema::schema_dir(dir) {
        None => Ok(None),
        Some(d) => Schema::load(&d, version).map(Some).map_err(Failure::input),
    }
}

pub fn compile(inputs: &Inputs, out: &PathBuf, schema_dir: Option<&Path>, at: jiff::Timestamp) -> Result<(), Failure> {
    let model = inputs.compile();
    for d in model.diagnostics.iter().filter(|d| d.is_error()) {
        eprintln!("ces: {d}");
    }
    let rendered = ces_as3::render(&model, at);
    for d in &rendered.diagnostics {
        eprintln!("ces: {d}");
    }
    let schema = load_schema(schema_dir, &model.settings.schema_version)?;
    std::fs::create_dir_all(out).map_err(|e| Failure::input(format!("{}: {e}", out.display())))?;
    let mut invalid = 0;
    for (tenant, doc) in &rendered.documents {
        if let Some(s) = &schema
            && let Err(errors) = s.validate(doc)
        {
            invalid += 1;
            for e in &errors {
                let rules = e
                    .object
                    .as_ref()
                    .and_then(|o| rendered.origins.get(tenant).and_then(|m| m.get(o)))
                    .map(|refs| refs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))
                    .filter(|s| !s.is_empty())
                    .map(|s| format!(" (from {s})"))
                    .unwrap_or_default();
                eprintln!("ces: {tenant}: invalid under AS3 schema {}: {e}{rules}", s.version());
            }
            continue;
        }
        let file = out.join(format!("{tenant}.json"));
        let text = serde_json::to_string_pretty(doc).expect("documents serialise") + "\n";
        std::fs::write(&file, text).map_err(|e| Failure::input(format!("{}: {e}", file.display())))?;
    }
    let written = rendered.documents.len() - invalid;
    match &schema {
        Some(s) => eprintln!(
            "ces: wrote {written} tenant document(s) to {}, each valid under AS3 schema {} ({})",
            out.display(),
            s.version(),
            s.file().display()
        ),
        None => eprintln!(
            "ces: wrote {written} tenant document(s) to {}; NOT validated: no AS3 schema folder (give --as3-schema DIR \
             or set CES_AS3_SCHEMA_DIR)",
            out.display()
        ),
    }
    if invalid > 0 {
        return Err(Failure {
            code: 1,
            message: format!("{invalid} tenant document(s) are invalid and were not written"),
        });
    }
    Ok(())
}
