//! The `mvm` crate's integration tests, in one binary: the workspace layering, the CLI, `mvm run` on
//! the examples, and labs of daemon processes on loopback.

mod agent;
mod agreement;
mod array;
mod cli;
mod domains;
mod environment;
mod files;
mod groups;
mod hostile;
mod lab;
mod layering;
mod logs;
mod netns;
mod policy;
mod revoke;
mod run;
mod top;
mod web;
