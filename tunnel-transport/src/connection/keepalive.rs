//! When a quiet peer counts as dead.

use std::time::Duration;

use crate::config::ConnectionConfig;

/// How the receiver checks the dead-peer deadline: every `period`, declaring the peer
/// dead after `quiet_limit` periods in a row without a frame.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeepaliveCheck {
    pub(super) period: Duration,
    pub(super) quiet_limit: u32,
}

impl KeepaliveCheck {
    /// Checks every half pong timeout, so detection is at most that late.
    pub(super) fn new(config: &ConnectionConfig) -> Self {
        let dead_after = config.dead_after().max(Duration::from_millis(1));
        let period = (config.pong_timeout / 2).clamp(Duration::from_millis(1), dead_after);
        let quiet_limit = dead_after.as_nanos().div_ceil(period.as_nanos().max(1));
        KeepaliveCheck {
            period,
            quiet_limit: u32::try_from(quiet_limit).unwrap_or(u32::MAX),
        }
    }
}
