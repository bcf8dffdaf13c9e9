//! The HTTP upgrade (PROTOCOL.md section 1): authentication, identity headers, codec.
//!
//! These cases write the request by hand, so that they can send what a WebSocket client
//! would not: a header twice, an unusual scheme spelling, no subprotocol.

use super::{Cx, Verdict, fail, need, pass, skip, verdict};
use crate::Codec;

/// The valid headers with `name` (case-insensitive) left out.
fn without(cx: &Cx<'_>, name: &str) -> Vec<(&'static str, String)> {
    let mut h = cx.headers();
    h.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    h
}

/// The valid headers with `name` set to `value`.
fn replaced(cx: &Cx<'_>, name: &str, value: String) -> Vec<(&'static str, String)> {
    let mut h = cx.headers();
    for (k, v) in &mut h {
        if k.eq_ignore_ascii_case(name) {
            *v = value.clone();
        }
    }
    h
}

/// Sends each request of `tries` (a description and its headers) and expects `want`
/// for every one.
async fn expect_all(cx: Cx<'_>, want: u16, tries: Vec<(&str, Vec<(&str, String)>)>) -> Verdict {
    let mut ok = true;
    let mut saw = Vec::new();
    for (what, headers) in tries {
        match cx.raw(&headers).await {
            Ok(reply) => {
                ok &= reply.status == want;
                saw.push(format!("{what}: HTTP {}", reply.status));
            }
            Err(e) => {
                ok = false;
                saw.push(format!("{what}: {e}"));
            }
        }
    }
    verdict(ok, format!("want {want}; {}", saw.join(", ")))
}

pub(crate) async fn no_auth(cx: Cx<'_>) -> Verdict {
    expect_all(
        cx,
        401,
        vec![("no Authorization", without(&cx, "Authorization"))],
    )
    .await
}

pub(crate) async fn wrong_token(cx: Cx<'_>) -> Verdict {
    let wrong = format!("Bearer {}-wrong", cx.cfg().token);
    expect_all(
        cx,
        401,
        vec![
            ("wrong token", replaced(&cx, "Authorization", wrong)),
            (
                "not a bearer credential",
                replaced(&cx, "Authorization", format!("Basic {}", cx.cfg().token)),
            ),
        ],
    )
    .await
}

pub(crate) async fn scheme_case(cx: Cx<'_>) -> Verdict {
    let token = &cx.cfg().token;
    expect_all(
        cx,
        101,
        vec![
            (
                "BEARER",
                replaced(&cx, "Authorization", format!("BEARER {token}")),
            ),
            (
                "bearer",
                replaced(&cx, "Authorization", format!("bearer {token}")),
            ),
            (
                "bEaReR",
                replaced(&cx, "Authorization", format!("bEaReR {token}")),
            ),
        ],
    )
    .await
}

/// The valid headers plus `name: value` once more.
fn doubled(cx: &Cx<'_>, name: &'static str, value: String) -> Vec<(&'static str, String)> {
    let mut h = cx.headers();
    h.push((name, value));
    h
}

pub(crate) async fn dup_authorization(cx: Cx<'_>) -> Verdict {
    let token = &cx.cfg().token;
    expect_all(
        cx,
        400,
        vec![
            (
                "valid, then wrong",
                doubled(&cx, "Authorization", format!("Bearer {token}-wrong")),
            ),
            (
                "valid twice",
                doubled(&cx, "Authorization", format!("Bearer {token}")),
            ),
        ],
    )
    .await
}

pub(crate) async fn dup_workspace(cx: Cx<'_>) -> Verdict {
    let ws = cx.cfg().workspace.clone();
    expect_all(
        cx,
        400,
        vec![
            (
                "two workspaces",
                doubled(&cx, "X-Workspace", format!("{ws}-other")),
            ),
            ("the same twice", doubled(&cx, "X-Workspace", ws.clone())),
        ],
    )
    .await
}

pub(crate) async fn dup_sync_target(cx: Cx<'_>) -> Verdict {
    let st = cx.cfg().sync_target.clone();
    expect_all(
        cx,
        400,
        vec![
            (
                "two sync targets",
                doubled(&cx, "X-SyncTarget", format!("{st}-other")),
            ),
            ("the same twice", doubled(&cx, "X-SyncTarget", st.clone())),
        ],
    )
    .await
}

pub(crate) async fn no_identity(cx: Cx<'_>) -> Verdict {
    let mut neither = without(&cx, "X-Workspace");
    neither.retain(|(k, _)| *k != "X-SyncTarget");
    expect_all(
        cx,
        400,
        vec![
            ("no X-Workspace", without(&cx, "X-Workspace")),
            ("no X-SyncTarget", without(&cx, "X-SyncTarget")),
            ("neither", neither),
            (
                "empty X-SyncTarget",
                replaced(&cx, "X-SyncTarget", String::new()),
            ),
        ],
    )
    .await
}

pub(crate) async fn identity_charset(cx: Cx<'_>) -> Verdict {
    let ws = cx.cfg().workspace.clone();
    let st = cx.cfg().sync_target.clone();
    expect_all(
        cx,
        400,
        vec![
            (
                "space in X-SyncTarget",
                replaced(&cx, "X-SyncTarget", format!("{st} x")),
            ),
            (
                "space in X-Workspace",
                replaced(&cx, "X-Workspace", format!("{ws} x")),
            ),
            (
                "non-ASCII X-SyncTarget",
                replaced(&cx, "X-SyncTarget", format!("{st}\u{e9}")),
            ),
        ],
    )
    .await
}

pub(crate) async fn identity_length(cx: Cx<'_>) -> Verdict {
    expect_all(
        cx,
        400,
        vec![
            (
                "254-byte X-SyncTarget",
                replaced(&cx, "X-SyncTarget", "s".repeat(254)),
            ),
            (
                "254-byte X-Workspace",
                replaced(&cx, "X-Workspace", "w".repeat(254)),
            ),
        ],
    )
    .await
}

pub(crate) async fn forbidden(cx: Cx<'_>) -> Verdict {
    let Some((ws, st)) = cx.cfg().forbidden.clone() else {
        return skip("no forbidden identity configured");
    };
    let mut h = replaced(&cx, "X-Workspace", ws);
    for (k, v) in &mut h {
        if *k == "X-SyncTarget" {
            *v = st.clone();
        }
    }
    expect_all(cx, 403, vec![("forbidden identity", h)]).await
}

pub(crate) async fn no_codec(cx: Cx<'_>) -> Verdict {
    expect_all(
        cx,
        400,
        vec![(
            "no Sec-WebSocket-Protocol",
            without(&cx, "Sec-WebSocket-Protocol"),
        )],
    )
    .await
}

pub(crate) async fn unknown_codec(cx: Cx<'_>) -> Verdict {
    expect_all(
        cx,
        400,
        vec![
            (
                "unknown codec",
                replaced(&cx, "Sec-WebSocket-Protocol", "tunnel.v0.cbor".into()),
            ),
            (
                "two unknown codecs",
                replaced(
                    &cx,
                    "Sec-WebSocket-Protocol",
                    "tunnel.v2.json, x-conformance.unknown".into(),
                ),
            ),
        ],
    )
    .await
}

pub(crate) async fn codec_choice(cx: Cx<'_>) -> Verdict {
    let mut ok = true;
    let mut saw = Vec::new();
    // Each configured codec, offered first after an unknown one, the others after it.
    for &first in &cx.cfg().codecs {
        let mut offer = vec![
            "x-conformance.unknown".to_string(),
            first.subprotocol().into(),
        ];
        for &other in Codec::ALL.iter().filter(|c| **c != first) {
            offer.push(other.subprotocol().into());
        }
        let offer = offer.join(", ");
        let reply = need!(
            cx.raw(&replaced(&cx, "Sec-WebSocket-Protocol", offer.clone()))
                .await,
            format!("offering {offer}")
        );
        let chosen = reply.values("Sec-WebSocket-Protocol");
        let right = reply.status == 101 && chosen.len() == 1 && chosen[0] == first.subprotocol();
        ok &= right;
        saw.push(format!(
            "offered {offer}: HTTP {} protocol {:?}",
            reply.status, chosen
        ));
    }
    if ok {
        pass(saw.join("; "))
    } else {
        fail(format!(
            "want 101 naming the first known codec; {}",
            saw.join("; ")
        ))
    }
}
