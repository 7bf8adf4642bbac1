//! The node role: holds no job state until the broker wakes it with a part to prepare, then
//! runs that part (compiling modules it lacks after fetching them from the broker), carries
//! its remote channels over libp2p streams, reports, and removes everything on termination.
//!
//! Its parts are a state machine ([`parts::Parts`]) owned by one loop (`Node::run`, in `run`),
//! the only place that starts their work; the broker's requests become its inputs.
//!
//! - `parts`: the machine; `prepare`: preparing a part; `run`: the loop, running a part and
//!   reporting it; `checkpoint`: a running part's checkpoint.
//! - `follow`: following the group's super-peer (a machine of its own).
//! - `streams`: remote channels.

use std::sync::Arc;

use libp2p::{Multiaddr, PeerId};
use mvm_component::policy::NodePolicy;
use mvm_component::runtime::Runtime;
use mvm_queue::Controller;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::environment::NodeOs;
use crate::proto::{BrokerRequest, Failure, FailureKind, Hash, JobId, Member, Response};
use crate::site::Site;

mod charges;
mod checkpoint;
mod follow;
mod grow;
mod guests;
mod logs;
pub(crate) mod monitor;
mod moves;
mod part;
mod parts;
mod prepare;
mod run;
mod streams;
mod supervise;

/// What the node's loop takes.
enum Msg {
    /// An input of its parts.
    Input(parts::Input),
    /// A task of `job`'s (the import of a queue stream into that input), ended with it.
    Attach(JobId, parts::InputKey, AbortHandle),
}

/// The inputs queued for the node's loop at most; more wait (backpressure on requests).
const INPUTS: usize = 4096;

/// How one remote channel ended, or why it failed.
type LinkResult = Result<LinkDone, ChannelError>;

/// Why a remote channel failed: the channel (its vertex and port, and the peer at its other
/// end) and what went wrong.
#[derive(Debug, thiserror::Error)]
#[error("channel {} {vertex}:{port} {} {peer}: {problem}", if *out { "to" } else { "into" }, if *out { "on" } else { "from" })]
pub(crate) struct ChannelError {
    /// The destination vertex.
    vertex: String,
    /// Its input port.
    port: String,
    /// The peer at the other end.
    peer: PeerId,
    /// Whether this node sends (rather than receives) on it.
    out: bool,
    /// What went wrong.
    problem: LinkProblem,
}

/// What went wrong on a remote channel.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkProblem {
    /// The peer's certificate did not pass.
    #[error("{0}")]
    Authenticate(crate::net::NetError),
    /// No stream could be opened (after retries).
    #[error("cannot open a stream: {0}")]
    Open(String),
    /// The stream broke before the acceptor's acknowledgement.
    #[error("the stream broke before it was acknowledged: {0}")]
    Handshake(std::io::Error),
    /// No acknowledgement came in time.
    #[error("no acknowledgement within {0:?}")]
    NoAck(std::time::Duration),
    /// The acceptor expects no such channel.
    #[error("the other node expects no such channel in job {job}")]
    Unexpected {
        /// The job.
        job: JobId,
    },
    /// The direct link did not connect in time.
    #[error("the direct link was not connected within {0:?}")]
    NotConnected(std::time::Duration),
    /// The direct-link listener went away.
    #[error("the direct link listener went away")]
    ListenerGone,
    /// Items did not get through.
    #[error("{0}")]
    Transfer(String),
}

/// A remote channel that ended well.
struct LinkDone {
    /// The destination vertex and its input port.
    vertex: String,
    port: String,
    /// Whether this node sent (its outbox) rather than received.
    out: bool,
    /// Whether it went over a direct link rather than a libp2p stream.
    direct: bool,
    /// Whether that direct link was sealed.
    sealed: bool,
    items: u64,
    bytes: u64,
}

impl LinkDone {
    /// Whether it is the channel into queue `name` (`vertex:port`).
    fn feeds(&self, name: &str) -> bool {
        name.len() == self.vertex.len() + 1 + self.port.len()
            && name.starts_with(self.vertex.as_str())
            && name.ends_with(self.port.as_str())
    }
}

/// A node's part of the daemon: its jobs, its runtime and queues, its guests, and the
/// super-peer it follows.
pub(crate) struct Node {
    site: Arc<Site>,
    config: NodeConfig,
    /// None on a daemon that runs no vertices.
    runtime: Option<Runtime>,
    pub(crate) queues: Controller,
    /// The parts held, as the rest of the node sees them.
    held: Arc<parts::Held>,
    /// To the node's loop, which owns its parts.
    inputs: mpsc::Sender<Msg>,
    /// The parts and the loop's end of `inputs`, until the loop takes them.
    parked: Mutex<Option<(parts::Parts, mpsc::Receiver<Msg>)>>,
    /// The OS layer, when configured.
    os: Option<Arc<NodeOs>>,
    /// The direct-link listener, when direct links are on.
    links: Option<Arc<crate::links::Listener>>,
    /// The super-peer this node registers with.
    superpeer: RwLock<Option<(PeerId, Vec<Multiaddr>)>>,
    /// The group's members as last heard from the super-peer.
    members: Mutex<Vec<Member>>,
    /// The logs of the parts running here.
    logs: logs::Shelf,
    /// Its probes' samples not yet sent to the super-peer.
    probes: monitor::Fresh,
    /// The guests made here for triggers, each running a node of the group.
    grown: grow::GrownGuests,
    /// Charges for bidding guests' CPU time the bank has not taken yet.
    charges: Mutex<charges::Charges>,
}

/// How a node is set up.
#[derive(Debug, Clone)]
pub(crate) struct NodeConfig {
    /// Vertex slots.
    pub(crate) slots: u32,
    /// Whether it may be elected super-peer (it is a candidate).
    pub(crate) eligible: bool,
    /// The image ids offered besides its repository's.
    pub(crate) images: Vec<String>,
    /// Super-peers to register with, and their addresses.
    pub(crate) bootstrap: Vec<(PeerId, Multiaddr)>,
    /// The directory whose file system the `free_disk` probe measures.
    pub(crate) disk: std::path::PathBuf,
    /// The node whose guest this node runs in, when a trigger made it.
    pub(crate) guest_of: Option<PeerId>,
    /// Jobs' input files fetched here, by hash (none on a daemon that runs no vertices).
    pub(crate) files: Option<Arc<crate::files::FileStore>>,
    /// Where parts' sandboxes go (a directory per part, one per vertex in it).
    pub(crate) sandboxes: std::path::PathBuf,
}

impl Node {
    /// A node that follows `superpeer` (none on a super-peer that runs no vertices).
    pub(crate) fn new(
        site: Arc<Site>,
        config: NodeConfig,
        runtime: Option<Runtime>,
        queues: Controller,
        os: Option<Arc<NodeOs>>,
        links: Option<Arc<crate::links::Listener>>,
        superpeer: Option<(PeerId, Vec<Multiaddr>)>,
    ) -> Node {
        let held = Arc::new(parts::Held::default());
        let (inputs, rx) = mpsc::channel(INPUTS);
        Node {
            site,
            config,
            runtime,
            queues,
            parked: Mutex::new(Some((parts::Parts::new(held.clone()), rx))),
            held,
            inputs,
            os,
            links,
            superpeer: RwLock::new(superpeer),
            members: Mutex::new(Vec::new()),
            logs: logs::Shelf::default(),
            probes: monitor::Fresh::default(),
            grown: grow::GrownGuests::default(),
            charges: Mutex::new(charges::Charges::new(crate::joblog::state::now_ms())),
        }
    }

    /// Vertices of the jobs held now.
    pub(crate) fn vertices(&self) -> u32 {
        self.held.vertices()
    }

    /// The jobs whose parts are held now.
    pub(crate) fn job_ids(&self) -> Vec<JobId> {
        self.held.jobs()
    }

    /// Gives the node's loop an input made with the reply channel, and waits for the answer.
    async fn ask(&self, input: impl FnOnce(parts::Reply) -> parts::Input) -> Response {
        let (tx, rx) = oneshot::channel();
        if self.inputs.send(Msg::Input(input(tx))).await.is_err() {
            return fail(FailureKind::Unavailable, "this node is stopping");
        }
        rx.await.unwrap_or_else(|_| {
            fail(
                FailureKind::Unavailable,
                "the node stopped before it answered",
            )
        })
    }

    /// The super-peer this node follows now.
    pub(crate) fn superpeer(&self) -> Option<(PeerId, Vec<Multiaddr>)> {
        self.superpeer.read().clone()
    }

    /// Answers the group's broker.
    pub(crate) async fn handle(self: &Arc<Self>, from: PeerId, request: BrokerRequest) -> Response {
        // Only a super-peer of the group prepares, saves or moves a part; a start or an end is
        // checked by the part itself (the broker that placed it may also ask).
        let placer_only = !matches!(
            request,
            BrokerRequest::Start { .. } | BrokerRequest::Terminate { .. }
        );
        if placer_only && !self.is_superpeer(from) {
            return fail(
                FailureKind::Refused,
                format!("{from} is not this node's super-peer"),
            );
        }
        match request {
            BrokerRequest::Prepare(spec) => {
                if self.runtime.is_none() {
                    return fail(FailureKind::Unavailable, "this daemon runs no vertices");
                }
                self.ask(|reply| parts::Input::Prepare { from, spec, reply })
                    .await
            }
            BrokerRequest::Start { job, attempt } => {
                let superpeer = self.is_superpeer(from);
                self.ask(|reply| parts::Input::Start {
                    from,
                    superpeer,
                    job,
                    attempt,
                    reply,
                })
                .await
            }
            BrokerRequest::Checkpoint {
                job,
                attempt,
                cut,
                within_ms,
            } => {
                self.ask(|reply| parts::Input::Checkpoint {
                    from,
                    job,
                    attempt,
                    cut,
                    within_ms,
                    reply,
                })
                .await
            }
            BrokerRequest::ReleaseCut { job, attempt, cut } => {
                self.ask(|reply| parts::Input::ReleaseCut {
                    job,
                    attempt,
                    cut,
                    reply,
                })
                .await
            }
            BrokerRequest::Move { job, attempt, step } => {
                self.ask(|reply| parts::Input::Move {
                    from,
                    job,
                    attempt,
                    step,
                    reply,
                })
                .await
            }
            BrokerRequest::Grow(spec) => self.grow(*spec).await,
            BrokerRequest::Shrink { name } => self.shrink(&name).await,
            BrokerRequest::Queues { job } => Response::Queues(self.queues_of(&job)),
            BrokerRequest::Bid { job, rate } => {
                let Some(os) = self.os.clone() else {
                    return Response::Ok;
                };
                if let Some(f) = self.under_floor(rate) {
                    return Response::Error(f);
                }
                let changed = tokio::task::spawn_blocking(move || os.market().rebid(&job, rate));
                match changed.await {
                    Ok(Ok(_)) => Response::Ok,
                    Ok(Err(e)) => fail(FailureKind::Input, e.to_string()),
                    Err(e) => fail(FailureKind::Failed, format!("changing a bid: {e}")),
                }
            }
            BrokerRequest::Terminate {
                job,
                attempt,
                reason,
            } => {
                let superpeer = self.is_superpeer(from);
                self.terminate(from, superpeer, job, attempt, reason).await
            }
        }
    }

    /// Ends this node's part of `job`, of run `attempt` or before, for `from` (a super-peer of
    /// the group, if `superpeer`).
    pub(crate) async fn terminate(
        &self,
        from: PeerId,
        superpeer: bool,
        job: JobId,
        attempt: u32,
        reason: String,
    ) -> Response {
        self.ask(|reply| parts::Input::Terminate {
            from,
            superpeer,
            job,
            attempt,
            reason,
            reply,
        })
        .await
    }

    /// Whether it has vertex slots (a super-peer may have none).
    pub(crate) fn runs_vertices(&self) -> bool {
        self.config.slots > 0
    }

    /// Its store of jobs' input files, when it runs vertices.
    pub(crate) fn files(&self) -> Option<&Arc<crate::files::FileStore>> {
        self.config.files.as_ref()
    }

    /// What this node's daemon's roles share.
    pub(crate) fn site(&self) -> &Arc<Site> {
        &self.site
    }

    /// The OS layer, when configured.
    pub(crate) fn os(&self) -> Option<&Arc<NodeOs>> {
        self.os.as_ref()
    }

    /// This node's policy hook, from the policies the broker decided with (fetched from the
    /// super-peer first when this node holds others).
    async fn node_policy(self: &Arc<Self>, digest: &Hash) -> NodePolicy {
        if self.site.policies.current().digest != *digest
            && let Err(e) = crate::policy::fetch_now(&self.site, self.superpeer()).await
        {
            tracing::warn!(error = %e, "policies not refreshed; deciding with the ones held");
        }
        NodePolicy::new(self.site.policies.current().engine.clone(), self.facts())
    }

    /// This node as its policies see it.
    fn facts(&self) -> mvm_component::policy::Node {
        let c = &self.site;
        mvm_component::policy::Node {
            name: c.name.clone(),
            domain: c.domain.clone(),
            roles: self.site.net.principal().roles.clone(),
            group: c.group.clone(),
        }
    }

    /// The refusal of a bid of `rate` under this node's floor price, if it is.
    pub(crate) fn under_floor(&self, rate: u64) -> Option<Failure> {
        let floor = self.floor();
        (rate < floor).then(|| {
            Failure::new(
                FailureKind::Refused,
                format!(
                    "node {}: a bid of {} is under its floor price of {} credits a CPU-second",
                    self.site.name,
                    crate::proto::format_credits(rate),
                    crate::proto::format_credits(floor)
                ),
            )
        })
    }

    /// The least bid this node's market takes now, micro-credits per CPU-second: the highest
    /// `floor_price` its domain's policy gives it (0: none; a price that is no amount of
    /// credits is left out, and said).
    pub(crate) fn floor(&self) -> u64 {
        let prices = match self
            .site
            .policies
            .current()
            .engine
            .floor_prices(&self.facts())
        {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("the floor price: {e}");
                return 0;
            }
        };
        prices
            .iter()
            .filter_map(|p| match crate::proto::parse_credits(p) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!("the floor price: {e}");
                    None
                }
            })
            .max()
            .unwrap_or(0)
    }
}

/// The job and the queue of a queue named `SPACE/QUEUE` (a run's namespace, `JOB~N`, counted as
/// its job; see [`space`]), if it is a job's.
pub(crate) fn job_queue(name: &str) -> Option<(&str, &str)> {
    let (space, queue) = name.split_once('/')?;
    Some((space.split_once('~').map_or(space, |(j, _)| j), queue))
}

/// The queue namespace of run `attempt` of `job` on this node: the job id for its first run,
/// `JOB~N` for run N, so that a run's queues never meet another's.
pub(crate) fn space(job: &JobId, attempt: u32) -> String {
    if attempt == 0 {
        job.to_string()
    } else {
        format!("{job}~{attempt}")
    }
}

fn fail(kind: FailureKind, m: impl Into<String>) -> Response {
    Response::Error(Failure::new(kind, m))
}
