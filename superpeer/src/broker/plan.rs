//! Choosing a job's nodes: the candidates as the members and the log give them, the pure
//! [`crate::schedule`] over them, and what each chosen node is sent.

use libp2p::PeerId;
use mvm_component::policy::Principal;
use mvm_component::topology::{Topology, Vertex};

use super::core::Core;
use super::place::Checked;
use crate::joblog::state::PartRecord;
use crate::proto::{EnvSpec, Hash, JobId, Member, PartSpec, Submission, VmMode};
use crate::schedule::{self, Candidate, ScheduleError};

/// Why a job cannot be placed in this group now.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum PlaceError {
    /// No node has registered.
    #[error("no node has registered with the super-peer of group {group}")]
    NoNodes {
        /// The group.
        group: String,
    },
    /// A job whose run was given up waits for a node heard from since.
    #[error("no node of group {group} has been heard from since the job's last run was given up")]
    NoneHeardSince {
        /// The group.
        group: String,
    },
    /// No node meets the requirements; why not, node by node.
    #[error("no node of group {group} meets the job's requirements: {}", why.join("; "))]
    NoneMeets {
        /// The group.
        group: String,
        /// Why each node does not.
        why: Vec<String>,
    },
    /// The nodes that meet them have too little room.
    #[error("group {group}: {error}")]
    Schedule {
        /// The group.
        group: String,
        /// What the schedule found.
        #[source]
        error: ScheduleError,
    },
    /// The job waits for other jobs to end (`after`, `after_ok`).
    #[error("{0}")]
    Waits(String),
    /// No offer meets what was asked (a deadline), and why.
    #[error("{0}")]
    NoOffer(String),
    /// A run from a checkpoint needs a node of its own with room for each of its parts.
    #[error(
        "group {group}: the checkpoint's {parts} parts each need a node with room, and {fit} fit"
    )]
    Restore {
        /// The group.
        group: String,
        /// The checkpoint's parts.
        parts: usize,
        /// How many found a node.
        fit: usize,
    },
}

/// The nodes a job may go to now ([`Core::candidates`]).
pub(super) struct Candidates {
    /// Their peer ids, by name.
    pub(super) peers: Vec<PeerId>,
    /// What the schedule knows of each.
    pub(super) cands: Vec<Candidate>,
    /// The indices of those that meet the job's requirements.
    pub(super) ok: Vec<usize>,
}

/// A placement decided, before it is recorded.
pub(super) struct Plan {
    pub(super) peers: Vec<PeerId>,
    /// Vertex → part index.
    pub(super) placement: Vec<u32>,
    /// Each part's bid for its node's CPU, when the job bids ([`Core::bid_plan`]).
    pub(super) bids: Vec<u64>,
}

impl Plan {
    /// The vertices of part `i`.
    fn vertices<'a>(&'a self, t: &'a Topology, i: usize) -> impl Iterator<Item = &'a Vertex> + 'a {
        t.vertices
            .iter()
            .zip(&self.placement)
            .filter(move |(_, x)| **x as usize == i)
            .map(|(v, _)| v)
    }

    /// The parts as the log records them.
    pub(super) fn parts(&self, t: &Topology) -> Vec<PartRecord> {
        self.peers
            .iter()
            .enumerate()
            .map(|(i, p)| PartRecord {
                bid: self.bids.get(i).copied(),
                guest: None,
                node: *p,
                vertices: self.vertices(t, i).map(|v| v.name.clone()).collect(),
                done: false,
            })
            .collect()
    }
}

/// A node's images as placement sees them: its own, and `image` too when it fetches the
/// images it lacks and another node `offered` it.
pub(super) fn images_of(
    info: &crate::proto::NodeInfo,
    image: Option<&str>,
    offered: bool,
) -> Vec<String> {
    let mut v = info.images.clone();
    if let Some(i) = image
        && offered
        && info.fetches_images
        && !v.iter().any(|x| x == i)
    {
        v.push(i.to_owned());
    }
    v
}

impl Core {
    /// The image `image` (`name:version`, or a full id) as the live nodes that offer it know
    /// it: its full id (`name:version@sha256:HEX`) and the nodes; none when no node offers it
    /// by a full id.
    pub(super) fn image_sources(&self, image: &str) -> Option<(String, Vec<PeerId>)> {
        if image == "host" {
            return None;
        }
        let prefix = format!("{image}@sha256:");
        let mut full: Option<String> = None;
        let mut peers = Vec::new();
        for (p, e) in self.members.live() {
            let id = e
                .info
                .images
                .iter()
                .find(|i| *i == image && i.contains("@sha256:") || i.starts_with(&prefix));
            match (id, &full) {
                (Some(id), None) => {
                    full = Some(id.clone());
                    peers.push(*p);
                }
                (Some(id), Some(f)) if id == f => peers.push(*p),
                _ => {}
            }
        }
        full.map(|f| (f, peers))
    }

    /// Whether the job would fit this group's registered nodes were they all free.
    pub(super) fn fits_when_free(&self, s: &Submission, c: &Checked) -> bool {
        let image = s.requirements.image.as_deref();
        let offered = image.is_some_and(|i| self.image_sources(i).is_some());
        let cands: Vec<Candidate> = self
            .members
            .live()
            .map(|(_, e)| Candidate {
                name: e.info.name.clone(),
                cpus: e.info.cpus,
                memory_bytes: e.info.memory_bytes,
                free_memory_bytes: e.info.memory_bytes,
                load: 0.0,
                arch: e.info.arch.clone(),
                images: images_of(&e.info, image, offered),
                slots: e.info.slots,
                free_slots: e.info.slots,
                floor: e.info.load.floor,
            })
            .collect();
        let (ok, _) = schedule::filter(&cands, &s.requirements);
        // The roomiest first: `place` fills the first `nodes` it is given.
        let mut caps: Vec<u32> = ok.iter().map(|&i| cands[i].free_slots).collect();
        caps.sort_unstable_by(|a, b| b.cmp(a));
        let max = s.requirements.nodes.map_or(usize::MAX, |m| m as usize);
        !ok.is_empty() && schedule::place(&c.graph, &caps, max).is_ok()
    }

    /// What each node of a placed job is sent to prepare its part of run `attempt`.
    pub(super) fn specs(
        &self,
        id: &JobId,
        owner: &Principal,
        s: &Submission,
        c: &Checked,
        plan: &Plan,
        attempt: u32,
    ) -> Vec<(PeerId, PartSpec)> {
        let members: Vec<Member> = plan.peers.iter().map(|p| self.members.member(p)).collect();
        // Each node ensures the profile's image as a guest before its part runs.
        let r = &s.requirements;
        let environment = r
            .image
            .as_ref()
            .filter(|i| i.as_str() != "host")
            .map(|image| EnvSpec {
                image: image.clone(),
                vcpus: r.vcpus.unwrap_or(1),
                memory_mib: r
                    .memory_bytes
                    .map_or(128, |b| u32::try_from(b >> 20).unwrap_or(u32::MAX).max(16)),
                mode: r.vm_mode.unwrap_or(VmMode::StopStart),
                weight: r.cpu_weight,
                cap: r.cpu_cap,
                template: r.template.clone(),
                bid: None,
            });
        let policy_digest = self.site.policies.current().digest;
        // The image by its full id, and the nodes that serve it, for a node that lacks it.
        let sources = r.image.as_deref().and_then(|i| self.image_sources(i));
        let environment = environment.map(|mut e| {
            if let Some((full, _)) = &sources {
                e.image.clone_from(full);
            }
            e
        });
        let image_from: Vec<Member> = sources
            .map(|(_, peers)| peers.iter().map(|p| self.members.member(p)).collect())
            .unwrap_or_default();
        // The live nodes that prepared parts of jobs with its inputs before.
        let inputs: Vec<Hash> = s
            .files
            .iter()
            .flat_map(|f| f.inputs.iter().map(|i| i.hash))
            .collect();
        let files_from: Vec<Member> = self
            .holders
            .of(inputs.iter().copied())
            .into_iter()
            .filter(|p| self.members.live().any(|(q, _)| q == p))
            .map(|p| self.members.member(&p))
            .collect();
        plan.peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let components = plan
                    .vertices(&c.topology, i)
                    .filter_map(|v| {
                        s.components
                            .get(&v.component)
                            .map(|h| (v.component.clone(), *h))
                    })
                    .collect();
                let mut environment = environment.clone();
                if let Some(e) = &mut environment {
                    e.bid = plan.bids.get(i).copied();
                }
                let spec = PartSpec {
                    job: id.to_owned(),
                    topology_file: s.topology_file.clone(),
                    topology: s.topology.clone(),
                    queue: s.queue.clone(),
                    components,
                    parameters: s.parameters.clone(),
                    limits: s.limits.clone(),
                    placement: plan.placement.clone(),
                    parts: members.clone(),
                    here: u32::try_from(i).unwrap_or(0),
                    start: plan.peers.len() == 1,
                    environment,
                    owner: owner.clone(),
                    policy_digest,
                    attempt,
                    checkpoint: s.checkpoint.is_some(),
                    restore: None,
                    restore_files: None,
                    streams: false,
                    files: s.files.clone(),
                    image_from: image_from.clone(),
                    files_from: files_from
                        .iter()
                        .filter(|m| m.peer != *p)
                        .cloned()
                        .collect(),
                };
                (*p, spec)
            })
            .collect()
    }

    /// Chooses the job's nodes among the registered ones by their free slots now, and holds
    /// those slots for `job` in the ledger.
    pub(super) fn plan(
        &mut self,
        job: &JobId,
        s: &Submission,
        c: &Checked,
    ) -> Result<Plan, PlaceError> {
        let cs = self.candidates(job, s)?;
        let mut plan = self.choose(&cs, s, c)?;
        self.bid_plan(job, s, &mut plan, false);
        self.hold(job, &plan);
        *self
            .view
            .figures
            .placements
            .lock()
            .entry(self.steering.policy.name())
            .or_default() += 1;
        Ok(plan)
    }

    /// Chooses among `cs` the nodes of a job, by their free slots there: the group's
    /// scheduling policy, the job's rank, then the graph's partition.
    pub(super) fn choose(
        &self,
        cs: &Candidates,
        s: &Submission,
        c: &Checked,
    ) -> Result<Plan, PlaceError> {
        let Candidates {
            peers: live,
            cands,
            ok,
        } = cs;
        let (cands, ok) = (cands.as_slice(), ok.clone());
        let max = s.requirements.nodes.map_or(usize::MAX, |m| m as usize);
        // The group's scheduling policy orders the nodes (the job's rank among equals), and
        // may bound how many it uses (pack).
        // A market job goes to the nodes its agent would bid on, the highest bid first.
        let with_room: Vec<usize> = ok
            .iter()
            .copied()
            .filter(|&i| cands[i].free_slots > 0)
            .collect();
        let market = self.market_order(s, live, &with_room, max.min(c.graph.vertices));
        let (mut order, max) = match market {
            Some(o) => {
                let n = o.len();
                (o, n)
            }
            None => self
                .steering
                .policy
                .arrange(&c.rank, cands, ok, c.graph.vertices, max),
        };
        // A job that names a guest template goes first to the nodes that keep a guest of it
        // warm (in policy order among them): its part starts without making one.
        if let Some(t) = &s.requirements.template {
            let key = t.shape.key();
            order.sort_by_key(|&i| self.members.warm(&live[i], &key) == 0);
        }
        // `place` fills the first `max` nodes of the order it is given. When the best ranked
        // of them have too little room and others have more, the roomiest go first (in rank
        // order among equals), so that a job that fits is not kept waiting behind rank.
        let room: u64 = order
            .iter()
            .take(max)
            .map(|&i| u64::from(cands[i].free_slots))
            .sum();
        if room < c.graph.vertices as u64 {
            order.sort_by_key(|&i| std::cmp::Reverse(cands[i].free_slots));
        }
        let caps: Vec<u32> = order.iter().map(|&i| cands[i].free_slots).collect();
        let placed =
            schedule::place(&c.graph, &caps, max).map_err(|error| PlaceError::Schedule {
                group: self.site.group.clone(),
                error,
            })?;
        // Parts: the nodes used, in rank order; vertex → part index.
        let mut used: Vec<usize> = placed.clone();
        used.sort_unstable();
        used.dedup();
        let peers: Vec<PeerId> = used.iter().map(|&r| live[order[r]]).collect();
        let placement: Vec<u32> = placed
            .iter()
            .map(|r| u32::try_from(used.binary_search(r).unwrap_or(0)).unwrap_or(0))
            .collect();
        Ok(Plan {
            peers,
            placement,
            bids: Vec::new(),
        })
    }

    /// Holds the slots of `plan` for `job` in the ledger.
    pub(super) fn hold(&mut self, job: &JobId, plan: &Plan) {
        for (i, p) in plan.peers.iter().enumerate() {
            let count = plan.placement.iter().filter(|&&x| x as usize == i).count();
            self.ledger
                .hold_slots(job, *p, u32::try_from(count).unwrap_or(u32::MAX));
        }
    }

    /// The nodes `job` may go to now, by name: their peer ids, what the schedule knows of
    /// each, and the indices of those that meet the job's requirements. A job whose run was
    /// given up goes only to nodes heard from since.
    ///
    /// # Errors
    /// No node, or none that meets the requirements.
    pub(super) fn candidates(&self, job: &JobId, s: &Submission) -> Result<Candidates, PlaceError> {
        let since = self.given_up.get(job).copied();
        let mut live: Vec<(&PeerId, &super::members::NodeEntry)> = self
            .members
            .live()
            .filter(|(_, e)| since.is_none_or(|t| e.last_seen > t))
            .collect();
        // Drained nodes take nothing more, nor guests being torn down.
        self.log.read(|st| live.retain(|(p, _)| !st.is_drained(p)));
        live.retain(|(p, _)| !self.triggering.retiring.contains(*p));
        live.sort_by(|a, b| a.1.info.name.cmp(&b.1.info.name).then(a.0.cmp(b.0)));
        if live.is_empty() {
            let group = self.site.group.clone();
            return Err(match since {
                Some(_) => PlaceError::NoneHeardSince { group },
                None => PlaceError::NoNodes { group },
            });
        }
        let image = s.requirements.image.as_deref();
        let offered = image.is_some_and(|i| self.image_sources(i).is_some());
        // Slots agreements hold while the job would run are not its (it runs before them, in
        // a gap, only when its estimate says it ends in time: backfilling).
        let now = super::now_ms();
        let until = s.estimate_ms.map_or(u64::MAX, |e| now.saturating_add(e));
        // What the log holds on each node, and the agreements' windows, in one read.
        let (holds, logged): (Vec<super::agree::Held>, Vec<u32>) = self.log.read(|st| {
            let logged = live.iter().map(|(p, _)| st.reserved(p)).collect();
            (super::agree::holds(st, now), logged)
        });
        let cands: Vec<Candidate> = live
            .iter()
            .zip(logged)
            .map(|((p, e), logged)| {
                let held = self.ledger.slots(p).saturating_add(super::agree::held_in(
                    &holds,
                    p,
                    now,
                    until,
                    Some(job),
                ));
                Candidate {
                    name: e.info.name.clone(),
                    cpus: e.info.cpus,
                    memory_bytes: e.info.memory_bytes,
                    free_memory_bytes: e.info.load.free_memory_bytes,
                    load: e.info.load.load,
                    arch: e.info.arch.clone(),
                    images: images_of(&e.info, image, offered),
                    slots: e.info.slots,
                    free_slots: e.info.slots.saturating_sub(logged).saturating_sub(held),
                    floor: e.info.load.floor,
                }
            })
            .collect();
        let (ok, why) = schedule::filter(&cands, &s.requirements);
        if ok.is_empty() {
            return Err(PlaceError::NoneMeets {
                group: self.site.group.clone(),
                why,
            });
        }
        Ok(Candidates {
            peers: live.into_iter().map(|(p, _)| *p).collect(),
            cands,
            ok,
        })
    }
}
