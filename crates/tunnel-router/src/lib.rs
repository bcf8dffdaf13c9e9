//! The tunnel router: `Hub`, `Agent`, and dispatch of messages to tower `Service`s.
