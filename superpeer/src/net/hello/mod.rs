//! The certificate exchange, a property of the connection: a [`NetworkBehaviour`] whose handler
//! runs on every connection as soon as it is established.
//!
//! Each side opens one [`HELLO_PROTOCOL`] stream and sends its certificate in a [`Hello`]; the
//! other side reads at most [`MAX_HELLO`] bytes of it, judges it here
//! ([`crate::pki::Trust::verify`], against the connection's peer id) and answers with a
//! [`Verdict`]. A peer whose certificate passes is recorded in [`Known`] *before* its verdict is
//! written, so that a stream it opens after reading that verdict always finds it known. The
//! connection has passed once both certificates have ([`Event::Passed`]); one whose exchange
//! fails or does not end within the deadline is reported ([`Event::Failed`]) for the swarm task
//! to close. A peer's entry in [`Known`] lasts while a connection on which it passed is open.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, NotifyHandler, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm, behaviour::PeerAddresses,
};
use libp2p::{Multiaddr, PeerId};
use mvm_component::policy::Principal;
use parking_lot::RwLock;

use crate::pki::Credentials;
use crate::proto::Verdict;
#[cfg(doc)]
use crate::proto::{HELLO_PROTOCOL, Hello, MAX_HELLO};
use handler::{Handler, ToBehaviour};

mod handler;

/// Who a peer is, as its certificate says on a connection still open.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    /// Who its certificate names.
    pub(crate) principal: Principal,
    /// Whether it has taken this daemon's certificate too, on such a connection: streams are
    /// opened only to a peer that has (it serves them only then).
    pub(crate) mutual: bool,
    /// The certificate that passed: checked again when a revocation list is taken.
    pub(crate) cert: Passed,
}

/// A certificate that passed: as the peer sent it (DER), and its serial (hex), read once.
#[derive(Debug, Clone)]
pub(crate) struct Passed {
    /// The certificate.
    pub(crate) der: Bytes,
    /// Its serial number, hex (what a revocation names; the jobs a user submits record it).
    pub(crate) serial: String,
}

/// The peers whose certificates have passed, shared with the [`Net`](super::Net) handles: the
/// one place that says whether a peer's streams are served.
pub(crate) type Known = Arc<RwLock<HashMap<PeerId, Peer>>>;

/// What the exchange tells the swarm task.
#[derive(Debug)]
pub(crate) enum Event {
    /// Both certificates passed on a connection with `peer`.
    Passed {
        /// The peer.
        peer: PeerId,
        /// The connection.
        connection: ConnectionId,
        /// Who it is.
        principal: Principal,
    },
    /// This daemon refused the peer's certificate (the connection is reported as failed once the
    /// peer has been told why).
    Refused {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// The exchange failed on `connection`, which is to be closed.
    Failed {
        /// The peer.
        peer: PeerId,
        /// The connection.
        connection: ConnectionId,
        /// Why, for the log and for whoever waits for the peer.
        reason: String,
        /// Whether a new connection would fare the same (a refusal, a timeout).
        fatal: bool,
    },
}

/// One connection's standing in the exchange.
#[derive(Debug, Default)]
struct Conn {
    /// Who the peer is, once its certificate has passed, and that certificate.
    theirs: Option<(Principal, Passed)>,
    /// Whether the peer took this daemon's certificate.
    taken: bool,
}

/// The certificate exchange on every connection.
pub(crate) struct Behaviour {
    /// This daemon's credentials: its certificate, and the CAs it trusts.
    creds: Arc<Credentials>,
    /// Its certificate, as sent.
    cert: Bytes,
    /// How long a connection's exchange may take.
    deadline: Duration,
    /// The peers that have passed, shared.
    known: Known,
    /// Every open connection's standing, by peer.
    conns: HashMap<PeerId, HashMap<ConnectionId, Conn>>,
    /// Events for the swarm and verdicts for handlers, in order.
    events: VecDeque<ToSwarm<Event, Verdict>>,
    /// The addresses requests gave for peers ([`libp2p::Swarm::add_peer_address`]), for the
    /// swarm task's dials.
    addresses: PeerAddresses,
}

/// Connections whose certificate exchange has not ended that a daemon holds at most: a new
/// inbound connection over them is refused (each is closed within the exchange's deadline).
pub(crate) const UNPASSED: usize = 256;

/// Why an inbound connection was refused before its exchange.
#[derive(Debug, thiserror::Error)]
#[error("{0} connections have not exchanged certificates yet")]
struct TooManyUnpassed(usize);

/// How many peers' addresses are kept (the least recently used are forgotten).
const ADDRESSED_PEERS: NonZeroUsize = match NonZeroUsize::new(4096) {
    Some(n) => n,
    None => NonZeroUsize::MIN,
};

impl Behaviour {
    /// Exchanges `creds`' certificate on every connection, within `deadline`, recording the
    /// peers that pass in `known`.
    pub(crate) fn new(creds: Arc<Credentials>, deadline: Duration, known: Known) -> Behaviour {
        Behaviour {
            cert: creds.cert.clone().into(),
            creds,
            deadline,
            known,
            conns: HashMap::new(),
            events: VecDeque::new(),
            addresses: PeerAddresses::new(ADDRESSED_PEERS),
        }
    }

    /// How many open connections have not passed yet (either way).
    fn unpassed(&self) -> usize {
        self.conns
            .values()
            .flat_map(HashMap::values)
            .filter(|c| c.theirs.is_none() || !c.taken)
            .count()
    }

    /// The handler of a new connection, whose standing starts blank.
    fn handler(&mut self, peer: PeerId, connection: ConnectionId) -> Handler {
        self.conns
            .entry(peer)
            .or_default()
            .insert(connection, Conn::default());
        Handler::new(self.cert.clone(), self.deadline)
    }

    /// Brings the peer's entry in [`Known`] up to date with its connections.
    fn refresh(&self, peer: PeerId) {
        let conns = self.conns.get(&peer);
        let passed = conns.into_iter().flatten().filter_map(|(_, c)| {
            let (p, cert) = c.theirs.as_ref()?;
            Some((p, cert, c.taken))
        });
        let mut entry: Option<Peer> = None;
        for (principal, cert, taken) in passed {
            let e = entry.get_or_insert_with(|| Peer {
                principal: principal.clone(),
                mutual: false,
                cert: cert.clone(),
            });
            e.mutual |= taken;
        }
        let mut known = self.known.write();
        match entry {
            Some(e) => known.insert(peer, e),
            None => known.remove(&peer),
        };
    }

    /// Judges the peer's certificate; the verdict goes back to the connection's handler.
    fn judge(&mut self, peer: PeerId, connection: ConnectionId, cert: &[u8]) {
        let verdict = match self.creds.trust.verify(cert, &peer) {
            Ok(principal) => {
                tracing::debug!(%peer, %principal, "a peer's certificate passed");
                if let Some(c) = self.conn(peer, connection) {
                    let passed = Passed {
                        der: Bytes::copy_from_slice(cert),
                        serial: crate::pki::serial_of_der(cert)
                            .map(hex::encode)
                            .unwrap_or_default(),
                    };
                    c.theirs = Some((principal, passed));
                }
                // Known before it hears so: its next stream is served.
                self.refresh(peer);
                self.check_passed(peer, connection);
                Verdict::Passed
            }
            Err(e) => {
                let me = self.creds.peer();
                let reason = format!("{me} refuses {peer}'s certificate: {e}");
                let refused = Event::Refused {
                    peer,
                    reason: reason.clone(),
                };
                self.events.push_back(ToSwarm::GenerateEvent(refused));
                Verdict::Refused(reason)
            }
        };
        self.events.push_back(ToSwarm::NotifyHandler {
            peer_id: peer,
            handler: NotifyHandler::One(connection),
            event: verdict,
        });
    }

    /// A connection's standing, while it is open.
    fn conn(&mut self, peer: PeerId, connection: ConnectionId) -> Option<&mut Conn> {
        self.conns.get_mut(&peer)?.get_mut(&connection)
    }

    /// Reports the connection as passed once both certificates have.
    fn check_passed(&mut self, peer: PeerId, connection: ConnectionId) {
        let Some(Conn {
            theirs: Some((principal, _)),
            taken: true,
        }) = self.conn(peer, connection)
        else {
            return;
        };
        let principal = principal.clone();
        self.refresh(peer);
        self.events.push_back(ToSwarm::GenerateEvent(Event::Passed {
            peer,
            connection,
            principal,
        }));
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Event;

    fn handle_established_inbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let unpassed = self.unpassed();
        if unpassed >= UNPASSED {
            tracing::warn!(%peer, %remote, "a connection refused: {unpassed} others have not exchanged certificates yet");
            return Err(ConnectionDenied::new(TooManyUnpassed(unpassed)));
        }
        Ok(self.handler(peer, connection))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        Ok(peer.map_or_else(Vec::new, |p| self.addresses.get(&p).collect()))
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer, connection))
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        self.addresses.on_swarm_event(&event);
        // A connection another behaviour denied after this one took it ends here too.
        let (peer, connection) = match event {
            FromSwarm::ConnectionClosed(c) => (c.peer_id, c.connection_id),
            FromSwarm::DialFailure(f) => match f.peer_id {
                Some(p) => (p, f.connection_id),
                None => return,
            },
            FromSwarm::ListenFailure(f) => match f.peer_id {
                Some(p) => (p, f.connection_id),
                None => return,
            },
            _ => return,
        };
        let Some(conns) = self.conns.get_mut(&peer) else {
            return;
        };
        if conns.remove(&connection).is_none() {
            return;
        }
        if conns.is_empty() {
            self.conns.remove(&peer);
        }
        // An identity holds for the connections it was proven on.
        self.refresh(peer);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {
            ToBehaviour::Cert(cert) => self.judge(peer, connection, &cert),
            ToBehaviour::Taken => {
                if let Some(c) = self.conn(peer, connection) {
                    c.taken = true;
                }
                self.check_passed(peer, connection);
            }
            ToBehaviour::Failed { reason, fatal } => {
                self.events.push_back(ToSwarm::GenerateEvent(Event::Failed {
                    peer,
                    connection,
                    reason,
                    fatal,
                }));
            }
        }
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Event, THandlerInEvent<Self>>> {
        match self.events.pop_front() {
            Some(e) => Poll::Ready(e),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests;
