//! The broker role of a super-peer: the group's membership, and jobs from submission to the
//! broadcast of their termination (the MVM paper's on-demand steps a–g).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use mvm_component::policy::{self as pol, Principal, PrincipalKind, Question, Resource};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::daemon::Shared;
use crate::modules::ModuleStore;
use crate::proto::{
    EnvSpec, Failure, FailureKind, GroupInfo, GroupSummary, JobState, JobStatus, Member, NodeInfo,
    NodeLoad, NodeView, PartReport, PartSpec, PartStatus, Request, Response, SUBMIT_HOLD,
    Submission, Traffic,
};
use crate::schedule::{self, Candidate, Graph, Rank};

struct NodeEntry {
    info: NodeInfo,
    addrs: Vec<Multiaddr>,
    last_seen: Instant,
    lost: bool,
    /// Vertex slots reserved by jobs placed here and not ended.
    reserved: u32,
}

struct Part {
    peer: PeerId,
    vertices: Vec<String>,
    done: bool,
}

struct Job {
    status: JobStatus,
    parts: Vec<Part>,
    started: Instant,
    /// (version, whether the job has ended): read by waiters without the job table's lock.
    changed: watch::Sender<(u64, bool)>,
    traffic: BTreeMap<(String, String, bool, bool), (u64, u64)>,
    /// Who submitted it.
    owner: Principal,
    /// What the policy was asked about it at submission.
    facts: pol::Job,
}

impl Job {
    fn bump(&mut self) {
        self.status.version += 1;
        self.status.vertices_done = self
            .parts
            .iter()
            .filter(|p| p.done)
            .map(|p| u32::try_from(p.vertices.len()).unwrap_or(u32::MAX))
            .sum();
        self.status.parts = self
            .parts
            .iter()
            .map(|p| PartStatus {
                node: p.peer.to_string(),
                name: String::new(),
                vertices: p.vertices.clone(),
                done: p.done,
            })
            .collect();
        self.status.traffic = self
            .traffic
            .iter()
            .map(|((kind, codec, remote, direct), (items, bytes))| Traffic {
                kind: kind.clone(),
                codec: codec.clone(),
                remote: *remote,
                direct: *direct,
                items: *items,
                bytes: *bytes,
            })
            .collect();
        self.status.wall_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.changed
            .send_replace((self.status.version, self.status.state.is_final()));
    }
}

/// The broker's state.
pub(crate) struct Broker {
    nodes: Mutex<HashMap<PeerId, NodeEntry>>,
    jobs: Mutex<HashMap<String, Job>>,
    pub(crate) modules: ModuleStore,
    seq: std::sync::atomic::AtomicU64,
    /// Ended jobs kept for `status`, oldest first.
    ended: Mutex<std::collections::VecDeque<String>>,
    /// Other groups' summaries, by super-peer, with when they were heard.
    groups: Mutex<HashMap<String, (GroupSummary, Instant)>>,
    /// What each owner's jobs that have not ended hold here: vCPUs, MiB, vertices.
    held: Mutex<HashMap<Principal, [i64; 3]>>,
}

/// Adds (`sign` 1) or removes (-1) `facts`' vCPUs, MiB and vertices to what `owner` holds.
fn add_held(
    held: &mut HashMap<Principal, [i64; 3]>,
    owner: &Principal,
    facts: &pol::Job,
    sign: i64,
) {
    let h = held.entry(owner.clone()).or_insert([0; 3]);
    h[0] = h[0].saturating_add(sign * facts.vcpus);
    h[1] = h[1].saturating_add(sign * facts.memory_mib);
    h[2] = h[2].saturating_add(sign * facts.vertices);
    if *h == [0; 3] {
        held.remove(owner);
    }
}

/// An owner's resources counted for a job being placed; given back when dropped, unless the
/// job took them (then its end gives them back).
struct Hold {
    broker: Arc<Broker>,
    owner: Principal,
    facts: Option<pol::Job>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(f) = self.facts.take() {
            self.broker.hold(&self.owner, &f, -1);
        }
    }
}

/// How long a group summary stays valid without being heard again.
const SUMMARY_TTL: Duration = Duration::from_secs(5);

/// How many ended jobs the broker remembers.
const KEEP_ENDED: usize = 10_000;

fn fail(kind: FailureKind, m: impl Into<String>) -> Response {
    Response::Error(Failure::new(kind, m))
}

impl Broker {
    pub(crate) fn new(modules: ModuleStore) -> Broker {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Broker {
            nodes: Mutex::new(HashMap::new()),
            jobs: Mutex::new(HashMap::new()),
            modules,
            seq: std::sync::atomic::AtomicU64::new(seed << 20),
            ended: Mutex::new(std::collections::VecDeque::new()),
            groups: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
        }
    }

    /// This group's summary, for the other super-peers.
    pub(crate) fn summary(&self, shared: &Shared) -> GroupSummary {
        let nodes = self.nodes.lock();
        let live: Vec<&NodeEntry> = nodes.values().filter(|n| !n.lost).collect();
        let mut images: Vec<String> = live.iter().flat_map(|n| n.info.images.clone()).collect();
        images.sort();
        images.dedup();
        let mut archs: Vec<String> = live.iter().map(|n| n.info.arch.clone()).collect();
        archs.sort();
        archs.dedup();
        GroupSummary {
            group: shared.config.group.clone(),
            domain: shared.config.domain.clone(),
            broker: shared.net.peer().to_string(),
            addrs: shared.net.dial_addrs(),
            nodes: u32::try_from(live.len()).unwrap_or(u32::MAX),
            free_slots: live
                .iter()
                .map(|n| n.info.slots.saturating_sub(n.reserved))
                .sum(),
            images,
            archs,
        }
    }

    /// Takes another super-peer's summary (already validated).
    pub(crate) fn learn(&self, shared: &Shared, s: GroupSummary) {
        if s.broker == shared.net.peer().to_string() {
            return;
        }
        self.groups
            .lock()
            .insert(s.broker.clone(), (s, Instant::now()));
    }

    /// The other groups heard from recently.
    fn groups(&self, shared: &Shared) -> Vec<GroupSummary> {
        let mut g = self.groups.lock();
        g.retain(|_, (_, at)| at.elapsed() < SUMMARY_TTL);
        let me = shared.net.peer().to_string();
        let mut v: Vec<GroupSummary> = g
            .values()
            .map(|(s, _)| s.clone())
            .filter(|s| s.broker != me)
            .collect();
        v.sort_by(|a, b| a.group.cmp(&b.group));
        v
    }

    /// Sends a job this group cannot place to another group's super-peer that can: the same
    /// domain, or a domain this super-peer trusts; the one with the most free slots first.
    async fn forward(
        &self,
        shared: &Arc<Shared>,
        mut s: Submission,
        owner: Principal,
        vertices: usize,
        why: &str,
    ) -> Response {
        let r = &s.requirements;
        let mut fits: Vec<GroupSummary> = self
            .groups(shared)
            .into_iter()
            .filter(|g| {
                (g.domain == shared.config.domain || inter_domain_allows(shared, &owner, g))
                    && g.free_slots as usize >= vertices
                    && r.image.as_ref().is_none_or(|i| g.images.contains(i))
                    && r.arch.as_ref().is_none_or(|a| g.archs.contains(a))
            })
            .collect();
        fits.sort_by_key(|g| std::cmp::Reverse(g.free_slots));
        let mut tried = Vec::new();
        for g in fits {
            let Ok(peer) = g.broker.parse::<PeerId>() else {
                continue;
            };
            let addrs: Vec<Multiaddr> = g
                .addrs
                .iter()
                .filter_map(|a| crate::net::split_peer(a).ok().map(|(_, a)| a))
                .collect();
            let hashes: Vec<String> = s.components.values().cloned().collect();
            let Ok(Response::Missing { hashes: missing }) = shared
                .net
                .call(peer, &addrs, Request::Missing { hashes })
                .await
            else {
                tried.push(format!("group {} did not answer", g.group));
                continue;
            };
            s.modules = missing.iter().filter_map(|h| self.modules.get(h)).collect();
            s.hops = s.hops.saturating_add(1);
            s.on_behalf = Some(owner.clone());
            s.wait = false;
            match shared
                .net
                .call(peer, &addrs, Request::Submit(Box::new(s.clone())))
                .await
            {
                Ok(Response::Submitted(mut st)) => {
                    tracing::info!(job = %st.job, group = %g.group, "job forwarded");
                    if st.broker_addrs.is_empty() {
                        st.broker_addrs = g.addrs.clone();
                    }
                    return Response::Submitted(st);
                }
                Ok(_) => tried.push(format!("group {} gave no job", g.group)),
                Err(f) => tried.push(format!("group {}: {}", g.group, f.message)),
            }
            s.hops = s.hops.saturating_sub(1);
        }
        let tail = if tried.is_empty() {
            String::from("; no other group known to this super-peer can take it")
        } else {
            format!("; forwarding failed: {}", tried.join("; "))
        };
        fail(FailureKind::Unavailable, format!("{why}{tail}"))
    }

    fn members(&self) -> Vec<Member> {
        let nodes = self.nodes.lock();
        let mut m: Vec<Member> = nodes
            .iter()
            .filter(|(_, n)| !n.lost)
            .map(|(p, n)| Member {
                peer: p.to_string(),
                addrs: n.info.addrs.clone(),
                eligible: n.info.eligible,
            })
            .collect();
        m.sort_by(|a, b| a.peer.cmp(&b.peer));
        m
    }

    pub(crate) fn register(
        &self,
        shared: &Shared,
        peer: PeerId,
        who: &Principal,
        info: NodeInfo,
        heartbeat: Duration,
    ) -> Response {
        if who.kind != PrincipalKind::Node
            || who.domain != shared.config.domain
            || who.name != info.name
            || info.domain != who.domain
        {
            return fail(
                FailureKind::Refused,
                format!(
                    "{who} cannot join group {} of domain {} as node {}@{}: a node joins with \
                     a node certificate of its own name and of the group's domain",
                    shared.config.group, shared.config.domain, info.name, info.domain
                ),
            );
        }
        let addrs = info.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        tracing::info!(%peer, name = %info.name, "node registered");
        self.nodes.lock().insert(
            peer,
            NodeEntry {
                info,
                addrs,
                last_seen: Instant::now(),
                lost: false,
                reserved: 0,
            },
        );
        Response::Registered {
            heartbeat_ms: u64::try_from(heartbeat.as_millis()).unwrap_or(1000),
            members: self.members(),
        }
    }

    pub(crate) fn heartbeat(&self, peer: PeerId, load: NodeLoad) -> Response {
        let known = {
            let mut nodes = self.nodes.lock();
            match nodes.get_mut(&peer) {
                Some(n) if !n.lost => {
                    n.last_seen = Instant::now();
                    n.info.load = load;
                    true
                }
                _ => false,
            }
        };
        Response::Heartbeat {
            known,
            members: self.members(),
        }
    }

    pub(crate) fn group(&self, shared: &Shared) -> GroupInfo {
        let nodes = self.nodes.lock();
        let mut views: Vec<NodeView> = nodes
            .iter()
            .map(|(p, n)| NodeView {
                peer: p.to_string(),
                name: n.info.name.clone(),
                lost: n.lost,
                vertices: n.reserved,
                slots: n.info.slots,
            })
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        GroupInfo {
            group: shared.config.group.clone(),
            broker: Some(shared.net.peer().to_string()),
            broker_addrs: shared.net.dial_addrs(),
            is_broker: true,
            nodes: views,
            groups: self.groups(shared),
        }
    }

    /// Marks nodes silent for longer than `lost_after` as lost and fails their jobs.
    pub(crate) fn sweep(self: &Arc<Self>, shared: &Arc<Shared>, lost_after: Duration) {
        let lost: Vec<(PeerId, String)> = {
            let mut nodes = self.nodes.lock();
            nodes
                .iter_mut()
                .filter(|(_, n)| !n.lost && n.last_seen.elapsed() > lost_after)
                .map(|(p, n)| {
                    n.lost = true;
                    (*p, n.info.name.clone())
                })
                .collect()
        };
        for (peer, name) in lost {
            tracing::warn!(%peer, %name, "node lost");
            let jobs: Vec<String> = self
                .jobs
                .lock()
                .iter()
                .filter(|(_, j)| {
                    !j.status.state.is_final() && j.parts.iter().any(|p| p.peer == peer && !p.done)
                })
                .map(|(id, _)| id.clone())
                .collect();
            for job in jobs {
                self.end(
                    shared,
                    &job,
                    JobState::Failed,
                    Some(format!(
                        "node {name} ({peer}) stopped answering; its vertices failed"
                    )),
                );
            }
            let shared = shared.clone();
            tokio::spawn(async move { shared.net.disconnect(peer).await });
        }
    }

    pub(crate) fn missing(&self, hashes: &[String]) -> Response {
        Response::Missing {
            hashes: hashes
                .iter()
                .filter(|h| !self.modules.has(h))
                .cloned()
                .collect(),
        }
    }

    pub(crate) fn fetch(&self, hash: &str) -> Response {
        match self.modules.get(hash) {
            Some(b) => Response::Module(b),
            None => fail(FailureKind::NotFound, format!("no module {hash}")),
        }
    }

    /// Validates, authorizes and places a job, then drives it on its own task.
    pub(crate) async fn submit(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        caller: &Principal,
        s: Submission,
    ) -> Response {
        let owner = match owner_of(caller, &s) {
            Ok(o) => o,
            Err(why) => return fail(FailureKind::Refused, format!("job {}: {why}", s.name)),
        };
        match self.place(shared, &owner, &s) {
            Placed::Job(r) => r,
            Placed::Unplaceable { vertices, why } if s.hops == 0 => {
                self.forward(shared, s, owner, vertices, &why).await
            }
            Placed::Unplaceable { why, .. } => fail(FailureKind::Unavailable, why),
        }
    }

    /// Adds (`sign` 1) or removes (-1) a job's resources to what its owner holds here.
    fn hold(&self, owner: &Principal, facts: &pol::Job, sign: i64) {
        add_held(&mut self.held.lock(), owner, facts, sign);
    }

    /// Asks the policy whether `owner` may submit `s` (and use its image) here; if so, the
    /// job's resources count as held by the owner until the returned hold is dropped or
    /// passed to the job (so two jobs at once cannot both slip under a limit).
    fn authorize(
        self: &Arc<Self>,
        shared: &Shared,
        owner: &Principal,
        s: &Submission,
        vertices: usize,
    ) -> Result<Hold, String> {
        let engine = shared.policies.current().engine.clone();
        let r = &s.requirements;
        let domain = shared.config.domain.clone();
        let vcpus = i64::from(r.vcpus.unwrap_or(1));
        let memory_mib = i64::try_from(r.memory_bytes.unwrap_or(0) >> 20).unwrap_or(i64::MAX);
        let vertices = i64::try_from(vertices).unwrap_or(i64::MAX);
        // Decided and counted under one lock.
        let mut held = self.held.lock();
        let [hc, hm, hv] = held.get(owner).copied().unwrap_or([0; 3]);
        let image = r.image.clone().unwrap_or_else(|| "host".into());
        let facts = pol::Job {
            name: s.name.clone(),
            owner: owner.name.clone(),
            owner_domain: owner.domain.clone(),
            domain: domain.clone(),
            vcpus,
            memory_mib,
            vertices,
            image: image.clone(),
            user_vcpus: hc.saturating_add(vcpus),
            user_memory_mib: hm.saturating_add(memory_mib),
            user_vertices: hv.saturating_add(vertices),
        };
        engine
            .decide(&Question {
                actor: owner.clone(),
                action: "submit".into(),
                resource: Resource::Job(facts.clone()),
            })
            .into_result()?;
        if image != "host" {
            engine
                .decide(&Question {
                    actor: owner.clone(),
                    action: "use-image".into(),
                    resource: Resource::Image(pol::Image { id: image, domain }),
                })
                .into_result()?;
        }
        add_held(&mut held, owner, &facts, 1);
        drop(held);
        Ok(Hold {
            broker: self.clone(),
            owner: owner.clone(),
            facts: Some(facts),
        })
    }

    /// The answer refusing `who` to `action` (`read-results`, `cancel`) job `id`, if the
    /// policy refuses (or there is no such job).
    fn refusal(
        &self,
        shared: &Shared,
        who: &Principal,
        action: &str,
        id: &str,
    ) -> Option<Response> {
        let facts = match self.jobs.lock().get(id) {
            Some(j) => j.facts.clone(),
            None => return Some(fail(FailureKind::NotFound, format!("no job {id}"))),
        };
        shared
            .policies
            .current()
            .engine
            .decide(&Question {
                actor: who.clone(),
                action: action.into(),
                resource: Resource::Job(facts),
            })
            .into_result()
            .err()
            .map(|why| fail(FailureKind::Refused, format!("job {id}: {why}")))
    }

    /// Validates and places a job here, or says why this group cannot take it.
    fn place(self: &Arc<Self>, shared: &Arc<Shared>, owner: &Principal, s: &Submission) -> Placed {
        let s = s.clone();
        Placed::Job(match self.place_inner(shared, owner, s) {
            Ok(r) => r,
            Err((vertices, why)) => return Placed::Unplaceable { vertices, why },
        })
    }

    fn place_inner(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        owner: &Principal,
        s: Submission,
    ) -> Result<Response, (usize, String)> {
        for b in &s.modules {
            self.modules.put(b.clone());
        }
        for (component, hash) in &s.components {
            if !self.modules.has(hash) {
                return Ok(fail(
                    FailureKind::Input,
                    format!("module {hash} of component '{component}' was not sent"),
                ));
            }
        }
        let codecs = shared.node.queues.codecs().clone();
        let topology =
            match crate::node::parse_topology(&s.topology_file, &s.topology, &s.queue, &codecs) {
                Ok(t) => t,
                Err(e) => return Ok(fail(FailureKind::Input, e)),
            };
        if topology.vertices.is_empty() {
            return Ok(fail(
                FailureKind::Input,
                format!("{}: no vertices", s.topology_file),
            ));
        }
        for v in &topology.vertices {
            if !s.components.contains_key(&v.component) {
                return Ok(fail(
                    FailureKind::Input,
                    format!(
                        "{}:{}: component '{}' of vertex '{}' has no module in the profile",
                        s.topology_file, v.line, v.component, v.name
                    ),
                ));
            }
        }
        if let Err(e) = crate::node::limits(&s.limits) {
            return Ok(fail(FailureKind::Input, e));
        }
        // The policy enforcement point: nothing is reserved or woken for a denied job.
        let mut hold = match self.authorize(shared, owner, &s, topology.vertices.len()) {
            Ok(h) => h,
            Err(why) => {
                tracing::info!(job = %s.name, owner = %owner, %why, "job refused by policy");
                return Ok(fail(
                    FailureKind::Refused,
                    format!("job {}: refused by policy: {why}", s.name),
                ));
            }
        };
        let rank = match s.requirements.rank.as_deref() {
            Some(r) => match Rank::parse(r) {
                Ok(r) => r,
                Err(e) => return Ok(fail(FailureKind::Input, e)),
            },
            None => Rank::default_rank(),
        };
        // Schedule under the node table's lock, and reserve the slots.
        let n = topology.vertices.len();
        let (peers, placement) = {
            let mut nodes = self.nodes.lock();
            let mut live: Vec<(&PeerId, &NodeEntry)> =
                nodes.iter().filter(|(_, e)| !e.lost).collect();
            live.sort_by(|a, b| a.1.info.name.cmp(&b.1.info.name).then(a.0.cmp(b.0)));
            if live.is_empty() {
                return Ok(fail(
                    FailureKind::Unavailable,
                    "no node has registered with this super-peer",
                ));
            }
            let cands: Vec<Candidate> = live
                .iter()
                .map(|(_, e)| Candidate {
                    name: e.info.name.clone(),
                    cpus: e.info.cpus,
                    memory_bytes: e.info.memory_bytes,
                    free_memory_bytes: e.info.load.free_memory_bytes,
                    load: e.info.load.load,
                    arch: e.info.arch.clone(),
                    images: e.info.images.clone(),
                    slots: e.info.slots,
                    free_slots: e.info.slots.saturating_sub(e.reserved),
                })
                .collect();
            let (ok, why) = schedule::filter(&cands, &s.requirements);
            if ok.is_empty() {
                return Err((
                    n,
                    format!(
                        "no node of group {} meets the job's requirements: {}",
                        shared.config.group,
                        why.join("; ")
                    ),
                ));
            }
            let order = rank.order(&cands, ok);
            let caps: Vec<u32> = order.iter().map(|&i| cands[i].free_slots).collect();
            let g = Graph {
                vertices: n,
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
            let max = s.requirements.nodes.map_or(usize::MAX, |m| m as usize);
            let placed = match schedule::place(&g, &caps, max) {
                Ok(p) => p,
                Err(e) => return Err((n, format!("group {}: {e}", shared.config.group))),
            };
            // Parts: the nodes used, in rank order; vertex → part index.
            let mut used: Vec<usize> = placed.clone();
            used.sort_unstable();
            used.dedup();
            let peers: Vec<PeerId> = used.iter().map(|&r| *live[order[r]].0).collect();
            let placement: Vec<u32> = placed
                .iter()
                .map(|r| u32::try_from(used.binary_search(r).unwrap_or(0)).unwrap_or(0))
                .collect();
            drop(live);
            for (i, p) in peers.iter().enumerate() {
                let count = placement.iter().filter(|&&x| x as usize == i).count();
                if let Some(e) = nodes.get_mut(p) {
                    e.reserved += u32::try_from(count).unwrap_or(u32::MAX);
                }
            }
            (peers, placement)
        };
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}-{seq:x}", sanitize(&s.name));
        let parts: Vec<Part> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| Part {
                peer: *p,
                vertices: topology
                    .vertices
                    .iter()
                    .zip(&placement)
                    .filter(|(_, x)| **x as usize == i)
                    .map(|(v, _)| v.name.clone())
                    .collect(),
                done: false,
            })
            .collect();
        let (changed, _) = watch::channel((0, false));
        // From here the job holds the owner's resources until it ends.
        let Some(facts) = hold.facts.take() else {
            return Ok(fail(
                FailureKind::Failed,
                "the job's resources were not held",
            ));
        };
        let mut job = Job {
            status: JobStatus {
                job: id.clone(),
                name: s.name.clone(),
                state: JobState::Preparing,
                version: 0,
                vertices: u32::try_from(n).unwrap_or(u32::MAX),
                vertices_done: 0,
                parts: Vec::new(),
                outputs: Vec::new(),
                traffic: Vec::new(),
                wall_ms: 0,
                error: None,
                broker_addrs: Vec::new(),
            },
            parts,
            started: Instant::now(),
            changed,
            traffic: BTreeMap::new(),
            owner: owner.clone(),
            facts,
        };
        job.bump();
        let status = self.named(job.status.clone());
        self.jobs.lock().insert(id.clone(), job);
        let members: Vec<Member> = {
            let nodes = self.nodes.lock();
            peers
                .iter()
                .map(|p| Member {
                    peer: p.to_string(),
                    addrs: nodes
                        .get(p)
                        .map(|e| e.info.addrs.clone())
                        .unwrap_or_default(),
                    eligible: false,
                })
                .collect()
        };
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
        let policy_digest = shared.policies.current().digest.clone();
        let specs: Vec<(PeerId, PartSpec)> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let components = topology
                    .vertices
                    .iter()
                    .zip(&placement)
                    .filter(|(_, x)| **x as usize == i)
                    .filter_map(|(v, _)| {
                        s.components
                            .get(&v.component)
                            .map(|h| (v.component.clone(), h.clone()))
                    })
                    .collect();
                (
                    *p,
                    PartSpec {
                        job: id.clone(),
                        topology_file: s.topology_file.clone(),
                        topology: s.topology.clone(),
                        queue: s.queue.clone(),
                        components,
                        parameters: s.parameters.clone(),
                        limits: s.limits.clone(),
                        placement: placement.clone(),
                        parts: members.clone(),
                        here: u32::try_from(i).unwrap_or(0),
                        start: peers.len() == 1,
                        environment: environment.clone(),
                        owner: owner.clone(),
                        policy_digest: policy_digest.clone(),
                    },
                )
            })
            .collect();
        let broker = self.clone();
        let shared = shared.clone();
        tokio::spawn(async move { broker.drive(&shared, id, specs).await });
        Ok(Response::Submitted(status))
    }

    /// Wakes the parts: prepare everywhere (concurrently), then start everywhere.
    async fn drive(
        self: Arc<Self>,
        shared: &Arc<Shared>,
        id: String,
        specs: Vec<(PeerId, PartSpec)>,
    ) {
        let addrs = |p: &PeerId| {
            self.nodes
                .lock()
                .get(p)
                .map(|e| e.addrs.clone())
                .unwrap_or_default()
        };
        let prepares = specs.into_iter().map(|(peer, spec)| {
            let a = addrs(&peer);
            let shared = shared.clone();
            async move {
                (
                    peer,
                    shared
                        .call(peer, &a, Request::Prepare(Box::new(spec)))
                        .await,
                )
            }
        });
        let results = futures::future::join_all(prepares).await;
        let peers: Vec<PeerId> = results.iter().map(|(p, _)| *p).collect();
        // Parts that ended within the node's hold answered with their report.
        let mut finished = Vec::new();
        let mut refused = None;
        for (peer, r) in results {
            match r {
                Ok(Response::Finished(report)) => finished.push((peer, *report)),
                Ok(_) => {}
                Err(f) => {
                    refused.get_or_insert((peer, f));
                }
            }
        }
        if let Some((peer, f)) = refused {
            let state = if f.kind == FailureKind::Refused {
                JobState::Refused
            } else {
                JobState::Failed
            };
            self.end(
                shared,
                &id,
                state,
                Some(format!("node {peer}: {}", f.message)),
            );
            return;
        }
        // Preparing → running, in one step under the lock: a one-part job may already have
        // reported its end, and a cancel may have come in; a final state is never overwritten.
        let mut running = false;
        self.update(&id, |j| {
            if j.status.state == JobState::Preparing {
                j.status.state = JobState::Running;
                running = true;
            }
        });
        for (peer, report) in finished {
            self.report(shared, peer, report);
        }
        if !running {
            return;
        }
        if peers.len() == 1 {
            return; // a single part started when it was prepared
        }
        let starts = peers.iter().map(|peer| {
            let shared = shared.clone();
            let job = id.clone();
            let peer = *peer;
            async move { (peer, shared.call(peer, &[], Request::Start { job }).await) }
        });
        for (peer, r) in futures::future::join_all(starts).await {
            if let Err(f) = r {
                self.end(
                    shared,
                    &id,
                    JobState::Failed,
                    Some(format!("node {peer}: {}", f.message)),
                );
                return;
            }
        }
    }

    fn state(&self, id: &str) -> Option<JobState> {
        self.jobs.lock().get(id).map(|j| j.status.state)
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Job)) {
        if let Some(j) = self.jobs.lock().get_mut(id) {
            f(j);
            j.bump();
        }
    }

    /// Ends a job (once): sets its final state, releases its slots, and broadcasts termination
    /// to every part.
    fn end(&self, shared: &Arc<Shared>, id: &str, state: JobState, error: Option<String>) {
        let peers = {
            let mut jobs = self.jobs.lock();
            let Some(j) = jobs.get_mut(id) else { return };
            if j.status.state.is_final() {
                return;
            }
            j.status.state = state;
            j.status.error = error;
            self.hold(&j.owner, &j.facts, -1);
            if state != JobState::Done {
                j.status.outputs.clear();
            }
            j.bump();
            let mut nodes = self.nodes.lock();
            for p in &j.parts {
                if let Some(e) = nodes.get_mut(&p.peer) {
                    e.reserved = e
                        .reserved
                        .saturating_sub(u32::try_from(p.vertices.len()).unwrap_or(u32::MAX));
                }
            }
            // Parts that reported success have already removed everything.
            j.parts
                .iter()
                .filter(|p| !p.done)
                .map(|p| p.peer)
                .collect::<Vec<_>>()
        };
        {
            let mut ended = self.ended.lock();
            ended.push_back(id.to_owned());
            if ended.len() > KEEP_ENDED
                && let Some(old) = ended.pop_front()
            {
                self.jobs.lock().remove(&old);
            }
        }
        let reason = format!("{state:?}");
        for peer in peers {
            let shared = shared.clone();
            let job = id.to_owned();
            let reason = reason.clone();
            tokio::spawn(async move {
                if let Err(e) = shared
                    .call(peer, &[], Request::Terminate { job, reason })
                    .await
                {
                    tracing::debug!(%peer, error = %e, "terminate not delivered");
                }
            });
        }
    }

    /// A node's report of its part.
    pub(crate) fn report(&self, shared: &Arc<Shared>, peer: PeerId, r: PartReport) -> Response {
        let mut failed = None;
        let mut all_done = false;
        {
            let mut jobs = self.jobs.lock();
            let Some(j) = jobs.get_mut(&r.job) else {
                return fail(FailureKind::NotFound, format!("no job {}", r.job));
            };
            let Some(part) = j.parts.iter_mut().find(|p| p.peer == peer) else {
                return fail(
                    FailureKind::Refused,
                    format!("{peer} runs no part of {}", r.job),
                );
            };
            if j.status.state.is_final() || part.done {
                return Response::Ok;
            }
            match r.outcome {
                Ok(res) => {
                    part.done = true;
                    j.status.outputs.extend(res.outputs);
                    for t in res.traffic {
                        let key = (t.kind, t.codec, t.remote, t.direct);
                        let e = j.traffic.entry(key).or_default();
                        e.0 += t.items;
                        e.1 += t.bytes;
                    }
                    all_done = j.parts.iter().all(|p| p.done);
                    j.bump();
                }
                Err(f) => {
                    let state = if f.denied {
                        JobState::Refused
                    } else {
                        JobState::Failed
                    };
                    let what = if f.vertex.is_empty() {
                        f.cause
                    } else {
                        format!("vertex '{}': {}", f.vertex, f.cause)
                    };
                    failed = Some((state, format!("node {peer}: {what}")));
                }
            }
        }
        if let Some((state, why)) = failed {
            self.end(shared, &r.job, state, Some(why));
        } else if all_done {
            self.end(shared, &r.job, JobState::Done, None);
        }
        Response::Ok
    }

    /// Adds node names to a status.
    fn named(&self, mut s: JobStatus) -> JobStatus {
        let nodes = self.nodes.lock();
        for p in &mut s.parts {
            if let Some(e) = p.node.parse::<PeerId>().ok().and_then(|id| nodes.get(&id)) {
                p.name = e.info.name.clone();
            }
        }
        s
    }

    pub(crate) fn status(&self, shared: &Shared, who: &Principal, job: Option<&str>) -> Response {
        if let Some(id) = job
            && let Some(r) = self.refusal(shared, who, "read-results", id)
        {
            return r;
        }
        let engine = shared.policies.current().engine.clone();
        let list: Vec<JobStatus> = {
            let jobs = self.jobs.lock();
            match job {
                Some(id) => match jobs.get(id) {
                    Some(j) => vec![j.status.clone()],
                    None => return fail(FailureKind::NotFound, format!("no job {id}")),
                },
                None => {
                    // Every job the asker may read.
                    let mut v: Vec<JobStatus> = jobs
                        .values()
                        .filter(|j| {
                            engine
                                .decide(&Question {
                                    actor: who.clone(),
                                    action: "read-results".into(),
                                    resource: Resource::Job(j.facts.clone()),
                                })
                                .allowed()
                        })
                        .map(|j| j.status.clone())
                        .collect();
                    v.sort_by(|a, b| a.job.cmp(&b.job));
                    v
                }
            }
        };
        Response::Status(list.into_iter().map(|s| self.named(s)).collect())
    }

    /// Waits until the job's version passes `after` (or, with `until_end`, until it has ended),
    /// at most `max`, then its status.
    pub(crate) async fn wait(
        &self,
        job: &str,
        after: u64,
        until_end: bool,
        max: Duration,
    ) -> Response {
        let rx = match self.jobs.lock().get(job) {
            Some(j) => j.changed.subscribe(),
            None => return fail(FailureKind::NotFound, format!("no job {job}")),
        };
        let mut rx = rx;
        let ready = |&(version, ended): &(u64, bool)| version > after && (!until_end || ended);
        let _ = tokio::time::timeout(max, rx.wait_for(ready)).await;
        let status = self.jobs.lock().get(job).map(|j| j.status.clone());
        match status {
            Some(st) => Response::Status(vec![self.named(st)]),
            None => fail(FailureKind::NotFound, format!("no job {job}")),
        }
    }

    /// The answer to a waiting submission: the job's status once it has ended, or after
    /// [`SUBMIT_HOLD`]. A job forwarded to another group is answered at once (the client
    /// follows it there).
    async fn held(&self, st: JobStatus) -> Response {
        // A job not kept here (forwarded) has no status to wait for: `NotFound`, answered as is.
        match self.wait(&st.job, 0, true, SUBMIT_HOLD).await {
            Response::Status(mut v) if v.len() == 1 => Response::Submitted(v.remove(0)),
            _ => Response::Submitted(st),
        }
    }

    pub(crate) fn cancel(&self, shared: &Arc<Shared>, job: &str) -> Response {
        match self.state(job) {
            None => fail(FailureKind::NotFound, format!("no job {job}")),
            Some(s) if s.is_final() => fail(
                FailureKind::Input,
                format!("job {job} has already ended ({s:?})"),
            ),
            Some(_) => {
                self.end(shared, job, JobState::Cancelled, Some("cancelled".into()));
                Response::Ok
            }
        }
    }

    /// Dispatches a broker request.
    pub(crate) async fn handle(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        peer: PeerId,
        who: &Principal,
        request: Request,
    ) -> Response {
        let node_only = matches!(
            request,
            Request::Heartbeat(_) | Request::Fetch { .. } | Request::Report(_)
        );
        if node_only && (who.kind != PrincipalKind::Node || who.domain != shared.config.domain) {
            return fail(
                FailureKind::Refused,
                format!("{who} is not a node of domain {}", shared.config.domain),
            );
        }
        match request {
            Request::Missing { hashes } => self.missing(&hashes),
            Request::Submit(s) => {
                let wait = s.wait;
                match self.submit(shared, who, *s).await {
                    Response::Submitted(st) if wait && !st.state.is_final() => self.held(st).await,
                    r => r,
                }
            }
            Request::Status { job } => self.status(shared, who, job.as_deref()),
            Request::Wait {
                job,
                after,
                until_end,
            } => {
                if let Some(r) = self.refusal(shared, who, "read-results", &job) {
                    return r;
                }
                self.wait(&job, after, until_end, SUBMIT_HOLD).await
            }
            Request::Cancel { job } => match self.refusal(shared, who, "cancel", &job) {
                None => self.cancel(shared, &job),
                Some(r) => r,
            },
            Request::Register(info) => {
                self.register(shared, peer, who, info, shared.config.heartbeat)
            }
            Request::Heartbeat(load) => self.heartbeat(peer, load),
            Request::Fetch { hash } => self.fetch(&hash),
            Request::Report(r) => self.report(shared, peer, *r),
            Request::Group => Response::Group(self.group(shared)),
            Request::Prepare(_)
            | Request::Start { .. }
            | Request::Terminate { .. }
            | Request::Raft(_)
            | Request::Hello { .. }
            | Request::Policy { .. }
            | Request::PolicyReload => fail(FailureKind::Input, "not a broker request"),
        }
    }
}

/// Whether a job was placed here (or refused for bad input), or cannot be placed here.
enum Placed {
    Job(Response),
    Unplaceable { vertices: usize, why: String },
}

/// A job name made safe for a job id.
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if s.is_empty() { "job".into() } else { s }
}

/// Who owns a submitted job: the user who sends it, or the user a forwarding super-peer
/// authenticated. The profile's owner and domain, when given, must be the certificate's.
fn owner_of(caller: &Principal, s: &Submission) -> Result<Principal, String> {
    match caller.kind {
        PrincipalKind::User => {
            if s.on_behalf.is_some() {
                return Err(format!(
                    "{caller} is not a super-peer; only super-peers forward jobs"
                ));
            }
            let claims_other = s.owner.as_ref().is_some_and(|o| *o != caller.name)
                || s.domain.as_ref().is_some_and(|d| *d != caller.domain);
            if claims_other {
                return Err(format!(
                    "the profile names owner {}@{}, but the certificate is {caller}",
                    s.owner.as_deref().unwrap_or(&caller.name),
                    s.domain.as_deref().unwrap_or(&caller.domain)
                ));
            }
            Ok(caller.clone())
        }
        PrincipalKind::Node => match &s.on_behalf {
            Some(owner) if s.hops > 0 && caller.roles.iter().any(|r| r == "superpeer") => {
                Ok(owner.clone())
            }
            _ => Err(format!(
                "{caller} submits no jobs of its own (a super-peer, with role superpeer, \
                 forwards a user's job)"
            )),
        },
    }
}

/// Whether the inter-domain policy lets `owner` submit to group `g` of another domain (that
/// group's super-peer decides by its domain's policy in turn).
fn inter_domain_allows(shared: &Shared, owner: &Principal, g: &GroupSummary) -> bool {
    shared
        .policies
        .current()
        .engine
        .inter_domain(&Question {
            actor: owner.clone(),
            action: "submit".into(),
            resource: Resource::Group(pol::Group {
                name: g.group.clone(),
                domain: g.domain.clone(),
            }),
        })
        .allowed()
}
