//! Moving a part of a running job to another node while the job runs (live migration, as
//! OpenCCS migrates a job keeping its environment), for `mvm migrate` and `mvm node drain`.
//!
//! The part is saved at a cut, like a checkpoint, but only it pauses: the parts linked to it
//! hold their links with it at the same cut and run on. The steps, each asked of the nodes at
//! once and waited for:
//! 1. the part's node saves it and keeps it paused ([`MoveStep::Leave`]); every other part's
//!    node holds its links with it ([`MoveStep::Hold`]);
//! 2. the new node prepares the part from its image (fetched from here, by hash);
//! 3. the other parts' links go to the new node ([`MoveStep::Relink`]);
//! 4. the new node starts the part, and the old one ends its copy;
//! 5. the move is recorded; reports of the part that came meanwhile are taken.
//!
//! Until step 3, a step that fails gives the move up: the held links go on, the paused part
//! resumes, and the new node drops what it prepared ([`MoveStep::Stay`]). From step 3 on,
//! the links are changing, and a failure fails the run: it runs again from its newest
//! checkpoint (or from its start) as after a lost node.

mod plan;

pub(super) use plan::Which;

use std::time::Instant;

use bytes::Bytes;
use libp2p::PeerId;

use super::core::{Core, Effect, Reply, Then};
use super::{fail, now_ms};
use crate::joblog::state::Ended;
use crate::joblog::{Applied, Command, LogError};
use crate::proto::{
    BrokerRequest, ErrorKind, Failure, FailureKind, Hash, JobId, JobState, MoveInfo, MoveStep,
    OutputFile, PartReport, PartSpec, Response,
};

/// A move under way.
pub(super) struct Move {
    attempt: u32,
    cut: u64,
    /// How long the part's save may take, if longer than usual (its job's files:
    /// [`super::cut::save_limit`]).
    within_ms: Option<u64>,
    /// The part's index among the job's parts, and its vertices.
    part: usize,
    vertices: Vec<String>,
    from: PeerId,
    to: PeerId,
    /// The nodes of the job's other parts.
    others: Vec<PeerId>,
    stage: Stage,
    /// Answers still awaited for the stage.
    awaited: usize,
    /// The part's image, once saved, and the files its vertices' sandboxes held.
    blob: Option<(Hash, Bytes)>,
    files: Option<Vec<OutputFile>>,
    /// The new node's spec, until it is sent.
    spec: Option<Box<PartSpec>>,
    /// When the part was asked to pause, and when it started on the new node.
    began: Instant,
    running: Option<Instant>,
    /// Who waits for it.
    pub(super) reply: Option<Reply>,
    /// Reports from the part's old or new node that came meanwhile.
    early: Vec<(PeerId, PartReport, Reply)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// 1: saving the part, holding the links.
    Holding,
    /// 2: the new node prepares the part.
    Preparing,
    /// 3: linking the other parts to the new node.
    Relinking,
    /// 4: the new node starts the part.
    Starting,
    /// 5: recording the move.
    Recording,
}

/// What a node's answer during a move is for.
#[derive(Debug, Clone, Copy)]
pub(super) enum MoveStepThen {
    Left,
    Held,
    Prepared,
    Relinked,
    Started,
    /// The old node ended its copy (or could not be told: it is gone, or ends it at its next
    /// heartbeat).
    Ended,
}

impl Core {
    /// Starts moving the part `which` of `job` to the node named `to`; `reply` is answered
    /// with the move once it is recorded, or with why not.
    pub(super) fn start_move(
        &mut self,
        out: &mut Vec<Effect>,
        job: &JobId,
        which: &Which,
        to: &str,
        reply: Option<Reply>,
    ) {
        match self.plan_move(job, which, to) {
            Ok(m) => self.begin_move(out, job, m, reply),
            Err(f) => {
                if let Some(reply) = reply {
                    out.push(Effect::Reply(reply, Response::Error(f)));
                }
            }
        }
    }

    /// Step 1: the part is saved and its links held.
    fn begin_move(
        &mut self,
        out: &mut Vec<Effect>,
        job: &JobId,
        mut m: Move,
        reply: Option<Reply>,
    ) {
        tracing::info!(%job, part = m.part, from = %m.from, to = %m.to, cut = m.cut, "moving a part");
        m.reply = reply;
        m.began = Instant::now();
        m.awaited = 1 + m.others.len();
        self.send_step(
            out,
            job,
            &m,
            m.from,
            MoveStep::Leave {
                cut: m.cut,
                within_ms: m.within_ms,
            },
            MoveStepThen::Left,
        );
        for peer in m.others.clone() {
            let step = MoveStep::Hold {
                cut: m.cut,
                peer: m.from,
                within_ms: m.within_ms,
            };
            self.send_step(out, job, &m, peer, step, MoveStepThen::Held);
        }
        self.moves.insert(job.to_owned(), m);
    }

    fn send_step(
        &self,
        out: &mut Vec<Effect>,
        job: &JobId,
        m: &Move,
        peer: PeerId,
        step: MoveStep,
        then: MoveStepThen,
    ) {
        out.push(Effect::Send {
            peer,
            addrs: self.members.addrs(&peer),
            request: BrokerRequest::Move {
                job: job.to_owned(),
                attempt: m.attempt,
                step,
            },
            then: Then::MoveStep {
                job: job.to_owned(),
                cut: m.cut,
                then,
            },
        });
    }

    /// A node answered a step of the move of `job` at cut `cut`.
    pub(super) fn move_answered(
        &mut self,
        out: &mut Vec<Effect>,
        job: &JobId,
        cut: u64,
        then: MoveStepThen,
        peer: PeerId,
        answer: Result<Response, Failure>,
    ) {
        if self.moves.get(job).is_none_or(|m| m.cut != cut) {
            return;
        }
        let Some(mut m) = self.moves.remove(job) else {
            return;
        };
        let label = self.members.label(&peer);
        let why = match (then, answer) {
            (MoveStepThen::Left, Ok(Response::Checkpoint { hash, blob, files }))
                if Hash::of(&blob) == hash
                    && super::cut::unheld(self.files.as_deref(), files.as_deref()).is_some() =>
            {
                Some(format!(
                    "node {label} did not send the files of its sandboxes first"
                ))
            }
            (MoveStepThen::Left, Ok(Response::Checkpoint { hash, blob, files }))
                if Hash::of(&blob) == hash =>
            {
                m.blob = Some((hash, blob));
                // The new node fetches them while the move is under way.
                let hashes = files.iter().flatten().map(|f| f.hash).collect();
                self.view.moving.lock().insert(job.to_owned(), hashes);
                m.files = files;
                None
            }
            (MoveStepThen::Left, Ok(_)) => Some(format!("node {label} sent no sound image")),
            (MoveStepThen::Ended, _) => None,
            (MoveStepThen::Started, Ok(Response::Ok)) => {
                m.running = Some(Instant::now());
                None
            }
            (_, Ok(Response::Ok)) => None,
            (_, Ok(_)) => Some(format!("node {label} answered with something else")),
            (_, Err(f)) => Some(format!("node {label}: {}", f.message)),
        };
        if let Some(why) = why {
            self.moves.insert(job.to_owned(), m);
            return self.move_failed(out, job, &why);
        }
        m.awaited = m.awaited.saturating_sub(1);
        if m.awaited > 0 {
            self.moves.insert(job.to_owned(), m);
            return;
        }
        match m.stage {
            Stage::Holding => {
                // Step 2: the new node prepares the part from its image, fetched from here.
                let (Some((hash, blob)), Some(mut spec)) = (m.blob.clone(), m.spec.take()) else {
                    self.moves.insert(job.to_owned(), m);
                    return self.move_failed(out, job, "no image");
                };
                self.blobs.put(blob);
                spec.restore = Some(hash);
                spec.restore_files = m.files.take();
                // Its links to the parts that stay will be streams.
                spec.streams = true;
                m.stage = Stage::Preparing;
                m.awaited = 1;
                out.push(Effect::Send {
                    peer: m.to,
                    addrs: self.members.addrs(&m.to),
                    request: BrokerRequest::Prepare(spec),
                    then: Then::MoveStep {
                        job: job.to_owned(),
                        cut,
                        then: MoveStepThen::Prepared,
                    },
                });
                self.moves.insert(job.to_owned(), m);
            }
            Stage::Preparing => {
                // Step 3: the other parts link to the new node.
                m.stage = Stage::Relinking;
                m.awaited = m.others.len();
                let addrs = self.members.addrs(&m.to);
                for &peer in &m.others {
                    let step = MoveStep::Relink {
                        peer: m.from,
                        to: m.to,
                        addrs: addrs.clone(),
                    };
                    self.send_step(out, job, &m, peer, step, MoveStepThen::Relinked);
                }
                let none = m.awaited == 0;
                self.moves.insert(job.to_owned(), m);
                if none {
                    self.move_start(out, job);
                }
            }
            Stage::Relinking => {
                self.moves.insert(job.to_owned(), m);
                self.move_start(out, job);
            }
            Stage::Starting => {
                // Step 5: recorded.
                m.stage = Stage::Recording;
                let info = MoveInfo {
                    vertices: m.vertices.clone(),
                    from: m.from,
                    to: m.to,
                    attempt: m.attempt,
                    cut: m.cut,
                    at_ms: now_ms(),
                    downtime_ms: u64::try_from(
                        m.running
                            .unwrap_or_else(Instant::now)
                            .saturating_duration_since(m.began)
                            .as_millis(),
                    )
                    .unwrap_or(u64::MAX),
                    bytes: m.blob.as_ref().map_or(0, |(_, b)| b.len() as u64),
                };
                out.push(Effect::Record {
                    command: Command::Move {
                        job: job.to_owned(),
                        part: u32::try_from(m.part).unwrap_or(u32::MAX),
                        info,
                    },
                    then: Then::MoveRecorded {
                        job: job.to_owned(),
                    },
                });
                self.moves.insert(job.to_owned(), m);
            }
            Stage::Recording => {
                self.moves.insert(job.to_owned(), m);
            }
        }
    }

    /// Step 4: the new node starts the part; the old one ends its copy (awaited, so that a
    /// move back to it finds it gone).
    fn move_start(&mut self, out: &mut Vec<Effect>, job: &JobId) {
        let Some(m) = self.moves.get_mut(job) else {
            return;
        };
        m.stage = Stage::Starting;
        m.awaited = 2;
        let (to, from, attempt, cut) = (m.to, m.from, m.attempt, m.cut);
        let requests = [
            (
                to,
                BrokerRequest::Start {
                    job: job.to_owned(),
                    attempt,
                },
                MoveStepThen::Started,
            ),
            (
                from,
                BrokerRequest::Terminate {
                    job: job.to_owned(),
                    attempt,
                    reason: "the part moved to another node".into(),
                },
                MoveStepThen::Ended,
            ),
        ];
        for (peer, request, then) in requests {
            out.push(Effect::Send {
                peer,
                addrs: self.members.addrs(&peer),
                request,
                then: Then::MoveStep {
                    job: job.to_owned(),
                    cut,
                    then,
                },
            });
        }
    }

    /// The move of `job` was recorded (or not): its asker is answered, and the reports that
    /// came meanwhile are taken.
    pub(super) fn move_recorded(
        &mut self,
        out: &mut Vec<Effect>,
        job: &JobId,
        outcome: Result<Applied, LogError>,
    ) {
        let Some(m) = self.moves.remove(job) else {
            return;
        };
        self.ledger.release(job);
        self.view.moving.lock().remove(job);
        let result = match super::core::first(outcome) {
            Ok(()) => {
                let info = self
                    .log
                    .read(|s| s.job(job).and_then(|j| j.moves.last().cloned()));
                let info = info.ok_or_else(|| "the move is not in the log".to_owned());
                if let Ok(i) = &info {
                    tracing::info!(%job, to = %m.to, downtime_ms = i.downtime_ms, "part moved");
                    self.view
                        .figures
                        .moves
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                info
            }
            // Ended meanwhile (the end terminated the parts it knew of; the new node's part
            // ends at its next heartbeat).
            Err(f) => Err(f.message),
        };
        let r = match &result {
            Ok(info) => Response::Moved(vec![info.clone()]),
            Err(why) => fail(FailureKind::Failed, why.clone()),
        };
        if let Some((hash, _)) = &m.blob {
            self.drop_blobs(out, job, vec![*hash]);
        }
        if let Some(reply) = m.reply {
            out.push(Effect::Reply(reply, r));
        }
        for (peer, report, reply) in m.early {
            self.report(out, peer, report, reply);
        }
        self.move_done(out, job, result);
    }

    /// A step failed: before the links change, the move is given up and the job goes on as it
    /// was; after, the run fails as if a node were lost.
    fn move_failed(&mut self, out: &mut Vec<Effect>, job: &JobId, why: &str) {
        let Some(m) = self.moves.remove(job) else {
            return;
        };
        self.ledger.release(job);
        self.view.moving.lock().remove(job);
        tracing::warn!(%job, part = m.part, %why, "move given up");
        let message = format!("the move of job {job}'s part to another node failed: {why}");
        if matches!(m.stage, Stage::Holding | Stage::Preparing) {
            for peer in std::iter::once(m.from).chain(m.others.iter().copied()) {
                self.send_step(out, job, &m, peer, MoveStep::Stay, MoveStepThen::Held);
            }
            if m.stage == Stage::Preparing {
                self.terminate_run(out, job, m.attempt, "its move was given up", vec![m.to]);
            }
        } else {
            self.end(
                out,
                job,
                JobState::Failed,
                Ended::failed(ErrorKind::Lost, message.clone()),
            );
        }
        if let Some((hash, _)) = &m.blob {
            self.drop_blobs(out, job, vec![*hash]);
        }
        if let Some(reply) = m.reply {
            out.push(Effect::Reply(reply, fail(FailureKind::Failed, message)));
        }
        for (peer, report, reply) in m.early {
            self.report(out, peer, report, reply);
        }
        self.move_done(out, job, Err(why.to_owned()));
    }

    /// A report of a part of `job` from `peer` while the part on `peer` moves waits for the
    /// move's end; `None` if it does not wait.
    pub(super) fn report_moving(
        &mut self,
        peer: PeerId,
        report: PartReport,
        reply: Reply,
    ) -> Option<(PartReport, Reply)> {
        match self.moves.get_mut(&report.job) {
            Some(m) if peer == m.from || peer == m.to => {
                m.early.push((peer, report, reply));
                None
            }
            _ => Some((report, reply)),
        }
    }

    /// A job ended or its run was given up: its move (if any) is over.
    pub(super) fn forget_move(&mut self, out: &mut Vec<Effect>, job: &JobId, why: &str) {
        if let Some(m) = self.moves.remove(job) {
            self.ledger.release(job);
            self.view.moving.lock().remove(job);
            if let Some(reply) = m.reply {
                let f = fail(FailureKind::Failed, format!("the move was given up: {why}"));
                out.push(Effect::Reply(reply, f));
            }
            if m.stage != Stage::Holding {
                self.terminate_run(out, job, m.attempt, why, vec![m.to]);
            }
            for (_, _, reply) in m.early {
                out.push(Effect::Reply(reply, Response::Ok));
            }
            self.move_done(out, job, Err(why.to_owned()));
        }
    }
}
