//! Detached sessions kept in NATS: a [`SessionStore`] on the `tunnel_sessions` KV
//! bucket, so that an agent whose hub drained or restarted resumes its session on
//! whichever hub it reaches next.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::kv;
use tunnel_proto::handshake::is_session_id;
use tunnel_proto::session::SessionSnapshot;
use tunnel_router::{SessionStore, StoreError};
use tunnel_transport::AgentId;

use crate::subject;

/// Snapshots of detached sessions in the sessions bucket, one entry per session
/// (`<workspace>.<sync_target>.<session>`), the snapshot in MessagePack.
///
/// The bucket's `max_age` is the cluster's grace period
/// ([`ClusterConfig::session_grace`](crate::ClusterConfig::session_grace)): the
/// server removes a snapshot older than that, whatever a hub asks for in `save`
/// (`keep_for`; give the hub's sessions the same grace). `take` replaces the entry,
/// at the revision it read, with a marker naming this take: of two hubs taking one
/// session at once, one gets it, and a take whose answer was lost finds its own marker.
/// A snapshot larger than the server's payload limit (1 MiB by default) is not saved:
/// that session resumes only on the hub holding it. A session id that is not 1 to 128
/// bytes of visible ASCII names no session here. An agent that asks for its session
/// before the hub it left has saved it gets a new one (a drained `tunnel hub` asks its
/// agents to wait half a second before dialing again, for the saves to land).
#[derive(Debug)]
pub struct NatsSessionStore {
    bucket: kv::Store,
    /// This hub's run, in its takes' markers.
    run: String,
    takes: AtomicU64,
}

impl NatsSessionStore {
    pub(crate) fn new(bucket: kv::Store, run: String) -> Self {
        NatsSessionStore {
            bucket,
            run,
            takes: AtomicU64::new(0),
        }
    }
}

/// The waits between attempts to read back a take whose answer was lost.
const CONFIRM_WAITS: [Duration; 4] = [
    Duration::from_millis(50),
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
];

/// How a taken session's entry begins (a snapshot is a MessagePack map, never this).
const TAKEN: &[u8] = b"taken ";

fn failed(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{what} in {}: {e}", subject::SESSIONS_BUCKET))
}

#[async_trait::async_trait]
impl SessionStore for NatsSessionStore {
    async fn take(&self, agent: &AgentId, id: &str) -> Result<Option<SessionSnapshot>, StoreError> {
        if !is_session_id(id) {
            return Ok(None);
        }
        let key = subject::session_key(agent, id);
        let Some(entry) = self
            .bucket
            .entry(&key)
            .await
            .map_err(|e| failed("read", e))?
        else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put || entry.value.starts_with(TAKEN) {
            return Ok(None);
        }
        // Taken once: only the hub whose marker lands at this revision resumes it.
        let n = self.takes.fetch_add(1, Ordering::Relaxed);
        let mark = bytes::Bytes::from(format!("taken {} {n}", self.run));
        if let Err(e) = self.bucket.update(&key, mark.clone(), entry.revision).await {
            // Refused (taken or saved anew meanwhile), or no answer: the entry says
            // whether this take landed.
            let mut landed = false;
            for wait in CONFIRM_WAITS {
                match self.bucket.entry(&key).await {
                    Ok(now) => {
                        landed = now.is_some_and(|now| now.value == mark);
                        break;
                    }
                    Err(_) => tokio::time::sleep(wait).await,
                }
            }
            if !landed {
                // A handshake refused with 1013 comes back to ask again.
                return Err(failed("take", e));
            }
        }
        match rmp_serde::from_slice(&entry.value) {
            Ok(snapshot) => Ok(Some(snapshot)),
            Err(e) => {
                tracing::warn!(%agent, error = %e, "a stored session could not be decoded: it is reset");
                Ok(None)
            }
        }
    }

    async fn save(
        &self,
        agent: &AgentId,
        id: &str,
        snapshot: SessionSnapshot,
        _keep_for: Duration,
    ) -> Result<(), StoreError> {
        if !is_session_id(id) {
            return Err(StoreError("not a session id this store keeps".into()));
        }
        let value = rmp_serde::to_vec_named(&snapshot).map_err(|e| failed("encode", e))?;
        self.bucket
            .put(subject::session_key(agent, id), value.into())
            .await
            .map(|_| ())
            .map_err(|e| failed("save", e))
    }

    async fn remove(&self, agent: &AgentId, id: &str) -> Result<(), StoreError> {
        if !is_session_id(id) {
            return Ok(());
        }
        self.bucket
            .delete(subject::session_key(agent, id))
            .await
            .map_err(|e| failed("remove", e))
    }
}
