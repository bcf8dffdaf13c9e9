//! A read buffer that exists only while data is flowing.
//!
//! tungstenite reads the socket in chunks of its (deliberately small) read buffer, so a
//! busy connection would make one `recv` system call per few kilobytes. `BurstReader`
//! reads up to [`BURST`] bytes per system call into a buffer of its own and serves
//! tungstenite's small reads from it; as soon as the socket has nothing more to give
//! and the buffer is drained, the buffer is freed. An idle connection holds no burst
//! buffer at all; a busy one makes a sixteenth of the system calls.
//!
//! It is also where a hub bounds what peers make it hold before a message is complete:
//! a cap on everything read before the protocol handshake is done
//! ([`BurstReader::cap`]), and a budget shared by all connections for the bytes of
//! partially received messages ([`ReadBudget`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;

/// Most bytes read from the socket in one call.
pub(crate) const BURST: usize = 64 * 1024;

/// Bytes a connection may read towards one message without drawing on the shared
/// [`ReadBudget`]: messages up to about this size never wait for it.
pub(crate) const FREE: usize = 2 * BURST;

/// The budget units: one permit is this many bytes.
const UNIT: usize = 1024;

/// The bytes of partially received messages that all connections of a listener may
/// hold together, beyond [`FREE`] each.
///
/// A connection that has read more than [`FREE`] bytes since its last complete data
/// message must take budget for every further read; when the budget is spent it stops
/// reading (its peer is slowed by TCP) until other connections complete their messages
/// and give theirs back. One connection at a time that holds part of the budget and
/// finds none left may finish its message on an overdraft, so that messages holding
/// parts of the budget never wait for each other forever: memory never grows past
/// the budget plus one message.
#[derive(Debug, Clone)]
pub(crate) struct ReadBudget(Arc<Semaphore>, Arc<Semaphore>);

impl ReadBudget {
    pub(crate) fn new(bytes: usize) -> Self {
        ReadBudget(
            Arc::new(Semaphore::new(
                (bytes / UNIT).clamp(BURST / UNIT, Semaphore::MAX_PERMITS),
            )),
            // The overdraft: one connection at a time that already holds budget and
            // finds none left may finish its message without more. Several messages
            // each holding part of the budget and waiting for the rest would otherwise
            // wait for each other forever.
            Arc::new(Semaphore::new(1)),
        )
    }
}

/// The budget a connection holds for the message in progress.
#[derive(Debug, Default)]
struct Held {
    bytes: Option<OwnedSemaphorePermit>,
    /// The listener's one overdraft, while this connection finishes on it.
    overdraft: Option<OwnedSemaphorePermit>,
}

/// Counts complete data messages and holds the budget taken for the one in progress;
/// shared by a connection's reader (which calls [`MessagesDone::bump`] for each data
/// message, giving that budget back at once) and its [`BurstReader`].
#[derive(Debug, Clone, Default)]
pub(crate) struct MessagesDone(Arc<Done>);

#[derive(Debug, Default)]
struct Done {
    count: AtomicU64,
    /// Whether `held` may hold anything: the per-message path reads only this.
    holding: AtomicBool,
    /// Bytes of control frames read since the reader last looked: they are not part
    /// of the data message in progress.
    control: AtomicUsize,
    held: Mutex<Held>,
}

impl MessagesDone {
    /// Called by the connection's one reader for each data message: a plain load and
    /// store, and the lock only when budget is held.
    pub(crate) fn bump(&self) {
        let count = self.0.count.load(Ordering::Relaxed);
        self.0.count.store(count + 1, Ordering::Relaxed);
        if self.0.holding.load(Ordering::Acquire) && self.0.holding.swap(false, Ordering::AcqRel) {
            *self.held() = Held::default();
        }
    }

    /// Called for each control frame (ping, pong) of `payload` bytes.
    pub(crate) fn control(&self, payload: usize) {
        // A client's control frame: 2 header bytes and a 4-byte mask (at most 125
        // bytes of payload, so no extended length).
        self.0.control.fetch_add(payload + 6, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.0.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The error a read returns once more than the cap was read.
#[derive(Debug)]
pub(crate) struct OverCap(pub(crate) usize);

impl std::fmt::Display for OverCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "more than {} bytes before the handshake completed",
            self.0
        )
    }
}

impl std::error::Error for OverCap {}

#[derive(Debug)]
pub(crate) struct BurstReader<S> {
    inner: S,
    buf: BytesMut,
    /// Most bytes that may be read in all (`None`: no cap).
    cap: Option<usize>,
    read: usize,
    budget: Option<Box<Budgeted>>,
}

/// What a connection under a [`ReadBudget`] tracks; boxed so that it costs a pointer
/// on connections without one.
#[derive(Debug)]
struct Budgeted {
    budget: PollSemaphore,
    overdraft: PollSemaphore,
    done: MessagesDone,
    /// `done` when last looked at.
    seen: u64,
    /// Bytes read since the last complete data message.
    since: usize,
}

impl<S> BurstReader<S> {
    pub(crate) fn new(inner: S) -> Self {
        BurstReader {
            inner,
            buf: BytesMut::new(),
            cap: None,
            read: 0,
            budget: None,
        }
    }

    /// Fails reads once more than `cap` bytes were read in all (until [`Self::uncap`]).
    pub(crate) fn cap(mut self, cap: usize) -> Self {
        self.cap = Some(cap);
        self
    }

    /// Lifts the cap.
    pub(crate) fn uncap(&mut self) {
        self.cap = None;
    }

    /// Draws on `budget` for messages larger than [`FREE`]; `done` says when one ends.
    #[cfg(test)]
    pub(crate) fn budget(mut self, budget: &ReadBudget, done: MessagesDone) -> Self {
        self.set_budget(budget, done);
        self
    }

    /// As [`Self::budget`], in place.
    pub(crate) fn set_budget(&mut self, budget: &ReadBudget, done: MessagesDone) {
        self.budget = Some(Box::new(Budgeted {
            budget: PollSemaphore::new(budget.0.clone()),
            overdraft: PollSemaphore::new(budget.1.clone()),
            seen: done.get(),
            done,
            since: 0,
        }));
    }
}

impl Budgeted {
    /// Ready once the next read of up to [`BURST`] bytes is within the budget.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let done = self.done.get();
        if done != self.seen {
            // A message completed (and gave its budget back): count afresh.
            self.seen = done;
            self.since = 0;
        }
        let control = self.done.0.control.swap(0, Ordering::Relaxed);
        self.since = self.since.saturating_sub(control);
        let needed = (self.since + BURST).saturating_sub(FREE);
        if needed == 0 {
            return Poll::Ready(Ok(()));
        }
        let held = {
            let held = self.done.held();
            if held.overdraft.is_some() {
                return Poll::Ready(Ok(()));
            }
            held.bytes.as_ref().map_or(0, |p| p.num_permits() * UNIT)
        };
        if needed <= held {
            return Poll::Ready(Ok(()));
        }
        let more = (needed - held).div_ceil(UNIT);
        let closed = || Poll::Ready(Err(io::Error::other("read budget closed")));
        match self
            .budget
            .poll_acquire_many(cx, u32::try_from(more).unwrap_or(u32::MAX))
        {
            Poll::Ready(Some(permit)) => {
                {
                    let mut held = self.done.held();
                    match &mut held.bytes {
                        Some(held) => held.merge(permit),
                        None => held.bytes = Some(permit),
                    }
                }
                self.done.0.holding.store(true, Ordering::Release);
                // A wait for the overdraft, if one was queued, must not keep its place.
                self.overdraft = PollSemaphore::new(self.overdraft.clone_inner());
                Poll::Ready(Ok(()))
            }
            Poll::Ready(None) => closed(),
            // Holding part of the budget and none left: finish on the overdraft when
            // it is free (both waits are registered; whichever comes first).
            Poll::Pending if held > 0 => match self.overdraft.poll_acquire(cx) {
                Poll::Ready(Some(ticket)) => {
                    self.done.held().overdraft = Some(ticket);
                    self.done.0.holding.store(true, Ordering::Release);
                    // Leave the queue for bytes: a queued wait would be handed permits
                    // that nobody takes.
                    self.budget = PollSemaphore::new(self.budget.clone_inner());
                    Poll::Ready(Ok(()))
                }
                Poll::Ready(None) => closed(),
                Poll::Pending => Poll::Pending,
            },
            Poll::Pending => Poll::Pending,
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
            if let Some(cap) = this.cap
                && this.read > cap
            {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    OverCap(cap),
                )));
            }
            if let Some(budgeted) = &mut this.budget {
                futures_util::ready!(budgeted.poll_room(cx))?;
            }
            if out.remaining() >= BURST {
                let before = out.filled().len();
                let read = Pin::new(&mut this.inner).poll_read(cx, out);
                this.count(out.filled().len() - before);
                return read;
            }
            // Reuses the previous burst's allocation when it is still held.
            this.buf.reserve(BURST);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Ready(Ok(n)) => this.count(n),
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

impl<S> BurstReader<S> {
    fn count(&mut self, n: usize) {
        self.read = self.read.saturating_add(n);
        if let Some(budgeted) = &mut self.budget {
            budgeted.since = budgeted.since.saturating_add(n);
        }
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

    #[tokio::test]
    async fn two_messages_sharing_a_spent_budget_do_not_wait_for_each_other() {
        let budget = ReadBudget::new(2 * BURST);
        let (a_done, b_done) = (MessagesDone::default(), MessagesDone::default());
        let (a_client, mut a_server) = tokio::io::duplex(1 << 20);
        let (b_client, mut b_server) = tokio::io::duplex(1 << 20);
        let mut a = BurstReader::new(a_client).budget(&budget, a_done.clone());
        let mut b = BurstReader::new(b_client).budget(&budget, b_done.clone());
        a_server
            .write_all(&vec![1u8; 768 * 1024])
            .await
            .expect("write");
        b_server
            .write_all(&vec![2u8; 768 * 1024])
            .await
            .expect("write");
        let mut chunk = vec![0u8; BURST];
        // Each takes half of the budget...
        for reader in [&mut a, &mut b] {
            let mut read = 0;
            while read < FREE + BURST {
                read += reader.read(&mut chunk).await.expect("read");
            }
        }
        // ...and a, needing more, finishes on the overdraft instead of waiting for b.
        let mut read = 0;
        while read < 4 * BURST {
            read += tokio::time::timeout(std::time::Duration::from_secs(1), a.read(&mut chunk))
                .await
                .expect("a is not stuck")
                .expect("read");
        }
        // b waits, until a's message completes and gives everything back.
        let b_next = tokio::time::timeout(std::time::Duration::from_millis(20), b.read(&mut chunk));
        assert!(b_next.await.is_err(), "b waits while a holds the overdraft");
        a_done.bump();
        let b_next = tokio::time::timeout(std::time::Duration::from_secs(1), b.read(&mut chunk));
        assert!(b_next.await.expect("b goes on").expect("read") > 0);
        b_done.bump();
        drop((a, b));
        assert_eq!(
            budget.0.available_permits(),
            2 * BURST / UNIT,
            "all given back"
        );
        assert_eq!(budget.1.available_permits(), 1, "the overdraft too");
    }

    #[tokio::test]
    async fn control_frames_never_add_up_to_a_message() {
        let budget = ReadBudget::new(BURST);
        let done = MessagesDone::default();
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut reader = BurstReader::new(client).budget(&budget, done.clone());
        let mut chunk = vec![0u8; BURST];
        // 4 MiB of pings (as far as the reader is told): never a wait, budget untouched.
        for _ in 0..64 {
            server.write_all(&vec![9u8; BURST]).await.expect("write");
            let n =
                tokio::time::timeout(std::time::Duration::from_secs(1), reader.read(&mut chunk))
                    .await
                    .expect("never waits")
                    .expect("read");
            done.control(n - 6);
        }
        assert_eq!(budget.0.available_permits(), BURST / UNIT);
    }

    #[tokio::test]
    async fn a_cap_fails_reads_past_it_until_lifted() {
        let (client, mut server) = tokio::io::duplex(256 * 1024);
        let mut reader = BurstReader::new(client).cap(1000);
        server.write_all(&[7u8; 3000]).await.expect("write");
        let mut chunk = [0u8; 4096];
        let mut got = 0;
        let err = loop {
            match reader.read(&mut chunk).await {
                Ok(n) => got += n,
                Err(e) => break e,
            }
        };
        assert!(got > 1000 && got <= 3000, "read {got} before failing");
        assert!(err.get_ref().is_some_and(|e| e.is::<OverCap>()), "{err}");
        reader.uncap();
        server.write_all(&[7u8; 10]).await.expect("write");
        assert!(reader.read(&mut chunk).await.expect("uncapped") > 0);
    }

    #[tokio::test]
    async fn large_messages_wait_for_the_shared_budget_and_give_it_back() {
        let budget = ReadBudget::new(BURST);
        let (a_done, b_done) = (MessagesDone::default(), MessagesDone::default());
        let (a_client, mut a_server) = tokio::io::duplex(1 << 20);
        let (b_client, mut b_server) = tokio::io::duplex(1 << 20);
        let mut a = BurstReader::new(a_client).budget(&budget, a_done.clone());
        let mut b = BurstReader::new(b_client).budget(&budget, b_done.clone());
        a_server
            .write_all(&vec![1u8; 512 * 1024])
            .await
            .expect("write");
        b_server
            .write_all(&vec![2u8; 512 * 1024])
            .await
            .expect("write");
        let mut chunk = vec![0u8; BURST];
        // Each may read its free allowance; a then takes the whole budget.
        let mut read_a = 0;
        while read_a < FREE + BURST {
            read_a += a.read(&mut chunk).await.expect("read a");
        }
        let mut read_b = 0;
        while read_b < FREE {
            read_b += b.read(&mut chunk).await.expect("read b");
        }
        let stalled =
            tokio::time::timeout(std::time::Duration::from_millis(20), b.read(&mut chunk));
        assert!(stalled.await.is_err(), "b waits: the budget is spent");
        // a's message completes: its budget goes back at once and b goes on.
        a_done.bump();
        let b_next = tokio::time::timeout(std::time::Duration::from_secs(1), b.read(&mut chunk));
        assert!(b_next.await.expect("b has budget now").expect("read") > 0);
        // a starts its next message within its free allowance.
        let a_next =
            tokio::time::timeout(std::time::Duration::from_millis(100), a.read(&mut chunk));
        assert!(a_next.await.expect("a within its allowance").expect("read") > 0);
        b_done.bump();
    }
}
