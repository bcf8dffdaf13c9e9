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

/// `env`, compressed if asked, encodes within its bound with the widest `seq` and
/// `ack` a session may add.
fn check_bound(format: Format, mut env: Envelope, compress: bool) -> Result<(), TestCaseError> {
    if compress {
        env.compress_payload(0);
    }
    let bound = env
        .encoded_len_bound(format)
        .expect("the payload is in the codec's format");
    env.seq = Some(u64::MAX);
    env.ack = Some(u64::MAX);
    let mut buf = Vec::new();
    format.codec().encode(&env, &mut buf).expect("encode");
    prop_assert!(buf.len() <= bound, "encoded {} > bound {bound}", buf.len());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn json_envelopes_encode_within_their_bound(env in envelope(Format::Json), compress in any::<bool>()) {
        check_bound(Format::Json, env, compress)?;
    }

    #[test]
    fn msgpack_envelopes_encode_within_their_bound(env in envelope(Format::MsgPack), compress in any::<bool>()) {
        check_bound(Format::MsgPack, env, compress)?;
    }

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

mod session_model {
    use std::collections::VecDeque;
    use std::time::{Duration, Instant};

    use proptest::prelude::*;
    use tunnel_proto::session::{Accept, ReceiveWindow, ReplayBuffer, SessionConfig};

    #[derive(Debug, Clone)]
    enum Op {
        Send,
        Deliver,
        Ack,
        Cut,
        Tick,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Send),
            4 => Just(Op::Deliver),
            1 => Just(Op::Ack),
            1 => Just(Op::Cut),
            1 => Just(Op::Tick),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever the interleaving of sends, deliveries, acks and connection cuts
        /// (which lose everything in flight), resuming with the state machines delivers
        /// every message exactly once and in order.
        #[test]
        fn cuts_and_resumes_deliver_exactly_once_in_order(
            ops in prop::collection::vec(op(), 1..400),
            ack_every in 1u32..8,
        ) {
            let config = SessionConfig::default().ack_every(ack_every).ack_delay(Duration::from_millis(5));
            let start = Instant::now();
            let mut now = start;
            let mut tx: ReplayBuffer<u64> = ReplayBuffer::new(config.clone());
            let mut rx = ReceiveWindow::new(config);
            let mut link: VecDeque<(u64, u64)> = VecDeque::new();
            let mut next_value = 1u64;
            let mut delivered = Vec::new();

            let deliver = |link: &mut VecDeque<(u64, u64)>, rx: &mut ReceiveWindow, now: Instant, delivered: &mut Vec<u64>| {
                if let Some((seq, value)) = link.pop_front() {
                    match rx.on_data(seq, || now) {
                        Accept::Deliver => delivered.push(value),
                        Accept::Duplicate => {}
                        Accept::Gap { expected, got } => panic!("gap: expected {expected}, got {got}"),
                    }
                }
            };

            for op in ops {
                match op {
                    Op::Send => {
                        let seq = tx.push(next_value, 8, now).expect("room");
                        link.push_back((seq, next_value));
                        next_value += 1;
                    }
                    Op::Deliver => deliver(&mut link, &mut rx, now, &mut delivered),
                    Op::Ack => {
                        if rx.ack_due(now) {
                            tx.on_ack(rx.take_ack()).expect("valid ack");
                        }
                    }
                    Op::Cut => {
                        link.clear();
                        let replay: Vec<_> = tx.resume(rx.last_received()).expect("resume").map(|m| (m.seq, m.item)).collect();
                        link.extend(replay);
                    }
                    Op::Tick => now += Duration::from_millis(3),
                }
            }
            // Drain: one last cut and resume, then deliver everything.
            link.clear();
            let replay: Vec<_> = tx.resume(rx.last_received()).expect("resume").map(|m| (m.seq, m.item)).collect();
            link.extend(replay);
            while !link.is_empty() {
                deliver(&mut link, &mut rx, now, &mut delivered);
            }
            tx.on_ack(rx.take_ack()).expect("valid ack");
            let expected: Vec<u64> = (1..next_value).collect();
            prop_assert_eq!(delivered, expected);
            prop_assert!(tx.is_empty());
        }
    }
}
