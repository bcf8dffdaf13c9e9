//! Where a hub keeps sessions beyond its own memory: snapshots of detached sessions,
//! so that a session can be resumed by a hub that does not hold it live (the same hub
//! restarted, or another hub sharing the store).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tunnel_proto::session::SessionSnapshot;
use tunnel_transport::AgentId;

/// A store operation failed (the store may be on the network). A failed `take`
/// refuses the handshake with `1013 try_again_later` (the agent comes back); a failed
/// `save` means that session can only be resumed where it is held live; a failed
/// `remove` is logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("session store: {0}")]
pub struct StoreError(pub String);

/// Snapshots of detached sessions (see
/// [`Session::snapshot`](tunnel_proto::session::Session::snapshot)), by agent and
/// session id.
///
/// A hub saves a session's snapshot when its connection ends and when the hub shuts
/// down (for the grace period: an older snapshot is never returned), takes it when an
/// agent asks to resume a session the hub does not hold live, and removes it when the
/// agent starts a new session. Every call is bounded by the handshake timeout when a
/// handshake waits for it (past it the handshake is refused with `1013`); a store that
/// hangs or fails therefore delays or refuses resumes and new sessions alike.
///
/// ```
/// use tunnel_router::{MemoryStore, SessionStore};
/// use tunnel_proto::session::{Session, SessionConfig};
/// use tunnel_transport::AgentId;
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let store = MemoryStore::new(1_000);
/// let agent = AgentId::new("root:org", "cluster-1");
/// let snapshot = Session::new(SessionConfig::default()).snapshot(std::time::Instant::now())?;
/// store.save(&agent, "s1", snapshot.clone(), std::time::Duration::from_secs(60)).await?;
/// assert_eq!(store.take(&agent, "s1").await?, Some(snapshot));
/// assert_eq!(store.take(&agent, "s1").await?, None, "taken once");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[async_trait::async_trait]
pub trait SessionStore: Send + Sync + std::fmt::Debug + 'static {
    /// Takes the snapshot of session `id` of `agent`, if one is stored: it is no
    /// longer stored afterwards (a session resumes in one place).
    async fn take(&self, agent: &AgentId, id: &str) -> Result<Option<SessionSnapshot>, StoreError>;

    /// Stores the snapshot of session `id` of `agent` for `keep_for` (the hub's grace
    /// period: a snapshot older than that is never returned), replacing an earlier
    /// one.
    async fn save(
        &self,
        agent: &AgentId,
        id: &str,
        snapshot: SessionSnapshot,
        keep_for: Duration,
    ) -> Result<(), StoreError>;

    /// Forgets session `id` of `agent`.
    async fn remove(&self, agent: &AgentId, id: &str) -> Result<(), StoreError>;

    /// A new session `id` of `agent` starts on this hub, before its grant is answered.
    /// A store that records which hub holds each session (a cluster's, where a session
    /// outlives the crash of its hub) records it here; failing refuses the handshake
    /// with `1013`. By default nothing is recorded.
    async fn open(&self, _agent: &AgentId, _id: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// Whether this hub still holds session `id` of `agent`, which it has a copy of,
    /// asked before that copy resumes: `Some(false)` when another hub took it over
    /// meanwhile (the hub then takes it from the store instead), `None` (the default)
    /// for a store that does not record holders (the copy resumes unless it was saved
    /// since).
    async fn holds(&self, _agent: &AgentId, _id: &str) -> Result<Option<bool>, StoreError> {
        Ok(None)
    }

    /// This hub dropped session `id` of `agent` (its grace ran out here). A store that
    /// records holders forgets it if this hub still holds it; by default nothing
    /// happens (a stored snapshot expires by itself, and another hub may have saved a
    /// newer one under the same id).
    async fn let_go(&self, _agent: &AgentId, _id: &str) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A [`SessionStore`] in this process's memory, shared by the hubs given it (a hub
/// restarted in the same process resumes its predecessor's sessions). Bounded: past
/// `max_sessions`, expired snapshots go, then the one saved longest ago.
#[derive(Debug)]
pub struct MemoryStore {
    max_sessions: usize,
    entries: Mutex<HashMap<(AgentId, String), Stored>>,
}

/// A snapshot, when it stops counting, and when it was saved.
type Stored = (Instant, Instant, SessionSnapshot);

impl MemoryStore {
    /// An empty store of at most `max_sessions` snapshots.
    pub fn new(max_sessions: usize) -> Self {
        MemoryStore {
            max_sessions: max_sessions.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Snapshots stored.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<(AgentId, String), Stored>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait::async_trait]
impl SessionStore for MemoryStore {
    async fn take(&self, agent: &AgentId, id: &str) -> Result<Option<SessionSnapshot>, StoreError> {
        let taken = self.entries().remove(&(agent.clone(), id.to_owned()));
        Ok(taken
            .filter(|(until, _, _)| *until >= Instant::now())
            .map(|(_, _, snapshot)| snapshot))
    }

    async fn save(
        &self,
        agent: &AgentId,
        id: &str,
        snapshot: SessionSnapshot,
        keep_for: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut entries = self.entries();
        let key = (agent.clone(), id.to_owned());
        if !entries.contains_key(&key) && entries.len() >= self.max_sessions {
            entries.retain(|_, (until, _, _)| *until >= now);
            if entries.len() >= self.max_sessions
                && let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, (_, saved, _))| *saved)
                    .map(|(k, _)| k.clone())
            {
                entries.remove(&oldest);
            }
        }
        entries.insert(key, (now + keep_for, now, snapshot));
        Ok(())
    }

    async fn remove(&self, agent: &AgentId, id: &str) -> Result<(), StoreError> {
        self.entries().remove(&(agent.clone(), id.to_owned()));
        Ok(())
    }
}
