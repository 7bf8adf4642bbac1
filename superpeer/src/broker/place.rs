//! Placing a submitted job: check it, admit it, choose its nodes ([`crate::schedule`]), and
//! record it in the job log; then the parts are driven ([`super::drive`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use libp2p::PeerId;
use mvm_component::policy::Principal;
use mvm_component::topology::{Options, Topology, Vertex};

use super::admit::{Reservation, sanitize};
use super::{Broker, fail, now_ms};
use crate::joblog::Command;
use crate::joblog::state::{Ended, JobRecord, PartRecord};
use crate::proto::ErrorKind;
use crate::proto::{
    EnvSpec, Failure, FailureKind, JobState, Member, PartSpec, Response, Submission,
};
use crate::schedule::{self, Candidate, Graph, Rank};

/// Whether a job was placed here (or refused for bad input), or cannot be placed here.
pub(super) enum Placed {
    Job(Box<Response>),
    Unplaceable { vertices: usize, why: String },
}

/// A placement decided, before it is recorded.
struct Plan {
    peers: Vec<PeerId>,
    /// Vertex → part index.
    placement: Vec<u32>,
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
    fn parts(&self, t: &Topology) -> Vec<PartRecord> {
        self.peers
            .iter()
            .enumerate()
            .map(|(i, p)| PartRecord {
                node: *p,
                vertices: self.vertices(t, i).map(|v| v.name.clone()).collect(),
                done: false,
            })
            .collect()
    }
}

/// A submission checked: its topology, rank and placement graph.
pub(super) struct Checked {
    topology: Topology,
    rank: Rank,
    graph: Graph,
}

impl Broker {
    /// Checks what a submission names: its modules are here, its topology parses and names
    /// only components it has, its limits and rank are valid.
    pub(super) fn check(&self, s: &Submission) -> Result<Checked, Failure> {
        for (component, hash) in &s.components {
            if !self.modules.has(hash) {
                return Err(Failure::new(
                    FailureKind::Input,
                    format!("module {hash} of component '{component}' was not sent"),
                ));
            }
        }
        let codecs = self.codecs.clone();
        let topology = Topology::parse_named(
            &s.topology_file,
            &s.topology,
            &Options {
                codecs: &codecs,
                queue_defaults: s.queue.clone(),
            },
        )
        .map_err(|e| Failure::new(FailureKind::Input, e.to_string()))?;
        if topology.vertices.is_empty() {
            let why = format!("{}: no vertices", s.topology_file);
            return Err(Failure::new(FailureKind::Input, why));
        }
        for v in &topology.vertices {
            if !s.components.contains_key(&v.component) {
                return Err(Failure::new(
                    FailureKind::Input,
                    format!(
                        "{}:{}: component '{}' of vertex '{}' has no module in the profile",
                        s.topology_file, v.line, v.component, v.name
                    ),
                ));
            }
        }
        s.limits.limits().map_err(Failure::from)?;
        let rank = match s.requirements.rank.as_deref() {
            Some(r) => Rank::parse(r).map_err(Failure::from)?,
            None => Rank::default_rank(),
        };
        let graph = Graph {
            vertices: topology.vertices.len(),
            edges: topology
                .channels
                .iter()
                .map(|c| {
                    let w = c
                        .attributes
                        .get("weight")
                        .and_then(|w| w.parse().ok())
                        .unwrap_or(1);
                    (c.from.vertex, c.to.vertex, w)
                })
                .collect(),
        };
        Ok(Checked {
            topology,
            rank,
            graph,
        })
    }

    /// Validates, admits and places a job here; a job that fits this group but not now waits
    /// in the log's queue; otherwise says why this group cannot take it.
    pub(super) async fn place(self: &Arc<Self>, owner: &Principal, mut s: Submission) -> Placed {
        for b in std::mem::take(&mut s.modules) {
            self.modules.put(b);
        }
        let c = match self.check(&s) {
            Ok(c) => c,
            Err(f) => return Placed::Job(Box::new(Response::Error(f))),
        };
        // The policy enforcement point: nothing is reserved or woken for a denied job.
        let n = c.topology.vertices.len();
        let (mut reservation, _) = match self.authorize(owner, &s, n) {
            Ok(r) => r,
            Err(why) => {
                tracing::info!(job = %s.name, owner = %owner, %why, "job refused by policy");
                return Placed::Job(Box::new(fail(
                    FailureKind::Refused,
                    format!("job {}: refused by policy: {why}", s.name),
                )));
            }
        };
        // Unique across leaders: at most one leads in a term.
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{:x}-{seq:x}", sanitize(&s.name), self.log.term());
        let r = &s.requirements;
        let mut record = JobRecord {
            id: id.clone(),
            name: s.name.clone(),
            owner: owner.clone(),
            resources: reservation.resources,
            image: r.image.clone().unwrap_or_else(|| "host".into()),
            priority: s.priority,
            submitted_ms: now_ms(),
            state: JobState::Preparing,
            held: false,
            parts: Vec::new(),
            outputs: Vec::new(),
            traffic: Vec::new(),
            ended: None,
            submission: None,
            version: 0,
        };
        let plan = match self.plan(&s, &c, &mut reservation) {
            Ok(p) => p,
            Err(why) if self.fits_when_free(&s, &c) => {
                // Admitted, but not now: it waits, and holds what it asks for meanwhile. Its
                // modules wait in the log with it, so that whichever replica leads when there
                // is room has them (they leave the log when it is placed).
                record.state = JobState::Pending;
                let mut s = s;
                s.modules = s
                    .components
                    .values()
                    .filter_map(|h| self.modules.get(h))
                    .collect();
                record.submission = Some(Box::new(s));
                if let Err(r) = self.record(Command::Submit(Box::new(record))).await {
                    return Placed::Job(Box::new(r));
                }
                // Once recorded: a tick meanwhile drops the reasons of jobs not pending.
                self.waiting.lock().insert(id.clone(), why);
                drop(reservation);
                tracing::info!(job = %id, "job pending");
                return Placed::Job(Box::new(self.submitted(&id)));
            }
            Err(why) => return Placed::Unplaceable { vertices: n, why },
        };
        record.parts = plan.parts(&c.topology);
        if let [alone] = &plan.peers[..]
            && record.image == "host"
        {
            // One part on the host: recorded once its node has answered (see
            // `Broker::run_alone`). A part that needs a guest is recorded first: its prepare
            // may take a guest's boot, and the job is seen `preparing` meanwhile.
            let peer = *alone;
            let spec = self.specs(&id, owner, &s, &c, &plan).pop();
            let Some((_, spec)) = spec else {
                return Placed::Job(Box::new(fail(FailureKind::Failed, "a part without a spec")));
            };
            let r = self.run_alone(record, peer, spec).await;
            drop(reservation); // held until the log holds the job, or not
            return Placed::Job(Box::new(r));
        }
        self.driving.lock().insert(id.clone());
        if let Err(r) = self.record(Command::Submit(Box::new(record))).await {
            self.driving.lock().remove(&id);
            return Placed::Job(Box::new(r));
        }
        drop(reservation); // the log holds the job's resources and slots from here
        self.launch(&id, owner, &s, &c, &plan);
        Placed::Job(Box::new(self.submitted(&id)))
    }

    /// Places the pending jobs that fit now, in the queue's order (a job that does not fit
    /// lets later ones that do go first).
    pub(super) async fn place_pending(self: &Arc<Self>) {
        let waiting: Vec<(String, Principal, Box<Submission>)> = self.log.read(|st| {
            st.pending()
                .filter_map(|j| Some((j.id.clone(), j.owner.clone(), j.submission.clone()?)))
                .take(256)
                .collect()
        });
        for (id, owner, s) in waiting {
            if self.driving.lock().contains(&id) {
                continue;
            }
            if s.components.values().any(|h| !self.modules.has(h)) {
                for b in &s.modules {
                    self.modules.put(b.clone());
                }
            }
            let c = match self.check(&s) {
                Ok(c) => c,
                Err(f) => {
                    let ended = Ended::failed(ErrorKind::Setup, f.message);
                    self.end(&id, JobState::Failed, ended).await;
                    continue;
                }
            };
            let mut reservation = Reservation::slots_only(self);
            let plan = match self.plan(&s, &c, &mut reservation) {
                Ok(p) => p,
                Err(why) => {
                    self.waiting.lock().insert(id, why);
                    continue;
                }
            };
            self.driving.lock().insert(id.clone());
            let place = Command::Place {
                job: id.clone(),
                parts: plan.parts(&c.topology),
            };
            if !matches!(
                self.log.propose(place).await,
                Ok(crate::joblog::Applied::Done)
            ) {
                self.driving.lock().remove(&id);
                continue;
            }
            drop(reservation);
            self.waiting.lock().remove(&id);
            tracing::info!(job = %id, "pending job placed");
            self.launch(&id, &owner, &s, &c, &plan);
        }
    }

    /// Whether the job would fit this group's registered nodes were they all free.
    fn fits_when_free(&self, s: &Submission, c: &Checked) -> bool {
        let nodes = self.nodes.lock();
        let cands: Vec<Candidate> = nodes
            .values()
            .filter(|e| !e.lost)
            .map(|e| Candidate {
                name: e.info.name.clone(),
                cpus: e.info.cpus,
                memory_bytes: e.info.memory_bytes,
                free_memory_bytes: e.info.memory_bytes,
                load: 0.0,
                arch: e.info.arch.clone(),
                images: e.info.images.clone(),
                slots: e.info.slots,
                free_slots: e.info.slots,
            })
            .collect();
        let (ok, _) = schedule::filter(&cands, &s.requirements);
        let caps: Vec<u32> = ok.iter().map(|&i| cands[i].free_slots).collect();
        let max = s.requirements.nodes.map_or(usize::MAX, |m| m as usize);
        !ok.is_empty() && schedule::place(&c.graph, &caps, max).is_ok()
    }

    /// Prepares and starts a recorded job's parts.
    fn launch(
        self: &Arc<Self>,
        id: &str,
        owner: &Principal,
        s: &Submission,
        c: &Checked,
        plan: &Plan,
    ) {
        let specs = self.specs(id, owner, s, c, plan);
        self.spawn_drive(id.to_owned(), specs);
    }

    /// What each node of a placed job is sent to prepare its part.
    fn specs(
        &self,
        id: &str,
        owner: &Principal,
        s: &Submission,
        c: &Checked,
        plan: &Plan,
    ) -> Vec<(PeerId, PartSpec)> {
        let members: Vec<Member> = plan.peers.iter().map(|p| self.member(p)).collect();
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
                mode: r.vm_mode.clone().unwrap_or_else(|| "stop-start".into()),
            });
        let policy_digest = self.site.policies.current().digest.clone();
        plan.peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let components = plan
                    .vertices(&c.topology, i)
                    .filter_map(|v| {
                        s.components
                            .get(&v.component)
                            .map(|h| (v.component.clone(), h.clone()))
                    })
                    .collect();
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
                    environment: environment.clone(),
                    owner: owner.clone(),
                    policy_digest: policy_digest.clone(),
                };
                (*p, spec)
            })
            .collect()
    }

    /// Drives the parts on a task of their own, among the broker's tasks that its shutdown
    /// ends (from a plain function, so that the future of [`Broker::place`] does not hold the
    /// one of [`Broker::drive`], which may call back into this daemon).
    fn spawn_drive(self: &Arc<Self>, id: String, specs: Vec<(PeerId, PartSpec)>) {
        let broker = self.clone();
        self.tasks
            .lock()
            .spawn(async move { broker.drive(id, specs).await });
    }

    /// Chooses the job's nodes among the registered ones by their free slots now, and holds
    /// those slots in `reservation`.
    fn plan(
        &self,
        s: &Submission,
        c: &Checked,
        reservation: &mut Reservation,
    ) -> Result<Plan, String> {
        // Scheduled under the inflight lock, so that two placements never count the same
        // free slot.
        let nodes = self.nodes.lock();
        let mut inflight = self.inflight.lock();
        let mut live: Vec<(&PeerId, &super::members::NodeEntry)> =
            nodes.iter().filter(|(_, e)| !e.lost).collect();
        live.sort_by(|a, b| a.1.info.name.cmp(&b.1.info.name).then(a.0.cmp(b.0)));
        if live.is_empty() {
            return Err(format!(
                "no node has registered with the super-peer of group {}",
                self.site.group
            ));
        }
        let cands: Vec<Candidate> = live
            .iter()
            .map(|(p, e)| {
                let logged = self.log.read(|st| st.reserved(p));
                let held = inflight.slots.get(*p).copied().unwrap_or(0);
                Candidate {
                    name: e.info.name.clone(),
                    cpus: e.info.cpus,
                    memory_bytes: e.info.memory_bytes,
                    free_memory_bytes: e.info.load.free_memory_bytes,
                    load: e.info.load.load,
                    arch: e.info.arch.clone(),
                    images: e.info.images.clone(),
                    slots: e.info.slots,
                    free_slots: e.info.slots.saturating_sub(logged).saturating_sub(held),
                }
            })
            .collect();
        let (ok, why) = schedule::filter(&cands, &s.requirements);
        if ok.is_empty() {
            return Err(format!(
                "no node of group {} meets the job's requirements: {}",
                self.site.group,
                why.join("; ")
            ));
        }
        let order = c.rank.order(&cands, ok);
        let caps: Vec<u32> = order.iter().map(|&i| cands[i].free_slots).collect();
        let max = s.requirements.nodes.map_or(usize::MAX, |m| m as usize);
        let placed = schedule::place(&c.graph, &caps, max)
            .map_err(|e| format!("group {}: {e}", self.site.group))?;
        // Parts: the nodes used, in rank order; vertex → part index.
        let mut used: Vec<usize> = placed.clone();
        used.sort_unstable();
        used.dedup();
        let peers: Vec<PeerId> = used.iter().map(|&r| *live[order[r]].0).collect();
        let placement: Vec<u32> = placed
            .iter()
            .map(|r| u32::try_from(used.binary_search(r).unwrap_or(0)).unwrap_or(0))
            .collect();
        for (i, p) in peers.iter().enumerate() {
            let count = placement.iter().filter(|&&x| x as usize == i).count();
            reservation.take_slots(&mut inflight, *p, u32::try_from(count).unwrap_or(u32::MAX));
        }
        Ok(Plan { peers, placement })
    }
}
