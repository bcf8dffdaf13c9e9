//! The hub's connection for publishing agents' messages into the up stream: one that is
//! never reestablished.
//!
//! Publishes are pipelined. A NATS client that reconnects sends what it had queued when
//! its connection broke on the new one, while what was in the broken connection's
//! buffers is gone: an agent's message could be lost while a later one is stored, and
//! the agent's replay would then store the earlier one after it. So up-stream publishes
//! go through a connection of their own which, once broken, is not reestablished: what
//! it had queued fails with it (the agents replay it, in order, through the next one),
//! and a new connection takes over. [`Publishers`] keeps one connected while NATS is
//! reachable; each connection has its generation, which the per-connection fences of
//! the hub compare (an agent's connection publishes through one generation at a time).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::watch;

use crate::{ClusterConfig, ClusterError};

/// The current publishing connection, when there is one.
#[derive(Debug)]
pub(crate) struct Publishers {
    current: Arc<watch::Sender<Option<Arc<Publisher>>>>,
}

/// One publishing connection (never reestablished) and its JetStream context.
#[derive(Debug)]
pub(crate) struct Publisher {
    /// Which connection of this hub's this is (1 for the first).
    pub(crate) generation: u64,
    pub(crate) js: jetstream::Context,
    client: async_nats::Client,
}

/// The first and the longest wait between two attempts to open a new publishing
/// connection.
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_AT_MOST: Duration = Duration::from_secs(1);

/// How often the publishing connection's state is looked at besides its events.
const LOOK_EVERY: Duration = Duration::from_secs(1);

impl Publishers {
    /// Opens the first publishing connection (failing as [`ClusterError::Connect`]
    /// when NATS cannot be reached) and keeps one open from then on, until dropped.
    pub(crate) async fn connect(
        config: &ClusterConfig,
        acks_in_flight: usize,
    ) -> Result<Self, ClusterError> {
        let current = Arc::new(watch::Sender::new(None));
        let first = open(config, acks_in_flight, 1, Arc::downgrade(&current))
            .await
            .map_err(|source| ClusterError::Connect {
                url: config.url.clone(),
                source,
            })?;
        current.send_replace(Some(Arc::new(first)));
        tokio::spawn(keep(
            config.clone(),
            acks_in_flight,
            Arc::downgrade(&current),
        ));
        Ok(Publishers { current })
    }

    /// The publishing connection, while it is connected.
    pub(crate) fn current(&self) -> Option<Arc<Publisher>> {
        self.current
            .borrow()
            .as_ref()
            .filter(|p| p.connected())
            .cloned()
    }
}

impl Publisher {
    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

/// Opens publishing connection `generation`: it refuses to be reestablished (its one
/// reconnect attempt fails in the auth callback), and when it breaks it leaves
/// `current` at once.
async fn open(
    config: &ClusterConfig,
    acks_in_flight: usize,
    generation: u64,
    current: Weak<watch::Sender<Option<Arc<Publisher>>>>,
) -> Result<Publisher, async_nats::ConnectError> {
    let opened = Arc::new(AtomicBool::new(false));
    let client = async_nats::ConnectOptions::with_auth_callback(move |_nonce| {
        let again = opened.swap(true, Ordering::Relaxed);
        async move {
            if again {
                Err(async_nats::AuthError::new(
                    "an up-stream publishing connection is not reestablished",
                ))
            } else {
                Ok(async_nats::Auth::new())
            }
        }
    })
    .name(format!("tunnel-hub {} up {generation}", config.hub_id))
    .max_reconnects(1)
    .event_callback(move |event| {
        let current = current.clone();
        async move {
            if matches!(
                event,
                async_nats::Event::Disconnected | async_nats::Event::Closed
            ) && let Some(current) = current.upgrade()
            {
                current.send_if_modified(|p| {
                    let this = p.as_ref().is_some_and(|p| p.generation == generation);
                    if this {
                        *p = None;
                    }
                    this
                });
            }
        }
    })
    .connect(config.url.as_str())
    .await?;
    // Publishes and their acks wait at most `publish_timeout` each (the context's own
    // timers); past the acks in flight a publish waits for room rather than failing.
    let js = jetstream::ContextBuilder::new()
        .timeout(config.publish_timeout)
        .max_ack_inflight(acks_in_flight)
        .backpressure_on_inflight(true)
        .build(client.clone());
    Ok(Publisher {
        generation,
        js,
        client,
    })
}

/// Opens a new publishing connection each time the current one broke, until
/// [`Publishers`] is dropped. A break is seen from the connection's events at once, and
/// from its state at the latest [`LOOK_EVERY`] later (an event may come before the
/// connection is installed).
async fn keep(
    config: ClusterConfig,
    acks_in_flight: usize,
    current: Weak<watch::Sender<Option<Arc<Publisher>>>>,
) {
    let mut generation = 1;
    let mut wait = RETRY_FIRST;
    loop {
        let Some(slot) = current.upgrade() else {
            return;
        };
        let broken = slot.borrow().as_ref().is_none_or(|p| !p.connected());
        if !broken {
            let mut watching = slot.subscribe();
            drop(slot);
            tokio::select! {
                // An error: `Publishers` was dropped.
                changed = watching.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(LOOK_EVERY) => {}
            }
            continue;
        }
        drop(slot);
        generation += 1;
        match open(&config, acks_in_flight, generation, current.clone()).await {
            Ok(publisher) => {
                let Some(slot) = current.upgrade() else {
                    return;
                };
                slot.send_replace(Some(Arc::new(publisher)));
                wait = RETRY_FIRST;
            }
            Err(e) => {
                tracing::debug!(error = %e, generation, "no up-stream publishing connection yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RETRY_AT_MOST);
            }
        }
    }
}

#[cfg(test)]
#[cfg(feature = "testing")]
mod tests {
    use super::*;
    use crate::testing::Nats;

    async fn stored(publisher: &Publisher, n: u32) -> bool {
        let subject = crate::subject::up(&tunnel_transport::AgentId::new("ws", "a"), "event");
        match publisher.js.publish(subject, n.to_string().into()).await {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn a_broken_publishing_connection_is_replaced_not_reestablished() {
        let mut nats = Nats::start("publisher");
        let config = ClusterConfig::new(nats.url(), "hub-p");
        let client = async_nats::connect(nats.url()).await.expect("nats");
        crate::streams::ensure(&jetstream::new(client), &config)
            .await
            .expect("streams");
        let publishers = Publishers::connect(&config, 64).await.expect("connect");
        let first = publishers.current().expect("connected");
        assert_eq!(first.generation, 1);
        assert!(stored(&first, 1).await);

        nats.restart();
        let mut next = None;
        for _ in 0..200 {
            if let Some(p) = publishers.current().filter(|p| p.generation > 1) {
                next = Some(p);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let next = next.expect("a new publishing connection after NATS came back");
        assert!(stored(&next, 2).await);
        // The first one tried its one reconnect and gave up: nothing it had queued can
        // reach the restarted server.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!first.connected());
        assert_eq!(
            first.client.statistics().connects.load(Ordering::Relaxed),
            1
        );
        assert!(!stored(&first, 3).await);
    }
}
