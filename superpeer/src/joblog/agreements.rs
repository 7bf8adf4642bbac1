//! The offers and agreements of the control state: made, accepted, lapsed, and how each
//! follows its job (running when it starts; met, violated or cancelled when it ends; violated
//! at once when a run is given up with no checkpoint to go on from).

use crate::proto::{AgreementState, JobId, JobState};

use super::state::{AgreementRecord, CommandError, ControlState, JobRecord};

/// How many ended offers and agreements the log remembers; the oldest are forgotten first.
pub const KEEP_AGREEMENTS: usize = 10_000;

impl ControlState {
    /// An offer or agreement.
    pub fn agreement(&self, id: &JobId) -> Option<&AgreementRecord> {
        self.agreements.get(id)
    }

    /// Every offer and agreement remembered, by id.
    pub fn agreements(&self) -> impl Iterator<Item = &AgreementRecord> {
        self.agreements.values()
    }

    /// The offers and agreements not ended, by id.
    pub fn open_agreements(&self) -> impl Iterator<Item = &AgreementRecord> {
        self.agreements_open
            .iter()
            .filter_map(|id| self.agreements.get(id))
    }

    /// The offers and agreements whose slots are held from other jobs now (an offer past its
    /// expiry too, until it is recorded as lapsed: the broker leaves those out).
    pub fn holding(&self) -> impl Iterator<Item = &AgreementRecord> {
        self.agreements_open
            .iter()
            .filter_map(|id| self.agreements.get(id))
            .filter(|a| {
                let pending = self
                    .jobs
                    .get(&a.id)
                    .is_none_or(|j| j.state == JobState::Pending);
                a.holds(pending)
            })
    }

    pub(super) fn offer(&mut self, a: AgreementRecord) -> Result<(), CommandError> {
        if self.agreements.contains_key(&a.id) || self.jobs.contains_key(&a.id) {
            return Err(CommandError::Exists(a.id));
        }
        if a.state != AgreementState::Offered || a.submission.is_none() {
            return Err(CommandError::Agreement {
                id: a.id,
                why: "an offer is recorded offered, with its job".into(),
            });
        }
        self.agreements_open.insert(a.id.clone());
        self.agreements.insert(a.id.clone(), a);
        Ok(())
    }

    pub(super) fn accept(
        &mut self,
        offer: JobId,
        at_ms: u64,
        mut job: JobRecord,
    ) -> Result<(), CommandError> {
        let no = |why: String| CommandError::Agreement {
            id: offer.clone(),
            why,
        };
        let Some(a) = self.agreements.get(&offer) else {
            return Err(no("no such offer".into()));
        };
        match a.state {
            AgreementState::Offered if at_ms > a.expires_ms => {
                return Err(no(format!("it lapsed at {} ms", a.expires_ms)));
            }
            AgreementState::Offered => {}
            AgreementState::Expired => return Err(no("it lapsed".into())),
            s => {
                return Err(no(format!(
                    "it was accepted already (the agreement is {})",
                    s.name()
                )));
            }
        }
        if job.id != offer {
            return Err(no(format!("its job is {}, not {}", offer, job.id)));
        }
        job.agreement = true;
        self.submit(job)?;
        if let Some(a) = self.agreements.get_mut(&offer) {
            a.state = AgreementState::Accepted;
            a.accepted_ms = Some(at_ms);
            a.submission = None;
        }
        Ok(())
    }

    pub(super) fn end_agreement(
        &mut self,
        id: JobId,
        state: AgreementState,
        at_ms: u64,
        why: String,
    ) -> Result<(), CommandError> {
        let no = |why: String| CommandError::Agreement {
            id: id.clone(),
            why,
        };
        let Some(a) = self.agreements.get_mut(&id) else {
            return Err(no("no such offer or agreement".into()));
        };
        let fits = match state {
            AgreementState::Expired => a.state == AgreementState::Offered,
            AgreementState::Violated => {
                matches!(a.state, AgreementState::Accepted | AgreementState::Running)
            }
            _ => false,
        };
        if !fits {
            return Err(no(format!(
                "it is {}, and cannot become {}",
                a.state.name(),
                state.name()
            )));
        }
        a.end(state, at_ms, Some(why));
        self.agreement_ended(&id);
        Ok(())
    }

    /// The agreement of job `id` follows it: the job started.
    pub(super) fn agreement_started(&mut self, id: &JobId) {
        if let Some(a) = self.agreements.get_mut(id)
            && a.state == AgreementState::Accepted
        {
            a.state = AgreementState::Running;
        }
    }

    /// The agreement of job `id` follows it: a run was given up at `at_ms` for `why`; with no
    /// checkpoint to go on from, the job starts again and the agreement cannot be kept.
    pub(super) fn agreement_requeued(&mut self, id: &JobId, at_ms: u64, why: &str) {
        let restartable = self.jobs.get(id).is_some_and(|j| !j.checkpoints.is_empty());
        if restartable {
            return;
        }
        if let Some(a) = self.agreements.get_mut(id)
            && !a.state.is_final()
        {
            let why = format!("{why}; the job has no checkpoint to go on from");
            a.end(AgreementState::Violated, at_ms, Some(why));
            self.agreement_ended(id);
        }
    }

    /// The agreement of job `id` follows it: the job ended in `state` at `at_ms`.
    pub(super) fn agreement_job_ended(
        &mut self,
        id: &JobId,
        state: JobState,
        at_ms: u64,
        error: Option<&str>,
    ) {
        let Some(a) = self.agreements.get_mut(id) else {
            return;
        };
        if a.state.is_final() {
            return;
        }
        let (to, why) = match state {
            JobState::Done if at_ms <= a.finish_ms => (AgreementState::Met, None),
            JobState::Done => (
                AgreementState::Violated,
                Some(format!(
                    "the job ended {} ms after the promised finish",
                    at_ms - a.finish_ms
                )),
            ),
            JobState::Cancelled => (
                AgreementState::Cancelled,
                Some(error.unwrap_or("the job was cancelled").to_owned()),
            ),
            _ => (
                AgreementState::Violated,
                Some(format!(
                    "the job {}: {}",
                    if state == JobState::Refused {
                        "was refused"
                    } else {
                        "failed"
                    },
                    error.unwrap_or("no reason given")
                )),
            ),
        };
        a.end(to, at_ms, why);
        self.agreement_ended(id);
    }

    /// Remembers that `id` ended, forgetting the oldest ended ones past the bound.
    fn agreement_ended(&mut self, id: &JobId) {
        self.agreements_open.remove(id);
        self.agreements_ended.push_back(id.clone());
        while self.agreements_ended.len() > KEEP_AGREEMENTS {
            if let Some(old) = self.agreements_ended.pop_front() {
                self.agreements.remove(&old);
            }
        }
    }
}
