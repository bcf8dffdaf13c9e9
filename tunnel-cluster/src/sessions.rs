//! Detached sessions kept in NATS: a [`SessionStore`] on the `tunnel_sessions` KV
//! bucket, so that an agent whose hub drained or restarted resumes its session on
//! whichever hub it reaches next.

use std::time::Duration;

use async_nats::jetstream::kv;
use tunnel_proto::session::SessionSnapshot;
use tunnel_router::{SessionStore, StoreError};
use tunnel_transport::AgentId;

use crate::subject;

/// Snapshots of detached sessions in the sessions bucket, one entry per session
/// (`<workspace>.<sync_target>.<session>`), the snapshot in MessagePack.
///
/// The bucket's `max_age` is the cluster's grace period
/// ([`ClusterConfig::session_grace`](crate::ClusterConfig::session_grace)): the
/// server removes a snapshot older than that, whatever a hub asks for in `save`.
/// `take` reads the entry and deletes it at the revision it read: of two hubs taking
/// one session at once, one gets it. A snapshot larger than the server's payload limit
/// (1 MiB by default) is not saved: that session resumes only on the hub holding it.
#[derive(Debug, Clone)]
pub struct NatsSessionStore {
    bucket: kv::Store,
}

impl NatsSessionStore {
    pub(crate) fn new(bucket: kv::Store) -> Self {
        NatsSessionStore { bucket }
    }
}

fn failed(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError(format!("{what} in {}: {e}", subject::SESSIONS_BUCKET))
}

#[async_trait::async_trait]
impl SessionStore for NatsSessionStore {
    async fn take(&self, agent: &AgentId, id: &str) -> Result<Option<SessionSnapshot>, StoreError> {
        let key = subject::session_key(agent, id);
        let Some(entry) = self
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
        // Taken once: only the hub whose delete lands at this revision resumes it.
        if self
            .bucket
            .delete_expect_revision(&key, Some(entry.revision))
            .await
            .is_err()
        {
            // Taken or saved anew meanwhile, or NATS away: the caller cannot tell
            // which, and a handshake refused with 1013 comes back to ask again.
            return Err(StoreError(format!(
                "session {} changed while it was taken",
                tunnel_proto::text::Untrusted(id)
            )));
        }
        rmp_serde::from_slice(&entry.value)
            .map(Some)
            .map_err(|e| failed("decode", e))
    }

    async fn save(
        &self,
        agent: &AgentId,
        id: &str,
        snapshot: SessionSnapshot,
        _keep_for: Duration,
    ) -> Result<(), StoreError> {
        let value = rmp_serde::to_vec_named(&snapshot).map_err(|e| failed("encode", e))?;
        self.bucket
            .put(subject::session_key(agent, id), value.into())
            .await
            .map(|_| ())
            .map_err(|e| failed("save", e))
    }

    async fn remove(&self, agent: &AgentId, id: &str) -> Result<(), StoreError> {
        self.bucket
            .delete(subject::session_key(agent, id))
            .await
            .map_err(|e| failed("remove", e))
    }
}
