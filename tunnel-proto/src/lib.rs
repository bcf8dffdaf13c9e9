//! The tunnel wire protocol, with no IO.
//!
//! This crate defines what travels between an agent and a hub: the [`Envelope`], the
//! [`MessageType`]s and their typed payloads ([`messages`]), the [`Codec`]s that turn
//! envelopes into WebSocket frames (JSON and MessagePack), protocol version negotiation
//! ([`negotiate_version`]), close codes ([`CloseCode`]), payload compression, and the
//! sequence/acknowledgement state machines of resumable sessions ([`session`]).
//!
//! It never touches a socket, a clock or an async runtime: timestamps are passed in by
//! the caller, and encoding writes into the caller's buffer. That makes every part of it
//! testable without a runtime and usable from any transport.
//!
//! # Features
//! - `compression` (default): deflate payload compression with a decompression limit.
//!
//! # Example
//! ```
//! use bytes::Bytes;
//! use tunnel_proto::{Codec, Envelope, Format, Limits, MessageType, Payload, messages::Event};
//!
//! let event = Event {
//!     event_type: "Normal".into(),
//!     reason: "Synced".into(),
//!     message: "deployment web synced".into(),
//!     regarding: None,
//! };
//! let codec = Format::MsgPack.codec();
//! let env = Envelope::new(1, MessageType::Event, 1_700_000_000_000)
//!     .with_seq(1)
//!     .with_payload(Payload::encode(codec.format(), &event)?);
//!
//! let mut frame = Vec::new();
//! codec.encode(&env, &mut frame)?;
//! let decoded = codec.decode(&Bytes::from(frame), &Limits::default())?;
//! assert_eq!(decoded, env);
//! assert_eq!(decoded.decode_payload::<Event>()?, event);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod close;
pub mod codec;
#[cfg(feature = "compression")]
pub mod compress;
mod envelope;
mod error;
pub mod handshake;
pub mod messages;
pub mod session;
pub mod text;
mod version;

pub use close::CloseCode;
pub use codec::{Codec, FrameKind, JsonCodec, Limits, MsgPackCodec};
pub use envelope::{Envelope, ErrorBody, Format, Headers, MessageType, Payload, header};
pub use error::{DecodeError, EncodeError, VersionError};
pub use version::{
    PROTOCOL_VERSION, VersionRange, capability, negotiate_capabilities, negotiate_version,
};
