//! Requests and replies: a table of requests waiting for their reply, and the types a
//! caller sees.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tunnel_metrics::Recorder;
use tunnel_proto::{Envelope, Format, MessageType, Payload};
use tunnel_transport::AgentId;

use crate::Error;
use crate::delivery::Receipt;

/// Error codes this implementation puts in a failed reply's `error.code`.
pub use tunnel_proto::session::error_code;

/// Something to send through a client [`Service`](tower::Service): a one-way message,
/// or a request that waits for the peer's reply.
///
/// ```
/// use std::time::Duration;
/// use tunnel_proto::{MessageType, messages::Command};
/// use tunnel_router::Request;
///
/// let restart = Request::new(MessageType::Command, &Command::new("restart"))?.expect_reply()
///     .timeout(Duration::from_secs(2));
/// assert!(restart.expects_reply());
/// # Ok::<(), tunnel_proto::EncodeError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Request {
    /// The message. Its id is assigned when it is sent. Boxed: a request is handed on
    /// by value through every layer, and a box moves for a pointer's cost where an
    /// `Envelope` is a couple of hundred bytes.
    pub envelope: Box<Envelope>,
    timeout: Option<Duration>,
}

impl Request {
    /// A one-way message of `kind` whose payload is `value`, in MessagePack (transcoded
    /// on a JSON connection; [`Request::encoded`] avoids that). Sent through
    /// [`Agent::call`](crate::Agent::call) or a client service, its response is the
    /// message's [`Receipt`]; [`Request::expect_reply`] makes it a request instead.
    ///
    /// ```
    /// use tunnel_proto::{MessageType, messages::Command};
    /// use tunnel_router::Request;
    ///
    /// let one_way = Request::new(MessageType::Command, &Command::new("sync"))?;
    /// assert!(!one_way.expects_reply());
    /// # Ok::<(), tunnel_proto::EncodeError>(())
    /// ```
    pub fn new<T: serde::Serialize + ?Sized>(
        kind: MessageType,
        value: &T,
    ) -> Result<Self, tunnel_proto::EncodeError> {
        Ok(Request::encoded(
            kind,
            Payload::encode(Format::MsgPack, value)?,
        ))
    }

    /// A one-way message of `kind` with a payload already encoded, in any format: encode
    /// it in the connection's ([`Agent::format`](crate::Agent::format)) and it goes on
    /// the wire as it is.
    ///
    /// ```
    /// use tunnel_proto::{Format, MessageType, Payload, messages::Command};
    /// use tunnel_router::Request;
    ///
    /// let payload = Payload::encode(Format::Json, &Command::new("sync"))?;
    /// let request = Request::encoded(MessageType::Command, payload).expect_reply();
    /// assert_eq!(request.envelope.payload.as_ref().map(|p| p.format()), Some(Format::Json));
    /// # Ok::<(), tunnel_proto::EncodeError>(())
    /// ```
    pub fn encoded(kind: MessageType, payload: Payload) -> Self {
        // Boxed before the payload goes in: one envelope-sized move, not two.
        let mut envelope = Box::new(Envelope::new(0, kind, 0));
        envelope.payload = Some(payload);
        Request::from_envelope(envelope)
    }

    /// Makes this a request: the response is the peer's reply (or the reason there is
    /// none, [`Error::Timeout`], [`Error::Remote`], [`Error::Lost`]).
    pub fn expect_reply(mut self) -> Self {
        self.envelope.set_expecting_reply();
        self
    }

    /// Sends `envelope` as it is: a request if it carries `expect: reply`
    /// ([`Envelope::expecting_reply`]), one-way otherwise.
    pub fn from_envelope(envelope: impl Into<Box<Envelope>>) -> Self {
        Request {
            envelope: envelope.into(),
            timeout: None,
        }
    }

    /// How long to wait for the reply (default: the client's request timeout). The
    /// wait also ends when the future is dropped, for example by a timeout layer
    /// ([`layer::timeout`](crate::layer::timeout)).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Whether the response will be the peer's reply.
    pub fn expects_reply(&self) -> bool {
        self.envelope.expects_reply()
    }

    /// The message type.
    pub fn kind(&self) -> &MessageType {
        &self.envelope.kind
    }

    pub(crate) fn timeout_or(&self, default: Duration) -> Duration {
        self.timeout.unwrap_or(default)
    }
}

/// What a client [`Service`](tower::Service) returns.
#[derive(Debug)]
#[non_exhaustive]
pub enum Response {
    /// A one-way message was accepted; the receipt resolves when the peer has it.
    Accepted(Receipt),
    /// The peer's successful reply to a request.
    Reply(Box<Envelope>),
}

impl Response {
    /// The reply, if this answers a request.
    pub fn into_reply(self) -> Option<Envelope> {
        match self {
            Response::Reply(env) => Some(*env),
            Response::Accepted(_) => None,
        }
    }

    /// Decodes the reply's payload.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        match self {
            Response::Reply(env) => env.decode_payload().map_err(Error::BadReply),
            Response::Accepted(_) => Err(Error::NoReply),
        }
    }
}

struct Waiter {
    /// Who must answer: a reply from anyone else is not accepted.
    peer: Option<AgentId>,
    tx: oneshot::Sender<Result<Box<Envelope>, Error>>,
}

/// Requests waiting for their reply, keyed by request id. Bounded: registering past
/// `max` fails at once.
pub(crate) struct Pending {
    waiters: Mutex<HashMap<u64, Waiter>>,
    max: usize,
    late: AtomicU64,
    recorder: Arc<dyn Recorder>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("waiting", &self.len())
            .field("max", &self.max)
            .field("late", &self.late.load(Ordering::Relaxed))
            .finish()
    }
}

/// A registered request. Dropping it (the caller stopped waiting) removes the entry.
pub(crate) struct Ticket {
    pending: Arc<Pending>,
    id: u64,
    rx: oneshot::Receiver<Result<Box<Envelope>, Error>>,
}

impl Pending {
    pub(crate) fn new(max: usize, recorder: Arc<dyn Recorder>) -> Self {
        Pending {
            waiters: Mutex::new(HashMap::new()),
            max,
            late: AtomicU64::new(0),
            recorder,
        }
    }

    fn count_late(&self) {
        self.late.fetch_add(1, Ordering::Relaxed);
        self.recorder.late_reply();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests waiting.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// The ids of the requests waiting now.
    pub(crate) fn ids(&self) -> Vec<u64> {
        self.lock().keys().copied().collect()
    }

    /// Whether any of `ids` is still waiting.
    pub(crate) fn any_of(&self, ids: &[u64]) -> bool {
        let waiters = self.lock();
        ids.iter().any(|id| waiters.contains_key(id))
    }

    /// Replies that arrived after their request stopped waiting (or for no request).
    pub(crate) fn late(&self) -> u64 {
        self.late.load(Ordering::Relaxed)
    }

    /// Registers request `id`, to be answered by `peer` (any peer if `None`).
    pub(crate) fn register(
        self: &Arc<Self>,
        id: u64,
        peer: Option<AgentId>,
    ) -> Result<Ticket, Error> {
        let (tx, rx) = oneshot::channel();
        let mut waiters = self.lock();
        if waiters.len() >= self.max {
            return Err(Error::TooManyInFlight(self.max));
        }
        waiters.insert(id, Waiter { peer, tx });
        drop(waiters);
        Ok(Ticket {
            pending: self.clone(),
            id,
            rx,
        })
    }

    /// Whether a request with id `id` waits for its reply.
    pub(crate) fn waits_for(&self, id: u64) -> bool {
        self.lock().contains_key(&id)
    }

    /// Hands a reply from `from` to its waiting request. Returns false (and counts it
    /// late) when nobody is waiting for it.
    pub(crate) fn complete(&self, reply: Box<Envelope>, from: &AgentId) -> bool {
        let Some(id) = reply.correlation else {
            self.count_late();
            return false;
        };
        let waiter = {
            let mut waiters = self.lock();
            match waiters.get(&id) {
                Some(w) if w.peer.as_ref().is_none_or(|p| p == from) => waiters.remove(&id),
                _ => None,
            }
        };
        let Some(waiter) = waiter else {
            self.count_late();
            return false;
        };
        let outcome = match reply.error.clone() {
            Some(error) => Err(Error::Remote(error)),
            None => Ok(reply),
        };
        if waiter.tx.send(outcome).is_err() {
            self.count_late();
            return false;
        }
        true
    }

    /// Fails every waiting request (on a session reset or shutdown).
    pub(crate) fn fail_all(&self, reason: &str) {
        self.fail_where(|_, _| true, reason);
    }

    /// Fails the requests waiting for `peer` (its session ended).
    pub(crate) fn peer_gone(&self, peer: &AgentId, reason: &str) {
        self.fail_where(|_, w| w.peer.as_ref() == Some(peer), reason);
    }

    /// After a session reset: fails the requests (to `peer`, or to anyone) except
    /// those in `carried`, which were never sent and go to the new session.
    pub(crate) fn reset(
        &self,
        peer: Option<&AgentId>,
        carried: &std::collections::HashSet<u64>,
        reason: &str,
    ) {
        self.fail_where(
            |id, w| !carried.contains(&id) && (peer.is_none() || w.peer.as_ref() == peer),
            reason,
        );
    }

    fn fail_where(&self, pred: impl Fn(u64, &Waiter) -> bool, reason: &str) {
        let failed: Vec<Waiter> = {
            let mut waiters = self.lock();
            let ids: Vec<u64> = waiters
                .iter()
                .filter(|(id, w)| pred(**id, w))
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| waiters.remove(id)).collect()
        };
        for waiter in failed {
            let _ = waiter.tx.send(Err(Error::Lost(reason.to_owned())));
        }
    }
}

impl Ticket {
    /// Waits for the reply at most `timeout`.
    pub(crate) async fn wait(mut self, timeout: Duration) -> Result<Box<Envelope>, Error> {
        match tokio::time::timeout(timeout, &mut self.rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(Error::ShutDown),
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Answered entries are already gone; this removes abandoned ones.
        self.pending.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunnel_proto::ErrorBody;

    fn reply_to(id: u64) -> Envelope {
        Envelope::new(100, MessageType::Reply, 0).with_correlation(id)
    }

    fn agent(name: &str) -> AgentId {
        AgentId::new("ws", name)
    }

    #[tokio::test]
    async fn a_reply_completes_its_request() {
        let pending = Arc::new(Pending::new(8, Arc::new(tunnel_metrics::NoopRecorder)));
        let ticket = pending.register(7, None).unwrap();
        assert!(pending.complete(reply_to(7).into(), &agent("a")));
        let reply = ticket.wait(Duration::from_secs(1)).await.unwrap();
        assert_eq!(reply.correlation, Some(7));
        assert_eq!(pending.len(), 0);
        assert_eq!(pending.late(), 0);
    }

    #[tokio::test]
    async fn an_error_reply_is_a_remote_error() {
        let pending = Arc::new(Pending::new(8, Arc::new(tunnel_metrics::NoopRecorder)));
        let ticket = pending.register(7, None).unwrap();
        let failed = reply_to(7).with_error(ErrorBody::new("handler_error", "boom"));
        assert!(pending.complete(failed.into(), &agent("a")));
        let err = ticket.wait(Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(err, Error::Remote(ErrorBody::new("handler_error", "boom")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_reply_is_discarded_and_counted() {
        let pending = Arc::new(Pending::new(8, Arc::new(tunnel_metrics::NoopRecorder)));
        let ticket = pending.register(7, None).unwrap();
        let err = ticket.wait(Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(err, Error::Timeout(Duration::from_millis(50)));
        assert_eq!(pending.len(), 0, "a timed out request leaves no entry");
        assert!(!pending.complete(reply_to(7).into(), &agent("a")));
        assert_eq!(pending.late(), 1);
    }

    #[tokio::test]
    async fn dropping_the_wait_cancels_it() {
        let pending = Arc::new(Pending::new(8, Arc::new(tunnel_metrics::NoopRecorder)));
        let ticket = pending.register(7, None).unwrap();
        drop(ticket);
        assert_eq!(pending.len(), 0);
        assert!(!pending.complete(reply_to(7).into(), &agent("a")));
        assert_eq!(pending.late(), 1);
    }

    #[tokio::test]
    async fn only_the_asked_peer_can_answer() {
        let pending = Arc::new(Pending::new(8, Arc::new(tunnel_metrics::NoopRecorder)));
        let ticket = pending.register(7, Some(agent("a"))).unwrap();
        assert!(
            !pending.complete(reply_to(7).into(), &agent("b")),
            "wrong peer"
        );
        assert!(pending.complete(reply_to(7).into(), &agent("a")));
        assert!(ticket.wait(Duration::from_secs(1)).await.is_ok());
    }

    #[tokio::test]
    async fn the_table_is_bounded() {
        let pending = Arc::new(Pending::new(2, Arc::new(tunnel_metrics::NoopRecorder)));
        let _a = pending.register(1, None).unwrap();
        let _b = pending.register(2, None).unwrap();
        assert!(matches!(
            pending.register(3, None),
            Err(Error::TooManyInFlight(2))
        ));
    }

    #[tokio::test]
    async fn requests_of_a_gone_peer_fail() {
        let pending = Arc::new(Pending::new(8, Arc::new(tunnel_metrics::NoopRecorder)));
        let to_a = pending.register(1, Some(agent("a"))).unwrap();
        let to_b = pending.register(2, Some(agent("b"))).unwrap();
        pending.peer_gone(&agent("a"), "session ended");
        assert!(matches!(
            to_a.wait(Duration::from_secs(1)).await,
            Err(Error::Lost(_))
        ));
        assert_eq!(pending.len(), 1);
        pending.fail_all("reset");
        assert!(matches!(
            to_b.wait(Duration::from_secs(1)).await,
            Err(Error::Lost(_))
        ));
    }
}
