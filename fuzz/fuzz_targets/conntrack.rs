//! Conntrack event datagrams (netlink) as the gateway reads them.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for e in ces_nft::conntrack::events(data) {
        let _ = ces_nft::flows::outcome(&e);
    }
});
