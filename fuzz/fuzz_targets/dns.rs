//! DNS messages crossing the gateway: parsed, the names and addresses they teach, and DNS over TCP reassembled from
//! segments (each: 4 bytes of sequence number, 1 byte of flags, 1 byte of length, then the payload).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = ces_dns::wire::parse(data);
    let _ = ces_dns::learn_from(data);
    let mut r = ces_dns::tcp::Reassembler::new(4);
    let key = ("10.0.0.1".parse().unwrap(), 53, "10.0.0.2".parse().unwrap(), 40000);
    let mut rest = data;
    while rest.len() >= 6 {
        let seq = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let (flags, len) = (rest[4], rest[5] as usize);
        let payload = &rest[6..(6 + len).min(rest.len())];
        for m in r.segment(key, seq, flags & 1 != 0, flags & 2 != 0, payload).messages {
            let _ = ces_dns::learn_from(&m);
        }
        rest = &rest[(6 + len).min(rest.len())..];
    }
});
