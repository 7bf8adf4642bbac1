//! Placing a submitted job: check it, admit it, choose its nodes ([`crate::schedule`]), and
//! record it in the job log, or keep it waiting there; then the parts are driven
//! ([`super::drive`]).

use std::sync::Arc;

use mvm_component::policy::Principal;
use mvm_component::topology::{Options, Topology};
use mvm_queue::codec::Registry;

use super::admit::{AdmitError, Refusal, inter_domain_allows};
use super::core::{Core, Drive, Effect, Reply, Then};
use super::now_ms;
use crate::joblog::Command;
use crate::joblog::state::{Ended, JobBid, JobRecord};
use crate::modules::ModuleStore;
use crate::proto::ErrorKind;
use crate::proto::{
    BrokerRequest, CheckpointInfo, CheckpointPolicy, Failure, FailureKind, GroupSummary, JobId,
    JobState, Response, Submission,
};
use crate::schedule::{Graph, Rank};

/// A submission checked: its topology, rank and placement graph.
pub(super) struct Checked {
    pub(super) topology: Topology,
    pub(super) rank: Rank,
    pub(super) graph: Graph,
}

/// Checks what a submission names: its modules are here, its topology parses and names only
/// components it has, its limits and rank are valid. Needs no state of the broker's: it runs
/// on the request's task, before the job reaches the broker's loop.
pub(super) fn check(
    modules: &ModuleStore,
    codecs: &Arc<Registry>,
    s: &Submission,
) -> Result<Checked, Failure> {
    {
        for (component, hash) in &s.components {
            if !modules.has(hash) {
                return Err(Failure::new(
                    FailureKind::Input,
                    format!("module {hash} of component '{component}' was not sent"),
                ));
            }
        }
        // A job that asks for checkpoints needs modules that can be paused.
        if s.checkpoint.is_some() {
            for (component, hash) in &s.components {
                let bytes = modules.get(hash).unwrap_or_default();
                if let Err(e) = mvm_component::runtime::checkpoint::check_checkpointable(&bytes) {
                    return Err(Failure::new(
                        FailureKind::Input,
                        format!(
                            "the job asks for checkpoints, and the module of component '{component}' cannot be checkpointed: {e}"
                        ),
                    ));
                }
            }
        }
        let topology = Topology::parse_named(
            &s.topology_file,
            &s.topology,
            &Options {
                codecs,
                queue_defaults: s.queue.clone(),
            },
        )
        .map_err(|e| Failure::new(FailureKind::Input, e.to_string()))?;
        if topology.vertices.is_empty() {
            let why = format!("{}: no vertices", s.topology_file);
            return Err(Failure::new(FailureKind::Input, why));
        }
        for v in &topology.vertices {
            if !s.components.contains_key(&v.component) {
                return Err(Failure::new(
                    FailureKind::Input,
                    format!(
                        "{}:{}: component '{}' of vertex '{}' has no module in the profile",
                        s.topology_file, v.line, v.component, v.name
                    ),
                ));
            }
        }
        s.limits.limits().map_err(Failure::from)?;
        let rank = match s.requirements.rank.as_deref() {
            Some(r) => Rank::parse(r).map_err(Failure::from)?,
            None => Rank::default_rank(),
        };
        let graph = Graph {
            vertices: topology.vertices.len(),
            edges: topology
                .channels
                .iter()
                .map(|c| {
                    let w = c
                        .attributes
                        .get("weight")
                        .and_then(|w| w.parse().ok())
                        .unwrap_or(1);
                    (c.from.vertex, c.to.vertex, w)
                })
                .collect(),
        };
        Ok(Checked {
            topology,
            rank,
            graph,
        })
    }
}

/// The record of job `id` of `owner`, admitted with `resources`: preparing, nothing placed yet.
pub(super) fn new_record(
    id: &JobId,
    owner: &Principal,
    resources: crate::joblog::state::Resources,
    s: &Submission,
    c: &Checked,
) -> JobRecord {
    let r = &s.requirements;
    JobRecord {
        id: id.clone(),
        name: s.name.clone(),
        owner: owner.clone(),
        owner_cert: s.owner_cert.clone(),
        resources,
        image: r.image.clone().unwrap_or_else(|| "host".into()),
        priority: s.priority,
        submitted_ms: now_ms(),
        state: JobState::Preparing,
        held: false,
        parts: Vec::new(),
        outputs: Vec::new(),
        traffic: Vec::new(),
        edges: Vec::new(),
        received: Vec::new(),
        ended: None,
        submission: None,
        version: 0,
        retries: s.retries,
        attempt: 0,
        restarts: Vec::new(),
        checkpoint: s.checkpoint,
        checkpoints: Vec::new(),
        moves: Vec::new(),
        log_bytes: s.limits.log_bytes.unwrap_or(0),
        logs: Vec::new(),
        files: s.files.clone(),
        written: Vec::new(),
        written_attempt: 0,
        array: None,
        after: s.after.clone(),
        after_ok: s.after_ok.clone(),
        estimate_ms: s.estimate_ms,
        started_ms: None,
        agreement: false,
        bid: JobBid::of(&s.requirements),
        channels: c
            .topology
            .channels
            .iter()
            .map(|ch| {
                let v = |e: &mvm_component::topology::End| {
                    let name = c
                        .topology
                        .vertices
                        .get(e.vertex)
                        .map_or("?", |x| x.name.as_str());
                    format!("{name}:{}", e.port)
                };
                (v(&ch.from), v(&ch.to))
            })
            .collect(),
    }
}

impl Core {
    /// Admits and places a checked job here: it runs now, or, when it fits this group but not
    /// now, waits in the log's queue; a job this group cannot take goes to another group (if
    /// it has not been forwarded already).
    pub(super) fn submit(
        &mut self,
        out: &mut Vec<Effect>,
        reply: Reply,
        who: &Principal,
        mut s: Submission,
        c: Checked,
    ) {
        let name = s.name.clone();
        let refused = |error| {
            Response::Error(Failure::from(Refusal {
                job: name.clone(),
                error,
            }))
        };
        let n = c.topology.vertices.len();
        let (id, owner, resources) = match self.admit(who, &s, n) {
            Ok(a) => a,
            Err(error) => {
                out.push(Effect::Reply(reply, refused(error)));
                return;
            }
        };
        if let Err(error) = self.checkpoint_policy(&owner, &mut s) {
            self.ledger.release(&id);
            tracing::info!(job = %s.name, owner = %owner, %error, "job refused by policy");
            out.push(Effect::Reply(reply, refused(error)));
            return;
        }
        let mut record = new_record(&id, &owner, resources, &s, &c);
        // A job that waits for others waits in the queue, whatever room there is now.
        let deps = if s.after.is_empty() && s.after_ok.is_empty() {
            super::array::Deps::Ready
        } else {
            let (after, ok) = (&s.after, &s.after_ok);
            self.log
                .read(|st| super::array::dependencies(st, after, ok))
        };
        match deps {
            super::array::Deps::Ready => {}
            super::array::Deps::Broken(why) => {
                self.ledger.release(&id);
                let f = Failure::new(FailureKind::Input, format!("job {}: {why}", s.name));
                out.push(Effect::Reply(reply, Response::Error(f)));
                return;
            }
            super::array::Deps::Wait(why) if self.fits_when_free(&s, &c) => {
                let why = super::plan::PlaceError::Waits(why);
                return self.record_pending(out, reply, record, s, why);
            }
            super::array::Deps::Wait(_) => {}
        }
        let plan = match self.plan(&id, &s, &c) {
            Ok(p) => p,
            // Admitted, but not now: it waits, and holds what it asks for meanwhile.
            Err(why) if self.fits_when_free(&s, &c) => {
                return self.record_pending(out, reply, record, s, why);
            }
            Err(why) => {
                self.ledger.release(&id);
                if s.hops > 0 {
                    out.push(Effect::Reply(reply, Response::Error(why.into())));
                    return;
                }
                let to = self.forward_to(&s, &owner, n);
                out.push(Effect::Forward {
                    reply,
                    submission: Box::new(s),
                    owner,
                    to,
                    why,
                    offer: None,
                });
                return;
            }
        };
        record.parts = plan.parts(&c.topology);
        let mut specs = self.specs(&id, &owner, &s, &c, &plan, 0);
        if s.retries > 0 || s.checkpoint.is_some() {
            // Kept to run it again should a node it runs on be lost, or to move its parts.
            record.submission = Some(self.with_modules(s));
        }
        self.drives.insert(id.clone(), Drive::recording(0));
        if let [(peer, _)] = &specs[..]
            && record.image == "host"
            && record.files.is_none()
        {
            // One part on the host: recorded once its node has answered (see
            // `Core::alone_prepared`). A part that needs a guest is recorded first: its
            // prepare may take a guest's boot, and the job is seen `preparing` meanwhile; so
            // is a job with files, whose outputs are recorded with it before its report.
            let peer = *peer;
            let Some((_, spec)) = specs.pop() else {
                return;
            };
            out.push(Effect::Send {
                peer,
                addrs: self.members.addrs(&peer),
                request: BrokerRequest::Prepare(Box::new(spec)),
                then: Then::AlonePrepared {
                    reply,
                    record: Box::new(record),
                },
            });
            return;
        }
        out.push(Effect::Record {
            command: Command::Submit(Box::new(record)),
            then: Then::Placed {
                reply: Some(reply),
                job: id,
                specs,
            },
        });
    }

    /// Admits job `s` of `vertices` sent by `who`: its owner, a new id, and what the policy
    /// lets it hold (held in the ledger under that id until it is recorded).
    pub(super) fn admit(
        &mut self,
        who: &Principal,
        s: &Submission,
        vertices: usize,
    ) -> Result<(JobId, Principal, crate::joblog::state::Resources), AdmitError> {
        let owner = self.owner(who, s)?;
        // Unique across leaders: at most one leads in a term.
        let id = JobId::new(&s.name, self.log.term(), self.seq);
        self.seq += 1;
        // The policy enforcement point: nothing is held or woken for a denied job.
        match self.authorize(&id, &owner, s, vertices) {
            Ok(r) => Ok((id, owner, r)),
            Err(error) => {
                tracing::info!(job = %s.name, owner = %owner, %error, "job refused by policy");
                Err(error)
            }
        }
    }

    /// Applies the domain policy's checkpoint rules to `s`, a job of `owner`: a job that asks
    /// for checkpoints more often than the policy lets it is refused; one that asks for none
    /// is given the policy's default interval when its modules can be paused (otherwise it
    /// runs without, as it asked).
    pub(super) fn checkpoint_policy(
        &self,
        owner: &Principal,
        s: &mut Submission,
    ) -> Result<(), AdmitError> {
        let engine = self.site.policies.current().engine.clone();
        let rules = engine
            .job_rules(owner, &self.site.domain)
            .map_err(|e| AdmitError::Policy(format!("checkpoint rules: {e}")))?;
        let min = rules.min_interval_ms.unwrap_or(0);
        match &mut s.checkpoint {
            Some(c) if c.interval_ms < min => Err(AdmitError::Policy(format!(
                "the policy of domain {} lets {owner} checkpoint a job at most every {min} ms; \
                 the profile asks for every {} ms",
                self.site.domain, c.interval_ms
            ))),
            Some(_) => Ok(()),
            None => {
                let Some(every) = rules.default_ms else {
                    return Ok(());
                };
                let pausable = s.components.values().all(|h| {
                    self.modules.get(h).is_some_and(|b| {
                        mvm_component::runtime::checkpoint::check_checkpointable(&b).is_ok()
                    })
                });
                if pausable {
                    s.checkpoint = Some(CheckpointPolicy {
                        interval_ms: every.max(min),
                        keep: mvm_component::profile::DEFAULT_KEEP,
                    });
                }
                Ok(())
            }
        }
    }

    /// Records an admitted job as waiting in the queue (with its submission), answering
    /// `reply` once it is recorded.
    fn record_pending(
        &self,
        out: &mut Vec<Effect>,
        reply: Reply,
        mut record: JobRecord,
        s: Submission,
        why: super::plan::PlaceError,
    ) {
        record.state = JobState::Pending;
        record.submission = Some(self.with_modules(s));
        let job = record.id.clone();
        out.push(Effect::Record {
            command: Command::Submit(Box::new(record)),
            then: Then::PendingRecorded { reply, job, why },
        });
    }

    /// `s` with its modules, as the job log keeps a submission (while its job waits, or may run
    /// again), so that whichever replica leads when it is placed has them.
    pub(super) fn with_modules(&self, mut s: Submission) -> Box<Submission> {
        s.modules = s
            .components
            .values()
            .filter_map(|h| self.modules.get(h))
            .collect();
        Box::new(s)
    }

    /// The other groups that could take a job this group cannot: the same domain, or a domain
    /// the inter-domain policy lets its owner use; with room and the image and architecture it
    /// asks for; the one with the most free slots first.
    pub(super) fn forward_to(
        &self,
        s: &Submission,
        owner: &Principal,
        vertices: usize,
    ) -> Vec<GroupSummary> {
        let r = &s.requirements;
        let mut fits: Vec<GroupSummary> = self
            .members
            .groups(std::time::Instant::now(), &self.site.net.peer())
            .into_iter()
            .filter(|g| {
                (g.domain == self.site.domain || inter_domain_allows(&self.site, owner, g))
                    && g.free_slots as usize >= vertices
                    && r.image.as_ref().is_none_or(|i| g.images.contains(i))
                    && r.arch.as_ref().is_none_or(|a| g.archs.contains(a))
            })
            .collect();
        fits.sort_by_key(|g| std::cmp::Reverse(g.free_slots));
        fits
    }

    /// Places the pending jobs that fit now, in the queue's order (a job that does not fit
    /// lets later ones that do go first).
    pub(super) fn place_pending(&mut self, out: &mut Vec<Effect>) {
        // A job run again starts from its newest checkpoint whose blobs are all here and sound
        // (a blob missing, or corrupt on disk, makes the one before it used), if any.
        type Waiting = (
            JobId,
            Principal,
            Box<Submission>,
            u32,
            Option<CheckpointInfo>,
        );
        // Jobs that wait for others are passed over (at most so many looked at each time).
        let mut blocked: Vec<(JobId, super::array::Deps)> = Vec::new();
        let now = now_ms();
        let waiting: Vec<Waiting> = self.log.read(|st| {
            st.pending()
                .filter(|j| !self.drives.contains_key(&j.id))
                .filter(|j| {
                    // A job under an agreement waits for its start.
                    if j.agreement
                        && let Some(why) = Core::before_agreement(st, &j.id, now)
                    {
                        self.view.waiting.lock().insert(j.id.clone(), why);
                        return false;
                    }
                    true
                })
                .filter(|j| {
                    if j.after.is_empty() && j.after_ok.is_empty() {
                        return true;
                    }
                    match super::array::dependencies(st, &j.after, &j.after_ok) {
                        super::array::Deps::Ready => true,
                        deps => {
                            if blocked.len() < 4096 {
                                blocked.push((j.id.clone(), deps));
                            }
                            false
                        }
                    }
                })
                .filter_map(|j| {
                    let mut s = j.submission.clone()?;
                    // An array's jobs are kept without their modules: the array has them.
                    if s.modules.is_empty()
                        && let Some((array, _)) = &j.array
                        && s.components.values().any(|h| !self.modules.has(h))
                    {
                        s.modules = st
                            .array(array)
                            .map(|a| a.modules.clone())
                            .unwrap_or_default();
                    }
                    let from = j
                        .checkpoints
                        .iter()
                        .rev()
                        .find(|c| c.parts.iter().all(|p| self.blobs.get(&p.blob).is_some()));
                    Some((j.id.clone(), j.owner.clone(), s, j.attempt, from.cloned()))
                })
                .take(256)
                .collect()
        });
        for (id, deps) in blocked {
            match deps {
                super::array::Deps::Wait(why) => {
                    self.view.waiting.lock().insert(id, why);
                }
                super::array::Deps::Broken(why) => {
                    tracing::info!(job = %id, %why, "job cancelled: a dependency did not end well");
                    let ended = Ended {
                        at_ms: now_ms(),
                        error: Some(format!("cancelled: {why}")),
                        kind: None,
                    };
                    self.end(out, &id, JobState::Cancelled, ended);
                }
                super::array::Deps::Ready => {}
            }
        }
        for (id, owner, s, attempt, from) in waiting {
            if s.components.values().any(|h| !self.modules.has(h)) {
                for b in &s.modules {
                    self.modules.put(b.clone());
                }
            }
            let c = match check(&self.modules, &self.codecs, &s) {
                Ok(c) => c,
                Err(f) => {
                    let ended = Ended::failed(ErrorKind::Setup, f.message);
                    self.end(out, &id, JobState::Failed, ended);
                    continue;
                }
            };
            let planned = match &from {
                Some(from) => {
                    let names: Vec<String> =
                        c.topology.vertices.iter().map(|v| v.name.clone()).collect();
                    self.plan_restore(&id, &s, &names, from)
                        .map(|(p, blobs)| (p, Some(blobs)))
                }
                None => self.plan(&id, &s, &c).map(|p| (p, None)),
            };
            let (plan, blobs) = match planned {
                Ok(p) => p,
                Err(why) => {
                    self.ledger.release(&id);
                    self.view.waiting.lock().insert(id, why.to_string());
                    continue;
                }
            };
            self.view.waiting.lock().remove(&id);
            tracing::info!(job = %id, from = ?from.as_ref().map(|f| f.cut), "pending job placed");
            let mut specs = self.specs(&id, &owner, &s, &c, &plan, attempt);
            for ((_, spec), blob) in specs.iter_mut().zip(blobs.into_iter().flatten()) {
                spec.restore = Some(blob);
            }
            // What the parts' sandboxes held at the checkpoint, in place of the inputs.
            for ((_, spec), part) in specs.iter_mut().zip(from.iter().flat_map(|f| &f.parts)) {
                spec.restore_files.clone_from(&part.files);
            }
            self.drives.insert(id.clone(), Drive::recording(attempt));
            out.push(Effect::Record {
                command: Command::Place {
                    job: id.clone(),
                    parts: plan.parts(&c.topology),
                    from_cut: from.as_ref().map(|f| f.cut),
                },
                then: Then::Placed {
                    reply: None,
                    job: id,
                    specs,
                },
            });
        }
    }
}
