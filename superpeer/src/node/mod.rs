//! The node role: holds no job state until the broker wakes it with a part to prepare, then
//! runs that part (compiling modules it lacks after fetching them from the broker), carries
//! its remote channels over libp2p streams, reports, and removes everything on termination.

use crate::proto::NodeRequest;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use libp2p::{Multiaddr, PeerId};
use mvm_component::policy::NodePolicy;
use mvm_component::runtime::{AllowAll, JobSpec, PolicyHook, Prepared, Runtime};
use mvm_component::topology::{Options, Topology};
use mvm_queue::Controller;
use mvm_queue::queue::Sender;
use parking_lot::{Mutex, RwLock};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::environment::{EnvLease, NodeOs};
use crate::proto::{BrokerRequest, Failure, FailureKind, Member, PartSpec, Request, Response};
use crate::site::Site;

mod follow;
mod run;
mod streams;

/// How one remote channel ended, or why it failed.
type LinkResult = Result<LinkDone, String>;

/// A remote channel that ended well.
struct LinkDone {
    /// The destination vertex and its input port.
    vertex: String,
    port: String,
    /// Whether this node sent (its outbox) rather than received.
    out: bool,
    /// Whether it went over a direct link rather than a libp2p stream.
    direct: bool,
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

struct NodeJob {
    /// The broker that woke it (only it may start or end the job).
    broker: PeerId,
    parts: Vec<(PeerId, Vec<Multiaddr>)>,
    prepared: Option<Prepared>,
    /// Remote inputs waiting for their stream: (vertex, port, source peer) → sender.
    inputs: HashMap<(String, String, PeerId), Sender<Bytes>>,
    links: mpsc::Sender<LinkResult>,
    links_rx: Option<mpsc::Receiver<LinkResult>>,
    expected_links: usize,
    tasks: Vec<AbortHandle>,
    vertices: u32,
    /// The guest the job runs in: held for its `Drop`, which releases it when the job goes.
    _env: Option<EnvLease>,
}

/// A node's part of the daemon: its jobs, its runtime and queues, its guests, and the
/// super-peer it follows.
pub(crate) struct Node {
    site: Arc<Site>,
    config: NodeConfig,
    /// None on a daemon that runs no vertices.
    runtime: Option<Runtime>,
    pub(crate) queues: Controller,
    jobs: Mutex<HashMap<String, NodeJob>>,
    /// The OS layer, when configured.
    os: Option<Arc<NodeOs>>,
    /// The direct-link listener, when direct links are on.
    links: Option<Arc<crate::links::Listener>>,
    /// The super-peer this node registers with.
    superpeer: RwLock<Option<(PeerId, Vec<Multiaddr>)>>,
    /// The group's members as last heard from the super-peer.
    members: Mutex<Vec<Member>>,
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
    /// Super-peer addresses to register with (`/…/p2p/PEER`).
    pub(crate) bootstrap: Vec<String>,
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
        Node {
            site,
            config,
            runtime,
            queues,
            jobs: Mutex::new(HashMap::new()),
            os,
            links,
            superpeer: RwLock::new(superpeer),
            members: Mutex::new(Vec::new()),
        }
    }

    /// Vertices of the jobs held now.
    pub(crate) fn vertices(&self) -> u32 {
        self.jobs.lock().values().map(|j| j.vertices).sum()
    }

    /// The jobs whose parts are held now.
    pub(crate) fn job_ids(&self) -> Vec<String> {
        self.jobs.lock().keys().cloned().collect()
    }

    /// The super-peer this node follows now.
    pub(crate) fn superpeer(&self) -> Option<(PeerId, Vec<Multiaddr>)> {
        self.superpeer.read().clone()
    }

    /// Answers the group's broker.
    pub(crate) async fn handle(self: &Arc<Self>, from: PeerId, request: BrokerRequest) -> Response {
        match request {
            BrokerRequest::Prepare(spec) => {
                if !self.is_superpeer(from) {
                    return fail(
                        FailureKind::Refused,
                        format!("{from} is not this node's super-peer"),
                    );
                }
                self.prepare(from, *spec).await
            }
            BrokerRequest::Start { job } => self.start(from, &job),
            BrokerRequest::Terminate { job, reason } => self.terminate(from, &job, &reason),
        }
    }

    /// Whether it has vertex slots (a super-peer may have none).
    pub(crate) fn runs_vertices(&self) -> bool {
        self.config.slots > 0
    }

    /// The OS layer, when configured.
    pub(crate) fn os(&self) -> Option<&Arc<NodeOs>> {
        self.os.as_ref()
    }

    /// This node's policy hook, from the policies the broker decided with (fetched from the
    /// super-peer first when this node holds others).
    async fn node_policy(self: &Arc<Self>, digest: &str) -> NodePolicy {
        if self.site.policies.current().digest != digest
            && let Err(e) = crate::policy::fetch_now(&self.site, self.superpeer()).await
        {
            tracing::warn!(error = %e, "policies not refreshed; deciding with the ones held");
        }
        let c = &self.site;
        NodePolicy::new(
            self.site.policies.current().engine.clone(),
            mvm_component::policy::Node {
                name: c.name.clone(),
                domain: c.domain.clone(),
                roles: self.site.net.principal().roles.clone(),
                group: c.group.clone(),
            },
        )
    }

    /// Handles `Prepare`: parse, fetch and compile modules, check, create queues. Nothing runs.
    async fn prepare(self: &Arc<Self>, from: PeerId, spec: PartSpec) -> Response {
        let Some(runtime) = self.runtime.as_ref() else {
            return fail(FailureKind::Unavailable, "this daemon runs no vertices");
        };
        if self.jobs.lock().contains_key(&spec.job) {
            return fail(
                FailureKind::Input,
                format!("job {} is already here", spec.job),
            );
        }
        let codecs = self.queues.codecs().clone();
        let options = Options {
            codecs: &codecs,
            queue_defaults: spec.queue.clone(),
        };
        let topology = match Topology::parse_named(&spec.topology_file, &spec.topology, &options) {
            Ok(t) => t,
            Err(e) => return fail(FailureKind::Input, e.to_string()),
        };
        if spec.placement.len() != topology.vertices.len() {
            return fail(
                FailureKind::Input,
                format!(
                    "the placement names {} vertices, {} has {}",
                    spec.placement.len(),
                    spec.topology_file,
                    topology.vertices.len()
                ),
            );
        }
        let limits = match spec.limits.limits() {
            Ok(l) => l,
            Err(e) => return Response::Error(e.into()),
        };
        // The node-level policy, before anything is fetched, compiled or provisioned.
        let hook = self.node_policy(&spec.policy_digest).await;
        let here_vertices: Vec<usize> = (0..topology.vertices.len())
            .filter(|&v| spec.placement[v] == spec.here)
            .collect();
        let probe = JobSpec {
            id: spec.job.clone(),
            topology: &topology,
            modules: HashMap::new(),
            params: BTreeMap::new(),
            limits,
            owner: Some(spec.owner.clone()),
        };
        if let Err(r) = hook.check(&probe, &here_vertices) {
            let at = if r.vertex.is_empty() {
                String::new()
            } else {
                format!("vertex '{}': ", r.vertex)
            };
            tracing::info!(job = %spec.job, owner = %spec.owner, reason = %r.reason, "part refused by node policy");
            return fail(
                FailureKind::Refused,
                format!("{at}refused by the node-level policy: {}", r.reason),
            );
        }
        let mut parts = Vec::new();
        for m in &spec.parts {
            let peer: PeerId = match m.peer.parse() {
                Ok(p) => p,
                Err(_) => return fail(FailureKind::Input, format!("bad peer id '{}'", m.peer)),
            };
            let addrs = m.addrs.iter().filter_map(|a| a.parse().ok()).collect();
            parts.push((peer, addrs));
        }
        // Modules: compiled ones from the cache, the rest fetched from the broker by hash.
        let mut modules = HashMap::new();
        for (component, hash) in &spec.components {
            let module = match runtime.cache().get(hash) {
                Some(m) => m,
                None => {
                    let bytes = match self
                        .site
                        .call(
                            from,
                            &[],
                            Request::Node(NodeRequest::Fetch { hash: hash.clone() }),
                        )
                        .await
                    {
                        Ok(Response::Module(b)) => b,
                        Ok(_) => return fail(FailureKind::Failed, "the broker sent no module"),
                        Err(e) => {
                            return fail(
                                FailureKind::Failed,
                                format!("cannot fetch module {hash} of '{component}': {e}"),
                            );
                        }
                    };
                    if crate::modules::hash(&bytes) != *hash {
                        return fail(
                            FailureKind::Failed,
                            format!("module of '{component}' does not match its hash {hash}"),
                        );
                    }
                    // Compiling may take seconds: on a blocking thread, so that the node's
                    // other tasks (its heartbeats, its swarm) go on meanwhile.
                    let compile = {
                        let (node, component) = (self.clone(), component.clone());
                        tokio::task::spawn_blocking(move || {
                            let runtime = node.runtime.as_ref()?;
                            Some(runtime.cache().load(&component, &bytes).map(|(m, _, _)| m))
                        })
                    };
                    match compile.await {
                        Ok(Some(Ok(m))) => m,
                        Ok(Some(Err(e))) => return fail(FailureKind::Input, e.to_string()),
                        Ok(None) => return fail(FailureKind::Unavailable, "no runtime"),
                        Err(e) => return fail(FailureKind::Failed, format!("compiling: {e}")),
                    }
                }
            };
            modules.insert(component.clone(), module);
        }
        // The OS layer ensures the job's environment before anything is instantiated.
        let env = match (&spec.environment, &self.os) {
            (None, _) => None,
            (Some(e), None) => {
                return fail(
                    FailureKind::Unavailable,
                    format!(
                        "node {} has no OS layer for image '{}' (start it with --os-dir)",
                        self.site.name, e.image
                    ),
                );
            }
            (Some(e), Some(os)) => {
                let (os, e, job) = (os.clone(), e.clone(), spec.job.clone());
                match tokio::task::spawn_blocking(move || os.acquire(&job, &e)).await {
                    Ok(Ok(lease)) => Some(lease),
                    Ok(Err(m)) => {
                        return fail(
                            FailureKind::Failed,
                            format!("node {}: environment: {m}", self.site.name),
                        );
                    }
                    Err(e) => return fail(FailureKind::Failed, format!("environment: {e}")),
                }
            }
        };
        let job = JobSpec {
            id: spec.job.clone(),
            topology: &topology,
            modules,
            params: spec.parameters.clone(),
            limits,
            owner: Some(spec.owner.clone()),
        };
        let placement: Vec<usize> = spec.placement.iter().map(|&p| p as usize).collect();
        let here = spec.here as usize;
        let mut prepared = match runtime.prepare(
            &job,
            &self.queues,
            // The same hook already allowed this part, before anything was fetched.
            &AllowAll,
            &placement,
            here,
        ) {
            Ok(p) => p,
            Err(e) => {
                let kind = if e.denied() {
                    FailureKind::Refused
                } else {
                    FailureKind::Input
                };
                return fail(kind, e.to_string());
            }
        };
        if self.links.is_some() {
            prepared.poll_remote_inputs();
        }
        let mut inputs = HashMap::new();
        for i in std::mem::take(&mut prepared.remote_inputs) {
            inputs.insert((i.vertex, i.port, parts[i.from].0), i.sender);
        }
        let expected_links = inputs.len() + prepared.remote_outputs.len();
        let (links, links_rx) = mpsc::channel(expected_links.max(1));
        let vertices = u32::try_from(prepared.vertices().count()).unwrap_or(u32::MAX);
        {
            let mut jobs = self.jobs.lock();
            if jobs.contains_key(&spec.job) {
                self.queues.destroy_job(&spec.job);
                return fail(
                    FailureKind::Input,
                    format!("job {} is already here", spec.job),
                );
            }
            jobs.insert(
                spec.job.clone(),
                NodeJob {
                    broker: from,
                    parts,
                    prepared: Some(prepared),
                    inputs,
                    links,
                    links_rx: Some(links_rx),
                    expected_links,
                    tasks: Vec::new(),
                    vertices,
                    _env: env,
                },
            );
        }
        if spec.start {
            return self.start_and_hold(from, &spec.job).await;
        }
        Response::Ok
    }
}

fn fail(kind: FailureKind, m: impl Into<String>) -> Response {
    Response::Error(Failure::new(kind, m))
}
