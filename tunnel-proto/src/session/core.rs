//! One side of a session, as a state machine: every rule of PROTOCOL.md section 6.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use crate::{Envelope, ErrorBody, MessageType};

use super::policy::{held_size, is_rejection};
use super::{Accept, Bound, Outcomes, ReceiveWindow, ReplayBuffer, SessionConfig, Undelivered};

/// One side of a session (an agent's, or the hub's for one agent): both directions,
/// the replay buffer, the per-message outcomes, and the rules that tie them to the
/// connections that come and go.
///
/// It never touches a connection. A driver owns it (behind a lock, say) with the
/// connection it currently writes to, and:
///
/// - feeds it what happens: [`Session::send`] for a message to deliver,
///   [`Session::handle_attach`] for a new connection, [`Session::handle_inbound`] for
///   each envelope read, [`Session::handle_timeout`] when [`Session::poll_timeout`]
///   is due, [`Session::detach`] when the connection ends;
/// - writes what it is told: [`Session::transmit`] and [`Session::poll_backlog`] for
///   data messages in order, [`Session::poll_ack`] and
///   [`Session::take_standalone_ack`] for standalone acknowledgements;
/// - reads [`Session::outcomes`] for receipts, after [`Session::take_changed`] says
///   they moved.
///
/// Connections are named by a `u64` the driver chooses (a connection id). Time is
/// always passed in.
///
/// ```
/// use std::time::Instant;
/// use tunnel_proto::session::{Attach, Pushed, Session, SessionConfig, Verdict};
/// use tunnel_proto::{Envelope, MessageType};
///
/// let now = Instant::now();
/// let mut agent = Session::new(SessionConfig::default());
/// let mut hub = Session::new(SessionConfig::default());
/// assert!(matches!(agent.handle_attach(1, 0, false, None), Attach::Attached(None)));
/// hub.handle_attach(1, 0, false, None);
///
/// let event = Box::new(Envelope::new(7, MessageType::Event, 0));
/// let Ok(Pushed::Held { seq, .. }) = agent.send(event, &mut None, now) else { panic!() };
/// let wire = agent.transmit(seq).expect("connected").clone();
/// agent.on_transmitted(seq);
/// assert_eq!(hub.handle_inbound(&wire, || now), Verdict::Deliver);
/// // The hub acknowledges within `ack_delay`; the agent's receipt then resolves.
/// let ack = hub.poll_ack(now + SessionConfig::default().ack_delay).expect("due");
/// agent.handle_inbound(&Envelope::new(8, MessageType::Ack, 0).with_ack(ack), || now);
/// assert_eq!(agent.outcomes().outcome(seq), Some(Ok(())));
/// ```
#[derive(Debug)]
pub struct Session {
    pub(super) config: SessionConfig,
    /// Boxed messages: pushing one into the buffer, and taking it back out on a reset,
    /// moves a pointer instead of a 224-byte envelope.
    pub(super) out: ReplayBuffer<Box<Envelope>>,
    pub(super) inb: ReceiveWindow,
    /// The connection carrying the session.
    pub(super) link: Option<u64>,
    /// The highest sequence number ever handed to a connection. Only messages above it
    /// may be replaced: the peer may have any message at or below it.
    pub(super) transmitted_through: u64,
    /// The first held message not yet handed to the link because its queue was full
    /// (or a replay is in progress). While set, new messages are only held, and the
    /// backlog goes out first, in order.
    pub(super) backlog_from: Option<u64>,
    /// Staged messages not released yet, oldest first ([`Session::send_staged`]):
    /// nothing from the first of them on goes to a connection.
    pub(super) staged: VecDeque<u64>,
    /// For `KeepLatest` status messages: the sequence number of the latest one per
    /// resource key.
    pub(super) latest: HashMap<String, u64>,
    pub(super) attached_before: bool,
    /// The lease of the newest connection attached (see `handle_attach`).
    pub(super) lease: u64,
    pub(super) shut: bool,
    /// The last connection ended after a drain with everything it carried
    /// acknowledged: a new session on another hub continues without a reset.
    pub(super) clean_handover: bool,
    /// Data arrived that no outgoing message has acknowledged yet.
    pub(super) owed: bool,
    pub(super) outcomes: Outcomes,
    /// Outcomes (or room in the buffer) changed since `take_changed`.
    pub(super) changed: bool,
    /// Resets so far.
    pub(super) epoch: u64,
    /// The generation of the last snapshot saved of this copy (see
    /// [`SessionSnapshot::generation`](super::SessionSnapshot::generation)).
    pub(super) generation: u64,
    /// After an open-numbered resume (see `SessionSnapshot::open_tail`), hold what
    /// follows until released (`SessionSnapshot::hold_resumed`).
    pub(super) hold_resumed: bool,
    /// Where an open-numbered resume put the numbering: what the peer reported.
    pub(super) resumed_open_at: Option<u64>,
    /// While held after an open-numbered resume: the first number that may not go out
    /// until [`Session::release_resumed`]. Apart from the staged messages: the first
    /// one staged after the resume has the same number, and releasing the hold must
    /// not release it.
    pub(super) resume_hold: Option<u64>,
}

/// What [`Session::send`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Numbered and held.
    Held {
        /// Its sequence number.
        seq: u64,
        /// What the driver does next.
        next: Next,
    },
    /// It replaced the latest status of the same resource, still unsent, under that
    /// message's sequence number (the older one's receipt resolves with this one's
    /// outcome).
    Replaced {
        /// The sequence number it took over.
        seq: u64,
    },
}

/// What the driver does with a message just held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Write it now: [`Session::transmit`].
    Transmit,
    /// A backlog is being sent: it goes with it ([`Session::poll_backlog`]).
    Backlog,
    /// No connection: it waits for the next one.
    Hold,
}

/// Why [`Session::send`] did not take a message; the message comes back.
#[derive(Debug)]
pub enum Refused {
    /// The replay buffer is full.
    Full {
        /// The message.
        env: Box<Envelope>,
        /// The bound it hit.
        bound: Bound,
    },
    /// The session is shut down.
    ShutDown(Box<Envelope>),
}

/// What [`Session::handle_attach`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attach {
    /// A newer connection of the session attached first: this one carries nothing
    /// (close it with `4004`).
    Superseded,
    /// The connection carries the session now; everything held goes out first
    /// ([`Session::poll_backlog`]). With a reset, the session could not continue.
    Attached(Option<Reset>),
    /// The peer resumed the session, but this side cannot continue it: it was reset,
    /// and the connection carries nothing. Close it; the next connection starts a new
    /// session (without a resume), in which what was never sent goes on.
    Restart(Reset),
}

/// A session reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reset {
    /// Why.
    pub reason: String,
    /// The ids of the messages never sent, which go to the new session.
    pub carried: HashSet<u64>,
    /// Resets so far, this one included.
    pub epoch: u64,
}

/// What to do with an arriving envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the application.
    Deliver,
    /// Hand it to the application, then send the acknowledgement owed at once
    /// ([`Session::take_standalone_ack`]): after the message is handled or refused, so
    /// that a refusal goes out before the ack that covers its message.
    DeliverThenAck,
    /// Consumed by the session (an ack).
    Drop,
    /// A duplicate (a replay of what arrived): drop it and acknowledge at once, so the
    /// peer stops replaying.
    DropThenAck,
    /// The peer broke the session rules; close the connection (the next one resumes).
    Violation(String),
}

impl Session {
    /// A new session: nothing sent, nothing received.
    pub fn new(config: SessionConfig) -> Self {
        Session {
            out: ReplayBuffer::new(config.clone()),
            inb: ReceiveWindow::new(config.clone()),
            config,
            link: None,
            transmitted_through: 0,
            backlog_from: None,
            staged: VecDeque::new(),
            latest: HashMap::new(),
            attached_before: false,
            lease: 0,
            shut: false,
            clean_handover: false,
            owed: false,
            outcomes: Outcomes::default(),
            changed: false,
            epoch: 0,
            generation: 0,
            hold_resumed: false,
            resumed_open_at: None,
            resume_hold: None,
        }
    }

    /// Its bounds and timing.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Numbers `env`, holds it until acknowledged, and says what the driver does next.
    /// With a conflation `key` (see [`super::conflation_key`]) and a full buffer, a
    /// status replaces the latest one of the same resource if that one was never
    /// sent; the key is taken once recorded, so a caller retrying after
    /// [`Refused::Full`] passes the same `key` again.
    pub fn send(
        &mut self,
        env: Box<Envelope>,
        key: &mut Option<String>,
        now: Instant,
    ) -> Result<Pushed, Refused> {
        self.push(env, key, now, false)
    }

    /// [`Session::send`], but the message is *staged*: numbered and held, it goes to no
    /// connection (and neither does anything numbered after it) until
    /// [`Session::release`] covers its sequence number. A hub that must record where a
    /// message went before the peer can have it (the cluster's down messages) stages
    /// it, records it under its sequence number, then releases it.
    pub fn send_staged(&mut self, env: Box<Envelope>, now: Instant) -> Result<Pushed, Refused> {
        self.push(env, &mut None, now, true)
    }

    /// Releases the staged messages numbered up to `through`. Returns whether a
    /// backlog now waits to be sent ([`Session::poll_backlog`]).
    pub fn release(&mut self, through: u64) -> bool {
        while self.staged.front().is_some_and(|seq| *seq <= through) {
            self.staged.pop_front();
        }
        self.link.is_some()
            && self
                .backlog_from
                .is_some_and(|from| from <= self.release_limit())
    }

    /// Ends the hold after an open-numbered resume (`SessionSnapshot::hold_resumed`);
    /// staged messages stay staged. Returns whether a backlog now waits to be sent.
    /// Nothing when there is no hold (any more).
    pub fn release_resumed(&mut self) -> bool {
        if self.resume_hold.take().is_none() {
            return false;
        }
        self.link.is_some()
            && self
                .backlog_from
                .is_some_and(|from| from <= self.release_limit())
    }

    /// The highest sequence number that may go to a connection now.
    fn release_limit(&self) -> u64 {
        let staged = self.staged.front().map_or(u64::MAX, |seq| seq - 1);
        let held = self.resume_hold.map_or(u64::MAX, |seq| seq - 1);
        staged.min(held)
    }

    fn push(
        &mut self,
        mut env: Box<Envelope>,
        key: &mut Option<String>,
        now: Instant,
        staged: bool,
    ) -> Result<Pushed, Refused> {
        if self.shut {
            return Err(Refused::ShutDown(env));
        }
        let size = held_size(&env);
        // Only a full buffer conflates: otherwise every status is delivered.
        if let Some(k) = key.as_deref()
            && self.out.has_room(size).is_err()
            && let Some(&seq) = self.latest.get(k)
            && seq > self.transmitted_through
        {
            env.seq = Some(seq);
            match self.out.replace(seq, env, size) {
                Ok(_superseded) => return Ok(Pushed::Replaced { seq }),
                Err(back) => env = back,
            }
        }
        env.seq = Some(self.out.next_seq());
        match self.out.push(env, size, now) {
            Ok(seq) => {
                if let Some(key) = key.take() {
                    if self.latest.len() > 2 * self.config.max_replay_messages {
                        let through = self.transmitted_through;
                        self.latest.retain(|_, s| *s > through);
                    }
                    self.latest.insert(key, seq);
                }
                if staged {
                    self.staged.push_back(seq);
                }
                let next = match (self.link, self.backlog_from) {
                    (None, _) => Next::Hold,
                    (Some(_), Some(_)) => Next::Backlog,
                    (Some(_), None) if seq > self.release_limit() => {
                        // Held back: it goes with the backlog once released.
                        self.backlog_from = Some(seq);
                        Next::Backlog
                    }
                    (Some(_), None) => Next::Transmit,
                };
                Ok(Pushed::Held { seq, next })
            }
            Err(full) => Err(Refused::Full {
                env: full.item,
                bound: full.bound,
            }),
        }
    }

    /// The ack to carry on an outgoing message, if anything arrived since the last.
    fn piggyback(&mut self) -> Option<u64> {
        if !std::mem::take(&mut self.owed) {
            return None;
        }
        (self.inb.last_received() > 0).then(|| self.inb.take_ack())
    }

    /// Message `seq` as it goes on the wire now (carrying the acknowledgement owed),
    /// after [`Next::Transmit`]. Report the write with [`Session::on_transmitted`] or
    /// [`Session::on_link_full`]. A write that fails otherwise is not reported: the
    /// caller ends that connection, and [`Session::detach`] follows when it is gone
    /// (until then nothing more is written to it, and what it lost is replayed on the
    /// next connection).
    pub fn transmit(&mut self, seq: u64) -> Option<&Envelope> {
        let ack = self.piggyback();
        let held = self.out.get_mut(seq)?;
        held.item.ack = ack;
        Some(&held.item)
    }

    /// Message `seq` was handed to the connection.
    pub fn on_transmitted(&mut self, seq: u64) {
        self.transmitted_through = self.transmitted_through.max(seq);
    }

    /// The connection's queue was full for message `seq`: it and everything after it
    /// go out through the backlog ([`Session::poll_backlog`]).
    pub fn on_link_full(&mut self, seq: u64) {
        self.backlog_from = Some(seq);
        // The acknowledgement it carried was not sent: the backlog carries it again.
        if self.out.get(seq).is_some_and(|m| m.item.ack.is_some()) {
            self.owed = true;
        }
    }

    /// The next message of the backlog, as it goes on the wire (with the ack owed),
    /// oldest first; `None` when the backlog is sent (or there is no connection).
    /// Report each write with [`Session::on_backlog_sent`].
    pub fn poll_backlog(&mut self) -> Option<(u64, &Envelope)> {
        let from = self.backlog_from?;
        self.link?;
        // Skip what was acknowledged or expired meanwhile.
        let oldest = self.out.iter().next().map(|m| m.seq);
        let first = oldest.map_or(from, |seq| seq.max(from));
        if first > self.out.highest_sent() {
            self.backlog_from = None;
            return None;
        }
        if first > self.release_limit() {
            // Staged: it waits for its release.
            self.backlog_from = Some(first);
            return None;
        }
        let ack = self.piggyback();
        let Some(held) = self.out.get_mut(first) else {
            self.backlog_from = None;
            return None;
        };
        held.item.ack = ack;
        // Counted as handed over from now on, though it is written outside the lock:
        // a status on its way must not be conflated with a newer one that would then
        // never be sent.
        self.transmitted_through = self.transmitted_through.max(first);
        Some((first, &held.item))
    }

    /// A backlog message `seq` was written on connection `link`. Returns whether more
    /// of the backlog waits. A failed write is not reported (see
    /// [`Session::transmit`]).
    pub fn on_backlog_sent(&mut self, seq: u64, link: u64) -> bool {
        self.transmitted_through = self.transmitted_through.max(seq);
        if self.link != Some(link) {
            // Written on a connection that no longer carries the session: the one that
            // does now has its own backlog, from the oldest held message.
            return false;
        }
        if self.backlog_from.is_some() {
            self.backlog_from = (seq < self.out.highest_sent()).then_some(seq + 1);
        }
        self.backlog_from
            .is_some_and(|from| from <= self.release_limit())
    }

    /// Connection `link` now carries the session. `lease` orders the connections
    /// granted one session (a lower one than already seen is superseded: two
    /// connections resuming one session never both receive the replay); `resumed` and
    /// `peer_received` come from the handshake. A session that cannot continue is
    /// reset: messages the peer may have had fail, messages never sent are carried
    /// over to the new session.
    pub fn handle_attach(
        &mut self,
        link: u64,
        lease: u64,
        resumed: bool,
        peer_received: Option<u64>,
    ) -> Attach {
        if lease < self.lease {
            return Attach::Superseded;
        }
        self.lease = lease;
        let mut reset = None;
        if resumed {
            let reported = peer_received.unwrap_or(0);
            if reported != 0 && reported < self.out.acked() {
                // The peer acknowledged more than it now reports: it resumed from an
                // older copy of the session, and what it acknowledged since can be
                // neither replayed (it is released) nor trusted as received.
                reset = Some(format!(
                    "the peer resumed from an older state: it reports {reported} but acknowledged {}",
                    self.out.acked()
                ));
            } else {
                // A peer whose direction has not started yet reports 0: it has
                // everything acknowledged before (by it or a drained hub).
                let peer_received = reported.max(self.out.acked());
                let open_tail = self.out.open_tail;
                match self.out.resume(peer_received).map(|_| ()) {
                    Err(e) => reset = Some(e.to_string()),
                    Ok(()) => {
                        if open_tail {
                            // The peer has everything up to where it said; the
                            // numbering goes on after it, and senders waiting for
                            // room may go on.
                            self.transmitted_through = peer_received;
                            self.resumed_open_at = Some(peer_received);
                            if self.hold_resumed {
                                // Nothing more goes out until the holder released it.
                                self.resume_hold = Some(peer_received + 1);
                            }
                            self.changed = true;
                        }
                        self.publish_acked();
                    }
                }
            }
        } else if self.clean_handover {
            // Everything sent before was acknowledged by the drained hub: the new
            // session takes over the numbering, and starts its inbound afresh.
            self.inb = ReceiveWindow::new(self.config.clone());
        } else if self.attached_before {
            reset = Some("the peer started a new session".to_owned());
        }
        self.clean_handover = false;
        let reset = reset.map(|reason| {
            let carried = self.reset(&reason, true);
            self.epoch += 1;
            Reset {
                reason,
                carried,
                epoch: self.epoch,
            }
        });
        self.attached_before = true;
        if resumed && let Some(reset) = reset {
            // The peer believes the session continues and would take what follows for
            // a gap: this connection carries nothing, and the next one starts a new
            // session, which continues from this reset without another.
            self.clean_handover = true;
            self.link = None;
            self.backlog_from = None;
            return Attach::Restart(reset);
        }
        self.link = Some(link);
        self.backlog_from = self.out.iter().next().map(|m| m.seq);
        Attach::Attached(reset)
    }

    /// A connection with `lease` was just granted this session: from now on only it
    /// may carry it. Returns the connection carrying it so far, to be closed with
    /// `4004` at once (the new one replays what it had queued).
    pub fn supersede(&mut self, lease: u64) -> Option<u64> {
        self.lease = self.lease.max(lease);
        self.link.take()
    }

    /// Whether a peer reporting `last_received` may resume this session: not if it
    /// claims more than was ever sent (it talks about state this side does not have).
    pub fn may_resume(&self, last_received: u64) -> bool {
        // An open tail (see `SessionSnapshot::open_tail`) takes the peer's word.
        self.out.open_tail || last_received <= self.out.highest_sent()
    }

    /// Resets the session: the messages the peer may or may not have (handed to a
    /// connection and not acknowledged) fail with `reason`; with `carry`, messages
    /// never handed to any connection stay held and go to the new session under the
    /// same sequence numbers (the peer's new session takes its base from the first),
    /// otherwise they fail too. The inbound direction starts afresh.
    fn reset(&mut self, reason: &str, carry: bool) -> HashSet<u64> {
        let after = self.out.acked();
        let through = if carry {
            self.transmitted_through.max(after)
        } else {
            self.out.highest_sent()
        };
        if through > after {
            // Cannot fail: `through` was handed out, so it is below the next number.
            let _ = self.out.on_ack(through);
            self.outcomes.fail(after, through, reason);
        }
        self.backlog_from = None;
        self.transmitted_through = through;
        self.staged.retain(|seq| *seq > through);
        self.resume_hold = None;
        self.latest.retain(|_, seq| *seq > through);
        self.inb = ReceiveWindow::new(self.config.clone());
        self.outcomes.set_acked(self.out.acked());
        self.changed = true;
        self.out.iter().map(|m| m.item.id).collect()
    }

    fn publish_acked(&mut self) {
        if self.outcomes.set_acked(self.out.acked()) {
            self.changed = true;
        }
    }

    /// Applies an arriving envelope's `seq` and `ack`, and says what to do with it.
    /// `now` is asked only when the time matters (see [`ReceiveWindow::on_data`]).
    pub fn handle_inbound(&mut self, env: &Envelope, now: impl FnOnce() -> Instant) -> Verdict {
        // A rejection is noted before the ack it carries releases the message, so its
        // outcome is the rejection, not a delivery.
        if env.kind == MessageType::Reply
            && let (Some(error), Some(corr)) = (&env.error, env.correlation)
            && is_rejection(&error.code)
        {
            self.note_rejected(corr, error);
        }
        if let Some(ack) = env.ack {
            match self.out.on_ack(ack) {
                Ok(released) if !released.is_empty() => self.publish_acked(),
                Ok(_) => {}
                Err(e) => return Verdict::Violation(e.to_string()),
            }
        }
        if env.kind == MessageType::Ack {
            return Verdict::Drop;
        }
        if env.kind.is_control() {
            return Verdict::Deliver;
        }
        // Data sent without a sequence number (straight on a connection, bypassing
        // the session) is delivered best-effort.
        let Some(seq) = env.seq else {
            return Verdict::Deliver;
        };
        match self.inb.on_data(seq, now) {
            Accept::Deliver if self.inb.ack_owed_by_count() => Verdict::DeliverThenAck,
            Accept::Deliver => {
                self.owed = true;
                Verdict::Deliver
            }
            Accept::Duplicate => Verdict::DropThenAck,
            Accept::Gap { expected, got } => {
                Verdict::Violation(format!("expected sequence {expected}, got {got}"))
            }
        }
    }

    /// Records that the peer refused the held message with id `id`, if it is held.
    fn note_rejected(&mut self, id: u64, error: &ErrorBody) {
        let Some(seq) = self.out.iter().find(|m| m.item.id == id).map(|m| m.seq) else {
            return;
        };
        let error = ErrorBody::new(
            crate::text::truncate(&error.code, 64),
            crate::text::truncate(&error.message, crate::text::MAX_KEPT),
        );
        self.outcomes.reject(seq, error);
        self.changed = true;
    }

    /// The acknowledgement owed now as a standalone `ack`, unless session messages
    /// wait in the backlog: then it rides on them (a standalone ack could overtake a
    /// refusal the peer must see before the ack that covers the refused message).
    pub fn take_standalone_ack(&mut self) -> Option<u64> {
        if self.backlog_from.is_none() {
            Some(self.inb.take_ack())
        } else {
            self.owed = true;
            None
        }
    }

    /// The standalone acknowledgement taken at `now` (from
    /// [`Session::take_standalone_ack`] or [`Session::poll_ack`]) could not be sent:
    /// it rides on the next outgoing message, or goes standalone an ack delay later.
    pub fn on_ack_unsent(&mut self, now: Instant) {
        self.owed = true;
        self.inb.owe_again(now, self.config.ack_delay);
    }

    /// The standalone acknowledgement to send at `now`, if one is due (see
    /// [`Session::ack_due_at`]). While a backlog is sent the ack rides on it, and is
    /// looked at again an ack delay later.
    pub fn poll_ack(&mut self, now: Instant) -> Option<u64> {
        if self.backlog_from.is_some() {
            self.owed = true;
            self.inb.postpone_ack(now + self.config.ack_delay);
            return None;
        }
        self.inb.ack_due(now).then(|| self.inb.take_ack())
    }

    /// When a standalone acknowledgement is due, if one is owed.
    pub fn ack_due_at(&self) -> Option<Instant> {
        self.inb.ack_due_at()
    }

    /// When [`Session::handle_timeout`] has something to do: an ack falls due or a
    /// held message expires.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.inb.ack_due_at(), self.out.next_expiry()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Drops messages held past the age bound; their outcomes become
    /// [`Undelivered::Expired`]. (A due ack is taken with [`Session::poll_ack`].)
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired = self.out.expire(now);
        if let Some(last) = expired.last() {
            self.outcomes.expired_through(last.seq);
            self.changed = true;
        }
    }

    /// Whether the peer has stopped acknowledging: the oldest message it was sent has
    /// waited for its ack longer than `stall_timeout`.
    pub fn peer_stalled(&self, now: Instant) -> bool {
        self.out.iter().next().is_some_and(|oldest| {
            oldest.seq <= self.transmitted_through
                && now.saturating_duration_since(oldest.at) > self.config.stall_timeout
        })
    }

    /// Whether every message handed to a connection has been acknowledged.
    pub fn is_quiet(&self) -> bool {
        self.out.acked() >= self.transmitted_through
    }

    /// A drained connection closed: if nothing it carried is unacknowledged (and no
    /// other connection carries the session), the next connection may start a new
    /// session without a reset. Returns whether it may.
    pub fn handle_handover(&mut self) -> bool {
        self.clean_handover = self.is_quiet() && self.link.is_none();
        self.clean_handover
    }

    /// Whether connection `link` carries the session.
    pub fn carried_by(&self, link: u64) -> bool {
        self.link == Some(link)
    }

    /// The connection carrying the session, if any.
    pub fn link(&self) -> Option<u64> {
        self.link
    }

    /// Connection `link` ended; returns whether it was carrying the session.
    pub fn detach(&mut self, link: u64) -> bool {
        let current = self.link == Some(link);
        if current {
            self.link = None;
        }
        current
    }

    /// Fails every held message with a reset (they cannot be delivered, say because
    /// the peer does not resume sessions); the session stays usable.
    pub fn fail_held(&mut self, reason: &str) {
        if !self.out.is_empty() {
            self.reset(reason, false);
        }
    }

    /// Ends the session: every unacknowledged message fails with `reason`, and
    /// `send` refuses from now on.
    pub fn shut_down(&mut self, reason: Undelivered) {
        self.shut = true;
        self.out.reset();
        self.link = None;
        self.backlog_from = None;
        self.staged.clear();
        self.resume_hold = None;
        self.latest.clear();
        self.outcomes.end(reason);
        self.changed = true;
    }

    /// Whether outcomes (or room in the buffer) changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// The outcome of every message accepted.
    pub fn outcomes(&self) -> &Outcomes {
        &self.outcomes
    }

    /// Messages and bytes held for replay.
    pub fn held(&self) -> Held {
        Held {
            messages: self.out.len(),
            bytes: self.out.bytes(),
        }
    }

    /// The messages held for replay (sent, not yet acknowledged), oldest first, with
    /// their sequence numbers: of this copy, or of the copy a restored session was
    /// snapshotted from.
    pub fn held_messages(&self) -> impl Iterator<Item = (u64, &Envelope)> {
        self.out.iter().map(|m| (m.seq, &*m.item))
    }

    /// Whether `size` more bytes fit in the replay buffer now.
    pub fn has_room(&self, size: usize) -> Result<(), Bound> {
        self.out.has_room(size)
    }

    /// The highest sequence number received in order and handled (for a resume
    /// request or grant).
    pub fn last_received(&self) -> u64 {
        self.inb.last_received()
    }

    /// Data message `seq`, just delivered by [`Session::handle_inbound`], is being
    /// handled: acknowledgements (standalone or riding on outgoing messages) do not
    /// cover it until [`Session::complete_held`]. A hub that must store a message
    /// before the agent lets go of it holds it while it stores; several may be held.
    pub fn hold(&mut self, seq: u64) {
        self.inb.hold(seq);
    }

    /// Held message `seq` was handled (see [`Session::hold`]). `now` is asked only if
    /// an acknowledgement becomes owed.
    pub fn complete_held(&mut self, seq: u64, now: impl FnOnce() -> Instant) {
        let before = self.inb.last_received();
        self.inb.complete(seq, now);
        if self.inb.last_received() > before {
            self.owed = true;
        }
    }

    /// The held messages could not all be taken (the store is down): from the oldest
    /// held on they count as never received, and the peer's replay on its next
    /// connection brings them again.
    pub fn rewind_held(&mut self) {
        self.inb.rewind();
    }

    /// Where the numbering went on after an open-numbered resume (what the peer
    /// reported having), if this copy was resumed so.
    pub fn resumed_open_at(&self) -> Option<u64> {
        self.resumed_open_at
    }

    /// The highest sequence number the peer acknowledged (or its resume reported).
    pub fn acked(&self) -> u64 {
        self.out.acked()
    }

    /// The highest sequence number handed out to a message of this session.
    pub fn highest_sent(&self) -> u64 {
        self.out.highest_sent()
    }

    /// Resets so far.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The generation of this copy: of the snapshot it was restored from, or of the
    /// last one saved of it ([`Session::set_generation`]).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Records that the snapshot of `generation` was saved: this copy is that one.
    pub fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// Whether the session was shut down.
    pub fn is_shut_down(&self) -> bool {
        self.shut
    }
}

/// What a session holds for replay until the peer acknowledges it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Held {
    /// Messages held.
    pub messages: usize,
    /// Their encoded size, in bytes.
    pub bytes: usize,
}
