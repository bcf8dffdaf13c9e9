//! The JSON examples in PROTOCOL.md are decoded here, so the document cannot drift from
//! the code: each must decode, re-encode to the same JSON, and carry a valid typed payload.

use std::collections::BTreeSet;

use bytes::Bytes;
use tunnel_proto::messages::{
    Close, Command, Event, Handshake, HandshakeAck, Resource, Status, TypedMessage,
};
use tunnel_proto::{DecodeError, Envelope, Format, Limits, MessageType};

fn examples() -> Vec<String> {
    let doc = include_str!("../../PROTOCOL.md");
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "```json" {
            let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
            out.push(block.join("\n"));
        }
    }
    out
}

fn ok<T>(decoded: Result<T, DecodeError>) {
    if let Err(e) = decoded {
        panic!("typed payload does not decode: {e}");
    }
}

fn check_typed(env: &Envelope) {
    match env.kind {
        MessageType::Handshake => ok(Handshake::from_envelope(env)),
        MessageType::HandshakeAck => ok(HandshakeAck::from_envelope(env)),
        MessageType::Close => ok(Close::from_envelope(env)),
        MessageType::Resource => ok(Resource::from_envelope(env)),
        MessageType::Status => ok(Status::from_envelope(env)),
        MessageType::Event => ok(Event::from_envelope(env)),
        MessageType::Command => ok(Command::from_envelope(env)),
        _ => {}
    }
}

#[test]
fn protocol_md_examples_decode_and_reencode_identically() {
    let examples = examples();
    assert!(
        examples.len() >= 12,
        "found only {} examples",
        examples.len()
    );
    let codec = Format::Json.codec();
    let mut seen = BTreeSet::new();
    for text in &examples {
        let mut env = codec
            .decode(&Bytes::from(text.clone()), &Limits::default())
            .unwrap_or_else(|e| panic!("example does not decode: {e}\n{text}"));
        assert!(env.unknown_fields.is_empty(), "{text}");
        assert!(!matches!(env.kind, MessageType::Unknown(_)), "{text}");
        seen.insert(env.kind.to_string());

        let mut out = Vec::new();
        codec.encode(&env, &mut out).expect("encode");
        let ours: serde_json::Value = serde_json::from_slice(&out).expect("json");
        let theirs: serde_json::Value = serde_json::from_str(text).expect("json");
        assert_eq!(ours, theirs, "the codec writes this example differently");

        #[cfg(feature = "compression")]
        env.decompress_payload(&Limits::default())
            .unwrap_or_else(|e| panic!("payload does not inflate: {e}\n{text}"));
        check_typed(&env);
    }
    for kind in MessageType::KNOWN {
        assert!(
            seen.contains(kind.as_str()),
            "PROTOCOL.md has no example of `{kind}`"
        );
    }
}
