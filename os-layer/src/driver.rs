//! The guest lifecycle every driver offers.
//!
//! A driver turns a [`GuestSpec`] into a running domain and manages it by name. The node picks
//! one driver from its configuration ([`crate::xen::XenDriver`] where a Xen dom0 is, the
//! [`crate::host::HostDriver`] everywhere else); nothing above this layer names a hypervisor.
//! Calls block (a Xen operation takes from milliseconds to tens of seconds), so async callers
//! run them with `spawn_blocking`.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::guest::{GuestSpec, SpecError};

/// What a domain is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// On a CPU now.
    Running,
    /// Alive, waiting for an event (an idle guest).
    Blocked,
    /// Paused by the toolstack.
    Paused,
    /// Shut down, not yet destroyed.
    Shutdown,
    /// Crashed, not yet destroyed.
    Crashed,
    /// Being destroyed.
    Dying,
}

impl State {
    /// Running or blocked: the guest is alive and not held.
    pub fn is_alive(self) -> bool {
        matches!(self, State::Running | State::Blocked)
    }

    /// Shut down, crashed or dying: the guest is gone or going.
    pub fn is_dead(self) -> bool {
        matches!(self, State::Shutdown | State::Crashed | State::Dying)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Running => "running",
            State::Blocked => "blocked",
            State::Paused => "paused",
            State::Shutdown => "shutdown",
            State::Crashed => "crashed",
            State::Dying => "dying",
        })
    }
}

/// A guest as the driver sees it now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestInfo {
    /// Its name (stable; the domid is not).
    pub name: String,
    /// The hypervisor's id for it now, where there is one.
    pub id: Option<u32>,
    /// What it is doing.
    pub state: State,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// CPU time used, in seconds.
    pub cpu_seconds: f64,
}

/// Proportional CPU share and cap (Tycoon's shares, set through the credit schedulers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sched {
    /// Weight, 1 to 65535 (Xen's default is 256): CPU is shared in proportion to it.
    pub weight: u32,
    /// Cap in percent of one CPU; 0 is no cap.
    pub cap: u32,
}

/// A driver operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// No guest has that name.
    #[error("no guest named '{0}'")]
    NotFound(String),
    /// A guest has that name already.
    #[error("a guest named '{0}' exists already")]
    Exists(String),
    /// The spec is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A toolstack command failed; carries what it printed on stderr.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// How it ended.
        status: String,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// A toolstack command did not finish in time and was killed.
    #[error("`{command}` did not finish within {after:?} and was killed")]
    Timeout {
        /// The command line.
        command: String,
        /// The limit.
        after: Duration,
    },
    /// A toolstack command printed something this driver cannot read.
    #[error("cannot read the output of `{command}`: {message}")]
    Parse {
        /// The command line.
        command: String,
        /// What is wrong.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// This driver cannot do that.
    #[error("the {driver} driver cannot {op}")]
    Unsupported {
        /// The driver.
        driver: &'static str,
        /// The operation.
        op: &'static str,
    },
}

impl DriverError {
    pub(crate) fn io(path: &Path) -> impl FnOnce(io::Error) -> DriverError + '_ {
        move |source| DriverError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// The guest lifecycle.
pub trait Driver: Send + Sync {
    /// The driver's name, as node configurations and image metadata write it (`xen`, `host`).
    fn kind(&self) -> &'static str;

    /// Creates and starts a guest.
    ///
    /// # Errors
    /// [`DriverError::Exists`], an invalid spec, or the toolstack's failure; nothing is left
    /// behind on error.
    fn create(&self, spec: &GuestSpec) -> Result<GuestInfo, DriverError>;

    /// Every guest this driver sees (never the host's own domain).
    ///
    /// # Errors
    /// The toolstack failed.
    fn list(&self) -> Result<Vec<GuestInfo>, DriverError>;

    /// One guest.
    ///
    /// # Errors
    /// [`DriverError::NotFound`], or the toolstack failed.
    fn inspect(&self, name: &str) -> Result<GuestInfo, DriverError>;

    /// Stops scheduling the guest; its memory stays.
    ///
    /// # Errors
    /// [`DriverError::NotFound`], or the toolstack failed.
    fn pause(&self, name: &str) -> Result<(), DriverError>;

    /// Schedules a paused guest again.
    ///
    /// # Errors
    /// [`DriverError::NotFound`], or the toolstack failed.
    fn unpause(&self, name: &str) -> Result<(), DriverError>;

    /// Writes the guest's state to `checkpoint`; the guest is gone afterwards.
    ///
    /// # Errors
    /// [`DriverError::NotFound`], [`DriverError::Unsupported`], or the toolstack failed.
    fn save(&self, name: &str, checkpoint: &Path) -> Result<(), DriverError>;

    /// Brings back guest `name` from `checkpoint` (its id changes).
    ///
    /// # Errors
    /// [`DriverError::Exists`], [`DriverError::Unsupported`], or the toolstack failed.
    fn restore(&self, name: &str, checkpoint: &Path) -> Result<GuestInfo, DriverError>;

    /// Moves the guest, live, to `host` (for Xen: whatever `xl migrate` accepts).
    ///
    /// # Errors
    /// [`DriverError::NotFound`], [`DriverError::Unsupported`], or the toolstack failed.
    fn migrate(&self, name: &str, host: &str) -> Result<(), DriverError>;

    /// Asks the guest to shut down and waits up to `wait` for it to be gone.
    ///
    /// # Errors
    /// [`DriverError::Timeout`] when it is still there (destroy it then).
    fn shutdown(&self, name: &str, wait: Duration) -> Result<(), DriverError>;

    /// Ends the guest at once and releases what the driver holds for it.
    ///
    /// # Errors
    /// [`DriverError::NotFound`], or the toolstack failed.
    fn destroy(&self, name: &str) -> Result<(), DriverError>;

    /// Sets the number of online virtual CPUs.
    ///
    /// # Errors
    /// [`DriverError::NotFound`], or the toolstack failed.
    fn set_vcpus(&self, name: &str, vcpus: u32) -> Result<(), DriverError>;

    /// Sets the guest's memory target in MiB.
    ///
    /// # Errors
    /// [`DriverError::NotFound`], or the toolstack failed.
    fn set_memory(&self, name: &str, mib: u64) -> Result<(), DriverError>;

    /// Sets the guest's CPU weight and cap.
    ///
    /// # Errors
    /// [`DriverError::NotFound`], a weight outside 1–65535, or the toolstack failed.
    fn set_sched(&self, name: &str, sched: Sched) -> Result<(), DriverError>;

    /// Reads the guest's CPU weight and cap.
    ///
    /// # Errors
    /// [`DriverError::NotFound`], or the toolstack failed.
    fn sched(&self, name: &str) -> Result<Sched, DriverError>;

    /// Where a process of this host joins guest `name`: the `cgroup.procs` file of each of its
    /// control groups, for a driver whose guests are groups of the host's own processes; `None`
    /// for a driver whose guests are machines of their own (Xen).
    ///
    /// # Errors
    /// [`DriverError::NotFound`].
    fn join_files(&self, name: &str) -> Result<Option<Vec<std::path::PathBuf>>, DriverError> {
        let _ = name;
        Ok(None)
    }

    /// How many processes of guest `name` the kernel has killed for its memory limit so far,
    /// where the driver can tell.
    fn oom_kills(&self, name: &str) -> Option<u64> {
        let _ = name;
        None
    }
}
