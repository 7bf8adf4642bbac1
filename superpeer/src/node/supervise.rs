//! A running part's supervision: its vertices run while every remote channel is awaited, and
//! what moved is counted for its report.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use mvm_component::runtime::JobReport;
use mvm_component::runtime::checkpoint::VertexCounts;
use tokio::sync::mpsc;

use super::parts::{Body, InGuest};
use super::{LinkDone, LinkResult, Node};
use crate::environment::GuestRef;
use crate::proto::{EdgeTraffic, ErrorKind, PartResult, PortTraffic, Traffic, VertexFailure};
use crate::worker::{QueueCount, WorkerReport};

impl Node {
    /// Runs the local vertices (here, or in a worker inside their guest) and waits for every
    /// remote channel; collects what moved (in the queues of namespace `job`,
    /// [`super::space`], or as the worker counted it).
    pub(super) async fn supervise(
        self: &Arc<Self>,
        job: &str,
        body: Body,
        mut links: mpsc::Receiver<LinkResult>,
        expected: &AtomicUsize,
        guest: Option<GuestRef>,
    ) -> Result<PartResult, VertexFailure> {
        let waiting = |n: usize| n < expected.load(Ordering::Acquire);
        let start = Instant::now();
        let run = async move {
            match body {
                Body::Here(prepared) => {
                    prepared
                        .run()
                        .await
                        .map(Ran::here)
                        .map_err(|e| VertexFailure {
                            vertex: e.vertex,
                            cause: e.cause,
                            kind: e.kind,
                        })
                }
                Body::Worker(w) => {
                    let InGuest { started, .. } = *w;
                    let r = started.run().await?;
                    tracing::debug!(pid = r.pid, "the part ran in its worker");
                    Ok(Ran::worker(r))
                }
            }
        };
        tokio::pin!(run);
        let mut report = None;
        let mut remote: Vec<LinkDone> = Vec::new();
        let broken = |kind: ErrorKind, cause: String| VertexFailure {
            vertex: String::new(),
            cause,
            kind,
        };
        while report.is_none() || waiting(remote.len()) {
            tokio::select! {
                r = &mut run, if report.is_none() => match r {
                    Ok(r) => report = Some(r),
                    Err(failed) => {
                        return Err(link_lost(&mut links, waiting(remote.len()), failed).await);
                    }
                },
                l = links.recv(), if waiting(remote.len()) => match l {
                    Some(Ok(l)) => remote.push(l),
                    // A remote channel broke: the node at its other end, or the way there, is lost.
                    Some(Err(e)) => return Err(broken(ErrorKind::Lost, e.to_string())),
                    None => return Err(broken(ErrorKind::Other, "the job was ended".into())),
                },
            }
        }
        let Some(report) = report else {
            return Err(broken(ErrorKind::Other, "no report".into()));
        };
        // Traffic: local input queues count everything that entered; what came from another node
        // is remote, the rest local. Outboxes count what this node sent to others.
        let queues = match report.queues {
            Some(q) => q,
            None => self.queue_counts(job),
        };
        // (kind, codec, remote, direct, sealed) → (items, bytes).
        type Key = (String, String, bool, bool, bool);
        let mut traffic: BTreeMap<Key, (u64, u64)> = BTreeMap::new();
        for s in queues {
            let name = s.name.as_str();
            if let Some(into) = name.strip_suffix(">out") {
                let (direct, sealed) = remote
                    .iter()
                    .find(|l| l.out && l.direct && l.feeds(into))
                    .map_or((false, false), |l| (true, l.sealed));
                let e = traffic
                    .entry((s.kind, s.codec, true, direct, sealed))
                    .or_default();
                e.0 += s.items_in;
                e.1 += s.bytes_in;
            } else {
                let (ri, rb) = remote_into(&remote, name);
                let e = traffic
                    .entry((s.kind, s.codec, false, false, false))
                    .or_default();
                e.0 += s.items_in.saturating_sub(ri);
                e.1 += s.bytes_in.saturating_sub(rb);
            }
        }
        let mut edges = Vec::new();
        let mut received = Vec::new();
        for (vertex, _, counts) in &report.vertices {
            edges.extend(counts.sent.iter().map(|(port, to, c)| EdgeTraffic {
                from: format!("{vertex}:{port}"),
                to: to.clone(),
                items: c.items,
                bytes: c.bytes,
            }));
            received.extend(counts.received.iter().map(|(port, c)| PortTraffic {
                port: format!("{vertex}:{port}"),
                items: c.items,
                bytes: c.bytes,
            }));
        }
        let guest = guest.map(|g| g.identity(report.worker));
        Ok(PartResult {
            guest,
            edges,
            received,
            outputs: report
                .vertices
                .into_iter()
                .map(|(vertex, stdout, _)| (vertex, stdout))
                .collect(),
            traffic: traffic
                .into_iter()
                .map(
                    |((kind, codec, remote, direct, sealed), (items, bytes))| Traffic {
                        kind,
                        codec,
                        remote,
                        direct,
                        sealed,
                        items,
                        bytes,
                    },
                )
                .collect(),
            wall_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }
}

/// What a part's vertices did, wherever they ran.
struct Ran {
    /// Each vertex: its name, its output, what it moved.
    vertices: Vec<(String, Bytes, VertexCounts)>,
    /// What entered each queue, as a worker counted it (none: the node's own queues).
    queues: Option<Vec<QueueCount>>,
    /// The worker's process id and its kernel's boot id, when it ran in one.
    worker: Option<(u32, Option<String>)>,
}

impl Ran {
    fn here(r: JobReport) -> Ran {
        Ran {
            vertices: r
                .vertices
                .into_iter()
                .map(|v| (v.vertex, v.stdout, v.counts))
                .collect(),
            queues: None,
            worker: None,
        }
    }

    fn worker(r: WorkerReport) -> Ran {
        Ran {
            vertices: r
                .vertices
                .into_iter()
                .map(|v| (v.vertex, v.stdout, v.counts))
                .collect(),
            queues: Some(r.queues),
            worker: Some((r.pid, r.boot_id)),
        }
    }
}

impl Node {
    /// What entered each of the node's queues of namespace `job`.
    fn queue_counts(&self, job: &str) -> Vec<QueueCount> {
        let prefix = format!("{job}/");
        let mut out = Vec::new();
        for s in self.queues.list(Some(job)) {
            let name = s.name.strip_prefix(&prefix).unwrap_or(&s.name);
            let Some(h) = self.queues.get(job, name) else {
                continue;
            };
            out.push(QueueCount {
                name: name.to_owned(),
                kind: h.queue.config().kind.as_str().to_owned(),
                codec: h.codec.name().to_owned(),
                items_in: s.items_in,
                bytes_in: s.bytes_in,
            });
        }
        out
    }
}

/// How long a vertex's failure waits for a link's: a vertex whose channel to a lost node
/// closed (a send that finds no receiver) often fails a moment before the link reports why.
const LINK_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// The failure a part reports when vertex failure `failed` ended it: a remote link that failed
/// meanwhile (or within [`LINK_GRACE`]) is the cause, and the node at its other end is lost to
/// the job; otherwise the vertex's own failure. `open`: whether links were still running.
async fn link_lost(
    links: &mut mpsc::Receiver<LinkResult>,
    open: bool,
    failed: VertexFailure,
) -> VertexFailure {
    if !open {
        return failed;
    }
    let deadline = tokio::time::Instant::now() + LINK_GRACE;
    while let Ok(Some(l)) = tokio::time::timeout_at(deadline, links.recv()).await {
        if let Err(e) = l {
            let vertex = if failed.vertex.is_empty() {
                String::new()
            } else {
                format!(" (then vertex '{}': {})", failed.vertex, failed.cause)
            };
            return VertexFailure {
                vertex: String::new(),
                cause: format!("{e}{vertex}"),
                kind: ErrorKind::Lost,
            };
        }
    }
    failed
}

/// Items and bytes that reached local queue `name` (`vertex:port`) from other nodes.
fn remote_into(links: &[LinkDone], name: &str) -> (u64, u64) {
    links
        .iter()
        .filter(|l| !l.out && l.feeds(name))
        .fold((0, 0), |(i, b), l| (i + l.items, b + l.bytes))
}
