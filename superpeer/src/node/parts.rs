//! The parts a node holds, as a state machine: the broker's requests (prepare, start,
//! terminate), what comes of the work they start (a part prepared or not, a part ended, the
//! hold of a prepare's answer over) and the queue streams that arrive go in ([`Input`]); the
//! answers and the work to do come out ([`Effect`]). It does no I/O and spawns nothing: the
//! node's loop ([`super::Node::run`]) carries its effects out and gives it what comes of them.
//!
//! A part is `Preparing` (its modules fetched and compiled, its guest provisioned, off the
//! loop), `Prepared` (waiting for its start), or `Running`. The broker that placed it, or a
//! super-peer of the group, may start or end it.
//!
//! A node holds one run of a job ([`PartSpec::attempt`]): the part of a later run (the job is
//! run again after a node was lost) replaces an earlier one, and whatever comes about another
//! run than the one held (its preparation, its end, a stream into it, its termination) is
//! ignored. Each run's queues have their own namespace ([`super::space`]).

use std::collections::HashMap;
use std::sync::Arc;

use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot};

pub(super) use super::part::{
    Body, Control, Effect, Held, InGuest, Input, InputKey, Launch, Marks, Moving, Part, Ready,
    Relink, Relinked, Reply, Stage,
};
use crate::proto::{Failure, FailureKind, JobId, PartReport, Response};

/// The parts of a node.
pub(super) struct Parts {
    pub(super) parts: HashMap<JobId, Part>,
    /// Published for the rest of the node.
    held: Arc<Held>,
}

fn fail(kind: FailureKind, m: impl Into<String>) -> Response {
    Response::Error(Failure::new(kind, m))
}

impl Parts {
    /// No parts; `held` tells the rest of the node which are held.
    pub(super) fn new(held: Arc<Held>) -> Parts {
        Parts {
            parts: HashMap::new(),
            held,
        }
    }

    fn insert(&mut self, job: JobId, part: Part) {
        let held = (part.vertices, part.attempt);
        self.held.jobs.lock().insert(job.clone(), held);
        self.parts.insert(job, part);
    }

    /// The part of `job` if it is of run `attempt`.
    pub(super) fn run_mut(&mut self, job: &JobId, attempt: u32) -> Option<&mut Part> {
        self.parts.get_mut(job).filter(|p| p.attempt == attempt)
    }

    fn remove(&mut self, job: &JobId) -> Option<Part> {
        self.held.jobs.lock().remove(job);
        self.parts.remove(job)
    }

    /// Takes `input`; what to do about it.
    pub(super) fn on(&mut self, input: Input) -> Vec<Effect> {
        let mut out = Vec::new();
        match input {
            Input::Prepare { from, spec, reply } => {
                let held = self.parts.get(&spec.job).map(|p| p.attempt);
                if held.is_some_and(|a| a >= spec.attempt) {
                    let why = format!("job {} is already here", spec.job);
                    out.push(Effect::Reply(reply, fail(FailureKind::Input, why)));
                } else {
                    if let Some(old) = held {
                        // A later run of the job: the earlier one goes first.
                        let why = format!("run {} of the job replaces it", spec.attempt);
                        self.stop(&mut out, &spec.job, old, &why);
                    }
                    let part = Part {
                        broker: from,
                        attempt: spec.attempt,
                        inputs: HashMap::new(),
                        links: None,
                        vertices: 0,
                        stage: Stage::Preparing {
                            reply,
                            start: spec.start,
                        },
                        tasks: Vec::new(),
                        _env: None,
                        _sandbox: None,
                        files: spec.files.clone(),
                        marks: None,
                        outlets: HashMap::new(),
                        inlets: HashMap::new(),
                        relinked: HashMap::new(),
                        expected: Arc::default(),
                        moving: None,
                        move_wait: super::moves::MOVE_WAIT,
                        cut_release: None,
                        early_cut: None,
                        saver: None,
                    };
                    self.insert(spec.job.clone(), part);
                    out.push(Effect::Prepare { from, spec });
                }
            }
            Input::Prepared {
                job,
                attempt,
                ready,
            } => self.prepared(&mut out, job, attempt, ready),
            Input::Start {
                from,
                superpeer,
                job,
                attempt,
                reply,
            } => {
                let r = self.start(&mut out, from, superpeer, &job, attempt, None);
                out.push(Effect::Reply(reply, r));
            }
            Input::Terminate {
                from,
                superpeer,
                job,
                attempt,
                reason,
                reply,
            } => {
                let r = match self.parts.get(&job) {
                    // Not here, or a later run (which its broker placed after this end).
                    None => Response::Ok,
                    Some(p) if p.attempt > attempt => Response::Ok,
                    Some(p) if p.broker != from && !superpeer => fail(
                        FailureKind::Refused,
                        format!("job {job} was not placed by {from}"),
                    ),
                    Some(p) => {
                        let held = p.attempt;
                        self.stop(&mut out, &job, held, &reason);
                        Response::Ok
                    }
                };
                out.push(Effect::Reply(reply, r));
            }
            Input::Ended { report } => self.ended(&mut out, report),
            Input::GuestDied { guest, why } => self.guest_died(&mut out, &guest, why),
            Input::HoldOver { job, attempt } => {
                if let Some(Part {
                    stage: Stage::Running { hold },
                    ..
                }) = self.run_mut(&job, attempt)
                    && let Some(reply) = hold.take()
                {
                    // Still running: it reports by itself when it ends.
                    out.push(Effect::Reply(reply, Response::Ok));
                }
            }
            Input::Inbound {
                job,
                attempt,
                key,
                reply,
            } => {
                let taken = self.run_mut(&job, attempt).and_then(|p| {
                    let links = p.links.clone()?;
                    let drain = p.marks.as_ref().map(|m| m.drain(&key)).unwrap_or_default();
                    let tx = p.inputs.remove(&key)?;
                    let first = p.relinked.get_mut(&key).map(std::mem::take);
                    Some((tx, links, drain, first))
                });
                let _ = reply.send(taken);
            }
            Input::Checkpoint {
                from,
                job,
                attempt,
                cut,
                within_ms,
                reply,
            } => {
                if let Some(p) = self.run_mut(&job, attempt) {
                    p.saver = Some(from);
                }
                self.checkpoint(&mut out, &job, attempt, (cut, within_ms), reply);
            }
            Input::ReleaseCut {
                job,
                attempt,
                cut,
                reply,
            } => {
                if let Some(p) = self.run_mut(&job, attempt)
                    && p.cut_release.as_ref().is_some_and(|(c, _)| *c == cut)
                    && let Some((_, go)) = p.cut_release.take()
                {
                    let _ = go.send(());
                }
                out.push(Effect::Reply(reply, Response::Ok));
            }
            Input::Attach { job, tasks, links } => match self.parts.get_mut(&job) {
                Some(p) => {
                    for (key, output, task) in links {
                        let ends = if output {
                            &mut p.outlets
                        } else {
                            &mut p.inlets
                        };
                        ends.insert(key, task.clone());
                        p.tasks.push(task);
                    }
                    p.tasks.extend(tasks);
                }
                None => {
                    let links = links.into_iter().map(|(_, _, t)| t);
                    out.push(Effect::Abort(tasks.into_iter().chain(links).collect()));
                }
            },
            Input::GiveBack {
                job,
                attempt,
                key,
                sender,
                first,
            } => {
                if let Some(p) = self.run_mut(&job, attempt) {
                    if let Some(first) = first {
                        p.relinked.insert(key.clone(), first);
                    }
                    p.inputs.insert(key, sender);
                }
            }
            Input::Move {
                from,
                job,
                attempt,
                step,
                reply,
            } => {
                if let Some(p) = self.run_mut(&job, attempt) {
                    p.saver = Some(from);
                }
                self.step(&mut out, job, attempt, step, reply);
            }
            Input::Left {
                job,
                attempt,
                pause,
            } => self.left(&mut out, &job, attempt, pause),
            Input::MoveOver { job, attempt } => self.move_over(&mut out, &job, attempt),
            Input::Relinked(r) => self.relinked(&mut out, *r),
        }
        out
    }

    /// Removes the part of `job` (of run `attempt`): an answer still owed to its prepare gets
    /// the reason, and its tasks and queues go.
    pub(super) fn stop(&mut self, out: &mut Vec<Effect>, job: &JobId, attempt: u32, reason: &str) {
        let mut epilog = None;
        let tasks = match self.remove(job) {
            Some(Part {
                stage:
                    Stage::Preparing { reply, .. }
                    | Stage::Running {
                        hold: Some(reply), ..
                    },
                tasks,
                ..
            }) => {
                let why = format!("job {job} was ended: {reason}");
                out.push(Effect::Reply(reply, fail(FailureKind::Failed, why)));
                tasks
            }
            Some(p) => {
                // A running part stopped: what its vertices wrote is kept, as for one that ends.
                if matches!(p.stage, Stage::Running { .. })
                    && let (Some(sandbox), Some(files)) = (p._sandbox, p.files)
                {
                    epilog = Some(Effect::Epilog {
                        job: job.to_owned(),
                        attempt: p.attempt,
                        broker: p.broker,
                        sandbox,
                        files,
                    });
                }
                p.tasks
            }
            None => Vec::new(),
        };
        out.push(Effect::Stop {
            job: job.to_owned(),
            attempt,
            reason: reason.to_owned(),
            tasks,
        });
        out.extend(epilog);
    }

    /// A part's preparation ended: it waits for its start, or starts now holding the answer
    /// to its prepare ([`Effect::Hold`]), or (refused, failed, or ended meanwhile) goes.
    fn prepared(
        &mut self,
        out: &mut Vec<Effect>,
        job: JobId,
        attempt: u32,
        ready: Result<Box<Ready>, Failure>,
    ) {
        let Some(part) = self.parts.get_mut(&job).filter(|p| p.attempt == attempt) else {
            // Ended (or replaced by a later run) while it was being prepared: what was made
            // goes.
            out.push(Effect::Stop {
                job,
                attempt,
                reason: "ended while being prepared".into(),
                tasks: Vec::new(),
            });
            return;
        };
        let Stage::Preparing { .. } = part.stage else {
            return;
        };
        let ready = match ready {
            Ok(r) => r,
            Err(f) => {
                let mut tasks = Vec::new();
                if let Some(Part {
                    stage: Stage::Preparing { reply, .. },
                    tasks: t,
                    ..
                }) = self.remove(&job)
                {
                    out.push(Effect::Reply(reply, Response::Error(f)));
                    tasks = t;
                }
                out.push(Effect::Stop {
                    job,
                    attempt,
                    reason: "not prepared".into(),
                    tasks,
                });
                return;
            }
        };
        let Ready {
            prepared,
            parts,
            inputs,
            expected_links,
            vertices,
            env,
            marks,
            sandbox,
        } = *ready;
        // Room for the links moves add.
        let (links, links_rx) = mpsc::channel(2 * expected_links + 16);
        part.inputs = inputs;
        part.links = Some(links.clone());
        part.vertices = vertices;
        let guest = env.as_ref().map(crate::environment::EnvLease::guest);
        part._env = env;
        part._sandbox = sandbox.clone();
        let holds = marks
            .as_ref()
            .map(|m| m.holds.iter().map(|(_, h)| h.clone()));
        let holds = holds.map(Iterator::collect).unwrap_or_default();
        part.marks = marks;
        part.expected
            .store(expected_links, std::sync::atomic::Ordering::Release);
        let launch = Box::new(Launch {
            prepared,
            parts,
            links,
            links_rx,
            holds,
            expected: part.expected.clone(),
            guest,
            sandbox,
            files: part.files.clone(),
            broker: part.broker,
        });
        let Stage::Preparing { reply, start } =
            std::mem::replace(&mut part.stage, Stage::Prepared(launch))
        else {
            return;
        };
        self.held
            .jobs
            .lock()
            .insert(job.clone(), (vertices, attempt));
        if start {
            let broker = part.broker;
            let r = self.start(out, broker, true, &job, attempt, Some(reply));
            if let Response::Error(_) = r {
                tracing::warn!(%job, "a part prepared to start at once did not start");
            }
        } else {
            out.push(Effect::Reply(reply, Response::Ok));
        }
    }

    /// A cut asked of run `attempt` of `job`'s part (its number, and how long the broker waits
    /// for it if longer than usual): its image is taken (an effect), or, for a part prepared
    /// but not started yet, the cut waits for its `Start`.
    fn checkpoint(
        &mut self,
        out: &mut Vec<Effect>,
        job: &JobId,
        attempt: u32,
        (cut, within_ms): (u64, Option<u64>),
        reply: Reply,
    ) {
        if let Some(p) = self.run_mut(job, attempt)
            && p.marks.is_some()
            && matches!(p.stage, Stage::Prepared(_))
        {
            if let Some((older, _, r)) = p.early_cut.replace((cut, within_ms, reply)) {
                let why =
                    format!("checkpoint {older} of job {job} was overtaken by checkpoint {cut}");
                out.push(Effect::Reply(r, fail(FailureKind::Unavailable, why)));
            }
            return;
        }
        let job = job.clone();
        let r = match self.run_mut(&job, attempt) {
            None => Err(fail(
                FailureKind::NotFound,
                format!("run {attempt} of job {job} is not here"),
            )),
            Some(Part { marks: None, .. }) => Err(fail(
                FailureKind::Input,
                format!("job {job}'s part was not prepared for checkpoints"),
            )),
            Some(p) => match (&p.stage, &p.marks) {
                (Stage::Running { .. }, Some(m)) => Ok((Box::new(m.clone()), p.save())),
                _ => Err(fail(
                    FailureKind::Unavailable,
                    format!("job {job}'s part is not running yet"),
                )),
            },
        };
        match r {
            Ok((marks, save)) => {
                let (tx, release) = oneshot::channel();
                if let Some(p) = self.run_mut(&job, attempt) {
                    // A cut before this one not let go yet: it goes now.
                    p.cut_release = Some((cut, tx));
                }
                out.push(Effect::Checkpoint {
                    marks,
                    save,
                    cut,
                    hold: super::checkpoint::release_wait(within_ms),
                    reply,
                    release,
                });
            }
            Err(e) => out.push(Effect::Reply(reply, e)),
        }
    }

    /// Starts a prepared part for `from`; a prepare's answer in `hold` is held until the part
    /// ends or [`Effect::Hold`] is over.
    fn start(
        &mut self,
        out: &mut Vec<Effect>,
        from: PeerId,
        superpeer: bool,
        job: &JobId,
        attempt: u32,
        hold: Option<Reply>,
    ) -> Response {
        let Some(part) = self.run_mut(job, attempt) else {
            return fail(
                FailureKind::NotFound,
                format!("run {attempt} of job {job} is not prepared here"),
            );
        };
        if part.broker != from && !superpeer {
            return fail(
                FailureKind::Refused,
                format!("job {job} was not placed by {from}"),
            );
        }
        if !matches!(part.stage, Stage::Prepared(_)) {
            let already = || fail(FailureKind::Input, format!("job {job} has already started"));
            if let Some(reply) = hold {
                out.push(Effect::Reply(reply, already()));
            }
            return already();
        }
        let held = hold.is_some();
        let Stage::Prepared(launch) = std::mem::replace(&mut part.stage, Stage::Running { hold })
        else {
            return Response::Ok; // it was prepared: checked above
        };
        let early = part.early_cut.take();
        out.push(Effect::Run {
            job: job.to_owned(),
            attempt,
            launch,
        });
        if let Some((cut, within_ms, reply)) = early {
            self.checkpoint(out, job, attempt, (cut, within_ms), reply);
        }
        if held {
            out.push(Effect::Hold {
                job: job.to_owned(),
                attempt,
            });
        }
        Response::Ok
    }

    /// A running part ended: its report goes in the held answer to its prepare, or to the
    /// leader. A part that ended well goes at once (the broker sends no termination to it); a
    /// failed one stays until the broker ends the job.
    pub(super) fn ended(&mut self, out: &mut Vec<Effect>, report: PartReport) {
        let job = report.job.clone();
        let Some(part) = self.run_mut(&job, report.attempt) else {
            return; // ended (or replaced) meanwhile: nobody wants its report
        };
        if report.outcome.is_err() && matches!(part.moving, Some(Moving::Leaving(_))) {
            // Its links broke as it left (or were stopped): the part goes on elsewhere.
            return;
        }
        let broker = part.broker;
        let hold = match &mut part.stage {
            Stage::Running { hold } => hold.take(),
            _ => None,
        };
        if report.outcome.is_ok() {
            let tasks = self.remove(&job).map(|p| p.tasks).unwrap_or_default();
            out.push(Effect::Stop {
                job,
                attempt: report.attempt,
                reason: "done".into(),
                tasks,
            });
        }
        match hold {
            Some(reply) => out.push(Effect::Reply(reply, Response::Finished(Box::new(report)))),
            None => out.push(Effect::Report {
                broker,
                report: Box::new(report),
            }),
        }
    }
}

#[cfg(test)]
#[path = "parts_tests.rs"]
mod tests;
