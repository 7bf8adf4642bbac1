//! The `mvm` crate's integration tests, in one binary: the workspace layering, the CLI, and `mvm run` on the examples.

mod cli;
mod layering;
mod run;
