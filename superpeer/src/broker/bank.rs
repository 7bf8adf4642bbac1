//! The bank's requests at the broker: reads from the job log's state, mints and transfers
//! as entries of it (through the broker's loop, like every change).

use mvm_component::policy::Principal;

use super::core::{Core, Effect, Reply, Then};
use super::{Broker, fail, now_ms};
use crate::joblog::Command;
use crate::joblog::bank::BankCommand;
use crate::proto::{
    BankAnswer, BankRequest, ChargeBatch, Failure, FailureKind, MAX_AMOUNT, MAX_REQUEST_ID,
    Response, account_of, parse_account,
};
use libp2p::PeerId;

/// The longest memo kept with a transfer.
const MAX_MEMO: usize = 256;

/// The most transactions one answer lists.
const MAX_HISTORY: u32 = 10_000;

impl Broker {
    /// Answers `who`'s bank request: reads here, changes through the loop. Mints need the
    /// domain's `administer`; only an administrator reads others' accounts; a transfer is
    /// from the asker's own account only.
    pub(super) async fn bank(&self, who: &Principal, r: BankRequest) -> Response {
        self.bank_of(who, r).await.unwrap_or_else(Response::Error)
    }

    async fn bank_of(&self, who: &Principal, r: BankRequest) -> Result<Response, Failure> {
        let own = account_of(who);
        let admin = |what: &str| crate::policy::admin_refusal(&self.site, who, what);
        let account = |a: Option<&String>| -> Result<String, Failure> {
            match a {
                None => Ok(own.clone()),
                Some(a) => {
                    parse_account(a).map_err(|e| Failure::new(FailureKind::Input, e.to_string()))
                }
            }
        };
        Ok(match r {
            BankRequest::Balance { account: a, all } => {
                let a = account(a.as_ref())?;
                if (all || a != own)
                    && let Some(r) = admin("read another's account")
                {
                    return Ok(r);
                }
                let accounts = self.log.read(|st| {
                    if all {
                        st.bank().balances().map(|(k, v)| (k.clone(), *v)).collect()
                    } else {
                        vec![(a.clone(), st.bank().balance(&a))]
                    }
                });
                Response::Bank(BankAnswer {
                    accounts,
                    transactions: Vec::new(),
                })
            }
            BankRequest::History { account: a, limit } => {
                let a = account(a.as_ref())?;
                if a != own
                    && let Some(r) = admin("read another's account")
                {
                    return Ok(r);
                }
                let n = limit.min(MAX_HISTORY) as usize;
                let (balance, transactions) = self.log.read(|st| {
                    let b = st.bank();
                    (
                        b.balance(&a),
                        b.history(Some(&a)).take(n).cloned().collect(),
                    )
                });
                Response::Bank(BankAnswer {
                    accounts: vec![(a, balance)],
                    transactions,
                })
            }
            BankRequest::Mint {
                to,
                amount,
                request,
            } => {
                if let Some(r) = admin("mint credits") {
                    return Ok(r);
                }
                let to = account(Some(&to))?;
                check(amount, &request, "")?;
                let command = BankCommand::Mint {
                    to,
                    amount,
                    by: own,
                    request,
                    at_ms: now_ms(),
                };
                self.ask(|reply| super::core::Input::Bank { reply, command })
                    .await
            }
            BankRequest::Transfer {
                from,
                to,
                amount,
                request,
                memo,
            } => {
                let from = account(from.as_ref())?;
                if let Some(r) = spend_refusal(&self.site, who) {
                    return Ok(r);
                }
                if from != own {
                    return Err(Failure::new(
                        FailureKind::Refused,
                        format!("{own} may not transfer from {from}: only from its own account"),
                    ));
                }
                let to = account(Some(&to))?;
                check(amount, &request, &memo)?;
                let command = BankCommand::Transfer {
                    from,
                    to,
                    amount,
                    by: own,
                    request,
                    memo,
                    at_ms: now_ms(),
                };
                self.ask(|reply| super::core::Input::Bank { reply, command })
                    .await
            }
        })
    }
}

/// The policy's refusal of `who` spending credits (`spend` on the domain), if it refuses.
fn spend_refusal(site: &crate::site::Site, who: &Principal) -> Option<Response> {
    use mvm_component::policy::{Decision, Domain, Question, Resource};
    let q = Question {
        actor: who.clone(),
        action: "spend".into(),
        resource: Resource::Domain(Domain::named(&site.domain)),
    };
    match site.policies.current().engine.decide(&q) {
        Decision::Deny(why) => Some(fail(
            FailureKind::Refused,
            format!("transfer: refused by policy: {why}"),
        )),
        _ => None,
    }
}

/// The refusal of a mint or transfer's amount, request id or memo, if any.
fn check(amount: u64, request: &str, memo: &str) -> Result<(), Failure> {
    let bad = |why: String| Err(Failure::new(FailureKind::Input, why));
    if amount == 0 || amount > MAX_AMOUNT {
        return bad(format!(
            "{amount} micro-credits: an amount is positive and at most 10^12 credits"
        ));
    }
    if request.is_empty() || request.len() > MAX_REQUEST_ID {
        return bad(format!(
            "a request id has 1 to {MAX_REQUEST_ID} bytes, not {}",
            request.len()
        ));
    }
    if memo.len() > MAX_MEMO {
        return bad(format!(
            "a memo has at most {MAX_MEMO} bytes, not {}",
            memo.len()
        ));
    }
    Ok(())
}

impl Core {
    /// The charges a node's heartbeat carries, from `provider`'s node `peer`: the batches
    /// after the last the bank took (and after any on their way to it) are proposed, each line
    /// kept only if its job is placed on the node, is its payer's, and bids at least its rate
    /// (a node meters its guests' use: the rest is checked here). The answer: the last batch
    /// taken, and which of the node's `bidders` hold no credit.
    pub(super) fn charge(
        &mut self,
        out: &mut Vec<Effect>,
        peer: PeerId,
        provider: &str,
        batches: Vec<ChargeBatch>,
        bidders: &[String],
    ) -> (Option<(u64, u64)>, Vec<String>) {
        let on_way = self.charging.get(provider).copied();
        let (taken, broke, fresh) = self.log.read(|s| {
            let bank = s.bank();
            let taken = bank.charged(provider);
            let broke: Vec<String> = bidders
                .iter()
                .filter(|p| bank.balance(p) == 0)
                .cloned()
                .collect();
            let after = |k: (u64, u64)| taken.is_none_or(|t| k > t) && on_way.is_none_or(|t| k > t);
            let fresh: Vec<ChargeBatch> = batches
                .into_iter()
                .filter(|b| after((b.boot, b.seq)))
                .map(|mut b| {
                    b.lines.retain(|l| {
                        let ok = s.job(&l.job).is_some_and(|r| {
                            let bid = r.bid.map_or(0, |b| b.top);
                            account_of(&r.owner) == l.payer
                                && r.parts.iter().any(|p| p.node == peer)
                                && l.rate <= bid
                                && u128::from(l.micro)
                                    <= u128::from(l.cpu_us) * u128::from(l.rate) / 1_000_000 + 1
                        });
                        if !ok {
                            tracing::warn!(%peer, job = %l.job, payer = %l.payer, "a charge for a job the node does not run for its payer at that rate is refused");
                        }
                        ok
                    });
                    b
                })
                .collect();
            (taken, broke, fresh)
        });
        if let Some(last) = fresh.last() {
            let upto = (last.boot, last.seq);
            self.charging.insert(provider.to_owned(), upto);
            out.push(Effect::Record {
                command: Command::Bank(BankCommand::Charge {
                    provider: provider.to_owned(),
                    batches: fresh,
                    at_ms: now_ms(),
                }),
                then: Then::Charged {
                    provider: provider.to_owned(),
                    upto,
                },
            });
        }
        (taken, broke)
    }

    /// Proposes a mint or transfer; the asker is answered with the transaction once it is
    /// applied (or with the earlier one its request id gave).
    pub(super) fn bank(&mut self, out: &mut Vec<Effect>, reply: Reply, command: BankCommand) {
        let Some((by, request)) = command.request() else {
            out.push(Effect::Reply(
                reply,
                fail(FailureKind::Input, "charges come with a node's heartbeats"),
            ));
            return;
        };
        let (by, request) = (by.to_owned(), request.to_owned());
        out.push(Effect::Record {
            command: Command::Bank(command),
            then: Then::Banked { reply, by, request },
        });
    }

    /// The answer to a mint or transfer once its entry was applied (or refused).
    pub(super) fn banked(
        &self,
        out: &mut Vec<Effect>,
        reply: Reply,
        by: &str,
        request: &str,
        outcome: Result<crate::joblog::Applied, crate::joblog::LogError>,
    ) {
        let r = match super::core::first(outcome) {
            Ok(()) => self.log.read(|st| {
                let b = st.bank();
                match b.answered(by, request) {
                    Some(t) => {
                        let mut accounts = vec![(t.to.clone(), b.balance(&t.to))];
                        if let Some(f) = &t.from {
                            accounts.insert(0, (f.clone(), b.balance(f)));
                        }
                        Response::Bank(BankAnswer {
                            accounts,
                            transactions: vec![t.clone()],
                        })
                    }
                    None => fail(FailureKind::Failed, "the transaction left the bank at once"),
                }
            }),
            Err(f) => Response::Error(f),
        };
        out.push(Effect::Reply(reply, r));
    }
}
