//! What the roles of one daemon share: who the daemon is, its network, the policies in force,
//! and a way to reach a role of this same daemon without the network. Each role (the broker,
//! the node) owns its own state, and the roles meet only through requests: a broker that
//! places a part on its own daemon's node sends it a `Prepare` as it would to any other node,
//! and it is answered in the process (see [`Site::call`]).

use std::sync::{OnceLock, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use libp2p::{Multiaddr, PeerId};
use mvm_component::policy::Principal;

use crate::net::{Net, NetError, NetProblem};
use crate::policy::Policies;
use crate::proto::{Failure, Request, Response};

/// Answers the requests addressed to this daemon (its router, in [`crate::daemon`]).
pub(crate) trait Local: Send + Sync {
    /// The answer to `request` from `from`, authenticated as `who`.
    fn handle<'a>(
        &'a self,
        from: PeerId,
        who: &'a Principal,
        request: Request,
    ) -> BoxFuture<'a, Response>;
}

/// A daemon as its roles see it.
pub(crate) struct Site {
    /// The network.
    pub(crate) net: Net,
    /// The policies in force.
    pub(crate) policies: Policies,
    /// Its name (for people).
    pub(crate) name: String,
    /// Its group.
    pub(crate) group: String,
    /// Its domain.
    pub(crate) domain: String,
    /// Heartbeat interval.
    pub(crate) heartbeat: Duration,
    /// Silence after which a peer counts as lost.
    pub(crate) lost_after: Duration,
    /// The daemon's router, set once it exists (weak: the router owns the roles that own this).
    local: OnceLock<Weak<dyn Local>>,
}

impl Site {
    /// A site whose router is set later with [`Site::route_to`].
    pub(crate) fn new(
        net: Net,
        policies: Policies,
        name: String,
        group: String,
        domain: String,
        heartbeat: Duration,
        lost_after: Duration,
    ) -> Site {
        Site {
            net,
            policies,
            name,
            group,
            domain,
            heartbeat,
            lost_after,
            local: OnceLock::new(),
        }
    }

    /// Sets where requests to this daemon itself go (once).
    pub(crate) fn route_to(&self, local: Weak<dyn Local>) {
        let _ = self.local.set(local);
    }

    /// This daemon's peer id.
    pub(crate) fn peer(&self) -> PeerId {
        self.net.peer()
    }

    /// Sends `request` to `peer` and waits for the answer, which is given here when `peer` is
    /// this daemon. An error answer is `Ok(Response::Error(..))`.
    ///
    /// # Errors
    /// The request could not be delivered or answered.
    pub(crate) async fn request(
        &self,
        peer: PeerId,
        addrs: &[Multiaddr],
        request: Request,
    ) -> Result<Response, NetError> {
        if peer != self.net.peer() {
            return self.net.request(peer, addrs, request).await;
        }
        let local = self
            .local
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| NetError::new(peer, NetProblem::ShuttingDown))?;
        let me = self.net.principal().clone();
        Ok(local.handle(peer, &me, request).await)
    }

    /// As [`Site::request`], turning an error answer into `Err` too.
    ///
    /// # Errors
    /// A failure on the way, or the peer's error answer.
    pub(crate) async fn call(
        &self,
        peer: PeerId,
        addrs: &[Multiaddr],
        request: Request,
    ) -> Result<Response, Failure> {
        crate::net::answer(self.request(peer, addrs, request).await)
    }
}
