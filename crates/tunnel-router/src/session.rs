//! The loop that reads one connection and feeds the router.

use tunnel_proto::MessageType;
use tunnel_proto::messages::{Close, ReconnectHint, TypedMessage};
use tunnel_transport::{ConnectionReceiver, ConnectionSender, RecvError};

use crate::router::{Inbound, Router};

/// How a session ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// The connection closed in an orderly way.
    Closed,
    /// The connection failed.
    Failed(RecvError),
}

/// Reads messages until the connection ends, answering protocol pings, keeping the
/// reconnect hint of a `close` message in `hint`, and handing everything else to
/// `router`, one message at a time.
pub(crate) async fn run(
    mut receiver: ConnectionReceiver,
    sender: ConnectionSender,
    router: &mut Router,
    hint: &mut Option<ReconnectHint>,
) -> SessionEnd {
    loop {
        let env = match receiver.recv().await {
            Ok(Some(env)) => env,
            Ok(None) => return SessionEnd::Closed,
            Err(e) => return SessionEnd::Failed(e),
        };
        match env.kind {
            MessageType::Ping => {
                let pong = sender.envelope(MessageType::Pong).with_correlation(env.id);
                let _ = sender.try_send(&pong);
                continue;
            }
            MessageType::Close => {
                match Close::from_envelope(&env) {
                    Ok(close) => {
                        tracing::debug!(code = close.code, reason = %close.reason, "peer is closing");
                        *hint = close.reconnect;
                    }
                    Err(e) => tracing::debug!(error = %e, "ignoring a malformed close message"),
                }
                continue;
            }
            MessageType::Handshake | MessageType::HandshakeAck => {
                tracing::debug!(
                    connection = sender.info().id,
                    "ignoring a repeated handshake"
                );
                continue;
            }
            _ => {}
        }
        let kind = env.kind.clone();
        match router.dispatch(Inbound::new(env, sender.clone())).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(agent = %sender.info().agent, %kind, "no handler for message");
            }
            Err(e) => {
                tracing::warn!(agent = %sender.info().agent, %kind, error = %e, "handler failed");
            }
        }
    }
}
