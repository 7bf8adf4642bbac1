//! A node's OS layer: the execution environment a woken node ensures before its vertices run.
//!
//! When a job's profile names an image (`requirements.image`), every node placed in the job
//! acquires a guest of that image from its own repository through its driver (the host's
//! control groups by default, Xen where configured), in the job's VM mode, before anything is
//! instantiated; the guest is released (kept, saved, or torn down) when the job's part ends,
//! however it ends. A job that names no image, or the image `host`, runs on the host as it is.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use mvm_os::guestnet::{GuestNet, NetError};
use mvm_os::host::HostDriver;
use mvm_os::image::{ImageError, ImageId, Repository};
use mvm_os::liveness::{Died, Monitor};
use mvm_os::provision::{Environments, GuestRequest, Lease, ProvisionError, Provisioner, VmMode};
use mvm_os::storage::{Storage, StorageError, StorageSpec};
use mvm_os::template::{Pool, Shape, Template};
use mvm_os::xen::{XenConfig, XenDriver};
use mvm_os::{Driver, DriverError};

use crate::proto::{EnvSpec, JobId};
use crate::worker::WorkerCommand;
use crate::worker::agent::{AGENT_PORT, AgentAddr};

/// Why a node's OS layer cannot be opened, or a job's environment acquired.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// The guest driver cannot be set up.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The image repository cannot be opened, or has no such image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The guests' storage cannot be opened.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// An image named neither `name:version` nor `name:version@sha256:HEX`.
    #[error("'{0}' is not an image id")]
    NotAnId(String),
    /// No guest could be provisioned.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// Every guest kept for this environment serves another job.
    #[error("every guest slot of this environment is in use")]
    InUse,
    /// The guest network cannot give a guest with an agent its interface.
    #[error(transparent)]
    Net(#[from] NetError),
    /// An image whose guest runs an agent, on a node without a guest network.
    #[error("image {0} boots an MVM agent, and this node has no guest network for it (Xen)")]
    NoNet(String),
    /// A job's bid for the node's CPU is refused.
    #[error("guest {0}: a bid: {1}")]
    Bid(String, String),
    /// A guest's key cannot be made.
    #[error("a key for guest {0}: {1}")]
    Key(String, std::io::Error),
}

/// Which guest driver a node uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverKind {
    /// Control groups of this host, under a parent group of this name.
    Host {
        /// The parent group, e.g. `mvm`.
        cgroup: String,
    },
    /// Xen guests through `xl` (the node runs in dom0).
    Xen,
}

/// A node's OS layer configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsConfig {
    /// The driver.
    pub driver: DriverKind,
    /// Its directory: `images/` (the repository), `guests/` (storage), `checkpoints/`, `xen/`.
    pub dir: PathBuf,
    /// How a part whose guest is a group of this host's processes (the host driver) is run in
    /// a process of its own inside the guest (`mvm worker`); none: in the node's own process,
    /// where the guest's limits do not bind it.
    pub worker: Option<WorkerCommand>,
    /// Guests kept warm, per template (`mvm node --pool FILE`).
    pub pools: Vec<Pool>,
    /// The network of the guests whose image runs an MVM agent (Xen): a bridge, and the
    /// node's address on it with the prefix length (`10.213.0.1/24`).
    pub guest_net: Option<(String, String)>,
    /// The node's name: its guests' names are made from it too, so that nodes sharing a host
    /// (a dom0, a control-group hierarchy) never name two guests alike.
    pub node: String,
}

/// The node's environments, built from an [`OsConfig`].
pub(crate) struct NodeOs {
    envs: Arc<Environments>,
    pub(crate) repo: Repository,
    worker: Option<WorkerCommand>,
    /// Watches every guest a job holds (SmartDomains' liveness monitor).
    monitor: Arc<Monitor>,
    /// The guests that died behind the node's back, until the node takes them.
    deaths: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<Died>>>,
    /// Guests made ahead of the jobs that name their template.
    warm: Arc<Warm>,
    /// The network of the guests with agents, and whether its bridge is set up.
    net: Option<(GuestNet, parking_lot::Mutex<bool>)>,
    /// The agent of each guest made with one, by guest name.
    agents: parking_lot::Mutex<HashMap<String, AgentAddr>>,
    /// The node's name (see [`OsConfig::node`]).
    node: String,
    /// The node's auctioneer: the guests' bids for its CPU.
    market: Arc<Market>,
}

/// A node's warm guests: per template, guests made and left idle until a job that names the
/// template takes one (OpenNebula's and Kubernetes' warm pools); another is made at once. A
/// job in `stop-start` mode keeps the one it took (it is torn down after the job); in
/// `persistent` mode it gives it back after the job, to be the next one taken, and the pool's
/// oldest free guest beyond its size goes. A `save-restore` job keeps saved guests of its own
/// and takes none.
struct Warm {
    pools: parking_lot::Mutex<Vec<WarmPool>>,
    /// Wakes the task that keeps the pools full ([`keep_warm`]).
    wake: tokio::sync::Notify,
}

/// The warm guests of one template.
struct WarmPool {
    template: Template,
    /// The template's shape key.
    key: String,
    /// How many are kept free.
    want: u32,
    /// The free ones, by guest name.
    free: Vec<String>,
    /// Guests made so far (numbers their names).
    made: u64,
    /// Why the last guest could not be made, if it could not.
    failing: Option<String>,
}

/// How often the warm pools are looked at when nothing wakes their keeper (a free guest may
/// have died).
const WARM_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// How often the node's liveness monitor looks at the guests jobs hold.
const LIVENESS: std::time::Duration = std::time::Duration::from_millis(500);

impl NodeOs {
    /// Opens the repository and storage and builds the driver.
    pub(crate) fn open(c: &OsConfig) -> Result<NodeOs, EnvError> {
        let driver: Arc<dyn Driver> = match &c.driver {
            DriverKind::Host { cgroup } => Arc::new(HostDriver::new(cgroup)),
            DriverKind::Xen => Arc::new(XenDriver::new(XenConfig::new(c.dir.join("xen")))?),
        };
        let net = match (&c.driver, &c.guest_net) {
            (DriverKind::Xen, Some((bridge, cidr))) => {
                Some((GuestNet::new(bridge, cidr)?, parking_lot::Mutex::new(false)))
            }
            _ => None,
        };
        let repo = Repository::open(c.dir.join("images"))?;
        let storage = Storage::new(c.dir.join("guests"))?;
        let prov = Arc::new(Provisioner::new(driver, repo.clone(), storage));
        let (monitor, deaths) = Monitor::start(prov.clone(), LIVENESS);
        let pools = c
            .pools
            .iter()
            .map(|p| WarmPool {
                key: p.template.key(),
                template: p.template.clone(),
                want: p.guests,
                free: Vec::new(),
                made: 0,
                failing: None,
            })
            .collect();
        let envs = Arc::new(Environments::new(prov, c.dir.join("checkpoints")));
        Ok(NodeOs {
            market: Arc::new(Market {
                state: parking_lot::Mutex::new(MarketState::default()),
                envs: envs.clone(),
            }),
            envs,
            repo,
            worker: c.worker.clone(),
            monitor: Arc::new(monitor),
            deaths: parking_lot::Mutex::new(Some(deaths)),
            warm: Arc::new(Warm {
                pools: parking_lot::Mutex::new(pools),
                wake: tokio::sync::Notify::new(),
            }),
            net,
            agents: parking_lot::Mutex::new(HashMap::new()),
            node: c.node.clone(),
        })
    }

    /// `req` for a guest whose image runs an MVM agent: an interface on the guest network, and
    /// the guest's address and key on its kernel command line (after the image's own); the
    /// agent is recorded by the guest's name. Other requests are returned as they are. A guest
    /// asked for again (kept between jobs) keeps its address and key.
    fn with_agent(&self, mut req: GuestRequest) -> Result<GuestRequest, EnvError> {
        let image = self.repo.get(&req.storage.image)?;
        if !image.metadata.agent {
            return Ok(req);
        }
        let Some((net, ready)) = &self.net else {
            return Err(EnvError::NoNet(req.storage.image.to_string()));
        };
        {
            let mut ready = ready.lock();
            if !*ready {
                net.ensure()?;
                *ready = true;
            }
        }
        let driver = self.envs.driver();
        let addr = net.assign(&req.name, |g| driver.inspect(g).is_ok())?;
        let mut agents = self.agents.lock();
        let key = match agents.get(&req.name) {
            Some(a) if a.addr.ip() == addr => a.key.clone(),
            _ => crate::worker::agent::new_key().map_err(|e| EnvError::Key(req.name.clone(), e))?,
        };
        let base = req.cmdline.clone().or(image.metadata.cmdline.clone());
        let words = format!("{} mvm.key={key}", net.boot_args(addr));
        req.cmdline = Some(match base {
            Some(b) if !b.trim().is_empty() => format!("{} {words}", b.trim()),
            _ => words,
        });
        req.nics.push(net.nic(addr));
        agents.insert(
            req.name.clone(),
            AgentAddr {
                addr: std::net::SocketAddr::from((addr, AGENT_PORT)),
                key,
            },
        );
        Ok(req)
    }

    /// How many guests are alive on the driver (running, blocked or paused).
    ///
    /// # Errors
    /// The driver cannot list its guests.
    pub(crate) fn guests_alive(&self) -> Result<usize, String> {
        let guests = self.envs.driver().list().map_err(|e| e.to_string())?;
        Ok(guests.iter().filter(|g| !g.state.is_dead()).count())
    }

    /// The warm guests free now: template shape key → how many.
    pub(crate) fn warm(&self) -> std::collections::BTreeMap<String, u32> {
        self.warm
            .pools
            .lock()
            .iter()
            .map(|p| {
                (
                    p.key.clone(),
                    u32::try_from(p.free.len()).unwrap_or(u32::MAX),
                )
            })
            .collect()
    }

    /// Makes the warm guests missing from the pools, after dropping the free ones that died.
    /// Blocks: call from `spawn_blocking`.
    fn fill(&self) {
        let dead = |name: &str| {
            self.envs
                .driver()
                .inspect(name)
                .is_ok_and(|g| g.state.is_dead())
        };
        // What is missing, worked out under the lock; the guests made outside it.
        let mut make: Vec<(usize, String, GuestRequest)> = Vec::new();
        let mut gone: Vec<String> = Vec::new();
        {
            let mut pools = self.warm.pools.lock();
            for (i, p) in pools.iter_mut().enumerate() {
                p.free.retain(|name| {
                    let d = dead(name);
                    if d {
                        gone.push(name.clone());
                    }
                    !d
                });
                while p.free.len() + make.iter().filter(|(j, ..)| *j == i).count() < p.want as usize
                {
                    let name = format!("mvm-w{}-{}{}", p.key, short(&self.node), p.made);
                    p.made += 1;
                    match self
                        .request(&name, &p.template.shape)
                        .and_then(|r| self.with_agent(r))
                    {
                        Ok(req) => {
                            p.failing = None;
                            make.push((i, name, req));
                        }
                        Err(e) => {
                            // Said once, not at every look.
                            let e = e.to_string();
                            if p.failing.as_ref() != Some(&e) {
                                tracing::warn!(template = %p.template.name, "no warm guest: {e}");
                                p.failing = Some(e);
                            }
                            break;
                        }
                    }
                }
            }
        }
        for name in gone {
            tracing::warn!(guest = %name, "a warm guest died; another is made");
            drop_guest(&self.envs, &name);
        }
        for (i, name, req) in make {
            let made = self
                .envs
                .acquire(&req, VmMode::Persistent)
                .and_then(|lease| self.envs.release(&lease));
            match made {
                Ok(()) => {
                    tracing::info!(guest = %name, "a warm guest is ready");
                    if let Some(p) = self.warm.pools.lock().get_mut(i) {
                        p.free.push(name);
                    }
                }
                Err(e) => {
                    tracing::warn!(guest = %name, "making a warm guest: {e}");
                    drop_guest(&self.envs, &name);
                }
            }
        }
    }

    /// A free warm guest of shape `key`, taken out of its pool (its keeper is woken to make
    /// another).
    fn take_warm(&self, key: &str) -> Option<String> {
        let name = self
            .warm
            .pools
            .lock()
            .iter_mut()
            .find(|p| p.key == key)?
            .free
            .pop()?;
        self.warm.wake.notify_one();
        Some(name)
    }

    /// The guests held by jobs that die behind the node's back, each once (to be taken once).
    pub(crate) fn deaths(&self) -> Option<tokio::sync::mpsc::Receiver<Died>> {
        self.deaths.lock().take()
    }

    /// How parts run in workers inside their guests, if they do.
    pub(crate) fn worker(&self) -> Option<&WorkerCommand> {
        self.worker.as_ref()
    }

    /// The image ids this node offers: every image in its repository, as the full id and as
    /// `name:version`.
    pub(crate) fn images(&self) -> Vec<String> {
        let mut out = Vec::new();
        for i in self.repo.list().unwrap_or_default() {
            out.push(i.id.to_string());
            out.push(format!("{}:{}", i.id.name, i.id.version));
        }
        out
    }

    /// The guest request for a guest named `name` of shape `shape`, its image resolved in
    /// this node's repository.
    fn request(&self, name: &str, shape: &Shape) -> Result<GuestRequest, EnvError> {
        let image: ImageId = if shape.image.contains("@sha256:") {
            shape.image.parse()?
        } else {
            let (name, version) = shape
                .image
                .split_once(':')
                .ok_or_else(|| EnvError::NotAnId(shape.image.clone()))?;
            self.repo.resolve(name, version)?
        };
        Ok(GuestRequest {
            name: name.to_owned(),
            storage: StorageSpec {
                image,
                disk_mib: shape.disk_mib,
                swap_mib: shape.swap_mib,
            },
            mode: shape.mode,
            vcpus: shape.vcpus.max(1),
            memory_mib: shape.memory_mib.max(16),
            cmdline: shape.cmdline.clone(),
            weight: shape.weight,
            cap: shape.cap,
            nics: shape.network.clone(),
        })
    }

    /// Acquires the guest `env` asks for, for job `job`: a warm guest of its template when
    /// there is one free, else one made for it. Blocks: call from `spawn_blocking`.
    pub(crate) fn acquire(
        self: &Arc<Self>,
        job: &JobId,
        env: &EnvSpec,
    ) -> Result<EnvLease, EnvError> {
        let shape = env.template.as_ref().map_or_else(
            || Shape {
                image: env.image.clone(),
                vcpus: env.vcpus.max(1),
                memory_mib: env.memory_mib.max(16),
                disk_mib: None,
                swap_mib: None,
                mode: mvm_os::guest::Mode::Pv,
                cmdline: None,
                weight: env.weight,
                cap: env.cap,
                network: Vec::new(),
            },
            |t| t.shape.clone(),
        );
        let mode = env.mode;
        let key = shape.key();
        // A warm guest, unless the job keeps saved guests of its own.
        let mut warm = None;
        if env.template.is_some()
            && mode != VmMode::SaveRestore
            && let Some(name) = self.take_warm(&key)
        {
            let got = self
                .request(&name, &shape)
                .and_then(|r| self.with_agent(r))
                .and_then(|r| self.envs.acquire(&r, mode).map_err(EnvError::from));
            match got {
                Ok(lease) => warm = Some(lease),
                Err(e) => {
                    tracing::warn!(guest = %name, "a warm guest cannot be taken: {e}");
                    drop_guest(&self.envs, &name);
                }
            }
        }
        let from_pool = warm.is_some();
        let lease = match (warm, mode) {
            (Some(lease), _) => lease,
            // One guest per job.
            (None, VmMode::StopStart) => {
                let req = self.request(
                    &format!("mvm-{}", short(&format!("{}/{job}", self.node))),
                    &shape,
                )?;
                self.envs.acquire(&self.with_agent(req)?, mode)?
            }
            // Guests kept between jobs are named after what they are, so the next job with the
            // same needs finds them; a second job at once takes the next slot.
            (None, VmMode::Persistent | VmMode::SaveRestore) => {
                let probe = self.request("mvm-probe", &shape)?;
                let kept = short(&format!(
                    "{}/{}-{key}-{mode:?}",
                    self.node, probe.storage.image.digest
                ));
                let mut got = Err(EnvError::InUse);
                for slot in 0..16 {
                    let req = self.with_agent(GuestRequest {
                        name: format!("mvm-{kept}-{slot}"),
                        ..probe.clone()
                    })?;
                    match self.envs.acquire(&req, mode) {
                        Err(ProvisionError::Driver(DriverError::Exists(_))) => {}
                        other => {
                            got = other.map_err(EnvError::from);
                            break;
                        }
                    }
                }
                got?
            }
        };
        tracing::info!(%job, guest = %lease.name, fresh = lease.fresh, from_pool, ?mode, "environment ready");
        self.monitor.watch(&lease.name);
        Ok(EnvLease {
            agent: self.agents.lock().get(&lease.name).cloned(),
            envs: self.envs.clone(),
            monitor: self.monitor.clone(),
            warm: from_pool.then(|| (self.warm.clone(), key)),
            lease: Some(lease),
            market: None,
        })
    }

    /// The job holding `lease` bids `rate` (micro-credits per CPU-second, paid by `payer`)
    /// for this node's CPU: every bidding guest's weight is set anew, and again when the lease
    /// goes. Blocks: call from `spawn_blocking`.
    pub(crate) fn bid(
        &self,
        lease: &mut EnvLease,
        job: &crate::proto::JobId,
        payer: String,
        rate: u64,
    ) -> Result<(), EnvError> {
        let name = lease.guest().name().to_owned();
        self.market.bid(&name, job, payer, rate)?;
        lease.market = Some(self.market.clone());
        Ok(())
    }

    /// The node's auctioneer.
    pub(crate) fn market(&self) -> &Market {
        &self.market
    }

    /// Tears down every guest held (the node is shutting down).
    pub(crate) fn shutdown(&self) {
        self.envs.shutdown();
    }
}

/// Tears a guest down, whatever it was (a warm guest not needed any more).
fn drop_guest(envs: &Environments, name: &str) {
    let lease = Lease {
        name: name.to_owned(),
        mode: VmMode::StopStart,
        fresh: false,
    };
    if let Err(e) = envs.release(&lease) {
        tracing::warn!(guest = %name, "tearing down: {e}");
    }
}

/// Keeps the node's warm pools full: at start, whenever a warm guest is taken, and every few
/// seconds (a free one may have died). Ends with the node.
pub(crate) async fn keep_warm(os: Arc<NodeOs>) {
    if os.warm.pools.lock().is_empty() {
        return;
    }
    loop {
        let o = os.clone();
        if tokio::task::spawn_blocking(move || o.fill()).await.is_err() {
            return;
        }
        tokio::select! {
            () = os.warm.wake.notified() => {}
            () = tokio::time::sleep(WARM_CHECK) => {}
        }
    }
}

/// A short, name-safe digest of `s`.
fn short(s: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(s.as_bytes())[..6])
}

mod images;
mod lease;
mod market;

pub(crate) use images::serve_images;
pub(crate) use lease::{EnvLease, GuestRef};
pub use market::FLOOR_RATE;
pub(crate) use market::Market;
use market::MarketState;
