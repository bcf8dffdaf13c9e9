//! A connection to a peer, independent of the transport that carries it.
//!
//! A [`Connection`] is two halves: a cloneable [`ConnectionSender`] that encodes and
//! queues envelopes for the transport's writer, and a [`ConnectionReceiver`] that pulls
//! frames from the transport, decodes them and runs keepalive. Reading happens in the
//! task that calls [`ConnectionReceiver::recv`]: nothing is read while nobody asks, so a
//! slow consumer slows its peer through TCP instead of growing a buffer.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tunnel_metrics::{Direction, MessageTally, Recorder, TypeSlot};
use tunnel_proto::{CloseCode, Codec, Envelope, Format, FrameKind, Limits, MessageType, Payload};

use crate::AgentId;
use crate::config::ConnectionConfig;
use crate::error::{CloseReason, RecvError, SendError};

mod clock;
mod keepalive;

pub(crate) use clock::next_connection_id;
pub use clock::{next_message_id, unix_millis};
pub(crate) use keepalive::KeepaliveCheck;

/// What is known about an established connection.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectionInfo {
    /// A number unique to this connection within the process.
    pub id: u64,
    /// The agent at the other end (on an agent: its own identity).
    pub agent: AgentId,
    /// The session id the hub assigned in its handshake reply.
    pub session_id: String,
    /// Whether this connection continues an earlier session.
    pub resumed: bool,
    /// When resumed: the highest sequence number the peer reported having received in
    /// order (the agent's report on a hub, the hub's on an agent).
    pub peer_last_received: Option<u64>,
    /// The session store's lease of this connection ([`SessionGrant::lease`](crate::SessionGrant::lease)):
    /// of two connections of one agent, the higher lease is the newer. 0 on agents
    /// and without a session store.
    pub session_lease: u64,
    /// The negotiated protocol version.
    pub version: u16,
    /// Capabilities both sides support.
    pub capabilities: Vec<String>,
    /// The codec in use.
    pub format: Format,
    /// The peer's socket address, where the transport has one.
    pub peer_addr: Option<SocketAddr>,
    /// When the handshake completed.
    pub connected_at: SystemTime,
}

impl ConnectionInfo {
    /// Whether both sides agreed on `capability`.
    pub fn has_capability(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }
}

/// What a connection has carried so far (see [`ConnectionSender::stats`]). Message
/// counts include control messages (pings, acks); bytes are encoded sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ConnectionStats {
    /// Messages received.
    pub messages_in: u64,
    /// Encoded bytes received.
    pub bytes_in: u64,
    /// Messages sent: written to the socket by the connection's writer (queued, for a
    /// transport without one, such as the in-memory pair).
    pub messages_out: u64,
    /// Encoded bytes sent.
    pub bytes_out: u64,
    /// The last keepalive round trip, once measured.
    pub rtt: Option<Duration>,
}

/// Queued for a transport's writer.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// An encoded envelope and where its type is counted.
    Data(Bytes, TypeSlot),
    /// Close with this code and reason after everything queued before it.
    Close(CloseCode, String),
}

/// Delivered by a transport's reader.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// One message.
    Data(Bytes, FrameKind),
    /// One text message whose contents the transport has checked to be UTF-8.
    Text(tokio_tungstenite::tungstenite::Utf8Bytes),
    /// A keepalive ping from the peer (already answered by the transport).
    Ping,
    /// A keepalive pong with the payload of our ping.
    Pong(Bytes),
    /// The peer closed, with a code and reason if it gave one.
    Closed(Option<(CloseCode, String)>),
    /// The peer broke the transport's protocol; close with this code.
    Protocol(CloseCode, String),
    /// The socket failed.
    Failed(String),
}

pub(crate) type IncomingStream = Pin<Box<dyn Stream<Item = Incoming> + Send>>;

/// State shared by the halves of a connection and its writer.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) info: ConnectionInfo,
    pub(crate) codec: &'static dyn Codec,
    pub(crate) limits: Limits,
    pub(crate) recorder: Arc<dyn Recorder>,
    pub(crate) send_timeout: Duration,
    pub(crate) close_timeout: Duration,
    pub(crate) inbound_rate: Option<crate::config::InboundRate>,
    keepalive: KeepaliveCheck,
    rtt_micros: AtomicU64,
    /// Messages and encoded bytes each way by type, for [`ConnectionStats`] and the
    /// recorder.
    tally: Arc<MessageTally>,
    /// Whether the recorder reads `tally` (else it is told of every message).
    tracked: bool,
    /// Whether a single writer task counts what goes out (`count_written`); otherwise
    /// `send` counts it.
    counted_by_writer: bool,
    /// The connection's place within the hub's connection limits, given back when the
    /// connection is gone.
    _admitted: Option<crate::admission::Admitted>,
    pub(crate) epoch: Instant,
    /// Cancelled when the connection is over, whoever ended it.
    pub(crate) shutdown: CancellationToken,
    /// Set just before `shutdown` is cancelled: a check that costs one atomic load
    /// (asking the token takes a lock).
    ended: AtomicBool,
    /// Cancelled when the writer has exited.
    pub(crate) writer_done: CancellationToken,
    reason: Mutex<Option<CloseReason>>,
}

impl Shared {
    pub(crate) fn new(info: ConnectionInfo, config: &ConnectionConfig) -> Arc<Shared> {
        Self::build(info, config, false, None)
    }

    /// For transports whose one writer task calls [`Shared::count_written`];
    /// `admitted` is the connection's place within the hub's limits, held as long as
    /// the connection.
    pub(crate) fn with_writer(
        info: ConnectionInfo,
        config: &ConnectionConfig,
        admitted: Option<crate::admission::Admitted>,
    ) -> Arc<Shared> {
        Self::build(info, config, true, admitted)
    }

    fn build(
        info: ConnectionInfo,
        config: &ConnectionConfig,
        counted_by_writer: bool,
        admitted: Option<crate::admission::Admitted>,
    ) -> Arc<Shared> {
        let tally = Arc::new(MessageTally::new());
        let tracked = config.recorder.track(&tally);
        Arc::new(Shared {
            tally,
            tracked,
            counted_by_writer,
            _admitted: admitted,
            codec: info.format.codec(),
            info,
            limits: config.limits.clone(),
            recorder: config.recorder.clone(),
            send_timeout: config.send_timeout,
            close_timeout: config.close_timeout,
            inbound_rate: config
                .inbound_rate
                .filter(|r| r.messages_per_second > 0.0 && r.bytes_per_second > 0.0),
            keepalive: KeepaliveCheck::new(config),
            rtt_micros: AtomicU64::new(0),
            epoch: Instant::now(),
            shutdown: CancellationToken::new(),
            ended: AtomicBool::new(false),
            writer_done: CancellationToken::new(),
            reason: Mutex::new(None),
        })
    }

    /// Counts a data frame of `bytes` written. Only the connection's single writer task
    /// calls it, so a plain load and store suffice (no read-modify-write on the hot
    /// path).
    pub(crate) fn count_written(&self, slot: TypeSlot, bytes: usize) {
        self.tally.record(Direction::Outbound, slot, bytes);
    }

    /// Records why the connection ends; the first reason wins.
    pub(crate) fn set_reason(&self, reason: CloseReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
    }

    pub(crate) fn reason(&self) -> Option<CloseReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ends the connection for `reason` (if none was recorded yet).
    pub(crate) fn end(&self, reason: CloseReason) {
        self.set_reason(reason);
        self.ended.store(true, Ordering::Release);
        self.shutdown.cancel();
    }

    /// Whether the connection is over.
    pub(crate) fn has_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// The close frame the writer should still send when the connection ends this way.
    pub(crate) fn final_close_frame(&self) -> Option<(CloseCode, String)> {
        match self.reason()? {
            CloseReason::Local(code, reason) | CloseReason::Protocol(code, reason) => {
                Some((code, reason))
            }
            CloseReason::DeadPeer => Some((CloseCode::DEAD_PEER, "no keepalive response".into())),
            CloseReason::Remote(..) | CloseReason::Io(_) => None,
        }
    }

    /// Payload of a keepalive ping: the send time, to measure the round trip.
    pub(crate) fn ping_payload(&self) -> Bytes {
        let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        Bytes::copy_from_slice(&nanos.to_be_bytes())
    }

    fn record_pong(&self, payload: &[u8]) {
        let Ok(sent) = <[u8; 8]>::try_from(payload) else {
            return;
        };
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if let Some(rtt) = now.checked_sub(u64::from_be_bytes(sent)) {
            self.rtt_micros
                .store((rtt / 1000).max(1), Ordering::Relaxed);
            self.recorder.rtt(Duration::from_nanos(rtt));
        }
    }
}

/// The sending half of a connection. Cheap to clone; every clone sends on the same
/// connection, in the order `send` calls complete.
#[derive(Debug, Clone)]
pub struct ConnectionSender {
    inner: Arc<SenderInner>,
}

#[derive(Debug)]
struct SenderInner {
    tx: mpsc::Sender<Outgoing>,
    shared: Arc<Shared>,
}

impl ConnectionSender {
    /// What is known about the connection.
    pub fn info(&self) -> &ConnectionInfo {
        &self.inner.shared.info
    }

    /// Messages and bytes each way so far, and the last round trip time.
    pub fn stats(&self) -> ConnectionStats {
        let tally = &self.inner.shared.tally;
        let (messages_in, bytes_in) = tally.totals(Direction::Inbound);
        let (messages_out, bytes_out) = tally.totals(Direction::Outbound);
        ConnectionStats {
            messages_in,
            bytes_in,
            messages_out,
            bytes_out,
            rtt: self.rtt(),
        }
    }

    /// The limits this connection enforces (for example on decompressed payloads).
    pub fn limits(&self) -> &Limits {
        &self.inner.shared.limits
    }

    /// A fresh message id ([`next_message_id`]).
    pub fn next_id(&self) -> u64 {
        next_message_id()
    }

    /// An envelope with a fresh id and the current time.
    pub fn envelope(&self, kind: MessageType) -> Envelope {
        Envelope::new(self.next_id(), kind, unix_millis())
    }

    /// Encodes `value` in this connection's payload format.
    pub fn payload<T: serde::Serialize + ?Sized>(
        &self,
        value: &T,
    ) -> Result<Payload, tunnel_proto::EncodeError> {
        Payload::encode(self.inner.shared.info.format, value)
    }

    fn encode(&self, env: &Envelope) -> Result<Outgoing, SendError> {
        let mut buf = Vec::with_capacity(
            128 + env.payload.as_ref().map_or(0, Payload::len) + env.headers.len() * 64,
        );
        self.inner.shared.codec.encode(env, &mut buf)?;
        if buf.len() > self.inner.shared.limits.max_message_size {
            return Err(tunnel_proto::EncodeError::TooLarge {
                size: buf.len(),
                limit: self.inner.shared.limits.max_message_size,
            }
            .into());
        }
        let shared = &self.inner.shared;
        let slot = TypeSlot::of(&env.kind);
        if !shared.counted_by_writer {
            shared.tally.add(Direction::Outbound, slot, buf.len());
        }
        if !shared.tracked || slot == TypeSlot::OTHER {
            shared
                .recorder
                .message(Direction::Outbound, &env.kind, buf.len());
        }
        // As a boxed slice: `Bytes` from a `Vec` with spare capacity allocates a shared
        // header; shrinking in place (what the allocators we use do for this much
        // slack) does not.
        Ok(Outgoing::Data(buf.into_boxed_slice().into(), slot))
    }

    /// Queues `env`, waiting up to the configured send timeout for room in a full
    /// outbound queue.
    pub async fn send(&self, env: &Envelope) -> Result<(), SendError> {
        let msg = self.encode(env)?;
        match self.inner.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::Closed),
            Err(mpsc::error::TrySendError::Full(msg)) => {
                let timeout = self.inner.shared.send_timeout;
                self.inner
                    .tx
                    .send_timeout(msg, timeout)
                    .await
                    .map_err(|e| match e {
                        mpsc::error::SendTimeoutError::Timeout(_) => SendError::Timeout(timeout),
                        mpsc::error::SendTimeoutError::Closed(_) => SendError::Closed,
                    })
            }
        }
    }

    /// Queues `env` if there is room now; fails with [`SendError::Full`] otherwise.
    pub fn try_send(&self, env: &Envelope) -> Result<(), SendError> {
        let msg = self.encode(env)?;
        self.inner.tx.try_send(msg).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
        })
    }

    /// Closes gracefully: messages queued before this call are flushed, then a close
    /// frame with `code` and `reason` is sent and the peer's reply awaited, all within
    /// the configured close timeout. Afterwards the connection is over.
    ///
    /// The peer's reply is read by the [`ConnectionReceiver`]: if nobody is polling it,
    /// this waits for the whole close timeout. [`Connection::close`] drives both.
    pub async fn close(&self, code: CloseCode, reason: &str) {
        let deadline = Instant::now() + self.inner.shared.close_timeout;
        let queued = tokio::time::timeout_at(
            deadline,
            self.inner.tx.send(Outgoing::Close(code, reason.to_owned())),
        )
        .await;
        if matches!(queued, Ok(Ok(()))) {
            let _ = tokio::time::timeout_at(deadline, self.inner.shared.shutdown.cancelled()).await;
        }
        self.inner
            .shared
            .end(CloseReason::Local(code, reason.to_owned()));
        let _ = tokio::time::timeout_at(deadline, self.inner.shared.writer_done.cancelled()).await;
    }

    /// Ends the connection at once: queued messages are discarded and a close frame
    /// with `code` and `reason` is sent if the socket still takes it.
    pub fn abort_with(&self, code: CloseCode, reason: &str) {
        self.inner
            .shared
            .end(CloseReason::Protocol(code, reason.to_owned()));
    }

    /// Drops the connection at once, without a close handshake, as if the network
    /// failed. Queued messages are discarded.
    pub fn abort(&self) {
        self.inner
            .shared
            .end(CloseReason::Io("aborted locally".into()));
    }

    /// Whether the connection is over.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.has_ended() || self.inner.tx.is_closed()
    }

    /// Resolves when the connection is over.
    pub async fn closed(&self) {
        self.inner.shared.shutdown.cancelled().await;
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.inner.shared.reason()
    }

    /// The latest keepalive round-trip time, once a pong has arrived.
    pub fn rtt(&self) -> Option<Duration> {
        match self.inner.shared.rtt_micros.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }
}

/// The receiving half of a connection.
pub struct ConnectionReceiver {
    frames: IncomingStream,
    shared: Arc<Shared>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    keepalive: Pin<Box<Sleep>>,
    /// Frames seen since the keepalive timer last fired.
    seen: bool,
    /// Consecutive keepalive periods without a frame.
    quiet_periods: u32,
    done: bool,
    /// The inbound rate limit's budget, when there is one.
    budget: Option<crate::rate::InboundBudget>,
    /// Over budget: wait this long before reading again.
    throttle: Option<Duration>,
}

impl std::fmt::Debug for ConnectionReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionReceiver")
            .field("info", &self.shared.info)
            .field("done", &self.done)
            .finish()
    }
}

enum Event {
    Incoming(Incoming),
    Shutdown,
    Dead,
}

impl ConnectionReceiver {
    /// What is known about the connection.
    pub fn info(&self) -> &ConnectionInfo {
        &self.shared.info
    }

    /// The next envelope from the peer, boxed: it is handed on by value through the
    /// router and handlers, and a box moves for a pointer's cost where an `Envelope`
    /// is a couple of hundred bytes.
    ///
    /// `Ok(None)` means the connection closed in an orderly way (either side closed
    /// it); `Err` means it failed. After either, every call returns `Ok(None)`.
    /// Keepalive runs while this is being awaited: a peer that sends nothing, not even
    /// a pong, for `ping_interval + pong_timeout` fails the connection with
    /// [`RecvError::DeadPeer`] (detected at most half a `pong_timeout` later).
    pub async fn recv(&mut self) -> Result<Option<Box<Envelope>>, RecvError> {
        if self.done {
            return Ok(None);
        }
        if let Some(wait) = self.throttle.take() {
            // Over the inbound rate: read nothing for a while (TCP slows the peer). The
            // pause counts as traffic seen, so the keepalive check does not mistake it
            // for a dead peer.
            tokio::time::sleep(wait).await;
            self.seen = true;
        }
        loop {
            let event = std::future::poll_fn(|cx| self.poll_event(cx)).await;
            match event {
                Event::Incoming(Incoming::Data(frame, kind)) => {
                    return self.decode(kind, &frame, None);
                }
                Event::Incoming(Incoming::Text(text)) => {
                    return self.decode(FrameKind::Text, text.as_ref(), Some(text.as_str()));
                }
                Event::Incoming(Incoming::Ping) => {}
                Event::Incoming(Incoming::Pong(payload)) => self.shared.record_pong(&payload),
                Event::Incoming(Incoming::Closed(frame)) => {
                    let (code, reason) = frame.unwrap_or((CloseCode(1005), String::new()));
                    self.finish(CloseReason::Remote(code, reason));
                    return Ok(None);
                }
                Event::Incoming(Incoming::Protocol(code, reason)) => {
                    return self.fail(code, RecvError::Io(format!("protocol error: {reason}")));
                }
                Event::Incoming(Incoming::Failed(e)) => {
                    self.finish(CloseReason::Io(e.clone()));
                    self.shared.recorder.error("io");
                    return Err(RecvError::Io(e));
                }
                Event::Shutdown => {
                    self.done = true;
                    return match self.shared.reason() {
                        Some(CloseReason::DeadPeer) => Err(RecvError::DeadPeer),
                        Some(CloseReason::Io(e)) => Err(RecvError::Io(e)),
                        _ => Ok(None),
                    };
                }
                Event::Dead => {
                    self.finish(CloseReason::DeadPeer);
                    self.shared.recorder.error("dead_peer");
                    return Err(RecvError::DeadPeer);
                }
            }
        }
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if self.shared.has_ended() {
            return Poll::Ready(Event::Shutdown);
        }
        match self.frames.as_mut().poll_next(cx) {
            Poll::Ready(Some(incoming)) => {
                self.seen = true;
                return Poll::Ready(Event::Incoming(incoming));
            }
            Poll::Ready(None) => return Poll::Ready(Event::Incoming(Incoming::Closed(None))),
            Poll::Pending => {}
        }
        // Only when idle: register to be woken if someone else ends the connection.
        if self.shutdown.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Event::Shutdown);
        }
        // Reading the clock for every frame would cost more than the rest of the
        // receive path's bookkeeping, so frames only set a flag and a timer checks it
        // once per keepalive period. After `quiet_limit` periods in a row without a
        // frame, at least the dead-peer deadline has passed since the last one: a peer
        // is never declared dead early, and at most one period late.
        while self.keepalive.as_mut().poll(cx).is_ready() {
            if std::mem::take(&mut self.seen) {
                self.quiet_periods = 0;
            } else {
                self.quiet_periods += 1;
                if self.quiet_periods >= self.shared.keepalive.quiet_limit {
                    return Poll::Ready(Event::Dead);
                }
            }
            let next = Instant::now() + self.shared.keepalive.period;
            self.keepalive.as_mut().reset(next);
        }
        Poll::Pending
    }

    /// Decodes one data frame; `text` is its contents when the transport has already
    /// checked that they are UTF-8.
    fn decode(
        &mut self,
        kind: FrameKind,
        frame: &Bytes,
        text: Option<&str>,
    ) -> Result<Option<Box<Envelope>>, RecvError> {
        let expected = self.shared.codec.frame_kind();
        if kind != expected {
            let err = RecvError::WrongFrameKind {
                expected: kind_name(expected),
                got: kind_name(kind),
            };
            return self.fail(CloseCode::UNSUPPORTED_DATA, err);
        }
        let decoded = match text {
            Some(text) => self
                .shared
                .codec
                .decode_text(frame, text, &self.shared.limits),
            None => self.shared.codec.decode_boxed(frame, &self.shared.limits),
        };
        match decoded {
            Ok(env) => {
                // Only this receiver counts what comes in.
                let slot = TypeSlot::of(&env.kind);
                self.shared
                    .tally
                    .record(Direction::Inbound, slot, frame.len());
                if !self.shared.tracked || slot == TypeSlot::OTHER {
                    self.shared
                        .recorder
                        .message(Direction::Inbound, &env.kind, frame.len());
                }
                if let Some(budget) = &mut self.budget
                    && let Some(wait) = budget.spend(frame.len(), Instant::now())
                {
                    self.throttle = Some(wait);
                }
                Ok(Some(env))
            }
            Err(e) => self.fail(e.close_code(), RecvError::Decode(e)),
        }
    }

    fn finish(&mut self, reason: CloseReason) {
        self.done = true;
        self.shared.end(reason);
    }

    fn fail(
        &mut self,
        code: CloseCode,
        err: RecvError,
    ) -> Result<Option<Box<Envelope>>, RecvError> {
        tracing::debug!(connection = self.shared.info.id, %code, error = %tunnel_proto::text::Untrusted(&err.to_string()), "closing connection");
        self.shared.recorder.error(match &err {
            RecvError::Decode(_) => "decode",
            RecvError::WrongFrameKind { .. } => "wrong_frame_kind",
            RecvError::DeadPeer => "dead_peer",
            _ => "protocol",
        });
        self.finish(CloseReason::Protocol(code, err.to_string()));
        Err(err)
    }
}

fn kind_name(kind: FrameKind) -> &'static str {
    match kind {
        FrameKind::Text => "text",
        FrameKind::Binary => "binary",
    }
}

/// An established connection: a sender and a receiver.
#[derive(Debug)]
pub struct Connection {
    sender: ConnectionSender,
    receiver: ConnectionReceiver,
}

impl Connection {
    pub(crate) fn new(
        shared: Arc<Shared>,
        tx: mpsc::Sender<Outgoing>,
        frames: IncomingStream,
    ) -> Self {
        shared.recorder.connection_opened();
        let now = Instant::now();
        let receiver = ConnectionReceiver {
            frames,
            shutdown: Box::pin(shared.shutdown.clone().cancelled_owned()),
            keepalive: Box::pin(tokio::time::sleep_until(now + shared.keepalive.period)),
            seen: false,
            quiet_periods: 0,
            budget: shared
                .inbound_rate
                .map(|rate| crate::rate::InboundBudget::new(rate, Instant::now())),
            throttle: None,
            shared: shared.clone(),
            done: false,
        };
        Connection {
            sender: ConnectionSender {
                inner: Arc::new(SenderInner { tx, shared }),
            },
            receiver,
        }
    }

    /// What is known about the connection.
    pub fn info(&self) -> &ConnectionInfo {
        self.sender.info()
    }

    /// A sending handle.
    pub fn sender(&self) -> &ConnectionSender {
        &self.sender
    }

    /// Splits into the sending and receiving halves.
    pub fn split(self) -> (ConnectionSender, ConnectionReceiver) {
        (self.sender, self.receiver)
    }

    /// Queues `env` (see [`ConnectionSender::send`]).
    pub async fn send(&self, env: &Envelope) -> Result<(), SendError> {
        self.sender.send(env).await
    }

    /// Receives the next envelope (see [`ConnectionReceiver::recv`]).
    pub async fn recv(&mut self) -> Result<Option<Box<Envelope>>, RecvError> {
        self.receiver.recv().await
    }

    /// Closes gracefully (see [`ConnectionSender::close`]), reading and discarding
    /// whatever the peer still sends until its close reply arrives.
    pub async fn close(mut self, code: CloseCode, reason: &str) {
        let receiver = &mut self.receiver;
        let drain = async move { while let Ok(Some(_)) = receiver.recv().await {} };
        tokio::join!(self.sender.close(code, reason), drain);
    }
}

impl Drop for ConnectionReceiver {
    fn drop(&mut self) {
        if !self.done {
            self.shared.end(CloseReason::Local(
                CloseCode::NORMAL,
                "receiver dropped".into(),
            ));
        }
        self.shared
            .recorder
            .connection_closed(self.shared.epoch.elapsed());
    }
}
