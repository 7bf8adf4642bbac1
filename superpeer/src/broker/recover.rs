//! Jobs that outlive their nodes: a run given up when a node is lost waits again and runs
//! anew, from its start or from its newest checkpoint whose parts can be placed (checkpoints
//! themselves are taken in [`super::cut`]).

use libp2p::PeerId;

use super::core::{Core, Effect, Reply, Then, first};
use super::plan::{PlaceError, Plan};
use crate::joblog::state::Ended;
use crate::joblog::{Applied, Command, LogError};
use crate::proto::{CheckpointInfo, ErrorKind, Hash, JobId, JobState, Response, Submission};

impl Core {
    /// A job failed because a node was lost, with retries left: its run is given up, and it
    /// waits to run again (recorded first; [`Core::requeued`]). Gives `reply` back when the
    /// job is not run again.
    pub(super) fn retry(
        &mut self,
        out: &mut Vec<Effect>,
        job: &JobId,
        state: JobState,
        ended: &Ended,
        reply: Option<Reply>,
    ) -> Option<Option<Reply>> {
        if state != JobState::Failed || ended.kind != Some(ErrorKind::Lost) {
            return Some(reply);
        }
        let run = self.log.read(|s| {
            s.job(job)
                .filter(|j| {
                    matches!(j.state, JobState::Preparing | JobState::Running)
                        && j.attempt < j.retries
                        && j.submission.is_some()
                })
                .map(|j| {
                    let peers = j.parts.iter().filter(|p| !p.done).map(|p| p.node);
                    (j.attempt, peers.collect::<Vec<PeerId>>())
                })
        });
        let Some((attempt, peers)) = run else {
            return Some(reply);
        };
        let why = ended
            .error
            .clone()
            .unwrap_or_else(|| "a node was lost".into());
        tracing::warn!(%job, attempt = attempt + 1, %why, "job runs again");
        out.push(Effect::Record {
            command: Command::Requeue {
                job: job.to_owned(),
                attempt: attempt + 1,
                at_ms: ended.at_ms,
                why,
            },
            then: Then::Requeued {
                job: job.to_owned(),
                attempt,
                peers,
                reply,
            },
        });
        None
    }

    /// A run of `job` given up was recorded (or not): the parts of run `attempt` still on
    /// `peers` are told to stop, and the job, pending again, is placed when there is room.
    pub(super) fn requeued(
        &mut self,
        out: &mut Vec<Effect>,
        job: &JobId,
        attempt: u32,
        peers: Vec<PeerId>,
        reply: Option<Reply>,
        outcome: Result<Applied, LogError>,
    ) {
        if let Some(reply) = reply {
            out.push(Effect::Reply(reply, Response::Ok));
        }
        if let Err(f) = first(outcome) {
            // Ended meanwhile, or given up already by another report of the same loss.
            tracing::debug!(%job, error = %f.message, "run not given up");
            return;
        }
        if self.drives.get(job).is_some_and(|d| d.attempt == attempt) {
            self.drives.remove(job);
        }
        if let Some(c) = self.cuts.remove(job) {
            super::cut::give_up_cut(out, c, "its run was given up");
        }
        self.forget_move(out, job, "its run was given up");
        self.given_up.insert(job.to_owned(), self.now);
        self.terminate_run(
            out,
            job,
            attempt,
            "its run was given up: a node was lost",
            peers,
        );
        self.place_pending(out);
    }

    /// Where a job that runs again from checkpoint `from` goes: each part of the cut, whole, to
    /// a node of its own that is heard from since the run was given up and has room for it.
    /// The parts' blobs, in the plan's order.
    ///
    /// # Errors
    /// Too few nodes with room now (the job waits).
    pub(super) fn plan_restore(
        &mut self,
        job: &JobId,
        s: &Submission,
        vertices: &[String],
        from: &CheckpointInfo,
    ) -> Result<(Plan, Vec<Hash>), PlaceError> {
        let super::plan::Candidates {
            peers: live,
            cands,
            ok,
        } = self.candidates(job, s)?;
        // The largest part first, each to the roomiest node left.
        let mut order: Vec<usize> = (0..from.parts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(from.parts[i].vertices.len()));
        let mut free: Vec<(usize, u32)> = ok.iter().map(|&i| (i, cands[i].free_slots)).collect();
        let mut node_of = vec![0usize; from.parts.len()];
        for (fit, i) in order.into_iter().enumerate() {
            free.sort_by_key(|&(_, f)| std::cmp::Reverse(f));
            let need = u32::try_from(from.parts[i].vertices.len()).unwrap_or(u32::MAX);
            match free.first() {
                Some(&(c, f)) if f >= need => {
                    node_of[i] = c;
                    free.remove(0);
                }
                _ => {
                    return Err(PlaceError::Restore {
                        group: self.site.group.clone(),
                        parts: from.parts.len(),
                        fit,
                    });
                }
            }
        }
        let placement: Vec<u32> = vertices
            .iter()
            .map(|v| {
                let part = from.parts.iter().position(|p| p.vertices.contains(v));
                u32::try_from(part.unwrap_or(0)).unwrap_or(0)
            })
            .collect();
        let mut plan = Plan {
            peers: node_of.iter().map(|&c| live[c]).collect(),
            placement,
            bids: Vec::new(),
        };
        self.bid_plan(job, s, &mut plan, false);
        self.hold(job, &plan);
        Ok((plan, from.parts.iter().map(|p| p.blob).collect()))
    }
}
