//! Workers: a part of a job whose guest is a group of this host's processes (the host
//! driver's control groups) runs in a process of its own, started by the node inside the
//! guest before any job code runs (HTCondor's starter and Nomad's executor are the models).
//! The guest's CPU weight and cap, memory limit and CPUs then bind the part's vertices, and a
//! worker that crashes or is killed by its guest's memory limit fails its part only.
//!
//! The node prepares the part as for itself (policy, modules fetched and compiled, guest
//! ensured), then starts the worker (`mvm worker`) with its stdin and stdout as pipes and
//! writes it one frame, a [`WorkerJob`]: the topology, the compiled modules, the parameters
//! and limits. The worker runs the part in a wasmtime runtime and queues of its own and
//! writes one frame back, a [`WorkerEnd`]: the vertices' outputs and counts and the queues'
//! traffic, or the first failure. A frame is a `u32` big-endian length and a CBOR message.
//! A worker that ends without its frame failed; the node says how (its exit status or
//! signal, and whether its guest's memory limit killed it). A part that is stopped kills its
//! worker.
//!
//! What a worker does not do yet: parts with links to other parts, and parts of jobs that
//! take checkpoints, run in the node's process (see the README).

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use bytes::Bytes;
use mvm_component::policy::Principal;
use mvm_component::runtime::checkpoint::VertexCounts;
use mvm_component::runtime::{AllowAll, JobSpec, Runtime, RuntimeConfig};
use mvm_component::topology::{Options, Topology};
use mvm_queue::Controller;
use mvm_queue::codec::Registry;
use mvm_queue::controller::Limits as QueueLimits;
use mvm_queue::queue::Config as QueueConfig;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::environment::GuestRef;
use crate::proto::{ErrorKind, LimitSpec, VertexFailure};

/// The largest job frame a worker reads (the compiled modules are in it).
pub const MAX_JOB: usize = 1 << 30;

/// The largest end frame the node reads (vertex outputs are capped at 1 MiB each).
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
}

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

fn frame<T: Serialize>(msg: &T, max: usize) -> io::Result<Vec<u8>> {
    let mut buf = crate::proto::encode_after(4, msg, max)?;
    let len = u32::try_from(buf.len() - 4).unwrap_or(u32::MAX);
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf)
}

/// The frame that hands `job` to a worker (its stdin).
///
/// # Errors
/// The job does not encode, or is over [`MAX_JOB`].
pub fn job_frame(job: &WorkerJob) -> io::Result<Vec<u8>> {
    frame(job, MAX_JOB)
}

/// Reads a worker's end frame from `output` (its stdout).
///
/// # Errors
/// I/O (the worker ended without its frame), or a frame that is not an end.
pub fn read_end(output: &mut impl Read) -> io::Result<WorkerEnd> {
    read_frame(output, MAX_END)
}

/// Reads one frame of at most `max` bytes.
fn read_frame<T: serde::de::DeserializeOwned>(r: &mut impl Read, max: usize) -> io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(too_long(len, max));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    crate::proto::decode(&buf)
}

fn too_long(len: usize, max: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("a frame of {len} bytes is over the limit of {max}"),
    )
}

/// Serves one part: reads its [`WorkerJob`] from `input`, runs it, and writes its
/// [`WorkerEnd`] to `output`. What `mvm worker` runs; the exit status (0: the end was
/// written, whatever it says).
///
/// With `watch`, `input` is then read until its end on a thread of its own, and its end ends
/// this process ([`ORPHANED`]): the node keeps the pipe open while the part runs, so the
/// part's worker goes when its node goes, however the node ended.
pub fn serve<R: Read + Send + 'static>(mut input: R, mut output: impl Write, watch: bool) -> i32 {
    let job = read_frame::<WorkerJob>(&mut input, MAX_JOB);
    if watch && job.is_ok() {
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while matches!(input.read(&mut buf), Ok(n) if n > 0) {}
            std::process::exit(ORPHANED);
        });
    }
    let end = match job {
        Ok(job) => match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(run_part(job)),
            Err(e) => setup(format!("the worker's runtime: {e}")),
        },
        Err(e) => setup(format!("the worker's job: {e}")),
    };
    match frame(&end, MAX_END).and_then(|f| {
        output.write_all(&f)?;
        output.flush()
    }) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "the worker cannot write its end");
            1
        }
    }
}

fn setup(cause: String) -> WorkerEnd {
    WorkerEnd::Failed(VertexFailure {
        vertex: String::new(),
        cause,
        kind: ErrorKind::Setup,
    })
}

/// Runs the part in this process: a runtime and queues of its own.
async fn run_part(job: WorkerJob) -> WorkerEnd {
    let codecs = Arc::new(Registry::new());
    let options = Options {
        codecs: &codecs,
        queue_defaults: job.queue.clone(),
    };
    let topology = match Topology::parse_named(&job.topology_file, &job.topology, &options) {
        Ok(t) => t,
        Err(e) => return setup(e.to_string()),
    };
    let limits = match job.limits.limits() {
        Ok(l) => l,
        Err(e) => return setup(e.to_string()),
    };
    let here = job.placement.iter().filter(|&&p| p == job.here).count();
    let runtime = match Runtime::new(&RuntimeConfig {
        cache_dir: None,
        max_instances: u32::try_from(here.max(1)).unwrap_or(u32::MAX),
        max_memory_bytes: usize::try_from(job.max_memory_bytes).unwrap_or(usize::MAX),
        ..RuntimeConfig::default()
    }) {
        Ok(r) => r,
        Err(e) => return setup(e.to_string()),
    };
    let mut modules = HashMap::new();
    for (component, bytes) in &job.modules {
        // SAFETY: the bytes are the node's own `Module::serialize`, from the same program,
        // written to this process's stdin by the node that started it.
        match unsafe { runtime.compiled(bytes) } {
            Ok(m) => {
                modules.insert(component.clone(), m);
            }
            Err(e) => return setup(format!("component '{component}': {e}")),
        }
    }
    let spec = JobSpec {
        id: job.space.clone(),
        topology: &topology,
        modules,
        params: job.parameters.clone(),
        limits,
        owner: Some(job.owner.clone()),
    };
    let queues = Controller::new(QueueLimits::default(), codecs.clone());
    let placement: Vec<usize> = job.placement.iter().map(|&p| p as usize).collect();
    // The node asked its own policy already.
    let prepared = match runtime.prepare(&spec, &queues, &AllowAll, &placement, job.here as usize) {
        Ok(p) => p,
        Err(e) => {
            return WorkerEnd::Failed(VertexFailure {
                vertex: e.vertex,
                cause: e.cause,
                kind: e.kind,
            });
        }
    };
    if !prepared.remote_inputs.is_empty() || !prepared.remote_outputs.is_empty() {
        queues.destroy_job(&job.space);
        return setup("a worker runs a part without links to other parts".into());
    }
    let result = prepared.run().await;
    let prefix = format!("{}/", job.space);
    let stats = queues.destroy_job(&job.space);
    match result {
        Ok(report) => WorkerEnd::Done(WorkerReport {
            vertices: report
                .vertices
                .into_iter()
                .map(|v| WorkerVertex {
                    vertex: v.vertex,
                    stdout: v.stdout,
                    counts: v.counts,
                })
                .collect(),
            queues: stats
                .into_iter()
                .map(|s| QueueCount {
                    name: s.name.strip_prefix(&prefix).unwrap_or(&s.name).to_owned(),
                    kind: s.kind.as_str().to_owned(),
                    codec: s.codec,
                    items_in: s.items_in,
                    bytes_in: s.bytes_in,
                })
                .collect(),
            pid: std::process::id(),
        }),
        Err(e) => WorkerEnd::Failed(VertexFailure {
            vertex: e.vertex,
            cause: e.cause,
            kind: e.kind,
        }),
    }
}

/// Runs `job` in a worker that `command` starts inside the guest of `guest`, whose
/// `cgroup.procs` files are `join`; its report, or why it failed.
pub(crate) async fn run(
    command: &WorkerCommand,
    job: &WorkerJob,
    guest: &GuestRef,
    join: &[PathBuf],
) -> Result<WorkerReport, VertexFailure> {
    let failed = |kind: ErrorKind, cause: String| VertexFailure {
        vertex: String::new(),
        cause,
        kind,
    };
    let name = guest.name().to_owned();
    let mut cmd = tokio::process::Command::new(&command.program);
    cmd.args(&command.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Err(e) = mvm_os::host::join_on_exec(cmd.as_std_mut(), join) {
        return Err(failed(
            ErrorKind::Setup,
            format!("cannot place a worker in guest {name}: {e}"),
        ));
    }
    let body = frame(job, MAX_JOB).map_err(|e| failed(ErrorKind::Setup, e.to_string()))?;
    let oom_before = guest.oom_kills();
    let mut child = cmd.spawn().map_err(|e| {
        failed(
            ErrorKind::Setup,
            format!(
                "cannot start a worker ({}) in guest {name}: {e}",
                command.program.display()
            ),
        )
    })?;
    let pid = child.id().unwrap_or(0);
    let (Some(mut stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err(failed(ErrorKind::Setup, "a worker without pipes".into()));
    };
    // The pipe stays open while the part runs: its end tells the worker that its node is gone.
    let write = async {
        stdin.write_all(&body).await?;
        stdin.flush().await
    };
    let read = async move {
        let mut len = [0u8; 4];
        stdout.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_END {
            return Err(too_long(len, MAX_END));
        }
        let mut buf = vec![0u8; len];
        stdout.read_exact(&mut buf).await?;
        crate::proto::decode::<WorkerEnd>(&buf)
    };
    // A worker that dies early breaks the pipe: its end (or its death) says why.
    let (_, end) = tokio::join!(write, read);
    drop(stdin);
    let status = child.wait().await;
    match end {
        Ok(WorkerEnd::Done(report)) => Ok(report),
        Ok(WorkerEnd::Failed(f)) => Err(f),
        Err(e) => {
            let oom = matches!((oom_before, guest.oom_kills()), (Some(a), Some(b)) if b > a);
            Err(died(pid, &name, status, oom, &e))
        }
    }
}

/// The failure of a worker that ended without its frame.
fn died(
    pid: u32,
    guest: &str,
    status: io::Result<std::process::ExitStatus>,
    oom: bool,
    read: &io::Error,
) -> VertexFailure {
    use std::os::unix::process::ExitStatusExt;

    let who = format!("the part's worker (pid {pid}) in guest {guest}");
    let how = match &status {
        Ok(s) => match (s.code(), s.signal()) {
            (_, Some(sig)) => format!("was killed by signal {sig} ({})", signal_name(sig)),
            (Some(c), None) => format!("exited with status {c} without its report"),
            (None, None) => format!("ended ({s}) without its report"),
        },
        Err(e) => format!("cannot be waited for ({e})"),
    };
    if oom {
        return VertexFailure {
            vertex: String::new(),
            cause: format!(
                "{who} {how}: its guest's memory limit was reached, and the kernel killed it"
            ),
            kind: ErrorKind::Memory,
        };
    }
    VertexFailure {
        vertex: String::new(),
        cause: format!("{who} {how} (reading its report: {read})"),
        kind: ErrorKind::Other,
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests;
