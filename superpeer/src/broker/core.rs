//! The broker as a state machine: [`Core::on`] takes an [`Input`] (a request that changes
//! something, a node's answer, a log entry's outcome, the tick) and gives the [`Effect`]s to
//! carry out (answers, requests to nodes, entries to propose). It does no I/O and spawns
//! nothing; the broker's event loop ([`super::run`]) owns it, carries out its effects, and
//! feeds what comes of them back in as inputs, each tagged with what it was for ([`Then`]).
//!
//! It reads the job log (the group's replicated state) and the policies in force; everything
//! else it knows is its own: the members ([`super::members`]), what placements under way hold
//! ([`super::admit::Ledger`]), and the jobs being driven ([`Drive`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use libp2p::PeerId;
use mvm_queue::codec::Registry;

use super::View;
use super::admit::Ledger;
use super::members::{self, Members};
use crate::joblog::state::Ended;
use crate::joblog::{Applied, Command, JobLog, LogError, Replica};
use crate::modules::ModuleStore;
use crate::proto::{
    ErrorKind, Failure, FailureKind, JobId, JobState, Member, PartReport, Response,
};
use crate::site::Site;

pub(super) use super::inputs::{Effect, Input, Reply, Then};

/// A job being driven: from its placement until its start is recorded.
pub(super) struct Drive {
    /// The run of the job driven: answers about another are ignored.
    pub(super) attempt: u32,
    pub(super) phase: Phase,
    /// Reports that came before the job was in the log, taken once it is.
    pub(super) early: Vec<(PeerId, PartReport, Reply)>,
}

impl Drive {
    /// Run `attempt` of a job whose entry (or, alone, whose part's prepare) is on its way.
    pub(super) fn recording(attempt: u32) -> Drive {
        Drive {
            attempt,
            phase: Phase::Recording,
            early: Vec::new(),
        }
    }
}

/// Where a driven job is.
pub(super) enum Phase {
    /// Its entry is on its way to the log, or (a job of one part) its part is being prepared.
    Recording,
    /// Its parts are being prepared: how many answers are awaited, the reports of parts that
    /// ended within their prepare, and the first refusal.
    Preparing {
        peers: Vec<PeerId>,
        awaited: usize,
        finished: Vec<(PeerId, PartReport)>,
        refused: Option<(PeerId, Failure)>,
    },
    /// Every part is prepared; its start (with the ends of parts that ended within their
    /// prepare) is on its way to the log.
    Starting,
}

/// The broker's state beside the log.
pub(super) struct Core {
    pub(super) site: Arc<Site>,
    pub(super) log: JobLog,
    pub(super) modules: Arc<ModuleStore>,
    pub(super) codecs: Arc<Registry>,
    /// What readers outside the loop see (statuses).
    pub(super) view: Arc<View>,
    pub(super) members: Members,
    pub(super) ledger: Ledger,
    /// The jobs being driven.
    pub(super) drives: HashMap<JobId, Drive>,
    /// Jobs placed by this broker (the last part of a job id).
    pub(super) seq: u64,
    /// Whether this broker led the log at its last input.
    pub(super) leading: bool,
    /// The jobs whose run this broker gave up (a node was lost), and when: a job's next run
    /// goes only to nodes heard from since, so that it does not go back to the node that
    /// was lost before the loss is noticed.
    pub(super) given_up: HashMap<JobId, Instant>,
    /// When the input being taken came.
    pub(super) now: Instant,
    /// The blobs of the checkpoints kept.
    pub(super) blobs: Arc<ModuleStore>,
    /// The checkpoints under way, by job.
    pub(super) cuts: HashMap<JobId, super::cut::Cut>,
    /// When each running job that asked for checkpoints had its last one started.
    pub(super) last_cut: super::cut::LastCuts,
    /// The replicas to start the job log with, and since when, if no other replica has
    /// started it by [`super::FOUNDING_WAIT`].
    pub(super) founders: Option<(Vec<Replica>, Instant)>,
    /// The moves of parts under way, by job.
    pub(super) moves: HashMap<JobId, super::migrate::Move>,
    /// The last cut number each job used for a move (a move given up is not in the log, and
    /// its number must not be used again on the same links).
    pub(super) cut_floor: HashMap<JobId, u64>,
    /// The drain under way.
    pub(super) drain: Option<super::drain::DrainOp>,
    /// The scheduling policy in force.
    pub(super) steering: super::monitor::Steering,
    /// The triggers and what their actions need.
    pub(super) triggering: super::triggers::Triggering,
    /// Jobs' files, to check that the files a checkpoint names are held (none: not checked).
    pub(super) files: Option<Arc<crate::files::FileStore>>,
    /// Per provider: the last charge batch proposed to the bank and not yet applied.
    pub(super) charging: HashMap<String, (u64, u64)>,
    /// When the market jobs' agents last bid.
    pub(super) last_agents: Option<Instant>,
    /// The nodes that hold each input file (a hint for the nodes placed next).
    pub(super) holders: super::holders::Holders,
}

impl Core {
    /// A broker that leads nothing yet.
    pub(super) fn new(
        site: Arc<Site>,
        log: JobLog,
        stores: [Arc<ModuleStore>; 2],
        codecs: Arc<Registry>,
        view: Arc<View>,
        founders: Option<Vec<Replica>>,
    ) -> Core {
        let [modules, blobs] = stores;
        Core {
            members: Members::new(site.lost_after),
            site,
            log,
            modules,
            codecs,
            view,
            ledger: Ledger::default(),
            drives: HashMap::new(),
            seq: 0,
            leading: false,
            given_up: HashMap::new(),
            now: Instant::now(),
            blobs,
            cuts: HashMap::new(),
            last_cut: HashMap::new(),
            founders: founders.map(|r| (r, Instant::now())),
            moves: HashMap::new(),
            cut_floor: HashMap::new(),
            drain: None,
            steering: super::monitor::Steering::default(),
            triggering: super::triggers::Triggering::default(),
            files: None,
            charging: HashMap::new(),
            last_agents: None,
            holders: super::holders::Holders::default(),
        }
    }

    /// Takes `input` at `now`; what to do about it.
    pub(super) fn on(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        let mut out = Vec::new();
        self.now = now;
        // A replica that has just come to lead takes over before it acts on anything: a
        // request may reach it before its next tick does.
        self.lead(&mut out, now);
        match input {
            Input::Submit {
                reply,
                who,
                submission,
                checked,
            } if !submission.sweep.is_empty() => {
                self.submit_array(&mut out, reply, &who, *submission, &checked);
            }
            Input::Submit {
                reply,
                who,
                submission,
                checked,
            } => self.submit(&mut out, reply, &who, *submission, *checked),
            Input::Offer {
                reply,
                who,
                submission,
                checked,
                ask,
            } => self.offer(&mut out, reply, &who, *submission, *checked, ask),
            Input::Accept { reply, who, offer } => self.accept(&mut out, reply, &who, offer),
            Input::Bank { reply, command } => self.bank(&mut out, reply, command),
            Input::Cancel { reply, job } => self.cancel(&mut out, reply, &job),
            Input::Checkpoint { reply, job } => self.start_cut(&mut out, &job, Some(reply)),
            Input::Migrate {
                reply,
                job,
                which,
                to,
            } => self.start_move(&mut out, &job, &which, &to, Some(reply)),
            Input::Drain { reply, node, drain } => self.drain(&mut out, &node, drain, reply),
            Input::Bid { reply, job, rate } => self.bid_by_hand(&mut out, reply, job, rate),
            Input::Hold { reply, job, held } => out.push(Effect::Record {
                command: Command::Hold { job, held },
                then: Then::Answer { reply },
            }),
            Input::Register {
                reply,
                peer,
                who,
                info,
            } => {
                let r = self.register(now, peer, &who, info);
                out.push(Effect::Reply(reply, r));
            }
            Input::Heartbeat {
                reply,
                peer,
                account,
                load,
            } => {
                let r = self.heartbeat(&mut out, now, peer, &account, load);
                out.push(Effect::Reply(reply, r));
            }
            Input::Report {
                reply,
                peer,
                report,
            } => self.report(&mut out, peer, *report, reply),
            Input::Logs {
                reply,
                peer,
                job,
                attempt,
                lines,
            } => self.logs(&mut out, peer, job, attempt, lines, reply),
            Input::Outputs {
                reply,
                job,
                attempt,
                files,
            } => out.push(Effect::Record {
                command: Command::Files {
                    job,
                    attempt,
                    files,
                },
                then: Then::Answer { reply },
            }),
            Input::Group { reply } => {
                let g = self.group(now);
                out.push(Effect::Reply(reply, Response::Group(g)));
            }
            Input::Heard(s) => {
                self.members.on(now, members::Input::Heard(s));
            }
            Input::Answered { then, peer, answer } => self.answered(&mut out, then, peer, answer),
            Input::Recorded { then, outcome } => self.recorded(&mut out, then, outcome),
            Input::Tick => self.tick(&mut out, now),
        }
        out
    }

    /// What the log's entry for `then` gave.
    fn recorded(&mut self, out: &mut Vec<Effect>, then: Then, outcome: Result<Applied, LogError>) {
        match then {
            Then::AloneRecorded {
                reply,
                job,
                peer,
                running,
            } => self.alone_recorded(out, reply, &job, peer, running, outcome),
            Then::PendingRecorded { reply, job, why } => {
                self.ledger.release(&job);
                let r = match first(outcome) {
                    Ok(()) => {
                        self.view
                            .waiting
                            .lock()
                            .insert(job.clone(), why.to_string());
                        tracing::info!(%job, "job pending");
                        self.submitted(&job)
                    }
                    Err(f) => Response::Error(f),
                };
                out.push(Effect::Reply(reply, r));
            }
            Then::Placed { reply, job, specs } => self.placed(out, reply, &job, specs, outcome),
            Then::ArrayRecorded { reply, array, ids } => {
                self.array_recorded(out, reply, &array, &ids, outcome);
            }
            Then::StartRecorded { job, peers } => self.start_recorded(out, &job, peers),
            Then::Requeued {
                job,
                attempt,
                peers,
                reply,
            } => self.requeued(out, &job, attempt, peers, reply, outcome),
            Then::CutRecorded {
                job,
                before,
                replies,
            } => self.cut_recorded(out, &job, before, replies, outcome),
            Then::MoveRecorded { job } => self.move_recorded(out, &job, outcome),
            Then::Drained { reply, peer, drain } => self.drained(out, reply, peer, drain, outcome),
            Then::EndRecorded { job, state, reply } => {
                self.end_recorded(out, &job, state, outcome);
                if let Some(reply) = reply {
                    out.push(Effect::Reply(reply, Response::Ok));
                }
            }
            Then::Banked { reply, by, request } => {
                self.banked(out, reply, &by, &request, outcome);
            }
            Then::AgreementRecorded { reply, id } => {
                self.agreement_recorded(out, reply, &id, outcome);
            }
            Then::Rebid {
                reply,
                job,
                rate,
                node,
            } => self.rebid(out, reply, &job, rate, node, outcome),
            Then::Charged { provider, upto } => {
                if let Err(e) = first(outcome) {
                    tracing::warn!(%provider, error = %e.message, "a node's charges were not recorded");
                }
                if self.charging.get(&provider) == Some(&upto) {
                    self.charging.remove(&provider);
                }
            }
            Then::Answer { reply } => {
                let r = match first(outcome) {
                    Ok(()) => Response::Ok,
                    Err(f) => Response::Error(f),
                };
                out.push(Effect::Reply(reply, r));
            }
            Then::AlonePrepared { .. }
            | Then::Prepared { .. }
            | Then::Started { .. }
            | Then::CutTaken { .. }
            | Then::MoveStep { .. }
            | Then::Grown { .. }
            | Then::Shrunk { .. }
            | Then::Nothing => {}
        }
    }

    /// What a node's answer for `then` gave.
    fn answered(
        &mut self,
        out: &mut Vec<Effect>,
        then: Then,
        peer: PeerId,
        answer: Result<Response, Failure>,
    ) {
        match then {
            Then::AlonePrepared { reply, record } => {
                self.alone_prepared(out, reply, *record, peer, answer);
            }
            Then::Prepared { job, attempt } => self.prepared(out, &job, attempt, peer, answer),
            Then::CutTaken { job, cut, part } => self.cut_taken(out, &job, cut, part, answer),
            Then::MoveStep { job, cut, then } => {
                self.move_answered(out, &job, cut, then, peer, answer);
            }
            Then::Started { job, attempt } => {
                let current = self.log.read(|s| s.job(&job).map(|j| j.attempt));
                if let Err(f) = answer
                    && current == Some(attempt)
                {
                    let why = format!("node {}: {}", self.members.label(&peer), f.message);
                    self.end(
                        out,
                        &job,
                        JobState::Failed,
                        Ended::failed(ErrorKind::Setup, why),
                    );
                }
            }
            Then::Grown { guest } => self.grown(&guest, &answer),
            Then::Shrunk { guest, name } => self.shrunk(guest, &name, &answer),
            Then::Nothing => {
                if let Err(f) = answer {
                    tracing::debug!(%peer, error = %f.message, "terminate not delivered");
                }
            }
            _ => {}
        }
    }

    /// The replicas, leader first (see [`super::group::Replicas`]).
    pub(super) fn replicas(&self) -> Vec<Member> {
        self.view.replicas.get(&self.log)
    }
}

/// The outcome of an entry: `Ok` if its (first) command was applied. A batch stands or falls
/// with its first command (the others follow from it).
pub(super) fn first(outcome: Result<Applied, LogError>) -> Result<(), Failure> {
    match outcome {
        Ok(Applied::Done) => Ok(()),
        Ok(Applied::Refused(why)) => Err(why.into()),
        Ok(Applied::Batch(v)) => match v.into_iter().next() {
            Some(Applied::Done) => Ok(()),
            Some(Applied::Refused(why)) => Err(why.into()),
            _ => Err(Failure::new(FailureKind::Failed, "a batch gave no outcome")),
        },
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
