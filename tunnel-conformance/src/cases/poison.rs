//! Poison messages: a data message the receiver cannot accept is answered with an error
//! `reply` (`corr` its id, `error.code` `bad_request`), one-way or a request; its
//! `seq` still counts as received, and the connection stays open. Plus the positive
//! control: a valid compressed request is handled.

use super::{Cx, OFFERED, Verdict, command, event, fail, need, verdict, watch};
use crate::conn::Hs;
use crate::wire::{self, Out, Value};

/// Inflates to a bit more than 16 MiB.
const BOMB_RUNS: usize = ((16 << 20) + (64 << 10)) / 258;

/// Sends a one-way `event` and a `command` request, both with `content-encoding:
/// encoding` and payload bytes `bytes`, on a connection set up by `hs`. Expects a
/// `bad_request` reply to each, their seqs acknowledged (with sessions), and the
/// connection still open.
async fn poisoned(cx: Cx<'_>, hs: Hs, encoding: &str, bytes: Vec<u8>, what: &str) -> Verdict {
    let (mut conn, ack) = need!(cx.session_with(&hs).await, "handshake");
    let resume = ack.grants("resume");
    let event_id = conn.id();
    let mut one_way = Out::new(event_id, "event")
        .headers(&[("content-encoding", encoding)])
        .payload_bytes(bytes.clone());
    let request_id = conn.id();
    let mut request = Out::new(request_id, "command")
        .headers(&[("content-encoding", encoding), ("expect", "reply")])
        .payload_bytes(bytes);
    if resume {
        one_way = one_way.seq(1);
        request = request.seq(2);
    }
    need!(conn.send(&one_way).await, "send");
    need!(conn.send(&request).await, "send");
    let w = watch(&mut conn, cx.step(), |w| {
        !w.replies_to(event_id).is_empty()
            && !w.replies_to(request_id).is_empty()
            && (!resume || w.max_ack() >= Some(2))
    })
    .await;
    let open = conn.ping().await;
    conn.finish().await;
    let code = |id: u64| {
        w.replies_to(id)
            .first()
            .and_then(|r| r.error.as_ref())
            .map(|(code, _)| code.clone())
    };
    let codes = [code(event_id), code(request_id)];
    let once = w.replies_to(event_id).len() == 1 && w.replies_to(request_id).len() == 1;
    let acked = !resume || w.max_ack() >= Some(2);
    let encoded_replies = w
        .all
        .iter()
        .any(|e| e.kind == "reply" && e.header("content-encoding").is_some());
    // The refusal comes before (or with) the first ack that covers the message.
    let mut overtaken = Vec::new();
    for (id, seq) in [(event_id, 1), (request_id, 2)] {
        let refusal = w
            .all
            .iter()
            .position(|e| e.kind == "reply" && e.corr == Some(id));
        let covering = w.all.iter().position(|e| e.ack.is_some_and(|a| a >= seq));
        if resume
            && let (Some(r), Some(a)) = (refusal, covering)
            && a < r
        {
            overtaken.push(format!("seq {seq} acknowledged before its refusal"));
        }
    }
    let ok = codes.iter().all(|c| c.as_deref() == Some("bad_request"))
        && once
        && acked
        && overtaken.is_empty()
        && open.is_ok()
        && (!encoded_replies || ack.grants("deflate"));
    verdict(
        ok,
        format!(
            "event(id={event_id}) and request(id={request_id}){} {what}: {}{}{}{}",
            if resume { " seq 1, 2" } else { "" },
            w.brief(),
            if overtaken.is_empty() {
                String::new()
            } else {
                format!("; {}", overtaken.join(", "))
            },
            if resume && !acked {
                "; seqs not acknowledged"
            } else {
                ""
            },
            match open {
                Ok(_) => "; still open".to_string(),
                Err(e) => format!("; then {e}"),
            }
        ),
    )
}

pub(crate) async fn bad_deflate(cx: Cx<'_>) -> Verdict {
    let hs = cx.hs();
    poisoned(
        cx,
        hs,
        "deflate",
        b"\xff\xfenot deflate at all".to_vec(),
        "with a payload that is not deflate",
    )
    .await
}

pub(crate) async fn deflate_bomb(cx: Cx<'_>) -> Verdict {
    let hs = cx.hs();
    let bomb = wire::deflate_bomb(BOMB_RUNS);
    let what = format!(
        "with {} KiB of deflate inflating to {} MiB",
        bomb.len() >> 10,
        (1 + 258 * BOMB_RUNS) >> 20
    );
    poisoned(cx, hs, "deflate", bomb, &what).await
}

pub(crate) async fn not_negotiated(cx: Cx<'_>) -> Verdict {
    let mut hs = cx.hs();
    hs.capabilities = OFFERED
        .iter()
        .filter(|c| **c != "deflate")
        .map(|c| c.to_string())
        .collect();
    let bytes = wire::deflate(&wire::payload_bytes(cx.codec, &event()));
    poisoned(
        cx,
        hs,
        "deflate",
        bytes,
        "compressed without `deflate` negotiated",
    )
    .await
}

pub(crate) async fn unknown_encoding(cx: Cx<'_>) -> Verdict {
    let hs = cx.hs();
    let bytes = wire::payload_bytes(cx.codec, &event());
    poisoned(
        cx,
        hs,
        "x-conformance-zstd",
        bytes,
        "with content-encoding x-conformance-zstd",
    )
    .await
}

pub(crate) async fn not_a_value(cx: Cx<'_>) -> Verdict {
    let hs = cx.hs();
    // Valid deflate of bytes that are neither JSON nor MessagePack (0xc1 is reserved).
    let bytes = wire::deflate(b"\xc1{not a value");
    poisoned(
        cx,
        hs,
        "deflate",
        bytes,
        "inflating to something that is not a value",
    )
    .await
}

pub(crate) async fn reply_not_answered(cx: Cx<'_>) -> Verdict {
    // Replies are never answered, not even refused: one nobody asked for, one with an
    // unknown encoding.
    let (mut conn, _) = need!(cx.session().await, "handshake");
    let plain = conn.id();
    let unsolicited = Out::new(plain, "reply")
        .with("corr", Value::UInt(987_654_321))
        .payload(Value::map([("ok", Value::Bool(true))]));
    need!(conn.send(&unsolicited).await, "send");
    let encoded = conn.id();
    let unreadable = Out::new(encoded, "reply")
        .with("corr", Value::UInt(987_654_322))
        .headers(&[("content-encoding", "x-conformance-zstd")])
        .payload_bytes(b"opaque".to_vec());
    need!(conn.send(&unreadable).await, "send");
    let (got, end) = conn.rx.quiet(cx.quiet()).await;
    let open = conn.ping().await;
    conn.finish().await;
    let answers: Vec<String> = got
        .iter()
        .filter(|(e, _)| e.corr == Some(plain) || e.corr == Some(encoded))
        .map(|(e, _)| e.brief())
        .collect();
    verdict(
        answers.is_empty() && end.is_none() && open.is_ok(),
        format!(
            "unsolicited reply(id={plain}) and reply(id={encoded}) with an unknown encoding: {}{}",
            if answers.is_empty() {
                format!("no answer in {} ms", cx.quiet().as_millis())
            } else {
                format!("answered by {}", answers.join(" "))
            },
            match (end, open) {
                (Some(end), _) => format!("; then {end:?}"),
                (None, Err(e)) => format!("; then {e}"),
                (None, Ok(_)) => "; still open".into(),
            }
        ),
    )
}

pub(crate) async fn valid(cx: Cx<'_>) -> Verdict {
    let (mut conn, _) = need!(cx.session().await, "handshake");
    let id = conn.id();
    let bytes = wire::deflate(&wire::payload_bytes(
        cx.codec,
        &command("conformance-deflate"),
    ));
    let out = Out::new(id, "command")
        .headers(&[("content-encoding", "deflate"), ("expect", "reply")])
        .payload_bytes(bytes);
    need!(conn.send(&out).await, "send");
    let reply = need!(
        conn.wait("reply", |e| e.kind == "reply" && e.corr == Some(id))
            .await,
        format!("compressed command(id={id})")
    );
    conn.finish().await;
    // Any answer but `bad_request` shows the payload was inflated (the handler may fail
    // for its own reasons).
    if let Some((code, message)) = &reply.error
        && code == "bad_request"
    {
        return fail(format!(
            "compressed command answered with error {code}: {message}"
        ));
    }
    verdict(
        true,
        format!("compressed command answered by {}", reply.brief()),
    )
}
