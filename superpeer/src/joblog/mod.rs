//! A group's job log: its control state ([`state::ControlState`]: jobs and their transitions,
//! where parts run, what owners and nodes hold, the pending queue, the history) kept as a log
//! of [`Command`]s replicated over the group's super-peer candidates by Raft (openraft), each
//! replica's log and snapshot stored in an embedded database (redb).
//!
//! The replica that leads the log is the group's broker: only it proposes commands, and a
//! command counts once a majority of the replicas has stored it. A leader that dies or is cut
//! off is replaced by another replica within an election timeout, with every committed job; a
//! minority cut off from the others cannot commit anything, so a partition never has two
//! brokers accepting jobs. A group of one replica works too (it commits alone).
//!
//! ```text
//!   broker (leader)  --propose(Command)-->  openraft  --PeerRequest::Raft over libp2p-->  replicas
//!                                              |                                         |
//!                                           redb log, snapshot                  redb log, snapshot
//!                                              v                                         v
//!                                        ControlState::apply                    ControlState::apply
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use libp2p::{Multiaddr, PeerId};
use mvm_component::policy::{Principal, PrincipalKind};
use openraft::error::RaftError;
use openraft::{Raft, SnapshotPolicy};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::sync::watch;

use crate::net::Net;
use crate::proto::{Failure, FailureKind, JobId, RaftRpc, Response};

mod agreements;
pub mod bank;
mod command;
mod machine;
mod network;
mod propose;
mod record;
pub mod state;
mod store;

pub use state::{Applied, Command, CommandError, ControlState};

/// A replica's id in the log: the first eight bytes of the SHA-256 of its peer id.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The job log's types for openraft.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeId,
        Node = Replica,
);

/// A replica of the log: a super-peer candidate and where to reach it.
///
/// Kept as text because openraft needs a `Default` node, which a peer id has not; built only by
/// [`Replica::new`], and read back by [`Replica::peer_id`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// Its peer id.
    pub peer: String,
    /// Its addresses (without `/p2p/`).
    pub addrs: Vec<String>,
}

impl Replica {
    /// The replica at `peer`, reached at `addrs`.
    pub fn new(peer: PeerId, addrs: &[Multiaddr]) -> Replica {
        Replica {
            peer: peer.to_string(),
            addrs: addrs.iter().map(ToString::to_string).collect(),
        }
    }

    /// Its peer id.
    ///
    /// # Errors
    /// The record holds no peer id (it was not made by [`Replica::new`]).
    pub fn peer_id(&self) -> Result<PeerId, LogError> {
        self.peer
            .parse()
            .map_err(|_| LogError::NotAPeer(self.peer.clone()))
    }

    /// Its addresses that parse.
    pub fn multiaddrs(&self) -> Vec<Multiaddr> {
        self.addrs.iter().filter_map(|a| a.parse().ok()).collect()
    }
}

/// The log id of a peer.
pub fn node_id(peer: &PeerId) -> NodeId {
    let digest = sha2::Sha256::digest(peer.to_bytes());
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(id)
}

/// How the log runs.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// How often the leader sends heartbeats.
    pub heartbeat: Duration,
    /// The election timeout's bounds. A follower that has heard from a leader stands for
    /// election after the leader's lease (the upper bound) and a random time between the two
    /// without hearing from it again (openraft's rule): a leader that is lost is replaced
    /// between 1.5 and 2 upper bounds after its last heartbeat, and one vote round.
    pub election_timeout: (Duration, Duration),
    /// Entries after which a snapshot is taken (and the log before it purged).
    pub snapshot_every: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            heartbeat: Duration::from_millis(100),
            election_timeout: (Duration::from_millis(300), Duration::from_millis(600)),
            snapshot_every: 20_000,
        }
    }
}

/// What can go wrong with the job log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// The database cannot be opened or read.
    #[error("the job log at {path}: {message}")]
    Open {
        /// Its file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// This replica does not lead: commands go to the leader.
    #[error("this super-peer does not lead the group's job log{}", match leader {
        Some(l) => format!("; {l} does"),
        None => "; no replica leads it now (an election is under way, or too few replicas \
                 are reachable)".into(),
    })]
    NotLeader {
        /// The leader, when known.
        leader: Option<PeerId>,
    },
    /// A replica record whose peer is not a peer id.
    #[error("a job-log replica: '{0}' is not a peer id")]
    NotAPeer(String),
    /// This replica is not among those it was asked to start the log with.
    #[error("a job-log replica: {0} is not among the replicas it was asked to start the log with")]
    NotAmong(PeerId),
    /// Raft itself failed (storage, shutdown, a bad configuration).
    #[error("the job log: {0}")]
    Raft(String),
}

/// One replica of a group's job log; cheap to clone.
#[derive(Clone)]
pub struct JobLog {
    raft: Raft<TypeConfig>,
    state: Arc<RwLock<ControlState>>,
    changed: watch::Receiver<u64>,
    me: PeerId,
    /// The replicas this one was asked to start the log with, until its membership says.
    expected: Arc<RwLock<BTreeSet<NodeId>>>,
    watchers: machine::Watchers,
    /// The log's store, to stop its writer at shutdown.
    store: store::LogStore,
    /// To the proposer, which sends concurrent proposals as one entry.
    proposals: tokio::sync::mpsc::Sender<(Command, propose::Reply)>,
    proposer: Arc<parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// How long a leader that has not heard from a majority still counts as leading, in
    /// milliseconds: until the earliest time the others may have elected another.
    lease_ms: u64,
}

impl std::fmt::Debug for JobLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobLog")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl JobLog {
    /// Opens this daemon's replica of the log in `dir` (created if need be), from what it
    /// stored before, and joins the replicas it knew; messages go out over `net`.
    ///
    /// # Errors
    /// The directory or its database cannot be opened, or openraft refuses the configuration.
    pub async fn open(dir: &Path, net: Net, config: &LogConfig) -> Result<JobLog, LogError> {
        let path = dir.join("joblog.redb");
        let open_error = |message: String| LogError::Open {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_error(e.to_string()))?;
        let db = store::open(&path).map_err(|e| open_error(e.to_string()))?;
        let machine = machine::Machine::open(db.clone()).map_err(|e| open_error(e.to_string()))?;
        let (state, changed) = (machine.state.clone(), machine.changed.subscribe());
        let watchers = machine.watchers.clone();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let raft_config = openraft::Config {
            cluster_name: "mvm-joblog".into(),
            heartbeat_interval: ms(config.heartbeat),
            election_timeout_min: ms(config.election_timeout.0),
            election_timeout_max: ms(config.election_timeout.1),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: 1000,
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|e| LogError::Raft(e.to_string()))?;
        let me = net.peer();
        let store = store::LogStore::open(db.clone()).map_err(|e| open_error(e.to_string()))?;
        let raft = Raft::new(
            node_id(&me),
            Arc::new(raft_config),
            network::Network { net },
            store.clone(),
            machine,
        )
        .await
        .map_err(|e| LogError::Raft(e.to_string()))?;
        let (proposals, proposer) = propose::start(raft.clone());
        Ok(JobLog {
            raft,
            state,
            changed,
            me,
            expected: Arc::default(),
            watchers,
            store,
            proposals,
            proposer: Arc::new(parking_lot::Mutex::new(Some(proposer))),
            lease_ms: ms(config.election_timeout.0 + config.election_timeout.1),
        })
    }

    /// Makes a new log whose replicas are `replicas` (this one among them). Every replica may
    /// call it with the same list: the first to win an election starts the log with it. A
    /// replica that has a log already keeps it (not an error).
    ///
    /// # Errors
    /// This replica is not in the list, or Raft fails.
    pub async fn initialize(&self, replicas: &[Replica]) -> Result<(), LogError> {
        let members = self.expect(replicas)?;
        match self.raft.initialize(members).await {
            Ok(()) | Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {
                Ok(())
            }
            Err(e) => Err(LogError::Raft(e.to_string())),
        }
    }

    /// Takes messages from `replicas` (this one among them) before this replica has a log of
    /// its own: the one that starts the log ([`JobLog::initialize`]) sends them.
    ///
    /// # Errors
    /// This replica is not in the list, or an entry names no peer.
    pub fn expect(&self, replicas: &[Replica]) -> Result<BTreeMap<NodeId, Replica>, LogError> {
        let mut members = BTreeMap::new();
        for r in replicas {
            members.insert(node_id(&r.peer_id()?), r.clone());
        }
        if !members.contains_key(&node_id(&self.me)) {
            return Err(LogError::NotAmong(self.me));
        }
        self.expected.write().extend(members.keys().copied());
        Ok(members)
    }

    /// Proposes a command; returns what applying it gave once a majority has stored it.
    ///
    /// # Errors
    /// This replica does not lead ([`LogError::NotLeader`], with the leader when known), or
    /// Raft fails.
    pub async fn propose(&self, command: Command) -> Result<Applied, LogError> {
        let stopped = || LogError::Raft("the job log has stopped".into());
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.proposals
            .send((command, tx))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Reads the control state as this replica has applied it.
    pub fn read<R>(&self, f: impl FnOnce(&ControlState) -> R) -> R {
        f(&self.state.read())
    }

    /// The index of the last entry applied here; changes wake [`JobLog::changed`].
    pub fn applied(&self) -> u64 {
        *self.changed.borrow()
    }

    /// The index of the last entry in this replica's log (applied or not).
    pub fn last_index(&self) -> u64 {
        self.metrics(|m| m.last_log_index.unwrap_or(0))
    }

    /// Waits until an entry after `after` has been applied here.
    pub async fn changed(&self, after: u64) {
        let mut rx = self.changed.clone();
        let _ = rx.wait_for(|i| *i > after).await;
    }

    /// Watches one job: the receiver sees the index of each entry applied here that changes
    /// it. Subscribe before reading the job, and no change is missed.
    pub fn watch(&self, job: &JobId) -> watch::Receiver<u64> {
        let mut w = self.watchers.lock();
        match w.get(job) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(0);
                w.insert(job.clone(), tx);
                rx
            }
        }
    }

    /// This replica's peer id.
    pub fn peer(&self) -> PeerId {
        self.me
    }

    /// Reads Raft's metrics (who leads, the term, the membership) without copying them.
    fn metrics<R>(&self, f: impl FnOnce(&openraft::RaftMetrics<NodeId, Replica>) -> R) -> R {
        let rx = self.raft.metrics();
        let m = rx.borrow();
        f(&m)
    }

    /// The replica that leads now, as this one knows it.
    ///
    /// A leader cut off from the majority does not step down in openraft 0.9 (it just commits
    /// nothing): this replica stops counting itself as leading once a majority has not
    /// acknowledged it within its lease, so that it refuses jobs at once instead of holding them
    /// until the partition heals, and its clients look for the leader elsewhere.
    pub fn leader(&self) -> Option<PeerId> {
        self.metrics(|m| {
            let id = m.current_leader?;
            if id == m.id
                && m.millis_since_quorum_ack
                    .is_none_or(|ms| ms > self.lease_ms)
            {
                return None;
            }
            m.membership_config
                .membership()
                .get_node(&id)
                .and_then(|n| n.peer_id().ok())
        })
    }

    /// The current Raft term as this replica knows it: one leader at most per term.
    pub fn term(&self) -> u64 {
        self.metrics(|m| m.current_term)
    }

    /// Whether this replica leads now (as [`JobLog::leader`] counts it, lease included). It
    /// is asked on every request and every input of the broker: it compares Raft ids, where
    /// `leader` looks the leader's peer id up and parses it.
    pub fn is_leader(&self) -> bool {
        self.metrics(|m| {
            m.current_leader == Some(m.id)
                && m.millis_since_quorum_ack
                    .is_some_and(|ms| ms <= self.lease_ms)
        })
    }

    /// The log index of the membership in force (it changes when the replicas do).
    pub fn membership_index(&self) -> Option<u64> {
        self.metrics(|m| m.membership_config.log_id().map(|l| l.index))
    }

    /// The replicas of the log, as its membership says.
    pub fn replicas(&self) -> Vec<Replica> {
        self.metrics(|m| {
            m.membership_config
                .membership()
                .nodes()
                .map(|(_, n)| n.clone())
                .collect()
        })
    }

    /// Answers a message from another replica. Only a node certificate of this daemon's domain
    /// that is a replica of this log (as its membership says, or the list it was initialized
    /// with) may send one; a replica that has neither yet takes no message.
    pub async fn serve(
        &self,
        from: PeerId,
        who: &Principal,
        domain: &str,
        rpc: RaftRpc,
    ) -> Response {
        if who.kind != PrincipalKind::Node || who.domain != domain {
            return refused(format!("{who} is not a super-peer of domain {domain}"));
        }
        let id = node_id(&from);
        let member = self.expected.read().contains(&id)
            || self.metrics(|m| m.membership_config.membership().get_node(&id).is_some());
        if !member {
            return refused(format!("{from} is not a replica of this group's job log"));
        }
        let answer = match rpc {
            RaftRpc::Append(b) => match decode(&b) {
                Ok(req) => encode(&self.raft.append_entries(req).await),
                Err(f) => return Response::Error(f),
            },
            RaftRpc::Vote(b) => match decode(&b) {
                Ok(req) => encode(&self.raft.vote(req).await),
                Err(f) => return Response::Error(f),
            },
            RaftRpc::Snapshot(b) => match decode(&b) {
                Ok(req) => encode(&self.raft.install_snapshot(req).await),
                Err(f) => return Response::Error(f),
            },
        };
        match answer {
            Ok(b) => Response::Raft(b),
            Err(f) => Response::Error(f),
        }
    }

    /// Stops this replica (its store stays for the next start).
    pub async fn shutdown(&self) {
        if let Some(p) = self.proposer.lock().take() {
            p.abort();
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::debug!(error = %e, "job log shut down with an error");
        }
        self.store.stop().await;
    }
}

fn refused(message: String) -> Response {
    Response::Error(Failure::new(FailureKind::Refused, message))
}

fn decode<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Result<T, Failure> {
    ciborium::from_reader(b).map_err(|e| {
        Failure::new(
            FailureKind::Input,
            format!("a job-log message that does not decode: {e}"),
        )
    })
}

fn encode<T: Serialize>(v: &T) -> Result<Bytes, Failure> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out)
        .map_err(|e| Failure::new(FailureKind::Failed, format!("encoding an answer: {e}")))?;
    Ok(out.into())
}

#[cfg(test)]
mod tests;
