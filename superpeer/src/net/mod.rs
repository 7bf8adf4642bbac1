//! The libp2p side of a daemon: one task owns the swarm; everything else talks to it through a
//! [`Net`] handle (requests out, addresses) and an [`Inbound`] channel (requests in).
//!
//! Transports: TCP with noise and yamux, and QUIC. Behaviours: identify, ping, the control
//! request-response protocol ([`crate::proto`]), and plain streams for queue data and for
//! control streams (`libp2p-stream`; a peer that has passed gets every request after the first
//! on one long-lived control stream, see the `rpc` module). Every inbound request is validated
//! before it reaches the daemon; an invalid one is answered with an input error and never acted
//! on.
//!
//! Authentication: the first control request on a connection is a `Hello` with the sender's
//! certificate, answered by the receiver's; each side checks the other's against its trusted
//! domain CAs and the connection's peer id ([`crate::pki::Trust::verify`]). Until a peer has
//! passed, every other request from it is refused unread, and streams from it are dropped;
//! requests to a peer wait for its `Hello` to pass. A connection's identity ends with it.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::Transport as _;
use libp2p::identity::Keypair;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Swarm, allow_block_list, gossipsub, identify, noise, ping, tcp, yamux,
};
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};

use mvm_component::policy::Principal;

use crate::pki::Credentials;
use crate::proto::{self, Failure, FailureKind, Request, Response};
use crate::rpc::{self, Links, Sent};

mod ports;

/// How a daemon's network is set up.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Addresses to listen on (e.g. `/ip4/127.0.0.1/tcp/0`, `/ip4/127.0.0.1/udp/0/quic-v1`).
    pub listen: Vec<Multiaddr>,
    /// How long a control request may take before it fails.
    pub request_timeout: Duration,
    /// The largest control message.
    pub max_frame: usize,
    /// How long an unused connection stays open.
    pub idle_timeout: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            listen: Vec::new(),
            request_timeout: Duration::from_secs(60),
            max_frame: proto::MAX_FRAME,
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// What a request came to, with an error answer as `Err` too (a failure on the way is
/// `Unavailable`).
///
/// # Errors
/// The peer's error answer, or the failure on the way.
pub(crate) fn answer(r: Result<Response, NetError>) -> Result<Response, Failure> {
    match r {
        Ok(Response::Error(f)) => Err(f),
        Ok(r) => Ok(r),
        Err(e) => Err(Failure::new(FailureKind::Unavailable, e.to_string())),
    }
}

/// A request that failed on the way (not an error answer from the peer).
#[derive(Debug, Clone, thiserror::Error)]
#[error("peer {peer}: {message}")]
pub struct NetError {
    /// The peer.
    pub peer: PeerId,
    /// What went wrong.
    pub message: String,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    /// First, so that a blocked peer is refused before any other behaviour sees it.
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    gossip: gossipsub::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    control: request_response::Behaviour<proto::Codec>,
    stream: libp2p_stream::Behaviour,
}

pub(crate) enum Command {
    Request {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Request,
        reply: oneshot::Sender<Result<Response, NetError>>,
    },
    Respond {
        channel: ResponseChannel<Response>,
        response: Response,
    },
    Disconnect {
        peer: PeerId,
    },
    /// Refuse every connection with the peer (closing those open), or no longer.
    Block {
        peer: PeerId,
        blocked: bool,
    },
    Dial {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    },
    Authenticate {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<Principal, NetError>>,
    },
    /// Send a `Hello` again after a failure on the way.
    RetryHello {
        peer: PeerId,
    },
    Publish {
        topic: String,
        data: Vec<u8>,
    },
}

/// A gossip message: who published it, and its bytes (not yet validated).
#[derive(Debug, Clone)]
pub struct Gossip {
    /// The publisher.
    pub source: Option<PeerId>,
    /// The topic.
    pub topic: String,
    /// The payload.
    pub data: Vec<u8>,
}

/// How many times a `Hello` lost on the way (a connection dropped or refused while it was
/// sent) is sent again, 50 ms later each time: about a second in all. Two daemons dialing each
/// other at once no longer lose one (every dial takes a new port, see `ports`); a peer that is
/// restarting or a connection closed as idle still can.
const HELLO_RETRIES: u32 = 6;

/// How long to wait before the `tries`-th retry of a `Hello` from `me` to `peer`: longer each
/// time, and different on the two sides (each adds its own 0–63 ms, fixed by the pair's peer
/// ids), so that two peers that lost their `Hello`s together do not retry in step.
fn hello_backoff(me: &PeerId, peer: &PeerId, tries: u32) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (me, peer, tries).hash(&mut h);
    Duration::from_millis(50 * u64::from(tries) + h.finish() % 64)
}

/// The gossip topic of group summaries exchanged by super-peers.
pub const GROUPS_TOPIC: &str = "/mvm/groups/1";

/// A handle on a running swarm; cheap to clone.
#[derive(Clone)]
pub struct Net {
    commands: mpsc::Sender<Command>,
    peer: PeerId,
    addrs: Vec<Multiaddr>,
    streams: libp2p_stream::Control,
    gossip: Arc<Mutex<Option<mpsc::Receiver<Gossip>>>>,
    verified: Verified,
    principal: Principal,
    /// Control streams to peers, for requests after the first.
    links: Arc<Links>,
    /// `Hello`s lost on the way (and sent again) since the start.
    hellos_lost: Arc<AtomicU64>,
}

/// The peers whose certificates have passed, with who they are.
type Verified = Arc<parking_lot::RwLock<HashMap<PeerId, Principal>>>;

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("peer", &self.peer)
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

/// A request from a peer; answer it with [`Inbound::reply`] (dropping it answers nothing, and
/// the peer sees its request fail).
pub struct Inbound {
    /// Who sent it.
    pub peer: PeerId,
    /// Who its certificate says it is.
    pub principal: Principal,
    /// What it asks (already validated).
    pub request: Request,
    /// `None` once answered.
    reply: Option<Reply>,
}

/// Where the answer to an inbound request goes.
pub(crate) enum Reply {
    /// Back on its request-response stream, through the swarm task.
    Swarm {
        channel: ResponseChannel<Response>,
        commands: mpsc::Sender<Command>,
    },
    /// On the control stream it came on, as the frame of its id.
    Stream {
        id: u64,
        frames: mpsc::Sender<Vec<u8>>,
        max_frame: usize,
    },
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("peer", &self.peer)
            .field("principal", &self.principal)
            .field("request", &self.request)
            .finish_non_exhaustive()
    }
}

impl Inbound {
    pub(crate) fn new(peer: PeerId, principal: Principal, request: Request, reply: Reply) -> Self {
        Inbound {
            peer,
            principal,
            request,
            reply: Some(reply),
        }
    }

    /// Sends the answer.
    pub async fn reply(mut self, response: Response) {
        match self.reply.take() {
            Some(Reply::Swarm { channel, commands }) => {
                let _ = commands.send(Command::Respond { channel, response }).await;
            }
            Some(Reply::Stream {
                id,
                frames,
                max_frame,
            }) => {
                let _ = frames
                    .send(rpc::encode_answer(id, &response, max_frame))
                    .await;
            }
            None => {}
        }
    }
}

impl Drop for Inbound {
    /// A request dropped unanswered fails at once for its sender, as request-response does
    /// when its response channel is dropped, rather than when its sender gives up waiting.
    fn drop(&mut self) {
        if let Some(Reply::Stream {
            id,
            frames,
            max_frame,
        }) = self.reply.take()
        {
            let f = Failure::new(FailureKind::Failed, "the request was dropped unanswered");
            // Cannot wait here: if the stream's queue is full, the sender waits out its timeout.
            let _ = frames.try_send(rpc::encode_answer(id, &Response::Error(f), max_frame));
        }
    }
}

/// Why an inbound request from `peer` is refused unread as invalid, if it is.
pub(crate) fn invalid(peer: &PeerId, request: &Request) -> Option<Failure> {
    request.validate().err().map(|e| {
        Failure::new(
            FailureKind::Input,
            format!("invalid request from {peer}: {e}"),
        )
    })
}

/// The answer to a request that finds the daemon's inbound queue full.
pub(crate) fn busy() -> Failure {
    Failure::new(
        FailureKind::Unavailable,
        "this daemon is too busy to take the request",
    )
}

/// Adds `/p2p/PEER` to an address that lacks it.
pub fn with_peer(addr: &Multiaddr, peer: PeerId) -> Multiaddr {
    if addr
        .iter()
        .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
    {
        addr.clone()
    } else {
        addr.clone().with(libp2p::multiaddr::Protocol::P2p(peer))
    }
}

/// Splits `/…/p2p/PEER` into the peer and the address.
///
/// # Errors
/// The text is not a multiaddress ending in `/p2p/PEER`.
pub fn split_peer(text: &str) -> Result<(PeerId, Multiaddr), String> {
    let addr: Multiaddr = text
        .parse()
        .map_err(|e| format!("'{text}' is not a multiaddress: {e}"))?;
    let mut base = addr.clone();
    match base.pop() {
        Some(libp2p::multiaddr::Protocol::P2p(peer)) => Ok((peer, base)),
        _ => Err(format!("'{text}' does not end in /p2p/PEER-ID")),
    }
}

impl Net {
    /// Builds the swarm, starts listening, and runs it on a task; returns once every listener
    /// has an address. Inbound requests arrive on the returned channel.
    ///
    /// # Errors
    /// A transport cannot be set up or an address cannot be listened on.
    pub async fn start(
        creds: &Credentials,
        config: &NetConfig,
    ) -> Result<(Net, mpsc::Receiver<Inbound>), String> {
        let key: Keypair = creds.key.clone();
        let max_frame = config.max_frame;
        let timeout = config.request_timeout;
        let idle = config.idle_timeout;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_quic()
            .with_other_transport(|key| {
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    ports::NewPorts(tcp::tokio::Transport::new(
                        tcp::Config::default().nodelay(true),
                    ))
                    .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default()),
                )
            })
            .map_err(|e| format!("cannot set up TCP: {e}"))?
            .with_behaviour(|key| {
                let gossip_config = gossipsub::ConfigBuilder::default()
                    .heartbeat_interval(Duration::from_millis(500))
                    .max_transmit_size(256 << 10)
                    .build()
                    .map_err(|e| format!("gossipsub configuration: {e}"))?;
                let mut gossip = gossipsub::Behaviour::new(
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    gossip_config,
                )
                .map_err(|e| format!("gossipsub: {e}"))?;
                gossip
                    .subscribe(&gossipsub::IdentTopic::new(GROUPS_TOPIC))
                    .map_err(|e| format!("gossipsub subscription: {e}"))?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Behaviour {
                    blocked: allow_block_list::Behaviour::default(),
                    gossip,
                    identify: identify::Behaviour::new(identify::Config::new(
                        "/mvm/1".into(),
                        key.public(),
                    )),
                    ping: ping::Behaviour::default(),
                    control: request_response::Behaviour::with_codec(
                        proto::Codec { max_frame },
                        [(proto::PROTOCOL, ProtocolSupport::Full)],
                        request_response::Config::default()
                            .with_request_timeout(timeout)
                            .with_max_concurrent_streams(4096),
                    ),
                    stream: libp2p_stream::Behaviour::new(),
                })
            })
            .map_err(|e| format!("cannot set up the behaviours: {e}"))?
            .with_swarm_config(|c| {
                // Optimistic protocol negotiation on outbound streams: a control request or a
                // queue stream costs no extra round trip to agree on its protocol.
                c.with_idle_connection_timeout(idle)
                    .with_substream_upgrade_protocol_override(
                        libp2p::core::upgrade::Version::V1Lazy,
                    )
                    .with_max_negotiating_inbound_streams(1024)
            })
            .build();
        let mut pending = Vec::new();
        for a in &config.listen {
            pending.push(
                swarm
                    .listen_on(a.clone())
                    .map_err(|e| format!("cannot listen on {a}: {e}"))?,
            );
        }
        let mut addrs = Vec::new();
        let deadline = tokio::time::sleep(Duration::from_secs(10));
        tokio::pin!(deadline);
        while !pending.is_empty() {
            tokio::select! {
                ev = swarm.select_next_some() => match ev {
                    SwarmEvent::NewListenAddr { listener_id, address } => {
                        pending.retain(|l| *l != listener_id);
                        addrs.push(address);
                    }
                    SwarmEvent::ListenerClosed { reason, .. } => {
                        return Err(format!("a listener closed: {reason:?}"));
                    }
                    SwarmEvent::ListenerError { error, .. } => {
                        return Err(format!("a listener failed: {error}"));
                    }
                    _ => {}
                },
                () = &mut deadline => return Err("no listen address after 10 s".into()),
            }
        }
        let streams = swarm.behaviour().stream.new_control();
        let peer = *swarm.local_peer_id();
        let (commands, rx) = mpsc::channel(1024);
        let (inbound_tx, inbound) = mpsc::channel(1024);
        let inbound_tx_rpc = inbound_tx.clone();
        let (gossip_tx, gossip_rx) = mpsc::channel(256);
        let verified = Verified::default();
        let hellos_lost = Arc::new(AtomicU64::new(0));
        let actor = Actor {
            creds: Arc::new(creds.clone()),
            verified: verified.clone(),
            waiting: HashMap::new(),
            hellos: HashMap::new(),
            hello_tries: HashMap::new(),
            hellos_lost: hellos_lost.clone(),
            gossip: gossip_tx,
            swarm,
            commands: rx,
            inbound: inbound_tx,
            self_commands: commands.downgrade(),
            pending: HashMap::new(),
        };
        tokio::spawn(actor.run());
        tokio::spawn(rpc::accept(
            streams.clone(),
            verified.clone(),
            inbound_tx_rpc,
            max_frame,
        ));
        Ok((
            Net {
                commands,
                peer,
                addrs,
                streams,
                gossip: Arc::new(Mutex::new(Some(gossip_rx))),
                verified,
                principal: creds.principal.clone(),
                links: Links::new(max_frame, timeout),
                hellos_lost,
            },
            inbound,
        ))
    }

    /// This daemon's peer id.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// How many `Hello`s this daemon sent were lost on the way (and sent again) since it
    /// started: connections that failed while being set up.
    pub fn hellos_lost(&self) -> u64 {
        self.hellos_lost.load(Ordering::Relaxed)
    }

    /// The addresses it listens on (without `/p2p/`).
    pub fn addrs(&self) -> &[Multiaddr] {
        &self.addrs
    }

    /// The addresses as strings with `/p2p/PEER`, for others to dial.
    pub fn dial_addrs(&self) -> Vec<String> {
        self.addrs
            .iter()
            .map(|a| with_peer(a, self.peer).to_string())
            .collect()
    }

    /// Who this daemon is, as its certificate says.
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// How many requests this daemon has sent on control streams (the rest went by
    /// request-response: the first to each peer, and those sent while its stream opened).
    pub fn stream_requests(&self) -> u64 {
        self.links.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Who `peer` is, if its certificate has passed on a connection still open.
    pub fn identity(&self, peer: &PeerId) -> Option<Principal> {
        self.verified.read().get(peer).cloned()
    }

    /// Connects to `peer` (dialing `addrs` if needed) and exchanges certificates, unless that
    /// is done already; returns who the peer is. Call it before opening a stream to a peer
    /// that may not have heard from this daemon, as streams from strangers are dropped.
    ///
    /// # Errors
    /// The peer cannot be reached, or either side refuses the other's certificate.
    pub async fn authenticate(
        &self,
        peer: PeerId,
        addrs: &[Multiaddr],
    ) -> Result<Principal, NetError> {
        if let Some(p) = self.identity(&peer) {
            return Ok(p);
        }
        self.roundtrip(peer, |reply| Command::Authenticate {
            peer,
            addrs: addrs.to_vec(),
            reply,
        })
        .await
    }

    /// Sends the swarm task a command carrying a reply channel, and waits for the reply.
    async fn roundtrip<T>(
        &self,
        peer: PeerId,
        command: impl FnOnce(oneshot::Sender<Result<T, NetError>>) -> Command,
    ) -> Result<T, NetError> {
        let (reply, rx) = oneshot::channel();
        let gone = || NetError {
            peer,
            message: "the network task has stopped".into(),
        };
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// A handle for opening and accepting queue-data streams.
    pub fn streams(&self) -> libp2p_stream::Control {
        self.streams.clone()
    }

    /// Sends `request` to `peer` (dialing `addrs` if not connected) and waits for the answer.
    /// An error answer from the peer is returned as `Ok(Response::Error(..))`.
    ///
    /// # Errors
    /// The request could not be delivered or answered (dial failure, timeout, closed stream,
    /// invalid response).
    pub async fn request(
        &self,
        peer: PeerId,
        addrs: &[Multiaddr],
        request: Request,
    ) -> Result<Response, NetError> {
        // A peer that has passed gets its requests on a control stream; the first request to
        // it goes by request-response (with the `Hello` before it) and opens the stream.
        let request = if matches!(request, Request::Hello { .. }) {
            request
        } else {
            let known = || self.verified.read().contains_key(&peer);
            match self
                .links
                .request(peer, request, known, &self.streams)
                .await
            {
                Sent::Done(r) => return r,
                Sent::NotSent(r) => r,
            }
        };
        self.roundtrip(peer, |reply| Command::Request {
            peer,
            addrs: addrs.to_vec(),
            request,
            reply,
        })
        .await
    }

    /// As [`Net::request`], turning an error answer into `Err` too.
    ///
    /// # Errors
    /// A failure on the way, or the peer's error answer.
    pub async fn call(
        &self,
        peer: PeerId,
        addrs: &[Multiaddr],
        request: Request,
    ) -> Result<Response, Failure> {
        answer(self.request(peer, addrs, request).await)
    }

    /// The gossip messages received (once: later calls get `None`).
    pub fn take_gossip(&self) -> Option<mpsc::Receiver<Gossip>> {
        self.gossip.lock().take()
    }

    /// Publishes on a gossip topic (best effort: nobody may be listening yet).
    pub async fn publish(&self, topic: &str, data: Vec<u8>) {
        let _ = self
            .commands
            .send(Command::Publish {
                topic: topic.to_owned(),
                data,
            })
            .await;
    }

    /// Connects to `peer` if not connected, and keeps it as a direct gossip peer.
    pub async fn dial(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let _ = self.commands.send(Command::Dial { peer, addrs }).await;
    }

    /// Closes every connection to `peer` (used when a peer is declared lost).
    pub async fn disconnect(&self, peer: PeerId) {
        self.links.close(&peer);
        let _ = self.commands.send(Command::Disconnect { peer }).await;
    }

    /// Refuses every connection with `peer`, either way and on every transport, closing those
    /// open, until [`Net::unblock`]: requests to it fail as a refused dial does.
    pub async fn block(&self, peer: PeerId) {
        self.links.close(&peer);
        let blocked = true;
        let _ = self.commands.send(Command::Block { peer, blocked }).await;
    }

    /// Takes connections with `peer` again (see [`Net::block`]).
    pub async fn unblock(&self, peer: PeerId) {
        let blocked = false;
        let _ = self.commands.send(Command::Block { peer, blocked }).await;
    }
}

/// What waits for a peer's certificate to pass.
enum Waiting {
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

struct Actor {
    creds: Arc<Credentials>,
    verified: Verified,
    /// Per peer whose `Hello` is in flight, what waits for it.
    waiting: HashMap<PeerId, Vec<Waiting>>,
    /// The `Hello` requests in flight.
    hellos: HashMap<OutboundRequestId, PeerId>,
    /// Per peer, the `Hello`s lost on the way so far.
    hello_tries: HashMap<PeerId, u32>,
    /// Every `Hello` lost on the way since the start.
    hellos_lost: Arc<AtomicU64>,
    gossip: mpsc::Sender<Gossip>,
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    inbound: mpsc::Sender<Inbound>,
    /// For answers and retries to come back to the swarm task; weak, so that the task ends
    /// (and closes its sockets) once every [`Net`] handle is gone.
    self_commands: mpsc::WeakSender<Command>,
    pending: HashMap<OutboundRequestId, (PeerId, oneshot::Sender<Result<Response, NetError>>)>,
}

impl Actor {
    async fn run(mut self) {
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

#[cfg(test)]
mod tests;
