//! The group's control state and the commands that change it: a pure state machine, applied in
//! log order on every replica, so that any replica that has applied the same entries holds the
//! same jobs.
//!
//! Nothing here reads a clock or the network: every time is a field of the command that the
//! leader proposed, and a command that does not fit the state (a job already ended, a part it
//! does not have) is refused by [`ControlState::apply`] without any change.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use libp2p::PeerId;
use mvm_component::policy::Principal;
use serde::{Deserialize, Serialize};

use crate::proto::{JobId, JobState};

pub use super::agreements::KEEP_AGREEMENTS;
pub use super::command::{Applied, Command, CommandError};
pub use super::record::{
    AgreementRecord, ArrayRecord, Ended, JobBid, JobRecord, PartRecord, Resources, VertexLogs,
    now_ms,
};

/// How many ended jobs the log remembers; the oldest are forgotten first.
pub const KEEP_ENDED: usize = 10_000;

/// The moves of its parts a job's record keeps, the newest.
pub const MAX_MOVES: usize = 100;

/// The group's control state: jobs, where their parts run, what owners and nodes hold, the
/// pending queue and the history of ended jobs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ControlState {
    pub(super) jobs: BTreeMap<JobId, JobRecord>,
    /// Pending jobs in placement order: higher priority first, then earlier submission.
    pending: BTreeSet<(std::cmp::Reverse<i32>, u64, JobId)>,
    /// What each owner's jobs that have not ended hold, by `name@domain`.
    held: BTreeMap<String, Resources>,
    /// Vertex slots reserved on each node by jobs that have not ended.
    reserved: BTreeMap<PeerId, u32>,
    /// The jobs not ended with a part on each node (empty in a snapshot older than it).
    #[serde(default)]
    placed: BTreeMap<PeerId, BTreeSet<JobId>>,
    /// Ended jobs, oldest first.
    ended: VecDeque<JobId>,
    /// Drained nodes: nothing more is placed on them.
    #[serde(default)]
    drained: BTreeSet<PeerId>,
    /// Arrays of jobs, while one of their jobs is remembered.
    #[serde(default)]
    arrays: BTreeMap<JobId, ArrayRecord>,
    /// Offers and agreements, by id (the id their job gets).
    #[serde(default)]
    pub(super) agreements: BTreeMap<JobId, AgreementRecord>,
    /// Ended offers and agreements, oldest first.
    #[serde(default)]
    pub(super) agreements_ended: VecDeque<JobId>,
    /// Offers and agreements not ended.
    #[serde(default)]
    pub(super) agreements_open: BTreeSet<JobId>,
    /// The bank of the domain's market.
    #[serde(default)]
    bank: super::bank::Bank,
}

/// The key of an owner in [`ControlState`]'s tallies.
fn owner_key(p: &Principal) -> String {
    format!("{}@{}", p.name, p.domain)
}

impl ControlState {
    /// The bank.
    pub fn bank(&self) -> &super::bank::Bank {
        &self.bank
    }

    /// Whether `node` is drained.
    pub fn is_drained(&self, node: &PeerId) -> bool {
        self.drained.contains(node)
    }

    /// The drained nodes.
    pub fn drained(&self) -> impl Iterator<Item = &PeerId> {
        self.drained.iter()
    }

    /// A job.
    pub fn job(&self, id: &JobId) -> Option<&JobRecord> {
        self.jobs.get(id)
    }

    /// Every job remembered, by id.
    pub fn jobs(&self) -> impl Iterator<Item = &JobRecord> {
        self.jobs.values()
    }

    /// Pending jobs that are not held, in placement order.
    pub fn pending(&self) -> impl Iterator<Item = &JobRecord> {
        self.pending
            .iter()
            .filter_map(|(_, _, id)| self.jobs.get(id))
            .filter(|j| !j.held)
    }

    /// How many jobs wait to be placed (held ones too).
    pub fn waiting(&self) -> usize {
        self.pending.len()
    }

    /// How many jobs remembered have not ended (waiting, being prepared or running).
    pub fn not_ended(&self) -> usize {
        self.jobs.len().saturating_sub(self.ended.len())
    }

    /// What `owner`'s jobs that have not ended hold.
    pub fn held(&self, owner: &Principal) -> Resources {
        self.held
            .get(&owner_key(owner))
            .copied()
            .unwrap_or_default()
    }

    /// The jobs not ended with a part on `node`.
    pub fn placed_on(&self, node: &PeerId) -> impl Iterator<Item = &JobRecord> {
        self.placed
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.jobs.get(id))
    }

    /// Vertex slots that jobs not ended hold on `node`.
    pub fn reserved(&self, node: &PeerId) -> u32 {
        self.reserved.get(node).copied().unwrap_or(0)
    }

    /// Applies one command, the log's entry `index`.
    pub fn apply(&mut self, index: u64, command: Command) -> Applied {
        let command = match command {
            Command::Batch(v) => {
                return Applied::Batch(v.into_iter().map(|c| self.apply(index, c)).collect());
            }
            c => c,
        };
        // Lines of its logs are no change of the job's (waiters are not woken for them).
        let job = match &command {
            Command::Logs { .. } | Command::Files { .. } => None,
            c => c.jobs().first().map(|j| (*j).clone()),
        };
        match self.try_apply(command) {
            Ok(()) => {
                if let Some(j) = job.and_then(|id| self.jobs.get_mut(&id)) {
                    j.version = index;
                }
                Applied::Done
            }
            Err(why) => Applied::Refused(why),
        }
    }

    fn live(&mut self, id: &JobId) -> Result<&mut JobRecord, CommandError> {
        match self.jobs.get_mut(id) {
            None => Err(CommandError::NoJob(id.clone())),
            Some(j) if j.state.is_final() => Err(CommandError::Ended {
                job: id.clone(),
                state: j.state,
            }),
            Some(j) => Ok(j),
        }
    }

    fn try_apply(&mut self, command: Command) -> Result<(), CommandError> {
        match command {
            Command::Submit(job) => self.submit(*job),
            Command::Offer(a) => self.offer(*a),
            Command::Bank(super::bank::BankCommand::Charge {
                provider,
                batches,
                at_ms,
            }) => {
                // A market job is charged no more than is left of its budget.
                let mut caps: std::collections::BTreeMap<JobId, u64> = batches
                    .iter()
                    .flat_map(|b| &b.lines)
                    .filter_map(|l| {
                        let left = self.jobs.get(&l.job)?.bid?.left()?;
                        Some((l.job.clone(), left))
                    })
                    .collect();
                for (job, amount) in self.bank.charge(&provider, batches, at_ms, &mut caps) {
                    if let Some(b) = self.jobs.get_mut(&job).and_then(|j| j.bid.as_mut()) {
                        b.spent = b.spent.saturating_add(amount);
                    }
                }
                Ok(())
            }
            Command::Bank(c) => self.bank.apply(c).map_err(CommandError::Bank),
            Command::Accept { offer, at_ms, job } => self.accept(offer, at_ms, *job),
            Command::EndAgreement {
                agreement,
                state,
                at_ms,
                why,
            } => self.end_agreement(agreement, state, at_ms, why),
            Command::Array { array, jobs } => self.submit_array(*array, jobs),
            Command::Place {
                job,
                parts,
                from_cut,
            } => {
                let j = self.live(&job)?;
                if j.state != JobState::Pending {
                    return Err(CommandError::NotPending(job));
                }
                if parts.is_empty() {
                    return Err(CommandError::NoParts(job));
                }
                j.state = JobState::Preparing;
                j.parts = parts;
                if let Some(r) = j.restarts.last_mut()
                    && r.attempt == j.attempt
                {
                    r.from_cut = from_cut;
                }
                // Kept to run it again, or (a job with checkpoints) to move its parts.
                if j.attempt >= j.retries && j.checkpoint.is_none() {
                    j.submission = None;
                }
                let key = (std::cmp::Reverse(j.priority), j.submitted_ms, job.clone());
                let slots: Vec<(PeerId, u32)> = j.slots().collect();
                self.pending.remove(&key);
                self.reserve(&job, &slots, true);
                Ok(())
            }
            Command::Start { job, at_ms } => {
                let j = self.live(&job)?;
                if j.state != JobState::Preparing {
                    return Err(CommandError::NotPreparing(job));
                }
                j.state = JobState::Running;
                j.started_ms = Some(at_ms);
                if let Some(r) = j.restarts.last_mut()
                    && r.attempt == j.attempt
                    && r.running_ms.is_none()
                {
                    r.running_ms = Some(at_ms);
                }
                if j.agreement {
                    self.agreement_started(&job);
                }
                Ok(())
            }
            Command::Requeue {
                job,
                attempt,
                at_ms,
                why,
            } => self.requeue(job, attempt, at_ms, why),
            Command::Checkpoint { job, info } => {
                let j = self.live(&job)?;
                let no = |why: &str| CommandError::Checkpoint {
                    job: job.clone(),
                    cut: info.cut,
                    why: why.to_owned(),
                };
                if j.state != JobState::Running || j.attempt != info.attempt {
                    return Err(no("the job is not running in that run"));
                }
                if j.checkpoints.last().is_some_and(|c| c.cut >= info.cut) {
                    return Err(no("it is not newer than the last one"));
                }
                let keep = j.checkpoint.map_or(1, |c| c.keep.max(1)) as usize;
                j.checkpoints.push(info);
                let over = j.checkpoints.len().saturating_sub(keep);
                j.checkpoints.drain(..over);
                Ok(())
            }
            Command::PartDone {
                job,
                node,
                attempt,
                outputs,
                traffic,
                edges,
                received,
                guest,
                at_ms,
            } => {
                let j = self.live(&job)?;
                if j.state == JobState::Pending {
                    return Err(CommandError::NoPartsYet(job));
                }
                if j.attempt != attempt {
                    let current = j.attempt;
                    return Err(CommandError::OtherRun {
                        job,
                        attempt,
                        current,
                    });
                }
                let Some(part) = j.parts.iter_mut().find(|p| p.node == node) else {
                    return Err(CommandError::NotAPart { job, node });
                };
                if part.done {
                    return Err(CommandError::Reported { job, node });
                }
                part.done = true;
                part.guest = guest;
                j.outputs.extend(outputs);
                for t in traffic {
                    match j.traffic.iter_mut().find(|x| {
                        (&x.kind, &x.codec, x.remote, x.direct, x.sealed)
                            == (&t.kind, &t.codec, t.remote, t.direct, t.sealed)
                    }) {
                        Some(x) => {
                            x.items += t.items;
                            x.bytes += t.bytes;
                        }
                        None => j.traffic.push(t),
                    }
                }
                j.traffic.sort();
                j.edges.extend(edges);
                j.edges.sort();
                j.received.extend(received);
                j.received.sort();
                if j.parts.iter().all(|p| p.done) {
                    let ended = Ended {
                        at_ms,
                        error: None,
                        kind: None,
                    };
                    return self.end(&job, JobState::Done, ended);
                }
                Ok(())
            }
            Command::End { job, state, ended } => self.end(&job, state, ended),
            Command::Logs {
                job,
                attempt,
                lines,
            } => {
                let Some(j) = self.jobs.get_mut(&job) else {
                    return Err(CommandError::NoJob(job));
                };
                if attempt > j.attempt {
                    let current = j.attempt;
                    return Err(CommandError::OtherRun {
                        job,
                        attempt,
                        current,
                    });
                }
                j.keep_logs(attempt, lines);
                Ok(())
            }
            Command::Files {
                job,
                attempt,
                files,
            } => {
                let Some(j) = self.jobs.get_mut(&job) else {
                    return Err(CommandError::NoJob(job));
                };
                if attempt > j.attempt || attempt < j.written_attempt {
                    let current = j.attempt;
                    return Err(CommandError::OtherRun {
                        job,
                        attempt,
                        current,
                    });
                }
                if attempt > j.written_attempt {
                    j.written.clear();
                    j.written_attempt = attempt;
                }
                for f in files {
                    j.written
                        .retain(|w| (&w.vertex, &w.path) != (&f.vertex, &f.path));
                    j.written.push(f);
                }
                j.written.sort();
                Ok(())
            }
            Command::Batch(_) => Err(CommandError::NestedBatch),
            Command::Move { job, part, info } => self.moved(job, part, info),
            Command::Drain { node, drained } => {
                if drained {
                    self.drained.insert(node);
                } else {
                    self.drained.remove(&node);
                }
                Ok(())
            }
            Command::Hold { job, held } => {
                let j = self.live(&job)?;
                if j.state != JobState::Pending {
                    let state = j.state;
                    return Err(CommandError::HoldNotPending { job, state });
                }
                if j.held == held {
                    return Err(CommandError::AlreadyHeld { job, held });
                }
                j.held = held;
                Ok(())
            }
            Command::Bid { job, rate, node } => {
                let j = self.live(&job)?;
                let Some(bid) = &mut j.bid else {
                    return Err(CommandError::NotBidding(job));
                };
                bid.top = bid.top.max(rate);
                for p in j
                    .parts
                    .iter_mut()
                    .filter(|p| node.is_none_or(|n| n == p.node))
                {
                    p.bid = Some(rate);
                }
                match node {
                    // By hand: every part, and the agent stops (a run again bids so too).
                    None => {
                        bid.rate = rate;
                        bid.agent = false;
                    }
                    Some(_) => {
                        bid.rate = j.parts.iter().filter_map(|p| p.bid).max().unwrap_or(rate);
                    }
                }
                Ok(())
            }
        }
    }

    /// Records an array and its jobs (all pending), or nothing when one of them cannot be.
    fn submit_array(
        &mut self,
        array: ArrayRecord,
        jobs: Vec<JobRecord>,
    ) -> Result<(), CommandError> {
        if self.arrays.contains_key(&array.id) || self.jobs.contains_key(&array.id) {
            return Err(CommandError::Exists(array.id));
        }
        for j in &jobs {
            if self.jobs.contains_key(&j.id) {
                return Err(CommandError::Exists(j.id.clone()));
            }
            if j.state != JobState::Pending || j.submission.is_none() || !j.parts.is_empty() {
                return Err(CommandError::Submitted {
                    job: j.id.clone(),
                    state: j.state,
                });
            }
        }
        for j in jobs {
            self.submit(j)?;
        }
        self.arrays.insert(array.id.clone(), array);
        Ok(())
    }

    /// The array `id`, if remembered.
    pub fn array(&self, id: &JobId) -> Option<&ArrayRecord> {
        self.arrays.get(id)
    }

    pub(super) fn submit(&mut self, job: JobRecord) -> Result<(), CommandError> {
        if self.jobs.contains_key(&job.id) || self.arrays.contains_key(&job.id) {
            return Err(CommandError::Exists(job.id));
        }
        match job.state {
            JobState::Pending if job.parts.is_empty() && job.submission.is_some() => {
                self.pending.insert((
                    std::cmp::Reverse(job.priority),
                    job.submitted_ms,
                    job.id.clone(),
                ));
            }
            JobState::Preparing | JobState::Running if !job.parts.is_empty() => {
                let slots: Vec<(PeerId, u32)> = job.slots().collect();
                self.reserve(&job.id, &slots, true);
            }
            state => {
                return Err(CommandError::Submitted { job: job.id, state });
            }
        }
        self.held
            .entry(owner_key(&job.owner))
            .or_default()
            .add(job.resources, 1);
        self.jobs.insert(job.id.clone(), job);
        Ok(())
    }
}

#[path = "state_ops.rs"]
mod ops;

#[cfg(test)]
#[path = "state_tests.rs"]
pub(crate) mod tests;

#[cfg(test)]
#[path = "agreements_tests.rs"]
mod agreements_tests;
