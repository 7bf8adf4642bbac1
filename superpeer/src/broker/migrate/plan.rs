//! Checking a move and making the new node's spec.

use libp2p::PeerId;

use super::super::core::Core;
use super::super::place::check;
use super::super::plan::Plan;
use crate::proto::{Failure, FailureKind, JobId, JobState};

use super::{Move, Stage};

/// Which part of a job to move.
#[derive(Debug, Clone)]
pub(in crate::broker) enum Which {
    /// The part that holds this vertex.
    Vertex(String),
    /// The part on this node (by name).
    Node(String),
    /// The part on this node (a drain).
    Peer(PeerId),
}

impl Core {
    /// Checks a move and makes its spec for the new node.
    pub(super) fn plan_move(
        &mut self,
        job: &JobId,
        which: &Which,
        to: &str,
    ) -> Result<Move, Failure> {
        let input = |m: String| Failure::new(FailureKind::Input, m);
        if self.moves.contains_key(job) {
            return Err(Failure::new(
                FailureKind::Unavailable,
                format!("a part of job {job} is moving already"),
            ));
        }
        if self.cuts.contains_key(job) {
            return Err(Failure::new(
                FailureKind::Unavailable,
                format!("a checkpoint of job {job} is under way; try again"),
            ));
        }
        let to_peer = self
            .members
            .live()
            .find(|(_, e)| e.info.name == to)
            .map(|(p, _)| *p)
            .ok_or_else(|| {
                Failure::new(
                    FailureKind::NotFound,
                    format!("no live node named '{to}' in group {}", self.site.group),
                )
            })?;
        if self.log.read(|s| s.is_drained(&to_peer)) {
            return Err(input(format!("node '{to}' is drained")));
        }
        let found = self.log.read(|s| {
            let j = s
                .job(job)
                .ok_or_else(|| Failure::new(FailureKind::NotFound, format!("no job {job}")))?;
            if j.checkpoint.is_none() {
                return Err(input(format!(
                    "job {job} did not ask for checkpoints ([checkpoint] in its profile): its \
                     parts cannot move"
                )));
            }
            if j.state != JobState::Running {
                return Err(input(format!("job {job} is {:?}, not running", j.state)));
            }
            let part = j.parts.iter().position(|p| match which {
                Which::Vertex(v) => p.vertices.contains(v),
                Which::Node(n) => self.members.name(&p.node) == Some(n.as_str()),
                Which::Peer(peer) => p.node == *peer,
            });
            let Some(part) = part else {
                return Err(Failure::new(
                    FailureKind::NotFound,
                    match which {
                        Which::Vertex(v) => format!("job {job} has no vertex '{v}'"),
                        Which::Node(n) => format!("job {job} has no part on node '{n}'"),
                        Which::Peer(p) => format!("job {job} has no part on {p}"),
                    },
                ));
            };
            if j.parts.iter().any(|p| p.done) {
                return Err(input(format!(
                    "a part of job {job} has ended: the job is ending"
                )));
            }
            if j.parts.iter().any(|p| p.node == to_peer) {
                return Err(input(format!(
                    "node '{to}' runs a part of job {job} already"
                )));
            }
            let s = j.submission.clone().ok_or_else(|| {
                Failure::new(
                    FailureKind::Failed,
                    format!("job {job}'s submission was not kept"),
                )
            })?;
            let last = j.checkpoints.last().map_or(0, |c| c.cut);
            let moved = j.moves.last().map_or(0, |m| m.cut);
            Ok((
                j.attempt,
                last.max(moved),
                j.parts.clone(),
                part,
                j.owner.clone(),
                s,
            ))
        })?;
        let (attempt, last, parts, part, owner, s) = found;
        let from = parts[part].node;
        // Room on the new node, and what the job requires of its nodes.
        let need = u32::try_from(parts[part].vertices.len()).unwrap_or(u32::MAX);
        let cands = self.candidates(job, &s).map_err(Failure::from)?;
        let fits = cands
            .ok
            .iter()
            .find(|&&i| cands.peers[i] == to_peer)
            .map(|&i| cands.cands[i].free_slots);
        match fits {
            None => {
                return Err(input(format!(
                    "node '{to}' does not meet job {job}'s requirements"
                )));
            }
            Some(free) if free < need => {
                return Err(Failure::new(
                    FailureKind::Unavailable,
                    format!("node '{to}' has {free} free slots; the part has {need} vertices"),
                ));
            }
            Some(_) => {}
        }
        let c = check(&self.modules, &self.codecs, &s)?;
        let placement: Vec<u32> = c
            .topology
            .vertices
            .iter()
            .map(|v| {
                let p = parts.iter().position(|p| p.vertices.contains(&v.name));
                u32::try_from(p.unwrap_or(0)).unwrap_or(0)
            })
            .collect();
        let mut peers: Vec<PeerId> = parts.iter().map(|p| p.node).collect();
        peers[part] = to_peer;
        let mut plan = Plan {
            peers,
            placement,
            bids: Vec::new(),
        };
        self.bid_plan(job, &s, &mut plan, true);
        let mut specs = self.specs(job, &owner, &s, &c, &plan, attempt);
        if part >= specs.len() {
            return Err(input(format!("job {job}: no such part")));
        }
        let (_, mut spec) = specs.swap_remove(part);
        spec.start = false;
        let cut = last.max(self.cut_floor.get(job).copied().unwrap_or(0)) + 1;
        self.cut_floor.insert(job.to_owned(), cut);
        self.ledger.hold_slots(job, to_peer, need);
        let within = super::super::cut::save_limit(s.files.as_ref(), parts[part].vertices.len());
        Ok(Move {
            attempt,
            cut,
            within_ms: within.map(super::super::cut::millis),
            part,
            vertices: parts[part].vertices.clone(),
            from,
            to: to_peer,
            others: parts
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != part)
                .map(|(_, p)| p.node)
                .collect(),
            stage: Stage::Holding,
            awaited: 0,
            blob: None,
            files: None,
            spec: Some(Box::new(spec)),
            began: self.now,
            running: None,
            reply: None,
            early: Vec::new(),
        })
    }
}
