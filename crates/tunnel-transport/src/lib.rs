//! The transport layer of tunnel: `Connection`, `Connector` and `Acceptor` traits and
//! their WebSocket implementation on tokio-tungstenite.
