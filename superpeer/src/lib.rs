//! The super-peer overlay: groups of MVM nodes over libp2p, the broker that places jobs on
//! them, and the node daemon that runs its part of a job.
//!
//! - [`proto`]: the control protocol (versioned, size-limited, validated messages).
//! - [`schedule`]: the pure scheduling decision (filter, rank, partition).

pub mod proto;
pub mod schedule;
