//! AFM firewall log lines received over syslog (key-value and delimited storage formats).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        let fields: Vec<String> = ces_flow::afm::ORIGINAL_FIELDS.iter().map(|s| s.to_string()).collect();
        let _ = ces_flow::afm::parse(line, &fields, ',');
        let _ = ces_flow::afm::parse(line, &[], '|');
    }
});
