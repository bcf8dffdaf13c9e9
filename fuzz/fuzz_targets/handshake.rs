//! Handshake payloads (what a hub parses from strangers first) never panic to decode,
//! in either codec, and version negotiation never panics on what they claim.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel_proto::messages::{Handshake, TypedMessage};
use tunnel_proto::{Format, Limits, VersionRange, negotiate_version};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    for format in Format::ALL {
        let Ok(env) = format
            .codec()
            .decode(&bytes::Bytes::copy_from_slice(data), &limits)
        else {
            continue;
        };
        if let Ok(hello) = Handshake::from_envelope(&env) {
            let _ = negotiate_version(VersionRange::SUPPORTED, hello.versions);
        }
    }
});
