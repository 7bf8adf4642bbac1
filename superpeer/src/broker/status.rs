//! What clients read of jobs: their status, and waiting for a job to change.

use std::time::Duration;

use mvm_component::policy::{Principal, Question, Resource};

use super::{Broker, admit, fail, members, now_ms};
use crate::joblog::state::JobRecord;
use crate::proto::{FailureKind, JobState, JobStatus, PartStatus, Response, SUBMIT_HOLD};

impl Broker {
    /// A job's status as clients see it, with `names` (from [`Broker::names`], taken before
    /// the log's state is read: the node table is locked before the state elsewhere).
    pub(super) fn status_of(&self, j: &JobRecord, names: &members::Names) -> JobStatus {
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
                .map(|p| {
                    let (node, name) = names
                        .get(&p.node)
                        .cloned()
                        .unwrap_or_else(|| (p.node.to_string(), String::new()));
                    PartStatus {
                        node,
                        name,
                        vertices: p.vertices.clone(),
                        done: p.done,
                    }
                })
                .collect(),
            outputs: j.outputs.clone(),
            traffic: j.traffic.clone(),
            wall_ms: end.saturating_sub(j.submitted_ms),
            error: j.ended.as_ref().and_then(|e| e.error.clone()),
            error_kind: j.ended.as_ref().and_then(|e| e.kind),
            waiting: match (j.state, j.held) {
                (JobState::Pending, true) => Some("held (mvm release lets it go)".into()),
                (JobState::Pending, false) => Some(
                    self.waiting
                        .lock()
                        .get(&j.id)
                        .cloned()
                        .unwrap_or_else(|| "waiting for room".into()),
                ),
                _ => None,
            },
            owner: format!("{}@{}", j.owner.name, j.owner.domain),
            broker_addrs: Vec::new(),
        }
    }

    /// The answer to a submission once its job is in the log: the job's status.
    pub(super) fn submitted(&self, id: &str) -> Response {
        let names = self.names();
        self.log
            .read(|st| st.job(id).map(|j| self.status_of(j, &names)))
            .map_or_else(
                || fail(FailureKind::Failed, "the job left the log at once"),
                Response::Submitted,
            )
    }

    /// The status of `job`, or of every job `who` may read.
    pub(super) fn status(&self, who: &Principal, job: Option<&str>) -> Response {
        if let Some(id) = job
            && let Some(r) = self.refusal(who, "read-results", id)
        {
            return r;
        }
        let engine = self.site.policies.current().engine.clone();
        let domain = &self.site.domain;
        let names = self.names();
        let list: Vec<JobStatus> = self.log.read(|s| match job {
            Some(id) => s
                .job(id)
                .map(|j| self.status_of(j, &names))
                .into_iter()
                .collect(),
            // Every job the asker may read, by id.
            None => s
                .jobs()
                .filter(|j| {
                    engine
                        .decide(&Question {
                            actor: who.clone(),
                            action: "read-results".into(),
                            resource: Resource::Job(admit::facts_of(domain, j)),
                        })
                        .allowed()
                })
                .map(|j| self.status_of(j, &names))
                .collect(),
        });
        Response::Status(list)
    }

    /// Waits until the job's version passes `after` (or, with `until_end`, until it has ended),
    /// at most `max`, then its status.
    pub(super) async fn wait(
        &self,
        job: &str,
        after: u64,
        until_end: bool,
        max: Duration,
    ) -> Response {
        let mut rx = self.log.watch(job);
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let names = self.names();
            let st = self
                .log
                .read(|s| s.job(job).map(|j| self.status_of(j, &names)));
            let Some(st) = st else {
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
    pub(super) async fn held(&self, st: JobStatus) -> Response {
        match self.wait(&st.job, 0, true, SUBMIT_HOLD).await {
            Response::Status(mut v) if v.len() == 1 => Response::Submitted(v.remove(0)),
            _ => Response::Submitted(st),
        }
    }
}
