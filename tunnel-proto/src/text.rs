//! Peer-supplied strings on their way into logs, metric labels and error messages.
//!
//! Anything a peer sends (a message type, an identity, a close reason, an error
//! message) is untrusted: it may be megabytes long or hold line breaks and quotes that
//! forge log fields. [`Untrusted`] displays such a string bounded and escaped.
//!
//! ```
//! use tunnel_proto::text::Untrusted;
//!
//! let forged = "ok\" level=error msg=\"root login";
//! assert_eq!(Untrusted(forged).to_string(), r#""ok\" level=error msg=\"root login""#);
//! let long = "x".repeat(10_000);
//! assert!(Untrusted(&long).to_string().len() < 200);
//! ```

use std::fmt;

/// Most characters of an untrusted string shown before it is cut (with `...`).
pub const MAX_SHOWN: usize = 128;

/// Longest peer-supplied explanation kept (a close reason, a refusal's message, the
/// body of a refused upgrade): the rest is cut.
pub const MAX_KEPT: usize = 1024;

/// Whether `s` is 1 to `max` bytes of visible ASCII (0x21 to 0x7E: no spaces, no
/// control characters), as identities and session ids must be.
///
/// ```
/// use tunnel_proto::text::is_visible_ascii;
/// assert!(is_visible_ascii("root:org", 253));
/// assert!(!is_visible_ascii("a b", 253));
/// assert!(!is_visible_ascii("", 253));
/// assert!(!is_visible_ascii("abc", 2));
/// ```
pub fn is_visible_ascii(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// Displays a peer-supplied string quoted, with control characters, quotes and
/// backslashes escaped (as Rust's `{:?}` does), and cut after [`MAX_SHOWN`]
/// characters.
#[derive(Clone, Copy)]
pub struct Untrusted<'a>(pub &'a str);

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(MAX_SHOWN) {
            Some((end, _)) => write!(f, "{:?}...", &self.0[..end]),
            None => write!(f, "{:?}", self.0),
        }
    }
}

impl fmt::Debug for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_bounds() {
        assert_eq!(Untrusted("a b").to_string(), "\"a b\"");
        assert_eq!(Untrusted("line\nnext").to_string(), "\"line\\nnext\"");
        let long = "é".repeat(500);
        let shown = Untrusted(&long).to_string();
        assert!(shown.ends_with("...") && shown.chars().count() == MAX_SHOWN + 5);
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("ab", 9), "ab");
    }
}
