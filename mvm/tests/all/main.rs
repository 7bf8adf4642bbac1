//! The `mvm` crate's integration tests, in one binary: the workspace layering and the CLI.

mod cli;
mod layering;
