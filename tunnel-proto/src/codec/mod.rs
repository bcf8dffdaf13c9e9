//! Codecs: how an [`Envelope`] becomes a WebSocket frame and back.
//!
//! Two codecs ship: [`JsonCodec`] (text frames, subprotocol `tunnel.v1.json`) and
//! [`MsgPackCodec`] (binary frames, subprotocol `tunnel.v1.msgpack`). A connection picks
//! one during the WebSocket upgrade through `Sec-WebSocket-Protocol`
//! ([`Format::from_subprotocol`]).
//!
//! Encoding appends to a caller's buffer, so a write pump can reuse one allocation.
//! Decoding takes the frame as [`Bytes`] and slices the payload out of it without copying
//! or parsing it, and enforces the [`Limits`] before it parses anything.

use std::fmt;

use bytes::Bytes;

use crate::envelope::{Envelope, Format};
use crate::error::{DecodeError, EncodeError};

mod de;
pub(crate) mod json;
pub(crate) mod msgpack;

pub use json::JsonCodec;
pub use msgpack::MsgPackCodec;

/// Default maximum size of one message, before and after decompression: 16 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;
/// Default maximum number of headers in one envelope.
pub const DEFAULT_MAX_HEADERS: usize = 64;

/// Limits a decoder enforces. Every limit is checked before the memory it guards is
/// allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest frame accepted, in bytes. Default [`DEFAULT_MAX_MESSAGE_SIZE`].
    pub max_message_size: usize,
    /// Largest payload after decompression, in bytes. Default [`DEFAULT_MAX_MESSAGE_SIZE`].
    pub max_decompressed_size: usize,
    /// Most headers in one envelope. Default [`DEFAULT_MAX_HEADERS`].
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_decompressed_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_headers: DEFAULT_MAX_HEADERS,
        }
    }
}

impl Limits {
    /// Sets [`Limits::max_message_size`].
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Sets [`Limits::max_decompressed_size`].
    pub fn max_decompressed_size(mut self, bytes: usize) -> Self {
        self.max_decompressed_size = bytes;
        self
    }

    /// Sets [`Limits::max_headers`].
    pub fn max_headers(mut self, count: usize) -> Self {
        self.max_headers = count;
        self
    }

    /// Fails with [`DecodeError::TooLarge`] if a frame of `size` bytes is over the limit.
    pub fn check_size(&self, size: usize) -> Result<(), DecodeError> {
        if size > self.max_message_size {
            Err(DecodeError::TooLarge {
                size,
                limit: self.max_message_size,
            })
        } else {
            Ok(())
        }
    }
}

/// The WebSocket frame type a codec produces and expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Text frames (UTF-8).
    Text,
    /// Binary frames.
    Binary,
}

/// Turns envelopes into frames and frames into envelopes.
///
/// Implementations must never panic on any input: every malformed frame is a
/// [`DecodeError`].
pub trait Codec: Send + Sync + fmt::Debug + 'static {
    /// The format of payloads this codec carries natively.
    fn format(&self) -> Format;

    /// The `Sec-WebSocket-Protocol` name that selects this codec.
    fn subprotocol(&self) -> &'static str;

    /// Whether frames are text or binary.
    fn frame_kind(&self) -> FrameKind;

    /// Appends the encoding of `env` to `out`. A payload in another format is transcoded.
    fn encode(&self, env: &Envelope, out: &mut Vec<u8>) -> Result<(), EncodeError>;

    /// Decodes one frame. The payload is sliced out of `frame` without being parsed.
    fn decode(&self, frame: &Bytes, limits: &Limits) -> Result<Envelope, DecodeError>;

    /// [`Codec::decode`] into a box. A receiver hands each envelope on by value
    /// through several layers, and a box moves for a pointer's cost where an
    /// `Envelope` is a couple of hundred bytes. The default boxes what
    /// [`Codec::decode`] returns; a codec that can box the envelope earlier (before it
    /// is returned through its own helpers) overrides it. A codec whose `decode`
    /// calls `decode_boxed` must override `decode_boxed`, or the two call each other
    /// forever.
    fn decode_boxed(&self, frame: &Bytes, limits: &Limits) -> Result<Box<Envelope>, DecodeError> {
        self.decode(frame, limits).map(Box::new)
    }

    /// Decodes a frame that is already known to be UTF-8 (a WebSocket text frame, which
    /// the transport has validated): `text` is `frame`'s contents as a `str`. A text
    /// codec can skip its own UTF-8 checks; the default just calls
    /// [`Codec::decode_boxed`]. Boxed, as [`Codec::decode_boxed`] is.
    fn decode_text(
        &self,
        frame: &Bytes,
        text: &str,
        limits: &Limits,
    ) -> Result<Box<Envelope>, DecodeError> {
        let _ = text;
        self.decode_boxed(frame, limits)
    }
}

impl Format {
    /// Every format, in order of preference (most efficient first).
    pub const ALL: [Format; 2] = [Format::MsgPack, Format::Json];

    /// The codec for this format.
    pub fn codec(self) -> &'static dyn Codec {
        match self {
            Format::Json => &JsonCodec,
            Format::MsgPack => &MsgPackCodec,
        }
    }

    /// The WebSocket subprotocol name: `tunnel.v1.json` or `tunnel.v1.msgpack`.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Format::Json => json::SUBPROTOCOL,
            Format::MsgPack => msgpack::SUBPROTOCOL,
        }
    }

    /// The format a subprotocol name selects, or `None` for an unknown name.
    pub fn from_subprotocol(name: &str) -> Option<Format> {
        Format::ALL
            .into_iter()
            .find(|f| f.subprotocol().eq_ignore_ascii_case(name.trim()))
    }
}

/// Re-encodes one value from one format into another, appending to `out`.
pub(crate) fn transcode(
    from: Format,
    input: &[u8],
    to: Format,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let err = |reason: String| EncodeError::Transcode {
        from: from.name(),
        to: to.name(),
        reason,
    };
    match (from, to) {
        (Format::Json, Format::MsgPack) => {
            let mut de = serde_json::Deserializer::from_slice(input);
            let mut ser = rmp_serde::Serializer::new(&mut *out).with_struct_map();
            serde_transcode::transcode(&mut de, &mut ser).map_err(|e| err(e.to_string()))
        }
        (Format::MsgPack, Format::Json) => {
            let mut de = rmp_serde::Deserializer::from_read_ref(input);
            let mut ser = serde_json::Serializer::new(&mut *out);
            serde_transcode::transcode(&mut de, &mut ser).map_err(|e| err(e.to_string()))
        }
        _ => {
            out.extend_from_slice(input);
            Ok(())
        }
    }
}
