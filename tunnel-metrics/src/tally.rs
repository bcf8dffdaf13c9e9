//! Per-connection message counts, kept without read-modify-write on the hot path.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use tunnel_proto::MessageType;

use crate::Direction;

/// The message types a [`MessageTally`] counts separately, in slot order.
pub const KNOWN_TYPES: [&str; 12] = [
    "handshake",
    "handshake_ack",
    "ping",
    "pong",
    "close",
    "resource",
    "status",
    "event",
    "command",
    "reply",
    "ack",
    "window",
];

/// Where a message type is counted in a [`MessageTally`]: one of [`KNOWN_TYPES`], or
/// one shared slot for every type this version does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TypeSlot(u8);

impl TypeSlot {
    /// The slot shared by types outside [`KNOWN_TYPES`].
    pub const OTHER: TypeSlot = TypeSlot(KNOWN_TYPES.len() as u8);

    /// The slot of `kind`: a match, not string comparisons (it runs for every message).
    pub fn of(kind: &MessageType) -> TypeSlot {
        TypeSlot(match kind {
            MessageType::Handshake => 0,
            MessageType::HandshakeAck => 1,
            MessageType::Ping => 2,
            MessageType::Pong => 3,
            MessageType::Close => 4,
            MessageType::Resource => 5,
            MessageType::Status => 6,
            MessageType::Event => 7,
            MessageType::Command => 8,
            MessageType::Reply => 9,
            MessageType::Ack => 10,
            MessageType::Window => 11,
            _ => return TypeSlot::OTHER,
        })
    }

    /// The index of a known type in [`KNOWN_TYPES`], `None` for [`TypeSlot::OTHER`].
    pub fn index(self) -> Option<usize> {
        let i = usize::from(self.0);
        (i < KNOWN_TYPES.len()).then_some(i)
    }

    /// The type's wire name, `None` for [`TypeSlot::OTHER`].
    pub fn name(self) -> Option<&'static str> {
        self.index().map(|i| KNOWN_TYPES[i])
    }
}

const SLOTS: usize = KNOWN_TYPES.len() + 1;

#[derive(Default)]
struct Cell {
    messages: AtomicU64,
    bytes: AtomicU64,
}

/// Messages and encoded bytes one connection carried, by direction and [`TypeSlot`].
///
/// A transport keeps one per connection and updates it for every message; readers
/// (a status endpoint, a metrics collection) load the counts whenever they like. The
/// usual writer is single per direction (the connection's reader task counts what
/// comes in, its writer task what goes out) and uses [`MessageTally::record`], a plain
/// load and store; [`MessageTally::add`] is for several concurrent writers. It takes
/// about 400 bytes.
///
/// ```
/// use tunnel_metrics::{Direction, MessageTally, TypeSlot};
/// use tunnel_proto::MessageType;
///
/// let tally = MessageTally::new();
/// tally.record(Direction::Inbound, TypeSlot::of(&MessageType::Event), 200);
/// tally.record(Direction::Inbound, TypeSlot::of(&MessageType::Event), 100);
/// assert_eq!(tally.get(Direction::Inbound, TypeSlot::of(&MessageType::Event)), (2, 300));
/// assert_eq!(tally.totals(Direction::Outbound), (0, 0));
/// ```
pub struct MessageTally {
    cells: [[Cell; SLOTS]; 2],
}

impl Default for MessageTally {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MessageTally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageTally")
            .field("inbound", &self.totals(Direction::Inbound))
            .field("outbound", &self.totals(Direction::Outbound))
            .finish()
    }
}

fn direction_index(direction: Direction) -> usize {
    match direction {
        Direction::Inbound => 0,
        Direction::Outbound => 1,
    }
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

impl MessageTally {
    /// All counts zero.
    pub fn new() -> Self {
        MessageTally {
            cells: Default::default(),
        }
    }

    fn cell(&self, direction: Direction, slot: TypeSlot) -> &Cell {
        &self.cells[direction_index(direction)][usize::from(slot.0)]
    }

    /// Counts one message of `bytes` going `direction`, for a **single writer** per
    /// direction: a plain load and store, no read-modify-write. Two tasks calling it
    /// for the same direction at once may lose counts (never tear them); use
    /// [`MessageTally::add`] there.
    pub fn record(&self, direction: Direction, slot: TypeSlot, bytes: usize) {
        let cell = self.cell(direction, slot);
        bump(&cell.messages, 1);
        bump(&cell.bytes, bytes as u64);
    }

    /// Counts one message of `bytes` going `direction`, safe for concurrent writers.
    pub fn add(&self, direction: Direction, slot: TypeSlot, bytes: usize) {
        let cell = self.cell(direction, slot);
        cell.messages.fetch_add(1, Ordering::Relaxed);
        cell.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// (messages, bytes) of one type going `direction`.
    pub fn get(&self, direction: Direction, slot: TypeSlot) -> (u64, u64) {
        let cell = self.cell(direction, slot);
        (
            cell.messages.load(Ordering::Relaxed),
            cell.bytes.load(Ordering::Relaxed),
        )
    }

    /// (messages, bytes) of every type going `direction`.
    pub fn totals(&self, direction: Direction) -> (u64, u64) {
        self.cells[direction_index(direction)]
            .iter()
            .fold((0u64, 0u64), |(m, b), cell| {
                (
                    m.wrapping_add(cell.messages.load(Ordering::Relaxed)),
                    b.wrapping_add(cell.bytes.load(Ordering::Relaxed)),
                )
            })
    }

    /// Every (direction, slot, messages, bytes) whose count is not zero.
    pub fn nonzero(&self) -> impl Iterator<Item = (Direction, TypeSlot, u64, u64)> + '_ {
        [Direction::Inbound, Direction::Outbound]
            .into_iter()
            .flat_map(move |direction| {
                (0..SLOTS).filter_map(move |i| {
                    let slot = TypeSlot(i as u8);
                    let (messages, bytes) = self.get(direction, slot);
                    (messages != 0).then_some((direction, slot, messages, bytes))
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_known_type_names() {
        for (i, name) in KNOWN_TYPES.iter().enumerate() {
            let kind = MessageType::from_wire(name);
            assert_eq!(TypeSlot::of(&kind).index(), Some(i), "{name}");
            assert_eq!(TypeSlot::of(&kind).name(), Some(*name));
            assert_eq!(kind.static_name(), Some(*name));
        }
        let custom = TypeSlot::of(&MessageType::from_wire("custom"));
        assert_eq!(custom, TypeSlot::OTHER);
        assert_eq!(custom.name(), None);
    }

    #[test]
    fn counts_per_direction_and_type_and_sums_them() {
        let tally = MessageTally::new();
        let event = TypeSlot::of(&MessageType::Event);
        tally.record(Direction::Inbound, event, 10);
        tally.add(Direction::Inbound, TypeSlot::OTHER, 5);
        tally.record(Direction::Outbound, event, 7);
        assert_eq!(tally.get(Direction::Inbound, event), (1, 10));
        assert_eq!(tally.totals(Direction::Inbound), (2, 15));
        assert_eq!(tally.totals(Direction::Outbound), (1, 7));
        let mut seen: Vec<_> = tally.nonzero().collect();
        seen.sort_by_key(|(d, s, ..)| (direction_index(*d), s.0));
        assert_eq!(
            seen,
            vec![
                (Direction::Inbound, event, 1, 10),
                (Direction::Inbound, TypeSlot::OTHER, 1, 5),
                (Direction::Outbound, event, 1, 7),
            ]
        );
    }

    #[test]
    fn concurrent_adds_are_not_lost() {
        let tally = std::sync::Arc::new(MessageTally::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let tally = tally.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        tally.add(Direction::Outbound, TypeSlot::OTHER, 2);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(tally.totals(Direction::Outbound), (4000, 8000));
    }
}
