//! Connection limits: how many connections a hub holds at once, globally and per
//! workspace.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The hub's connection limits and their current counts.
#[derive(Debug)]
pub(crate) struct Admission {
    global: Option<Arc<Semaphore>>,
    per_workspace: Option<usize>,
    workspaces: Mutex<HashMap<String, usize>>,
}

/// A connection's place within the limits; dropping it (when the connection is gone)
/// gives the place back.
#[derive(Debug, Default)]
pub(crate) struct Admitted {
    _global: Option<OwnedSemaphorePermit>,
    workspace: Option<(Arc<Admission>, String)>,
}

impl Admission {
    pub(crate) fn new(max: Option<usize>, per_workspace: Option<usize>) -> Arc<Self> {
        Arc::new(Admission {
            global: max.map(|n| Arc::new(Semaphore::new(n))),
            per_workspace,
            workspaces: Mutex::new(HashMap::new()),
        })
    }

    /// A place among all connections, or `None` when the hub is full.
    pub(crate) fn admit(&self) -> Option<Admitted> {
        let global = match &self.global {
            Some(semaphore) => Some(semaphore.clone().try_acquire_owned().ok()?),
            None => None,
        };
        Some(Admitted {
            _global: global,
            workspace: None,
        })
    }

    /// Adds a place within `workspace` to `admitted`; false when the workspace is full.
    pub(crate) fn admit_workspace(
        self: &Arc<Self>,
        admitted: &mut Admitted,
        workspace: &str,
    ) -> bool {
        let Some(max) = self.per_workspace else {
            return true;
        };
        let mut counts = self.workspaces.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(workspace.to_owned()).or_insert(0);
        if *count >= max {
            if *count == 0 {
                counts.remove(workspace);
            }
            return false;
        }
        *count += 1;
        admitted.workspace = Some((self.clone(), workspace.to_owned()));
        true
    }
}

/// Paces accepts to a rate, with one second of burst (a generic cell rate algorithm):
/// connections beyond it wait in the listen backlog, so after an outage agents come
/// back at the hub's chosen rate whatever their number.
#[derive(Debug)]
pub(crate) struct AcceptPace {
    interval: Duration,
    burst: Duration,
    /// When the next accept would be due if none had been saved up.
    due: Instant,
}

impl AcceptPace {
    /// `None` unless `per_second` is a positive, finite rate.
    pub(crate) fn new(per_second: Option<f64>, now: Instant) -> Option<AcceptPace> {
        let rate = per_second.filter(|r| r.is_finite() && *r > 0.0)?;
        Some(AcceptPace {
            interval: Duration::from_secs_f64(1.0 / rate.max(1e-3)),
            burst: Duration::from_secs(1),
            due: now,
        })
    }

    /// When the next connection may be accepted (`now` or later).
    pub(crate) fn next_at(&self, now: Instant) -> Instant {
        // One second's worth may be saved up: `burst / interval` accepts at once.
        (self.due + self.interval)
            .checked_sub(self.burst)
            .map_or(now, |earliest| earliest.max(now))
    }

    /// Records an accept at `now`.
    pub(crate) fn accepted(&mut self, now: Instant) {
        self.due = self.due.max(now) + self.interval;
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some((admission, workspace)) = self.workspace.take() {
            let mut counts = admission
                .workspaces
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(count) = counts.get_mut(&workspace) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&workspace);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_are_paced_after_a_one_second_burst() {
        let t0 = Instant::now();
        assert!(AcceptPace::new(None, t0).is_none());
        assert!(AcceptPace::new(Some(0.0), t0).is_none());
        assert!(AcceptPace::new(Some(f64::NAN), t0).is_none());
        let mut pace = AcceptPace::new(Some(10.0), t0).expect("a rate");
        // A burst of one second's worth goes through at once...
        for _ in 0..10 {
            assert_eq!(pace.next_at(t0), t0);
            pace.accepted(t0);
        }
        // ...then one every 100 ms.
        let next = pace.next_at(t0);
        assert_eq!(next, t0 + Duration::from_millis(100));
        pace.accepted(next);
        assert_eq!(pace.next_at(next), t0 + Duration::from_millis(200));
        // Idle time saves up at most one second of burst again.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..10 {
            assert_eq!(pace.next_at(later), later);
            pace.accepted(later);
        }
        assert!(pace.next_at(later) > later);
    }

    #[test]
    fn places_are_bounded_and_given_back() {
        let admission = Admission::new(Some(2), Some(1));
        let mut a = admission.admit().expect("room");
        let mut b = admission.admit().expect("room");
        assert!(admission.admit().is_none(), "global limit");
        assert!(admission.admit_workspace(&mut a, "ws1"));
        assert!(
            !admission.admit_workspace(&mut b, "ws1"),
            "per-workspace limit"
        );
        assert!(admission.admit_workspace(&mut b, "ws2"));
        drop(a);
        let mut c = admission.admit().expect("a place was given back");
        assert!(
            admission.admit_workspace(&mut c, "ws1"),
            "and its workspace place"
        );
        drop((b, c));
        assert!(
            admission.workspaces.lock().unwrap().is_empty(),
            "no counts left behind"
        );
    }
}
