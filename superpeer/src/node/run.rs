//! Running a prepared part: its outgoing channels, its vertices, its report to the group's
//! leader, and its end.

use crate::proto::NodeRequest;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use libp2p::PeerId;
use mvm_component::runtime::Prepared;
use mvm_queue::remote::{self, Options as RemoteOptions, direct};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::FuturesAsyncReadCompatExt;

use super::streams::{Channel, open_channel, run_link};
use super::{LinkDone, LinkResult, Node, NodeJob, fail};
use crate::proto::{
    ErrorKind, FailureKind, PART_HOLD, PartReport, PartResult, Request, Response, StreamHeader,
    Traffic, VertexFailure,
};

/// Where a part's report goes when the answer to its `Prepare` still waits for it.
type Hand = Arc<Mutex<Option<oneshot::Sender<PartReport>>>>;

impl Node {
    /// Starts a part that was prepared alone and holds the answer for up to [`PART_HOLD`]: a part
    /// that ends by then answers with its report ([`Response::Finished`]), saving the broker a
    /// request per short job; a longer one answers `Ok` and reports by itself later.
    pub(super) async fn start_and_hold(self: &Arc<Self>, from: PeerId, job: &str) -> Response {
        let (tx, mut rx) = oneshot::channel();
        let hand: Hand = Arc::new(Mutex::new(Some(tx)));
        let r = self.start_part(from, job, Some(hand.clone()));
        if !matches!(r, Response::Ok) {
            return r;
        }
        if let Ok(Ok(report)) = tokio::time::timeout(PART_HOLD, &mut rx).await {
            return Response::Finished(Box::new(report));
        }
        // Taking the hand back makes the part report by itself. If the part took it first, its
        // report is on the way here.
        if hand.lock().take().is_some() {
            return Response::Ok;
        }
        match rx.await {
            Ok(report) => Response::Finished(Box::new(report)),
            Err(_) => Response::Ok,
        }
    }

    /// Handles `Start`: opens the outgoing channels and runs the local vertices.
    pub(crate) fn start(self: &Arc<Self>, from: PeerId, job: &str) -> Response {
        self.start_part(from, job, None)
    }

    /// Starts a part; its report goes to `hand` while that still holds a sender, otherwise to the
    /// broker in a `Report`.
    fn start_part(self: &Arc<Self>, from: PeerId, job: &str, hand: Option<Hand>) -> Response {
        let mut jobs = self.jobs.lock();
        let Some(j) = jobs.get_mut(job) else {
            return fail(
                FailureKind::NotFound,
                format!("job {job} is not prepared here"),
            );
        };
        if j.broker != from && !self.is_superpeer(from) {
            return fail(
                FailureKind::Refused,
                format!("job {job} was not placed by {from}"),
            );
        }
        let (Some(mut prepared), Some(links_rx)) = (j.prepared.take(), j.links_rx.take()) else {
            return fail(FailureKind::Input, format!("job {job} has already started"));
        };
        for out in std::mem::take(&mut prepared.remote_outputs) {
            let (peer, addrs) = j.parts[out.to].clone();
            let links = j.links.clone();
            let mut control = self.site.net.streams();
            let net = self.site.net.clone();
            let header = StreamHeader {
                job: job.to_owned(),
                vertex: out.vertex.clone(),
                port: out.port.clone(),
                direct: self.links.is_some(),
            };
            let task = tokio::spawn(async move {
                let r: LinkResult = async {
                    // Streams from a peer whose certificate has not passed are dropped: exchange
                    // certificates first (this also makes the addresses known to the swarm).
                    net.authenticate(peer, &addrs)
                        .await
                        .map_err(|e| e.to_string())?;
                    let what = |e: &dyn std::fmt::Display| {
                        format!("channel to {}:{} on {peer}: {e}", out.vertex, out.port)
                    };
                    let channel = open_channel(&mut control, peer, &header).await?;
                    let direct = matches!(channel, Channel::Direct { .. });
                    let rep = match channel {
                        Channel::Stream(s) => remote::export_stream(
                            &out.receiver,
                            s.compat(),
                            &RemoteOptions::default(),
                        )
                        .await
                        .map_err(|e| what(&e))?,
                        Channel::Direct { port, token } => {
                            let sock = crate::links::connect(&addrs, port, &token)
                                .await
                                .map_err(|e| what(&e))?;
                            run_link(|done| direct::outlet(out.receiver, sock, done))
                                .await
                                .map_err(|e| what(&e))?
                        }
                    };
                    Ok(LinkDone {
                        vertex: out.vertex,
                        port: out.port,
                        out: true,
                        direct,
                        items: rep.items,
                        bytes: rep.bytes,
                    })
                }
                .await;
                let _ = links.try_send(r);
            });
            j.tasks.push(task.abort_handle());
        }
        let expected = j.expected_links;
        let node = self.clone();
        let job_id = job.to_owned();
        let broker = j.broker;
        let task = tokio::spawn(async move {
            let outcome = node.supervise(&job_id, prepared, links_rx, expected).await;
            if outcome.is_ok() {
                // Done here: remove everything now; the broker sends no termination to a part
                // that reported success.
                if let Some(j) = node.jobs.lock().remove(&job_id) {
                    drop(j);
                }
                node.queues.destroy_job(&job_id);
            }
            let report = PartReport {
                job: job_id.clone(),
                outcome,
            };
            let waiting = hand.and_then(|h| h.lock().take());
            let report = match waiting {
                Some(tx) => match tx.send(report) {
                    Ok(()) => return,
                    Err(report) => report,
                },
                None => report,
            };
            node.report_to_leader(broker, report).await;
        });
        j.tasks.push(task.abort_handle());
        Response::Ok
    }

    /// Sends a part's report to the group's broker: the super-peer this node follows now, which is
    /// `placed_by` unless the group's leader has changed. A report not taken (the super-peer is
    /// lost, or no longer leads) is sent again to whichever this node follows next, for a while.
    async fn report_to_leader(self: &Arc<Self>, placed_by: PeerId, report: PartReport) {
        let job = report.job.clone();
        let request = Request::Node(NodeRequest::Report(Box::new(report)));
        let give_up = tokio::time::Instant::now() + self.site.lost_after * 10;
        loop {
            let to = self
                .superpeer
                .read()
                .as_ref()
                .map_or(placed_by, |(p, _)| *p);
            match self.site.call(to, &[], request.clone()).await {
                Ok(_) => return,
                Err(f) if f.kind != FailureKind::Unavailable && to == placed_by => {
                    tracing::warn!(%job, error = %f, "the broker refused the report");
                    return;
                }
                Err(f) if tokio::time::Instant::now() >= give_up => {
                    tracing::warn!(%job, error = %f, "cannot report to the broker");
                    return;
                }
                Err(f) => {
                    tracing::debug!(%job, error = %f, "report not taken; sending it again");
                    tokio::time::sleep(self.site.heartbeat).await;
                }
            }
        }
    }

    /// Runs the local vertices and waits for every remote channel; collects what moved.
    async fn supervise(
        self: &Arc<Self>,
        job: &str,
        prepared: Prepared,
        mut links: mpsc::Receiver<LinkResult>,
        expected: usize,
    ) -> Result<PartResult, VertexFailure> {
        let start = Instant::now();
        let run = prepared.run();
        tokio::pin!(run);
        let mut report = None;
        let mut remote: Vec<LinkDone> = Vec::new();
        let broken = |kind: ErrorKind, cause: String| VertexFailure {
            vertex: String::new(),
            cause,
            kind,
        };
        while report.is_none() || remote.len() < expected {
            tokio::select! {
                r = &mut run, if report.is_none() => match r {
                    Ok(r) => report = Some(r),
                    Err(e) => return Err(VertexFailure { vertex: e.vertex, cause: e.cause, kind: e.kind }),
                },
                l = links.recv(), if remote.len() < expected => match l {
                    Some(Ok(l)) => remote.push(l),
                    // A remote channel broke: the node at its other end, or the way there, is lost.
                    Some(Err(e)) => return Err(broken(ErrorKind::Lost, e)),
                    None => return Err(broken(ErrorKind::Other, "the job was ended".into())),
                },
            }
        }
        let Some(report) = report else {
            return Err(broken(ErrorKind::Other, "no report".into()));
        };
        // Traffic: local input queues count everything that entered; what came from another node
        // is remote, the rest local. Outboxes count what this node sent to others.
        let queues = &self.queues;
        let mut traffic: BTreeMap<(String, String, bool, bool), (u64, u64)> = BTreeMap::new();
        let prefix = format!("{job}/");
        for s in queues.list(Some(job)) {
            let name = s.name.strip_prefix(&prefix).unwrap_or(&s.name);
            let Some(h) = queues.get(job, name) else {
                continue;
            };
            let kind = h.queue.config().kind.as_str().to_owned();
            let codec = h.codec.name().to_owned();
            if let Some(into) = name.strip_suffix(">out") {
                let direct = remote.iter().any(|l| l.out && l.direct && l.feeds(into));
                let e = traffic.entry((kind, codec, true, direct)).or_default();
                e.0 += s.items_in;
                e.1 += s.bytes_in;
            } else {
                let (ri, rb) = remote_into(&remote, name);
                let e = traffic.entry((kind, codec, false, false)).or_default();
                e.0 += s.items_in.saturating_sub(ri);
                e.1 += s.bytes_in.saturating_sub(rb);
            }
        }
        Ok(PartResult {
            outputs: report
                .vertices
                .into_iter()
                .map(|v| (v.vertex, v.stdout))
                .collect(),
            traffic: traffic
                .into_iter()
                .map(|((kind, codec, remote, direct), (items, bytes))| Traffic {
                    kind,
                    codec,
                    remote,
                    direct,
                    items,
                    bytes,
                })
                .collect(),
            wall_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// Handles `Terminate`: stops whatever runs and removes the job's queues.
    pub(crate) fn terminate(self: &Arc<Self>, from: PeerId, job: &str, reason: &str) -> Response {
        let mut jobs = self.jobs.lock();
        match jobs.get(job) {
            None => return Response::Ok,
            Some(j) if j.broker != from && !self.is_superpeer(from) => {
                return fail(
                    FailureKind::Refused,
                    format!("job {job} was not placed by {from}"),
                );
            }
            Some(_) => {}
        }
        if let Some(j) = jobs.remove(job) {
            for t in &j.tasks {
                t.abort();
            }
            drop(j);
            let left = self.queues.destroy_job(job);
            tracing::debug!(job, reason, queues = left.len(), "job terminated");
        }
        Response::Ok
    }

    /// Ends every job held (the daemon is shutting down).
    pub(crate) fn terminate_all(self: &Arc<Self>) {
        let jobs: Vec<(String, NodeJob)> = self.jobs.lock().drain().collect();
        for (id, j) in jobs {
            for t in &j.tasks {
                t.abort();
            }
            self.queues.destroy_job(&id);
        }
    }
}

/// Items and bytes that reached local queue `name` (`vertex:port`) from other nodes.
fn remote_into(links: &[LinkDone], name: &str) -> (u64, u64) {
    links
        .iter()
        .filter(|l| !l.out && l.feeds(name))
        .fold((0, 0), |(i, b), l| (i + l.items, b + l.bytes))
}
