//! Finding the group's leading super-peer, again when it changes under a client.

use std::time::Duration;

use libp2p::{Multiaddr, PeerId};

use super::preferred;
use crate::net::{Net, split_peer};
use crate::proto::{ClientRequest, Failure, FailureKind, Request, Response};

/// The group's leading super-peer, found through any of `addrs` (as [`super::Client::find`]).
pub(super) async fn leader(net: &Net, addrs: &[String]) -> Result<(PeerId, Multiaddr), Failure> {
    let mut last = Failure::new(FailureKind::Unavailable, "no super-peer address given");
    for text in addrs {
        let first = match split_peer(text) {
            Ok(p) => p,
            Err(e) => {
                last = e.into();
                continue;
            }
        };
        let mut next = Some(first);
        // At most one redirect: the node's super-peer must answer as one.
        for _ in 0..2 {
            let Some((peer, a)) = next.take() else { break };
            let t = crate::net::with_peer(&a, peer);
            let probe = net.call(peer, std::slice::from_ref(&a), Request::Leader);
            match tokio::time::timeout(Duration::from_secs(5), probe).await {
                Ok(Ok(Response::Group(g))) if g.is_broker => return Ok((peer, a)),
                Ok(Ok(Response::Group(g))) => {
                    last = Failure::new(
                        FailureKind::Unavailable,
                        format!("{t} is not a super-peer and knows none that answers"),
                    );
                    next = preferred(&g.broker_addrs).and_then(crate::net::split_addr);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => last = e,
                Err(_) => {
                    last = Failure::new(
                        FailureKind::Unavailable,
                        format!("{t}: no answer within 5 s"),
                    );
                }
            }
        }
    }
    Err(last)
}

/// How many times a client asks for a new leader, a second apart, while none answers as one.
pub(super) const LEADER_TRIES: u32 = 5;

/// Whether `f` says a super-peer that does not lead refused a request before it did anything
/// with it: the request may go again, to the leader. (One refused later, as its proposal
/// failed, may yet be committed by the next leader.)
pub(super) fn refused_as_follower(f: &Failure) -> bool {
    f.kind == FailureKind::Unavailable && f.message.ends_with(crate::proto::UNTAKEN)
}

/// Whether `r` only reads (so that it may be sent again, to another super-peer).
pub(super) fn reads(r: &ClientRequest) -> bool {
    matches!(
        r,
        ClientRequest::Status { .. }
            | ClientRequest::Wait { .. }
            | ClientRequest::Logs { .. }
            | ClientRequest::Agreements { .. }
            | ClientRequest::Missing { .. }
    )
}
