//! The broker's side of its group: nodes' registrations and heartbeats (taken by the
//! [`Members`](super::members::Members) machine), the replicas nodes fall back on, and what the
//! group looks like to its nodes, its clients and the other groups.

use std::time::Instant;

use libp2p::{Multiaddr, PeerId};
use mvm_component::policy::{Principal, PrincipalKind};

use super::members::{Effect, Input, Names};
use super::{Broker, fail};
use crate::proto::{
    FailureKind, GroupInfo, GroupSummary, JobState, Member, NodeInfo, NodeLoad, NodeView, Response,
};

/// The replicas as members, with the leader and membership index they were made for.
pub(super) type ReplicaList = ((Option<PeerId>, Option<u64>), Vec<Member>);

impl Broker {
    /// Gives `input` to the membership machine, now.
    pub(super) fn members_on(&self, input: Input) -> Vec<Effect> {
        self.members.lock().on(Instant::now(), input)
    }

    /// Vertex slots free on `node` now: its slots less what the log and placements under way
    /// hold there.
    pub(super) fn free_slots(&self, peer: &PeerId, slots: u32) -> u32 {
        let logged = self.log.read(|s| s.reserved(peer));
        let inflight = self.inflight.lock().slots.get(peer).copied().unwrap_or(0);
        slots.saturating_sub(logged).saturating_sub(inflight)
    }

    /// This group's summary, for the other super-peers.
    pub(crate) fn summary(&self) -> GroupSummary {
        let live: Vec<(PeerId, u32, Vec<String>, String)> = self
            .members
            .lock()
            .live()
            .map(|(p, n)| (*p, n.info.slots, n.info.images.clone(), n.info.arch.clone()))
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
            broker: self.site.net.peer().to_string(),
            addrs: self.site.net.dial_addrs(),
            nodes: u32::try_from(live.len()).unwrap_or(u32::MAX),
            free_slots: live.iter().map(|n| self.free_slots(&n.0, n.1)).sum(),
            images,
            archs,
        }
    }

    /// Takes another super-peer's summary (already validated).
    pub(crate) fn learn(&self, s: GroupSummary) {
        if s.broker != self.site.net.peer().to_string() {
            self.members_on(Input::Heard(s));
        }
    }

    /// The other groups heard from recently.
    pub(super) fn groups(&self) -> Vec<GroupSummary> {
        let me = self.site.net.peer().to_string();
        self.members.lock().groups(Instant::now(), &me)
    }

    /// The log's replicas, the leader first: where a node looks for the broker when it loses
    /// this one.
    /// Kept while the leader and the membership stay the same: every heartbeat's answer
    /// carries it, and making it parses and prints every replica's peer id and addresses.
    pub(super) fn replicas(&self) -> Vec<Member> {
        let key = (self.log.leader(), self.log.membership_index());
        if let Some((k, m)) = &*self.replicas_made.lock()
            && *k == key
        {
            return m.clone();
        }
        let leader = key.0.map(|p| p.to_string());
        let mut m: Vec<Member> = self
            .log
            .replicas()
            .into_iter()
            .map(|r| {
                let addrs = r
                    .multiaddrs()
                    .iter()
                    .filter_map(|a| r.peer_id().ok().map(|p| crate::net::with_peer(a, p)))
                    .map(|a| a.to_string())
                    .collect();
                Member {
                    peer: r.peer,
                    addrs,
                    eligible: true,
                }
            })
            .collect();
        m.sort_by_key(|x| Some(&x.peer) != leader.as_ref());
        *self.replicas_made.lock() = Some((key, m.clone()));
        m
    }

    /// A node's registration: only with a node certificate of its own name and of the group's
    /// domain.
    pub(super) fn register(&self, peer: PeerId, who: &Principal, info: NodeInfo) -> Response {
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
        self.members_on(Input::Register { peer, info });
        Response::Registered {
            heartbeat_ms: u64::try_from(self.site.heartbeat.as_millis()).unwrap_or(1000),
            members: self.replicas(),
        }
    }

    /// A node's heartbeat: its load, and the jobs it runs parts of. The answer names those of
    /// them that the log has ended or never recorded, for the node to stop.
    pub(super) fn heartbeat(&self, peer: PeerId, load: NodeLoad) -> Response {
        // Jobs being recorded first, then the log: a job leaves `driving` only once the log
        // holds it, so none is taken for unknown on its way in.
        let stop: Vec<String> = {
            let settled: Vec<&String> = {
                let driving = self.driving.lock();
                load.jobs.iter().filter(|j| !driving.contains(*j)).collect()
            };
            self.log.read(|s| {
                settled
                    .into_iter()
                    .filter(|j| s.job(j).is_none_or(|r| r.state.is_final()))
                    .cloned()
                    .collect()
            })
        };
        let unlisted = self.unlisted(peer, &load.jobs);
        let effects = self.members_on(Input::Heartbeat {
            peer,
            load,
            unlisted,
        });
        Response::Heartbeat {
            known: !effects.contains(&Effect::Unknown(peer)),
            members: self.replicas(),
            stop,
        }
    }

    /// The running jobs the log places on `peer` that are not in `listed` (the jobs the node
    /// says it holds), leaving out those being prepared.
    fn unlisted(&self, peer: PeerId, listed: &[String]) -> Vec<String> {
        let placed: Vec<String> = self.log.read(|s| {
            s.placed_on(&peer)
                .filter(|j| {
                    j.state == JobState::Running
                        && j.parts.iter().any(|p| p.node == peer && !p.done)
                        && !listed.contains(&j.id)
                })
                .map(|j| j.id.clone())
                .collect()
        });
        if placed.is_empty() {
            return placed;
        }
        let driving = self.driving.lock();
        placed
            .into_iter()
            .filter(|j| !driving.contains(j))
            .collect()
    }

    /// The group as this replica sees it: the leader, every node, the other groups.
    pub(crate) fn group(&self) -> GroupInfo {
        let mut views: Vec<NodeView> = {
            let members = self.members.lock();
            self.log.read(|s| {
                members
                    .all()
                    .map(|(p, n)| NodeView {
                        peer: p.to_string(),
                        name: n.info.name.clone(),
                        lost: n.lost,
                        vertices: s.reserved(p),
                        running: n.info.load.vertices,
                        slots: n.info.slots,
                    })
                    .collect()
            })
        };
        views.sort_by(|a, b| a.name.cmp(&b.name));
        GroupInfo {
            nodes: views,
            groups: self.groups(),
            ..self.leader_view()
        }
    }

    /// Which replica leads, as this one knows it, and where it is; no nodes, no groups.
    pub(crate) fn leader_view(&self) -> GroupInfo {
        let leader = self.log.leader();
        let me = self.site.net.peer();
        GroupInfo {
            group: self.site.group.clone(),
            broker: leader.map(|p| p.to_string()),
            broker_addrs: if leader == Some(me) {
                self.site.net.dial_addrs()
            } else {
                let leader = leader.map(|l| l.to_string());
                self.replicas()
                    .into_iter()
                    .find(|m| Some(&m.peer) == leader.as_ref())
                    .map(|m| m.addrs)
                    .unwrap_or_default()
            },
            is_broker: leader == Some(me),
            nodes: Vec::new(),
            groups: Vec::new(),
        }
    }

    /// Registered nodes' peer ids as text and names, for statuses.
    pub(super) fn names(&self) -> Names {
        self.members.lock().names()
    }

    /// A registered node as the parts of a job name it.
    pub(super) fn member(&self, peer: &PeerId) -> Member {
        self.members.lock().member(peer)
    }

    /// A node as errors name it: `n0 (12D3…)`, or its peer id alone when not registered.
    pub(super) fn label(&self, peer: &PeerId) -> String {
        self.members.lock().label(peer)
    }

    /// A registered node's addresses.
    pub(super) fn addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.members.lock().addrs(peer)
    }
}
