//! Exactly-once, in-order delivery across reconnects: the driver of
//! [`tunnel_proto::session`] for one session, shared by the connections that carry it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tunnel_metrics::Recorder;
use tunnel_proto::session::{Accept, Bound, Inbound, Outbound, SessionConfig};
use tunnel_proto::{Envelope, ErrorBody, MessageType, Payload};
use tunnel_transport::ConnectionSender;

/// Why a message accepted by `send` was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Undelivered {
    /// The session was reset (the peer lost it, or it could not be resumed).
    #[error("session reset: {0}")]
    Reset(String),
    /// The message stayed unacknowledged longer than the replay buffer keeps messages.
    #[error("expired before the peer acknowledged it")]
    Expired,
    /// The session was shut down first.
    #[error("shut down before the peer acknowledged it")]
    ShutDown,
    /// The peer received the message but can never accept it (its payload is corrupt
    /// or too large, or nothing handles its type): it answered with this error, and
    /// the message is not sent again.
    #[error(
        "rejected by the peer: {code}: {}",
        tunnel_proto::text::Untrusted(message)
    )]
    Rejected {
        /// The error code (`bad_request`, `no_handler`).
        code: String,
        /// The peer's explanation, at most 1 KiB.
        message: String,
    },
    /// The connection does not acknowledge messages (session resume was not
    /// negotiated): the message was queued, and nothing more is known.
    #[error("delivery is not tracked on this connection")]
    Untracked,
}

/// What `send` does when the replay buffer is full (or, for [`WhenFull::KeepLatest`],
/// also before it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhenFull {
    /// Fail at once with [`ReliableSendError::Full`].
    Reject,
    /// Wait up to this long for acknowledgements to make room, then fail.
    Wait(Duration),
    /// For `status` messages, when the buffer is full: a status for a resource (group,
    /// version, resource, namespace, name) whose latest status is still waiting to be
    /// sent (not yet handed to any connection, for example while disconnected) replaces
    /// it in place instead of waiting. The replaced message's receipt resolves with the
    /// newer one's outcome. Otherwise, as [`WhenFull::Wait`] with this duration.
    KeepLatest(Duration),
}

/// What `send` does when the replay buffer is full, per message type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullPolicy {
    /// For types without their own entry. Default: wait up to 5 s.
    pub default: WhenFull,
    /// Per type. Default: `status` keeps only the latest per resource
    /// ([`WhenFull::KeepLatest`], waiting up to 5 s when there is none to replace).
    pub by_type: Vec<(MessageType, WhenFull)>,
}

impl Default for FullPolicy {
    fn default() -> Self {
        let wait = Duration::from_secs(5);
        FullPolicy {
            default: WhenFull::Wait(wait),
            by_type: vec![(MessageType::Status, WhenFull::KeepLatest(wait))],
        }
    }
}

impl FullPolicy {
    /// The policy for messages of `kind`.
    pub fn for_type(&self, kind: &MessageType) -> WhenFull {
        self.by_type
            .iter()
            .find(|(k, _)| k == kind)
            .map_or(self.default, |(_, p)| *p)
    }

    /// Sets the policy for `kind`.
    pub fn set(mut self, kind: MessageType, policy: WhenFull) -> Self {
        self.by_type.retain(|(k, _)| *k != kind);
        self.by_type.push((kind, policy));
        self
    }
}

/// A message could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReliableSendError {
    /// The replay buffer is full.
    #[error("replay buffer full ({0:?} bound)")]
    Full(Bound),
    /// The session is shut down.
    #[error("session shut down")]
    ShutDown,
}

/// How many resets' failed ranges receipts can still look up.
const RESET_HISTORY: usize = 64;

/// How many rejected messages receipts can still look up (older rejections are
/// forgotten, and a receipt awaited that late reports delivery).
const REJECT_HISTORY: usize = 1024;

/// Where receipts look for their outcome. Sequence numbers never restart within a
/// session's life (a reset fails a range of them and numbering goes on), so a
/// sequence number alone identifies a message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Progress {
    acked: u64,
    expired_through: u64,
    /// Ranges `(after, through]` failed by resets, oldest first, with the reason.
    failed: std::collections::VecDeque<(u64, u64, Arc<str>)>,
    /// Outcomes at or below this were dropped from `failed` (too many resets).
    forgotten_through: u64,
    /// Set when the session ended: every message not yet acked failed.
    ended: Option<Undelivered>,
    /// Messages the peer received but refused (PROTOCOL.md, section 4.2), by sequence
    /// number, newest last, at most [`REJECT_HISTORY`].
    rejected: std::collections::VecDeque<(u64, Arc<ErrorBody>)>,
}

impl Progress {
    fn failed_reason(&self, seq: u64) -> Option<&str> {
        self.failed
            .iter()
            .find(|(after, through, _)| seq > *after && seq <= *through)
            .map(|(_, _, reason)| &**reason)
    }

    fn resolved(&self, seq: u64) -> bool {
        self.acked >= seq
            || self.expired_through >= seq
            || self.ended.is_some()
            || seq <= self.forgotten_through
            || self.failed_reason(seq).is_some()
    }

    fn outcome(&self, seq: u64) -> Result<(), Undelivered> {
        if let Some((_, error)) = self.rejected.iter().rev().find(|(s, _)| *s == seq) {
            return Err(Undelivered::Rejected {
                code: error.code.clone(),
                message: error.message.clone(),
            });
        }
        if let Some(reason) = self.failed_reason(seq) {
            return Err(Undelivered::Reset(reason.to_owned()));
        }
        if seq <= self.forgotten_through && seq > self.acked {
            return Err(Undelivered::Reset(
                "outcome forgotten after many session resets".into(),
            ));
        }
        if self.acked >= seq {
            return Ok(());
        }
        if self.expired_through >= seq {
            return Err(Undelivered::Expired);
        }
        Err(self.ended.clone().unwrap_or(Undelivered::ShutDown))
    }
}

/// Resolves once the peer acknowledged the message, or with the reason it never will.
#[derive(Debug)]
pub struct Receipt {
    seq: u64,
    /// The session, subscribed to only when the receipt is awaited (most are not).
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
        let mut progress = session.progress.subscribe();
        match progress.wait_for(|p| p.resolved(seq)).await {
            Ok(p) => p.outcome(seq),
            Err(_) => Err(Undelivered::ShutDown),
        }
    }
}

/// A session reset, as `attach` reports it.
#[derive(Debug)]
pub(crate) struct Reset {
    /// Why.
    pub(crate) reason: String,
    /// The ids of the messages that were never sent and go to the new session.
    pub(crate) carried: HashSet<u64>,
}

/// What the session loop should do with an arriving envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Hand it to the router.
    Deliver,
    /// Hand it to the router, then send the acknowledgement owed at once
    /// ([`Reliable::send_ack_now`]): after the message is handled or refused, so that
    /// a refusal goes out before the ack that covers its message.
    DeliverThenAck,
    /// Consumed by the session (an ack, a duplicate).
    Drop,
    /// The peer broke the session rules; close the connection (the next one resumes).
    Violation(String),
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
    Failed(ReliableSendError),
}

impl TrySend {
    /// Waits for whatever the message still needs: the backlog drained, or room in the
    /// buffer. Its future is large: box it on paths every message takes.
    pub(crate) async fn finish(
        self,
        reliable: &Arc<Reliable>,
    ) -> Result<Receipt, ReliableSendError> {
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
    wait: Duration,
}

enum Pushed {
    Held { seq: u64, backlog: bool },
    Full(tunnel_proto::session::Full<Box<Envelope>>),
}

struct Out {
    /// Boxed messages: pushing one into the buffer, and taking it back out on a reset,
    /// moves a pointer instead of a 224-byte envelope.
    out: Outbound<Box<Envelope>>,
    conn: Option<ConnectionSender>,
    /// The highest sequence number ever handed to a connection. Only messages above it
    /// may be replaced: the peer may have any message at or below it.
    transmitted_through: u64,
    /// For `KeepLatest` status messages: the sequence number of the latest one per
    /// resource key.
    latest: std::collections::HashMap<String, u64>,
    /// The first held message not yet handed to `conn` because its queue was full (or
    /// a replay is in progress). While set, new messages are only held, and the
    /// drainer sends them in order.
    backlog_from: Option<u64>,
    attached_before: bool,
    /// The lease of the newest connection attached (see `SessionGrant::lease`).
    lease: u64,
    shut: bool,
    /// The last connection ended after a drain with everything it carried
    /// acknowledged: a new session on another hub continues without a reset.
    clean_handover: bool,
}

/// One session's reliable state.
pub(crate) struct Reliable {
    out: Mutex<Out>,
    inb: Mutex<Inbound>,
    /// One drainer at a time sends the backlog, in order.
    drain: tokio::sync::Mutex<()>,
    /// Held by the one connection whose messages are being delivered. A newer
    /// connection of the session waits for the older one's loop to end, so deliveries
    /// from two connections never interleave out of order.
    pub(crate) reader: tokio::sync::Mutex<()>,
    config: SessionConfig,
    progress: watch::Sender<Progress>,
    room: Notify,
    /// A coarse clock for the replay buffer's age bound, advanced by `expire` (every
    /// sweep): reading the real clock per message would cost more than the bound needs.
    epoch_start: Instant,
    coarse_ms: std::sync::atomic::AtomicU64,
    /// Set when data arrived that no outgoing message has acknowledged yet.
    owed: std::sync::atomic::AtomicBool,
    /// Where changes of the replay buffer's depth are reported.
    recorder: Arc<dyn Recorder>,
}

fn held_of(st: &Out) -> (i64, i64) {
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    (count(st.out.len()), count(st.out.bytes()))
}

impl std::fmt::Debug for Reliable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reliable")
            .field("config", &self.config)
            .finish()
    }
}

fn size_of(env: &Envelope) -> usize {
    64 + env.payload.as_ref().map_or(0, Payload::len)
}

/// The resource a `status` message is about, as a conflation key.
fn status_key(env: &Envelope) -> Option<String> {
    if env.kind != MessageType::Status {
        return None;
    }
    let status: tunnel_proto::messages::Status = env.payload.as_ref()?.decode().ok()?;
    Some(format!(
        "{}/{}/{}/{}/{}",
        status.gvr.group,
        status.gvr.version,
        status.gvr.resource,
        status.namespace.unwrap_or_default(),
        status.name
    ))
}

/// Whether a failed reply's code says its message was refused, not handled
/// (PROTOCOL.md, section 4.2).
pub(crate) fn is_rejection(code: &str) -> bool {
    code == crate::error_code::BAD_REQUEST || code == crate::error_code::NO_HANDLER
}

fn is_data(kind: &MessageType) -> bool {
    !kind.is_control()
}

impl Reliable {
    pub(crate) fn new(config: SessionConfig, recorder: Arc<dyn Recorder>) -> Arc<Self> {
        Arc::new(Reliable {
            recorder,
            out: Mutex::new(Out {
                out: Outbound::new(config.clone()),
                conn: None,
                transmitted_through: 0,
                latest: std::collections::HashMap::new(),
                backlog_from: None,
                attached_before: false,
                lease: 0,
                shut: false,
                clean_handover: false,
            }),
            inb: Mutex::new(Inbound::new(config.clone())),
            drain: tokio::sync::Mutex::new(()),
            reader: tokio::sync::Mutex::new(()),
            config,
            progress: watch::Sender::new(Progress::default()),
            room: Notify::new(),
            epoch_start: Instant::now(),
            coarse_ms: std::sync::atomic::AtomicU64::new(0),
            owed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Reports how the replay buffer's depth changed since `before`.
    fn report(&self, before: (i64, i64), st: &Out) {
        let after = held_of(st);
        if after != before {
            self.recorder
                .replay_changed(after.0 - before.0, after.1 - before.1);
        }
    }

    /// Now, to the precision of the sweep interval.
    fn coarse_now(&self) -> std::time::Instant {
        let ms = self.coarse_ms.load(std::sync::atomic::Ordering::Relaxed);
        (self.epoch_start + Duration::from_millis(ms)).into_std()
    }

    fn inbound(&self) -> std::sync::MutexGuard<'_, Inbound> {
        self.inb.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Out> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The highest sequence number received in order (for a resume request or grant).
    pub(crate) fn last_received(&self) -> u64 {
        self.inbound().last_received()
    }

    /// A connection with `lease` was just granted this session: from now on only it may
    /// carry the session. The connection carrying it so far is closed with `4004` at
    /// once (what it still had queued is dropped; the new one replays it), so that it
    /// gets nothing of the session after the new connection's grant.
    pub(crate) fn supersede(&self, lease: u64) {
        let older = {
            let mut st = self.state();
            st.lease = st.lease.max(lease);
            st.conn.take()
        };
        if let Some(older) = older {
            older.abort_with(
                tunnel_proto::CloseCode::SESSION_REPLACED,
                "a newer connection resumed the session",
            );
        }
    }

    /// The highest sequence number handed out to a message of this session.
    pub(crate) fn highest_sent(&self) -> u64 {
        self.state().out.highest_sent()
    }

    /// The ack to carry on an outgoing message, if anything was received.
    fn piggyback(&self) -> Option<u64> {
        // Without anything new to acknowledge, skip the lock.
        if !self.owed.swap(false, std::sync::atomic::Ordering::AcqRel) {
            return None;
        }
        let mut inb = self.inbound();
        (inb.last_received() > 0).then(|| inb.take_ack())
    }

    /// Numbers `env`, holds it until acknowledged and sends it on the current
    /// connection if there is one (else it waits for the next). Returns once the
    /// message is queued on the connection or held for the next one.
    pub(crate) async fn send(
        self: &Arc<Self>,
        env: Box<Envelope>,
        when_full: WhenFull,
    ) -> Result<Receipt, ReliableSendError> {
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
            WhenFull::KeepLatest(_) => status_key(&env),
            _ => None,
        };
        let pushed = {
            let mut st = self.state();
            self.push_locked(&mut st, env, &mut key)
        };
        match pushed {
            Ok(Pushed::Held { seq, backlog }) => {
                let receipt = Receipt::held(seq, self);
                if backlog {
                    TrySend::Backlog(receipt)
                } else {
                    TrySend::Held(receipt)
                }
            }
            Ok(Pushed::Full(full)) => match *when_full {
                WhenFull::Wait(wait) | WhenFull::KeepLatest(wait) => {
                    TrySend::Wait(Box::new(Waiting {
                        env: full.item,
                        key,
                        wait,
                    }))
                }
                _ => TrySend::Failed(ReliableSendError::Full(full.bound)),
            },
            Err(e) => TrySend::Failed(e),
        }
    }

    /// The rest of [`Reliable::send`] once the buffer was full: waits for room up to
    /// the policy's deadline.
    async fn send_waiting(
        self: &Arc<Self>,
        waiting: Box<Waiting>,
    ) -> Result<Receipt, ReliableSendError> {
        let Waiting {
            mut env,
            mut key,
            wait,
        } = *waiting;
        let deadline = Instant::now() + wait;
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            let pushed = {
                let mut st = self.state();
                let pushed = self.push_locked(&mut st, env, &mut key)?;
                if matches!(pushed, Pushed::Full(_)) {
                    // Register for room before letting go of the lock, so an ack that
                    // frees room in between is not missed.
                    room.as_mut().enable();
                }
                pushed
            };
            match pushed {
                Pushed::Held { seq, backlog } => {
                    if backlog {
                        Box::pin(self.drain()).await;
                    }
                    return Ok(Receipt::held(seq, self));
                }
                Pushed::Full(full) => {
                    env = full.item;
                    if tokio::time::timeout_at(deadline, room).await.is_err() {
                        return Err(ReliableSendError::Full(full.bound));
                    }
                }
            }
        }
    }

    /// Holds `env` under the lock: replaces the latest status of the same resource when
    /// the buffer is full (`key`, taken once it is recorded), else numbers and pushes
    /// it, and hands it to the connection if it can go at once.
    fn push_locked(
        self: &Arc<Self>,
        st: &mut Out,
        mut env: Box<Envelope>,
        key: &mut Option<String>,
    ) -> Result<Pushed, ReliableSendError> {
        if st.shut {
            return Err(ReliableSendError::ShutDown);
        }
        let size = size_of(&env);
        // Only a full buffer conflates: otherwise every status is delivered.
        if let Some(key) = key.as_deref()
            && st.out.has_room(size).is_err()
            && let Some(&seq) = st.latest.get(key)
            && seq > st.transmitted_through
        {
            env.seq = Some(seq);
            let before = held_of(st);
            match st.out.replace(seq, env, size) {
                Ok(_superseded) => {
                    self.report(before, st);
                    return Ok(Pushed::Held {
                        seq,
                        backlog: false,
                    });
                }
                Err(back) => env = back,
            }
        }
        env.seq = Some(st.out.next_seq());
        match st.out.push(env, size, self.coarse_now()) {
            Ok(seq) => {
                self.recorder
                    .replay_changed(1, i64::try_from(size).unwrap_or(i64::MAX));
                if let Some(key) = key.take() {
                    if st.latest.len() > 2 * self.config.max_replay_messages {
                        let through = st.transmitted_through;
                        st.latest.retain(|_, s| *s > through);
                    }
                    st.latest.insert(key, seq);
                }
                let backlog = self.try_transmit(st, seq);
                Ok(Pushed::Held { seq, backlog })
            }
            Err(full) => Ok(Pushed::Full(full)),
        }
    }

    /// Hands the held message `seq` to the connection if it can go at once and in
    /// order; returns whether a backlog needs draining.
    fn try_transmit(&self, st: &mut Out, seq: u64) -> bool {
        if st.backlog_from.is_some() {
            return true;
        }
        let Out { out, conn, .. } = st;
        let Some(sender) = conn.as_ref() else {
            return false;
        };
        let ack = self.piggyback();
        let Some(held) = out.get_mut(seq) else {
            return false;
        };
        held.item.ack = ack;
        match sender.try_send(&held.item) {
            Ok(()) => {
                st.transmitted_through = st.transmitted_through.max(seq);
                false
            }
            Err(tunnel_transport::SendError::Full) => {
                st.backlog_from = Some(seq);
                true
            }
            Err(_) => {
                st.conn = None;
                false
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
                let Some(from) = st.backlog_from else {
                    return;
                };
                let Some(conn) = st.conn.clone() else {
                    return;
                };
                // Skip what was acknowledged or expired meanwhile.
                let oldest = st.out.iter().next().map(|m| m.seq);
                let first = oldest.map_or(from, |seq| seq.max(from));
                if first > st.out.highest_sent() {
                    st.backlog_from = None;
                    return;
                }
                let ack = self.piggyback();
                let Some(held) = st.out.get_mut(first) else {
                    st.backlog_from = None;
                    return;
                };
                held.item.ack = ack;
                // The envelope, not its box: the drain's future holds it, and cloning
                // the box would allocate for every message of the backlog.
                (conn, Envelope::clone(&held.item), first)
            };
            let (conn, env, seq) = next;
            let sent = conn.send(&env).await;
            let mut st = self.state();
            if sent.is_ok() {
                st.transmitted_through = st.transmitted_through.max(seq);
            }
            match sent {
                Ok(()) if st.backlog_from.is_some() => {
                    st.backlog_from = (seq < st.out.highest_sent()).then_some(seq + 1);
                }
                Ok(()) => return,
                Err(_) => {
                    if st
                        .conn
                        .as_ref()
                        .is_some_and(|c| c.info().id == conn.info().id)
                    {
                        st.conn = None;
                    }
                    return;
                }
            }
        }
    }

    /// Makes `conn` the session's connection. `resumed` and `peer_received` come from
    /// the handshake; a session that cannot continue is reset (the messages the peer
    /// may have had fail) and the reset returned. Everything held is then sent, in
    /// order, before any new message.
    pub(crate) async fn attach(
        &self,
        conn: ConnectionSender,
        resumed: bool,
        peer_received: Option<u64>,
    ) -> Option<Reset> {
        let reset = {
            let mut st = self.state();
            let lease = conn.info().session_lease;
            if lease < st.lease {
                // A newer connection of this session attached first: this one is
                // superseded and carries nothing (it is being closed with 4004).
                return None;
            }
            st.lease = lease;
            let mut reset = None;
            if resumed {
                // A peer whose direction has not started yet reports 0: it has
                // everything acknowledged before (by it or a drained hub).
                let peer_received = peer_received.unwrap_or(0).max(st.out.acked());
                let before = held_of(&st);
                let resumed = st.out.resume(peer_received).map(|_| ());
                self.report(before, &st);
                if let Err(e) = resumed {
                    reset = Some(e.to_string());
                } else {
                    self.publish_acked(&st);
                }
            } else if st.clean_handover {
                // Everything sent before was acknowledged by the drained hub: the new
                // session takes over the numbering, and starts its inbound afresh.
                *self.inbound() = Inbound::new(self.config.clone());
            } else if st.attached_before {
                reset = Some("the peer started a new session".into());
            }
            st.clean_handover = false;
            let reset = reset.map(|reason| {
                let carried = self.reset_locked(&mut st, &reason, true);
                Reset { reason, carried }
            });
            st.conn = Some(conn);
            st.attached_before = true;
            let first = st.out.iter().next().map(|m| m.seq);
            st.backlog_from = first;
            reset
        };
        self.drain().await;
        reset
    }

    /// Resets the session: the messages the peer may or may not have (handed to a
    /// connection and not acknowledged) fail with `reason`; with `carry`, messages
    /// never handed to any connection stay held and go to the new session under the
    /// same sequence numbers (the peer's new session takes its base from the first),
    /// otherwise they fail too. The inbound direction starts afresh.
    fn reset_locked(&self, st: &mut Out, reason: &str, carry: bool) -> HashSet<u64> {
        let after = st.out.acked();
        let through = if carry {
            st.transmitted_through.max(after)
        } else {
            st.out.highest_sent()
        };
        if through > after {
            let before = held_of(st);
            // Cannot fail: `through` was handed out, so it is below the next number.
            let _ = st.out.on_ack(through);
            self.report(before, st);
        }
        st.backlog_from = None;
        st.transmitted_through = through;
        st.latest.retain(|_, seq| *seq > through);
        *self.inbound() = Inbound::new(self.config.clone());
        let acked = st.out.acked();
        self.progress.send_modify(|p| {
            if through > after {
                p.failed.push_back((after, through, Arc::from(reason)));
                if p.failed.len() > RESET_HISTORY
                    && let Some((_, forgotten, _)) = p.failed.pop_front()
                {
                    p.forgotten_through = forgotten;
                }
            }
            p.acked = acked;
        });
        self.room.notify_waiters();
        st.out.iter().map(|m| m.item.id).collect()
    }

    fn publish_acked(&self, st: &Out) {
        let acked = st.out.acked();
        self.progress.send_if_modified(|p| {
            let changed = p.acked != acked;
            p.acked = acked;
            changed
        });
        self.room.notify_waiters();
    }

    /// Whether the peer has stopped acknowledging: the oldest message it was sent has
    /// waited for its ack longer than `stall_timeout` (to the sweep's precision).
    pub(crate) fn peer_stalled(&self) -> bool {
        let patience = self.config.stall_timeout;
        let now = self.coarse_now();
        let st = self.state();
        st.out.iter().next().is_some_and(|oldest| {
            oldest.seq <= st.transmitted_through
                && now.saturating_duration_since(oldest.at) > patience
        })
    }

    /// Whether every message handed to a connection has been acknowledged.
    pub(crate) fn quiet(&self) -> bool {
        let st = self.state();
        st.out.acked() >= st.transmitted_through
    }

    /// Called when a drained connection closed: if nothing it carried is
    /// unacknowledged, the next connection may start a new session without a reset.
    pub(crate) fn end_for_handover(&self) -> bool {
        let mut st = self.state();
        st.clean_handover = st.out.acked() >= st.transmitted_through && st.conn.is_none();
        st.clean_handover
    }

    /// Whether `conn` is the connection carrying the session.
    pub(crate) fn carried_by(&self, conn: &ConnectionSender) -> bool {
        self.state()
            .conn
            .as_ref()
            .is_some_and(|c| c.info().id == conn.info().id)
    }

    /// Forgets `conn` if it is the current connection; returns whether it was.
    pub(crate) fn detach(&self, conn: &ConnectionSender) -> bool {
        let mut st = self.state();
        let current = st
            .conn
            .as_ref()
            .is_some_and(|c| c.info().id == conn.info().id);
        if current {
            st.conn = None;
        }
        current
    }

    /// Applies an arriving envelope's `seq` and `ack`. For a delivered message, a
    /// standalone acknowledgement goes out on `conn` at once if `ack_every` messages
    /// await one (a busy connection never lets the ack timer fire).
    pub(crate) fn on_inbound(&self, env: &Envelope, conn: &ConnectionSender) -> Verdict {
        // A rejection is noted before the ack it carries releases the message, so its
        // receipt reports the rejection, not a delivery.
        if env.kind == MessageType::Reply
            && let (Some(error), Some(corr)) = (&env.error, env.correlation)
            && is_rejection(&error.code)
        {
            self.note_rejected(corr, error);
        }
        if let Some(ack) = env.ack {
            let mut st = self.state();
            match st.out.on_ack(ack) {
                Ok(released) if !released.is_empty() => {
                    self.recorder.replay_changed(
                        -i64::try_from(released.messages).unwrap_or(i64::MAX),
                        -i64::try_from(released.bytes).unwrap_or(i64::MAX),
                    );
                    self.publish_acked(&st);
                }
                Ok(_) => {}
                Err(e) => return Verdict::Violation(e.to_string()),
            }
        }
        if env.kind == MessageType::Ack {
            return Verdict::Drop;
        }
        if !is_data(&env.kind) {
            return Verdict::Deliver;
        }
        // Data sent without a sequence number (straight on a connection, bypassing
        // the session) is delivered best-effort.
        let Some(seq) = env.seq else {
            return Verdict::Deliver;
        };
        // The inbound lock is not held while the outbound one is taken
        // (`standalone_ack_allowed`): the send path takes them the other way round.
        let (accept, by_count) = {
            let mut inb = self.inbound();
            let accept = inb.on_data(seq, std::time::Instant::now);
            (accept, inb.ack_owed_by_count())
        };
        match accept {
            Accept::Deliver if by_count => Verdict::DeliverThenAck,
            Accept::Deliver => {
                self.owed.store(true, std::sync::atomic::Ordering::Release);
                Verdict::Deliver
            }
            Accept::Duplicate => {
                // The peer is replaying what arrived: tell it at once so it stops.
                self.send_ack_now(conn);
                Verdict::Drop
            }
            Accept::Gap { expected, got } => {
                Verdict::Violation(format!("expected sequence {expected}, got {got}"))
            }
        }
    }

    /// Records that the peer refused the held message with id `id`, if it is held.
    fn note_rejected(&self, id: u64, error: &ErrorBody) {
        let seq = {
            let st = self.state();
            st.out.iter().find(|m| m.item.id == id).map(|m| m.seq)
        };
        let Some(seq) = seq else {
            return;
        };
        let error = Arc::new(ErrorBody::new(
            tunnel_proto::text::truncate(&error.code, 64),
            tunnel_proto::text::truncate(&error.message, tunnel_proto::text::MAX_KEPT),
        ));
        self.progress.send_modify(|p| {
            p.rejected.push_back((seq, error));
            if p.rejected.len() > REJECT_HISTORY {
                p.rejected.pop_front();
            }
        });
    }

    /// Whether a standalone acknowledgement may go now: not while session messages
    /// wait in the backlog, or it could overtake a rejection the peer must see before
    /// the ack that covers the rejected message (the backlog carries the ack itself).
    fn standalone_ack_allowed(&self) -> bool {
        self.state().backlog_from.is_none()
    }

    /// When a standalone acknowledgement is due, if one is owed.
    pub(crate) fn ack_due_at(&self) -> Option<Instant> {
        self.inbound().ack_due_at().map(Instant::from_std)
    }

    /// Sends the acknowledgement owed now as a standalone `ack`, unless session
    /// messages wait in the backlog: then it rides on them.
    pub(crate) fn send_ack_now(&self, conn: &ConnectionSender) {
        if self.standalone_ack_allowed() {
            let ack = self.inbound().take_ack();
            let _ = conn.try_send(&conn.envelope(MessageType::Ack).with_ack(ack));
        } else {
            self.owed.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// Sends a standalone acknowledgement on `conn` if one is due.
    pub(crate) fn send_ack_if_due(&self, conn: &ConnectionSender) {
        if !self.standalone_ack_allowed() {
            // It rides on the backlog; look again an ack delay later (not at once, or
            // the session loop would spin on a deadline in the past).
            self.owed.store(true, std::sync::atomic::Ordering::Release);
            let later = Instant::now().into_std() + self.config.ack_delay;
            self.inbound().postpone_ack(later);
            return;
        }
        let ack = {
            let mut inb = self.inbound();
            if !inb.ack_due(Instant::now().into_std()) {
                return;
            }
            inb.take_ack()
        };
        let _ = conn.try_send(&conn.envelope(MessageType::Ack).with_ack(ack));
    }

    /// Drops messages held past the age bound; their receipts fail with `Expired`.
    /// Also advances the coarse clock, so call it regularly.
    pub(crate) fn expire(&self) {
        let ms = u64::try_from(self.epoch_start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.coarse_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
        let mut st = self.state();
        let before = held_of(&st);
        let expired = st.out.expire(Instant::now().into_std());
        self.report(before, &st);
        if let Some(last) = expired.last() {
            let through = last.seq;
            self.progress.send_modify(|p| p.expired_through = through);
            self.room.notify_waiters();
        }
    }

    /// Fails every held message with a reset (they cannot be delivered); the session
    /// itself stays usable.
    pub(crate) fn fail_held(&self, reason: &str) {
        let mut st = self.state();
        if !st.out.is_empty() {
            self.reset_locked(&mut st, reason, false);
        }
    }

    /// Ends the session: every unacknowledged message fails with `reason`.
    pub(crate) fn shut_down(&self, reason: Undelivered) {
        let mut st = self.state();
        st.shut = true;
        let before = held_of(&st);
        st.out.reset();
        self.report(before, &st);
        st.conn = None;
        st.backlog_from = None;
        st.latest.clear();
        self.progress.send_modify(|p| p.ended = Some(reason));
        self.room.notify_waiters();
    }

    /// Messages and bytes held for replay.
    pub(crate) fn held(&self) -> (usize, usize) {
        let st = self.state();
        (st.out.len(), st.out.bytes())
    }
}
