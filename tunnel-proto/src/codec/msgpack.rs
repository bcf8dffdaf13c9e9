//! The MessagePack codec: binary frames, subprotocol `tunnel.v1.msgpack`.

use bytes::Bytes;
use rmp::Marker;

use super::{Codec, FrameKind, Limits, transcode};
use crate::envelope::{Envelope, ErrorBody, Format, Headers, MessageType, Payload};
use crate::error::{DecodeError, EncodeError};

/// Subprotocol name of the MessagePack codec.
pub(crate) const SUBPROTOCOL: &str = "tunnel.v1.msgpack";

/// Deepest nesting a decoder accepts inside a frame (unknown fields, payload checks).
const MAX_DEPTH: usize = 128;

/// The MessagePack codec.
///
/// The envelope is a map with string keys (the same names as in JSON); the payload is a
/// `bin` holding the payload's own MessagePack encoding, so a router never parses it.
/// Decoding walks the frame once with a bounds-checked cursor (no serde, no copies but
/// the header strings).
#[derive(Debug, Clone, Copy, Default)]
pub struct MsgPackCodec;

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
        // The transport's path is `decode_boxed`; this one pays an allocation more.
        self.decode_boxed(frame, limits).map(|env| *env)
    }

    fn decode_boxed(&self, frame: &Bytes, limits: &Limits) -> Result<Box<Envelope>, DecodeError> {
        limits.check_size(frame.len())?;
        let mut cur = Cursor::new(frame);
        let env = decode_envelope(&mut cur, frame, limits)?;
        if cur.pos != frame.len() {
            return Err(malformed("trailing bytes after the message"));
        }
        Ok(env)
    }
}

/// Checks that `bytes` hold exactly one MessagePack value.
pub(crate) fn validate(bytes: &[u8]) -> Result<(), DecodeError> {
    let mut cur = Cursor::new(bytes);
    cur.skip(MAX_DEPTH)?;
    if cur.pos != bytes.len() {
        return Err(malformed("trailing bytes after the value"));
    }
    Ok(())
}

fn malformed(reason: impl Into<String>) -> DecodeError {
    DecodeError::Malformed {
        codec: "msgpack",
        reason: reason.into(),
    }
}

fn bad(field: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError::BadField {
        field,
        reason: reason.into(),
    }
}

/// A read position in a frame. Every read checks the remaining length first, so a
/// length prefix larger than the frame is [`DecodeError::Truncated`], never an
/// allocation.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        // Building the error eagerly (`ok_or`) would construct and drop a DecodeError
        // on every read: a measurable share of the decode time.
        if self.buf.len() - self.pos < n {
            return Err(DecodeError::Truncated);
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn be(&mut self, n: usize) -> Result<u64, DecodeError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    #[inline]
    fn marker(&mut self) -> Result<Marker, DecodeError> {
        Ok(Marker::from_u8(self.byte()?))
    }

    /// Consumes a `nil` if one is next.
    fn nil(&mut self) -> bool {
        if self.buf.get(self.pos) == Some(&0xc0) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let signed =
            |v: i64| u64::try_from(v).map_err(|_| bad(field, format!("negative value {v}")));
        match self.marker()? {
            Marker::FixPos(v) => Ok(u64::from(v)),
            Marker::U8 => self.be(1),
            Marker::U16 => self.be(2),
            Marker::U32 => self.be(4),
            Marker::U64 => self.be(8),
            Marker::FixNeg(v) => signed(i64::from(v)),
            Marker::I8 => signed(i64::from(self.byte()? as i8)),
            Marker::I16 => signed(i64::from(self.be(2)? as u16 as i16)),
            Marker::I32 => signed(i64::from(self.be(4)? as u32 as i32)),
            Marker::I64 => signed(self.be(8)? as i64),
            other => Err(bad(
                field,
                format!("expected an unsigned integer, found {other:?}"),
            )),
        }
    }

    fn str_len(&mut self, marker: Marker) -> Result<Option<usize>, DecodeError> {
        Ok(Some(match marker {
            Marker::FixStr(n) => usize::from(n),
            Marker::Str8 => self.be(1)? as usize,
            Marker::Str16 => self.be(2)? as usize,
            Marker::Str32 => self.be(4)? as usize,
            _ => return Ok(None),
        }))
    }

    /// A string's raw bytes, not yet checked to be UTF-8.
    fn str_bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let marker = self.marker()?;
        match self.str_len(marker)? {
            Some(len) => self.take(len),
            None => Err(bad(field, format!("expected a string, found {marker:?}"))),
        }
    }

    fn str(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.str_bytes(field)?)
            .map_err(|e| bad(field, format!("invalid UTF-8: {e}")))
    }

    fn map_len(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        match self.marker()? {
            Marker::FixMap(n) => Ok(usize::from(n)),
            Marker::Map16 => Ok(self.be(2)? as usize),
            Marker::Map32 => Ok(self.be(4)? as usize),
            other if field.is_empty() => Err(malformed(format!(
                "expected an envelope map, found {other:?}"
            ))),
            other => Err(bad(field, format!("expected a map, found {other:?}"))),
        }
    }

    fn bin(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = match self.marker()? {
            Marker::Bin8 => self.be(1)?,
            Marker::Bin16 => self.be(2)?,
            Marker::Bin32 => self.be(4)?,
            other => return Err(bad(field, format!("expected a bin, found {other:?}"))),
        };
        self.take(len as usize)
    }

    /// Skips one value of any type, nested at most `depth` deep.
    fn skip(&mut self, depth: usize) -> Result<(), DecodeError> {
        if depth == 0 {
            return Err(malformed(format!("nested deeper than {MAX_DEPTH} levels")));
        }
        let marker = self.marker()?;
        if let Some(len) = self.str_len(marker)? {
            self.take(len)?;
            return Ok(());
        }
        let (items, bytes) = match marker {
            Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
                (0, 0)
            }
            Marker::U8 | Marker::I8 => (0, 1),
            Marker::U16 | Marker::I16 => (0, 2),
            Marker::U32 | Marker::I32 | Marker::F32 => (0, 4),
            Marker::U64 | Marker::I64 | Marker::F64 => (0, 8),
            Marker::Bin8 => (0, self.be(1)?),
            Marker::Bin16 => (0, self.be(2)?),
            Marker::Bin32 => (0, self.be(4)?),
            Marker::FixExt1 => (0, 2),
            Marker::FixExt2 => (0, 3),
            Marker::FixExt4 => (0, 5),
            Marker::FixExt8 => (0, 9),
            Marker::FixExt16 => (0, 17),
            Marker::Ext8 => (0, self.be(1)? + 1),
            Marker::Ext16 => (0, self.be(2)? + 1),
            Marker::Ext32 => (0, self.be(4)? + 1),
            Marker::FixArray(n) => (u64::from(n), 0),
            Marker::Array16 => (self.be(2)?, 0),
            Marker::Array32 => (self.be(4)?, 0),
            Marker::FixMap(n) => (u64::from(n) * 2, 0),
            Marker::Map16 => (self.be(2)? * 2, 0),
            Marker::Map32 => (self.be(4)? * 2, 0),
            Marker::Reserved => return Err(malformed("reserved marker 0xc1")),
            _ => return Err(malformed(format!("unexpected marker {marker:?}"))),
        };
        self.take(bytes as usize)?;
        for _ in 0..items {
            self.skip(depth - 1)?;
        }
        Ok(())
    }
}

fn set_once<T>(slot: &mut Option<T>, field: &'static str, value: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(bad(field, "duplicate field"));
    }
    *slot = Some(value);
    Ok(())
}

fn decode_envelope(
    cur: &mut Cursor<'_>,
    frame: &Bytes,
    limits: &Limits,
) -> Result<Box<Envelope>, DecodeError> {
    let fields = cur.map_len("")?;
    let (mut id, mut kind, mut ts) = (None, None, None);
    let (mut seq, mut ack, mut corr) = (None, None, None);
    let mut headers = None;
    let mut payload: Option<Option<&[u8]>> = None;
    let mut error = None;
    let mut unknown_fields = Vec::new();
    for _ in 0..fields {
        let key = cur.str_bytes("")?;
        match key {
            b"id" => set_once(&mut id, "id", cur.u64("id")?)?,
            b"type" => set_once(&mut kind, "type", MessageType::from_wire(cur.str("type")?))?,
            b"ts" => set_once(&mut ts, "ts", cur.u64("ts")?)?,
            b"seq" => set_once(
                &mut seq,
                "seq",
                if cur.nil() {
                    None
                } else {
                    Some(cur.u64("seq")?)
                },
            )?,
            b"ack" => set_once(
                &mut ack,
                "ack",
                if cur.nil() {
                    None
                } else {
                    Some(cur.u64("ack")?)
                },
            )?,
            b"corr" => set_once(
                &mut corr,
                "corr",
                if cur.nil() {
                    None
                } else {
                    Some(cur.u64("corr")?)
                },
            )?,
            b"headers" => {
                let value = if cur.nil() {
                    Headers::new()
                } else {
                    decode_headers(cur, limits)?
                };
                set_once(&mut headers, "headers", value)?;
            }
            b"payload" => {
                let value = if cur.nil() {
                    None
                } else {
                    Some(cur.bin("payload")?)
                };
                set_once(&mut payload, "payload", value)?;
            }
            b"error" => {
                let value = if cur.nil() {
                    None
                } else {
                    Some(decode_error(cur)?)
                };
                set_once(&mut error, "error", value)?;
            }
            other => {
                let name = std::str::from_utf8(other)
                    .map_err(|e| malformed(format!("field name is not UTF-8: {e}")))?;
                cur.skip(MAX_DEPTH)?;
                unknown_fields.push(name.to_owned());
            }
        }
    }
    let Some(id) = id else {
        return Err(DecodeError::MissingField("id"));
    };
    let Some(kind) = kind else {
        return Err(DecodeError::MissingField("type"));
    };
    let Some(ts) = ts else {
        return Err(DecodeError::MissingField("ts"));
    };
    // Boxed once, here: the receiver hands it on without copying it again.
    let mut env = Box::new(Envelope::new(id, kind, ts));
    env.seq = seq.flatten();
    env.ack = ack.flatten();
    env.correlation = corr.flatten();
    env.headers = headers.unwrap_or_default();
    env.payload = payload
        .flatten()
        .map(|bytes| Payload::from_trusted(Format::MsgPack, frame.slice_ref(bytes)));
    env.error = error.flatten();
    env.unknown_fields = unknown_fields;
    Ok(env)
}

fn decode_headers(cur: &mut Cursor<'_>, limits: &Limits) -> Result<Headers, DecodeError> {
    let count = cur.map_len("headers")?;
    if count > limits.max_headers {
        return Err(DecodeError::TooManyHeaders {
            count,
            limit: limits.max_headers,
        });
    }
    let mut headers = Headers::new();
    for _ in 0..count {
        let name = cur.str("headers")?.to_ascii_lowercase();
        let value = cur.str("headers")?.to_owned();
        if headers.get(&name).is_some() {
            return Err(bad("headers", format!("duplicate header `{name}`")));
        }
        headers.push_unchecked(name, value);
    }
    Ok(headers)
}

fn decode_error(cur: &mut Cursor<'_>) -> Result<ErrorBody, DecodeError> {
    let fields = cur.map_len("error")?;
    let (mut code, mut message) = (None, None);
    for _ in 0..fields {
        match cur.str_bytes("error")? {
            b"code" => code = Some(cur.str("error")?.to_owned()),
            b"message" => message = Some(cur.str("error")?.to_owned()),
            _ => cur.skip(MAX_DEPTH)?,
        }
    }
    match (code, message) {
        (Some(code), Some(message)) => Ok(ErrorBody { code, message }),
        _ => Err(bad("error", "needs both `code` and `message`")),
    }
}
