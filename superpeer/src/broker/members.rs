//! The group's members as the leading broker hears them, as a state machine: registrations,
//! heartbeats, summaries of other groups and the passing of time go in ([`Input`]); nodes lost
//! and parts gone from their nodes come out ([`Effect`]). It reads no clock, takes no lock and
//! does no I/O: the broker gives it the time with each input and acts on what comes out, and a
//! test can run an hour of heartbeats in a microsecond.
//!
//! This is soft state: a new leader learns it anew from the nodes' registrations.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};

use crate::proto::{GroupSummary, JobId, Member, NodeInfo, NodeLoad};

/// How many times `lost_after` a new leader waits for a node that holds parts to register.
/// Before it can register, such a node must notice that its super-peer is gone and find the new
/// leader, which may not have been elected yet when it first looks (Nomad's
/// `failover_heartbeat_ttl` serves the same end).
pub(super) const TAKEOVER_GRACE: u32 = 4;

/// How long a group summary stays valid without being heard again.
pub(super) const SUMMARY_TTL: Duration = Duration::from_secs(5);

/// Registered nodes' names.
pub(super) type Names = HashMap<PeerId, String>;

/// A registered node.
pub(super) struct NodeEntry {
    pub(super) info: NodeInfo,
    pub(super) addrs: Vec<Multiaddr>,
    /// How the parts of a job name it to each other (its peer id and addresses as text, made
    /// once: base58 and address formatting cost more than the rest of a small job's spec).
    pub(super) member: Member,
    /// Its last registration or heartbeat.
    pub(super) last_seen: Instant,
    pub(super) lost: bool,
    /// Running jobs placed here that the node did not list at its heartbeats, and since when.
    missing: HashMap<JobId, Instant>,
    /// The latest sample of each of its probes.
    pub(super) probes: super::monitor::Probes,
}

/// What happens to the membership.
#[derive(Debug)]
pub(super) enum Input {
    /// A node has registered (its certificate already checked against its name and domain).
    Register { peer: PeerId, info: Box<NodeInfo> },
    /// A node's heartbeat, with the running jobs the log places on it that it did not list
    /// (leaving out jobs still being prepared).
    Heartbeat {
        peer: PeerId,
        load: NodeLoad,
        unlisted: Vec<JobId>,
    },
    /// This broker has taken the lead; the log names `holding` as the nodes that hold parts.
    TookOver { holding: Vec<PeerId> },
    /// Another group's summary, from its super-peer (already checked).
    Heard(GroupSummary),
    /// Time has passed.
    Tick,
}

/// What the broker must act on.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Effect {
    /// A heartbeat from a node that is not registered (or was lost): it must register again.
    Unknown(PeerId),
    /// A node silent for longer than `lost_after`, or one that held parts and did not register
    /// with this leader within [`TAKEOVER_GRACE`] times that: the parts it holds fail, and its
    /// connections close. `name` is `None` for a node that never registered here.
    Lost { peer: PeerId, name: Option<String> },
    /// A running part that its node has not listed at its heartbeats for `lost_after` (a node
    /// restarted within `lost_after` registers again, alive, without the parts it ran): its
    /// job fails.
    Vanished {
        job: JobId,
        peer: PeerId,
        name: String,
    },
}

/// The group's nodes and the other groups, as the leader hears them.
pub(super) struct Members {
    nodes: HashMap<PeerId, NodeEntry>,
    /// Nodes that hold parts and have not registered since this broker took the lead, and
    /// since when it waits for them.
    expected: HashMap<PeerId, Instant>,
    /// Other groups' summaries, by super-peer, with when they were heard.
    groups: HashMap<PeerId, (GroupSummary, Instant)>,
    lost_after: Duration,
}

impl Members {
    /// No members yet; a node silent for `lost_after` is lost.
    pub(super) fn new(lost_after: Duration) -> Members {
        Members {
            nodes: HashMap::new(),
            expected: HashMap::new(),
            groups: HashMap::new(),
            lost_after,
        }
    }

    /// Takes `input` at `now`.
    pub(super) fn on(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        match input {
            Input::Register { peer, info } => {
                self.register(now, peer, *info);
                Vec::new()
            }
            Input::Heartbeat {
                peer,
                load,
                unlisted,
            } => self.heartbeat(now, peer, load, unlisted),
            Input::TookOver { holding } => {
                for n in holding {
                    if self.nodes.get(&n).is_none_or(|e| e.lost) {
                        self.expected.insert(n, now);
                    }
                }
                Vec::new()
            }
            Input::Heard(s) => {
                self.groups.insert(s.broker, (s, now));
                Vec::new()
            }
            Input::Tick => self.tick(now),
        }
    }

    fn register(&mut self, now: Instant, peer: PeerId, mut info: NodeInfo) {
        let mut probes = super::monitor::Probes::default();
        probes.put(now, std::mem::take(&mut info.load.probes));
        let addrs = info.addrs.clone();
        self.expected.remove(&peer);
        let member = Member {
            peer,
            addrs: addrs.clone(),
            eligible: false,
        };
        let entry = NodeEntry {
            info,
            addrs,
            member,
            last_seen: now,
            lost: false,
            missing: HashMap::new(),
            probes,
        };
        self.nodes.insert(peer, entry);
    }

    fn heartbeat(
        &mut self,
        now: Instant,
        peer: PeerId,
        load: NodeLoad,
        unlisted: Vec<JobId>,
    ) -> Vec<Effect> {
        let Some(n) = self.nodes.get_mut(&peer).filter(|n| !n.lost) else {
            return vec![Effect::Unknown(peer)];
        };
        n.last_seen = now;
        n.missing.retain(|j, _| unlisted.contains(j));
        for j in unlisted {
            n.missing.entry(j).or_insert(now);
        }
        if !load.images.is_empty() {
            n.info.images.clone_from(&load.images);
        }
        let mut load = load;
        n.probes.put(now, std::mem::take(&mut load.probes));
        n.info.load = load;
        Vec::new()
    }

    fn tick(&mut self, now: Instant) -> Vec<Effect> {
        let lost_after = self.lost_after;
        let mut out = Vec::new();
        for (peer, n) in self.nodes.iter_mut().filter(|(_, n)| !n.lost) {
            n.probes.expire(now, lost_after);
            if now.saturating_duration_since(n.last_seen) > lost_after {
                n.lost = true;
                n.missing.clear();
                out.push(Effect::Lost {
                    peer: *peer,
                    name: Some(n.info.name.clone()),
                });
            }
        }
        self.expected.retain(|peer, since| {
            let out_of_time = now.saturating_duration_since(*since) > lost_after * TAKEOVER_GRACE;
            if out_of_time {
                out.push(Effect::Lost {
                    peer: *peer,
                    name: None,
                });
            }
            !out_of_time
        });
        for (peer, n) in self.nodes.iter_mut().filter(|(_, n)| !n.lost) {
            n.missing.retain(|job, since| {
                let gone = now.saturating_duration_since(*since) > lost_after;
                if gone {
                    out.push(Effect::Vanished {
                        job: job.clone(),
                        peer: *peer,
                        name: n.info.name.clone(),
                    });
                }
                !gone
            });
        }
        self.groups
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < SUMMARY_TTL);
        out
    }

    /// The nodes not lost.
    pub(super) fn live(&self) -> impl Iterator<Item = (&PeerId, &NodeEntry)> {
        self.nodes.iter().filter(|(_, n)| !n.lost)
    }

    /// Forgets a node (a guest torn down on purpose: not lost).
    pub(super) fn forget(&mut self, peer: &PeerId) {
        self.nodes.remove(peer);
        self.expected.remove(peer);
    }

    /// Registered node `peer`, lost or not.
    pub(super) fn get(&self, peer: &PeerId) -> Option<&NodeEntry> {
        self.nodes.get(peer)
    }

    /// Every registered node, lost or not.
    pub(super) fn all(&self) -> impl Iterator<Item = (&PeerId, &NodeEntry)> {
        self.nodes.iter()
    }

    /// The other groups heard from within [`SUMMARY_TTL`] of `now`, but not `me`, by name.
    pub(super) fn groups(&self, now: Instant, me: &PeerId) -> Vec<GroupSummary> {
        let mut v: Vec<GroupSummary> = self
            .groups
            .values()
            .filter(|(s, at)| s.broker != *me && now.saturating_duration_since(*at) < SUMMARY_TTL)
            .map(|(s, _)| s.clone())
            .collect();
        v.sort_by(|a, b| a.group.cmp(&b.group));
        v
    }

    /// A registered node as the parts of a job name it (see [`NodeEntry::member`]).
    pub(super) fn member(&self, peer: &PeerId) -> Member {
        self.nodes.get(peer).map_or_else(
            || Member {
                peer: *peer,
                addrs: Vec::new(),
                eligible: false,
            },
            |e| e.member.clone(),
        )
    }

    /// A node as errors name it: its name and peer id (`n0 (12D3…)`), or its peer id alone
    /// when it has not registered.
    pub(super) fn label(&self, peer: &PeerId) -> String {
        match self.nodes.get(peer) {
            Some(n) => format!("{} ({peer})", n.info.name),
            None => peer.to_string(),
        }
    }

    /// A registered node's name.
    pub(super) fn name(&self, peer: &PeerId) -> Option<&str> {
        self.nodes.get(peer).map(|n| n.info.name.as_str())
    }

    /// A registered node's warm guests of shape `key` free at its last heartbeat.
    pub(super) fn warm(&self, peer: &PeerId, key: &str) -> u32 {
        self.nodes
            .get(peer)
            .and_then(|n| n.info.load.warm.get(key).copied())
            .unwrap_or(0)
    }

    /// A registered node's addresses.
    pub(super) fn addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.nodes
            .get(peer)
            .map(|e| e.addrs.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
#[path = "members_tests.rs"]
mod tests;
