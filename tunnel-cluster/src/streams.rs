//! The up and down streams and the presence bucket: created with the configured bounds
//! when missing, used as they are when present.

use async_nats::jetstream::{self, kv, stream};

use crate::subject::{
    DOWN_STREAM, HUBS_BUCKET, PREFIX, PRESENCE_BUCKET, SESSIONS_BUCKET, UP_STREAM,
};
use crate::{ClusterConfig, ClusterError};

/// The up and down streams.
pub(crate) async fn ensure(
    js: &jetstream::Context,
    config: &ClusterConfig,
) -> Result<(stream::Stream, stream::Stream), ClusterError> {
    let up = made(
        js,
        stream::Config {
            name: UP_STREAM.into(),
            subjects: vec![format!("{PREFIX}.up.>")],
            max_age: config.up_max_age,
            max_bytes: config.up_max_bytes,
            // Old messages go first: agents are never refused for a backend's backlog.
            discard: stream::DiscardPolicy::Old,
            duplicate_window: config.duplicate_window,
            storage: stream::StorageType::File,
            ..Default::default()
        },
    )
    .await
    .map_err(|e| ClusterError::JetStream(format!("stream {UP_STREAM}: {e}")))?;
    let down = made(
        js,
        stream::Config {
            name: DOWN_STREAM.into(),
            subjects: vec![crate::subject::down_stream_subjects()],
            // A message leaves once the agent has it (the hub that delivered it deletes
            // it); what waits is bounded per agent and type, and in all, and a full
            // stream refuses the backend's publish. Hubs read an agent's messages by
            // subject with direct gets: no consumer per agent.
            allow_direct: true,
            max_age: config.down_max_age,
            max_bytes: config.down_max_bytes,
            max_messages_per_subject: config.down_per_subject,
            discard: stream::DiscardPolicy::New,
            discard_new_per_subject: true,
            duplicate_window: config.duplicate_window,
            storage: stream::StorageType::File,
            ..Default::default()
        },
    )
    .await
    .map_err(|e| ClusterError::JetStream(format!("stream {DOWN_STREAM}: {e}")))?;
    // A stream made by another version would store calls and refuse direct gets.
    let made = &down.cached_info().config;
    if made.retention != stream::RetentionPolicy::Limits
        || !made.allow_direct
        || made.subjects != [crate::subject::down_stream_subjects()]
    {
        return Err(ClusterError::Config(format!(
            "stream {DOWN_STREAM} exists with another configuration (retention {:?}, subjects {:?}, direct get {}); this version needs limits retention, subjects [{}] and direct get: delete the stream or update it",
            made.retention,
            made.subjects,
            made.allow_direct,
            crate::subject::down_stream_subjects()
        )));
    }
    Ok((up, down))
}

/// The stream `config` names: the one there, else one made with `config`.
///
/// Hubs that start together race to make it, and nats-server 2.9 refuses all but the
/// first with "subjects overlap with an existing stream" (10065) rather than
/// answering the others as a create of the same stream: a refused create reads the
/// stream again, and fails only when it is still not there.
async fn made(js: &jetstream::Context, config: stream::Config) -> Result<stream::Stream, String> {
    let name = config.name.clone();
    match js.get_or_create_stream(config).await {
        Ok(stream) => Ok(stream),
        Err(refused) => js
            .get_stream(&name)
            .await
            .map_err(|e| format!("{refused} (and read again: {e})")),
    }
}

/// The presence bucket: one entry per connected agent, no history.
pub(crate) async fn presence(js: &jetstream::Context) -> Result<kv::Store, ClusterError> {
    bucket(js, PRESENCE_BUCKET, std::time::Duration::ZERO, -1).await
}

/// The sessions bucket: one record per session, kept for the cluster's grace period
/// after its last write (`max_age`: the server removes older ones), at most
/// `max_bytes` in all (past it a write is refused: new sessions are then refused with
/// `1013`, and records are not rewritten). Every hub that keeps sessions there must agree on the
/// grace period: with a bucket made with another one, the error is returned beside
/// the bucket (for [`crate::Cluster::session_store`] to refuse).
pub(crate) async fn sessions(
    js: &jetstream::Context,
    config: &ClusterConfig,
) -> Result<(kv::Store, Option<String>), ClusterError> {
    let store = bucket(
        js,
        SESSIONS_BUCKET,
        config.session_grace,
        config.sessions_max_bytes,
    )
    .await?;
    let made = store.stream.cached_info().config.max_age;
    let mismatch = (made != config.session_grace).then(|| {
        format!(
            "bucket {SESSIONS_BUCKET} keeps sessions {made:?}, this hub's session_grace is {:?}: every hub of a cluster that keeps sessions in NATS needs the same grace period (or delete the bucket)",
            config.session_grace
        )
    });
    Ok((store, mismatch))
}

/// The hubs bucket: one heartbeat entry per live hub. An entry is kept at most an hour
/// (a hub beats every few seconds; a dead hub's entry is removed by the next sweep).
pub(crate) async fn hubs(js: &jetstream::Context) -> Result<kv::Store, ClusterError> {
    bucket(js, HUBS_BUCKET, std::time::Duration::from_secs(3600), -1).await
}

/// A KV bucket without history, its entries kept at most `max_age` (zero: unbounded),
/// at most `max_bytes` in all (-1: unbounded).
///
/// Its stream is made here, as any KV client makes a bucket's (`KV_<bucket>` on
/// `$KV.<bucket>.>`), rather than by async-nats's `create_key_value`, whose account
/// query does not parse a 2.9 server's answer.
async fn bucket(
    js: &jetstream::Context,
    name: &str,
    max_age: std::time::Duration,
    max_bytes: i64,
) -> Result<kv::Store, ClusterError> {
    made(
        js,
        stream::Config {
            name: format!("KV_{name}"),
            subjects: vec![format!("$KV.{name}.>")],
            max_age,
            max_bytes,
            max_messages_per_subject: 1,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            storage: stream::StorageType::File,
            // The server refuses a window longer than the entries live.
            duplicate_window: if max_age.is_zero() {
                std::time::Duration::from_secs(120)
            } else {
                max_age.min(std::time::Duration::from_secs(120))
            },
            ..Default::default()
        },
    )
    .await
    .map_err(|e| ClusterError::JetStream(format!("bucket {name}: {e}")))?;
    js.get_key_value(name)
        .await
        .map_err(|e| ClusterError::JetStream(format!("bucket {name}: {e}")))
}

/// The keys of `store` (with a value or a delete marker), at most `max` of them.
///
/// Read from the bucket's stream subjects, not through async-nats's `keys()`: that
/// one reads through a consumer whose pending count nats-server 2.9 lets go stale
/// while the bucket is written to (nats-server#3481), and then never ends. A hubs
/// bucket is written every heartbeat and a presence bucket at every connect.
pub(crate) async fn keys(store: &kv::Store, max: usize) -> Result<Vec<String>, String> {
    use futures_util::StreamExt;
    let mut subjects = store
        .stream
        .info_with_subjects(format!("{}>", store.prefix))
        .await
        .map_err(|e| e.to_string())?;
    let mut keys = Vec::new();
    while let Some(subject) = subjects.next().await {
        let (subject, _) = subject.map_err(|e| e.to_string())?;
        if let Some(key) = subject.strip_prefix(store.prefix.as_str()) {
            keys.push(key.to_owned());
        }
        if keys.len() >= max {
            break;
        }
    }
    keys.sort_unstable();
    Ok(keys)
}
