//! Flow lines: flow records (ces flows import, ces impact --flows) and the gateway's older packet log lines.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = serde_json::from_str::<ces_flow::record::FlowRecord>(line);
        let _ = ces_flow::record::FlowRecord::from_json_line(line);
    }
});
