//! Exactly-once, in-order delivery across reconnects, as pure state machines.
//!
//! [`Session`] is one side of a session (an agent's, or the hub's for one agent):
//! every rule of PROTOCOL.md section 6 (numbering, the replay buffer and its bounds,
//! cumulative acks and their timing, duplicates and gaps, resume and reset, outcomes,
//! conflation, drain handover), driven by a caller that owns the connection. It is
//! built from the two halves of each direction:
//!
//! - [`ReplayBuffer`] numbers data messages `1, 2, 3, ...`, keeps every message the peer has
//!   not acknowledged in a replay buffer bounded by count, bytes and age, drops what a
//!   cumulative `ack` covers, and after a reconnect replays what the peer reports it has
//!   not received, or says plainly that it cannot ([`ResumeError`]).
//! - [`ReceiveWindow`] delivers each sequence number once and in order, suppresses duplicates
//!   (replays of what was already delivered), and decides when an acknowledgement is due:
//!   after `ack_every` messages or `ack_delay` of quiet, whichever comes first.
//!
//! A session's whole state can be taken out as a [`SessionSnapshot`] and a session
//! rebuilt from it ([`Session::restore`]). Nothing here reads a clock: every call that
//! needs the time takes `now`.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use tunnel_proto::session::{Accept, ReceiveWindow, ReplayBuffer, SessionConfig};
//!
//! let config = SessionConfig::default();
//! let now = Instant::now();
//! let mut tx: ReplayBuffer<&str> = ReplayBuffer::new(config.clone());
//! let mut rx = ReceiveWindow::new(config);
//!
//! let one = tx.push("one", 3, now)?;
//! let two = tx.push("two", 3, now)?;
//! assert_eq!(rx.on_data(one, || now), Accept::Deliver);
//! // The connection drops before "two" arrives. On resume the receiver reports what it
//! // has, and the sender replays the rest.
//! let replay: Vec<_> = tx.resume(rx.last_received())?.map(|m| m.item).collect();
//! assert_eq!(replay, ["two"]);
//! assert_eq!(rx.on_data(two, || now), Accept::Deliver);
//! assert_eq!(rx.on_data(two, || now), Accept::Duplicate);
//! tx.on_ack(rx.take_ack())?;
//! assert!(tx.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod buffers;
mod core;
mod outcome;
mod policy;
mod snapshot;

pub use buffers::*;
pub use core::{Attach, Held, Next, Pushed, Refused, Reset, Session, Verdict};
pub use outcome::{Outcomes, REJECT_HISTORY, RESET_HISTORY};
pub use policy::{
    FullPolicy, Undelivered, WhenFull, conflation_key, error_code, held_size, is_rejection,
};
pub use snapshot::{HeldMessage, Offset, SNAPSHOT_VERSION, SessionSnapshot, SnapshotError};

#[cfg(test)]
mod tests;
