//! Ids and the wall clock of envelopes: process-wide message and connection ids, and
//! [`unix_millis`], a cheap reading of the system clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// Ids handed to a thread at a time by [`next_message_id`].
const ID_BLOCK: u64 = 4096;

/// A fresh message id, unique within the process: every envelope a sender sends, on
/// any connection and whatever made it (data, replies, pongs, acks), has its own id,
/// so ids stay unique within a connection even when a session replays messages first
/// sent on an earlier one (PROTOCOL.md, section 2). Ids start at 1; each thread takes
/// them from the shared counter in blocks, so they are not dense or in order across
/// threads, and taking one costs no shared write.
pub fn next_message_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static BLOCK: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
    }
    BLOCK.with(|block| {
        let (mut next, mut end) = block.get();
        if next == end {
            next = NEXT.fetch_add(ID_BLOCK, Ordering::Relaxed);
            end = next + ID_BLOCK;
        }
        block.set((next + 1, end));
        next
    })
}

pub(crate) fn next_connection_id() -> u64 {
    NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed)
}

/// Milliseconds since the Unix epoch, for envelope timestamps.
///
/// Every message reads it, and the system clock costs about 30 ns here: this reads the
/// CPU's time stamp counter (quanta, about 9 ns) and adds an offset to the system clock,
/// taken again every second, so it follows clock adjustments within a second.
pub fn unix_millis() -> u64 {
    let clock = wall_clock();
    clock.millis(
        || u64::try_from(clock.base.elapsed().as_millis()).unwrap_or(u64::MAX),
        system_millis,
    )
}

/// The clock behind [`unix_millis`], set up on first use. quanta calibrates the time
/// stamp counter then (up to 200 ms, once per process): the connector and the listener
/// read `unix_millis` once when they are made, so no message waits for it.
fn wall_clock() -> &'static WallClock {
    static CLOCK: std::sync::OnceLock<WallClock> = std::sync::OnceLock::new();
    CLOCK.get_or_init(|| WallClock::new(quanta::Instant::now(), system_millis()))
}

fn system_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// How often [`unix_millis`] reads the system clock again, in milliseconds.
const RECALIBRATE_MS: u64 = 1_000;

/// Longest a calibration may take between its two readings of the monotonic clock, in
/// milliseconds; a slower one (the thread was preempted) is dropped and tried again.
const CALIBRATION_SLACK_MS: u64 = 2;

/// The system clock as an offset to a monotonic base.
struct WallClock {
    base: quanta::Instant,
    /// System clock minus the time elapsed since `base`, at the last calibration.
    offset: AtomicU64,
    /// Milliseconds after `base` of the last calibration.
    calibrated: AtomicU64,
}

impl WallClock {
    fn new(base: quanta::Instant, system_ms: u64) -> Self {
        WallClock {
            base,
            offset: AtomicU64::new(system_ms),
            calibrated: AtomicU64::new(0),
        }
    }

    /// The wall clock now: `elapsed` reads the milliseconds since `base`, `system` the
    /// system clock, which is read only when a calibration is due. One thread calibrates
    /// (it wins the exchange on `calibrated`), between two readings of `elapsed` that
    /// must lie within [`CALIBRATION_SLACK_MS`] of each other, so a thread preempted in
    /// the middle does not shift everyone's timestamps by its delay.
    fn millis(&self, elapsed: impl Fn() -> u64, system: impl FnOnce() -> u64) -> u64 {
        let now = elapsed();
        let last = self.calibrated.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= RECALIBRATE_MS
            && self
                .calibrated
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let system_ms = system();
            let after = elapsed();
            if after.saturating_sub(now) <= CALIBRATION_SLACK_MS {
                let at = now + (after - now) / 2;
                self.offset
                    .store(system_ms.saturating_sub(at), Ordering::Relaxed);
                return system_ms.saturating_add(after - at);
            }
            // Too slow to trust: the next call tries again.
            self.calibrated.store(last, Ordering::Relaxed);
        }
        self.offset.load(Ordering::Relaxed).saturating_add(now)
    }
}

#[cfg(test)]
mod wall_clock_tests {
    use super::*;

    /// Readings of the monotonic clock, one per call.
    fn readings(values: &[u64]) -> impl Fn() -> u64 + '_ {
        let next = std::cell::Cell::new(0);
        move || {
            let i = next.get();
            next.set(i + 1);
            values[i.min(values.len() - 1)]
        }
    }

    #[test]
    fn follows_the_system_clock_and_takes_it_again_every_second() {
        let clock = WallClock::new(quanta::Instant::now(), 1_000_000);
        let unread = || -> u64 { panic!("the system clock is read only once a second") };
        assert_eq!(clock.millis(|| 0, unread), 1_000_000);
        assert_eq!(clock.millis(|| 999, unread), 1_000_999);
        // The system clock was stepped by an hour: followed at the next calibration.
        assert_eq!(
            clock.millis(readings(&[1_000, 1_000]), || 1_001_000 + 3_600_000),
            4_601_000
        );
        assert_eq!(clock.millis(|| 1_500, unread), 4_601_500);
        // And back.
        assert_eq!(
            clock.millis(readings(&[2_500, 2_500]), || 1_002_500),
            1_002_500
        );
    }

    #[test]
    fn a_calibration_interrupted_for_long_is_dropped_and_tried_again() {
        let clock = WallClock::new(quanta::Instant::now(), 1_000_000);
        // Preempted for 50 ms between its readings: the offset stays as it was.
        assert_eq!(
            clock.millis(readings(&[1_000, 1_050]), || 1_001_000 + 7),
            1_001_000
        );
        assert_eq!(
            clock.millis(|| 1_100, || 1_001_100 + 7),
            1_001_107,
            "tried again"
        );
        let unread = || -> u64 { panic!("calibrated a moment ago") };
        assert_eq!(clock.millis(|| 1_200, unread), 1_001_207);
    }

    #[test]
    fn unix_millis_is_close_to_the_system_clock() {
        for _ in 0..3 {
            let before = system_millis();
            let ours = unix_millis();
            let after = system_millis();
            // Within the calibration interval, whatever the TSC's drift.
            assert!(
                ours + RECALIBRATE_MS >= before && ours <= after + RECALIBRATE_MS,
                "{before} <= {ours} <= {after}, give or take {RECALIBRATE_MS} ms"
            );
        }
    }
}
