//! A client of a super-peer: what `mvm submit`, `status` and `cancel` use.

use std::time::Duration;

use libp2p::{Multiaddr, PeerId};

use crate::net::{Net, NetConfig, split_peer};
use crate::pki::Credentials;
use crate::proto::{
    AgreementInfo, BankAnswer, BankRequest, ClientRequest, Failure, FailureKind, GroupInfo, Hash,
    JobId, JobLogs, JobStatus, LogCursor, Request, Response, Submission,
};

mod control;
mod image;
mod lead;
mod profile;

/// What an offer must meet ([`Client::offer`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct OfferAsk {
    /// The job must be finished by then, milliseconds since the Unix epoch.
    pub deadline_ms: Option<u64>,
    /// It must not start before then.
    pub start_after_ms: Option<u64>,
    /// How long the offer is held, milliseconds (the broker's default: a minute).
    pub valid_ms: Option<u64>,
}

pub use image::fetch_image;
pub(crate) use image::fetch_image_from;
pub use profile::{LocalFiles, Prepared, read_profile};

/// A failure of the client's input (a profile, an address).
fn input(m: impl Into<String>) -> Failure {
    Failure::new(FailureKind::Input, m)
}

/// A connection to a super-peer.
#[derive(Debug, Clone)]
pub struct Client {
    net: Net,
    broker: PeerId,
    addrs: Vec<Multiaddr>,
    /// Module hashes the broker is known to hold (no need to ask again).
    known: std::sync::Arc<parking_lot::Mutex<std::collections::HashSet<Hash>>>,
    /// The addresses [`Client::find`] found the super-peer through: asked again for the
    /// group's leader when the super-peer stops answering as one (empty: never).
    seeds: std::sync::Arc<[String]>,
    /// The leader found so, which requests go to from then on.
    moved: std::sync::Arc<parking_lot::Mutex<Option<(PeerId, Multiaddr)>>>,
}

impl Client {
    /// A client of the super-peer at `addr` (`/…/p2p/PEER`), with a fresh identity.
    ///
    /// # Errors
    /// A bad address, or the network cannot be set up.
    pub async fn new(creds: &Credentials, addr: &str) -> Result<Client, Failure> {
        let (broker, a) = split_peer(addr)?;
        let (net, _inbound) = Net::start(creds, &NetConfig::default()).await?;
        Ok(Client::of(net, broker, a, Vec::new()))
    }

    fn of(net: Net, broker: PeerId, a: Multiaddr, seeds: Vec<String>) -> Client {
        Client {
            net,
            broker,
            addrs: vec![a],
            known: Default::default(),
            seeds: seeds.into(),
            moved: Default::default(),
        }
    }

    /// A client of the group's current super-peer, found through any of `addrs` (super-peers
    /// or nodes of the group, tried in order): a node that is not the super-peer names it.
    /// Should that super-peer fail as unavailable (it stopped, or lost the lead in an
    /// election), the client asks `addrs` again for the leader (5 rounds a second apart at
    /// most, each address given 5 s to answer), and sends its later requests there;
    /// the failed request itself is sent again only if it reads (status, waits, logs) or a
    /// follower refused it, since one that changes something and failed otherwise may have
    /// been taken.
    ///
    /// # Errors
    /// No address leads to a super-peer.
    pub async fn find(creds: &Credentials, addrs: &[String]) -> Result<Client, Failure> {
        let (net, _inbound) = Net::start(creds, &NetConfig::default()).await?;
        let (broker, a) = lead::leader(&net, addrs).await?;
        Ok(Client::of(net, broker, a, addrs.to_vec()))
    }
}

impl Client {
    /// A client of the super-peer that holds `job`: this one, or the one of another group the
    /// job was forwarded to (sharing this client's network).
    ///
    /// # Errors
    /// The status names a super-peer address that cannot be used.
    pub fn follow(&self, job: &JobStatus) -> Result<Client, Failure> {
        self.at(&job.broker_addrs)
    }

    /// A client of the super-peer at `addrs` (one of another group that made an offer, or
    /// holds a job), sharing this client's network; this one when `addrs` is empty.
    ///
    /// # Errors
    /// An address that names no peer.
    pub fn at(&self, addrs: &[Multiaddr]) -> Result<Client, Failure> {
        let Some(addr) = preferred(addrs) else {
            return Ok(self.clone());
        };
        let (broker, a) = crate::net::split_addr(addr)
            .ok_or_else(|| input(format!("the super-peer address {addr} names no peer")))?;
        Ok(Client::of(self.net.clone(), broker, a, Vec::new()))
    }

    /// The super-peer's peer id (the leader it has followed to, if its own stopped leading).
    pub fn broker(&self) -> PeerId {
        self.target().0
    }

    /// Where requests go: the leader followed to, or the super-peer this client was made for.
    fn target(&self) -> (PeerId, Vec<Multiaddr>) {
        match self.moved.lock().clone() {
            Some((p, a)) => (p, vec![a]),
            None => (self.broker, self.addrs.clone()),
        }
    }

    async fn call(&self, r: ClientRequest) -> Result<Response, Failure> {
        let (peer, addrs) = self.target();
        // Sent again only if it reads, or a follower refused it before proposing anything:
        // a request that failed otherwise at a super-peer losing its lead may yet have been
        // taken. Later requests go to the new leader.
        // Kept only by a client that can look for the leader (one made by `find`).
        let again = (!self.seeds.is_empty()).then(|| r.clone());
        match self.net.call(peer, &addrs, r.into()).await {
            Err(f) if f.kind == FailureKind::Unavailable && again.is_some() => {
                let again = again.filter(|r| lead::reads(r) || lead::refused_as_follower(&f));
                // An election takes a second or two: asked until one leads, a few times.
                for _ in 0..lead::LEADER_TRIES {
                    match lead::leader(&self.net, &self.seeds).await {
                        Ok((p, a)) if p != peer => {
                            tracing::debug!(from = %peer, to = %p, "the group's leader changed");
                            *self.moved.lock() = Some((p, a.clone()));
                            // What the old leader held may not have reached the new one.
                            self.known.lock().clear();
                            return match again {
                                Some(r) => self.net.call(p, &[a], r.into()).await,
                                None => Err(f),
                            };
                        }
                        // Still the leader: it failed for another reason.
                        Ok(_) => break,
                        Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                    }
                }
                Err(f)
            }
            other => other,
        }
    }

    /// Sends a job: asks which modules the broker lacks (unless it is known to hold them all),
    /// then submits with those. Answers once the job is placed.
    ///
    /// # Errors
    /// The broker's refusal, or a failure to reach it.
    pub async fn submit(&self, job: &Prepared) -> Result<JobStatus, Failure> {
        self.send(job, false).await
    }

    /// As [`Client::submit`], but the broker answers once the job has ended, or after
    /// [`crate::proto::SUBMIT_HOLD`] with its status so far (then follow it with
    /// [`Client::wait`]): a short job takes one exchange.
    ///
    /// # Errors
    /// The broker's refusal, or a failure to reach it.
    pub async fn submit_and_wait(&self, job: &Prepared) -> Result<JobStatus, Failure> {
        self.send(job, true).await
    }

    async fn send(&self, job: &Prepared, wait: bool) -> Result<JobStatus, Failure> {
        let mut s = self.upload(job).await?;
        s.wait = wait;
        match self.call(ClientRequest::Submit(Box::new(s))).await? {
            Response::Submitted(st) => {
                self.known.lock().extend(job.modules.keys().cloned());
                Ok(*st)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Asks for offers to run a job, as `ask` bounds them: its modules and input files are
    /// sent first, as for a submission. Nothing runs until one is accepted.
    ///
    /// # Errors
    /// The broker's refusal (no plan meets the deadline, no estimate, the policy), or a
    /// failure to reach it.
    pub async fn offer(
        &self,
        job: &Prepared,
        ask: OfferAsk,
    ) -> Result<Vec<AgreementInfo>, Failure> {
        let s = self.upload(job).await?;
        let r = ClientRequest::Offer {
            submission: Box::new(s),
            deadline_ms: ask.deadline_ms,
            start_after_ms: ask.start_after_ms,
            valid_ms: ask.valid_ms,
        };
        match self.call(r).await? {
            Response::Agreements(v) => {
                self.known.lock().extend(job.modules.keys().cloned());
                Ok(v)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Accepts an offer: the agreement it becomes.
    ///
    /// # Errors
    /// No such offer, one accepted already or lapsed, or the broker cannot be reached.
    pub async fn accept(&self, offer: &JobId) -> Result<AgreementInfo, Failure> {
        let r = ClientRequest::Accept {
            offer: offer.clone(),
            on_behalf: None,
        };
        match self.call(r).await? {
            Response::Agreements(mut v) if v.len() == 1 => Ok(v.remove(0)),
            other => Err(unexpected(&other)),
        }
    }

    /// Asks the bank: a balance, a history, a mint or a transfer (a mint or transfer sent
    /// again with the same request id is applied once, and answered with that transaction).
    ///
    /// # Errors
    /// The bank's refusal (too little credit, another's account, not an administrator), or
    /// the broker cannot be reached.
    pub async fn bank(&self, r: BankRequest) -> Result<BankAnswer, Failure> {
        match self.call(ClientRequest::Bank(r)).await? {
            Response::Bank(a) => Ok(a),
            other => Err(unexpected(&other)),
        }
    }

    /// The asker's offers and agreements, or (`all`, for an administrator) every one.
    ///
    /// # Errors
    /// The policy's refusal, or the broker cannot be reached.
    pub async fn agreements(&self, all: bool) -> Result<Vec<AgreementInfo>, Failure> {
        match self.call(ClientRequest::Agreements { all }).await? {
            Response::Agreements(v) => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends what the broker lacks of `job` (its input files on streams of their own, its
    /// modules with the submission): the submission to send.
    pub(crate) async fn upload(&self, job: &Prepared) -> Result<Submission, Failure> {
        let hashes: Vec<Hash> = {
            let known = self.known.lock();
            job.modules
                .keys()
                .filter(|h| !known.contains(*h))
                .cloned()
                .collect()
        };
        let missing = if hashes.is_empty() {
            Vec::new()
        } else {
            match self.call(ClientRequest::Missing { hashes }).await? {
                Response::Missing { hashes } => hashes,
                other => return Err(unexpected(&other)),
            }
        };
        // Input files go first, each on a stream of its own (the broker says which it holds).
        let unsent: Vec<_> = {
            let known = self.known.lock();
            job.inputs
                .iter()
                .filter(|(h, _)| !known.contains(*h))
                .map(|(h, (p, n))| (*h, p.clone(), *n))
                .collect()
        };
        // A few at once: one stream's flow-control window leaves the link idle between its
        // round trips.
        let sent = crate::files::at_once(unsent, |(hash, path, size)| {
            let ((broker, addrs), net) = (self.target(), self.net.clone());
            async move {
                crate::files::put(&net, broker, &addrs, &path, hash, size)
                    .await
                    .map(|_| hash)
            }
        })
        .await?;
        self.known.lock().extend(sent);
        let mut s = job.submission.clone();
        s.modules = missing
            .iter()
            .filter_map(|h| job.modules.get(h).cloned())
            .collect();
        Ok(s)
    }

    /// The status of one job, or of all.
    ///
    /// # Errors
    /// No such job, or the broker cannot be reached.
    pub async fn status(&self, job: Option<&JobId>) -> Result<Vec<JobStatus>, Failure> {
        match self
            .call(ClientRequest::Status { job: job.cloned() })
            .await?
        {
            Response::Status(v) => Ok(v),
            other => Err(unexpected(&other)),
        }
    }

    /// The job's status once it changes after version `after` (with `until_end`, once it has
    /// ended), or after a few seconds.
    ///
    /// # Errors
    /// No such job, or the broker cannot be reached.
    pub async fn wait(
        &self,
        job: &JobId,
        after: u64,
        until_end: bool,
    ) -> Result<JobStatus, Failure> {
        match self
            .call(ClientRequest::Wait {
                job: job.clone(),
                after,
                until_end,
            })
            .await?
        {
            Response::Status(mut v) if v.len() == 1 => Ok(v.remove(0)),
            other => Err(unexpected(&other)),
        }
    }

    /// Cancels a job.
    ///
    /// # Errors
    /// No such job, it has ended, or the broker cannot be reached.
    pub async fn cancel(&self, job: &JobId) -> Result<(), Failure> {
        match self
            .call(ClientRequest::Cancel { job: job.clone() })
            .await?
        {
            Response::Ok => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Writes the output files of `job` (as its status lists them) under `dir`, each at
    /// `dir/VERTEX/PATH`, checked against its hash; a file already there with the same bytes
    /// is not fetched again. The paths written, in order.
    ///
    /// # Errors
    /// The policy's refusal, a file the super-peer no longer holds, a broken transfer, or a
    /// file that cannot be written.
    pub async fn fetch_outputs(
        &self,
        job: &JobStatus,
        dir: &std::path::Path,
    ) -> Result<Vec<std::path::PathBuf>, Failure> {
        let mut written = Vec::with_capacity(job.files.len());
        for f in &job.files {
            mvm_component::files::check_path(&f.path)
                .map_err(|e| Failure::new(FailureKind::Failed, format!("output {e}")))?;
            let vertex = mvm_component::files::vertex_dir(&f.vertex);
            let to = dir.join(vertex).join(&f.path);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    Failure::new(FailureKind::Failed, format!("{}: {e}", parent.display()))
                })?;
            }
            let same = crate::files::hash_file(&to).is_ok_and(|(h, _)| h == f.hash);
            if !same {
                let (broker, addrs) = self.target();
                crate::files::get(&self.net, broker, &addrs, &job.job, f.hash, &to)
                    .await
                    .map_err(|e| {
                        Failure::new(
                            e.kind,
                            format!("{} of vertex '{}': {}", f.path, f.vertex, e.message),
                        )
                    })?;
            }
            written.push(to);
        }
        Ok(written)
    }

    /// A link that logs this client's principal into the super-peer's web view, and when
    /// the session it opens ends (milliseconds since the Unix epoch).
    ///
    /// # Errors
    /// The super-peer serves no web view, or cannot be reached.
    pub async fn web_login(&self) -> Result<(String, u64), Failure> {
        match self.call(ClientRequest::WebLogin).await? {
            Response::WebLogin { url, expires_ms } => Ok((url, expires_ms)),
            other => Err(unexpected(&other)),
        }
    }

    /// The lines of `job`'s logs after `after` (each run's and vertex's last line the caller
    /// has), written since `since_ms`, of `vertex` or of every vertex.
    ///
    /// # Errors
    /// No such job, the policy's refusal, or the broker unreachable.
    pub async fn logs(
        &self,
        job: &JobId,
        after: Vec<LogCursor>,
        since_ms: Option<u64>,
        vertex: Option<String>,
    ) -> Result<JobLogs, Failure> {
        match self
            .call(ClientRequest::Logs {
                job: job.clone(),
                after,
                since_ms,
                vertex,
            })
            .await?
        {
            Response::Logs(l) => Ok(*l),
            other => Err(unexpected(&other)),
        }
    }

    /// The group as the super-peer sees it.
    ///
    /// # Errors
    /// The broker cannot be reached.
    pub async fn group(&self) -> Result<GroupInfo, Failure> {
        let (broker, addrs) = self.target();
        match self.net.call(broker, &addrs, Request::Group).await? {
            Response::Group(g) => Ok(g),
            other => Err(unexpected(&other)),
        }
    }
}

/// The address to reach a super-peer at among `addrs`: the first over TCP, or else the first.
fn preferred(addrs: &[Multiaddr]) -> Option<&Multiaddr> {
    let tcp = |a: &&Multiaddr| {
        a.iter()
            .any(|p| matches!(p, libp2p::multiaddr::Protocol::Tcp(_)))
    };
    addrs.iter().find(tcp).or(addrs.first())
}

fn unexpected(r: &Response) -> Failure {
    Failure::new(
        FailureKind::Failed,
        format!("unexpected answer from the super-peer: {r:?}")
            .chars()
            .take(200)
            .collect::<String>(),
    )
}
