//! The control protocol: requests and responses between clients, super-peers and nodes.
//!
//! Control streams, [`RPC_PROTOCOL`], carry every control message between peers whose
//! certificates have passed on [`HELLO_PROTOCOL`] (see the `net` and `rpc` modules). Messages
//! are CBOR in a frame with its length first; a frame larger than the reader's limit is
//! refused before it is read. The protocol id carries the version: a peer speaking another
//! version fails negotiation instead of misreading messages. Ids and hashes are typed
//! ([`JobId`], [`Hash`](struct@Hash)): a message with a malformed one does not decode. Every
//! message is then checked by [`Request::validate`] / [`Response::validate`] before it is acted
//! on: bounded strings and lists, names, parts. A request says by its kind who sends it to whom
//! ([`ClientRequest`], [`NodeRequest`], [`BrokerRequest`], [`PeerRequest`]).
//!
//! - `job`: jobs as submitted, placed, reported and seen.
//! - `group`: nodes, members and groups.
//! - `id`: job ids and content hashes.
//! - `frame`: frames, the hello messages, and the stream headers.
//! - `check`: the checks of every message.
//! - `failure`: why a request failed, and the class of failure of every error that can reach
//!   the wire.

use bytes::Bytes;
use libp2p::StreamProtocol;
use mvm_component::policy::Bundle;
pub use mvm_component::runtime::ErrorKind;
pub use mvm_component::runtime::logs::{LogLine, LogStream};
use serde::{Deserialize, Serialize};

mod agreement;
mod bank;
mod check;
mod failure;
mod frame;
mod group;
mod id;
mod job;
mod part;

pub use agreement::*;
pub use bank::*;
pub use check::CheckError;
pub use failure::{Failure, FailureKind, UNTAKEN};
pub use frame::*;
pub use group::*;
pub use id::{Hash, IdError, JobId};
pub use job::*;
pub use part::*;

/// The certificate exchange on every new connection: each side opens one stream, sends a
/// [`Hello`] and reads the other's [`Verdict`] on it (see the `net` module).
pub const HELLO_PROTOCOL: StreamProtocol = StreamProtocol::new("/mvm/hello/1");

/// Control streams: every request and answer between peers whose certificates have passed,
/// many on one stream (see the `rpc` module).
pub const RPC_PROTOCOL: StreamProtocol = StreamProtocol::new("/mvm/rpc/4");

/// The queue-data protocol: a stream per remote channel (see [`StreamHeader`]); its number
/// follows the queue layer's frame version.
pub const QUEUE_PROTOCOL: StreamProtocol = StreamProtocol::new("/mvm/queue/2");

/// Image transfers between nodes: a request frame, a header frame, then the image's bytes.
pub const IMAGE_PROTOCOL: StreamProtocol = StreamProtocol::new("/mvm/image/1");

/// A job's files, to and from a super-peer: a [`FileRequest`], [`FileAnswer`]s, and the
/// file's bytes streamed (never inside a control frame).
pub const FILES_PROTOCOL: StreamProtocol = StreamProtocol::new("/mvm/files/1");

/// A request on the control protocol, by who sends it to whom: each role handles its own
/// kind, and no message reaches a role that does not serve it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Request {
    /// Anyone → any daemon: the group as this daemon sees it.
    Group,
    /// Anyone → any daemon: which super-peer leads the group, as this daemon knows it; the
    /// answer is a [`Response::Group`] without its nodes and other groups (what nodes and
    /// clients looking for the leader ask, all at once after a failover).
    Leader,
    /// A user, or a super-peer forwarding for one → a group's broker.
    Client(ClientRequest),
    /// A node → its group's broker.
    Node(NodeRequest),
    /// A broker → a node of its group.
    Broker(BrokerRequest),
    /// A node or super-peer → a super-peer: policies and the group's replicated job log.
    Peer(PeerRequest),
}

/// What a user (or a super-peer forwarding a job) asks a broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientRequest {
    /// A link to this super-peer's web view (`--http`) that logs the asker in as who its
    /// certificate says it is.
    WebLogin,
    /// Which of these module hashes the broker lacks.
    Missing {
        /// Content hashes.
        hashes: Vec<Hash>,
    },
    /// Run a job.
    Submit(Box<Submission>),
    /// The status of one job, or of all.
    Status {
        /// A job id, or every job when `None`.
        job: Option<JobId>,
    },
    /// The job's status once its version passes `after` (or after a while).
    Wait {
        /// The job id.
        job: JobId,
        /// The last version seen.
        after: u64,
        /// Answer only once the job has ended (or after a while), not at every change.
        #[serde(default)]
        until_end: bool,
    },
    /// Hold a pending job back from placement (`true`), or release it.
    Hold {
        /// The job id.
        job: JobId,
        /// Hold or release.
        held: bool,
    },
    /// Change a bidding job's bid for its nodes' CPU (`mvm bid`).
    Bid {
        /// The job id.
        job: JobId,
        /// The new rate, micro-credits per CPU-second.
        rate: u64,
    },
    /// Cancel a job.
    Cancel {
        /// The job id.
        job: JobId,
    },
    /// Take a checkpoint of a running job that asked for checkpoints, now; answered once it
    /// is stored and recorded.
    Checkpoint {
        /// The job id.
        job: JobId,
    },
    /// Move a part of a running job that asked for checkpoints to node `to` while it runs:
    /// the part that holds `vertex`, or the one on node `node` (exactly one of them).
    Migrate {
        /// The job id.
        job: JobId,
        /// A vertex of the part to move.
        vertex: Option<String>,
        /// The node (by name) of the part to move.
        node: Option<String>,
        /// The node (by name) to move it to.
        to: String,
    },
    /// An administrator → the broker: move every part off node `node` (by name) and place
    /// nothing more on it (`drain`), or place parts on it again (`!drain`). Answered with the
    /// parts moved ([`Response::Moved`]).
    Drain {
        /// The node, by name.
        node: String,
        /// Drain, or undrain.
        drain: bool,
    },
    /// An administrator → the super-peer holding the policies: read them again now.
    PolicyReload,
    /// The lines a job's vertices wrote, after those the asker has ([`Response::Logs`]).
    Logs {
        /// The job id.
        job: JobId,
        /// The last line the asker has of each run and vertex (it gets only later ones).
        #[serde(default)]
        after: Vec<LogCursor>,
        /// Only lines written at or after this time, milliseconds since the Unix epoch.
        #[serde(default)]
        since_ms: Option<u64>,
        /// Only this vertex's lines.
        #[serde(default)]
        vertex: Option<String>,
    },
    /// Plan a job and offer to run it by a promised finish ([`Response::Agreements`], the
    /// offers): nothing runs until one is accepted.
    Offer {
        /// The job.
        submission: Box<Submission>,
        /// It must be finished by then, milliseconds since the Unix epoch.
        #[serde(default)]
        deadline_ms: Option<u64>,
        /// It must not start before then, milliseconds since the Unix epoch.
        #[serde(default)]
        start_after_ms: Option<u64>,
        /// How long the offer is held, milliseconds (default [`OFFER_TTL_MS`], at most
        /// [`MAX_OFFER_TTL_MS`]).
        #[serde(default)]
        valid_ms: Option<u64>,
    },
    /// Accept an offer: it becomes an agreement, and its job waits for its start.
    Accept {
        /// The offer's id.
        offer: JobId,
        /// The user a super-peer accepts for (an offer of another group it passed on).
        #[serde(default)]
        on_behalf: Option<mvm_component::policy::Principal>,
    },
    /// The bank of the domain's market: balances, history, mints, transfers.
    Bank(BankRequest),
    /// The asker's offers and agreements (all the policy lets it read when `all`).
    Agreements {
        /// Also those of others, and those that ended.
        #[serde(default)]
        all: bool,
    },
}

/// What a node tells or asks its group's broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeRequest {
    /// Join the group.
    Register(Box<NodeInfo>),
    /// Still alive, with its current load.
    Heartbeat(NodeLoad),
    /// The bytes of a module.
    Fetch {
        /// Its content hash.
        hash: Hash,
    },
    /// The end of its part of a job.
    Report(Box<PartReport>),
    /// The blob of a part's checkpoint, to restore the part from.
    FetchCheckpoint {
        /// Its content hash.
        hash: Hash,
    },
    /// The output files its part's vertices left (their bytes sent before, on
    /// [`FILES_PROTOCOL`]); answered once they are recorded with the job.
    Outputs {
        /// The job id.
        job: JobId,
        /// The run the part belongs to.
        attempt: u32,
        /// The files.
        files: Vec<OutputFile>,
    },
    /// Lines its part's vertices wrote since its last such request (while the part runs, and
    /// what a stopped part still held); the part's last lines travel in its report.
    Logs {
        /// The job id.
        job: JobId,
        /// The run the part belongs to.
        attempt: u32,
        /// The lines, each vertex's in order.
        lines: Vec<LogLine>,
    },
}

/// What a broker tells a node of its group.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BrokerRequest {
    /// Prepare a part of a job (compile, check, create queues); nothing runs.
    Prepare(Box<PartSpec>),
    /// Start a prepared part.
    Start {
        /// The job id.
        job: JobId,
        /// The run of the job ([`PartSpec::attempt`]): a node holding another one refuses.
        #[serde(default)]
        attempt: u32,
    },
    /// Pause a running part (of a job that asked for checkpoints) at cut `cut`, save it with
    /// its links drained to the cut's mark, let it go on, and answer with the blob
    /// ([`Response::Checkpoint`]); its sending ends stay held until [`BrokerRequest::ReleaseCut`].
    Checkpoint {
        /// The job id.
        job: JobId,
        /// The run of the job.
        attempt: u32,
        /// The cut's number within the job (each larger than the one before).
        cut: u64,
        /// How long the broker waits for every part of the cut, when its files may take longer
        /// than its usual limit to go up (at most [`MAX_SAVE_MS`]): the node holds its sending
        /// ends longer than that, and the answer is awaited that long.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        within_ms: Option<u64>,
    },
    /// A step of moving a running part of a job to another node ([`MoveStep`]).
    Move {
        /// The job id.
        job: JobId,
        /// The run of the job.
        attempt: u32,
        /// What this node does.
        step: MoveStep,
    },
    /// Let the sending ends of a part's links go on after checkpoint `cut`: every part of the
    /// cut has its image (or the cut was given up). Until then they stay held, so that no item
    /// after the cut's mark reaches a part not yet saved.
    ReleaseCut {
        /// The job id.
        job: JobId,
        /// The run of the job.
        attempt: u32,
        /// The cut.
        cut: u64,
    },
    /// Stop a job's part (if any) and remove everything created for it.
    Terminate {
        /// The job id.
        job: JobId,
        /// The run of the job to stop: a node holding a later one keeps it.
        #[serde(default)]
        attempt: u32,
        /// Why, for the node's log.
        reason: String,
    },
    /// Make a guest of a template and run a node of the group in it (a trigger's
    /// `create-guests`), with the identity the super-peer issued for it.
    Grow(Box<GrowSpec>),
    /// Stop the node of a guest made by [`BrokerRequest::Grow`] and tear the guest down.
    Shrink {
        /// The guest (its node's name).
        name: String,
    },
    /// The queues of the part of `job` held here now, for the web view
    /// ([`Response::Queues`]).
    Queues {
        /// The job.
        job: JobId,
    },
    /// The guests of `job`'s part here bid `rate` (micro-credits per CPU-second) from now on.
    Bid {
        /// The job.
        job: JobId,
        /// The new rate.
        rate: u64,
    },
}

/// A queue of a running job's part on a node, as [`BrokerRequest::Queues`] gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStat {
    /// The queue: `vertex:port`, or `vertex:port>out` for a link's outbox.
    pub queue: String,
    /// Items held now.
    pub depth: u64,
    /// Items sent into it so far.
    pub items_in: u64,
    /// Bytes sent into it so far.
    pub bytes_in: u64,
}

/// A guest to make and the node to run in it ([`BrokerRequest::Grow`]).
#[derive(Clone, Serialize, Deserialize)]
pub struct GrowSpec {
    /// The guest's name, and its node's.
    pub name: String,
    /// The guest template.
    pub template: TemplateSpec,
    /// The node's vertex slots.
    pub slots: u32,
    /// The node's libp2p key (protobuf encoding), which its certificate certifies.
    pub key: Bytes,
    /// Its certificate (PEM), issued by the domain's CA.
    pub cert: String,
    /// The domain's CA certificate (PEM).
    pub ca: String,
    /// The group's super-peers to register with (`/…/p2p/PEER`).
    pub bootstrap: Vec<String>,
}

impl std::fmt::Debug for GrowSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrowSpec")
            .field("name", &self.name)
            .field("template", &self.template.name)
            .field("slots", &self.slots)
            .field("bootstrap", &self.bootstrap)
            .finish_non_exhaustive()
    }
}

/// A node's step in moving a part of a running job to another node: the part that moves is
/// paused at a cut and saved with its links drained ([`MoveStep::Leave`]) while the parts
/// linked to it hold their links with it at the same cut ([`MoveStep::Hold`]); once the new
/// node has prepared the part from its image, they link to the new node instead
/// ([`MoveStep::Relink`]). Nothing in flight is lost or sent twice: every link with the part
/// is at the cut's mark on both sides. [`MoveStep::Stay`] gives the move up.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MoveStep {
    /// To the node of the part that moves: pause it at cut `cut`, hold and drain its links to
    /// the cut's mark, and answer with its blob ([`Response::Checkpoint`]). It stays paused
    /// until it is ended ([`BrokerRequest::Terminate`]) or the move is given up.
    Leave {
        /// The cut's number within the job.
        cut: u64,
        /// How long the broker waits for the part's blob, when its files may take longer than
        /// a request's usual timeout to go up (at most [`MAX_SAVE_MS`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        within_ms: Option<u64>,
    },
    /// To the node of another part: hold and drain its links with `peer` (the node of the part
    /// that moves) to cut `cut`. The part runs on.
    Hold {
        /// The cut's number within the job.
        cut: u64,
        /// The node of the part that moves.
        peer: libp2p::PeerId,
        /// As [`MoveStep::Leave`]'s: the links are held while the leaving part's files go up
        /// and while the new node fetches them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        within_ms: Option<u64>,
    },
    /// Its links with `peer`, held, now go to `to` at `addrs` (which has prepared the part).
    Relink {
        /// The node the part left.
        peer: libp2p::PeerId,
        /// The node it moves to.
        to: libp2p::PeerId,
        /// Where that node listens.
        addrs: Vec<libp2p::Multiaddr>,
    },
    /// The move is given up: held links go on, a paused part resumes.
    Stay,
}

/// What a node or super-peer asks a super-peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerRequest {
    /// The policy bundle, unless its digest is `have`.
    Policy {
        /// The digest of the policies the asker holds, if any.
        have: Option<Hash>,
    },
    /// The revocation lists the asked holds that are newer than the asker's (`held`: the
    /// number of the list it holds, by domain).
    Revocations {
        /// The asker's lists' numbers, by domain.
        held: std::collections::BTreeMap<String, u64>,
    },
    /// A message of the group's replicated job log (super-peer ↔ super-peer).
    Raft(RaftRpc),
    /// The leading super-peer → the other replicas of its job log: checkpoint blobs to keep
    /// (by content hash), and ones no checkpoint refers to any more.
    Blobs {
        /// Blobs to keep.
        put: Vec<Bytes>,
        /// Blobs to forget.
        forget: Vec<Hash>,
    },
}

impl From<ClientRequest> for Request {
    fn from(r: ClientRequest) -> Request {
        Request::Client(r)
    }
}

impl From<NodeRequest> for Request {
    fn from(r: NodeRequest) -> Request {
        Request::Node(r)
    }
}

impl From<BrokerRequest> for Request {
    fn from(r: BrokerRequest) -> Request {
        Request::Broker(r)
    }
}

impl From<PeerRequest> for Request {
    fn from(r: PeerRequest) -> Request {
        Request::Peer(r)
    }
}

/// A message between the replicas of a group's job log: openraft's request, CBOR-encoded
/// (decoded, and so checked, by the job log itself).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RaftRpc {
    /// Entries to append (or a heartbeat).
    Append(Bytes),
    /// A request for a vote.
    Vote(Bytes),
    /// A snapshot, or a chunk of one.
    Snapshot(Bytes),
}

/// A response on the control protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    /// Done.
    Ok,
    /// The request failed.
    Error(Failure),
    /// The hashes the broker lacks.
    Missing {
        /// Content hashes.
        hashes: Vec<Hash>,
    },
    /// A job was accepted and placed.
    Submitted(Box<JobStatus>),
    /// Job statuses.
    Status(Vec<JobStatus>),
    /// The group.
    Group(GroupInfo),
    /// A registration was accepted.
    Registered {
        /// How often to send heartbeats, in milliseconds.
        heartbeat_ms: u64,
        /// The group's members, for electing a new super-peer.
        members: Vec<Member>,
    },
    /// A heartbeat was taken; `known` is false when the broker does not know the node (it must
    /// register again, e.g. with a newly elected super-peer).
    Heartbeat {
        /// Whether the node is registered.
        known: bool,
        /// The group's members.
        members: Vec<Member>,
        /// Jobs of the heartbeat's list whose parts on the node must stop, each with the last
        /// run of it to stop (`u32::MAX`: any): jobs the log has ended or never recorded, and
        /// runs given up (their `Terminate` did not arrive, or their leader was lost before it
        /// recorded them).
        #[serde(default)]
        stop: Vec<(JobId, u32)>,
        /// The node's last charge batch the bank has taken, `(boot, seq)`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        charged: Option<(u64, u64)>,
        /// Of the accounts bidding on the node, those with no credit left (their guests bid
        /// the floor rate until they have some).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        broke: Vec<String>,
    },
    /// A module's bytes.
    Module(Bytes),
    /// A part's checkpoint: its blob and the blob's content hash, and the files its vertices'
    /// sandboxes held (sent to the broker first).
    Checkpoint {
        /// `Hash::of(blob)`.
        hash: Hash,
        /// The encoded part image.
        blob: Bytes,
        /// Every file in its vertices' sandboxes when it paused (none: its job has no files).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        files: Option<Vec<OutputFile>>,
    },
    /// The parts moved by a migration or a drain.
    Moved(Vec<MoveInfo>),
    /// The answer to a `Prepare` that started the part, when the part ended within
    /// [`PART_HOLD`]: its report, which the node then does not send again.
    Finished(Box<PartReport>),
    /// The answer to a [`PeerRequest::Raft`]: openraft's result, CBOR-encoded.
    Raft(Bytes),
    /// Lines of a job's logs.
    Logs(Box<JobLogs>),
    /// A link that logs into a super-peer's web view ([`ClientRequest::WebLogin`]).
    WebLogin {
        /// The link, with a one-time login token.
        url: String,
        /// When the session it opens ends (milliseconds since the Unix epoch).
        expires_ms: u64,
    },
    /// The queues of a job's part on a node now ([`BrokerRequest::Queues`]).
    Queues(Vec<QueueStat>),
    /// Offers or agreements.
    Agreements(Vec<AgreementInfo>),
    /// The bank's answer.
    Bank(BankAnswer),
    /// The policies in force at a super-peer.
    Policy {
        /// Its version there.
        version: u64,
        /// Its digest.
        digest: Hash,
        /// The files, unless the asker holds them already.
        bundle: Option<Bundle>,
    },
    /// To `Revocations`: the newer lists (DER, as their CAs signed them).
    Revocations {
        /// The lists.
        crls: Vec<Bytes>,
    },
}

/// How long a broker holds a waiting submission, and a `Wait`, before answering with the
/// job's status so far.
pub const SUBMIT_HOLD: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a node holds the answer to a `Prepare` that starts its part at once, for the part's
/// report to travel in the answer instead of in a request of its own.
pub const PART_HOLD: std::time::Duration = std::time::Duration::from_millis(50);

/// The longest a broker may give a part's saved files to go up, in a checkpoint or a move
/// (`within_ms` of [`BrokerRequest::Checkpoint`] and [`MoveStep::Leave`]): two days.
pub const MAX_SAVE_MS: u64 = 2 * 24 * 3600 * 1000;

/// [`MAX_SAVE_MS`] as a duration.
pub const MAX_SAVE: std::time::Duration = std::time::Duration::from_millis(MAX_SAVE_MS);

/// How much longer than a broker waits for a part's save its request's answer is awaited, and
/// the part's node holds its sending ends.
pub const SAVE_SLACK: std::time::Duration = std::time::Duration::from_secs(10);

/// How long past the start of a part's save, given `within_ms` by its broker, the part's node
/// and the broker's request wait: that (at most [`MAX_SAVE_MS`]) and [`SAVE_SLACK`].
pub fn save_wait(within_ms: u64) -> std::time::Duration {
    std::time::Duration::from_millis(within_ms.min(MAX_SAVE_MS)) + SAVE_SLACK
}

impl Request {
    /// How long this request's answer may take, when that is longer than a request's usual
    /// timeout: a checkpoint or a move whose files are given long to go up. A client's
    /// checkpoint or move is answered once the broker has it or gives it up, which it does
    /// within the limit it gives the nodes: the client waits as long as that may be.
    pub fn answer_within(&self) -> Option<std::time::Duration> {
        let ms = match self {
            Request::Client(
                ClientRequest::Checkpoint { .. }
                | ClientRequest::Migrate { .. }
                | ClientRequest::Drain { .. },
            ) => Some(MAX_SAVE_MS),
            // A node prepares a part once it holds its files: the inputs, or a restored
            // part's saved files.
            Request::Broker(BrokerRequest::Prepare(p)) => {
                let bytes = match (&p.restore, &p.restore_files, &p.files) {
                    (Some(_), Some(saved), _) => {
                        saved.iter().map(|f| f.size).fold(0, u64::saturating_add)
                    }
                    (_, _, Some(files)) => files.input_bytes(),
                    _ => 0,
                };
                return (bytes > 0).then(|| crate::files::allowed(bytes).min(MAX_SAVE));
            }
            Request::Broker(BrokerRequest::Checkpoint { within_ms, .. }) => *within_ms,
            Request::Broker(BrokerRequest::Move {
                step: MoveStep::Leave { within_ms, .. },
                ..
            }) => *within_ms,
            _ => None,
        }?;
        Some(save_wait(ms))
    }
}
