//! A TCP transport that dials from a fresh port every time.
//!
//! libp2p's TCP transport dials from the port it listens on (`PortUse::Reuse`, the default of
//! every dial a behaviour starts: the swarm task's, streams, gossipsub). Two daemons that dial
//! each other at the same moment then send SYNs between the same two ports, and the kernel
//! joins them into one connection by TCP simultaneous open, on which both sides act as the
//! dialer: the security handshake fails for both, and a request waiting on it failed (with
//! "Failed to dial the requested peer", in the days of request-response). Nothing here needs the listening port on outbound
//! connections (no hole punching, no NAT to keep open), so every dial takes a new ephemeral
//! port, and two dials between the same daemons are always two connections of their own.

use std::pin::Pin;
use std::task::{Context, Poll};

use libp2p::Multiaddr;
use libp2p::core::Transport;
use libp2p::core::transport::{DialOpts, ListenerId, PortUse, TransportError, TransportEvent};

/// Wraps a transport so that every dial allocates a new local port.
#[derive(Debug)]
pub(crate) struct NewPorts<T>(pub(crate) T);

impl<T: Transport + Unpin> Transport for NewPorts<T> {
    type Output = T::Output;
    type Error = T::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = T::Dial;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        self.0.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.0.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        self.0.dial(
            addr,
            DialOpts {
                port_use: PortUse::New,
                ..opts
            },
        )
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Pin::new(&mut self.0).poll(cx)
    }
}
