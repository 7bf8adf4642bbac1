//! The broker's side of its group: nodes' registrations and heartbeats (taken by the
//! [`Members`](super::members::Members) machine), the replicas nodes fall back on, and what the
//! group looks like to its nodes, its clients and the other groups.

use std::time::Instant;

use libp2p::PeerId;
use mvm_component::policy::{Principal, PrincipalKind};
use parking_lot::Mutex;

use super::core::Core;
use super::fail;
use super::members::{Effect, Input};
use crate::joblog::JobLog;
use crate::proto::{
    FailureKind, GroupInfo, GroupSummary, HostPrice, JobId, JobState, Member, NodeInfo, NodeLoad,
    NodeView, Response,
};

/// The replicas as members, leader first, kept while the leader and the membership stay the
/// same: every heartbeat's answer carries it, and making it parses and prints every
/// replica's peer id and addresses.
#[derive(Default)]
pub(super) struct Replicas {
    made: Mutex<Option<(MadeFor, Vec<Member>)>>,
}

/// The leader and the membership index a list of replicas was made for.
type MadeFor = (Option<PeerId>, Option<u64>);

impl Replicas {
    /// The log's replicas, the leader first: where a node looks for the broker when it loses
    /// this one.
    pub(super) fn get(&self, log: &JobLog) -> Vec<Member> {
        let key = (log.leader(), log.membership_index());
        if let Some((k, m)) = &*self.made.lock()
            && *k == key
        {
            return m.clone();
        }
        let mut m: Vec<Member> = log
            .replicas()
            .into_iter()
            .filter_map(|r| {
                let peer = r.peer_id().ok()?;
                let addrs = r
                    .multiaddrs()
                    .iter()
                    .map(|a| crate::net::with_peer(a, peer))
                    .collect();
                Some(Member {
                    peer,
                    addrs,
                    eligible: true,
                })
            })
            .collect();
        m.sort_by_key(|x| Some(x.peer) != key.0);
        *self.made.lock() = Some((key, m.clone()));
        m
    }
}

impl Core {
    /// Vertex slots free on `node` now: its slots less what the log and placements under way
    /// hold there.
    pub(super) fn free_slots(&self, peer: &PeerId, slots: u32) -> u32 {
        let logged = self.log.read(|s| s.reserved(peer));
        slots
            .saturating_sub(logged)
            .saturating_sub(self.ledger.slots(peer))
    }

    /// This group's summary, for the other super-peers.
    pub(super) fn summary(&self) -> GroupSummary {
        let live: Vec<(PeerId, u32, Vec<String>, String)> = self
            .members
            .live()
            .map(|(p, n)| (*p, n.info.slots, n.info.images.clone(), n.info.arch.clone()))
            .collect();
        let hosts = self
            .members
            .live()
            .map(|(p, n)| HostPrice {
                name: n.info.name.clone(),
                cpus: n.info.cpus,
                price: n.info.load.price,
                bidders: u32::try_from(n.info.load.bidders.len()).unwrap_or(u32::MAX),
                free_slots: self.free_slots(p, n.info.slots),
                floor: n.info.load.floor,
            })
            .collect();
        let mut images: Vec<String> = live.iter().flat_map(|n| n.2.clone()).collect();
        images.sort();
        images.dedup();
        let mut archs: Vec<String> = live.iter().map(|n| n.3.clone()).collect();
        archs.sort();
        archs.dedup();
        GroupSummary {
            group: self.site.group.clone(),
            domain: self.site.domain.clone(),
            broker: self.site.net.peer(),
            addrs: self.site.net.dial_addrs(),
            nodes: u32::try_from(live.len()).unwrap_or(u32::MAX),
            free_slots: live.iter().map(|n| self.free_slots(&n.0, n.1)).sum(),
            images,
            archs,
            hosts,
            crl: self.site.net.trust().crl_number(&self.site.domain),
        }
    }

    /// A node's registration: only with a node certificate of its own name and of the group's
    /// domain.
    pub(super) fn register(
        &mut self,
        now: Instant,
        peer: PeerId,
        who: &Principal,
        info: NodeInfo,
    ) -> Response {
        if who.kind != PrincipalKind::Node
            || who.domain != self.site.domain
            || who.name != info.name
            || info.domain != who.domain
        {
            return fail(
                FailureKind::Refused,
                format!(
                    "{who} cannot join group {} of domain {} as node {}@{}: a node joins with \
                     a node certificate of its own name and of the group's domain",
                    self.site.group, self.site.domain, info.name, info.domain
                ),
            );
        }
        tracing::info!(%peer, name = %info.name, "node registered");
        self.view.names.lock().insert(peer, info.name.clone());
        self.members.on(
            now,
            Input::Register {
                peer,
                info: Box::new(info),
            },
        );
        Response::Registered {
            heartbeat_ms: u64::try_from(self.site.heartbeat.as_millis()).unwrap_or(1000),
            members: self.replicas(),
        }
    }

    /// A node's heartbeat: its load, and the jobs it runs parts of. The answer names those of
    /// them that the log has ended or never recorded, for the node to stop, and those whose
    /// run now has no part on the node (it holds a run given up), for it to stop that run.
    pub(super) fn heartbeat(
        &mut self,
        out: &mut Vec<super::core::Effect>,
        now: Instant,
        peer: PeerId,
        account: &str,
        mut load: NodeLoad,
    ) -> Response {
        let batches = std::mem::take(&mut load.charges);
        let (charged, broke) = self.charge(out, peer, account, batches, &load.bidders);
        // A job being driven is not yet (or only just) in the log: none is taken for unknown on
        // its way in.
        let stop: Vec<(JobId, u32)> = self.log.read(|s| {
            load.jobs
                .iter()
                .filter(|j| !self.drives.contains_key(*j))
                .filter_map(|j| match s.job(j) {
                    None => Some((j.clone(), u32::MAX)),
                    Some(r) if r.state.is_final() => Some((j.clone(), u32::MAX)),
                    Some(r) if r.attempt > 0 && !r.parts.iter().any(|p| p.node == peer) => {
                        Some((j.clone(), r.attempt - 1))
                    }
                    Some(_) => None,
                })
                .collect()
        });
        let unlisted = self.unlisted(peer, &load.jobs);
        let effects = self.members.on(
            now,
            Input::Heartbeat {
                peer,
                load,
                unlisted,
            },
        );
        Response::Heartbeat {
            known: !effects.contains(&Effect::Unknown(peer)),
            members: self.replicas(),
            stop,
            charged,
            broke,
        }
    }

    /// The running jobs the log places on `peer` that are not in `listed` (the jobs the node
    /// says it holds), leaving out those being prepared.
    fn unlisted(&self, peer: PeerId, listed: &[JobId]) -> Vec<JobId> {
        self.log.read(|s| {
            s.placed_on(&peer)
                .filter(|j| {
                    j.state == JobState::Running
                        && j.parts.iter().any(|p| p.node == peer && !p.done)
                        && !listed.contains(&j.id)
                        && !self.drives.contains_key(&j.id)
                })
                .map(|j| j.id.clone())
                .collect()
        })
    }

    /// The group as this replica sees it: the leader, every node, the other groups.
    pub(super) fn group(&self, now: Instant) -> GroupInfo {
        let mut views: Vec<NodeView> = {
            self.log.read(|s| {
                self.members
                    .all()
                    .map(|(p, n)| NodeView {
                        peer: *p,
                        name: n.info.name.clone(),
                        lost: n.lost,
                        vertices: s.reserved(p),
                        running: n.info.load.vertices,
                        slots: n.info.slots,
                        warm: n.info.load.warm.clone(),
                        cpus: n.info.cpus,
                        memory_bytes: n.info.memory_bytes,
                        free_memory_bytes: n.info.load.free_memory_bytes,
                        load: n.info.load.load,
                        queues: n.info.load.queues.clone(),
                        traffic: n.info.load.traffic.clone(),
                        probes: n.probes.samples(),
                        price: n.info.load.price,
                        bidders: u32::try_from(n.info.load.bidders.len()).unwrap_or(u32::MAX),
                        floor: n.info.load.floor,
                    })
                    .collect()
            })
        };
        views.sort_by(|a, b| a.name.cmp(&b.name));
        GroupInfo {
            nodes: views,
            groups: self.members.groups(now, &self.site.net.peer()),
            scheduling: Some(self.steering.view()),
            ..super::leader_view(&self.site, &self.log, &self.view.replicas)
        }
    }
}
