//! Hubs joined through NATS.
//!
//! (Work in progress: the subject scheme first.)

pub mod subject;
