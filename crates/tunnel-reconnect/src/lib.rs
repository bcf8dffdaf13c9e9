//! Reconnect policy for tunnel: backoff with jitter, circuit breakers, session resume.
