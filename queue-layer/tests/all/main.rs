//! The queue layer's integration tests, in one binary (faster to build on two cores).

mod direct;
mod marks;
mod remote;
mod sealed;
