//! The loop that reads one connection and feeds the router.

use tunnel_proto::messages::{Close, ReconnectHint, TypedMessage};
use tunnel_proto::{CloseCode, MessageType};
use tunnel_transport::{ConnectionReceiver, ConnectionSender, RecvError};

use crate::reliable::{Reliable, Verdict};
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
    reliable: Option<&Reliable>,
) -> SessionEnd {
    // One timer for standalone acks, reset rather than re-created per message, and
    // allocated only on sessions that acknowledge (idle connections stay small).
    let mut ack_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let mut ack_armed = false;
    loop {
        // Ask for the ack deadline only while no timer is armed: an armed deadline
        // never needs to move earlier (acks owed at once are sent by `on_inbound`), and
        // a timer outliving its ack fires harmlessly. One lock per message is enough.
        if !ack_armed
            && let Some(reliable) = reliable
            && let Some(at) = reliable.ack_due_at()
        {
            let timer = ack_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            timer.as_mut().reset(at);
            ack_armed = true;
        }
        let ack_wait = async {
            match ack_timer.as_mut() {
                Some(timer) if ack_armed => timer.as_mut().await,
                _ => std::future::pending().await,
            }
        };
        let received = tokio::select! {
            biased;
            r = receiver.recv() => r,
            () = ack_wait => {
                ack_armed = false;
                if let Some(reliable) = reliable {
                    reliable.send_ack_if_due(&sender);
                }
                continue;
            }
        };
        let env = match received {
            Ok(Some(env)) => env,
            Ok(None) => return SessionEnd::Closed,
            Err(e) => return SessionEnd::Failed(e),
        };
        if let Some(reliable) = reliable {
            match reliable.on_inbound(&env, &sender) {
                Verdict::Deliver => {}
                Verdict::Drop => continue,
                Verdict::Violation(reason) => {
                    tracing::warn!(connection = sender.info().id, %reason, "session rule broken");
                    sender.abort_with(CloseCode::PROTOCOL_ERROR, &reason);
                    return SessionEnd::Failed(RecvError::Io(reason));
                }
            }
        }
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
