//! Per-message outcomes: what a receipt for sequence number `seq` resolves to.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::ErrorBody;

use super::Undelivered;

/// How many resets' failed ranges are remembered.
pub const RESET_HISTORY: usize = 64;

/// How many rejected messages are remembered (older rejections are forgotten, and a
/// receipt asked that late reports delivery).
pub const REJECT_HISTORY: usize = 1024;

/// The outcome of every message a session accepted. Sequence numbers never restart
/// within a session's life (a reset fails a range of them and numbering goes on), so
/// a sequence number alone identifies a message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcomes {
    acked: u64,
    expired_through: u64,
    /// Ranges `(after, through]` failed by resets, oldest first, with the reason.
    failed: VecDeque<(u64, u64, Arc<str>)>,
    /// Outcomes at or below this were dropped from `failed` (too many resets).
    forgotten_through: u64,
    /// Set when the session ended: every message not yet acked failed.
    ended: Option<Undelivered>,
    /// Messages the peer received but refused, by sequence number, newest last.
    rejected: VecDeque<(u64, Arc<ErrorBody>)>,
}

impl Outcomes {
    fn failed_reason(&self, seq: u64) -> Option<&str> {
        self.failed
            .iter()
            .find(|(after, through, _)| seq > *after && seq <= *through)
            .map(|(_, _, reason)| &**reason)
    }

    /// The outcome of message `seq`, once it is known.
    pub fn outcome(&self, seq: u64) -> Option<Result<(), Undelivered>> {
        let resolved = self.acked >= seq
            || self.expired_through >= seq
            || self.ended.is_some()
            || seq <= self.forgotten_through
            || self.failed_reason(seq).is_some();
        if !resolved {
            return None;
        }
        if let Some((_, error)) = self.rejected.iter().rev().find(|(s, _)| *s == seq) {
            return Some(Err(Undelivered::Rejected {
                code: error.code.clone(),
                message: error.message.clone(),
            }));
        }
        if let Some(reason) = self.failed_reason(seq) {
            return Some(Err(Undelivered::Reset(reason.to_owned())));
        }
        if seq <= self.forgotten_through && seq > self.acked {
            return Some(Err(Undelivered::Reset(
                "outcome forgotten after many session resets".into(),
            )));
        }
        if self.acked >= seq {
            return Some(Ok(()));
        }
        if self.expired_through >= seq {
            return Some(Err(Undelivered::Expired));
        }
        Some(Err(self.ended.clone().unwrap_or(Undelivered::ShutDown)))
    }

    /// Everything up to `acked` was acknowledged.
    pub(crate) fn set_acked(&mut self, acked: u64) -> bool {
        let changed = self.acked != acked;
        self.acked = acked;
        changed
    }

    pub(crate) fn expired_through(&mut self, seq: u64) {
        self.expired_through = seq;
    }

    pub(crate) fn fail(&mut self, after: u64, through: u64, reason: &str) {
        self.failed.push_back((after, through, Arc::from(reason)));
        if self.failed.len() > RESET_HISTORY
            && let Some((_, forgotten, _)) = self.failed.pop_front()
        {
            self.forgotten_through = forgotten;
        }
    }

    pub(crate) fn end(&mut self, reason: Undelivered) {
        self.ended = Some(reason);
    }

    pub(crate) fn reject(&mut self, seq: u64, error: ErrorBody) {
        self.rejected.push_back((seq, Arc::new(error)));
        if self.rejected.len() > REJECT_HISTORY {
            self.rejected.pop_front();
        }
    }
}
