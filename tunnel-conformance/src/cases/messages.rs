//! After the handshake: keepalive, requests, ids, the envelope's form, limits, closing.

use std::time::Instant;

use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use super::{
    Cx, Verdict, closed_with, command, event, expect_close_after, fail, need, pass, verdict, watch,
};
use crate::Codec;
use crate::conn::{Ev, random_u64};
use crate::wire::{Out, Value};

pub(crate) async fn ping(cx: Cx<'_>) -> Verdict {
    let (mut conn, _) = need!(cx.session().await, "handshake");
    let id = conn.id();
    need!(conn.send(&Out::new(id, "ping")).await, "send");
    let pong = need!(conn.wait("pong", |e| e.kind == "pong").await, "ping");
    conn.finish().await;
    verdict(
        pong.corr == Some(id),
        format!("ping(id={id}) answered by {}", pong.brief()),
    )
}

pub(crate) async fn ping_frame(cx: Cx<'_>) -> Verdict {
    let (mut conn, _) = need!(cx.session().await, "handshake");
    let payload: Vec<u8> = random_u64()
        .to_le_bytes()
        .into_iter()
        .chain(random_u64().to_le_bytes())
        .collect();
    need!(
        conn.send_frame(Message::Ping(payload.clone().into())).await,
        "send"
    );
    let deadline = Instant::now() + cx.step();
    let v = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.rx.recv(left).await {
            Ev::Pong(p) if p == payload => {
                break pass(format!("pong frame echoing the {} bytes", p.len()));
            }
            Ev::Pong(p) => break fail(format!("pong frame with other payload {p:02x?}")),
            Ev::Env(..) | Ev::Ping => {}
            Ev::Timeout => break fail("no pong frame"),
            other => break fail(format!("{other:?} instead of a pong frame")),
        }
    };
    conn.finish().await;
    v
}

/// Sends a request of `kind` and expects exactly one reply to it.
async fn one_reply(cx: Cx<'_>, kind: &str, payload: Value) -> Verdict {
    let (mut conn, _) = need!(cx.session().await, "handshake");
    let id = conn.id();
    need!(
        conn.send(&Out::new(id, kind).request().payload(payload))
            .await,
        "send"
    );
    let reply = need!(
        conn.wait("reply", |e| e.kind == "reply" && e.corr == Some(id))
            .await,
        format!("request {kind}(id={id})")
    );
    let (more, _) = conn.rx.quiet(cx.quiet()).await;
    let extra = more
        .iter()
        .filter(|(e, _)| e.kind == "reply" && e.corr == Some(id))
        .count();
    conn.finish().await;
    verdict(
        extra == 0,
        format!(
            "{kind}(id={id}) answered by {}{}",
            reply.brief(),
            if extra > 0 {
                format!(", then {extra} more replies")
            } else {
                format!(", no second reply in {} ms", cx.quiet().as_millis())
            }
        ),
    )
}

pub(crate) async fn reply(cx: Cx<'_>) -> Verdict {
    one_reply(cx, "command", command("conformance-probe")).await
}

pub(crate) async fn unknown_type(cx: Cx<'_>) -> Verdict {
    one_reply(
        cx,
        "x-conformance-type",
        Value::map([("any", Value::UInt(1))]),
    )
    .await
}

pub(crate) async fn one_way_silent(cx: Cx<'_>) -> Verdict {
    let (mut conn, _) = need!(cx.session().await, "handshake");
    let id = conn.id();
    need!(
        conn.send(&Out::new(id, "event").payload(event())).await,
        "send"
    );
    let (got, end) = conn.rx.quiet(cx.quiet()).await;
    let replies = got
        .iter()
        .filter(|(e, _)| e.kind == "reply" && e.corr == Some(id))
        .count();
    conn.finish().await;
    if let Some(end) = end {
        return fail(format!("one-way event(id={id}), then {end:?}"));
    }
    verdict(
        replies == 0,
        format!(
            "one-way event(id={id}): {replies} replies in {} ms",
            cx.quiet().as_millis()
        ),
    )
}

pub(crate) async fn ids_unique(cx: Cx<'_>) -> Verdict {
    let (mut conn, ack) = need!(cx.session().await, "handshake");
    let resume = ack.grants("resume");
    let mut w = super::Watch::default();
    let mut seq = 0;
    // Three rounds of: a ping (a pong), a one-way event with seq (a standalone ack, with
    // sessions), a request (a reply). Each waits for its answers, so that acks do not
    // all ride on one message.
    for _ in 0..3 {
        let ping = conn.id();
        need!(conn.send(&Out::new(ping, "ping")).await, "send");
        if resume {
            seq += 1;
            let id = conn.id();
            need!(
                conn.send(&Out::new(id, "event").seq(seq).payload(event()))
                    .await,
                "send"
            );
        }
        let request = conn.id();
        let mut out = Out::new(request, "command")
            .request()
            .payload(command("conformance-ids"));
        if resume {
            seq += 1;
            out = out.seq(seq);
        }
        // Not sent before the event's ack, when there is one to wait for.
        let acked = seq.saturating_sub(1);
        let part = watch(&mut conn, cx.step(), |p| {
            p.all
                .iter()
                .any(|e| e.kind == "pong" && e.corr == Some(ping))
                && (!resume || p.max_ack() >= Some(acked))
        })
        .await;
        w.all.extend(part.all);
        need!(conn.send(&out).await, "send");
        let part = watch(&mut conn, cx.step(), |p| {
            !p.replies_to(request).is_empty() && (!resume || p.max_ack() >= Some(seq))
        })
        .await;
        let answered = !part.replies_to(request).is_empty();
        w.all.extend(part.all);
        if !answered {
            conn.finish().await;
            return fail(format!("request(id={request}) not answered: {}", w.brief()));
        }
    }
    // Ids from different counters (one per connection for pongs, another for replies)
    // collide only once the first catches up: ping on until the pongs' ids pass every
    // other id seen.
    let other_max = w
        .all
        .iter()
        .filter(|e| e.kind != "pong")
        .filter_map(|e| e.id)
        .max()
        .unwrap_or(0);
    let more = super::pings_past(&mut conn, other_max, cx.step()).await;
    w.all.extend(more);
    // End with a hub close: its `close` envelope is numbered too.
    let provoke = if resume {
        let id = conn.id();
        conn.send(&Out::new(id, "event").seq(seq + 5).payload(event()))
            .await
    } else {
        let garbage = conn.data_frame(b"\xc1not an envelope".to_vec());
        conn.send_frame(garbage).await
    };
    if provoke.is_ok() {
        let closed = conn.expect_close().await;
        if let Some(env) = closed.envelope {
            w.all.push(env);
        }
    }
    let problems = super::id_problems(&w.all);
    let kinds = ["pong", "ack", "reply", "close"]
        .iter()
        .map(|k| format!("{} {k}", w.count(k)))
        .collect::<Vec<_>>()
        .join(", ");
    let order: Vec<String> = w
        .all
        .iter()
        .take(12)
        .map(|e| {
            format!(
                "{}{}",
                e.kind.chars().next().unwrap_or('?'),
                e.id.unwrap_or(0)
            )
        })
        .collect();
    if problems.is_empty() {
        pass(format!(
            "{} envelopes ({kinds}), ids unique: {}",
            w.all.len(),
            order.join(" ")
        ))
    } else {
        fail(format!(
            "{} envelopes ({kinds}): {}",
            w.all.len(),
            problems.join("; ")
        ))
    }
}

pub(crate) async fn unknown_field(cx: Cx<'_>) -> Verdict {
    let (mut conn, _) = need!(cx.session().await, "handshake");
    let id = conn.id();
    let ping = Out::new(id, "ping").with(
        "x-conformance-extra",
        Value::map([(
            "nested",
            Value::Array(vec![Value::UInt(1), Value::str("a"), Value::Nil]),
        )]),
    );
    need!(conn.send(&ping).await, "send");
    let pong = need!(
        conn.wait("pong", |e| e.kind == "pong" && e.corr == Some(id))
            .await,
        "ping with an unknown field"
    );
    conn.finish().await;
    pass(format!(
        "ping with an unknown field answered by {}",
        pong.brief()
    ))
}

pub(crate) async fn missing_field(cx: Cx<'_>) -> Verdict {
    expect_close_after(cx, Out::new(1, "ping").without("ts"), 1007).await
}

pub(crate) async fn wrong_type(cx: Cx<'_>) -> Verdict {
    expect_close_after(cx, Out::new(1, "ping").set("id", Value::str("one")), 1007).await
}

pub(crate) async fn duplicate_field(cx: Cx<'_>) -> Verdict {
    let out = Out::new(1, "ping").with("ts", Value::UInt(crate::wire::now_ms()));
    expect_close_after(cx, out, 1007).await
}

/// Sends `frame` after the handshake and expects the hub to close with `code`.
async fn frame_closes(cx: Cx<'_>, frame: Message, code: u16) -> Verdict {
    let (mut conn, _) = need!(cx.session().await, "handshake");
    need!(conn.send_frame(frame).await, "send");
    let closed = conn.expect_close().await;
    closed_with(&closed, code)
}

pub(crate) async fn undecodable(cx: Cx<'_>) -> Verdict {
    let frame = match cx.codec {
        Codec::Json => Message::text("{\"id\":1,\"type\":\"ping\",\"ts\":1,,}"),
        Codec::MsgPack => Message::binary(vec![0x83, 0xa2, b'i', b'd', 0xc1]),
    };
    frame_closes(cx, frame, 1007).await
}

pub(crate) async fn wrong_kind(cx: Cx<'_>) -> Verdict {
    let bytes = Out::new(1, "ping").encode(Codec::Json);
    let frame = match cx.codec {
        Codec::Json => Message::binary(bytes),
        Codec::MsgPack => Message::text(String::from_utf8_lossy(&bytes).into_owned()),
    };
    frame_closes(cx, frame, 1003).await
}

pub(crate) async fn invalid_utf8(cx: Cx<'_>) -> Verdict {
    let frame = Frame::message(
        b"{\"id\":1,\"type\":\"\xff\xfe\",\"ts\":1}".to_vec(),
        OpCode::Data(Data::Text),
        true,
    );
    frame_closes(cx, Message::Frame(frame), 1007).await
}

fn with_headers(id: u64, n: usize) -> Out {
    let names: Vec<(String, String)> = (0..n)
        .map(|i| (format!("x-conformance-{i}"), "v".to_string()))
        .collect();
    Out::new(id, "ping").set(
        "headers",
        Value::map(names.into_iter().map(|(k, v)| (k, Value::Str(v)))),
    )
}

pub(crate) async fn headers_64(cx: Cx<'_>) -> Verdict {
    let (mut conn, _) = need!(cx.session().await, "handshake");
    let id = conn.id();
    need!(conn.send(&with_headers(id, 64)).await, "send");
    let pong = need!(
        conn.wait("pong", |e| e.kind == "pong" && e.corr == Some(id))
            .await,
        "ping with 64 headers"
    );
    conn.finish().await;
    pass(format!("ping with 64 headers answered by {}", pong.brief()))
}

pub(crate) async fn headers_65(cx: Cx<'_>) -> Verdict {
    expect_close_after(cx, with_headers(1, 65), 1008).await
}

/// A ping padded (with an unknown field) to more than 16 MiB.
fn oversized(codec: Codec) -> Vec<u8> {
    Out::new(1, "ping")
        .with(
            "x-conformance-padding",
            Value::str("p".repeat((16 << 20) + 64)),
        )
        .encode(codec)
}

pub(crate) async fn message_size(cx: Cx<'_>) -> Verdict {
    let (mut conn, _) = need!(cx.session().await, "handshake");
    let frame = conn.data_frame(oversized(cx.codec));
    let (sent, closed) = conn.send_expecting_close(frame, cx.step()).await;
    let mut v = closed_with(&closed, 1009);
    if let Err(e) = sent {
        v.saw = format!("{} (send: {e})", v.saw);
    }
    v
}

pub(crate) async fn message_size_fragmented(cx: Cx<'_>) -> Verdict {
    let (mut conn, _) = need!(cx.session().await, "handshake");
    let bytes = oversized(cx.codec);
    let half = bytes.len() / 2;
    let opcode = match cx.codec {
        Codec::Json => Data::Text,
        Codec::MsgPack => Data::Binary,
    };
    let first = Frame::message(bytes[..half].to_vec(), OpCode::Data(opcode), false);
    let second = Frame::message(bytes[half..].to_vec(), OpCode::Data(Data::Continue), true);
    let send_first = conn.send_frame(Message::Frame(first)).await;
    let (sent, closed) = if send_first.is_ok() {
        conn.send_expecting_close(Message::Frame(second), cx.step())
            .await
    } else {
        (send_first, conn.expect_close().await)
    };
    let mut v = closed_with(&closed, 1009);
    v.saw = format!(
        "two fragments of {} MiB: {}{}",
        half >> 20,
        v.saw,
        sent.err()
            .map_or(String::new(), |e| format!(" (send: {e})"))
    );
    v
}

pub(crate) async fn payload_depth(cx: Cx<'_>) -> Verdict {
    // The nesting limit covers the envelope, not the payload (which decoding an
    // envelope does not parse): a request whose payload nests 200 deep is delivered.
    let (mut conn, _) = need!(cx.session().await, "handshake");
    let id = conn.id();
    let payload = Value::map([
        ("name", Value::str("conformance-deep")),
        ("args", Value::map([("deep", Value::nested(200))])),
    ]);
    need!(
        conn.send(&Out::new(id, "command").request().payload(payload))
            .await,
        "send"
    );
    let reply = need!(
        conn.wait("reply", |e| e.kind == "reply" && e.corr == Some(id))
            .await,
        "request with a payload nested 200 deep"
    );
    conn.finish().await;
    verdict(
        reply
            .error
            .as_ref()
            .is_none_or(|(code, _)| code != "bad_request"),
        format!("payload nested 200 deep answered by {}", reply.brief()),
    )
}

pub(crate) async fn trailing_bytes(cx: Cx<'_>) -> Verdict {
    let mut bytes = Out::new(1, "ping").encode(Codec::MsgPack);
    bytes.push(0xc0);
    frame_closes(cx, Message::binary(bytes), 1007).await
}

pub(crate) async fn depth(cx: Cx<'_>) -> Verdict {
    let out = Out::new(1, "ping").with("x-conformance-deep", Value::nested(200));
    expect_close_after(cx, out, 1007).await
}

pub(crate) async fn depth_ok(cx: Cx<'_>) -> Verdict {
    let (mut conn, _) = need!(cx.session().await, "handshake");
    let id = conn.id();
    let out = Out::new(id, "ping").with("x-conformance-deep", Value::nested(100));
    need!(conn.send(&out).await, "send");
    let pong = need!(
        conn.wait("pong", |e| e.kind == "pong" && e.corr == Some(id))
            .await,
        "ping with 100 nested arrays"
    );
    conn.finish().await;
    pass(format!(
        "ping with 100 nested arrays answered by {}",
        pong.brief()
    ))
}

pub(crate) async fn close_normal(cx: Cx<'_>) -> Verdict {
    let (mut conn, _) = need!(cx.session().await, "handshake");
    let closed = conn.close_normally().await;
    let ok = closed.frame.is_some() && closed.ended;
    verdict(ok, format!("sent close 1000: {}", closed.describe()))
}

pub(crate) async fn takeover(cx: Cx<'_>) -> Verdict {
    let (mut first, _) = need!(cx.session().await, "first handshake");
    let (mut second, _) = need!(cx.session().await, "second handshake");
    let closed = first.expect_close().await;
    let still = second.ping().await;
    second.finish().await;
    let ok = closed.code() == Some(4004) && closed.envelope_code() == Some(4004) && still.is_ok();
    verdict(
        ok,
        format!(
            "first connection: {}; second: {}",
            closed.describe(),
            match still {
                Ok(p) => format!("open ({})", p.brief()),
                Err(e) => e,
            }
        ),
    )
}
