//! A read buffer that exists only while data is flowing.
//!
//! tungstenite reads the socket in chunks of its (deliberately small) read buffer, so a
//! busy connection would make one `recv` system call per few kilobytes. `BurstReader`
//! reads up to [`BURST`] bytes per system call into a buffer of its own and serves
//! tungstenite's small reads from it; as soon as the socket has nothing more to give
//! and the buffer is drained, the buffer is freed. An idle connection holds no burst
//! buffer at all; a busy one makes a sixteenth of the system calls.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes read from the socket in one call.
pub(crate) const BURST: usize = 64 * 1024;

#[derive(Debug)]
pub(crate) struct BurstReader<S> {
    inner: S,
    buf: BytesMut,
}

impl<S> BurstReader<S> {
    pub(crate) fn new(inner: S) -> Self {
        BurstReader {
            inner,
            buf: BytesMut::new(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for BurstReader<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buf.is_empty() {
            if out.remaining() >= BURST {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            // Reuses the previous burst's allocation when it is still held.
            this.buf.reserve(BURST);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Idle: give the memory back until the next burst.
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for BurstReader<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn serves_small_reads_from_one_burst_and_frees_the_buffer_when_idle() {
        let (client, mut server) = tokio::io::duplex(256 * 1024);
        let mut reader = BurstReader::new(client);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        server.write_all(&data).await.expect("write");
        let mut got = Vec::new();
        let mut chunk = [0u8; 1000];
        while got.len() < data.len() {
            let n = reader.read(&mut chunk).await.expect("read");
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
        // Nothing more to read: the next read waits, and the buffer is released.
        let pending = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            reader.read(&mut chunk),
        )
        .await;
        assert!(pending.is_err());
        assert_eq!(reader.buf.capacity(), 0);
        // Writes pass straight through.
        reader.write_all(b"pong").await.expect("write");
        let mut back = [0u8; 4];
        server.read_exact(&mut back).await.expect("read back");
        assert_eq!(&back, b"pong");
    }
}
