//! The libp2p side of a daemon: one task owns the swarm; everything else talks to it through a
//! [`Net`] handle (requests out, addresses) and an [`Inbound`] channel (requests in).
//!
//! Transports: TCP with noise and yamux, and QUIC. Behaviours: the certificate exchange
//! (`hello`), identify, ping, gossipsub, and plain streams (`libp2p-stream`) for control
//! requests, queue data and images. Every control request goes on a long-lived control stream
//! to its peer (see the `rpc` module); every inbound request is validated before it reaches the
//! daemon, and an invalid one is answered with an input error and never acted on.
//!
//! Authentication is a property of the connection: on every new connection each side sends
//! its certificate on [`crate::proto::HELLO_PROTOCOL`] (one frame of at most
//! [`crate::proto::MAX_HELLO`] bytes) and the other checks it against its trusted domain CAs
//! and the connection's peer id ([`crate::pki::Trust::verify`]). A connection whose exchange
//! fails, or has not ended within [`NetConfig::hello_timeout`], is closed by the swarm task
//! with a log line saying why. Nothing else is read from a peer before it has passed: its
//! control, queue and image streams are taken only through [`Net::accept`], which drops unread
//! those of a peer that has not passed, and its gossip, identify and ping streams are held
//! unread until their connection has passed (`gate`). Requests to a peer wait (woken by the
//! exchange's event, not by polling) until both certificates have passed on a connection. A
//! peer's identity ends with the last connection it passed on.
//!
//! - `addr`: peers' addresses (`/…/p2p/PEER`).
//! - `error`: why a request did not get through.
//! - `swarm`: building the swarm and starting its task ([`Net::start`]).
//! - `actor`: that task: commands, swarm events, the closing of connections that fail.
//! - `hello`: the certificate exchange (a behaviour and its connection handler).
//! - `gate`: holds a connection's gossip, identify and ping streams, unread, until it has
//!   passed.
//! - `ports`: choosing listen ports.
//! - `conduct`: authenticated peers' offences (bad frames, floods), and cutting them off.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use mvm_component::policy::Principal;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::proto::{self, Failure, FailureKind, Request, Response};
use crate::rpc::{self, Links, Sent};
use hello::Known;

mod actor;
mod addr;
pub(crate) mod conduct;
mod error;
mod gate;
mod hello;
#[doc(hidden)]
pub mod hostile;
mod ports;
mod swarm;

pub use crate::rpc::StreamError;
pub use addr::{AddrError, split_addr, split_peer, with_peer};
pub use conduct::{CutOff, FLOOD_EVERY, Offence, STRIKE_WINDOW, STRIKES};
pub use error::{AlreadyAccepted, NetError, NetProblem};
pub use swarm::StartError;

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
    /// How long a new connection may take to exchange certificates before it is closed.
    pub hello_timeout: Duration,
    /// Control requests a user may make per second (a daemon, ten times as many), with two
    /// seconds' worth at once (`0`: no quota); more wait, and a peer that keeps its quota full
    /// is cut off (see `conduct`).
    pub request_rate: u32,
    /// How long a peer cut off for its offences stays blocked.
    pub block_for: Duration,
}

/// The default request quota of a user, per second: a job array of thousands goes through in
/// seconds (a broker benchmark's client, which submits 7,000 jobs a second from one user, is
/// given no quota).
pub const REQUEST_RATE: u32 = 2_000;

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            listen: Vec::new(),
            request_timeout: Duration::from_secs(60),
            max_frame: proto::MAX_FRAME,
            idle_timeout: Duration::from_secs(120),
            hello_timeout: Duration::from_secs(5),
            request_rate: REQUEST_RATE,
            block_for: Duration::from_secs(600),
        }
    }
}

/// What a request came to, with an error answer as `Err` too.
///
/// # Errors
/// The peer's error answer, or the failure on the way.
pub(crate) fn answer(r: Result<Response, NetError>) -> Result<Response, Failure> {
    match r {
        Ok(Response::Error(f)) => Err(f),
        Ok(r) => Ok(r),
        Err(e) => Err(e.into()),
    }
}

/// What the [`Net`] handles ask of the swarm task.
pub(crate) enum Command {
    /// Close every connection with the peer.
    Disconnect { peer: PeerId },
    /// Refuse every connection with the peer (closing those open), or no longer.
    Block { peer: PeerId, blocked: bool },
    /// Connect to the peer if not connected, and keep it as a direct gossip peer.
    Dial { peer: PeerId, addrs: Vec<Multiaddr> },
    /// Answer once both certificates have passed on a connection with the peer (dialing it if
    /// needed), or why they cannot.
    Authenticate {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<Principal, NetError>>,
    },
    /// Connect again to a peer whose connection was lost before passing.
    Redial { peer: PeerId },
    /// Publish on a gossip topic.
    Publish { topic: String, data: Vec<u8> },
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

/// The gossip topic of group summaries exchanged by super-peers.
pub const GROUPS_TOPIC: &str = "/mvm/groups/2";

/// A handle on a running swarm; cheap to clone.
#[derive(Clone)]
pub struct Net {
    commands: mpsc::Sender<Command>,
    peer: PeerId,
    addrs: Vec<Multiaddr>,
    streams: libp2p_stream::Control,
    gossip: Arc<Mutex<Option<mpsc::Receiver<Gossip>>>>,
    known: Known,
    principal: Principal,
    /// The CAs trusted and their revocation lists (shared with the certificate exchange).
    trust: crate::pki::Trust,
    /// Control streams to peers, for every request.
    links: Arc<Links>,
    /// Connections lost before passing (and made again) since the start.
    hellos_lost: Arc<AtomicU64>,
    /// How long a request may wait for its peer to pass and its control stream to open.
    timeout: Duration,
    /// Peers' offences, and those cut off.
    conduct: Arc<conduct::Conduct>,
}

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

/// Where the answer to an inbound request goes: on the control stream it came on, as the
/// frame of its id.
pub(crate) struct Reply {
    /// The request's id on its stream.
    pub(crate) id: u64,
    /// The stream's writer.
    pub(crate) frames: mpsc::Sender<rpc::Frame>,
    /// The largest frame.
    pub(crate) max_frame: usize,
    /// One of the stream's requests in flight, given back once the answer is written: a
    /// peer with [`rpc::IN_FLIGHT`] requests unanswered (or answered and not read) on a stream
    /// is read no more until one is.
    pub(crate) _slot: Option<tokio::sync::OwnedSemaphorePermit>,
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
    /// A request from `peer`, who is `principal`, to be answered through `reply`.
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
        if let Some(Reply {
            id,
            frames,
            max_frame,
            _slot,
        }) = self.reply.take()
        {
            let _ = frames
                .send((rpc::encode_answer(id, &response, max_frame), _slot))
                .await;
        }
    }
}

impl Drop for Inbound {
    /// A request dropped unanswered fails at once for its sender, rather than when its sender
    /// gives up waiting.
    fn drop(&mut self) {
        if let Some(Reply {
            id,
            frames,
            max_frame,
            _slot,
        }) = self.reply.take()
        {
            let f = Failure::new(FailureKind::Failed, "the request was dropped unanswered");
            // Cannot wait here: if the stream's queue is full, the sender waits out its timeout.
            let answer = rpc::encode_answer(id, &Response::Error(f), max_frame);
            let _ = frames.try_send((answer, _slot));
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

impl Net {
    /// This daemon's peer id.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// How many connections this daemon waited on were lost before their certificates were
    /// exchanged (and made again) since it started: connections that failed while being set
    /// up.
    pub fn hellos_lost(&self) -> u64 {
        self.hellos_lost.load(Ordering::Relaxed)
    }

    /// The peers cut off for their offences whose block has not ended.
    pub fn cut_off(&self) -> Vec<CutOff> {
        self.conduct.cut_off()
    }

    /// Per offence: how many were counted since the start, and how many peers it cut off.
    pub fn offences(&self) -> Vec<(Offence, u64, u64)> {
        self.conduct.counts()
    }

    /// The addresses it listens on (without `/p2p/`).
    pub fn addrs(&self) -> &[Multiaddr] {
        &self.addrs
    }

    /// The addresses with `/p2p/PEER`, for others to dial.
    pub fn dial_addrs(&self) -> Vec<Multiaddr> {
        self.addrs.iter().map(|a| with_peer(a, self.peer)).collect()
    }

    /// Who this daemon is, as its certificate says.
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// How many requests this daemon has sent (every one goes on a control stream).
    pub fn stream_requests(&self) -> u64 {
        self.links.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Who `peer` is, if its certificate has passed on a connection still open.
    pub fn identity(&self, peer: &PeerId) -> Option<Principal> {
        self.known.read().get(peer).map(|p| p.principal.clone())
    }

    /// Waits until both certificates have passed on a connection with `peer` (dialing `addrs`
    /// if not connected), unless they have already; returns who the peer is. Call it before
    /// opening a stream to a peer, as streams from peers that have not passed are dropped.
    ///
    /// # Errors
    /// The peer cannot be reached in time, or either side refuses the other's certificate.
    pub async fn authenticate(
        &self,
        peer: PeerId,
        addrs: &[Multiaddr],
    ) -> Result<Principal, NetError> {
        if let Some(p) = self.known.read().get(&peer).filter(|p| p.mutual) {
            return Ok(p.principal.clone());
        }
        let error = |problem| NetError::new(peer, problem);
        let gone = || error(NetProblem::Stopped);
        let (reply, rx) = oneshot::channel();
        let addrs = addrs.to_vec();
        let command = Command::Authenticate { peer, addrs, reply };
        self.commands.send(command).await.map_err(|_| gone())?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(r) => r.map_err(|_| gone())?,
            Err(_) => Err(error(NetProblem::NotAuthenticated(self.timeout))),
        }
    }

    /// A handle for opening queue-data and image streams (they are accepted with
    /// [`Net::accept`]).
    pub fn streams(&self) -> libp2p_stream::Control {
        self.streams.clone()
    }

    /// The inbound streams of `protocol` from peers whose certificate has passed, each with its
    /// peer's identity. A stream from any other peer is dropped here, unread (its opener finds
    /// it closed): this is the one place that checks who opened a stream, for every acceptor
    /// (control streams, queue data, images).
    ///
    /// # Errors
    /// The protocol is being accepted already.
    pub fn accept(
        &self,
        protocol: libp2p::StreamProtocol,
    ) -> Result<
        impl futures::Stream<Item = (PeerId, Principal, libp2p::Stream)> + Send + Unpin + use<>,
        AlreadyAccepted,
    > {
        let incoming = self
            .streams
            .clone()
            .accept(protocol.clone())
            .map_err(|_| AlreadyAccepted(protocol.clone()))?;
        let known = self.known.clone();
        Ok(futures::StreamExt::filter_map(
            incoming,
            move |(peer, stream)| {
                let who = known.read().get(&peer).map(|p| p.principal.clone());
                if who.is_none() {
                    tracing::warn!(%peer, %protocol, "a stream from an unauthenticated peer; dropped");
                }
                futures::future::ready(who.map(|w| (peer, w, stream)))
            },
        ))
    }

    /// Sends `request` to `peer` on its control stream and waits for the answer; without a
    /// stream, first connects (dialing `addrs` if needed), waits for both certificates to pass
    /// and opens the stream. An error answer from the peer is returned as
    /// `Ok(Response::Error(..))`.
    ///
    /// # Errors
    /// The request could not be delivered or answered (dial failure, a refused certificate,
    /// timeout, closed stream, invalid response).
    pub async fn request(
        &self,
        peer: PeerId,
        addrs: &[Multiaddr],
        request: Request,
    ) -> Result<Response, NetError> {
        let mut request = request;
        // A stream found closed before the request went on it is opened again, once.
        for _ in 0..2 {
            let link = match self.links.get(&peer) {
                Some(link) => link,
                None => {
                    self.authenticate(peer, addrs).await?;
                    self.links.open(peer, &self.streams).await?
                }
            };
            match self.links.send(peer, &link, request).await {
                Sent::Done(r) => return r,
                Sent::NotSent(r) => {
                    self.links.forget(&peer, &link);
                    request = r;
                }
            }
        }
        Err(NetError::new(peer, NetProblem::KeepsClosing))
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

    /// The CAs this daemon trusts, and the revocation lists it holds (shared with the
    /// certificate exchange: a list taken here refuses the certificates it revokes at once).
    pub fn trust(&self) -> &crate::pki::Trust {
        &self.trust
    }

    /// The serial (hex) of the certificate `peer` passed with, while it is connected.
    pub fn cert_serial(&self, peer: &PeerId) -> Option<String> {
        Some(self.known.read().get(peer)?.cert.serial.clone())
    }

    /// Checks the certificate of every peer connected again (after a revocation list was
    /// taken) and closes the connections of those that no longer pass; returns them, and why.
    pub async fn recheck(&self) -> Vec<(PeerId, Principal, crate::pki::AuthError)> {
        let failed: Vec<_> = self
            .known
            .read()
            .iter()
            .filter_map(|(peer, p)| {
                let e = self.trust.verify(&p.cert.der, peer).err()?;
                Some((*peer, p.principal.clone(), e))
            })
            .collect();
        for (peer, ..) in &failed {
            self.disconnect(*peer).await;
        }
        failed
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

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
