//! The task that owns the swarm (started by [`Net::start`](super::Net::start)): it runs the
//! commands of the [`Net`](super::Net) handles and the swarm's events, closes the connections
//! whose certificate exchange fails, and wakes whoever waits for a peer to pass.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{DialError, NetworkBehaviour, SwarmEvent};
use libp2p::{PeerId, Swarm, allow_block_list, connection_limits, gossipsub, identify, ping};
use mvm_component::policy::Principal;
use tokio::sync::{mpsc, oneshot};

use super::gate::Gated;
use super::hello::{self, Known};
use super::{Command, Gossip, NetError, NetProblem};

/// The swarm's behaviours.
#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    /// First, so that a blocked peer is refused before any other behaviour sees it.
    pub(super) blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    /// Bounds on connections (see [`limits`]), before any handler is made for one.
    pub(super) limits: connection_limits::Behaviour,
    /// The certificate exchange on every connection.
    pub(super) hello: hello::Behaviour,
    /// Gossip, read only from connections that have passed.
    pub(super) gossip: Gated<gossipsub::Behaviour>,
    /// Who the peer says it is at the libp2p level (addresses, protocols), read only from
    /// connections that have passed.
    pub(super) identify: Gated<identify::Behaviour>,
    /// Liveness, answered only on connections that have passed.
    pub(super) ping: Gated<ping::Behaviour>,
    /// Control, queue-data and image streams.
    pub(super) stream: libp2p_stream::Behaviour,
}

/// The bounds on connections: what peers that have not passed can hold of this daemon is
/// bounded by these and by the certificate exchange's own bound (`hello::UNPASSED`) and
/// deadline, each connection's streams by yamux and the gate (`gate::HELD`).
pub(super) fn limits() -> connection_limits::ConnectionLimits {
    connection_limits::ConnectionLimits::default()
        // Connections in their noise handshake.
        .with_max_pending_incoming(Some(128))
        // Two dials crossing give two; a peer on TCP and QUIC, a few more.
        .with_max_established_per_peer(Some(8))
        // A large group's nodes and clients, all connected to one super-peer.
        .with_max_established_incoming(Some(16_384))
}

/// How many times a connection lost before its certificates were exchanged (dropped while
/// being set up, with a request waiting for it) is made again, 50 ms later each time: about a
/// second in all. Two daemons dialing each other at once no longer lose one (every dial takes a
/// new port, see `ports`); a peer that is restarting or a connection closed as idle still can.
pub(super) const HELLO_RETRIES: u32 = 6;

/// How long to wait before the `tries`-th new connection from `me` to `peer`: longer each
/// time, and different on the two sides (each adds its own 0–63 ms, fixed by the pair's peer
/// ids), so that two peers that lost their connections together do not retry in step.
pub(super) fn hello_backoff(me: &PeerId, peer: &PeerId, tries: u32) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (me, peer, tries).hash(&mut h);
    Duration::from_millis(50 * u64::from(tries) + h.finish() % 64)
}

/// Whoever waits for a peer to pass.
type Waiter = oneshot::Sender<Result<Principal, NetError>>;

/// The swarm task's state.
pub(super) struct Actor {
    /// The peers that have passed, shared with the handles.
    pub(super) known: Known,
    /// Per peer that has not passed yet, who waits for it.
    pub(super) waiting: HashMap<PeerId, Vec<Waiter>>,
    /// Per peer, the connections lost before passing so far.
    pub(super) hello_tries: HashMap<PeerId, u32>,
    /// Every connection lost before passing, with a request waiting, since the start.
    pub(super) hellos_lost: Arc<AtomicU64>,
    /// Where gossip messages go.
    pub(super) gossip: mpsc::Sender<Gossip>,
    /// The swarm.
    pub(super) swarm: Swarm<Behaviour>,
    /// The handles' commands.
    pub(super) commands: mpsc::Receiver<Command>,
    /// For retries to come back to the swarm task; weak, so that the task ends (and closes
    /// its sockets) once every [`Net`](super::Net) handle is gone.
    pub(super) self_commands: mpsc::WeakSender<Command>,
}

impl Actor {
    /// Runs until every handle is gone.
    pub(super) async fn run(mut self) {
        loop {
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => return,
                },
                ev = self.swarm.select_next_some() => self.event(ev),
            }
        }
    }

    /// Carries out a handle's command.
    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Authenticate { peer, addrs, reply } => {
                for a in addrs {
                    self.swarm.add_peer_address(peer, a);
                }
                let known = self.known.read().get(&peer).cloned();
                match known {
                    Some(p) if p.mutual => {
                        let _ = reply.send(Ok(p.principal));
                    }
                    _ => {
                        let queue = self.waiting.entry(peer).or_default();
                        queue.push(reply);
                        if queue.len() == 1 {
                            self.connect(peer);
                        }
                    }
                }
            }
            Command::Redial { peer } => {
                if self.waiting.get(&peer).is_some_and(|w| !w.is_empty()) {
                    self.connect(peer);
                }
            }
            Command::Disconnect { peer } => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            Command::Block { peer, blocked } => {
                let list = &mut self.swarm.behaviour_mut().blocked;
                if blocked {
                    list.block_peer(peer);
                } else {
                    list.unblock_peer(peer);
                }
            }
            Command::Dial { peer, addrs } => {
                let gossip = self.swarm.behaviour_mut().gossip.inner();
                gossip.add_explicit_peer(&peer);
                if !self.swarm.is_connected(&peer) {
                    let opts = DialOpts::peer_id(peer).addresses(addrs).build();
                    if let Err(e) = self.swarm.dial(opts) {
                        tracing::debug!(%peer, error = %e, "dial failed");
                    }
                }
            }
            Command::Publish { topic, data } => {
                let topic = gossipsub::IdentTopic::new(topic);
                if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .gossip
                    .inner()
                    .publish(topic, data)
                {
                    tracing::debug!(error = %e, "gossip not published");
                }
            }
        }
    }

    /// Dials `peer` unless a connection to it is open or being made: the certificate exchange
    /// on that connection wakes whoever waits.
    fn connect(&mut self, peer: PeerId) {
        if self.swarm.is_connected(&peer) {
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        match self.swarm.dial(opts) {
            Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {}
            Err(e) => self.fail(peer, &NetProblem::Connect(e.to_string())),
        }
    }

    /// Fails whoever waits for `peer`.
    fn fail(&mut self, peer: PeerId, problem: &NetProblem) {
        self.hello_tries.remove(&peer);
        for w in self.waiting.remove(&peer).unwrap_or_default() {
            let _ = w.send(Err(NetError::new(peer, problem.clone())));
        }
    }

    /// A connection to `peer` closed before passing, with requests waiting for it: made again a
    /// few times, a little later each time.
    fn lost(&mut self, peer: PeerId, cause: &str) {
        self.hellos_lost.fetch_add(1, Ordering::Relaxed);
        let tries = self.hello_tries.entry(peer).or_insert(0);
        if *tries >= HELLO_RETRIES {
            self.fail(peer, &NetProblem::Lost(cause.to_owned()));
            return;
        }
        *tries += 1;
        tracing::debug!(%peer, %cause, tries = *tries, "a connection lost before passing; again");
        let commands = self.self_commands.clone();
        let delay = hello_backoff(self.swarm.local_peer_id(), &peer, *tries);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(commands) = commands.upgrade() {
                let _ = commands.send(Command::Redial { peer }).await;
            }
        });
    }

    /// Takes in a swarm event.
    fn event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Hello(hello::Event::Passed {
                peer,
                connection,
                principal,
            })) => {
                tracing::debug!(%peer, %principal, "a connection passed");
                let b = self.swarm.behaviour_mut();
                b.gossip.pass(peer, connection);
                b.identify.pass(peer, connection);
                b.ping.pass(peer, connection);
                self.hello_tries.remove(&peer);
                for w in self.waiting.remove(&peer).unwrap_or_default() {
                    let _ = w.send(Ok(principal.clone()));
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Hello(hello::Event::Refused {
                peer,
                reason,
            })) => {
                tracing::warn!(%peer, %reason, "a peer's certificate is refused");
                self.fail(peer, &NetProblem::Hello(reason));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Hello(hello::Event::Failed {
                peer,
                connection,
                reason,
                fatal,
            })) => {
                tracing::warn!(%peer, %reason, "closing a connection whose certificate exchange failed");
                self.swarm.close_connection(connection);
                // Not fatal (the connection broke): its closing decides whether to try again.
                if fatal {
                    self.fail(peer, &NetProblem::Hello(reason));
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                // A refused connection is the answer: whoever waits looks elsewhere at once.
                tracing::info!(%peer, %error, "dial failed");
                if !self.swarm.is_connected(&peer) {
                    self.fail(peer, &NetProblem::Connect(error.to_string()));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                cause,
                ..
            } if self.waiting.get(&peer_id).is_some_and(|w| !w.is_empty()) => {
                let cause = cause.map_or_else(|| "closed".to_owned(), |e| e.to_string());
                self.lost(peer_id, &cause);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossip(gossipsub::Event::Message {
                message,
                ..
            })) => {
                let _ = self.gossip.try_send(Gossip {
                    source: message.source,
                    topic: message.topic.to_string(),
                    data: message.data,
                });
            }
            _ => {}
        }
    }
}
