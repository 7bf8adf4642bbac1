//! Preparing a part, off the node's loop: its topology parsed, the node's policy asked, its
//! modules fetched and compiled, its guest ensured, its queues created. Nothing runs yet.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use libp2p::PeerId;
use mvm_component::runtime::{AllowAll, JobSpec, PolicyHook, RemoteInput};
use mvm_component::topology::{Options, Topology};

use mvm_component::runtime::checkpoint::PartImage;
use mvm_queue::remote::{Drain, Hold};

use super::Node;
use super::parts::{Body, Control, InGuest, InputKey, Marks, Ready};
use crate::environment::EnvLease;
use crate::proto::ErrorKind;
use crate::proto::{Failure, FailureKind, Hash, NodeRequest, PartSpec, Request, Response};
use crate::worker::agent::AgentAddr;
use crate::worker::{Started, WorkerCommand, WorkerJob};

/// How long a guest just made has for its agent to answer (its boot): under the test suite's
/// emulated Xen a boot takes seconds; within the broker's wait for a prepare.
const AGENT_BOOT: std::time::Duration = std::time::Duration::from_secs(45);

/// The most bytes of input files sent with a job to a worker in a guest of its own, and of
/// output files it gives back (every vertex's bound together): each travels in one frame.
const GUEST_FILES: u64 = 512 << 20;

/// How a part's worker is started.
enum Launch<'a> {
    /// As a child of the node, joining these control groups.
    Child(&'a WorkerCommand, Vec<std::path::PathBuf>),
    /// By the guest's agent.
    Agent(AgentAddr),
}

impl Node {
    /// Prepares a part: parses its topology, checks it against the node's policy, fetches and
    /// compiles the modules it lacks, ensures its guest, and creates its queues. Nothing runs.
    pub(super) async fn prepare_part(
        self: &Arc<Self>,
        from: PeerId,
        spec: &PartSpec,
    ) -> Result<Box<Ready>, Failure> {
        let Some(runtime) = self.runtime.as_ref() else {
            return Err(Failure::new(
                FailureKind::Unavailable,
                "this daemon runs no vertices",
            ));
        };
        let codecs = self.queues.codecs().clone();
        let options = Options {
            codecs: &codecs,
            queue_defaults: spec.queue.clone(),
        };
        let topology = match Topology::parse_named(&spec.topology_file, &spec.topology, &options) {
            Ok(t) => t,
            Err(e) => return Err(Failure::new(FailureKind::Input, e.to_string())),
        };
        if spec.placement.len() != topology.vertices.len() {
            return Err(Failure::new(
                FailureKind::Input,
                format!(
                    "the placement names {} vertices, {} has {}",
                    spec.placement.len(),
                    spec.topology_file,
                    topology.vertices.len()
                ),
            ));
        }
        let limits = match spec.limits.limits() {
            Ok(l) => l,
            Err(e) => return Err(e.into()),
        };
        // The node-level policy, before anything is fetched, compiled or provisioned.
        let hook = self.node_policy(&spec.policy_digest).await;
        let here_vertices: Vec<usize> = (0..topology.vertices.len())
            .filter(|&v| spec.placement[v] == spec.here)
            .collect();
        let probe = JobSpec {
            id: super::space(&spec.job, spec.attempt),
            topology: &topology,
            modules: HashMap::new(),
            params: BTreeMap::new(),
            limits,
            owner: Some(spec.owner.clone()),
            sandboxes: Default::default(),
        };
        if let Err(r) = hook.check(&probe, &here_vertices) {
            let at = if r.vertex.is_empty() {
                String::new()
            } else {
                format!("vertex '{}': ", r.vertex)
            };
            tracing::info!(job = %spec.job, owner = %spec.owner, reason = %r.reason, "part refused by node policy");
            return Err(Failure::new(
                FailureKind::Refused,
                format!("{at}refused by the node-level policy: {}", r.reason),
            ));
        }
        let parts: Vec<_> = spec
            .parts
            .iter()
            .map(|m| (m.peer, m.addrs.clone()))
            .collect();
        // Modules: compiled ones from the cache, the rest fetched from the broker by hash; made
        // pausable (and cached so) when the job asked for checkpoints.
        let mut modules = HashMap::new();
        let key = |hash: &Hash| {
            if spec.checkpoint {
                format!("{hash}+ckpt")
            } else {
                hash.to_string()
            }
        };
        for (component, hash) in &spec.components {
            let module = match runtime.cache().get(&key(hash)) {
                Some(m) => m,
                None => {
                    let bytes = match self
                        .site
                        .call(from, &[], Request::Node(NodeRequest::Fetch { hash: *hash }))
                        .await
                    {
                        Ok(Response::Module(b)) => b,
                        Ok(_) => {
                            return Err(Failure::new(
                                FailureKind::Failed,
                                "the broker sent no module",
                            ));
                        }
                        Err(e) => {
                            return Err(Failure::new(
                                FailureKind::Failed,
                                format!("cannot fetch module {hash} of '{component}': {e}"),
                            ));
                        }
                    };
                    if Hash::of(&bytes) != *hash {
                        return Err(Failure::new(
                            FailureKind::Failed,
                            format!("module of '{component}' does not match its hash {hash}"),
                        ));
                    }
                    // Compiling may take seconds: on a blocking thread, so that the node's
                    // other tasks (its heartbeats, its swarm) go on meanwhile.
                    let compile = {
                        let (node, component) = (self.clone(), component.clone());
                        let pausable = spec.checkpoint;
                        tokio::task::spawn_blocking(move || {
                            let cache = node.runtime.as_ref()?.cache();
                            let loaded = if pausable {
                                cache.load_checkpointable(&component, &bytes)
                            } else {
                                cache.load(&component, &bytes)
                            };
                            Some(loaded.map(|(m, _, _)| m))
                        })
                    };
                    match compile.await {
                        Ok(Some(Ok(m))) => m,
                        Ok(Some(Err(e))) => {
                            return Err(Failure::new(FailureKind::Input, e.to_string()));
                        }
                        Ok(None) => {
                            return Err(Failure::new(FailureKind::Unavailable, "no runtime"));
                        }
                        Err(e) => {
                            return Err(Failure::new(
                                FailureKind::Failed,
                                format!("compiling: {e}"),
                            ));
                        }
                    }
                }
            };
            modules.insert(component.clone(), module);
        }
        // The OS layer ensures the job's environment before anything is instantiated.
        let env = match (&spec.environment, &self.os) {
            (None, _) => None,
            (Some(e), None) => {
                return Err(Failure::new(
                    FailureKind::Unavailable,
                    format!(
                        "node {} has no OS layer for image '{}' (start it with --os-dir)",
                        self.site.name, e.image
                    ),
                ));
            }
            (Some(e), Some(os)) => {
                self.pre_wrapper(os, &e.image, &spec.image_from).await?;
                let (os, e, job) = (os.clone(), e.clone(), spec.job.clone());
                let payer = crate::proto::account_of(&spec.owner);
                if let Some(f) = e.bid.and_then(|b| self.under_floor(b)) {
                    return Err(f);
                }
                let acquired = move || {
                    let mut lease = os.acquire(&job, &e)?;
                    if let Some(rate) = e.bid {
                        os.bid(&mut lease, &job, payer, rate)?;
                    }
                    Ok::<_, crate::environment::EnvError>(lease)
                };
                match tokio::task::spawn_blocking(acquired).await {
                    Ok(Ok(lease)) => Some(lease),
                    Ok(Err(m)) => {
                        return Err(Failure::new(
                            FailureKind::Failed,
                            format!("node {}: environment: {m}", self.site.name),
                        ));
                    }
                    Err(e) => {
                        return Err(Failure::new(
                            FailureKind::Failed,
                            format!("environment: {e}"),
                        ));
                    }
                }
            }
        };
        // The prolog: the job's input files fetched (what the node lacks) and laid out in a
        // sandbox per local vertex.
        let sandbox = match &spec.files {
            None => None,
            Some(files) => {
                let Some(store) = &self.config.files else {
                    return Err(Failure::new(
                        FailureKind::Unavailable,
                        "this daemon runs no vertices",
                    ));
                };
                let vertices: Vec<String> = here_vertices
                    .iter()
                    .map(|&v| topology.vertices[v].name.clone())
                    .collect();
                let root = self
                    .config
                    .sandboxes
                    .join(super::space(&spec.job, spec.attempt).replace('/', "_"));
                let staged = crate::files::stage_in(
                    &self.site.net,
                    from,
                    &spec.files_from,
                    store,
                    root,
                    &spec.job,
                    &vertices,
                    files,
                    spec.restore.and(spec.restore_files.as_deref()),
                )
                .await
                .map_err(|f| {
                    Failure::new(f.kind, format!("node {}: {}", self.site.name, f.message))
                })?;
                Some(Arc::new(staged))
            }
        };
        let sandboxes = sandbox
            .as_ref()
            .map(|s| s.vertices.clone())
            .unwrap_or_default();
        if let Some((w, remote_inputs)) = self
            .in_guest(from, spec, env.as_ref(), &modules, &sandboxes)
            .await?
        {
            let vertices = spec.placement.iter().filter(|&&p| p == spec.here).count();
            let outputs = w.remote_outputs.len();
            let inputs = by_key(remote_inputs, &parts);
            let marks = spec.checkpoint.then(|| Marks {
                control: Control::Worker(w.started.control()),
                holds: holds(&w.remote_outputs, &parts),
                drains: inputs.keys().map(|k| (k.clone(), Drain::new())).collect(),
            });
            return Ok(Box::new(Ready {
                prepared: Body::Worker(Box::new(w)),
                parts,
                expected_links: inputs.len() + outputs,
                inputs,
                vertices: u32::try_from(vertices).unwrap_or(u32::MAX),
                env,
                marks,
                sandbox,
            }));
        }
        let job = JobSpec {
            id: super::space(&spec.job, spec.attempt),
            topology: &topology,
            modules,
            params: spec.parameters.clone(),
            limits,
            owner: Some(spec.owner.clone()),
            sandboxes,
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
                return Err(Failure::new(kind, e.to_string()));
            }
        };
        if let Some(hash) = &spec.restore {
            let blob = self.fetch_checkpoint(from, spec, hash).await?;
            let failed = |m: String| {
                Failure::new(
                    FailureKind::Failed,
                    format!("checkpoint {hash} of job {}: {m}", spec.job),
                )
            };
            let mut image = PartImage::decode(&blob).map_err(|e| failed(e.to_string()))?;
            // The image is of this part in another run (its own queue namespace).
            image.job = super::space(&spec.job, spec.attempt);
            prepared
                .restore(&image)
                .map_err(|e| failed(e.to_string()))?;
        }
        if self.links.is_some() && !spec.streams {
            prepared.direct_remote_links();
        }
        let inputs = by_key(std::mem::take(&mut prepared.remote_inputs), &parts);
        let marks = prepared.control().map(|control| Marks {
            control: Control::Here(control),
            holds: holds(&prepared.remote_outputs, &parts),
            drains: inputs.keys().map(|k| (k.clone(), Drain::new())).collect(),
        });
        if spec.checkpoint && marks.is_none() {
            return Err(Failure::new(
                FailureKind::Input,
                "the job asked for checkpoints, but its part cannot be paused",
            ));
        }
        let expected_links = inputs.len() + prepared.remote_outputs.len();
        let vertices = u32::try_from(prepared.vertices().count()).unwrap_or(u32::MAX);
        Ok(Box::new(Ready {
            prepared: Body::Here(prepared),
            parts,
            inputs,
            expected_links,
            vertices,
            env,
            marks,
            sandbox,
        }))
    }

    /// The files of a part for a worker in a guest of its own (a Xen domain, through its
    /// agent), of `vertices` vertices: the inputs' bytes (from the node's store, where the
    /// prolog put them), the output patterns and bound.
    ///
    /// # Errors
    /// A job that asks for checkpoints (not yet taken of files in a guest), files over
    /// [`GUEST_FILES`], or an input that cannot be read.
    async fn guest_files(
        &self,
        spec: &PartSpec,
        files: &crate::proto::FileSpec,
        vertices: usize,
    ) -> Result<crate::worker::GuestFiles, Failure> {
        let node = &self.site.name;
        let refused = |m: String| Failure::new(FailureKind::Refused, format!("node {node}: {m}"));
        if spec.checkpoint || spec.restore.is_some() {
            return Err(refused(
                "checkpoints of a job with files are not yet taken inside a Xen guest".into(),
            ));
        }
        let outputs = files.output_bytes.saturating_mul(vertices as u64);
        if files.input_bytes() > GUEST_FILES || outputs > GUEST_FILES {
            return Err(refused(format!(
                "a job with {} bytes of input files and {outputs} of output files (its bound \
                 for each of {vertices} vertices) in a Xen guest (at most {GUEST_FILES} of \
                 each)",
                files.input_bytes()
            )));
        }
        let Some(store) = &self.config.files else {
            return Err(refused("this daemon runs no vertices".into()));
        };
        let mut inputs = Vec::with_capacity(files.inputs.len());
        for i in &files.inputs {
            let bytes = tokio::fs::read(store.path(&i.hash)).await.map_err(|e| {
                Failure::new(
                    FailureKind::Failed,
                    format!("node {node}: input file '{}': {e}", i.path),
                )
            })?;
            inputs.push((i.path.clone(), bytes::Bytes::from(bytes)));
        }
        Ok(crate::worker::GuestFiles {
            inputs,
            outputs: files.outputs.clone(),
            output_bytes: files.output_bytes,
        })
    }

    /// The part prepared in a worker inside its guest, when it runs in one: its guest is a
    /// group of this host's processes, and the node starts workers. The worker is started
    /// now, so that its start is part of the preparation; a part run again from a checkpoint
    /// gets the checkpoint's blob (fetched from the broker `from`) with its job.
    async fn in_guest(
        &self,
        from: PeerId,
        spec: &PartSpec,
        env: Option<&EnvLease>,
        modules: &HashMap<String, mvm_component::runtime::Module>,
        sandboxes: &BTreeMap<String, std::path::PathBuf>,
    ) -> Result<Option<(InGuest, Vec<RemoteInput>)>, Failure> {
        let Some(env) = env else {
            return Ok(None);
        };
        // Where the worker starts: through the guest's agent (a domain of its own), or as a
        // child of the node in the guest's control groups (the host driver).
        let how = match (env.agent(), self.os.as_ref().and_then(|o| o.worker())) {
            (Some(agent), _) => Launch::Agent(agent.clone()),
            (None, Some(command)) => match env.join_files() {
                Some(join) => Launch::Child(command, join),
                None => return Ok(None),
            },
            (None, None) => return Ok(None),
        };
        // A worker in a guest of its own gets the files with its job (see `guest_files`).
        let guest_files = match (&how, &spec.files) {
            (Launch::Agent(_), Some(files)) if !sandboxes.is_empty() => {
                Some(self.guest_files(spec, files, sandboxes.len()).await?)
            }
            _ => None,
        };
        let restore = match &spec.restore {
            Some(hash) => Some(self.fetch_checkpoint(from, spec, hash).await?),
            None => None,
        };
        let mut compiled = Vec::with_capacity(modules.len());
        for (component, module) in modules {
            let bytes = module.serialize().map_err(|e| {
                Failure::new(
                    FailureKind::Failed,
                    format!("component '{component}' for its worker: {e}"),
                )
            })?;
            compiled.push((component.clone(), bytes::Bytes::from(bytes)));
        }
        let max_memory_bytes = self.runtime.as_ref().map_or(0, |r| {
            u64::try_from(r.max_memory_bytes()).unwrap_or(u64::MAX)
        });
        let job = WorkerJob {
            space: super::space(&spec.job, spec.attempt),
            topology_file: spec.topology_file.clone(),
            topology: spec.topology.clone(),
            queue: spec.queue.clone(),
            modules: compiled,
            parameters: spec.parameters.clone(),
            limits: spec.limits.clone(),
            placement: spec.placement.clone(),
            here: spec.here,
            owner: spec.owner.clone(),
            max_memory_bytes,
            restore,
            sandboxes: if guest_files.is_some() {
                BTreeMap::new()
            } else {
                sandboxes.clone()
            },
            guest_files,
        };
        let started = match how {
            Launch::Child(command, join) => {
                Started::start(command, &job, env.guest(), &join, &self.queues).await
            }
            Launch::Agent(agent) => {
                // A guest just made is booting: its agent answers once it is up.
                crate::worker::agent::ready(&agent, AGENT_BOOT)
                    .await
                    .map_err(|e| {
                        Failure::new(
                            FailureKind::Failed,
                            format!("guest {}: {e}", env.guest().name()),
                        )
                    })?;
                Started::start_in_agent(&agent, &job, env.guest(), &self.queues, sandboxes.clone())
                    .await
            }
        };
        let (started, (inputs, outputs)) = started.map_err(|f| {
            let kind = match f.kind {
                ErrorKind::Refused => FailureKind::Refused,
                ErrorKind::Setup => FailureKind::Input,
                _ => FailureKind::Failed,
            };
            Failure::new(kind, f.cause)
        })?;
        let w = InGuest {
            started,
            remote_outputs: outputs,
        };
        Ok(Some((w, inputs)))
    }

    /// GridWay's pre-wrapper: the image `image` (a full id), when this node's repository lacks
    /// it, fetched from one of `from` (the nodes that serve it), in order, and kept only if
    /// its bytes hash to the id.
    async fn pre_wrapper(
        &self,
        os: &Arc<crate::environment::NodeOs>,
        image: &str,
        from: &[crate::proto::Member],
    ) -> Result<(), Failure> {
        let Ok(id) = image.parse::<mvm_os::image::ImageId>() else {
            return Ok(()); // not a full id: resolved in the repository, or refused there
        };
        if from.is_empty() || os.repo.get(&id).is_ok() {
            return Ok(());
        }
        let mut last = String::from("no node serves it");
        for m in from.iter().filter(|m| m.peer != self.site.peer()) {
            let started = std::time::Instant::now();
            let repo = &os.repo;
            match crate::client::fetch_image_from(&self.site.net, m.peer, &m.addrs, &id, repo).await
            {
                Ok(i) => {
                    tracing::info!(image = %id, from = %m.peer, bytes = i.size, ms = started.elapsed().as_millis() as u64, "image fetched before the job");
                    return Ok(());
                }
                Err(f) => last = format!("{}: {}", m.peer, f.message),
            }
        }
        Err(Failure::new(
            FailureKind::Failed,
            format!(
                "node {}: image {id} is not here and could not be fetched: {last}",
                self.site.name
            ),
        ))
    }

    /// The checkpoint blob `hash`, fetched from the broker `from`, checked against its hash.
    async fn fetch_checkpoint(
        &self,
        from: PeerId,
        spec: &PartSpec,
        hash: &Hash,
    ) -> Result<bytes::Bytes, Failure> {
        let failed = |m: String| {
            Failure::new(
                FailureKind::Failed,
                format!("checkpoint {hash} of job {}: {m}", spec.job),
            )
        };
        let request = Request::Node(NodeRequest::FetchCheckpoint { hash: *hash });
        let blob = match self.site.call(from, &[], request).await {
            Ok(Response::Checkpoint { blob, .. }) => blob,
            Ok(_) => return Err(failed("the broker sent no checkpoint".into())),
            Err(e) => return Err(failed(format!("cannot fetch it: {e}"))),
        };
        if Hash::of(&blob) != *hash {
            return Err(failed("it does not match its hash".into()));
        }
        Ok(blob)
    }
}

/// A hold for each of a part's remote outputs, keyed by its vertex, port and the peer of the
/// part it goes to.
fn holds(
    outputs: &[mvm_component::runtime::RemoteOutput],
    parts: &[(PeerId, Vec<libp2p::Multiaddr>)],
) -> Vec<(InputKey, Hold)> {
    outputs
        .iter()
        .map(|o| {
            (
                (o.vertex.clone(), o.port.clone(), parts[o.to].0),
                Hold::new(),
            )
        })
        .collect()
}

/// A part's remote inputs by their key: the local vertex and port, and the peer of the part
/// that feeds it.
fn by_key(
    remote_inputs: Vec<RemoteInput>,
    parts: &[(PeerId, Vec<libp2p::Multiaddr>)],
) -> HashMap<InputKey, mvm_queue::queue::Sender<bytes::Bytes>> {
    remote_inputs
        .into_iter()
        .map(|i| ((i.vertex, i.port, parts[i.from].0), i.sender))
        .collect()
}
