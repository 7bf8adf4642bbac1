//! The group's members as the leading broker hears them: registrations and heartbeats (soft
//! state, not in the job log), lost nodes, and the summaries exchanged with other groups.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use mvm_component::policy::{Principal, PrincipalKind};

use super::{Broker, TAKEOVER_GRACE, fail};
use crate::proto::{
    FailureKind, GroupInfo, GroupSummary, JobState, Member, NodeInfo, NodeLoad, NodeView, Response,
};

/// Registered nodes' peer ids as text, and names.
pub(super) type Names = HashMap<PeerId, (String, String)>;

/// A registered node.
pub(super) struct NodeEntry {
    pub(super) info: NodeInfo,
    pub(super) addrs: Vec<Multiaddr>,
    /// How the parts of a job name it to each other (its peer id and addresses as text, made
    /// once: base58 and address formatting cost more than the rest of a small job's spec).
    pub(super) member: Member,
    pub(super) last_seen: Instant,
    pub(super) lost: bool,
    /// Running jobs the log places here that the node did not list at its heartbeats, and
    /// since when (see [`Broker::vanished`]).
    pub(super) missing: HashMap<String, Instant>,
}

/// The replicas as members, with the leader and membership index they were made for.
pub(super) type ReplicaList = ((Option<PeerId>, Option<u64>), Vec<Member>);

/// How long a group summary stays valid without being heard again.
const SUMMARY_TTL: Duration = Duration::from_secs(5);

impl Broker {
    /// Vertex slots free on `node` now: its slots less what the log and placements under way
    /// hold there.
    pub(super) fn free_slots(&self, peer: &PeerId, slots: u32) -> u32 {
        let logged = self.log.read(|s| s.reserved(peer));
        let inflight = self.inflight.lock().slots.get(peer).copied().unwrap_or(0);
        slots.saturating_sub(logged).saturating_sub(inflight)
    }

    /// This group's summary, for the other super-peers.
    pub(crate) fn summary(&self) -> GroupSummary {
        let nodes = self.nodes.lock();
        let live: Vec<(&PeerId, &NodeEntry)> = nodes.iter().filter(|(_, n)| !n.lost).collect();
        let mut images: Vec<String> = live
            .iter()
            .flat_map(|(_, n)| n.info.images.clone())
            .collect();
        images.sort();
        images.dedup();
        let mut archs: Vec<String> = live.iter().map(|(_, n)| n.info.arch.clone()).collect();
        archs.sort();
        archs.dedup();
        GroupSummary {
            group: self.site.group.clone(),
            domain: self.site.domain.clone(),
            broker: self.site.net.peer().to_string(),
            addrs: self.site.net.dial_addrs(),
            nodes: u32::try_from(live.len()).unwrap_or(u32::MAX),
            free_slots: live
                .iter()
                .map(|(p, n)| self.free_slots(p, n.info.slots))
                .sum(),
            images,
            archs,
        }
    }

    /// Takes another super-peer's summary (already validated).
    pub(crate) fn learn(&self, s: GroupSummary) {
        if s.broker == self.site.net.peer().to_string() {
            return;
        }
        self.groups
            .lock()
            .insert(s.broker.clone(), (s, Instant::now()));
    }

    /// The other groups heard from recently.
    pub(super) fn groups(&self) -> Vec<GroupSummary> {
        let mut g = self.groups.lock();
        g.retain(|_, (_, at)| at.elapsed() < SUMMARY_TTL);
        let me = self.site.net.peer().to_string();
        let mut v: Vec<GroupSummary> = g
            .values()
            .map(|(s, _)| s.clone())
            .filter(|s| s.broker != me)
            .collect();
        v.sort_by(|a, b| a.group.cmp(&b.group));
        v
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
        let addrs: Vec<Multiaddr> = info.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        tracing::info!(%peer, name = %info.name, "node registered");
        self.expected.lock().remove(&peer);
        let member = Member {
            peer: peer.to_string(),
            addrs: addrs.iter().map(ToString::to_string).collect(),
            eligible: false,
        };
        self.nodes.lock().insert(
            peer,
            NodeEntry {
                info,
                addrs,
                member,
                last_seen: Instant::now(),
                lost: false,
                missing: HashMap::new(),
            },
        );
        Response::Registered {
            heartbeat_ms: u64::try_from(self.site.heartbeat.as_millis()).unwrap_or(1000),
            members: self.replicas(),
        }
    }

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
        let missing = self.unlisted(peer, &load.jobs);
        let known = {
            let mut nodes = self.nodes.lock();
            match nodes.get_mut(&peer) {
                Some(n) if !n.lost => {
                    n.last_seen = Instant::now();
                    n.missing.retain(|j, _| missing.contains(j));
                    for j in missing {
                        n.missing.entry(j).or_insert_with(Instant::now);
                    }
                    if !load.images.is_empty() {
                        n.info.images.clone_from(&load.images);
                    }
                    n.info.load = load;
                    true
                }
                _ => false,
            }
        };
        Response::Heartbeat {
            known,
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

    /// Parts gone from their nodes: running jobs that a node has not listed at its heartbeats
    /// for `lost_after` (a node restarted within `lost_after` registers again, alive, without
    /// the parts it ran; a part that ended is reported well within it). With the node's id and
    /// name.
    pub(super) fn vanished(&self, lost_after: Duration) -> Vec<(String, PeerId, String)> {
        let mut gone = Vec::new();
        for (peer, n) in self.nodes.lock().iter_mut().filter(|(_, n)| !n.lost) {
            n.missing.retain(|job, since| {
                let out = since.elapsed() > lost_after;
                if out {
                    gone.push((job.clone(), *peer, n.info.name.clone()));
                }
                !out
            });
        }
        gone
    }

    /// The group as this replica sees it: the leader, every node, the other groups.
    pub(crate) fn group(&self) -> GroupInfo {
        let mut views: Vec<NodeView> = {
            let nodes = self.nodes.lock();
            self.log.read(|s| {
                nodes
                    .iter()
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

    /// Nodes silent for longer than `lost_after`: marked lost, and the parts they held failed.
    /// A node that the log names as holding a part but that has not registered with this
    /// leader since it took over is given [`TAKEOVER_GRACE`] times as long: before it can
    /// register it must notice its super-peer is gone and find the new leader, which may not
    /// have been elected yet when it first looks (Nomad's `failover_heartbeat_ttl` serves the
    /// same end).
    pub(super) fn lost_nodes(&self, lost_after: Duration) -> Vec<(PeerId, String)> {
        let mut lost: Vec<(PeerId, String)> = {
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
        let mut expected = self.expected.lock();
        expected.retain(|p, since| {
            if since.elapsed() > lost_after * TAKEOVER_GRACE {
                lost.push((*p, String::from("(not registered since the takeover)")));
                false
            } else {
                true
            }
        });
        lost
    }

    /// Registered nodes' peer ids as text and names, for statuses.
    pub(super) fn names(&self) -> Names {
        self.nodes
            .lock()
            .iter()
            .map(|(p, n)| (*p, (n.member.peer.clone(), n.info.name.clone())))
            .collect()
    }

    /// A registered node as the parts of a job name it (see [`NodeEntry::member`]).
    pub(super) fn member(&self, peer: &PeerId) -> Member {
        self.nodes.lock().get(peer).map_or_else(
            || Member {
                peer: peer.to_string(),
                addrs: Vec::new(),
                eligible: false,
            },
            |e| e.member.clone(),
        )
    }

    /// A node as errors name it: its name and peer id (`n0 (12D3…)`), or its peer id alone
    /// when it has not registered.
    pub(super) fn label(&self, peer: &PeerId) -> String {
        match self.nodes.lock().get(peer) {
            Some(n) => format!("{} ({peer})", n.info.name),
            None => peer.to_string(),
        }
    }

    /// A registered node's addresses.
    pub(super) fn addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.nodes
            .lock()
            .get(peer)
            .map(|e| e.addrs.clone())
            .unwrap_or_default()
    }
}
