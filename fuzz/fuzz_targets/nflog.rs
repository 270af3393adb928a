//! NFLOG datagrams (netlink) and the packets they carry.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for p in ces_nft::nflog::packets(data) {
        let _ = ces_nft::nflog::header(&p.payload);
        let _ = ces_nft::nflog::icmp_error_about(&p.payload);
    }
    let _ = ces_nft::nflog::header(data);
    let _ = ces_nft::nflog::icmp_error_about(data);
});
