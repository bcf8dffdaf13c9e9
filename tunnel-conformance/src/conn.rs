//! Connections to the hub: WebSocket over tokio-tungstenite, and hand-written HTTP for
//! upgrade requests no WebSocket client would send.
//!
//! Every read and write is bounded by a timeout, and every frame the hub sends is
//! reported to the [`Observer`] (for the rules checked across all cases: the `close`
//! message before each close frame, the envelope's form, MessagePack integer sizes).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

use crate::Codec;
use crate::wire::{self, Out, Received, Value};

type Ws = WebSocketStream<TcpStream>;

/// A random 64-bit number (not for cryptography: ids, keys, payloads).
pub(crate) fn random_u64() -> u64 {
    use std::hash::BuildHasher as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    std::collections::hash_map::RandomState::new()
        .hash_one((COUNTER.fetch_add(1, Ordering::Relaxed), Instant::now()))
}

/// Where the hub listens, from a `ws://` URL.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// `host:port` to connect to.
    pub(crate) addr: String,
    /// The `Host` header's value (the URL's authority).
    pub(crate) authority: String,
    /// The request path (with the query, if any).
    pub(crate) path: String,
}

impl Target {
    pub(crate) fn parse(url: &str) -> Result<Target, String> {
        let rest = if let Some(rest) = url.strip_prefix("ws://") {
            rest
        } else if url.starts_with("wss://") {
            return Err("wss:// is not supported by the kit; test the hub over ws://".into());
        } else {
            return Err(format!("`{url}` is not a ws:// URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("`{url}` has no usable host"));
        }
        let has_port = match authority.rfind(']') {
            Some(end) => authority[end..].contains(':'),
            None => authority.contains(':'),
        };
        let addr = if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Target {
            addr,
            authority: authority.to_owned(),
            path: path.to_owned(),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Observations across cases

/// One close frame the hub sent on its own initiative.
#[derive(Debug, Clone)]
pub(crate) struct CloseSeen {
    pub(crate) case: &'static str,
    pub(crate) codec: Codec,
    /// The frame's code (`None`: a close frame without a code).
    pub(crate) frame: Option<u16>,
    /// The code of the `close` envelope right before the frame, if the last envelope was
    /// one.
    pub(crate) envelope: Option<u16>,
    /// Whether that envelope had a `reason` string.
    pub(crate) reason: bool,
    /// What came last before the frame, for the report.
    pub(crate) last: String,
}

/// What every connection reports, for the rules checked across all cases.
#[derive(Debug, Default)]
pub(crate) struct Observations {
    pub(crate) closes: Vec<CloseSeen>,
    /// Envelopes decoded, per codec.
    pub(crate) envelopes: HashMap<Codec, usize>,
    /// Envelopes with form problems: (codec, case, what).
    pub(crate) problems: Vec<(Codec, &'static str, String)>,
    /// Integers not in their smallest MessagePack form: (case, what).
    pub(crate) non_minimal: Vec<(&'static str, String)>,
}

/// Most problems (or oversized integers) kept for the report; the rest are counted.
const MAX_NOTES: usize = 1000;

/// Most envelopes kept by one read that collects them (a flood is cut off).
pub(crate) const MAX_KEPT: usize = 10_000;

/// Most envelopes a reader keeps while waiting for something else.
const MAX_SEEN: usize = 256;

/// Shared by every connection of a run.
#[derive(Debug, Default)]
pub(crate) struct Observer(Mutex<Observations>);

impl Observer {
    fn with<R>(&self, f: impl FnOnce(&mut Observations) -> R) -> R {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    pub(crate) fn take(&self) -> Observations {
        self.with(std::mem::take)
    }

    fn envelope(&self, case: &'static str, codec: Codec, env: &Received) {
        self.with(|o| {
            *o.envelopes.entry(codec).or_default() += 1;
            for p in &env.problems {
                if o.problems.len() < MAX_NOTES {
                    o.problems
                        .push((codec, case, format!("{}: {p}", env.brief())));
                }
            }
            for n in &env.non_minimal {
                if o.non_minimal.len() < MAX_NOTES {
                    o.non_minimal.push((case, format!("{}: {n}", env.brief())));
                }
            }
        });
    }

    fn problem(&self, case: &'static str, codec: Codec, what: String) {
        self.with(|o| {
            if o.problems.len() < MAX_NOTES {
                o.problems.push((codec, case, what));
            }
        });
    }

    fn close(&self, seen: CloseSeen) {
        self.with(|o| o.closes.push(seen));
    }
}

// ---------------------------------------------------------------------------------------
// Events

/// One thing read from a connection.
// Short-lived, one at a time: boxing the envelope would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Ev {
    /// An envelope, and when it was read.
    Env(Received, Instant),
    /// A frame of the codec's kind that is not an envelope.
    Bad(String),
    /// A frame of the other kind (`"text"` or `"binary"`).
    WrongKind(&'static str),
    /// A ping frame (tungstenite answers it).
    Ping,
    Pong(Vec<u8>),
    /// A close frame: code (if any) and reason.
    Close(Option<u16>, String),
    /// The connection is gone (EOF, reset, error).
    End(String),
    /// Nothing within the time given.
    Timeout,
}

/// How a connection ended, as seen by [`Conn::expect_close`].
#[derive(Debug, Default)]
pub(crate) struct Closed {
    /// The `close` envelope, if one came.
    pub(crate) envelope: Option<Received>,
    /// The close frame: `Some(code)`; `Some(None)` for a frame without a code; `None` if
    /// no close frame came.
    pub(crate) frame: Option<Option<u16>>,
    pub(crate) reason: String,
    /// Whether the connection ended (EOF) after all, within the time allowed.
    pub(crate) ended: bool,
    /// What else arrived first.
    pub(crate) before: Vec<String>,
    /// Why the read ended without a close frame.
    pub(crate) end: String,
}

impl Closed {
    /// The close frame's code.
    pub(crate) fn code(&self) -> Option<u16> {
        self.frame.flatten()
    }

    /// The `close` envelope's code.
    pub(crate) fn envelope_code(&self) -> Option<u16> {
        self.envelope
            .as_ref()
            .and_then(|e| e.field("code"))
            .and_then(Value::as_u64)
            .and_then(|c| u16::try_from(c).ok())
    }

    pub(crate) fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.before.is_empty() {
            let n = self.before.len();
            let shown: Vec<&str> = self.before.iter().take(4).map(String::as_str).collect();
            parts.push(format!(
                "first {}{}",
                shown.join(" "),
                if n > 4 {
                    format!(" (+{})", n - 4)
                } else {
                    String::new()
                }
            ));
        }
        if let Some(env) = &self.envelope {
            let reason = env
                .field("reason")
                .and_then(Value::as_str)
                .unwrap_or_default();
            parts.push(format!(
                "close envelope {} {reason:?}",
                self.envelope_code()
                    .map_or("without a code".into(), |c| c.to_string())
            ));
        }
        match self.frame {
            Some(Some(code)) => parts.push(format!("close frame {code} {:?}", self.reason)),
            Some(None) => parts.push("close frame without a code".into()),
            None => parts.push(format!(
                "no close frame ({})",
                if self.end.is_empty() {
                    "still open"
                } else {
                    &self.end
                }
            )),
        }
        if self.frame.is_some() && !self.ended {
            parts.push("connection still open after it".into());
        }
        parts.join(", ")
    }
}

/// The reading half of a connection and everything it remembers.
pub(crate) struct Reader {
    stream: SplitStream<Ws>,
    codec: Codec,
    case: &'static str,
    obs: Arc<Observer>,
    /// The last envelope read (for the `close` envelope before a close frame).
    last: Option<Received>,
    /// We sent a close frame first: the hub's close frame answers it.
    we_closed: bool,
    ended: bool,
    /// Envelopes read while waiting for something else.
    pub(crate) seen: Vec<Received>,
}

impl Reader {
    /// Reads the next thing within `d`. Cancel-safe: nothing is lost when the future is
    /// dropped before it completes.
    pub(crate) async fn recv(&mut self, d: Duration) -> Ev {
        if self.ended {
            return Ev::End("the connection had already ended".into());
        }
        let next = match timeout(d, self.stream.next()).await {
            Err(_) => return Ev::Timeout,
            Ok(next) => next,
        };
        let at = Instant::now();
        match next {
            None => {
                self.ended = true;
                Ev::End("connection ended".into())
            }
            Some(Err(e)) => {
                self.ended = true;
                Ev::End(describe_ws_error(&e))
            }
            Some(Ok(msg)) => match msg {
                Message::Text(t) => self.frame(t.as_bytes(), Codec::Json, at),
                Message::Binary(b) => self.frame(&b, Codec::MsgPack, at),
                Message::Ping(_) => Ev::Ping,
                Message::Pong(p) => Ev::Pong(p.to_vec()),
                Message::Close(frame) => {
                    let (code, reason) = match frame {
                        Some(f) => (Some(u16::from(f.code)), f.reason.as_str().to_owned()),
                        None => (None, String::new()),
                    };
                    if !self.we_closed {
                        let last_close = self.last.as_ref().filter(|e| e.kind == "close");
                        let envelope = last_close
                            .and_then(|e| e.field("code"))
                            .and_then(Value::as_u64)
                            .and_then(|c| u16::try_from(c).ok());
                        let reason = last_close
                            .and_then(|e| e.field("reason"))
                            .is_some_and(|r| r.as_str().is_some());
                        self.obs.close(CloseSeen {
                            case: self.case,
                            codec: self.codec,
                            frame: code,
                            envelope,
                            reason,
                            last: self.last.as_ref().map_or("nothing".into(), Received::brief),
                        });
                    }
                    Ev::Close(code, reason)
                }
                Message::Frame(_) => Ev::Bad("a raw frame".into()),
            },
        }
    }

    fn frame(&mut self, bytes: &[u8], kind: Codec, at: Instant) -> Ev {
        if kind != self.codec {
            let what = if kind == Codec::Json {
                "text"
            } else {
                "binary"
            };
            self.obs.problem(
                self.case,
                self.codec,
                format!("a {what} frame on a {} connection", self.codec),
            );
            return Ev::WrongKind(what);
        }
        match wire::decode(self.codec, bytes) {
            Ok(env) => {
                self.obs.envelope(self.case, self.codec, &env);
                self.last = Some(env.clone());
                Ev::Env(env, at)
            }
            Err(e) => {
                let what = format!("undecodable frame ({} bytes): {e}", bytes.len());
                self.obs.problem(self.case, self.codec, what.clone());
                Ev::Bad(what)
            }
        }
    }

    /// Waits for an envelope `pred` accepts; others are kept in `seen`.
    pub(crate) async fn wait(
        &mut self,
        what: &str,
        d: Duration,
        mut pred: impl FnMut(&Received) -> bool,
    ) -> Result<(Received, Instant), String> {
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left).await {
                Ev::Env(env, at) if pred(&env) => return Ok((env, at)),
                Ev::Env(env, _) => {
                    if self.seen.len() >= MAX_SEEN {
                        self.seen.remove(0);
                    }
                    self.seen.push(env);
                }
                Ev::Ping | Ev::Pong(_) => {}
                Ev::Bad(e) => return Err(format!("{e}, waiting for {what}")),
                Ev::WrongKind(k) => return Err(format!("a {k} frame, waiting for {what}")),
                Ev::Close(code, reason) => {
                    return Err(format!(
                        "closed ({}{}) waiting for {what}{}",
                        code.map_or("no code".into(), |c| c.to_string()),
                        if reason.is_empty() {
                            String::new()
                        } else {
                            format!(" {reason:?}")
                        },
                        self.seen_note()
                    ));
                }
                Ev::End(e) => return Err(format!("{e} waiting for {what}{}", self.seen_note())),
                Ev::Timeout => {
                    return Err(format!(
                        "no {what} within {} ms{}",
                        d.as_millis(),
                        self.seen_note()
                    ));
                }
            }
        }
    }

    fn seen_note(&self) -> String {
        if self.seen.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = self
                .seen
                .iter()
                .rev()
                .take(4)
                .map(Received::brief)
                .collect();
            format!("; saw {}", list.join(" "))
        }
    }

    /// Everything that arrives within `d` (stopping early if the connection closes).
    pub(crate) async fn quiet(&mut self, d: Duration) -> (Vec<(Received, Instant)>, Option<Ev>) {
        let deadline = Instant::now() + d;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left).await {
                Ev::Env(env, at) => {
                    if got.len() < MAX_KEPT {
                        got.push((env, at));
                    }
                }
                Ev::Ping | Ev::Pong(_) => {}
                Ev::Timeout => return (got, None),
                other => return (got, Some(other)),
            }
        }
    }

    /// Reads until the hub's close frame (and the end of the connection after it), at
    /// most `d` for the frame and a second more for the end.
    pub(crate) async fn expect_close(&mut self, d: Duration) -> Closed {
        let mut closed = Closed::default();
        let deadline = Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left).await {
                Ev::Env(env, _) => {
                    if env.kind == "close" {
                        closed.envelope = Some(env);
                    } else if closed.before.len() < MAX_SEEN {
                        closed.before.push(env.brief());
                    }
                }
                Ev::Ping | Ev::Pong(_) => {}
                Ev::Bad(e) if closed.before.len() < MAX_SEEN => closed.before.push(e),
                Ev::WrongKind(k) if closed.before.len() < MAX_SEEN => {
                    closed.before.push(format!("{k} frame"));
                }
                Ev::Bad(_) | Ev::WrongKind(_) => {}
                Ev::Close(code, reason) => {
                    closed.frame = Some(code);
                    closed.reason = reason;
                    break;
                }
                Ev::End(e) => {
                    closed.end = e;
                    closed.ended = true;
                    return closed;
                }
                Ev::Timeout => {
                    closed.end = format!("nothing more within {} ms", d.as_millis());
                    return closed;
                }
            }
        }
        // After the close frame: the connection must end (tungstenite answers the close
        // when it is read again).
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left).await {
                Ev::End(_) => {
                    closed.ended = true;
                    break;
                }
                Ev::Timeout => break,
                _ => {}
            }
        }
        closed
    }
}

/// A WebSocket connection to the hub.
pub(crate) struct Conn {
    sink: SplitSink<Ws, Message>,
    pub(crate) rx: Reader,
    pub(crate) codec: Codec,
    next_id: u64,
    step: Duration,
}

/// What the upgrade request carries. `None` leaves a header out.
#[derive(Debug, Clone)]
pub(crate) struct Upgrade {
    pub(crate) authorization: Option<String>,
    pub(crate) workspace: Option<String>,
    pub(crate) sync_target: Option<String>,
    pub(crate) protocols: Option<String>,
}

/// The kit's handshake.
#[derive(Debug, Clone)]
pub(crate) struct Hs {
    pub(crate) workspace: String,
    pub(crate) sync_target: String,
    pub(crate) versions: (u64, u64),
    pub(crate) capabilities: Vec<String>,
    pub(crate) resume: Option<(String, u64)>,
}

impl Hs {
    pub(crate) fn payload(&self) -> Value {
        let mut fields = vec![
            ("sync_target", Value::str(&self.sync_target)),
            ("workspace", Value::str(&self.workspace)),
            (
                "versions",
                Value::map([
                    ("min", Value::UInt(self.versions.0)),
                    ("max", Value::UInt(self.versions.1)),
                ]),
            ),
            ("capabilities", Value::strings(&self.capabilities)),
            (
                "metadata",
                Value::map([("agent", Value::str("tunnel-conformance"))]),
            ),
        ];
        if let Some((session_id, last_received)) = &self.resume {
            fields.push((
                "resume",
                Value::map([
                    ("session_id", Value::str(session_id)),
                    ("last_received", Value::UInt(*last_received)),
                ]),
            ));
        }
        Value::map(fields)
    }

    /// The handshake envelope (id 0).
    pub(crate) fn envelope(&self) -> Out {
        Out::new(0, "handshake").payload(self.payload())
    }
}

/// The hub's `handshake_ack`, read.
#[derive(Debug, Clone)]
pub(crate) struct Ack {
    pub(crate) env: Received,
    pub(crate) at: Instant,
    pub(crate) version: Option<u64>,
    pub(crate) session_id: Option<String>,
    pub(crate) capabilities: Vec<String>,
    pub(crate) resumed: bool,
    pub(crate) last_received: Option<u64>,
}

impl Ack {
    pub(crate) fn from_env(env: Received, at: Instant) -> Ack {
        let capabilities = env
            .field("capabilities")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        Ack {
            version: env.field("version").and_then(Value::as_u64),
            session_id: env
                .field("session_id")
                .and_then(Value::as_str)
                .map(String::from),
            resumed: env
                .field("resumed")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            last_received: env.field("last_received").and_then(Value::as_u64),
            capabilities,
            env,
            at,
        }
    }

    pub(crate) fn grants(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }

    pub(crate) fn session(&self) -> &str {
        self.session_id.as_deref().unwrap_or_default()
    }

    pub(crate) fn brief(&self) -> String {
        format!(
            "ack v{} session={} resumed={}{} caps=[{}]",
            self.version.map_or("?".into(), |v| v.to_string()),
            short(self.session()),
            self.resumed,
            self.last_received
                .map_or(String::new(), |l| format!(" last_received={l}")),
            self.capabilities.join(",")
        )
    }
}

/// The first 12 characters of an id, for reports.
pub(crate) fn short(id: &str) -> String {
    let mut s: String = id.chars().take(12).collect();
    if id.chars().count() > 12 {
        s.push('…');
    }
    s
}

fn describe_ws_error(e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error as E;
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    match e {
        E::ConnectionClosed | E::AlreadyClosed => "connection ended".into(),
        E::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            "connection ended without a close frame".into()
        }
        E::Io(io) => format!("connection ended ({io})"),
        other => format!("connection failed ({other})"),
    }
}

/// Opens a WebSocket to `target` with the headers of `up`.
pub(crate) async fn connect(
    target: &Target,
    up: &Upgrade,
    codec: Codec,
    case: &'static str,
    obs: &Arc<Observer>,
    step: Duration,
) -> Result<Conn, String> {
    let url = format!("ws://{}{}", target.authority, target.path);
    let mut req = url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad URL {url}: {e}"))?;
    let headers = req.headers_mut();
    for (name, value) in [
        ("authorization", &up.authorization),
        ("x-workspace", &up.workspace),
        ("x-synctarget", &up.sync_target),
        ("sec-websocket-protocol", &up.protocols),
    ] {
        if let Some(value) = value {
            let value = HeaderValue::from_str(value)
                .map_err(|e| format!("header {name} {value:?}: {e}"))?;
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    let tcp = timeout(step, TcpStream::connect(&target.addr))
        .await
        .map_err(|_| format!("TCP connect to {} timed out", target.addr))?
        .map_err(|e| format!("TCP connect to {}: {e}", target.addr))?;
    let _ = tcp.set_nodelay(true);
    // Large enough for whatever a hub sends back; the kit's own messages are not limited.
    let config = WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let (ws, resp) = timeout(
        step,
        tokio_tungstenite::client_async_with_config(req, tcp, Some(config)),
    )
    .await
    .map_err(|_| "the WebSocket upgrade timed out".to_string())?
    .map_err(|e| match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            format!("upgrade refused: HTTP {}", resp.status().as_u16())
        }
        other => format!("upgrade failed: {other}"),
    })?;
    let chosen = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if chosen != codec.subprotocol() {
        return Err(format!(
            "the hub chose subprotocol {chosen:?}, not {}",
            codec.subprotocol()
        ));
    }
    let (sink, stream) = ws.split();
    Ok(Conn {
        sink,
        rx: Reader {
            stream,
            codec,
            case,
            obs: obs.clone(),
            last: None,
            we_closed: false,
            ended: false,
            seen: Vec::new(),
        },
        codec,
        next_id: 1,
        step,
    })
}

impl Conn {
    /// The next message id of this connection.
    pub(crate) fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// A WebSocket data frame of this codec's kind holding `bytes`.
    pub(crate) fn data_frame(&self, bytes: Vec<u8>) -> Message {
        match self.codec {
            Codec::Json => match String::from_utf8(bytes) {
                Ok(s) => Message::text(s),
                Err(e) => Message::binary(e.into_bytes()),
            },
            Codec::MsgPack => Message::binary(bytes),
        }
    }

    pub(crate) async fn send(&mut self, out: &Out) -> Result<(), String> {
        let frame = self.data_frame(out.encode(self.codec));
        self.send_frame(frame).await
    }

    pub(crate) async fn send_frame(&mut self, msg: Message) -> Result<(), String> {
        if matches!(msg, Message::Close(_)) {
            self.rx.we_closed = true;
        }
        match timeout(self.step, self.sink.send(msg)).await {
            Err(_) => Err("sending timed out".into()),
            Ok(Err(e)) => Err(format!("sending failed: {}", describe_ws_error(&e))),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Sends a (large) frame while reading, and returns how the hub closed.
    pub(crate) async fn send_expecting_close(
        &mut self,
        msg: Message,
        d: Duration,
    ) -> (Result<(), String>, Closed) {
        let send = async {
            match timeout(d.max(Duration::from_secs(10)), self.sink.send(msg)).await {
                Err(_) => Err("sending timed out".to_string()),
                Ok(Err(e)) => Err(describe_ws_error(&e)),
                Ok(Ok(())) => Ok(()),
            }
        };
        tokio::join!(send, self.rx.expect_close(d))
    }

    /// Sends the handshake and waits for the `handshake_ack`.
    pub(crate) async fn handshake(&mut self, hs: &Hs) -> Result<Ack, String> {
        self.send(&hs.envelope()).await?;
        self.rx
            .wait("handshake_ack", self.step, |e| e.kind == "handshake_ack")
            .await
            .map(|(env, at)| Ack::from_env(env, at))
    }

    pub(crate) async fn wait(
        &mut self,
        what: &str,
        pred: impl FnMut(&Received) -> bool,
    ) -> Result<Received, String> {
        let step = self.step;
        self.rx.wait(what, step, pred).await.map(|(env, _)| env)
    }

    pub(crate) async fn expect_close(&mut self) -> Closed {
        let step = self.step;
        self.rx.expect_close(step).await
    }

    /// Sends a `ping` envelope and waits for its `pong`: the connection is open.
    pub(crate) async fn ping(&mut self) -> Result<Received, String> {
        let id = self.id();
        self.send(&Out::new(id, "ping")).await?;
        self.wait("pong", |e| e.kind == "pong" && e.corr == Some(id))
            .await
    }

    /// Closes with `1000` and waits (at most a second) for the hub's close frame and the
    /// end of the connection. Returns the hub's close frame code, if one came.
    pub(crate) async fn close_normally(&mut self) -> Closed {
        let frame = Message::Close(Some(CloseFrame {
            code: 1000.into(),
            reason: "conformance case done".into(),
        }));
        let mut closed = Closed::default();
        if let Err(e) = self.send_frame(frame).await {
            closed.end = e;
            return closed;
        }
        self.rx.expect_close(Duration::from_secs(1)).await
    }

    /// Ends a case's connection politely (bounded).
    pub(crate) async fn finish(mut self) {
        if !self.rx.ended {
            let _ = self.close_normally().await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Hand-written HTTP

/// The status and headers of the hub's answer to an upgrade request.
#[derive(Debug, Clone)]
pub(crate) struct HttpReply {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
}

impl HttpReply {
    /// Every value of header `name` (case-insensitive).
    pub(crate) fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Sends an upgrade request with exactly `headers` (besides the WebSocket ones) and reads
/// the response head. The connection is dropped afterwards.
pub(crate) async fn raw_upgrade(
    target: &Target,
    headers: &[(&str, String)],
    step: Duration,
) -> Result<HttpReply, String> {
    use base64::Engine as _;
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&random_u64().to_le_bytes());
    key[8..].copy_from_slice(&random_u64().to_le_bytes());
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
        target.path, target.authority
    );
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    let exchange = async {
        let mut tcp = TcpStream::connect(&target.addr)
            .await
            .map_err(|e| format!("TCP connect to {}: {e}", target.addr))?;
        tcp.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("writing the request: {e}"))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 2048];
        loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                buf.truncate(end);
                break;
            }
            if buf.len() > 16 * 1024 {
                return Err("a response head over 16 KiB".to_string());
            }
            let n = tcp
                .read(&mut chunk)
                .await
                .map_err(|e| format!("reading the response: {e}"))?;
            if n == 0 {
                return Err(format!(
                    "the hub closed the connection after {} bytes of response",
                    buf.len()
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok(buf)
    };
    let head = timeout(step, exchange)
        .await
        .map_err(|_| format!("no response head within {} ms", step.as_millis()))??;
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP status line: {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(HttpReply { status, headers })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed() {
        let t = Target::parse("ws://127.0.0.1:7070/").expect("parses");
        assert_eq!(t.addr, "127.0.0.1:7070");
        assert_eq!(t.path, "/");
        let t = Target::parse("ws://hub.example").expect("parses");
        assert_eq!(t.addr, "hub.example:80");
        assert_eq!(t.path, "/");
        let t = Target::parse("ws://[::1]/tunnel?x=1").expect("parses");
        assert_eq!(t.addr, "[::1]:80");
        assert_eq!(t.path, "/tunnel?x=1");
        assert!(Target::parse("wss://h/").is_err());
        assert!(Target::parse("http://h/").is_err());
        assert!(Target::parse("ws:///").is_err());
    }
}
