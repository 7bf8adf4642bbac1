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

/// A node's auctioneer (Tycoon) and the guests whose weights it sets: every bid made, changed
/// or ended sets every bidding guest's weight to its rate's proportion. It meters each bidding
/// guest's CPU time for the bank (each heartbeat, and at a bid's change or end), and holds the
/// guests of a payer the bank says has no credit left at [`FLOOR_RATE`] until it has some.
pub(crate) struct Market {
    state: parking_lot::Mutex<MarketState>,
    envs: Arc<Environments>,
}

/// The rate a guest whose payer has no credit left bids, micro-credits per CPU-second: the
/// least share, and nothing charged while the payer holds nothing.
pub const FLOOR_RATE: u64 = 1;

#[derive(Default)]
struct MarketState {
    auction: crate::market::Auctioneer,
    /// Per bidding guest: its job, its payer and the rate it asked for.
    asked: HashMap<String, Asked>,
    /// The payers the bank last said have no credit.
    broke: std::collections::HashSet<String>,
    /// Charges metered at a bid's change or end, not yet taken by a heartbeat.
    owed: Vec<crate::proto::ChargeLine>,
}

impl MarketState {
    /// The rate `payer`'s guest bids for an asked `rate`: the floor while it has no credit.
    fn rate_for(&self, payer: &str, rate: u64) -> u64 {
        if self.broke.contains(payer) {
            FLOOR_RATE
        } else {
            rate
        }
    }
}

struct Asked {
    job: crate::proto::JobId,
    payer: String,
    rate: u64,
}

impl Market {
    /// Sets each bidding guest's weight as the bids ask (keeping its cap).
    fn reweigh(&self, auction: &crate::market::Auctioneer) {
        let driver = self.envs.driver();
        for (name, weight) in auction.weights() {
            tracing::debug!(guest = %name, weight, "a bidding guest's weight");
            let cap = driver.sched(&name).map_or(0, |s| s.cap);
            if let Err(e) = driver.set_sched(&name, mvm_os::driver::Sched { weight, cap }) {
                tracing::warn!(guest = %name, "setting a guest's weight from the bids: {e}");
            }
        }
    }

    /// The CPU seconds guest `guest` has used (0 when the driver cannot tell).
    fn cpu(&self, guest: &str) -> f64 {
        self.envs
            .driver()
            .inspect(guest)
            .map_or(0.0, |g| g.cpu_seconds)
    }

    /// Meters guest `guest` (at its rate until now) into `st.owed`.
    fn meter_into(&self, st: &mut MarketState, guest: &str) {
        let cpu = self.cpu(guest);
        if let Some(line) = charge_line(st, guest, cpu) {
            st.owed.push(line);
        }
    }

    /// Guest `guest` of `job` bids `rate` (micro-credits per CPU-second), paid by `payer`; a
    /// change of rate charges the time before it at the old one.
    fn bid(
        &self,
        guest: &str,
        job: &crate::proto::JobId,
        payer: String,
        rate: u64,
    ) -> Result<(), EnvError> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let fresh = !st.auction.bids(guest);
        if !fresh {
            self.meter_into(st, guest);
        }
        let effective = st.rate_for(&payer, rate);
        st.auction
            .bid(
                guest,
                crate::market::Bid {
                    payer: payer.clone(),
                    rate: effective,
                },
            )
            .map_err(|e| EnvError::Bid(guest.to_owned(), e.to_string()))?;
        if fresh {
            let cpu = self.cpu(guest);
            st.auction.metered_from(guest, cpu);
        }
        tracing::debug!(%guest, %job, %payer, rate, effective, "a guest bids for the node's CPU");
        st.asked.insert(
            guest.to_owned(),
            Asked {
                job: job.clone(),
                payer,
                rate,
            },
        );
        self.reweigh(&st.auction);
        Ok(())
    }

    /// Guest `guest`'s bid ends (its job let it go): what it used since its last charge is
    /// owed.
    fn end(&self, guest: &str) {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        if st.auction.bids(guest) {
            self.meter_into(st, guest);
            st.auction.end(guest);
            st.asked.remove(guest);
            self.reweigh(&st.auction);
        }
    }

    /// What every bidding guest used since its last charge, with what was owed at bids'
    /// changes and ends since the last call; the host's price (the sum of the bid rates);
    /// and the payers bidding. Blocks (asks the driver).
    pub(crate) fn meter(&self) -> (Vec<crate::proto::ChargeLine>, u64, Vec<String>) {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let guests: Vec<String> = st.asked.keys().cloned().collect();
        for g in &guests {
            self.meter_into(st, g);
        }
        let mut payers: Vec<String> = st.asked.values().map(|a| a.payer.clone()).collect();
        payers.sort_unstable();
        payers.dedup();
        (std::mem::take(&mut st.owed), st.auction.price(), payers)
    }

    /// Job `job`'s guests here bid `rate` from now on (a change of bid by hand or by its
    /// agent): the time before is charged at the rate before. How many guests it changed.
    ///
    /// # Errors
    /// A rate the auctioneer refuses (nothing changed).
    pub(crate) fn rebid(&self, job: &crate::proto::JobId, rate: u64) -> Result<usize, EnvError> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        if rate == 0 || rate > crate::market::MAX_RATE {
            return Err(EnvError::Bid(
                job.to_string(),
                crate::market::BidError::Rate(rate).to_string(),
            ));
        }
        let guests: Vec<(String, String)> = st
            .asked
            .iter()
            .filter(|(_, a)| &a.job == job)
            .map(|(g, a)| (g.clone(), a.payer.clone()))
            .collect();
        for (guest, payer) in &guests {
            self.meter_into(st, guest);
            let effective = st.rate_for(payer, rate);
            let bid = crate::market::Bid {
                payer: payer.clone(),
                rate: effective,
            };
            st.auction
                .bid(guest, bid)
                .map_err(|e| EnvError::Bid(guest.clone(), e.to_string()))?;
            if let Some(a) = st.asked.get_mut(guest) {
                a.rate = rate;
            }
        }
        if !guests.is_empty() {
            self.reweigh(&st.auction);
        }
        Ok(guests.len())
    }

    /// The bank says `broke` (of this node's payers) have no credit left: their guests bid
    /// [`FLOOR_RATE`], the others what they asked (time before a change is charged at the
    /// rate before it).
    pub(crate) fn set_broke(&self, broke: Vec<String>) {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        st.broke = broke.into_iter().collect();
        let changes: Vec<(String, String, u64)> = st
            .asked
            .iter()
            .filter_map(|(g, a)| {
                let want = st.rate_for(&a.payer, a.rate);
                (st.auction.rate(g) != Some(want)).then(|| (g.clone(), a.payer.clone(), want))
            })
            .collect();
        if changes.is_empty() {
            return;
        }
        for (guest, payer, rate) in changes {
            self.meter_into(st, &guest);
            if let Err(e) = st.auction.bid(&guest, crate::market::Bid { payer, rate }) {
                tracing::warn!(%guest, "changing a bid for the payer's credit: {e}");
            }
        }
        self.reweigh(&st.auction);
    }
}

/// What guest `guest` (having used `cpu` CPU seconds in all) owes since its last charge, as a
/// line of a charge batch.
fn charge_line(st: &mut MarketState, guest: &str, cpu: f64) -> Option<crate::proto::ChargeLine> {
    let c = st.auction.meter(guest, cpu)?;
    let job = st.asked.get(guest)?.job.clone();
    Some(crate::proto::ChargeLine {
        job,
        payer: c.payer,
        rate: c.rate,
        cpu_us: (c.cpu_secs * 1e6).round() as u64,
        micro: c.micro,
    })
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
        let name = lease.guest().name;
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

/// A job's hold on its guest; released when dropped (kept, saved or torn down by its mode).
pub(crate) struct EnvLease {
    envs: Arc<Environments>,
    monitor: Arc<Monitor>,
    /// The pool the guest came from, and its template's key, when it was a warm guest.
    warm: Option<(Arc<Warm>, String)>,
    lease: Option<Lease>,
    /// The guest's agent, when its image runs one.
    agent: Option<AgentAddr>,
    /// The node's auctioneer, when the job bids for the guest's CPU.
    market: Option<Arc<Market>>,
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

/// Serves this node's images to peers that ask (`/mvm/image/1`): the bytes go as they are
/// stored; the receiver keeps them only if they hash to the id it asked for.
pub(crate) async fn serve_images(site: Arc<crate::site::Site>, os: Arc<NodeOs>) {
    use futures::{AsyncWriteExt, StreamExt};
    use tokio_util::compat::TokioAsyncReadCompatExt;

    let mut incoming = match site.net.accept(crate::proto::IMAGE_PROTOCOL) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "image requests are not accepted");
            return;
        }
    };
    // Transfers under way: ended with this task.
    let mut sending = tokio::task::JoinSet::new();
    while let Some((peer, who, mut stream)) = incoming.next().await {
        while sending.try_join_next().is_some() {}
        let os = os.clone();
        let site = site.clone();
        sending.spawn(async move {
            let req = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                crate::proto::read_frame::<crate::proto::ImageRequest, _>(
                    &mut stream,
                    crate::proto::MAX_HEADER,
                ),
            )
            .await;
            let Ok(Ok(req)) = req else {
                tracing::warn!(%peer, "no image request");
                return;
            };
            let allowed = site
                .policies
                .current()
                .engine
                .decide(&mvm_component::policy::Question {
                    actor: who.clone(),
                    action: "use-image".into(),
                    resource: mvm_component::policy::Resource::Image(
                        mvm_component::policy::Image {
                            id: req.id.to_string(),
                            domain: site.domain.clone(),
                        },
                    ),
                })
                .into_result();
            let refused = allowed.is_err();
            let found = allowed.and_then(|()| os.repo.get(&req.id).map_err(|e| e.to_string()));
            let header = crate::proto::ImageHeader {
                image: found
                    .as_ref()
                    .map(|i| (i.metadata.clone(), i.size))
                    .map_err(Clone::clone),
                refused,
            };
            if crate::proto::write_frame(&mut stream, &header, crate::proto::MAX_HEADER)
                .await
                .is_err()
            {
                return;
            }
            if let Ok(image) = found {
                let sent = async {
                    let f = tokio::fs::File::open(&image.path).await?;
                    futures::io::copy(&mut f.compat(), &mut stream).await?;
                    stream.close().await
                }
                .await;
                if let Err(e) = sent {
                    tracing::warn!(%peer, image = %req.id, "sending the image: {e}");
                } else {
                    tracing::info!(%peer, image = %req.id, bytes = image.size, "image sent");
                }
            }
        });
    }
}
