//! Protocol version and capability negotiation: pure functions, no IO.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::VersionError;

/// The newest protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// An inclusive range of protocol versions a peer supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionRange {
    /// Oldest supported version.
    pub min: u16,
    /// Newest supported version.
    pub max: u16,
}

impl VersionRange {
    /// The versions this crate supports.
    pub const SUPPORTED: VersionRange = VersionRange {
        min: 1,
        max: PROTOCOL_VERSION,
    };

    /// A range, checked: `min` must not be above `max`.
    pub fn new(min: u16, max: u16) -> Result<Self, VersionError> {
        let range = VersionRange { min, max };
        if min > max {
            Err(VersionError::InvalidRange(range))
        } else {
            Ok(range)
        }
    }

    /// Whether `version` is in the range.
    pub fn contains(self, version: u16) -> bool {
        self.min <= version && version <= self.max
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.min, self.max)
    }
}

/// Picks the highest version both ranges contain.
///
/// ```
/// use tunnel_proto::{VersionRange, negotiate_version};
///
/// let hub = VersionRange::new(1, 3)?;
/// let agent = VersionRange::new(2, 5)?;
/// assert_eq!(negotiate_version(hub, agent)?, 3);
/// assert!(negotiate_version(hub, VersionRange::new(4, 5)?).is_err());
/// # Ok::<(), tunnel_proto::VersionError>(())
/// ```
pub fn negotiate_version(ours: VersionRange, theirs: VersionRange) -> Result<u16, VersionError> {
    for range in [ours, theirs] {
        if range.min > range.max {
            return Err(VersionError::InvalidRange(range));
        }
    }
    let low = ours.min.max(theirs.min);
    let high = ours.max.min(theirs.max);
    if low <= high {
        Ok(high)
    } else {
        Err(VersionError::NoCommonVersion { ours, theirs })
    }
}

/// Well-known capability names exchanged in the handshake.
pub mod capability {
    /// Payloads above a threshold may be deflate-compressed (`content-encoding: deflate`).
    pub const DEFLATE: &str = "deflate";
    /// Sequence numbers, acknowledgements and session resume.
    pub const RESUME: &str = "resume";
    /// Request/reply correlation through `corr`.
    pub const REPLIES: &str = "replies";
    /// W3C trace context in headers.
    pub const TRACE_CONTEXT: &str = "trace-context";
}

/// The capabilities both sides offer, in `ours` order. Unknown capabilities offered by
/// the peer are simply not selected.
pub fn negotiate_capabilities<S: AsRef<str>>(ours: &[S], theirs: &[String]) -> Vec<String> {
    ours.iter()
        .map(AsRef::as_ref)
        .filter(|c| theirs.iter().any(|t| t == c))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(min: u16, max: u16) -> VersionRange {
        VersionRange { min, max }
    }

    #[test]
    fn picks_highest_common_version() {
        assert_eq!(negotiate_version(r(1, 1), r(1, 1)), Ok(1));
        assert_eq!(negotiate_version(r(1, 4), r(2, 3)), Ok(3));
        assert_eq!(negotiate_version(r(3, 9), r(1, 3)), Ok(3));
    }

    #[test]
    fn disjoint_ranges_are_a_typed_error() {
        assert_eq!(
            negotiate_version(r(1, 2), r(3, 4)),
            Err(VersionError::NoCommonVersion {
                ours: r(1, 2),
                theirs: r(3, 4)
            })
        );
    }

    #[test]
    fn inverted_range_is_rejected() {
        assert_eq!(
            negotiate_version(r(1, 2), r(5, 1)),
            Err(VersionError::InvalidRange(r(5, 1)))
        );
        assert!(VersionRange::new(2, 1).is_err());
    }

    #[test]
    fn capabilities_intersect_in_our_order() {
        let theirs = vec![
            "resume".to_string(),
            "future-thing".into(),
            "deflate".into(),
        ];
        assert_eq!(
            negotiate_capabilities(&["deflate", "replies", "resume"], &theirs),
            vec!["deflate", "resume"]
        );
    }
}
