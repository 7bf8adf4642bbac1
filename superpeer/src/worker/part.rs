//! The worker's side: the part prepared and run in this process, its links' items carried over
//! stdin and stdout.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;

use mvm_component::runtime::{AllowAll, JobSpec, Runtime, RuntimeConfig};
use mvm_component::topology::{Options, Topology};
use mvm_queue::Controller;
use mvm_queue::codec::Registry;
use mvm_queue::controller::Limits as QueueLimits;
use tokio::sync::mpsc;

use super::{
    BATCH, FromWorker, MAX_END, MAX_JOB, ORPHANED, QueueCount, ToWorker, WorkerEnd, WorkerJob,
    WorkerReport, WorkerVertex, batch, read_frame, read_job,
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
    let end = match job {
        Ok(job) => {
            let (tx, rx) = mpsc::channel(64);
            std::thread::spawn(move || {
                loop {
                    match read_frame::<ToWorker>(&mut input, MAX_JOB) {
                        Ok(m) => {
                            if tx.blocking_send(m).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            if watch {
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
/// the node's messages, `to` takes this worker's.
async fn run_part(
    job: WorkerJob,
    mut from: mpsc::Receiver<ToWorker>,
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
    let mut prepared =
        match runtime.prepare(&spec, &queues, &AllowAll, &placement, job.here as usize) {
            Ok(p) => p,
            Err(e) => return failed(e),
        };
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
    // Items from the node into the remote inputs, until every link has ended.
    let mut senders: Vec<_> = inputs.into_iter().map(|i| Some(i.sender)).collect();
    let feed = tokio::spawn(async move {
        while let Some(m) = from.recv().await {
            match m {
                ToWorker::Items { link, items } => {
                    let Some(Some(s)) = senders.get(link as usize) else {
                        continue;
                    };
                    for bytes in items {
                        // A queue closed under it: its vertex is gone, and the part ends anyway.
                        let _ = s.send_async(bytes).await;
                    }
                }
                ToWorker::Closed { link } => {
                    if let Some(s) = senders.get_mut(link as usize) {
                        *s = None;
                    }
                }
                ToWorker::Start => {}
            }
        }
    });
    // Items of the remote outputs to the node.
    let mut drains = tokio::task::JoinSet::new();
    for (link, o) in outputs.into_iter().enumerate() {
        let to = to.clone();
        let link = part(link);
        drains.spawn(async move {
            while let Ok(first) = o.receiver.recv_async().await {
                let mut items = vec![first];
                while items.len() < BATCH {
                    match o.receiver.try_recv() {
                        Ok(i) => items.push(i),
                        Err(_) => break,
                    }
                }
                if to.send(FromWorker::Items { link, items }).await.is_err() {
                    return;
                }
            }
            let _ = to.send(FromWorker::Closed { link }).await;
        });
    }
    let result = prepared.run().await;
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
    })
}
