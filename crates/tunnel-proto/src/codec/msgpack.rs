//! The MessagePack codec: binary frames, subprotocol `tunnel.v1.msgpack`.

use std::fmt;
use std::io::ErrorKind;
use std::marker::PhantomData;

use bytes::Bytes;
use serde::de::{self, DeserializeSeed, IgnoredAny, Visitor};

use super::de::{Ctx, EnvelopeSeed, RawEnvelope, RawPayload};
use super::{Codec, FrameKind, Limits, transcode};
use crate::envelope::{Envelope, Format, Payload};
use crate::error::{DecodeError, EncodeError};

/// Subprotocol name of the MessagePack codec.
pub(crate) const SUBPROTOCOL: &str = "tunnel.v1.msgpack";

/// Deepest nesting a decoder accepts inside a frame (unknown fields, payload checks).
const MAX_DEPTH: usize = 128;

/// The MessagePack codec.
///
/// The envelope is a map with string keys (the same names as in JSON); the payload is a
/// `bin` holding the payload's own MessagePack encoding, so a router never parses it.
#[derive(Debug, Clone, Copy, Default)]
pub struct MsgPackCodec;

type RefDeserializer<'de> = rmp_serde::Deserializer<rmp_serde::decode::ReadRefReader<'de, [u8]>>;

struct BinRef<'de>(Option<&'de [u8]>);

impl<'de> serde::Deserialize<'de> for BinRef<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BinRef<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a bin holding the payload")
            }
            fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Self::Value, E> {
                Ok(BinRef(Some(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(BinRef(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(BinRef(None))
            }
        }
        d.deserialize_bytes(V)
    }
}

impl<'de> RawPayload<'de> for BinRef<'de> {
    fn is_absent(&self) -> bool {
        self.0.is_none()
    }
}

fn value_err(e: rmp::encode::ValueWriteError) -> EncodeError {
    EncodeError::Serialize(e.to_string())
}

fn write_str(out: &mut Vec<u8>, s: &str) -> Result<(), EncodeError> {
    rmp::encode::write_str(out, s).map_err(value_err)
}

fn write_u64(out: &mut Vec<u8>, v: u64) -> Result<(), EncodeError> {
    rmp::encode::write_uint(out, v)
        .map(|_| ())
        .map_err(value_err)
}

fn len_u32(len: usize) -> Result<u32, EncodeError> {
    u32::try_from(len).map_err(|_| EncodeError::TooLarge {
        size: len,
        limit: u32::MAX as usize,
    })
}

impl Codec for MsgPackCodec {
    fn format(&self) -> Format {
        Format::MsgPack
    }

    fn subprotocol(&self) -> &'static str {
        SUBPROTOCOL
    }

    fn frame_kind(&self) -> FrameKind {
        FrameKind::Binary
    }

    fn encode(&self, env: &Envelope, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let optional = [
            ("seq", env.seq),
            ("ack", env.ack),
            ("corr", env.correlation),
        ];
        let fields = 3
            + optional.iter().filter(|(_, v)| v.is_some()).count()
            + usize::from(!env.headers.is_empty())
            + usize::from(env.payload.is_some())
            + usize::from(env.error.is_some());
        rmp::encode::write_map_len(out, len_u32(fields)?).map_err(value_err)?;
        write_str(out, "id")?;
        write_u64(out, env.id)?;
        write_str(out, "type")?;
        write_str(out, env.kind.as_str())?;
        write_str(out, "ts")?;
        write_u64(out, env.timestamp)?;
        for (name, value) in optional {
            if let Some(v) = value {
                write_str(out, name)?;
                write_u64(out, v)?;
            }
        }
        if !env.headers.is_empty() {
            write_str(out, "headers")?;
            rmp::encode::write_map_len(out, len_u32(env.headers.len())?).map_err(value_err)?;
            for (k, v) in env.headers.iter() {
                write_str(out, k)?;
                write_str(out, v)?;
            }
        }
        if let Some(payload) = &env.payload {
            write_str(out, "payload")?;
            if payload.format() == Format::MsgPack {
                rmp::encode::write_bin(out, payload.bytes()).map_err(value_err)?;
            } else if env.content_encoding().is_some() {
                return Err(EncodeError::CompressedFormatMismatch {
                    payload: payload.format().name(),
                    codec: "msgpack",
                });
            } else {
                let mut tmp = Vec::with_capacity(payload.len());
                transcode(payload.format(), payload.bytes(), Format::MsgPack, &mut tmp)?;
                rmp::encode::write_bin(out, &tmp).map_err(value_err)?;
            }
        }
        if let Some(err) = &env.error {
            write_str(out, "error")?;
            rmp::encode::write_map_len(out, 2).map_err(value_err)?;
            write_str(out, "code")?;
            write_str(out, &err.code)?;
            write_str(out, "message")?;
            write_str(out, &err.message)?;
        }
        Ok(())
    }

    fn decode(&self, frame: &Bytes, limits: &Limits) -> Result<Envelope, DecodeError> {
        limits.check_size(frame.len())?;
        let ctx = Ctx::new(limits.max_headers);
        let mut de = new_deserializer(frame);
        let raw: RawEnvelope<BinRef<'_>> = EnvelopeSeed {
            ctx: &ctx,
            _payload: PhantomData,
        }
        .deserialize(&mut de)
        .map_err(|e| map_error_in(&ctx, e))?;
        expect_end(&mut de)?;
        let (raw_payload, mut env) = raw.into_parts();
        env.payload = raw_payload
            .and_then(|BinRef(bytes)| bytes)
            .map(|bytes| Payload::from_trusted(Format::MsgPack, frame.slice_ref(bytes)));
        Ok(env)
    }
}

fn new_deserializer(input: &[u8]) -> RefDeserializer<'_> {
    let mut de = rmp_serde::Deserializer::from_read_ref(input);
    de.set_max_depth(MAX_DEPTH);
    de
}

/// Checks that `bytes` hold exactly one MessagePack value.
pub(crate) fn validate(bytes: &[u8]) -> Result<(), DecodeError> {
    let mut de = new_deserializer(bytes);
    <IgnoredAny as serde::Deserialize>::deserialize(&mut de).map_err(map_error)?;
    expect_end(&mut de)
}

/// Fails if anything follows the value just decoded.
fn expect_end(de: &mut RefDeserializer<'_>) -> Result<(), DecodeError> {
    match <IgnoredAny as serde::Deserialize>::deserialize(de) {
        Err(rmp_serde::decode::Error::InvalidMarkerRead(e))
            if e.kind() == ErrorKind::UnexpectedEof =>
        {
            Ok(())
        }
        _ => Err(DecodeError::Malformed {
            codec: "msgpack",
            reason: "trailing bytes after the message".into(),
        }),
    }
}

fn map_error_in(ctx: &Ctx, e: rmp_serde::decode::Error) -> DecodeError {
    if let Some(err) = ctx.take_error() {
        return err;
    }
    match map_error(e) {
        DecodeError::Malformed { reason, .. } if !ctx.field().is_empty() => DecodeError::BadField {
            field: ctx.field(),
            reason,
        },
        other => other,
    }
}

pub(crate) fn map_error(e: rmp_serde::decode::Error) -> DecodeError {
    use rmp_serde::decode::Error;
    match &e {
        Error::InvalidMarkerRead(io) | Error::InvalidDataRead(io)
            if io.kind() == ErrorKind::UnexpectedEof =>
        {
            DecodeError::Truncated
        }
        _ => DecodeError::Malformed {
            codec: "msgpack",
            reason: e.to_string(),
        },
    }
}
