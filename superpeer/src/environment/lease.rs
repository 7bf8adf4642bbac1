//! A job's hold on its guest, and the guest it names.

use std::path::PathBuf;
use std::sync::Arc;

use mvm_os::liveness::Monitor;
use mvm_os::provision::{Environments, Lease, VmMode};

use super::{Market, Warm, drop_guest};
use crate::worker::agent::AgentAddr;

/// A job's hold on its guest; released when dropped (kept, saved or torn down by its mode).
pub(crate) struct EnvLease {
    pub(super) envs: Arc<Environments>,
    pub(super) monitor: Arc<Monitor>,
    /// The pool the guest came from, and its template's key, when it was a warm guest.
    pub(super) warm: Option<(Arc<Warm>, String)>,
    pub(super) lease: Option<Lease>,
    /// The guest's agent, when its image runs one.
    pub(super) agent: Option<AgentAddr>,
    /// The node's auctioneer, when the job bids for the guest's CPU.
    pub(super) market: Option<Arc<Market>>,
}

impl EnvLease {
    /// The guest, to name it and ask about it while the lease is held elsewhere.
    pub(crate) fn guest(&self) -> GuestRef {
        GuestRef {
            envs: self.envs.clone(),
            name: self
                .lease
                .as_ref()
                .map(|l| l.name.clone())
                .unwrap_or_default(),
        }
    }

    /// The guest's agent, when its image runs one (a part then runs in a worker it starts).
    pub(crate) fn agent(&self) -> Option<&AgentAddr> {
        self.agent.as_ref()
    }

    /// Where a process joins the guest, when the guest is a group of this host's processes
    /// (the host driver): the `cgroup.procs` file of each of its control groups.
    pub(crate) fn join_files(&self) -> Option<Vec<PathBuf>> {
        let name = &self.lease.as_ref()?.name;
        match self.envs.driver().join_files(name) {
            Ok(files) => files,
            Err(e) => {
                tracing::warn!(guest = %name, error = %e, "cannot tell how to join the guest");
                None
            }
        }
    }
}

/// A guest held by a lease, by name.
#[derive(Clone)]
pub(crate) struct GuestRef {
    envs: Arc<Environments>,
    name: String,
}

impl GuestRef {
    /// Its name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Who it is now: its name, the hypervisor's id for it, its driver, and the worker that
    /// ran a part in it (`worker`: its process id and its kernel's boot id).
    pub(crate) fn identity(
        &self,
        worker: Option<(u32, Option<String>)>,
    ) -> crate::proto::GuestIdentity {
        let driver = self.envs.driver();
        let (worker, boot_id) = worker.map_or((None, None), |(p, b)| (Some(p), b));
        crate::proto::GuestIdentity {
            name: self.name.clone(),
            id: driver.inspect(&self.name).ok().and_then(|g| g.id),
            driver: driver.kind().to_owned(),
            worker,
            boot_id,
        }
    }

    /// Its state now, if the driver knows it.
    pub(crate) fn state(&self) -> Option<mvm_os::State> {
        self.envs.driver().inspect(&self.name).ok().map(|g| g.state)
    }

    /// Its count of processes killed for its memory limit, where the driver tells.
    pub(crate) fn oom_kills(&self) -> Option<u64> {
        self.envs.driver().oom_kills(&self.name)
    }
}

impl Drop for EnvLease {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        if let Some(m) = self.market.take() {
            m.end(&lease.name);
        }
        // Its end (kept, saved or torn down) is not a death.
        self.monitor.unwatch(&lease.name);
        let envs = self.envs.clone();
        let warm = self.warm.take();
        let release = move || {
            if let Err(e) = envs.release(&lease) {
                tracing::warn!(guest = %lease.name, "releasing the environment: {e}");
            }
            let Some((warm, key)) = warm else { return };
            // A persistent guest goes back to its pool, to be the next one taken (it keeps
            // what the job left in it); the pool's oldest free guests beyond its size go.
            if lease.mode == VmMode::Persistent {
                let extra = {
                    let mut pools = warm.pools.lock();
                    match pools.iter_mut().find(|p| p.key == key) {
                        Some(p) => {
                            p.free.push(lease.name.clone());
                            let over = p.free.len().saturating_sub(p.want as usize);
                            p.free.drain(..over).collect()
                        }
                        None => vec![lease.name.clone()],
                    }
                };
                for name in extra {
                    drop_guest(&envs, &name);
                }
            }
            warm.wake.notify_one();
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(release);
            }
            Err(_) => release(),
        }
    }
}
