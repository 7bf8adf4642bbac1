//! Workers: a part of a job whose guest is a group of this host's processes (the host
//! driver's control groups) runs in a process of its own, started by the node inside the
//! guest before any job code runs (HTCondor's starter and Nomad's executor are the models).
//! The guest's CPU weight and cap, memory limit and CPUs then bind the part's vertices, and a
//! worker that crashes or is killed by its guest's memory limit fails its part only.
//!
//! The node prepares the part as for itself (policy, modules fetched and compiled, guest
//! ensured), then starts the worker (`mvm worker`) with its stdin and stdout as pipes. The
//! exchange, each message a frame (a `u32` big-endian length and a CBOR message):
//!
//! 1. node → worker: a [`WorkerJob`] (the topology, the compiled modules, the parameters and
//!    limits); the worker prepares the part in a wasmtime runtime and queues of its own;
//! 2. worker → node: [`FromWorker::Links`], the part's links with other parts (or its end, when
//!    it cannot be prepared);
//! 3. node → worker: [`ToWorker::Start`], when the broker starts the job; the vertices run;
//! 4. both ways, while they run: the items of the links ([`ToWorker::Item`],
//!    [`FromWorker::Item`]) and their ends. The node carries them over its own channels to
//!    the other parts (libp2p streams or direct links): the worker needs no network;
//! 5. worker → node: [`FromWorker::Logs`], what the vertices wrote, line by line, while they
//!    run and once more at their end;
//! 6. worker → node: [`FromWorker::End`], the vertices' outputs and counts and the queues'
//!    traffic, or the first failure.
//!
//! A worker that ends without its end failed; the node says how (its exit status or signal,
//! and whether its guest's memory limit killed it). A part that is stopped kills its worker,
//! and a worker whose node is gone (its stdin closes) ends.
//!
//! A part of a job that takes checkpoints is checkpointed through its worker (the node's side
//! is in `node::checkpoint`), the cut kept consistent across the pipe:
//!
//! 1. node → worker: [`ToWorker::Pause`]. The worker pauses its vertices, sends what its
//!    remote outputs still hold (nothing more enters them), and answers
//!    [`FromWorker::Paused`] after those items;
//! 2. the node drains its ends of the part's remote inputs to the cut's mark, and holds its
//!    ends of the remote outputs once its queues of them are empty (everything sent before
//!    the pause goes before the mark);
//! 3. node → worker: [`ToWorker::Image`], after every item its input queues held, with what
//!    the drained ends kept past their queues' room. The worker images the part with what it
//!    has received and not yet delivered, then those kept items, and answers
//!    [`FromWorker::Imaged`] with the blob;
//! 4. node → worker: [`ToWorker::Resume`] (or not, while the part moves away).
//!
//! A part restored from a checkpoint gets the blob with its job ([`WorkerJob::restore`]).

pub mod agent;
mod guest_files;
mod node;
mod part;

pub(crate) use node::{Control, Started};
pub use part::serve;

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::PathBuf;

use bytes::Bytes;
use mvm_component::policy::Principal;
use mvm_component::runtime::checkpoint::VertexCounts;
use mvm_queue::queue::Config as QueueConfig;
use serde::{Deserialize, Serialize};

use crate::proto::{LimitSpec, VertexFailure};

/// The largest frame to a worker (the job, with its compiled modules; an item).
pub const MAX_JOB: usize = 1 << 30;

/// The largest frame from a worker (vertex outputs are capped at 1 MiB each).
pub const MAX_END: usize = 1 << 30;

/// A watching worker's exit status when its node closed the pipe before the part ended.
pub const ORPHANED: i32 = 3;

/// How a node starts a worker: a program and its arguments (`mvm worker`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCommand {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
}

/// One part of one job, as a worker runs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerJob {
    /// The job's queue namespace (the job id and run).
    pub space: String,
    /// The topology's file name, for errors.
    pub topology_file: String,
    /// The topology's text (the whole graph; the worker runs part `here` of it).
    pub topology: String,
    /// Queue defaults.
    pub queue: QueueConfig,
    /// Component name → the module compiled by the node (`Module::serialize`).
    pub modules: Vec<(String, Bytes)>,
    /// Job parameters.
    pub parameters: BTreeMap<String, String>,
    /// Per-vertex limits.
    pub limits: LimitSpec,
    /// Part index of every vertex, in topology order.
    pub placement: Vec<u32>,
    /// The part the worker runs.
    pub here: u32,
    /// The job's owner.
    pub owner: Principal,
    /// The node runtime's largest linear memory (the modules were compiled for it).
    pub max_memory_bytes: u64,
    /// The checkpoint blob the part starts from (checked against its hash by the node).
    #[serde(default)]
    pub restore: Option<Bytes>,
    /// Each local vertex's sandbox directory, laid out by the node (the worker shares its
    /// file system).
    #[serde(default)]
    pub sandboxes: BTreeMap<String, PathBuf>,
    /// The job's files for a worker that does not share its node's file system (in a Xen
    /// guest, through its agent): it lays them out in sandboxes of its own, and gives back
    /// what its vertices leave there ([`FromWorker::Files`]).
    #[serde(default)]
    pub guest_files: Option<GuestFiles>,
}

/// A job's files carried to a worker in a guest of its own ([`WorkerJob::guest_files`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GuestFiles {
    /// The inputs, laid out in every local vertex's sandbox: its path there and its bytes.
    pub inputs: Vec<(String, Bytes)>,
    /// The output patterns.
    pub outputs: Vec<String>,
    /// The bytes of output files given back per vertex at most.
    pub output_bytes: u64,
}

/// What a vertex left in its sandbox in a guest ([`FromWorker::Files`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestOutput {
    /// The vertex.
    pub vertex: String,
    /// The file's path in its sandbox.
    pub path: String,
    /// Its size.
    pub size: u64,
    /// Its bytes (none: it is over the vertex's bound, and is named only).
    pub bytes: Option<Bytes>,
}

/// What the node tells a worker after its job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToWorker {
    /// Run the vertices.
    Start,
    /// Items for a remote input of the part: `link` indexes [`FromWorker::Links`]' inputs.
    Items {
        /// The link.
        link: u32,
        /// The items, encoded by their port's codec, in order.
        items: Vec<Bytes>,
    },
    /// A remote input's link ended.
    Closed {
        /// The link.
        link: u32,
    },
    /// Pause the vertices for checkpoint `cut` and send what the remote outputs hold; answered
    /// by [`FromWorker::Paused`].
    Pause {
        /// The cut.
        cut: u64,
    },
    /// Image the paused part, adding after each remote input's items `extra`'s entries for
    /// its link (item and priority): what the node's end of it kept past its queue's room.
    /// Answered by [`FromWorker::Imaged`].
    Image {
        /// The cut.
        cut: u64,
        /// Link → entries.
        extra: Vec<(u32, Vec<(Bytes, i64)>)>,
    },
    /// Let the paused part go on.
    Resume,
}

/// What a worker tells the node after its job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromWorker {
    /// The part is prepared: its remote inputs (`vertex`, `port`, the part that feeds it) and
    /// remote outputs (the remote `vertex`, `port`, and the part that runs it), in order.
    Links {
        /// Remote inputs.
        inputs: Vec<(String, String, u32)>,
        /// Remote outputs.
        outputs: Vec<(String, String, u32)>,
    },
    /// Items local vertices sent on remote output `link`, in order.
    Items {
        /// The link.
        link: u32,
        /// The items, encoded by their port's codec.
        items: Vec<Bytes>,
    },
    /// Remote output `link` ended (every local sender on it finished).
    Closed {
        /// The link.
        link: u32,
    },
    /// Remote input `link` delivered `items` more of the node's items into its queue: the
    /// node may send as many more (it sends at most [`WINDOW`] not yet credited).
    Credit {
        /// The link.
        link: u32,
        /// How many.
        items: u32,
    },
    /// The part is paused for the cut (every item of its remote outputs sent before this),
    /// or why it cannot be.
    Paused(Result<u64, String>),
    /// The paused part's checkpoint blob, or why it could not be taken.
    Imaged(Result<Bytes, String>),
    /// Lines the vertices wrote since the last such message (every [`LOG_SHIP`] while they
    /// run, and the last ones before [`FromWorker::End`]).
    Logs(Vec<mvm_component::runtime::logs::LogLine>),
    /// The files matching the output patterns that the vertices left in the sandboxes of a
    /// worker in a guest ([`WorkerJob::guest_files`]), before [`FromWorker::End`], also when
    /// the part failed.
    Files(Vec<GuestOutput>),
    /// The part ended.
    End(WorkerEnd),
}

/// How often a worker gives its node the lines its vertices wrote.
pub(crate) const LOG_SHIP: std::time::Duration = std::time::Duration::from_millis(250);

/// How a worker's part ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WorkerEnd {
    /// Every vertex ended well.
    Done(WorkerReport),
    /// The first failure.
    Failed(VertexFailure),
}

/// What a worker's part did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Each local vertex, in topology order.
    pub vertices: Vec<WorkerVertex>,
    /// What entered each of the part's queues.
    pub queues: Vec<QueueCount>,
    /// The worker's process id.
    pub pid: u32,
    /// The boot id of the kernel the worker ran under (`/proc/sys/kernel/random/boot_id`): a
    /// guest that is a domain of its own has its own.
    #[serde(default)]
    pub boot_id: Option<String>,
}

/// One vertex: its output and what it moved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerVertex {
    /// The vertex.
    pub vertex: String,
    /// What it wrote to stdout.
    pub stdout: Bytes,
    /// What it moved on each edge out of it and took from each input port.
    pub counts: VertexCounts,
}

/// What entered one queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueCount {
    /// The queue (`vertex:port`, or `vertex:port>out` for an outbox).
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// Its codec.
    pub codec: String,
    /// Items sent into it.
    pub items_in: u64,
    /// Bytes sent into it.
    pub bytes_in: u64,
}

/// The first byte of a frame of items: never the first byte of a CBOR message (it is CBOR's
/// "break"), so items skip CBOR: `0xFF`, the link (`u32` big-endian), then each item's length
/// (`u32` big-endian) and bytes.
const ITEMS: u8 = 0xFF;

/// The most items a frame of items carries.
pub(crate) const BATCH: usize = 256;

/// The most items of one remote input the node sends its worker before the worker says it
/// delivered them ([`FromWorker::Credit`]): a queue the part does not read holds up no other
/// link, nor the node's messages, and the worker holds little.
pub(crate) const WINDOW: usize = 1024;

/// A message that carries items, on one of the pipe's two ways.
trait Carries: Serialize + serde::de::DeserializeOwned {
    /// The items, if the message is items.
    fn items(&self) -> Option<(u32, &[Bytes])>;
    /// The message of items.
    fn of_items(link: u32, items: Vec<Bytes>) -> Self;
}

impl Carries for ToWorker {
    fn items(&self) -> Option<(u32, &[Bytes])> {
        match self {
            ToWorker::Items { link, items } => Some((*link, items)),
            _ => None,
        }
    }

    fn of_items(link: u32, items: Vec<Bytes>) -> Self {
        ToWorker::Items { link, items }
    }
}

impl Carries for FromWorker {
    fn items(&self) -> Option<(u32, &[Bytes])> {
        match self {
            FromWorker::Items { link, items } => Some((*link, items)),
            _ => None,
        }
    }

    fn of_items(link: u32, items: Vec<Bytes>) -> Self {
        FromWorker::Items { link, items }
    }
}

fn frame<T: Serialize>(msg: &T, max: usize) -> io::Result<Vec<u8>> {
    let mut buf = crate::proto::encode_after(4, msg, max)?;
    let len = u32::try_from(buf.len() - 4).unwrap_or(u32::MAX);
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf)
}

/// Appends `msg`'s frame to `buf`: items as raw bytes, anything else in CBOR.
fn put<T: Carries>(buf: &mut Vec<u8>, msg: &T, max: usize) -> io::Result<()> {
    let Some((link, items)) = msg.items() else {
        buf.extend_from_slice(&frame(msg, max)?);
        return Ok(());
    };
    let len = 5 + items.iter().map(|i| 4 + i.len()).sum::<usize>();
    let (Ok(len32), true) = (u32::try_from(len), len <= max) else {
        return Err(too_long(len, max));
    };
    buf.reserve(4 + len);
    buf.extend_from_slice(&len32.to_be_bytes());
    buf.push(ITEMS);
    buf.extend_from_slice(&link.to_be_bytes());
    for i in items {
        buf.extend_from_slice(&u32::try_from(i.len()).unwrap_or(u32::MAX).to_be_bytes());
        buf.extend_from_slice(i);
    }
    Ok(())
}

/// The frames of `first` and of the messages `next` has ready, up to a write's worth (256
/// KiB): what goes to the pipe in one write.
fn batch<T: Carries>(
    first: &T,
    mut next: impl FnMut() -> Option<T>,
    max: usize,
) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    put(&mut buf, first, max)?;
    while buf.len() < 256 << 10 {
        match next() {
            Some(m) => put(&mut buf, &m, max)?,
            None => break,
        }
    }
    Ok(buf)
}

/// The message in a frame's body (see [`put`]).
fn parse<T: Carries>(body: Vec<u8>) -> io::Result<T> {
    if body.first() != Some(&ITEMS) {
        return crate::proto::decode(&body);
    }
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of items {what}"),
        )
    };
    let u32_at = |b: &[u8], at: usize| {
        b.get(at..at + 4)
            .and_then(|l| <[u8; 4]>::try_from(l).ok())
            .map(u32::from_be_bytes)
    };
    let link = u32_at(&body, 1).ok_or_else(|| bad("without its link"))?;
    let body = Bytes::from(body);
    let mut items = Vec::new();
    let mut at = 5;
    while at < body.len() {
        let len = u32_at(&body, at).ok_or_else(|| bad("with a truncated length"))? as usize;
        let end = at + 4 + len;
        if end > body.len() {
            return Err(bad("with an item past its end"));
        }
        items.push(body.slice(at + 4..end));
        at = end;
    }
    Ok(T::of_items(link, items))
}

/// The frames that hand `job` to a worker (its stdin) and start it at once: for a part
/// without links to other parts.
///
/// # Errors
/// The job does not encode, or is over [`MAX_JOB`].
pub fn job_frames(job: &WorkerJob) -> io::Result<Vec<u8>> {
    let mut f = frame(job, MAX_JOB)?;
    f.extend_from_slice(&frame(&ToWorker::Start, MAX_JOB)?);
    Ok(f)
}

/// Reads a worker's end frame from `output` (its stdout), past its links and the lines its
/// vertices wrote.
///
/// # Errors
/// I/O (the worker ended without its frame), or a frame that a part without links does not
/// send.
pub fn read_end(output: &mut impl Read) -> io::Result<WorkerEnd> {
    loop {
        match read_frame(output, MAX_END)? {
            FromWorker::End(end) => return Ok(end),
            FromWorker::Links { .. } | FromWorker::Logs(_) => {}
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a part without links sent {other:?}"),
                ));
            }
        }
    }
}

/// Reads one frame's body, of at most `max` bytes.
fn read_body(r: &mut impl Read, max: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(too_long(len, max));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Reads one message of at most `max` bytes.
fn read_frame<T: Carries>(r: &mut impl Read, max: usize) -> io::Result<T> {
    parse(read_body(r, max)?)
}

/// Reads the first frame, the job (CBOR).
fn read_job(r: &mut impl Read) -> io::Result<WorkerJob> {
    crate::proto::decode(&read_body(r, MAX_JOB)?)
}

fn too_long(len: usize, max: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("a frame of {len} bytes is over the limit of {max}"),
    )
}

#[cfg(test)]
mod tests;
