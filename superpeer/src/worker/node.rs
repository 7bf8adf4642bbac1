//! The node's side: a worker started inside its guest while its part is prepared, the part's
//! links ending in queues of the node (which carry them to the other parts as the node's own
//! parts' are), and the part run when it starts.

use std::io;
use std::path::PathBuf;
use std::process::Stdio;

use bytes::Bytes;
use mvm_component::runtime::{RemoteInput, RemoteOutput};
use mvm_queue::queue::{Config as QueueConfig, Queue, Receiver, Sender};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::mpsc;

use super::{
    BATCH, Carries, FromWorker, MAX_END, MAX_JOB, ToWorker, WorkerCommand, WorkerEnd, WorkerJob,
    WorkerReport, batch, frame, parse, too_long,
};
use crate::environment::GuestRef;
use crate::proto::{ErrorKind, VertexFailure};

/// A worker started and its part prepared, waiting for the part's start.
pub(crate) struct Started {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: u32,
    guest: GuestRef,
    oom_before: Option<u64>,
    /// The node's ends of the part's remote inputs: what enters them goes to the worker.
    inputs: Vec<Receiver<Bytes>>,
    /// The node's ends of the part's remote outputs: what the worker sends goes into them.
    outputs: Vec<Sender<Bytes>>,
}

/// The part's links as the node sees them: remote inputs to feed, remote outputs to carry.
pub(crate) type Links = (Vec<RemoteInput>, Vec<RemoteOutput>);

async fn read_msg<T, R>(r: &mut R, max: usize) -> io::Result<T>
where
    T: Carries,
    R: AsyncRead + Unpin,
{
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(too_long(len, max));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    parse(buf)
}

fn queue(name: String) -> Result<Queue<Bytes>, VertexFailure> {
    Queue::new(name, QueueConfig::default()).map_err(|e| VertexFailure {
        vertex: String::new(),
        cause: format!("a queue for a worker's link: {e}"),
        kind: ErrorKind::Setup,
    })
}

impl Started {
    /// Starts a worker by `command` inside `guest`, whose `cgroup.procs` files are `join`, hands
    /// it `job`, and waits for its part to be prepared: the worker and the part's links.
    pub(crate) async fn start(
        command: &WorkerCommand,
        job: &WorkerJob,
        guest: GuestRef,
        join: &[PathBuf],
    ) -> Result<(Started, Links), VertexFailure> {
        let name = guest.name().to_owned();
        let setup = |cause: String| VertexFailure {
            vertex: String::new(),
            cause,
            kind: ErrorKind::Setup,
        };
        let mut cmd = tokio::process::Command::new(&command.program);
        cmd.args(&command.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        mvm_os::host::join_on_exec(cmd.as_std_mut(), join)
            .map_err(|e| setup(format!("cannot place a worker in guest {name}: {e}")))?;
        let body = frame(job, MAX_JOB).map_err(|e| setup(e.to_string()))?;
        let oom_before = guest.oom_kills();
        let mut child = cmd.spawn().map_err(|e| {
            setup(format!(
                "cannot start a worker ({}) in guest {name}: {e}",
                command.program.display()
            ))
        })?;
        let pid = child.id().unwrap_or(0);
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(setup("a worker without pipes".into()));
        };
        let mut stdout = BufReader::new(stdout);
        let sent = async {
            stdin.write_all(&body).await?;
            stdin.flush().await
        };
        let (_, first) = tokio::join!(sent, read_msg::<FromWorker, _>(&mut stdout, MAX_END));
        let (inputs, outputs) = match first {
            Ok(FromWorker::Links { inputs, outputs }) => (inputs, outputs),
            Ok(FromWorker::End(WorkerEnd::Failed(f))) => return Err(f),
            Ok(other) => return Err(setup(format!("a worker began with {other:?}"))),
            Err(e) => {
                let status = child.wait().await;
                let oom = matches!((oom_before, guest.oom_kills()), (Some(a), Some(b)) if b > a);
                return Err(died(pid, &name, status, oom, &e));
            }
        };
        // Links name other parts of the job, never this one.
        let parts = job.placement.iter().max().map_or(0, |&m| m + 1);
        let other = |p: u32| p < parts && p != job.here;
        if let Some(p) = inputs
            .iter()
            .map(|l| l.2)
            .chain(outputs.iter().map(|l| l.2))
            .find(|&p| !other(p))
        {
            return Err(setup(format!(
                "a worker named part {p} as another part of the job"
            )));
        }
        let space = &job.space;
        let mut ins = Vec::new();
        let mut feeds = Vec::new();
        for (vertex, port, from) in inputs {
            let q = queue(format!("{space}/{vertex}:{port}<{from}"))?;
            feeds.push(q.receiver());
            ins.push(RemoteInput {
                vertex,
                port,
                from: from as usize,
                sender: q.sender(),
            });
        }
        let mut outs = Vec::new();
        let mut carries = Vec::new();
        for (vertex, port, to) in outputs {
            let q = queue(format!("{space}/{vertex}:{port}>{to}"))?;
            carries.push(q.sender());
            outs.push(RemoteOutput {
                vertex,
                port,
                to: to as usize,
                receiver: q.receiver(),
            });
        }
        let started = Started {
            child,
            stdin,
            stdout,
            pid,
            guest,
            oom_before,
            inputs: feeds,
            outputs: carries,
        };
        Ok((started, (ins, outs)))
    }

    /// Starts the part and carries its links' items until it ends: its report, or why it
    /// failed.
    pub(crate) async fn run(self) -> Result<WorkerReport, VertexFailure> {
        let Started {
            mut child,
            mut stdin,
            mut stdout,
            pid,
            guest,
            oom_before,
            inputs,
            outputs,
        } = self;
        let (tx, mut rx) = mpsc::channel::<ToWorker>(1024);
        let _ = tx.send(ToWorker::Start).await;
        let mut feeds = tokio::task::JoinSet::new();
        for (link, r) in inputs.into_iter().enumerate() {
            let tx = tx.clone();
            let link = u32::try_from(link).unwrap_or(u32::MAX);
            feeds.spawn(async move {
                while let Ok(first) = r.recv_async().await {
                    let mut items = vec![first];
                    while items.len() < BATCH {
                        match r.try_recv() {
                            Ok(i) => items.push(i),
                            Err(_) => break,
                        }
                    }
                    if tx.send(ToWorker::Items { link, items }).await.is_err() {
                        return;
                    }
                }
                let _ = tx.send(ToWorker::Closed { link }).await;
            });
        }
        drop(tx);
        // To the worker, messages ready together in one write; the pipe stays open after the
        // last, until the part ends (its end tells the worker that its node is gone).
        let write = async {
            while let Some(first) = rx.recv().await {
                let buf = batch(&first, || rx.try_recv().ok(), MAX_JOB)?;
                stdin.write_all(&buf).await?;
                stdin.flush().await?;
            }
            std::future::pending::<io::Result<()>>().await
        };
        let mut carries: Vec<Option<Sender<Bytes>>> = outputs.into_iter().map(Some).collect();
        let read = async {
            loop {
                match read_msg::<FromWorker, _>(&mut stdout, MAX_END).await? {
                    FromWorker::Items { link, items } => {
                        if let Some(Some(s)) = carries.get(link as usize) {
                            for bytes in items {
                                // A link that ended: its items have nowhere to go.
                                let _ = s.send_async(bytes).await;
                            }
                        }
                    }
                    FromWorker::Closed { link } => {
                        if let Some(s) = carries.get_mut(link as usize) {
                            *s = None;
                        }
                    }
                    FromWorker::Links { .. } => {}
                    FromWorker::End(end) => return Ok::<_, io::Error>(end),
                }
            }
        };
        let end = tokio::select! {
            end = read => end,
            Err(e) = write => Err(e),
        };
        feeds.abort_all();
        drop(stdin);
        let status = child.wait().await;
        match end {
            Ok(WorkerEnd::Done(report)) => Ok(report),
            Ok(WorkerEnd::Failed(f)) => Err(f),
            Err(e) => {
                let oom = matches!((oom_before, guest.oom_kills()), (Some(a), Some(b)) if b > a);
                Err(died(pid, guest.name(), status, oom, &e))
            }
        }
    }
}

/// The failure of a worker that ended without its end.
pub(super) fn died(
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
