//! A cluster hub's settings and its errors.

use std::time::Duration;

/// Settings of a hub's membership in a cluster ([`crate::Cluster::connect`]).
///
/// ```
/// use std::time::Duration;
/// use tunnel_cluster::ClusterConfig;
///
/// let config = ClusterConfig::new("nats://127.0.0.1:4222", "hub-a")
///     .down_per_subject(50_000)
///     .up_max_age(Duration::from_secs(7 * 24 * 3600));
/// assert_eq!(config.hub_id, "hub-a");
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// The NATS server (`nats://host:port`; several separated by commas).
    pub url: String,
    /// This hub's name in presence entries, unique in the cluster (at most 128 bytes
    /// of visible ASCII).
    pub hub_id: String,
    /// How long agents' messages stay in the up stream. Default 24 h.
    pub up_max_age: Duration,
    /// The up stream's size bound; past it the oldest messages go. Default 1 GiB.
    pub up_max_bytes: i64,
    /// How long a message for an offline agent waits in the down stream. Default 24 h.
    pub down_max_age: Duration,
    /// The down stream's size bound; past it a backend's publish is refused. Default
    /// 256 MiB.
    pub down_max_bytes: i64,
    /// Messages waiting per agent and type in the down stream; past it a backend's
    /// publish to that subject is refused (the stream discards new, per subject).
    /// Default 10,000.
    pub down_per_subject: i64,
    /// The window in which the up stream drops a second publish of one agent message
    /// (`Nats-Msg-Id`), which covers a replay after a hub died before acknowledging.
    /// Default 2 min.
    pub duplicate_window: Duration,
    /// How long a publish waits for the stream's ack before the message is treated as
    /// not stored (the agent keeps it and replays it). Default 5 s.
    pub publish_timeout: Duration,
    /// Down messages sent to one agent and not yet acknowledged by it (and deleted from
    /// the stream). Default 256.
    pub down_in_flight: usize,
    /// Backend calls one hub forwards at once; more are answered with an error.
    /// Default 1,024.
    pub max_calls: usize,
    /// How often the hub renews its heartbeat in the hubs bucket. A hub whose last beat
    /// is three intervals older than the newest is dead: one live hub then removes the
    /// presence entries naming it. Default 5 s.
    pub hub_heartbeat: Duration,
    /// How long a session's record outlives its last write in the sessions bucket,
    /// for its agent to resume it on any hub (the bucket's `max_age`: every hub of a
    /// cluster must use the same). Give the hub's
    /// [`HubSessions`](tunnel_router::HubSessions) the same grace; at most the up
    /// stream's duplicate window. Default 60 s.
    pub session_grace: Duration,
    /// The sessions bucket's size bound; past it a write is refused (new sessions are
    /// refused with `1013` until records expire). Default 1 GiB.
    pub sessions_max_bytes: i64,
}

impl ClusterConfig {
    /// A cluster on `url`, this hub named `hub_id`, with defaults otherwise.
    pub fn new(url: impl Into<String>, hub_id: impl Into<String>) -> Self {
        ClusterConfig {
            url: url.into(),
            hub_id: hub_id.into(),
            up_max_age: Duration::from_secs(24 * 3600),
            up_max_bytes: 1 << 30,
            down_max_age: Duration::from_secs(24 * 3600),
            down_max_bytes: 256 << 20,
            down_per_subject: 10_000,
            duplicate_window: Duration::from_secs(120),
            publish_timeout: Duration::from_secs(5),
            down_in_flight: 256,
            max_calls: 1024,
            hub_heartbeat: Duration::from_secs(5),
            session_grace: Duration::from_secs(60),
            sessions_max_bytes: 1 << 30,
        }
    }

    /// Sets [`ClusterConfig::up_max_age`].
    pub fn up_max_age(mut self, age: Duration) -> Self {
        self.up_max_age = age;
        self
    }

    /// Sets [`ClusterConfig::down_max_age`].
    pub fn down_max_age(mut self, age: Duration) -> Self {
        self.down_max_age = age;
        self
    }

    /// Sets [`ClusterConfig::down_per_subject`].
    pub fn down_per_subject(mut self, n: i64) -> Self {
        self.down_per_subject = n.max(1);
        self
    }

    /// Sets [`ClusterConfig::hub_heartbeat`] (at least 10 ms).
    pub fn hub_heartbeat(mut self, every: Duration) -> Self {
        self.hub_heartbeat = every.max(Duration::from_millis(10));
        self
    }

    /// Sets [`ClusterConfig::session_grace`] (at least 1 s).
    pub fn session_grace(mut self, grace: Duration) -> Self {
        self.session_grace = grace.max(Duration::from_secs(1));
        self
    }

    /// Sets [`ClusterConfig::publish_timeout`].
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Checks what the server cannot: the hub id's form.
    pub(crate) fn check(&self) -> Result<(), ClusterError> {
        if self.hub_heartbeat < Duration::from_millis(10) {
            return Err(ClusterError::Config(
                "hub_heartbeat must be at least 10 ms".into(),
            ));
        }
        let ok = !self.hub_id.is_empty()
            && self.hub_id.len() <= 128
            && self.hub_id.bytes().all(|b| (0x21..=0x7e).contains(&b));
        if ok {
            Ok(())
        } else {
            Err(ClusterError::Config(
                "hub_id must be 1 to 128 bytes of visible ASCII".into(),
            ))
        }
    }
}

/// Why joining or using the cluster failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// A setting is out of its bounds.
    #[error("invalid cluster settings: {0}")]
    Config(String),
    /// The NATS server could not be reached.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// The server.
        url: String,
        /// Why.
        source: async_nats::ConnectError,
    },
    /// A stream, consumer or bucket could not be created or read (JetStream off, or
    /// a conflicting definition made by someone else).
    #[error("JetStream: {0}")]
    JetStream(String),
    /// A publish was refused or not acknowledged in time.
    #[error("publish to {subject} failed: {reason}")]
    Publish {
        /// The subject.
        subject: String,
        /// Why (a full stream refuses with `maximum messages per subject exceeded`).
        reason: String,
    },
    /// No hub holds the agent (a call found no responder).
    #[error("no hub holds agent {0}")]
    NoHub(String),
    /// The call's hub answered with an error: the agent failed it, timed out, or is gone.
    #[error("the call failed: {0}")]
    Call(String),
    /// A payload could not be encoded or decoded.
    #[error("payload: {0}")]
    Payload(String),
}
