//! The commands that change the control state (one entry of the job log each), what applying
//! one gives, and why one is refused.

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use super::state::{Ended, JobRecord, PartRecord};
use mvm_component::runtime::logs::LogLine;

use crate::proto::{CheckpointInfo, EdgeTraffic, JobId, JobState, MoveInfo, PortTraffic, Traffic};

/// A change to the control state: one entry of the job log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// A job passed admission: it waits (`Pending`, no parts) or is placed (`Preparing`, or
    /// `Running` when its one part started as it was prepared).
    Submit(Box<JobRecord>),
    /// An array of jobs passed admission: its jobs wait (`Pending`), all or none recorded.
    Array {
        /// The array.
        array: Box<super::state::ArrayRecord>,
        /// Its jobs.
        jobs: Vec<JobRecord>,
    },
    /// A pending job is placed.
    Place {
        /// The job.
        job: JobId,
        /// Where.
        parts: Vec<PartRecord>,
        /// The checkpoint a run given up goes on from (none: from the start).
        #[serde(default)]
        from_cut: Option<u64>,
    },
    /// Every part is prepared: the job runs.
    Start {
        /// The job.
        job: JobId,
        /// When, milliseconds since the Unix epoch (the leader's clock).
        #[serde(default)]
        at_ms: u64,
    },
    /// A part ended well (of a job preparing or running); the last one ends the job `Done`.
    PartDone {
        /// The job.
        job: JobId,
        /// The node.
        node: PeerId,
        /// The run of the job the part belongs to: a report of an earlier run is refused.
        #[serde(default)]
        attempt: u32,
        /// Its vertices' outputs.
        outputs: Vec<(String, bytes::Bytes)>,
        /// Its traffic.
        traffic: Vec<Traffic>,
        /// What each edge out of its vertices carried.
        #[serde(default)]
        edges: Vec<EdgeTraffic>,
        /// What each input port of its vertices took.
        #[serde(default)]
        received: Vec<PortTraffic>,
        /// The guest it ran in.
        #[serde(default)]
        guest: Option<crate::proto::GuestIdentity>,
        /// When, milliseconds since the Unix epoch (the leader's clock).
        at_ms: u64,
    },
    /// The job ended (`Done`, `Failed`, `Refused`, `Cancelled`).
    End {
        /// The job.
        job: JobId,
        /// Its final state.
        state: JobState,
        /// When and why.
        ended: Ended,
    },
    /// A run of a preparing or running job is given up because a node it ran on was lost: the
    /// job waits again (`Pending`, no parts), to run once more from its start.
    Requeue {
        /// The job.
        job: JobId,
        /// The run that begins: the job's run so far plus one, at most its retries.
        attempt: u32,
        /// When, milliseconds since the Unix epoch (the leader's clock).
        at_ms: u64,
        /// Why, for people.
        why: String,
    },
    /// A checkpoint of a running job was stored: it is kept, and the oldest beyond the job's
    /// `keep` are forgotten.
    Checkpoint {
        /// The job.
        job: JobId,
        /// The checkpoint.
        info: CheckpointInfo,
    },
    /// A part of a running job moved to another node (`info.to`) while the job ran.
    Move {
        /// The job.
        job: JobId,
        /// The part, by its index among the job's parts.
        part: u32,
        /// The move.
        info: MoveInfo,
    },
    /// A node is drained (`true`: nothing more is placed on it) or placeable again.
    Drain {
        /// The node.
        node: PeerId,
        /// Drained or not.
        drained: bool,
    },
    /// A bidding job's bid changes: by hand on every part (`node` none: its agent stops),
    /// or by its agent on its part on `node`.
    Bid {
        /// The job.
        job: JobId,
        /// Its new rate, micro-credits per CPU-second.
        rate: u64,
        /// The node of the part whose bid changes (none: every part's).
        #[serde(default)]
        node: Option<PeerId>,
    },
    /// A pending job is held back from placement (`true`) or released (`false`).
    Hold {
        /// The job.
        job: JobId,
        /// Held or released.
        held: bool,
    },
    /// Lines a part's vertices wrote (stdout, stderr, `mvm.log`), kept with the job up to its
    /// bound per vertex, the newest. Taken also after the job ended (a part stopped because
    /// another failed ships what it still held); does not change the job's version.
    Logs {
        /// The job.
        job: JobId,
        /// The run the part belongs to.
        attempt: u32,
        /// The lines, each vertex's in order.
        lines: Vec<LogLine>,
    },
    /// Output files a part's vertices left (their bytes held by the leader), kept with the job:
    /// those of a later run replace those of an earlier one. Taken also after the job ended (a
    /// failed job keeps what it wrote); does not change the job's version.
    Files {
        /// The job.
        job: JobId,
        /// The run the part belongs to.
        attempt: u32,
        /// The files.
        files: Vec<crate::proto::OutputFile>,
    },
    /// An offer was made: its slots are held for it until it is accepted or lapses.
    Offer(Box<super::state::AgreementRecord>),
    /// An offer is accepted, at `at_ms` (not after it lapses): it becomes an agreement, and
    /// its job (pending, with its submission) waits for its start.
    Accept {
        /// The offer.
        offer: JobId,
        /// When (the leader's clock).
        at_ms: u64,
        /// Its job.
        job: Box<JobRecord>,
    },
    /// An offer lapsed (`Expired`), or an agreement could not be kept (`Violated`).
    EndAgreement {
        /// The offer or agreement.
        agreement: JobId,
        /// `Expired` (an offer) or `Violated` (an agreement).
        state: crate::proto::AgreementState,
        /// When (the leader's clock).
        at_ms: u64,
        /// Why.
        why: String,
    },
    /// A mint or transfer of the bank.
    Bank(super::bank::BankCommand),
    /// Commands proposed at once, applied in order as one entry (each as it would be alone).
    Batch(Vec<Command>),
}

impl Command {
    /// The jobs it is about.
    pub fn jobs(&self) -> Vec<&JobId> {
        match self {
            Command::Submit(j) | Command::Accept { job: j, .. } => vec![&j.id],
            Command::Array { jobs, .. } => jobs.iter().map(|j| &j.id).collect(),
            Command::Place { job, .. }
            | Command::Start { job, .. }
            | Command::PartDone { job, .. }
            | Command::Requeue { job, .. }
            | Command::Checkpoint { job, .. }
            | Command::Move { job, .. }
            | Command::End { job, .. }
            | Command::Logs { job, .. }
            | Command::Files { job, .. }
            | Command::Hold { job, .. }
            | Command::Bid { job, .. } => vec![job],
            Command::Batch(v) => v.iter().flat_map(Command::jobs).collect(),
            Command::Drain { .. }
            | Command::Offer(_)
            | Command::EndAgreement { .. }
            | Command::Bank(_) => Vec::new(),
        }
    }
}

/// What applying a command gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// The state changed.
    Done,
    /// Nothing changed, and why.
    Refused(CommandError),
    /// What each command of a batch gave, in order.
    Batch(Vec<Applied>),
}

/// Why the log refuses a command: it does not fit the state of its job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    /// The log holds no such job (never submitted, or forgotten long after it ended).
    #[error("no job {0}")]
    NoJob(JobId),
    /// The job has ended already.
    #[error("job {job} has ended ({state:?})")]
    Ended {
        /// The job.
        job: JobId,
        /// How it ended.
        state: JobState,
    },
    /// A job is submitted again.
    #[error("job {0} exists already")]
    Exists(JobId),
    /// A job is submitted in a state it cannot start in.
    #[error(
        "job {job}: a job is submitted pending (with its submission), or preparing or running \
         (with its parts), not {state:?}"
    )]
    Submitted {
        /// The job.
        job: JobId,
        /// The state it came in.
        state: JobState,
    },
    /// An offer or agreement that does not fit the command: none such, already accepted,
    /// lapsed, or ended.
    #[error("offer {id}: {why}")]
    Agreement {
        /// The offer or agreement.
        id: JobId,
        /// Why not.
        why: String,
    },
    /// The bank refuses a mint or transfer.
    #[error("{0}")]
    Bank(#[from] super::bank::BankError),
    /// A placement of a job that is not pending.
    #[error("job {0} is not pending")]
    NotPending(JobId),
    /// A start of a job that is not preparing.
    #[error("job {0} is not preparing")]
    NotPreparing(JobId),
    /// A placement without parts.
    #[error("job {0}: a placement needs a part")]
    NoParts(JobId),
    /// A part's report for a job that has no parts yet.
    #[error("job {0} is pending: it has no parts yet")]
    NoPartsYet(JobId),
    /// A report from a node that runs no part of the job.
    #[error("{node} runs no part of job {job}")]
    NotAPart {
        /// The job.
        job: JobId,
        /// The node.
        node: PeerId,
    },
    /// A second report of one part.
    #[error("{node} has already reported its part of job {job}")]
    Reported {
        /// The job.
        job: JobId,
        /// The node.
        node: PeerId,
    },
    /// A change of bid of a job that does not bid.
    #[error("job {0} does not bid for its nodes' CPU (its profile has no requirements.bid)")]
    NotBidding(JobId),
    /// A hold or release of a job that is not pending.
    #[error("job {job} is {state:?}: only a pending job can be held or released")]
    HoldNotPending {
        /// The job.
        job: JobId,
        /// Its state.
        state: JobState,
    },
    /// A hold of a held job, or a release of one not held.
    #[error("job {job} is already {}", if *held { "held" } else { "not held" })]
    AlreadyHeld {
        /// The job.
        job: JobId,
        /// Whether it is held.
        held: bool,
    },
    /// An end in a state that is not final.
    #[error("job {job}: {state:?} is not an end")]
    NotAnEnd {
        /// The job.
        job: JobId,
        /// The state asked for.
        state: JobState,
    },
    /// A report of a part of another run of the job than its current one.
    #[error("job {job} is in run {current}, not {attempt}")]
    OtherRun {
        /// The job.
        job: JobId,
        /// The run the command is about.
        attempt: u32,
        /// The job's run.
        current: u32,
    },
    /// A run given up that cannot be retried: not preparing or running, not the next run, past
    /// the job's retries, or without the submission to run it from.
    #[error("job {job} cannot run again as run {attempt}: {why}")]
    NoRetry {
        /// The job.
        job: JobId,
        /// The run asked for.
        attempt: u32,
        /// Why not.
        why: String,
    },
    /// A checkpoint of a job that is not running in that run, or not newer than the last.
    #[error("job {job}: checkpoint {cut} does not fit: {why}")]
    Checkpoint {
        /// The job.
        job: JobId,
        /// Its number.
        cut: u64,
        /// Why not.
        why: String,
    },
    /// A move of a part that does not fit the job: it is not running in that run, the part
    /// is not on the node it left or has ended, or the node it goes to holds another part.
    #[error("job {job}: the move of part {part} does not fit: {why}")]
    Move {
        /// The job.
        job: JobId,
        /// The part.
        part: u32,
        /// Why not.
        why: String,
    },
    /// A batch inside a batch.
    #[error("a batch inside a batch")]
    NestedBatch,
}
