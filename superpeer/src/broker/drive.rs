//! Driving a placed job's parts: prepare everywhere, start everywhere, take the nodes' reports,
//! and end it (in the log first, then by telling every part still running). Each step is an
//! effect of the broker's machine, and each answer or outcome an input ([`super::core`]).

use libp2p::PeerId;

use super::core::{Core, Effect, Phase, Reply, Then, first};
use super::{fail, now_ms};
use crate::joblog::state::{Ended, JobRecord};
use crate::joblog::{Applied, Command, LogError};
use crate::proto::{
    BrokerRequest, ErrorKind, Failure, FailureKind, JobId, JobState, PartReport, PartSpec, Response,
};

impl Core {
    /// `peer` prepared a part of a job with `files`: it holds their inputs (a hint for the
    /// nodes placed next, [`super::holders`]).
    fn holds_inputs(&mut self, peer: PeerId, files: Option<&crate::proto::FileSpec>) {
        for i in files.iter().flat_map(|f| &f.inputs) {
            self.holders.add(i.hash, peer);
        }
    }

    /// A job of one part on the host, once its node has answered the prepare: one entry holds
    /// the job and, when the part ended within the node's hold (a short job), its end too, so
    /// that a short job costs one replication round instead of two. Until then the job is in
    /// no log; were this leader lost meanwhile, the submitter gets an error instead of a job
    /// id, and the part is told to stop (a node that does not hear it finds, at its next
    /// heartbeat, that the leader does not know the job).
    pub(super) fn alone_prepared(
        &mut self,
        out: &mut Vec<Effect>,
        reply: Reply,
        mut record: JobRecord,
        peer: PeerId,
        answer: Result<Response, Failure>,
    ) {
        let id = record.id.clone();
        if answer.is_ok() {
            self.holds_inputs(peer, record.files.as_ref());
        }
        // A part prepared alone has started; one refused never ran.
        record.state = JobState::Running;
        record.started_ms = Some(super::now_ms());
        let (end, running) = match answer {
            Ok(Response::Finished(report)) => (
                Some(part_end(|| self.members.label(&peer), peer, *report)),
                false,
            ),
            Ok(_) => (None, true),
            Err(f) => {
                record.state = JobState::Preparing;
                let (state, ended) = refusal_end(&self.members.label(&peer), &f);
                // A node lost before the part ran: the job, recorded, waits to run again.
                let end = if ended.kind == Some(ErrorKind::Lost) && record.retries > 0 {
                    Command::Requeue {
                        job: id.clone(),
                        attempt: 1,
                        at_ms: ended.at_ms,
                        why: ended.error.unwrap_or_default(),
                    }
                } else {
                    Command::End {
                        job: id.clone(),
                        state,
                        ended,
                    }
                };
                (Some(end), false)
            }
        };
        let command = match end {
            Some(end) => {
                // Ended already: nothing to run again, and a short job's entry stays small.
                if !matches!(end, Command::Requeue { .. }) {
                    record.submission = None;
                }
                Command::Batch(vec![Command::Submit(Box::new(record)), end])
            }
            None => Command::Submit(Box::new(record)),
        };
        out.push(Effect::Record {
            command,
            then: Then::AloneRecorded {
                reply,
                job: id,
                peer,
                running,
            },
        });
    }

    /// That job's entry was applied (or not): the submitter's answer, and the reports that
    /// came meanwhile.
    pub(super) fn alone_recorded(
        &mut self,
        out: &mut Vec<Effect>,
        reply: Reply,
        job: &JobId,
        peer: PeerId,
        running: bool,
        outcome: Result<Applied, LogError>,
    ) {
        self.ledger.release(job);
        let recorded = first(outcome);
        let drive = self.drives.remove(job);
        let r = match recorded {
            Ok(()) => {
                self.observe_start(job);
                self.submitted(job)
            }
            Err(f) => {
                if running {
                    self.terminate(out, job, "not recorded", vec![peer]);
                }
                Response::Error(f)
            }
        };
        out.push(Effect::Reply(reply, r));
        for (peer, report, reply) in drive.map(|d| d.early).unwrap_or_default() {
            self.report(out, peer, report, reply);
        }
        // Its node was lost before the part ran: it runs again on nodes heard from since.
        if self
            .log
            .read(|s| s.job(job).is_some_and(|j| j.state == JobState::Pending))
        {
            self.given_up.insert(job.to_owned(), self.now);
            self.place_pending(out);
        }
    }

    /// A placed job's entry (its submission, or the placement of a pending job) was applied (or
    /// not): the submitter's answer, and the prepares of its parts.
    pub(super) fn placed(
        &mut self,
        out: &mut Vec<Effect>,
        reply: Option<Reply>,
        job: &JobId,
        specs: Vec<(PeerId, PartSpec)>,
        outcome: Result<Applied, LogError>,
    ) {
        self.ledger.release(job);
        if let Err(f) = first(outcome) {
            let early = self.drives.remove(job).map(|d| d.early).unwrap_or_default();
            if let Some(reply) = reply {
                out.push(Effect::Reply(reply, Response::Error(f)));
            }
            for (_, report, reply) in early {
                let f = fail(FailureKind::NotFound, format!("no job {}", report.job));
                out.push(Effect::Reply(reply, f));
            }
            return;
        }
        self.given_up.remove(job);
        if let Some(reply) = reply {
            out.push(Effect::Reply(reply, self.submitted(job)));
        }
        let peers: Vec<PeerId> = specs.iter().map(|(p, _)| *p).collect();
        let attempt = specs.first().map_or(0, |(_, s)| s.attempt);
        let early = match self.drives.get_mut(job) {
            Some(d) => {
                d.phase = Phase::Preparing {
                    awaited: peers.len(),
                    peers,
                    finished: Vec::new(),
                    refused: None,
                };
                std::mem::take(&mut d.early)
            }
            None => Vec::new(),
        };
        for (peer, spec) in specs {
            out.push(Effect::Send {
                peer,
                addrs: self.members.addrs(&peer),
                request: BrokerRequest::Prepare(Box::new(spec)),
                then: Then::Prepared {
                    job: job.to_owned(),
                    attempt,
                },
            });
        }
        for (peer, report, reply) in early {
            self.report(out, peer, report, reply);
        }
    }

    /// A part answered its prepare. Once every part has: the job ends if one refused;
    /// otherwise the parts that ended within their prepare are recorded with the job's start,
    /// and the other parts are started.
    pub(super) fn prepared(
        &mut self,
        out: &mut Vec<Effect>,
        job: &JobId,
        attempt: u32,
        peer: PeerId,
        answer: Result<Response, Failure>,
    ) {
        // A node that prepared its part holds the job's inputs: it is named to the nodes
        // placed next for jobs with them.
        if answer.is_ok() && self.drives.get(job).is_some_and(|d| d.attempt == attempt) {
            let files = self.log.read(|s| s.job(job).and_then(|j| j.files.clone()));
            self.holds_inputs(peer, files.as_ref());
        }
        // An answer of a run given up meanwhile is nobody's.
        let Some(Phase::Preparing {
            awaited,
            finished,
            refused,
            ..
        }) = self
            .drives
            .get_mut(job)
            .filter(|d| d.attempt == attempt)
            .map(|d| &mut d.phase)
        else {
            return;
        };
        match answer {
            Ok(Response::Finished(report)) => finished.push((peer, *report)),
            Ok(_) => {}
            Err(f) => {
                refused.get_or_insert((peer, f));
            }
        }
        *awaited = awaited.saturating_sub(1);
        if *awaited > 0 {
            return;
        }
        // The job stays driven until its start is recorded: a takeover meanwhile must not
        // take it for one the last leader left half-prepared.
        let Some(drive) = self.drives.get_mut(job) else {
            return;
        };
        let Phase::Preparing {
            peers,
            finished,
            refused,
            ..
        } = std::mem::replace(&mut drive.phase, Phase::Starting)
        else {
            return;
        };
        if let Some((peer, f)) = refused {
            self.drives.remove(job);
            let (state, ended) = refusal_end(&self.members.label(&peer), &f);
            self.end(out, job, state, ended);
            return;
        }
        // Preparing → running, after the parts that ended already; a cancel may have ended
        // the job meanwhile (then the log refuses the start, and nothing is started).
        let mut batch: Vec<Command> = finished
            .into_iter()
            .map(|(peer, report)| part_end(|| self.members.label(&peer), peer, report))
            .collect();
        batch.push(Command::Start {
            job: job.to_owned(),
            at_ms: now_ms(),
        });
        out.push(Effect::Record {
            command: Command::Batch(batch),
            then: Then::StartRecorded {
                job: job.to_owned(),
                peers,
            },
        });
    }

    /// The start of a job was recorded: its parts are told to start (a single part started
    /// when it was prepared).
    pub(super) fn start_recorded(
        &mut self,
        out: &mut Vec<Effect>,
        job: &JobId,
        peers: Vec<PeerId>,
    ) {
        self.drives.remove(job);
        let running = self.log.read(|s| {
            s.job(job)
                .filter(|j| j.state == JobState::Running)
                .map(|j| j.attempt)
        });
        let Some(attempt) = running else {
            return;
        };
        self.observe_start(job);
        if peers.len() == 1 {
            return;
        }
        for peer in peers {
            out.push(Effect::Send {
                peer,
                addrs: Vec::new(),
                request: BrokerRequest::Start {
                    job: job.to_owned(),
                    attempt,
                },
                then: Then::Started {
                    job: job.to_owned(),
                    attempt,
                },
            });
        }
    }

    /// Counts the time from `job`'s submission until now, when it has started.
    fn observe_start(&self, job: &JobId) {
        if let Some(at) = self.log.read(|s| s.job(job).map(|j| j.submitted_ms)) {
            let secs = super::now_ms().saturating_sub(at) as f64 / 1000.0;
            self.view.figures.start.observe(secs);
        }
    }

    /// Ends a job (once): records its final state, then tells every part that has not
    /// reported a good end to stop and remove what it made.
    pub(super) fn end(
        &mut self,
        out: &mut Vec<Effect>,
        job: &JobId,
        state: JobState,
        ended: Ended,
    ) {
        self.end_then(out, job, state, ended, None);
    }

    /// As [`Core::end`], answering `reply` once the end is recorded. A job failed because a
    /// node was lost with retries left runs again instead ([`Core::retry`]).
    pub(super) fn end_then(
        &mut self,
        out: &mut Vec<Effect>,
        job: &JobId,
        state: JobState,
        ended: Ended,
        reply: Option<Reply>,
    ) {
        let Some(reply) = self.retry(out, job, state, &ended, reply) else {
            return;
        };
        out.push(Effect::Record {
            command: Command::End {
                job: job.to_owned(),
                state,
                ended,
            },
            then: Then::EndRecorded {
                job: job.to_owned(),
                state,
                reply,
            },
        });
    }

    /// A job's end was recorded: the parts still running are told to stop.
    pub(super) fn end_recorded(
        &mut self,
        out: &mut Vec<Effect>,
        job: &JobId,
        state: JobState,
        outcome: Result<Applied, LogError>,
    ) {
        self.given_up.remove(job);
        match outcome {
            Ok(Applied::Done) => {}
            Ok(other) => {
                tracing::debug!(%job, outcome = ?other, "end not recorded");
                return;
            }
            Err(e) => {
                tracing::warn!(%job, error = %e, "end not recorded");
                return;
            }
        }
        self.forget_cuts(out, job);
        self.forget_move(out, job, "the job ended");
        let peers: Vec<PeerId> = self.log.read(|s| {
            s.job(job)
                .map(|j| j.parts.iter().filter(|p| !p.done).map(|p| p.node).collect())
                .unwrap_or_default()
        });
        self.terminate(out, job, &format!("{state:?}"), peers);
    }

    /// Tells `peers` to stop their part of `job`, without waiting for their answers.
    pub(super) fn terminate(
        &self,
        out: &mut Vec<Effect>,
        job: &JobId,
        reason: &str,
        peers: Vec<PeerId>,
    ) {
        let attempt = self.log.read(|s| s.job(job).map_or(0, |j| j.attempt));
        self.terminate_run(out, job, attempt, reason, peers);
    }

    /// Tells `peers` to stop their part of run `attempt` of `job` (or an earlier run), without
    /// waiting for their answers.
    pub(super) fn terminate_run(
        &self,
        out: &mut Vec<Effect>,
        job: &JobId,
        attempt: u32,
        reason: &str,
        peers: Vec<PeerId>,
    ) {
        for peer in peers {
            out.push(Effect::Send {
                peer,
                addrs: self.members.addrs(&peer),
                request: BrokerRequest::Terminate {
                    job: job.to_owned(),
                    attempt,
                    reason: reason.to_owned(),
                },
                then: Then::Nothing,
            });
        }
    }

    /// A node's report of its part, answered at `reply`. A report of a job not yet in the log
    /// waits for it.
    pub(super) fn report(
        &mut self,
        out: &mut Vec<Effect>,
        peer: PeerId,
        r: PartReport,
        reply: Reply,
    ) {
        // A report from either end of a part that moves waits for the move's end.
        let Some((mut r, reply)) = self.report_moving(peer, r, reply) else {
            return;
        };
        if let Some(d) = self.drives.get_mut(&r.job)
            && matches!(d.phase, Phase::Recording)
        {
            d.early.push((peer, r, reply));
            return;
        }
        // What its vertices wrote last is kept whatever the report leads to.
        let lines = std::mem::take(&mut r.logs);
        self.report_logs(out, &r.job, r.attempt, lines);
        let known = self.log.read(|s| match s.job(&r.job) {
            None => Err(Failure::new(
                FailureKind::NotFound,
                format!("no job {}", r.job),
            )),
            // A report of a run given up: taken, and nothing comes of it.
            Some(j) if j.attempt != r.attempt => Ok(true),
            Some(j) => match j.parts.iter().find(|p| p.node == peer) {
                None => Err(Failure::new(
                    FailureKind::Refused,
                    format!("{peer} runs no part of {}", r.job),
                )),
                Some(p) => Ok(j.state.is_final() || p.done),
            },
        });
        match known {
            Err(f) => return out.push(Effect::Reply(reply, Response::Error(f))),
            // Already ended, or reported before.
            Ok(true) => return out.push(Effect::Reply(reply, Response::Ok)),
            Ok(false) => {}
        }
        let job = r.job.clone();
        match part_end(|| self.members.label(&peer), peer, r) {
            Command::End { state, ended, .. } => {
                self.end_then(out, &job, state, ended, Some(reply));
            }
            command => out.push(Effect::Record {
                command,
                then: Then::Answer { reply },
            }),
        }
    }
}

/// The command a part's report leads to: the part done, or the job ended with its failure
/// (naming the node as `label` gives it, made only then).
fn part_end(label: impl FnOnce() -> String, peer: PeerId, r: PartReport) -> Command {
    match r.outcome {
        Ok(res) => Command::PartDone {
            job: r.job,
            node: peer,
            attempt: r.attempt,
            outputs: res.outputs,
            traffic: res.traffic,
            edges: res.edges,
            received: res.received,
            guest: res.guest,
            at_ms: now_ms(),
        },
        Err(f) => {
            let state = if f.kind == ErrorKind::Refused {
                JobState::Refused
            } else {
                JobState::Failed
            };
            let what = if f.vertex.is_empty() {
                f.cause
            } else {
                format!("vertex '{}': {}", f.vertex, f.cause)
            };
            Command::End {
                job: r.job,
                state,
                ended: Ended::failed(f.kind, format!("node {}: {what}", label())),
            }
        }
    }
}

/// How a job ends when a node refuses or fails to prepare its part. A node that cannot be
/// reached (or is stopping) is lost to the job, which then runs again if it may
/// ([`Core::retry`]).
fn refusal_end(label: &str, f: &Failure) -> (JobState, Ended) {
    let (state, kind) = match f.kind {
        FailureKind::Refused => (JobState::Refused, ErrorKind::Refused),
        FailureKind::Unavailable => (JobState::Failed, ErrorKind::Lost),
        _ => (JobState::Failed, ErrorKind::Setup),
    };
    (
        state,
        Ended::failed(kind, format!("node {label}: {}", f.message)),
    )
}
