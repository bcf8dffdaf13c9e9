//! The handshake and its refusals (PROTOCOL.md section 5).

use std::time::Instant;

use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use super::{Cx, Verdict, closed_with, closed_with_envelope, fail, need, pass, verdict};
use crate::Codec;
use crate::conn::short;
use crate::wire::{Out, Value};

/// A plain handshake is answered; records what the hub grants over this codec.
pub(crate) async fn ok(cx: Cx<'_>) -> Verdict {
    let (conn, ack) = need!(cx.session().await, "handshake");
    conn.finish().await;
    if ack.env.kind != "handshake_ack" {
        return fail(format!("answered with {}", ack.env.brief()));
    }
    cx.record_grant(&ack);
    pass(ack.brief())
}

pub(crate) async fn ack_id(cx: Cx<'_>) -> Verdict {
    let (conn, ack) = need!(cx.session().await, "handshake");
    conn.finish().await;
    verdict(
        ack.env.id == Some(0),
        format!("want id 0; {}", ack.env.brief()),
    )
}

pub(crate) async fn ack_corr(cx: Cx<'_>) -> Verdict {
    let (conn, ack) = need!(cx.session().await, "handshake");
    conn.finish().await;
    verdict(
        ack.env.corr == Some(0),
        format!("handshake id 0, {}", ack.env.brief()),
    )
}

pub(crate) async fn ack_version(cx: Cx<'_>) -> Verdict {
    // A wide range: the hub must pick a version in it (and in its own).
    let mut hs = cx.hs();
    hs.versions = (1, 200);
    let (conn, ack) = need!(cx.session_with(&hs).await, "handshake");
    conn.finish().await;
    let ok = ack.version.is_some_and(|v| (1..=200).contains(&v));
    verdict(
        ok,
        format!(
            "offered 1..=200, got version {}",
            ack.env
                .field("version")
                .map_or("(none)".into(), |v| v.to_string())
        ),
    )
}

pub(crate) async fn ack_session_id(cx: Cx<'_>) -> Verdict {
    let (conn, first) = need!(cx.session().await, "first handshake");
    conn.finish().await;
    let (conn, second) = need!(cx.session().await, "second handshake");
    conn.finish().await;
    // 1 to 128 bytes of visible ASCII (an agent refuses any other).
    let form =
        |id: &str| (1..=128).contains(&id.len()) && id.bytes().all(|b| (0x21..=0x7e).contains(&b));
    let ok = form(first.session()) && form(second.session());
    verdict(
        ok && first.session() != second.session(),
        format!(
            "session ids {} then {} (1-128 visible ASCII bytes; new sessions differ)",
            describe_id(first.session()),
            describe_id(second.session()),
        ),
    )
}

fn describe_id(id: &str) -> String {
    if id.is_empty() {
        "(none)".into()
    } else {
        short(id)
    }
}

pub(crate) async fn ack_capabilities(cx: Cx<'_>) -> Verdict {
    let offers: [&[&str]; 3] = [
        &[
            "replies",
            "resume",
            "deflate",
            "trace-context",
            "x-conformance-unknown",
        ],
        &["replies"],
        &[],
    ];
    let mut ok = true;
    let mut saw = Vec::new();
    for offer in offers {
        let mut hs = cx.hs();
        hs.capabilities = offer.iter().map(|s| s.to_string()).collect();
        let (conn, ack) = need!(
            cx.session_with(&hs).await,
            format!("handshake offering [{}]", offer.join(","))
        );
        conn.finish().await;
        let extra: Vec<&String> = ack
            .capabilities
            .iter()
            .filter(|c| !offer.contains(&c.as_str()) || c.as_str() == "x-conformance-unknown")
            .collect();
        let typed = match ack.env.field("capabilities") {
            None | Some(Value::Nil) => true,
            Some(Value::Array(items)) => items.iter().all(|i| i.as_str().is_some()),
            Some(_) => false,
        };
        ok &= extra.is_empty() && typed;
        saw.push(format!(
            "offered [{}] granted {}",
            offer.join(","),
            ack.env
                .field("capabilities")
                .map_or("(none)".into(), |v| v.to_string())
        ));
    }
    verdict(ok, saw.join("; "))
}

pub(crate) async fn null_fields(cx: Cx<'_>) -> Verdict {
    let mut conn = need!(cx.open().await, "upgrade");
    let hs = cx
        .hs()
        .envelope()
        .with("seq", Value::Nil)
        .with("ack", Value::Nil)
        .with("corr", Value::Nil)
        .with("headers", Value::Nil)
        .with("error", Value::Nil);
    need!(conn.send(&hs).await, "send");
    let ack = need!(
        conn.wait("handshake_ack", |e| e.kind == "handshake_ack")
            .await,
        "handshake with null seq/ack/corr/headers/error"
    );
    let id = conn.id();
    let ping = Out::new(id, "ping")
        .with("headers", Value::Nil)
        .with("corr", Value::Nil)
        .with("seq", Value::Nil);
    need!(conn.send(&ping).await, "send");
    let pong = need!(
        conn.wait("pong", |e| e.kind == "pong" && e.corr == Some(id))
            .await,
        "ping with null headers/corr/seq"
    );
    conn.finish().await;
    pass(format!("{}, then {}", ack.brief(), pong.brief()))
}

pub(crate) async fn unknown_fields(cx: Cx<'_>) -> Verdict {
    let mut conn = need!(cx.open().await, "upgrade");
    let mut payload = cx.hs().payload();
    if let Value::Map(fields) = &mut payload {
        fields.push(("x-conformance-field".into(), Value::str("ignored")));
    }
    let hs = Out::new(0, "handshake")
        .with(
            "x-conformance",
            Value::map([("nested", Value::Array(vec![Value::UInt(1)]))]),
        )
        .payload(payload);
    need!(conn.send(&hs).await, "send");
    let ack = need!(
        conn.wait("handshake_ack", |e| e.kind == "handshake_ack")
            .await,
        "handshake with unknown envelope and payload fields"
    );
    conn.finish().await;
    pass(ack.brief())
}

pub(crate) async fn fragmented(cx: Cx<'_>) -> Verdict {
    let mut conn = need!(cx.open().await, "upgrade");
    let bytes = cx.hs().envelope().encode(cx.codec);
    let third = bytes.len() / 3;
    let opcode = match cx.codec {
        Codec::Json => Data::Text,
        Codec::MsgPack => Data::Binary,
    };
    let parts = [
        Frame::message(bytes[..third].to_vec(), OpCode::Data(opcode), false),
        Frame::message(
            bytes[third..2 * third].to_vec(),
            OpCode::Data(Data::Continue),
            false,
        ),
        Frame::message(
            bytes[2 * third..].to_vec(),
            OpCode::Data(Data::Continue),
            true,
        ),
    ];
    for part in parts {
        need!(conn.send_frame(Message::Frame(part)).await, "send");
    }
    let ack = need!(
        conn.wait("handshake_ack", |e| e.kind == "handshake_ack")
            .await,
        "handshake in three fragments"
    );
    conn.finish().await;
    pass(format!("3 fragments: {}", ack.brief()))
}

/// Sends `frame` as the first message and expects the hub to refuse with `code`.
async fn refused(cx: Cx<'_>, frame: Message, code: u16, with_envelope: bool) -> Verdict {
    let mut conn = need!(cx.open().await, "upgrade");
    need!(conn.send_frame(frame).await, "send");
    let closed = conn.expect_close().await;
    if with_envelope {
        closed_with_envelope(&closed, code)
    } else {
        closed_with(&closed, code)
    }
}

fn frame(cx: &Cx<'_>, out: &Out) -> Message {
    let bytes = out.encode(cx.codec);
    match cx.codec {
        Codec::Json => Message::text(String::from_utf8_lossy(&bytes).into_owned()),
        Codec::MsgPack => Message::binary(bytes),
    }
}

pub(crate) async fn first_not_handshake(cx: Cx<'_>) -> Verdict {
    let ping = frame(&cx, &Out::new(1, "ping"));
    refused(cx, ping, 4001, true).await
}

pub(crate) async fn version_mismatch(cx: Cx<'_>) -> Verdict {
    let mut hs = cx.hs();
    hs.versions = (65000, 65000);
    let mut conn = need!(cx.open().await, "upgrade");
    need!(conn.send(&hs.envelope()).await, "send");
    let closed = conn.expect_close().await;
    let corr = closed.envelope.as_ref().and_then(|e| e.corr);
    let ok = closed.code() == Some(4002) && closed.envelope_code() == Some(4002) && corr == Some(0);
    verdict(
        ok,
        format!(
            "offered 65000..=65000: {}, envelope corr {}",
            closed.describe(),
            corr.map_or("(none)".into(), |c| c.to_string())
        ),
    )
}

pub(crate) async fn identity_mismatch(cx: Cx<'_>) -> Verdict {
    let mut hs = cx.hs();
    hs.sync_target = format!("{}-other", hs.sync_target);
    let f = frame(&cx, &hs.envelope());
    refused(cx, f, 4003, false).await
}

pub(crate) async fn bad_payload(cx: Cx<'_>) -> Verdict {
    // A handshake payload without `versions` (a required field).
    let payload = Value::map([
        ("sync_target", Value::str(&cx.cfg().sync_target)),
        ("workspace", Value::str(&cx.cfg().workspace)),
    ]);
    let f = frame(&cx, &Out::new(0, "handshake").payload(payload));
    refused(cx, f, 4003, false).await
}

pub(crate) async fn wrong_frame_kind(cx: Cx<'_>) -> Verdict {
    let f = match cx.codec {
        Codec::Json => Message::binary(cx.hs().envelope().encode(Codec::Json)),
        Codec::MsgPack => Message::text(
            String::from_utf8_lossy(&cx.hs().envelope().encode(Codec::Json)).into_owned(),
        ),
    };
    refused(cx, f, 1003, false).await
}

pub(crate) async fn undecodable(cx: Cx<'_>) -> Verdict {
    let f = match cx.codec {
        Codec::Json => Message::text("{\"id\":0,\"type\":\"handshake\",\"ts\":"),
        Codec::MsgPack => Message::binary(vec![0xc1, 0x00]),
    };
    refused(cx, f, 1007, false).await
}

/// A handshake with `size` bytes of metadata padding.
fn padded_handshake(cx: &Cx<'_>, size: usize) -> Out {
    let mut payload = cx.hs().payload();
    if let Value::Map(fields) = &mut payload {
        fields.retain(|(k, _)| k != "metadata");
        fields.push((
            "metadata".into(),
            Value::map([("padding", Value::str("p".repeat(size)))]),
        ));
    }
    Out::new(0, "handshake").payload(payload)
}

pub(crate) async fn size_under_limit(cx: Cx<'_>) -> Verdict {
    // 48 KiB: within the 64 KiB allowed before the handshake.
    let out = padded_handshake(&cx, 48 << 10);
    let mut conn = need!(cx.open().await, "upgrade");
    need!(conn.send(&out).await, "send");
    let ack = need!(
        conn.wait("handshake_ack", |e| e.kind == "handshake_ack")
            .await,
        "48 KiB handshake"
    );
    conn.finish().await;
    pass(format!("48 KiB handshake: {}", ack.brief()))
}

pub(crate) async fn size_limit(cx: Cx<'_>) -> Verdict {
    // A handshake of 1 MiB: over the 64 KiB allowed before the handshake.
    let f = frame(&cx, &padded_handshake(&cx, 1 << 20));
    let mut conn = need!(cx.open().await, "upgrade");
    let (sent, closed) = conn.send_expecting_close(f, cx.step()).await;
    let ok = closed.code() == Some(1009) && closed.ended;
    verdict(
        ok,
        format!(
            "1 MiB handshake{}: {}",
            sent.err()
                .map_or(String::new(), |e| format!(" (send: {e})")),
            closed.describe()
        ),
    )
}

pub(crate) async fn timeout(cx: Cx<'_>) -> Verdict {
    let started = Instant::now();
    let mut conn = need!(cx.open().await, "upgrade");
    let wait = cx.cfg().handshake_timeout + cx.step();
    let closed = conn.rx.expect_close(wait).await;
    let after = started.elapsed();
    let too_early = after < cx.cfg().handshake_timeout / 2;
    let ok = closed.code() == Some(4000) && !too_early;
    verdict(
        ok,
        format!(
            "silent for {:.1} s (timeout {:.0} s): {}{}",
            after.as_secs_f64(),
            cx.cfg().handshake_timeout.as_secs_f64(),
            closed.describe(),
            if too_early { ", far too early" } else { "" }
        ),
    )
}
