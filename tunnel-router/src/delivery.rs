//! Exactly-once, in-order delivery across reconnects: the driver of one
//! [`tunnel_proto::session::Session`], shared by the connections that carry it. It
//! holds the lock, the wake-ups and the writes; every rule is the session's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tunnel_metrics::Recorder;

use crate::Error;
use tunnel_proto::session::{self, Attach, Next, Pushed, Refused, Session, SessionConfig};
use tunnel_proto::{CloseCode, Envelope, MessageType};
use tunnel_transport::ConnectionSender;

pub use tunnel_proto::session::{FullPolicy, Held, Undelivered, WhenFull};
pub(crate) use tunnel_proto::session::{Reset, is_rejection};

/// Resolves once the peer acknowledged the message, or with the reason it never will.
///
/// Awaiting it is optional: a receipt dropped unawaited costs nothing, and the message
/// is delivered all the same.
///
/// ```no_run
/// # async fn f(agent: tunnel_router::Agent) -> Result<(), Box<dyn std::error::Error>> {
/// use tunnel_proto::MessageType;
/// use tunnel_router::Undelivered;
///
/// let receipt = agent.send(MessageType::Event, &"scaled to 3").await?; // accepted
/// match receipt.delivered().await {
///     Ok(()) => {}                                   // the hub has it, exactly once
///     Err(Undelivered::Reset(reason)) => eprintln!("session reset: {reason}; resync"),
///     Err(other) => eprintln!("not delivered: {other}"),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Receipt {
    seq: u64,
    /// The session, looked at only when the receipt is awaited (most are not).
    session: Option<Arc<Reliable>>,
}

impl Receipt {
    /// A receipt for a message sent without acknowledgement tracking.
    pub(crate) fn untracked() -> Self {
        Receipt {
            seq: 0,
            session: None,
        }
    }

    /// A receipt for message `seq` held by `session`.
    fn held(seq: u64, session: &Arc<Reliable>) -> Self {
        Receipt {
            seq,
            session: Some(session.clone()),
        }
    }

    /// The message's sequence number (0 when untracked).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Waits for the outcome.
    pub async fn delivered(self) -> Result<(), Undelivered> {
        let seq = self.seq;
        let Some(session) = self.session else {
            return Err(Undelivered::Untracked);
        };
        let mut changes = session.changes.subscribe();
        loop {
            // Marked seen before looking, so a change after the look wakes the wait.
            changes.borrow_and_update();
            if let Some(outcome) = session.state().session.outcomes().outcome(seq) {
                return outcome;
            }
            if changes.changed().await.is_err() {
                return Err(Undelivered::ShutDown);
            }
        }
    }
}

/// A message a restored session held when it was restored (see
/// [`Hub::take_restored`](crate::Hub::take_restored)).
#[derive(Debug)]
pub struct Unacked {
    /// Its headers, as sent.
    pub headers: tunnel_proto::Headers,
    /// Its outcome.
    pub receipt: Receipt,
}

/// What [`Reliable::try_send`] did with a message.
pub(crate) enum TrySend {
    /// Held (and on the connection if there is one).
    Held(Receipt),
    /// Held, but the connection's queue was full: the backlog must be drained.
    Backlog(Receipt),
    /// The buffer is full and the policy says to wait: the message, back.
    Wait(Box<Waiting>),
    /// Refused.
    Failed(Error),
}

impl TrySend {
    /// Waits for whatever the message still needs: the backlog drained, or room in the
    /// buffer. Its future is large: box it on paths every message takes.
    pub(crate) async fn finish(self, reliable: &Arc<Reliable>) -> Result<Receipt, Error> {
        match self {
            TrySend::Held(receipt) => Ok(receipt),
            TrySend::Backlog(receipt) => {
                // Boxed on its own: the drainer's future is large, and waiting for
                // room (below) is the more frequent slow path.
                Box::pin(reliable.drain()).await;
                Ok(receipt)
            }
            TrySend::Wait(waiting) => reliable.send_waiting(waiting).await,
            TrySend::Failed(e) => Err(e),
        }
    }
}

/// A message waiting for room in the replay buffer.
pub(crate) struct Waiting {
    env: Box<Envelope>,
    /// The resource key of a `KeepLatest` status.
    key: Option<String>,
    /// How long to wait for room.
    wait: std::time::Duration,
}

/// The session and the connection it writes to, under one lock.
struct State {
    session: Session,
    /// The connection named by `session.link()`.
    conn: Option<ConnectionSender>,
    /// What the last connection attached took: messages held while there is none are
    /// fitted to it (`connection_loop::fit_payload`).
    fit: Option<crate::connection_loop::Fit>,
    /// What a restored session held when it was restored (sequence number, headers),
    /// until [`Reliable::take_restored`] takes it.
    restored: Vec<(u64, tunnel_proto::Headers)>,
}

impl State {
    /// Writes held message `seq` on the connection if it can go at once; returns
    /// whether a backlog needs draining.
    fn transmit(&mut self, seq: u64) -> bool {
        let Some(conn) = self.conn.as_ref() else {
            return false;
        };
        let Some(env) = self.session.transmit(seq) else {
            return false;
        };
        match conn.try_send(env) {
            Ok(()) => {
                self.session.on_transmitted(seq);
                false
            }
            Err(tunnel_transport::SendError::Full) => {
                self.session.on_link_full(seq);
                true
            }
            Err(e) => {
                // The session keeps its link until the connection is gone and detached
                // (the registry then marks the session disconnected); nothing more is
                // written to it meanwhile.
                close_after_failed_write(conn, &e);
                self.conn = None;
                false
            }
        }
    }

    /// Holds `env` and writes it if it can go at once: `(seq, backlog)`.
    fn push(
        &mut self,
        env: Box<Envelope>,
        key: &mut Option<String>,
        now: std::time::Instant,
    ) -> Result<(u64, bool), Refused> {
        Ok(match self.session.send(env, key, now)? {
            Pushed::Replaced { seq } => (seq, false),
            Pushed::Held { seq, next } => match next {
                Next::Transmit => (seq, self.transmit(seq)),
                Next::Backlog => (seq, true),
                Next::Hold => (seq, false),
            },
        })
    }
}

/// Ends a connection a session message could not be written on. Nothing more of the
/// session is written to it (what it holds waits for the next connection), so a
/// connection left open would carry nothing of the session, its acks included, for as
/// long as it lived; closed, it is detached, the peer reconnects and resumes, and the
/// message is sent again.
fn close_after_failed_write(conn: &ConnectionSender, e: &tunnel_transport::SendError) {
    use tunnel_transport::SendError;
    let agent = &conn.info().agent;
    match e {
        // Ending already.
        SendError::Closed => {}
        SendError::Timeout(_) => {
            tracing::warn!(%agent, error = %e, "closing: the peer does not read what it is sent");
            conn.abort_with(
                CloseCode::POLICY_VIOLATION,
                "outbound queue full: the peer does not read what it is sent",
            );
        }
        SendError::Encode(_) => {
            // Payloads are fitted to the connection (or the session's last one)
            // before they are held: this one was held by a session restored with no
            // connection here yet, or fitted a last connection the current one is not
            // like (another codec or limit). Until it expires (the replay buffer's age
            // bound) every connection of the session ends here.
            tracing::error!(%agent, error = %e, "closing: a held message cannot be written on this connection");
            conn.abort_with(
                CloseCode::INTERNAL_ERROR,
                "a held message cannot be encoded",
            );
        }
        _ => conn.abort_with(
            CloseCode::INTERNAL_ERROR,
            "a session message could not be written",
        ),
    }
}

/// One session's driver.
pub(crate) struct Reliable {
    state: Mutex<State>,
    /// One drainer at a time sends the backlog, in order.
    drain: tokio::sync::Mutex<()>,
    /// Held by the one connection whose messages are being delivered. A newer
    /// connection of the session waits for the older one's loop to end, so deliveries
    /// from two connections never interleave out of order.
    pub(crate) reader: tokio::sync::Mutex<()>,
    /// Bumped whenever outcomes changed: receipts look again.
    changes: watch::Sender<u64>,
    /// Woken whenever room may have been made in the replay buffer.
    room: Notify,
    /// A coarse clock for the replay buffer's age bound, advanced by `expire` (every
    /// sweep): reading the clock per message would cost more than the bound needs.
    epoch_start: Instant,
    coarse_ms: AtomicU64,
    /// Where changes of the replay buffer's depth are reported.
    recorder: Arc<dyn Recorder>,
}

impl std::fmt::Debug for Reliable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No lock: formatting must never wait for (or deadlock on) the session.
        f.debug_struct("Reliable").finish_non_exhaustive()
    }
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Reliable {
    pub(crate) fn new(config: SessionConfig, recorder: Arc<dyn Recorder>) -> Arc<Self> {
        Self::from_session(Session::new(config), recorder)
    }

    /// Drives `session` (a restored one, say); what it holds counts in the replay
    /// metrics from now on.
    pub(crate) fn from_session(session: Session, recorder: Arc<dyn Recorder>) -> Arc<Self> {
        let held = session.held();
        if held.messages > 0 {
            recorder.replay_changed(count(held.messages), count(held.bytes));
        }
        let restored = session
            .held_messages()
            .map(|(seq, env)| (seq, env.headers.clone()))
            .collect();
        Arc::new(Reliable {
            recorder,
            state: Mutex::new(State {
                session,
                conn: None,
                fit: None,
                restored,
            }),
            drain: tokio::sync::Mutex::new(()),
            reader: tokio::sync::Mutex::new(()),
            changes: watch::Sender::new(0),
            room: Notify::new(),
            epoch_start: Instant::now(),
            coarse_ms: AtomicU64::new(0),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the session under the lock, then, with the lock released, reports
    /// how the replay buffer's depth changed and wakes receipts and waiting senders if
    /// outcomes moved.
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let (result, before, after, changed) = {
            let mut st = self.state();
            let before = st.session.held();
            let result = f(&mut st);
            let after = st.session.held();
            (result, before, after, st.session.take_changed())
        };
        if after != before {
            self.recorder.replay_changed(
                count(after.messages) - count(before.messages),
                count(after.bytes) - count(before.bytes),
            );
        }
        if changed {
            self.changes.send_modify(|v| *v = v.wrapping_add(1));
            self.room.notify_waiters();
        }
        result
    }

    /// Now, to the precision of the sweep interval.
    fn coarse_now(&self) -> std::time::Instant {
        let ms = self.coarse_ms.load(Ordering::Relaxed);
        (self.epoch_start + std::time::Duration::from_millis(ms)).into_std()
    }

    /// The highest sequence number received in order (for a resume request or grant).
    pub(crate) fn last_received(&self) -> u64 {
        self.state().session.last_received()
    }

    /// Whether a peer reporting `last_received` may resume the session.
    pub(crate) fn may_resume(&self, last_received: u64) -> bool {
        self.state().session.may_resume(last_received)
    }

    /// A connection with `lease` was just granted this session: from now on only it may
    /// carry the session. The connection carrying it so far is closed with `4004` at
    /// once (what it still had queued is dropped; the new one replays it), so that it
    /// gets nothing of the session after the new connection's grant.
    pub(crate) fn supersede(&self, lease: u64) {
        let older = self.with(|st| {
            st.session.supersede(lease);
            st.conn.take()
        });
        if let Some(older) = older {
            older.abort_with(
                tunnel_proto::CloseCode::SESSION_REPLACED,
                "a newer connection resumed the session",
            );
        }
    }

    /// Numbers `env` and holds it *staged* (see `Session::send_staged`): it goes to no
    /// connection, and nothing after it does, until [`Reliable::release`] covers it.
    /// Fails at once when the buffer has no room.
    pub(crate) fn send_staged(self: &Arc<Self>, env: Box<Envelope>) -> Result<Receipt, Error> {
        let now = self.coarse_now();
        match self.with(|st| st.session.send_staged(env, now)) {
            Ok(Pushed::Held { seq, .. } | Pushed::Replaced { seq }) => Ok(Receipt::held(seq, self)),
            Err(Refused::Full { bound, .. }) => Err(Error::Full(bound)),
            Err(Refused::ShutDown(_)) => Err(Error::ShutDown),
        }
    }

    /// Releases the staged messages numbered up to `through`, and sends what may go now.
    pub(crate) async fn release(&self, through: u64) {
        if self.with(|st| st.session.release(through)) {
            Box::pin(self.drain()).await;
        }
    }

    /// Ends the hold after an open-numbered resume, and sends what may go now.
    pub(crate) async fn release_resumed(&self) {
        if self.with(|st| st.session.release_resumed()) {
            Box::pin(self.drain()).await;
        }
    }

    /// The highest sequence number the agent acknowledged.
    pub(crate) fn acked(&self) -> u64 {
        self.state().session.acked()
    }

    /// See `Session::resumed_open_at`.
    pub(crate) fn resumed_open_at(&self) -> Option<u64> {
        self.state().session.resumed_open_at()
    }

    /// Numbers `env`, holds it until acknowledged and sends it on the current
    /// connection if there is one (else it waits for the next). Returns once the
    /// message is queued on the connection or held for the next one.
    pub(crate) async fn send(
        self: &Arc<Self>,
        env: Box<Envelope>,
        when_full: WhenFull,
    ) -> Result<Receipt, Error> {
        match self.try_send(env, &when_full) {
            TrySend::Held(receipt) => {
                // A producer that never has to wait would starve the tasks on its thread
                // that read the peer's acks: yield now and then.
                tokio::task::consume_budget().await;
                Ok(receipt)
            }
            // Boxed: the waiting paths are rare, and inline their futures would weigh
            // on every send.
            other => Box::pin(other.finish(self)).await,
        }
    }

    /// [`Reliable::send`] without waiting: holds `env` if the buffer has room (or it
    /// replaces an older status), or gives it back when the caller has to wait for
    /// room. Anything but [`TrySend::Held`] needs [`TrySend::finish`].
    pub(crate) fn try_send(self: &Arc<Self>, env: Box<Envelope>, when_full: &WhenFull) -> TrySend {
        let mut key = match when_full {
            WhenFull::KeepLatest(_) => session::conflation_key(&env),
            _ => None,
        };
        let now = self.coarse_now();
        match self.with(|st| st.push(env, &mut key, now)) {
            Ok((seq, false)) => TrySend::Held(Receipt::held(seq, self)),
            Ok((seq, true)) => TrySend::Backlog(Receipt::held(seq, self)),
            Err(Refused::Full { env, bound }) => match *when_full {
                WhenFull::Wait(wait) | WhenFull::KeepLatest(wait) => {
                    TrySend::Wait(Box::new(Waiting { env, key, wait }))
                }
                _ => TrySend::Failed(Error::Full(bound)),
            },
            Err(Refused::ShutDown(_)) => TrySend::Failed(Error::ShutDown),
        }
    }

    /// The rest of [`Reliable::send`] once the buffer was full: waits for room up to
    /// the policy's deadline.
    async fn send_waiting(self: &Arc<Self>, waiting: Box<Waiting>) -> Result<Receipt, Error> {
        let Waiting {
            mut env,
            mut key,
            wait,
        } = *waiting;
        let deadline = Instant::now() + wait;
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            let now = self.coarse_now();
            let pushed = self.with(|st| {
                let pushed = st.push(env, &mut key, now);
                if matches!(pushed, Err(Refused::Full { .. })) {
                    // Register for room before letting go of the lock, so an ack that
                    // frees room in between is not missed.
                    room.as_mut().enable();
                }
                pushed
            });
            match pushed {
                Ok((seq, backlog)) => {
                    if backlog {
                        Box::pin(self.drain()).await;
                    }
                    return Ok(Receipt::held(seq, self));
                }
                Err(Refused::ShutDown(_)) => return Err(Error::ShutDown),
                Err(Refused::Full { env: back, bound }) => {
                    env = back;
                    if tokio::time::timeout_at(deadline, room).await.is_err() {
                        return Err(Error::Full(bound));
                    }
                }
            }
        }
    }

    /// Sends the backlog in order, waiting for room on the connection, until it is
    /// empty or the connection is gone.
    async fn drain(&self) {
        let _one = self.drain.lock().await;
        loop {
            let next = {
                let mut st = self.state();
                let Some(conn) = st.conn.clone() else {
                    return;
                };
                let Some((seq, env)) = st.session.poll_backlog() else {
                    return;
                };
                // The envelope, not its box: the drain's future holds it, and cloning
                // the box would allocate for every message of the backlog.
                (conn, Envelope::clone(env), seq)
            };
            let (conn, env, seq) = next;
            let sent = conn.send(&env).await;
            let mut st = self.state();
            if let Err(e) = &sent {
                // As in `State::transmit`: the link stays until the connection is
                // detached.
                close_after_failed_write(&conn, e);
                if st
                    .conn
                    .as_ref()
                    .is_some_and(|c| c.info().id == conn.info().id)
                {
                    st.conn = None;
                }
                return;
            }
            let more = st.session.on_backlog_sent(seq, conn.info().id);
            if st.session.link().is_none() {
                st.conn = None;
            }
            if !more {
                return;
            }
        }
    }

    /// Makes `conn` the session's connection. `resumed` and `peer_received` come from
    /// the handshake; a session that cannot continue is reset (the messages the peer
    /// may have had fail) and the reset returned. Everything held is then sent, in
    /// order, before any new message. `Err`: the peer resumed a session this side had
    /// to reset: `conn` carries nothing (see [`Attach::Restart`]).
    pub(crate) async fn attach(
        &self,
        conn: ConnectionSender,
        resumed: bool,
        peer_received: Option<u64>,
    ) -> Result<Option<Reset>, Reset> {
        let attached = self.with(|st| {
            let info = conn.info();
            match st
                .session
                .handle_attach(info.id, info.session_lease, resumed, peer_received)
            {
                // A newer connection of this session attached first: this one is
                // superseded and carries nothing (it is being closed with 4004).
                Attach::Superseded => Ok(None),
                Attach::Restart(reset) => Err(reset),
                Attach::Attached(reset) => {
                    st.fit = Some(crate::connection_loop::Fit::of(&conn));
                    st.conn = Some(conn);
                    Ok(Some(reset))
                }
            }
        });
        match attached {
            Ok(Some(reset)) => {
                self.drain().await;
                Ok(reset)
            }
            Ok(None) => Ok(None),
            Err(reset) => Err(reset),
        }
    }

    /// Whether the peer has stopped acknowledging: the oldest message it was sent has
    /// waited for its ack longer than `stall_timeout` (to the sweep's precision).
    pub(crate) fn peer_stalled(&self) -> bool {
        let now = self.coarse_now();
        self.state().session.peer_stalled(now)
    }

    /// Whether every message handed to a connection has been acknowledged.
    pub(crate) fn quiet(&self) -> bool {
        self.state().session.is_quiet()
    }

    /// Called when a drained connection closed: if nothing it carried is
    /// unacknowledged, the next connection may start a new session without a reset.
    pub(crate) fn end_for_handover(&self) -> bool {
        self.state().session.handle_handover()
    }

    /// What a message held now must fit: the current connection, or the last one
    /// attached; `None` before any was.
    pub(crate) fn fit(&self) -> Option<crate::connection_loop::Fit> {
        self.state().fit
    }

    /// Whether `conn` is the connection carrying the session.
    pub(crate) fn carried_by(&self, conn: &ConnectionSender) -> bool {
        self.state().session.carried_by(conn.info().id)
    }

    /// Forgets `conn` if it is the current connection; returns whether it was.
    pub(crate) fn detach(&self, conn: &ConnectionSender) -> bool {
        let mut st = self.state();
        let current = st.session.detach(conn.info().id);
        if current {
            st.conn = None;
        }
        current
    }

    /// Applies an arriving envelope's `seq` and `ack`: what to do with it is the
    /// session's [`Verdict`](session::Verdict).
    ///
    /// The connection's reader calls it once the previous message was handled, so it
    /// also releases that one (see [`Reliable::hold`]); a data message delivered now is
    /// held until its handler is done.
    pub(crate) fn on_inbound(&self, env: &Envelope, handled: Option<u64>) -> session::Verdict {
        self.with(|st| {
            // The clock is read at most once, and only if a rule needs the time.
            let read = std::cell::Cell::new(None);
            let now = || {
                read.get().unwrap_or_else(|| {
                    let t = Instant::now().into_std();
                    read.set(Some(t));
                    t
                })
            };
            if let Some(seq) = handled {
                st.session.complete_held(seq, now);
            }
            let verdict = st.session.handle_inbound(env, now);
            if let (Some(seq), session::Verdict::Deliver | session::Verdict::DeliverThenAck) =
                (env.seq, &verdict)
                && !env.kind.is_control()
            {
                // No acknowledgement covers it while its handler runs (another task's
                // outgoing message would otherwise carry one).
                st.session.hold(seq);
            }
            verdict
        })
    }

    /// Held message `seq` was handled: acknowledgements may cover it.
    pub(crate) fn complete(&self, seq: u64) {
        self.with(|st| {
            st.session.complete_held(seq, || Instant::now().into_std());
        });
    }

    /// The reader stopped: `handled` was handled; with `rewind`, messages still held
    /// (acknowledged later, and not yet done) count as never received, so the peer
    /// replays them on its next connection.
    pub(crate) fn stop_reading(&self, handled: Option<u64>, rewind: bool) {
        self.with(|st| {
            if let Some(seq) = handled {
                st.session.complete_held(seq, || Instant::now().into_std());
            }
            if rewind {
                st.session.rewind_held();
            }
        });
    }

    /// When a standalone acknowledgement is due, if one is owed. The reader asks
    /// between messages and says which one it just `handled`.
    pub(crate) fn ack_due_at(&self, handled: Option<u64>) -> Option<Instant> {
        let mut st = self.state();
        if let Some(seq) = handled {
            st.session.complete_held(seq, || Instant::now().into_std());
        }
        st.session.ack_due_at().map(Instant::from_std)
    }

    /// Sends the acknowledgement owed now as a standalone `ack`, unless session
    /// messages wait in the backlog: then it rides on them.
    pub(crate) fn send_ack_now(&self, conn: &ConnectionSender, handled: Option<u64>) {
        let ack = {
            let mut st = self.state();
            if let Some(seq) = handled {
                st.session.complete_held(seq, || Instant::now().into_std());
            }
            st.session.take_standalone_ack()
        };
        if let Some(ack) = ack {
            self.send_standalone_ack(conn, ack);
        }
    }

    /// Queues a standalone `ack`; one the full queue does not take is owed again.
    fn send_standalone_ack(&self, conn: &ConnectionSender, ack: u64) {
        let sent = conn.try_send(&conn.envelope(MessageType::Ack).with_ack(ack));
        if matches!(sent, Err(tunnel_transport::SendError::Full)) {
            let now = Instant::now().into_std();
            self.state().session.on_ack_unsent(now);
        }
    }

    /// Sends a standalone acknowledgement on `conn` if one is due.
    pub(crate) fn send_ack_if_due(&self, conn: &ConnectionSender, handled: Option<u64>) {
        let now = Instant::now().into_std();
        let ack = {
            let mut st = self.state();
            if let Some(seq) = handled {
                st.session.complete_held(seq, || now);
            }
            st.session.poll_ack(now)
        };
        if let Some(ack) = ack {
            self.send_standalone_ack(conn, ack);
        }
    }

    /// Drops messages held past the age bound; their receipts fail with `Expired`.
    /// Also advances the coarse clock, so call it regularly.
    pub(crate) fn expire(&self) {
        let ms = u64::try_from(self.epoch_start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.coarse_ms.store(ms, Ordering::Relaxed);
        let now = Instant::now().into_std();
        self.with(|st| st.session.handle_timeout(now));
    }

    /// Fails every held message with a reset (they cannot be delivered); the session
    /// itself stays usable.
    pub(crate) fn fail_held(&self, reason: &str) {
        self.with(|st| st.session.fail_held(reason));
    }

    /// Ends the session: every unacknowledged message fails with `reason`.
    pub(crate) fn shut_down(&self, reason: Undelivered) {
        self.with(|st| {
            st.session.shut_down(reason);
            st.conn = None;
        });
    }

    /// What the session held when it was restored, with `header`, each with its
    /// receipt (resolved already if the resume acknowledged it); taken once.
    pub(crate) fn take_restored(self: &Arc<Self>, header: &str) -> Vec<Unacked> {
        let restored = std::mem::take(&mut self.state().restored);
        restored
            .into_iter()
            .filter(|(_, headers)| headers.get(header).is_some())
            .map(|(seq, headers)| Unacked {
                headers,
                receipt: Receipt::held(seq, self),
            })
            .collect()
    }

    /// Messages and bytes held for replay.
    pub(crate) fn held(&self) -> Held {
        self.state().session.held()
    }

    /// The generation of this copy (see `Session::generation`).
    pub(crate) fn generation(&self) -> u64 {
        self.state().session.generation()
    }

    /// Records that this copy's snapshot of `generation` was saved.
    pub(crate) fn set_generation(&self, generation: u64) {
        self.state().session.set_generation(generation);
    }

    /// Whether a connection carries the session.
    pub(crate) fn is_attached(&self) -> bool {
        self.state().session.link().is_some()
    }

    /// The session's state now, unless it was shut down (nothing left to resume).
    pub(crate) fn snapshot(
        &self,
    ) -> Option<Result<session::SessionSnapshot, session::SnapshotError>> {
        let st = self.state();
        (!st.session.is_shut_down()).then(|| st.session.snapshot(Instant::now().into_std()))
    }
}
