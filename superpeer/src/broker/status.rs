//! What clients read of jobs: their status, and waiting for a job to change.

use std::collections::HashMap;
use std::time::Duration;

use mvm_component::policy::{Principal, Question, Resource};

use super::core::Core;
use super::{Broker, View, admit, fail, members, now_ms};
use crate::joblog::JobLog;
use crate::joblog::state::{ControlState, JobRecord};
use crate::proto::{FailureKind, JobId, JobState, JobStatus, PartStatus, Response, SUBMIT_HOLD};

/// A job's status as clients see it, with the nodes' `names` and why pending jobs wait.
fn status_of(
    st: &ControlState,
    j: &JobRecord,
    names: &members::Names,
    waiting: &HashMap<JobId, String>,
) -> JobStatus {
    let count = |v: &Vec<String>| u32::try_from(v.len()).unwrap_or(u32::MAX);
    let vertices = if j.parts.is_empty() {
        u32::try_from(j.resources.vertices).unwrap_or(0)
    } else {
        j.parts.iter().map(|p| count(&p.vertices)).sum()
    };
    let end = j.ended.as_ref().map_or_else(now_ms, |e| e.at_ms);
    JobStatus {
        job: j.id.clone(),
        name: j.name.clone(),
        state: j.state,
        version: j.version,
        vertices,
        vertices_done: j
            .parts
            .iter()
            .filter(|p| p.done)
            .map(|p| count(&p.vertices))
            .sum(),
        parts: j
            .parts
            .iter()
            .map(|p| PartStatus {
                node: p.node,
                name: names.get(&p.node).cloned().unwrap_or_default(),
                vertices: p.vertices.clone(),
                done: p.done,
                guest: p.guest.clone(),
            })
            .collect(),
        outputs: j.outputs.clone(),
        traffic: j.traffic.clone(),
        edges: j.edges.clone(),
        received: j.received.clone(),
        wall_ms: end.saturating_sub(j.submitted_ms),
        error: j.ended.as_ref().and_then(|e| e.error.clone()),
        error_kind: j.ended.as_ref().and_then(|e| e.kind),
        waiting: match (j.state, j.held) {
            (JobState::Pending, true) => Some("held (mvm release lets it go)".into()),
            (JobState::Pending, false) => Some(
                waiting
                    .get(&j.id)
                    .cloned()
                    .unwrap_or_else(|| "waiting for room".into()),
            ),
            _ => None,
        },
        owner: format!("{}@{}", j.owner.name, j.owner.domain),
        broker_addrs: Vec::new(),
        attempt: j.attempt,
        restarts: j.restarts.clone(),
        checkpoints: j.checkpoints.clone(),
        moves: j.moves.clone(),
        channels: j.channels.clone(),
        files: j.written.clone(),
        array: j.array.clone(),
        after: j.after.iter().chain(&j.after_ok).cloned().collect(),
        agreement: j
            .agreement
            .then(|| st.agreement(&j.id))
            .flatten()
            .map(|a| (a.state, a.reason.clone())),
    }
}

impl View {
    /// The status of job `id` in `log`, if it is there. (The names are locked before the
    /// log's state is read, and the reasons of waiting jobs after, as everywhere.)
    fn status(&self, log: &JobLog, id: &JobId) -> Option<JobStatus> {
        let names = self.names.lock();
        log.read(|st| {
            st.job(id)
                .map(|j| status_of(st, j, &names, &self.waiting.lock()))
        })
    }
}

impl Core {
    /// The answer to a submission once its job is in the log: the job's status.
    pub(super) fn submitted(&self, id: &JobId) -> Response {
        self.view.status(&self.log, id).map_or_else(
            || fail(FailureKind::Failed, "the job left the log at once"),
            |st| Response::Submitted(Box::new(st)),
        )
    }
}

impl Broker {
    /// The status of `job`, or of every job `who` may read.
    pub(super) fn status(&self, who: &Principal, job: Option<&JobId>) -> Response {
        let array = job.is_some_and(|id| self.log.read(|s| s.array(id).is_some()));
        if let Some(id) = job.filter(|_| !array)
            && let Some(r) = admit::refusal(&self.site, &self.log, who, "read-results", id)
        {
            return r;
        }
        let engine = self.site.policies.current().engine.clone();
        let domain = &self.site.domain;
        let may_read = |j: &JobRecord| {
            engine
                .decide(&Question {
                    actor: who.clone(),
                    action: "read-results".into(),
                    resource: Resource::Job(admit::facts_of(domain, j)),
                })
                .allowed()
        };
        let names = self.view.names.lock();
        let list: Vec<JobStatus> = self.log.read(|s| {
            let waiting = self.view.waiting.lock();
            let status = |j: &JobRecord| status_of(s, j, &names, &waiting);
            match job {
                // An array: its jobs the asker may read, by index.
                Some(id) if array => s
                    .array(id)
                    .into_iter()
                    .flat_map(|a| a.jobs.iter().filter_map(|j| s.job(j)))
                    .filter(|j| may_read(j))
                    .map(status)
                    .collect(),
                Some(id) => s.job(id).map(status).into_iter().collect(),
                // Every job the asker may read, by id.
                None => s.jobs().filter(|j| may_read(j)).map(status).collect(),
            }
        });
        Response::Status(list)
    }

    /// Waits until the job's version passes `after` (or, with `until_end`, until it has ended),
    /// at most `max`, then its status.
    pub(super) async fn wait(
        &self,
        job: &JobId,
        after: u64,
        until_end: bool,
        max: Duration,
    ) -> Response {
        let mut rx = self.log.watch(job);
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let Some(st) = self.view.status(&self.log, job) else {
                return fail(FailureKind::NotFound, format!("no job {job}"));
            };
            let ready = st.version > after && (!until_end || st.state.is_final());
            if ready || tokio::time::Instant::now() >= deadline {
                return Response::Status(vec![st]);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                continue; // the deadline: answer with what there is
            }
        }
    }

    /// The answer to a waiting submission: the job's status once it has ended, or after
    /// [`SUBMIT_HOLD`](crate::proto::SUBMIT_HOLD).
    pub(super) async fn held(&self, st: Box<JobStatus>) -> Response {
        match self.wait(&st.job, 0, true, SUBMIT_HOLD).await {
            Response::Status(mut v) if v.len() == 1 => Response::Submitted(Box::new(v.remove(0))),
            _ => Response::Submitted(st),
        }
    }
}
