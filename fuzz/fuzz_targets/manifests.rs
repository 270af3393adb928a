//! The manifest loader: YAML and JSON documents from files or the API server, whole files at a time.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ces_snapshot::manifests::load_str(text, "fuzz.yaml");
    }
});
