//! The job log's messages between replicas, over the daemon's one control transport: each is a
//! [`PeerRequest::Raft`](crate::proto::PeerRequest::Raft) on the certificate-authenticated libp2p connection between two
//! super-peers, answered with openraft's result.

use crate::proto::PeerRequest;
use bytes::Bytes;
use libp2p::{Multiaddr, PeerId};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{LogError, NodeId, Replica, TypeConfig};
use crate::net::Net;
use crate::proto::{Failure, RaftRpc, Request, Response};

/// Opens connections to replicas.
pub(crate) struct Network {
    pub(crate) net: Net,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &Replica) -> Connection {
        Connection {
            net: self.net.clone(),
            target,
            peer: node.peer_id(),
            addrs: node.multiaddrs(),
        }
    }
}

/// A replica to send to.
pub(crate) struct Connection {
    net: Net,
    target: NodeId,
    /// Its peer, or why its record names none.
    peer: Result<PeerId, LogError>,
    addrs: Vec<Multiaddr>,
}

/// Why a message did not reach its replica or was not answered by it.
#[derive(Debug, thiserror::Error)]
enum Undelivered {
    /// The replica's record names no peer.
    #[error(transparent)]
    Replica(LogError),
    /// The message does not encode.
    #[error("a job-log message that does not encode: {0}")]
    Encode(ciborium::ser::Error<std::io::Error>),
    /// The replica did not answer in time.
    #[error("{0} did not answer in time")]
    Timeout(PeerId),
    /// The request failed on the way, or the replica answered with an error.
    #[error("{0}")]
    Failed(Failure),
    /// The replica answered with something other than openraft's result.
    #[error("{peer} answered a job-log message with {answer:?}")]
    Unexpected {
        /// The replica.
        peer: PeerId,
        /// Its answer.
        answer: Box<Response>,
    },
    /// openraft's result does not decode.
    #[error("{peer}'s answer: {error}")]
    Decode {
        /// The replica.
        peer: PeerId,
        /// Why.
        error: ciborium::de::Error<std::io::Error>,
    },
}

fn encode<T: Serialize>(v: &T) -> Result<Bytes, Undelivered> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).map_err(Undelivered::Encode)?;
    Ok(out.into())
}

impl Connection {
    /// Sends one message and decodes openraft's result from the answer.
    async fn call<R, E>(
        &self,
        rpc: impl FnOnce(Bytes) -> RaftRpc,
        body: Result<Bytes, Undelivered>,
        option: &RPCOption,
    ) -> Result<R, RPCError<NodeId, Replica, E>>
    where
        R: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let network = |e: Undelivered| RPCError::Network(NetworkError::new(&e));
        let peer = self
            .peer
            .clone()
            .map_err(|e| network(Undelivered::Replica(e)))?;
        let request = Request::Peer(PeerRequest::Raft(rpc(body.map_err(network)?)));
        let answer =
            tokio::time::timeout(option.hard_ttl(), self.net.call(peer, &self.addrs, request))
                .await;
        let bytes = match answer {
            Err(_) => {
                let e = Undelivered::Timeout(peer);
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
            Ok(Err(f)) => {
                let e = Undelivered::Failed(f);
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
            Ok(Ok(Response::Raft(b))) => b,
            Ok(Ok(other)) => {
                let answer = Box::new(other);
                return Err(network(Undelivered::Unexpected { peer, answer }));
            }
        };
        let result: Result<R, E> = ciborium::from_reader(bytes.as_ref())
            .map_err(|error| network(Undelivered::Decode { peer, error }))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Replica, RaftError<NodeId>>> {
        self.call(RaftRpc::Append, encode(&req), &option).await
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Replica, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(RaftRpc::Snapshot, encode(&req), &option).await
    }

    async fn vote(
        &mut self,
        req: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Replica, RaftError<NodeId>>> {
        self.call(RaftRpc::Vote, encode(&req), &option).await
    }
}
