//! Cross-crate integration tests for tunnel, over real loopback sockets.
