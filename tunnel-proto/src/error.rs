//! Error types of the wire protocol.

use thiserror::Error;

/// Why a frame could not be decoded into an [`Envelope`](crate::Envelope).
///
/// Every variant names what was wrong so that a peer can log it and a transport can
/// map it to a close code (see [`DecodeError::close_code`]).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame ended before the envelope was complete.
    #[error("truncated message: the frame ended inside the envelope")]
    Truncated,
    /// The frame is larger than the configured limit. Checked before anything is parsed.
    #[error("message of {size} bytes exceeds max_message_size {limit} bytes")]
    TooLarge {
        /// Size of the frame in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// A decompressed payload would exceed the configured limit. Detected while
    /// inflating, before the expanded size is allocated.
    #[error("payload expands past max_decompressed_size {limit} bytes")]
    DecompressedTooLarge {
        /// The configured limit in bytes.
        limit: usize,
    },
    /// The frame is not well-formed in the codec's syntax (not JSON, not MessagePack).
    #[error("malformed {codec} message: {reason}")]
    Malformed {
        /// The codec that rejected the frame.
        codec: &'static str,
        /// What the parser reported.
        reason: String,
    },
    /// A known field is present with a value of the wrong type or out of range.
    #[error("bad field `{field}`: {reason}")]
    BadField {
        /// The wire name of the field.
        field: &'static str,
        /// What was wrong with it.
        reason: String,
    },
    /// A required field is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// More header entries than the configured limit.
    #[error("{count} headers exceed max_headers {limit}")]
    TooManyHeaders {
        /// Number of headers in the message.
        count: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The payload is compressed with an encoding this peer does not know.
    #[error("unsupported content-encoding `{0}`")]
    UnsupportedEncoding(String),
    /// The payload is still compressed; call
    /// [`Envelope::decompress_payload`](crate::Envelope::decompress_payload) first.
    #[error("payload is compressed with `{0}`; decompress it before decoding")]
    StillEncoded(String),
    /// The envelope has no payload but one was asked for.
    #[error("message has no payload")]
    NoPayload,
    /// The payload did not match the expected typed message.
    #[error("payload does not match {expected}: {reason}")]
    Payload {
        /// The Rust type that was expected.
        expected: &'static str,
        /// What the payload decoder reported.
        reason: String,
    },
    /// The peer speaks a protocol version this side does not support.
    #[error(transparent)]
    UnsupportedVersion(#[from] VersionError),
}

impl DecodeError {
    /// The WebSocket close code a transport sends when a peer's frame fails to decode
    /// this way (see PROTOCOL.md, "Close codes").
    pub fn close_code(&self) -> crate::CloseCode {
        use crate::CloseCode;
        match self {
            DecodeError::TooLarge { .. } | DecodeError::DecompressedTooLarge { .. } => {
                CloseCode::MESSAGE_TOO_BIG
            }
            DecodeError::UnsupportedVersion(_) => CloseCode::VERSION_MISMATCH,
            DecodeError::TooManyHeaders { .. } => CloseCode::POLICY_VIOLATION,
            _ => CloseCode::INVALID_PAYLOAD,
        }
    }
}

/// Why an envelope or payload could not be encoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    /// A typed payload could not be serialized.
    #[error("cannot serialize payload: {0}")]
    Serialize(String),
    /// The payload is compressed and in another format than the codec, so it cannot be
    /// transcoded without inflating it first.
    #[error(
        "compressed {payload} payload cannot be sent with the {codec} codec; compress after choosing the codec"
    )]
    CompressedFormatMismatch {
        /// The payload's format.
        payload: &'static str,
        /// The codec's format.
        codec: &'static str,
    },
    /// The payload bytes could not be transcoded to the codec's format.
    #[error("cannot transcode payload from {from} to {to}: {reason}")]
    Transcode {
        /// Source format.
        from: &'static str,
        /// Target format.
        to: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The encoded message would exceed the configured limit.
    #[error("message of {size} bytes exceeds max_message_size {limit} bytes")]
    TooLarge {
        /// Size of the encoded message in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
}

/// No protocol version is supported by both peers, or a range is invalid.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum VersionError {
    /// The two ranges do not overlap.
    #[error("no common protocol version: we support {ours}, the peer supports {theirs}")]
    NoCommonVersion {
        /// Our supported range.
        ours: crate::VersionRange,
        /// The peer's supported range.
        theirs: crate::VersionRange,
    },
    /// A range whose minimum is above its maximum.
    #[error("invalid protocol version range {0}: min is above max")]
    InvalidRange(crate::VersionRange),
}
