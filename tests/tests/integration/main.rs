//! Integration tests over real loopback WebSockets: hub, agents, raw clients.

mod auth;
mod bad_input;
mod hostile;
mod keepalive;
mod layers;
mod lifecycle;
mod metrics;
mod observability;
mod pool;
mod reconnect;
mod requests;
mod rules;
mod sessions;
mod support;
mod tls;
