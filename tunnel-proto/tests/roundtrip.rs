//! Round trips of every message type through both codecs, and decoder errors.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::json;
use tunnel_proto::messages::{
    Close, Command, Event, Gvr, Handshake, HandshakeAck, ObjectRef, ReconnectHint, Resource,
    ResourceOp, Resume, Status, TypedMessage,
};
use tunnel_proto::{
    DecodeError, Envelope, ErrorBody, Format, Limits, MessageType, Payload, header,
};

fn roundtrip(format: Format, env: &Envelope) -> Envelope {
    let codec = format.codec();
    let mut buf = Vec::new();
    codec.encode(env, &mut buf).expect("encode");
    codec
        .decode(&Bytes::from(buf), &Limits::default())
        .expect("decode")
}

fn typed_roundtrip<T: TypedMessage + PartialEq + std::fmt::Debug>(msg: T) {
    for format in Format::ALL {
        let env = msg
            .to_envelope(42, 1_700_000_000_123, format)
            .expect("wrap")
            .with_seq(7)
            .with_ack(3);
        let back = roundtrip(format, &env);
        assert_eq!(back, env, "{format}");
        assert_eq!(back.kind, T::TYPE);
        assert_eq!(T::from_envelope(&back).expect("typed"), msg, "{format}");
    }
}

fn gvr() -> Gvr {
    Gvr::new("apps", "v1", "deployments")
}

#[test]
fn handshake_roundtrips() {
    let mut hs = Handshake::new("root:org:ws", "cluster-1");
    hs.capabilities = vec!["deflate".into(), "resume".into()];
    hs.metadata = BTreeMap::from([("agent".to_string(), "0.1.0".to_string())]);
    hs.token = Some("t0k3n".into());
    hs.resume = Some(Resume {
        session_id: "s-1".into(),
        last_received: 99,
    });
    typed_roundtrip(hs);
}

#[test]
fn handshake_ack_roundtrips() {
    typed_roundtrip(HandshakeAck {
        version: 1,
        session_id: "0123456789abcdef".into(),
        capabilities: vec!["resume".into()],
        resumed: true,
        last_received: Some(12),
    });
}

#[test]
fn close_roundtrips() {
    typed_roundtrip(Close {
        code: 1001,
        reason: "draining".into(),
        reconnect: Some(ReconnectHint {
            after_ms: Some(2500),
            endpoints: vec!["ws://127.0.0.1:7071".into()],
        }),
    });
}

#[test]
fn resource_roundtrips_for_every_op() {
    for op in [
        ResourceOp::Create,
        ResourceOp::Update,
        ResourceOp::Delete,
        ResourceOp::Other("patch".into()),
    ] {
        typed_roundtrip(Resource {
            op,
            gvr: gvr(),
            namespace: Some("default".into()),
            name: "web".into(),
            object: Some(json!({"spec": {"replicas": 3}, "labels": {"app": "web"}})),
        });
    }
}

#[test]
fn status_roundtrips() {
    typed_roundtrip(Status {
        gvr: gvr(),
        namespace: None,
        name: "web".into(),
        status: json!({"readyReplicas": 3, "conditions": [{"type": "Available", "status": "True"}]}),
        observed_generation: Some(4),
    });
}

#[test]
fn event_roundtrips() {
    typed_roundtrip(Event {
        event_type: "Warning".into(),
        reason: "FailedMount".into(),
        message: "volume \"data\" not found — retrying".into(),
        regarding: Some(ObjectRef {
            gvr: Gvr::new("", "v1", "pods"),
            namespace: Some("default".into()),
            name: "web-0".into(),
        }),
    });
}

#[test]
fn command_roundtrips() {
    typed_roundtrip(Command::new("restart").arg("pod", "web-0").arg("grace", 30));
}

#[test]
fn control_messages_roundtrip_without_payload() {
    for kind in [
        MessageType::Ping,
        MessageType::Pong,
        MessageType::Ack,
        MessageType::Window,
    ] {
        for format in Format::ALL {
            let env = Envelope::new(u64::MAX, kind.clone(), 0)
                .with_ack(u64::MAX - 1)
                .with_correlation(5);
            assert_eq!(roundtrip(format, &env), env);
        }
    }
}

#[test]
fn reply_with_error_and_headers_roundtrips() {
    for format in Format::ALL {
        let env = Envelope::new(9, MessageType::Reply, 1)
            .with_correlation(8)
            .with_header(
                header::TRACEPARENT,
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .with_header("x-custom", "quote \" and \\ and \u{1F600}")
            .with_error(ErrorBody::new("handler_error", "no such pod \"web-9\""));
        assert_eq!(roundtrip(format, &env), env);
    }
}

#[test]
fn unknown_types_are_surfaced_not_fatal() {
    for format in Format::ALL {
        let env = Envelope::new(1, MessageType::from_wire("telemetry.v2"), 5)
            .with_payload(Payload::encode(format, &json!({"x": 1})).expect("payload"));
        let back = roundtrip(format, &env);
        assert_eq!(back.kind, MessageType::Unknown("telemetry.v2".into()));
        assert_eq!(back, env);
    }
}

#[test]
fn unknown_fields_are_surfaced_not_fatal() {
    let frame = br#"{"id":1,"type":"event","ts":2,"future":{"nested":[1,2,{"a":null}]},"prio":"high","payload":{"reason":"Synced","type":"Normal","extra":true}}"#;
    let env = Format::Json
        .codec()
        .decode(&Bytes::from_static(frame), &Limits::default())
        .expect("decode");
    assert_eq!(env.unknown_fields, vec!["future", "prio"]);
    let event: Event = env.decode_payload().expect("payload with unknown field");
    assert_eq!(event.reason, "Synced");

    // The same in MessagePack, built from the JSON through a generic map.
    let value: serde_json::Value = serde_json::from_slice(frame).expect("json");
    let mut map = value.as_object().expect("object").clone();
    let payload = rmp_serde::to_vec_named(&map.remove("payload")).expect("payload");
    map.insert("payload".into(), json!(null));
    let mut mp = rmp_serde::to_vec_named(&map).expect("msgpack");
    // Replace the null payload with a bin holding the encoded payload.
    let null_at = mp.iter().rposition(|b| *b == 0xc0).expect("nil marker");
    mp.splice(null_at..=null_at, {
        let mut bin = Vec::new();
        rmp::encode::write_bin(&mut bin, &payload).expect("bin");
        bin
    });
    let env = Format::MsgPack
        .codec()
        .decode(&Bytes::from(mp), &Limits::default())
        .expect("decode msgpack");
    assert_eq!(env.unknown_fields, vec!["future", "prio"]);
    assert_eq!(
        env.decode_payload::<Event>().expect("payload").reason,
        "Synced"
    );
}

#[test]
fn payload_is_sliced_from_the_frame_not_copied() {
    for format in Format::ALL {
        let codec = format.codec();
        let env = Envelope::new(1, MessageType::Resource, 0)
            .with_payload(Payload::encode(format, &json!({"big": "x".repeat(1000)})).expect("p"));
        let mut buf = Vec::new();
        codec.encode(&env, &mut buf).expect("encode");
        let frame = Bytes::from(buf);
        let back = codec.decode(&frame, &Limits::default()).expect("decode");
        let payload = back.payload.expect("payload");
        let range = frame.as_ptr() as usize..frame.as_ptr() as usize + frame.len();
        assert!(
            range.contains(&(payload.bytes().as_ptr() as usize)),
            "{format}: payload was copied"
        );
    }
}

#[test]
fn payloads_are_transcoded_when_formats_differ() {
    let value = json!({"name": "web", "replicas": 3, "tags": ["a", "b"]});
    for (payload_format, codec_format) in [
        (Format::Json, Format::MsgPack),
        (Format::MsgPack, Format::Json),
    ] {
        let env = Envelope::new(1, MessageType::Status, 0)
            .with_payload(Payload::encode(payload_format, &value).expect("payload"));
        let back = roundtrip(codec_format, &env);
        let payload = back.payload.as_ref().expect("payload");
        assert_eq!(payload.format(), codec_format);
        assert_eq!(payload.decode::<serde_json::Value>().expect("value"), value);
    }
}

#[cfg(feature = "compression")]
#[test]
fn compressed_payloads_roundtrip_in_both_codecs() {
    let status = Status {
        gvr: gvr(),
        namespace: Some("default".into()),
        name: "web".into(),
        status: json!({"log": "the same line again\n".repeat(200)}),
        observed_generation: None,
    };
    for format in Format::ALL {
        let mut env = status.to_envelope(1, 0, format).expect("wrap");
        let plain_len = env.payload.as_ref().expect("payload").len();
        assert!(env.compress_payload(1024));
        let mut back = roundtrip(format, &env);
        assert_eq!(back, env, "{format}");
        assert!(back.payload.as_ref().expect("payload").len() < plain_len / 4);
        back.decompress_payload(&Limits::default())
            .expect("inflate");
        assert_eq!(Status::from_envelope(&back).expect("typed"), status);
    }
}

fn decode(format: Format, frame: &[u8]) -> Result<Envelope, DecodeError> {
    format
        .codec()
        .decode(&Bytes::copy_from_slice(frame), &Limits::default())
}

#[test]
fn oversized_frames_are_rejected_before_parsing() {
    let limits = Limits::default().max_message_size(64);
    let frame = Bytes::from(vec![b' '; 65]);
    for format in Format::ALL {
        assert_eq!(
            format.codec().decode(&frame, &limits),
            Err(DecodeError::TooLarge {
                size: 65,
                limit: 64
            })
        );
    }
}

#[test]
fn json_errors_name_what_was_wrong() {
    assert_eq!(
        decode(Format::Json, br#"{"id":1,"type":"ev"#),
        Err(DecodeError::Truncated)
    );
    assert_eq!(
        decode(Format::Json, br#"{"type":"event","ts":1}"#),
        Err(DecodeError::MissingField("id"))
    );
    assert!(matches!(
        decode(Format::Json, br#"{"id":"one","type":"event","ts":1}"#),
        Err(DecodeError::BadField { field: "id", .. })
    ));
    assert!(matches!(
        decode(Format::Json, br#"{"id":-1,"type":"event","ts":1}"#),
        Err(DecodeError::BadField { field: "id", .. })
    ));
    assert!(matches!(
        decode(Format::Json, br#"{"id":1,"id":2,"type":"event","ts":1}"#),
        Err(DecodeError::BadField { field: "id", .. })
    ));
    assert!(matches!(
        decode(
            Format::Json,
            br#"{"id":1,"type":"event","ts":1,"headers":{"a":1}}"#
        ),
        Err(DecodeError::BadField {
            field: "headers",
            ..
        })
    ));
    assert!(matches!(
        decode(Format::Json, b"[1,2,3]"),
        Err(DecodeError::Malformed { .. })
    ));
    assert!(matches!(
        decode(Format::Json, br#"{"id":1,"type":"ping","ts":1} trailing"#),
        Err(DecodeError::Malformed { .. })
    ));
    assert!(matches!(
        decode(Format::Json, br#"{"id":1,"type":"event","ts":1,"headers":{"content-encoding":"deflate"},"payload":{"a":1}}"#),
        Err(DecodeError::BadField { field: "payload", .. })
    ));
}

#[test]
fn too_many_headers_is_a_typed_error() {
    let mut frame = String::from(r#"{"id":1,"type":"event","ts":1,"headers":{"#);
    for i in 0..70 {
        if i > 0 {
            frame.push(',');
        }
        frame.push_str(&format!("\"h{i}\":\"v\""));
    }
    frame.push_str("}}");
    assert!(matches!(
        decode(Format::Json, frame.as_bytes()),
        Err(DecodeError::TooManyHeaders { limit: 64, .. })
    ));
}

#[test]
fn msgpack_errors_name_what_was_wrong() {
    let env = Envelope::new(1, MessageType::Event, 2)
        .with_payload(Payload::msgpack(&json!({"a": 1})).expect("payload"));
    let mut buf = Vec::new();
    Format::MsgPack
        .codec()
        .encode(&env, &mut buf)
        .expect("encode");
    for cut in 1..buf.len() {
        assert_eq!(
            decode(Format::MsgPack, &buf[..cut]),
            Err(DecodeError::Truncated),
            "cut at {cut}"
        );
    }
    let mut trailing = buf.clone();
    trailing.push(0x01);
    assert!(matches!(
        decode(Format::MsgPack, &trailing),
        Err(DecodeError::Malformed { .. })
    ));
    // A bin claiming 4 GiB in a 20-byte frame: truncated, nothing allocated.
    let mut huge = Vec::new();
    rmp::encode::write_map_len(&mut huge, 4).expect("w");
    for (k, v) in [("id", 1u64), ("ts", 1)] {
        rmp::encode::write_str(&mut huge, k).expect("w");
        rmp::encode::write_uint(&mut huge, v).expect("w");
    }
    rmp::encode::write_str(&mut huge, "type").expect("w");
    rmp::encode::write_str(&mut huge, "event").expect("w");
    rmp::encode::write_str(&mut huge, "payload").expect("w");
    rmp::encode::write_bin_len(&mut huge, u32::MAX).expect("w");
    assert_eq!(decode(Format::MsgPack, &huge), Err(DecodeError::Truncated));
    // A string where the id should be.
    let mut bad = Vec::new();
    rmp::encode::write_map_len(&mut bad, 1).expect("w");
    rmp::encode::write_str(&mut bad, "id").expect("w");
    rmp::encode::write_str(&mut bad, "one").expect("w");
    assert!(matches!(
        decode(Format::MsgPack, &bad),
        Err(DecodeError::BadField { field: "id", .. })
    ));
}

#[test]
fn payload_constructors_validate_bytes() {
    assert!(Payload::from_encoded(Format::Json, &b"{\"a\":1}"[..]).is_ok());
    assert!(Payload::from_encoded(Format::Json, &b"{\"a\":"[..]).is_err());
    assert!(Payload::from_encoded(Format::MsgPack, &[0x81u8, 0xa1, b'a', 0x01][..]).is_ok());
    assert!(Payload::from_encoded(Format::MsgPack, &[0x81u8, 0xa1][..]).is_err());
    assert!(Payload::from_encoded(Format::MsgPack, &[0x01u8, 0x02][..]).is_err());
}

#[test]
fn subprotocols_select_codecs() {
    assert_eq!(
        Format::from_subprotocol("tunnel.v1.json"),
        Some(Format::Json)
    );
    assert_eq!(
        Format::from_subprotocol("tunnel.v1.msgpack"),
        Some(Format::MsgPack)
    );
    assert_eq!(Format::from_subprotocol("tunnel.v9.cbor"), None);
    for format in Format::ALL {
        assert_eq!(format.codec().subprotocol(), format.subprotocol());
        assert_eq!(format.codec().format(), format);
    }
}

#[test]
fn msgpack_nesting_and_huge_counts_are_bounded() {
    // An unknown field nested 200 arrays deep: rejected at the depth limit, no overflow.
    let mut deep = Vec::new();
    rmp::encode::write_map_len(&mut deep, 4).expect("w");
    for (k, v) in [("id", 1u64), ("ts", 1)] {
        rmp::encode::write_str(&mut deep, k).expect("w");
        rmp::encode::write_uint(&mut deep, v).expect("w");
    }
    rmp::encode::write_str(&mut deep, "type").expect("w");
    rmp::encode::write_str(&mut deep, "event").expect("w");
    rmp::encode::write_str(&mut deep, "future").expect("w");
    for _ in 0..200 {
        rmp::encode::write_array_len(&mut deep, 1).expect("w");
    }
    rmp::encode::write_nil(&mut deep).expect("w");
    assert!(matches!(
        decode(Format::MsgPack, &deep),
        Err(DecodeError::Malformed { .. })
    ));

    // A map claiming 4 billion entries in a few bytes: truncated at once.
    let mut huge = Vec::new();
    rmp::encode::write_map_len(&mut huge, u32::MAX).expect("w");
    rmp::encode::write_str(&mut huge, "id").expect("w");
    rmp::encode::write_uint(&mut huge, 1).expect("w");
    assert_eq!(decode(Format::MsgPack, &huge), Err(DecodeError::Truncated));

    // A header map claiming more entries than the limit is refused before reading them.
    let mut headers = Vec::new();
    rmp::encode::write_map_len(&mut headers, 1).expect("w");
    rmp::encode::write_str(&mut headers, "headers").expect("w");
    rmp::encode::write_map_len(&mut headers, 1_000_000).expect("w");
    assert!(matches!(
        decode(Format::MsgPack, &headers),
        Err(DecodeError::TooManyHeaders {
            count: 1_000_000,
            limit: 64
        })
    ));
}

#[test]
fn decoding_validated_text_matches_decoding_bytes() {
    let codec = Format::Json.codec();
    let env = Envelope::new(3, MessageType::Event, 9)
        .with_header("x-note", "naïve ☃")
        .with_payload(Payload::json(&json!({"message": "grüße", "n": [1, 2]})).expect("payload"));
    let mut buf = Vec::new();
    codec.encode(&env, &mut buf).expect("encode");
    let frame = Bytes::from(buf);
    let text = std::str::from_utf8(&frame).expect("utf8");
    let limits = Limits::default();
    let via_text = codec
        .decode_text(&frame, text, &limits)
        .expect("decode_text");
    assert_eq!(*via_text, codec.decode(&frame, &limits).expect("decode"));
    assert_eq!(*via_text, env);
    // A `text` that is not the frame's own memory falls back to the byte path.
    let copy = text.to_owned();
    assert_eq!(
        *codec.decode_text(&frame, &copy, &limits).expect("fallback"),
        env
    );
    // Errors are the same either way.
    let bad = Bytes::from_static(br#"{"id":"x","type":"event","ts":1}"#);
    let bad_text = std::str::from_utf8(&bad).expect("utf8");
    assert_eq!(
        codec.decode_text(&bad, bad_text, &limits).map(|env| *env),
        codec.decode(&bad, &limits)
    );
    // MessagePack has no text form: the default goes through `decode_boxed`.
    assert!(
        Format::MsgPack
            .codec()
            .decode_text(&frame, text, &limits)
            .is_err()
    );
}

#[test]
fn null_optional_fields_mean_absent_in_both_codecs() {
    let frame = br#"{"id":1,"type":"event","ts":2,"seq":null,"ack":null,"corr":null,"headers":null,"error":null}"#;
    let env = Format::Json
        .codec()
        .decode(&Bytes::from_static(frame), &Limits::default())
        .expect("nulls are absent");
    assert!(env.headers.is_empty());
    assert_eq!((env.seq, env.ack, env.correlation), (None, None, None));
    assert!(env.error.is_none());
    // MessagePack nil, built from the same JSON.
    let value: serde_json::Value = serde_json::from_slice(frame).expect("json");
    let mp = rmp_serde::to_vec_named(&value).expect("msgpack");
    let env = Format::MsgPack
        .codec()
        .decode(&Bytes::from(mp), &Limits::default())
        .expect("nil is absent");
    assert!(env.headers.is_empty() && env.seq.is_none());
}

/// PROTOCOL.md, section 7: the nesting limit covers the envelope, not the payload,
/// which decoding an envelope never parses (a JSON payload is only checked to be
/// well-formed, at any depth, without recursion).
#[test]
fn the_nesting_limit_does_not_cover_payloads() {
    let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    let frame = |payload: &str| format!(r#"{{"id":1,"type":"event","ts":2,"payload":{payload}}}"#);
    let decode = |text: String| {
        Format::Json
            .codec()
            .decode(&Bytes::from(text), &Limits::default())
    };
    let env = decode(frame(&deep(1_000_000))).expect("deep payloads are the handler's to read");
    assert!(
        env.decode_payload::<serde_json::Value>().is_err(),
        "serde_json's own limit"
    );
    // Malformed at any depth is still refused.
    let err = decode(frame(&format!("{}1", "[".repeat(1_000_000)))).expect_err("malformed");
    assert_eq!(
        err.close_code(),
        tunnel_proto::CloseCode::INVALID_PAYLOAD,
        "{err}"
    );
}
