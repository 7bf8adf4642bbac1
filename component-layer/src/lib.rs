//! The MVM component layer: jobs bound to queues by topology graphs kept outside their code.
//!
//! This part holds the [`topology`] model: DOT graph files read, checked (every problem with its
//! line) and generated. The WebAssembly runtime that runs a topology's components follows.

pub mod topology;
