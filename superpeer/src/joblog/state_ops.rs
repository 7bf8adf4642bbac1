//! The control state's changes that more than one command makes: a run given up and queued
//! again, a job's end, a part's move, and slots reserved or freed.

use libp2p::PeerId;

use super::{CommandError, ControlState, Ended, KEEP_ENDED, MAX_MOVES, Resources, owner_key};
use crate::proto::{JobId, JobState, MoveInfo, Restart};

impl ControlState {
    /// Gives up a run of a preparing or running job: it waits again, in its old place in the
    /// queue, its slots freed (what its owner holds stays held).
    pub(super) fn requeue(
        &mut self,
        job: JobId,
        attempt: u32,
        at_ms: u64,
        why: String,
    ) -> Result<(), CommandError> {
        let j = self.live(&job)?;
        let no = |why: &str| {
            Err(CommandError::NoRetry {
                job: job.clone(),
                attempt,
                why: why.to_owned(),
            })
        };
        if !matches!(j.state, JobState::Preparing | JobState::Running) {
            return no("it is not preparing or running");
        }
        if attempt != j.attempt.saturating_add(1) {
            return no("it is not the next run");
        }
        if attempt > j.retries {
            return no("its retries are used up");
        }
        if j.submission.is_none() {
            return no("its submission was not kept");
        }
        let slots: Vec<(PeerId, u32)> = j.slots().collect();
        j.state = JobState::Pending;
        j.attempt = attempt;
        j.parts.clear();
        j.outputs.clear();
        j.traffic.clear();
        j.edges.clear();
        j.received.clear();
        let agreed = j.agreement.then(|| why.clone());
        j.restarts.push(Restart {
            attempt,
            at_ms,
            why,
            from_cut: None,
            running_ms: None,
        });
        let key = (std::cmp::Reverse(j.priority), j.submitted_ms, job.clone());
        self.reserve(&job, &slots, false);
        self.pending.insert(key);
        if let Some(why) = agreed {
            self.agreement_requeued(&job, at_ms, &why);
        }
        Ok(())
    }

    pub(super) fn end(
        &mut self,
        id: &JobId,
        state: JobState,
        ended: Ended,
    ) -> Result<(), CommandError> {
        if !state.is_final() {
            return Err(CommandError::NotAnEnd {
                job: id.clone(),
                state,
            });
        }
        let j = self.live(id)?;
        let was = j.state;
        j.state = state;
        let agreed = j.agreement.then(|| (ended.at_ms, ended.error.clone()));
        j.ended = Some(ended);
        j.submission = None;
        if state != JobState::Done {
            j.outputs.clear();
        }
        let key = (std::cmp::Reverse(j.priority), j.submitted_ms, id.clone());
        let slots: Vec<(PeerId, u32)> = j.slots().collect();
        let (owner, resources) = (owner_key(&j.owner), j.resources);
        if was == JobState::Pending {
            self.pending.remove(&key);
        }
        self.reserve(id, &slots, false);
        if let Some(h) = self.held.get_mut(&owner) {
            h.add(resources, -1);
            if *h == Resources::default() {
                self.held.remove(&owner);
            }
        }
        self.ended.push_back(id.clone());
        if let Some((at_ms, error)) = agreed {
            self.agreement_job_ended(id, state, at_ms, error.as_deref());
        }
        // An array whose jobs have all ended needs its modules no more.
        if let Some((array, _)) = self.jobs.get(id).and_then(|j| j.array.clone())
            && let Some(a) = self.arrays.get(&array)
            && a.jobs
                .iter()
                .all(|j| self.jobs.get(j).is_none_or(|r| r.state.is_final()))
            && let Some(a) = self.arrays.get_mut(&array)
        {
            a.modules.clear();
        }
        while self.ended.len() > KEEP_ENDED {
            if let Some(old) = self.ended.pop_front()
                && let Some(gone) = self.jobs.remove(&old)
                && let Some((array, _)) = gone.array
                && self
                    .arrays
                    .get(&array)
                    .is_some_and(|a| a.jobs.iter().all(|j| !self.jobs.contains_key(j)))
            {
                self.arrays.remove(&array);
            }
        }
        Ok(())
    }

    pub(super) fn moved(
        &mut self,
        job: JobId,
        part: u32,
        info: MoveInfo,
    ) -> Result<(), CommandError> {
        let j = self.live(&job)?;
        let no = |why: &str| {
            Err(CommandError::Move {
                job: job.clone(),
                part,
                why: why.to_owned(),
            })
        };
        if j.state != JobState::Running || j.attempt != info.attempt {
            return no("the job is not running in that run");
        }
        if j.parts.iter().any(|p| p.node == info.to) {
            return no("the node it goes to holds a part of the job");
        }
        let Some(p) = j.parts.get_mut(part as usize) else {
            return no("the job has no such part");
        };
        if p.node != info.from || p.done {
            return no("the part is not running on the node it left");
        }
        p.node = info.to;
        let n = u32::try_from(p.vertices.len()).unwrap_or(u32::MAX);
        let (from, to) = (info.from, info.to);
        j.moves.push(info);
        let over = j.moves.len().saturating_sub(MAX_MOVES);
        j.moves.drain(..over);
        self.reserve(&job, &[(from, n)], false);
        self.reserve(&job, &[(to, n)], true);
        Ok(())
    }

    pub(super) fn reserve(&mut self, job: &JobId, slots: &[(PeerId, u32)], take: bool) {
        for (node, n) in slots {
            if take {
                self.placed.entry(*node).or_default().insert(job.clone());
            } else if let Some(jobs) = self.placed.get_mut(node) {
                jobs.remove(job);
                if jobs.is_empty() {
                    self.placed.remove(node);
                }
            }
            let r = self.reserved.entry(*node).or_insert(0);
            *r = if take {
                r.saturating_add(*n)
            } else {
                r.saturating_sub(*n)
            };
            if *r == 0 {
                self.reserved.remove(node);
            }
        }
    }
}
