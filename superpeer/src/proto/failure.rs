//! Why a request failed: [`Failure`], and the one place where the errors of every module
//! that can reach the wire say which [`FailureKind`] they are.
//!
//! A caller turns such an error into a failure with `Failure::from(e)` and never picks a kind
//! by hand.

use serde::{Deserialize, Serialize};

use super::{CheckError, LimitError};
use crate::broker::{PlaceError, Refusal};
use crate::environment::EnvError;
use crate::joblog::{CommandError, LogError};
use crate::net::{AddrError, NetError, StartError};
use crate::pki::AuthError;
use crate::policy::PolicyError;
use crate::schedule::ScheduleError;

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// The class of failure.
    pub kind: FailureKind,
    /// A one-line message naming the file, vertex or peer concerned.
    pub message: String,
}

/// Classes of failure; they map to the CLI's exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// Bad input: profile, topology, module, message.
    Input,
    /// Refused by policy.
    Refused,
    /// It ran (or tried to) and failed.
    Failed,
    /// No such job, module or node.
    NotFound,
    /// Not possible now: no node fits, not the broker, shutting down.
    Unavailable,
}

impl Failure {
    /// A failure of `kind`.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

/// How the message of a failure ends when its request was refused before anything was done
/// with it (by a replica that does not lead): a client may send it again, to the leader.
pub const UNTAKEN: &str = "nothing was taken";

/// `From<E> for Failure` for each error type `E`, with the failure kind it is.
macro_rules! kinds {
    ($($(#[$doc:meta])* $error:ty => $kind:expr;)*) => {$(
        $(#[$doc])*
        impl From<$error> for Failure {
            fn from(e: $error) -> Failure {
                let kind: fn(&$error) -> FailureKind = $kind;
                Failure::new(kind(&e), e.to_string())
            }
        }
    )*};
}

kinds! {
    /// A message with a bad field is bad input.
    CheckError => |_| FailureKind::Input;
    /// Limits that cannot be enforced are bad input (the profile's).
    LimitError => |_| FailureKind::Input;
    /// A rank expression that does not parse is bad input; a job that does not fit the free
    /// slots cannot be placed now.
    ScheduleError => |e| match e {
        ScheduleError::Rank { .. } => FailureKind::Input,
        ScheduleError::TooFewSlots { .. } | ScheduleError::TooFewSlotsOnBest { .. } => {
            FailureKind::Unavailable
        }
    };
    /// A command the job log refuses asks what the job's state does not allow: bad input.
    CommandError => |_| FailureKind::Input;
    /// Asking for policies without the right is a refusal; policies that do not load, a bad
    /// source and a daemon without policy files are bad input (the administrator's); a fetch
    /// fails as its source did, and a bundle that arrives wrong is a failure.
    PolicyError => |e| match e {
        PolicyError::NotANode(_) | PolicyError::Denied(_) => FailureKind::Refused,
        PolicyError::Bundle(_)
        | PolicyError::Dir { .. }
        | PolicyError::Source(_)
        | PolicyError::NoDirectory { .. } => FailureKind::Input,
        PolicyError::Fetch { failure, .. } => failure.kind,
        PolicyError::Digest | PolicyError::Answer(_) => FailureKind::Failed,
    };
    /// A refused certificate is a refusal.
    AuthError => |_| FailureKind::Refused;
    Refusal => |_| FailureKind::Refused;
    PlaceError => |_| FailureKind::Unavailable;
    /// A command not recorded: the log is not there now (no leader, shutting down), except
    /// for errors of its set-up.
    LogError => |e| match e {
        LogError::Open { .. } => FailureKind::Failed,
        LogError::NotAPeer(_) | LogError::NotAmong(_) => FailureKind::Input,
        LogError::NotLeader { .. } | LogError::Raft(_) => FailureKind::Unavailable,
    };
    /// An environment that cannot be made is a failure of the node.
    EnvError => |_| FailureKind::Failed;
    /// An address that names no peer is bad input.
    AddrError => |_| FailureKind::Input;
    /// A network that does not start leaves nothing to ask with now.
    StartError => |_| FailureKind::Unavailable;
    /// A request that failed on the way: the peer cannot be reached or answered now.
    NetError => |_| FailureKind::Unavailable;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{Graph, Rank, place};

    #[test]
    fn each_error_says_its_kind() {
        let rank = Rank::parse("cpus +").expect_err("no operand");
        assert_eq!(Failure::from(rank).kind, FailureKind::Input);
        let g = Graph {
            vertices: 3,
            edges: Vec::new(),
        };
        let full = place(&g, &[1], 1).expect_err("too few slots");
        let f = Failure::from(full);
        assert_eq!(f.kind, FailureKind::Unavailable);
        assert_eq!(
            f.message,
            "3 vertices do not fit in the 1 free slots of 1 nodes"
        );
        let denied = PolicyError::Denied("no".into());
        assert_eq!(Failure::from(denied).kind, FailureKind::Refused);
        let ended = CommandError::NoJob("j-1-1".into());
        assert_eq!(
            Failure::from(ended),
            Failure::new(FailureKind::Input, "no job j-1-1")
        );
        assert_eq!(Failure::from(AuthError::Ca).kind, FailureKind::Refused);
        assert_eq!(Failure::from(EnvError::InUse).kind, FailureKind::Failed);
        let nowhere = crate::net::split_peer("nowhere").expect_err("no address");
        assert_eq!(Failure::from(nowhere).kind, FailureKind::Input);
        let record = crate::joblog::Replica {
            peer: "x".into(),
            addrs: Vec::new(),
        };
        let e = record.peer_id().expect_err("no peer id");
        assert_eq!(
            Failure::from(e),
            Failure::new(
                FailureKind::Input,
                "a job-log replica: 'x' is not a peer id"
            )
        );
    }
}
