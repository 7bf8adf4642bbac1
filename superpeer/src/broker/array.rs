//! Many jobs at once: arrays (a profile's `[sweep]`, one job per point, as Slurm's job arrays
//! and HTCondor's `queue … from`) and dependencies (`after`, `after_ok`: a job placed once
//! others have ended, as Slurm's `--dependency` and DAGMan's edges).
//!
//! An array is admitted whole or not at all: every job of it passes the policy (and the
//! domain's bound on an array's size, `max_array(actor, N)`, 10,000 when it says none), then
//! all wait in the queue, recorded in one entry; the queue places them as room frees. Their
//! modules are kept once, with the array. A dependency names a job or an array of the group,
//! which must exist when the job is submitted (so no cycle can form); a job waits, pending,
//! until every job it names has ended, and one that waits for jobs to end well is cancelled,
//! with the reason, when one of them does not.

use mvm_component::policy::Principal;
use mvm_component::profile::Profile;

use super::admit::Refusal;
use super::core::{Core, Effect, Reply, Then};
use super::place::{Checked, new_record};
use crate::joblog::Command;
use crate::joblog::state::{ArrayRecord, ControlState};
use crate::proto::{Failure, FailureKind, JobId, JobState, JobStatus, Response, Submission};

/// The most jobs an array may have when the domain's policy says nothing.
pub(crate) const DEFAULT_MAX_ARRAY: u64 = 10_000;

/// Where a job's dependencies stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Deps {
    /// Every one has ended (well, where it must).
    Ready,
    /// Some have not ended: why it waits.
    Wait(String),
    /// One it waits for to end well did not: why it will never run.
    Broken(String),
}

/// The jobs a dependency names: the job, or the jobs of the array; none when the log has
/// forgotten it (it ended long ago, and is taken as ended well).
fn named<'a>(st: &'a ControlState, id: &JobId) -> Vec<(&'a JobId, JobState)> {
    if let Some(j) = st.job(id) {
        return vec![(&j.id, j.state)];
    }
    st.array(id).map_or_else(Vec::new, |a| {
        a.jobs
            .iter()
            .filter_map(|j| st.job(j).map(|r| (&r.id, r.state)))
            .collect()
    })
}

/// Where dependencies `after` (to end) and `after_ok` (to end well) stand in `st`.
pub(crate) fn dependencies(st: &ControlState, after: &[JobId], after_ok: &[JobId]) -> Deps {
    let mut waits = Vec::new();
    for (id, ok) in after
        .iter()
        .map(|i| (i, false))
        .chain(after_ok.iter().map(|i| (i, true)))
    {
        for (job, state) in named(st, id) {
            if !state.is_final() {
                waits.push(format!("{job} ({})", format!("{state:?}").to_lowercase()));
            } else if ok && state != JobState::Done {
                let state = format!("{state:?}").to_lowercase();
                return Deps::Broken(if job == id {
                    format!("job {job}, which it runs after (after_ok), {state}")
                } else {
                    format!("job {job} of array {id}, which it runs after (after_ok), {state}")
                });
            }
        }
    }
    if waits.is_empty() {
        Deps::Ready
    } else {
        let more = waits.len().saturating_sub(3);
        waits.truncate(3);
        let tail = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        Deps::Wait(format!("waits for {}{tail} to end", waits.join(", ")))
    }
}

/// Checks that every job or array a submission waits for is known to `st`.
pub(crate) fn check_dependencies(st: &ControlState, s: &Submission) -> Result<(), Failure> {
    for id in s.after.iter().chain(&s.after_ok) {
        if st.job(id).is_none() && st.array(id).is_none() {
            return Err(Failure::new(
                FailureKind::Input,
                format!(
                    "job {} runs after {id}, which this group does not know",
                    s.name
                ),
            ));
        }
    }
    Ok(())
}

/// An array's status as one: its id, name and owner, its jobs' vertices, and how many of its
/// jobs are in each state (`waiting`); `Done` once every one is, `Failed` once every one has
/// ended and one did not end well, `Pending` or `Running` before.
pub(crate) fn array_status(st: &ControlState, id: &JobId) -> Option<JobStatus> {
    let a = st.array(id)?;
    let jobs: Vec<_> = a.jobs.iter().filter_map(|j| st.job(j)).collect();
    let mut counts = std::collections::BTreeMap::new();
    for j in &jobs {
        *counts
            .entry(format!("{:?}", j.state).to_lowercase())
            .or_insert(0u32) += 1;
    }
    let state = if jobs.iter().all(|j| j.state == JobState::Done) {
        JobState::Done
    } else if jobs.iter().all(|j| j.state.is_final()) {
        JobState::Failed
    } else if jobs.iter().any(|j| j.state == JobState::Running) {
        JobState::Running
    } else {
        JobState::Pending
    };
    let summary: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let vertices: u32 = jobs
        .iter()
        .map(|j| u32::try_from(j.resources.vertices).unwrap_or(0))
        .sum();
    Some(JobStatus {
        job: id.clone(),
        name: a.name.clone(),
        state,
        version: jobs.iter().map(|j| j.version).max().unwrap_or(0),
        vertices,
        vertices_done: 0,
        parts: Vec::new(),
        outputs: Vec::new(),
        traffic: Vec::new(),
        edges: Vec::new(),
        received: Vec::new(),
        wall_ms: 0,
        error: None,
        error_kind: None,
        waiting: Some(format!(
            "an array of {} jobs: {}",
            a.jobs.len(),
            summary.join(", ")
        )),
        owner: format!("{}@{}", a.owner.name, a.owner.domain),
        broker_addrs: Vec::new(),
        attempt: 0,
        restarts: Vec::new(),
        checkpoints: Vec::new(),
        moves: Vec::new(),
        channels: Vec::new(),
        files: Vec::new(),
        array: None,
        after: Vec::new(),
        agreement: None,
    })
}

impl Core {
    /// Admits an array: one job per point of the submission's sweep, each with its point's
    /// parameters, all passing the policy, then all recorded waiting in one entry.
    pub(super) fn submit_array(
        &mut self,
        out: &mut Vec<Effect>,
        reply: Reply,
        who: &Principal,
        s: Submission,
        c: &Checked,
    ) {
        let refused = |error| {
            Response::Error(Failure::from(Refusal {
                job: s.name.clone(),
                error,
            }))
        };
        let owner = match self.owner(who, &s) {
            Ok(o) => o,
            Err(error) => return out.push(Effect::Reply(reply, refused(error))),
        };
        let points = Profile::points(&s.sweep);
        let engine = self.site.policies.current().engine.clone();
        let max = match engine.job_rules(&owner, &self.site.domain) {
            Ok(r) => r.max_array.unwrap_or(DEFAULT_MAX_ARRAY),
            Err(e) => {
                let f = Failure::new(FailureKind::Refused, format!("max_array: {e}"));
                return out.push(Effect::Reply(reply, Response::Error(f)));
            }
        };
        if points.len() as u64 > max {
            let f = Failure::new(
                FailureKind::Refused,
                format!(
                    "job {}: its sweep has {} points; the policy of domain {} lets {owner} \
                     submit arrays of at most {max} jobs",
                    s.name,
                    points.len(),
                    self.site.domain
                ),
            );
            return out.push(Effect::Reply(reply, Response::Error(f)));
        }
        if !self.fits_when_free(&s, c) {
            let f = Failure::new(
                FailureKind::Unavailable,
                format!(
                    "job {}: each job of the array needs {} vertices, more than group {} could \
                     ever hold",
                    s.name,
                    c.topology.vertices.len(),
                    self.site.group
                ),
            );
            return out.push(Effect::Reply(reply, Response::Error(f)));
        }
        let term = self.log.term();
        let array = JobId::new(&s.name, term, self.seq);
        self.seq += 1;
        let width = (points.len().saturating_sub(1)).to_string().len();
        let mut records = Vec::with_capacity(points.len());
        let mut ids = Vec::with_capacity(points.len());
        for (i, point) in points.into_iter().enumerate() {
            let mut si = s.clone();
            si.sweep.clear();
            si.modules.clear();
            si.parameters.extend(point);
            let name = format!("{}.{i:0width$}", s.name);
            let id = JobId::new(&name, term, self.seq);
            self.seq += 1;
            let admitted = self
                .authorize(&id, &owner, &si, c.topology.vertices.len())
                .and_then(|r| self.checkpoint_policy(&owner, &mut si).map(|()| r));
            let resources = match admitted {
                Ok(r) => r,
                Err(error) => {
                    self.ledger.release(&id);
                    for id in &ids {
                        self.ledger.release(id);
                    }
                    return out.push(Effect::Reply(reply, refused(error)));
                }
            };
            let mut record = new_record(&id, &owner, resources, &si, c);
            record.name = name;
            record.state = JobState::Pending;
            record.array = Some((array.clone(), u32::try_from(i).unwrap_or(u32::MAX)));
            record.submission = Some(Box::new(si));
            ids.push(id);
            records.push(record);
        }
        let modules = s
            .components
            .values()
            .filter_map(|h| self.modules.get(h))
            .collect();
        let record = ArrayRecord {
            id: array.clone(),
            name: s.name.clone(),
            owner,
            jobs: ids.clone(),
            modules,
        };
        tracing::info!(%array, jobs = ids.len(), "array admitted");
        out.push(Effect::Record {
            command: Command::Array {
                array: Box::new(record),
                jobs: records,
            },
            then: Then::ArrayRecorded { reply, array, ids },
        });
    }

    /// An array's entry was applied (or not): the submitter's answer, and its jobs placed as
    /// room allows.
    pub(super) fn array_recorded(
        &mut self,
        out: &mut Vec<Effect>,
        reply: Reply,
        array: &JobId,
        ids: &[JobId],
        outcome: Result<crate::joblog::Applied, crate::joblog::LogError>,
    ) {
        for id in ids {
            self.ledger.release(id);
        }
        let r = match super::core::first(outcome) {
            Ok(()) => match self.log.read(|st| array_status(st, array)) {
                Some(st) => Response::Submitted(Box::new(st)),
                None => {
                    Response::Error(Failure::new(FailureKind::Failed, "the array left the log"))
                }
            },
            Err(f) => Response::Error(f),
        };
        out.push(Effect::Reply(reply, r));
        self.place_pending(out);
    }
}
