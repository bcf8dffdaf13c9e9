//! Hubs joined through NATS: any backend, in any language, reaches any agent, and what
//! agents send lands durably in JetStream.
//!
//! - [`Cluster`] is a hub's membership: [`Cluster::router`] publishes what agents send
//!   into the up stream (`TUNNEL_UP`, one subject per agent and type) and acknowledges it
//!   to the agent only once the stream stored it; [`Cluster::serve`] delivers what
//!   backends put in the down stream (`TUNNEL_DOWN`) to the agents this hub holds,
//!   answers backends' calls, and keeps presence (which hub holds which agent) in the
//!   `tunnel_presence` KV bucket, closing an agent that another hub took over.
//! - [`Backend`] is the other side, for a Rust control plane: send to an agent, call
//!   it, read what agents sent, see who is connected.
//! - [`subject`] spells every subject, header, stream and bucket (PROTOCOL.md §11), so
//!   a backend in another language can be written from the specification alone.
//!
//! Without a cluster, hubs work as before; only this crate depends on NATS.

mod backend;
mod config;
mod hub;
mod publisher;
mod sessions;
mod streams;
pub mod subject;
#[cfg(feature = "testing")]
pub mod testing;

pub use backend::{Backend, PresenceChange, Reply, UpMessage};
pub use config::{ClusterConfig, ClusterError};
pub use hub::{Cluster, Presence, Serving};
pub use sessions::NatsSessionStore;
