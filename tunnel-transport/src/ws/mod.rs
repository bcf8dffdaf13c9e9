//! The WebSocket transport, on tokio-tungstenite.

mod burst;
mod client;
mod pump;
mod server;

pub use client::WsConnector;
pub use server::WsListener;

/// Upgrade header naming the agent's sync target.
pub const HEADER_SYNC_TARGET: &str = "x-synctarget";
/// Upgrade header naming the agent's workspace.
pub const HEADER_WORKSPACE: &str = "x-workspace";
