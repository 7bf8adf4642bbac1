//! The market at the broker: changes of a bidding job's bid (`mvm bid`), told to the nodes
//! that run its parts.

use std::collections::BTreeSet;

use mvm_component::policy::Principal;

use super::core::{Core, Effect, Reply, Then, first};
use super::{Broker, admit, fail};
use crate::market::MAX_RATE;
use crate::proto::{BrokerRequest, FailureKind, JobId, Response, account_of, format_credits};

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
            (held < rate).then_some((payer, held))
        });
        if let Some((payer, held)) = short {
            return fail(
                FailureKind::Refused,
                format!(
                    "job {job}: a bid of {} credits a CPU-second is above {payer}'s balance of {}",
                    format_credits(rate),
                    format_credits(held)
                ),
            );
        }
        self.ask(|reply| super::core::Input::Bid { reply, job, rate })
            .await
    }
}

impl Core {
    /// A change of bid was recorded (or refused): the nodes of the job's running parts are
    /// told, and the asker answered.
    pub(super) fn rebid(
        &self,
        out: &mut Vec<Effect>,
        reply: Reply,
        job: &JobId,
        rate: u64,
        outcome: Result<crate::joblog::Applied, crate::joblog::LogError>,
    ) {
        if let Err(f) = first(outcome) {
            out.push(Effect::Reply(reply, Response::Error(f)));
            return;
        }
        let peers: BTreeSet<_> = self.log.read(|s| {
            s.job(job)
                .map(|j| j.parts.iter().filter(|p| !p.done).map(|p| p.node).collect())
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
        out.push(Effect::Reply(reply, Response::Ok));
    }
}
