//! Sessions: sequence numbers, acknowledgements, resume, replay, takeover (PROTOCOL.md
//! section 6). All but `session.not-offered` need the hub to grant `resume`.

use std::time::{Duration, Instant};

use super::{Cx, Verdict, closed_with, command, event, fail, need, pass, verdict, watch};
use crate::conn::{Ack, Conn, Ev, Hs, random_u64, short};
use crate::wire::{Out, Received, Value};

/// The rule's bound on acknowledgements.
const ACK_WITHIN: Duration = Duration::from_secs(1);

/// A connection whose handshake offered and was granted `resume`.
async fn resumable(cx: Cx<'_>) -> Result<(Conn, Ack), String> {
    let (conn, ack) = cx.session().await?;
    if !ack.grants("resume") {
        return Err(format!("`resume` not granted this time: {}", ack.brief()));
    }
    Ok((conn, ack))
}

/// A handshake resuming `session` with `last_received`.
fn resuming(cx: &Cx<'_>, session: &str, last_received: u64) -> Hs {
    let mut hs = cx.hs();
    hs.resume = Some((session.to_owned(), last_received));
    hs
}

pub(crate) async fn not_offered(cx: Cx<'_>) -> Verdict {
    let mut hs = cx.hs();
    hs.capabilities.retain(|c| c != "resume");
    let (mut conn, ack) = need!(cx.session_with(&hs).await, "handshake without resume");
    // `seq` (with a gap) and an `ack` above anything sent: without `resume` both are
    // ignored, never a protocol error.
    let id = conn.id();
    need!(
        conn.send(
            &Out::new(id, "command")
                .seq(5)
                .with("ack", Value::UInt(1000))
                .request()
                .payload(command("conformance"))
        )
        .await,
        "send"
    );
    let w = watch(&mut conn, cx.step(), |w| !w.replies_to(id).is_empty()).await;
    let (more, _) = conn.rx.quiet(cx.quiet()).await;
    let open = conn.ping().await;
    conn.finish().await;
    if let Err(e) = open {
        return fail(format!(
            "seq 5 and ack 1000 without resume: {}; then {e}",
            w.brief()
        ));
    }
    if w.replies_to(id).is_empty() {
        return fail(format!("no reply to command(id={id}): {}", w.brief()));
    }
    let sessioned: Vec<String> = w
        .all
        .iter()
        .chain(more.iter().map(|(e, _)| e))
        .filter(|e| e.seq.is_some() || e.ack.is_some() || e.kind == "ack")
        .map(Received::brief)
        .collect();
    let ok = !ack.grants("resume") && sessioned.is_empty();
    verdict(
        ok,
        format!(
            "resume not offered, a request with seq 5 and ack 1000: {}; {}",
            ack.brief(),
            if sessioned.is_empty() {
                "no seq or ack on anything the hub sent".to_string()
            } else {
                format!("yet the hub sent {}", sessioned.join(" "))
            }
        ),
    )
}

pub(crate) async fn ack(cx: Cx<'_>) -> Verdict {
    let (mut conn, _) = need!(resumable(cx).await, "handshake");
    let sent = Instant::now();
    for seq in 1..=3 {
        let id = conn.id();
        need!(
            conn.send(&Out::new(id, "event").seq(seq).payload(event()))
                .await,
            "send"
        );
    }
    let w = watch(&mut conn, ACK_WITHIN, |w| w.max_ack() >= Some(3)).await;
    let took = sent.elapsed();
    conn.finish().await;
    verdict(
        w.max_ack() >= Some(3),
        format!(
            "events seq 1..=3: {} (after {} ms)",
            w.brief(),
            took.as_millis()
        ),
    )
}

pub(crate) async fn ack_duplicate(cx: Cx<'_>) -> Verdict {
    let (mut conn, _) = need!(resumable(cx).await, "handshake");
    let id = conn.id();
    let out = Out::new(id, "event").seq(1).payload(event());
    need!(conn.send(&out).await, "send");
    let first = watch(&mut conn, ACK_WITHIN, |w| w.max_ack() >= Some(1)).await;
    if first.max_ack() < Some(1) {
        conn.finish().await;
        return fail(format!("event seq 1 not acknowledged: {}", first.brief()));
    }
    let sent = Instant::now();
    need!(conn.send(&out).await, "send the duplicate");
    let again = watch(&mut conn, ACK_WITHIN, |w| w.max_ack() >= Some(1)).await;
    let took = sent.elapsed();
    conn.finish().await;
    verdict(
        again.max_ack() >= Some(1),
        format!(
            "seq 1 acknowledged; its duplicate: {} (after {} ms)",
            again.brief(),
            took.as_millis()
        ),
    )
}

pub(crate) async fn duplicate_dropped(cx: Cx<'_>) -> Verdict {
    let (mut conn, _) = need!(resumable(cx).await, "handshake");
    let id = conn.id();
    let out = Out::new(id, "command")
        .seq(1)
        .request()
        .payload(command("conformance-dup"));
    need!(conn.send(&out).await, "send");
    let first = watch(&mut conn, cx.step(), |w| !w.replies_to(id).is_empty()).await;
    if first.replies_to(id).is_empty() {
        conn.finish().await;
        return fail(format!(
            "no reply to command(id={id} seq=1): {}",
            first.brief()
        ));
    }
    need!(conn.send(&out).await, "send the duplicate");
    let (again, end) = conn.rx.quiet(cx.quiet()).await;
    conn.finish().await;
    let replies = again
        .iter()
        .filter(|(e, _)| e.kind == "reply" && e.corr == Some(id))
        .count();
    verdict(
        replies == 0 && end.is_none(),
        format!(
            "request seq 1 answered; the same request again: {replies} more replies in {} ms{}",
            cx.quiet().as_millis(),
            end.map_or(String::new(), |e| format!(", then {e:?}"))
        ),
    )
}

pub(crate) async fn reply_seq(cx: Cx<'_>) -> Verdict {
    let (mut conn, _) = need!(resumable(cx).await, "handshake");
    let mut ids = Vec::new();
    for seq in 1..=3 {
        let id = conn.id();
        ids.push(id);
        need!(
            conn.send(
                &Out::new(id, "command")
                    .seq(seq)
                    .request()
                    .payload(command("conformance-seq"))
            )
            .await,
            "send"
        );
    }
    let w = watch(&mut conn, cx.step(), |w| {
        ids.iter().all(|id| !w.replies_to(*id).is_empty())
    })
    .await;
    conn.finish().await;
    let seqs: Vec<Option<u64>> = w
        .all
        .iter()
        .filter(|e| e.kind == "reply")
        .map(|e| e.seq)
        .collect();
    let ok = seqs == [Some(1), Some(2), Some(3)];
    verdict(
        ok,
        format!(
            "three requests; the hub's replies carry seq {seqs:?}: {}",
            w.brief()
        ),
    )
}

pub(crate) async fn gap(cx: Cx<'_>) -> Verdict {
    let (mut conn, _) = need!(resumable(cx).await, "handshake");
    for seq in [1, 3] {
        let id = conn.id();
        need!(
            conn.send(&Out::new(id, "event").seq(seq).payload(event()))
                .await,
            "send"
        );
    }
    let closed = conn.expect_close().await;
    let mut v = closed_with(&closed, 1002);
    v.saw = format!("seq 1 then 3: {}", v.saw);
    v
}

pub(crate) async fn ack_ahead(cx: Cx<'_>) -> Verdict {
    let (mut conn, _) = need!(resumable(cx).await, "handshake");
    let id = conn.id();
    need!(
        conn.send(&Out::new(id, "ack").with("ack", Value::UInt(1000)))
            .await,
        "send"
    );
    let closed = conn.expect_close().await;
    let mut v = closed_with(&closed, 1002);
    v.saw = format!("ack 1000 with nothing sent: {}", v.saw);
    v
}

pub(crate) async fn resume(cx: Cx<'_>) -> Verdict {
    let (mut a, first) = need!(resumable(cx).await, "handshake");
    for seq in 1..=2 {
        let id = a.id();
        need!(
            a.send(&Out::new(id, "event").seq(seq).payload(event()))
                .await,
            "send"
        );
    }
    let w = watch(&mut a, ACK_WITHIN, |w| w.max_ack() >= Some(2)).await;
    if w.max_ack() < Some(2) {
        a.finish().await;
        return fail(format!("seq 1..=2 not acknowledged: {}", w.brief()));
    }
    // Gone without a close: the session must outlive the connection.
    drop(a);
    let hs = resuming(&cx, first.session(), 0);
    let (mut b, again) = need!(cx.session_with(&hs).await, "resuming handshake");
    let open = b.ping().await;
    b.finish().await;
    let ok = again.resumed
        && again.session() == first.session()
        && again.last_received == Some(2)
        && open.is_ok();
    verdict(
        ok,
        format!(
            "session {} (hub acknowledged seq 2), connection dropped; resume: {}{}",
            short(first.session()),
            again.brief(),
            open.err().map_or(String::new(), |e| format!("; then {e}"))
        ),
    )
}

/// Opens a session, sends `n` requests (seq 1..=n) and reads their replies without
/// acknowledging them, then drops the connection. Returns the session and the replies.
async fn unacked_replies(cx: Cx<'_>, n: u64) -> Result<(Ack, Vec<Received>), String> {
    let (mut a, ack) = resumable(cx).await?;
    let mut ids = Vec::new();
    for seq in 1..=n {
        let id = a.id();
        ids.push(id);
        a.send(
            &Out::new(id, "command")
                .seq(seq)
                .request()
                .payload(command("conformance-replay")),
        )
        .await?;
    }
    let w = watch(&mut a, cx.step(), |w| {
        ids.iter().all(|id| !w.replies_to(*id).is_empty())
    })
    .await;
    let mut replies = Vec::new();
    for id in ids {
        let Some(reply) = w.replies_to(id).first().map(|r| (*r).clone()) else {
            return Err(format!("no reply to command(id={id}): {}", w.brief()));
        };
        if reply.seq.is_none() {
            return Err(format!("the reply has no seq: {}", reply.brief()));
        }
        replies.push(reply);
    }
    drop(a);
    Ok((ack, replies))
}

/// [`unacked_replies`] with one request.
async fn unacked_reply(cx: Cx<'_>) -> Result<(Ack, Received), String> {
    let (ack, mut replies) = unacked_replies(cx, 1).await?;
    let reply = replies.pop().ok_or("no reply")?;
    Ok((ack, reply))
}

fn same_message(a: &Received, b: &Received) -> bool {
    a.kind == b.kind && a.id == b.id && a.seq == b.seq && a.corr == b.corr
}

pub(crate) async fn replay(cx: Cx<'_>) -> Verdict {
    let (first, reply) = need!(unacked_reply(cx).await, "setup");
    let hs = resuming(&cx, first.session(), 0);
    let (mut b, again) = need!(cx.session_with(&hs).await, "resuming handshake");
    // The first data message after the ack must be the reply, again.
    let w = watch(&mut b, cx.step(), |w| w.all.iter().any(|e| e.seq.is_some())).await;
    // The replayed message keeps its id, which stays unique on the new connection:
    // ping until the pongs' ids pass it.
    let mut all = w.all.clone();
    all.extend(super::pings_past(&mut b, reply.id.unwrap_or(0), cx.step()).await);
    if let Some(seq) = reply.seq {
        let id = b.id();
        let _ = b
            .send(&Out::new(id, "ack").with("ack", Value::UInt(seq)))
            .await;
    }
    b.finish().await;
    let first_data = w.all.iter().find(|e| e.seq.is_some());
    let clashes = super::id_problems(&all);
    let ok = again.resumed && first_data.is_some_and(|e| same_message(e, &reply));
    verdict(
        ok && clashes.is_empty(),
        format!(
            "unacknowledged {}, connection dropped; resume with last_received 0: {}; then {}{}",
            reply.brief(),
            again.brief(),
            w.brief(),
            if clashes.is_empty() {
                String::new()
            } else {
                format!("; ids: {}", clashes.join("; "))
            }
        ),
    )
}

pub(crate) async fn replay_skips_received(cx: Cx<'_>) -> Verdict {
    let (first, reply) = need!(unacked_reply(cx).await, "setup");
    let last = reply.seq.unwrap_or(0);
    let hs = resuming(&cx, first.session(), last);
    let (mut b, again) = need!(cx.session_with(&hs).await, "resuming handshake");
    let (got, _) = b.rx.quiet(cx.quiet()).await;
    b.finish().await;
    let replayed: Vec<String> = got
        .iter()
        .filter(|(e, _)| same_message(e, &reply))
        .map(|(e, _)| e.brief())
        .collect();
    verdict(
        again.resumed && replayed.is_empty(),
        format!(
            "received {}, resumed with last_received {last}: {}; {}",
            reply.brief(),
            again.brief(),
            if replayed.is_empty() {
                "not replayed".to_string()
            } else {
                format!("replayed anyway: {}", replayed.join(" "))
            }
        ),
    )
}

pub(crate) async fn resume_unknown(cx: Cx<'_>) -> Verdict {
    let unknown = format!("conformance-unknown-{:016x}", random_u64());
    let hs = resuming(&cx, &unknown, 0);
    let (b, ack) = need!(cx.session_with(&hs).await, "resuming handshake");
    b.finish().await;
    let ok = !ack.resumed && !ack.session().is_empty() && ack.session() != unknown;
    verdict(
        ok,
        format!(
            "resume of unknown session {}: {}",
            short(&unknown),
            ack.brief()
        ),
    )
}

pub(crate) async fn resume_ahead(cx: Cx<'_>) -> Verdict {
    let (a, first) = need!(resumable(cx).await, "handshake");
    drop(a);
    let hs = resuming(&cx, first.session(), 5);
    let (b, again) = need!(cx.session_with(&hs).await, "resuming handshake");
    b.finish().await;
    let ok = !again.resumed && !again.session().is_empty() && again.session() != first.session();
    verdict(
        ok,
        format!(
            "session {} (hub sent nothing), resume with last_received 5: {}",
            short(first.session()),
            again.brief()
        ),
    )
}

/// How many times `session.concurrent-resume` races two resumes.
const RACES: usize = 20;

/// How many unacknowledged replies the racing resumes replay (a longer replay makes an
/// overlap of the two connections easier to see).
const REPLAYED: u64 = 20;

/// One of the two racing connections of `session.concurrent-resume`.
#[derive(Default)]
struct Racer {
    ack: Option<Ack>,
    /// When each replayed reply arrived.
    replays: Vec<Instant>,
    /// The close frame's code, the preceding `close` envelope's code, and when.
    close: Option<(Option<u16>, Option<u16>, Instant)>,
    last_close_envelope: Option<u16>,
    end: Option<String>,
    other: Vec<String>,
    /// Answered a ping after the race.
    open: bool,
}

impl Racer {
    /// Closed or gone: nothing more to read.
    fn finished(&self) -> bool {
        self.close.is_some() || self.end.is_some()
    }

    fn remember(&mut self, what: String) {
        if self.other.len() < 16 {
            self.other.push(what);
        }
    }

    fn note(&mut self, ev: Ev, replies: &[Received]) {
        match ev {
            Ev::Env(env, at) => {
                if env.kind == "handshake_ack" {
                    self.ack = Some(Ack::from_env(env, at));
                } else if replies.iter().any(|r| same_message(&env, r)) {
                    self.replays.push(at);
                } else if env.kind == "close" {
                    self.last_close_envelope = env
                        .field("code")
                        .and_then(Value::as_u64)
                        .and_then(|c| u16::try_from(c).ok());
                } else {
                    self.remember(env.brief());
                }
            }
            Ev::Close(code, _) => {
                self.close = Some((code, self.last_close_envelope, Instant::now()));
            }
            Ev::End(e) => self.end = Some(e),
            Ev::Timeout | Ev::Ping | Ev::Pong(_) => {}
            Ev::Bad(e) => self.remember(e),
            Ev::WrongKind(k) => self.remember(format!("{k} frame")),
        }
    }

    fn describe(&self, t0: Instant) -> String {
        let ms = |t: Instant| format!("{:.1}", t.saturating_duration_since(t0).as_secs_f64() * 1e3);
        let mut parts = Vec::new();
        if let Some(ack) = &self.ack {
            parts.push(format!(
                "ack@{}{}",
                ms(ack.at),
                if ack.resumed { "" } else { " (not resumed)" }
            ));
        }
        if let (Some(first), Some(last)) = (self.replays.first(), self.replays.last()) {
            parts.push(format!(
                "{} replayed@{}-{}",
                self.replays.len(),
                ms(*first),
                ms(*last)
            ));
        }
        if let Some((frame, env, at)) = self.close {
            parts.push(format!(
                "close@{} {}/{}",
                ms(at),
                frame.map_or("-".into(), |c| c.to_string()),
                env.map_or("-".into(), |c| c.to_string())
            ));
        }
        if let Some(end) = &self.end {
            parts.push(end.clone());
        }
        parts.extend(self.other.iter().take(2).cloned());
        if self.open {
            parts.push("open".into());
        }
        parts.join(" ")
    }
}

/// Opens two connections, sends both the same resuming handshake back to back and
/// reads both until one is closed and the other has the whole replay (at most a second).
/// Passes when exactly one stays open, resumed, with the whole replay, and the other
/// was closed with 4004.
async fn race_once(cx: Cx<'_>, hs: &Hs, replies: &[Received]) -> Result<String, String> {
    let (b, c) = tokio::join!(cx.open(), cx.open());
    let (mut b, mut c) = (b?, c?);
    let t0 = Instant::now();
    b.send(&hs.envelope()).await?;
    c.send(&hs.envelope()).await?;
    let (mut rb, mut rc) = (Racer::default(), Racer::default());
    let deadline = t0 + Duration::from_secs(1).max(cx.quiet() * 3);
    loop {
        let all = replies.len();
        let settled = (rb.finished() && rc.replays.len() >= all)
            || (rc.finished() && rb.replays.len() >= all);
        if settled || (rb.finished() && rc.finished()) {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        tokio::select! {
            ev = b.rx.recv(left), if !rb.finished() => rb.note(ev, replies),
            ev = c.rx.recv(left), if !rc.finished() => rc.note(ev, replies),
        }
    }
    for (r, conn) in [(&mut rb, &mut b), (&mut rc, &mut c)] {
        if !r.finished() {
            r.open = conn.ping().await.is_ok();
        }
    }
    let timeline = format!("B {}; C {} (ms)", rb.describe(t0), rc.describe(t0));
    // Dropped without a close: the session stays for the next round.
    drop((b, c));
    let (winner, loser) = match (rb.open, rc.open) {
        (true, false) => (&rb, &rc),
        (false, true) => (&rc, &rb),
        (both, _) => {
            return Err(format!(
                "{} connections open afterwards: {timeline}",
                if both { 2 } else { 0 }
            ));
        }
    };
    let Some(wack) = &winner.ack else {
        return Err(format!(
            "the open connection has no handshake_ack: {timeline}"
        ));
    };
    if !wack.resumed {
        return Err(format!("the open connection did not resume: {timeline}"));
    }
    if loser.close.map(|(frame, _, _)| frame) != Some(Some(4004)) {
        return Err(format!("the other was not closed with 4004: {timeline}"));
    }
    if winner.replays.len() < replies.len() {
        return Err(format!(
            "the open connection got {} of the {} replayed replies: {timeline}",
            winner.replays.len(),
            replies.len()
        ));
    }
    // Which of two sockets a frame reached first is not observable from here (each is
    // read by its own task): the rule checked is that exactly one connection carries
    // the session on, with all of it, and the other was told why it ended.
    Ok(timeline)
}

pub(crate) async fn concurrent_resume(cx: Cx<'_>) -> Verdict {
    let (first, replies) = need!(unacked_replies(cx, REPLAYED).await, "setup");
    let hs = resuming(&cx, first.session(), 0);
    let mut last = String::new();
    for round in 1..=RACES {
        match race_once(cx, &hs, &replies).await {
            Ok(timeline) => last = timeline,
            Err(e) => return fail(format!("race {round} of {RACES}: {e}")),
        }
    }
    pass(format!(
        "{RACES} races, each ended with one open connection; last: {last}"
    ))
}
