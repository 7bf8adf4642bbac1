//! The job log's messages between replicas, over the daemon's one control transport: each is a
//! [`PeerRequest::Raft`](crate::proto::PeerRequest::Raft) on the certificate-authenticated libp2p connection between two
//! super-peers, answered with openraft's result.

use crate::proto::PeerRequest;
use bytes::Bytes;
use libp2p::{Multiaddr, PeerId};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
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

/// The most bytes of entries an append carries. openraft gives an append the heartbeat
/// interval to be answered in, and sends a follower that is behind as many entries as it lacks
/// (up to 300, each a batch of up to 512 commands): a follower left far behind by a busy
/// leader was then sent appends it could not take in time, at every try, and a new leader
/// that needed it for a majority never committed anything (seen with 256 clients in `mvm
/// bench broker`: no job accepted within 30 s of killing the leader).
const MAX_APPEND: usize = 256 << 10;

/// How many entries to send instead, when `entries` entries encode to `len` bytes, more than
/// [`MAX_APPEND`]; `None` when they may go as they are (a single entry always may).
fn fewer_entries(len: usize, entries: usize) -> Option<u64> {
    if len <= MAX_APPEND || entries <= 1 {
        return None;
    }
    let n = entries as u64;
    Some((n * MAX_APPEND as u64 / len as u64).clamp(1, n - 1))
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
        let body = encode(&req);
        if let Ok(b) = &body
            && let Some(hint) = fewer_entries(b.len(), req.entries.len())
        {
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(hint),
            ));
        }
        self.call(RaftRpc::Append, body, &option).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_append_over_the_bound_asks_for_fewer_entries_and_a_single_entry_always_goes() {
        assert_eq!(fewer_entries(MAX_APPEND, 300), None);
        assert_eq!(
            fewer_entries(MAX_APPEND * 10, 1),
            None,
            "one entry always goes"
        );
        assert_eq!(fewer_entries(MAX_APPEND * 10, 300), Some(30));
        assert_eq!(fewer_entries(MAX_APPEND * 1000, 300), Some(1));
        assert_eq!(fewer_entries(MAX_APPEND + 1, 2), Some(1));
    }
}
