//! The WebSocket writer task and the reader adapter.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tunnel_proto::{CloseCode, FrameKind};

use super::burst::MessagesDone;
use crate::config::ConnectionConfig;
use crate::connection::{Connection, ConnectionInfo, Incoming, Outgoing, Shared};
use crate::error::CloseReason;

/// Most messages written between two flushes.
const MAX_BATCH: usize = 512;

/// Longest a final close frame may take on a connection that is being torn down.
const FINAL_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Wraps an upgraded, handshaken WebSocket in a [`Connection`]: spawns the writer task
/// and adapts the read half into the receiver's frame stream.
pub(crate) fn spawn_connection<S>(
    ws: WebSocketStream<S>,
    info: ConnectionInfo,
    config: &ConnectionConfig,
    admitted: Option<crate::admission::Admitted>,
    done: Option<MessagesDone>,
) -> Connection
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = Shared::with_writer(info, config, admitted);
    let (sink, stream) = ws.split();
    let (tx, rx) = mpsc::channel(config.outbound_queue.max(1));
    tokio::spawn(write_loop(sink, rx, shared.clone(), config.ping_interval));
    Connection::new(
        shared,
        tx,
        Box::pin(WsFrames {
            inner: stream,
            done: false,
            messages: done,
        }),
    )
}

pub(crate) fn close_message(code: CloseCode, reason: &str) -> Message {
    // A close reason is at most 123 bytes on the wire.
    Message::Close(Some(CloseFrame {
        code: code.as_u16().into(),
        reason: Utf8Bytes::from(tunnel_proto::text::truncate(reason, 123)),
    }))
}

pub(crate) fn data_message(kind: FrameKind, bytes: Bytes) -> Result<Message, String> {
    Ok(match kind {
        FrameKind::Binary => Message::Binary(bytes),
        FrameKind::Text => Message::Text(
            Utf8Bytes::try_from(bytes).map_err(|e| format!("codec produced invalid UTF-8: {e}"))?,
        ),
    })
}

async fn write_loop<S>(
    mut sink: SplitSink<WebSocketStream<S>, Message>,
    mut rx: mpsc::Receiver<Outgoing>,
    shared: Arc<Shared>,
    ping_interval: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let kind = shared.codec.frame_kind();
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + ping_interval, ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result: Result<(), String> = loop {
        tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => break Ok(()),
            msg = rx.recv() => {
                // Boxed (one allocation per batch written): held inline, a batch's
                // futures would make every idle connection's writer task larger.
                let step = Box::pin(async {
                    match msg {
                        None => {
                            shared.set_reason(CloseReason::Local(CloseCode::NORMAL, "all senders dropped".into()));
                            send_close(&mut sink, shared.info.format, CloseCode::NORMAL, "", None).await?;
                            Ok(false)
                        }
                        Some(first) => write_batch(&mut sink, &mut rx, first, kind, &shared).await,
                    }
                });
                let more = tokio::select! {
                    biased;
                    () = shared.shutdown.cancelled() => break Ok(()),
                    r = step => r,
                };
                match more {
                    Ok(true) => {}
                    Ok(false) => break Ok(()),
                    Err(e) => break Err(e),
                }
            }
            _ = ping.tick() => {
                let sent = tokio::select! {
                    biased;
                    () = shared.shutdown.cancelled() => break Ok(()),
                    r = sink.send(Message::Ping(shared.ping_payload())) => r,
                };
                if let Err(e) = sent {
                    break Err(e.to_string());
                }
            }
        }
    };
    match result {
        Err(e) => shared.end(CloseReason::Io(e)),
        Ok(()) if shared.shutdown.is_cancelled() => {
            if let Some((code, reason)) = shared.final_close_frame() {
                let _ = tokio::time::timeout(
                    FINAL_CLOSE_TIMEOUT.min(shared.close_timeout),
                    Box::pin(send_close(
                        &mut sink,
                        shared.info.format,
                        code,
                        &reason,
                        None,
                    )),
                )
                .await;
            }
        }
        Ok(()) => {}
    }
    drop(rx);
    shared.writer_done.cancel();
}

/// Sends a `close` envelope with `code` and `reason` (and `corr`, answering a
/// handshake), then the close frame, as PROTOCOL.md asks of every close a side starts:
/// the envelope carries the reason up to [`MAX_KEPT`](tunnel_proto::text::MAX_KEPT)
/// bytes, the frame only 123 bytes of it.
pub(crate) async fn send_close<K>(
    sink: &mut K,
    format: tunnel_proto::Format,
    code: CloseCode,
    reason: &str,
    corr: Option<u64>,
) -> Result<(), String>
where
    K: futures_util::Sink<Message, Error = WsError> + Unpin,
{
    use tunnel_proto::messages::{Close, TypedMessage};
    let close = Close {
        code: code.as_u16(),
        reason: tunnel_proto::text::truncate(reason, tunnel_proto::text::MAX_KEPT).to_owned(),
        reconnect: None,
    };
    if let Ok(mut env) = close.to_envelope(crate::next_message_id(), crate::unix_millis(), format) {
        env.correlation = corr;
        let mut buf = Vec::new();
        if format.codec().encode(&env, &mut buf).is_ok() {
            sink.feed(data_message(format.codec().frame_kind(), buf.into())?)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    sink.send(close_message(code, reason))
        .await
        .map_err(|e| e.to_string())
}

/// Writes `first` and whatever else is queued (up to [`MAX_BATCH`]), then flushes.
/// Returns `Ok(false)` once a close frame was sent.
///
/// Queued messages are taken [`TAKE`] at a time (`recv_many` gives their places in
/// the queue back in one step, where `try_recv` takes the queue's lock for each).
/// When the queue runs dry the writer yields to the scheduler once before flushing:
/// a producer on another worker usually queues more in that time, so one write
/// syscall carries many messages instead of one each.
async fn write_batch<S>(
    sink: &mut SplitSink<WebSocketStream<S>, Message>,
    rx: &mut mpsc::Receiver<Outgoing>,
    first: Outgoing,
    kind: FrameKind,
    shared: &Shared,
) -> Result<bool, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Allocated per batch, not kept: an idle connection holds no batch buffer.
    let mut taken = Vec::new();
    let mut next = Some(first);
    let mut written = 0;
    loop {
        while let Some(msg) = next.take() {
            if shared.has_ended() {
                // Ended meanwhile (aborted, replaced): nothing more of the queue goes out.
                return Ok(true);
            }
            match msg {
                Outgoing::Data(bytes, slot) => {
                    shared.count_written(slot, bytes.len());
                    sink.feed(data_message(kind, bytes)?)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Outgoing::Close(code, reason) => {
                    shared.set_reason(CloseReason::Local(code, reason.clone()));
                    send_close(sink, shared.info.format, code, &reason, None).await?;
                    return Ok(false);
                }
            }
            written += 1;
            if written < MAX_BATCH {
                next = take_queued(rx, &mut taken, MAX_BATCH - written);
            }
        }
        if written >= MAX_BATCH {
            break;
        }
        tokio::task::yield_now().await;
        next = take_queued(rx, &mut taken, MAX_BATCH - written);
        if next.is_none() {
            break;
        }
    }
    sink.flush().await.map_err(|e| e.to_string())?;
    Ok(true)
}

/// Messages taken from the queue at once, at most.
const TAKE: usize = 64;

/// The next queued message without waiting: from `taken`, refilled from the queue with
/// up to `limit` more when it is empty.
fn take_queued(
    rx: &mut mpsc::Receiver<Outgoing>,
    taken: &mut Vec<Outgoing>,
    limit: usize,
) -> Option<Outgoing> {
    if taken.is_empty() {
        use futures_util::FutureExt as _;
        // `recv_many` only waits when the queue is empty: polled once, it takes what
        // is there. Kept in reverse so that `pop` yields them in order.
        rx.recv_many(taken, limit.min(TAKE)).now_or_never()?;
        taken.reverse();
    }
    taken.pop()
}

/// The read half as a stream of [`Incoming`].
struct WsFrames<S> {
    inner: SplitStream<WebSocketStream<S>>,
    done: bool,
    /// Told of every complete data message, to give its read budget back.
    messages: Option<MessagesDone>,
}

impl<S> Stream for WsFrames<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Item = Incoming;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Incoming>> {
        if self.done {
            return Poll::Ready(None);
        }
        let item = match futures_util::ready!(self.inner.poll_next_unpin(cx)) {
            None => Incoming::Closed(None),
            Some(Ok(msg)) => match msg {
                Message::Binary(b) => {
                    self.message_done();
                    return Poll::Ready(Some(Incoming::Data(b, FrameKind::Binary)));
                }
                Message::Text(t) => {
                    self.message_done();
                    return Poll::Ready(Some(Incoming::Text(t)));
                }
                // Control frames may come between the fragments of a data message:
                // their bytes are taken off the count, the message's stay.
                Message::Ping(p) => {
                    self.control_done(p.len());
                    return Poll::Ready(Some(Incoming::Ping));
                }
                Message::Frame(f) => {
                    self.control_done(f.len());
                    return Poll::Ready(Some(Incoming::Ping));
                }
                Message::Pong(p) => {
                    self.control_done(p.len());
                    return Poll::Ready(Some(Incoming::Pong(p)));
                }
                Message::Close(frame) => {
                    // tungstenite queued the close reply; polling once more flushes it
                    // (and, on the server, ends the stream).
                    let _ = self.inner.poll_next_unpin(cx);
                    Incoming::Closed(
                        frame.map(|f| (CloseCode(u16::from(f.code)), f.reason.as_str().to_owned())),
                    )
                }
            },
            Some(Err(e)) => map_read_error(e),
        };
        self.done = true;
        Poll::Ready(Some(item))
    }
}

impl<S> WsFrames<S> {
    /// A whole data message was read: what it held of the read budget goes back.
    fn message_done(&self) {
        if let Some(messages) = &self.messages {
            messages.bump();
        }
    }

    /// A control frame of `payload` bytes was read.
    fn control_done(&self, payload: usize) {
        if let Some(messages) = &self.messages {
            messages.control(payload);
        }
    }
}

pub(crate) fn map_read_error(e: WsError) -> Incoming {
    match e {
        WsError::ConnectionClosed | WsError::AlreadyClosed => Incoming::Closed(None),
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => Incoming::Protocol(
            CloseCode::MESSAGE_TOO_BIG,
            format!("message of {size} bytes exceeds max_message_size {max_size} bytes"),
        ),
        WsError::Capacity(e) => Incoming::Protocol(CloseCode::MESSAGE_TOO_BIG, e.to_string()),
        WsError::Utf8(e) => Incoming::Protocol(
            CloseCode::INVALID_PAYLOAD,
            format!("invalid UTF-8 in text frame: {e}"),
        ),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            Incoming::Failed("connection reset without closing handshake".into())
        }
        WsError::Protocol(e) => Incoming::Protocol(CloseCode::PROTOCOL_ERROR, e.to_string()),
        WsError::Io(e) => Incoming::Failed(e.to_string()),
        other => Incoming::Failed(other.to_string()),
    }
}
