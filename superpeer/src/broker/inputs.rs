//! What the broker's machine ([`super::core::Core`]) takes and gives: its inputs, its effects,
//! and what each answer or outcome it waits for is for.

use libp2p::{Multiaddr, PeerId};
use mvm_component::policy::Principal;
use tokio::sync::oneshot;

use super::place::Checked;
use super::plan::PlaceError;
use crate::joblog::state::JobRecord;
use crate::joblog::{Applied, Command, LogError, Replica};
use crate::proto::{
    BrokerRequest, Failure, GroupSummary, JobId, JobState, NodeInfo, NodeLoad, PartReport,
    PartSpec, Response, Submission,
};

/// Where an answer goes.
pub(super) type Reply = oneshot::Sender<Response>;

/// What happens to the broker.
pub(super) enum Input {
    /// A submission from `who`, already checked ([`super::place::check`]).
    Submit {
        reply: Reply,
        who: Principal,
        submission: Box<Submission>,
        checked: Box<Checked>,
    },
    /// A request for an offer from `who`, already checked.
    Offer {
        reply: Reply,
        who: Principal,
        submission: Box<Submission>,
        checked: Box<Checked>,
        ask: super::agree::Ask,
    },
    /// A mint or transfer of the bank (the policy has let it).
    Bank {
        reply: Reply,
        command: crate::joblog::bank::BankCommand,
    },
    /// `who` accepts an offer.
    Accept {
        reply: Reply,
        who: Principal,
        offer: JobId,
    },
    /// A client cancels a job (the policy has let it).
    Cancel { reply: Reply, job: JobId },
    /// A client asks for a checkpoint of a running job now (the policy has let it).
    Checkpoint { reply: Reply, job: JobId },
    /// A client moves a part of a running job to node `to` (the policy has let it).
    Migrate {
        reply: Reply,
        job: JobId,
        which: super::migrate::Which,
        to: String,
    },
    /// An administrator drains or undrains the node named `node`.
    Drain {
        reply: Reply,
        node: String,
        drain: bool,
    },
    /// A client holds back or releases a pending job (the policy has let it).
    Hold {
        reply: Reply,
        job: JobId,
        held: bool,
    },
    /// A node registers.
    Register {
        reply: Reply,
        peer: PeerId,
        who: Principal,
        info: NodeInfo,
    },
    /// A change of a bidding job's bid (checked).
    Bid { reply: Reply, job: JobId, rate: u64 },
    /// A node's heartbeat; `account` is its provider's bank account.
    Heartbeat {
        reply: Reply,
        peer: PeerId,
        account: String,
        load: NodeLoad,
    },
    /// A node's report of its part.
    Report {
        reply: Reply,
        peer: PeerId,
        report: Box<PartReport>,
    },
    /// A node ships lines its part of run `attempt` of `job` wrote.
    Logs {
        reply: Reply,
        peer: PeerId,
        job: JobId,
        attempt: u32,
        lines: Vec<crate::proto::LogLine>,
    },
    /// A node's output files of run `attempt` of `job` (held here already): recorded.
    Outputs {
        reply: Reply,
        job: JobId,
        attempt: u32,
        files: Vec<crate::proto::OutputFile>,
    },
    /// Someone asks what the group looks like.
    Group { reply: Reply },
    /// Another group's summary, heard from its super-peer (already checked).
    Heard(GroupSummary),
    /// A node answered a request sent for `then`.
    Answered {
        then: Then,
        peer: PeerId,
        answer: Result<Response, Failure>,
    },
    /// An entry proposed for `then` was applied (or not).
    Recorded {
        then: Then,
        outcome: Result<Applied, LogError>,
    },
    /// Time has passed (every heartbeat interval).
    Tick,
}

/// What the event loop must do.
pub(super) enum Effect {
    /// Answer a request.
    Reply(Reply, Response),
    /// Send a request to a node; its answer comes back as [`Input::Answered`].
    Send {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: BrokerRequest,
        then: Then,
    },
    /// Propose an entry to the job log; its outcome comes back as [`Input::Recorded`].
    Record { command: Command, then: Then },
    /// Close the connections to a lost node.
    Disconnect(PeerId),
    /// Offer a job this group cannot place to the groups in `to`, in order; the answer goes to
    /// `reply`.
    Forward {
        reply: Reply,
        submission: Box<Submission>,
        owner: Principal,
        to: Vec<GroupSummary>,
        why: PlaceError,
        /// Ask for offers (`mvm offer`) rather than submit.
        offer: Option<super::agree::Ask>,
    },
    /// Start the job log with these replicas (none has started it in time).
    Found(Vec<Replica>),
    /// Give the other replicas checkpoint blobs to keep, and tell them which to forget
    /// (without waiting for their answers).
    Blobs {
        put: Vec<bytes::Bytes>,
        forget: Vec<crate::proto::Hash>,
    },
    /// Run a trigger's command on this host, with the group's metrics in its environment.
    Exec {
        trigger: String,
        argv: Vec<String>,
        env: Vec<(String, String)>,
    },
}

/// What an answer or an outcome is for.
pub(super) enum Then {
    /// A job of one part on the host: its node answered the prepare; record the job.
    AlonePrepared {
        reply: Reply,
        record: Box<JobRecord>,
    },
    /// That job's entry: answer the submitter; `running` if its part runs on `peer`.
    AloneRecorded {
        reply: Reply,
        job: JobId,
        peer: PeerId,
        running: bool,
    },
    /// An array's jobs were recorded (waiting).
    ArrayRecorded {
        reply: Reply,
        array: JobId,
        ids: Vec<JobId>,
    },
    /// A job that waits for room was recorded.
    PendingRecorded {
        reply: Reply,
        job: JobId,
        why: PlaceError,
    },
    /// A placed job was recorded (submitted, or a pending job placed): wake its parts.
    Placed {
        reply: Option<Reply>,
        job: JobId,
        specs: Vec<(PeerId, PartSpec)>,
    },
    /// A part of run `attempt` answered its prepare.
    Prepared { job: JobId, attempt: u32 },
    /// The start of a job (with the parts that ended in their prepare) was recorded.
    StartRecorded { job: JobId, peers: Vec<PeerId> },
    /// A part of run `attempt` answered its start.
    Started { job: JobId, attempt: u32 },
    /// A node answered for part `part` of checkpoint `cut` of `job`.
    CutTaken { job: JobId, cut: u64, part: usize },
    /// A checkpoint was recorded: the blobs of `before` it no longer keeps go, and the
    /// clients that asked for it are answered.
    CutRecorded {
        job: JobId,
        before: Vec<crate::proto::Hash>,
        replies: Vec<Reply>,
    },
    /// A run given up (a node was lost) was recorded: its parts on `peers` are told to stop,
    /// and the job is placed again.
    Requeued {
        job: JobId,
        attempt: u32,
        peers: Vec<PeerId>,
        reply: Option<Reply>,
    },
    /// A node answered a step of the move of a part of `job` at cut `cut`.
    MoveStep {
        job: JobId,
        cut: u64,
        then: super::migrate::MoveStepThen,
    },
    /// The move of a part of `job` was recorded.
    MoveRecorded { job: JobId },
    /// A drain (or undrain) of `peer` was recorded.
    Drained {
        reply: Reply,
        peer: PeerId,
        drain: bool,
    },
    /// A job's end was recorded: tell its parts.
    EndRecorded {
        job: JobId,
        state: JobState,
        reply: Option<Reply>,
    },
    /// A job's change of bid (on every node, or on `node`) was recorded: tell its nodes,
    /// and answer.
    Rebid {
        reply: Option<Reply>,
        job: JobId,
        rate: u64,
        node: Option<PeerId>,
    },
    /// A node's charges were recorded (or not): the next heartbeat may send them again.
    Charged { provider: String, upto: (u64, u64) },
    /// A mint or transfer was recorded (or refused): answer with its transaction.
    Banked {
        reply: Reply,
        by: String,
        request: String,
    },
    /// An offer, or its acceptance, was recorded: answer with it.
    AgreementRecorded { reply: Reply, id: JobId },
    /// A part's end, or a hold, was recorded: answer.
    Answer { reply: Reply },
    /// A node answered the making of a guest (a trigger's).
    Grown { guest: String },
    /// A node answered the teardown of guest `name`, whose node is `guest`.
    Shrunk { guest: PeerId, name: String },
    /// Nothing follows (terminations, summaries).
    Nothing,
}
