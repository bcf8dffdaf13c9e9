//! The loop that reads one connection and feeds the router.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Notify, mpsc};
use tower::BoxError;

use tunnel_proto::messages::{Close, ReconnectHint, TypedMessage};
use tunnel_proto::{CloseCode, Envelope, ErrorBody, MessageType};
use tunnel_transport::{ConnectionReceiver, ConnectionSender, RecvError};

use tunnel_proto::session::Verdict;

use crate::delivery::{Reliable, WhenFull};
use crate::request::{Pending, error_code};
use crate::router::{Deferral, Dispatched, Inbound, Router};

/// What a connection's loop shares with its agent or hub.
pub(crate) struct Link<'a> {
    /// The session, when the connection carries one.
    pub(crate) reliable: Option<&'a Arc<Reliable>>,
    /// Requests waiting for replies.
    pub(crate) pending: &'a Pending,
    /// Whether this side follows a peer's drain (agents do; a hub never drains for an
    /// agent, whatever the agent sends).
    pub(crate) follows_drains: bool,
    /// Set when the peer announced a drain (`close` with code 1001 and a reconnect
    /// hint): replies then go straight on the connection, outside the session, whose
    /// numbering continues on the next connection.
    pub(crate) draining: AtomicBool,
    /// Woken when a drain is announced.
    pub(crate) drain_notice: Notify,
    /// Where errors are counted.
    pub(crate) recorder: &'a dyn tunnel_metrics::Recorder,
}

impl<'a> Link<'a> {
    pub(crate) fn new(
        reliable: Option<&'a Arc<Reliable>>,
        pending: &'a Pending,
        recorder: &'a dyn tunnel_metrics::Recorder,
        follows_drains: bool,
    ) -> Self {
        Link {
            follows_drains,
            reliable,
            pending,
            recorder,
            draining: AtomicBool::new(false),
            drain_notice: Notify::new(),
        }
    }
}

impl Link<'_> {
    /// Sends a reply through the session (or on the connection without one). Never
    /// waits for room in a full replay buffer: the loop that would wait is the one that
    /// reads the acks that make room. A reply that finds the buffer full is dropped
    /// (the requester times out) while the peer acknowledges; once it has not for
    /// the session's `stall_timeout`, the connection is closed with `1008` (the next one resumes
    /// and replays) rather than dropping this and every later reply. A handler's
    /// result the connection cannot carry (no form in its codec, larger than its
    /// limit) is answered with `handler_error` instead: held by the session, it would
    /// end every connection it cannot be written on until it expired.
    async fn send_reply(&self, sender: &ConnectionSender, mut reply: Box<Envelope>) {
        reply.id = tunnel_transport::next_message_id();
        if let Err(e) = fit_payload(&mut reply, Some(Fit::of(sender))) {
            tracing::warn!(agent = %sender.info().agent, error = %e, "a handler's result cannot be sent: answering handler_error");
            self.recorder.error("reply_unsendable");
            reply.payload = None;
            reply.headers.remove(tunnel_proto::header::CONTENT_ENCODING);
            reply.error = Some(ErrorBody::new(
                error_code::HANDLER_ERROR,
                format!("the handler's result cannot be sent: {e}"),
            ));
        }
        let outcome = match self.reliable {
            Some(reliable) if !self.draining.load(Ordering::Acquire) => {
                match reliable.send(reply, WhenFull::Reject).await {
                    Ok(_) => Ok(()),
                    Err(crate::Error::Full(_)) if !reliable.peer_stalled() => {
                        self.recorder.error("reply_dropped");
                        Err("replay buffer full".to_owned())
                    }
                    Err(crate::Error::Full(_)) => {
                        tracing::warn!(agent = %sender.info().agent, "closing: the peer does not acknowledge what it is sent");
                        self.recorder.error("unacknowledged");
                        sender.abort_with(
                            CloseCode::POLICY_VIOLATION,
                            "replay buffer full: messages are not acknowledged",
                        );
                        return;
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            _ => sender.send(&reply).await.map_err(|e| e.to_string()),
        };
        if let Err(error) = outcome {
            tracing::debug!(agent = %sender.info().agent, %error, "could not send a reply");
        }
    }

    /// Answers a data message this side can never accept with a failed `reply`
    /// (PROTOCOL.md, section 4.2), one-way or not, so that its sender learns why
    /// instead of taking the acknowledgement for a delivery. Replies are never
    /// answered.
    async fn reject(&self, sender: &ConnectionSender, env: &Envelope, code: &str, why: String) {
        if env.kind == MessageType::Reply || env.kind.is_control() {
            return;
        }
        let reply = env.reply(0, 0).with_error(ErrorBody::new(code, why));
        Box::pin(self.send_reply(sender, stamp(Box::new(reply)))).await;
    }
}

/// How a session ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// The connection closed in an orderly way.
    Closed,
    /// The connection failed.
    Failed(RecvError),
}

/// Reads messages until the connection ends, answering protocol pings, keeping the
/// reconnect hint of a `close` message in `hint`, and handing everything else to
/// `router`, one message at a time. The receiver is borrowed, not moved: a moved one is
/// kept in each future it passes through, and this one lives as long as the connection.
pub(crate) async fn run(
    receiver: &mut ConnectionReceiver,
    sender: ConnectionSender,
    router: &mut Router,
    hint: &mut Option<ReconnectHint>,
    link: &Link<'_>,
) -> SessionEnd {
    let mut state = Reading::default();
    // Made only once a handler may acknowledge later ([`read`]).
    let mut deferrals = None;
    let end = read(
        receiver,
        sender.clone(),
        router,
        hint,
        link,
        &mut state,
        &mut deferrals,
    )
    .await;
    if let Some(reliable) = link.reliable {
        // Completions that arrived as the reader stopped still count.
        while let Some(d) = deferrals.as_mut()
            && let Ok(deferral) = d.rx.try_recv()
        {
            if on_deferral(deferral, Some(reliable), &sender, &mut state).is_err() {
                break;
            }
        }
        // The last message's handler has returned: a snapshot or the next connection
        // counts it as received. Messages whose handlers acknowledge later and are not
        // done yet (or were not taken) count as never received: the peer replays them.
        reliable.stop_reading(state.handled, state.rewind || state.deferred > 0);
    }
    end
}

/// Messages of a session handed to handlers ask at most this many deferred
/// acknowledgements ([`Inbound::acknowledge_later`]) at once; past it the reader waits.
const MAX_DEFERRED: usize = 1024;

/// The channel on which handlers that acknowledge later report to the reader.
struct Deferrals {
    tx: mpsc::UnboundedSender<Deferral>,
    rx: mpsc::UnboundedReceiver<Deferral>,
}

impl Deferrals {
    fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Deferrals { tx, rx }
    }
}

/// Where the reader stands with the messages it handed over.
#[derive(Debug, Default)]
struct Reading {
    /// The last message, handled but not yet marked so in the session (done at the
    /// reader's next lock of it, to save one per message).
    handled: Option<u64>,
    /// Messages whose handlers acknowledge later and are not done.
    deferred: usize,
    /// A handler could not take a message: what is held is rewound.
    rewind: bool,
}

async fn read(
    receiver: &mut ConnectionReceiver,
    sender: ConnectionSender,
    router: &mut Router,
    hint: &mut Option<ReconnectHint>,
    link: &Link<'_>,
    state: &mut Reading,
    deferrals: &mut Option<Deferrals>,
) -> SessionEnd {
    let reliable = link.reliable;
    // Deferred acks cost per message only where the router asked for them.
    let defers = reliable.is_some() && router.defers();
    // One timer for standalone acks, reset rather than re-created per message, and
    // allocated only on sessions that acknowledge (idle connections stay small).
    let mut ack_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let mut ack_armed = false;
    // An ack owed at once by the last message, sent once that message was handled.
    let mut ack_now = false;
    loop {
        if std::mem::take(&mut ack_now)
            && let Some(reliable) = reliable
        {
            reliable.send_ack_now(&sender, state.handled.take());
        }
        // Ask for the ack deadline only while no timer is armed: an armed deadline
        // never needs to move earlier (acks owed at once are sent by `on_inbound`), and
        // a timer outliving its ack fires harmlessly. One lock per message is enough.
        if !ack_armed
            && let Some(reliable) = reliable
            && let Some(at) = reliable.ack_due_at(state.handled.take())
        {
            let timer = ack_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            timer.as_mut().reset(at);
            ack_armed = true;
        }
        let ack_wait = async {
            match ack_timer.as_mut() {
                Some(timer) if ack_armed => timer.as_mut().await,
                _ => std::future::pending().await,
            }
        };
        let received = tokio::select! {
            biased;
            Some(deferral) = async {
                match deferrals.as_mut() {
                    Some(d) => d.rx.recv().await,
                    None => std::future::pending().await,
                }
            }, if defers => {
                if let Deferral::Taken(s) = deferral {
                    // Between messages, only a late call makes one: the message it
                    // names may be acknowledged already.
                    return late_deferral(&sender, s, state);
                }
                if let Err(end) = on_deferral(deferral, reliable, &sender, state) {
                    return end;
                }
                continue;
            }
            r = receiver.recv(), if state.deferred < MAX_DEFERRED => r,
            () = ack_wait => {
                ack_armed = false;
                if let Some(reliable) = reliable {
                    reliable.send_ack_if_due(&sender, state.handled.take());
                }
                continue;
            }
        };
        let mut env = match received {
            Ok(Some(env)) => env,
            Ok(None) => return SessionEnd::Closed,
            Err(e) => return SessionEnd::Failed(e),
        };
        if let Some(reliable) = reliable {
            match reliable.on_inbound(&env, state.handled.take()) {
                // Held until handled: every path below marks it so, at the next lock.
                Verdict::Deliver => state.handled = env.seq,
                Verdict::DeliverThenAck => {
                    state.handled = env.seq;
                    ack_now = true;
                }
                Verdict::Drop => continue,
                Verdict::DropThenAck => {
                    // A replay of what arrived: tell the peer at once so it stops.
                    reliable.send_ack_now(&sender, None);
                    continue;
                }
                Verdict::Violation(reason) => {
                    link.recorder.error("session_violation");
                    tracing::warn!(connection = sender.info().id, %reason, "session rule broken");
                    sender.abort_with(CloseCode::PROTOCOL_ERROR, &reason);
                    return SessionEnd::Failed(RecvError::Io(reason));
                }
            }
        }
        if let Some(encoding) = env.content_encoding() {
            // Checked on arrival, whatever the type: a compression bomb stops at the
            // limit, and an encoding this side did not grant is refused. The
            // connection stays up.
            let refused = if sender
                .info()
                .has_capability(tunnel_proto::capability::DEFLATE)
            {
                env.decompress_payload(sender.limits())
                    .err()
                    .map(|e| e.to_string())
            } else {
                Some(format!(
                    "content-encoding {} was not negotiated",
                    tunnel_proto::text::Untrusted(encoding)
                ))
            };
            if let Some(why) = refused {
                tracing::warn!(agent = %sender.info().agent, kind = %tunnel_proto::text::Untrusted(env.kind.as_str()), error = %tunnel_proto::text::Untrusted(&why), "unreadable compressed payload");
                link.recorder.error("bad_payload");
                link.reject(&sender, &env, error_code::BAD_REQUEST, why)
                    .await;
                continue;
            }
        }
        match env.kind {
            MessageType::Ping => {
                let pong = sender.envelope(MessageType::Pong).with_correlation(env.id);
                let _ = sender.try_send(&pong);
                continue;
            }
            MessageType::Close => {
                match Close::from_envelope(&env) {
                    Ok(close) => {
                        tracing::debug!(code = close.code, reason = %tunnel_proto::text::Untrusted(&close.reason), "peer is closing");
                        if !link.follows_drains {
                            continue;
                        }
                        if close.code == CloseCode::GOING_AWAY.0 && close.reconnect.is_some() {
                            link.draining.store(true, Ordering::Release);
                            link.drain_notice.notify_one();
                        }
                        // The close that ends a drain carries no hint: keep the drain's.
                        if close.reconnect.is_some() {
                            *hint = close.reconnect;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %tunnel_proto::text::Untrusted(&e.to_string()), "ignoring a malformed close message")
                    }
                }
                continue;
            }
            MessageType::Reply => {
                // The peer refused a one-way message: its receipt says so (the session
                // noted it), and nobody waits for this reply.
                if let Some(error) = &env.error
                    && crate::delivery::is_rejection(&error.code)
                    && env.correlation.is_none_or(|id| !link.pending.waits_for(id))
                {
                    tracing::debug!(agent = %sender.info().agent, code = %tunnel_proto::text::Untrusted(&error.code), reason = %tunnel_proto::text::Untrusted(&error.message), "the peer refused a message");
                    continue;
                }
                if !link.pending.complete(env, &sender.info().agent) {
                    tracing::debug!(agent = %sender.info().agent, "discarding a late or unasked-for reply");
                }
                continue;
            }
            MessageType::Handshake | MessageType::HandshakeAck => {
                tracing::debug!(
                    connection = sender.info().id,
                    "ignoring a repeated handshake"
                );
                continue;
            }
            _ => {}
        }
        let kind = env.kind.clone();
        let unrouted_id = env.id;
        // Boxed: it is kept across the handler's await, in every connection's task.
        let request = env.expects_reply().then(|| Box::new(env.reply(0, 0)));
        let seq = env.seq.filter(|_| defers);
        let mut inbound = Inbound::new(env, sender.clone());
        if let Some(seq) = seq {
            // Made at the first such message: an idle connection keeps no channel.
            let d = deferrals.get_or_insert_with(Deferrals::new);
            inbound = inbound.deferrable(seq, d.tx.clone());
        }
        let outcome = router.dispatch(inbound).await;
        // Did the handler take the message to acknowledge later (or finish others)?
        while let Some(d) = deferrals.as_mut()
            && let Ok(deferral) = d.rx.try_recv()
        {
            if let Deferral::Taken(s) = deferral
                && Some(s) == seq
            {
                state.handled = None;
            } else if let Deferral::Taken(s) = deferral {
                return late_deferral(&sender, s, state);
            }
            if let Err(end) = on_deferral(deferral, reliable, &sender, state) {
                return end;
            }
        }
        let error = match outcome {
            Ok(Dispatched::Handled(payload)) => {
                if let Some(mut reply) = request {
                    reply.payload = payload;
                    Box::pin(link.send_reply(&sender, stamp(reply))).await;
                }
                continue;
            }
            Ok(Dispatched::Unrouted) => {
                tracing::debug!(agent = %sender.info().agent, kind = %tunnel_proto::text::Untrusted(kind.as_str()), "no handler for message");
                let why = format!(
                    "no handler for {}",
                    tunnel_proto::text::Untrusted(kind.as_str())
                );
                if request.is_none() {
                    // A one-way message nobody handles is refused, not taken for delivered.
                    let refused = Envelope::new(unrouted_id, kind.clone(), 0);
                    link.reject(&sender, &refused, error_code::NO_HANDLER, why)
                        .await;
                    continue;
                }
                ErrorBody::new(error_code::NO_HANDLER, why)
            }
            Err(e) if cause::<crate::Refused>(&e).is_some() => {
                let why = cause::<crate::Refused>(&e)
                    .map(|r| r.reason().to_owned())
                    .unwrap_or_default();
                link.recorder.error("refused");
                tracing::debug!(agent = %sender.info().agent, kind = %tunnel_proto::text::Untrusted(kind.as_str()), reason = %tunnel_proto::text::Untrusted(&why), "the handler refused a message");
                // Answered as a message this side cannot read is: counted as received,
                // and the one reply (a request's too).
                let refused_env = Envelope::new(unrouted_id, kind.clone(), 0);
                link.reject(&sender, &refused_env, error_code::BAD_REQUEST, why)
                    .await;
                continue;
            }
            Err(e) if is_unavailable(&e) => {
                // Not taken: unacknowledged, and replayed by the peer's session on its
                // next connection.
                link.recorder.error("unavailable");
                tracing::warn!(agent = %sender.info().agent, kind = %tunnel_proto::text::Untrusted(kind.as_str()), reason = %tunnel_proto::text::Untrusted(&e.to_string()), "handler unavailable: closing so that the message is replayed");
                // Not handled: it is rewound with whatever else is held.
                state.handled = None;
                state.rewind = true;
                let reason = e.to_string();
                sender.abort_with(
                    CloseCode::TRY_AGAIN_LATER,
                    tunnel_proto::text::truncate(&reason, 100),
                );
                return SessionEnd::Failed(RecvError::Io(reason));
            }
            Err(e) => {
                link.recorder.error("handler");
                tracing::warn!(agent = %sender.info().agent, kind = %tunnel_proto::text::Untrusted(kind.as_str()), error = %tunnel_proto::text::Untrusted(&e.to_string()), "handler failed");
                ErrorBody::new(error_code::HANDLER_ERROR, e.to_string())
            }
        };
        if let Some(mut reply) = request {
            reply.error = Some(error);
            Box::pin(link.send_reply(&sender, stamp(reply))).await;
        }
    }
}

/// `acknowledge_later` was called after its handler returned, so the message may be
/// acknowledged already: a misuse the docs forbid. The connection ends (`1011`) rather
/// than go on as if it were held.
fn late_deferral(sender: &ConnectionSender, seq: u64, state: &mut Reading) -> SessionEnd {
    tracing::error!(agent = %sender.info().agent, seq, "acknowledge_later called after the handler returned");
    state.rewind = true;
    let reason = "acknowledge_later after the handler returned";
    sender.abort_with(CloseCode::INTERNAL_ERROR, reason);
    SessionEnd::Failed(RecvError::Io(reason.into()))
}

/// Whether a handler's error is (or wraps, as a layer's error may) [`crate::Unavailable`].
fn is_unavailable(e: &BoxError) -> bool {
    cause::<crate::Unavailable>(e).is_some()
}

/// The first error of type `T` in `e`'s chain of causes (a layer may wrap a handler's).
fn cause<T: std::error::Error + 'static>(e: &BoxError) -> Option<&T> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
    while let Some(c) = cause {
        if let Some(t) = c.downcast_ref::<T>() {
            return Some(t);
        }
        cause = c.source();
    }
    None
}

/// Applies what a handler that acknowledges later reported. A message it could not take
/// ends the connection (with `1013`): what is held is rewound, and the peer replays it.
fn on_deferral(
    deferral: Deferral,
    reliable: Option<&Arc<Reliable>>,
    sender: &ConnectionSender,
    state: &mut Reading,
) -> Result<(), SessionEnd> {
    match deferral {
        // Only for the message just dispatched: a late one ends the connection first.
        Deferral::Taken(_) => state.deferred += 1,
        Deferral::Done(seq, Ok(())) => {
            state.deferred = state.deferred.saturating_sub(1);
            if let Some(reliable) = reliable {
                reliable.complete(seq);
            }
        }
        Deferral::Done(_, Err(reason)) => {
            state.deferred = state.deferred.saturating_sub(1);
            tracing::warn!(agent = %sender.info().agent, reason = %tunnel_proto::text::Untrusted(&reason), "a message could not be taken: closing so that it is replayed");
            state.rewind = true;
            sender.abort_with(
                CloseCode::TRY_AGAIN_LATER,
                tunnel_proto::text::truncate(&reason, 100),
            );
            return Err(SessionEnd::Failed(RecvError::Io(reason)));
        }
    }
    Ok(())
}

/// Fits a payload to the connection it is about to go on, or refuses it before it is
/// numbered and held: a message held in a session that can never be written would stop
/// the session's traffic behind it (and be replayed, failing again, on every
/// connection). A payload in the other codec's format is transcoded now; a compressed
/// one is inflated for a peer that did not grant `deflate` (a peer never receives an
/// encoding it did not accept), and transcoded then compressed again when the codecs
/// differ (a compressed payload cannot be transcoded on the fly). Refused: a payload
/// with no form in the connection's codec (a MessagePack map with a binary key has
/// none in JSON), a compressed one that does not inflate, and a message whose envelope,
/// fitted, is larger than the connection's message limit (with the widest `seq` and
/// `ack` its session may add; encoded to tell only when its cheap bound,
/// `Envelope::encoded_len_bound`, is over the limit). Between connections a session's
/// message is fitted to its last connection ([`Fit`], kept by the session's driver),
/// which the peer's next one is almost always like. Not caught here: a message held
/// by a session that has had no connection on this side (restored from a store), and
/// one fitted to a last connection that the next one is not like (the peer changed
/// its codec or limit); such a message ends every connection it cannot be written on
/// until it expires (see `delivery::close_after_failed_write`).
pub(crate) fn fit_payload(
    env: &mut Envelope,
    fit: Option<Fit>,
) -> Result<(), tunnel_proto::EncodeError> {
    let Some(fit) = fit else {
        return Ok(());
    };
    if fit.needs_fitting(env) {
        fit_format(env, fit)?;
    }
    fit.check_size(env)
}

/// Transcodes, inflates or compresses `env`'s payload as `fit` asks
/// ([`Fit::needs_fitting`]).
fn fit_format(env: &mut Envelope, fit: Fit) -> Result<(), tunnel_proto::EncodeError> {
    let Some(format) = env.payload.as_ref().map(tunnel_proto::Payload::format) else {
        return Ok(());
    };
    if env.content_encoding().is_some() && !(fit.deflate && format == fit.format) {
        let limits = tunnel_proto::Limits::default()
            .max_message_size(fit.max_message_size)
            .max_decompressed_size(fit.max_decompressed_size);
        env.decompress_payload(&limits)
            .map_err(|e| tunnel_proto::EncodeError::Serialize(format!("cannot inflate: {e}")))?;
        refit_format(env, fit.format)?;
        if fit.deflate {
            env.compress_payload(0);
        }
    } else {
        refit_format(env, fit.format)?;
    }
    Ok(())
}

/// What a payload must be to go on a connection: the connection's codec, whether its
/// peer takes `deflate`, and its limits. Small and `Copy`, so that a session keeps its
/// last connection's after the connection is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fit {
    format: tunnel_proto::Format,
    deflate: bool,
    max_message_size: usize,
    max_decompressed_size: usize,
}

impl Fit {
    pub(crate) fn of(sender: &ConnectionSender) -> Self {
        let info = sender.info();
        let limits = sender.limits();
        Fit {
            format: info.format,
            deflate: info.has_capability(tunnel_proto::capability::DEFLATE),
            max_message_size: limits.max_message_size,
            max_decompressed_size: limits.max_decompressed_size,
        }
    }

    /// Whether `env`'s payload has to be transcoded, inflated or compressed again for
    /// this connection: cheap enough to ask for every message.
    fn needs_fitting(&self, env: &Envelope) -> bool {
        env.payload
            .as_ref()
            .is_some_and(|p| p.format() != self.format || env.content_encoding().is_some())
    }

    /// Refuses `env` if it would encode larger than the message limit once its session
    /// numbers and acknowledges in it. The bound is enough for almost every message;
    /// one near the limit is encoded to tell.
    fn check_size(&self, env: &mut Envelope) -> Result<(), tunnel_proto::EncodeError> {
        let limit = self.max_message_size;
        if env
            .encoded_len_bound(self.format)
            .is_some_and(|bound| bound <= limit)
        {
            return Ok(());
        }
        let (seq, ack) = (env.seq, env.ack);
        env.seq = Some(u64::MAX);
        env.ack = Some(u64::MAX);
        let mut wire = Vec::new();
        let encoded = self.format.codec().encode(env, &mut wire);
        env.seq = seq;
        env.ack = ack;
        encoded?;
        if wire.len() > limit {
            return Err(tunnel_proto::EncodeError::TooLarge {
                size: wire.len(),
                limit,
            });
        }
        Ok(())
    }
}

/// Transcodes an uncompressed payload to `format` if it is in the other one.
fn refit_format(
    env: &mut Envelope,
    format: tunnel_proto::Format,
) -> Result<(), tunnel_proto::EncodeError> {
    if let Some(payload) = &env.payload
        && payload.format() != format
        && env.content_encoding().is_none()
    {
        env.payload = Some(payload.to_format(format)?);
    }
    Ok(())
}

fn stamp(mut reply: Box<Envelope>) -> Box<Envelope> {
    reply.timestamp = tunnel_transport::unix_millis();
    reply
}
