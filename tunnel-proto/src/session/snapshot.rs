//! A session's complete state as a serializable value, and a session rebuilt from it.
//!
//! A snapshot holds both directions (the numbering, the unacknowledged messages, what
//! was received and what acknowledgement is owed), the conflation index and the
//! epoch. Not the lease, which orders the grants of the registry that holds the
//! session: a restored session takes its new registry's. It holds no connection: a restored session waits for its next
//! [`Session::handle_attach`], as after a disconnect. Instants are kept as ages
//! relative to the time of the snapshot, so a session restored elsewhere (another
//! process, another clock) keeps its timing. Per-message outcomes are not kept: they
//! answer receipts, which live in the process that took the messages.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{Envelope, Format, Limits};

use super::{Outcomes, ReceiveWindow, ReplayBuffer, Sent, Session, SessionConfig};

/// The snapshot format's version; [`Session::restore`] refuses others.
pub const SNAPSHOT_VERSION: u32 = 1;

/// One session's state (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SessionSnapshot {
    /// [`SNAPSHOT_VERSION`].
    pub version: u32,
    /// The sequence number the next message gets.
    pub next_seq: u64,
    /// The highest sequence number the peer acknowledged.
    pub acked: u64,
    /// The highest sequence number dropped unacknowledged (expired), 0 for none.
    pub lost_through: u64,
    /// The unacknowledged messages, oldest first.
    pub held: Vec<HeldMessage>,
    /// The highest sequence number ever handed to a connection.
    pub transmitted_through: u64,
    /// The latest unsent `status` per resource key (for conflation).
    pub latest: Vec<(String, u64)>,
    /// The highest sequence number received in order.
    pub received: u64,
    /// Whether the inbound direction has its base.
    pub started: bool,
    /// Messages received since the last acknowledgement.
    pub unacked: u32,
    /// How long ago the first unacknowledged message arrived.
    pub first_unacked_age: Option<Duration>,
    /// When the owed acknowledgement is due, relative to the snapshot.
    pub ack_due: Option<Offset>,
    /// Whether an outgoing message should carry an acknowledgement.
    pub ack_owed: bool,
    /// Whether a connection ever carried the session.
    pub attached_before: bool,
    /// Whether the last connection ended after a drain with everything acknowledged.
    pub clean_handover: bool,
    /// Whether the session was shut down.
    pub shut: bool,
    /// Resets so far.
    pub epoch: u64,
    /// One more than the generation of the copy it was taken from. A holder of a
    /// live copy that saved generation `g` and finds another generation stored knows
    /// its copy is stale: the session continued elsewhere.
    pub generation: u64,
    /// The numbering past `acked` is not known, and nothing is held: a record that
    /// keeps only the acknowledged position (a hub cluster's, whose unacknowledged
    /// messages wait in a stream it reads again). The peer's resume then says where the
    /// numbering goes on (it may report anything from `acked` on), and until it does
    /// the session takes no message. `next_seq` is `acked + 1`.
    #[serde(default)]
    pub open_tail: bool,
    /// With `open_tail`: once the peer's resume fixed the numbering (at `R`), nothing
    /// more goes to a connection until [`Session::release`] covers `R + 1`: a holder
    /// that must first record where the numbering went on releases it after that.
    #[serde(default)]
    pub hold_resumed: bool,
}

/// A time before or after the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Offset {
    /// This long before.
    Before(Duration),
    /// This long after.
    After(Duration),
}

impl Offset {
    fn of(at: Instant, now: Instant) -> Offset {
        match at.checked_duration_since(now) {
            Some(after) => Offset::After(after),
            None => Offset::Before(now.saturating_duration_since(at)),
        }
    }

    fn at(self, now: Instant) -> Instant {
        match self {
            Offset::After(d) => now.checked_add(d).unwrap_or(now),
            Offset::Before(d) => before(now, d),
        }
    }
}

/// `now - age`, or `now` on a platform whose clock cannot go back that far.
fn before(now: Instant, age: Duration) -> Instant {
    now.checked_sub(age).unwrap_or(now)
}

/// An unacknowledged message of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HeldMessage {
    /// Its sequence number.
    pub seq: u64,
    /// What it counts for in the byte bound.
    pub size: usize,
    /// How long it has been held.
    pub age: Duration,
    /// The codec of `frame` (`tunnel.v1.json`, `tunnel.v1.msgpack`): its payload's own.
    pub codec: String,
    /// The envelope, encoded as on the wire.
    pub frame: Vec<u8>,
}

/// A snapshot that cannot be taken or restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Another format version.
    #[error("snapshot version {0} is not {SNAPSHOT_VERSION}")]
    Version(u32),
    /// A held message could not be encoded or decoded.
    #[error("held message {seq}: {reason}")]
    Message {
        /// Its sequence number.
        seq: u64,
        /// What went wrong.
        reason: String,
    },
    /// The numbering does not add up (held messages out of order, above `next_seq`,
    /// at or below `acked`, or over the configured bounds).
    #[error("inconsistent snapshot: {0}")]
    Inconsistent(&'static str),
}

impl SessionSnapshot {
    /// A session known only by what the peer acknowledged of this side's messages
    /// (`acked`): nothing held, the numbering open (see [`SessionSnapshot::open_tail`]),
    /// the peer's direction not started (its resume replays everything this side did
    /// not acknowledge, and the receiver drops what it already has by its own means).
    pub fn open(acked: u64) -> SessionSnapshot {
        SessionSnapshot {
            version: SNAPSHOT_VERSION,
            next_seq: acked.saturating_add(1),
            acked,
            lost_through: 0,
            held: Vec::new(),
            transmitted_through: acked,
            latest: Vec::new(),
            received: 0,
            started: false,
            unacked: 0,
            first_unacked_age: None,
            ack_due: None,
            ack_owed: false,
            attached_before: true,
            clean_handover: false,
            shut: false,
            epoch: 0,
            generation: 0,
            open_tail: true,
            hold_resumed: false,
        }
    }

    /// This snapshot with [`SessionSnapshot::hold_resumed`].
    #[must_use]
    pub fn holding_resumed(mut self) -> SessionSnapshot {
        self.hold_resumed = self.open_tail;
        self
    }
}

impl Session {
    /// The session's complete state at `now`.
    pub fn snapshot(&self, now: Instant) -> Result<SessionSnapshot, SnapshotError> {
        let held =
            self.out
                .iter()
                .map(|m| {
                    let format = m
                        .item
                        .payload
                        .as_ref()
                        .map_or(Format::MsgPack, |p| p.format());
                    let mut frame = Vec::new();
                    format.codec().encode(&m.item, &mut frame).map_err(|e| {
                        SnapshotError::Message {
                            seq: m.seq,
                            reason: e.to_string(),
                        }
                    })?;
                    Ok(HeldMessage {
                        seq: m.seq,
                        size: m.size,
                        age: now.saturating_duration_since(m.at),
                        codec: format.subprotocol().to_owned(),
                        frame,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
        let mut latest: Vec<(String, u64)> =
            self.latest.iter().map(|(k, s)| (k.clone(), *s)).collect();
        latest.sort_by_key(|(_, seq)| *seq);
        Ok(SessionSnapshot {
            version: SNAPSHOT_VERSION,
            next_seq: self.out.next_seq,
            acked: self.out.acked,
            lost_through: self.out.lost_through,
            held,
            transmitted_through: self.transmitted_through,
            latest,
            // A message still being handled is not in the snapshot's past: a restored
            // copy receives it again.
            received: self.inb.last_received(),
            started: self.inb.started,
            unacked: self.inb.unacked,
            first_unacked_age: self
                .inb
                .first_at
                .map(|at| now.saturating_duration_since(at)),
            ack_due: self.inb.ack_at.map(|at| Offset::of(at, now)),
            ack_owed: self.owed,
            attached_before: self.attached_before,
            clean_handover: self.clean_handover,
            shut: self.shut,
            epoch: self.epoch,
            generation: self.generation + 1,
            open_tail: self.out.open_tail,
            hold_resumed: self.hold_resumed && self.out.open_tail,
        })
    }

    /// A session with `snapshot`'s state at `now`, detached, under `config`.
    pub fn restore(
        config: SessionConfig,
        snapshot: &SessionSnapshot,
        now: Instant,
    ) -> Result<Session, SnapshotError> {
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version(snapshot.version));
        }
        if snapshot.next_seq == 0 || snapshot.acked >= snapshot.next_seq {
            return Err(SnapshotError::Inconsistent("acked is not below next_seq"));
        }
        if snapshot.open_tail && !snapshot.held.is_empty() {
            return Err(SnapshotError::Inconsistent(
                "held messages with an open numbering",
            ));
        }
        if snapshot.held.len() > config.max_replay_messages {
            return Err(SnapshotError::Inconsistent(
                "more held messages than max_replay_messages",
            ));
        }
        let limits = Limits::default()
            .max_message_size(usize::MAX)
            .max_decompressed_size(usize::MAX)
            .max_headers(usize::MAX);
        let mut pending = VecDeque::with_capacity(snapshot.held.len());
        let mut bytes = 0usize;
        let mut last = snapshot.acked;
        for held in &snapshot.held {
            if held.seq <= last || held.seq >= snapshot.next_seq {
                return Err(SnapshotError::Inconsistent(
                    "held messages out of order or outside the numbering",
                ));
            }
            last = held.seq;
            let bad = |reason: String| SnapshotError::Message {
                seq: held.seq,
                reason,
            };
            let format = Format::from_subprotocol(&held.codec).ok_or_else(|| {
                bad(format!(
                    "unknown codec {:?}",
                    crate::text::truncate(&held.codec, 64)
                ))
            })?;
            let env: Envelope = format
                .codec()
                .decode(&Bytes::copy_from_slice(&held.frame), &limits)
                .map_err(|e| bad(e.to_string()))?;
            if env.seq != Some(held.seq) {
                return Err(bad("its envelope carries another sequence number".into()));
            }
            bytes = bytes.saturating_add(held.size);
            pending.push_back(Sent {
                seq: held.seq,
                item: Box::new(env),
                size: held.size,
                at: before(now, held.age),
            });
        }
        let out = ReplayBuffer {
            config: config.clone(),
            next_seq: snapshot.next_seq,
            acked: snapshot.acked,
            lost_through: snapshot.lost_through,
            pending,
            bytes,
            open_tail: snapshot.open_tail,
        };
        let inb = ReceiveWindow {
            config: config.clone(),
            received: snapshot.received,
            started: snapshot.started,
            unacked: snapshot.unacked,
            first_at: snapshot.first_unacked_age.map(|age| before(now, age)),
            ack_at: snapshot.ack_due.map(|offset| offset.at(now)),
            held: std::collections::VecDeque::new(),
            acked: snapshot.received,
        };
        let mut outcomes = Outcomes::default();
        outcomes.set_acked(snapshot.acked);
        Ok(Session {
            config,
            out,
            inb,
            link: None,
            transmitted_through: snapshot.transmitted_through,
            backlog_from: None,
            staged: VecDeque::new(),
            latest: snapshot.latest.iter().cloned().collect::<HashMap<_, _>>(),
            attached_before: snapshot.attached_before,
            // Leases order one registry's grants: the restoring one counts afresh.
            lease: 0,
            shut: snapshot.shut,
            clean_handover: snapshot.clean_handover,
            owed: snapshot.ack_owed,
            outcomes,
            changed: false,
            epoch: snapshot.epoch,
            generation: snapshot.generation,
            hold_resumed: snapshot.hold_resumed,
            resumed_open_at: None,
            resume_hold: None,
        })
    }
}
