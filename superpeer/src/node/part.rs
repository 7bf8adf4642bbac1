//! What the node's parts machine ([`super::parts::Parts`]) takes, gives and holds: its inputs
//! and effects, a part and its stages, what a prepared part brings, and what the rest of the
//! node sees.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use bytes::Bytes;
use libp2p::{Multiaddr, PeerId};
use mvm_component::runtime::checkpoint::PartControl;
use mvm_component::runtime::{Prepared, RemoteOutput};
use mvm_queue::queue::{Entry, Sender};
use mvm_queue::remote::{Drain, Hold};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use super::LinkResult;
use crate::environment::EnvLease;
use crate::proto::{Failure, JobId, MoveStep, PartReport, PartSpec, Response};
use crate::worker::Started;

pub(super) type Reply = oneshot::Sender<Response>;

/// A remote link end of a part: for an input, its vertex, its port, and the peer that feeds
/// it; for an output, the remote vertex and port it feeds, and the peer that runs them.
pub(super) type InputKey = (String, String, PeerId);

/// How a prepared part runs.
#[allow(
    clippy::large_enum_variant,
    reason = "the common case (`Here`) is not boxed; a part is itself boxed in `Ready` and `Launch`"
)]
pub(super) enum Body {
    /// In the node's own process.
    Here(Prepared),
    /// In a worker process inside its guest ([`crate::worker`]).
    Worker(Box<InGuest>),
}

impl Body {
    /// What the part's vertices write, line by line.
    pub(super) fn logs(&self) -> Arc<mvm_component::runtime::logs::LogBook> {
        match self {
            Body::Here(p) => p.logs(),
            Body::Worker(w) => w.started.logs(),
        }
    }
}

/// A part prepared in a worker inside its guest.
pub(super) struct InGuest {
    /// The worker, waiting for the part's start.
    pub(super) started: Started,
    /// The part's remote outputs (the node's ends, which it carries to the other parts).
    pub(super) remote_outputs: Vec<RemoteOutput>,
}

/// A part prepared off the loop: everything it needs to run.
pub(super) struct Ready {
    pub(super) prepared: Body,
    /// Every part of the job: where it runs.
    pub(super) parts: Vec<(PeerId, Vec<Multiaddr>)>,
    /// Remote inputs waiting for their streams.
    pub(super) inputs: HashMap<InputKey, Sender<Bytes>>,
    /// How many remote channels it has (in and out).
    pub(super) expected_links: usize,
    pub(super) vertices: u32,
    /// The guest it runs in: held for its `Drop`, which releases it when the part goes.
    pub(super) env: Option<EnvLease>,
    /// What checkpoints it, when its job asked for checkpoints.
    pub(super) marks: Option<Marks>,
    /// Its vertices' sandboxes, when its job has files.
    pub(super) sandbox: Option<Arc<crate::files::Sandbox>>,
}

/// What pauses and images a part: in the node's process, or through its worker.
#[derive(Clone)]
pub(super) enum Control {
    /// The part runs here.
    Here(PartControl),
    /// The part runs in a worker.
    Worker(Arc<crate::worker::Control>),
}

impl Control {
    /// Lets a part kept paused after it was saved to move away go on (the move was given up).
    pub(super) fn resume_kept(&self, n: u64) {
        match self {
            Control::Here(c) => c.resume_kept(n),
            Control::Worker(w) => w.resume(),
        }
    }
}

/// What takes a checkpoint of a running part: its pause control, and the ends of its links,
/// to hold and drain to the cut's mark. Cheap to clone.
#[derive(Clone)]
pub(super) struct Marks {
    pub(super) control: Control,
    /// One per remote output, in [`Prepared::remote_outputs`]'s order.
    pub(super) holds: Vec<(InputKey, Hold)>,
    /// One per remote input.
    pub(super) drains: Vec<(InputKey, Drain)>,
}

impl Marks {
    /// The drain of the remote input `key` (a fresh one, never asked to drain, if none).
    pub(super) fn drain(&self, key: &InputKey) -> Drain {
        self.drains
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, d)| d.clone())
            .unwrap_or_default()
    }

    /// The ends of its links with `peer` only: what a move of the part on `peer` holds here.
    pub(super) fn with(&self, peer: PeerId) -> (Vec<Hold>, Vec<Drain>) {
        let holds = self.holds.iter().filter(|(k, _)| k.2 == peer);
        let drains = self.drains.iter().filter(|(k, _)| k.2 == peer);
        (
            holds.map(|(_, h)| h.clone()).collect(),
            drains.map(|(_, d)| d.clone()).collect(),
        )
    }
}

/// What a part needs to start, given to the loop to run it.
pub(super) struct Launch {
    pub(super) prepared: Body,
    pub(super) parts: Vec<(PeerId, Vec<Multiaddr>)>,
    /// Where its remote channels report their ends.
    pub(super) links: mpsc::Sender<LinkResult>,
    pub(super) links_rx: mpsc::Receiver<LinkResult>,
    /// The holds of its remote outputs, in order (none: never held).
    pub(super) holds: Vec<Hold>,
    /// How many remote links its supervisor waits for.
    pub(super) expected: Arc<AtomicUsize>,
    /// The guest it runs in, if any.
    pub(super) guest: Option<crate::environment::GuestRef>,
    /// Its vertices' sandboxes, when its job has files: its outputs are taken from them when
    /// it ends.
    pub(super) sandbox: Option<Arc<crate::files::Sandbox>>,
    /// Its job's files.
    pub(super) files: Option<crate::proto::FileSpec>,
    /// The broker that placed it.
    pub(super) broker: PeerId,
}

/// What happens to the node's parts.
pub(super) enum Input {
    /// The broker `from` (a super-peer of the group: checked) wakes a part.
    Prepare {
        from: PeerId,
        spec: Box<PartSpec>,
        reply: Reply,
    },
    /// The preparation of run `attempt` of a job's part ended.
    Prepared {
        job: JobId,
        attempt: u32,
        ready: Result<Box<Ready>, Failure>,
    },
    /// `from` starts a prepared part of run `attempt`; `superpeer`: whether `from` is a
    /// super-peer of the group.
    Start {
        from: PeerId,
        superpeer: bool,
        job: JobId,
        attempt: u32,
        reply: Reply,
    },
    /// `from` ends a part of run `attempt` or before (whatever it is doing).
    Terminate {
        from: PeerId,
        superpeer: bool,
        job: JobId,
        attempt: u32,
        reason: String,
        reply: Reply,
    },
    /// A running part ended.
    Ended { report: PartReport },
    /// The hold of the answer to a part's prepare (which started it) is over.
    HoldOver { job: JobId, attempt: u32 },
    /// The guest `guest` died behind the node's back (the liveness monitor saw it), `why`.
    GuestDied { guest: String, why: String },
    /// A queue stream from `key.2` into a remote input of run `attempt` of `job` asks for
    /// its queue.
    Inbound {
        job: JobId,
        attempt: u32,
        key: InputKey,
        reply: oneshot::Sender<Option<Inbound>>,
    },
    /// A checkpoint of the running part of run `attempt` of `job`, at cut `cut`.
    Checkpoint {
        /// The super-peer that asks (the checkpoint's files go to it).
        from: PeerId,
        job: JobId,
        attempt: u32,
        cut: u64,
        /// How long the broker waits for the cut, if longer than usual.
        within_ms: Option<u64>,
        reply: Reply,
    },
    /// Every part of cut `cut` of run `attempt` of `job` has its image: the part's sending
    /// ends go on.
    ReleaseCut {
        job: JobId,
        attempt: u32,
        cut: u64,
        reply: Reply,
    },
    /// Tasks of `job`'s (its running part's, or a queue stream's import, which may come before
    /// its part runs): ended with the part. `links`: those that run a remote link, by end
    /// (`true`: an output), for a move to stop.
    Attach {
        job: JobId,
        tasks: Vec<AbortHandle>,
        links: Vec<(InputKey, bool, AbortHandle)>,
    },
    /// A step of a move of the part of run `attempt` of `job` ([`MoveStep`]).
    Move {
        /// The super-peer that asks (a leaving part's files go to it).
        from: PeerId,
        job: JobId,
        attempt: u32,
        step: MoveStep,
        reply: Reply,
    },
    /// The part of run `attempt` of `job`, leaving, was saved and stays paused at pause
    /// `pause`; or (`None`) was not saved, and goes on.
    Left {
        job: JobId,
        attempt: u32,
        pause: Option<u64>,
    },
    /// The wait of a move of the part of run `attempt` of `job` is over ([`Effect::MoveWait`]).
    MoveOver { job: JobId, attempt: u32 },
    /// The links of a part that a move held now go to the new node: the new inputs (with the
    /// items their old link delivered past its queue's room, to give first), and the tasks and
    /// holds of the new outputs.
    Relinked(Box<Relinked>),
    /// A queue stream lost before its acknowledgement gives its queue back (its opener tries
    /// again).
    GiveBack {
        job: JobId,
        attempt: u32,
        key: InputKey,
        sender: Sender<Bytes>,
        /// The items to give the queue before the stream's, for an input a move linked again.
        first: Option<Vec<Entry<Bytes>>>,
    },
}

/// What a queue stream into a remote input is given: the input's queue, where the link reports
/// its end, the drain of its receiving end, and (an input linked again by a move) the items
/// to give its queue before the stream's; such an input takes a stream, never a direct link.
pub(super) type Inbound = (
    Sender<Bytes>,
    mpsc::Sender<LinkResult>,
    Drain,
    Option<Vec<Entry<Bytes>>>,
);

/// An input whose link a move stops: its end, its old link's task, its drain, and (a link
/// never opened) its queue.
pub(super) type OldInput = (InputKey, Option<AbortHandle>, Drain, Option<Sender<Bytes>>);

/// An input a move links again: its end, its queue, and the items to give it first.
pub(super) type NewInput = (InputKey, Sender<Bytes>, Vec<Entry<Bytes>>);

/// The links of a part held for a move, to link again to the part's new node (carried out on
/// the loop: [`Effect::Relink`]).
pub(super) struct Relink {
    pub(super) job: JobId,
    pub(super) attempt: u32,
    /// Its outputs to the node left: their ends and the tasks of their old links.
    pub(super) outs: Vec<(InputKey, Option<AbortHandle>)>,
    /// Its inputs from the node left: their ends, the tasks of their old links, their
    /// drains, and (a link not opened yet) their queues.
    pub(super) ins: Vec<OldInput>,
    /// The node the part moved to, and where it listens.
    pub(super) to: PeerId,
    pub(super) addrs: Vec<Multiaddr>,
    /// Where the part's remote links report their ends, and how many it waits for.
    pub(super) links: mpsc::Sender<LinkResult>,
    pub(super) expected: Arc<AtomicUsize>,
    pub(super) reply: Reply,
}

/// What a move's new links of a part are ([`Input::Relinked`]).
pub(super) struct Relinked {
    pub(super) job: JobId,
    pub(super) attempt: u32,
    /// The node left.
    pub(super) from: PeerId,
    /// New inputs: their ends, their queues, and the items to give first.
    pub(super) ins: Vec<NewInput>,
    /// New outputs: their ends, their holds, and the tasks that run them.
    pub(super) outs: Vec<(InputKey, Hold, AbortHandle)>,
    pub(super) reply: Reply,
}

/// A move under way, as a part sees it.
pub(super) enum Moving {
    /// The part is leaving ([`MoveStep::Leave`]): being saved, then (`Some`) kept paused at
    /// that pause.
    Leaving(Option<u64>),
    /// Its links with this node (whose part leaves) are held ([`MoveStep::Hold`]).
    Holding(PeerId),
}

/// What the node's loop must do.
pub(super) enum Effect {
    /// Answer a request.
    Reply(Reply, Response),
    /// Prepare a part off the loop; what comes of it is [`Input::Prepared`].
    Prepare { from: PeerId, spec: Box<PartSpec> },
    /// Run a part: its outgoing channels and its vertices; its end is [`Input::Ended`].
    Run {
        job: JobId,
        attempt: u32,
        launch: Box<Launch>,
    },
    /// Hold the answer to a prepare that started its part; then [`Input::HoldOver`].
    Hold { job: JobId, attempt: u32 },
    /// Stop `tasks` (what runs for run `attempt` of `job`) and remove its queues.
    Stop {
        job: JobId,
        attempt: u32,
        reason: String,
        tasks: Vec<AbortHandle>,
    },
    /// Stop tasks of a part that is gone.
    Abort(Vec<AbortHandle>),
    /// Take the output files of a part that was stopped (another part failed, or the job was
    /// cancelled) from its sandbox, and record them with its job, as a part that ends does.
    Epilog {
        job: JobId,
        attempt: u32,
        broker: PeerId,
        sandbox: Arc<crate::files::Sandbox>,
        files: crate::proto::FileSpec,
    },
    /// Take a checkpoint of a running part at cut `cut` and answer with its blob; its sending
    /// ends stay held until `release` fires (or `hold` passes: see
    /// [`super::checkpoint::release_wait`]).
    Checkpoint {
        marks: Box<Marks>,
        save: Option<Save>,
        cut: u64,
        hold: Duration,
        reply: Reply,
        release: oneshot::Receiver<()>,
    },
    /// Save a part that leaves at cut `cut`, answer with its blob, and keep it paused; then
    /// [`Input::Left`].
    Leave {
        job: JobId,
        attempt: u32,
        marks: Box<Marks>,
        save: Option<Save>,
        cut: u64,
        reply: Reply,
    },
    /// Hold and drain these link ends to cut `cut`, and answer once they reach it (released
    /// if they do not).
    HoldLinks {
        holds: Vec<Hold>,
        drains: Vec<Drain>,
        cut: u64,
        reply: Reply,
    },
    /// Wait `wait` (see [`super::moves::MOVE_WAIT`]) for the move of run `attempt` of `job` to
    /// go on; then [`Input::MoveOver`].
    MoveWait {
        job: JobId,
        attempt: u32,
        wait: Duration,
    },
    /// Let these link ends go on.
    Release {
        holds: Vec<Hold>,
        drains: Vec<Drain>,
    },
    /// Link a part's held links to the part's new node; then [`Input::Relinked`].
    Relink(Box<Relink>),
    /// Send a part's report to the group's leader (the part was placed by `broker`).
    Report {
        broker: PeerId,
        report: Box<PartReport>,
    },
}

/// One part.
pub(super) struct Part {
    /// The broker that placed it.
    pub(super) broker: PeerId,
    /// The run of the job it belongs to.
    pub(super) attempt: u32,
    /// Remote inputs waiting for their streams.
    pub(super) inputs: HashMap<InputKey, Sender<Bytes>>,
    /// Where remote channels report their ends (kept for inbound streams yet to come).
    pub(super) links: Option<mpsc::Sender<LinkResult>>,
    pub(super) vertices: u32,
    pub(super) stage: Stage,
    /// Its tasks, ended with it.
    pub(super) tasks: Vec<AbortHandle>,
    /// Its guest, released when the part goes.
    pub(super) _env: Option<EnvLease>,
    /// Its vertices' sandboxes, removed when the part goes (and its epilog has ended).
    pub(super) _sandbox: Option<Arc<crate::files::Sandbox>>,
    /// Its job's files.
    pub(super) files: Option<crate::proto::FileSpec>,
    /// What checkpoints it, when its job asked for checkpoints.
    pub(super) marks: Option<Marks>,
    /// The tasks of its remote links, by end: outputs, and inputs.
    pub(super) outlets: HashMap<InputKey, AbortHandle>,
    pub(super) inlets: HashMap<InputKey, AbortHandle>,
    /// Inputs linked again by a move: taken over a stream only, and the items to give first
    /// (taken by the stream).
    pub(super) relinked: HashMap<InputKey, Vec<Entry<Bytes>>>,
    /// How many remote links its supervisor waits for (a move that links again a link that
    /// had ended adds one).
    pub(super) expected: Arc<AtomicUsize>,
    /// A move under way.
    pub(super) moving: Option<Moving>,
    /// How long it stays paused or holds its links for the move under way
    /// ([`super::moves`]' `move_wait`).
    pub(super) move_wait: Duration,
    /// The cut whose image is taken and whose sending ends wait to be let go.
    pub(super) cut_release: Option<(u64, oneshot::Sender<()>)>,
    /// A cut asked of the part before its `Start` came: the broker sends `Start` before it
    /// cuts a running job, but the two requests may cross on the way. Taken when it starts.
    pub(super) early_cut: Option<(u64, Option<u64>, Reply)>,
    /// The super-peer that last asked for a checkpoint or a move of the part (the leader
    /// then, which may not be the one that placed it): what a checkpoint saves goes to it.
    pub(super) saver: Option<PeerId>,
}

impl Part {
    /// What a checkpoint of the part saves of its sandboxes, when its job has files.
    pub(super) fn save(&self) -> Option<Save> {
        let (sandbox, files) = (self._sandbox.clone()?, self.files.as_ref()?);
        Some(Save {
            sandbox,
            bound: files.input_bytes().saturating_add(files.output_bytes),
            to: self.saver.unwrap_or(self.broker),
        })
    }
}

/// What a checkpoint saves of a part's sandboxes: every file in them (at most `bound` bytes a
/// vertex), sent to `to`, the super-peer that asked for it.
pub(super) struct Save {
    pub(super) sandbox: Arc<crate::files::Sandbox>,
    pub(super) bound: u64,
    pub(super) to: PeerId,
}

pub(super) enum Stage {
    /// Off the loop; the prepare is answered when it ends.
    Preparing { reply: Reply, start: bool },
    /// Prepared, waiting for `Start`.
    Prepared(Box<Launch>),
    /// Running; `hold` is the answer to a prepare that started it, while it is held.
    Running { hold: Option<Reply> },
}

/// What the rest of the node sees of its parts: each part's vertices and run, by job.
#[derive(Default)]
pub(super) struct Held {
    pub(super) jobs: Mutex<HashMap<JobId, (u32, u32)>>,
}

impl Held {
    /// Vertices of the parts held now.
    pub(super) fn vertices(&self) -> u32 {
        self.jobs.lock().values().map(|(v, _)| v).sum()
    }

    /// The jobs whose parts are held now.
    pub(super) fn jobs(&self) -> Vec<JobId> {
        self.jobs.lock().keys().cloned().collect()
    }

    /// The queue namespaces of the parts held now ([`super::space`]).
    pub(super) fn spaces(&self) -> Vec<String> {
        let jobs = self.jobs.lock();
        jobs.iter()
            .map(|(job, (_, attempt))| super::space(job, *attempt))
            .collect()
    }
}
