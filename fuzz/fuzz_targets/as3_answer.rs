//! The BIG-IP's answers (AS3 results, errors, tokens) as the client reads them.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = ces_as3::client::messages(&v);
        let _ = v.pointer("/token/token").and_then(serde_json::Value::as_str);
        let _ = v.pointer("/token/timeout").and_then(serde_json::Value::as_u64);
    }
});
