//! The two halves of a session direction: [`ReplayBuffer`] numbers and holds, [`ReceiveWindow`]
//! orders and acknowledges.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Bounds and acknowledgement timing of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionConfig {
    /// Most unacknowledged messages held for replay. Default 10,000.
    pub max_replay_messages: usize,
    /// Most unacknowledged bytes held for replay. Default 16 MiB.
    pub max_replay_bytes: usize,
    /// Oldest unacknowledged message kept; older ones expire. Default 5 minutes.
    pub max_replay_age: Duration,
    /// Acknowledge after this many messages at the latest. Default 64.
    pub ack_every: u32,
    /// Acknowledge after this long at the latest. Default 20 ms.
    pub ack_delay: Duration,
    /// How long the peer may leave a message it was sent unacknowledged while the
    /// replay buffer is full before the connection is closed as stalled (`1008`, the
    /// next connection resumes). Default 10 s.
    pub stall_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_replay_messages: 10_000,
            max_replay_bytes: 16 * 1024 * 1024,
            max_replay_age: Duration::from_secs(300),
            ack_every: 64,
            ack_delay: Duration::from_millis(20),
            stall_timeout: Duration::from_secs(10),
        }
    }
}

impl SessionConfig {
    /// Sets [`SessionConfig::max_replay_messages`].
    pub fn max_replay_messages(mut self, count: usize) -> Self {
        self.max_replay_messages = count;
        self
    }

    /// Sets [`SessionConfig::max_replay_bytes`].
    pub fn max_replay_bytes(mut self, bytes: usize) -> Self {
        self.max_replay_bytes = bytes;
        self
    }

    /// Sets [`SessionConfig::max_replay_age`].
    pub fn max_replay_age(mut self, age: Duration) -> Self {
        self.max_replay_age = age;
        self
    }

    /// Sets [`SessionConfig::ack_every`].
    pub fn ack_every(mut self, count: u32) -> Self {
        self.ack_every = count;
        self
    }

    /// Sets [`SessionConfig::stall_timeout`].
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// Sets [`SessionConfig::ack_delay`].
    pub fn ack_delay(mut self, delay: Duration) -> Self {
        self.ack_delay = delay;
        self
    }
}

/// A message held for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent<T> {
    /// Its sequence number.
    pub seq: u64,
    /// What the caller stored (an envelope, an encoded frame...).
    pub item: T,
    /// Its size in bytes, as the caller counted it.
    pub size: usize,
    /// When it was pushed.
    pub at: Instant,
}

/// What an acknowledgement released from the replay buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Released {
    /// Messages dropped.
    pub messages: usize,
    /// Their sizes, as the caller counted them.
    pub bytes: usize,
}

impl Released {
    /// Whether nothing was released.
    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }
}

/// Which bound a full replay buffer hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// `max_replay_messages`.
    Messages,
    /// `max_replay_bytes`.
    Bytes,
}

/// The replay buffer has no room: the item comes back with the bound it hit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("replay buffer full ({bound:?} bound)")]
pub struct Full<T> {
    /// The item that was not accepted.
    pub item: T,
    /// The bound that was hit.
    pub bound: Bound,
}

/// An acknowledgement that cannot be right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// The peer acknowledged a sequence number that was never sent.
    #[error("ack {ack} is beyond the highest sequence sent ({highest_sent})")]
    Unsent {
        /// The acknowledgement.
        ack: u64,
        /// The highest sequence number sent.
        highest_sent: u64,
    },
}

/// A resume that cannot deliver exactly once: the session must be reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    /// The peer reports having received more than was ever sent (it talks about another
    /// session, or this side lost its state).
    #[error("peer reports receiving {peer_received} but only {highest_sent} were sent")]
    PeerAhead {
        /// What the peer reported.
        peer_received: u64,
        /// The highest sequence number sent.
        highest_sent: u64,
    },
    /// Messages the peer has not received are no longer held (they expired or the
    /// buffer overflowed).
    #[error("messages after {peer_received} up to {lost_through} are no longer held")]
    Gap {
        /// What the peer reported.
        peer_received: u64,
        /// The highest sequence number that was dropped unacknowledged.
        lost_through: u64,
    },
}

/// The sending side of one direction.
#[derive(Debug, Clone)]
pub struct ReplayBuffer<T> {
    pub(super) config: SessionConfig,
    pub(super) next_seq: u64,
    pub(super) acked: u64,
    /// The highest sequence number dropped without an acknowledgement (0: none).
    pub(super) lost_through: u64,
    pub(super) pending: VecDeque<Sent<T>>,
    pub(super) bytes: usize,
    /// The numbering past `acked` is not known (restored from a record that keeps
    /// only what the peer acknowledged, see [`SessionSnapshot::open_tail`]): nothing is
    /// held, and the peer's resume says where the numbering goes on.
    ///
    /// [`SessionSnapshot::open_tail`]: super::SessionSnapshot::open_tail
    pub(super) open_tail: bool,
}

impl<T> ReplayBuffer<T> {
    /// A new direction: the first message gets sequence number 1.
    pub fn new(config: SessionConfig) -> Self {
        ReplayBuffer {
            config,
            next_seq: 1,
            acked: 0,
            lost_through: 0,
            pending: VecDeque::new(),
            bytes: 0,
            open_tail: false,
        }
    }

    /// Whether an item of `size` bytes fits now.
    pub fn has_room(&self, size: usize) -> Result<(), Bound> {
        // Until the peer's resume fixes the numbering, a message cannot be numbered:
        // the buffer counts as full.
        if self.open_tail || self.pending.len() >= self.config.max_replay_messages {
            Err(Bound::Messages)
        } else if self.bytes.saturating_add(size) > self.config.max_replay_bytes
            && !self.pending.is_empty()
        {
            // A single message larger than the byte bound is still accepted alone, so
            // that a large message is never refused forever.
            Err(Bound::Bytes)
        } else {
            Ok(())
        }
    }

    /// Numbers `item` and holds it until acknowledged; returns its sequence number.
    pub fn push(&mut self, item: T, size: usize, now: Instant) -> Result<u64, Full<T>> {
        if let Err(bound) = self.has_room(size) {
            return Err(Full { item, bound });
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.bytes += size;
        self.pending.push_back(Sent {
            seq,
            item,
            size,
            at: now,
        });
        Ok(seq)
    }

    /// Applies a cumulative acknowledgement: drops the messages it covers and says how
    /// many and how large they were. An older acknowledgement than one already applied
    /// changes nothing.
    pub fn on_ack(&mut self, ack: u64) -> Result<Released, AckError> {
        if ack >= self.next_seq {
            return Err(AckError::Unsent {
                ack,
                highest_sent: self.highest_sent(),
            });
        }
        let mut released = Released::default();
        if ack <= self.acked {
            return Ok(released);
        }
        self.acked = ack;
        // Dropped in place: an ack covers dozens of messages, and callers only count them.
        while self.pending.front().is_some_and(|m| m.seq <= ack) {
            if let Some(m) = self.pending.pop_front() {
                self.bytes -= m.size;
                released.messages += 1;
                released.bytes += m.size;
            }
        }
        Ok(released)
    }

    /// Drops messages older than `max_replay_age` and returns them, oldest first. The
    /// peer may not have them: a later resume that needs them fails with
    /// [`ResumeError::Gap`].
    pub fn expire(&mut self, now: Instant) -> Vec<Sent<T>> {
        let mut expired = Vec::new();
        while self
            .pending
            .front()
            .is_some_and(|m| now.saturating_duration_since(m.at) > self.config.max_replay_age)
        {
            if let Some(m) = self.pending.pop_front() {
                self.bytes -= m.size;
                self.lost_through = m.seq;
                expired.push(m);
            }
        }
        expired
    }

    /// When the oldest held message expires, if any is held.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.pending
            .front()
            .map(|m| m.at + self.config.max_replay_age)
    }

    /// After a reconnect: the peer reports the highest sequence number it received in
    /// order. Everything up to it counts as acknowledged; the rest is returned to be
    /// sent again, oldest first.
    pub fn resume(
        &mut self,
        peer_received: u64,
    ) -> Result<impl Iterator<Item = &Sent<T>>, ResumeError> {
        // An open numbering takes the peer's word, within a bound that keeps every
        // later number representable.
        if self.open_tail && peer_received >= self.acked && peer_received <= u64::MAX / 2 {
            // Whatever was sent past `acked` and not received is held elsewhere (the
            // record this was restored from says so): the numbering goes on after
            // what the peer has.
            self.open_tail = false;
            self.acked = peer_received;
            self.next_seq = peer_received + 1;
            return Ok(self.pending.iter());
        }
        if peer_received > self.highest_sent() {
            return Err(ResumeError::PeerAhead {
                peer_received,
                highest_sent: self.highest_sent(),
            });
        }
        if peer_received < self.lost_through {
            return Err(ResumeError::Gap {
                peer_received,
                lost_through: self.lost_through,
            });
        }
        // Cannot fail: peer_received <= highest_sent was checked above.
        let _ = self.on_ack(peer_received);
        Ok(self.pending.iter())
    }

    /// Drops everything held (a session reset) and returns it, oldest first. Sequence
    /// numbers start again at 1.
    pub fn reset(&mut self) -> Vec<Sent<T>> {
        self.next_seq = 1;
        self.acked = 0;
        self.lost_through = 0;
        self.bytes = 0;
        self.open_tail = false;
        self.pending.drain(..).collect()
    }

    /// The sequence number the next pushed message will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The held message with sequence number `seq`, mutably (to update the `ack` it
    /// carries before sending it again, say).
    pub fn get_mut(&mut self, seq: u64) -> Option<&mut Sent<T>> {
        let first = self.pending.front()?.seq;
        let index = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.pending.get_mut(index)
    }

    /// Replaces what message `seq` holds (same sequence number), keeping the byte count
    /// right; returns the old item, or gives `item` back if `seq` is not held.
    pub fn replace(&mut self, seq: u64, item: T, size: usize) -> Result<T, T> {
        let Some(held) = self.get_mut(seq) else {
            return Err(item);
        };
        let old_size = std::mem::replace(&mut held.size, size);
        let old = std::mem::replace(&mut held.item, item);
        self.bytes = self.bytes - old_size + size;
        Ok(old)
    }

    /// The held message with sequence number `seq`, if it is still held.
    pub fn get(&self, seq: u64) -> Option<&Sent<T>> {
        let first = self.pending.front()?.seq;
        let index = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.pending.get(index)
    }

    /// The held messages, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Sent<T>> {
        self.pending.iter()
    }

    /// The highest sequence number handed out (0 before the first).
    pub fn highest_sent(&self) -> u64 {
        self.next_seq - 1
    }

    /// The highest sequence number acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Messages held for replay.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Bytes held for replay.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// What to do with an arriving data message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// The next in order: deliver it.
    Deliver,
    /// Already delivered (a replay): drop it. An acknowledgement is scheduled at once so
    /// the sender stops replaying.
    Duplicate,
    /// Sequence numbers were skipped: the peer broke the protocol or state was lost.
    Gap {
        /// The sequence number expected.
        expected: u64,
        /// The one that arrived.
        got: u64,
    },
}

/// The receiving side of one direction.
#[derive(Debug, Clone)]
pub struct ReceiveWindow {
    pub(super) config: SessionConfig,
    pub(super) received: u64,
    /// Whether the base is known. A new direction takes the first data message's
    /// sequence number as its base (a peer moving from a drained hub continues its
    /// numbering); a resumed one knows it.
    pub(super) started: bool,
    pub(super) unacked: u32,
    /// When the first message not yet acknowledged arrived.
    pub(super) first_at: Option<Instant>,
    pub(super) ack_at: Option<Instant>,
    /// Messages being handled, oldest first, each with whether it is done (see
    /// [`ReceiveWindow::hold`]): acknowledgements stop below the oldest not done.
    pub(super) held: std::collections::VecDeque<(u64, bool)>,
    /// The last acknowledgement taken.
    pub(super) acked: u64,
}

impl ReceiveWindow {
    /// A new direction. Its first data message fixes the base: normally 1, but a
    /// peer that moved here from a drained hub continues its own numbering.
    pub fn new(config: SessionConfig) -> Self {
        ReceiveWindow {
            started: false,
            ..Self::resumed(config, 0)
        }
    }

    /// A direction that has already received everything up to `received`.
    pub fn resumed(config: SessionConfig, received: u64) -> Self {
        ReceiveWindow {
            config,
            received,
            started: true,
            unacked: 0,
            first_at: None,
            ack_at: None,
            held: std::collections::VecDeque::new(),
            acked: received,
        }
    }

    /// Classifies an arriving data message with sequence number `seq`. `now` is asked
    /// only when the time matters (the first unacknowledged message of a batch, or a
    /// duplicate), so a busy receiver does not read the clock per message.
    pub fn on_data(&mut self, seq: u64, now: impl FnOnce() -> Instant) -> Accept {
        if !self.started && seq > 0 {
            self.started = true;
            self.received = seq - 1;
        }
        if seq <= self.received {
            let t = now();
            self.first_at.get_or_insert(t);
            self.ack_at = Some(self.ack_at.map_or(t, |at| at.min(t)));
            return Accept::Duplicate;
        }
        if seq != self.received + 1 {
            return Accept::Gap {
                expected: self.received + 1,
                got: seq,
            };
        }
        self.received = seq;
        self.unacked = self.unacked.saturating_add(1);
        let first = match self.first_at {
            Some(first) => first,
            None => {
                let t = now();
                self.first_at = Some(t);
                self.ack_at = Some(t + self.config.ack_delay);
                t
            }
        };
        if self.unacked >= self.config.ack_every {
            // Due at once: the first message's arrival is certainly not in the future.
            self.ack_at = Some(first);
        }
        Accept::Deliver
    }

    /// When an acknowledgement is due, if one is owed: at once after `ack_every`
    /// messages (or a duplicate), else `ack_delay` after the first unacknowledged one.
    pub fn ack_due_at(&self) -> Option<Instant> {
        self.ack_at
    }

    /// Whether `ack_every` messages await an acknowledgement (it is due whatever the
    /// time; checking this needs no clock).
    pub fn ack_owed_by_count(&self) -> bool {
        self.unacked >= self.config.ack_every
    }

    /// Whether an acknowledgement should be sent at `now`.
    pub fn ack_due(&self, now: Instant) -> bool {
        self.ack_at.is_some_and(|at| at <= now)
    }

    /// Moves an owed acknowledgement's deadline to `at` (when it cannot go now, for
    /// example while it must wait behind other messages); nothing if none is owed.
    pub fn postpone_ack(&mut self, at: Instant) {
        if let Some(due) = &mut self.ack_at {
            *due = (*due).max(at);
        }
    }

    /// The cumulative acknowledgement to send now (standalone or riding on an outgoing
    /// message); clears what was owed. It never covers a message being handled.
    pub fn take_ack(&mut self) -> u64 {
        self.unacked = 0;
        self.first_at = None;
        self.ack_at = None;
        self.acked = self.last_received();
        self.acked
    }

    /// The acknowledgement taken last could not be sent (the connection's queue was
    /// full): it is owed again, due `retry` after `now` unless it is due sooner.
    pub fn owe_again(&mut self, now: Instant, retry: Duration) {
        self.first_at.get_or_insert(now);
        let at = now + retry;
        self.ack_at = Some(self.ack_at.map_or(at, |due| due.min(at)));
    }

    /// The highest sequence number received in order and handled: what an
    /// acknowledgement covers and what a resume reports.
    pub fn last_received(&self) -> u64 {
        self.held.front().map_or(self.received, |&(seq, _)| {
            self.received.min(seq.saturating_sub(1))
        })
    }

    /// Message `seq` (delivered just now) is being handled: no acknowledgement covers
    /// it, or anything after it, until it is [complete](ReceiveWindow::complete), so
    /// that the peer lets go of it only once the receiver is done with it (a hub has
    /// stored it, say). Several may be held at once, completing in any order.
    pub fn hold(&mut self, seq: u64) {
        self.held.push_back((seq, false));
    }

    /// Held message `seq` was handled. Once every message before it is too,
    /// acknowledgements may cover them; if one was taken meanwhile, another is owed,
    /// due an ack delay after `now` (asked only then).
    pub fn complete(&mut self, seq: u64, now: impl FnOnce() -> Instant) {
        if let Some(entry) = self.held.iter_mut().find(|(s, _)| *s == seq) {
            entry.1 = true;
        }
        let mut freed = false;
        while self.held.front().is_some_and(|&(_, done)| done) {
            self.held.pop_front();
            freed = true;
        }
        if freed && self.last_received() > self.acked && self.ack_at.is_none() {
            let now = now();
            self.first_at = Some(now);
            self.ack_at = Some(now + self.config.ack_delay);
        }
    }

    /// The held messages were not all taken: from the oldest held on, they count as
    /// never received, so the peer's replay delivers them again.
    pub fn rewind(&mut self) {
        if let Some(&(seq, _)) = self.held.front() {
            self.received = self.received.min(seq.saturating_sub(1));
        }
        self.held.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SessionConfig {
        SessionConfig::default()
            .max_replay_messages(4)
            .max_replay_bytes(100)
            .max_replay_age(Duration::from_secs(60))
            .ack_every(3)
            .ack_delay(Duration::from_millis(20))
    }

    #[test]
    fn sequence_numbers_start_at_one_and_acks_release_the_buffer() {
        let t = Instant::now();
        let mut tx = ReplayBuffer::new(config());
        assert_eq!(tx.push('a', 10, t), Ok(1));
        assert_eq!(tx.push('b', 10, t), Ok(2));
        assert_eq!(tx.push('c', 10, t), Ok(3));
        assert_eq!((tx.len(), tx.bytes()), (3, 30));
        assert_eq!(
            tx.on_ack(2),
            Ok(Released {
                messages: 2,
                bytes: 20
            })
        );
        assert_eq!((tx.len(), tx.bytes(), tx.acked()), (1, 10, 2));
        assert_eq!(tx.iter().map(|m| m.item).collect::<Vec<_>>(), ['c']);
        // A stale ack changes nothing; an ack of something never sent is an error.
        assert!(tx.on_ack(1).expect("stale").is_empty());
        assert_eq!(
            tx.on_ack(4),
            Err(AckError::Unsent {
                ack: 4,
                highest_sent: 3
            })
        );
    }

    #[test]
    fn the_buffer_is_bounded_by_count_and_bytes() {
        let t = Instant::now();
        let mut tx = ReplayBuffer::new(config());
        for i in 0..4 {
            tx.push(i, 1, t).expect("room");
        }
        assert_eq!(
            tx.push(9, 1, t),
            Err(Full {
                item: 9,
                bound: Bound::Messages
            })
        );
        let mut tx = ReplayBuffer::new(config());
        tx.push(0, 60, t).expect("room");
        assert_eq!(
            tx.push(1, 60, t),
            Err(Full {
                item: 1,
                bound: Bound::Bytes
            })
        );
        // One oversized message alone is accepted rather than refused forever.
        let mut tx = ReplayBuffer::new(config());
        assert!(tx.push(0, 500, t).is_ok());
    }

    #[test]
    fn resume_replays_what_the_peer_lacks_and_acks_the_rest() {
        let t = Instant::now();
        let mut tx = ReplayBuffer::new(config());
        for c in ['a', 'b', 'c'] {
            tx.push(c, 1, t).expect("room");
        }
        let replay: Vec<_> = tx
            .resume(1)
            .expect("resume")
            .map(|m| (m.seq, m.item))
            .collect();
        assert_eq!(replay, [(2, 'b'), (3, 'c')]);
        assert_eq!(tx.acked(), 1);
        assert_eq!(
            tx.resume(7).err(),
            Some(ResumeError::PeerAhead {
                peer_received: 7,
                highest_sent: 3
            })
        );
    }

    #[test]
    fn expired_messages_make_a_later_resume_a_gap() {
        let t = Instant::now();
        let mut tx = ReplayBuffer::new(config());
        tx.push('a', 1, t).expect("room");
        tx.push('b', 1, t + Duration::from_secs(30)).expect("room");
        assert_eq!(tx.next_expiry(), Some(t + Duration::from_secs(60)));
        let expired: Vec<_> = tx
            .expire(t + Duration::from_secs(61))
            .into_iter()
            .map(|m| m.item)
            .collect();
        assert_eq!(expired, ['a']);
        assert_eq!(
            tx.resume(0).err(),
            Some(ResumeError::Gap {
                peer_received: 0,
                lost_through: 1
            })
        );
        // A peer that did receive 'a' can still resume.
        let replay: Vec<_> = tx.resume(1).expect("resume").map(|m| m.item).collect();
        assert_eq!(replay, ['b']);
    }

    #[test]
    fn reset_returns_everything_and_starts_over() {
        let t = Instant::now();
        let mut tx = ReplayBuffer::new(config());
        tx.push('a', 1, t).expect("room");
        tx.push('b', 1, t).expect("room");
        let dropped: Vec<_> = tx.reset().into_iter().map(|m| m.item).collect();
        assert_eq!(dropped, ['a', 'b']);
        assert_eq!((tx.len(), tx.bytes(), tx.highest_sent()), (0, 0, 0));
        assert_eq!(tx.push('c', 1, t), Ok(1));
    }

    #[test]
    fn inbound_delivers_in_order_once_and_detects_gaps() {
        let t = Instant::now();
        let mut rx = ReceiveWindow::new(config());
        assert_eq!(rx.on_data(1, || t), Accept::Deliver);
        assert_eq!(rx.on_data(1, || t), Accept::Duplicate);
        assert_eq!(
            rx.on_data(3, || t),
            Accept::Gap {
                expected: 2,
                got: 3
            }
        );
        assert_eq!(rx.on_data(2, || t), Accept::Deliver);
        assert_eq!(rx.last_received(), 2);
    }

    #[test]
    fn a_new_direction_takes_its_base_from_the_first_message() {
        let t = Instant::now();
        let mut rx = ReceiveWindow::new(config());
        assert_eq!(rx.on_data(101, || t), Accept::Deliver);
        assert_eq!(rx.last_received(), 101);
        assert_eq!(
            rx.on_data(103, || t),
            Accept::Gap {
                expected: 102,
                got: 103
            }
        );
        // A resumed direction knows its base.
        let mut resumed = ReceiveWindow::resumed(config(), 0);
        assert_eq!(
            resumed.on_data(5, || t),
            Accept::Gap {
                expected: 1,
                got: 5
            }
        );
    }

    #[test]
    fn acks_are_due_after_n_messages_or_the_delay() {
        let t = Instant::now();
        let mut rx = ReceiveWindow::new(config());
        assert!(!rx.ack_due(t));
        assert_eq!(rx.ack_due_at(), None);
        rx.on_data(1, || t);
        assert!(!rx.ack_due(t));
        assert_eq!(rx.ack_due_at(), Some(t + Duration::from_millis(20)));
        assert!(rx.ack_due(t + Duration::from_millis(20)));
        rx.on_data(2, || t);
        rx.on_data(3, || t);
        assert!(rx.ack_due(t), "three messages: due at once");
        assert_eq!(rx.take_ack(), 3);
        assert!(!rx.ack_due(t + Duration::from_secs(1)));
        // A duplicate makes an ack due at once, so the sender stops replaying.
        rx.on_data(2, || t);
        assert!(rx.ack_due(t));
        // An ack that must wait is due again later, not at once over and over.
        rx.postpone_ack(t + Duration::from_millis(20));
        assert!(!rx.ack_due(t));
        assert!(rx.ack_due(t + Duration::from_millis(20)));
    }
}
