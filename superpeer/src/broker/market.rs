//! The market at the broker: changes of a bidding job's bid (`mvm bid`), told to the nodes
//! that run its parts.

use std::collections::BTreeSet;

use libp2p::PeerId;
use mvm_component::policy::Principal;

use super::core::{Core, Effect, Reply, Then, first};
use super::plan::Plan;
use super::{Broker, admit, fail, now_ms};
use crate::environment::FLOOR_RATE;
use crate::joblog::Command;
use crate::joblog::state::JobBid;
use crate::market::MAX_RATE;
use crate::market::agent::{self, Host};
use crate::proto::{
    BrokerRequest, FailureKind, JobId, JobState, Response, Submission, account_of, format_credits,
};

impl Broker {
    /// `who` changes job `job`'s bid to `rate` (micro-credits per CPU-second): who may `bid`
    /// for the job, for a job that bids, with a rate its owner's balance covers for a
    /// CPU-second at least.
    pub(super) async fn rebid(&self, who: &Principal, job: JobId, rate: u64) -> Response {
        if rate == 0 || rate > MAX_RATE {
            return fail(
                FailureKind::Input,
                format!(
                    "a bid rate is from 0.000001 to 1000000 credits a CPU-second, not {} \
                     micro-credits",
                    rate
                ),
            );
        }
        if let Some(r) = admit::refusal(&self.site, &self.log, who, "bid", &job) {
            return r;
        }
        let short = self.log.read(|s| {
            let j = s.job(&job)?;
            let payer = account_of(&j.owner);
            let held = s.bank().balance(&payer);
            if held < rate {
                return Some(format!(
                    "job {job}: a bid of {} credits a CPU-second is above {payer}'s balance of {}",
                    format_credits(rate),
                    format_credits(held)
                ));
            }
            let left = j.bid.and_then(|b| b.left())?;
            (left < rate).then(|| {
                format!(
                    "job {job}: a bid of {} credits a CPU-second is past what is left of its \
                     budget ({})",
                    format_credits(rate),
                    format_credits(left)
                )
            })
        });
        if let Some(why) = short {
            return fail(FailureKind::Refused, why);
        }
        self.ask(|reply| super::core::Input::Bid { reply, job, rate })
            .await
    }
}

impl Core {
    /// A bid by hand on every part of `job`: recorded, unless a node the job runs on takes no
    /// bid so low (its floor price).
    pub(super) fn bid_by_hand(&self, out: &mut Vec<Effect>, reply: Reply, job: JobId, rate: u64) {
        let nodes: Vec<PeerId> = self.log.read(|s| {
            s.job(&job)
                .map(|j| j.parts.iter().filter(|p| !p.done).map(|p| p.node).collect())
                .unwrap_or_default()
        });
        if let Some((peer, floor)) = nodes
            .iter()
            .map(|p| (p, self.host(p, 0).1))
            .find(|(_, floor)| *floor > rate)
        {
            let why = format!(
                "job {job}: node {} takes bids of at least {} credits a CPU-second, not {}",
                self.members.label(peer),
                format_credits(floor),
                format_credits(rate)
            );
            out.push(Effect::Reply(reply, fail(FailureKind::Refused, why)));
            return;
        }
        out.push(Effect::Record {
            command: Command::Bid {
                job: job.clone(),
                rate,
                node: None,
            },
            then: Then::Rebid {
                reply: Some(reply),
                job,
                rate,
                node: None,
            },
        });
    }

    /// A change of bid was recorded (or refused): the nodes of the job's running parts (or
    /// node `node` only) are told, and the asker, if any, answered.
    pub(super) fn rebid(
        &self,
        out: &mut Vec<Effect>,
        reply: Option<Reply>,
        job: &JobId,
        rate: u64,
        node: Option<PeerId>,
        outcome: Result<crate::joblog::Applied, crate::joblog::LogError>,
    ) {
        if let Err(f) = first(outcome) {
            match reply {
                Some(reply) => out.push(Effect::Reply(reply, Response::Error(f))),
                None => {
                    tracing::warn!(%job, error = %f.message, "a change of bid was not recorded")
                }
            }
            return;
        }
        let peers: BTreeSet<_> = self.log.read(|s| {
            s.job(job)
                .map(|j| {
                    j.parts
                        .iter()
                        .filter(|p| !p.done && node.is_none_or(|n| n == p.node))
                        .map(|p| p.node)
                        .collect()
                })
                .unwrap_or_default()
        });
        for peer in peers {
            out.push(Effect::Send {
                peer,
                addrs: self.members.addrs(&peer),
                request: BrokerRequest::Bid {
                    job: job.clone(),
                    rate,
                },
                then: Then::Nothing,
            });
        }
        if let Some(reply) = reply {
            out.push(Effect::Reply(reply, Response::Ok));
        }
    }
}

/// How often the agent of a market job bids again, as prices change.
pub(super) const AGENT_EVERY: std::time::Duration = std::time::Duration::from_secs(3);

/// A change of a node's bid by less than this fraction is not sent.
const REBID_CHANGE: f64 = 0.05;

/// What a market job's agent may spend a second now, micro-credits: what is left of its
/// budget over the time left to its deadline (at least [`AGENT_EVERY`]; spent as a bid rate
/// per CPU-second, which a one-vCPU guest uses at most once a second).
pub(super) fn budget_rate(bid: &JobBid, submitted_ms: u64, now_ms: u64) -> f64 {
    let Some(m) = bid.market else { return 0.0 };
    let end = submitted_ms.saturating_add(m.deadline_ms);
    let left_ms = end
        .saturating_sub(now_ms)
        .max(u64::try_from(AGENT_EVERY.as_millis()).unwrap_or(1000));
    m.budget.saturating_sub(bid.spent) as f64 / (left_ms as f64 / 1000.0)
}

/// A market job as its agent sees it: its id, bid, submission time, and its live parts'
/// nodes with their bids.
type Bidding = (JobId, JobBid, u64, Vec<(PeerId, u64)>);

/// A bid as a rate the auctioneers take: whole micro-credits, from the floor to the most.
fn rate_of(x: f64) -> u64 {
    if x.is_finite() {
        (x.round() as u64).clamp(FLOOR_RATE, MAX_RATE)
    } else {
        FLOOR_RATE
    }
}

impl Core {
    /// A node as the agent sees it: its CPUs (what the whole node is worth) and its price
    /// (the sum of the bids there, from its last heartbeat) less `own`, the job's bid there;
    /// and its floor price (the least bid it takes).
    fn host(&self, peer: &PeerId, own: u64) -> (Host, u64) {
        let (cpus, price, floor) = self.members.get(peer).map_or((0, 0, 0), |e| {
            (e.info.cpus, e.info.load.price, e.info.load.floor)
        });
        let host = Host {
            weight: f64::from(cpus.max(1)),
            price: price.saturating_sub(own) as f64,
        };
        (host, floor)
    }

    /// The best response `x` per second over the nodes `peers` (with the job's own bids
    /// `own` there), each raised to its node's floor price.
    fn respond(&self, x: f64, peers: &[(PeerId, u64)]) -> Result<Vec<u64>, agent::ResponseError> {
        let (hosts, floors): (Vec<Host>, Vec<u64>) =
            peers.iter().map(|(p, own)| self.host(p, *own)).unzip();
        let best = agent::best_response(x, &hosts, FLOOR_RATE as f64)?;
        Ok(best
            .into_iter()
            .zip(floors)
            .map(|(b, floor)| rate_of(b).max(floor))
            .collect())
    }

    /// For a market job: the nodes among `ok` its agent would bid on, best first, as the best
    /// response to their prices on at most `limit` of them; none when it would bid nowhere.
    pub(super) fn market_order(
        &self,
        s: &Submission,
        peers: &[PeerId],
        ok: &[usize],
        limit: usize,
    ) -> Option<Vec<usize>> {
        let bid = JobBid::of(&s.requirements)?;
        bid.market?;
        let x = budget_rate(&bid, now_ms(), now_ms());
        // A node whose floor price is above the whole budget's rate is no choice.
        let ok: Vec<usize> = ok
            .iter()
            .copied()
            .filter(|&i| (self.host(&peers[i], 0).1 as f64) <= x)
            .collect();
        let hosts: Vec<Host> = ok.iter().map(|&i| self.host(&peers[i], 0).0).collect();
        let bids = agent::best_response_limited(x, &hosts, FLOOR_RATE as f64, limit).ok()?;
        let mut order: Vec<(usize, f64)> = ok
            .iter()
            .zip(bids)
            .filter(|(_, b)| *b > 0.0)
            .map(|(&i, b)| (i, b))
            .collect();
        if order.is_empty() {
            return None;
        }
        order.sort_by(|a, b| b.1.total_cmp(&a.1));
        Some(order.into_iter().map(|(i, _)| i).collect())
    }

    /// Each part's bid of `plan` for job `job`: a fixed bid's rate on every part; a market
    /// job's, its agent's best response to the prices of the plan's nodes (`keep`: a part the
    /// job has a bid for keeps it, as a part moved does). None for a job that does not bid.
    pub(super) fn bid_plan(&self, job: &JobId, s: &Submission, plan: &mut Plan, keep: bool) {
        let r = &s.requirements;
        let Some(fresh) = JobBid::of(r) else {
            plan.bids = Vec::new();
            return;
        };
        if fresh.market.is_none() {
            plan.bids = vec![fresh.rate; plan.peers.len()];
            return;
        }
        let now = now_ms();
        let (bid, submitted, recorded) = self.log.read(|st| match st.job(job) {
            Some(j) => (
                j.bid.unwrap_or(fresh),
                j.submitted_ms,
                j.parts.iter().map(|p| p.bid).collect::<Vec<_>>(),
            ),
            None => (fresh, now, Vec::new()),
        });
        if !bid.agent {
            plan.bids = vec![bid.rate.max(FLOOR_RATE); plan.peers.len()];
            return;
        }
        let x = budget_rate(&bid, submitted, now);
        let peers: Vec<(PeerId, u64)> = plan.peers.iter().map(|p| (*p, 0)).collect();
        let best = self.respond(x, &peers).unwrap_or_default();
        plan.bids = (0..plan.peers.len())
            .map(|i| match recorded.get(i).copied().flatten() {
                Some(b) if keep => b,
                _ => best.get(i).copied().unwrap_or(FLOOR_RATE),
            })
            .collect();
    }

    /// The agents' round (every [`AGENT_EVERY`], from the tick): each running market job
    /// whose agent bids bids its best response to its nodes' prices now, spending what is
    /// left of its budget by its deadline; a job that has spent its budget bids the floor.
    /// Only changes past [`REBID_CHANGE`] are recorded and sent to the nodes.
    pub(super) fn agents(&mut self, out: &mut Vec<Effect>) {
        let now = now_ms();
        let jobs: Vec<Bidding> = self.log.read(|st| {
            st.jobs()
                .filter(|j| j.state == JobState::Running && !self.drives.contains_key(&j.id))
                .filter_map(|j| {
                    let b = j.bid?;
                    (b.market.is_some() && (b.agent || b.left() == Some(0))).then(|| {
                        let parts = j
                            .parts
                            .iter()
                            .filter(|p| !p.done)
                            .map(|p| (p.node, p.bid.unwrap_or(FLOOR_RATE)))
                            .collect();
                        (j.id.clone(), b, j.submitted_ms, parts)
                    })
                })
                .collect()
        });
        for (job, bid, submitted, parts) in jobs {
            let want: Vec<u64> = if bid.left() == Some(0) {
                vec![FLOOR_RATE; parts.len()]
            } else {
                let x = budget_rate(&bid, submitted, now);
                match self.respond(x, &parts) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(%job, "the market agent: {e}");
                        continue;
                    }
                }
            };
            for ((peer, own), rate) in parts.into_iter().zip(want) {
                let change = (rate as f64 - own as f64).abs() / own.max(1) as f64;
                if change <= REBID_CHANGE {
                    continue;
                }
                out.push(Effect::Record {
                    command: Command::Bid {
                        job: job.clone(),
                        rate,
                        node: Some(peer),
                    },
                    then: Then::Rebid {
                        reply: None,
                        job: job.clone(),
                        rate,
                        node: Some(peer),
                    },
                });
            }
        }
    }
}
