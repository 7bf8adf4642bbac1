//! Following the group's super-peer: registration, heartbeats with this node's load, and
//! finding the replica of the group's job log that leads when the one followed is lost.

use crate::proto::NodeRequest;
use std::sync::Arc;

use libp2p::{Multiaddr, PeerId};

use super::Node;
use crate::proto::{FailureKind, GroupInfo, NodeInfo, NodeLoad, Request, Response};

impl Node {
    /// Whether `peer` is a super-peer of this node's group: the one it follows, another
    /// replica of the group's job log it has heard of (the leader may have changed since), or
    /// this daemon.
    pub(crate) fn is_superpeer(&self, peer: PeerId) -> bool {
        peer == self.site.peer()
            || self
                .superpeer
                .read()
                .as_ref()
                .is_some_and(|(p, _)| *p == peer)
            || self
                .members
                .lock()
                .iter()
                .any(|m| m.peer == peer.to_string())
    }

    /// The group as this node knows it: which super-peer it follows.
    pub(crate) fn view(&self) -> GroupInfo {
        let sp = self.superpeer();
        GroupInfo {
            group: self.site.group.clone(),
            broker: sp.as_ref().map(|(p, _)| p.to_string()),
            broker_addrs: sp
                .map(|(p, a)| {
                    a.iter()
                        .map(|a| crate::net::with_peer(a, p).to_string())
                        .collect()
                })
                .unwrap_or_default(),
            is_broker: false,
            nodes: Vec::new(),
            groups: Vec::new(),
        }
    }

    /// This node's properties now.
    fn load(&self) -> NodeLoad {
        use mvm_os::probe::{FreeMemory, Load, Probe};
        let interval = self.site.heartbeat;
        let free = FreeMemory { interval }.sample().unwrap_or(0.0);
        let load = Load { interval }.sample().unwrap_or(0.0);
        NodeLoad {
            free_memory_bytes: free as u64,
            load,
            vertices: self.vertices(),
            images: self.images(),
            jobs: self.job_ids(),
        }
    }

    /// The image ids this node offers now: the configured ones and its repository's (read
    /// again each time, so that an image imported while the node runs is offered).
    fn images(&self) -> Vec<String> {
        let mut v = self.config.images.clone();
        if let Some(os) = &self.os {
            v.extend(os.images());
        }
        v
    }

    fn info(&self) -> NodeInfo {
        let load = self.load();
        NodeInfo {
            name: self.site.name.clone(),
            group: self.site.group.clone(),
            domain: self.site.domain.clone(),
            addrs: self.site.net.dial_addrs(),
            cpus: std::thread::available_parallelism()
                .map_or(1, |n| u32::try_from(n.get()).unwrap_or(1)),
            memory_bytes: mvm_os::probe::total_memory().unwrap_or(0),
            arch: std::env::consts::ARCH.to_owned(),
            images: load.images.clone(),
            slots: self.config.slots,
            eligible: self.config.eligible,
            load,
        }
    }

    /// Registers with the super-peer and sends heartbeats; registers again when the
    /// super-peer has forgotten this node. When the super-peer does not lead the group's job
    /// log (it says so) or has not answered for `lost_after`, the node looks for the replica
    /// that leads now (see [`Node::find_leader`]) and registers there; the parts it runs go
    /// on. Runs until the task is aborted.
    pub(crate) async fn follow(self: Arc<Self>) {
        let mut registered = false;
        let mut last_answer = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(self.site.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let lost_after = self.site.lost_after;
        loop {
            tick.tick().await;
            let Some((sp, addrs)) = self.superpeer() else {
                continue;
            };
            let request = if registered {
                Request::Node(NodeRequest::Heartbeat(self.load()))
            } else {
                Request::Node(NodeRequest::Register(self.info()))
            };
            // Any answer, even a refusal, shows the super-peer is alive; silence does not.
            // A request that fails at once (the connection is refused or closed: the process
            // is gone) sends the node looking for the leader now, not after `lost_after`.
            let mut refused = false;
            let answer = match tokio::time::timeout(
                lost_after,
                self.site.request(sp, &addrs, request),
            )
            .await
            {
                Ok(Ok(r)) => Some(r),
                Ok(Err(_)) => {
                    refused = true;
                    None
                }
                Err(_) => None,
            };
            let answered = answer.is_some();
            let mut elsewhere = refused && self.members.lock().len() > 1;
            match answer {
                Some(Response::Registered { members, .. }) => {
                    registered = true;
                    tracing::info!(superpeer = %sp, "registered");
                    *self.members.lock() = members;
                }
                Some(Response::Heartbeat {
                    known,
                    members,
                    stop,
                }) => {
                    registered = known;
                    for job in stop {
                        tracing::warn!(%job, "the leader has no such job running; stopping its part");
                        self.terminate(sp, &job, "unknown to the leader");
                    }
                    // A replica that does not lead lists the leader first.
                    elsewhere = !known && members.first().is_some_and(|m| m.peer != sp.to_string());
                    *self.members.lock() = members;
                }
                Some(Response::Error(f)) if f.kind == FailureKind::Unavailable => {
                    registered = false;
                    elsewhere = true;
                }
                Some(_) => registered = false,
                None => {
                    registered = false;
                    tracing::debug!(superpeer = %sp, "super-peer did not answer");
                }
            }
            if answered {
                last_answer = tokio::time::Instant::now();
            }
            if elsewhere || last_answer.elapsed() >= lost_after {
                if !elsewhere {
                    tracing::warn!(superpeer = %sp, "super-peer lost; looking for the group's leader");
                }
                if let Some(next) = self.find_leader().await
                    && next.0 != sp
                {
                    tracing::info!(superpeer = %next.0, "following the group's leader");
                    *self.superpeer.write() = Some(next);
                    registered = false;
                    last_answer = tokio::time::Instant::now();
                    tick.reset_immediately(); // register there now
                }
            }
        }
    }

    /// The replica of the group's job log that leads now, as the replicas this node knows of
    /// (from the last answers of its super-peer, then its bootstrap addresses) say: the first
    /// answer that comes as broker, or names one. All are asked at once, so a replica that is
    /// gone and does not refuse the connection costs no more than one `lost_after`.
    async fn find_leader(&self) -> Option<(PeerId, Vec<Multiaddr>)> {
        use futures::StreamExt as _;
        let mut known: Vec<String> = self
            .members
            .lock()
            .iter()
            .flat_map(|m| m.addrs.clone())
            .collect();
        known.extend(self.config.bootstrap.iter().cloned());
        let mut tried = std::collections::HashSet::new();
        let mut probes = futures::stream::FuturesUnordered::new();
        for a in known {
            let Ok((peer, addr)) = crate::net::split_peer(&a) else {
                continue;
            };
            if !tried.insert(peer) {
                continue;
            }
            probes.push(async move {
                let at = [addr.clone()];
                let probe = self.site.request(peer, &at, Request::Leader);
                let group = tokio::time::timeout(self.site.lost_after, probe)
                    .await
                    .ok()
                    .and_then(Result::ok);
                let Some(Response::Group(g)) = group else {
                    return None;
                };
                if g.is_broker {
                    return Some((peer, vec![addr]));
                }
                let (l, la) = g
                    .broker_addrs
                    .iter()
                    .find_map(|a| crate::net::split_peer(a).ok())?;
                (g.broker.as_deref() == Some(l.to_string().as_str())).then(|| (l, vec![la]))
            });
        }
        while let Some(answer) = probes.next().await {
            if answer.is_some() {
                return answer;
            }
        }
        None
    }
}
