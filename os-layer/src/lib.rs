//! MVM OS layer: the execution environments jobs run in.
//!
//! - [`driver`]: the guest lifecycle every driver offers; [`xen`] runs it through the real `xl`
//!   toolstack, [`host`] on this host's control groups (the embedded default).
//! - [`guest`]: a guest domain as a typed spec, checked, and its xl.cfg.
//! - [`guestnet`]: the bridge a node's Xen guests reach it on, and their addresses.
//! - [`image`]: the repository of execution-environment images with stable ids, verified by
//!   digest (OpenCCS).
//! - [`storage`]: a guest's disk, swap and boot files made from an image, and removed whole.
//! - [`provision`]: whole guests (storage plus domain) and the three VM modes (GridWay).
//! - [`template`]: guests described in files, one extending another, and warm pools of them.
//! - [`liveness`]: a monitor that notices guests dying behind MVM's back and cleans up.
//! - [`probe`]: properties a node measures about itself at intervals and publishes.
//! - [`bench`]: guest create-to-running through MVM beside plain `xl create`.
//!
//! This crate depends on no other layer.

pub mod bench;
pub mod driver;
#[doc(hidden)]
pub mod fuzz;
pub mod guest;
pub mod guestnet;
pub mod host;
pub mod image;
pub mod liveness;
pub mod loopdev;
pub mod probe;
pub mod provision;
pub mod storage;
pub mod template;
pub mod xen;

pub use driver::{Driver, DriverError, GuestInfo, Sched, State};
