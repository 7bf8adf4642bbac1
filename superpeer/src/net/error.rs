//! Why a request did not get through to a peer, or its answer back: [`NetError`].

use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;

use crate::proto;
use crate::rpc::StreamError;

/// A protocol whose inbound streams are taken already (by another
/// [`Net::accept`](super::Net::accept)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the streams of {0} are accepted already")]
pub struct AlreadyAccepted(pub libp2p::StreamProtocol);

/// A request that failed on the way (not an error answer from the peer): to whom, and what
/// went wrong.
#[derive(Debug, Clone, thiserror::Error)]
#[error("peer {peer}: {problem}")]
pub struct NetError {
    /// The peer.
    pub peer: PeerId,
    /// What went wrong.
    pub problem: NetProblem,
}

impl NetError {
    /// `problem` on the way to `peer`.
    pub(crate) fn new(peer: PeerId, problem: NetProblem) -> NetError {
        NetError { peer, problem }
    }
}

/// What went wrong on the way to a peer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetProblem {
    /// This daemon's network task has stopped.
    #[error("the network task has stopped")]
    Stopped,
    /// This daemon is shutting down (a request to itself).
    #[error("this daemon is shutting down")]
    ShuttingDown,
    /// The peer cannot be dialed (libp2p's reason).
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The certificate exchange failed, or a certificate was refused (the reason given).
    #[error("{0}")]
    Hello(String),
    /// Every connection made closed before the certificates were exchanged (the last cause).
    #[error("the connection closed before certificates were exchanged: {0}")]
    Lost(String),
    /// Both certificates had not passed in time.
    #[error("not authenticated within {} s", .0.as_secs_f64())]
    NotAuthenticated(Duration),
    /// The control stream is not there, or stopped.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The request does not encode within the frame limit.
    #[error("the request cannot be sent: {0}")]
    Encode(Arc<std::io::Error>),
    /// The answer does not pass the checks of its message.
    #[error("invalid response: {0}")]
    Invalid(proto::CheckError),
    /// No answer came in time.
    #[error("no answer within {} s", .0.as_secs_f64())]
    NoAnswer(Duration),
    /// The control stream closed each time before the request went on it.
    #[error("its control stream keeps closing")]
    KeepsClosing,
}
