//! The control protocol: requests and responses between clients, super-peers and nodes.
//!
//! One request-response protocol, [`PROTOCOL`], carries every control message. Messages are
//! CBOR in a frame of a 4-byte big-endian length; a frame larger than the reader's limit is
//! refused before it is read. The protocol id carries the version: a peer speaking another
//! version fails negotiation instead of misreading messages. Every message is checked by
//! [`Request::validate`] / [`Response::validate`] before it is acted on: bounded strings and
//! lists, well-formed ids and hashes.

use std::collections::BTreeMap;
use std::io;

use bytes::Bytes;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use mvm_component::policy::{Bundle, Principal};
pub use mvm_component::runtime::ErrorKind;
use mvm_queue::queue::Config as QueueConfig;
use serde::{Deserialize, Serialize};

/// The control protocol's id (and version).
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/mvm/control/1");

/// Control streams: requests and answers between peers that have passed each other's `Hello`,
/// many on one stream (see the `rpc` module); the same messages as [`PROTOCOL`].
pub const RPC_PROTOCOL: StreamProtocol = StreamProtocol::new("/mvm/rpc/1");

/// The queue-data protocol: a stream per remote channel (see [`StreamHeader`]); its number
/// follows the queue layer's frame version.
pub const QUEUE_PROTOCOL: StreamProtocol = StreamProtocol::new("/mvm/queue/2");

/// Image transfers between nodes: a request frame, a header frame, then the image's bytes.
pub const IMAGE_PROTOCOL: StreamProtocol = StreamProtocol::new("/mvm/image/1");

/// Asks a node for an image's bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRequest {
    /// `name:version@sha256:HEX`.
    pub id: String,
}

/// A node's answer: the image's metadata and size (then that many bytes), or why not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageHeader {
    /// The metadata and byte count, or the reason it is not sent.
    pub image: Result<(mvm_os::image::Metadata, u64), String>,
    /// Whether the reason is the serving node's policy.
    #[serde(default)]
    pub refused: bool,
}

/// The largest control frame by default (a submission carries its modules).
pub const MAX_FRAME: usize = 64 << 20;

/// The largest certificate a `Hello` may carry.
pub const MAX_CERT: usize = 16 << 10;

fn check_principal(p: &Principal) -> Result<(), String> {
    let ok = mvm_component::policy::name_ok;
    if ok(&p.name) && ok(&p.domain) && p.roles.len() <= 64 && p.roles.iter().all(|r| ok(r)) {
        Ok(())
    } else {
        Err(format!("a principal with a bad name, domain or role: {p}"))
    }
}

fn check_digest(d: &str) -> Result<(), String> {
    if d.is_empty() || (d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit())) {
        Ok(())
    } else {
        Err("a policy digest is 64 hex digits".into())
    }
}

fn check_cert(cert: &[u8]) -> Result<(), String> {
    if cert.is_empty() || cert.len() > MAX_CERT {
        Err(format!(
            "a certificate of {} bytes (1 to {MAX_CERT})",
            cert.len()
        ))
    } else {
        Ok(())
    }
}

/// Longest name, id or port accepted in a message.
const MAX_NAME: usize = 256;
/// Most entries of any list or map in a message.
const MAX_ENTRIES: usize = 1 << 20;

/// A request on the control protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Request {
    /// Anyone → anyone, first on a connection: the sender's certificate (DER).
    Hello {
        /// The certificate.
        cert: Bytes,
    },
    /// Client → broker: which of these module hashes the broker lacks.
    Missing {
        /// Content hashes (SHA-256, lowercase hex).
        hashes: Vec<String>,
    },
    /// Client → broker: run a job.
    Submit(Box<Submission>),
    /// Client → broker: the status of one job, or of all.
    Status {
        /// A job id, or every job when `None`.
        job: Option<String>,
    },
    /// Client → broker: the job's status once its version passes `after` (or after a while).
    Wait {
        /// The job id.
        job: String,
        /// The last version seen.
        after: u64,
        /// Answer only once the job has ended (or after a while), not at every change.
        #[serde(default)]
        until_end: bool,
    },
    /// Client → broker: hold a pending job back from placement (`true`), or release it.
    Hold {
        /// The job id.
        job: String,
        /// Hold or release.
        held: bool,
    },
    /// Client → broker: cancel a job.
    Cancel {
        /// The job id.
        job: String,
    },
    /// Anyone → any daemon: the group as this daemon sees it.
    Group,
    /// Node → broker: join the group.
    Register(NodeInfo),
    /// Node → broker: still alive, with its current load.
    Heartbeat(NodeLoad),
    /// Node → broker: the bytes of a module.
    Fetch {
        /// Its content hash.
        hash: String,
    },
    /// Node → broker: the end of its part of a job.
    Report(Box<PartReport>),
    /// Broker → node: prepare a part of a job (compile, check, create queues); nothing runs.
    Prepare(Box<PartSpec>),
    /// Node or super-peer → super-peer: the policy bundle, unless its digest is `have`.
    Policy {
        /// The digest the asker holds (empty: none).
        have: String,
    },
    /// Administrator → the super-peer holding the policies: read them again now.
    PolicyReload,
    /// Broker → node: start a prepared part.
    Start {
        /// The job id.
        job: String,
    },
    /// Broker → node: stop a job's part (if any) and remove everything created for it.
    Terminate {
        /// The job id.
        job: String,
        /// Why, for the node's log.
        reason: String,
    },
    /// Super-peer ↔ super-peer: a message of the group's replicated job log.
    Raft(RaftRpc),
}

/// A message between the replicas of a group's job log: openraft's request, CBOR-encoded
/// (decoded, and so checked, by the job log itself).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RaftRpc {
    /// Entries to append (or a heartbeat).
    Append(Bytes),
    /// A request for a vote.
    Vote(Bytes),
    /// A snapshot, or a chunk of one.
    Snapshot(Bytes),
}

/// A response on the control protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    /// Done.
    Ok,
    /// The answer to a `Hello`: the receiver's certificate (DER).
    Hello {
        /// The certificate.
        cert: Bytes,
    },
    /// The request failed.
    Error(Failure),
    /// The hashes the broker lacks.
    Missing {
        /// Content hashes.
        hashes: Vec<String>,
    },
    /// A job was accepted and placed.
    Submitted(JobStatus),
    /// Job statuses.
    Status(Vec<JobStatus>),
    /// The group.
    Group(GroupInfo),
    /// A registration was accepted.
    Registered {
        /// How often to send heartbeats, in milliseconds.
        heartbeat_ms: u64,
        /// The group's members, for electing a new super-peer.
        members: Vec<Member>,
    },
    /// A heartbeat was taken; `known` is false when the broker does not know the node (it must
    /// register again, e.g. with a newly elected super-peer).
    Heartbeat {
        /// Whether the node is registered.
        known: bool,
        /// The group's members.
        members: Vec<Member>,
        /// Jobs of the heartbeat's list that the log has ended or never recorded: their parts
        /// must stop (their `Terminate` did not arrive, or their leader was lost before it
        /// recorded them).
        #[serde(default)]
        stop: Vec<String>,
    },
    /// A module's bytes.
    Module(Bytes),
    /// The answer to a `Prepare` that started the part, when the part ended within
    /// [`PART_HOLD`]: its report, which the node then does not send again.
    Finished(Box<PartReport>),
    /// The answer to a [`Request::Raft`]: openraft's result, CBOR-encoded.
    Raft(Bytes),
    /// The policies in force at a super-peer.
    Policy {
        /// Its version there.
        version: u64,
        /// Its digest.
        digest: String,
        /// The files, unless the asker holds them already.
        bundle: Option<Bundle>,
    },
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// The class of failure.
    pub kind: FailureKind,
    /// A one-line message naming the file, vertex or peer concerned.
    pub message: String,
}

/// Classes of failure; they map to the CLI's exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// Bad input: profile, topology, module, message.
    Input,
    /// Refused by policy.
    Refused,
    /// It ran (or tried to) and failed.
    Failed,
    /// No such job, module or node.
    NotFound,
    /// Not possible now: no node fits, not the broker, shutting down.
    Unavailable,
}

impl Failure {
    /// A failure of `kind`.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

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
    pub components: BTreeMap<String, String>,
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
    /// Answer when the job has ended (or after at most [`SUBMIT_HOLD`]) instead of at once, so
    /// a short job takes one exchange instead of a submit and a wait.
    #[serde(default)]
    pub wait: bool,
    /// Among jobs waiting for room, higher is placed first (then earlier).
    #[serde(default)]
    pub priority: i32,
}

/// How long a broker holds a waiting submission, and a `Wait`, before answering with the
/// job's status so far.
pub const SUBMIT_HOLD: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a node holds the answer to a `Prepare` that starts its part at once, for the part's
/// report to travel in the answer instead of in a request of its own.
pub const PART_HOLD: std::time::Duration = std::time::Duration::from_millis(50);

/// Per-vertex limits, as in the profile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitSpec {
    /// Linear memory per vertex, bytes.
    pub memory_bytes: Option<u64>,
    /// CPU time per vertex, milliseconds.
    pub cpu_ms: Option<u64>,
    /// Wall time per vertex, milliseconds.
    pub wall_ms: Option<u64>,
}

impl LimitSpec {
    /// The runtime's limits.
    ///
    /// # Errors
    /// A memory limit under 64 KiB, or over what this machine can address.
    pub fn limits(&self) -> Result<mvm_component::runtime::Limits, String> {
        let mut l = mvm_component::runtime::Limits::default();
        if let Some(m) = self.memory_bytes {
            if m < 64 << 10 {
                return Err(format!("a memory limit of {m} bytes is under 64KiB"));
            }
            l.memory_bytes = usize::try_from(m).map_err(|_| "the memory limit is too large")?;
        }
        l.cpu = self.cpu_ms.map(std::time::Duration::from_millis);
        l.wall = self.wall_ms.map(std::time::Duration::from_millis);
        Ok(l)
    }
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
    /// How guests of `image` are used across jobs: `persistent`, `save-restore` or
    /// `stop-start` (the default).
    #[serde(default)]
    pub vm_mode: Option<String>,
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
    /// `persistent`, `save-restore` or `stop-start`.
    pub mode: String,
}

/// The VM modes a profile may name.
pub const VM_MODES: [&str; 3] = ["persistent", "save-restore", "stop-start"];

/// What a node tells its super-peer when it registers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its name (for people).
    pub name: String,
    /// Its group.
    pub group: String,
    /// Its domain.
    pub domain: String,
    /// Addresses it listens on.
    pub addrs: Vec<String>,
    /// CPUs.
    pub cpus: u32,
    /// Total memory, bytes.
    pub memory_bytes: u64,
    /// Architecture.
    pub arch: String,
    /// Image ids it can run.
    pub images: Vec<String>,
    /// The most vertices it runs at once.
    pub slots: u32,
    /// Whether it is a super-peer candidate (a replica of the group's job log).
    pub eligible: bool,
    /// Its current load.
    pub load: NodeLoad,
}

/// A node's changing properties.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// Free memory, bytes.
    pub free_memory_bytes: u64,
    /// 1-minute load average.
    pub load: f64,
    /// Vertices running now.
    pub vertices: u32,
    /// Image ids it offers now (images imported while it runs are offered from the next
    /// heartbeat on).
    #[serde(default)]
    pub images: Vec<String>,
    /// The jobs it runs parts of now (the leader answers which of them it must stop).
    #[serde(default)]
    pub jobs: Vec<String>,
}

/// A member of a group, as the super-peer lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Peer id.
    pub peer: String,
    /// Addresses.
    pub addrs: Vec<String>,
    /// Whether it is a super-peer candidate (a replica of the group's job log).
    pub eligible: bool,
}

/// A group as a daemon sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupInfo {
    /// The group's name.
    pub group: String,
    /// The super-peer's peer id, when known.
    pub broker: Option<String>,
    /// Its addresses.
    pub broker_addrs: Vec<String>,
    /// Whether the answering daemon is the super-peer.
    pub is_broker: bool,
    /// The registered nodes (the super-peer's view; a node lists what it last heard).
    pub nodes: Vec<NodeView>,
    /// Other groups, from their super-peers' summaries.
    #[serde(default)]
    pub groups: Vec<GroupSummary>,
}

/// What a super-peer tells the others about its group (gossiped every few heartbeats).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSummary {
    /// The group.
    pub group: String,
    /// Its domain.
    pub domain: String,
    /// The super-peer's peer id.
    pub broker: String,
    /// Its addresses (`/…/p2p/PEER`).
    pub addrs: Vec<String>,
    /// Live nodes.
    pub nodes: u32,
    /// Free vertex slots over all nodes.
    pub free_slots: u32,
    /// Image ids offered by some node.
    pub images: Vec<String>,
    /// Architectures of the nodes.
    pub archs: Vec<String>,
}

impl GroupSummary {
    /// Checks every field.
    ///
    /// # Errors
    /// The first bad field.
    pub fn validate(&self) -> Result<(), String> {
        check_name("the group", &self.group)?;
        check_name("the domain", &self.domain)?;
        check_name("the broker", &self.broker)?;
        check_len("addresses", self.addrs.len())?;
        check_len("images", self.images.len())?;
        check_len("architectures", self.archs.len())
    }
}

/// A node as the super-peer sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    /// Peer id.
    pub peer: String,
    /// Name.
    pub name: String,
    /// Whether it stopped answering.
    pub lost: bool,
    /// Vertices placed on it by running jobs.
    pub vertices: u32,
    /// Vertices it said it runs at its last heartbeat.
    #[serde(default)]
    pub running: u32,
    /// Its slots.
    pub slots: u32,
}

/// A node's part of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartSpec {
    /// The job id.
    pub job: String,
    /// The topology's file name and text (the whole graph; the node runs its part).
    pub topology_file: String,
    /// The topology.
    pub topology: String,
    /// Queue defaults.
    pub queue: QueueConfig,
    /// Component name → module hash (only components of this part's vertices).
    pub components: BTreeMap<String, String>,
    /// Job parameters.
    pub parameters: BTreeMap<String, String>,
    /// Limits.
    pub limits: LimitSpec,
    /// Part index of every vertex, in topology order.
    pub placement: Vec<u32>,
    /// The peer id and addresses of every part.
    pub parts: Vec<Member>,
    /// This node's part.
    pub here: u32,
    /// Start right after preparing (a job of one part needs no second phase).
    #[serde(default)]
    pub start: bool,
    /// The environment to ensure first (none: the host as it is).
    #[serde(default)]
    pub environment: Option<EnvSpec>,
    /// The job's owner, for the node-level policy.
    pub owner: Principal,
    /// The digest of the policies the broker decided with; a node that holds other ones
    /// fetches the broker's before it decides.
    pub policy_digest: String,
}

/// How a part of a job ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartReport {
    /// The job id.
    pub job: String,
    /// Success (vertex outputs and traffic) or the first failure.
    pub outcome: Result<PartResult, VertexFailure>,
}

impl PartReport {
    /// Checks every field.
    ///
    /// # Errors
    /// The first bad field.
    pub fn validate(&self) -> Result<(), String> {
        check_job_id(&self.job)?;
        if let Ok(res) = &self.outcome {
            check_len("outputs", res.outputs.len())?;
            check_len("traffic entries", res.traffic.len())?;
        }
        Ok(())
    }
}

/// A part's results.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PartResult {
    /// Each local vertex's stdout.
    pub outputs: Vec<(String, Bytes)>,
    /// Traffic by edge kind.
    pub traffic: Vec<Traffic>,
    /// Wall time of the part, milliseconds.
    pub wall_ms: u64,
}

/// Items and bytes moved through one kind of edge.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Traffic {
    /// Queue kind (`fifo`, `priority`).
    pub kind: String,
    /// Codec.
    pub codec: String,
    /// Whether the edge crosses nodes.
    pub remote: bool,
    /// Whether those remote items went over direct links (not libp2p streams).
    #[serde(default)]
    pub direct: bool,
    /// Items.
    pub items: u64,
    /// Bytes (encoded).
    pub bytes: u64,
}

/// The first failure of a part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VertexFailure {
    /// The vertex (empty when no single vertex is to blame, e.g. a broken stream).
    pub vertex: String,
    /// Why, for people.
    pub cause: String,
    /// What kind of failure it was.
    pub kind: ErrorKind,
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
    pub job: String,
    /// The profile's name.
    pub name: String,
    /// The state.
    pub state: JobState,
    /// Bumped on every change (for [`Request::Wait`]).
    pub version: u64,
    /// Vertices in the topology.
    pub vertices: u32,
    /// Vertices whose part has ended.
    pub vertices_done: u32,
    /// Each part: node peer id, node name, vertices, whether it ended.
    pub parts: Vec<PartStatus>,
    /// Vertex stdout, once done.
    pub outputs: Vec<(String, Bytes)>,
    /// Traffic by edge kind, summed over parts.
    pub traffic: Vec<Traffic>,
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
    pub broker_addrs: Vec<String>,
}

/// A job's part as the broker sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartStatus {
    /// The node's peer id.
    pub node: String,
    /// Its name.
    pub name: String,
    /// The part's vertices.
    pub vertices: Vec<String>,
    /// Whether the part has ended.
    pub done: bool,
}

/// The first bytes of a queue-data stream: which remote channel it carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    /// The job id.
    pub job: String,
    /// The destination vertex.
    pub vertex: String,
    /// Its input port.
    pub port: String,
    /// The opener asks for a direct link ([`ACK_DIRECT`]) instead of data on this stream.
    #[serde(default)]
    pub direct: bool,
}

/// The acceptor's answer to a stream header: the channel is expected; its items follow on
/// this stream.
pub const ACK_OK: u8 = 0;
/// The acceptor's answer to a stream header: no such channel here.
pub const ACK_UNKNOWN: u8 = 1;
/// The acceptor's answer to a stream header that asked for a direct link: the channel is
/// expected, on a direct link. Followed by the link listener's port (`u16le`) and a one-time
/// 32-byte token to present there; the stream then ends.
pub const ACK_DIRECT: u8 = 2;

/// The largest stream header.
pub const MAX_HEADER: usize = 4 << 10;

fn check_name(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_NAME || s.chars().any(char::is_control) {
        return Err(format!(
            "{what} must be 1 to {MAX_NAME} printable characters"
        ));
    }
    Ok(())
}

/// Checks a job id: 1–128 characters of `[A-Za-z0-9._-]`.
///
/// # Errors
/// Why it is not one.
pub fn check_job_id(s: &str) -> Result<(), String> {
    if s.is_empty()
        || s.len() > 128
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!("bad job id '{}'", s.escape_default()));
    }
    Ok(())
}

/// Checks a content hash: 64 lowercase hex digits.
///
/// # Errors
/// Why it is not one.
pub fn check_hash(s: &str) -> Result<(), String> {
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!("bad module hash '{}'", s.escape_default()));
    }
    Ok(())
}

fn check_len(what: &str, n: usize) -> Result<(), String> {
    if n > MAX_ENTRIES {
        return Err(format!("too many {what} ({n})"));
    }
    Ok(())
}

fn check_params(p: &BTreeMap<String, String>) -> Result<(), String> {
    check_len("parameters", p.len())?;
    p.keys().try_for_each(|k| check_name("a parameter name", k))
}

fn check_components(c: &BTreeMap<String, String>) -> Result<(), String> {
    check_len("components", c.len())?;
    for (name, hash) in c {
        check_name("a component name", name)?;
        check_hash(hash)?;
    }
    Ok(())
}

impl Request {
    /// Checks every field.
    ///
    /// # Errors
    /// The first bad field.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Request::Missing { hashes } => {
                check_len("hashes", hashes.len())?;
                hashes.iter().try_for_each(|h| check_hash(h))
            }
            Request::Submit(s) => {
                check_name("the job name", &s.name)?;
                if let Some(p) = &s.on_behalf {
                    check_principal(p)?;
                }
                if let Some(o) = &s.owner {
                    check_name("the owner", o)?;
                }
                if let Some(d) = &s.domain {
                    check_name("the domain", d)?;
                }
                check_name("the topology file name", &s.topology_file)?;
                check_components(&s.components)?;
                check_len("modules", s.modules.len())?;
                if let Some(m) = &s.requirements.vm_mode
                    && !VM_MODES.contains(&m.as_str())
                {
                    return Err(format!("unknown VM mode '{m}'"));
                }
                check_params(&s.parameters)
            }
            Request::Status { job } => job.as_deref().map_or(Ok(()), check_job_id),
            Request::Wait { job, .. }
            | Request::Cancel { job }
            | Request::Hold { job, .. }
            | Request::Start { job } => check_job_id(job),
            Request::Terminate { job, reason } => {
                check_job_id(job)?;
                check_len("reason bytes", reason.len())
            }
            Request::Group | Request::Raft(_) => Ok(()),
            Request::Hello { cert } => check_cert(cert),
            Request::Policy { have } => check_digest(have),
            Request::PolicyReload => Ok(()),
            Request::Register(n) => {
                check_name("the node name", &n.name)?;
                check_name("the group", &n.group)?;
                check_name("the domain", &n.domain)?;
                check_len("addresses", n.addrs.len())?;
                check_len("images", n.images.len())?;
                check_name("the architecture", &n.arch)
            }
            Request::Heartbeat(l) => {
                check_len("images", l.images.len())?;
                check_len("jobs", l.jobs.len())?;
                l.jobs.iter().try_for_each(|j| check_job_id(j))
            }
            Request::Fetch { hash } => check_hash(hash),
            Request::Report(r) => r.validate(),
            Request::Prepare(p) => {
                check_job_id(&p.job)?;
                check_principal(&p.owner)?;
                check_name("the topology file name", &p.topology_file)?;
                check_components(&p.components)?;
                check_params(&p.parameters)?;
                check_len("placement entries", p.placement.len())?;
                check_len("parts", p.parts.len())?;
                if p.here as usize >= p.parts.len() {
                    return Err(format!(
                        "part {} does not exist ({} parts)",
                        p.here,
                        p.parts.len()
                    ));
                }
                if let Some(bad) = p.placement.iter().find(|&&x| x as usize >= p.parts.len()) {
                    return Err(format!("placement names part {bad} of {}", p.parts.len()));
                }
                if let Some(e) = &p.environment {
                    check_len("image id bytes", e.image.len())?;
                    if !VM_MODES.contains(&e.mode.as_str()) {
                        return Err(format!("unknown VM mode '{}'", e.mode));
                    }
                }
                Ok(())
            }
        }
    }
}

impl Response {
    /// Checks every field.
    ///
    /// # Errors
    /// The first bad field.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Response::Missing { hashes } => {
                check_len("hashes", hashes.len())?;
                hashes.iter().try_for_each(|h| check_hash(h))
            }
            Response::Submitted(s) => check_job_id(&s.job),
            Response::Finished(r) => r.validate(),
            Response::Status(v) => {
                check_len("jobs", v.len())?;
                v.iter().try_for_each(|s| check_job_id(&s.job))
            }
            Response::Registered { members, .. } => check_len("members", members.len()),
            Response::Heartbeat { members, stop, .. } => {
                check_len("members", members.len())?;
                check_len("jobs", stop.len())?;
                stop.iter().try_for_each(|j| check_job_id(j))
            }
            Response::Ok
            | Response::Error(_)
            | Response::Group(_)
            | Response::Module(_)
            | Response::Raft(_) => Ok(()),
            Response::Hello { cert } => check_cert(cert),
            Response::Policy { digest, bundle, .. } => {
                check_digest(digest)?;
                bundle
                    .as_ref()
                    .map_or(Ok(()), |b| b.check_layout().map_err(|e| e.to_string()))
            }
        }
    }
}

/// Reads one CBOR frame of at most `max` bytes.
///
/// # Errors
/// I/O errors, an oversized frame, or bytes that do not decode as `T`.
pub async fn read_frame<T, R>(io: &mut R, max: usize) -> io::Result<T>
where
    T: for<'de> Deserialize<'de>,
    R: AsyncRead + Unpin,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes is over the limit of {max}"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    decode(&buf)
}

/// Decodes one CBOR message.
///
/// # Errors
/// The bytes do not decode as `T`.
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> io::Result<T> {
    ciborium::from_reader(bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad message: {e}")))
}

/// Writes one CBOR frame.
///
/// # Errors
/// I/O errors, or a message over `max` bytes.
pub async fn write_frame<T, W>(io: &mut W, msg: &T, max: usize) -> io::Result<()>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    let mut buf = encode_after(4, msg, max)?;
    let len = u32::try_from(buf.len() - 4).unwrap_or(u32::MAX);
    buf[..4].copy_from_slice(&len.to_be_bytes());
    io.write_all(&buf).await?;
    io.flush().await
}

/// `head` zero bytes (for the caller's header), then `msg` in CBOR.
///
/// # Errors
/// The message does not encode, or is over `max` bytes.
pub(crate) fn encode_after<T: Serialize>(head: usize, msg: &T, max: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; head];
    ciborium::into_writer(msg, &mut buf)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let len = buf.len() - head;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a message of {len} bytes is over the limit of {max}"),
        ));
    }
    Ok(buf)
}

/// The request-response codec: CBOR frames with a size limit.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    /// The largest frame read or written.
    pub max_frame: usize,
}

impl Default for Codec {
    fn default() -> Self {
        Codec {
            max_frame: MAX_FRAME,
        }
    }
}

impl libp2p::request_response::Codec for Codec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_frame).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_frame).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req, self.max_frame).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res, self.max_frame).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversized_or_garbage_frames_are_errors() {
        futures::executor::block_on(async {
            let req = Request::Terminate {
                job: "fft8-1".into(),
                reason: "done".into(),
            };
            let mut buf = Vec::new();
            write_frame(&mut buf, &req, 1024).await.expect("written");
            let back: Request = read_frame(&mut buf.as_slice(), 1024).await.expect("read");
            assert!(matches!(back, Request::Terminate { job, .. } if job == "fft8-1"));
            let e = read_frame::<Request, _>(&mut buf.as_slice(), 4)
                .await
                .expect_err("too big");
            assert!(e.to_string().contains("over the limit"), "{e}");
            let garbage = [0, 0, 0, 3, 0xff, 0x00, 0x13];
            let e = read_frame::<Request, _>(&mut garbage.as_slice(), 1024)
                .await
                .expect_err("garbage");
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            let e = write_frame(&mut Vec::new(), &req, 4)
                .await
                .expect_err("too big");
            assert!(e.to_string().contains("over the limit"), "{e}");
        });
    }

    #[test]
    fn validation_refuses_bad_ids_hashes_and_parts() {
        assert!(Request::Cancel { job: "a/b".into() }.validate().is_err());
        assert!(Request::Cancel { job: String::new() }.validate().is_err());
        assert!(
            Request::Cancel {
                job: "ok-1.x_y".into()
            }
            .validate()
            .is_ok()
        );
        assert!(Request::Fetch { hash: "ab".into() }.validate().is_err());
        assert!(
            Request::Fetch {
                hash: "A".repeat(64)
            }
            .validate()
            .is_err()
        );
        assert!(
            Request::Fetch {
                hash: "a".repeat(64)
            }
            .validate()
            .is_ok()
        );
        let part = PartSpec {
            job: "j".into(),
            topology_file: "t.dot".into(),
            topology: String::new(),
            queue: QueueConfig::default(),
            components: BTreeMap::new(),
            parameters: BTreeMap::new(),
            limits: LimitSpec::default(),
            placement: vec![0, 2],
            parts: vec![
                Member {
                    peer: "p".into(),
                    addrs: vec![],
                    eligible: true
                };
                2
            ],
            here: 1,
            start: false,
            environment: None,
            owner: mvm_component::policy::Principal {
                kind: mvm_component::policy::PrincipalKind::User,
                name: "alice".into(),
                domain: "lab".into(),
                roles: Vec::new(),
            },
            policy_digest: String::new(),
        };
        let e = Request::Prepare(Box::new(part.clone()))
            .validate()
            .expect_err("part 2 of 2");
        assert!(e.contains("part 2"), "{e}");
        let e = Request::Prepare(Box::new(PartSpec {
            here: 2,
            placement: vec![0],
            ..part.clone()
        }))
        .validate()
        .expect_err("here out of range");
        assert!(e.contains("does not exist"), "{e}");
        let e = Request::Prepare(Box::new(PartSpec {
            placement: vec![0],
            environment: Some(EnvSpec {
                image: "env:1".into(),
                vcpus: 1,
                memory_mib: 64,
                mode: "forever".into(),
            }),
            ..part
        }))
        .validate()
        .expect_err("bad VM mode");
        assert!(e.contains("forever"), "{e}");
    }
}
