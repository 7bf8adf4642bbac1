//! A gate in front of another behaviour: the streams a peer opens to it are held, unread, until
//! both certificates have passed on their connection ([`Gated::pass`]), and dropped with the
//! connection if they never do. Everything else goes through unchanged.
//!
//! In front of gossipsub, whose messages (up to its transmit limit, 256 KiB) would otherwise be
//! read from any peer that connects, and of identify and ping, so that no protocol but the
//! certificate exchange reads from a peer before it has passed. Holding, not refusing: a
//! refused protocol is one such handlers never try again on that connection, and a peer's first
//! streams often come before the exchange ends.

use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, NotifyHandler, SubstreamProtocol, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// Streams a peer may open before it has passed; more are dropped unread.
const HELD: usize = 4;

/// `B`, behind the gate.
pub(crate) struct Gated<B> {
    /// The behaviour behind the gate.
    inner: B,
    /// Connections to open the gate of, at the next poll.
    passed: Vec<(PeerId, ConnectionId)>,
}

/// What a gated handler hears from its behaviour.
#[derive(Debug)]
pub(crate) enum Gate<E> {
    /// For the inner handler.
    Inner(E),
    /// The connection has passed: the gate opens.
    Open,
}

impl<B> Gated<B> {
    /// `inner` behind a gate.
    pub(crate) fn new(inner: B) -> Self {
        Gated {
            inner,
            passed: Vec::new(),
        }
    }

    /// The inner behaviour.
    pub(crate) fn inner(&mut self) -> &mut B {
        &mut self.inner
    }

    /// Opens the gate of `connection`: its held streams, and those to come, go through.
    pub(crate) fn pass(&mut self, peer: PeerId, connection: ConnectionId) {
        self.passed.push((peer, connection));
    }
}

impl<B: NetworkBehaviour> NetworkBehaviour for Gated<B> {
    type ConnectionHandler = Handler<THandler<B>>;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(id, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let inner = self
            .inner
            .handle_established_inbound_connection(id, peer, local, remote)?;
        Ok(Handler::new(inner))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        addresses: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner
            .handle_pending_outbound_connection(id, peer, addresses, role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let inner = self
            .inner
            .handle_established_outbound_connection(id, peer, addr, role, port_use)?;
        Ok(Handler::new(inner))
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner.on_connection_handler_event(peer, id, event);
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<B::ToSwarm, THandlerInEvent<Self>>> {
        if let Some((peer_id, connection)) = self.passed.pop() {
            return Poll::Ready(ToSwarm::NotifyHandler {
                peer_id,
                handler: NotifyHandler::One(connection),
                event: Gate::Open,
            });
        }
        self.inner.poll(cx).map(|e| e.map_in(Gate::Inner))
    }
}

/// An inbound stream that has been negotiated, not yet handed on.
type Held<H> = FullyNegotiatedInbound<
    <H as ConnectionHandler>::InboundProtocol,
    <H as ConnectionHandler>::InboundOpenInfo,
>;

/// `H`, behind the gate.
pub(crate) struct Handler<H: ConnectionHandler> {
    /// The handler behind the gate.
    inner: H,
    /// Whether the connection has passed.
    open: bool,
    /// The peer's streams until then.
    held: Vec<Held<H>>,
}

impl<H: ConnectionHandler> Handler<H> {
    /// `inner`, its gate shut.
    fn new(inner: H) -> Self {
        Handler {
            inner,
            open: false,
            held: Vec::new(),
        }
    }
}

impl<H: ConnectionHandler> ConnectionHandler for Handler<H> {
    type FromBehaviour = Gate<H::FromBehaviour>;
    type ToBehaviour = H::ToBehaviour;
    type InboundProtocol = H::InboundProtocol;
    type OutboundProtocol = H::OutboundProtocol;
    type InboundOpenInfo = H::InboundOpenInfo;
    type OutboundOpenInfo = H::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<H::InboundProtocol, H::InboundOpenInfo> {
        self.inner.listen_protocol()
    }

    fn connection_keep_alive(&self) -> bool {
        self.inner.connection_keep_alive()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<H::OutboundProtocol, H::OutboundOpenInfo, H::ToBehaviour>>
    {
        self.inner.poll(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<H::ToBehaviour>> {
        self.inner.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        match event {
            Gate::Inner(e) => self.inner.on_behaviour_event(e),
            Gate::Open => {
                self.open = true;
                for s in std::mem::take(&mut self.held) {
                    self.inner
                        .on_connection_event(ConnectionEvent::FullyNegotiatedInbound(s));
                }
            }
        }
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            '_,
            H::InboundProtocol,
            H::OutboundProtocol,
            H::InboundOpenInfo,
            H::OutboundOpenInfo,
        >,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(s) if !self.open => {
                if self.held.len() < HELD {
                    self.held.push(s);
                }
            }
            e => self.inner.on_connection_event(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use futures::future::{Ready, ready};
    use libp2p::core::upgrade::{DeniedUpgrade, InboundUpgrade, UpgradeInfo};

    use super::*;

    /// An upgrade whose streams are numbers, so that a test can make them.
    struct Numbered;

    impl UpgradeInfo for Numbered {
        type Info = &'static str;
        type InfoIter = [&'static str; 1];
        fn protocol_info(&self) -> Self::InfoIter {
            ["/numbered"]
        }
    }

    impl<C> InboundUpgrade<C> for Numbered {
        type Output = u32;
        type Error = Infallible;
        type Future = Ready<Result<u32, Infallible>>;
        fn upgrade_inbound(self, _: C, _: &'static str) -> Self::Future {
            ready(Ok(0))
        }
    }

    /// A handler that records the inbound streams it gets.
    #[derive(Default)]
    struct Probe {
        got: Vec<u32>,
    }

    impl ConnectionHandler for Probe {
        type FromBehaviour = ();
        type ToBehaviour = ();
        type InboundProtocol = Numbered;
        type OutboundProtocol = DeniedUpgrade;
        type InboundOpenInfo = ();
        type OutboundOpenInfo = ();

        fn listen_protocol(&self) -> SubstreamProtocol<Numbered> {
            SubstreamProtocol::new(Numbered, ())
        }

        fn poll(
            &mut self,
            _: &mut Context<'_>,
        ) -> Poll<ConnectionHandlerEvent<DeniedUpgrade, (), ()>> {
            Poll::Pending
        }

        fn on_behaviour_event(&mut self, (): ()) {}

        fn on_connection_event(&mut self, event: ConnectionEvent<'_, Numbered, DeniedUpgrade>) {
            if let ConnectionEvent::FullyNegotiatedInbound(s) = event {
                self.got.push(s.protocol);
            }
        }
    }

    fn stream(n: u32) -> ConnectionEvent<'static, Numbered, DeniedUpgrade> {
        ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
            protocol: n,
            info: (),
        })
    }

    #[test]
    fn streams_are_held_unread_until_the_gate_opens() {
        let mut h = Handler::new(Probe::default());
        for n in 0..6 {
            h.on_connection_event(stream(n));
        }
        assert!(h.inner.got.is_empty(), "nothing reaches the inner handler");
        h.on_behaviour_event(Gate::Inner(()));
        assert!(
            h.inner.got.is_empty(),
            "its own events do not open the gate"
        );
        h.on_behaviour_event(Gate::Open);
        assert_eq!(h.inner.got, [0, 1, 2, 3], "the first {HELD}, in order");
        h.on_connection_event(stream(9));
        assert_eq!(h.inner.got, [0, 1, 2, 3, 9], "open: straight through");
    }
}
