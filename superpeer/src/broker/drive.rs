//! Driving a placed job's parts: prepare everywhere, start everywhere, take the nodes' reports,
//! and end it (in the log first, then by telling every part still running).

use crate::proto::BrokerRequest;
use std::sync::Arc;

use libp2p::PeerId;

use super::{Broker, fail, now_ms};
use crate::joblog::Command;
use crate::joblog::state::{Ended, JobRecord};
use crate::proto::{
    ErrorKind, Failure, FailureKind, JobState, PartReport, PartSpec, Request, Response,
};

impl Broker {
    /// Runs a just-placed job of one part on the host and records it once its node has answered: one
    /// entry holds the job and, when the part ended within the node's hold (a short job), its
    /// end too, so that a short job costs one replication round instead of two. Until then the
    /// job is in no log; were this leader lost meanwhile, the submitter gets an error instead of
    /// a job id, and the part is told to stop (a node that does not hear it finds, at its next
    /// heartbeat, that the leader does not know the job). A job of several parts is recorded
    /// before they are woken: the log must know them to notice a node lost before the start.
    pub(super) async fn run_alone(
        &self,
        mut record: JobRecord,
        peer: PeerId,
        spec: PartSpec,
    ) -> Response {
        let id = record.id.clone();
        self.driving.lock().insert(id.clone());
        let addrs = self.addrs(&peer);
        let answer = self
            .site
            .call(
                peer,
                &addrs,
                Request::Broker(BrokerRequest::Prepare(Box::new(spec))),
            )
            .await;
        // A part prepared alone has started; one refused never ran.
        record.state = JobState::Running;
        let (end, running) = match answer {
            Ok(Response::Finished(report)) => {
                (Some(part_end(|| self.label(&peer), peer, *report)), false)
            }
            Ok(_) => (None, true),
            Err(f) => {
                record.state = JobState::Preparing;
                let (state, ended) = refusal_end(&self.label(&peer), &f);
                let end = Command::End {
                    job: id.clone(),
                    state,
                    ended,
                };
                (Some(end), false)
            }
        };
        let command = match end {
            Some(end) => Command::Batch(vec![Command::Submit(Box::new(record)), end]),
            None => Command::Submit(Box::new(record)),
        };
        let recorded = self.record(command).await;
        self.driving.lock().remove(&id);
        if let Err(r) = recorded {
            if running {
                self.terminate(&id, "not recorded", vec![peer]);
            }
            return r;
        }
        self.submitted(&id)
    }

    /// Wakes the parts: prepare everywhere (concurrently), then start everywhere.
    pub(super) async fn drive(self: Arc<Self>, id: String, specs: Vec<(PeerId, PartSpec)>) {
        self.drive_parts(&id, specs).await;
        self.driving.lock().remove(&id);
    }

    async fn drive_parts(&self, id: &str, specs: Vec<(PeerId, PartSpec)>) {
        let prepares = specs.into_iter().map(|(peer, spec)| {
            let addrs = self.addrs(&peer);
            let site = self.site.clone();
            async move {
                let r = site
                    .call(
                        peer,
                        &addrs,
                        Request::Broker(BrokerRequest::Prepare(Box::new(spec))),
                    )
                    .await;
                (peer, r)
            }
        });
        let results = futures::future::join_all(prepares).await;
        let peers: Vec<PeerId> = results.iter().map(|(p, _)| *p).collect();
        // Parts that ended within the node's hold answered with their report.
        let mut finished = Vec::new();
        let mut refused = None;
        for (peer, r) in results {
            match r {
                Ok(Response::Finished(report)) => finished.push((peer, *report)),
                Ok(_) => {}
                Err(f) => {
                    refused.get_or_insert((peer, f));
                }
            }
        }
        if let Some((peer, f)) = refused {
            let (state, ended) = refusal_end(&self.label(&peer), &f);
            self.end(id, state, ended).await;
            return;
        }
        for (peer, report) in finished {
            self.report(peer, report).await;
        }
        // Preparing → running; a part's early report or a cancel may have ended it meanwhile
        // (then nothing is started; the log would refuse the start too).
        if self
            .log
            .read(|s| s.job(id).is_none_or(|j| j.state != JobState::Preparing))
        {
            return;
        }
        let start = Command::Start { job: id.to_owned() };
        if !matches!(
            self.log.propose(start).await,
            Ok(crate::joblog::Applied::Done)
        ) {
            return;
        }
        if peers.len() == 1 {
            return; // a single part started when it was prepared
        }
        let starts = peers.iter().map(|peer| {
            let job = id.to_owned();
            let peer = *peer;
            async move {
                (
                    peer,
                    self.site
                        .call(peer, &[], Request::Broker(BrokerRequest::Start { job }))
                        .await,
                )
            }
        });
        for (peer, r) in futures::future::join_all(starts).await {
            if let Err(f) = r {
                let why = format!("node {}: {}", self.label(&peer), f.message);
                let ended = Ended::failed(ErrorKind::Setup, why);
                self.end(id, JobState::Failed, ended).await;
                return;
            }
        }
    }

    /// Ends a job (once): records its final state, then tells every part that has not
    /// reported a good end to stop and remove what it made.
    pub(super) async fn end(&self, id: &str, state: JobState, ended: Ended) {
        let command = Command::End {
            job: id.to_owned(),
            state,
            ended,
        };
        match self.log.propose(command).await {
            Ok(crate::joblog::Applied::Done) => {}
            Ok(other) => {
                tracing::debug!(job = id, outcome = ?other, "end not recorded");
                return;
            }
            Err(e) => {
                tracing::warn!(job = id, error = %e, "end not recorded");
                return;
            }
        }
        let peers: Vec<PeerId> = self.log.read(|s| {
            s.job(id)
                .map(|j| j.parts.iter().filter(|p| !p.done).map(|p| p.node).collect())
                .unwrap_or_default()
        });
        self.terminate(id, &format!("{state:?}"), peers);
    }

    /// Tells `peers` to stop their part of `id`, without waiting.
    pub(super) fn terminate(&self, id: &str, reason: &str, peers: Vec<PeerId>) {
        for peer in peers {
            let site = self.site.clone();
            let job = id.to_owned();
            let reason = reason.to_owned();
            let addrs = self.addrs(&peer);
            self.tasks.lock().spawn(async move {
                if let Err(e) = site
                    .call(
                        peer,
                        &addrs,
                        Request::Broker(BrokerRequest::Terminate { job, reason }),
                    )
                    .await
                {
                    tracing::debug!(%peer, error = %e, "terminate not delivered");
                }
            });
        }
    }

    /// A node's report of its part.
    pub(super) async fn report(&self, peer: PeerId, r: PartReport) -> Response {
        if self.driving.lock().contains(&r.job) {
            self.recorded(&r.job).await;
        }
        let known = self.log.read(|s| match s.job(&r.job) {
            None => Err(Failure::new(
                FailureKind::NotFound,
                format!("no job {}", r.job),
            )),
            Some(j) => match j.parts.iter().find(|p| p.node == peer) {
                None => Err(Failure::new(
                    FailureKind::Refused,
                    format!("{peer} runs no part of {}", r.job),
                )),
                Some(p) => Ok(j.state.is_final() || p.done),
            },
        });
        match known {
            Err(f) => return Response::Error(f),
            Ok(true) => return Response::Ok, // already ended, or reported before
            Ok(false) => {}
        }
        let job = r.job.clone();
        match part_end(|| self.label(&peer), peer, r) {
            command @ Command::PartDone { .. } => {
                if let Err(e) = self.log.propose(command).await {
                    return fail(FailureKind::Unavailable, e.to_string());
                }
            }
            Command::End { state, ended, .. } => {
                self.end(&job, state, ended).await;
            }
            _ => {}
        }
        Response::Ok
    }

    /// Waits (a bounded time) until a job being driven is in the log: a part's report may
    /// come before the job it belongs to has been recorded ([`Broker::run_alone`]).
    async fn recorded(&self, job: &str) {
        let wait = async {
            loop {
                let applied = self.log.applied();
                if self.log.read(|s| s.job(job).is_some()) || !self.driving.lock().contains(job) {
                    return;
                }
                self.log.changed(applied).await;
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), wait).await;
    }
}

/// The command a part's report leads to: the part done, or the job ended with its failure
/// (naming the node as `label` gives it).
fn part_end(label: impl FnOnce() -> String, peer: PeerId, r: PartReport) -> Command {
    match r.outcome {
        Ok(res) => Command::PartDone {
            job: r.job,
            node: peer,
            outputs: res.outputs,
            traffic: res.traffic,
            at_ms: now_ms(),
        },
        Err(f) => {
            let state = if f.kind == ErrorKind::Refused {
                JobState::Refused
            } else {
                JobState::Failed
            };
            let what = if f.vertex.is_empty() {
                f.cause
            } else {
                format!("vertex '{}': {}", f.vertex, f.cause)
            };
            Command::End {
                job: r.job,
                state,
                ended: Ended::failed(f.kind, format!("node {}: {what}", label())),
            }
        }
    }
}

/// How a job ends when a node refuses or fails to prepare its part.
fn refusal_end(label: &str, f: &Failure) -> (JobState, Ended) {
    let (state, kind) = match f.kind {
        FailureKind::Refused => (JobState::Refused, ErrorKind::Refused),
        _ => (JobState::Failed, ErrorKind::Setup),
    };
    (
        state,
        Ended::failed(kind, format!("node {label}: {}", f.message)),
    )
}
