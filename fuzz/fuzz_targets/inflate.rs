//! Decompression never panics and never returns more than its limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel_proto::compress::inflate;

fuzz_target!(|data: &[u8]| {
    let limit = 64 * 1024;
    if let Ok(out) = inflate(data, limit) {
        assert!(out.len() <= limit);
    }
});
