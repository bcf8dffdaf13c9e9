//! The kit's own envelope encoder and decoder (PROTOCOL.md sections 2 and 3).
//!
//! Written from the specification alone, on purpose: the kit checks what is on the wire,
//! not what our decoder makes of it. JSON goes through `serde_json::Value` (with a map
//! visitor of our own for the envelope, so that a field sent twice is seen), MessagePack
//! through `rmp`'s low-level functions and a bounds-checked cursor. Outgoing envelopes
//! are ordered field lists, so that a case can send a field twice, leave one out, give it
//! the wrong type or add an unknown one.

use std::collections::HashSet;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rmp::Marker;

use crate::Codec;

/// Deepest nesting the kit's MessagePack reader follows before giving up (the hub's own
/// limit is 128; this bound only keeps a hostile frame from exhausting the stack).
const READ_DEPTH: usize = 256;

/// A value as both codecs can carry it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Nil,
    Bool(bool),
    /// Every non-negative integer.
    UInt(u64),
    /// Negative integers only.
    Int(i64),
    Float(f64),
    Str(String),
    /// MessagePack `bin` (JSON has none; it is written as a base64 string there).
    Bin(Vec<u8>),
    Array(Vec<Value>),
    /// A map with string keys, in order.
    Map(Vec<(String, Value)>),
}

impl Value {
    pub(crate) fn str(s: impl Into<String>) -> Value {
        Value::Str(s.into())
    }

    pub(crate) fn map<K: Into<String>>(pairs: impl IntoIterator<Item = (K, Value)>) -> Value {
        Value::Map(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    pub(crate) fn strings<S: AsRef<str>>(items: &[S]) -> Value {
        Value::Array(items.iter().map(|s| Value::str(s.as_ref())).collect())
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(pairs) => pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub(crate) fn as_u64(&self) -> Option<u64> {
        match self {
            Value::UInt(v) => Some(*v),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub(crate) fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// `depth` arrays nested in each other around a nil.
    pub(crate) fn nested(depth: usize) -> Value {
        let mut v = Value::Nil;
        for _ in 0..depth {
            v = Value::Array(vec![v]);
        }
        v
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_json(self).to_string())
    }
}

// ---------------------------------------------------------------------------------------
// JSON

/// The JSON form of a value (`bin` as a base64 string, non-finite floats as null).
pub(crate) fn to_json(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Nil => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::UInt(u) => J::from(*u),
        Value::Int(i) => J::from(*i),
        Value::Float(x) => serde_json::Number::from_f64(*x).map_or(J::Null, J::Number),
        Value::Str(s) => J::String(s.clone()),
        Value::Bin(b) => J::String(BASE64.encode(b)),
        Value::Array(a) => J::Array(a.iter().map(to_json).collect()),
        Value::Map(pairs) => {
            J::Object(pairs.iter().map(|(k, v)| (k.clone(), to_json(v))).collect())
        }
    }
}

/// A decoded JSON value as a [`Value`].
pub(crate) fn from_json(v: serde_json::Value) -> Value {
    use serde_json::Value as J;
    match v {
        J::Null => Value::Nil,
        J::Bool(b) => Value::Bool(b),
        J::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else {
                Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        J::String(s) => Value::Str(s),
        J::Array(a) => Value::Array(a.into_iter().map(from_json).collect()),
        J::Object(m) => Value::Map(m.into_iter().map(|(k, v)| (k, from_json(v))).collect()),
    }
}

/// The top-level JSON object as it was sent: every field in order, duplicates kept.
struct JsonFields(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for JsonFields {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = JsonFields;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<JsonFields, A::Error> {
                let mut fields = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value::<serde_json::Value>()?;
                    fields.push((key, value));
                }
                Ok(JsonFields(fields))
            }
        }
        d.deserialize_map(V)
    }
}

fn json_fields(frame: &[u8]) -> Result<Vec<(String, serde_json::Value)>, String> {
    use serde::Deserialize as _;
    let mut de = serde_json::Deserializer::from_slice(frame);
    let fields = JsonFields::deserialize(&mut de).map_err(|e| format!("not a JSON object: {e}"))?;
    de.end()
        .map_err(|e| format!("trailing characters after the JSON object: {e}"))?;
    Ok(fields.0)
}

// ---------------------------------------------------------------------------------------
// MessagePack

/// Appends the MessagePack encoding of `v`, every integer and length in its smallest form.
pub(crate) fn mp_write(out: &mut Vec<u8>, v: &Value) {
    // Writing to a Vec cannot fail; the results only carry the marker written.
    match v {
        Value::Nil => {
            let _ = rmp::encode::write_nil(out);
        }
        Value::Bool(b) => {
            let _ = rmp::encode::write_bool(out, *b);
        }
        Value::UInt(u) => {
            let _ = rmp::encode::write_uint(out, *u);
        }
        Value::Int(i) => {
            let _ = rmp::encode::write_sint(out, *i);
        }
        Value::Float(x) => {
            let _ = rmp::encode::write_f64(out, *x);
        }
        Value::Str(s) => {
            let _ = rmp::encode::write_str(out, s);
        }
        Value::Bin(b) => {
            let _ = rmp::encode::write_bin(out, b);
        }
        Value::Array(items) => {
            let _ = rmp::encode::write_array_len(out, len32(items.len()));
            for item in items {
                mp_write(out, item);
            }
        }
        Value::Map(pairs) => {
            let _ = rmp::encode::write_map_len(out, len32(pairs.len()));
            for (k, v) in pairs {
                let _ = rmp::encode::write_str(out, k);
                mp_write(out, v);
            }
        }
    }
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The MessagePack encoding of `v`.
pub(crate) fn mp_encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    mp_write(&mut out, v);
    out
}

/// Bytes of the smallest MessagePack encoding of the integer `v` (marker included).
pub(crate) fn smallest_int_len(v: i128) -> usize {
    if v >= 0 {
        match v {
            0..=127 => 1,
            128..=0xff => 2,
            0x100..=0xffff => 3,
            0x1_0000..=0xffff_ffff => 5,
            _ => 9,
        }
    } else {
        match v {
            -32..=-1 => 1,
            -128..=-33 => 2,
            -32768..=-129 => 3,
            -2_147_483_648..=-32769 => 5,
            _ => 9,
        }
    }
}

/// A bounds-checked read position in a MessagePack frame. It never allocates more than
/// the frame could hold, never panics, and notes every integer not in its smallest form.
pub(crate) struct MpReader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Integers that were not in their smallest encoding, as `value as marker`.
    pub(crate) non_minimal: Vec<String>,
}

impl<'a> MpReader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        MpReader {
            buf,
            pos: 0,
            non_minimal: Vec::new(),
        }
    }

    pub(crate) fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.remaining() < n {
            return Err(format!(
                "truncated: {n} bytes needed at offset {}, {} left",
                self.pos,
                self.remaining()
            ));
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn be(&mut self, n: usize) -> Result<u64, String> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn check_int(&mut self, v: i128, used: usize, marker: &str) {
        if used > smallest_int_len(v) {
            self.non_minimal.push(format!("{v} as {marker}"));
        }
    }

    fn uint(&mut self, n: usize, marker: &str) -> Result<Value, String> {
        let v = self.be(n)?;
        self.check_int(i128::from(v), n + 1, marker);
        Ok(Value::UInt(v))
    }

    fn sint(&mut self, n: usize, marker: &str) -> Result<Value, String> {
        let raw = self.be(n)?;
        let bits = 8 * n as u32;
        // Sign-extend the n-byte big-endian value.
        let v = if bits < 64 && raw & (1 << (bits - 1)) != 0 {
            (raw | (u64::MAX << bits)) as i64
        } else {
            raw as i64
        };
        self.check_int(i128::from(v), n + 1, marker);
        Ok(if v >= 0 {
            Value::UInt(v as u64)
        } else {
            Value::Int(v)
        })
    }

    fn len(&mut self, n: usize) -> Result<usize, String> {
        usize::try_from(self.be(n)?).map_err(|_| "length does not fit in memory".to_string())
    }

    fn string(&mut self, len: usize) -> Result<Value, String> {
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(|s| Value::Str(s.to_owned()))
            .map_err(|e| format!("a str that is not UTF-8: {e}"))
    }

    fn array(&mut self, len: usize, depth: usize) -> Result<Value, String> {
        // Every element takes at least one byte: a longer count is a lie, not a reason
        // to allocate.
        if len > self.remaining() {
            return Err(format!(
                "an array of {len} items in {} bytes",
                self.remaining()
            ));
        }
        let mut items = Vec::with_capacity(len);
        for _ in 0..len {
            items.push(self.value(depth + 1)?);
        }
        Ok(Value::Array(items))
    }

    fn map(&mut self, len: usize, depth: usize) -> Result<Value, String> {
        if len > self.remaining() / 2 {
            return Err(format!(
                "a map of {len} entries in {} bytes",
                self.remaining()
            ));
        }
        let mut pairs = Vec::with_capacity(len);
        for _ in 0..len {
            let key = match self.value(depth + 1)? {
                Value::Str(s) => s,
                other => return Err(format!("a map key that is not a string: {other}")),
            };
            let value = self.value(depth + 1)?;
            pairs.push((key, value));
        }
        Ok(Value::Map(pairs))
    }

    /// Reads one value. `depth` is the nesting level of the value (the outermost is 1).
    pub(crate) fn value(&mut self, depth: usize) -> Result<Value, String> {
        if depth > READ_DEPTH {
            return Err(format!("nested deeper than {READ_DEPTH}"));
        }
        let byte = self.take(1)?[0];
        match Marker::from_u8(byte) {
            Marker::FixPos(v) => Ok(Value::UInt(u64::from(v))),
            Marker::FixNeg(v) => Ok(Value::Int(i64::from(v))),
            Marker::Null => Ok(Value::Nil),
            Marker::True => Ok(Value::Bool(true)),
            Marker::False => Ok(Value::Bool(false)),
            Marker::U8 => self.uint(1, "uint8"),
            Marker::U16 => self.uint(2, "uint16"),
            Marker::U32 => self.uint(4, "uint32"),
            Marker::U64 => self.uint(8, "uint64"),
            Marker::I8 => self.sint(1, "int8"),
            Marker::I16 => self.sint(2, "int16"),
            Marker::I32 => self.sint(4, "int32"),
            Marker::I64 => self.sint(8, "int64"),
            Marker::F32 => {
                let raw = self.be(4)? as u32;
                Ok(Value::Float(f64::from(f32::from_bits(raw))))
            }
            Marker::F64 => Ok(Value::Float(f64::from_bits(self.be(8)?))),
            Marker::FixStr(n) => self.string(usize::from(n)),
            Marker::Str8 => {
                let n = self.len(1)?;
                self.string(n)
            }
            Marker::Str16 => {
                let n = self.len(2)?;
                self.string(n)
            }
            Marker::Str32 => {
                let n = self.len(4)?;
                self.string(n)
            }
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => {
                let width = match Marker::from_u8(byte) {
                    Marker::Bin8 => 1,
                    Marker::Bin16 => 2,
                    _ => 4,
                };
                let n = self.len(width)?;
                Ok(Value::Bin(self.take(n)?.to_vec()))
            }
            Marker::FixArray(n) => self.array(usize::from(n), depth),
            Marker::Array16 => {
                let n = self.len(2)?;
                self.array(n, depth)
            }
            Marker::Array32 => {
                let n = self.len(4)?;
                self.array(n, depth)
            }
            Marker::FixMap(n) => self.map(usize::from(n), depth),
            Marker::Map16 => {
                let n = self.len(2)?;
                self.map(n, depth)
            }
            Marker::Map32 => {
                let n = self.len(4)?;
                self.map(n, depth)
            }
            Marker::Reserved => Err("the reserved marker 0xc1".into()),
            Marker::FixExt1
            | Marker::FixExt2
            | Marker::FixExt4
            | Marker::FixExt8
            | Marker::FixExt16
            | Marker::Ext8
            | Marker::Ext16
            | Marker::Ext32 => Err(format!("an extension type (marker 0x{byte:02x})")),
        }
    }
}

/// Decodes exactly one MessagePack value (trailing bytes are an error); returns it and
/// the integers that were not in their smallest encoding.
pub(crate) fn mp_decode(bytes: &[u8]) -> Result<(Value, Vec<String>), String> {
    let mut r = MpReader::new(bytes);
    let v = r.value(1)?;
    if !r.at_end() {
        return Err(format!("{} trailing bytes after the value", r.remaining()));
    }
    Ok((v, r.non_minimal))
}

// ---------------------------------------------------------------------------------------
// Outgoing envelopes

/// One field of an outgoing envelope.
#[derive(Debug, Clone)]
enum OutField {
    /// A plain value.
    Val(Value),
    /// The payload as a value: JSON embeds it, MessagePack wraps its encoding in a `bin`.
    Payload(Value),
    /// Payload bytes as sent (already compressed, or deliberately broken): a base64
    /// string in JSON, a `bin` in MessagePack.
    PayloadBytes(Vec<u8>),
}

/// An envelope to send: an ordered list of fields, so that cases can break the rules.
#[derive(Debug, Clone)]
pub(crate) struct Out {
    fields: Vec<(String, OutField)>,
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Out {
    /// An envelope with `id`, `type` and `ts` (now).
    pub(crate) fn new(id: u64, kind: &str) -> Out {
        Out {
            fields: vec![
                ("id".into(), OutField::Val(Value::UInt(id))),
                ("type".into(), OutField::Val(Value::str(kind))),
                ("ts".into(), OutField::Val(Value::UInt(now_ms()))),
            ],
        }
    }

    /// Appends a field (even if one of that name is already there).
    pub(crate) fn with(mut self, key: &str, v: Value) -> Out {
        self.fields.push((key.into(), OutField::Val(v)));
        self
    }

    /// Replaces the field `key` (or appends it).
    pub(crate) fn set(mut self, key: &str, v: Value) -> Out {
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = OutField::Val(v),
            None => self.fields.push((key.into(), OutField::Val(v))),
        }
        self
    }

    /// Removes every field named `key`.
    pub(crate) fn without(mut self, key: &str) -> Out {
        self.fields.retain(|(k, _)| k != key);
        self
    }

    pub(crate) fn seq(self, seq: u64) -> Out {
        self.set("seq", Value::UInt(seq))
    }

    pub(crate) fn headers(self, pairs: &[(&str, &str)]) -> Out {
        self.set(
            "headers",
            Value::map(pairs.iter().map(|(k, v)| (*k, Value::str(*v)))),
        )
    }

    /// Marks the envelope a request (`expect: reply`).
    pub(crate) fn request(self) -> Out {
        self.headers(&[("expect", "reply")])
    }

    pub(crate) fn payload(mut self, v: Value) -> Out {
        self.fields.push(("payload".into(), OutField::Payload(v)));
        self
    }

    pub(crate) fn payload_bytes(mut self, bytes: Vec<u8>) -> Out {
        self.fields
            .push(("payload".into(), OutField::PayloadBytes(bytes)));
        self
    }

    /// The frame bytes in `codec`.
    pub(crate) fn encode(&self, codec: Codec) -> Vec<u8> {
        match codec {
            Codec::Json => self.encode_json().into_bytes(),
            Codec::MsgPack => self.encode_msgpack(),
        }
    }

    fn encode_json(&self) -> String {
        let mut out = String::from("{");
        for (i, (key, field)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::Value::String(key.clone()).to_string());
            out.push(':');
            let value = match field {
                OutField::Val(v) | OutField::Payload(v) => to_json(v),
                OutField::PayloadBytes(b) => serde_json::Value::String(BASE64.encode(b)),
            };
            out.push_str(&value.to_string());
        }
        out.push('}');
        out
    }

    fn encode_msgpack(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = rmp::encode::write_map_len(&mut out, len32(self.fields.len()));
        for (key, field) in &self.fields {
            let _ = rmp::encode::write_str(&mut out, key);
            match field {
                OutField::Val(v) => mp_write(&mut out, v),
                OutField::Payload(v) => {
                    let _ = rmp::encode::write_bin(&mut out, &mp_encode(v));
                }
                OutField::PayloadBytes(b) => {
                    let _ = rmp::encode::write_bin(&mut out, b);
                }
            }
        }
        out
    }
}

/// The payload of an envelope in its codec's form, before compression: JSON text or
/// MessagePack bytes (what `content-encoding` compresses).
pub(crate) fn payload_bytes(codec: Codec, v: &Value) -> Vec<u8> {
    match codec {
        Codec::Json => to_json(v).to_string().into_bytes(),
        Codec::MsgPack => mp_encode(v),
    }
}

// ---------------------------------------------------------------------------------------
// Received envelopes

/// An envelope the hub sent, decoded leniently: every field the kit could read, plus
/// what was wrong with it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Received {
    pub(crate) id: Option<u64>,
    pub(crate) kind: String,
    pub(crate) ts: Option<u64>,
    pub(crate) seq: Option<u64>,
    pub(crate) ack: Option<u64>,
    pub(crate) corr: Option<u64>,
    pub(crate) headers: Vec<(String, String)>,
    /// The decoded payload (`None`: absent; for a compressed payload, see `payload_raw`).
    pub(crate) payload: Option<Value>,
    /// The payload bytes when they could not be decoded as a value (compressed).
    pub(crate) payload_raw: Option<Vec<u8>>,
    /// `error` as `(code, message)`.
    pub(crate) error: Option<(String, String)>,
    /// Rule violations in the envelope's form (missing or mistyped fields, duplicates...).
    pub(crate) problems: Vec<String>,
    /// Integers not in their smallest MessagePack encoding.
    pub(crate) non_minimal: Vec<String>,
    /// Names of fields the kit does not know.
    pub(crate) unknown: Vec<String>,
}

impl Received {
    /// The payload's field `key`, if the payload is a map that has it.
    pub(crate) fn field(&self, key: &str) -> Option<&Value> {
        self.payload.as_ref().and_then(|p| p.get(key))
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A short description for reports.
    pub(crate) fn brief(&self) -> String {
        let mut s = format!(
            "{}(id={}",
            if self.kind.is_empty() {
                "?"
            } else {
                &self.kind
            },
            self.id.map_or("-".into(), |v| v.to_string())
        );
        for (name, v) in [("seq", self.seq), ("ack", self.ack), ("corr", self.corr)] {
            if let Some(v) = v {
                s.push_str(&format!(" {name}={v}"));
            }
        }
        if let Some((code, _)) = &self.error {
            s.push_str(&format!(" error={code}"));
        }
        if self.kind == "close"
            && let Some(code) = self.field("code")
        {
            s.push_str(&format!(" code={code}"));
        }
        s.push(')');
        s
    }
}

/// Decodes one frame the hub sent in `codec`. `Err` means it is not an envelope at all.
pub(crate) fn decode(codec: Codec, frame: &[u8]) -> Result<Received, String> {
    match codec {
        Codec::Json => {
            let fields = json_fields(frame)?;
            let fields = fields.into_iter().map(|(k, v)| (k, from_json(v))).collect();
            Ok(interpret(codec, fields, Vec::new()))
        }
        Codec::MsgPack => {
            let mut r = MpReader::new(frame);
            let mut problems = Vec::new();
            let top = r.value(1)?;
            if !r.at_end() {
                problems.push(format!(
                    "{} trailing bytes after the envelope",
                    r.remaining()
                ));
            }
            let Value::Map(fields) = top else {
                return Err(format!("the frame holds {top}, not a map"));
            };
            let mut env = interpret(codec, fields, problems);
            let mut all = r.non_minimal;
            all.append(&mut env.non_minimal);
            env.non_minimal = all;
            Ok(env)
        }
    }
}

fn interpret(codec: Codec, fields: Vec<(String, Value)>, problems: Vec<String>) -> Received {
    let mut env = Received {
        problems,
        ..Received::default()
    };
    let mut seen = HashSet::new();
    let mut payload_field = None;
    for (key, value) in fields {
        if !seen.insert(key.clone()) {
            env.problems.push(format!("field `{key}` sent twice"));
            continue;
        }
        let int = |v: &Value, env: &mut Received, optional: bool| match v {
            Value::UInt(u) => Some(*u),
            Value::Nil if optional => None,
            other => {
                env.problems
                    .push(format!("`{key}` is {other}, not an unsigned integer"));
                None
            }
        };
        match key.as_str() {
            "id" => env.id = int(&value, &mut env, false),
            "ts" => env.ts = int(&value, &mut env, false),
            "seq" => env.seq = int(&value, &mut env, true),
            "ack" => env.ack = int(&value, &mut env, true),
            "corr" => env.corr = int(&value, &mut env, true),
            "type" => match value {
                Value::Str(s) => env.kind = s,
                other => env
                    .problems
                    .push(format!("`type` is {other}, not a string")),
            },
            "headers" => match value {
                Value::Nil => {}
                Value::Map(pairs) => {
                    if pairs.len() > 64 {
                        env.problems
                            .push(format!("{} headers (at most 64)", pairs.len()));
                    }
                    for (k, v) in pairs {
                        if k.chars().any(|c| c.is_ascii_uppercase()) {
                            env.problems
                                .push(format!("header name `{k}` is not lower case"));
                        }
                        match v {
                            Value::Str(s) => env.headers.push((k, s)),
                            other => env
                                .problems
                                .push(format!("header `{k}` is {other}, not a string")),
                        }
                    }
                }
                other => env
                    .problems
                    .push(format!("`headers` is {other}, not a map")),
            },
            "error" => match value {
                Value::Nil => {}
                Value::Map(_) => {
                    let code = value.get("code").and_then(Value::as_str);
                    let message = value.get("message").and_then(Value::as_str);
                    if code.is_none() || message.is_none() {
                        env.problems
                            .push(format!("`error` {value} lacks a string code or message"));
                    }
                    env.error = Some((
                        code.unwrap_or_default().to_owned(),
                        message.unwrap_or_default().to_owned(),
                    ));
                }
                other => env.problems.push(format!("`error` is {other}, not a map")),
            },
            "payload" => payload_field = Some(value),
            _ => env.unknown.push(key),
        }
    }
    for required in ["id", "type", "ts"] {
        if !seen.contains(required) {
            env.problems
                .push(format!("required field `{required}` missing"));
        }
    }
    let encoded = env.header("content-encoding").is_some();
    match (codec, payload_field) {
        (_, None) => {}
        (Codec::Json, Some(v)) if encoded => match v {
            Value::Str(s) => match BASE64.decode(s.as_bytes()) {
                Ok(bytes) => env.payload_raw = Some(bytes),
                Err(e) => env
                    .problems
                    .push(format!("compressed payload is not padded base64: {e}")),
            },
            other => env.problems.push(format!(
                "compressed payload is {other}, not a base64 string"
            )),
        },
        (Codec::Json, Some(v)) => env.payload = Some(v),
        (Codec::MsgPack, Some(Value::Nil)) => {}
        (Codec::MsgPack, Some(Value::Bin(bytes))) if encoded => env.payload_raw = Some(bytes),
        (Codec::MsgPack, Some(Value::Bin(bytes))) => match mp_decode(&bytes) {
            Ok((v, mut non_minimal)) => {
                env.payload = Some(v);
                env.non_minimal.append(&mut non_minimal);
            }
            Err(e) => {
                env.problems
                    .push(format!("payload bin is not one MessagePack value: {e}"));
                env.payload_raw = Some(bytes);
            }
        },
        (Codec::MsgPack, Some(other)) => {
            env.problems.push(format!("payload is {other}, not a bin"))
        }
    }
    env
}

// ---------------------------------------------------------------------------------------
// Deflate

/// Raw deflate (RFC 1951) of `data`.
pub(crate) fn deflate(data: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(data);
    enc.finish().unwrap_or_default()
}

/// A raw deflate stream that inflates to `1 + 258 * runs` zero bytes, built by hand (one
/// fixed-Huffman block: a literal zero, then `runs` copies of length 258 at distance 1):
/// about 13 bits per 258 bytes, and no compressor to run over megabytes of zeros.
pub(crate) fn deflate_bomb(runs: usize) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u32,
        n: u32,
    }
    impl Bits {
        /// Appends the low `n` bits of `v`, least significant first.
        fn put(&mut self, v: u32, n: u32) {
            for i in 0..n {
                self.acc |= ((v >> i) & 1) << self.n;
                self.n += 1;
                if self.n == 8 {
                    self.out.push(self.acc as u8);
                    self.acc = 0;
                    self.n = 0;
                }
            }
        }
        /// Appends a Huffman code (sent most significant bit first).
        fn code(&mut self, code: u32, n: u32) {
            for i in (0..n).rev() {
                self.put((code >> i) & 1, 1);
            }
        }
    }
    let mut b = Bits {
        out: Vec::with_capacity(runs * 13 / 8 + 16),
        acc: 0,
        n: 0,
    };
    b.put(1, 1); // BFINAL
    b.put(1, 2); // BTYPE 01: fixed Huffman codes
    b.code(0x30, 8); // literal 0
    for _ in 0..runs {
        b.code(0b1100_0101, 8); // length code 285: 258 bytes, no extra bits
        b.code(0, 5); // distance code 0: distance 1
    }
    b.code(0, 7); // end of block (256)
    if b.n > 0 {
        b.out.push(b.acc as u8);
    }
    b.out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys in sorted order: JSON objects need not keep their order.
    fn sample() -> Value {
        Value::map([
            ("f", Value::Float(1.5)),
            ("list", Value::Array(vec![Value::UInt(1), Value::str("x")])),
            ("n", Value::UInt(300)),
            ("name", Value::str("restart")),
            ("neg", Value::Int(-5)),
            ("nil", Value::Nil),
            ("ok", Value::Bool(true)),
        ])
    }

    #[test]
    fn msgpack_values_round_trip() {
        let v = sample();
        let (back, non_minimal) = mp_decode(&mp_encode(&v)).expect("decodes");
        assert_eq!(back, v);
        assert!(non_minimal.is_empty(), "{non_minimal:?}");
        let bin = Value::Bin(vec![1, 2, 3]);
        assert_eq!(mp_decode(&mp_encode(&bin)).expect("bin").0, bin);
    }

    #[test]
    fn json_values_round_trip() {
        let v = sample();
        assert_eq!(from_json(to_json(&v)), v);
    }

    #[test]
    fn integers_take_their_smallest_encoding() {
        for (v, len) in [
            (0u64, 1),
            (127, 1),
            (128, 2),
            (255, 2),
            (256, 3),
            (65535, 3),
            (65536, 5),
            (u64::from(u32::MAX), 5),
            (u64::from(u32::MAX) + 1, 9),
            (u64::MAX, 9),
        ] {
            let bytes = mp_encode(&Value::UInt(v));
            assert_eq!(bytes.len(), len, "{v}");
            assert_eq!(smallest_int_len(i128::from(v)), len, "{v}");
            assert_eq!(mp_decode(&bytes).expect("int").0, Value::UInt(v));
        }
        for (v, len) in [
            (-1i64, 1),
            (-32, 1),
            (-33, 2),
            (-128, 2),
            (-129, 3),
            (-32768, 3),
            (-32769, 5),
            (i64::from(i32::MIN), 5),
            (i64::from(i32::MIN) - 1, 9),
            (i64::MIN, 9),
        ] {
            let bytes = mp_encode(&Value::Int(v));
            assert_eq!(bytes.len(), len, "{v}");
            assert_eq!(smallest_int_len(i128::from(v)), len, "{v}");
            assert_eq!(mp_decode(&bytes).expect("int").0, Value::Int(v));
        }
    }

    #[test]
    fn oversized_integer_encodings_are_noticed() {
        // 5 as uint32, 200 as int16, -3 as int8: all decode, all are noted.
        for bytes in [&[0xce, 0, 0, 0, 5][..], &[0xd1, 0, 200], &[0xd0, 0xfd]] {
            let (_, non_minimal) = mp_decode(bytes).expect("decodes");
            assert_eq!(non_minimal.len(), 1, "{bytes:x?}");
        }
        let (v, _) = mp_decode(&[0xd0, 0xfd]).expect("int8");
        assert_eq!(v, Value::Int(-3));
    }

    #[test]
    fn map_str_bin_and_array_lengths_take_their_smallest_prefix() {
        let map = |n: usize| Value::Map((0..n).map(|i| (format!("k{i}"), Value::Nil)).collect());
        assert_eq!(mp_encode(&map(15))[0], 0x8f); // fixmap
        assert_eq!(mp_encode(&map(16))[0], 0xde); // map 16
        assert_eq!(mp_encode(&Value::Bin(vec![0; 255]))[..2], [0xc4, 0xff]); // bin 8
        assert_eq!(mp_encode(&Value::Bin(vec![0; 256]))[..3], [0xc5, 1, 0]); // bin 16
        assert_eq!(mp_encode(&Value::str("a".repeat(31)))[0], 0xbf); // fixstr
        assert_eq!(mp_encode(&Value::str("a".repeat(32)))[..2], [0xd9, 32]); // str 8
        assert_eq!(mp_encode(&Value::nested(1))[0], 0x91); // fixarray
    }

    #[test]
    fn hostile_msgpack_is_an_error_not_a_panic() {
        for bytes in [
            &[][..],
            &[0xc1],
            &[0xdd, 0xff, 0xff, 0xff, 0xff],
            &[0xdf, 0xff, 0xff, 0xff, 0xff],
            &[0xc6, 0xff, 0xff, 0xff, 0xff, 0],
            &[0xd9, 3, b'a'],
            &[0xa2, 0xff, 0xfe],
            &[0x81, 0x01, 0x02],
            &[0xd4, 0, 0],
        ] {
            assert!(mp_decode(bytes).is_err(), "{bytes:x?}");
        }
        let deep = vec![0x91; 10_000];
        assert!(mp_decode(&deep).is_err());
        assert!(mp_decode(&[0xc0, 0xc0]).is_err(), "trailing bytes");
    }

    #[test]
    fn envelopes_round_trip_in_both_codecs() {
        for codec in [Codec::Json, Codec::MsgPack] {
            let out = Out::new(7, "command")
                .seq(3)
                .with("corr", Value::UInt(2))
                .request()
                .payload(Value::map([("name", Value::str("x"))]));
            let env = decode(codec, &out.encode(codec)).expect("decodes");
            assert!(env.problems.is_empty(), "{codec:?}: {:?}", env.problems);
            assert!(env.non_minimal.is_empty());
            assert_eq!(env.id, Some(7));
            assert_eq!(env.kind, "command");
            assert_eq!(env.seq, Some(3));
            assert_eq!(env.corr, Some(2));
            assert_eq!(env.header("expect"), Some("reply"));
            assert_eq!(env.field("name").and_then(Value::as_str), Some("x"));
            assert!(env.ts.is_some());
        }
    }

    #[test]
    fn compressed_payloads_round_trip() {
        let payload = Value::map([("reason", Value::str("r"))]);
        for codec in [Codec::Json, Codec::MsgPack] {
            let bytes = deflate(&payload_bytes(codec, &payload));
            let out = Out::new(1, "event")
                .headers(&[("content-encoding", "deflate")])
                .payload_bytes(bytes.clone());
            let env = decode(codec, &out.encode(codec)).expect("decodes");
            assert!(env.problems.is_empty(), "{:?}", env.problems);
            assert_eq!(env.payload_raw.as_deref(), Some(&bytes[..]));
        }
    }

    #[test]
    fn json_envelope_form_is_checked() {
        let env = decode(
            Codec::Json,
            br#"{"id":1,"type":"pong","ts":2,"ts":3,"x":null}"#,
        )
        .expect("decodes");
        assert_eq!(env.problems.len(), 1, "{:?}", env.problems);
        assert_eq!(env.unknown, vec!["x".to_string()]);
        let env = decode(
            Codec::Json,
            br#"{"type":"pong","seq":null,"headers":{"A":"b"}}"#,
        )
        .expect("decodes");
        assert_eq!(env.problems.len(), 3, "{:?}", env.problems);
        assert!(decode(Codec::Json, b"{\"id\":1} x").is_err());
        assert!(decode(Codec::Json, b"[1]").is_err());
        let deep = "[".repeat(100_000);
        assert!(decode(Codec::Json, deep.as_bytes()).is_err());
    }

    #[test]
    fn msgpack_payload_must_be_bin() {
        let mut frame = Vec::new();
        let fields = Value::map([
            ("id", Value::UInt(1)),
            ("type", Value::str("reply")),
            ("ts", Value::UInt(5)),
            ("payload", Value::map([("a", Value::UInt(1))])),
        ]);
        mp_write(&mut frame, &fields);
        let env = decode(Codec::MsgPack, &frame).expect("decodes");
        assert_eq!(env.problems.len(), 1, "{:?}", env.problems);
        frame.push(0xc0);
        let env = decode(Codec::MsgPack, &frame).expect("decodes");
        assert_eq!(env.problems.len(), 2, "{:?}", env.problems);
    }

    #[test]
    fn duplicate_fields_can_be_sent() {
        let out = Out::new(1, "ping").with("ts", Value::UInt(9));
        for codec in [Codec::Json, Codec::MsgPack] {
            let env = decode(codec, &out.encode(codec)).expect("decodes");
            assert_eq!(env.problems.len(), 1, "{:?}", env.problems);
        }
        assert_eq!(
            String::from_utf8(Out::new(1, "ping").without("ts").encode(Codec::Json))
                .expect("utf-8"),
            r#"{"id":1,"type":"ping"}"#
        );
    }

    #[test]
    fn the_deflate_bomb_inflates_to_zeros() {
        use std::io::Read as _;
        let runs = 10_000;
        let bomb = deflate_bomb(runs);
        assert!(bomb.len() < runs * 2);
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(&bomb[..])
            .read_to_end(&mut out)
            .expect("valid deflate");
        assert_eq!(out.len(), 1 + 258 * runs);
        assert!(out.iter().all(|b| *b == 0));
    }

    #[test]
    fn deflate_round_trips() {
        use std::io::Read as _;
        let data = b"hello hello hello hello".to_vec();
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(&deflate(&data)[..])
            .read_to_end(&mut out)
            .expect("valid deflate");
        assert_eq!(out, data);
    }
}
