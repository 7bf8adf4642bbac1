//! The MVM component layer: jobs bound to queues by topology graphs kept outside their code.
//!
//! - [`topology`]: DOT graph files read, checked (every problem with its line) and generated.
//! - [`bench`]: ping-pong, ring and instantiation benchmarks of jobs on one node.
//! - [`files`]: a job's input and output files, laid out in and taken from each vertex's
//!   sandbox directory.
//! - [`policy`]: role-based policies in Polar (inter-domain, domain, node level), decided by
//!   oso behind a caching engine.
//! - [`profile`]: job profiles (TOML), checked with file and line.
//! - [`runtime`]: runs a topology's vertices as WebAssembly jobs, compiled at run time and
//!   cached by content hash, each port bound to a queue, under limits and a policy hook; jobs
//!   use the host ABI of [`runtime::abi`].

pub mod bench;
pub mod files;
#[doc(hidden)]
pub mod fuzz;
pub mod policy;
pub mod profile;
pub mod runtime;
pub mod topology;
