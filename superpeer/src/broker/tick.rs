//! The broker's machine over time: its tick (a change of leader, lost nodes, parts gone from
//! their nodes, pending jobs placed), the founding of a new job log, and cancels.

use std::time::Instant;

use libp2p::PeerId;

use super::core::{Core, Effect, Reply};
use super::{fail, members};
use crate::joblog::state::{Ended, JobRecord};
use crate::proto::{ErrorKind, FailureKind, JobId, JobState};

impl Core {
    /// Runs on every tick: notices a change of leader, fails the parts of lost nodes and the
    /// parts gone from their nodes, and places pending jobs that fit now.
    pub(super) fn tick(&mut self, out: &mut Vec<Effect>, now: Instant) {
        self.found(out, now);
        if !self.leading {
            // Only the leader's monitoring is current.
            *self.view.monitor.lock() = None;
            return;
        }
        for effect in self.members.on(now, members::Input::Tick) {
            match effect {
                members::Effect::Lost { peer, name } => self.lost(out, peer, name),
                members::Effect::Vanished { job, peer, name } => {
                    let why =
                        format!("node {name} ({peer}) no longer runs its part (it restarted?)");
                    tracing::warn!(%job, %peer, %name, "a part is gone from its node");
                    self.end(
                        out,
                        &job,
                        JobState::Failed,
                        Ended::failed(ErrorKind::Lost, why),
                    );
                }
                members::Effect::Unknown(_) => {}
            }
        }
        let metrics = self.steer();
        self.fire_triggers(out, &metrics);
        let pending: std::collections::HashSet<JobId> = self
            .log
            .read(|s| s.pending().map(|j| j.id.clone()).collect());
        self.view
            .waiting
            .lock()
            .retain(|id, _| pending.contains(id));
        self.keep_agreements(out);
        self.place_pending(out);
        self.cuts_due(out);
        if self
            .last_agents
            .is_none_or(|t| now.duration_since(t) >= super::market::AGENT_EVERY)
        {
            self.last_agents = Some(now);
            self.agents(out);
        }
    }

    /// Notices whether this replica leads the log now; one that has just come to lead takes
    /// over.
    pub(super) fn lead(&mut self, out: &mut Vec<Effect>, now: Instant) {
        let leading = self.log.is_leader();
        let was = std::mem::replace(&mut self.leading, leading);
        if leading && !was {
            self.take_over(out, now);
        }
    }

    /// A node lost: the parts it holds fail, and its connections close.
    fn lost(&mut self, out: &mut Vec<Effect>, peer: PeerId, name: Option<String>) {
        let name = name.unwrap_or_else(|| "(not registered since the takeover)".into());
        tracing::warn!(%peer, %name, "node lost");
        let jobs: Vec<JobId> = self.log.read(|s| {
            s.placed_on(&peer)
                .filter(|j| {
                    !j.state.is_final() && j.parts.iter().any(|p| p.node == peer && !p.done)
                })
                .map(|j| j.id.clone())
                .collect()
        });
        for job in jobs {
            let why = format!("node {name} ({peer}) stopped answering; its vertices failed");
            self.end(
                out,
                &job,
                JobState::Failed,
                Ended::failed(ErrorKind::Lost, why),
            );
        }
        out.push(Effect::Disconnect(peer));
    }

    /// Starts the job log with the founding replicas if none has started it in time.
    fn found(&mut self, out: &mut Vec<Effect>, now: Instant) {
        match &self.founders {
            Some(_) if !self.log.replicas().is_empty() => self.founders = None,
            Some((_, since)) if now.saturating_duration_since(*since) > super::FOUNDING_WAIT => {
                if let Some((replicas, _)) = self.founders.take() {
                    tracing::warn!("no replica started the group's job log; this one does");
                    out.push(Effect::Found(replicas));
                }
            }
            _ => {}
        }
    }

    /// This broker has just taken the lead: the jobs that the last leader was preparing cannot
    /// be started (their preparation died with it) and fail; running jobs go on, and the nodes
    /// that run them count as lost unless they register in time.
    fn take_over(&mut self, out: &mut Vec<Effect>, now: Instant) {
        let (preparing, holding): (Vec<JobId>, Vec<PeerId>) = self.log.read(|s| {
            let live: Vec<&JobRecord> = s.jobs().filter(|j| !j.state.is_final()).collect();
            let mut holding: Vec<PeerId> = live
                .iter()
                .flat_map(|j| j.parts.iter().filter(|p| !p.done).map(|p| p.node))
                .collect();
            holding.sort_unstable();
            holding.dedup();
            let preparing = live
                .iter()
                .filter(|j| j.state == JobState::Preparing && !self.drives.contains_key(&j.id))
                .map(|j| j.id.clone())
                .collect();
            (preparing, holding)
        });
        tracing::warn!(
            preparing = preparing.len(),
            nodes = holding.len(),
            "this super-peer now leads the group's job log"
        );
        self.members.on(now, members::Input::TookOver { holding });
        for job in preparing {
            let why = "its super-peer was lost while it was being prepared".to_owned();
            self.end(
                out,
                &job,
                JobState::Failed,
                Ended::failed(ErrorKind::Lost, why),
            );
        }
    }

    /// Cancels a job that has not ended.
    pub(super) fn cancel(&mut self, out: &mut Vec<Effect>, reply: Reply, job: &JobId) {
        match self.log.read(|s| s.job(job).map(|j| j.state)) {
            None => out.push(Effect::Reply(
                reply,
                fail(FailureKind::NotFound, format!("no job {job}")),
            )),
            Some(s) if s.is_final() => out.push(Effect::Reply(
                reply,
                fail(
                    FailureKind::Input,
                    format!("job {job} has already ended ({s:?})"),
                ),
            )),
            Some(_) => self.end_then(
                out,
                job,
                JobState::Cancelled,
                Ended::cancelled(),
                Some(reply),
            ),
        }
    }
}
