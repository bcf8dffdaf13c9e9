//! Connection limits: how many authenticated connections a hub holds at once, globally
//! and per workspace; how many connections may be in their upgrade or handshake
//! ([`Handshakes`]); and how fast authenticated connections are taken in ([`AcceptPace`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
    /// One token per connection, one second's worth saved up at most.
    bucket: crate::rate::TokenBucket,
}

impl AcceptPace {
    /// `None` unless `per_second` is a positive, finite rate.
    pub(crate) fn new(per_second: Option<f64>, now: Instant) -> Option<AcceptPace> {
        let rate = per_second.filter(|r| r.is_finite() && *r > 0.0)?;
        Some(AcceptPace {
            bucket: crate::rate::TokenBucket::new(rate.max(1e-3), Duration::from_secs(1), now),
        })
    }

    /// When the next connection may be accepted (`now` or later).
    pub(crate) fn next_at(&mut self, now: Instant) -> Instant {
        self.bucket.available_at(1.0, now)
    }

    /// Records an accept at `now`.
    pub(crate) fn accepted(&mut self, now: Instant) {
        self.bucket.spend(1.0, now);
    }
}

/// Connections still in their TLS handshake, HTTP upgrade or protocol handshake, bounded
/// in count (each is also bounded in time by the handshake deadline).
///
/// At the bound, a new connection evicts the oldest one that has not authenticated yet
/// (it is abandoned, its socket closed): silent or slow unauthenticated sockets can
/// never keep an agent that presents a valid token out. Only when every connection in
/// progress has authenticated does the accept loop wait for one of them to finish.
#[derive(Debug)]
pub(crate) struct Handshakes {
    max: usize,
    state: Mutex<InProgress>,
    room: Notify,
}

#[derive(Debug, Default)]
struct InProgress {
    next: u64,
    /// By accept order: whether it authenticated, and how to abandon it.
    entries: BTreeMap<u64, (bool, CancellationToken)>,
}

/// One connection's place among those in progress; dropping it gives the place back.
#[derive(Debug)]
pub(crate) struct HandshakeSlot {
    handshakes: Arc<Handshakes>,
    key: u64,
    /// Cancelled when the connection is evicted to make room (or the listener stops).
    pub(crate) evicted: CancellationToken,
}

impl Handshakes {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Handshakes {
            max: max.max(1),
            state: Mutex::new(InProgress::default()),
            room: Notify::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, InProgress> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until a new connection can be taken in: below the bound, or with an
    /// unauthenticated connection to evict.
    pub(crate) async fn room(&self) {
        loop {
            let notified = self.room.notified();
            {
                let st = self.state();
                if st.entries.len() < self.max || st.entries.values().any(|(auth, _)| !auth) {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Registers a just-accepted connection, evicting the oldest unauthenticated one
    /// if the bound is reached. Returns the slot and whether one was evicted, or
    /// `None` when the bound is reached and every connection in progress has
    /// authenticated since [`Handshakes::room`] said there was room.
    /// The slot's token is a child of `stop`: it is cancelled with it too.
    pub(crate) fn register(
        self: &Arc<Self>,
        stop: &CancellationToken,
    ) -> Option<(HandshakeSlot, bool)> {
        let mut st = self.state();
        let mut evicted = false;
        if st.entries.len() >= self.max {
            let key = st
                .entries
                .iter()
                .find(|(_, (auth, _))| !auth)
                .map(|(key, _)| *key)?;
            if let Some((_, cancel)) = st.entries.remove(&key) {
                cancel.cancel();
                evicted = true;
            }
        }
        let key = st.next;
        st.next += 1;
        let token = stop.child_token();
        st.entries.insert(key, (false, token.clone()));
        Some((
            HandshakeSlot {
                handshakes: self.clone(),
                key,
                evicted: token,
            },
            evicted,
        ))
    }

    /// Connections in progress now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.state().entries.len()
    }
}

impl HandshakeSlot {
    /// The connection presented valid credentials: it is no longer evictable.
    pub(crate) fn authenticated(&self) {
        if let Some(entry) = self.handshakes.state().entries.get_mut(&self.key) {
            entry.0 = true;
        }
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.handshakes.state().entries.remove(&self.key);
        self.handshakes.room.notify_waiters();
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

    #[tokio::test]
    async fn handshakes_evict_the_oldest_unauthenticated_and_wait_only_for_authenticated() {
        let handshakes = Handshakes::new(2);
        let (a, evicted) = handshakes
            .register(&CancellationToken::new())
            .expect("room");
        assert!(!evicted);
        let (b, _) = handshakes
            .register(&CancellationToken::new())
            .expect("room");
        // Full, but a and b are evictable: room at once, and a (the oldest) goes.
        handshakes.room().await;
        let (c, evicted) = handshakes
            .register(&CancellationToken::new())
            .expect("room");
        assert!(evicted && a.evicted.is_cancelled() && !b.evicted.is_cancelled());
        drop(a);
        assert_eq!(handshakes.len(), 2);
        // An authenticated connection is never evicted: b goes next, not c.
        c.authenticated();
        let (d, _) = handshakes
            .register(&CancellationToken::new())
            .expect("room");
        assert!(b.evicted.is_cancelled() && !c.evicted.is_cancelled());
        drop(b);
        d.authenticated();
        // Everyone in progress has authenticated: wait for one to finish.
        let wait = tokio::time::timeout(Duration::from_millis(20), handshakes.room()).await;
        assert!(wait.is_err(), "no room while all are authenticated");
        drop(c);
        tokio::time::timeout(Duration::from_secs(1), handshakes.room())
            .await
            .expect("room once one finished");
        drop(d);
        assert_eq!(handshakes.len(), 0);
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
