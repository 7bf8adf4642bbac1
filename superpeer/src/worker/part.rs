//! The worker's side: the part prepared and run in this process, its links' items carried over
//! stdin and stdout.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use mvm_component::runtime::checkpoint::{PartControl, PartImage, Paused};
use mvm_component::runtime::{AllowAll, JobSpec, Runtime, RuntimeConfig};
use mvm_component::topology::{Options, Topology};
use mvm_queue::Controller;
use mvm_queue::codec::Registry;
use mvm_queue::controller::Limits as QueueLimits;
use mvm_queue::queue::Entry;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

use super::{
    BATCH, FromWorker, MAX_END, MAX_JOB, ORPHANED, QueueCount, ToWorker, WINDOW, WorkerEnd,
    WorkerJob, WorkerReport, WorkerVertex, batch, read_frame, read_job,
};
use crate::proto::{ErrorKind, VertexFailure};

/// Serves one part: reads its [`WorkerJob`] from `input`, prepares it, says its links, runs it
/// when started, carries its links' items, and writes its end to `output`. What `mvm worker`
/// runs; the exit status (0: the end was written, whatever it says).
///
/// With `watch`, the end of `input` ends this process ([`ORPHANED`]): the node keeps the pipe
/// open while the part runs, so the part's worker goes when its node goes, however the node
/// ended. Without it (tests), the end of `input` is the end of the node's messages.
pub fn serve<R, W>(mut input: R, output: W, watch: bool) -> i32
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    let (out, writer) = writer(output);
    let job = read_job(&mut input);
    // Once the part has ended, the node closing the pipe is no news.
    let ended = Arc::new(AtomicBool::new(false));
    let end = match job {
        Ok(job) => {
            let (tx, rx) = mpsc::channel(64);
            let over = ended.clone();
            std::thread::spawn(move || {
                loop {
                    match read_frame::<ToWorker>(&mut input, MAX_JOB) {
                        Ok(m) => {
                            if tx.blocking_send(m).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            if watch && !over.load(Ordering::SeqCst) {
                                tracing::warn!(error = %e, "the worker's node is gone");
                                std::process::exit(ORPHANED);
                            }
                            return;
                        }
                    }
                }
            });
            match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(run_part(job, rx, out.clone())),
                Err(e) => setup(format!("the worker's runtime: {e}")),
            }
        }
        Err(e) => setup(format!("the worker's job: {e}")),
    };
    ended.store(true, Ordering::SeqCst);
    let sent = out.blocking_send(FromWorker::End(end)).is_ok();
    drop(out);
    match writer.join() {
        Ok(Ok(())) if sent => 0,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "the worker cannot write to its node");
            1
        }
        _ => 1,
    }
}

/// Messages waiting for the writer at most (then their senders wait).
const QUEUED: usize = 1024;

/// A thread that writes messages to `output` in frames, those ready together in one write,
/// until every sender is gone.
fn writer<W: Write + Send + 'static>(
    mut output: W,
) -> (
    mpsc::Sender<FromWorker>,
    std::thread::JoinHandle<std::io::Result<()>>,
) {
    let (tx, mut rx) = mpsc::channel::<FromWorker>(QUEUED);
    let thread = std::thread::spawn(move || {
        while let Some(first) = rx.blocking_recv() {
            let buf = batch(&first, || rx.try_recv().ok(), MAX_END)?;
            output.write_all(&buf)?;
            output.flush()?;
        }
        Ok(())
    });
    (tx, thread)
}

pub(super) fn setup(cause: String) -> WorkerEnd {
    WorkerEnd::Failed(VertexFailure {
        vertex: String::new(),
        cause,
        kind: ErrorKind::Setup,
    })
}

fn failed(e: mvm_component::runtime::JobError) -> WorkerEnd {
    WorkerEnd::Failed(VertexFailure {
        vertex: e.vertex,
        cause: e.cause,
        kind: e.kind,
    })
}

/// Prepares and runs the part in this process: a runtime and queues of its own; `from` are
/// the node's messages, `to` takes this worker's. A job with files of its own
/// ([`WorkerJob::guest_files`]) gets sandboxes here, and what its vertices leave in them goes
/// to the node before the part's end.
async fn run_part(
    mut job: WorkerJob,
    from: mpsc::Receiver<ToWorker>,
    to: mpsc::Sender<FromWorker>,
) -> WorkerEnd {
    let codecs = Arc::new(Registry::new());
    let options = Options {
        codecs: &codecs,
        queue_defaults: job.queue.clone(),
    };
    let topology = match Topology::parse_named(&job.topology_file, &job.topology, &options) {
        Ok(t) => t,
        Err(e) => return setup(e.to_string()),
    };
    let guest = match &job.guest_files {
        None => None,
        Some(files) => {
            let here: Vec<String> = topology
                .vertices
                .iter()
                .zip(&job.placement)
                .filter(|(_, p)| **p == job.here)
                .map(|(v, _)| v.name.clone())
                .collect();
            match super::guest_files::GuestSandboxes::lay_out(files, &here) {
                Ok(g) => {
                    job.sandboxes.clone_from(&g.dirs);
                    Some(g)
                }
                Err(e) => return setup(format!("the job's files: {e}")),
            }
        }
    };
    let end = run_topology(job, &topology, codecs, from, to.clone()).await;
    if let Some(g) = guest {
        let (files, problems) = tokio::task::spawn_blocking(move || g.outputs())
            .await
            .unwrap_or_else(|e| (Vec::new(), vec![e.to_string()]));
        for p in problems {
            tracing::warn!(problem = %p, "an output file not given back");
        }
        let _ = to.send(FromWorker::Files(files)).await;
    }
    end
}

/// [`run_part`] once the topology is read.
async fn run_topology(
    job: WorkerJob,
    topology: &Topology,
    codecs: Arc<Registry>,
    mut from: mpsc::Receiver<ToWorker>,
    to: mpsc::Sender<FromWorker>,
) -> WorkerEnd {
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
        topology,
        modules,
        params: job.parameters.clone(),
        limits,
        owner: Some(job.owner.clone()),
        sandboxes: job.sandboxes.clone(),
    };
    let queues = Controller::new(QueueLimits::default(), codecs.clone());
    let placement: Vec<usize> = job.placement.iter().map(|&p| p as usize).collect();
    // The node asked its own policy already.
    let mut prepared =
        match runtime.prepare(&spec, &queues, &AllowAll, &placement, job.here as usize) {
            Ok(p) => p,
            Err(e) => return failed(e),
        };
    if let Some(blob) = &job.restore {
        let restored = PartImage::decode(blob)
            .map_err(|e| e.to_string())
            .and_then(|mut image| {
                // The image is of this part in another run (its own queue namespace).
                image.job = job.space.clone();
                prepared.restore(&image).map_err(|e| e.to_string())
            });
        if let Err(e) = restored {
            queues.destroy_job(&job.space);
            return setup(format!("the part's checkpoint: {e}"));
        }
    }
    let control = prepared.control();
    let part = |p: usize| u32::try_from(p).unwrap_or(u32::MAX);
    let inputs = std::mem::take(&mut prepared.remote_inputs);
    let outputs = std::mem::take(&mut prepared.remote_outputs);
    let links = FromWorker::Links {
        inputs: inputs
            .iter()
            .map(|i| (i.vertex.clone(), i.port.clone(), part(i.from)))
            .collect(),
        outputs: outputs
            .iter()
            .map(|o| (o.vertex.clone(), o.port.clone(), part(o.to)))
            .collect(),
    };
    if to.send(links).await.is_err() {
        return setup("the node is gone".into());
    }
    match from.recv().await {
        Some(ToWorker::Start) => {}
        other => {
            queues.destroy_job(&job.space);
            return setup(format!("the node did not start the part ({other:?})"));
        }
    }
    // Each remote input delivers what the node sends it, on its own (a full queue holds up
    // no other link), and gives the node credit for what it delivered.
    let names: Vec<String> = inputs
        .iter()
        .map(|i| format!("{}:{}", i.vertex, i.port))
        .collect();
    let ins: Vec<Inbound> = inputs
        .into_iter()
        .enumerate()
        .map(|(link, i)| Inbound::start(part(link), i.sender, to.clone()))
        .collect();
    // Each remote output sends what its vertices put in it, and all of it when asked (the
    // part paused).
    let mut drains = tokio::task::JoinSet::new();
    let mut flushes = Vec::new();
    for (link, o) in outputs.into_iter().enumerate() {
        let (flush, mut asked) = mpsc::channel::<oneshot::Sender<()>>(1);
        flushes.push(flush);
        let to = to.clone();
        let link = part(link);
        drains.spawn(async move {
            let send = async |items: Vec<Bytes>| to.send(FromWorker::Items { link, items }).await;
            // `items` topped up, up to a frame's worth, with what the output holds now.
            let top_up = |mut items: Vec<Bytes>| {
                while items.len() < BATCH {
                    match o.receiver.try_recv() {
                        Ok(i) => items.push(i),
                        Err(_) => break,
                    }
                }
                items
            };
            loop {
                let first = tokio::select! {
                    biased;
                    Some(ack) = asked.recv() => {
                        loop {
                            let items = top_up(Vec::new());
                            if items.is_empty() {
                                break;
                            }
                            if send(items).await.is_err() {
                                return;
                            }
                        }
                        let _ = ack.send(());
                        continue;
                    }
                    r = o.receiver.recv_async() => match r {
                        Ok(i) => i,
                        Err(_) => break,
                    },
                };
                if send(top_up(vec![first])).await.is_err() {
                    return;
                }
            }
            let _ = to.send(FromWorker::Closed { link }).await;
        });
    }
    let feed = tokio::spawn(feed(from, to.clone(), control, ins, names, flushes));
    // What the vertices write goes to the node as it comes, and the rest once they end.
    let book = prepared.logs();
    let (stop, mut stopped) = oneshot::channel::<()>();
    let ship = {
        let (book, to) = (book.clone(), to.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(super::LOG_SHIP) => {}
                    _ = &mut stopped => return,
                }
                let lines = book.take();
                if !lines.is_empty() && to.send(FromWorker::Logs(lines)).await.is_err() {
                    return;
                }
            }
        })
    };
    let result = prepared.run().await;
    drop(stop);
    let _ = ship.await;
    let lines = book.take();
    if !lines.is_empty() {
        let _ = to.send(FromWorker::Logs(lines)).await;
    }
    while drains.join_next().await.is_some() {}
    feed.abort();
    let prefix = format!("{}/", job.space);
    let stats = queues.destroy_job(&job.space);
    let report = match result {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    WorkerEnd::Done(WorkerReport {
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
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_owned()),
    })
}

/// How long the vertices have to reach a pause point (as in the node's process).
const PAUSE_WAIT: Duration = Duration::from_secs(5);

/// How long the remote outputs have to hand their items to the pipe once paused.
const FLUSH_WAIT: Duration = Duration::from_secs(10);

/// Carries out the node's messages while the part runs: items and ends of the remote inputs,
/// and the pause, image and resume of a checkpoint.
async fn feed(
    mut from: mpsc::Receiver<ToWorker>,
    to: mpsc::Sender<FromWorker>,
    control: Option<PartControl>,
    ins: Vec<Inbound>,
    names: Vec<String>,
    flushes: Vec<mpsc::Sender<oneshot::Sender<()>>>,
) {
    let mut paused: Option<Paused<'_>> = None;
    while let Some(m) = from.recv().await {
        match m {
            ToWorker::Items { link, items } => {
                if let Some(i) = ins.get(link as usize) {
                    i.send(Cmd::Items(items)).await;
                }
            }
            ToWorker::Closed { link } => {
                if let Some(i) = ins.get(link as usize) {
                    i.send(Cmd::Close).await;
                }
            }
            ToWorker::Pause { cut } => {
                let answer = if paused.is_some() {
                    Err("the part is paused already".to_owned())
                } else if let Some(c) = &control {
                    match c.pause(PAUSE_WAIT).await {
                        Err(e) => Err(e.to_string()),
                        Ok(p) => {
                            paused = Some(p);
                            flush(&flushes).await.map(|()| cut)
                        }
                    }
                } else {
                    Err("the part cannot be paused".to_owned())
                };
                if answer.is_err()
                    && let Some(p) = paused.take()
                {
                    p.resume();
                }
                let _ = to.send(FromWorker::Paused(answer)).await;
            }
            ToWorker::Image { cut, extra } => {
                let blob = match &paused {
                    None => Err(format!("checkpoint {cut}: the part is not paused")),
                    Some(p) => image(p, &ins, &names, extra).await,
                };
                let _ = to.send(FromWorker::Imaged(blob)).await;
            }
            ToWorker::Resume => {
                for i in &ins {
                    i.send(Cmd::Thaw).await;
                }
                if let Some(p) = paused.take() {
                    p.resume();
                }
            }
            ToWorker::Start => {}
        }
    }
}

/// Has every remote output send what it holds; done when all have.
async fn flush(flushes: &[mpsc::Sender<oneshot::Sender<()>>]) -> Result<(), String> {
    let mut acks = Vec::with_capacity(flushes.len());
    for f in flushes {
        let (tx, rx) = oneshot::channel();
        if f.send(tx).await.is_ok() {
            acks.push(rx);
        }
    }
    match tokio::time::timeout(FLUSH_WAIT, futures::future::join_all(acks)).await {
        Ok(_) => Ok(()),
        Err(_) => Err(format!(
            "the remote outputs were not sent within {FLUSH_WAIT:?}"
        )),
    }
}

/// The paused part's image: its queues, then what each remote input has received and not
/// delivered, then `extra` (what the node kept). The remote inputs stop delivering (until
/// resumed), so that nothing moves between the two.
async fn image(
    paused: &Paused<'_>,
    ins: &[Inbound],
    names: &[String],
    extra: Vec<(u32, Vec<(Bytes, i64)>)>,
) -> Result<Bytes, String> {
    let mut held = Vec::with_capacity(ins.len());
    for i in ins {
        let (tx, rx) = oneshot::channel();
        i.send(Cmd::Freeze(tx)).await;
        held.push(rx.await.unwrap_or_default());
    }
    // Each input's entries after its queue's: what it held, then what the node kept.
    let mut after: Vec<Vec<Entry<Bytes>>> = held
        .into_iter()
        .map(|items| items.into_iter().map(|b| Entry::new(b, 0)).collect())
        .collect();
    for (link, items) in extra {
        let Some(entries) = after.get_mut(link as usize) else {
            return Err(format!(
                "the node named remote input {link}, which the part has not"
            ));
        };
        entries.extend(items.into_iter().map(|(b, p)| Entry::new(b, p)));
    }
    let mut image = paused.image();
    for (name, entries) in names.iter().zip(after) {
        if !entries.is_empty() && !image.append(name, entries) {
            return Err(format!("the part has no queue {name}"));
        }
    }
    image.encode().map(Bytes::from).map_err(|e| e.to_string())
}

/// What a remote input's delivery is told.
enum Cmd {
    /// Items from the node.
    Items(Vec<Bytes>),
    /// The link ended: what is left is delivered, then the queue's sender goes.
    Close,
    /// Stop delivering and say what is undelivered.
    Freeze(oneshot::Sender<Vec<Bytes>>),
    /// Deliver again.
    Thaw,
}

/// A remote input's delivery into its queue.
struct Inbound(mpsc::Sender<Cmd>);

/// Where a remote input's delivery stands.
#[derive(Default)]
struct Delivery {
    /// Received, not yet in the queue.
    pending: VecDeque<Bytes>,
    frozen: bool,
    closed: bool,
    /// Items delivered and not yet credited to the node.
    owed: usize,
}

impl Delivery {
    fn on(&mut self, c: Cmd) {
        match c {
            Cmd::Items(items) => self.pending.extend(items),
            Cmd::Close => self.closed = true,
            Cmd::Freeze(tx) => {
                self.frozen = true;
                let _ = tx.send(self.pending.iter().cloned().collect());
            }
            Cmd::Thaw => self.frozen = false,
        }
    }
}

/// Credit given back to the node once this many items are delivered (or none wait).
const CREDIT_EVERY: usize = 64;

impl Inbound {
    /// Starts delivering link `link`'s items into `sender`; credit goes to the node on `to`.
    fn start(
        link: u32,
        sender: mvm_queue::queue::Sender<Bytes>,
        to: mpsc::Sender<FromWorker>,
    ) -> Inbound {
        // Bounded by the node's credit (its items) and the checkpoint steps.
        let (tx, mut cmds) = mpsc::channel(WINDOW + 8);
        tokio::spawn(async move {
            let mut s = Delivery::default();
            loop {
                if s.owed > 0 && (s.owed >= CREDIT_EVERY || s.pending.is_empty()) {
                    let n = u32::try_from(std::mem::take(&mut s.owed)).unwrap_or(u32::MAX);
                    if to
                        .send(FromWorker::Credit { link, items: n })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                if s.closed && s.pending.is_empty() {
                    return; // the sender goes: the vertex sees the end
                }
                let Some(front) = s.pending.front().cloned().filter(|_| !s.frozen) else {
                    match cmds.recv().await {
                        Some(c) => s.on(c),
                        None => return,
                    }
                    continue;
                };
                // Once the node's messages end, what was received is still delivered.
                let open = !cmds.is_closed() || !cmds.is_empty();
                tokio::select! {
                    biased;
                    Some(c) = cmds.recv(), if open => s.on(c),
                    r = sender.send_async(front) => {
                        s.pending.pop_front();
                        s.owed += 1;
                        // A queue closed under it: its vertex is gone, and the part ends.
                        if r.is_err() {
                            s.owed += s.pending.len();
                            s.pending.clear();
                        }
                    }
                }
            }
        });
        Inbound(tx)
    }

    async fn send(&self, c: Cmd) {
        let _ = self.0.send(c).await;
    }
}
