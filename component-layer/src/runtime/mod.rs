//! Runs a topology's vertices as WebAssembly jobs on this node.
//!
//! Modules (`.wasm` or `.wat`) are compiled at run time and cached by content hash ([`cache`]).
//! Every vertex is an instance in a pooling allocator, run as a tokio task: an epoch ticker
//! makes each guest yield to the executor every tick, so thousands of vertices share a few
//! threads. Each input port of a vertex gets a queue from the node's
//! [`Controller`](mvm_queue::Controller); output ports feed the queues of the ports their
//! channels lead to; the job reaches them only through the [`abi`] by port name.

pub mod abi;
pub mod cache;
pub mod checkpoint;
mod dedicated;
pub mod logs;
mod ticker;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mvm_queue::Controller;
use mvm_queue::queue::Stats;
use mvm_queue::queue::{Receiver, Sender};
use parking_lot::Mutex;
use wasmtime::{
    Engine, InstanceAllocationStrategy, InstancePre, Linker, PoolingAllocationConfig, Store,
    UpdateDeadline,
};
use wasmtime_wasi::I32Exit;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

use crate::topology::Topology;
use abi::{InPort, OutPort, VertexIo, VertexState};
pub use cache::{ModuleCache, Source};
use checkpoint::pause::{PauseCtl, Pausing};
use checkpoint::{Count, PartControl, PartImage, VertexImage, VertexPhase};
use dedicated::Dedicated;
/// A compiled module (wasmtime's).
pub use wasmtime::Module;

/// How long a vertex waits for an instance slot of the pool before it fails: slots free as the
/// vertices of ended jobs stop.
const POOL_WAIT: Duration = Duration::from_secs(10);

/// How a node's runtime is set up.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where compiled modules are kept between runs; `None` keeps them in memory only.
    pub cache_dir: Option<PathBuf>,
    /// The most vertices running at once on this node (pool slots).
    pub max_instances: u32,
    /// The largest linear memory one vertex may have.
    pub max_memory_bytes: usize,
    /// The epoch tick: how often a running guest yields, and the unit of CPU limits.
    pub tick: Duration,
    /// Threads kept for parts whose vertices fit them, one vertex per thread (0: every vertex
    /// runs on the caller's tokio pool). Defaults to the number of cores.
    pub dedicated_threads: usize,
    /// How long a receive on a dedicated thread polls its queue before it parks.
    pub spin: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            cache_dir: None,
            max_instances: 4096,
            max_memory_bytes: 64 << 20,
            tick: Duration::from_millis(5),
            dedicated_threads: std::thread::available_parallelism().map_or(1, usize::from),
            spin: Duration::from_micros(100),
        }
    }
}

/// Per-vertex limits of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory per vertex.
    pub memory_bytes: usize,
    /// CPU time per vertex (counted in epoch ticks spent running guest code).
    pub cpu: Option<Duration>,
    /// Wall time per vertex.
    pub wall: Option<Duration>,
    /// Bytes of log lines kept per vertex until they are shipped ([`logs::LogBook`]).
    pub log_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 16 << 20,
            cpu: None,
            wall: None,
            log_bytes: logs::DEFAULT_BOUND,
        }
    }
}

/// A policy's refusal of a job's part: the vertex it is about (empty: the whole part) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The vertex, or empty.
    pub vertex: String,
    /// Why.
    pub reason: String,
}

/// Decides whether a job's part may be instantiated on this node; called once with the
/// vertices that would run here, before anything is created.
pub trait PolicyHook: Send + Sync {
    /// `Err` denies the whole part.
    ///
    /// # Errors
    /// The refusal.
    fn check(&self, job: &JobSpec<'_>, local: &[usize]) -> Result<(), Refusal>;
}

/// A policy that allows everything (`mvm run` on one's own machine, benchmarks).
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl PolicyHook for AllowAll {
    fn check(&self, _job: &JobSpec<'_>, _local: &[usize]) -> Result<(), Refusal> {
        Ok(())
    }
}

/// A job to run: a topology, a module per component, parameters, limits.
#[derive(Debug, Clone)]
pub struct JobSpec<'a> {
    /// The job's id (queue names are scoped by it).
    pub id: String,
    /// The topology.
    pub topology: &'a Topology,
    /// The module of each component name.
    pub modules: HashMap<String, Module>,
    /// Job parameters (a vertex attribute of the same name overrides one).
    pub params: BTreeMap<String, String>,
    /// Limits per vertex.
    pub limits: Limits,
    /// Who submitted it, as its certificate says (none: a job run locally).
    pub owner: Option<crate::policy::Principal>,
    /// Each vertex's sandbox directory (see [`crate::files`]), preopened as its WASI `.`: the
    /// only files it can reach. A vertex without one reaches no files.
    pub sandboxes: BTreeMap<String, std::path::PathBuf>,
}

/// What one vertex did.
#[derive(Debug, Clone)]
pub struct VertexReport {
    /// The vertex.
    pub vertex: String,
    /// What it wrote to stdout.
    pub stdout: Bytes,
    /// What it moved on each edge out of it and took from each input port, over its whole
    /// life (a restored vertex counts on from its checkpoint).
    pub counts: checkpoint::VertexCounts,
}

/// What a job did.
#[derive(Debug, Clone)]
pub struct JobReport {
    /// Each vertex, in topology order.
    pub vertices: Vec<VertexReport>,
    /// The final stats of the job's queues.
    pub queues: Vec<Stats>,
    /// Time from the first instantiation to the last vertex's end.
    pub wall: Duration,
}

/// A job that failed: the vertex, the kind of failure and the cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("vertex '{vertex}': {cause}")]
pub struct JobError {
    /// The vertex that failed first.
    pub vertex: String,
    /// Why, for people.
    pub cause: String,
    /// What kind of failure it was.
    pub kind: ErrorKind,
}

impl JobError {
    /// Whether a policy refused it (nothing ran).
    pub fn denied(&self) -> bool {
        self.kind == ErrorKind::Refused
    }
}

/// What kind of failure ended a job, or kept it from running: what a user or a retry policy
/// decides by (a trap is the job's own fault and fails again; a lost node is not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The vertex's code trapped (a WebAssembly trap: unreachable, out of bounds, …).
    Trap,
    /// It exited with a non-zero status.
    Exit(i32),
    /// It used up its CPU-time limit.
    CpuLimit,
    /// The part ran past its wall-time limit.
    WallLimit,
    /// It tried to grow its linear memory past its limit.
    Memory,
    /// A policy refused it; nothing ran.
    Refused,
    /// It could not be set up: a module that does not instantiate or export an entry point, a
    /// queue the controller refused, a bad placement.
    Setup,
    /// A node that held a part of it stopped answering, or a channel between two nodes broke.
    Lost,
    /// Its output files could not all be taken back: over their bound, unreadable, or not
    /// delivered.
    Files,
    /// Anything else: a broken remote channel, a failed task.
    Other,
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorKind::Trap => f.write_str("trap"),
            ErrorKind::Exit(status) => write!(f, "exit {status}"),
            ErrorKind::CpuLimit => f.write_str("cpu-limit"),
            ErrorKind::WallLimit => f.write_str("wall-limit"),
            ErrorKind::Memory => f.write_str("memory"),
            ErrorKind::Refused => f.write_str("refused"),
            ErrorKind::Setup => f.write_str("setup"),
            ErrorKind::Lost => f.write_str("lost"),
            ErrorKind::Files => f.write_str("files"),
            ErrorKind::Other => f.write_str("other"),
        }
    }
}

/// A runtime could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the WebAssembly runtime: {0}")]
pub struct RuntimeError(String);

/// Bytes of each pool slot's linear memory, and of its table, kept resident when its vertex
/// ends, zeroed with `memset` rather than given back with `madvise` (what lies beyond is
/// still given back). A part's vertices end on several threads at once, and each `madvise`
/// there flushes the other threads' TLBs: with this, 1,000 one-page vertices took 2.9 us
/// each against 4.0 (bare wasmtime in one thread: 2.85 against 3.1). The cost: up to twice
/// this (memory and table) resident per slot ever used, 8 MiB for 64 slots.
const KEEP_RESIDENT: usize = 64 << 10;

struct Inner {
    engine: Engine,
    linker: Linker<VertexState>,
    /// The linker of checkpointable modules, whose `recv`, `send` and `yield` can pause.
    pausable_linker: Linker<VertexState>,
    tick: Duration,
    dedicated: Dedicated,
    spin: Duration,
    /// The largest linear memory a vertex may have (the engine's memory reservation).
    max_memory: usize,
}

/// A node's WebAssembly runtime.
pub struct Runtime {
    inner: Arc<Inner>,
    cache: ModuleCache,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// The CPU limit was reached.
#[derive(Debug)]
struct CpuLimit(Duration);

impl std::fmt::Display for CpuLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CPU limit of {:?} exceeded", self.0)
    }
}

impl std::error::Error for CpuLimit {}

/// The memory limit was reached.
#[derive(Debug)]
struct MemoryLimit {
    limit: usize,
    desired: usize,
}

impl std::fmt::Display for MemoryLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "memory limit of {} bytes reached (growing to {} bytes)",
            self.limit, self.desired
        )
    }
}

impl std::error::Error for MemoryLimit {}

/// A vertex store's resource limiter: one instance, linear memory up to the vertex's limit
/// (growing past it fails the vertex with [`MemoryLimit`]).
pub(crate) struct Limiter {
    memory: usize,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory {
            return Err(wasmtime::Error::new(MemoryLimit {
                limit: self.memory,
                desired,
            }));
        }
        Ok(maximum.is_none_or(|m| desired <= m))
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(maximum.is_none_or(|m| desired <= m))
    }

    fn instances(&self) -> usize {
        1
    }
}

impl Runtime {
    /// Sets up the engine (pooling allocator, epoch interruption), the linker and the cache, and
    /// starts the epoch ticker.
    ///
    /// # Errors
    /// The engine cannot be configured (e.g. the pool cannot be reserved).
    pub fn new(config: &RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let err = |e: wasmtime::Error| RuntimeError(format!("{e:#}"));
        let mut pool = PoolingAllocationConfig::default();
        pool.total_core_instances(config.max_instances)
            .total_memories(config.max_instances)
            .total_tables(config.max_instances)
            // A pausable vertex pausing calls Asyncify's `start_unwind` from inside its import:
            // a second fiber while its own is live. Stacks are reserved, not committed.
            .total_stacks(config.max_instances.saturating_mul(2))
            .max_memory_size(config.max_memory_bytes)
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(KEEP_RESIDENT);
        let mut c = wasmtime::Config::new();
        c.epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_reservation(config.max_memory_bytes as u64)
            .memory_guard_size(64 << 10)
            .async_stack_size(512 << 10)
            .max_wasm_stack(256 << 10);
        let engine = Engine::new(&c).map_err(err)?;
        let mut linker = Linker::new(&engine);
        abi::add_to_linker(&mut linker, false).map_err(err)?;
        let mut pausable_linker = Linker::new(&engine);
        abi::add_to_linker(&mut pausable_linker, true).map_err(err)?;
        let cache = ModuleCache::new(engine.clone(), config.cache_dir.clone());
        let inner = Arc::new(Inner {
            engine,
            linker,
            pausable_linker,
            tick: config.tick,
            dedicated: Dedicated::new(config.dedicated_threads),
            spin: config.spin,
            max_memory: config.max_memory_bytes,
        });
        ticker::tick(Arc::downgrade(&inner), config.tick)
            .map_err(|e| RuntimeError(format!("cannot start the epoch ticker: {e}")))?;
        Ok(Runtime { inner, cache })
    }

    /// The module cache.
    pub fn cache(&self) -> &ModuleCache {
        &self.cache
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The largest linear memory a vertex may have ([`RuntimeConfig::max_memory_bytes`]).
    pub fn max_memory_bytes(&self) -> usize {
        self.inner.max_memory
    }

    /// A module compiled by another runtime of this program with the same
    /// [`RuntimeConfig::max_memory_bytes`], from the bytes of its `Module::serialize` (a node
    /// hands its compiled modules to the worker that runs a part in a guest).
    ///
    /// # Safety
    /// `bytes` must be what `Module::serialize` gave in this same program, handed over by a
    /// trusted party (the node that started this process, over its pipe): compiled code is
    /// run as it is.
    ///
    /// # Errors
    /// The bytes are not a compiled module, or were compiled with other engine settings.
    pub unsafe fn compiled(&self, bytes: &[u8]) -> Result<Module, RuntimeError> {
        // SAFETY: the caller vouches for the bytes (see above); wasmtime checks that they were
        // compiled by a compatible engine.
        unsafe { Module::deserialize(&self.inner.engine, bytes) }
            .map_err(|e| RuntimeError(format!("a compiled module that does not load: {e:#}")))
    }

    /// Runs a whole job on this node: checks policy for every vertex, creates the queues,
    /// instantiates and runs every vertex, and destroys the queues at the end (also on failure).
    ///
    /// # Errors
    /// The first vertex that failed (trap, limit, bad import, non-zero exit), or a refusal; the
    /// other vertices are cancelled.
    pub async fn run(
        &self,
        job: &JobSpec<'_>,
        queues: &Controller,
        policy: &dyn PolicyHook,
    ) -> Result<JobReport, JobError> {
        let here = vec![0; job.topology.vertices.len()];
        let prepared = self.prepare_echo(job, queues, policy, &here, 0, true)?;
        let result = prepared.run().await;
        let stats = queues.destroy_job(&job.id);
        result.map(|report| JobReport {
            queues: stats,
            ..report
        })
    }

    /// Prepares this node's part of a job placed over several nodes: `placement[v]` is the part
    /// (node) that runs vertex `v`, and `here` is this node's part.
    ///
    /// Checks policy and modules for the local vertices, creates the queue of every local input
    /// port, and an outbox queue for every remote input port that a local vertex sends to. The
    /// caller connects the returned [`Prepared::remote_inputs`] and
    /// [`Prepared::remote_outputs`] to the other parts, then calls [`Prepared::run`]. On error,
    /// nothing is left in `queues`.
    ///
    /// # Errors
    /// A missing module, a refusal by `policy`, or a queue the controller refuses.
    pub fn prepare(
        &self,
        job: &JobSpec<'_>,
        queues: &Controller,
        policy: &dyn PolicyHook,
        placement: &[usize],
        here: usize,
    ) -> Result<Prepared, JobError> {
        self.prepare_echo(job, queues, policy, placement, here, false)
    }

    /// As [`Runtime::prepare`]; with `echo`, the vertices' stderr goes to this process's too.
    fn prepare_echo(
        &self,
        job: &JobSpec<'_>,
        queues: &Controller,
        policy: &dyn PolicyHook,
        placement: &[usize],
        here: usize,
        echo: bool,
    ) -> Result<Prepared, JobError> {
        let t = job.topology;
        if placement.len() != t.vertices.len() {
            return Err(JobError {
                vertex: String::new(),
                cause: format!(
                    "the placement names {} vertices, the topology has {}",
                    placement.len(),
                    t.vertices.len()
                ),
                kind: ErrorKind::Setup,
            });
        }
        let local = |v: usize| placement[v] == here;
        for (v, vertex) in t.vertices.iter().enumerate().filter(|(v, _)| local(*v)) {
            if !job.modules.contains_key(&vertex.component) {
                return Err(JobError {
                    vertex: t.vertices[v].name.clone(),
                    cause: format!("no module for component '{}'", vertex.component),
                    kind: ErrorKind::Setup,
                });
            }
        }
        let here_vertices: Vec<usize> = (0..t.vertices.len()).filter(|v| local(*v)).collect();
        policy.check(job, &here_vertices).map_err(|r| JobError {
            vertex: r.vertex,
            cause: format!("refused by policy: {}", r.reason),
            kind: ErrorKind::Refused,
        })?;
        match wire(job, queues, placement, here) {
            Ok((ios, remote_inputs, remote_outputs, part_queues)) => {
                let vertices: Vec<Local> = ios
                    .into_iter()
                    .map(|(v, io)| {
                        let module = job.modules[&t.vertices[v].component].clone();
                        Local {
                            v,
                            io,
                            module,
                            from: None,
                        }
                    })
                    .collect();
                // A part whose every module was made checkpointable can be paused.
                let control = (!vertices.is_empty()
                    && vertices
                        .iter()
                        .all(|l| checkpoint::is_instrumented(&l.module)))
                .then(|| PartControl {
                    ctl: PauseCtl::new(vertices.len()),
                    job: job.id.clone(),
                    names: vertices
                        .iter()
                        .map(|l| t.vertices[l.v].name.clone())
                        .collect(),
                    queues: part_queues,
                });
                let mut vertices = vertices;
                if let Some(c) = &control {
                    for l in &mut vertices {
                        l.io.pause = Some(c.ctl.clone());
                    }
                }
                let book = logs::LogBook::new(
                    vertices
                        .iter()
                        .map(|l| t.vertices[l.v].name.clone())
                        .collect(),
                    job.limits.log_bytes,
                    echo,
                );
                for (slot, l) in vertices.iter_mut().enumerate() {
                    l.io.log = Some(logs::VertexLog {
                        book: book.clone(),
                        slot,
                    });
                }
                Ok(Prepared {
                    inner: self.inner.clone(),
                    names: t.vertices.iter().map(|v| v.name.clone()).collect(),
                    vertices,
                    limits: job.limits,
                    stream_links: !remote_inputs.is_empty() || !remote_outputs.is_empty(),
                    remote_inputs,
                    remote_outputs,
                    control,
                    logs: book,
                })
            }
            Err(e) => {
                queues.destroy_job(&job.id);
                Err(e)
            }
        }
    }
}

/// Items that arrive from another part of the job into a local input port.
#[derive(Debug)]
pub struct RemoteInput {
    /// The local vertex.
    pub vertex: String,
    /// Its input port.
    pub port: String,
    /// The part the items come from.
    pub from: usize,
    /// Feeds the port's queue; the queue ends once this and every other sender is dropped.
    pub sender: Sender<Bytes>,
}

/// Items that local vertices send to an input port in another part of the job.
#[derive(Debug)]
pub struct RemoteOutput {
    /// The remote vertex.
    pub vertex: String,
    /// Its input port.
    pub port: String,
    /// The part that runs it.
    pub to: usize,
    /// Takes from the outbox queue (already encoded by the port's codec); it ends when every
    /// local sender has finished.
    pub receiver: Receiver<Bytes>,
}

/// A local vertex of a part: its place in the topology, its ports, its module, and the state
/// it is restored from.
struct Local {
    v: usize,
    io: VertexIo,
    module: Module,
    from: Option<VertexImage>,
}

/// A node's part of a job, wired and ready to run.
pub struct Prepared {
    inner: Arc<Inner>,
    names: Vec<String>,
    vertices: Vec<Local>,
    limits: Limits,
    /// Pauses it, when every module of it was made checkpointable.
    control: Option<PartControl>,
    /// Ports fed from other parts, one per (local port, source part).
    pub remote_inputs: Vec<RemoteInput>,
    /// Outboxes to other parts, one per (remote port, destination part).
    pub remote_outputs: Vec<RemoteOutput>,
    /// It has links with other parts, and they are not known to be direct.
    stream_links: bool,
    /// What its vertices write, line by line.
    logs: Arc<logs::LogBook>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("vertices", &self.vertices.len())
            .field("remote_inputs", &self.remote_inputs)
            .field("remote_outputs", &self.remote_outputs)
            .finish_non_exhaustive()
    }
}

impl Prepared {
    /// The local vertices, in topology order.
    pub fn vertices(&self) -> impl Iterator<Item = &str> {
        self.vertices.iter().map(|l| self.names[l.v].as_str())
    }

    /// What its vertices write while they run (stdout, stderr, `mvm.log`), line by line: take
    /// the lines from it as they come; the unfinished last ones are ended when the part ends.
    pub fn logs(&self) -> Arc<logs::LogBook> {
        self.logs.clone()
    }

    /// What pauses this part and reads its state, when every module of it was made
    /// checkpointable ([`ModuleCache::load_checkpointable`]).
    pub fn control(&self) -> Option<PartControl> {
        self.control.clone()
    }

    /// Makes this part start from `image` instead of from the beginning: each vertex from its
    /// saved state (a vertex that had ended stays ended, with its output), each queue with its
    /// saved items. Call before [`Prepared::run`], with the queues still empty.
    ///
    /// # Errors
    /// The part is not checkpointable, or the image is not of this part (another job, a
    /// vertex or queue it does not have, or one of its vertices missing).
    pub fn restore(&mut self, image: &PartImage) -> Result<(), JobError> {
        let setup = |vertex: &str, cause: String| JobError {
            vertex: vertex.to_owned(),
            cause,
            kind: ErrorKind::Setup,
        };
        let Some(control) = &self.control else {
            return Err(setup(
                "",
                "this part's modules were not made checkpointable".into(),
            ));
        };
        if image.job != control.job {
            return Err(setup(
                "",
                format!(
                    "the checkpoint is of job {}, not {}",
                    image.job, control.job
                ),
            ));
        }
        for vi in &image.vertices {
            if !self.vertices.iter().any(|l| self.names[l.v] == vi.vertex) {
                return Err(setup(
                    &vi.vertex,
                    "the checkpoint has a vertex this part does not run".into(),
                ));
            }
        }
        let mut queues = Vec::new();
        for qi in &image.queues {
            let Some((_, q)) = control.queues.iter().find(|(n, _)| *n == qi.name) else {
                return Err(setup(
                    "",
                    format!(
                        "the checkpoint has a queue '{}' this part does not",
                        qi.name
                    ),
                ));
            };
            queues.push((q, qi));
        }
        for l in &mut self.vertices {
            let name = &self.names[l.v];
            let Some(vi) = image.vertices.iter().find(|vi| vi.vertex == *name) else {
                return Err(setup(
                    name,
                    "the checkpoint does not have this vertex".into(),
                ));
            };
            l.from = Some(vi.clone());
        }
        // Its vertices' lines before were numbered where it ran then.
        self.logs.start_epoch(logs::now_ms());
        for (q, qi) in queues {
            q.requeue(
                qi.items
                    .iter()
                    .map(|(item, priority)| mvm_queue::queue::Entry::new(item.clone(), *priority)),
            );
        }
        Ok(())
    }

    /// Says that this part's links with other parts are direct links, which its vertices
    /// drive themselves ([`mvm_queue::remote::direct`]): a receive that polls reads a link's
    /// items itself, so receives poll every input port, and the part runs on dedicated threads
    /// when they are free, as a part whose vertices pass items among themselves does.
    ///
    /// Without this, a part linked to others stays on the shared pool: its links are streams,
    /// whose exporter and importer are tasks on the pool, and vertices on dedicated threads
    /// hand items to and from such tasks through a wake-up across threads each time. Measured
    /// (a pipeline of two parts of two vertices over a loopback stream, 100,000 items, 2 cores):
    /// 7.0 s with the sending part on dedicated threads, 1.4 s with the receiving one, 0.68 s
    /// with both on the pool.
    pub fn direct_remote_links(&mut self) {
        self.stream_links = false;
        for l in &mut self.vertices {
            for (_, port) in &mut l.io.inputs.0 {
                port.local = true;
            }
        }
    }

    /// Instantiates and runs the local vertices to their end. Take the remote endpoints out
    /// first: this does not wait for them. The queues are left in the controller (the caller
    /// destroys them once the remote endpoints are done); [`JobReport::queues`] is empty.
    ///
    /// # Errors
    /// The first vertex that failed; the other local vertices are cancelled.
    pub async fn run(self) -> Result<JobReport, JobError> {
        let logs = self.logs.clone();
        let r = self.run_vertices().await;
        logs.finish();
        r
    }

    /// As [`Prepared::run`], before the vertices' unfinished lines are ended.
    async fn run_vertices(self) -> Result<JobReport, JobError> {
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        let mut tasks = HashMap::new();
        let count = self.vertices.len();
        // Imports are resolved once per module, not once per vertex.
        let mut pres: Vec<(Module, InstancePre<VertexState>)> = Vec::new();
        let mut slots = vec![0; count];
        // A thread per vertex when the part fits the free dedicated threads and its vertices
        // pass items among themselves. A part fed only from other nodes stays on the pool: there
        // a poll cannot win, and the node's network tasks hand items over on the same worker.
        // So does a part with a stream link ([`Prepared::direct_remote_links`]).
        let passes = !self.stream_links
            && self
                .vertices
                .iter()
                .any(|l| l.io.inputs.0.iter().any(|(_, p)| p.local));
        let mut threads = if passes {
            self.inner.dedicated.take(count).unwrap_or_default()
        } else {
            Vec::new()
        };
        let ctl = self.control.as_ref().map(|c| c.ctl.clone());
        let mut ended = Vec::new();
        for (slot, local) in self.vertices.into_iter().enumerate() {
            let Local {
                v,
                io,
                module,
                from,
            } = local;
            slots[slot] = v;
            // A vertex that had ended at the checkpoint does not run again: its output is
            // kept, and its ports close now.
            if let Some(VertexImage {
                phase: VertexPhase::Ended,
                stdout,
                counts,
                ..
            }) = from
            {
                if let Some(ctl) = &ctl {
                    ctl.ended(slot, stdout.clone(), counts.clone());
                }
                ended.push((slot, v, stdout, counts));
                continue;
            }
            let pausing = ctl.as_ref().map(|ctl| (ctl.clone(), slot));
            let pre = match pres.iter().find(|(m, _)| Module::same(m, &module)) {
                Some((_, p)) => p.clone(),
                None => match if ctl.is_some() {
                    &self.inner.pausable_linker
                } else {
                    &self.inner.linker
                }
                .instantiate_pre(&module)
                {
                    Ok(p) => {
                        pres.push((module, p.clone()));
                        p
                    }
                    Err(e) => {
                        set.abort_all();
                        self.inner.dedicated.give_back(threads);
                        return Err(JobError {
                            vertex: self.names[v].clone(),
                            cause: format!("cannot instantiate: {e:#}"),
                            kind: ErrorKind::Setup,
                        });
                    }
                },
            };
            let inner = self.inner.clone();
            let limits = self.limits;
            let start = Start { pausing, from };
            let handle = match threads.pop() {
                Some(thread) => {
                    set.spawn(on_thread(thread, slot, v, inner, pre, io, limits, start))
                }
                // Boxed: the vertex's future is a few KiB, and a task moves its future more
                // than once as it is spawned.
                None => set.spawn(Box::pin(async move {
                    let r = run_vertex(&inner, &pre, io, limits, Duration::ZERO, start).await;
                    (slot, v, r)
                })),
            };
            tasks.insert(handle.id(), v);
        }
        self.inner.dedicated.give_back(threads);
        let names = &self.names;
        let mut reports: Vec<Option<VertexReport>> = vec![None; count];
        for (slot, v, stdout, counts) in ended {
            reports[slot] = Some(VertexReport {
                vertex: names[v].clone(),
                stdout,
                counts,
            });
        }
        let mut failure: Option<(Instant, JobError)> = None;
        // Once a vertex failed: when the others are stopped (see `SETTLE`).
        let mut settle: Option<tokio::time::Instant> = None;
        let mut stopped = false;
        // One deadline for the part's wall-time limit (its vertices start together), not a
        // timer per vertex.
        let wall = self.limits.wall;
        let deadline = tokio::time::sleep(wall.unwrap_or(Duration::from_secs(1 << 40)));
        tokio::pin!(deadline);
        loop {
            let settled = async {
                match settle {
                    Some(t) if !stopped => tokio::time::sleep_until(t).await,
                    _ => std::future::pending().await,
                }
            };
            let joined = tokio::select! {
                j = set.join_next_with_id() => j,
                () = settled => {
                    set.abort_all();
                    stopped = true;
                    continue;
                }
                () = &mut deadline, if wall.is_some() => {
                    set.abort_all();
                    let slot = reports.iter().position(Option::is_none).unwrap_or(0);
                    failure.get_or_insert((Instant::now(), JobError {
                        vertex: names[slots[slot]].clone(),
                        cause: format!(
                            "wall-time limit of {:?} exceeded",
                            wall.unwrap_or_default()
                        ),
                        kind: ErrorKind::WallLimit,
                    }));
                    break;
                }
            };
            let Some(joined) = joined else { break };
            let (slot, v, result) = match joined {
                Ok((_, r)) => r,
                Err(e) => {
                    // A task that panicked or was aborted: name its vertex from the task id.
                    let vertex = tasks
                        .get(&e.id())
                        .map_or_else(|| "?".to_owned(), |&v| names[v].clone());
                    failure.get_or_insert((
                        Instant::now(),
                        JobError {
                            vertex,
                            cause: format!("task failed: {e}"),
                            kind: ErrorKind::Other,
                        },
                    ));
                    settle.get_or_insert_with(|| tokio::time::Instant::now() + SETTLE);
                    continue;
                }
            };
            match result {
                Ok((stdout, counts)) => {
                    reports[slot] = Some(VertexReport {
                        vertex: names[v].clone(),
                        stdout,
                        counts,
                    });
                }
                Err(f) => {
                    if failure.as_ref().is_none_or(|(at, _)| f.at < *at) {
                        let e = JobError {
                            vertex: names[v].clone(),
                            cause: f.cause,
                            kind: f.kind,
                        };
                        failure = Some((f.at, e));
                    }
                    settle.get_or_insert_with(|| tokio::time::Instant::now() + SETTLE);
                }
            }
        }
        if let Some((_, f)) = failure {
            return Err(f);
        }
        Ok(JobReport {
            vertices: reports.into_iter().flatten().collect(),
            queues: Vec::new(),
            wall: start.elapsed(),
        })
    }
}

/// The local vertices' ports, the endpoints to other parts, and the part's queues by name.
type Wired = (
    Vec<(usize, VertexIo)>,
    Vec<RemoteInput>,
    Vec<RemoteOutput>,
    Vec<(String, mvm_queue::queue::Queue<Bytes>)>,
);

/// Creates the queues of this part and every local vertex's ports.
fn wire(
    job: &JobSpec<'_>,
    queues: &Controller,
    placement: &[usize],
    here: usize,
) -> Result<Wired, JobError> {
    let t = job.topology;
    let local = |v: usize| placement[v] == here;
    let qname = |v: usize, port: &str| format!("{}:{port}", t.vertices[v].name);
    let fail = |v: usize, e: mvm_queue::controller::ControllerError| JobError {
        vertex: t.vertices[v].name.clone(),
        cause: e.to_string(),
        kind: ErrorKind::Setup,
    };
    // One queue per local input port, every channel into it shares it; one outbox per remote
    // input port that a local vertex sends to.
    let index = t.port_index();
    let mut handles = HashMap::new();
    let mut remote_inputs = Vec::new();
    let mut remote_outputs = Vec::new();
    for (v, ports) in index.iter().enumerate() {
        for (port, chans) in &ports.inputs {
            if local(v) {
                let h = queues
                    .create(&job.id, &qname(v, port), &chans[0].queue)
                    .map_err(|e| fail(v, e))?;
                let mut from: Vec<usize> = chans
                    .iter()
                    .map(|c| placement[c.from.vertex])
                    .filter(|&p| p != here)
                    .collect();
                from.sort_unstable();
                from.dedup();
                remote_inputs.extend(from.into_iter().map(|from| RemoteInput {
                    vertex: t.vertices[v].name.clone(),
                    port: (*port).to_owned(),
                    from,
                    sender: h.queue.sender(),
                }));
                handles.insert((v, *port), h);
            } else if chans.iter().any(|c| local(c.from.vertex)) {
                let h = queues
                    .create(&job.id, &format!("{}>out", qname(v, port)), &chans[0].queue)
                    .map_err(|e| fail(v, e))?;
                remote_outputs.push(RemoteOutput {
                    vertex: t.vertices[v].name.clone(),
                    port: (*port).to_owned(),
                    to: placement[v],
                    receiver: h.queue.receiver(),
                });
                handles.insert((v, *port), h);
            }
        }
    }
    let mut ios = Vec::new();
    let params = Arc::new(job.params.clone());
    for (v, vertex) in t.vertices.iter().enumerate().filter(|(v, _)| local(*v)) {
        let mut inputs = Vec::new();
        let mut outputs = Vec::new();
        for (port, chans) in &index[v].inputs {
            let h = &handles[&(v, *port)];
            inputs.push((
                Box::<str>::from(*port),
                InPort {
                    rx: h.queue.receiver(),
                    codec: h.codec.clone(),
                    kept: Mutex::new(None),
                    local: chans.iter().all(|c| local(c.from.vertex)),
                },
            ));
        }
        // Counts: one per input port, then one per output channel.
        let mut first = inputs.len();
        for (port, chans) in &index[v].outputs {
            let channels = chans
                .iter()
                .map(|c| {
                    let h = &handles[&(c.to.vertex, c.to.port.as_str())];
                    (h.queue.sender(), h.codec.clone())
                })
                .collect();
            outputs.push((Box::<str>::from(*port), OutPort { channels, first }));
            first += chans.len();
        }
        ios.push((
            v,
            VertexIo {
                vertex: vertex.name.clone(),
                component: vertex.component.clone(),
                attributes: vertex.attributes.clone(),
                params: params.clone(),
                inputs: abi::Ports(inputs),
                outputs: abi::Ports(outputs),
                pause: None,
                log: None,
                prefix: job.id.len() + 1,
                sandbox: job.sandboxes.get(&vertex.name).cloned(),
            },
        ));
    }
    // Named within the job (`vertex:port`, `vertex:port>out`): an image of the part fits the
    // same part prepared under another namespace (another run of the job).
    let prefix = format!("{}/", job.id);
    let mut part_queues: Vec<(String, mvm_queue::queue::Queue<Bytes>)> = handles
        .values()
        .map(|h| {
            let name = h.queue.name();
            let name = name.strip_prefix(prefix.as_str()).unwrap_or(name);
            (name.to_owned(), h.queue.clone())
        })
        .collect();
    part_queues.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((ios, remote_inputs, remote_outputs, part_queues))
}

/// Runs one vertex on a dedicated thread, where its receives may poll before parking; the
/// vertex is dropped there (its store and queues released) when this future is.
#[allow(
    clippy::too_many_arguments,
    reason = "what a vertex task owns, moved in whole"
)]
async fn on_thread(
    thread: dedicated::Worker,
    slot: usize,
    v: usize,
    inner: Arc<Inner>,
    pre: InstancePre<VertexState>,
    io: VertexIo,
    limits: Limits,
    start: Start,
) -> (usize, usize, Result<Output, Failed>) {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel::<()>();
    let work = Box::pin(async move {
        let spin = inner.spin;
        tokio::select! {
            r = run_vertex(&inner, &pre, io, limits, spin, start) => {
                let _ = done_tx.send(r);
            }
            _ = cancel_rx => {}
        }
    });
    if thread.run(work).is_err() {
        return (slot, v, Err(Failed::now("its dedicated thread is gone")));
    }
    let r = done_rx
        .await
        .unwrap_or_else(|_| Err(Failed::now("its dedicated thread ended without a result")));
    drop(cancel_tx);
    (slot, v, r)
}

/// Why a vertex failed, and when (its code stopped, before its queues closed): the vertex
/// that failed first is the one a job's error names, not one that failed because of it.
struct Failed {
    at: Instant,
    cause: String,
    kind: ErrorKind,
}

impl Failed {
    fn now(cause: impl Into<String>) -> Failed {
        Failed {
            at: Instant::now(),
            cause: cause.into(),
            kind: ErrorKind::Other,
        }
    }
}

/// How long a part waits, after a vertex failed, for failures that happened before it but
/// arrive after (a vertex whose queue peer failed may report first), before it stops the rest.
const SETTLE: Duration = Duration::from_millis(20);

/// What a vertex that ended leaves: its stdout and its counts.
type Output = (Bytes, checkpoint::VertexCounts);

/// How a vertex starts: the part's pause control and its slot there (a checkpointable part),
/// and the state it is restored from.
struct Start {
    pausing: Option<(Arc<PauseCtl>, usize)>,
    from: Option<VertexImage>,
}

/// Runs one vertex to its end; its stdout, or why it failed. `spin` is how long a receive may
/// poll before parking (zero on the shared pool).
async fn run_vertex(
    inner: &Inner,
    pre: &InstancePre<VertexState>,
    io: VertexIo,
    limits: Limits,
    spin: Duration,
    start: Start,
) -> Result<Output, Failed> {
    let mut stopped = None;
    let ctl = start.pausing.clone();
    let r = run_vertex_until(inner, pre, io, limits, spin, start, &mut stopped)
        .await
        .map_err(|(kind, cause)| Failed {
            at: stopped.unwrap_or_else(Instant::now),
            cause,
            kind,
        });
    if let Some((ctl, slot)) = ctl {
        match &r {
            Ok((stdout, counts)) => ctl.ended(slot, stdout.clone(), counts.clone()),
            Err(_) => ctl.failed(slot),
        }
    }
    r
}

/// As [`run_vertex`], saying in `stopped` when the vertex's code returned.
async fn run_vertex_until(
    inner: &Inner,
    pre: &InstancePre<VertexState>,
    io: VertexIo,
    limits: Limits,
    spin: Duration,
    start: Start,
    stopped: &mut Option<Instant>,
) -> Result<Output, (ErrorKind, String)> {
    let stdout = MemoryOutputPipe::new(1 << 20);
    let budget = limits
        .cpu
        .map(|d| (d.as_nanos() / inner.tick.as_nanos().max(1)).max(1));
    let cpu = limits.cpu.unwrap_or_default();
    let counts = io.inputs.0.len()
        + (io.outputs.0.iter())
            .map(|(_, p)| p.channels.len())
            .sum::<usize>();
    let io = Arc::new(io);
    let new_store = |io: Arc<VertexIo>| {
        let store_limits = Limiter {
            memory: limits.memory_bytes,
        };
        let mut store = Store::new(
            &inner.engine,
            VertexState {
                wasi: None,
                stdout: stdout.clone(),
                limits: store_limits,
                io,
                memory: None,
                spin: u32::try_from(spin.as_nanos()).unwrap_or(u32::MAX),
                stdout_before: Bytes::new(),
                counts: vec![Count::default(); counts],
                pausing: start.pausing.as_ref().map(|(_, slot)| Pausing {
                    slot: *slot,
                    seen: 0,
                    data: 0,
                    funcs: None,
                    rewinding: false,
                    unwinding: false,
                    sending: None,
                }),
            },
        );
        store.limiter(|s| &mut s.limits);
        let mut used: u128 = 0;
        store.epoch_deadline_callback(move |_| {
            used += 1;
            if budget.is_some_and(|b| used > b) {
                return Err(wasmtime::Error::new(CpuLimit(cpu)));
            }
            Ok(UpdateDeadline::Yield(1))
        });
        store.set_epoch_deadline(1);
        store
    };
    // The pool has a slot per vertex the node offers; a job being torn down may still hold
    // some (its vertices stop at their next epoch tick), so a new one waits for them a while,
    // in a fresh store each try (a failed instantiation counts against the store's limit).
    let waited = Instant::now();
    let (mut store, instance) = loop {
        let mut store = new_store(io.clone());
        match pre.instantiate_async(&mut store).await {
            Ok(i) => break (store, i),
            Err(e)
                if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
                    .is_some()
                    && waited.elapsed() < POOL_WAIT =>
            {
                drop(store);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(e) => {
                let kind = if e.downcast_ref::<MemoryLimit>().is_some() {
                    ErrorKind::Memory
                } else {
                    ErrorKind::Setup
                };
                return Err((kind, format!("cannot instantiate: {e:#}")));
            }
        }
    };
    drop(io); // the store holds the vertex's queues alone: dropping it closes them
    store.data_mut().memory = instance.get_memory(&mut store, "memory");
    let entry = instance
        .get_typed_func::<(), ()>(&mut store, "_start")
        .or_else(|_| instance.get_typed_func::<(), ()>(&mut store, "run"))
        .map_err(|_| {
            let why = "the module exports neither '_start' nor 'run'";
            (ErrorKind::Setup, why.to_owned())
        })?;
    if store.data().pausing.is_some() {
        checkpoint::attach(&mut store, &instance).map_err(|e| (ErrorKind::Setup, e))?;
        if let Some(image) = &start.from {
            checkpoint::restore(&mut store, &instance, image)
                .await
                .map_err(|e| {
                    (
                        ErrorKind::Setup,
                        format!("cannot restore its checkpoint: {e}"),
                    )
                })?;
        }
    }
    // The wall-time limit is the part's deadline, kept by `Prepared::run`.
    let mut result = entry.call_async(&mut store, ()).await;
    // A return while a pause point unwinds is a pause: the vertex is saved, waits for its part
    // to resume, and is rewound into the call it paused in.
    while result.is_ok() && store.data().pausing.as_ref().is_some_and(|p| p.unwinding) {
        let out = store.data().output();
        result = match checkpoint::pause_here(&mut store, &instance, out).await {
            Ok(()) => entry.call_async(&mut store, ()).await,
            Err(e) => Err(e),
        };
    }
    *stopped = Some(Instant::now());
    let output = (store.data().output(), store.data().traffic());
    drop(store); // closes this vertex's output queues
    match result {
        Ok(()) => Ok(output),
        Err(e) => {
            if let Some(exit) = e.downcast_ref::<I32Exit>() {
                return if exit.0 == 0 {
                    Ok(output)
                } else {
                    Err((
                        ErrorKind::Exit(exit.0),
                        format!("exited with status {}", exit.0),
                    ))
                };
            }
            if let Some(limit) = e.downcast_ref::<CpuLimit>() {
                return Err((ErrorKind::CpuLimit, limit.to_string()));
            }
            if let Some(limit) = e.downcast_ref::<MemoryLimit>() {
                return Err((ErrorKind::Memory, limit.to_string()));
            }
            if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
                return Err((ErrorKind::Trap, format!("trapped: {trap}")));
            }
            Err((ErrorKind::Other, format!("{e:#}")))
        }
    }
}

#[cfg(test)]
mod tests;
