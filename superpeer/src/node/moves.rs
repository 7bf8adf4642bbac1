//! The parts machine's side of moving a running part to another node (live migration): the
//! broker's steps ([`MoveStep`]) for the part that leaves and for the parts linked to it,
//! what comes of saving the leaving part, and the new links.
//!
//! The part that leaves is paused at a cut, saved with its links drained, and kept paused
//! (`Leave`); each part linked to it holds and drains its links with it to the same cut, and
//! runs on (`Hold`). Once the new node has prepared the part from its image, those links go
//! there instead (`Relink`): the old link tasks stop, outputs are linked anew from their
//! outboxes (whatever the held link did not take is still there), and inputs take a stream
//! from the new node, first giving their queue what the old link delivered past its room.
//! A move given up (`Stay`) lets the held links go on, and the leaving part resume. A part
//! left paused, or holding its links, for [`MOVE_WAIT`] (its broker was lost in the middle of
//! the move) reports itself lost, and its job runs again from its newest checkpoint: a move
//! that does not finish never leaves a job standing still.

use std::sync::atomic::Ordering;
use std::time::Duration;

use libp2p::PeerId;

use super::part::{InputKey, Moving, Relink, Relinked};
use super::parts::{Effect, Parts, Reply, Stage};
use crate::proto::{
    ErrorKind, Failure, FailureKind, JobId, MoveStep, PartReport, Response, VertexFailure,
};

/// How long a part stays paused, or holds its links, for a move that does not go on (when its
/// job has no files to move: see [`move_wait`]).
pub(super) const MOVE_WAIT: Duration = Duration::from_secs(60);

/// How long a part stays paused or holds its links for a move whose broker gives the leaving
/// part's save `within` (its job has files): [`MOVE_WAIT`], and as long again as those files
/// may take to go up and, for the parts that hold their links while it is saved, as long
/// again for the new node to fetch them.
fn move_wait(within_ms: Option<u64>, times: u32) -> Duration {
    within_ms.map_or(MOVE_WAIT, |ms| {
        MOVE_WAIT + crate::proto::save_wait(ms) * times
    })
}

fn fail(kind: FailureKind, m: impl Into<String>) -> Response {
    Response::Error(Failure::new(kind, m))
}

impl Parts {
    /// A step of a move of the part of run `attempt` of `job`.
    pub(super) fn step(
        &mut self,
        out: &mut Vec<Effect>,
        job: JobId,
        attempt: u32,
        step: MoveStep,
        reply: Reply,
    ) {
        let Some(part) = self.run_mut(&job, attempt) else {
            let why = format!("run {attempt} of job {job} is not here");
            return out.push(Effect::Reply(reply, fail(FailureKind::NotFound, why)));
        };
        let Some(marks) = part.marks.clone() else {
            let why = format!("job {job}'s part was not prepared for checkpoints: it cannot move");
            return out.push(Effect::Reply(reply, fail(FailureKind::Input, why)));
        };
        if !matches!(part.stage, Stage::Running { .. }) {
            let why = format!("job {job}'s part is not running");
            return out.push(Effect::Reply(reply, fail(FailureKind::Unavailable, why)));
        }
        if matches!(step, MoveStep::Leave { .. } | MoveStep::Hold { .. })
            && let Some((_, go)) = part.cut_release.take()
        {
            // The broker moves a part only once every part of its last cut is saved: that
            // cut's sending ends go on now, before the move holds them again.
            drop(go);
            super::checkpoint::let_go(&marks);
        }
        let busy = |reply: Reply, out: &mut Vec<Effect>| {
            let why = format!("a move of job {job} is under way here");
            out.push(Effect::Reply(reply, fail(FailureKind::Unavailable, why)));
        };
        match step {
            MoveStep::Leave { cut, within_ms } => {
                if part.moving.is_some() {
                    return busy(reply, out);
                }
                part.moving = Some(Moving::Leaving(None));
                // Counted once it is saved: the new node fetches its files meanwhile.
                part.move_wait = move_wait(within_ms, 1);
                out.push(Effect::Leave {
                    job,
                    attempt,
                    marks: Box::new(marks),
                    save: part.save(),
                    cut,
                    reply,
                });
            }
            MoveStep::Hold {
                cut,
                peer,
                within_ms,
            } => {
                if part.moving.is_some() {
                    return busy(reply, out);
                }
                part.moving = Some(Moving::Holding(peer));
                part.move_wait = move_wait(within_ms, 2);
                let (holds, drains) = marks.with(peer);
                out.push(Effect::HoldLinks {
                    holds,
                    drains,
                    cut,
                    reply,
                });
                out.push(Effect::MoveWait {
                    job,
                    attempt,
                    wait: part.move_wait,
                });
            }
            MoveStep::Relink { peer, to, addrs } => {
                if !matches!(part.moving, Some(Moving::Holding(p)) if p == peer) {
                    let why = format!("job {job}'s links with {peer} are not held for a move");
                    return out.push(Effect::Reply(reply, fail(FailureKind::Input, why)));
                }
                let Some(links) = part.links.clone() else {
                    let why = format!("job {job}'s part has no links");
                    return out.push(Effect::Reply(reply, fail(FailureKind::Failed, why)));
                };
                let with = |k: &InputKey| k.2 == peer;
                let outs = marks.holds.iter().filter(|(k, _)| with(k));
                let outs = outs.map(|(k, _)| (k.clone(), part.outlets.remove(k)));
                let outs = outs.collect();
                let ins = marks.drains.iter().filter(|(k, _)| with(k));
                let ins = ins.map(|(k, d)| {
                    let unopened = part.inputs.remove(k);
                    (k.clone(), part.inlets.remove(k), d.clone(), unopened)
                });
                let ins = ins.collect();
                out.push(Effect::Relink(Box::new(Relink {
                    job,
                    attempt,
                    outs,
                    ins,
                    to,
                    addrs,
                    links,
                    expected: part.expected.clone(),
                    reply,
                })));
            }
            MoveStep::Stay => {
                match part.moving.take() {
                    Some(Moving::Leaving(Some(pause))) => {
                        super::checkpoint::release(&marks);
                        marks.control.resume_kept(pause);
                    }
                    Some(Moving::Holding(peer)) => {
                        let (holds, drains) = marks.with(peer);
                        out.push(Effect::Release { holds, drains });
                    }
                    // Being saved: it resumes once saved ([`Parts::left`]).
                    Some(Moving::Leaving(None)) | None => {}
                }
                out.push(Effect::Reply(reply, Response::Ok));
            }
        }
    }

    /// The part of run `attempt` of `job`, leaving, was saved and kept paused at `pause`, or
    /// (`None`) was not saved. A move given up meanwhile lets it go on.
    pub(super) fn left(
        &mut self,
        out: &mut Vec<Effect>,
        job: &JobId,
        attempt: u32,
        pause: Option<u64>,
    ) {
        let Some(part) = self.run_mut(job, attempt) else {
            return; // ended meanwhile
        };
        match (pause, &part.moving) {
            (Some(n), Some(Moving::Leaving(None))) => {
                part.moving = Some(Moving::Leaving(Some(n)));
                out.push(Effect::MoveWait {
                    job: job.to_owned(),
                    attempt,
                    wait: part.move_wait,
                });
            }
            (Some(n), _) => {
                // Given up while it was being saved.
                if let Some(marks) = &part.marks {
                    super::checkpoint::release(marks);
                    marks.control.resume_kept(n);
                }
            }
            (None, Some(Moving::Leaving(_))) => part.moving = None,
            (None, _) => {}
        }
    }

    /// The wait of a move is over: a part still left paused, or still holding its links, for
    /// it reports itself lost (its broker will run the job again) and goes.
    pub(super) fn move_over(&mut self, out: &mut Vec<Effect>, job: &JobId, attempt: u32) {
        let Some(part) = self.run_mut(job, attempt) else {
            return;
        };
        let what = match part.moving {
            Some(Moving::Leaving(Some(_))) => "paused to move",
            Some(Moving::Holding(_)) => "holding its links for a move",
            _ => return,
        };
        let cause = format!(
            "the part was left {what} for {} s: the move did not go on",
            part.move_wait.as_secs()
        );
        tracing::warn!(%job, attempt, %cause, "move abandoned");
        part.moving = None;
        let broker = part.broker;
        let report = PartReport {
            job: job.to_owned(),
            attempt,
            outcome: Err(VertexFailure {
                vertex: String::new(),
                cause: cause.clone(),
                kind: ErrorKind::Lost,
            }),
            logs: Vec::new(),
        };
        self.stop(out, job, attempt, &cause);
        out.push(Effect::Report {
            broker,
            report: Box::new(report),
        });
    }

    /// A part's links held for a move now go to the new node: its marks, inputs and link
    /// tasks are updated, and the broker answered.
    pub(super) fn relinked(&mut self, out: &mut Vec<Effect>, r: Relinked) {
        let Relinked {
            job,
            attempt,
            from,
            ins,
            outs,
            reply,
        } = r;
        let Some(part) = self.run_mut(&job, attempt) else {
            out.push(Effect::Abort(outs.into_iter().map(|(_, _, t)| t).collect()));
            let why = format!("run {attempt} of job {job} ended meanwhile");
            return out.push(Effect::Reply(reply, fail(FailureKind::NotFound, why)));
        };
        if let Some(m) = part.marks.as_mut() {
            relink_marks(m, from, &ins, &outs);
        }
        for (key, sender, first) in ins {
            part.relinked.insert(key.clone(), first);
            part.inputs.insert(key, sender);
        }
        for (key, _, task) in outs {
            part.outlets.insert(key, task.clone());
            part.tasks.push(task);
        }
        part.moving = None;
        tracing::debug!(%job, attempt, expected = part.expected.load(Ordering::Acquire), "links moved");
        out.push(Effect::Reply(reply, Response::Ok));
    }
}

/// The marks of a part whose links with `from` went to a new node: the new outputs' holds
/// in the old ones' places, and fresh drains for the new inputs.
fn relink_marks(
    m: &mut super::parts::Marks,
    from: PeerId,
    ins: &[super::part::NewInput],
    outs: &[(InputKey, mvm_queue::remote::Hold, tokio::task::AbortHandle)],
) {
    for (key, hold) in &mut m.holds {
        if key.2 != from {
            continue;
        }
        if let Some((new, h, _)) = outs.iter().find(|(n, _, _)| n.0 == key.0 && n.1 == key.1) {
            *key = new.clone();
            *hold = h.clone();
        }
    }
    m.drains.retain(|(k, _)| k.2 != from);
    for (key, _, _) in ins {
        m.drains
            .push((key.clone(), mvm_queue::remote::Drain::new()));
    }
}
