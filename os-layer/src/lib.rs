//! MVM OS layer: the execution environments jobs run in.
//!
//! - [`guest`]: a guest domain as a typed spec, checked, and its xl.cfg.
//! - [`image`]: the repository of execution-environment images with stable ids, verified by
//!   digest (OpenCCS).
//! - [`probe`]: properties a node measures about itself at intervals and publishes.
//!
//! Guest drivers (Xen through `xl`, and the host) come next. This crate depends on no other
//! layer.

pub mod guest;
pub mod image;
pub mod probe;
