//! The broker's side of a job's files: who may put and get them, the output files nodes
//! report, every file passed on to the other replicas of the job log, and files no job
//! refers to any more let go.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use libp2p::PeerId;
use mvm_component::policy::{Principal, PrincipalKind};

use super::{Broker, fail};
use crate::files::{Access, FileStore, Holding, Unclaimed};
use crate::joblog::JobLog;
use crate::proto::{Failure, FailureKind, Hash, JobId, OutputFile, Response};
use crate::site::Site;

/// How long a file no job refers to is kept (a submitter uploads its inputs before it
/// submits, and a node its outputs before it reports them).
const UNREFERENCED: Duration = Duration::from_secs(3600);

/// Who may put and get a group's files at its super-peers.
pub(crate) struct FileAccess {
    site: Arc<Site>,
    log: JobLog,
    store: Arc<FileStore>,
    unclaimed: Unclaimed,
    view: Arc<super::View>,
}

impl FileAccess {
    /// The access to `store` of the group whose log is `log`; each principal but the group's
    /// domain's nodes may hold `quota` bytes of files here that no job names.
    pub(crate) fn new(
        site: Arc<Site>,
        log: JobLog,
        store: Arc<FileStore>,
        quota: u64,
        view: Arc<super::View>,
    ) -> FileAccess {
        FileAccess {
            site,
            log,
            store,
            view,
            unclaimed: Unclaimed::new(quota, crate::files::DISK_RESERVE, UNREFERENCED),
        }
    }
}

impl Holding for FileAccess {
    fn held(&self, hash: &Hash) -> Option<u64> {
        self.store.size(hash)
    }

    fn free(&self) -> Option<(u64, u64)> {
        self.store.free_space()
    }

    /// Which of `hashes` a job in the log names (as an input or an output).
    fn named(&self, hashes: &[Hash]) -> HashSet<Hash> {
        let hashes: HashSet<&Hash> = hashes.iter().collect();
        self.log.read(|s| {
            s.jobs()
                .flat_map(|j| j.file_hashes())
                .filter(|h| hashes.contains(h))
                .collect()
        })
    }
}

/// Who put a file, as [`Unclaimed`] counts and names them: `alice@physics`, `node n1@physics`.
fn putter(who: &Principal) -> String {
    match who.kind {
        PrincipalKind::User => super::admit::owner_key(who),
        PrincipalKind::Node => format!("node {}", super::admit::owner_key(who)),
    }
}

impl Access for FileAccess {
    fn may_put(
        &self,
        _peer: PeerId,
        who: &Principal,
        hash: &Hash,
        size: u64,
    ) -> Result<(), Failure> {
        if size > mvm_component::files::MAX_INPUT_BYTES {
            return Err(Failure::new(
                FailureKind::Refused,
                format!(
                    "a file of {size} bytes (at most {})",
                    mvm_component::files::MAX_INPUT_BYTES
                ),
            ));
        }
        // Users (their inputs), nodes of the group's domain (outputs, and the leader's copies
        // to the other replicas), and super-peers of any trusted domain (a forwarded job's
        // inputs).
        let ours = who.kind == PrincipalKind::Node && who.domain == self.site.domain;
        let superpeer = who.roles.iter().any(|r| r == "superpeer");
        if !(who.kind == PrincipalKind::User || ours || superpeer) {
            return Err(Failure::new(
                FailureKind::Refused,
                format!("{who} may not put files at group {}", self.site.group),
            ));
        }
        // The group's nodes (outputs, the leader's copies) are held to the disk's reserve
        // only; everyone else also to the quota.
        self.unclaimed.admit(&putter(who), !ours, *hash, size, self)
    }

    fn put_ended(&self, who: &Principal, hash: &Hash) {
        self.unclaimed.ended(&putter(who), hash, self);
    }

    fn may_get(
        &self,
        _peer: PeerId,
        who: &Principal,
        job: &JobId,
        hash: &Hash,
    ) -> Result<(), Failure> {
        let held = self.log.read(|s| {
            s.job(job).map(|j| {
                j.file_hashes().any(|h| h == *hash)
                    || self
                        .view
                        .moving
                        .lock()
                        .get(job)
                        .is_some_and(|m| m.contains(hash))
            })
        });
        match held {
            None => {
                return Err(Failure::new(FailureKind::NotFound, format!("no job {job}")));
            }
            Some(false) => {
                return Err(Failure::new(
                    FailureKind::NotFound,
                    format!("job {job} has no file {hash}"),
                ));
            }
            Some(true) => {}
        }
        // The group's nodes fetch inputs; anyone else reads as the policy lets them read the
        // job's results.
        if who.kind == PrincipalKind::Node && who.domain == self.site.domain {
            return Ok(());
        }
        match super::admit::refusal(&self.site, &self.log, who, "read-results", job) {
            None => Ok(()),
            Some(Response::Error(f)) => Err(f),
            Some(_) => Err(Failure::new(FailureKind::Refused, "refused")),
        }
    }

    fn stored(&self, peer: PeerId, hash: Hash, size: u64) {
        if !self.log.is_leader() {
            return;
        }
        let me = self.site.net.peer();
        for r in self.log.replicas() {
            let Ok(to) = r.peer.parse::<PeerId>() else {
                continue;
            };
            if to == me || to == peer {
                continue;
            }
            let addrs: Vec<libp2p::Multiaddr> =
                r.addrs.iter().filter_map(|a| a.parse().ok()).collect();
            let (net, path) = (self.site.net.clone(), self.store.path(&hash));
            tokio::spawn(async move {
                if let Err(f) = crate::files::put(&net, to, &addrs, &path, hash, size).await {
                    tracing::warn!(%to, %hash, error = %f.message, "a file not passed on to a replica");
                }
            });
        }
    }
}

impl Broker {
    /// The output files a node's part left, recorded with the job (their bytes must be held
    /// here already).
    pub(super) async fn outputs(
        &self,
        peer: PeerId,
        job: JobId,
        attempt: u32,
        files: Vec<OutputFile>,
    ) -> Response {
        let runs = self.log.read(|s| {
            s.job(&job)
                .map(|j| j.parts.iter().any(|p| p.node == peer) || j.attempt != attempt)
        });
        match runs {
            None => return fail(FailureKind::NotFound, format!("no job {job}")),
            Some(false) => {
                return fail(
                    FailureKind::Refused,
                    format!("{peer} runs no part of {job}"),
                );
            }
            Some(true) => {}
        }
        if let Some(f) = files
            .iter()
            .find(|f| self.files.size(&f.hash) != Some(f.size))
        {
            return fail(
                FailureKind::Input,
                format!(
                    "output file '{}' of vertex '{}' was not sent first",
                    f.path, f.vertex
                ),
            );
        }
        self.ask(|reply| super::Input::Outputs {
            reply,
            job,
            attempt,
            files,
        })
        .await
    }

    /// Lets go of the files no job in the log refers to, once they are older than
    /// [`UNREFERENCED`]. Blocking (reads the store's directory).
    pub(super) fn collect_files(log: &JobLog, store: &FileStore) {
        let kept: HashSet<Hash> = log.read(|s| s.jobs().flat_map(|j| j.file_hashes()).collect());
        let now = SystemTime::now();
        for (hash, _) in store.list() {
            if kept.contains(&hash) {
                continue;
            }
            let old = std::fs::metadata(store.path(&hash))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > UNREFERENCED);
            if old {
                tracing::debug!(%hash, "a file no job refers to let go");
                store.remove(&hash);
            }
        }
    }
}
