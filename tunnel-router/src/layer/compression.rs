//! Payload compression: deflate (RFC 1951) above a size threshold.
//!
//! [`CompressionLayer`] compresses the payload of each outgoing [`Request`] that is at
//! least `threshold` bytes and gets smaller for it, and marks it `content-encoding:
//! deflate`. The receiving router inflates it before its handler sees it, within the
//! connection's decompression limit (a compression bomb is refused with a `bad_request`
//! reply, never inflated past the limit). Peers negotiate the `deflate` capability in
//! the handshake; if the connection a message finally goes on did not grant it, the
//! agent or hub inflates the payload again before sending, so a peer never receives an
//! encoding it did not accept.
//!
//! The service's future and error are the inner service's: compression happens in
//! `call` and cannot fail.

use std::task::{Context, Poll};

use tower::{Layer, Service};
use tunnel_proto::compress::DEFAULT_COMPRESSION_THRESHOLD;

use crate::request::Request;

/// Compresses payloads of at least `threshold` bytes (default 1 KiB).
#[derive(Debug, Clone, Copy)]
pub struct CompressionLayer {
    threshold: usize,
}

impl Default for CompressionLayer {
    fn default() -> Self {
        CompressionLayer::new(DEFAULT_COMPRESSION_THRESHOLD)
    }
}

impl CompressionLayer {
    /// Compresses payloads of at least `threshold` bytes.
    pub fn new(threshold: usize) -> Self {
        CompressionLayer { threshold }
    }
}

impl<S> Layer<S> for CompressionLayer {
    type Service = Compression<S>;

    fn layer(&self, inner: S) -> Compression<S> {
        Compression {
            inner,
            threshold: self.threshold,
        }
    }
}

/// The service of [`CompressionLayer`].
#[derive(Debug, Clone)]
pub struct Compression<S> {
    inner: S,
    threshold: usize,
}

impl<S: Service<Request>> Service<Request> for Compression<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> S::Future {
        request.envelope.compress_payload(self.threshold);
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{ServiceExt, service_fn};
    use tunnel_proto::MessageType;

    #[tokio::test]
    async fn compresses_only_above_the_threshold() {
        let seen = service_fn(|r: Request| async move {
            Ok::<_, std::convert::Infallible>(r.envelope.content_encoding().map(str::to_owned))
        });
        let mut svc = CompressionLayer::new(100).layer(seen);
        let big = Request::new(MessageType::Event, &vec!["same words"; 100]).unwrap();
        let small = Request::new(MessageType::Event, &"tiny").unwrap();
        assert_eq!(
            svc.ready()
                .await
                .unwrap()
                .call(big)
                .await
                .unwrap()
                .as_deref(),
            Some("deflate")
        );
        assert_eq!(svc.ready().await.unwrap().call(small).await.unwrap(), None);
    }
}
