//! Sessions kept in NATS: a [`SessionStore`] on the `tunnel_sessions` KV bucket, so
//! that an agent whose hub drained, restarted, crashed or hung resumes its session on
//! whichever hub it reaches next, with nothing lost or repeated.
//!
//! A session's entry is its *record*, written by the hub holding it (the entry's
//! revision is that hub's fencing token: every write is a compare-and-set on it):
//!
//! - which hub holds it;
//! - `acked`: the highest sequence number of the hub's messages the agent
//!   acknowledged, as far as the holder wrote it;
//! - `down`: for each down message of the `TUNNEL_DOWN` stream sent in the session and
//!   not known to be deleted, its sequence number in the session and in the stream.
//!   A pair is written *before* the message can reach the agent (it is staged until
//!   then, see [`Hub::send_staged`](tunnel_router::Hub::send_staged)).
//!
//! That is all a hub needs to continue the session after its holder is gone: the
//! agent-to-hub direction is what the up stream holds (the agent replays everything
//! it was not acknowledged, and the stream drops the copies it already has by
//! `Nats-Msg-Id`); in the hub-to-agent direction the agent says on resuming what it
//! received: the down messages recorded at or below that are deleted, the rest are
//! read from the stream again, and the numbering goes on after the agent's.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use tunnel_proto::handshake::is_session_id;
use tunnel_proto::session::SessionSnapshot;
use tunnel_router::{SessionStore, StoreError};
use tunnel_transport::AgentId;

use crate::subject;

/// The sessions of the cluster in the sessions bucket, one entry per session
/// (`<workspace>.<sync_target>.<session>`, see the module docs and PROTOCOL.md).
///
/// The bucket's `max_age` is the cluster's grace period
/// ([`ClusterConfig::session_grace`](crate::ClusterConfig::session_grace)); the holder
/// rewrites every entry it holds a quarter of that apart, so a session outlives its
/// hub by between three quarters of the grace and the grace, and is then removed by
/// NATS itself (`keep_for` in `save` is not used: give the hub's sessions the same
/// grace). Of two hubs taking one session at once, one gets it (compare-and-set at the
/// revision read); a hub that finds its entry rewritten by another no longer holds the
/// session and writes nothing more to it. A session id that is not 1 to 128 bytes of
/// visible ASCII names no session here.
#[derive(Debug, Clone)]
pub struct NatsSessionStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    bucket: kv::Store,
    hub: String,
    /// This hub's run, in its records.
    run: String,
    /// Counts this hub's writes: each record written is unique, so a write whose
    /// answer was lost is known by reading the entry back.
    writes: AtomicU64,
    /// The sessions this hub holds, by key.
    held: Mutex<HashMap<String, Arc<Held>>>,
}

/// A session this hub holds.
#[derive(Debug)]
struct Held {
    state: Mutex<HeldState>,
    /// One write at a time: each is a compare-and-set on the revision the last left.
    writing: tokio::sync::Mutex<()>,
}

#[derive(Debug, Clone)]
struct HeldState {
    /// The entry's revision as this hub last wrote it.
    revision: u64,
    acked: u64,
    /// Session sequence number to stream sequence number.
    down: BTreeMap<u64, u64>,
    /// Taken from the store: the record's `down` pairs were numbered by another
    /// copy, and wait for [`NatsSessionStore::adopt`].
    taken: bool,
    /// Stream messages the agent has (found by `adopt`), until written.
    to_delete: Vec<u64>,
}

/// A session's entry (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    hub: String,
    run: String,
    /// This write, among the holder's.
    n: u64,
    acked: u64,
    down: Vec<(u64, u64)>,
}

/// A write of a session's record that did not land.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WriteError {
    /// Another hub took the session: this one no longer holds it.
    #[error("the session is held by another hub now")]
    Lost,
    /// NATS did not take it (down, slow): try again.
    #[error("{0}")]
    Failed(String),
}

/// The waits between attempts to read back a write whose answer was lost.
const CONFIRM_WAITS: [Duration; 4] = [
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
];

/// How many records the refresher writes at once.
const REFRESH_AT_ONCE: usize = 64;

fn failed(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{what} in {}: {e}", subject::SESSIONS_BUCKET))
}

impl NatsSessionStore {
    /// A store on `bucket` for hub `hub` (run `run`), rewriting what it holds every
    /// `grace / 4`.
    pub(crate) fn new(bucket: kv::Store, hub: String, run: String, grace: Duration) -> Self {
        let inner = Arc::new(Inner {
            bucket,
            hub,
            run,
            writes: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
        });
        let every = (grace / 4).max(Duration::from_millis(250));
        tokio::spawn(refresh(Arc::downgrade(&inner), every));
        NatsSessionStore { inner }
    }

    fn held(&self, agent: &AgentId, id: &str) -> Option<(String, Arc<Held>)> {
        let key = subject::session_key(agent, id);
        let held = self.inner.lock().get(&key).cloned()?;
        Some((key, held))
    }

    /// Whether this hub holds session `id` of `agent` (opened or took it, and has not
    /// lost it since).
    pub(crate) fn holds_session(&self, agent: &AgentId, id: &str) -> bool {
        self.held(agent, id).is_some()
    }

    /// Records that down message `stream_seq` goes to the agent as `seq` of session
    /// `id`, with any recorded before and not written yet; returns once written.
    pub(crate) async fn record(
        &self,
        agent: &AgentId,
        id: &str,
        pairs: &[(u64, u64)],
    ) -> Result<(), WriteError> {
        let (key, held) = self.held(agent, id).ok_or(WriteError::Lost)?;
        held.lock().down.extend(pairs.iter().copied());
        self.inner.write(&key, &held).await
    }

    /// The agent acknowledged `seq` of session `id`, a down message recorded: its pair
    /// goes with the next write.
    pub(crate) fn delivered(&self, agent: &AgentId, id: &str, seq: u64) {
        if let Some((_, held)) = self.held(agent, id) {
            let mut state = held.lock();
            state.down.remove(&seq);
            state.acked = state.acked.max(seq);
        }
    }

    /// For a session this hub took from the store, once its agent resumed having
    /// received everything up to `acked`: the stream sequences of the down messages
    /// recorded at or below that (the agent has them: delete them), after writing a
    /// record without the pairs the other copy numbered (the rest are read from the
    /// stream again and numbered anew). Empty for a session not taken.
    pub(crate) async fn adopt(
        &self,
        agent: &AgentId,
        id: &str,
        acked: u64,
    ) -> Result<Vec<u64>, WriteError> {
        let Some((key, held)) = self.held(agent, id) else {
            return Ok(Vec::new());
        };
        {
            let mut state = held.lock();
            if !state.taken {
                return Ok(std::mem::take(&mut state.to_delete));
            }
            state.taken = false;
            let has: Vec<u64> = state.down.range(..=acked).map(|(_, s)| *s).collect();
            state.to_delete.extend(has);
            state.down.clear();
            state.acked = state.acked.max(acked);
        }
        self.inner.write(&key, &held).await?;
        Ok(std::mem::take(&mut held.lock().to_delete))
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Held>>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, state: &HeldState) -> Record {
        Record {
            hub: self.hub.clone(),
            run: self.run.clone(),
            n: self.writes.fetch_add(1, Ordering::Relaxed),
            acked: state.acked,
            down: state.down.iter().map(|(h, s)| (*h, *s)).collect(),
        }
    }

    /// Writes session `key`'s record at the revision this hub last wrote.
    async fn write(&self, key: &str, held: &Arc<Held>) -> Result<(), WriteError> {
        let _one = held.writing.lock().await;
        let (record, revision) = {
            let state = held.lock();
            (self.record(&state), state.revision)
        };
        let value = serde_json::to_vec(&record).map_err(|e| WriteError::Failed(e.to_string()))?;
        match self.put(key, value.into(), revision).await {
            Ok(revision) => {
                held.lock().revision = revision;
                Ok(())
            }
            Err(WriteError::Lost) => {
                self.lock().remove(key);
                Err(WriteError::Lost)
            }
            Err(e) => Err(e),
        }
    }

    /// Replaces the entry at `revision` with `value`: its new revision, or
    /// [`WriteError::Lost`] when another write came first.
    async fn put(&self, key: &str, value: bytes::Bytes, revision: u64) -> Result<u64, WriteError> {
        let error = match self.bucket.update(key, value.clone(), revision).await {
            Ok(revision) => return Ok(revision),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                return Err(WriteError::Lost);
            }
            Err(e) => e,
        };
        // No answer: the entry says whether the write landed.
        for wait in CONFIRM_WAITS {
            match self.bucket.entry(key).await {
                Ok(Some(now)) if now.value == value => return Ok(now.revision),
                Ok(Some(now)) if now.revision == revision => break,
                Ok(_) => return Err(WriteError::Lost),
                Err(_) => tokio::time::sleep(wait).await,
            }
        }
        Err(WriteError::Failed(error.to_string()))
    }
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HeldState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Rewrites every record this hub holds every `every`, so that NATS removes a session
/// only `grace` after its holder stopped writing; ends with the store.
async fn refresh(inner: Weak<Inner>, every: Duration) {
    use futures_util::StreamExt as _;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let all: Vec<(String, Arc<Held>)> = inner
            .lock()
            .iter()
            .map(|(k, h)| (k.clone(), h.clone()))
            .collect();
        futures_util::stream::iter(all)
            .for_each_concurrent(REFRESH_AT_ONCE, |(key, held)| {
                let inner = &inner;
                async move {
                    if let Err(e) = inner.write(&key, &held).await {
                        tracing::debug!(key = %tunnel_proto::text::Untrusted(&key), error = %e, "a session's record was not rewritten");
                    }
                }
            })
            .await;
    }
}

#[async_trait::async_trait]
impl SessionStore for NatsSessionStore {
    async fn open(&self, agent: &AgentId, id: &str) -> Result<(), StoreError> {
        if !is_session_id(id) {
            return Err(StoreError("not a session id this store keeps".into()));
        }
        let key = subject::session_key(agent, id);
        let state = HeldState {
            revision: 0,
            acked: 0,
            down: BTreeMap::new(),
            taken: false,
            to_delete: Vec::new(),
        };
        let value =
            serde_json::to_vec(&self.inner.record(&state)).map_err(|e| failed("encode", e))?;
        let revision = self
            .inner
            .bucket
            .create(&key, value.into())
            .await
            .map_err(|e| failed("open", e))?;
        self.inner.lock().insert(
            key,
            Arc::new(Held {
                state: Mutex::new(HeldState { revision, ..state }),
                writing: tokio::sync::Mutex::new(()),
            }),
        );
        Ok(())
    }

    async fn holds(&self, agent: &AgentId, id: &str) -> Result<Option<bool>, StoreError> {
        let Some((key, held)) = self.held(agent, id) else {
            return Ok(Some(false));
        };
        // Not while this hub's own write is on its way.
        let _one = held.writing.lock().await;
        let now = self
            .inner
            .bucket
            .entry(&key)
            .await
            .map_err(|e| failed("read", e))?;
        let ours = now.is_some_and(|e| {
            e.operation == kv::Operation::Put && e.revision == held.lock().revision
        });
        if !ours {
            self.inner.lock().remove(&key);
        }
        Ok(Some(ours))
    }

    async fn take(&self, agent: &AgentId, id: &str) -> Result<Option<SessionSnapshot>, StoreError> {
        if !is_session_id(id) {
            return Ok(None);
        }
        let key = subject::session_key(agent, id);
        let Some(entry) = self
            .inner
            .bucket
            .entry(&key)
            .await
            .map_err(|e| failed("read", e))?
        else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let record: Record = match serde_json::from_slice(&entry.value) {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!(%agent, error = %e, "a stored session could not be decoded: it is reset");
                return Ok(None);
            }
        };
        let state = HeldState {
            revision: entry.revision,
            acked: record.acked,
            down: record.down.iter().copied().collect(),
            taken: true,
            to_delete: Vec::new(),
        };
        let value =
            serde_json::to_vec(&self.inner.record(&state)).map_err(|e| failed("encode", e))?;
        // Taken once: only the hub whose record lands at this revision continues it.
        let revision = match self.inner.put(&key, value.into(), entry.revision).await {
            Ok(revision) => revision,
            Err(WriteError::Lost) => return Ok(None),
            // A handshake refused with 1013 comes back to ask again.
            Err(WriteError::Failed(e)) => return Err(failed("take", e)),
        };
        self.inner.lock().insert(
            key,
            Arc::new(Held {
                state: Mutex::new(HeldState { revision, ..state }),
                writing: tokio::sync::Mutex::new(()),
            }),
        );
        Ok(Some(SessionSnapshot::open(record.acked)))
    }

    async fn save(
        &self,
        agent: &AgentId,
        id: &str,
        snapshot: SessionSnapshot,
        _keep_for: Duration,
    ) -> Result<(), StoreError> {
        let Some((key, held)) = self.held(agent, id) else {
            // Not held here (any more): the session is another hub's to keep.
            return Ok(());
        };
        {
            let mut state = held.lock();
            state.acked = state.acked.max(snapshot.acked);
        }
        match self.inner.write(&key, &held).await {
            Ok(()) | Err(WriteError::Lost) => Ok(()),
            Err(WriteError::Failed(e)) => Err(failed("save", e)),
        }
    }

    async fn remove(&self, agent: &AgentId, id: &str) -> Result<(), StoreError> {
        if !is_session_id(id) {
            return Ok(());
        }
        let key = subject::session_key(agent, id);
        let Some(held) = self.inner.lock().remove(&key) else {
            // Another hub's, or nobody's.
            return Ok(());
        };
        let _one = held.writing.lock().await;
        let revision = held.lock().revision;
        match self
            .inner
            .bucket
            .delete_expect_revision(&key, Some(revision))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => Ok(()),
            Err(e) => Err(failed("remove", e)),
        }
    }
}
