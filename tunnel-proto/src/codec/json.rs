//! The JSON codec: text frames, subprotocol `tunnel.v1.json`.

use std::marker::PhantomData;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::de::DeserializeSeed;
use serde_json::value::RawValue;

use super::de::{Ctx, EnvelopeSeed, RawEnvelope, RawPayload};
use super::{Codec, FrameKind, Limits, transcode};
use crate::envelope::{Envelope, Format, Payload};
use crate::error::{DecodeError, EncodeError};

/// Subprotocol name of the JSON codec.
pub(crate) const SUBPROTOCOL: &str = "tunnel.v1.json";

/// The JSON codec.
///
/// The payload is embedded as raw JSON (or, when the envelope has a `content-encoding`
/// header, as a base64 string of the encoded bytes).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

struct JsonRaw<'de>(&'de RawValue);

impl<'de> serde::Deserialize<'de> for JsonRaw<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'de RawValue>::deserialize(d).map(JsonRaw)
    }
}

impl<'de> RawPayload<'de> for JsonRaw<'de> {}

fn write_str(out: &mut Vec<u8>, s: &str) -> Result<(), EncodeError> {
    serde_json::to_writer(out, s).map_err(|e| EncodeError::Serialize(e.to_string()))
}

fn write_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

impl Codec for JsonCodec {
    fn format(&self) -> Format {
        Format::Json
    }

    fn subprotocol(&self) -> &'static str {
        SUBPROTOCOL
    }

    fn frame_kind(&self) -> FrameKind {
        FrameKind::Text
    }

    fn encode(&self, env: &Envelope, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        out.extend_from_slice(b"{\"id\":");
        write_u64(out, env.id);
        out.extend_from_slice(b",\"type\":");
        write_str(out, env.kind.as_str())?;
        out.extend_from_slice(b",\"ts\":");
        write_u64(out, env.timestamp);
        for (name, value) in [
            (&b",\"seq\":"[..], env.seq),
            (b",\"ack\":", env.ack),
            (b",\"corr\":", env.correlation),
        ] {
            if let Some(v) = value {
                out.extend_from_slice(name);
                write_u64(out, v);
            }
        }
        if !env.headers.is_empty() {
            out.extend_from_slice(b",\"headers\":{");
            for (i, (k, v)) in env.headers.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, k)?;
                out.push(b':');
                write_str(out, v)?;
            }
            out.push(b'}');
        }
        if let Some(payload) = &env.payload {
            out.extend_from_slice(b",\"payload\":");
            if env.content_encoding().is_some() {
                if payload.format() != Format::Json {
                    return Err(EncodeError::CompressedFormatMismatch {
                        payload: payload.format().name(),
                        codec: "json",
                    });
                }
                out.push(b'"');
                let start = out.len();
                let len = base64::encoded_len(payload.len(), true).unwrap_or(0);
                out.resize(start + len, 0);
                let written = BASE64
                    .encode_slice(payload.bytes(), &mut out[start..])
                    .map_err(|e| EncodeError::Serialize(e.to_string()))?;
                out.truncate(start + written);
                out.push(b'"');
            } else if payload.format() == Format::Json {
                out.extend_from_slice(payload.bytes());
            } else {
                transcode(payload.format(), payload.bytes(), Format::Json, out)?;
            }
        }
        if let Some(err) = &env.error {
            out.extend_from_slice(b",\"error\":{\"code\":");
            write_str(out, &err.code)?;
            out.extend_from_slice(b",\"message\":");
            write_str(out, &err.message)?;
            out.push(b'}');
        }
        out.push(b'}');
        Ok(())
    }

    fn decode(&self, frame: &Bytes, limits: &Limits) -> Result<Envelope, DecodeError> {
        limits.check_size(frame.len())?;
        decode_from(serde_json::Deserializer::from_slice(frame), frame, limits)
    }

    fn decode_text(
        &self,
        frame: &Bytes,
        text: &str,
        limits: &Limits,
    ) -> Result<Box<Envelope>, DecodeError> {
        // Parsing from a `str` skips serde_json's UTF-8 checks of every string, which
        // the transport already made for the whole frame. The payload is sliced out of
        // `frame`, so `text` must be the very same bytes.
        if text.as_ptr() != frame.as_ptr() || text.len() != frame.len() {
            return self.decode_boxed(frame, limits);
        }
        limits.check_size(frame.len())?;
        decode_from(serde_json::Deserializer::from_str(text), frame, limits).map(Box::new)
    }
}

fn decode_from<'de, R: serde_json::de::Read<'de>>(
    mut de: serde_json::Deserializer<R>,
    frame: &Bytes,
    limits: &Limits,
) -> Result<Envelope, DecodeError> {
    let ctx = Ctx::new(limits.max_headers);
    let raw: RawEnvelope<JsonRaw<'de>> = EnvelopeSeed {
        ctx: &ctx,
        _payload: PhantomData,
    }
    .deserialize(&mut de)
    .and_then(|raw| de.end().map(|()| raw))
    .map_err(|e| map_error(&ctx, e))?;
    let (raw_payload, mut env) = raw.into_parts();
    env.payload = match raw_payload {
        None => None,
        Some(JsonRaw(value)) if env.content_encoding().is_some() => {
            let text: &str =
                serde_json::from_str(value.get()).map_err(|_| DecodeError::BadField {
                    field: "payload",
                    reason: "a payload with content-encoding must be a base64 string".into(),
                })?;
            let bytes = BASE64.decode(text).map_err(|e| DecodeError::BadField {
                field: "payload",
                reason: format!("invalid base64: {e}"),
            })?;
            Some(Payload::from_trusted(Format::Json, bytes.into()))
        }
        Some(JsonRaw(value)) => Some(Payload::from_trusted(
            Format::Json,
            frame.slice_ref(value.get().as_bytes()),
        )),
    };
    Ok(env)
}

fn map_error(ctx: &Ctx, e: serde_json::Error) -> DecodeError {
    use serde_json::error::Category;
    if let Some(err) = ctx.take_error() {
        return err;
    }
    match e.classify() {
        Category::Eof => DecodeError::Truncated,
        Category::Data if !ctx.field().is_empty() => DecodeError::BadField {
            field: ctx.field(),
            reason: e.to_string(),
        },
        _ => DecodeError::Malformed {
            codec: "json",
            reason: e.to_string(),
        },
    }
}
