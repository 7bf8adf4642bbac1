//! The node role: holds no job state until the broker wakes it with a part to prepare, then
//! runs that part (compiling modules it lacks after fetching them from the broker), carries
//! its remote channels over libp2p streams, reports, and removes everything on termination.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::AsyncWriteExt;
use libp2p::{Multiaddr, PeerId};
use mvm_component::policy::NodePolicy;
use mvm_component::runtime::{AllowAll, JobSpec, Limits, PolicyHook, Prepared, Runtime};
use mvm_component::topology::{Diagnostic, Error as TopologyError, Options, Topology};
use mvm_queue::Controller;
use mvm_queue::queue::Sender;
use mvm_queue::remote::{self, Options as RemoteOptions, direct};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio_util::compat::FuturesAsyncReadCompatExt;

use crate::daemon::Shared;
use crate::environment::EnvLease;
use crate::proto::{
    ACK_DIRECT, ACK_OK, ACK_UNKNOWN, Failure, FailureKind, LimitSpec, PART_HOLD, PartReport,
    PartResult, PartSpec, Request, Response, StreamHeader, Traffic, VertexFailure,
};

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

/// A node's job table, runtime and queues.
pub(crate) struct NodeRole {
    runtime: Option<Runtime>,
    pub(crate) queues: Controller,
    jobs: Mutex<HashMap<String, NodeJob>>,
}

impl NodeRole {
    pub(crate) fn new(runtime: Option<Runtime>, queues: Controller) -> NodeRole {
        NodeRole {
            runtime,
            queues,
            jobs: Mutex::new(HashMap::new()),
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
}

fn fail(kind: FailureKind, m: impl Into<String>) -> Response {
    Response::Error(Failure::new(kind, m))
}

/// Turns the profile's limits into the runtime's.
pub(crate) fn limits(spec: &LimitSpec) -> Result<Limits, String> {
    let mut l = Limits::default();
    if let Some(m) = spec.memory_bytes {
        if m < 64 << 10 {
            return Err(format!("a memory limit of {m} bytes is under 64KiB"));
        }
        l.memory_bytes = usize::try_from(m).map_err(|_| "the memory limit is too large")?;
    }
    l.cpu = spec.cpu_ms.map(std::time::Duration::from_millis);
    l.wall = spec.wall_ms.map(std::time::Duration::from_millis);
    Ok(l)
}

/// Parses a topology sent in a message, with the file name in errors.
pub(crate) fn parse_topology(
    file: &str,
    text: &str,
    queue: &mvm_queue::queue::Config,
    codecs: &mvm_queue::codec::Registry,
) -> Result<Topology, String> {
    Topology::parse(
        text,
        &Options {
            codecs,
            queue_defaults: queue.clone(),
        },
    )
    .map_err(|diagnostics: Vec<Diagnostic>| {
        TopologyError {
            file: file.to_owned(),
            diagnostics,
        }
        .to_string()
    })
}

/// This node's policy hook, from the policies the broker decided with (fetched from the
/// super-peer first when this node holds others).
async fn node_policy(shared: &Arc<Shared>, digest: &str) -> NodePolicy {
    if shared.policies.current().digest != digest
        && let Err(e) = crate::policy::fetch_now(shared).await
    {
        tracing::warn!(error = %e, "policies not refreshed; deciding with the ones held");
    }
    let c = &shared.config;
    NodePolicy::new(
        shared.policies.current().engine.clone(),
        mvm_component::policy::Node {
            name: c.name.clone(),
            domain: c.domain.clone(),
            roles: shared.net.principal().roles.clone(),
            group: c.group.clone(),
        },
    )
}

/// Handles `Prepare`: parse, fetch and compile modules, check, create queues. Nothing runs.
pub(crate) async fn prepare(shared: &Arc<Shared>, from: PeerId, spec: PartSpec) -> Response {
    let role = &shared.node;
    let Some(runtime) = role.runtime.as_ref() else {
        return fail(FailureKind::Unavailable, "this daemon runs no vertices");
    };
    if role.jobs.lock().contains_key(&spec.job) {
        return fail(
            FailureKind::Input,
            format!("job {} is already here", spec.job),
        );
    }
    let codecs = role.queues.codecs().clone();
    let topology = match parse_topology(&spec.topology_file, &spec.topology, &spec.queue, &codecs) {
        Ok(t) => t,
        Err(e) => return fail(FailureKind::Input, e),
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
    let limits = match limits(&spec.limits) {
        Ok(l) => l,
        Err(e) => return fail(FailureKind::Input, e),
    };
    // The node-level policy, before anything is fetched, compiled or provisioned.
    let hook = node_policy(shared, &spec.policy_digest).await;
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
                let bytes = match shared
                    .call(from, &[], Request::Fetch { hash: hash.clone() })
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
                // Compiling may take seconds: on a blocking thread, so that the node's other
                // tasks (its heartbeats, its swarm) go on meanwhile.
                let compile = {
                    let (shared, component) = (shared.clone(), component.clone());
                    tokio::task::spawn_blocking(move || {
                        let runtime = shared.node.runtime.as_ref()?;
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
    let env = match (&spec.environment, &shared.os) {
        (None, _) => None,
        (Some(e), None) => {
            return fail(
                FailureKind::Unavailable,
                format!(
                    "node {} has no OS layer for image '{}' (start it with --os-dir)",
                    shared.config.name, e.image
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
                        format!("node {}: environment: {m}", shared.config.name),
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
        &role.queues,
        // The same hook already allowed this part, before anything was fetched.
        &AllowAll,
        &placement,
        here,
    ) {
        Ok(p) => p,
        Err(e) => {
            let kind = if e.denied {
                FailureKind::Refused
            } else {
                FailureKind::Input
            };
            return fail(kind, e.to_string());
        }
    };
    if shared.links.is_some() {
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
        let mut jobs = role.jobs.lock();
        if jobs.contains_key(&spec.job) {
            role.queues.destroy_job(&spec.job);
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
        return start_and_hold(shared, from, &spec.job).await;
    }
    Response::Ok
}

/// Where a part's report goes when the answer to its `Prepare` still waits for it.
type Hand = Arc<Mutex<Option<oneshot::Sender<PartReport>>>>;

/// Starts a part that was prepared alone and holds the answer for up to [`PART_HOLD`]: a part
/// that ends by then answers with its report ([`Response::Finished`]), saving the broker a
/// request per short job; a longer one answers `Ok` and reports by itself later.
async fn start_and_hold(shared: &Arc<Shared>, from: PeerId, job: &str) -> Response {
    let (tx, mut rx) = oneshot::channel();
    let hand: Hand = Arc::new(Mutex::new(Some(tx)));
    let r = start_part(shared, from, job, Some(hand.clone()));
    if !matches!(r, Response::Ok) {
        return r;
    }
    if let Ok(Ok(report)) = tokio::time::timeout(PART_HOLD, &mut rx).await {
        return Response::Finished(Box::new(report));
    }
    // Taking the hand back makes the part report by itself. If the part took it first, its
    // report is on the way here.
    if hand.lock().take().is_some() {
        return Response::Ok;
    }
    match rx.await {
        Ok(report) => Response::Finished(Box::new(report)),
        Err(_) => Response::Ok,
    }
}

/// Handles `Start`: opens the outgoing channels and runs the local vertices.
pub(crate) fn start(shared: &Arc<Shared>, from: PeerId, job: &str) -> Response {
    start_part(shared, from, job, None)
}

/// Starts a part; its report goes to `hand` while that still holds a sender, otherwise to the
/// broker in a `Report`.
fn start_part(shared: &Arc<Shared>, from: PeerId, job: &str, hand: Option<Hand>) -> Response {
    let mut jobs = shared.node.jobs.lock();
    let Some(j) = jobs.get_mut(job) else {
        return fail(
            FailureKind::NotFound,
            format!("job {job} is not prepared here"),
        );
    };
    if j.broker != from && !crate::daemon::from_superpeer(shared, from) {
        return fail(
            FailureKind::Refused,
            format!("job {job} was not placed by {from}"),
        );
    }
    let (Some(mut prepared), Some(links_rx)) = (j.prepared.take(), j.links_rx.take()) else {
        return fail(FailureKind::Input, format!("job {job} has already started"));
    };
    for out in std::mem::take(&mut prepared.remote_outputs) {
        let (peer, addrs) = j.parts[out.to].clone();
        let links = j.links.clone();
        let mut control = shared.net.streams();
        let net = shared.net.clone();
        let header = StreamHeader {
            job: job.to_owned(),
            vertex: out.vertex.clone(),
            port: out.port.clone(),
            direct: shared.links.is_some(),
        };
        let task = tokio::spawn(async move {
            let r: LinkResult = async {
                // Streams from a peer whose certificate has not passed are dropped: exchange
                // certificates first (this also makes the addresses known to the swarm).
                net.authenticate(peer, &addrs)
                    .await
                    .map_err(|e| e.to_string())?;
                let what = |e: &dyn std::fmt::Display| {
                    format!("channel to {}:{} on {peer}: {e}", out.vertex, out.port)
                };
                let channel = open_channel(&mut control, peer, &header).await?;
                let direct = matches!(channel, Channel::Direct { .. });
                let rep = match channel {
                    Channel::Stream(s) => {
                        remote::export_stream(&out.receiver, s.compat(), &RemoteOptions::default())
                            .await
                            .map_err(|e| what(&e))?
                    }
                    Channel::Direct { port, token } => {
                        let sock = crate::links::connect(&addrs, port, &token)
                            .await
                            .map_err(|e| what(&e))?;
                        run_link(|done| direct::outlet(out.receiver, sock, done))
                            .await
                            .map_err(|e| what(&e))?
                    }
                };
                Ok(LinkDone {
                    vertex: out.vertex,
                    port: out.port,
                    out: true,
                    direct,
                    items: rep.items,
                    bytes: rep.bytes,
                })
            }
            .await;
            let _ = links.try_send(r);
        });
        j.tasks.push(task.abort_handle());
    }
    let expected = j.expected_links;
    let shared2 = shared.clone();
    let job_id = job.to_owned();
    let broker = j.broker;
    let task = tokio::spawn(async move {
        let outcome = supervise(&shared2, &job_id, prepared, links_rx, expected).await;
        if outcome.is_ok() {
            // Done here: remove everything now; the broker sends no termination to a part
            // that reported success.
            if let Some(j) = shared2.node.jobs.lock().remove(&job_id) {
                drop(j);
            }
            shared2.node.queues.destroy_job(&job_id);
        }
        let report = PartReport {
            job: job_id.clone(),
            outcome,
        };
        let waiting = hand.and_then(|h| h.lock().take());
        let report = match waiting {
            Some(tx) => match tx.send(report) {
                Ok(()) => return,
                Err(report) => report,
            },
            None => report,
        };
        report_to_leader(&shared2, broker, report).await;
    });
    j.tasks.push(task.abort_handle());
    Response::Ok
}

/// Sends a part's report to the group's broker: the super-peer this node follows now, which is
/// `placed_by` unless the group's leader has changed. A report not taken (the super-peer is
/// lost, or no longer leads) is sent again to whichever this node follows next, for a while.
async fn report_to_leader(shared: &Arc<Shared>, placed_by: PeerId, report: PartReport) {
    let job = report.job.clone();
    let request = Request::Report(Box::new(report));
    let give_up = tokio::time::Instant::now() + shared.config.lost_after * 10;
    loop {
        let to = shared
            .superpeer
            .read()
            .as_ref()
            .map_or(placed_by, |(p, _)| *p);
        match shared.call(to, &[], request.clone()).await {
            Ok(_) => return,
            Err(f) if f.kind != FailureKind::Unavailable && to == placed_by => {
                tracing::warn!(%job, error = %f, "the broker refused the report");
                return;
            }
            Err(f) if tokio::time::Instant::now() >= give_up => {
                tracing::warn!(%job, error = %f, "cannot report to the broker");
                return;
            }
            Err(f) => {
                tracing::debug!(%job, error = %f, "report not taken; sending it again");
                tokio::time::sleep(shared.config.heartbeat).await;
            }
        }
    }
}

/// How a remote channel's items go, as its acceptor answered.
enum Channel {
    /// On this libp2p stream.
    Stream(libp2p::Stream),
    /// Over a direct link to this port, presenting this token.
    Direct {
        port: u16,
        token: crate::links::Token,
    },
}

/// Opens the stream of one remote channel and waits for the acceptor's acknowledgement.
///
/// libp2p-stream drops an inbound stream when its acceptor is busy, so a stream that closes
/// before the acknowledgement is opened again (a bounded number of times).
async fn open_channel(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    header: &StreamHeader,
) -> Result<Channel, String> {
    let mut last = String::new();
    for attempt in 0..50u64 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(2 * attempt)).await;
        }
        let mut s = match control
            .open_stream(peer, crate::proto::QUEUE_PROTOCOL)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                last = format!("cannot open a stream to {peer}: {e}");
                continue;
            }
        };
        if let Err(e) = crate::proto::write_frame(&mut s, header, crate::proto::MAX_HEADER).await {
            last = format!("stream to {peer}: {e}");
            continue;
        }
        let mut ack = [0u8; 1];
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            futures::AsyncReadExt::read_exact(&mut s, &mut ack),
        )
        .await;
        match read {
            Ok(Ok(())) if ack[0] == ACK_OK => return Ok(Channel::Stream(s)),
            Ok(Ok(())) if ack[0] == ACK_DIRECT && header.direct => {
                let mut rest = [0u8; 2 + crate::links::TOKEN_LEN];
                match futures::AsyncReadExt::read_exact(&mut s, &mut rest).await {
                    Ok(()) => {
                        let port = u16::from_le_bytes([rest[0], rest[1]]);
                        let mut token = [0u8; crate::links::TOKEN_LEN];
                        token.copy_from_slice(&rest[2..]);
                        let _ = s.close().await;
                        return Ok(Channel::Direct { port, token });
                    }
                    Err(e) => last = format!("stream to {peer}: {e}"),
                }
            }
            Ok(Ok(())) => {
                return Err(format!(
                    "{peer} expects no channel into {}:{} of job {}",
                    header.vertex, header.port, header.job
                ));
            }
            Ok(Err(e)) => last = format!("stream to {peer}: {e}"),
            Err(_) => last = format!("stream to {peer}: no acknowledgement within 10 s"),
        }
    }
    Err(last)
}

/// Runs the local vertices and waits for every remote channel; collects what moved.
async fn supervise(
    shared: &Arc<Shared>,
    job: &str,
    prepared: Prepared,
    mut links: mpsc::Receiver<LinkResult>,
    expected: usize,
) -> Result<PartResult, VertexFailure> {
    let start = Instant::now();
    let run = prepared.run();
    tokio::pin!(run);
    let mut report = None;
    let mut remote: Vec<LinkDone> = Vec::new();
    let broken = |cause: String| VertexFailure {
        vertex: String::new(),
        cause,
        denied: false,
    };
    while report.is_none() || remote.len() < expected {
        tokio::select! {
            r = &mut run, if report.is_none() => match r {
                Ok(r) => report = Some(r),
                Err(e) => return Err(VertexFailure { vertex: e.vertex, cause: e.cause, denied: e.denied }),
            },
            l = links.recv(), if remote.len() < expected => match l {
                Some(Ok(l)) => remote.push(l),
                Some(Err(e)) => return Err(broken(e)),
                None => return Err(broken("the job was ended".into())),
            },
        }
    }
    let Some(report) = report else {
        return Err(broken("no report".into()));
    };
    // Traffic: local input queues count everything that entered; what came from another node
    // is remote, the rest local. Outboxes count what this node sent to others.
    let queues = &shared.node.queues;
    let mut traffic: BTreeMap<(String, String, bool, bool), (u64, u64)> = BTreeMap::new();
    let prefix = format!("{job}/");
    for s in queues.list(Some(job)) {
        let name = s.name.strip_prefix(&prefix).unwrap_or(&s.name);
        let Some(h) = queues.get(job, name) else {
            continue;
        };
        let kind = h.queue.config().kind.as_str().to_owned();
        let codec = h.codec.name().to_owned();
        if let Some(into) = name.strip_suffix(">out") {
            let direct = remote.iter().any(|l| l.out && l.direct && l.feeds(into));
            let e = traffic.entry((kind, codec, true, direct)).or_default();
            e.0 += s.items_in;
            e.1 += s.bytes_in;
        } else {
            let (ri, rb) = remote_into(&remote, name);
            let e = traffic.entry((kind, codec, false, false)).or_default();
            e.0 += s.items_in.saturating_sub(ri);
            e.1 += s.bytes_in.saturating_sub(rb);
        }
    }
    Ok(PartResult {
        outputs: report
            .vertices
            .into_iter()
            .map(|v| (v.vertex, v.stdout))
            .collect(),
        traffic: traffic
            .into_iter()
            .map(|((kind, codec, remote, direct), (items, bytes))| Traffic {
                kind,
                codec,
                remote,
                direct,
                items,
                bytes,
            })
            .collect(),
        wall_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// Items and bytes that reached local queue `name` (`vertex:port`) from other nodes.
fn remote_into(links: &[LinkDone], name: &str) -> (u64, u64) {
    links
        .iter()
        .filter(|l| !l.out && l.feeds(name))
        .fold((0, 0), |(i, b), l| (i + l.items, b + l.bytes))
}

/// Handles `Terminate`: stops whatever runs and removes the job's queues.
pub(crate) fn terminate(shared: &Arc<Shared>, from: PeerId, job: &str, reason: &str) -> Response {
    let mut jobs = shared.node.jobs.lock();
    match jobs.get(job) {
        None => return Response::Ok,
        Some(j) if j.broker != from && !crate::daemon::from_superpeer(shared, from) => {
            return fail(
                FailureKind::Refused,
                format!("job {job} was not placed by {from}"),
            );
        }
        Some(_) => {}
    }
    if let Some(j) = jobs.remove(job) {
        for t in &j.tasks {
            t.abort();
        }
        drop(j);
        let left = shared.node.queues.destroy_job(job);
        tracing::debug!(job, reason, queues = left.len(), "job terminated");
    }
    Response::Ok
}

/// Ends every job held (the daemon is shutting down).
pub(crate) fn terminate_all(shared: &Arc<Shared>) {
    let jobs: Vec<(String, NodeJob)> = shared.node.jobs.lock().drain().collect();
    for (id, j) in jobs {
        for t in &j.tasks {
            t.abort();
        }
        shared.node.queues.destroy_job(&id);
    }
}

/// Accepts queue-data streams: reads the header, checks the sender is the part that feeds
/// that port, and imports into the local queue.
pub(crate) async fn accept_streams(shared: Arc<Shared>) {
    let mut control = shared.net.streams();
    let Ok(mut incoming) = control.accept(crate::proto::QUEUE_PROTOCOL) else {
        tracing::error!("the queue protocol is already being accepted");
        return;
    };
    while let Some((peer, mut stream)) = futures::StreamExt::next(&mut incoming).await {
        if shared.net.identity(&peer).is_none() {
            tracing::warn!(%peer, "a queue stream from an unauthenticated peer; dropped");
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let header = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                crate::proto::read_frame::<StreamHeader, _>(&mut stream, crate::proto::MAX_HEADER),
            )
            .await;
            let header = match header {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "bad queue stream header");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "no queue stream header within 10 s");
                    return;
                }
            };
            let taken = {
                let mut jobs = shared.node.jobs.lock();
                jobs.get_mut(&header.job).and_then(|j| {
                    let key = (header.vertex.clone(), header.port.clone(), peer);
                    j.inputs.remove(&key).map(|tx| (tx, j.links.clone()))
                })
            };
            let Some((tx, links)) = taken else {
                tracing::warn!(%peer, job = %header.job, vertex = %header.vertex, port = %header.port,
                    "a queue stream for no expected channel; refused");
                let _ = stream.write_all(&[ACK_UNKNOWN]).await;
                let _ = stream.close().await;
                return;
            };
            // A direct link when both sides want one: the answer carries where and how to
            // connect, and the items go there.
            let direct = match &shared.links {
                Some(l) if header.direct => match l.expect() {
                    Ok((token, conn)) => Some((l.port(), token, conn)),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot make a link token; using the stream");
                        None
                    }
                },
                _ => None,
            };
            let mut answer = vec![if direct.is_some() { ACK_DIRECT } else { ACK_OK }];
            if let Some((port, token, _)) = &direct {
                answer.extend_from_slice(&port.to_le_bytes());
                answer.extend_from_slice(token);
            }
            if let Err(e) = async {
                stream.write_all(&answer).await?;
                stream.flush().await
            }
            .await
            {
                // The opener retries; give the sender back for its next attempt.
                tracing::debug!(%peer, error = %e, "queue stream lost before its acknowledgement");
                if let Some(j) = shared.node.jobs.lock().get_mut(&header.job) {
                    j.inputs
                        .insert((header.vertex.clone(), header.port.clone(), peer), tx);
                }
                return;
            }
            let job = header.job.clone();
            let import = tokio::spawn(async move {
                let is_direct = direct.is_some();
                let r = match direct {
                    None => remote::import_stream(tx, stream.compat(), &RemoteOptions::default())
                        .await
                        .map_err(|e| e.to_string()),
                    Some((_, _, conn)) => {
                        let _ = stream.close().await;
                        accept_link(tx, conn).await
                    }
                };
                let r = r
                    .map(|rep| LinkDone {
                        vertex: header.vertex.clone(),
                        port: header.port.clone(),
                        out: false,
                        direct: is_direct,
                        items: rep.items,
                        bytes: rep.bytes,
                    })
                    .map_err(|e| {
                        format!(
                            "channel into {}:{} from {peer}: {e}",
                            header.vertex, header.port
                        )
                    });
                let _ = links.try_send(r);
            });
            match shared.node.jobs.lock().get_mut(&job) {
                Some(j) => j.tasks.push(import.abort_handle()),
                None => import.abort(),
            }
        });
    }
}

/// Waits for the connection of a direct link into `tx`'s queue and runs the link to its end.
async fn accept_link(
    tx: Sender<Bytes>,
    conn: oneshot::Receiver<std::net::TcpStream>,
) -> Result<remote::Report, String> {
    let sock = tokio::time::timeout(crate::links::TOKEN_LIFETIME, conn)
        .await
        .map_err(|_| {
            format!(
                "the direct link was not connected within {:?}",
                crate::links::TOKEN_LIFETIME
            )
        })?
        .map_err(|_| "the direct link listener went away".to_owned())?;
    run_link(|done| direct::inlet(tx, sock, RemoteOptions::default().max_item, done)).await
}

/// Starts one side of a direct link and waits for its report. The link is held meanwhile, so
/// aborting the waiting task drops (and stops) it.
async fn run_link(
    start: impl FnOnce(direct::OnDone) -> std::io::Result<direct::Link>,
) -> Result<remote::Report, String> {
    let (done, rx) = oneshot::channel();
    let _link = start(Box::new(move |r| {
        let _ = done.send(r);
    }))
    .map_err(|e| e.to_string())?;
    rx.await
        .map_err(|_| "the link ended without a report".to_owned())?
        .map_err(|e| e.to_string())
}
