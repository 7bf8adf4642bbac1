//! The super-peer overlay: groups of MVM nodes over libp2p, the broker that places jobs on
//! them, and the node daemon that runs its part of a job.
//!
//! - [`daemon`]: a node, a super-peer, or both, on one swarm.
//! - [`client`]: what `mvm submit`, `status` and `cancel` use.
//! - [`net`]: the swarm task and its handle.
//! - [`joblog`]: a group's control state, replicated over its super-peer candidates (Raft).
//! - `links`: direct links, remote channels over plain TCP agreed over libp2p.
//! - `rpc`: control streams, many requests and answers on one stream per peer.
//! - [`proto`]: the control protocol (versioned, size-limited, validated messages).
//! - [`schedule`]: the pure scheduling decision (filter, rank, partition).
//! - [`modules`]: module bytes by content hash.
//! - [`pki`]: domain CAs, node and user certificates, and their checks.
//! - [`policy`]: the policies in force, their source, and their distribution.
//! - `site`: what a daemon's roles share, and requests from one role to another.
//! - [`worker`]: a part run in a process of its own inside its guest (`mvm worker`).

mod broker;
pub mod client;
pub mod daemon;
pub mod environment;
pub mod files;
#[doc(hidden)]
pub mod fuzz;
pub mod joblog;
mod links;
pub use links::Links;
pub mod market;
mod metrics;
pub mod modules;
pub mod net;
mod node;
/// The probes a node has, by name, with what each measures (what a monitoring policy's
/// `probe` rules may name).
pub use node::monitor::PROBES;
pub mod pki;
pub mod policy;
pub mod proto;
mod revocation;
mod rpc;
pub mod schedule;
mod site;
pub mod trigger;
pub mod worker;
