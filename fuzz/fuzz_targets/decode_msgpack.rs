//! The MessagePack codec never panics, and what it accepts encodes and decodes back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel_proto::{Codec, Limits, MsgPackCodec};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(env) = MsgPackCodec.decode(&bytes::Bytes::copy_from_slice(data), &limits) {
        let mut out = Vec::new();
        if MsgPackCodec.encode(&env, &mut out).is_ok() {
            let again = MsgPackCodec
                .decode(&bytes::Bytes::from(out), &limits)
                .expect("what we encode decodes");
            assert_eq!(again.id, env.id);
            assert_eq!(again.kind, env.kind);
            assert_eq!(again.seq, env.seq);
        }
    }
});
