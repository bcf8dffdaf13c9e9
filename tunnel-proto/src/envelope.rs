//! The envelope every message travels in.

use std::fmt;

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};

use crate::error::{DecodeError, EncodeError};

/// The type of a message, carried in the envelope's `type` field.
///
/// A type this version does not know decodes to [`MessageType::Unknown`] with its wire
/// name, so a newer peer can talk to an older one: the receiver surfaces it (for example
/// to a fallback handler) instead of failing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MessageType {
    /// `handshake`: the agent's opening message.
    Handshake,
    /// `handshake_ack`: the hub's answer to the handshake, carrying the session id.
    HandshakeAck,
    /// `ping`: application-level liveness probe; answered with `pong`.
    Ping,
    /// `pong`: answer to `ping`, echoing its id in `corr`.
    Pong,
    /// `close`: the sender is about to close the connection, with a code, reason and
    /// optional reconnect hint.
    Close,
    /// `resource`: a create, update or delete of a Kubernetes-style resource.
    Resource,
    /// `status`: the status of a resource.
    Status,
    /// `event`: an event about a resource.
    Event,
    /// `command`: a named command with arguments, usually answered with `reply`.
    Command,
    /// `reply`: the answer to a request; `corr` names the request's id.
    Reply,
    /// `ack`: a standalone cumulative acknowledgement (the `ack` field carries it).
    Ack,
    /// `window`: flow-control credit (reserved for flow control).
    Window,
    /// A type this version does not know, with its wire name.
    Unknown(Box<str>),
}

impl MessageType {
    /// Every known type, in wire-name order of the protocol document.
    pub const KNOWN: [MessageType; 12] = [
        MessageType::Handshake,
        MessageType::HandshakeAck,
        MessageType::Ping,
        MessageType::Pong,
        MessageType::Close,
        MessageType::Resource,
        MessageType::Status,
        MessageType::Event,
        MessageType::Command,
        MessageType::Reply,
        MessageType::Ack,
        MessageType::Window,
    ];

    /// The wire name of this type.
    pub fn as_str(&self) -> &str {
        match self {
            MessageType::Unknown(name) => name,
            known => known.static_name().unwrap_or_default(),
        }
    }

    /// The wire name of a known type as a `&'static str` (`None` for
    /// [`MessageType::Unknown`]), for metric labels that must not allocate.
    pub fn static_name(&self) -> Option<&'static str> {
        Some(match self {
            MessageType::Handshake => "handshake",
            MessageType::HandshakeAck => "handshake_ack",
            MessageType::Ping => "ping",
            MessageType::Pong => "pong",
            MessageType::Close => "close",
            MessageType::Resource => "resource",
            MessageType::Status => "status",
            MessageType::Event => "event",
            MessageType::Command => "command",
            MessageType::Reply => "reply",
            MessageType::Ack => "ack",
            MessageType::Window => "window",
            MessageType::Unknown(_) => return None,
        })
    }

    /// Parses a wire name. Never fails: unknown names become [`MessageType::Unknown`].
    pub fn from_wire(name: &str) -> MessageType {
        match name {
            "handshake" => MessageType::Handshake,
            "handshake_ack" => MessageType::HandshakeAck,
            "ping" => MessageType::Ping,
            "pong" => MessageType::Pong,
            "close" => MessageType::Close,
            "resource" => MessageType::Resource,
            "status" => MessageType::Status,
            "event" => MessageType::Event,
            "command" => MessageType::Command,
            "reply" => MessageType::Reply,
            "ack" => MessageType::Ack,
            "window" => MessageType::Window,
            other => MessageType::Unknown(other.into()),
        }
    }

    /// Whether this is a control message of the protocol itself (handshake, ping, pong,
    /// close, ack, window) rather than application data.
    pub fn is_control(&self) -> bool {
        matches!(
            self,
            MessageType::Handshake
                | MessageType::HandshakeAck
                | MessageType::Ping
                | MessageType::Pong
                | MessageType::Close
                | MessageType::Ack
                | MessageType::Window
        )
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Well-known header names. Header names are lower case on the wire.
pub mod header {
    /// How the payload bytes are encoded (`deflate`); absent means identity.
    pub const CONTENT_ENCODING: &str = "content-encoding";
    /// W3C trace context `traceparent`.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace context `tracestate`.
    pub const TRACESTATE: &str = "tracestate";
    /// `expect: reply` marks a request: the receiver answers it with exactly one `reply`.
    pub const EXPECT: &str = "expect";
    /// The value of [`EXPECT`] that asks for a reply.
    pub const EXPECT_REPLY: &str = "reply";
}

/// String headers of an envelope, in insertion order.
///
/// A small vector rather than a map: messages carry few headers, and an empty
/// `Headers` does not allocate. Names are compared ASCII case-insensitively.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// An empty set of headers.
    pub const fn new() -> Self {
        Headers(Vec::new())
    }

    /// The value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Sets `name` to `value`, replacing an existing value.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        let value = value.into();
        match self
            .0
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(&name))
        {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    /// Removes `name` and returns its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let pos = self
            .0
            .iter()
            .position(|(k, _)| k.eq_ignore_ascii_case(name))?;
        Some(self.0.remove(pos).1)
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The headers in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub(crate) fn push_unchecked(&mut self, name: String, value: String) {
        self.0.push((name, value));
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut h = Headers::new();
        for (k, v) in iter {
            h.insert(k, v);
        }
        h
    }
}

/// The error carried in an envelope's `error` field, for example by a `reply` whose
/// handler failed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    /// A short machine-readable code, such as `handler_error` or `timeout`.
    pub code: String,
    /// A human-readable message.
    pub message: String,
}

impl ErrorBody {
    /// An error body with a code and message.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorBody {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// The serialization format of a payload; also names the codec of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// JSON text (serde_json).
    Json,
    /// MessagePack with structs as maps (rmp-serde).
    MsgPack,
}

impl Format {
    /// A short name for messages: `json` or `msgpack`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::MsgPack => "msgpack",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An opaque, already-encoded payload.
///
/// The bytes are the payload serialized in [`Payload::format`]; they are kept as a
/// reference-counted [`Bytes`] so that decoding a frame slices the payload out of the
/// frame without copying or parsing it. A hub that only routes a message never looks
/// inside. Typed access goes through [`Payload::decode`].
///
/// If the envelope carries a `content-encoding` header the bytes are compressed; see
/// [`Envelope::decompress_payload`].
#[derive(Clone, PartialEq, Eq)]
pub struct Payload {
    format: Format,
    bytes: Bytes,
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Payload")
            .field("format", &self.format)
            .field("len", &self.bytes.len())
            .finish()
    }
}

impl Payload {
    /// Serializes `value` in `format`.
    pub fn encode<T: Serialize + ?Sized>(format: Format, value: &T) -> Result<Self, EncodeError> {
        // Most payloads are small: one allocation of this size avoids the doubling
        // reallocations of an empty Vec.
        let mut bytes = Vec::with_capacity(256);
        match format {
            Format::Json => serde_json::to_writer(&mut bytes, value)
                .map_err(|e| EncodeError::Serialize(e.to_string()))?,
            Format::MsgPack => rmp_serde::encode::write_named(&mut bytes, value)
                .map_err(|e| EncodeError::Serialize(e.to_string()))?,
        }
        Ok(Payload {
            format,
            // As a boxed slice: `Bytes` from a `Vec` with spare capacity allocates a
            // shared header for every payload.
            bytes: bytes.into_boxed_slice().into(),
        })
    }

    /// Serializes `value` as JSON.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, EncodeError> {
        Self::encode(Format::Json, value)
    }

    /// Serializes `value` as MessagePack.
    pub fn msgpack<T: Serialize + ?Sized>(value: &T) -> Result<Self, EncodeError> {
        Self::encode(Format::MsgPack, value)
    }

    /// Wraps bytes that already hold one value in `format`, checking that they do.
    pub fn from_encoded(format: Format, bytes: impl Into<Bytes>) -> Result<Self, DecodeError> {
        let bytes = bytes.into();
        match format {
            Format::Json => {
                serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).map_err(|e| {
                    DecodeError::Malformed {
                        codec: "json",
                        reason: e.to_string(),
                    }
                })?;
            }
            Format::MsgPack => {
                crate::codec::msgpack::validate(&bytes)?;
            }
        }
        Ok(Payload { format, bytes })
    }

    /// Wraps bytes without checking them. Crate-internal: codecs call it with slices
    /// their parser has already validated, and compression with compressed bytes.
    pub(crate) fn from_trusted(format: Format, bytes: Bytes) -> Self {
        Payload { format, bytes }
    }

    /// The format the bytes are in.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The encoded bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Length of the encoded bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the payload is zero bytes long.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Deserializes the payload into `T`. Unknown fields in the payload are ignored, so
    /// a newer peer's additions do not break an older reader.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        let err = |reason: String| DecodeError::Payload {
            expected: std::any::type_name::<T>(),
            reason,
        };
        match self.format {
            Format::Json => serde_json::from_slice(&self.bytes).map_err(|e| err(e.to_string())),
            Format::MsgPack => rmp_serde::from_slice(&self.bytes).map_err(|e| err(e.to_string())),
        }
    }

    /// Returns the payload re-encoded in `format` (a no-op clone when it already is).
    pub fn to_format(&self, format: Format) -> Result<Payload, EncodeError> {
        if self.format == format {
            return Ok(self.clone());
        }
        let mut out = Vec::with_capacity(self.bytes.len() + self.bytes.len() / 4);
        crate::codec::transcode(self.format, &self.bytes, format, &mut out)?;
        Ok(Payload {
            format,
            bytes: out.into(),
        })
    }
}

/// One message on the wire.
///
/// Construct with [`Envelope::new`] and the `with_*` setters; fields are public to read
/// and change. See PROTOCOL.md for the wire form of each field.
///
/// ```
/// use tunnel_proto::{Envelope, MessageType, Payload, messages::Command};
///
/// let cmd = Command::new("restart").arg("pod", "web-0");
/// let env = Envelope::new(7, MessageType::Command, 1_700_000_000_000)
///     .with_payload(Payload::json(&cmd)?);
/// assert_eq!(env.decode_payload::<Command>()?, cmd);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Envelope {
    /// Message id, unique per sender within a session (wire `id`).
    pub id: u64,
    /// Message type (wire `type`).
    pub kind: MessageType,
    /// Send time in milliseconds since the Unix epoch, set by the sender (wire `ts`).
    pub timestamp: u64,
    /// Per-direction sequence number of a data message (wire `seq`).
    pub seq: Option<u64>,
    /// Cumulative acknowledgement: the highest `seq` received in order from the peer
    /// (wire `ack`).
    pub ack: Option<u64>,
    /// The id of the message this one answers (wire `corr`).
    pub correlation: Option<u64>,
    /// String headers such as `traceparent` and `content-encoding` (wire `headers`).
    pub headers: Headers,
    /// The opaque payload (wire `payload`).
    pub payload: Option<Payload>,
    /// An error, for example in a failed `reply` (wire `error`).
    pub error: Option<ErrorBody>,
    /// Names of envelope fields this version does not know, surfaced rather than
    /// rejected. Never encoded.
    pub unknown_fields: Vec<String>,
}

impl Envelope {
    /// An envelope with an id, type and timestamp and nothing else.
    pub fn new(id: u64, kind: MessageType, timestamp: u64) -> Self {
        Envelope {
            id,
            kind,
            timestamp,
            seq: None,
            ack: None,
            correlation: None,
            headers: Headers::new(),
            payload: None,
            error: None,
            unknown_fields: Vec::new(),
        }
    }

    /// Sets the payload.
    pub fn with_payload(mut self, payload: Payload) -> Self {
        self.payload = Some(payload);
        self
    }

    /// Sets the sequence number.
    pub fn with_seq(mut self, seq: u64) -> Self {
        self.seq = Some(seq);
        self
    }

    /// Sets the cumulative acknowledgement.
    pub fn with_ack(mut self, ack: u64) -> Self {
        self.ack = Some(ack);
        self
    }

    /// Sets the correlation id (the id of the message this answers).
    pub fn with_correlation(mut self, id: u64) -> Self {
        self.correlation = Some(id);
        self
    }

    /// Sets a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Sets the error.
    pub fn with_error(mut self, error: ErrorBody) -> Self {
        self.error = Some(error);
        self
    }

    /// Marks the message as a request: the peer answers it with one `reply` whose
    /// `corr` is this message's id (header `expect: reply`).
    pub fn expecting_reply(mut self) -> Self {
        self.set_expecting_reply();
        self
    }

    /// [`Envelope::expecting_reply`] in place.
    pub fn set_expecting_reply(&mut self) {
        self.headers.insert(header::EXPECT, header::EXPECT_REPLY);
    }

    /// Whether the sender expects a `reply` (header `expect: reply`).
    pub fn expects_reply(&self) -> bool {
        self.headers
            .get(header::EXPECT)
            .is_some_and(|v| v.eq_ignore_ascii_case(header::EXPECT_REPLY))
    }

    /// A `reply` answering this message: `corr` set to this message's id.
    pub fn reply(&self, id: u64, timestamp: u64) -> Envelope {
        Envelope::new(id, MessageType::Reply, timestamp).with_correlation(self.id)
    }

    /// The `content-encoding` of the payload, if it is compressed.
    pub fn content_encoding(&self) -> Option<&str> {
        self.headers.get(header::CONTENT_ENCODING)
    }

    /// An upper bound of this envelope's encoded size in `format`'s codec, counting the
    /// largest `seq` and `ack` a session may add when it sends it. Costs no encoding, so
    /// a sender tells that a message fits a size limit without encoding it, and encodes
    /// it only when the bound is over the limit. `None` when the codec would have to
    /// transcode the payload (its size in the other format is known only by doing so).
    ///
    /// ```
    /// use tunnel_proto::{Envelope, Format, MessageType, Payload};
    ///
    /// let env = Envelope::new(1, MessageType::Event, 0)
    ///     .with_payload(Payload::encode(Format::Json, &"hello")?);
    /// let mut wire = Vec::new();
    /// Format::Json.codec().encode(&env, &mut wire)?;
    /// assert!(wire.len() <= env.encoded_len_bound(Format::Json).unwrap());
    /// assert_eq!(env.encoded_len_bound(Format::MsgPack), None); // transcoded
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn encoded_len_bound(&self, format: Format) -> Option<usize> {
        // A string: JSON escapes a control character in six bytes; MessagePack adds a
        // header of at most five.
        let text = |s: &str| match format {
            Format::Json => s.len().saturating_mul(6).saturating_add(2),
            Format::MsgPack => s.len().saturating_add(5),
        };
        // The field names and punctuation, and six u64 fields (id, ts, seq, ack,
        // corr, and a spare) at their widest: 20 digits in JSON, 9 bytes in MessagePack.
        let mut bound: usize = 256 + text(self.kind.as_str());
        for (k, v) in self.headers.iter() {
            bound = bound
                .saturating_add(text(k))
                .saturating_add(text(v))
                .saturating_add(2);
        }
        if let Some(err) = &self.error {
            bound = bound
                .saturating_add(text(&err.code))
                .saturating_add(text(&err.message));
        }
        if let Some(payload) = &self.payload {
            let n = payload.len();
            let wire = match (format, self.content_encoding().is_some()) {
                // Compressed bytes travel in base64 in JSON.
                (Format::Json, true) => n.div_ceil(3).saturating_mul(4).saturating_add(2),
                (Format::MsgPack, true) => n.saturating_add(5),
                (_, false) if payload.format() != format => return None,
                (Format::Json, false) => n,
                (Format::MsgPack, false) => n.saturating_add(5),
            };
            bound = bound.saturating_add(wire);
        }
        Some(bound)
    }

    /// Deserializes the payload into `T`.
    ///
    /// Fails with [`DecodeError::StillEncoded`] if the payload is compressed
    /// (decompress it first, with a limit) and [`DecodeError::NoPayload`] if there is none.
    pub fn decode_payload<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        if let Some(enc) = self.content_encoding() {
            return Err(DecodeError::StillEncoded(enc.to_owned()));
        }
        self.payload
            .as_ref()
            .ok_or(DecodeError::NoPayload)?
            .decode()
    }
}
