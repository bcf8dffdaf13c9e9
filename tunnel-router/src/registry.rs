//! The hub's session registry: sessions outlive connections for a grace period, so an
//! agent that reconnects in time resumes where it left off.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tunnel_metrics::Recorder;
use tunnel_proto::session::Session;
use tunnel_proto::session::SessionConfig;
use tunnel_transport::{AgentId, GrantError, Resume, SessionGrant, SessionGrants, new_session_id};

use crate::delivery::{FullPolicy, Reliable, Undelivered};
use crate::store::SessionStore;

/// Session resume on a hub: how long a disconnected agent's session is kept, how many,
/// what a full buffer does, and where snapshots are stored.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tunnel_router::{HubConfig, HubSessions, MemoryStore, SessionRegistry};
///
/// let sessions = HubSessions::default()
///     .grace(Duration::from_secs(300)) // agents away up to 5 min resume
///     .max_sessions(20_000)
///     .store(Arc::new(MemoryStore::new(20_000))); // a hub restarted on it resumes them
/// let config = HubConfig::default().sessions(SessionRegistry::new(sessions));
/// assert!(config.sessions.is_some());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HubSessions {
    /// Bounds and ack timing of each session.
    pub session: SessionConfig,
    /// How long a disconnected agent's session is kept for it to resume. A resume after
    /// that gets a reset. Default 60 s.
    pub grace: Duration,
    /// What `send` does when an agent's replay buffer is full, per message type.
    pub when_full: FullPolicy,
    /// Most sessions held, connected or in their grace period. A new session past it
    /// ends the one disconnected longest (its agent will be reset); connected
    /// sessions are bounded by the listener's connection limit. Default 32,768.
    pub max_sessions: usize,
    /// Where detached sessions are also kept, as snapshots, for a hub that does not
    /// hold them live (this one restarted, or another sharing the store) to resume
    /// them. Default: none, sessions live only in this hub's memory.
    pub store: Option<Arc<dyn SessionStore>>,
}

impl Default for HubSessions {
    fn default() -> Self {
        HubSessions {
            session: SessionConfig::default(),
            grace: Duration::from_secs(60),
            when_full: FullPolicy::default(),
            max_sessions: 32_768,
            store: None,
        }
    }
}

impl HubSessions {
    /// Sets [`HubSessions::session`].
    pub fn session(mut self, session: SessionConfig) -> Self {
        self.session = session;
        self
    }

    /// Sets [`HubSessions::when_full`].
    pub fn when_full(mut self, when_full: FullPolicy) -> Self {
        self.when_full = when_full;
        self
    }

    /// Sets [`HubSessions::max_sessions`].
    pub fn max_sessions(mut self, max: usize) -> Self {
        self.max_sessions = max.max(1);
        self
    }

    /// Sets [`HubSessions::store`].
    pub fn store(mut self, store: Arc<dyn SessionStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Sets [`HubSessions::grace`].
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }
}

/// A session dropped at the end of its grace period: its agent, id and driver.
type Expired = (AgentId, String, Arc<Reliable>);

#[derive(Debug)]
struct Entry {
    agent: AgentId,
    reliable: Arc<Reliable>,
    /// When its last connection ended, or it was granted to a connection that has not
    /// attached yet (None while a connection carries it).
    detached_at: Option<Instant>,
    /// Saved to the store since it last resumed here: whether this copy is still the
    /// session is then the store's to say (another hub may have taken it).
    saved: bool,
    /// Reset while its agent resumed it: not resumable; the agent's next (new)
    /// session takes it over, with what it carried.
    restart: bool,
}

#[derive(Debug, Default)]
struct Maps {
    sessions: HashMap<String, Entry>,
    by_agent: HashMap<AgentId, String>,
    /// The last lease granted (see [`SessionGrant::lease`]).
    leases: u64,
}

/// A hub's sessions, connected or within their grace period: the registry the
/// transport's handshakes consult ([`SessionRegistry::hook`]) to resume a session or
/// start one, and the hub serves them from. Give the same registry to the acceptor's
/// [`ServerConfig::sessions`](tunnel_transport::ServerConfig::sessions) and to
/// [`HubConfig::sessions`](crate::HubConfig::sessions).
#[derive(Debug, Clone)]
pub struct SessionRegistry {
    store: Arc<Store>,
}

impl SessionRegistry {
    /// An empty registry with these settings.
    pub fn new(config: HubSessions) -> Self {
        SessionRegistry {
            store: Store::new(config, Arc::new(tunnel_metrics::NoopRecorder)),
        }
    }

    /// The hook for the transport's handshakes.
    pub fn hook(&self) -> Arc<dyn SessionGrants> {
        self.store.clone()
    }

    /// Where session metrics go (the hub sets its own).
    pub(crate) fn set_recorder(&mut self, recorder: Arc<dyn Recorder>) {
        *self
            .store
            .recorder
            .write()
            .unwrap_or_else(|e| e.into_inner()) = recorder;
    }

    pub(crate) fn store(self) -> Arc<Store> {
        self.store
    }
}

/// Sessions by id, and each agent's current session.
#[derive(Debug)]
pub(crate) struct Store {
    config: HubSessions,
    maps: Mutex<Maps>,
    recorder: std::sync::RwLock<Arc<dyn Recorder>>,
}

impl Store {
    pub(crate) fn new(config: HubSessions, recorder: Arc<dyn Recorder>) -> Arc<Self> {
        Arc::new(Store {
            config,
            maps: Mutex::new(Maps::default()),
            recorder: std::sync::RwLock::new(recorder),
        })
    }

    /// Where session resets are recorded.
    pub(crate) fn recorder(&self) -> Arc<dyn Recorder> {
        self.recorder
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session `id`'s state.
    pub(crate) fn get(&self, id: &str) -> Option<Arc<Reliable>> {
        self.maps().sessions.get(id).map(|e| e.reliable.clone())
    }

    /// The current session of `agent`, connected or within its grace period.
    pub(crate) fn of_agent(&self, agent: &AgentId) -> Option<Arc<Reliable>> {
        self.session_of(agent).map(|(_, reliable)| reliable)
    }

    /// The agent's session here: its id and driver.
    pub(crate) fn session_of(&self, agent: &AgentId) -> Option<(String, Arc<Reliable>)> {
        let maps = self.maps();
        let id = maps.by_agent.get(agent)?;
        maps.sessions
            .get(id)
            .map(|e| (id.clone(), e.reliable.clone()))
    }

    /// Marks session `id` connected (`true`) or disconnected from now on.
    pub(crate) fn set_connected(&self, id: &str, connected: bool) {
        if let Some(entry) = self.maps().sessions.get_mut(id) {
            entry.detached_at = (!connected).then(Instant::now);
        }
    }

    /// Expires old messages, and drops sessions disconnected for longer than the grace
    /// period (their unacknowledged messages fail with a reset).
    pub(crate) async fn sweep(&self) {
        let (all, gone): (Vec<Arc<Reliable>>, Vec<Expired>) = {
            let mut maps = self.maps();
            let grace = self.config.grace;
            let stale: Vec<String> = maps
                .sessions
                .iter()
                .filter(|(_, e)| e.detached_at.is_some_and(|at| at.elapsed() > grace))
                .map(|(id, _)| id.clone())
                .collect();
            let mut gone = Vec::new();
            for id in stale {
                if let Some(entry) = maps.sessions.remove(&id) {
                    if maps.by_agent.get(&entry.agent) == Some(&id) {
                        maps.by_agent.remove(&entry.agent);
                    }
                    gone.push((entry.agent, id, entry.reliable));
                }
            }
            (
                maps.sessions.values().map(|e| e.reliable.clone()).collect(),
                gone,
            )
        };
        // A stored copy expires by itself (it was saved for the grace period), and
        // another hub may hold a newer one under the same id: it is left alone, but a
        // store that records holders forgets what this hub held.
        for (agent, id, reliable) in gone {
            if let Some(store) = &self.config.store
                && let Err(error) = store.let_go(&agent, &id).await
            {
                tracing::warn!(%agent, %error, "could not let go of an expired session in the store");
            }
            self.recorder().session_reset();
            reliable.shut_down(Undelivered::Reset(
                "the agent did not come back within the grace period".into(),
            ));
        }
        for reliable in all {
            reliable.expire();
        }
    }

    /// Ends every session (hub shutdown). With a store, each is saved once its
    /// connection has stopped delivering, so that a hub sharing the store (this one,
    /// restarted) resumes it.
    pub(crate) async fn close_all(&self) {
        let all: Vec<(String, Entry)> = {
            let mut maps = self.maps();
            maps.by_agent.clear();
            maps.sessions.drain().collect()
        };
        for (id, entry) in all {
            if self.config.store.is_some() {
                // Detached sessions were saved when their connection ended (and may
                // have moved on since); a connection still attached once no reader
                // delivers has not saved yet.
                let _reading = entry.reliable.reader.lock().await;
                if entry.reliable.is_attached() {
                    self.save(&entry.agent, &id, &entry.reliable).await;
                }
            }
            entry.reliable.shut_down(Undelivered::ShutDown);
        }
    }

    /// A connection of session `id` ended and no other carries it: it is
    /// disconnected from now on, and saved to the store, if any.
    pub(crate) async fn detached(&self, agent: &AgentId, id: &str, reliable: &Reliable) {
        self.set_connected(id, false);
        if self.config.store.is_none() {
            return;
        }
        // Marked before saving: a resume arriving meanwhile asks the store first, so
        // this copy never resumes live while an older snapshot of it is stored.
        self.mark_saved(id, true);
        if !self.save(agent, id, reliable).await {
            self.mark_saved(id, false);
        }
    }

    /// Session `id` was reset while its agent resumed it (see `Attach::Restart`).
    pub(crate) fn restart(&self, id: &str) {
        if let Some(entry) = self.maps().sessions.get_mut(id) {
            entry.restart = true;
        }
    }

    fn mark_saved(&self, id: &str, saved: bool) {
        if let Some(entry) = self.maps().sessions.get_mut(id) {
            entry.saved = saved;
        }
    }

    /// Saves the session to the store, if any; returns whether it was saved.
    async fn save(&self, agent: &AgentId, id: &str, reliable: &Reliable) -> bool {
        let Some(store) = &self.config.store else {
            return false;
        };
        let saved = match reliable.snapshot() {
            None => return false,
            Some(Ok(snapshot)) => {
                let generation = snapshot.generation;
                match store.save(agent, id, snapshot, self.config.grace).await {
                    Ok(()) => {
                        reliable.set_generation(generation);
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            Some(Err(e)) => Err(e.to_string()),
        };
        if let Err(error) = &saved {
            tracing::warn!(%agent, %error, "could not save the session: it resumes only on this hub");
        }
        saved.is_ok()
    }

    /// Removes session `id` from the store, if any.
    async fn forget(&self, agent: &AgentId, id: &str) {
        if let Some(store) = &self.config.store
            && let Err(error) = store.remove(agent, id).await
        {
            tracing::warn!(%agent, %error, "could not remove a session from the store");
        }
    }

    /// What `send` does when a replay buffer is full.
    pub(crate) fn when_full(&self) -> &FullPolicy {
        &self.config.when_full
    }

    /// Sessions held (connected or in their grace period).
    pub(crate) fn len(&self) -> usize {
        self.maps().sessions.len()
    }
}

/// What a registry holds live of a session an agent asks to resume.
enum Live {
    /// Resumed.
    Granted(SessionGrant),
    /// A copy whose snapshot was saved, of this generation: the store says whether it
    /// is still the session.
    Saved(u64),
    /// Nothing that can continue.
    None,
}

impl Store {
    /// The live session the agent asks to resume, if this hub holds it and it may
    /// continue (a peer claiming more than was sent talks about state this hub does
    /// not have: that is a reset).
    ///
    /// A copy saved to the store is resumed only once the store confirms it
    /// (`confirmed`): [`Live::Saved`] asks for that first.
    fn grant_live(&self, agent: &AgentId, resume: &Resume, confirmed: bool) -> Live {
        let mut maps = self.maps();
        maps.leases += 1;
        let lease = maps.leases;
        let Some(entry) = maps.sessions.get_mut(&resume.session_id) else {
            return Live::None;
        };
        if entry.agent != *agent
            || entry.restart
            || !entry.reliable.may_resume(resume.last_received)
        {
            return Live::None;
        }
        if entry.saved && !confirmed {
            return Live::Saved(entry.reliable.generation());
        }
        entry.saved = false;
        // Counted as connected once the connection attaches: a grant whose
        // connection never gets that far still ends after the grace period.
        entry.detached_at = Some(Instant::now());
        entry.reliable.supersede(lease);
        Live::Granted(
            SessionGrant::resumed(resume.session_id.clone(), entry.reliable.last_received())
                .with_lease(lease),
        )
    }

    /// Whether this hub has a copy of session `id` of `agent`.
    fn has_copy(&self, agent: &AgentId, id: &str) -> bool {
        self.maps()
            .sessions
            .get(id)
            .is_some_and(|entry| entry.agent == *agent)
    }

    /// Takes the stored snapshot of the session the agent asks to resume.
    async fn take(
        &self,
        agent: &AgentId,
        resume: &Resume,
    ) -> Result<Option<tunnel_proto::session::SessionSnapshot>, GrantError> {
        let Some(store) = &self.config.store else {
            return Ok(None);
        };
        store
            .take(agent, &resume.session_id)
            .await
            .map_err(|e| GrantError(e.to_string()))
    }

    /// `snapshot` restored, if the agent may resume it.
    fn restore(
        &self,
        agent: &AgentId,
        resume: &Resume,
        snapshot: Option<tunnel_proto::session::SessionSnapshot>,
    ) -> Option<Session> {
        let snapshot = snapshot?;
        let now = Instant::now().into_std();
        match Session::restore(self.config.session.clone(), &snapshot, now) {
            Ok(session) if session.may_resume(resume.last_received) => Some(session),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(%agent, error = %e, "a stored session could not be restored");
                None
            }
        }
    }

    /// Registers `session` (restored, resumed under `resume`'s id) or a new session
    /// for `agent`, ending the agent's earlier session here and, past the bound, the
    /// one disconnected longest.
    fn register(
        &self,
        agent: &AgentId,
        restored: Option<(Session, &Resume)>,
        fresh_id: String,
    ) -> (SessionGrant, Vec<(AgentId, String)>) {
        let mut maps = self.maps();
        maps.leases += 1;
        let lease = maps.leases;
        let mut forgotten = Vec::new();
        let (id, reliable, grant) = match restored {
            Some((session, resume)) => {
                let reliable = Reliable::from_session(session, self.recorder());
                let grant =
                    SessionGrant::resumed(resume.session_id.clone(), reliable.last_received());
                (resume.session_id.clone(), reliable, grant)
            }
            None => {
                let id = fresh_id;
                // A session reset while its agent resumed it goes on as the new one.
                let restarted = maps
                    .by_agent
                    .get(agent)
                    .filter(|old| maps.sessions.get(*old).is_some_and(|e| e.restart))
                    .cloned()
                    .and_then(|old| maps.sessions.remove(&old).map(|e| (old, e)));
                let reliable = match restarted {
                    Some((old, entry)) => {
                        // It goes on under the new id: the old one names nothing.
                        forgotten.push((agent.clone(), old));
                        entry.reliable
                    }
                    None => Reliable::new(self.config.session.clone(), self.recorder()),
                };
                (id.clone(), reliable, SessionGrant::fresh(id))
            }
        };
        if let Some(old_id) = maps.by_agent.insert(agent.clone(), id.clone())
            && old_id != id
            && let Some(old) = maps.sessions.remove(&old_id)
        {
            // The agent started over: its old session's undelivered messages fail.
            forgotten.push((agent.clone(), old_id));
            tokio::spawn(async move {
                old.reliable
                    .shut_down(Undelivered::Reset("the agent started a new session".into()));
            });
        }
        if maps.sessions.len() >= self.config.max_sessions
            && let Some(oldest) = maps
                .sessions
                .iter()
                .filter_map(|(id, e)| e.detached_at.map(|at| (at, id)))
                .min()
                .map(|(_, id)| id.clone())
            && let Some(gone) = maps.sessions.remove(&oldest)
        {
            if maps.by_agent.get(&gone.agent) == Some(&oldest) {
                maps.by_agent.remove(&gone.agent);
            }
            forgotten.push((gone.agent.clone(), oldest));
            self.recorder().session_reset();
            tokio::spawn(async move {
                gone.reliable.shut_down(Undelivered::Reset(
                    "the hub holds too many sessions: the longest disconnected went".into(),
                ));
            });
        }
        let displaced = maps.sessions.insert(
            id,
            Entry {
                agent: agent.clone(),
                reliable,
                // Connected once its connection attaches (see `grant_live`).
                detached_at: Some(Instant::now()),
                saved: false,
                restart: false,
            },
        );
        if let Some(displaced) = displaced {
            // A live copy that could not continue, replaced by the stored one.
            tokio::spawn(async move {
                displaced.reliable.shut_down(Undelivered::Reset(
                    "the session continued from another copy".into(),
                ));
            });
        }
        (grant.with_lease(lease), forgotten)
    }
}

#[async_trait::async_trait]
impl SessionGrants for Store {
    async fn grant(
        &self,
        agent: &AgentId,
        resume: Option<&Resume>,
    ) -> Result<SessionGrant, GrantError> {
        // A session id this hub could never have granted names no session: asking a
        // store about it (a key on the network) would only carry the peer's bytes on.
        let resume = resume.filter(|r| tunnel_proto::handshake::is_session_id(&r.session_id));
        // Whether the store says this hub still holds the copy it has (see
        // `SessionStore::holds`).
        let held_here = match (&self.config.store, resume) {
            (Some(store), Some(resume)) if self.has_copy(agent, &resume.session_id) => store
                .holds(agent, &resume.session_id)
                .await
                .map_err(|e| GrantError(e.to_string()))?,
            _ => None,
        };
        let restored = match resume {
            None => None,
            Some(resume) if held_here.is_some() => {
                if held_here == Some(true)
                    && let Live::Granted(grant) = self.grant_live(agent, resume, true)
                {
                    return Ok(grant);
                }
                let snapshot = self.take(agent, resume).await?;
                self.restore(agent, resume, snapshot).map(|s| (s, resume))
            }
            Some(resume) => match self.grant_live(agent, resume, false) {
                Live::Granted(grant) => return Ok(grant),
                Live::None => {
                    let snapshot = self.take(agent, resume).await?;
                    self.restore(agent, resume, snapshot).map(|s| (s, resume))
                }
                Live::Saved(generation) => {
                    // This copy was saved: it is still the session only if the store
                    // holds what it saved. A newer generation continued elsewhere and
                    // replaces it; none means another hub holds the session now.
                    let snapshot = self.take(agent, resume).await?;
                    if snapshot.as_ref().map(|s| s.generation) == Some(generation)
                        && let Live::Granted(grant) = self.grant_live(agent, resume, true)
                    {
                        return Ok(grant);
                    }
                    self.restore(agent, resume, snapshot).map(|s| (s, resume))
                }
            },
        };
        let fresh_id = new_session_id();
        if restored.is_none()
            && let Some(store) = &self.config.store
        {
            store
                .open(agent, &fresh_id)
                .await
                .map_err(|e| GrantError(e.to_string()))?;
        }
        let (grant, forgotten) = self.register(agent, restored, fresh_id);
        for (agent, id) in forgotten {
            self.forget(&agent, &id).await;
        }
        Ok(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sessions_are_bounded_and_the_longest_disconnected_goes_first() {
        let store = Store::new(
            HubSessions::default().max_sessions(2),
            Arc::new(tunnel_metrics::NoopRecorder),
        );
        let (a, b, c) = (
            AgentId::new("w", "a"),
            AgentId::new("w", "b"),
            AgentId::new("w", "c"),
        );
        let first = store.grant(&a, None).await.expect("grant");
        let second = store.grant(&b, None).await.expect("grant");
        store.set_connected(&first.session_id, false);
        tokio::time::sleep(Duration::from_millis(5)).await;
        store.set_connected(&second.session_id, false);
        store.grant(&c, None).await.expect("grant");
        assert_eq!(store.len(), 2);
        assert!(
            store.get(&first.session_id).is_none(),
            "the longest disconnected went"
        );
        assert!(store.get(&second.session_id).is_some());
        // An agent that resumes a session that went is told it is reset.
        let resume = Resume {
            session_id: first.session_id.clone(),
            last_received: 0,
        };
        assert!(!store.grant(&a, Some(&resume)).await.expect("grant").resumed);
    }

    #[tokio::test]
    async fn a_resume_reporting_more_than_was_sent_is_a_new_session() {
        let store = Store::new(
            HubSessions::default(),
            Arc::new(tunnel_metrics::NoopRecorder),
        );
        let agent = AgentId::new("w", "a");
        let first = store.grant(&agent, None).await.expect("grant");
        let ahead = Resume {
            session_id: first.session_id.clone(),
            last_received: 1,
        };
        let grant = store.grant(&agent, Some(&ahead)).await.expect("grant");
        assert!(!grant.resumed);
        assert_ne!(grant.session_id, first.session_id);
        let honest = Resume {
            session_id: grant.session_id.clone(),
            last_received: 0,
        };
        let again = store.grant(&agent, Some(&honest)).await.expect("grant");
        assert!(
            again.resumed && again.lease > grant.lease,
            "later grants lease higher"
        );
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;
    use crate::store::{MemoryStore, StoreError};
    use tunnel_proto::{Envelope, MessageType};

    fn noop() -> Arc<dyn Recorder> {
        Arc::new(tunnel_metrics::NoopRecorder)
    }

    #[tokio::test]
    async fn a_registry_sharing_the_store_resumes_what_another_saved() {
        let store = Arc::new(MemoryStore::new(16));
        let config = HubSessions::default().store(store.clone());
        let first = Store::new(config.clone(), noop());
        let agent = AgentId::new("w", "a");
        let grant = first.grant(&agent, None).await.expect("grant");
        let reliable = first.get(&grant.session_id).expect("held");
        let env = Box::new(Envelope::new(7, MessageType::Event, 0));
        assert!(matches!(
            reliable.try_send(env, &crate::WhenFull::Reject),
            crate::delivery::TrySend::Held(_)
        ));
        first.detached(&agent, &grant.session_id, &reliable).await;
        assert_eq!(store.len(), 1, "saved when its connection ended");
        // Another registry (a restarted hub) resumes it, with what it held.
        let second = Store::new(config, noop());
        let resume = Resume {
            session_id: grant.session_id.clone(),
            last_received: 0,
        };
        let again = second.grant(&agent, Some(&resume)).await.expect("grant");
        assert!(again.resumed);
        assert_eq!(again.session_id, grant.session_id);
        let restored = second.get(&grant.session_id).expect("restored");
        assert_eq!(restored.held().messages, 1);
        assert!(store.is_empty(), "taken: it resumes in one place");
        // A third registry finds nothing: a new session.
        let third = Store::new(HubSessions::default().store(store.clone()), noop());
        assert!(
            !third
                .grant(&agent, Some(&resume))
                .await
                .expect("grant")
                .resumed
        );
    }

    #[tokio::test]
    async fn a_stored_session_the_agent_claims_to_be_ahead_of_is_not_restored() {
        let store = Arc::new(MemoryStore::new(16));
        let config = HubSessions::default().store(store.clone());
        let first = Store::new(config.clone(), noop());
        let agent = AgentId::new("w", "a");
        let grant = first.grant(&agent, None).await.expect("grant");
        let reliable = first.get(&grant.session_id).expect("held");
        first.detached(&agent, &grant.session_id, &reliable).await;
        let ahead = Resume {
            session_id: grant.session_id.clone(),
            last_received: 3,
        };
        let second = Store::new(config, noop());
        assert!(
            !second
                .grant(&agent, Some(&ahead))
                .await
                .expect("grant")
                .resumed
        );
    }

    #[derive(Debug)]
    struct Down;

    #[async_trait::async_trait]
    impl SessionStore for Down {
        async fn take(
            &self,
            _: &AgentId,
            _: &str,
        ) -> Result<Option<tunnel_proto::session::SessionSnapshot>, StoreError> {
            Err(StoreError("unreachable".into()))
        }
        async fn save(
            &self,
            _: &AgentId,
            _: &str,
            _: tunnel_proto::session::SessionSnapshot,
            _: Duration,
        ) -> Result<(), StoreError> {
            Err(StoreError("unreachable".into()))
        }
        async fn remove(&self, _: &AgentId, _: &str) -> Result<(), StoreError> {
            Err(StoreError("unreachable".into()))
        }
    }

    #[tokio::test]
    async fn a_session_id_no_hub_grants_is_a_new_session_and_never_reaches_the_store() {
        // The store fails every call: a grant that asked it would fail.
        let registry = Store::new(HubSessions::default().store(Arc::new(Down)), noop());
        let agent = AgentId::new("w", "a");
        for id in ["x".repeat(10_000), String::new(), "a b".into(), "é".into()] {
            let resume = Resume {
                session_id: id,
                last_received: 0,
            };
            let grant = registry
                .grant(&agent, Some(&resume))
                .await
                .expect("a new session, without asking the store");
            assert!(!grant.resumed);
        }
    }

    #[tokio::test]
    async fn a_failing_store_fails_the_grant_of_a_session_it_would_hold() {
        let registry = Store::new(HubSessions::default().store(Arc::new(Down)), noop());
        let agent = AgentId::new("w", "a");
        // A new session needs no store; a resume of one not held live does.
        let grant = registry.grant(&agent, None).await.expect("grant");
        let reliable = registry.get(&grant.session_id).expect("held");
        registry
            .detached(&agent, &grant.session_id, &reliable)
            .await;
        let elsewhere = Resume {
            session_id: "not-held-here".into(),
            last_received: 0,
        };
        assert!(registry.grant(&agent, Some(&elsewhere)).await.is_err());
        // The live one still resumes.
        let live = Resume {
            session_id: grant.session_id.clone(),
            last_received: 0,
        };
        assert!(
            registry
                .grant(&agent, Some(&live))
                .await
                .expect("grant")
                .resumed
        );
    }
}
