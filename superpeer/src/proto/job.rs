//! Jobs as submitted, placed, reported and seen.

use std::collections::BTreeMap;

use bytes::Bytes;
use mvm_component::policy::Principal;
pub use mvm_os::provision::VmMode;
use mvm_queue::queue::Config as QueueConfig;
use serde::{Deserialize, Serialize};

use super::{EdgeTraffic, ErrorKind, GuestIdentity, Hash, JobId, PortTraffic, Traffic};

/// A job profile as sent to the broker: everything resolved, files inlined, modules by hash.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Submission {
    /// The job's name.
    pub name: String,
    /// Who submits it.
    pub owner: Option<String>,
    /// Its domain.
    pub domain: Option<String>,
    /// The topology file's name (for error messages).
    pub topology_file: String,
    /// The topology file's text.
    pub topology: String,
    /// Component name → module content hash.
    pub components: BTreeMap<String, Hash>,
    /// Module bytes the broker said it lacks.
    pub modules: Vec<Bytes>,
    /// Job parameters.
    pub parameters: BTreeMap<String, String>,
    /// Queue defaults for the topology's channels.
    pub queue: QueueConfig,
    /// Per-vertex limits.
    pub limits: LimitSpec,
    /// Requirements and rank.
    pub requirements: Requirements,
    /// How many super-peers have forwarded it already (a forwarded job is not forwarded again).
    #[serde(default)]
    pub hops: u8,
    /// Set by a super-peer that forwards the job: the owner it authenticated.
    #[serde(default)]
    pub on_behalf: Option<Principal>,
    /// The serial (hex) of the certificate its owner sent it with: set by the super-peer the
    /// owner sent it to, whatever the sender wrote, and carried on when it is forwarded; what a
    /// revocation of that certificate finds the job by.
    #[serde(default)]
    pub owner_cert: Option<String>,
    /// Answer when the job has ended (or after at most [`SUBMIT_HOLD`](super::SUBMIT_HOLD)) instead of at once, so
    /// a short job takes one exchange instead of a submit and a wait.
    #[serde(default)]
    pub wait: bool,
    /// Among jobs waiting for room, higher is placed first (then earlier).
    #[serde(default)]
    pub priority: i32,
    /// How many times the job is run again from its start when a node it runs on is lost (the
    /// profile's `retries`; the CLI's default is 2). Failures of the job's own making (a trap,
    /// an exit status, a limit) are never retried. A job with a checkpoint runs again from
    /// its newest one instead.
    #[serde(default)]
    pub retries: u32,
    /// Checkpoints of the running job, when the profile asks for them.
    #[serde(default)]
    pub checkpoint: Option<CheckpointPolicy>,
    /// Input files laid out in every vertex's sandbox (uploaded before the submission, by
    /// content hash) and output files taken back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<FileSpec>,
    /// A parameter sweep: each swept parameter with its values; the job is then an array of
    /// one job per point of their product, each with those parameters laid over its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sweep: Vec<(String, Vec<String>)>,
    /// Jobs (or arrays) of this group the job waits for: it is placed once they have ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<JobId>,
    /// Jobs (or arrays) it waits for to end well: it is cancelled when one does not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after_ok: Vec<JobId>,
    /// How long the job runs, milliseconds (the profile's `estimate`): what an offer plans
    /// by, and what lets a waiting job run before a reservation (backfilling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate_ms: Option<u64>,
}

impl Submission {
    /// How many jobs it makes: the points of its sweep, or one.
    pub fn points(&self) -> u64 {
        self.sweep
            .iter()
            .fold(1u64, |n, (_, v)| n.saturating_mul(v.len() as u64))
    }
}

/// A job's files (GridWay's prolog and epilog): what is laid out in every vertex's sandbox
/// before it runs, and which of the files it leaves there are taken back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    /// Input files, by their path in the sandbox.
    pub inputs: Vec<InputFile>,
    /// Globs of output files in the sandbox ([`mvm_component::files::Patterns`]).
    pub outputs: Vec<String>,
    /// The most bytes of output files kept per vertex.
    pub output_bytes: u64,
}

impl FileSpec {
    /// The bytes of every input.
    pub fn input_bytes(&self) -> u64 {
        self.inputs
            .iter()
            .map(|i| i.size)
            .fold(0, u64::saturating_add)
    }
}

/// An input file: its path in the sandbox, content hash and size.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InputFile {
    /// Its path in every vertex's sandbox.
    pub path: String,
    /// Its content hash.
    pub hash: Hash,
    /// Its size in bytes.
    pub size: u64,
}

/// An output file a vertex left in its sandbox, taken back when its part ended.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OutputFile {
    /// The vertex.
    pub vertex: String,
    /// Its path in the vertex's sandbox.
    pub path: String,
    /// Its content hash.
    pub hash: Hash,
    /// Its size in bytes.
    pub size: u64,
}

/// How often a running job is checkpointed, and how many checkpoints are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointPolicy {
    /// Milliseconds between checkpoints.
    pub interval_ms: u64,
    /// How many stored checkpoints to keep (the newest).
    pub keep: u32,
}

/// A checkpoint of a job, as stored and recorded: a consistent cut of every part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// Its number within the job.
    pub cut: u64,
    /// The run it was taken in.
    pub attempt: u32,
    /// When it was recorded, milliseconds since the Unix epoch (the leader's clock).
    pub at_ms: u64,
    /// Each part: its vertices and its blob.
    pub parts: Vec<CutPart>,
}

impl CheckpointInfo {
    /// The bytes of all its blobs.
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes).sum()
    }
}

/// One part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutPart {
    /// The part's vertices (a run restored from the checkpoint keeps them together).
    pub vertices: Vec<String>,
    /// Its blob's content hash.
    pub blob: Hash,
    /// Its blob's size in bytes.
    pub bytes: u64,
    /// The files its vertices' sandboxes held (kept by the group's super-peers), laid out
    /// again in place of the inputs when a run is restored from it (none: its job has no
    /// files, or the checkpoint was taken before checkpoints kept them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<OutputFile>>,
}

/// Per-vertex limits, as in the profile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitSpec {
    /// Linear memory per vertex, bytes.
    pub memory_bytes: Option<u64>,
    /// CPU time per vertex, milliseconds.
    pub cpu_ms: Option<u64>,
    /// Wall time per vertex, milliseconds.
    pub wall_ms: Option<u64>,
    /// Bytes of log lines kept per vertex (`None`: the runtime's default).
    #[serde(default)]
    pub log_bytes: Option<u64>,
}

impl LimitSpec {
    /// The runtime's limits.
    ///
    /// # Errors
    /// A memory limit under 64 KiB, or over what this machine can address.
    pub fn limits(&self) -> Result<mvm_component::runtime::Limits, LimitError> {
        let mut l = mvm_component::runtime::Limits::default();
        if let Some(m) = self.memory_bytes {
            if m < MIN_MEMORY {
                return Err(LimitError::MemoryUnder(m));
            }
            l.memory_bytes = usize::try_from(m).map_err(|_| LimitError::MemoryOver(m))?;
        }
        l.cpu = self.cpu_ms.map(std::time::Duration::from_millis);
        l.wall = self.wall_ms.map(std::time::Duration::from_millis);
        if let Some(b) = self.log_bytes {
            if b > mvm_component::profile::MAX_LOG_BYTES {
                return Err(LimitError::LogsOver(b));
            }
            l.log_bytes = usize::try_from(b).map_err(|_| LimitError::LogsOver(b))?;
        }
        Ok(l)
    }
}

/// The smallest memory limit: one WebAssembly page.
const MIN_MEMORY: u64 = 64 << 10;

/// Why a job's limits cannot be enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// A memory limit under one WebAssembly page.
    #[error("a memory limit of {0} bytes is under 64KiB")]
    MemoryUnder(u64),
    /// A memory limit this machine cannot address.
    #[error("a memory limit of {0} bytes is too large for this machine")]
    MemoryOver(u64),
    /// A bound of log lines over [`mvm_component::profile::MAX_LOG_BYTES`].
    #[error("a log bound of {0} bytes per vertex is over 16MiB")]
    LogsOver(u64),
}

/// A job's budget for its nodes' CPU, spent by the broker's bidding agent (Tycoon's
/// best-response agent): the nodes and each one's bid are its best response to their prices,
/// spending the budget evenly until the deadline; it bids again as prices change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketSpec {
    /// Micro-credits.
    pub budget: u64,
    /// Over how long, milliseconds from its submission.
    pub deadline_ms: u64,
}

/// What a job needs from a node, and how to rank the nodes that have it (GridWay).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirements {
    /// An image id the node must offer.
    pub image: Option<String>,
    /// Least CPUs.
    pub vcpus: Option<u32>,
    /// Least free memory, bytes.
    pub memory_bytes: Option<u64>,
    /// Architecture (as `std::env::consts::ARCH`).
    pub arch: Option<String>,
    /// A rank expression over node properties; higher is better.
    pub rank: Option<String>,
    /// The most nodes to spread the vertices over.
    pub nodes: Option<u32>,
    /// How guests of `image` are used across jobs (`stop-start` when not given).
    #[serde(default)]
    pub vm_mode: Option<VmMode>,
    /// The CPU weight of the job's guests (1–65535; 256 when not given).
    #[serde(default)]
    pub cpu_weight: Option<u32>,
    /// The CPU cap of the job's guests, percent of one CPU (none: uncapped).
    #[serde(default)]
    pub cpu_cap: Option<u32>,
    /// The job's bid for its nodes' CPU, micro-credits per CPU-second its guests use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bid: Option<u64>,
    /// A budget its broker's agent spends on its nodes' CPU instead of a fixed bid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub market: Option<MarketSpec>,
    /// The guest template the job names (its image, vCPUs, memory, weight and cap are the
    /// fields above as well).
    #[serde(default)]
    pub template: Option<TemplateSpec>,
}

/// A guest template a job names: its name, for people, and the guest it describes (a node's
/// warm guests of the same shape serve it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateSpec {
    /// The template's name.
    pub name: String,
    /// The guest.
    pub shape: mvm_os::template::Shape,
}

/// The execution environment a node ensures before its part of a job runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvSpec {
    /// The image: `name:version` or `name:version@sha256:HEX`.
    pub image: String,
    /// vCPUs of the guest.
    pub vcpus: u32,
    /// Memory of the guest, MiB.
    pub memory_mib: u32,
    /// How the guest is used across jobs.
    pub mode: VmMode,
    /// Its CPU weight (none: the driver's default).
    #[serde(default)]
    pub weight: Option<u32>,
    /// Its CPU cap, percent of one CPU (none: uncapped).
    #[serde(default)]
    pub cap: Option<u32>,
    /// The template the job named, whose shape the guest has (disk, swap, network and boot
    /// as well).
    #[serde(default)]
    pub template: Option<TemplateSpec>,
    /// The job's bid for the node's CPU, micro-credits per CPU-second: the node's auctioneer
    /// sets the guest's weight from it and the other bids there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bid: Option<u64>,
}

/// A job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Admitted, waiting for room (in the job log's queue).
    Pending,
    /// Placed; nodes are preparing.
    Preparing,
    /// Running.
    Running,
    /// Every part ended well.
    Done,
    /// A part failed.
    Failed,
    /// Refused by a node's policy.
    Refused,
    /// Cancelled by a client.
    Cancelled,
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            JobState::Pending | JobState::Preparing | JobState::Running
        )
    }
}

/// A job as the broker sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobStatus {
    /// The job id.
    pub job: JobId,
    /// The profile's name.
    pub name: String,
    /// The state.
    pub state: JobState,
    /// Bumped on every change (for [`ClientRequest::Wait`](super::ClientRequest::Wait)).
    pub version: u64,
    /// Vertices in the topology.
    pub vertices: u32,
    /// Vertices whose part has ended.
    pub vertices_done: u32,
    /// Each part: node peer id, node name, vertices, whether it ended.
    pub parts: Vec<PartStatus>,
    /// Vertex stdout, once done.
    pub outputs: Vec<(String, Bytes)>,
    /// Traffic by edge kind, summed over the parts of the last run.
    pub traffic: Vec<Traffic>,
    /// What each edge carried (once every part has ended).
    #[serde(default)]
    pub edges: Vec<EdgeTraffic>,
    /// What each input port took (once every part has ended).
    #[serde(default)]
    pub received: Vec<PortTraffic>,
    /// Milliseconds from submission to the end (or to now).
    pub wall_ms: u64,
    /// Why it failed.
    pub error: Option<String>,
    /// What kind of failure it was (none when it did not fail, or was cancelled).
    #[serde(default)]
    pub error_kind: Option<ErrorKind>,
    /// Why a pending job waits: what each node lacks, or that it is held.
    #[serde(default)]
    pub waiting: Option<String>,
    /// Who owns it (`name@domain`).
    #[serde(default)]
    pub owner: String,
    /// When another group's super-peer holds the job (it was forwarded there): its addresses.
    #[serde(default)]
    pub broker_addrs: Vec<libp2p::Multiaddr>,
    /// The run of the job now (0: its first; see [`Submission::retries`]).
    #[serde(default)]
    pub attempt: u32,
    /// The runs that ended because a node was lost, and what came after each.
    #[serde(default)]
    pub restarts: Vec<Restart>,
    /// The checkpoints kept, oldest first.
    #[serde(default)]
    pub checkpoints: Vec<CheckpointInfo>,
    /// The parts moved to other nodes while they ran, oldest first.
    #[serde(default)]
    pub moves: Vec<MoveInfo>,
    /// Its topology's channels, `(from vertex:port, to vertex:port)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<(String, String)>,
    /// The output files its vertices left, from the last run whose parts reported them (also
    /// when it failed); their bytes are held by the broker (`mvm fetch`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<OutputFile>,
    /// The array it belongs to, and its index there (a profile's `[sweep]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array: Option<(JobId, u32)>,
    /// What it waits for: the jobs it runs after (`after`, then `after_ok`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<JobId>,
    /// The agreement it runs under (`mvm accept`): its state, and why it was broken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<(super::AgreementState, Option<String>)>,
}

/// A part of a running job moved to another node (live migration): its vertices paused at a
/// cut, saved with their queues, and restored on the new node while the rest of the job ran
/// on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveInfo {
    /// The part's vertices.
    pub vertices: Vec<String>,
    /// The node it left.
    pub from: libp2p::PeerId,
    /// The node it runs on now.
    pub to: libp2p::PeerId,
    /// The run of the job.
    pub attempt: u32,
    /// The cut it was saved at (numbered with the job's checkpoints).
    pub cut: u64,
    /// When it moved, milliseconds since the Unix epoch (the leader's clock).
    pub at_ms: u64,
    /// How long its vertices were paused, from the pause to their start on the new node
    /// (milliseconds), as the broker measured it.
    pub downtime_ms: u64,
    /// The size of its image.
    pub bytes: u64,
}

/// A run of a job given up because a node it ran on was lost; the job runs again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restart {
    /// The run that begins (1 for the first re-run).
    pub attempt: u32,
    /// When the run before was given up, milliseconds since the Unix epoch (the leader's clock).
    pub at_ms: u64,
    /// Why, for people.
    pub why: String,
    /// The checkpoint the new run started from, once placed (none: from the job's start).
    #[serde(default)]
    pub from_cut: Option<u64>,
    /// Every part of the new run started, milliseconds since the Unix epoch; none yet.
    #[serde(default)]
    pub running_ms: Option<u64>,
}

impl Restart {
    /// How long the job took to run again, once it has: from the run given up to every part of
    /// the next one started.
    pub fn recovery_ms(&self) -> Option<u64> {
        self.running_ms.map(|r| r.saturating_sub(self.at_ms))
    }
}

/// A job's part as the broker sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartStatus {
    /// The node's peer id.
    pub node: libp2p::PeerId,
    /// Its name.
    pub name: String,
    /// The part's vertices.
    pub vertices: Vec<String>,
    /// Whether the part has ended.
    pub done: bool,
    /// The guest it ran in (known once it has ended well), when its job named an image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestIdentity>,
}

/// Where an asker of a job's logs is in one run's vertex: the number of the last line it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogCursor {
    /// The run.
    pub attempt: u32,
    /// The vertex.
    pub vertex: String,
    /// The last line's number ([`super::LogLine::seq`]).
    pub seq: u64,
}

/// One line of a job's logs, with its run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobLogLine {
    /// The run of the job it was written in (0: the first).
    pub attempt: u32,
    /// The line.
    pub line: super::LogLine,
}

/// An answer to [`super::ClientRequest::Logs`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobLogs {
    /// The lines, by run, then by time (each vertex's in order).
    pub lines: Vec<JobLogLine>,
    /// The job's state when they were read.
    pub state: JobState,
    /// More lines are there than one answer carries: ask again after these.
    pub more: bool,
}
