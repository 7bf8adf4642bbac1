//! Draining a node (`mvm node drain`, as Slurm drains and Kubernetes cordons and drains): the
//! node is recorded drained in the job log, so that no replica places anything more on it,
//! and every part it runs of a job that asked for checkpoints moves, one at a time, to the
//! roomiest other node that can take it ([`super::migrate`]). Parts of jobs without
//! checkpoints cannot move: they run to their end there. Undraining records the node
//! placeable again.

use libp2p::PeerId;

use super::core::{Core, Effect, Reply, Then};
use super::fail;
use super::migrate::Which;
use crate::joblog::{Applied, Command, LogError};
use crate::proto::{FailureKind, JobId, JobState, MoveInfo, Response};

/// A drain under way: the node, what has moved, what could not, and the move now.
pub(super) struct DrainOp {
    node: PeerId,
    reply: Option<Reply>,
    moved: Vec<MoveInfo>,
    failed: Vec<String>,
    /// Jobs tried already (moved or not).
    tried: Vec<JobId>,
    current: Option<JobId>,
}

impl Core {
    /// Drains (`drain`) or undrains the node named `name`; `reply` is answered once recorded
    /// and (drained) once its parts have moved.
    pub(super) fn drain(&mut self, out: &mut Vec<Effect>, name: &str, drain: bool, reply: Reply) {
        let peer = self
            .members
            .all()
            .find(|(_, e)| e.info.name == name)
            .map(|(p, _)| *p);
        let Some(peer) = peer else {
            let why = format!("no node named '{name}' in group {}", self.site.group);
            return out.push(Effect::Reply(reply, fail(FailureKind::NotFound, why)));
        };
        if drain && self.drain.is_some() {
            let why = "a drain is under way; try again once it ends".to_owned();
            return out.push(Effect::Reply(reply, fail(FailureKind::Unavailable, why)));
        }
        out.push(Effect::Record {
            command: Command::Drain {
                node: peer,
                drained: drain,
            },
            then: Then::Drained { reply, peer, drain },
        });
    }

    /// A drain or undrain was recorded (or not): a drained node's parts start moving.
    pub(super) fn drained(
        &mut self,
        out: &mut Vec<Effect>,
        reply: Reply,
        peer: PeerId,
        drain: bool,
        outcome: Result<Applied, LogError>,
    ) {
        if let Err(f) = super::core::first(outcome) {
            return out.push(Effect::Reply(reply, Response::Error(f)));
        }
        if !drain {
            self.place_pending(out);
            return out.push(Effect::Reply(reply, Response::Moved(Vec::new())));
        }
        if self.drain.is_some() {
            // Recorded again while another drain runs: that one moves the parts.
            return out.push(Effect::Reply(reply, Response::Moved(Vec::new())));
        }
        tracing::info!(node = %self.members.label(&peer), "node drained");
        self.drain = Some(DrainOp {
            node: peer,
            reply: Some(reply),
            moved: Vec::new(),
            failed: Vec::new(),
            tried: Vec::new(),
            current: None,
        });
        self.drain_next(out);
    }

    /// Moves the next part off the node being drained, or answers once none is left.
    fn drain_next(&mut self, out: &mut Vec<Effect>) {
        loop {
            let Some(d) = self.drain.as_ref() else { return };
            let node = d.node;
            let next = self.log.read(|s| {
                s.placed_on(&node)
                    .filter(|j| j.state == JobState::Running && j.checkpoint.is_some())
                    .filter(|j| j.parts.iter().any(|p| p.node == node && !p.done))
                    .map(|j| j.id.clone())
                    .find(|id| !d.tried.contains(id))
            });
            let Some(job) = next else {
                let Some(d) = self.drain.take() else { return };
                tracing::info!(node = %self.members.label(&node), moved = d.moved.len(),
                    failed = d.failed.len(), "drain done");
                if let Some(reply) = d.reply {
                    let r = if d.failed.is_empty() {
                        Response::Moved(d.moved)
                    } else {
                        fail(
                            FailureKind::Failed,
                            format!(
                                "{} part(s) moved; not moved: {}",
                                d.moved.len(),
                                d.failed.join("; ")
                            ),
                        )
                    };
                    out.push(Effect::Reply(reply, r));
                }
                return;
            };
            if let Some(d) = self.drain.as_mut() {
                d.tried.push(job.clone());
                d.current = Some(job.clone());
            }
            match self.drain_target(&job, node) {
                Some(to) => {
                    self.start_move(out, &job, &Which::Peer(node), &to, None);
                    if self.moves.contains_key(&job) {
                        return; // its end comes to `move_done`
                    }
                    self.drain_failed(&job, "the move did not start".into());
                }
                None => self.drain_failed(&job, "no other node has room for its part".into()),
            }
        }
    }

    fn drain_failed(&mut self, job: &JobId, why: String) {
        if let Some(d) = self.drain.as_mut() {
            d.failed.push(format!("job {job}: {why}"));
            d.current = None;
        }
    }

    /// The roomiest live node, other than `node` and not drained, that meets `job`'s
    /// requirements, holds no part of it, and has room for its part on `node`; by name.
    fn drain_target(&self, job: &JobId, node: PeerId) -> Option<String> {
        let (s, parts) = self.log.read(|st| {
            let j = st.job(job)?;
            Some((j.submission.clone()?, j.parts.clone()))
        })?;
        let need = parts.iter().find(|p| p.node == node)?.vertices.len();
        let c = self.candidates(job, &s).ok()?;
        c.ok.iter()
            .filter(|&&i| {
                let p = c.peers[i];
                p != node && !parts.iter().any(|x| x.node == p)
            })
            .filter(|&&i| c.cands[i].free_slots as usize >= need)
            .max_by_key(|&&i| c.cands[i].free_slots)
            .map(|&i| c.cands[i].name.clone())
    }

    /// A move of `job` ended (`Ok`: recorded): a drain under way goes on.
    pub(super) fn move_done(
        &mut self,
        out: &mut Vec<Effect>,
        job: &JobId,
        r: Result<MoveInfo, String>,
    ) {
        let Some(d) = self.drain.as_mut() else { return };
        if d.current.as_ref() != Some(job) {
            return;
        }
        d.current = None;
        match r {
            Ok(info) => d.moved.push(info),
            Err(why) => d.failed.push(format!("job {job}: {why}")),
        }
        self.drain_next(out);
    }
}
