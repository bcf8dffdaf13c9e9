//! Property tests: arbitrary envelopes round-trip, arbitrary bytes never panic a decoder.

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::json;
use tunnel_proto::{Envelope, ErrorBody, Format, Limits, MessageType, Payload};

fn message_type() -> impl Strategy<Value = MessageType> {
    prop_oneof![
        proptest::sample::select(MessageType::KNOWN.to_vec()),
        "[a-z][a-z0-9_.]{0,20}".prop_map(|s| MessageType::from_wire(&s)),
    ]
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        ".{0,24}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-zA-Z_]{1,8}", inner, 0..6).prop_map(|m| json!(m)),
        ]
    })
}

fn envelope(format: Format) -> impl Strategy<Value = Envelope> {
    (
        any::<u64>(),
        message_type(),
        any::<u64>(),
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u64>()),
        prop::collection::btree_map("[a-z][a-z0-9-]{0,15}", ".{0,40}", 0..5),
        proptest::option::of(json_value()),
        proptest::option::of((".{0,16}", ".{0,64}")),
    )
        .prop_map(
            move |(id, kind, ts, seq, ack, corr, headers, payload, error)| {
                let mut env = Envelope::new(id, kind, ts);
                env.seq = seq;
                env.ack = ack;
                env.correlation = corr;
                for (k, v) in headers {
                    env.headers.insert(k, v);
                }
                env.payload = payload.map(|v| Payload::encode(format, &v).expect("payload"));
                env.error = error.map(|(c, m)| ErrorBody::new(c, m));
                env
            },
        )
}

fn check_roundtrip(format: Format, env: &Envelope) -> Result<(), TestCaseError> {
    let codec = format.codec();
    let mut buf = Vec::new();
    codec.encode(env, &mut buf).expect("encode");
    let back = codec
        .decode(&Bytes::from(buf), &Limits::default())
        .map_err(|e| TestCaseError::fail(format!("decode failed: {e}")))?;
    prop_assert_eq!(&back, env);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn json_envelopes_roundtrip(env in envelope(Format::Json)) {
        check_roundtrip(Format::Json, &env)?;
    }

    #[test]
    fn msgpack_envelopes_roundtrip(env in envelope(Format::MsgPack)) {
        check_roundtrip(Format::MsgPack, &env)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let frame = Bytes::from(bytes);
        for format in Format::ALL {
            let _ = format.codec().decode(&frame, &Limits::default());
        }
    }

    #[test]
    fn mutated_frames_never_panic(
        env in envelope(Format::MsgPack),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        for format in Format::ALL {
            let mut buf = Vec::new();
            format.codec().encode(&env, &mut buf).expect("encode");
            for (at, byte) in &flips {
                let i = at.index(buf.len());
                buf[i] = *byte;
            }
            let frame = Bytes::from(buf);
            if let Ok(decoded) = format.codec().decode(&frame, &Limits::default()) {
                // Whatever decodes must also re-encode.
                let mut again = Vec::new();
                format.codec().encode(&decoded, &mut again).expect("re-encode");
            }
        }
    }

    #[test]
    fn truncated_frames_are_errors(env in envelope(Format::Json), cut in any::<prop::sample::Index>()) {
        for format in Format::ALL {
            let mut buf = Vec::new();
            format.codec().encode(&env, &mut buf).expect("encode");
            let cut = cut.index(buf.len());
            prop_assert!(format.codec().decode(&Bytes::copy_from_slice(&buf[..cut]), &Limits::default()).is_err());
        }
    }
}
