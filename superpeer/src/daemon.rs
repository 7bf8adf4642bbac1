//! An MVM daemon: a node, a super-peer (broker), or both, on one libp2p swarm.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use mvm_component::runtime::{Runtime, RuntimeConfig, RuntimeError};
use mvm_queue::Controller;
use mvm_queue::codec::Registry;
use mvm_queue::controller::Limits as QueueLimits;
use tokio::sync::mpsc;

use crate::broker::Broker;
use crate::environment::{EnvError, NodeOs, OsConfig};
use crate::joblog::{JobLog, LogConfig, LogError, Replica};
use crate::modules::ModuleStore;
use crate::net::{AddrError, Inbound, Net, NetConfig, StartError};
use crate::node::{Node, NodeConfig};
use crate::pki::Credentials;
use crate::policy::{Policies, PolicyError, PolicySource};
use crate::site::{Local, Site};

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
    /// How remote channels to other nodes travel ([`crate::links`]): over direct links that
    /// the vertices read and write themselves, sealed (the default) or plain, agreed over
    /// libp2p with a one-time secret, when the other node takes them; or over libp2p streams.
    pub links: crate::Links,
    /// Where to serve Prometheus metrics (`GET /metrics`; see [`crate::metrics`]).
    pub metrics: Option<std::net::SocketAddr>,
    /// Where a super-peer serves its live web view (see `mvm web`).
    pub http: Option<std::net::SocketAddr>,
    /// A super-peer's triggers ([`crate::trigger`]), asked while it leads.
    pub triggers: Vec<crate::trigger::Trigger>,
    /// The domain's CA, for a super-peer whose triggers make guests: it issues the identities
    /// of the nodes in them.
    pub issuer: Option<Arc<crate::pki::Ca>>,
    /// The node whose guest this node runs in (set by that node when a trigger made it).
    pub guest_of: Option<PeerId>,
    /// A revocation list's file to hold (the domain's CA directory's `ca.crl`, which
    /// `mvm ca revoke` writes; it need not exist yet): re-read, and handed to the daemons that
    /// ask ([`crate::revocation`]). None: the lists are fetched from the super-peer.
    pub crl: Option<PathBuf>,
    /// A super-peer's bound on the bytes of files each user, or other domain's peer, may hold
    /// at it that no job names yet (inputs sent before the job that names them). Every put
    /// must also leave [`crate::files::DISK_RESERVE`] free on the disk.
    pub files_quota: u64,
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
            links: crate::links::Links::default(),
            metrics: None,
            http: None,
            triggers: Vec::new(),
            issuer: None,
            guest_of: None,
            crl: None,
            files_quota: crate::files::DEFAULT_QUOTA,
        }
    }
}

/// Why a daemon does not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The certificate is of another domain than the one configured.
    #[error("the certificate is of domain {cert}, not {config}")]
    Domain {
        /// The certificate's domain.
        cert: String,
        /// The configured domain.
        config: String,
    },
    /// The policies do not load.
    #[error(transparent)]
    Policies(#[from] PolicyError),
    /// The OS layer's directory cannot be opened.
    #[error("{}: {error}", .dir.display())]
    Os {
        /// The directory.
        dir: PathBuf,
        /// Why.
        error: EnvError,
    },
    /// A node without a super-peer to join.
    #[error("a node needs a super-peer address (--bootstrap)")]
    NoBootstrap,
    /// A bootstrap or replica address that is not a peer's.
    #[error(transparent)]
    Address(#[from] AddrError),
    /// The WebAssembly runtime cannot be made.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The network cannot be started.
    #[error(transparent)]
    Net(#[from] StartError),
    /// No directory can be made for the job log or jobs' files.
    #[error("a directory for the job log or jobs' files: {0}")]
    Scratch(std::io::Error),
    /// The job log cannot be opened or started.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The metrics listener cannot be bound.
    #[error("cannot serve metrics on {addr}: {error}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// The web view's listener cannot be bound.
    #[error("cannot serve the web view on {addr}: {error}")]
    Http {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// Only a super-peer serves a web view.
    #[error("only a super-peer serves a web view (--http)")]
    HttpOnSuperpeers,
    /// The direct-link listener cannot be bound.
    #[error("cannot listen for direct links on {ip}: {error}")]
    Links {
        /// The address.
        ip: std::net::IpAddr,
        /// Why.
        error: std::io::Error,
    },
}

/// A running daemon.
pub struct Daemon {
    router: Arc<Router>,
    inbound: mpsc::Receiver<Inbound>,
    /// Other groups' super-peers to exchange summaries with.
    peers: Vec<String>,
    /// The revocation list's file it holds, if any.
    crl: Option<PathBuf>,
    /// The job log's directory when none was given (removed with the daemon).
    _scratch: Option<tempfile::TempDir>,
    /// The metrics listener, when it serves metrics.
    metrics: Option<tokio::net::TcpListener>,
    /// The web view's listener, when it serves one.
    http: Option<tokio::net::TcpListener>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("peer", &self.router.site.peer())
            .field("name", &self.router.site.name)
            .field("group", &self.router.site.group)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Starts the swarm and the roles; call [`Daemon::run`] to serve.
    ///
    /// # Errors
    /// The network, the runtime, or a bootstrap address cannot be set up.
    pub async fn start(creds: &Credentials, config: DaemonConfig) -> Result<Daemon, DaemonError> {
        if creds.principal.domain != config.domain {
            return Err(DaemonError::Domain {
                cert: creds.principal.domain.clone(),
                config: config.domain.clone(),
            });
        }
        let policies = Policies::open(config.policies.clone(), &config.domain)?;
        let os = match &config.os {
            Some(c) if config.slots > 0 => {
                let os = NodeOs::open(c).map_err(|error| DaemonError::Os {
                    dir: c.dir.clone(),
                    error,
                })?;
                Some(Arc::new(os))
            }
            _ => None,
        };
        let bootstrap = config
            .bootstrap
            .iter()
            .map(|b| crate::net::split_peer(b).map_err(DaemonError::Address))
            .collect::<Result<Vec<_>, _>>()?;
        let superpeer = match (config.broker, bootstrap.first()) {
            (true, _) => None,
            (false, None) => return Err(DaemonError::NoBootstrap),
            (false, Some((peer, addr))) => Some((*peer, vec![addr.clone()])),
        };
        let runtime = if config.slots > 0 {
            Some(Runtime::new(&RuntimeConfig {
                cache_dir: config.cache_dir.clone(),
                max_instances: config.slots,
                ..RuntimeConfig::default()
            })?)
        } else {
            None
        };
        let (net, inbound) = Net::start(creds, &config.net)
            .await
            .map_err(DaemonError::Net)?;
        let site = Arc::new(Site::new(
            net.clone(),
            policies,
            config.name.clone(),
            config.group.clone(),
            config.domain.clone(),
            config.heartbeat,
            config.lost_after,
        ));
        let codecs = Arc::new(Registry::new());
        // Without a state directory, what the daemon keeps goes with it.
        let (base, scratch) = match &config.state_dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::tempdir().map_err(DaemonError::Scratch)?;
                (t.path().to_owned(), Some(t))
            }
        };
        let broker = if config.broker {
            let dir = base.join("joblog");
            let log = JobLog::open(&dir, net.clone(), &LogConfig::default()).await?;
            let mut replicas = vec![Replica::new(net.peer(), net.addrs())];
            for r in &config.replicas {
                let (peer, addr) = crate::net::split_peer(r).map_err(DaemonError::Address)?;
                if peer != net.peer() {
                    replicas.push(Replica::new(peer, &[addr]));
                }
            }
            log.expect(&replicas)?;
            // One replica starts a new log (the lowest peer id), so that the others do not all
            // stand for election at once; the others start it themselves only if it has not
            // reached them after a while (it may be down). A log that exists is kept.
            let founder = replicas.iter().filter_map(|r| r.peer_id().ok()).min();
            let founders = if founder == Some(net.peer()) {
                log.initialize(&replicas).await?;
                None
            } else {
                Some(replicas)
            };
            let modules = ModuleStore::new(config.module_dir.clone());
            let blobs = ModuleStore::new(
                config
                    .module_dir
                    .as_ref()
                    .map(|d| d.with_file_name("checkpoints")),
            );
            let files =
                crate::files::FileStore::open(&base.join("files")).map_err(DaemonError::Scratch)?;
            Some(Arc::new(
                Broker::new(
                    site.clone(),
                    codecs.clone(),
                    log,
                    [modules, blobs],
                    Arc::new(files),
                    founders,
                    crate::broker::triggers::Triggering::new(
                        config.triggers.clone(),
                        config.issuer.clone(),
                    ),
                )
                .with_files_quota(config.files_quota),
            ))
        } else {
            None
        };
        let queues = Controller::new(QueueLimits::default(), codecs);
        // A node's input files, kept for its next jobs; sandboxes a crash left go.
        let files = if config.slots > 0 {
            let _ = std::fs::remove_dir_all(base.join("sandboxes"));
            let store = crate::files::FileStore::open(&base.join("node-files"))
                .map_err(DaemonError::Scratch)?;
            Some(Arc::new(store))
        } else {
            None
        };
        let links = if config.links != crate::links::Links::Streams && config.slots > 0 {
            let ip = crate::links::listen_ip(&config.net.listen);
            let plain = config.links == crate::links::Links::Plain;
            Some(
                crate::links::Listener::start(ip, plain)
                    .await
                    .map_err(|error| DaemonError::Links { ip, error })?,
            )
        } else {
            None
        };
        // A super-peer that runs vertices registers with itself.
        let superpeer = if config.broker && config.slots > 0 {
            Some((net.peer(), Vec::new()))
        } else {
            superpeer
        };
        let node = Arc::new(Node::new(
            site.clone(),
            NodeConfig {
                slots: config.slots,
                eligible: config.broker,
                images: config.images.clone(),
                bootstrap,
                disk: config
                    .os
                    .as_ref()
                    .map(|o| o.dir.clone())
                    .or_else(|| config.state_dir.clone())
                    .or_else(|| config.cache_dir.clone())
                    .unwrap_or_else(|| "/".into()),
                guest_of: config.guest_of,
                files,
                sandboxes: base.join("sandboxes"),
            },
            runtime,
            queues,
            os,
            links,
            superpeer,
        ));
        let metrics = match config.metrics {
            Some(addr) => Some(
                crate::metrics::bind(addr)
                    .await
                    .map_err(|error| DaemonError::Metrics { addr, error })?,
            ),
            None => None,
        };
        let http = match config.http {
            Some(_) if broker.is_none() => return Err(DaemonError::HttpOnSuperpeers),
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|error| DaemonError::Http { addr, error })?,
            ),
            None => None,
        };
        let router = Arc::new(Router { site, node, broker });
        let local: Arc<dyn Local> = router.clone();
        router.site.route_to(Arc::downgrade(&local));
        Ok(Daemon {
            router,
            inbound,
            peers: config.peers,
            crl: config.crl,
            _scratch: scratch,
            metrics,
            http,
        })
    }

    /// Where it serves its web view, when it does.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where it serves metrics, when it does.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The daemon's peer id.
    pub fn peer(&self) -> PeerId {
        self.router.site.peer()
    }

    /// Its addresses with `/p2p/PEER`.
    pub fn dial_addrs(&self) -> Vec<Multiaddr> {
        self.router.site.net.dial_addrs()
    }

    /// Its network handle. A handle kept after [`Daemon::run`] has ended keeps the swarm (and
    /// its sockets) open: drop it with the daemon.
    pub fn net(&self) -> Net {
        self.router.site.net.clone()
    }

    /// Serves until `shutdown` completes, then ends every job held.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        let router = self.router.clone();
        let (site, node) = (router.site.clone(), router.node.clone());
        let mut background = tokio::task::JoinSet::new();
        background.spawn(node.clone().run());
        background.spawn(node.clone().accept_streams());
        if let Some(os) = node.os() {
            background.spawn(crate::environment::serve_images(site.clone(), os.clone()));
            background.spawn(crate::environment::keep_warm(os.clone()));
            if let Some(deaths) = os.deaths() {
                background.spawn(node.clone().watch_guests(deaths));
            }
        }
        if node.runs_vertices() {
            background.spawn(node.clone().follow());
            background.spawn(node.clone().monitor());
        }
        if let Some(b) = &router.broker {
            background.spawn(b.clone().run(std::mem::take(&mut self.peers)));
        }
        // The inputs a node holds, to the other nodes of its domain (a super-peer that runs
        // vertices serves the group's files instead, from its own store).
        if let (Some(store), None) = (node.files(), &router.broker) {
            let access = crate::files::NodeFiles {
                domain: site.domain.clone(),
                store: store.clone(),
            };
            background.spawn(crate::files::serve(
                site.net.clone(),
                store.clone(),
                Arc::new(access),
            ));
        }
        if let (Some(listener), Some(b)) = (self.http.take(), &router.broker) {
            background.spawn(crate::broker::web::serve(listener, b.clone()));
        }
        if let Some(listener) = self.metrics.take() {
            let registry = crate::metrics::registry(crate::metrics::Sources {
                node: node.clone(),
                broker: router.broker.clone(),
            });
            background.spawn(crate::metrics::serve(listener, Arc::new(registry)));
        }
        let follower = node.clone();
        background.spawn(crate::policy::sync(site.clone(), move || {
            follower.superpeer()
        }));
        let follower = node.clone();
        let broker = router.broker.clone();
        background.spawn(crate::revocation::sync(
            site.clone(),
            self.crl.clone(),
            move || follower.superpeer(),
            move |crls| {
                if let Some(b) = broker.clone() {
                    tokio::spawn(async move { b.revoked(&crls).await });
                }
            },
        ));
        let mut handlers = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                inbound = self.inbound.recv() => match inbound {
                    Some(i) => {
                        let router = router.clone();
                        handlers.spawn(async move {
                            let response =
                                router.route(i.peer, &i.principal, i.request.clone()).await;
                            i.reply(response).await;
                        });
                    }
                    None => break,
                },
                Some(_) = handlers.join_next(), if !handlers.is_empty() => {}
            }
        }
        handlers.abort_all();
        background.abort_all();
        node.terminate_all();
        node.shrink_all().await;
        if let Some(b) = &router.broker {
            b.log.shutdown().await;
        }
        if let Some(os) = node.os().cloned() {
            // Guests kept between jobs go with the node.
            let _ = tokio::task::spawn_blocking(move || os.shutdown()).await;
        }
    }
}

#[path = "daemon_router.rs"]
mod router;

use router::Router;
