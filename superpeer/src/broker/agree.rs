//! Offers and agreements (OpenCCS's service level agreements, `004_*` sections 2 and 3.1).
//!
//! The broker plans in time: an offer is the earliest window, at or after the asker's
//! earliest start, in which the group's nodes have room for the whole job for its estimated
//! run time. What runs now holds its slots until its own estimate says it ends (for ever when
//! it gives none); what other offers and agreements hold is held in their windows. The offer's
//! slots are held for it until it is accepted or lapses; an agreement's from its start until
//! its job is placed. A job that waits in the queue takes held slots only when its estimate
//! ends it before the window that holds them begins (backfilling, in
//! [`Core::candidates`](super::core::Core)).
//!
//! The job log keeps each offer and agreement ([`Command::Offer`], [`Command::Accept`],
//! [`Command::EndAgreement`]); an agreement follows its job there (running, met, violated at
//! once when a run is given up with no checkpoint to go on from).

use libp2p::PeerId;
use mvm_component::policy::Principal;

use super::core::{Core, Effect, Reply, Then};
use super::place::{check, new_record};
use super::{Broker, View, fail, now_ms};
use crate::joblog::Command;
use crate::joblog::state::{AgreementRecord, ControlState};
use crate::proto::{
    AgreementInfo, AgreementState, Failure, FailureKind, JobId, JobState, Response,
};

/// The earlier runs of a profile an estimate is drawn from, the newest.
const HISTORY_RUNS: usize = 10;

/// How late after its start an agreement's job may start: a tenth of its run time, from 2 s
/// to a minute (placing and preparing a job takes a while).
pub(super) fn start_grace(estimate_ms: u64) -> u64 {
    (estimate_ms / 10).clamp(2_000, 60_000)
}

/// Slots an offer or agreement holds on a node in a window.
pub(super) struct Held {
    pub(super) id: JobId,
    pub(super) node: PeerId,
    pub(super) slots: u32,
    pub(super) start: u64,
    pub(super) finish: u64,
}

/// What the offers and agreements of `st` hold at `now` (offers past their expiry hold
/// nothing, whether or not their lapse is recorded yet).
pub(super) fn holds(st: &ControlState, now: u64) -> Vec<Held> {
    st.holding()
        .filter(|a| a.state != AgreementState::Offered || a.expires_ms >= now)
        .flat_map(|a| {
            a.slots.iter().map(|(node, slots)| Held {
                id: a.id.clone(),
                node: *node,
                slots: *slots,
                start: a.start_ms,
                finish: a.finish_ms,
            })
        })
        .collect()
}

/// The slots held on `node` by windows that meet `[from, to)`, but those of `except`.
pub(super) fn held_in(
    holds: &[Held],
    node: &PeerId,
    from: u64,
    to: u64,
    except: Option<&JobId>,
) -> u32 {
    holds
        .iter()
        .filter(|h| h.node == *node && h.start < to && h.finish > from)
        .filter(|h| except != Some(&h.id))
        .fold(0u32, |n, h| n.saturating_add(h.slots))
}

/// The run time of the profile `name` of `owner` as its earlier runs here give it: the
/// longest of the newest [`HISTORY_RUNS`] that ended well, with a quarter more and a second.
pub(super) fn history(st: &ControlState, owner: &Principal, name: &str) -> Option<u64> {
    let mut runs: Vec<(u64, u64)> = st
        .jobs()
        .filter(|j| j.name == name && j.owner == *owner && j.state == JobState::Done)
        .filter_map(|j| {
            let end = j.ended.as_ref()?.at_ms;
            Some((end, end.saturating_sub(j.started_ms?)))
        })
        .collect();
    runs.sort_unstable();
    let longest = runs.iter().rev().take(HISTORY_RUNS).map(|r| r.1).max()?;
    Some(longest.saturating_add(longest / 4).saturating_add(1000))
}

/// A request for an offer.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ask {
    /// It must be finished by then.
    pub(super) deadline_ms: Option<u64>,
    /// It must not start before then.
    pub(super) start_after_ms: Option<u64>,
    /// How long the offer is held.
    pub(super) valid_ms: u64,
}

/// The offer or agreement `a` as clients see it, with its nodes by name.
pub(super) fn info_of(
    a: &AgreementRecord,
    group: &str,
    domain: &str,
    name: impl Fn(&PeerId) -> String,
) -> AgreementInfo {
    AgreementInfo {
        id: a.id.clone(),
        name: a.name.clone(),
        owner: format!("{}@{}", a.owner.name, a.owner.domain),
        group: group.to_owned(),
        domain: domain.to_owned(),
        image: a.image.clone(),
        vcpus: u32::try_from(a.resources.vcpus).unwrap_or(0),
        memory_mib: u64::try_from(a.resources.memory_mib).unwrap_or(0),
        vertices: u32::try_from(a.resources.vertices).unwrap_or(0),
        nodes: a.slots.iter().map(|(p, n)| (name(p), *n)).collect(),
        start_ms: a.start_ms,
        finish_ms: a.finish_ms,
        estimate_ms: a.estimate_ms,
        estimate_from: a.estimate_from.clone(),
        deadline_ms: a.deadline_ms,
        price: None,
        expires_ms: a.expires_ms,
        state: a.state,
        reason: a.reason.clone(),
        accepted_ms: a.accepted_ms,
        ended_ms: a.ended_ms,
        broker_addrs: Vec::new(),
    }
}

impl View {
    /// Offer or agreement `id` in `st` as clients see it.
    fn agreement(
        &self,
        st: &ControlState,
        id: &JobId,
        group: &str,
        domain: &str,
    ) -> Option<AgreementInfo> {
        let names = self.names.lock();
        st.agreement(id).map(|a| {
            info_of(a, group, domain, |p| {
                names.get(p).cloned().unwrap_or_else(|| p.to_string())
            })
        })
    }
}

impl Core {
    /// The answer once offer or agreement `id` is recorded.
    pub(super) fn agreement_recorded(
        &self,
        out: &mut Vec<Effect>,
        reply: Reply,
        id: &JobId,
        outcome: Result<crate::joblog::Applied, crate::joblog::LogError>,
    ) {
        let r = match super::core::first(outcome) {
            Ok(()) => {
                let (group, domain) = (&self.site.group, &self.site.domain);
                match self
                    .log
                    .read(|st| self.view.agreement(st, id, group, domain))
                {
                    Some(a) => Response::Agreements(vec![a]),
                    None => fail(
                        FailureKind::Failed,
                        format!("offer {id} left the log at once"),
                    ),
                }
            }
            Err(f) => Response::Error(f),
        };
        out.push(Effect::Reply(reply, r));
    }

    /// Accepts offer `id` for `who`, whom it was made to: it becomes an agreement, and its job
    /// waits in the queue for its start.
    pub(super) fn accept(
        &mut self,
        out: &mut Vec<Effect>,
        reply: Reply,
        who: &Principal,
        id: JobId,
    ) {
        let refuse = |out: &mut Vec<Effect>, reply: Reply, kind, why: String| {
            out.push(Effect::Reply(
                reply,
                Response::Error(Failure::new(kind, why)),
            ));
        };
        let Some(a) = self.log.read(|st| st.agreement(&id).cloned()) else {
            return refuse(out, reply, FailureKind::NotFound, format!("no offer {id}"));
        };
        // Only its asker commits to an offer (not even an administrator for them).
        if a.owner.name != who.name || a.owner.domain != who.domain {
            let why = format!(
                "offer {id} was made to {}@{}, not to {}@{}",
                a.owner.name, a.owner.domain, who.name, who.domain
            );
            return refuse(out, reply, FailureKind::Refused, why);
        }
        let now = now_ms();
        match a.state {
            AgreementState::Offered if now <= a.expires_ms => {}
            AgreementState::Offered | AgreementState::Expired => {
                let why = format!(
                    "offer {id} lapsed {} ms ago: ask for another (mvm offer)",
                    now.saturating_sub(a.expires_ms)
                );
                return refuse(out, reply, FailureKind::Input, why);
            }
            s => {
                let why = format!(
                    "offer {id} was accepted already: the agreement is {}",
                    s.name()
                );
                return refuse(out, reply, FailureKind::Input, why);
            }
        }
        let Some(s) = a.submission.clone() else {
            let why = format!("offer {id} has lost its job");
            return refuse(out, reply, FailureKind::Failed, why);
        };
        for b in &s.modules {
            self.modules.put(b.clone());
        }
        let c = match check(&self.modules, &self.codecs, &s) {
            Ok(c) => c,
            Err(f) => return out.push(Effect::Reply(reply, Response::Error(f))),
        };
        let mut job = new_record(&id, &a.owner, a.resources, &s, &c);
        job.state = JobState::Pending;
        job.estimate_ms = Some(a.estimate_ms);
        job.agreement = true;
        job.submission = Some(s);
        tracing::info!(agreement = %id, "offer accepted");
        out.push(Effect::Record {
            command: Command::Accept {
                offer: id.clone(),
                at_ms: now,
                job: Box::new(job),
            },
            then: Then::AgreementRecorded { reply, id },
        });
    }

    /// Records the offers that lapsed and the agreements that can no longer be kept: not
    /// ended by their promised finish, or not started in time to end by it.
    pub(super) fn keep_agreements(&mut self, out: &mut Vec<Effect>) {
        let now = now_ms();
        let ends: Vec<Command> = self.log.read(|st| {
            st.open_agreements()
                .filter_map(|a| {
                    let job = st.job(&a.id);
                    let end = |state, why: String| Command::EndAgreement {
                        agreement: a.id.clone(),
                        state,
                        at_ms: now,
                        why,
                    };
                    match a.state {
                        AgreementState::Offered if now > a.expires_ms => Some(end(
                            AgreementState::Expired,
                            "not accepted before the offer lapsed".into(),
                        )),
                        AgreementState::Accepted | AgreementState::Running if now > a.finish_ms => {
                            Some(end(
                                AgreementState::Violated,
                                "the job had not ended by the promised finish".into(),
                            ))
                        }
                        AgreementState::Accepted
                            if job.is_some_and(|j| j.state == JobState::Pending)
                                && !self.drives.contains_key(&a.id)
                                && now > a.start_ms.saturating_add(start_grace(a.estimate_ms)) =>
                        {
                            let waits = self
                                .view
                                .waiting
                                .lock()
                                .get(&a.id)
                                .cloned()
                                .unwrap_or_else(|| "it was not placed".into());
                            Some(end(
                                AgreementState::Violated,
                                format!(
                                    "the job could not start within {} ms of its start: {waits}",
                                    start_grace(a.estimate_ms)
                                ),
                            ))
                        }
                        _ => None,
                    }
                })
                .collect()
        });
        if ends.is_empty() {
            return;
        }
        for c in &ends {
            if let Command::EndAgreement {
                agreement,
                state,
                why,
                ..
            } = c
            {
                tracing::warn!(%agreement, state = state.name(), %why, "agreement ended");
            }
        }
        out.push(Effect::Record {
            command: Command::Batch(ends),
            then: Then::Nothing,
        });
    }

    /// Whether pending job `id` runs under an agreement whose start has not come: then it
    /// waits, and why.
    pub(super) fn before_agreement(st: &ControlState, id: &JobId, now: u64) -> Option<String> {
        st.agreement(id)
            .filter(|a| a.start_ms > now)
            .map(|a| format!("its agreement starts in {} ms", a.start_ms - now))
    }
}

impl Broker {
    /// The offers and agreements of `who`, or (`all`, for an administrator) every one.
    pub(super) fn agreements(&self, who: &Principal, all: bool) -> Response {
        if all && let Some(r) = crate::policy::admin_refusal(&self.site, who, "agreements --all") {
            return r;
        }
        let (group, domain) = (&self.site.group, &self.site.domain);
        let names = self.view.names.lock();
        let list = self.log.read(|st| {
            st.agreements()
                .filter(|a| all || (a.owner.name == who.name && a.owner.domain == who.domain))
                .map(|a| {
                    info_of(a, group, domain, |p| {
                        names.get(p).cloned().unwrap_or_else(|| p.to_string())
                    })
                })
                .collect()
        });
        Response::Agreements(list)
    }
}

/// The most offers of other groups a super-peer remembers for its users.
const MAX_PASSED_ON: usize = 4096;

impl Broker {
    /// Remembers the offers of other groups in `offers` (passed on to a user of this group),
    /// so that the user may accept them here.
    pub(super) fn passed_on(&self, offers: &[AgreementInfo]) {
        let mut remote = self.remote_offers.lock();
        let now = now_ms();
        remote.retain(|_, (_, expires)| *expires >= now);
        for a in offers.iter().filter(|a| !a.broker_addrs.is_empty()) {
            if remote.len() < MAX_PASSED_ON {
                remote.insert(a.id.clone(), (a.broker_addrs.clone(), a.expires_ms));
            }
        }
    }

    /// Accepts for `who` an offer of another group that this super-peer passed on, at that
    /// group's super-peer; none when it passed on no such offer.
    pub(super) async fn accept_remote(&self, who: &Principal, offer: &JobId) -> Option<Response> {
        if self.log.read(|st| st.agreement(offer).is_some()) {
            return None;
        }
        let (addrs, _) = self.remote_offers.lock().get(offer).cloned()?;
        let split: Vec<(PeerId, libp2p::Multiaddr)> =
            addrs.iter().filter_map(crate::net::split_addr).collect();
        let peer = split.first()?.0;
        let bare: Vec<libp2p::Multiaddr> = split.into_iter().map(|(_, a)| a).collect();
        let request = crate::proto::ClientRequest::Accept {
            offer: offer.clone(),
            on_behalf: Some(who.clone()),
        };
        let r = match self.site.net.call(peer, &bare, request.into()).await {
            Ok(Response::Agreements(mut v)) => {
                for a in &mut v {
                    a.broker_addrs.clone_from(&addrs);
                }
                Response::Agreements(v)
            }
            Ok(other) => other,
            Err(f) => Response::Error(f),
        };
        Some(r)
    }
}
