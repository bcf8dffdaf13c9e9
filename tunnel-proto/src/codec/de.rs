//! The envelope decoder shared by both codecs: one serde visitor over the envelope map.
//!
//! Each codec supplies the type its payload field borrows as ([`RawPayload`]); the
//! visitor records which field it is in and any typed error, so that a codec can turn
//! the serde error back into a precise [`DecodeError`].

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::envelope::{Envelope, ErrorBody, Headers, MessageType};
use crate::error::DecodeError;

/// The payload field as it sits in the frame, borrowed. In JSON a `null` payload is a
/// payload whose value is null, so that every JSON value round-trips.
pub(crate) trait RawPayload<'de>: de::Deserialize<'de> {}

/// Decoding state shared between the visitor and the codec that drives it.
pub(crate) struct Ctx {
    field: Cell<&'static str>,
    error: Cell<Option<DecodeError>>,
    max_headers: usize,
}

impl Ctx {
    pub(crate) fn new(max_headers: usize) -> Self {
        Ctx {
            field: Cell::new(""),
            error: Cell::new(None),
            max_headers,
        }
    }

    /// The field being decoded when the error happened ("" outside any field).
    pub(crate) fn field(&self) -> &'static str {
        self.field.get()
    }

    /// A typed error the visitor recorded, if any.
    pub(crate) fn take_error(&self) -> Option<DecodeError> {
        self.error.take()
    }

    fn fail<E: de::Error>(&self, err: DecodeError) -> E {
        let msg = err.to_string();
        self.error.set(Some(err));
        E::custom(msg)
    }
}

/// An envelope whose payload still borrows from the frame.
#[derive(Debug)]
pub(crate) struct RawEnvelope<P> {
    pub(crate) id: u64,
    pub(crate) kind: MessageType,
    pub(crate) timestamp: u64,
    pub(crate) seq: Option<u64>,
    pub(crate) ack: Option<u64>,
    pub(crate) correlation: Option<u64>,
    pub(crate) headers: Headers,
    pub(crate) payload: Option<P>,
    pub(crate) error: Option<ErrorBody>,
    pub(crate) unknown_fields: Vec<String>,
}

impl<P> RawEnvelope<P> {
    /// Splits off the borrowed payload; the codec turns it into a [`crate::Payload`].
    pub(crate) fn into_parts(self) -> (Option<P>, Envelope) {
        let env = Envelope {
            id: self.id,
            kind: self.kind,
            timestamp: self.timestamp,
            seq: self.seq,
            ack: self.ack,
            correlation: self.correlation,
            headers: self.headers,
            payload: None,
            error: self.error,
            unknown_fields: self.unknown_fields,
        };
        (self.payload, env)
    }
}

/// Seed that decodes a [`RawEnvelope`] with a shared [`Ctx`].
pub(crate) struct EnvelopeSeed<'c, P> {
    pub(crate) ctx: &'c Ctx,
    pub(crate) _payload: PhantomData<P>,
}

impl<'de, P: RawPayload<'de>> DeserializeSeed<'de> for EnvelopeSeed<'_, P> {
    type Value = RawEnvelope<P>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(EnvelopeVisitor {
            ctx: self.ctx,
            _payload: PhantomData,
        })
    }
}

struct EnvelopeVisitor<'c, P> {
    ctx: &'c Ctx,
    _payload: PhantomData<P>,
}

enum Field {
    Id,
    Type,
    Ts,
    Seq,
    Ack,
    Corr,
    Headers,
    Payload,
    Error,
    Unknown(String),
}

impl Field {
    fn name(&self) -> &'static str {
        match self {
            Field::Id => "id",
            Field::Type => "type",
            Field::Ts => "ts",
            Field::Seq => "seq",
            Field::Ack => "ack",
            Field::Corr => "corr",
            Field::Headers => "headers",
            Field::Payload => "payload",
            Field::Error => "error",
            Field::Unknown(_) => "",
        }
    }
}

impl<'de> de::Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl Visitor<'_> for FieldVisitor {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Field, E> {
                Ok(match v {
                    "id" => Field::Id,
                    "type" => Field::Type,
                    "ts" => Field::Ts,
                    "seq" => Field::Seq,
                    "ack" => Field::Ack,
                    "corr" => Field::Corr,
                    "headers" => Field::Headers,
                    "payload" => Field::Payload,
                    "error" => Field::Error,
                    other => Field::Unknown(other.to_owned()),
                })
            }
        }
        d.deserialize_str(FieldVisitor)
    }
}

struct TypeName(MessageType);

impl<'de> de::Deserialize<'de> for TypeName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TypeName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message type name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TypeName, E> {
                Ok(TypeName(MessageType::from_wire(v)))
            }
        }
        d.deserialize_str(V)
    }
}

struct HeadersSeed<'c>(&'c Ctx);

impl<'de> DeserializeSeed<'de> for HeadersSeed<'_> {
    type Value = Headers;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Headers, D::Error> {
        // `null` means absent (PROTOCOL.md, section 2): Go, for one, writes nil maps so.
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for HeadersSeed<'_> {
    type Value = Headers;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of string headers")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Headers, E> {
        Ok(Headers::new())
    }

    fn visit_none<E: de::Error>(self) -> Result<Headers, E> {
        Ok(Headers::new())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Headers, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Headers, A::Error> {
        let mut headers = Headers::new();
        while let Some(name) = map.next_key::<String>()? {
            let value = map.next_value::<String>()?;
            if headers.len() == self.0.max_headers {
                let count = headers.len() + 1 + map.size_hint().unwrap_or(0);
                return Err(self.0.fail(DecodeError::TooManyHeaders {
                    count,
                    limit: self.0.max_headers,
                }));
            }
            if headers.get(&name).is_some() {
                return Err(self.0.fail(DecodeError::BadField {
                    field: "headers",
                    reason: format!("duplicate header `{name}`"),
                }));
            }
            headers.push_unchecked(name.to_ascii_lowercase(), value);
        }
        Ok(headers)
    }
}

fn set_once<T, E: de::Error>(ctx: &Ctx, slot: &mut Option<T>, value: T) -> Result<(), E> {
    if slot.is_some() {
        return Err(ctx.fail(DecodeError::BadField {
            field: ctx.field(),
            reason: "duplicate field".into(),
        }));
    }
    *slot = Some(value);
    Ok(())
}

impl<'de, P: RawPayload<'de>> Visitor<'de> for EnvelopeVisitor<'_, P> {
    type Value = RawEnvelope<P>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an envelope map")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let ctx = self.ctx;
        let mut id = None;
        let mut kind = None;
        let mut ts = None;
        let mut seq = None;
        let mut ack = None;
        let mut corr = None;
        let mut headers = None;
        let mut payload: Option<Option<P>> = None;
        let mut error: Option<Option<ErrorBody>> = None;
        let mut unknown_fields = Vec::new();
        loop {
            ctx.field.set("");
            let Some(field) = map.next_key::<Field>()? else {
                break;
            };
            ctx.field.set(field.name());
            match field {
                Field::Id => set_once(ctx, &mut id, map.next_value::<u64>()?)?,
                Field::Type => set_once(ctx, &mut kind, map.next_value::<TypeName>()?.0)?,
                Field::Ts => set_once(ctx, &mut ts, map.next_value::<u64>()?)?,
                Field::Seq => set_once(ctx, &mut seq, map.next_value::<Option<u64>>()?)?,
                Field::Ack => set_once(ctx, &mut ack, map.next_value::<Option<u64>>()?)?,
                Field::Corr => set_once(ctx, &mut corr, map.next_value::<Option<u64>>()?)?,
                Field::Headers => {
                    set_once(ctx, &mut headers, map.next_value_seed(HeadersSeed(ctx))?)?
                }
                Field::Payload => set_once(ctx, &mut payload, Some(map.next_value::<P>()?))?,
                Field::Error => set_once(ctx, &mut error, map.next_value::<Option<ErrorBody>>()?)?,
                Field::Unknown(name) => {
                    map.next_value::<IgnoredAny>()?;
                    unknown_fields.push(name);
                }
            }
        }
        let missing = |name| ctx.fail(DecodeError::MissingField(name));
        Ok(RawEnvelope {
            id: id.ok_or_else(|| missing("id"))?,
            kind: kind.ok_or_else(|| missing("type"))?,
            timestamp: ts.ok_or_else(|| missing("ts"))?,
            seq: seq.flatten(),
            ack: ack.flatten(),
            correlation: corr.flatten(),
            headers: headers.unwrap_or_default(),
            payload: payload.flatten(),
            error: error.flatten(),
            unknown_fields,
        })
    }
}
