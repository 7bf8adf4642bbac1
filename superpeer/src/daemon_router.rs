//! Where a request to a daemon goes: to its node or to its broker, by the request's kind.

use std::sync::Arc;

use futures::future::BoxFuture;
use libp2p::PeerId;
use mvm_component::policy::Principal;

use crate::broker::Broker;
use crate::node::Node;
use crate::proto::{ClientRequest, Failure, FailureKind, PeerRequest, Request, Response};
use crate::site::{Local, Site};

/// Where a request to this daemon goes: to its node or its broker, by kind.
pub(super) struct Router {
    pub(super) site: Arc<Site>,
    pub(super) node: Arc<Node>,
    /// The broker, on a super-peer (it acts while its replica leads the job log).
    pub(super) broker: Option<Arc<Broker>>,
}

impl Local for Router {
    fn handle<'a>(
        &'a self,
        from: PeerId,
        who: &'a Principal,
        request: Request,
    ) -> BoxFuture<'a, Response> {
        Box::pin(self.route(from, who, request))
    }
}

fn unavailable(m: impl Into<String>) -> Response {
    Response::Error(Failure::new(FailureKind::Unavailable, m))
}

impl Router {
    pub(super) async fn route(&self, peer: PeerId, who: &Principal, request: Request) -> Response {
        let site = &self.site;
        match request {
            Request::Broker(r) => self.node.handle(peer, r).await,
            Request::Peer(PeerRequest::Policy { have }) => {
                crate::policy::serve(site, who, have.as_ref())
            }
            Request::Peer(PeerRequest::Revocations { held }) => {
                crate::revocation::serve(site, &held)
            }
            Request::Client(ClientRequest::PolicyReload) => crate::policy::reload(site, who),
            Request::Peer(PeerRequest::Blobs { put, forget }) => match &self.broker {
                Some(b) => b.keep_blobs(peer, put, &forget),
                None => unavailable(format!("{} keeps no replica of a job log", site.peer())),
            },
            Request::Peer(PeerRequest::Raft(rpc)) => match &self.broker {
                Some(b) => b.log.serve(peer, who, &site.domain, rpc).await,
                None => unavailable(format!("{} keeps no replica of a job log", site.peer())),
            },
            Request::Group => match &self.broker {
                Some(b) => Response::Group(b.group().await),
                None => Response::Group(self.node.view()),
            },
            Request::Leader => match &self.broker {
                Some(b) => Response::Group(b.leader_view()),
                None => Response::Group(self.node.view()),
            },
            Request::Client(mut r) => match &self.broker {
                Some(b) => {
                    // A user's job is known by the certificate it came with (a revocation
                    // finds it so); a forwarding super-peer's says its owner's.
                    if let ClientRequest::Submit(s) | ClientRequest::Offer { submission: s, .. } =
                        &mut r
                        && who.kind == mvm_component::policy::PrincipalKind::User
                    {
                        s.owner_cert = site.net.cert_serial(&peer);
                    }
                    b.client(who, r).await
                }
                None => self.not_a_broker(),
            },
            Request::Node(r) => match &self.broker {
                Some(b) => b.node(peer, who, r).await,
                None => self.not_a_broker(),
            },
        }
    }

    /// The answer to a broker's request on a daemon that is not one: where the broker is.
    fn not_a_broker(&self) -> Response {
        let site = &self.site;
        unavailable(match self.node.superpeer() {
            Some((p, _)) => format!(
                "{} is not the super-peer of group {}; {p} is",
                site.peer(),
                site.group
            ),
            None => format!("{} is not a super-peer", site.peer()),
        })
    }
}
