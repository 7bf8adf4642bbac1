//! The bank's requests at the broker: reads from the job log's state, mints and transfers
//! as entries of it (through the broker's loop, like every change).

use mvm_component::policy::Principal;

use super::core::{Core, Effect, Reply, Then};
use super::{Broker, fail, now_ms};
use crate::joblog::Command;
use crate::joblog::bank::BankCommand;
use crate::proto::{
    BankAnswer, BankRequest, Failure, FailureKind, MAX_AMOUNT, MAX_REQUEST_ID, Response,
    account_of, parse_account,
};

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
    /// Proposes a mint or transfer; the asker is answered with the transaction once it is
    /// applied (or with the earlier one its request id gave).
    pub(super) fn bank(&mut self, out: &mut Vec<Effect>, reply: Reply, command: BankCommand) {
        let (by, request) = command.request();
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
