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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use mvm_component::policy::{Principal, PrincipalKind, Question, Resource};
use parking_lot::Mutex;

use crate::daemon::Shared;
use crate::joblog::state::JobRecord;
use crate::joblog::{JobLog, Replica};
use crate::modules::ModuleStore;
use crate::proto::{
    Failure, FailureKind, GroupSummary, JobState, JobStatus, PartStatus, Request, Response,
    SUBMIT_HOLD, Submission,
};

mod admit;
mod drive;
mod forward;
mod members;
mod place;

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

/// Milliseconds since the Unix epoch.
pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Broker {
    pub(crate) fn new(log: JobLog, modules: ModuleStore, founders: Option<Vec<Replica>>) -> Broker {
        Broker {
            log,
            modules,
            nodes: Mutex::new(HashMap::new()),
            expected: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            groups: Mutex::new(HashMap::new()),
            inflight: Mutex::default(),
            driving: Mutex::default(),
            waiting: Mutex::default(),
            leading: AtomicBool::new(false),
            tasks: Mutex::new(tokio::task::JoinSet::new()),
            founders: Mutex::new(founders.map(|r| (r, Instant::now()))),
        }
    }

    /// A job's status as clients see it, with `names` (from [`Broker::names`], taken before
    /// the log's state is read: the node table is locked before the state elsewhere).
    pub(super) fn status_of(&self, j: &JobRecord, names: &members::Names) -> JobStatus {
        let count = |v: &Vec<String>| u32::try_from(v.len()).unwrap_or(u32::MAX);
        let vertices = if j.parts.is_empty() {
            u32::try_from(j.resources.vertices).unwrap_or(0)
        } else {
            j.parts.iter().map(|p| count(&p.vertices)).sum()
        };
        let end = j.ended.as_ref().map_or_else(now_ms, |e| e.at_ms);
        JobStatus {
            job: j.id.clone(),
            name: j.name.clone(),
            state: j.state,
            version: j.version,
            vertices,
            vertices_done: j
                .parts
                .iter()
                .filter(|p| p.done)
                .map(|p| count(&p.vertices))
                .sum(),
            parts: j
                .parts
                .iter()
                .map(|p| {
                    let (node, name) = names
                        .get(&p.node)
                        .cloned()
                        .unwrap_or_else(|| (p.node.to_string(), String::new()));
                    PartStatus {
                        node,
                        name,
                        vertices: p.vertices.clone(),
                        done: p.done,
                    }
                })
                .collect(),
            outputs: j.outputs.clone(),
            traffic: j.traffic.clone(),
            wall_ms: end.saturating_sub(j.submitted_ms),
            error: j.ended.as_ref().and_then(|e| e.error.clone()),
            waiting: match (j.state, j.held) {
                (JobState::Pending, true) => Some("held (mvm release lets it go)".into()),
                (JobState::Pending, false) => Some(
                    self.waiting
                        .lock()
                        .get(&j.id)
                        .cloned()
                        .unwrap_or_else(|| "waiting for room".into()),
                ),
                _ => None,
            },
            owner: format!("{}@{}", j.owner.name, j.owner.domain),
            broker_addrs: Vec::new(),
        }
    }

    /// Runs on every membership tick: notices a change of leader, marks silent nodes lost and
    /// fails their parts.
    pub(crate) async fn tick(self: &Arc<Self>, shared: &Arc<Shared>, lost_after: Duration) {
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
            self.take_over(shared).await;
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
                self.end(shared, &job, JobState::Failed, Some(why)).await;
            }
            let shared = shared.clone();
            self.tasks
                .lock()
                .spawn(async move { shared.net.disconnect(peer).await });
        }
        {
            let pending: HashSet<String> = self
                .log
                .read(|s| s.pending().map(|j| j.id.clone()).collect());
            self.waiting.lock().retain(|id, _| pending.contains(id));
        }
        self.place_pending(shared).await;
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
    async fn take_over(self: &Arc<Self>, shared: &Arc<Shared>) {
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
            self.end(shared, &job, JobState::Failed, Some(why)).await;
        }
    }

    /// The answer of a replica that does not lead.
    fn not_leader(&self, shared: &Shared) -> Response {
        let why = crate::joblog::LogError::NotLeader {
            leader: self.log.leader(),
        };
        fail(
            FailureKind::Unavailable,
            format!(
                "{} of group {}: {why}",
                shared.net.peer(),
                shared.config.group
            ),
        )
    }

    /// Validates, authorizes and places a job, then drives it on its own task.
    async fn submit(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        caller: &Principal,
        s: Submission,
    ) -> Response {
        let owner = match admit::owner_of(caller, &s) {
            Ok(o) => o,
            Err(why) => return fail(FailureKind::Refused, format!("job {}: {why}", s.name)),
        };
        let hops = s.hops;
        match self.place(shared, &owner, s.clone()).await {
            Placed::Job(r) => *r,
            Placed::Unplaceable { vertices, why } if hops == 0 => {
                self.forward(shared, s, owner, vertices, &why).await
            }
            Placed::Unplaceable { why, .. } => fail(FailureKind::Unavailable, why),
        }
    }

    /// The answer to a submission once its job is in the log: the job's status.
    fn submitted(&self, id: &str) -> Response {
        let names = self.names();
        self.log
            .read(|st| st.job(id).map(|j| self.status_of(j, &names)))
            .map_or_else(
                || fail(FailureKind::Failed, "the job left the log at once"),
                Response::Submitted,
            )
    }

    /// Records `command`; the answer to give when it is not recorded.
    async fn record(&self, command: crate::joblog::Command) -> Result<(), Response> {
        match self.log.propose(command).await {
            Ok(crate::joblog::Applied::Done) => Ok(()),
            Ok(crate::joblog::Applied::Refused(why)) => Err(fail(FailureKind::Input, why)),
            // A batch stands or falls with its first command (the others follow from it).
            Ok(crate::joblog::Applied::Batch(v)) => match v.into_iter().next() {
                Some(crate::joblog::Applied::Done) => Ok(()),
                Some(crate::joblog::Applied::Refused(why)) => Err(fail(FailureKind::Input, why)),
                _ => Err(fail(FailureKind::Failed, "a batch gave no outcome")),
            },
            Err(e) => Err(fail(FailureKind::Unavailable, e.to_string())),
        }
    }

    fn status(&self, shared: &Shared, who: &Principal, job: Option<&str>) -> Response {
        if let Some(id) = job
            && let Some(r) = self.refusal(shared, who, "read-results", id)
        {
            return r;
        }
        let engine = shared.policies.current().engine.clone();
        let domain = &shared.config.domain;
        let names = self.names();
        let list: Vec<JobStatus> = self.log.read(|s| match job {
            Some(id) => s
                .job(id)
                .map(|j| self.status_of(j, &names))
                .into_iter()
                .collect(),
            // Every job the asker may read, by id.
            None => s
                .jobs()
                .filter(|j| {
                    engine
                        .decide(&Question {
                            actor: who.clone(),
                            action: "read-results".into(),
                            resource: Resource::Job(admit::facts_of(domain, j)),
                        })
                        .allowed()
                })
                .map(|j| self.status_of(j, &names))
                .collect(),
        });
        Response::Status(list)
    }

    /// Waits until the job's version passes `after` (or, with `until_end`, until it has ended),
    /// at most `max`, then its status.
    async fn wait(&self, job: &str, after: u64, until_end: bool, max: Duration) -> Response {
        let mut rx = self.log.watch(job);
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let names = self.names();
            let st = self
                .log
                .read(|s| s.job(job).map(|j| self.status_of(j, &names)));
            let Some(st) = st else {
                return fail(FailureKind::NotFound, format!("no job {job}"));
            };
            let ready = st.version > after && (!until_end || st.state.is_final());
            if ready || tokio::time::Instant::now() >= deadline {
                return Response::Status(vec![st]);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                continue; // the deadline: answer with what there is
            }
        }
    }

    /// The answer to a waiting submission: the job's status once it has ended, or after
    /// [`SUBMIT_HOLD`].
    async fn held(&self, st: JobStatus) -> Response {
        match self.wait(&st.job, 0, true, SUBMIT_HOLD).await {
            Response::Status(mut v) if v.len() == 1 => Response::Submitted(v.remove(0)),
            _ => Response::Submitted(st),
        }
    }

    async fn cancel(&self, shared: &Arc<Shared>, job: &str) -> Response {
        match self.log.read(|s| s.job(job).map(|j| j.state)) {
            None => fail(FailureKind::NotFound, format!("no job {job}")),
            Some(s) if s.is_final() => fail(
                FailureKind::Input,
                format!("job {job} has already ended ({s:?})"),
            ),
            Some(_) => {
                self.end(shared, job, JobState::Cancelled, Some("cancelled".into()))
                    .await;
                Response::Ok
            }
        }
    }

    /// Dispatches a broker request.
    pub(crate) async fn handle(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        peer: PeerId,
        who: &Principal,
        request: Request,
    ) -> Response {
        let node_only = matches!(
            request,
            Request::Heartbeat(_) | Request::Fetch { .. } | Request::Report(_)
        );
        if node_only && (who.kind != PrincipalKind::Node || who.domain != shared.config.domain) {
            return fail(
                FailureKind::Refused,
                format!("{who} is not a node of domain {}", shared.config.domain),
            );
        }
        // Modules are served by any replica that has them; the rest by the leader only.
        if !matches!(request, Request::Fetch { .. } | Request::Missing { .. })
            && !self.log.is_leader()
        {
            return match request {
                // A node of a replica that does not lead learns where the leader is.
                Request::Heartbeat(_) => Response::Heartbeat {
                    known: false,
                    members: self.replicas(),
                    stop: Vec::new(),
                },
                _ => self.not_leader(shared),
            };
        }
        match request {
            Request::Missing { hashes } => Response::Missing {
                hashes: hashes
                    .iter()
                    .filter(|h| !self.modules.has(h))
                    .cloned()
                    .collect(),
            },
            Request::Submit(s) => {
                let wait = s.wait;
                match self.submit(shared, who, *s).await {
                    Response::Submitted(st) if wait && !st.state.is_final() => self.held(st).await,
                    r => r,
                }
            }
            Request::Status { job } => self.status(shared, who, job.as_deref()),
            Request::Wait {
                job,
                after,
                until_end,
            } => {
                if let Some(r) = self.refusal(shared, who, "read-results", &job) {
                    return r;
                }
                self.wait(&job, after, until_end, SUBMIT_HOLD).await
            }
            Request::Cancel { job } => match self.refusal(shared, who, "cancel", &job) {
                None => self.cancel(shared, &job).await,
                Some(r) => r,
            },
            // Who may cancel a job may hold it back.
            Request::Hold { job, held } => match self.refusal(shared, who, "cancel", &job) {
                None => match self
                    .record(crate::joblog::Command::Hold { job, held })
                    .await
                {
                    Ok(()) => Response::Ok,
                    Err(r) => r,
                },
                Some(r) => r,
            },
            Request::Register(info) => self.register(shared, peer, who, info),
            Request::Heartbeat(load) => self.heartbeat(peer, load),
            Request::Fetch { hash } => match self.modules.get(&hash) {
                Some(b) => Response::Module(b),
                None => fail(FailureKind::NotFound, format!("no module {hash}")),
            },
            Request::Report(r) => self.report(shared, peer, *r).await,
            Request::Group => Response::Group(self.group(shared)),
            Request::Prepare(_)
            | Request::Start { .. }
            | Request::Terminate { .. }
            | Request::Hello { .. }
            | Request::Policy { .. }
            | Request::PolicyReload
            | Request::Raft(_) => fail(FailureKind::Input, "not a broker request"),
        }
    }

    /// Stops the broker's messages under way.
    pub(crate) fn shutdown(&self) {
        self.tasks.lock().abort_all();
    }
}
