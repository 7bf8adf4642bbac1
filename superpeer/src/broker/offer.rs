//! Offers: a job planned in time (the earliest window in which it fits for its estimated
//! run time, OpenCCS's planning), held for the asker until the offer lapses.

use libp2p::PeerId;
use mvm_component::policy::Principal;

use super::admit::Refusal;
use super::agree::{Ask, held_in, history, holds};
use super::core::{Core, Effect, Reply, Then};
use super::now_ms;
use super::place::Checked;
use super::plan::{Candidates, PlaceError, images_of};
use crate::joblog::Command;
use crate::joblog::state::AgreementRecord;
use crate::proto::{AgreementState, Failure, FailureKind, Response, Submission};
use crate::schedule::{self, Candidate};

/// The most start times an offer tries.
const MAX_STARTS: usize = 256;

impl Core {
    /// Plans job `s` of `who` in time and offers it: the earliest window at or after the
    /// asked start in which it fits for its estimated run time, held for the asker until the
    /// offer lapses. No window that ends by the deadline: refused, with the earliest finish.
    pub(super) fn offer(
        &mut self,
        out: &mut Vec<Effect>,
        reply: Reply,
        who: &Principal,
        mut s: Submission,
        c: Checked,
        ask: Ask,
    ) {
        let refuse = |out: &mut Vec<Effect>, reply: Reply, f: Failure| {
            out.push(Effect::Reply(reply, Response::Error(f)));
        };
        let input = |why: String| Failure::new(FailureKind::Input, why);
        let name = s.name.clone();
        let refused = |error| Failure::from(Refusal { job: name, error });
        if !s.sweep.is_empty() {
            let why = format!(
                "job {}: an array (a [sweep]) is not offered: offer one point, or submit it",
                s.name
            );
            return refuse(out, reply, input(why));
        }
        if !s.after.is_empty() || !s.after_ok.is_empty() {
            let why = format!(
                "job {}: a job that waits for others (after, after_ok) is not offered",
                s.name
            );
            return refuse(out, reply, input(why));
        }
        // The policy's word now; the job holds its share once the offer is accepted.
        let (id, owner, resources) = match self.admit(who, &s, c.topology.vertices.len()) {
            Ok(a) => a,
            Err(error) => return refuse(out, reply, refused(error)),
        };
        self.ledger.release(&id);
        if let Err(error) = self.checkpoint_policy(&owner, &mut s) {
            return refuse(out, reply, refused(error));
        }
        let (estimate_ms, from) = match s.estimate_ms {
            Some(e) => (e, "profile"),
            None => match self.log.read(|st| history(st, &owner, &s.name)) {
                Some(e) => (e, "history"),
                None => {
                    let why = format!(
                        "job {}: no estimate of its run time: give one in its profile \
                         (estimate = \"2m\"), or run it here once",
                        s.name
                    );
                    return refuse(out, reply, input(why));
                }
            },
        };
        s.estimate_ms = Some(estimate_ms);
        // The execution environment by its full id, which the agreement keeps whatever node
        // runs it (a restart, a migration).
        let image = match s.requirements.image.as_deref() {
            None | Some("host") => "host".to_owned(),
            Some(i) => {
                let full = self
                    .image_sources(i)
                    .map_or_else(|| i.to_owned(), |(f, _)| f);
                s.requirements.image = Some(full.clone());
                full
            }
        };
        let now = now_ms();
        let earliest = ask.start_after_ms.unwrap_or(now).max(now);
        let planned = match self.plan_in_time(&s, &c, earliest, estimate_ms) {
            Ok((start, _)) if ask.deadline_ms.is_some_and(|d| start + estimate_ms > d) => {
                Err(PlaceError::NoOffer(format!(
                    "job {}: no plan of group {} finishes it by its deadline ({} ms from now): \
                     the earliest finish is {} ms from now ({} ms run time, from its {from})",
                    s.name,
                    self.site.group,
                    ask.deadline_ms.unwrap_or(0).saturating_sub(now),
                    (start + estimate_ms).saturating_sub(now),
                    estimate_ms
                )))
            }
            p => p,
        };
        let (start, slots) = match planned {
            Ok(p) => p,
            // Another group may offer what this one cannot (once: a forwarded ask goes no
            // further).
            Err(why) => {
                let to = if s.hops == 0 {
                    self.forward_to(&s, &owner, c.topology.vertices.len())
                } else {
                    Vec::new()
                };
                if to.is_empty() {
                    let f = Failure::new(FailureKind::Unavailable, why.to_string());
                    return refuse(out, reply, f);
                }
                out.push(Effect::Forward {
                    reply,
                    submission: Box::new(s),
                    owner,
                    to,
                    why,
                    offer: Some(ask),
                });
                return;
            }
        };
        let finish = start.saturating_add(estimate_ms);
        let s = self.with_modules(s);
        let record = AgreementRecord {
            id: id.clone(),
            name: s.name.clone(),
            owner,
            image,
            resources,
            slots,
            start_ms: start,
            finish_ms: finish,
            estimate_ms,
            estimate_from: from.to_owned(),
            deadline_ms: ask.deadline_ms,
            offered_ms: now,
            expires_ms: now.saturating_add(ask.valid_ms),
            state: AgreementState::Offered,
            reason: None,
            accepted_ms: None,
            ended_ms: None,
            submission: Some(s),
        };
        tracing::info!(offer = %id, start, finish, "job offered");
        out.push(Effect::Record {
            command: Command::Offer(Box::new(record)),
            then: Then::AgreementRecorded { reply, id },
        });
    }

    /// The earliest start at or after `earliest` at which the job fits this group's nodes for
    /// `estimate` ms, and the slots it takes on each.
    fn plan_in_time(
        &self,
        s: &Submission,
        c: &Checked,
        earliest: u64,
        estimate: u64,
    ) -> Result<(u64, Vec<(PeerId, u32)>), PlaceError> {
        let group = || self.site.group.clone();
        let now = now_ms();
        let mut live: Vec<(&PeerId, &super::members::NodeEntry)> = self.members.live().collect();
        self.log.read(|st| live.retain(|(p, _)| !st.is_drained(p)));
        live.retain(|(p, _)| !self.triggering.retiring.contains(*p));
        live.sort_by(|a, b| a.1.info.name.cmp(&b.1.info.name).then(a.0.cmp(b.0)));
        if live.is_empty() {
            return Err(PlaceError::NoNodes { group: group() });
        }
        // What runs on each node now, and until when (for ever: it gives no estimate, or has
        // run past it).
        let busy: Vec<Vec<(u64, u32)>> = self.log.read(|st| {
            live.iter()
                .map(|(p, _)| {
                    let mut v: Vec<(u64, u32)> = st
                        .placed_on(p)
                        .map(|j| {
                            let n = j
                                .parts
                                .iter()
                                .filter(|x| x.node == **p)
                                .map(|x| u32::try_from(x.vertices.len()).unwrap_or(u32::MAX))
                                .sum::<u32>();
                            let until = match (j.started_ms, j.estimate_ms) {
                                (Some(s), Some(e)) if s.saturating_add(e) >= now => {
                                    s.saturating_add(e)
                                }
                                (None, Some(e)) => now.saturating_add(e),
                                _ => u64::MAX,
                            };
                            (until, n)
                        })
                        .collect();
                    v.push((u64::MAX, self.ledger.slots(p)));
                    v
                })
                .collect()
        });
        let holds = self.log.read(|st| holds(st, now));
        let mut starts: Vec<u64> = std::iter::once(earliest)
            .chain(busy.iter().flatten().map(|b| b.0))
            .chain(holds.iter().map(|h| h.finish))
            .filter(|t| *t >= earliest && *t != u64::MAX)
            .collect();
        starts.sort_unstable();
        starts.dedup();
        starts.truncate(MAX_STARTS);
        let image = s.requirements.image.as_deref();
        let offered = image.is_some_and(|i| self.image_sources(i).is_some());
        let mut last = PlaceError::NoNodes { group: group() };
        for t in starts {
            let until = t.saturating_add(estimate);
            let cands: Vec<Candidate> = live
                .iter()
                .zip(&busy)
                .map(|((p, e), b)| {
                    let taken = b
                        .iter()
                        .filter(|x| x.0 > t)
                        .fold(0u32, |n, x| n.saturating_add(x.1))
                        .saturating_add(held_in(&holds, p, t, until, None));
                    Candidate {
                        name: e.info.name.clone(),
                        cpus: e.info.cpus,
                        memory_bytes: e.info.memory_bytes,
                        // Later, what runs now has ended.
                        free_memory_bytes: if t <= now {
                            e.info.load.free_memory_bytes
                        } else {
                            e.info.memory_bytes
                        },
                        load: e.info.load.load,
                        arch: e.info.arch.clone(),
                        images: images_of(&e.info, image, offered),
                        slots: e.info.slots,
                        free_slots: e.info.slots.saturating_sub(taken),
                        floor: e.info.load.floor,
                    }
                })
                .collect();
            let (ok, why) = schedule::filter(&cands, &s.requirements);
            if ok.is_empty() {
                last = PlaceError::NoneMeets {
                    group: group(),
                    why,
                };
                continue;
            }
            let cs = Candidates {
                peers: live.iter().map(|(p, _)| **p).collect(),
                cands,
                ok,
            };
            match self.choose(&cs, s, c) {
                Ok(plan) => {
                    let slots = plan
                        .peers
                        .iter()
                        .enumerate()
                        .map(|(i, p)| {
                            let n = plan.placement.iter().filter(|x| **x as usize == i).count();
                            (*p, u32::try_from(n).unwrap_or(u32::MAX))
                        })
                        .collect();
                    return Ok((t, slots));
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}
