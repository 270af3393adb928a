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

/// `ces compile --backend as3`: `as3_version`, the AS3 the device runs (`--as3-version`); `strict`, rules left out
/// or widened fail the command too.
pub fn compile(
    inputs: &Inputs,
    out: &PathBuf,
    schema_dir: Option<&Path>,
    at: jiff::Timestamp,
    as3_version: Option<&str>,
    strict: bool,
) -> Result<(), Failure> {
    let model = inputs.compile();
    for d in model.diagnostics.iter().filter(|d| d.is_error()) {
        eprintln!("ces: {d}");
    }
    let version = model.settings.schema_version.clone();
    if let Some(runs) = as3_version {
        ces_as3::backend::check_version(&version, runs, "--as3-version says the device runs")
            .map_err(Failure::input)?;
    }
    let schema = load_schema(schema_dir, &version)?;
    let facts = match &schema {
        Some(s) => s.facts(),
        None => ces_as3::Facts::known(&version).map_err(Failure::input)?,
    };
    let rendered = ces_as3::render::render_checked(&model, at, &facts, schema.as_ref());
    for d in &rendered.diagnostics {
        eprintln!("ces: {d}");
    }
    std::fs::create_dir_all(out).map_err(|e| Failure::input(format!("{}: {e}", out.display())))?;
    let mut invalid = 0;
    for (tenant, doc) in &rendered.documents {
        let file = out.join(format!("{tenant}.json"));
        if let Some(errors) = rendered.invalid.get(tenant) {
            invalid += 1;
            for e in errors {
                eprintln!("ces: {tenant}: not written, its own objects are invalid under AS3 schema {version}: {e}");
            }
            // An earlier run's document of the tenant would be taken for this one's.
            let _ = std::fs::remove_file(&file);
            continue;
        }
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
            "ces: wrote {written} tenant document(s) to {} for what AS3 {} can express (as CES knows it: as {}); NOT \
             validated: no AS3 schema folder (give --as3-schema DIR or set CES_AS3_SCHEMA_DIR)",
            out.display(),
            version,
            facts.version
        ),
    }
    if invalid > 0 {
        return Err(Failure {
            code: 1,
            message: format!("{invalid} tenant document(s) are invalid and were not written"),
        });
    }
    let changed = rendered.diagnostics.iter().filter(|d| d.object.is_some()).count();
    if strict && changed > 0 {
        return Err(Failure {
            code: 1,
            message: format!("--strict: {changed} rule(s) are left out of the declarations or declared otherwise"),
        });
    }
    Ok(())
}
