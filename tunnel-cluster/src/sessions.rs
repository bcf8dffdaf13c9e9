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
//! - `seen`: the `Nats-Msg-Id`s of the last down messages sent in the session, with
//!   their stream sequence and when they were sent: a copy of one stored again under
//!   another sequence (a backend's retry that the stream's duplicate window forgot:
//!   it knows only the messages it still stores once nats-server restarts) is deleted,
//!   not sent.
//!
//! That is all a hub needs to continue the session after its holder is gone: the
//! agent-to-hub direction is what the up stream holds (the agent replays everything
//! it was not acknowledged, and the stream drops the copies it already has by
//! `Nats-Msg-Id`); in the hub-to-agent direction the agent says on resuming what it
//! received: the down messages recorded at or below that are deleted, the rest are
//! read from the stream again, and the numbering goes on after the agent's.

use std::collections::{BTreeMap, HashMap, VecDeque};
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
    /// How long a down message's id is remembered: the down stream's duplicate window.
    seen_for: Duration,
}

/// A down message's `Nats-Msg-Id` sent in a session: its stream sequence, the id,
/// and when it was staged (milliseconds since the Unix epoch).
type Seen = (u64, String, u64);

/// The most ids a session remembers (the newest), and the longest id remembered.
const SEEN_AT_MOST: usize = 64;
const SEEN_ID_AT_MOST: usize = 128;

/// A session this hub holds.
#[derive(Debug)]
struct Held {
    /// This copy of the session on this hub, unique in the process: a copy taken
    /// again later is another.
    copy: u64,
    state: Mutex<HeldState>,
    /// One write at a time: each is a compare-and-set on the revision the last left.
    writing: tokio::sync::Mutex<()>,
}

#[derive(Debug, Clone, Default)]
struct HeldState {
    /// The entry's revision as this hub last wrote it.
    revision: u64,
    acked: u64,
    /// Stream sequence number to the session sequence number it was last sent under
    /// (a message sent again replaces its pair).
    down: BTreeMap<u64, u64>,
    /// Pairs were added since the last write.
    unwritten: bool,
    /// Taken from the store: the record's `down` pairs were numbered by another
    /// copy, and wait for [`NatsSessionStore::adopt`].
    taken: bool,
    /// The ids of the last down messages sent, oldest first (see [`Seen`]).
    seen: VecDeque<Seen>,
    /// The `n` of this copy's writes since its last confirmed one (at most
    /// [`LANDING_AT_MOST`], the latest): one whose answer was lost may have landed
    /// late. Another copy of this run (the agent came back to this hub and it took
    /// the session again) writes other numbers, so its record is never taken for
    /// this copy's.
    landing: Vec<u64>,
}

/// How many unconfirmed writes of one copy are remembered; past it the oldest is
/// forgotten, and should that one have landed, the copy counts its session as lost
/// (the agent's next connection takes it again).
const LANDING_AT_MOST: usize = 16;

/// Marks the held state unwritten again unless disarmed: a write that does not end
/// (its future dropped mid-way) leaves its changes to the next write.
struct Unwritten<'a>(Option<&'a Held>);

impl Drop for Unwritten<'_> {
    fn drop(&mut self) {
        if let Some(held) = self.0 {
            held.lock().unwritten = true;
        }
    }
}

impl HeldState {
    /// Drops the ids older than `seen_for` at `now_ms`, and the oldest past
    /// [`SEEN_AT_MOST`].
    fn forget_seen(&mut self, now_ms: u64, seen_for: Duration) {
        let window = u64::try_from(seen_for.as_millis()).unwrap_or(u64::MAX);
        while self.seen.len() > SEEN_AT_MOST
            || self
                .seen
                .front()
                .is_some_and(|(_, _, at)| at.saturating_add(window) < now_ms)
        {
            self.seen.pop_front();
        }
    }
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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    seen: Vec<Seen>,
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
    /// `grace / 4`, remembering down messages' ids for `seen_for`.
    pub(crate) fn new(
        bucket: kv::Store,
        hub: String,
        run: String,
        grace: Duration,
        seen_for: Duration,
    ) -> Self {
        let inner = Arc::new(Inner {
            bucket,
            hub,
            run,
            writes: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
            seen_for,
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

    /// Which copy of session `id` this hub holds now (see [`StagedIn::copy`]).
    pub(crate) fn copy_of(&self, agent: &AgentId, id: &str) -> Option<u64> {
        self.held(agent, id).map(|(_, held)| held.copy)
    }

    /// Whether this hub holds session `id` of `agent` (opened or took it, and has not
    /// lost it since).
    pub(crate) fn holds_session(&self, agent: &AgentId, id: &str) -> bool {
        self.held(agent, id).is_some()
    }

    /// Notes that down message `stream_seq` was staged as `seq` of session `id` in
    /// `copy` of it (0: whichever copy is held); it is written with the next
    /// [`NatsSessionStore::record`]. `None` when this hub does not hold the session, or
    /// holds a newer copy (a reader of an older one must not put its pairs in the
    /// newer's record); otherwise what the message's outcome is reported to. `msg_id`
    /// is the message's `Nats-Msg-Id`, remembered with it (see
    /// [`NatsSessionStore::sent_before`]).
    pub(crate) fn stage(
        &self,
        agent: &AgentId,
        id: &str,
        copy: u64,
        seq: u64,
        stream_seq: u64,
        msg_id: Option<&str>,
    ) -> Option<StagedIn> {
        let (_, held) = self
            .held(agent, id)
            .filter(|(_, h)| copy == 0 || h.copy == copy)?;
        {
            let mut state = held.lock();
            state.down.insert(stream_seq, seq);
            state.unwritten = true;
            if let Some(msg_id) = msg_id.filter(|m| !m.is_empty() && m.len() <= SEEN_ID_AT_MOST)
                && !state.seen.iter().any(|(s, _, _)| *s == stream_seq)
            {
                let now = tunnel_transport::unix_millis();
                state.seen.push_back((stream_seq, msg_id.to_owned(), now));
                state.forget_seen(now, self.inner.seen_for);
            }
        }
        Some(StagedIn(held))
    }

    /// Whether down message `stream_seq`, whose `Nats-Msg-Id` is `msg_id`, is a second
    /// copy of one sent in session `id` within the down stream's duplicate window
    /// (same id, another stream sequence): the agent has it, or will get the first.
    pub(crate) fn sent_before(
        &self,
        agent: &AgentId,
        id: &str,
        msg_id: &str,
        stream_seq: u64,
    ) -> bool {
        let Some((_, held)) = self.held(agent, id) else {
            return false;
        };
        let mut state = held.lock();
        state.forget_seen(tunnel_transport::unix_millis(), self.inner.seen_for);
        state
            .seen
            .iter()
            .any(|(s, m, _)| *s != stream_seq && m == msg_id)
    }

    /// Writes session `id`'s record if anything was staged since the last write;
    /// returns the highest session sequence number the record now holds a pair of:
    /// everything staged up to it may be released.
    pub(crate) async fn record(&self, agent: &AgentId, id: &str) -> Result<u64, WriteError> {
        let (key, held) = self.held(agent, id).ok_or(WriteError::Lost)?;
        // A write on its way (the refresh's, a save's) has cleared the flag before it
        // landed: what it carries may be released only once it did.
        let pending = {
            let _landed = held.writing.lock().await;
            if !self
                .inner
                .lock()
                .get(&key)
                .is_some_and(|h| Arc::ptr_eq(h, &held))
            {
                // That write found the session taken.
                return Err(WriteError::Lost);
            }
            held.lock().unwritten
        };
        if pending {
            // Only what this write carried may be released: a pair staged meanwhile
            // waits for the next.
            return self.inner.write(&key, &held).await;
        }
        // Every pair held was in a write that landed.
        Ok(held.lock().down.values().copied().max().unwrap_or(0))
    }

    /// For a session this hub took from the store, once its agent resumed having
    /// received everything up to `resumed_at`: the stream sequences of the down
    /// messages recorded at or below that (the agent has them). `None` for a session
    /// not taken (or adopted already).
    pub(crate) fn taken_down(
        &self,
        agent: &AgentId,
        id: &str,
        resumed_at: u64,
    ) -> Option<Vec<u64>> {
        let (_, held) = self.held(agent, id)?;
        let state = held.lock();
        state.taken.then(|| {
            state
                .down
                .iter()
                .filter(|(_, seq)| **seq <= resumed_at)
                .map(|(stream_seq, _)| *stream_seq)
                .collect()
        })
    }

    /// Once the messages [`NatsSessionStore::taken_down`] named are deleted: writes
    /// the record without the pairs the other copy numbered (the rest are read from
    /// the stream again and numbered anew).
    pub(crate) async fn adopt(
        &self,
        agent: &AgentId,
        id: &str,
        resumed_at: u64,
    ) -> Result<(), WriteError> {
        let Some((key, held)) = self.held(agent, id) else {
            return Err(WriteError::Lost);
        };
        {
            let mut state = held.lock();
            if state.taken {
                state.taken = false;
                state.down.clear();
                state.acked = state.acked.max(resumed_at);
            }
        }
        self.inner.write(&key, &held).await.map(|_| ())
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
            down: state.down.iter().map(|(s, h)| (*h, *s)).collect(),
            seen: state.seen.iter().cloned().collect(),
        }
    }

    /// Writes session `key`'s record at the revision this hub last wrote; returns the
    /// highest session sequence number among the pairs written.
    async fn write(&self, key: &str, held: &Arc<Held>) -> Result<u64, WriteError> {
        let _one = held.writing.lock().await;
        let mut unwritten = Unwritten(Some(held));
        for _ in 0..2 {
            let (record, revision) = {
                let mut state = held.lock();
                state.unwritten = false;
                state.forget_seen(tunnel_transport::unix_millis(), self.seen_for);
                let record = self.record(&state);
                if state.landing.len() == LANDING_AT_MOST {
                    state.landing.remove(0);
                }
                state.landing.push(record.n);
                (record, state.revision)
            };
            let through = record.down.iter().map(|(h, _)| *h).max().unwrap_or(0);
            let value =
                serde_json::to_vec(&record).map_err(|e| WriteError::Failed(e.to_string()))?;
            match self.put(key, value.into(), revision).await {
                Ok(revision) => {
                    let mut state = held.lock();
                    state.revision = revision;
                    state.landing.clear();
                    unwritten.0 = None;
                    return Ok(through);
                }
                Err(WriteError::Lost) => {
                    // A write of this copy whose answer was lost may have landed late:
                    // then the entry is still this copy's, at that revision.
                    let landing = held.lock().landing.clone();
                    match self.own_revision(key, &landing).await {
                        Some(now) => held.lock().revision = now,
                        None => {
                            self.forget(key, held);
                            return Err(WriteError::Lost);
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(WriteError::Failed("the entry kept changing".into()))
    }

    /// The entry's revision if one of the writes numbered `landing` (of this run)
    /// wrote it last.
    async fn own_revision(&self, key: &str, landing: &[u64]) -> Option<u64> {
        let entry = self.bucket.entry(key).await.ok()??;
        let record: Record = serde_json::from_slice(&entry.value).ok()?;
        (entry.operation == kv::Operation::Put
            && record.run == self.run
            && record.hub == self.hub
            && landing.contains(&record.n))
        .then_some(entry.revision)
    }

    /// Stops holding `key`, if `held` is still what this hub holds under it.
    fn forget(&self, key: &str, held: &Arc<Held>) {
        let mut all = self.lock();
        if all.get(key).is_some_and(|h| Arc::ptr_eq(h, held)) {
            all.remove(key);
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

/// The hold a down message was staged in ([`NatsSessionStore::stage`]), to report its
/// outcome to. Only that hold learns it: a copy of the session this hub took since
/// (from the record, with its own pairs) is not told about the old copy's messages. A
/// failed receipt of an old copy must not drop the new copy's pair for the same
/// message: the agent may have it, and the taker deletes only what its pairs name.
#[derive(Debug)]
pub(crate) struct StagedIn(Arc<Held>);

impl StagedIn {
    /// The copy it was staged in (never 0).
    pub(crate) fn copy(&self) -> u64 {
        self.0.copy
    }

    /// The agent acknowledged down message `stream_seq` (sent as `seq`), and it was
    /// deleted: its pair goes with the next write.
    pub(crate) fn delivered(&self, stream_seq: u64, seq: u64) {
        let mut state = self.0.lock();
        if state.down.get(&stream_seq) == Some(&seq) {
            state.down.remove(&stream_seq);
        }
        state.acked = state.acked.max(seq);
    }

    /// Down message `stream_seq`, sent as `seq`, was not delivered (the session copy
    /// ended or was reset): its pair goes, and a send again records anew.
    pub(crate) fn undelivered(&self, stream_seq: u64, seq: u64) {
        let mut state = self.0.lock();
        if state.down.get(&stream_seq) == Some(&seq) {
            state.down.remove(&stream_seq);
        }
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
        // A write NATS did not take ends the round (it is down: the rest would wait
        // out their timeouts one by one); the next round tries again.
        let failing = std::sync::atomic::AtomicBool::new(false);
        futures_util::stream::iter(all)
            .for_each_concurrent(REFRESH_AT_ONCE, |(key, held)| {
                let (inner, failing) = (&inner, &failing);
                async move {
                    if failing.load(Ordering::Relaxed) {
                        return;
                    }
                    if let Err(e) = inner.write(&key, &held).await {
                        failing.store(matches!(e, WriteError::Failed(_)), Ordering::Relaxed);
                        tracing::debug!(key = %tunnel_proto::text::Untrusted(&key), error = %e, "a session's record was not rewritten");
                    }
                }
            })
            .await;
    }
}

impl Held {
    fn new(state: HeldState) -> Arc<Held> {
        static COPIES: AtomicU64 = AtomicU64::new(1);
        Arc::new(Held {
            copy: COPIES.fetch_add(1, Ordering::Relaxed),
            state: Mutex::new(state),
            writing: tokio::sync::Mutex::new(()),
        })
    }
}

/// How many times a take reads the entry again after another write came first.
const TAKE_ATTEMPTS: usize = 5;

#[async_trait::async_trait]
impl SessionStore for NatsSessionStore {
    async fn open(&self, agent: &AgentId, id: &str) -> Result<(), StoreError> {
        if !is_session_id(id) {
            return Err(StoreError("not a session id this store keeps".into()));
        }
        let key = subject::session_key(agent, id);
        let state = HeldState::default();
        let value =
            serde_json::to_vec(&self.inner.record(&state)).map_err(|e| failed("encode", e))?;
        let revision = self
            .inner
            .bucket
            .create(&key, value.into())
            .await
            .map_err(|e| failed("open", e))?;
        self.inner
            .lock()
            .insert(key, Held::new(HeldState { revision, ..state }));
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
            self.inner.forget(&key, &held);
        }
        Ok(Some(ours))
    }

    async fn take(&self, agent: &AgentId, id: &str) -> Result<Option<SessionSnapshot>, StoreError> {
        if !is_session_id(id) {
            return Ok(None);
        }
        let key = subject::session_key(agent, id);
        for _ in 0..TAKE_ATTEMPTS {
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
                down: record.down.iter().map(|(h, s)| (*s, *h)).collect(),
                unwritten: false,
                landing: Vec::new(),
                taken: true,
                seen: record
                    .seen
                    .into_iter()
                    .filter(|(_, m, _)| m.len() <= SEEN_ID_AT_MOST)
                    .collect(),
            };
            let mut state = state;
            state.forget_seen(tunnel_transport::unix_millis(), self.inner.seen_for);
            let value =
                serde_json::to_vec(&self.inner.record(&state)).map_err(|e| failed("encode", e))?;
            // Only the hub whose record lands at this revision continues it; one that
            // lost to another write (the holder's own, say) reads the entry again.
            match self.inner.put(&key, value.into(), entry.revision).await {
                Ok(revision) => {
                    self.inner
                        .lock()
                        .insert(key, Held::new(HeldState { revision, ..state }));
                    return Ok(Some(SessionSnapshot::open(record.acked).holding_resumed()));
                }
                Err(WriteError::Lost) => {}
                // A handshake refused with 1013 comes back to ask again.
                Err(WriteError::Failed(e)) => return Err(failed("take", e)),
            }
        }
        Err(failed("take", "the entry kept changing"))
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
            Ok(_) | Err(WriteError::Lost) => Ok(()),
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

    async fn let_go(&self, agent: &AgentId, id: &str) -> Result<(), StoreError> {
        self.remove(agent, id).await
    }
}

#[cfg(test)]
#[cfg(feature = "testing")]
mod tests {
    use super::*;
    use crate::testing::Nats;

    async fn store(nats: &Nats, hub: &str) -> (NatsSessionStore, kv::Store) {
        let client = async_nats::connect(nats.url()).await.expect("nats");
        let js = async_nats::jetstream::new(client);
        let config = crate::ClusterConfig::new(nats.url(), hub);
        let (bucket, _) = crate::streams::sessions(&js, &config)
            .await
            .expect("bucket");
        let store = NatsSessionStore::new(
            bucket.clone(),
            hub.into(),
            format!("{hub}-run"),
            config.session_grace,
            config.duplicate_window,
        );
        (store, bucket)
    }

    async fn record_of(bucket: &kv::Store, agent: &AgentId, id: &str) -> Record {
        let value = bucket
            .get(subject::session_key(agent, id))
            .await
            .expect("read")
            .expect("stored");
        serde_json::from_slice(&value).expect("a record")
    }

    #[tokio::test]
    async fn staged_pairs_are_released_only_once_written_and_a_taker_learns_what_the_agent_has() {
        let nats = Nats::start("records");
        let (a, bucket) = store(&nats, "hub-a").await;
        let (b, _) = store(&nats, "hub-b").await;
        let agent = AgentId::new("w", "t");
        a.open(&agent, "s1").await.expect("opened");
        let first = a.stage(&agent, "s1", 0, 5, 100, None).expect("held");
        let second = a.stage(&agent, "s1", 0, 6, 101, None).expect("held");
        assert_eq!(
            a.record(&agent, "s1").await,
            Ok(6),
            "both written: release up to 6"
        );
        assert_eq!(
            record_of(&bucket, &agent, "s1").await.down,
            vec![(5, 100), (6, 101)]
        );
        // Acknowledged and deleted: the pair goes with the next write; a failed
        // delivery's pair goes too (sent again, it is recorded anew).
        first.delivered(100, 5);
        second.undelivered(101, 6);
        assert!(a.stage(&agent, "s1", 0, 7, 101, None).is_some());
        assert_eq!(a.record(&agent, "s1").await, Ok(7));
        let written = record_of(&bucket, &agent, "s1").await;
        assert_eq!((written.acked, written.down), (5, vec![(7, 101)]));
        // Nothing staged since: nothing written, everything held may go.
        assert_eq!(a.record(&agent, "s1").await, Ok(7));

        // Another hub takes it: the first one's writes are refused from then on.
        let taken = b.take(&agent, "s1").await.expect("take").expect("stored");
        assert!(taken.open_tail && taken.hold_resumed && taken.acked == 5);
        assert!(a.stage(&agent, "s1", 0, 8, 102, None).is_some());
        assert_eq!(a.record(&agent, "s1").await, Err(WriteError::Lost));
        assert!(!a.holds_session(&agent, "s1"), "fenced");
        assert!(
            a.stage(&agent, "s1", 0, 9, 103, None).is_none(),
            "nothing more staged there"
        );
        // The agent resumed reporting 7: it has stream message 101.
        assert_eq!(b.taken_down(&agent, "s1", 7), Some(vec![101]));
        assert_eq!(b.taken_down(&agent, "s1", 6), Some(vec![]));
        b.adopt(&agent, "s1", 7).await.expect("written");
        assert_eq!(b.taken_down(&agent, "s1", 7), None, "adopted once");
        let written = record_of(&bucket, &agent, "s1").await;
        assert_eq!((written.hub.as_str(), written.acked), ("hub-b", 7));
        assert!(written.down.is_empty(), "the other copy's numbers are gone");
        // Letting go of it removes it; a hub that does not hold it removes nothing.
        a.let_go(&agent, "s1").await.expect("not held: nothing");
        assert!(
            bucket
                .get(subject::session_key(&agent, "s1"))
                .await
                .expect("read")
                .is_some()
        );
        b.let_go(&agent, "s1").await.expect("removed");
        assert!(
            bucket
                .get(subject::session_key(&agent, "s1"))
                .await
                .expect("read")
                .is_none()
        );
    }

    #[tokio::test]
    async fn an_old_copys_failed_message_leaves_the_new_copys_pair() {
        let nats = Nats::start("old-copy");
        let (a, _) = store(&nats, "hub-a").await;
        let (b, _) = store(&nats, "hub-b").await;
        let agent = AgentId::new("w", "t");
        a.open(&agent, "s1").await.expect("opened");
        let old = a.stage(&agent, "s1", 0, 5, 100, None).expect("held");
        assert_eq!(a.record(&agent, "s1").await, Ok(5));
        // The agent moves to hub b and back: hub a takes the record again, with the
        // pair of message 100.
        b.take(&agent, "s1").await.expect("take").expect("stored");
        a.take(&agent, "s1").await.expect("take").expect("stored");
        // Hub a's first copy of the session ends: its receipt for message 100 fails.
        old.undelivered(100, 5);
        // The agent resumed having 5: the new copy still deletes message 100 rather
        // than reading it again.
        assert_eq!(a.taken_down(&agent, "s1", 5), Some(vec![100]));
    }

    #[tokio::test]
    async fn a_replaced_copy_cannot_stage_into_the_new_copy() {
        let nats = Nats::start("stale-stage");
        let (a, _) = store(&nats, "hub-a").await;
        let (b, _) = store(&nats, "hub-b").await;
        let agent = AgentId::new("w", "t");
        a.open(&agent, "s1").await.expect("opened");
        let old = a.copy_of(&agent, "s1").expect("held");
        a.stage(&agent, "s1", old, 5, 100, None).expect("held");
        assert_eq!(a.record(&agent, "s1").await, Ok(5));
        // The agent moves to hub b and back: hub a takes the record again, with the
        // pair of message 100, in a new copy.
        b.take(&agent, "s1").await.expect("take").expect("stored");
        a.take(&agent, "s1").await.expect("take").expect("stored");
        let new = a.copy_of(&agent, "s1").expect("held");
        assert_ne!(old, new);
        // A reader of the old copy, still running, reads message 100 again: it may
        // not stage it in the new copy, whose pair for it must stay.
        assert!(a.stage(&agent, "s1", old, 6, 100, None).is_none());
        assert_eq!(a.taken_down(&agent, "s1", 5), Some(vec![100]));
        assert!(a.stage(&agent, "s1", new, 6, 101, None).is_some());
    }

    #[tokio::test]
    async fn a_write_of_a_replaced_copy_is_refused_not_taken_for_the_new_copys() {
        let nats = Nats::start("replaced-copy");
        let (a, bucket) = store(&nats, "hub-a").await;
        let (b, _) = store(&nats, "hub-b").await;
        let agent = AgentId::new("w", "t");
        a.open(&agent, "s1").await.expect("opened");
        a.stage(&agent, "s1", 0, 5, 100, None).expect("held");
        assert_eq!(a.record(&agent, "s1").await, Ok(5));
        let (key, old) = a.held(&agent, "s1").expect("held");
        // The agent moves to hub b and back: hub a holds a new copy, which writes.
        b.take(&agent, "s1").await.expect("take").expect("stored");
        a.take(&agent, "s1").await.expect("take").expect("stored");
        a.adopt(&agent, "s1", 5).await.expect("written");
        // A write of the old copy still on its way (a refresh round holds it), with a
        // pair it staged: the entry is this run's, but not this copy's.
        old.lock().down.insert(101, 6);
        assert_eq!(a.inner.write(&key, &old).await, Err(WriteError::Lost));
        let written = record_of(&bucket, &agent, "s1").await;
        assert!(written.down.is_empty(), "the new copy's record stands");
        assert!(a.holds_session(&agent, "s1"), "the new copy still holds it");
    }

    #[tokio::test]
    async fn a_write_dropped_on_its_way_leaves_its_pairs_to_the_next() {
        let mut nats = Nats::start("dropped-write");
        let (a, bucket) = store(&nats, "hub-a").await;
        let agent = AgentId::new("w", "t");
        a.open(&agent, "s1").await.expect("opened");
        a.stage(&agent, "s1", 0, 5, 100, None).expect("held");
        let (key, held) = a.held(&agent, "s1").expect("held");
        // With the server down the write waits for its answer; it is dropped there.
        nats.kill();
        let cut =
            tokio::time::timeout(Duration::from_millis(200), a.inner.write(&key, &held)).await;
        assert!(cut.is_err(), "the write was under way");
        assert!(held.lock().unwritten, "its pairs still to be written");
        nats.restart();
        assert_eq!(a.record(&agent, "s1").await, Ok(5));
        assert_eq!(record_of(&bucket, &agent, "s1").await.down, vec![(5, 100)]);
    }

    #[tokio::test]
    async fn a_taker_knows_the_ids_of_the_down_messages_sent_in_the_session() {
        let nats = Nats::start("seen");
        let (a, bucket) = store(&nats, "hub-a").await;
        let (b, _) = store(&nats, "hub-b").await;
        let agent = AgentId::new("w", "t");
        a.open(&agent, "s1").await.expect("opened");
        a.stage(&agent, "s1", 0, 1, 100, Some("cmd-1"))
            .expect("held");
        a.stage(
            &agent,
            "s1",
            0,
            2,
            101,
            Some(&"x".repeat(SEEN_ID_AT_MOST + 1)),
        )
        .expect("held");
        assert_eq!(a.record(&agent, "s1").await, Ok(2));
        let written = record_of(&bucket, &agent, "s1").await;
        assert_eq!(written.seen.len(), 1, "an id past the bound is not kept");
        assert!(
            a.sent_before(&agent, "s1", "cmd-1", 200),
            "a copy under another sequence"
        );
        assert!(
            !a.sent_before(&agent, "s1", "cmd-1", 100),
            "the message itself, sent again"
        );
        b.take(&agent, "s1").await.expect("take").expect("stored");
        assert!(
            b.sent_before(&agent, "s1", "cmd-1", 200),
            "the taker knows it"
        );
        b.adopt(&agent, "s1", 2).await.expect("written");
        assert!(
            b.sent_before(&agent, "s1", "cmd-1", 200),
            "and keeps it past the adopt"
        );
        assert!(!b.sent_before(&agent, "s1", "cmd-2", 201));
        // At most the newest SEEN_AT_MOST.
        for n in 0..SEEN_AT_MOST as u64 + 5 {
            b.stage(&agent, "s1", 0, 3 + n, 300 + n, Some(&format!("m-{n}")))
                .expect("held");
        }
        assert!(
            !b.sent_before(&agent, "s1", "cmd-1", 200),
            "the oldest went"
        );
        assert!(b.sent_before(&agent, "s1", "m-68", 1));
    }
}
