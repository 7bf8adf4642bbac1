//! The broker role of a super-peer: jobs from submission to the broadcast of their end (the
//! MVM paper's on-demand steps a–g), with every job and transition in the group's job log
//! ([`crate::joblog`]). Every replica of the log runs a broker; only the one that leads the log
//! acts, and the others answer with where the leader is.
//!
//! The broker is a state machine ([`core::Core`]) owned by one event loop (`run`), the only
//! place that does its I/O and spawns its tasks. A request that changes something becomes an
//! input of the machine and is answered by one of its effects; reads (statuses, waits, module
//! bytes) are answered from the log on the request's own task.
//!
//! - `core`: the machine: its inputs, effects and state; `tick`: the machine over time (a
//!   change of leader, lost nodes, pending jobs placed).
//! - `members`: the membership machine (registrations, heartbeats, lost nodes, other groups'
//!   summaries: soft state of the leader); `group`: the broker's side of it.
//! - `admit`: owners, policy and what placements under way hold (the ledger).
//! - `place`: checking, admitting and recording a job, and the queue of pending jobs; `plan`:
//!   choosing its nodes.
//! - `drive`: prepare, start, reports and the end.
//! - `forward`: jobs for other groups.
//! - `status`: what clients read of jobs, and waiting for a job to change.
//! - `run`: the event loop.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mvm_component::policy::Principal;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::joblog::{JobLog, Replica};
use crate::modules::ModuleStore;
use crate::proto::{Failure, FailureKind, GroupInfo, JobId, Response};
use crate::site::Site;
use mvm_queue::codec::Registry;

mod admit;
mod agree;
mod array;
mod bank;
mod core;
mod cut;
mod drain;
mod drive;
mod files;
mod forward;
mod group;
mod holders;
mod inputs;
mod logs;
mod market;
mod members;
mod migrate;
mod monitor;
mod offer;
mod place;
mod plan;
mod recover;
mod requests;
mod run;
mod status;
mod tick;
pub(crate) mod triggers;
pub(crate) mod web;

#[cfg(test)]
mod harness;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_agree;
#[cfg(test)]
mod tests_array;
#[cfg(test)]
mod tests_bank;
#[cfg(test)]
mod tests_checkpoint;
#[cfg(test)]
mod tests_faults;
#[cfg(test)]
mod tests_files;
#[cfg(test)]
mod tests_files_peers;
#[cfg(test)]
mod tests_monitor;
#[cfg(test)]
mod tests_policy;
#[cfg(test)]
mod tests_queue;
#[cfg(test)]
mod tests_run;

pub(crate) use self::admit::Refusal;
use self::core::{Core, Input};
pub(crate) use self::plan::PlaceError;

/// The inputs queued for the broker's loop at most; more wait (backpressure on requests).
const INPUTS: usize = 4096;

/// How long a replica waits for the founding replica to start a new job log before it starts
/// the log itself.
const FOUNDING_WAIT: Duration = Duration::from_secs(5);

/// A broker: the handle its daemon's requests reach it by.
pub(crate) struct Broker {
    /// The daemon it runs in.
    site: Arc<Site>,
    /// The codecs a topology may name.
    codecs: Arc<Registry>,
    /// The group's job log (this super-peer's replica).
    pub(crate) log: JobLog,
    pub(crate) modules: Arc<ModuleStore>,
    /// The blobs of the checkpoints kept.
    blobs: Arc<ModuleStore>,
    /// Jobs' input and output files.
    pub(crate) files: Arc<crate::files::FileStore>,
    /// The bytes of files each principal may hold here that no job names.
    files_quota: u64,
    /// What the loop publishes for readers.
    view: Arc<View>,
    /// To the loop.
    inputs: mpsc::Sender<Input>,
    /// The machine and the loop's end of `inputs`, until the loop takes them.
    parked: Mutex<Option<(Core, mpsc::Receiver<Input>)>>,
    /// The sessions of its web view.
    pub(crate) web: web::Sessions,
    /// Offers of other groups passed on to this group's users, while they may be accepted:
    /// the super-peer that made each, and when it lapses.
    remote_offers: Mutex<HashMap<JobId, (Vec<libp2p::Multiaddr>, u64)>>,
}

/// What the broker's loop publishes for the readers on requests' tasks.
#[derive(Default)]
pub(super) struct View {
    /// Registered nodes' names, for statuses.
    names: Mutex<members::Names>,
    /// Why each pending job waits, as the last try to place it found.
    waiting: Mutex<HashMap<JobId, String>>,
    /// The replicas, leader first.
    replicas: group::Replicas,
    /// The monitoring results and the scheduling policy, as of the last tick.
    monitor: Mutex<Option<monitor::Published>>,
    /// What the broker counts for its metrics.
    pub(crate) figures: Figures,
    /// The files a part that moves left in its sandboxes, by job, while the move is under
    /// way: the new node may fetch them.
    pub(super) moving: Mutex<HashMap<JobId, Vec<crate::proto::Hash>>>,
}

/// What a broker counts for its metrics (since it started).
pub(crate) struct Figures {
    /// Seconds from a job's submission until it ran (every part started, or a one-part job
    /// prepared).
    pub(crate) start: prometheus_client::metrics::histogram::Histogram,
    /// Placements, by the scheduling policy that made them.
    pub(crate) placements: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Checkpoints recorded, and their bytes.
    pub(crate) checkpoints: std::sync::atomic::AtomicU64,
    pub(crate) checkpoint_bytes: std::sync::atomic::AtomicU64,
    /// Parts moved (migrations and drains).
    pub(crate) moves: std::sync::atomic::AtomicU64,
}

impl Default for Figures {
    fn default() -> Self {
        Figures {
            // 1 ms to about 65 s.
            start: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17),
            ),
            placements: Mutex::new(std::collections::BTreeMap::new()),
            checkpoints: std::sync::atomic::AtomicU64::new(0),
            checkpoint_bytes: std::sync::atomic::AtomicU64::new(0),
            moves: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Broker {
    /// What it counts for its metrics.
    pub(crate) fn figures(&self) -> &Figures {
        &self.view.figures
    }

    /// The policies in force here.
    pub(crate) fn policies(&self) -> Arc<crate::policy::Loaded> {
        self.site.policies.current()
    }
}

impl Broker {
    /// The monitoring results and the scheduling policy as of the loop's last tick (none
    /// before its first, or on a replica that does not lead).
    pub(crate) fn monitoring(&self) -> Option<monitor::Published> {
        self.view.monitor.lock().clone()
    }
}

pub(super) fn fail(kind: FailureKind, m: impl Into<String>) -> Response {
    Response::Error(Failure::new(kind, m))
}

pub(super) use crate::joblog::state::now_ms;

/// Which replica leads, as this one knows it, and where it is; no nodes, no groups.
fn leader_view(site: &Site, log: &JobLog, replicas: &group::Replicas) -> GroupInfo {
    let leader = log.leader();
    let me = site.net.peer();
    GroupInfo {
        group: site.group.clone(),
        broker: leader,
        broker_addrs: if leader == Some(me) {
            site.net.dial_addrs()
        } else {
            replicas
                .get(log)
                .into_iter()
                .find(|m| Some(m.peer) == leader)
                .map(|m| m.addrs)
                .unwrap_or_default()
        },
        is_broker: leader == Some(me),
        nodes: Vec::new(),
        groups: Vec::new(),
        scheduling: None,
    }
}

impl Broker {
    /// A broker over `log`, keeping modules and checkpoint blobs in `stores`; it acts once
    /// [`Broker::run`] runs its loop.
    pub(crate) fn new(
        site: Arc<Site>,
        codecs: Arc<Registry>,
        log: JobLog,
        stores: [ModuleStore; 2],
        files: Arc<crate::files::FileStore>,
        founders: Option<Vec<Replica>>,
        triggering: triggers::Triggering,
    ) -> Broker {
        let view = Arc::new(View::default());
        let [modules, blobs] = stores.map(Arc::new);
        let mut core = Core::new(
            site.clone(),
            log.clone(),
            [modules.clone(), blobs.clone()],
            codecs.clone(),
            view.clone(),
            founders,
        );
        core.triggering = triggering;
        core.files = Some(files.clone());
        let (inputs, rx) = mpsc::channel(INPUTS);
        Broker {
            site,
            codecs,
            log,
            modules,
            blobs,
            files,
            files_quota: crate::files::DEFAULT_QUOTA,
            view,
            inputs,
            parked: Mutex::new(Some((core, rx))),
            web: web::Sessions::default(),
            remote_offers: Mutex::new(HashMap::new()),
        }
    }

    /// The bytes of files each user or other domain's peer may hold here that no job names
    /// yet (default [`crate::files::DEFAULT_QUOTA`]).
    pub(crate) fn with_files_quota(mut self, bytes: u64) -> Broker {
        self.files_quota = bytes;
        self
    }

    /// Gives the loop an input made with the reply channel, and waits for the answer.
    async fn ask(&self, input: impl FnOnce(core::Reply) -> Input) -> Response {
        let (tx, rx) = oneshot::channel();
        if self.inputs.send(input(tx)).await.is_err() {
            return fail(FailureKind::Unavailable, "the broker is stopping");
        }
        rx.await.unwrap_or_else(|_| {
            fail(
                FailureKind::Unavailable,
                "the broker stopped before it answered",
            )
        })
    }

    /// The answer of a replica that does not lead, before it did anything with the request
    /// (so that it ends with [`crate::proto::UNTAKEN`]).
    fn not_leader(&self) -> Response {
        let why = crate::joblog::LogError::NotLeader {
            leader: self.log.leader(),
        };
        fail(
            FailureKind::Unavailable,
            format!(
                "{} of group {}: {why}; {}",
                self.site.net.peer(),
                self.site.group,
                crate::proto::UNTAKEN
            ),
        )
    }

    /// The refusal of a submission naming an input file this super-peer does not hold.
    fn inputs_missing(&self, s: &crate::proto::Submission) -> Option<Response> {
        let inputs = s.files.iter().flat_map(|f| &f.inputs);
        let i = inputs
            .into_iter()
            .find(|i| self.files.size(&i.hash) != Some(i.size))?;
        Some(fail(
            FailureKind::Input,
            format!(
                "input file '{}' ({}) is not held by the super-peer: send it first (mvm submit \
                 does)",
                i.path, i.hash
            ),
        ))
    }

    /// Revocation lists newly taken: the jobs not ended whose owners submitted them with a
    /// certificate a list revokes are cancelled where the owner's domain's policy says so
    /// (`revoked_jobs(user, "cancel")`), and otherwise run on; either is logged. Only the
    /// leader acts; a replica that comes to lead calls this with every list it holds.
    pub(crate) async fn revoked(&self, crls: &[crate::pki::Crl]) {
        if !self.log.is_leader() {
            return;
        }
        let hit: Vec<(JobId, Principal, String)> = self.log.read(|st| {
            st.jobs()
                .filter(|j| !j.state.is_final())
                .filter_map(|j| {
                    let serial = j.owner_cert.as_ref()?;
                    let crl = crls.iter().find(|c| c.domain == j.owner.domain)?;
                    crl.revokes(serial)
                        .then(|| (j.id.clone(), j.owner.clone(), serial.clone()))
                })
                .collect()
        });
        for (job, owner, serial) in hit {
            let engine = self.policies().engine.clone();
            match engine
                .job_rules(&owner, &owner.domain)
                .map(|r| r.on_revoked)
            {
                Ok(Some(mvm_component::policy::RevokedJobs::Cancel)) => {
                    let r = self
                        .ask(|reply| Input::Cancel {
                            reply,
                            job: job.clone(),
                        })
                        .await;
                    tracing::warn!(%job, %owner, serial, answer = ?r, "a job cancelled: its owner's certificate is revoked");
                }
                Ok(_) => {
                    tracing::warn!(%job, %owner, serial, "its owner's certificate is revoked; the job runs on, as the policy says")
                }
                Err(e) => {
                    tracing::warn!(%job, %owner, serial, error = %e, "its owner's certificate is revoked; the job runs on (the policy cannot say)")
                }
            }
        }
    }

    /// The group as this replica sees it: the leader, every node, the other groups.
    pub(crate) async fn group(&self) -> GroupInfo {
        match self.ask(|reply| Input::Group { reply }).await {
            Response::Group(g) => g,
            _ => self.leader_view(),
        }
    }

    /// Which replica leads, as this one knows it, and where it is; no nodes, no groups.
    pub(crate) fn leader_view(&self) -> GroupInfo {
        leader_view(&self.site, &self.log, &self.view.replicas)
    }
}
