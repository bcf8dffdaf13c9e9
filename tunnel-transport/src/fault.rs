//! A TCP proxy that injects faults, for tests and the demo.
//!
//! Put it between an agent and a hub and, from the test, cut every connection (as if a
//! NAT dropped them), stall them (a blackhole: bytes are accepted but not forwarded), or
//! refuse new connections.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

#[derive(Debug, Default)]
struct Control {
    connections: Mutex<Vec<AbortHandle>>,
    refuse: std::sync::atomic::AtomicBool,
}

/// A fault-injecting TCP proxy on a loopback port.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    control: Arc<Control>,
    stall: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on `127.0.0.1:0` forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let control = Arc::new(Control::default());
        let (stall, stall_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, upstream, control.clone(), stall_rx));
        Ok(FaultProxy {
            addr,
            control,
            stall,
            task,
        })
    }

    /// The proxy's address: point agents here.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A `ws://` URL for the proxy.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// Cuts every current connection abruptly; returns how many were cut.
    pub fn cut_all(&self) -> usize {
        let handles = std::mem::take(
            &mut *self
                .control
                .connections
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        let live = handles.iter().filter(|h| !h.is_finished()).count();
        for h in handles {
            h.abort();
        }
        live
    }

    /// Stops forwarding in both directions on all connections (a blackhole), or
    /// resumes it. Bytes read while stalled are held, not dropped.
    pub fn set_stalled(&self, stalled: bool) {
        let _ = self.stall.send(stalled);
    }

    /// Refuses (closes at once) new connections, or accepts them again.
    pub fn set_refuse(&self, refuse: bool) {
        self.control
            .refuse
            .store(refuse, std::sync::atomic::Ordering::SeqCst);
    }

    /// Number of connections currently forwarded.
    pub fn connections(&self) -> usize {
        let mut conns = self
            .control
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        conns.retain(|h| !h.is_finished());
        conns.len()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_all();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    control: Arc<Control>,
    stall: watch::Receiver<bool>,
) {
    while let Ok((client, _)) = listener.accept().await {
        if control.refuse.load(std::sync::atomic::Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let stall = stall.clone();
        let handle = tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(pump(cr, sw, stall.clone()), pump(sr, cw, stall));
        });
        let mut conns = control
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        conns.retain(|h| !h.is_finished());
        conns.push(handle.abort_handle());
    }
}

async fn wait_unstalled(stall: &mut watch::Receiver<bool>) -> bool {
    while *stall.borrow_and_update() {
        if stall.changed().await.is_err() {
            return false;
        }
    }
    true
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stall: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !wait_unstalled(&mut stall).await {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !wait_unstalled(&mut stall).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}
