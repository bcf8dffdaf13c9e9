//! The hub's session store: sessions outlive connections for a grace period, so an
//! agent that reconnects in time resumes where it left off.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tunnel_metrics::Recorder;
use tunnel_proto::session::SessionConfig;
use tunnel_transport::{AgentId, Resume, SessionGrant, SessionStore, new_session_id};

use crate::reliable::{FullPolicy, Reliable, Undelivered};

/// Session resume on a hub.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

impl Default for HubSessions {
    fn default() -> Self {
        HubSessions {
            session: SessionConfig::default(),
            grace: Duration::from_secs(60),
            when_full: FullPolicy::default(),
            max_sessions: 32_768,
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

    /// Sets [`HubSessions::grace`].
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }
}

#[derive(Debug)]
struct Entry {
    agent: AgentId,
    reliable: Arc<Reliable>,
    /// When its last connection ended, or it was granted to a connection that has not
    /// attached yet (None while a connection carries it).
    detached_at: Option<Instant>,
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
    pub fn hook(&self) -> Arc<dyn SessionStore> {
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
        let maps = self.maps();
        let id = maps.by_agent.get(agent)?;
        maps.sessions.get(id).map(|e| e.reliable.clone())
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
        let (all, gone): (Vec<Arc<Reliable>>, Vec<Arc<Reliable>>) = {
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
                    gone.push(entry.reliable);
                }
            }
            (
                maps.sessions.values().map(|e| e.reliable.clone()).collect(),
                gone,
            )
        };
        for reliable in gone {
            self.recorder().session_reset();
            reliable.shut_down(Undelivered::Reset(
                "the agent did not come back within the grace period".into(),
            ));
        }
        for reliable in all {
            reliable.expire();
        }
    }

    /// Ends every session (hub shutdown).
    pub(crate) async fn close_all(&self) {
        let all: Vec<Arc<Reliable>> = {
            let mut maps = self.maps();
            maps.by_agent.clear();
            maps.sessions.drain().map(|(_, e)| e.reliable).collect()
        };
        for reliable in all {
            reliable.shut_down(Undelivered::ShutDown);
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

impl SessionStore for Store {
    fn open(&self, agent: &AgentId, resume: Option<&Resume>) -> SessionGrant {
        let mut maps = self.maps();
        maps.leases += 1;
        let lease = maps.leases;
        if let Some(resume) = resume
            && let Some(entry) = maps.sessions.get_mut(&resume.session_id)
            && entry.agent == *agent
        {
            // An agent that reports more than was ever sent to it talks about state
            // this hub does not have: that is a reset, not a resume.
            if entry.reliable.may_resume(resume.last_received) {
                // Counted as connected once the connection attaches: a grant whose
                // connection never gets that far still ends after the grace period.
                entry.detached_at = Some(Instant::now());
                entry.reliable.supersede(lease);
                return SessionGrant::resumed(
                    resume.session_id.clone(),
                    entry.reliable.last_received(),
                )
                .with_lease(lease);
            }
        }
        let id = new_session_id();
        if let Some(old_id) = maps.by_agent.insert(agent.clone(), id.clone())
            && let Some(old) = maps.sessions.remove(&old_id)
        {
            // The agent started over: its old session's undelivered messages fail.
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
            self.recorder().session_reset();
            tokio::spawn(async move {
                gone.reliable.shut_down(Undelivered::Reset(
                    "the hub holds too many sessions: the longest disconnected went".into(),
                ));
            });
        }
        maps.sessions.insert(
            id.clone(),
            Entry {
                agent: agent.clone(),
                reliable: Reliable::new(self.config.session.clone(), self.recorder()),
                // Connected once its connection attaches (see above).
                detached_at: Some(Instant::now()),
            },
        );
        SessionGrant::fresh(id).with_lease(lease)
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
        let first = store.open(&a, None);
        let second = store.open(&b, None);
        store.set_connected(&first.session_id, false);
        tokio::time::sleep(Duration::from_millis(5)).await;
        store.set_connected(&second.session_id, false);
        store.open(&c, None);
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
        assert!(!store.open(&a, Some(&resume)).resumed);
    }

    #[tokio::test]
    async fn a_resume_reporting_more_than_was_sent_is_a_new_session() {
        let store = Store::new(
            HubSessions::default(),
            Arc::new(tunnel_metrics::NoopRecorder),
        );
        let agent = AgentId::new("w", "a");
        let first = store.open(&agent, None);
        let ahead = Resume {
            session_id: first.session_id.clone(),
            last_received: 1,
        };
        let grant = store.open(&agent, Some(&ahead));
        assert!(!grant.resumed);
        assert_ne!(grant.session_id, first.session_id);
        let honest = Resume {
            session_id: grant.session_id.clone(),
            last_received: 0,
        };
        let again = store.open(&agent, Some(&honest));
        assert!(
            again.resumed && again.lease > grant.lease,
            "later grants lease higher"
        );
    }
}
