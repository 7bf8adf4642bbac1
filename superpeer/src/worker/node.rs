//! The node's side: a worker started inside its guest while its part is prepared, the part's
//! links ending in queues of the node (which carry them to the other parts as the node's own
//! parts' are), and the part run when it starts.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::process::Stdio;

use bytes::Bytes;
use mvm_component::runtime::logs::{DEFAULT_BOUND, LogBook};
use mvm_component::runtime::{RemoteInput, RemoteOutput};
use mvm_queue::queue::{Config as QueueConfig, Queue, Receiver, Sender};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::Child;
use tokio::sync::mpsc;

use super::agent::AgentAddr;
use super::{
    Carries, FromWorker, MAX_END, MAX_JOB, ToWorker, WINDOW, WorkerCommand, WorkerEnd, WorkerJob,
    WorkerReport, batch, frame, parse, too_long,
};
use std::sync::Arc;
use std::time::Duration;

use crate::environment::GuestRef;
use crate::proto::{ErrorKind, VertexFailure};
use mvm_queue::Controller;
use mvm_queue::queue::Entry;
use parking_lot::Mutex;
use tokio::sync::{Semaphore, oneshot};

/// Messages waiting for the writer to the worker at most.
const QUEUED: usize = 1024;

/// The node's end of the exchange with a worker: the worker's stdin and stdout, or a
/// connection to it through its guest's agent.
type ToIt = Box<dyn AsyncWrite + Send + Unpin>;
type FromIt = BufReader<Box<dyn AsyncRead + Send + Unpin>>;

/// Where a worker runs.
enum Proc {
    /// A child of the node, in its guest's control groups.
    Child(Child),
    /// Started in its guest (a domain of its own) by the guest's agent at this address.
    Agent(std::net::SocketAddr),
}

/// A worker started and its part prepared, waiting for the part's start.
pub(crate) struct Started {
    proc: Proc,
    stdin: ToIt,
    stdout: FromIt,
    pid: u32,
    guest: GuestRef,
    oom_before: Option<u64>,
    /// The node's ends of the part's remote inputs: what enters them goes to the worker, each
    /// with its feed's controls and credit.
    inputs: Vec<(Receiver<Bytes>, mpsc::Receiver<FeedCmd>, Arc<Semaphore>)>,
    /// The node's ends of the part's remote outputs: what the worker sends goes into them.
    outputs: Vec<Sender<Bytes>>,
    /// The messages to the worker.
    rx: mpsc::Receiver<ToWorker>,
    control: Arc<Control>,
    /// What the worker's vertices wrote, as the worker gives it.
    logs: Arc<LogBook>,
    /// The node's sandboxes of the part, by vertex, when the worker has its own (in a guest):
    /// the files it gives back go there.
    mirror: BTreeMap<String, PathBuf>,
}

/// What a feed of a remote input is told during a checkpoint.
enum FeedCmd {
    /// Send nothing more to the worker; say what was taken from the queue and not sent, and
    /// take the rest of the queue too (it is sent first once thawed).
    Freeze(oneshot::Sender<Vec<Bytes>>),
    /// Send again.
    Thaw,
}

/// The answers a checkpoint waits for from the worker.
#[derive(Default)]
struct Answers {
    paused: Option<oneshot::Sender<Result<u64, String>>>,
    imaged: Option<oneshot::Sender<Result<Bytes, String>>>,
}

/// The node's hand on a worker's part for its checkpoints (see the module `worker`): pause,
/// image, resume.
pub(crate) struct Control {
    tx: mpsc::Sender<ToWorker>,
    /// One per remote input, in link order.
    feeds: Vec<mpsc::Sender<FeedCmd>>,
    /// The remote inputs' vertex and port, in link order.
    inputs: Vec<(String, String)>,
    /// The node's queues of the remote outputs.
    outboxes: Vec<Queue<Bytes>>,
    answers: Mutex<Answers>,
}

impl Control {
    /// Pauses the part for cut `cut`; done when every item its remote outputs held is in the
    /// node's queues of them.
    ///
    /// # Errors
    /// The vertices reach no pause point, or the worker does not answer within `within`.
    pub(crate) async fn pause(&self, cut: u64, within: Duration) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.answers.lock().paused = Some(tx);
        self.tx
            .send(ToWorker::Pause { cut })
            .await
            .map_err(|_| "the worker is gone".to_owned())?;
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(r)) => r.map(|_| ()),
            Ok(Err(_)) => Err("the worker ended".into()),
            Err(_) => Err(format!("the worker did not pause within {within:?}")),
        }
    }

    /// Waits until the node's queues of the part's remote outputs are empty: everything the
    /// paused part sent is on its way.
    pub(crate) async fn outboxes_empty(&self) {
        while self.outboxes.iter().any(|q| !q.is_empty()) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The paused part's checkpoint blob: the node's feeds stop, and what they hold, then
    /// what `kept` gives for a remote input (its end's items kept past its queue's room), go
    /// into the image after what the worker has.
    ///
    /// # Errors
    /// The worker cannot image the part, or does not answer within `within`.
    pub(crate) async fn image(
        &self,
        cut: u64,
        kept: impl Fn(&str, &str) -> Vec<Entry<Bytes>>,
        within: Duration,
    ) -> Result<Bytes, String> {
        let mut extra = Vec::with_capacity(self.feeds.len());
        for (link, (feed, (vertex, port))) in self.feeds.iter().zip(&self.inputs).enumerate() {
            let (tx, rx) = oneshot::channel();
            let stash = match feed.send(FeedCmd::Freeze(tx)).await {
                Ok(()) => rx.await.unwrap_or_default(),
                Err(_) => Vec::new(), // the link ended: its feed sent everything
            };
            let entries: Vec<(Bytes, i64)> = stash
                .into_iter()
                .map(|b| (b, 0))
                .chain(kept(vertex, port).into_iter().map(|e| (e.item, e.priority)))
                .collect();
            if !entries.is_empty() {
                extra.push((u32::try_from(link).unwrap_or(u32::MAX), entries));
            }
        }
        let (tx, rx) = oneshot::channel();
        self.answers.lock().imaged = Some(tx);
        self.tx
            .send(ToWorker::Image { cut, extra })
            .await
            .map_err(|_| "the worker is gone".to_owned())?;
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the worker ended".into()),
            Err(_) => Err(format!(
                "the worker did not image the part within {within:?}"
            )),
        }
    }

    /// Lets the paused part go on, and the node's feeds with it, before anything asked of
    /// the worker later (the next checkpoint's pause).
    pub(crate) async fn resume_now(&self) {
        for f in &self.feeds {
            let _ = f.send(FeedCmd::Thaw).await;
        }
        let _ = self.tx.send(ToWorker::Resume).await;
    }

    /// As [`Control::resume_now`], from code that cannot wait (a move given up).
    pub(crate) fn resume(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move { this.resume_now().await });
    }
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

/// The node's queue `name` of job space `space` for a worker's link: named as the part's own
/// queue would be were it here (`vertex:port`, `vertex:port>out`), so that a move relinks it
/// and the part's end removes it, as for a part here.
fn queue(queues: &Controller, space: &str, name: &str) -> Result<Queue<Bytes>, VertexFailure> {
    queues
        .create(space, name, &QueueConfig::default())
        .map(|h| h.queue)
        .map_err(|e| VertexFailure {
            vertex: String::new(),
            cause: format!("a queue for a worker's link: {e}"),
            kind: ErrorKind::Setup,
        })
}

impl Started {
    /// Starts a worker by `command` inside `guest`, whose `cgroup.procs` files are `join`, hands
    /// it `job`, and waits for its part to be prepared: the worker and the part's links, which
    /// end in queues of the node's `queues`.
    pub(crate) async fn start(
        command: &WorkerCommand,
        job: &WorkerJob,
        guest: GuestRef,
        join: &[PathBuf],
        queues: &Controller,
    ) -> Result<(Started, Links), VertexFailure> {
        let name = guest.name().to_owned();
        let mut cmd = tokio::process::Command::new(&command.program);
        cmd.args(&command.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        mvm_os::host::join_on_exec(cmd.as_std_mut(), join)
            .map_err(|e| setup(format!("cannot place a worker in guest {name}: {e}")))?;
        let oom_before = guest.oom_kills();
        let mut child = cmd.spawn().map_err(|e| {
            setup(format!(
                "cannot start a worker ({}) in guest {name}: {e}",
                command.program.display()
            ))
        })?;
        let pid = child.id().unwrap_or(0);
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(setup("a worker without pipes".into()));
        };
        let ends = (
            Box::new(stdin) as ToIt,
            BufReader::new(Box::new(stdout) as Box<dyn AsyncRead + Send + Unpin>),
        );
        Self::begin(
            Proc::Child(child),
            ends,
            pid,
            oom_before,
            job,
            guest,
            queues,
        )
        .await
    }

    /// Has the agent of `guest` (a domain of its own), at `agent`, start a worker, hands it
    /// `job`, and waits for its part to be prepared, as [`Started::start`]. The files the
    /// worker gives back go into `mirror` (the node's sandboxes of the part, by vertex).
    pub(crate) async fn start_in_agent(
        agent: &AgentAddr,
        job: &WorkerJob,
        guest: GuestRef,
        queues: &Controller,
        mirror: BTreeMap<String, PathBuf>,
    ) -> Result<(Started, Links), VertexFailure> {
        let (conn, pid) = super::agent::hello(agent, true).await.map_err(|e| {
            setup(format!(
                "cannot start a worker through the agent of guest {} at {}: {e}",
                guest.name(),
                agent.addr
            ))
        })?;
        let (r, w) = conn.into_split();
        let ends = (
            Box::new(w) as ToIt,
            BufReader::new(Box::new(r) as Box<dyn AsyncRead + Send + Unpin>),
        );
        let proc = Proc::Agent(agent.addr);
        let (mut started, links) =
            Self::begin(proc, ends, pid.unwrap_or(0), None, job, guest, queues).await?;
        started.mirror = mirror;
        Ok((started, links))
    }

    /// Hands `job` to the worker just started, and waits for its part's links.
    async fn begin(
        mut proc: Proc,
        (mut stdin, mut stdout): (ToIt, FromIt),
        pid: u32,
        oom_before: Option<u64>,
        job: &WorkerJob,
        guest: GuestRef,
        queues: &Controller,
    ) -> Result<(Started, Links), VertexFailure> {
        let body = frame(job, MAX_JOB).map_err(|e| setup(e.to_string()))?;
        let sent = async {
            stdin.write_all(&body).await?;
            stdin.flush().await
        };
        let (_, first) = tokio::join!(sent, read_msg::<FromWorker, _>(&mut stdout, MAX_END));
        let (inputs, outputs) = match first {
            Ok(FromWorker::Links { inputs, outputs }) => (inputs, outputs),
            Ok(FromWorker::End(WorkerEnd::Failed(f))) => return Err(f),
            Ok(other) => return Err(setup(format!("a worker began with {other:?}"))),
            Err(e) => return Err(proc.died(pid, &guest, oom_before, &e).await),
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
        let mut controls = Vec::new();
        let mut names = Vec::new();
        for (vertex, port, from) in inputs {
            let q = queue(queues, space, &format!("{vertex}:{port}"))?;
            let (ctl, ctl_rx) = mpsc::channel(4);
            controls.push(ctl);
            feeds.push((q.receiver(), ctl_rx, Arc::new(Semaphore::new(WINDOW))));
            names.push((vertex.clone(), port.clone()));
            ins.push(RemoteInput {
                vertex,
                port,
                from: from as usize,
                sender: q.sender(),
            });
        }
        let mut outs = Vec::new();
        let mut carries = Vec::new();
        let mut outboxes = Vec::new();
        for (vertex, port, to) in outputs {
            let q = queue(queues, space, &format!("{vertex}:{port}>out"))?;
            carries.push(q.sender());
            outboxes.push(q.clone());
            outs.push(RemoteOutput {
                vertex,
                port,
                to: to as usize,
                receiver: q.receiver(),
            });
        }
        // Bounded by the credit of each remote input (its items) and by the checkpoint steps.
        let (tx, rx) = mpsc::channel(QUEUED);
        let control = Arc::new(Control {
            tx,
            feeds: controls,
            inputs: names,
            outboxes,
            answers: Mutex::new(Answers::default()),
        });
        let bound = job.limits.log_bytes.map_or(DEFAULT_BOUND, |b| {
            usize::try_from(b).unwrap_or(DEFAULT_BOUND)
        });
        let started = Started {
            proc,
            stdin,
            stdout,
            pid,
            guest,
            oom_before,
            inputs: feeds,
            outputs: carries,
            rx,
            control,
            logs: LogBook::new(Vec::new(), bound, false),
            mirror: BTreeMap::new(),
        };
        Ok((started, (ins, outs)))
    }

    /// The node's hand on the part for its checkpoints.
    pub(crate) fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// What the part's vertices write, as the worker gives it.
    pub(crate) fn logs(&self) -> Arc<LogBook> {
        self.logs.clone()
    }

    /// Starts the part and carries its links' items until it ends: its report, or why it
    /// failed.
    pub(crate) async fn run(self) -> Result<WorkerReport, VertexFailure> {
        let Started {
            mut proc,
            mut stdin,
            mut stdout,
            pid,
            guest,
            oom_before,
            inputs,
            outputs,
            mut rx,
            control,
            logs,
            mirror,
        } = self;
        let tx = control.tx.clone();
        let _ = tx.send(ToWorker::Start).await;
        let mut feeds = tokio::task::JoinSet::new();
        let mut credits = Vec::with_capacity(inputs.len());
        for (link, (r, ctl, credit)) in inputs.into_iter().enumerate() {
            let link = u32::try_from(link).unwrap_or(u32::MAX);
            credits.push(credit.clone());
            feeds.spawn(feed(link, r, ctl, credit, tx.clone()));
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
                    FromWorker::Credit { link, items } => {
                        if let Some(c) = credits.get(link as usize) {
                            c.add_permits((items as usize).min(WINDOW));
                        }
                    }
                    FromWorker::Paused(r) => {
                        if let Some(a) = control.answers.lock().paused.take() {
                            let _ = a.send(r);
                        }
                    }
                    FromWorker::Imaged(r) => {
                        if let Some(a) = control.answers.lock().imaged.take() {
                            let _ = a.send(r);
                        }
                    }
                    FromWorker::Logs(lines) => logs.extend(lines),
                    FromWorker::Files(files) if !mirror.is_empty() => {
                        let dirs = mirror.clone();
                        let put = tokio::task::spawn_blocking(move || {
                            super::guest_files::mirror(&dirs, &files)
                        })
                        .await;
                        if let Ok(Err(e)) | Err(e) = put.map_err(|e| e.to_string()) {
                            tracing::warn!(error = %e, "the files a guest's worker gave back");
                        }
                    }
                    FromWorker::Files(_) | FromWorker::Links { .. } => {}
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
        match end {
            Ok(end) => {
                if let Proc::Child(child) = &mut proc {
                    let _ = child.wait().await;
                }
                match end {
                    WorkerEnd::Done(report) => Ok(report),
                    WorkerEnd::Failed(f) => Err(f),
                }
            }
            Err(e) => Err(proc.died(pid, &guest, oom_before, &e).await),
        }
    }
}

fn setup(cause: String) -> VertexFailure {
    VertexFailure {
        vertex: String::new(),
        cause,
        kind: ErrorKind::Setup,
    }
}

#[path = "node_proc.rs"]
mod proc;

#[cfg(test)]
pub(super) use proc::died;

use proc::feed;
