//! One module per scenario; each prints its figures and returns an error when its
//! correctness check fails (which makes the run exit non-zero).

pub(crate) mod chaos;
pub(crate) mod cluster;
pub(crate) mod cluster_scale;
pub(crate) mod fanout;
pub(crate) mod idle;
pub(crate) mod latency;
pub(crate) mod load;
pub(crate) mod session;
pub(crate) mod stack;
pub(crate) mod storm;
pub(crate) mod sustained;
pub(crate) mod throughput;
