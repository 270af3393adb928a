//! ces-conf.yaml: parsed and validated.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(c) = ces_config::CesConfig::from_yaml(text, "fuzz.yaml")
    {
        let _ = c.endpoint_addresses();
        let _ = c.egress_pool("a");
    }
});
