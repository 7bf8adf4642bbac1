//! The broker role of a super-peer: jobs from submission to the broadcast of their end (the
//! MVM paper's on-demand steps a–g), with every job and transition in the group's job log
//! ([`crate::joblog`]). Every replica of the log runs a broker; only the one that leads the log
//! acts, and the others answer with where the leader is.
//!
//! - `members`: registrations and heartbeats (soft state of the leader), lost nodes, group
//!   summaries.
//! - `admit`: owners, policy and what placements under way hold.
//! - `place`: checking, scheduling and recording a job.
//! - `drive`: prepare, start, reports and the end.
//! - `forward`: jobs for other groups.
//! - `status`: what clients read of jobs, and waiting for a job to change.
//! - `run`: the broker's loop (its tick, and the summaries of other groups).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use mvm_component::policy::{Principal, PrincipalKind};
use parking_lot::Mutex;

use crate::joblog::state::{Ended, JobRecord};
use crate::joblog::{JobLog, Replica};
use crate::modules::ModuleStore;
use crate::proto::{
    ClientRequest, Failure, FailureKind, GroupSummary, JobState, NodeRequest, Response,
    SUBMIT_HOLD, Submission,
};
use crate::site::Site;
use mvm_component::runtime::ErrorKind;
use mvm_queue::codec::Registry;

mod admit;
mod drive;
mod forward;
mod members;
mod place;
mod run;
mod status;

#[cfg(test)]
mod harness;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_faults;
#[cfg(test)]
mod tests_policy;
#[cfg(test)]
mod tests_queue;
#[cfg(test)]
mod tests_run;

use place::Placed;

/// The broker's state beside the log.
pub(crate) struct Broker {
    /// The daemon it runs in.
    site: Arc<Site>,
    /// The codecs a topology may name.
    codecs: Arc<Registry>,
    /// The group's job log (this super-peer's replica).
    pub(crate) log: JobLog,
    pub(crate) modules: ModuleStore,
    nodes: Mutex<HashMap<PeerId, members::NodeEntry>>,
    /// Nodes the log names as holding parts that have not registered since this broker took
    /// the lead, and since when it waits for them.
    expected: Mutex<HashMap<PeerId, Instant>>,
    seq: AtomicU64,
    /// Other groups' summaries, by super-peer, with when they were heard.
    groups: Mutex<HashMap<String, (GroupSummary, Instant)>>,
    inflight: Mutex<admit::Inflight>,
    /// Jobs whose parts this broker is preparing now.
    driving: Mutex<HashSet<String>>,
    /// Why each pending job waits, as the last try to place it found.
    waiting: Mutex<HashMap<String, String>>,
    /// The replicas as members, leader first, for the leader and membership index they were
    /// made for (see [`Broker::replicas`]).
    replicas_made: Mutex<Option<members::ReplicaList>>,
    /// Whether this broker led the log at its last look.
    leading: AtomicBool,
    /// Messages to nodes under way (terminations), ended with the broker.
    tasks: Mutex<tokio::task::JoinSet<()>>,
    /// The replicas to start the job log with, and since when, if no other replica has started
    /// it by [`FOUNDING_WAIT`].
    founders: Mutex<Option<(Vec<Replica>, Instant)>>,
}

/// How long a replica waits for the founding replica to start a new job log before it starts
/// the log itself.
const FOUNDING_WAIT: Duration = Duration::from_secs(5);

/// How many times `lost_after` a new leader waits for a node that holds parts to register
/// (see `Broker::lost_nodes`).
const TAKEOVER_GRACE: u32 = 4;

pub(super) fn fail(kind: FailureKind, m: impl Into<String>) -> Response {
    Response::Error(Failure::new(kind, m))
}

pub(super) use crate::joblog::state::now_ms;

impl Broker {
    pub(crate) fn new(
        site: Arc<Site>,
        codecs: Arc<Registry>,
        log: JobLog,
        modules: ModuleStore,
        founders: Option<Vec<Replica>>,
    ) -> Broker {
        Broker {
            site,
            codecs,
            log,
            modules,
            nodes: Mutex::new(HashMap::new()),
            expected: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            groups: Mutex::new(HashMap::new()),
            inflight: Mutex::default(),
            driving: Mutex::default(),
            waiting: Mutex::default(),
            replicas_made: Mutex::new(None),
            leading: AtomicBool::new(false),
            tasks: Mutex::new(tokio::task::JoinSet::new()),
            founders: Mutex::new(founders.map(|r| (r, Instant::now()))),
        }
    }

    /// Runs on every membership tick: notices a change of leader, marks silent nodes lost and
    /// fails their parts.
    async fn tick(self: &Arc<Self>) {
        let lost_after = self.site.lost_after;
        while self.tasks.lock().try_join_next().is_some() {}
        self.found().await;
        let leading = self.log.is_leader();
        let was = self
            .leading
            .swap(leading, std::sync::atomic::Ordering::Relaxed);
        if !leading {
            return;
        }
        if !was {
            self.take_over().await;
        }
        for (peer, name) in self.lost_nodes(lost_after) {
            tracing::warn!(%peer, %name, "node lost");
            let jobs: Vec<String> = self.log.read(|s| {
                s.jobs()
                    .filter(|j| {
                        !j.state.is_final() && j.parts.iter().any(|p| p.node == peer && !p.done)
                    })
                    .map(|j| j.id.clone())
                    .collect()
            });
            for job in jobs {
                let why = format!("node {name} ({peer}) stopped answering; its vertices failed");
                self.end(&job, JobState::Failed, Ended::failed(ErrorKind::Lost, why))
                    .await;
            }
            let net = self.site.net.clone();
            self.tasks
                .lock()
                .spawn(async move { net.disconnect(peer).await });
        }
        for (job, peer, name) in self.vanished(lost_after) {
            let why = format!("node {name} ({peer}) no longer runs its part (it restarted?)");
            tracing::warn!(%job, %peer, %name, "a part is gone from its node");
            self.end(&job, JobState::Failed, Ended::failed(ErrorKind::Lost, why))
                .await;
        }
        {
            let pending: HashSet<String> = self
                .log
                .read(|s| s.pending().map(|j| j.id.clone()).collect());
            self.waiting.lock().retain(|id, _| pending.contains(id));
        }
        self.place_pending().await;
    }

    /// Starts the job log with the founding replicas if none has started it in time.
    async fn found(&self) {
        let due = {
            let mut f = self.founders.lock();
            match &*f {
                Some(_) if !self.log.replicas().is_empty() => {
                    *f = None;
                    None
                }
                Some((_, since)) if since.elapsed() > FOUNDING_WAIT => f.take().map(|(r, _)| r),
                _ => None,
            }
        };
        if let Some(replicas) = due {
            tracing::warn!("no replica started the group's job log; this one does");
            if let Err(e) = self.log.initialize(&replicas).await {
                tracing::warn!(error = %e, "cannot start the job log");
            }
        }
    }

    /// This broker has just taken the lead: the jobs that the last leader was preparing cannot
    /// be started (their preparation died with it) and fail; running jobs go on, and the nodes
    /// that run them count as lost unless they register within the usual time.
    async fn take_over(self: &Arc<Self>) {
        let (preparing, nodes): (Vec<String>, HashSet<PeerId>) = self.log.read(|s| {
            let driving = self.driving.lock();
            let live: Vec<&JobRecord> = s.jobs().filter(|j| !j.state.is_final()).collect();
            (
                live.iter()
                    .filter(|j| j.state == JobState::Preparing && !driving.contains(&j.id))
                    .map(|j| j.id.clone())
                    .collect(),
                live.iter()
                    .flat_map(|j| j.parts.iter().filter(|p| !p.done).map(|p| p.node))
                    .collect(),
            )
        });
        tracing::warn!(
            preparing = preparing.len(),
            nodes = nodes.len(),
            "this super-peer now leads the group's job log"
        );
        {
            let registered = self.nodes.lock();
            let mut expected = self.expected.lock();
            for n in nodes {
                if !registered.contains_key(&n) {
                    expected.insert(n, Instant::now());
                }
            }
        }
        for job in preparing {
            let why = "its super-peer was lost while it was being prepared".to_owned();
            self.end(&job, JobState::Failed, Ended::failed(ErrorKind::Lost, why))
                .await;
        }
    }

    /// The answer of a replica that does not lead.
    fn not_leader(&self) -> Response {
        let why = crate::joblog::LogError::NotLeader {
            leader: self.log.leader(),
        };
        fail(
            FailureKind::Unavailable,
            format!(
                "{} of group {}: {why}",
                self.site.net.peer(),
                self.site.group
            ),
        )
    }

    /// Validates, authorizes and places a job, then drives it on its own task.
    async fn submit(self: &Arc<Self>, caller: &Principal, s: Submission) -> Response {
        let owner = match admit::owner_of(caller, &s) {
            Ok(o) => o,
            Err(why) => return fail(FailureKind::Refused, format!("job {}: {why}", s.name)),
        };
        let hops = s.hops;
        match self.place(&owner, s.clone()).await {
            Placed::Job(r) => *r,
            Placed::Unplaceable { vertices, why } if hops == 0 => {
                self.forward(s, owner, vertices, &why).await
            }
            Placed::Unplaceable { why, .. } => fail(FailureKind::Unavailable, why),
        }
    }

    /// Records `command`; the answer to give when it is not recorded.
    async fn record(&self, command: crate::joblog::Command) -> Result<(), Response> {
        match self.log.propose(command).await {
            Ok(crate::joblog::Applied::Done) => Ok(()),
            Ok(crate::joblog::Applied::Refused(why)) => Err(Response::Error(why.into())),
            // A batch stands or falls with its first command (the others follow from it).
            Ok(crate::joblog::Applied::Batch(v)) => match v.into_iter().next() {
                Some(crate::joblog::Applied::Done) => Ok(()),
                Some(crate::joblog::Applied::Refused(why)) => Err(Response::Error(why.into())),
                _ => Err(fail(FailureKind::Failed, "a batch gave no outcome")),
            },
            Err(e) => Err(fail(FailureKind::Unavailable, e.to_string())),
        }
    }

    async fn cancel(&self, job: &str) -> Response {
        match self.log.read(|s| s.job(job).map(|j| j.state)) {
            None => fail(FailureKind::NotFound, format!("no job {job}")),
            Some(s) if s.is_final() => fail(
                FailureKind::Input,
                format!("job {job} has already ended ({s:?})"),
            ),
            Some(_) => {
                self.end(job, JobState::Cancelled, Ended::cancelled()).await;
                Response::Ok
            }
        }
    }

    /// Answers a client (a user, or a super-peer forwarding a job). Only the leader answers,
    /// except for which modules it lacks (any replica that has them can serve them).
    pub(crate) async fn client(
        self: &Arc<Self>,
        who: &Principal,
        request: ClientRequest,
    ) -> Response {
        if !matches!(request, ClientRequest::Missing { .. }) && !self.log.is_leader() {
            return self.not_leader();
        }
        match request {
            ClientRequest::Missing { hashes } => Response::Missing {
                hashes: hashes
                    .iter()
                    .filter(|h| !self.modules.has(h))
                    .cloned()
                    .collect(),
            },
            ClientRequest::Submit(s) => {
                let wait = s.wait;
                match self.submit(who, *s).await {
                    Response::Submitted(st) if wait && !st.state.is_final() => self.held(st).await,
                    r => r,
                }
            }
            ClientRequest::Status { job } => self.status(who, job.as_deref()),
            ClientRequest::Wait {
                job,
                after,
                until_end,
            } => {
                if let Some(r) = self.refusal(who, "read-results", &job) {
                    return r;
                }
                self.wait(&job, after, until_end, SUBMIT_HOLD).await
            }
            ClientRequest::Cancel { job } => match self.refusal(who, "cancel", &job) {
                None => self.cancel(&job).await,
                Some(r) => r,
            },
            // Who may cancel a job may hold it back.
            ClientRequest::Hold { job, held } => match self.refusal(who, "cancel", &job) {
                None => match self
                    .record(crate::joblog::Command::Hold { job, held })
                    .await
                {
                    Ok(()) => Response::Ok,
                    Err(r) => r,
                },
                Some(r) => r,
            },
            ClientRequest::PolicyReload => crate::policy::reload(&self.site, who),
        }
    }

    /// Answers a node of this group's domain. Only the leader answers, except for module
    /// bytes; a replica that does not lead answers a heartbeat with the replicas, leader first.
    pub(crate) async fn node(
        self: &Arc<Self>,
        peer: PeerId,
        who: &Principal,
        request: NodeRequest,
    ) -> Response {
        if who.kind != PrincipalKind::Node || who.domain != self.site.domain {
            return fail(
                FailureKind::Refused,
                format!("{who} is not a node of domain {}", self.site.domain),
            );
        }
        if !matches!(request, NodeRequest::Fetch { .. }) && !self.log.is_leader() {
            return match request {
                NodeRequest::Heartbeat(_) => Response::Heartbeat {
                    known: false,
                    members: self.replicas(),
                    stop: Vec::new(),
                },
                _ => self.not_leader(),
            };
        }
        match request {
            NodeRequest::Register(info) => self.register(peer, who, info),
            NodeRequest::Heartbeat(load) => self.heartbeat(peer, load),
            NodeRequest::Fetch { hash } => match self.modules.get(&hash) {
                Some(b) => Response::Module(b),
                None => fail(FailureKind::NotFound, format!("no module {hash}")),
            },
            NodeRequest::Report(r) => self.report(peer, *r).await,
        }
    }

    /// Stops the broker's messages under way.
    pub(crate) fn shutdown(&self) {
        self.tasks.lock().abort_all();
    }
}
