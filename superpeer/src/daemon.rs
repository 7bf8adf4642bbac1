//! An MVM daemon: a node, a super-peer (broker), or both, on one libp2p swarm.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use mvm_component::policy::Principal;
use mvm_component::runtime::{Runtime, RuntimeConfig};
use mvm_queue::Controller;
use mvm_queue::codec::Registry;
use mvm_queue::controller::Limits as QueueLimits;
use parking_lot::{Mutex, RwLock};
use tokio::sync::mpsc;

use crate::broker::Broker;
use crate::environment::{NodeOs, OsConfig};
use crate::joblog::{JobLog, LogConfig, Replica};
use crate::modules::ModuleStore;
use crate::net::{Inbound, Net, NetConfig};
use crate::node::{self, NodeRole};
use crate::pki::Credentials;
use crate::policy::{Policies, PolicySource};
use crate::proto::{
    Failure, FailureKind, GroupInfo, Member, NodeInfo, NodeLoad, Request, Response,
};

/// How a daemon runs.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Its name (for people; the peer id is the identity).
    pub name: String,
    /// Its group.
    pub group: String,
    /// Its domain (its certificate's; a different one here is an error at start).
    pub domain: String,
    /// Where its policies come from.
    pub policies: PolicySource,
    /// Whether it starts as the group's super-peer (broker).
    pub broker: bool,
    /// Super-peer addresses (`/…/p2p/PEER`) to register with, the group's candidates (any of
    /// them leads to the one that leads); ignored by a super-peer.
    pub bootstrap: Vec<String>,
    /// Vertex slots (0: runs no vertices, e.g. a pure super-peer).
    pub slots: u32,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Silence after which a node is lost.
    pub lost_after: Duration,
    /// Compiled-module cache.
    pub cache_dir: Option<PathBuf>,
    /// Where a super-peer keeps module bytes.
    pub module_dir: Option<PathBuf>,
    /// Image ids this node offers.
    pub images: Vec<String>,
    /// Other super-peers to know (`/…/p2p/PEER`): group summaries are exchanged with them.
    pub peers: Vec<String>,
    /// The network.
    pub net: NetConfig,
    /// The OS layer: the driver and directory of guests for jobs that name an image (none:
    /// jobs run on the host as it is, and only the image `host` is offered).
    pub os: Option<OsConfig>,
    /// Where a super-peer keeps its replica of the group's job log (none: a temporary
    /// directory, gone with the daemon).
    pub state_dir: Option<PathBuf>,
    /// The group's other super-peer candidates (`/…/p2p/PEER`): with this one, the replicas of
    /// the group's job log, one of which leads it and is the broker. None: a group of one.
    pub replicas: Vec<String>,
    /// Carry remote channels over direct links (plain TCP read and written by the vertices,
    /// agreed over libp2p with a one-time token; see [`crate::links`]) when the other node
    /// does too; otherwise over libp2p streams (encrypted). For trusted networks.
    pub direct_links: bool,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            name: "node".into(),
            group: "default".into(),
            domain: "default".into(),
            policies: PolicySource::Default,
            broker: false,
            bootstrap: Vec::new(),
            slots: 1024,
            heartbeat: Duration::from_millis(500),
            lost_after: Duration::from_secs(3),
            cache_dir: None,
            module_dir: None,
            images: vec!["host".into()],
            peers: Vec::new(),
            net: NetConfig::default(),
            os: None,
            state_dir: None,
            replicas: Vec::new(),
            direct_links: false,
        }
    }
}

/// What every part of a daemon shares.
pub(crate) struct Shared {
    pub(crate) net: Net,
    pub(crate) config: DaemonConfig,
    pub(crate) node: NodeRole,
    /// The broker, on a super-peer (it acts while its replica leads the job log).
    pub(crate) broker: Option<Arc<Broker>>,
    /// The super-peer this node registers with.
    pub(crate) superpeer: RwLock<Option<(PeerId, Vec<Multiaddr>)>>,
    /// The group's members as last heard from the super-peer.
    pub(crate) members: Mutex<Vec<Member>>,
    /// The OS layer, when configured.
    pub(crate) os: Option<Arc<NodeOs>>,
    /// The policies in force.
    pub(crate) policies: Policies,
    /// The direct-link listener, when direct links are on.
    pub(crate) links: Option<Arc<crate::links::Listener>>,
    /// The job log's directory when none was given (removed with the daemon).
    _scratch: Option<tempfile::TempDir>,
}

impl Shared {
    /// Sends a control request to `peer`, or handles it here when `peer` is this daemon (a
    /// super-peer that also runs vertices talks to itself without the network).
    pub(crate) async fn call(
        self: &Arc<Self>,
        peer: PeerId,
        addrs: &[Multiaddr],
        request: Request,
    ) -> Result<Response, Failure> {
        if peer == self.net.peer() {
            let me = self.net.principal().clone();
            match Box::pin(handle(self, peer, &me, request)).await {
                Response::Error(f) => Err(f),
                r => Ok(r),
            }
        } else {
            self.net.call(peer, addrs, request).await
        }
    }
}

/// A running daemon.
pub struct Daemon {
    shared: Arc<Shared>,
    inbound: mpsc::Receiver<Inbound>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("peer", &self.shared.net.peer())
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Starts the swarm and the roles; call [`Daemon::run`] to serve.
    ///
    /// # Errors
    /// The network, the runtime, or a bootstrap address cannot be set up.
    pub async fn start(creds: &Credentials, config: DaemonConfig) -> Result<Daemon, String> {
        if creds.principal.domain != config.domain {
            return Err(format!(
                "the certificate is of domain {}, not {}",
                creds.principal.domain, config.domain
            ));
        }
        let policies = Policies::open(config.policies.clone(), &config.domain)?;
        let os = match &config.os {
            Some(c) if config.slots > 0 => {
                let os = NodeOs::open(c).map_err(|e| format!("{}: {e}", c.dir.display()))?;
                Some(Arc::new(os))
            }
            _ => None,
        };
        let superpeer = match (config.broker, config.bootstrap.first()) {
            (true, _) => None,
            (false, None) => return Err("a node needs a super-peer address (--bootstrap)".into()),
            (false, Some(_)) => {
                let mut first = None;
                for b in &config.bootstrap {
                    let (peer, addr) = crate::net::split_peer(b)?;
                    first.get_or_insert((peer, vec![addr]));
                }
                first
            }
        };
        let runtime = if config.slots > 0 {
            Some(
                Runtime::new(&RuntimeConfig {
                    cache_dir: config.cache_dir.clone(),
                    max_instances: config.slots,
                    ..RuntimeConfig::default()
                })
                .map_err(|e| e.to_string())?,
            )
        } else {
            None
        };
        let (net, inbound) = Net::start(creds, &config.net).await?;
        let mut scratch = None;
        let broker = if config.broker {
            let dir = match &config.state_dir {
                Some(d) => d.join("joblog"),
                None => {
                    let t = tempfile::tempdir()
                        .map_err(|e| format!("a directory for the job log: {e}"))?;
                    let d = t.path().to_owned();
                    scratch = Some(t);
                    d
                }
            };
            let log = JobLog::open(&dir, net.clone(), &LogConfig::default())
                .await
                .map_err(|e| e.to_string())?;
            let mut replicas = vec![Replica::new(net.peer(), net.addrs())];
            for r in &config.replicas {
                let (peer, addr) = crate::net::split_peer(r)?;
                if peer != net.peer() {
                    replicas.push(Replica::new(peer, &[addr]));
                }
            }
            log.expect(&replicas).map_err(|e| e.to_string())?;
            // One replica starts a new log (the lowest peer id), so that the others do not all
            // stand for election at once; the others start it themselves only if it has not
            // reached them after a while (it may be down). A log that exists is kept.
            let founder = replicas.iter().filter_map(|r| r.peer_id().ok()).min();
            let founders = if founder == Some(net.peer()) {
                log.initialize(&replicas).await.map_err(|e| e.to_string())?;
                None
            } else {
                Some(replicas)
            };
            let modules = ModuleStore::new(config.module_dir.clone());
            Some(Arc::new(Broker::new(log, modules, founders)))
        } else {
            None
        };
        let queues = Controller::new(QueueLimits::default(), Arc::new(Registry::new()));
        let links = if config.direct_links && config.slots > 0 {
            let ip = crate::links::listen_ip(&config.net.listen);
            Some(
                crate::links::Listener::start(ip)
                    .await
                    .map_err(|e| format!("cannot listen for direct links on {ip}: {e}"))?,
            )
        } else {
            None
        };
        let shared = Arc::new(Shared {
            links,
            net,
            node: NodeRole::new(runtime, queues),
            broker,
            _scratch: scratch,
            superpeer: RwLock::new(superpeer),
            members: Mutex::new(Vec::new()),
            os,
            policies,
            config,
        });
        Ok(Daemon { shared, inbound })
    }

    /// The daemon's peer id.
    pub fn peer(&self) -> PeerId {
        self.shared.net.peer()
    }

    /// Its addresses with `/p2p/PEER`.
    pub fn dial_addrs(&self) -> Vec<String> {
        self.shared.net.dial_addrs()
    }

    /// Its network handle. A handle kept after [`Daemon::run`] has ended keeps the swarm (and
    /// its sockets) open: drop it with the daemon.
    pub fn net(&self) -> Net {
        self.shared.net.clone()
    }

    /// Serves until `shutdown` completes, then ends every job held.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        let shared = self.shared.clone();
        if shared.config.broker && shared.config.slots > 0 {
            // A super-peer that runs vertices registers with itself.
            *shared.superpeer.write() = Some((shared.net.peer(), Vec::new()));
        }
        let mut background = tokio::task::JoinSet::new();
        background.spawn(node::accept_streams(shared.clone()));
        background.spawn(crate::environment::serve_images(shared.clone()));
        if shared.config.slots > 0 {
            background.spawn(membership(shared.clone()));
        }
        background.spawn(sweeper(shared.clone()));
        background.spawn(gossip(shared.clone()));
        background.spawn(crate::policy::sync(shared.clone()));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                inbound = self.inbound.recv() => match inbound {
                    Some(i) => {
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            let response =
                                handle(&shared, i.peer, &i.principal, i.request.clone()).await;
                            i.reply(response).await;
                        });
                    }
                    None => break,
                },
            }
        }
        background.abort_all();
        node::terminate_all(&shared);
        if let Some(b) = &shared.broker {
            b.shutdown();
            b.log.shutdown().await;
        }
        if let Some(os) = shared.os.clone() {
            // Guests kept between jobs go with the node.
            let _ = tokio::task::spawn_blocking(move || os.shutdown()).await;
        }
    }
}

fn unavailable(m: impl Into<String>) -> Response {
    Response::Error(Failure::new(FailureKind::Unavailable, m))
}

async fn handle(
    shared: &Arc<Shared>,
    peer: PeerId,
    principal: &Principal,
    request: Request,
) -> Response {
    match request {
        Request::Prepare(spec) => {
            if !from_superpeer(shared, peer) {
                return refused(peer);
            }
            node::prepare(shared, peer, *spec).await
        }
        Request::Policy { have } => crate::policy::serve(shared, principal, &have),
        Request::PolicyReload => crate::policy::reload(shared, principal),
        Request::Start { job } => node::start(shared, peer, &job),
        Request::Terminate { job, reason } => node::terminate(shared, peer, &job, &reason),
        Request::Raft(rpc) => match &shared.broker {
            Some(b) => {
                b.log
                    .serve(peer, principal, &shared.config.domain, rpc)
                    .await
            }
            None => unavailable(format!(
                "{} keeps no replica of a job log",
                shared.net.peer()
            )),
        },
        Request::Group => match &shared.broker {
            Some(b) => Response::Group(b.group(shared)),
            None => Response::Group(node_view(shared)),
        },
        other => match &shared.broker {
            Some(b) => b.handle(shared, peer, principal, other).await,
            None => {
                let sp = shared.superpeer.read().clone();
                unavailable(match sp {
                    Some((p, _)) => format!(
                        "{} is not the super-peer of group {}; {p} is",
                        shared.net.peer(),
                        shared.config.group
                    ),
                    None => format!("{} is not a super-peer", shared.net.peer()),
                })
            }
        },
    }
}

fn refused(peer: PeerId) -> Response {
    Response::Error(Failure::new(
        FailureKind::Refused,
        format!("{peer} is not this node's super-peer"),
    ))
}

/// Whether `peer` is a super-peer of this node's group: the one it serves, another replica of
/// the group's job log it has heard of (the leader may have changed since), or this daemon.
pub(crate) fn from_superpeer(shared: &Shared, peer: PeerId) -> bool {
    peer == shared.net.peer()
        || shared
            .superpeer
            .read()
            .as_ref()
            .is_some_and(|(p, _)| *p == peer)
        || shared
            .members
            .lock()
            .iter()
            .any(|m| m.peer == peer.to_string())
}

fn node_view(shared: &Shared) -> GroupInfo {
    let sp = shared.superpeer.read().clone();
    GroupInfo {
        group: shared.config.group.clone(),
        broker: sp.as_ref().map(|(p, _)| p.to_string()),
        broker_addrs: sp
            .map(|(p, a)| {
                a.iter()
                    .map(|a| crate::net::with_peer(a, p).to_string())
                    .collect()
            })
            .unwrap_or_default(),
        is_broker: false,
        nodes: Vec::new(),
        groups: Vec::new(),
    }
}

/// This node's properties now.
fn load(shared: &Shared) -> NodeLoad {
    use mvm_os::probe::{FreeMemory, Load, Probe};
    let interval = shared.config.heartbeat;
    let free = FreeMemory { interval }.sample().unwrap_or(0.0);
    let load = Load { interval }.sample().unwrap_or(0.0);
    NodeLoad {
        free_memory_bytes: free as u64,
        load,
        vertices: shared.node.vertices(),
        images: images(shared),
        jobs: shared.node.job_ids(),
    }
}

/// The image ids this node offers now: the configured ones and its repository's (read again
/// each time, so that an image imported while the node runs is offered).
fn images(shared: &Shared) -> Vec<String> {
    let mut v = shared.config.images.clone();
    if let Some(os) = &shared.os {
        v.extend(os.images());
    }
    v
}

fn info(shared: &Shared) -> NodeInfo {
    let c = &shared.config;
    let load = load(shared);
    NodeInfo {
        name: c.name.clone(),
        group: c.group.clone(),
        domain: c.domain.clone(),
        addrs: shared.net.dial_addrs(),
        cpus: std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(1)),
        memory_bytes: mvm_os::probe::total_memory().unwrap_or(0),
        arch: std::env::consts::ARCH.to_owned(),
        images: load.images.clone(),
        slots: c.slots,
        eligible: c.broker,
        load,
    }
}

/// Registers with the super-peer and sends heartbeats; registers again when the super-peer
/// has forgotten this node. When the super-peer does not lead the group's job log (it says so)
/// or has not answered for `lost_after`, the node looks for the replica that leads now (see
/// [`find_leader`]) and registers there; the parts it runs go on.
async fn membership(shared: Arc<Shared>) {
    let mut registered = false;
    let mut last_answer = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(shared.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let me = shared.net.peer();
    loop {
        tick.tick().await;
        let Some((sp, addrs)) = shared.superpeer.read().clone() else {
            continue;
        };
        let request = if registered {
            Request::Heartbeat(load(&shared))
        } else {
            Request::Register(info(&shared))
        };
        // Any answer, even a refusal, shows the super-peer is alive; silence does not.
        // A request that fails at once (the connection is refused or closed: the process is
        // gone) sends the node looking for the leader now, not after `lost_after`.
        let mut refused = false;
        let answer = if sp == me {
            let principal = shared.net.principal().clone();
            Some(Box::pin(handle(&shared, me, &principal, request)).await)
        } else {
            match tokio::time::timeout(
                shared.config.lost_after,
                shared.net.request(sp, &addrs, request),
            )
            .await
            {
                Ok(Ok(r)) => Some(r),
                Ok(Err(_)) => {
                    refused = true;
                    None
                }
                Err(_) => None,
            }
        };
        let answered = answer.is_some();
        let mut elsewhere = refused && shared.members.lock().len() > 1;
        match answer {
            Some(Response::Registered { members, .. }) => {
                registered = true;
                tracing::info!(superpeer = %sp, "registered");
                *shared.members.lock() = members;
            }
            Some(Response::Heartbeat {
                known,
                members,
                stop,
            }) => {
                registered = known;
                for job in stop {
                    tracing::warn!(%job, "the leader has no such job running; stopping its part");
                    node::terminate(&shared, sp, &job, "unknown to the leader");
                }
                // A replica that does not lead lists the leader first.
                elsewhere = !known && members.first().is_some_and(|m| m.peer != sp.to_string());
                *shared.members.lock() = members;
            }
            Some(Response::Error(f)) if f.kind == FailureKind::Unavailable => {
                registered = false;
                elsewhere = true;
            }
            Some(_) => registered = false,
            None => {
                registered = false;
                tracing::debug!(superpeer = %sp, "super-peer did not answer");
            }
        }
        if answered {
            last_answer = tokio::time::Instant::now();
        }
        if elsewhere || last_answer.elapsed() >= shared.config.lost_after {
            if !elsewhere {
                tracing::warn!(superpeer = %sp, "super-peer lost; looking for the group's leader");
            }
            if let Some(next) = find_leader(&shared).await
                && next.0 != sp
            {
                tracing::info!(superpeer = %next.0, "following the group's leader");
                *shared.superpeer.write() = Some(next);
                registered = false;
                last_answer = tokio::time::Instant::now();
                tick.reset_immediately(); // register there now
            }
        }
    }
}

/// The replica of the group's job log that leads now, as the replicas this node knows of (from
/// the last answers of its super-peer, then its bootstrap addresses) say: the first answer
/// that comes as broker, or names one. All are asked at once, so a replica that is gone and
/// does not refuse the connection costs no more than one `lost_after`.
async fn find_leader(shared: &Arc<Shared>) -> Option<(PeerId, Vec<Multiaddr>)> {
    use futures::StreamExt as _;
    let me = shared.net.peer();
    let mut known: Vec<String> = shared
        .members
        .lock()
        .iter()
        .flat_map(|m| m.addrs.clone())
        .collect();
    known.extend(shared.config.bootstrap.iter().cloned());
    let mut tried = std::collections::HashSet::new();
    let mut probes = futures::stream::FuturesUnordered::new();
    for a in known {
        let Ok((peer, addr)) = crate::net::split_peer(&a) else {
            continue;
        };
        if !tried.insert(peer) {
            continue;
        }
        probes.push(async move {
            let group = if peer == me {
                let principal = shared.net.principal().clone();
                Some(Box::pin(handle(shared, me, &principal, Request::Group)).await)
            } else {
                let at = [addr.clone()];
                let probe = shared.net.request(peer, &at, Request::Group);
                tokio::time::timeout(shared.config.lost_after, probe)
                    .await
                    .ok()
                    .and_then(Result::ok)
            };
            let Some(Response::Group(g)) = group else {
                return None;
            };
            if g.is_broker {
                return Some((peer, vec![addr]));
            }
            let (l, la) = g
                .broker_addrs
                .iter()
                .find_map(|a| crate::net::split_peer(a).ok())?;
            (g.broker.as_deref() == Some(l.to_string().as_str())).then(|| (l, vec![la]))
        });
    }
    while let Some(answer) = probes.next().await {
        if answer.is_some() {
            return answer;
        }
    }
    None
}

/// Super-peers: keep the configured peers connected, publish this group's summary, and take
/// the others'.
async fn gossip(shared: Arc<Shared>) {
    let Some(mut rx) = shared.net.take_gossip() else {
        return;
    };
    let peers: Vec<(PeerId, Multiaddr)> = shared
        .config
        .peers
        .iter()
        .filter_map(|p| match crate::net::split_peer(p) {
            Ok(x) => Some(x),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a super-peer address");
                None
            }
        })
        .collect();
    let mut tick = tokio::time::interval(shared.config.heartbeat * 2);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // Only the leader speaks for the group.
                let Some(b) = shared.broker.as_ref().filter(|b| b.log.is_leader()) else {
                    continue;
                };
                for (peer, addr) in &peers {
                    shared.net.dial(*peer, vec![addr.clone()]).await;
                    // Summaries count only from super-peers whose certificates have passed.
                    if shared.net.identity(peer).is_none() {
                        let net = shared.net.clone();
                        let (peer, addr) = (*peer, addr.clone());
                        tokio::spawn(async move {
                            if let Err(e) = net.authenticate(peer, &[addr]).await {
                                tracing::warn!(%peer, error = %e, "a super-peer is not authenticated");
                            }
                        });
                    }
                }
                let summary = b.summary(&shared);
                let mut data = Vec::new();
                if ciborium::into_writer(&summary, &mut data).is_ok() {
                    shared.net.publish(crate::net::GROUPS_TOPIC, data).await;
                }
            }
            msg = rx.recv() => {
                let Some(msg) = msg else { return };
                if msg.topic != crate::net::GROUPS_TOPIC {
                    continue;
                }
                let summary: Result<crate::proto::GroupSummary, _> =
                    ciborium::from_reader(msg.data.as_slice());
                match summary {
                    // Only from a super-peer whose certificate has passed, about its own
                    // domain.
                    Ok(s) if s.validate().is_ok()
                        && msg.source.map(|p| p.to_string()) == Some(s.broker.clone())
                        && msg.source.and_then(|p| shared.net.identity(&p)).is_some_and(|id| {
                            id.kind == mvm_component::policy::PrincipalKind::Node
                                && id.domain == s.domain
                        }) =>
                    {
                        if let Some(b) = &shared.broker {
                            b.learn(&shared, s);
                        }
                    }
                    _ => tracing::debug!(source = ?msg.source, "ignoring a bad group summary"),
                }
            }
        }
    }
}

/// The broker's tick: a change of leader, and the membership sweep.
async fn sweeper(shared: Arc<Shared>) {
    let Some(b) = shared.broker.clone() else {
        return;
    };
    let mut tick = tokio::time::interval(shared.config.heartbeat);
    loop {
        tick.tick().await;
        b.tick(&shared, shared.config.lost_after).await;
    }
}
