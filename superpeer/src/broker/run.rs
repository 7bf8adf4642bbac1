//! The broker's own loop: its tick (a change of leader, lost nodes, pending jobs) and the group
//! summaries it exchanges with other groups' super-peers.

use std::sync::Arc;

use libp2p::{Multiaddr, PeerId};

use super::Broker;
use crate::net::{GROUPS_TOPIC, Gossip};
use crate::proto::GroupSummary;

impl Broker {
    /// Runs the broker until the task is aborted: ticks every heartbeat; every second one, the
    /// leader publishes its group's summary and dials `peers` (other groups' super-peers,
    /// `/…/p2p/PEER`), and every summary heard from them is taken.
    pub(crate) async fn run(self: Arc<Self>, peers: Vec<String>) {
        let peers: Vec<(PeerId, Multiaddr)> = peers
            .iter()
            .filter_map(|p| match crate::net::split_peer(p) {
                Ok(x) => Some(x),
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a super-peer address");
                    None
                }
            })
            .collect();
        let mut gossip = self.site.net.take_gossip();
        let mut tick = tokio::time::interval(self.site.heartbeat);
        let mut round = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.tick().await;
                    round += 1;
                    if round.is_multiple_of(2) && self.log.is_leader() {
                        self.publish(&peers).await;
                    }
                }
                msg = async { gossip.as_mut()?.recv().await }, if gossip.is_some() => match msg {
                    Some(msg) => self.heard(&msg),
                    None => gossip = None,
                },
            }
        }
    }

    /// Keeps the other groups' super-peers connected and tells them this group's summary (only
    /// the leader speaks for the group).
    async fn publish(&self, peers: &[(PeerId, Multiaddr)]) {
        let net = &self.site.net;
        for (peer, addr) in peers {
            net.dial(*peer, vec![addr.clone()]).await;
            // Summaries count only from super-peers whose certificates have passed.
            if net.identity(peer).is_none() {
                let net = net.clone();
                let (peer, addr) = (*peer, addr.clone());
                self.tasks.lock().spawn(async move {
                    if let Err(e) = net.authenticate(peer, &[addr]).await {
                        tracing::warn!(%peer, error = %e, "a super-peer is not authenticated");
                    }
                });
            }
        }
        let mut data = Vec::new();
        if ciborium::into_writer(&self.summary(), &mut data).is_ok() {
            net.publish(GROUPS_TOPIC, data).await;
        }
    }

    /// Takes a group summary heard on the gossip topic: only from a super-peer whose
    /// certificate has passed, about its own domain.
    fn heard(&self, msg: &Gossip) {
        if msg.topic != GROUPS_TOPIC {
            return;
        }
        let summary: Result<GroupSummary, _> = ciborium::from_reader(msg.data.as_slice());
        match summary {
            Ok(s)
                if s.validate().is_ok()
                    && msg.source.map(|p| p.to_string()) == Some(s.broker.clone())
                    && msg
                        .source
                        .and_then(|p| self.site.net.identity(&p))
                        .is_some_and(|id| {
                            id.kind == mvm_component::policy::PrincipalKind::Node
                                && id.domain == s.domain
                        }) =>
            {
                self.learn(s);
            }
            _ => tracing::debug!(source = ?msg.source, "ignoring a bad group summary"),
        }
    }
}
