//! Payload compression: deflate (RFC 1951) through flate2, with a decompression limit.
//!
//! A compressed payload is marked by the header `content-encoding: deflate`. Inflating
//! stops as soon as the output would pass the limit, so a small "compression bomb" costs
//! at most the limit in memory, never its expanded size.

use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::DeflateDecoder;
use flate2::write::DeflateEncoder;

use crate::codec::Limits;
use crate::envelope::{Envelope, Payload, header};
use crate::error::DecodeError;

/// The `content-encoding` value for deflate.
pub const DEFLATE: &str = "deflate";

/// Default size above which [`Envelope::compress_payload`] is worth calling: 1 KiB.
pub const DEFAULT_COMPRESSION_THRESHOLD: usize = 1024;

/// Compresses `data` with deflate at the default level.
pub fn deflate(data: &[u8]) -> Vec<u8> {
    let mut enc = DeflateEncoder::new(
        Vec::with_capacity(data.len() / 2 + 16),
        Compression::default(),
    );
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(data);
    enc.finish().unwrap_or_default()
}

/// Inflates `data`, failing with [`DecodeError::DecompressedTooLarge`] as soon as the
/// output would exceed `limit` bytes.
pub fn inflate(data: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).min(limit));
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    DeflateDecoder::new(data)
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|e| DecodeError::BadField {
            field: "payload",
            reason: format!("invalid deflate data: {e}"),
        })?;
    if out.len() > limit {
        return Err(DecodeError::DecompressedTooLarge { limit });
    }
    Ok(out)
}

impl Envelope {
    /// Deflates the payload if it is at least `threshold` bytes, not already encoded,
    /// and compression makes it smaller. Sets `content-encoding: deflate` and returns
    /// whether it compressed.
    pub fn compress_payload(&mut self, threshold: usize) -> bool {
        if self.content_encoding().is_some() {
            return false;
        }
        let Some(payload) = &self.payload else {
            return false;
        };
        if payload.len() < threshold {
            return false;
        }
        let compressed = deflate(payload.bytes());
        if compressed.len() >= payload.len() {
            return false;
        }
        self.payload = Some(Payload::from_trusted(payload.format(), compressed.into()));
        self.headers.insert(header::CONTENT_ENCODING, DEFLATE);
        true
    }

    /// Inflates a compressed payload in place, within `limits.max_decompressed_size`,
    /// and removes the `content-encoding` header. A payload without the header is left
    /// alone. The inflated bytes are checked to be one value in the payload's format.
    pub fn decompress_payload(&mut self, limits: &Limits) -> Result<(), DecodeError> {
        let Some(encoding) = self.content_encoding() else {
            return Ok(());
        };
        if !encoding.eq_ignore_ascii_case(DEFLATE) {
            return Err(DecodeError::UnsupportedEncoding(encoding.to_owned()));
        }
        if let Some(payload) = &self.payload {
            let inflated = inflate(payload.bytes(), limits.max_decompressed_size)?;
            self.payload = Some(Payload::from_encoded(payload.format(), inflated)?);
        }
        self.headers.remove(header::CONTENT_ENCODING);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Format, MessageType};

    #[test]
    fn small_payloads_stay_uncompressed() {
        let mut env = Envelope::new(1, MessageType::Event, 0)
            .with_payload(Payload::json(&"short").expect("payload"));
        assert!(!env.compress_payload(DEFAULT_COMPRESSION_THRESHOLD));
        assert_eq!(env.content_encoding(), None);
    }

    #[test]
    fn compress_then_decompress_restores_the_payload() {
        for format in Format::ALL {
            let value = vec!["the same words again and again"; 200];
            let original = Payload::encode(format, &value).expect("payload");
            let mut env = Envelope::new(1, MessageType::Event, 0).with_payload(original.clone());
            assert!(env.compress_payload(DEFAULT_COMPRESSION_THRESHOLD));
            assert_eq!(env.content_encoding(), Some(DEFLATE));
            assert!(env.payload.as_ref().expect("payload").len() < original.len() / 4);
            assert!(matches!(
                env.decode_payload::<Vec<String>>(),
                Err(DecodeError::StillEncoded(_))
            ));
            env.decompress_payload(&Limits::default()).expect("inflate");
            assert_eq!(env.payload, Some(original));
            assert_eq!(env.content_encoding(), None);
        }
    }

    #[test]
    fn a_compression_bomb_is_stopped_at_the_limit() {
        // 64 MiB of zeros deflate to about 64 KiB: a ratio of 1000 to 1.
        let bomb = deflate(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 128 << 10, "bomb is {} bytes", bomb.len());
        let limit = 1 << 20;
        assert_eq!(
            inflate(&bomb, limit),
            Err(DecodeError::DecompressedTooLarge { limit })
        );

        let mut env = Envelope::new(1, MessageType::Event, 0)
            .with_header(header::CONTENT_ENCODING, DEFLATE)
            .with_payload(Payload::from_trusted(Format::Json, bomb.into()));
        assert_eq!(
            env.decompress_payload(&Limits::default().max_decompressed_size(limit)),
            Err(DecodeError::DecompressedTooLarge { limit })
        );
    }

    #[test]
    fn garbage_and_unknown_encodings_are_errors() {
        assert!(matches!(
            inflate(b"\xff\xfe not deflate", 1024),
            Err(DecodeError::BadField { .. })
        ));
        let mut env = Envelope::new(1, MessageType::Event, 0)
            .with_header(header::CONTENT_ENCODING, "br")
            .with_payload(Payload::json(&1).expect("payload"));
        assert_eq!(
            env.decompress_payload(&Limits::default()),
            Err(DecodeError::UnsupportedEncoding("br".into()))
        );
    }
}
