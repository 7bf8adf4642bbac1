//! What the job log records of each job: its record, its parts, how it ended, and what it
//! holds.

use std::collections::VecDeque;

use libp2p::PeerId;
use mvm_component::policy::Principal;
use mvm_component::runtime::logs::{DEFAULT_BOUND, LogLine};
use serde::{Deserialize, Serialize};

use crate::proto::{
    CheckpointInfo, CheckpointPolicy, EdgeTraffic, ErrorKind, JobId, JobState, MoveInfo,
    PortTraffic, Restart, Submission, Traffic,
};

/// What a job asks of the group, as admission counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// vCPUs.
    pub vcpus: i64,
    /// Memory, MiB.
    pub memory_mib: i64,
    /// Vertices.
    pub vertices: i64,
}

impl Resources {
    pub(super) fn add(&mut self, other: Resources, sign: i64) {
        self.vcpus = self.vcpus.saturating_add(sign * other.vcpus);
        self.memory_mib = self.memory_mib.saturating_add(sign * other.memory_mib);
        self.vertices = self.vertices.saturating_add(sign * other.vertices);
    }
}

/// One node's share of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    /// The node.
    pub node: PeerId,
    /// Its vertices.
    pub vertices: Vec<String>,
    /// Whether it has reported a good end.
    pub done: bool,
    /// The guest it ran in, as its report said.
    #[serde(default)]
    pub guest: Option<crate::proto::GuestIdentity>,
    /// Its bid for its node's CPU, micro-credits per CPU-second, when the job bids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bid: Option<u64>,
}

/// Why a job ended other than well.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    /// When, milliseconds since the Unix epoch (the leader's clock).
    pub at_ms: u64,
    /// Why, for people (none when it is done).
    pub error: Option<String>,
    /// What kind of failure it was (none when it is done or was cancelled).
    #[serde(default)]
    pub kind: Option<ErrorKind>,
}

impl Ended {
    /// Now, failed with `kind`.
    pub fn failed(kind: ErrorKind, error: String) -> Ended {
        Ended {
            at_ms: now_ms(),
            error: Some(error),
            kind: Some(kind),
        }
    }

    /// Now, cancelled.
    pub fn cancelled() -> Ended {
        Ended {
            at_ms: now_ms(),
            error: Some("cancelled".into()),
            kind: None,
        }
    }
}

/// Whether a count is zero (a field left out of a record when it is).
#[allow(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A job as the log knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Its id, unique in the group.
    pub id: JobId,
    /// The profile's name.
    pub name: String,
    /// Who owns it.
    pub owner: Principal,
    /// The serial (hex) of the certificate its owner submitted it with, when known.
    #[serde(default)]
    pub owner_cert: Option<String>,
    /// What it holds while it has not ended.
    pub resources: Resources,
    /// The image its guests are made from (`host`: none).
    #[serde(default)]
    pub image: String,
    /// Higher is placed first among pending jobs.
    pub priority: i32,
    /// When it was submitted, milliseconds since the Unix epoch (the leader's clock).
    pub submitted_ms: u64,
    /// Where it stands.
    pub state: JobState,
    /// Whether a pending job is held back from placement.
    pub held: bool,
    /// Its parts, once placed.
    pub parts: Vec<PartRecord>,
    /// Vertex outputs reported so far.
    pub outputs: Vec<(String, bytes::Bytes)>,
    /// Traffic reported so far, summed by edge kind.
    pub traffic: Vec<Traffic>,
    /// What each edge carried, as the parts reported so far counted it (their vertices'
    /// whole lives: a restored vertex counts on from its checkpoint).
    #[serde(default)]
    pub edges: Vec<EdgeTraffic>,
    /// What each input port took, as the parts reported so far counted it.
    #[serde(default)]
    pub received: Vec<PortTraffic>,
    /// How it ended.
    pub ended: Option<Ended>,
    /// The submission with its modules, kept while the job waits, so that whichever replica
    /// leads can place it, and while it may be run again ([`JobRecord::retries`]).
    pub submission: Option<Box<Submission>>,
    /// How many times it may run again after a lost node.
    #[serde(default)]
    pub retries: u32,
    /// Its run now (0: the first).
    #[serde(default)]
    pub attempt: u32,
    /// The runs given up, and how the next went.
    #[serde(default)]
    pub restarts: Vec<Restart>,
    /// How it is checkpointed, if it is.
    #[serde(default)]
    pub checkpoint: Option<CheckpointPolicy>,
    /// The checkpoints kept, oldest first.
    #[serde(default)]
    pub checkpoints: Vec<CheckpointInfo>,
    /// Its parts moved to other nodes while it ran, oldest first (the last [`MAX_MOVES`]).
    #[serde(default)]
    pub moves: Vec<MoveInfo>,
    /// The index of the log entry that last changed it (set by [`ControlState::apply`]).
    #[serde(default)]
    pub version: u64,
    /// Bytes of log lines kept per vertex and run (0: the runtime's default).
    #[serde(default)]
    pub log_bytes: u64,
    /// The lines its vertices wrote, per run and vertex: the newest, up to `log_bytes` each.
    #[serde(default)]
    pub logs: Vec<VertexLogs>,
    /// Its topology's channels, `(from vertex:port, to vertex:port)` (for views that draw it).
    #[serde(default)]
    pub channels: Vec<(String, String)>,
    /// Its files: inputs by hash, output patterns (kept after the submission goes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<crate::proto::FileSpec>,
    /// The output files its parts left, of run [`JobRecord::written_attempt`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub written: Vec<crate::proto::OutputFile>,
    /// The run whose parts left [`JobRecord::written`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub written_attempt: u32,
    /// The array it belongs to, and its index there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array: Option<(JobId, u32)>,
    /// Jobs or arrays it waits for to end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<JobId>,
    /// Jobs or arrays it waits for to end well (it is cancelled when one does not).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after_ok: Vec<JobId>,
    /// How long it runs, milliseconds, as its profile or its agreement estimates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate_ms: Option<u64>,
    /// When its current run started, milliseconds since the Unix epoch (the leader's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// Whether it runs under an agreement (the agreement of the same id).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub agreement: bool,
    /// Its bid for its nodes' CPU, when it bids (the market's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bid: Option<JobBid>,
}

/// A job's bid for its nodes' CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobBid {
    /// Its rate now, micro-credits per CPU-second (a market job's: the highest of its
    /// parts'; each part's is in its [`PartRecord::bid`]).
    pub rate: u64,
    /// The highest rate a node may charge it at (for time before a change of bid, too): the
    /// highest it has bid, or a market job's budget.
    pub top: u64,
    /// What its nodes have charged for it so far, micro-credits.
    #[serde(default)]
    pub spent: u64,
    /// Its budget, when the broker's agent bids for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub market: Option<crate::proto::MarketSpec>,
    /// Whether the agent bids for it now (a bid by hand stops it).
    #[serde(default)]
    pub agent: bool,
}

impl JobBid {
    /// A job's bid as its submission asks: a fixed rate, or a budget for the agent.
    pub fn of(r: &crate::proto::Requirements) -> Option<JobBid> {
        match (r.bid, r.market) {
            (Some(rate), _) => Some(JobBid {
                rate,
                top: rate,
                spent: 0,
                market: None,
                agent: false,
            }),
            (None, Some(m)) => Some(JobBid {
                rate: 0,
                top: m.budget,
                spent: 0,
                market: Some(m),
                agent: true,
            }),
            (None, None) => None,
        }
    }

    /// What is left of a market job's budget (none for a fixed bid).
    pub fn left(&self) -> Option<u64> {
        self.market.map(|m| m.budget.saturating_sub(self.spent))
    }
}

/// An offer to run a job by a promised finish, and the agreement it becomes once accepted
/// (OpenCCS's SLA): what it reserves, where, when, and how it went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgreementRecord {
    /// Its id: the id its job gets.
    pub id: JobId,
    /// The profile's name.
    pub name: String,
    /// Who it was offered to.
    pub owner: Principal,
    /// The execution environment: the image's full id, or `host`.
    pub image: String,
    /// What the job asks for (vCPUs and memory per guest, vertices).
    pub resources: Resources,
    /// The vertex slots reserved on each node.
    pub slots: Vec<(PeerId, u32)>,
    /// The earliest start, milliseconds since the Unix epoch.
    pub start_ms: u64,
    /// The promised finish.
    pub finish_ms: u64,
    /// The run time planned for, milliseconds.
    pub estimate_ms: u64,
    /// Where the estimate came from (`profile`, `history`).
    pub estimate_from: String,
    /// The deadline asked for.
    pub deadline_ms: Option<u64>,
    /// When it was offered.
    pub offered_ms: u64,
    /// When the offer lapses unless accepted.
    pub expires_ms: u64,
    /// Where it is.
    pub state: crate::proto::AgreementState,
    /// Why it was violated, expired or cancelled.
    pub reason: Option<String>,
    /// When it was accepted.
    pub accepted_ms: Option<u64>,
    /// When it reached a final state.
    pub ended_ms: Option<u64>,
    /// The job (with its modules), kept until the offer is accepted or lapses.
    pub submission: Option<Box<Submission>>,
}

impl AgreementRecord {
    /// Whether its slots are held from other jobs now: offered, or agreed and its job not
    /// placed (`job_pending`: its job waits in the queue).
    pub fn holds(&self, job_pending: bool) -> bool {
        use crate::proto::AgreementState as S;
        match self.state {
            S::Offered => true,
            S::Accepted | S::Running => job_pending,
            _ => false,
        }
    }

    /// Ends it in `state` at `at_ms` for `why`, unless it has ended.
    pub(super) fn end(
        &mut self,
        state: crate::proto::AgreementState,
        at_ms: u64,
        why: Option<String>,
    ) {
        if self.state.is_final() {
            return;
        }
        self.state = state;
        self.ended_ms = Some(at_ms);
        self.reason = why;
        self.submission = None;
    }
}

/// An array of jobs (a profile's `[sweep]`): one submission, one job per point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArrayRecord {
    /// Its id (its jobs' ids are their own).
    pub id: JobId,
    /// The profile's name.
    pub name: String,
    /// Who owns it.
    pub owner: Principal,
    /// Its jobs, by index.
    pub jobs: Vec<JobId>,
    /// The modules of its jobs, kept once for all of them while some have not ended (its
    /// jobs' submissions are kept without them).
    pub modules: Vec<bytes::Bytes>,
}

/// The lines one vertex wrote in one run of its job, as the job log keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VertexLogs {
    /// The run.
    pub attempt: u32,
    /// The vertex.
    pub vertex: String,
    /// Its lines, by number (the oldest dropped past the bound).
    pub lines: VecDeque<LogLine>,
    /// What they weigh ([`LogLine::weight`]).
    pub bytes: u64,
}

impl JobRecord {
    /// Keeps `lines` of run `attempt`: each in its vertex's place by number (a line already
    /// kept is not kept twice), then the oldest of each vertex dropped past the bound.
    pub(super) fn keep_logs(&mut self, attempt: u32, lines: Vec<LogLine>) {
        let bound = if self.log_bytes == 0 {
            DEFAULT_BOUND as u64
        } else {
            self.log_bytes
        };
        for line in lines {
            let at = match self
                .logs
                .iter()
                .position(|v| v.attempt == attempt && v.vertex == line.vertex)
            {
                Some(i) => i,
                None => {
                    self.logs.push(VertexLogs {
                        attempt,
                        vertex: line.vertex.clone(),
                        ..VertexLogs::default()
                    });
                    self.logs.len() - 1
                }
            };
            let v = &mut self.logs[at];
            // Lines come in order; a late one (an earlier shipment recorded after) is put in
            // its place.
            let place = v.lines.partition_point(|l| l.seq < line.seq);
            if v.lines.get(place).is_some_and(|l| l.seq == line.seq) {
                continue;
            }
            v.bytes += line.weight() as u64;
            v.lines.insert(place, line);
            while v.bytes > bound {
                match v.lines.pop_front() {
                    Some(old) => v.bytes -= old.weight() as u64,
                    None => break,
                }
            }
        }
    }
}

impl JobRecord {
    /// The files the job refers to, by hash: its inputs, the outputs it wrote, and what its
    /// vertices' sandboxes held at the checkpoints it keeps.
    pub fn file_hashes(&self) -> impl Iterator<Item = crate::proto::Hash> + '_ {
        let inputs = self
            .files
            .iter()
            .flat_map(|f| f.inputs.iter().map(|i| i.hash));
        let kept = self
            .checkpoints
            .iter()
            .flat_map(|c| &c.parts)
            .flat_map(|p| p.files.iter().flatten().map(|f| f.hash));
        inputs
            .chain(self.written.iter().map(|f| f.hash))
            .chain(kept)
    }

    /// How many vertices each node holds for this job.
    pub(super) fn slots(&self) -> impl Iterator<Item = (PeerId, u32)> + '_ {
        self.parts
            .iter()
            .map(|p| (p.node, u32::try_from(p.vertices.len()).unwrap_or(u32::MAX)))
    }
}
