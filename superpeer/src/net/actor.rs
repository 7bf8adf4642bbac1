//! The task that owns the swarm (started by [`Net::start`](super::Net::start)): it runs the
//! commands of the [`Net`](super::Net) handles, the swarm's events, and the `Hello` of every
//! peer.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{PeerId, Swarm, allow_block_list, gossipsub, identify, ping};
use mvm_component::policy::Principal;
use tokio::sync::{mpsc, oneshot};

use super::{Command, Gossip, Inbound, NetError, Reply, Verified, busy, invalid};
use crate::pki::Credentials;
use crate::proto::{self, Failure, FailureKind, Request, Response};

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    /// First, so that a blocked peer is refused before any other behaviour sees it.
    pub(super) blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub(super) gossip: gossipsub::Behaviour,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) control: request_response::Behaviour<proto::Codec>,
    pub(super) stream: libp2p_stream::Behaviour,
}

/// How many times a `Hello` lost on the way (a connection dropped or refused while it was
/// sent) is sent again, 50 ms later each time: about a second in all. Two daemons dialing each
/// other at once no longer lose one (every dial takes a new port, see `ports`); a peer that is
/// restarting or a connection closed as idle still can.
pub(super) const HELLO_RETRIES: u32 = 6;

/// How long to wait before the `tries`-th retry of a `Hello` from `me` to `peer`: longer each
/// time, and different on the two sides (each adds its own 0–63 ms, fixed by the pair's peer
/// ids), so that two peers that lost their `Hello`s together do not retry in step.
pub(super) fn hello_backoff(me: &PeerId, peer: &PeerId, tries: u32) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (me, peer, tries).hash(&mut h);
    Duration::from_millis(50 * u64::from(tries) + h.finish() % 64)
}

/// What waits for a peer's certificate to pass.
pub(super) enum Waiting {
    Request {
        request: Box<Request>,
        reply: oneshot::Sender<Result<Response, NetError>>,
    },
    Auth(oneshot::Sender<Result<Principal, NetError>>),
}

impl Waiting {
    fn fail(self, e: NetError) {
        match self {
            Waiting::Request { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Waiting::Auth(reply) => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

pub(super) struct Actor {
    pub(super) creds: Arc<Credentials>,
    pub(super) verified: Verified,
    /// Per peer whose `Hello` is in flight, what waits for it.
    pub(super) waiting: HashMap<PeerId, Vec<Waiting>>,
    /// The `Hello` requests in flight.
    pub(super) hellos: HashMap<OutboundRequestId, PeerId>,
    /// Per peer, the `Hello`s lost on the way so far.
    pub(super) hello_tries: HashMap<PeerId, u32>,
    /// Every `Hello` lost on the way since the start.
    pub(super) hellos_lost: Arc<AtomicU64>,
    pub(super) gossip: mpsc::Sender<Gossip>,
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) inbound: mpsc::Sender<Inbound>,
    /// For answers and retries to come back to the swarm task; weak, so that the task ends
    /// (and closes its sockets) once every [`Net`] handle is gone.
    pub(super) self_commands: mpsc::WeakSender<Command>,
    pub(super) pending:
        HashMap<OutboundRequestId, (PeerId, oneshot::Sender<Result<Response, NetError>>)>,
}

impl Actor {
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

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Request {
                peer,
                addrs,
                request,
                reply,
            } => {
                for a in addrs {
                    self.swarm.add_peer_address(peer, a);
                }
                if self.verified.read().contains_key(&peer) {
                    self.send(peer, request, reply);
                } else {
                    let request = Box::new(request);
                    self.wait(peer, Waiting::Request { request, reply });
                }
            }
            Command::RetryHello { peer } => {
                if self.waiting.get(&peer).is_some_and(|w| !w.is_empty()) {
                    self.send_hello(peer);
                }
            }
            Command::Authenticate { peer, addrs, reply } => {
                for a in addrs {
                    self.swarm.add_peer_address(peer, a);
                }
                let known = self.verified.read().get(&peer).cloned();
                match known {
                    Some(p) => {
                        let _ = reply.send(Ok(p));
                    }
                    None => self.wait(peer, Waiting::Auth(reply)),
                }
            }
            Command::Respond { channel, response } => self.respond(channel, response),
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
                self.swarm.behaviour_mut().gossip.add_explicit_peer(&peer);
                if !self.swarm.is_connected(&peer) {
                    let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        tracing::debug!(%peer, error = %e, "dial failed");
                    }
                }
            }
            Command::Publish { topic, data } => {
                let topic = gossipsub::IdentTopic::new(topic);
                if let Err(e) = self.swarm.behaviour_mut().gossip.publish(topic, data) {
                    tracing::debug!(error = %e, "gossip not published");
                }
            }
        }
    }

    fn respond(&mut self, channel: ResponseChannel<Response>, response: Response) {
        let _ = self
            .swarm
            .behaviour_mut()
            .control
            .send_response(channel, response);
    }

    fn send(
        &mut self,
        peer: PeerId,
        request: Request,
        reply: oneshot::Sender<Result<Response, NetError>>,
    ) {
        let id = self
            .swarm
            .behaviour_mut()
            .control
            .send_request(&peer, request);
        self.pending.insert(id, (peer, reply));
    }

    /// Queues `w` behind the peer's `Hello`, sending one if none is in flight.
    fn wait(&mut self, peer: PeerId, w: Waiting) {
        let queue = self.waiting.entry(peer).or_default();
        queue.push(w);
        if queue.len() == 1 {
            self.send_hello(peer);
        }
    }

    fn send_hello(&mut self, peer: PeerId) {
        let hello = Request::Hello {
            cert: self.creds.cert.clone().into(),
        };
        let id = self
            .swarm
            .behaviour_mut()
            .control
            .send_request(&peer, hello);
        self.hellos.insert(id, peer);
    }

    /// The end of a `Hello` this daemon sent: the peer's certificate, or why not. A `Hello`
    /// lost on a connection that was made is tried again; one whose dial failed is not (the
    /// peer is not there: a refused connection is the answer, and whoever asked looks
    /// elsewhere at once).
    fn hello_done(&mut self, peer: PeerId, result: Result<Response, (String, bool)>) {
        if let Err((e, retry)) = &result {
            // Lost on the way (not refused): try again a few times, a little later each time.
            self.hellos_lost.fetch_add(1, Ordering::Relaxed);
            let tries = self.hello_tries.entry(peer).or_insert(0);
            if *retry && *tries < HELLO_RETRIES && self.waiting.contains_key(&peer) {
                *tries += 1;
                tracing::debug!(%peer, error = %e, tries = *tries, "hello lost; retrying");
                let commands = self.self_commands.clone();
                let delay = hello_backoff(self.swarm.local_peer_id(), &peer, *tries);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Some(commands) = commands.upgrade() {
                        let _ = commands.send(Command::RetryHello { peer }).await;
                    }
                });
                return;
            }
        }
        self.hello_tries.remove(&peer);
        // An answer that does not pass is a refusal; no answer is not.
        let refused = result.is_ok();
        let outcome = match result {
            Ok(Response::Hello { cert }) => self
                .creds
                .trust
                .verify(&cert, &peer)
                .map_err(|e| e.to_string()),
            Ok(Response::Error(f)) => Err(f.message),
            Ok(_) => Err("it answered a Hello with something else".into()),
            Err((e, _)) => {
                // Not a refusal: the peer could not be reached (a killed super-peer, while its
                // clients and nodes look for the next leader); whoever waits hears of it.
                tracing::debug!(%peer, error = %e, "a Hello did not get through");
                Err(e)
            }
        };
        let waiting = self.waiting.remove(&peer).unwrap_or_default();
        match outcome {
            Ok(principal) => {
                self.verified.write().insert(peer, principal.clone());
                for w in waiting {
                    match w {
                        Waiting::Request { request, reply } => self.send(peer, *request, reply),
                        Waiting::Auth(reply) => {
                            let _ = reply.send(Ok(principal.clone()));
                        }
                    }
                }
            }
            Err(message) => {
                if refused {
                    tracing::warn!(%peer, %message, "authentication failed");
                }
                for w in waiting {
                    w.fail(NetError {
                        peer,
                        message: message.clone(),
                    });
                }
            }
        }
    }

    /// An inbound `Hello`: check the peer's certificate, answer with this daemon's.
    fn hello(&mut self, peer: PeerId, cert: &[u8], channel: ResponseChannel<Response>) {
        let response = match self.creds.trust.verify(cert, &peer) {
            Ok(p) => {
                tracing::debug!(%peer, principal = %p, "peer authenticated");
                self.verified.write().insert(peer, p);
                Response::Hello {
                    cert: self.creds.cert.clone().into(),
                }
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "a peer's certificate is refused");
                Response::Error(Failure::new(
                    FailureKind::Refused,
                    format!("{} refuses {peer}'s {e}", self.swarm.local_peer_id()),
                ))
            }
        };
        self.respond(channel, response);
    }

    fn event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        if let SwarmEvent::OutgoingConnectionError {
            peer_id: Some(peer),
            error,
            ..
        } = &ev
        {
            // Requests to the peer fail with only "Failed to dial"; the cause is here.
            tracing::info!(%peer, %error, "dial failed");
            return;
        }
        if let SwarmEvent::ConnectionClosed {
            peer_id,
            num_established: 0,
            ..
        } = ev
        {
            // An identity holds for the connection it was proven on.
            self.verified.write().remove(&peer_id);
            return;
        }
        if let SwarmEvent::Behaviour(BehaviourEvent::Gossip(gossipsub::Event::Message {
            message,
            ..
        })) = ev
        {
            let _ = self.gossip.try_send(Gossip {
                source: message.source,
                topic: message.topic.to_string(),
                data: message.data,
            });
            return;
        }
        let SwarmEvent::Behaviour(BehaviourEvent::Control(ev)) = ev else {
            return;
        };
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    if let Request::Hello { cert } = &request {
                        self.hello(peer, cert, channel);
                        return;
                    }
                    let known = self.verified.read().get(&peer).cloned();
                    let Some(principal) = known else {
                        let response = Response::Error(Failure::new(
                            FailureKind::Refused,
                            format!(
                                "{} refuses a request from {peer}: unauthenticated (no \
                                 certificate has passed on this connection)",
                                self.swarm.local_peer_id()
                            ),
                        ));
                        self.respond(channel, response);
                        return;
                    };
                    if let Some(f) = invalid(&peer, &request) {
                        self.respond(channel, Response::Error(f));
                        return;
                    }
                    let Some(commands) = self.self_commands.upgrade() else {
                        return; // every handle is gone: the swarm is ending
                    };
                    let reply = Reply::Swarm { channel, commands };
                    let inbound = Inbound::new(peer, principal, request, reply);
                    if let Err(e) = self.inbound.try_send(inbound) {
                        let mut inbound = match e {
                            mpsc::error::TrySendError::Full(i)
                            | mpsc::error::TrySendError::Closed(i) => i,
                        };
                        if let Some(Reply::Swarm { channel, .. }) = inbound.reply.take() {
                            self.respond(channel, Response::Error(busy()));
                        }
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(peer) = self.hellos.remove(&request_id) {
                        self.hello_done(peer, Ok(response));
                    } else if let Some((peer, reply)) = self.pending.remove(&request_id) {
                        let r = response
                            .validate()
                            .map(|()| response)
                            .map_err(|e| NetError {
                                peer,
                                message: format!("invalid response: {e}"),
                            });
                        let _ = reply.send(r);
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(peer) = self.hellos.remove(&request_id) {
                    let retry = !matches!(error, request_response::OutboundFailure::DialFailure);
                    self.hello_done(peer, Err((error.to_string(), retry)));
                } else if let Some((_, reply)) = self.pending.remove(&request_id) {
                    let _ = reply.send(Err(NetError {
                        peer,
                        message: error.to_string(),
                    }));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound control request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}
