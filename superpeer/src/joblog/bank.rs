//! The bank in the control state: balances, the transactions applied (the newest kept), and
//! the request ids they answered, so that a request sent again — a client's retry, a new
//! leader's — is not applied twice. Balances never go below zero, and credits only move,
//! except by a mint.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::proto::{Transaction, TxKind};

/// How many transactions the bank keeps (and remembers the request ids of), the newest.
pub const KEEP_TRANSACTIONS: usize = 100_000;

/// A change to the bank: one entry of the job log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BankCommand {
    /// Creates `amount` in `to` (an administrator's, already authorized).
    Mint {
        /// The account credited.
        to: String,
        /// Micro-credits.
        amount: u64,
        /// Who asked.
        by: String,
        /// Their request id.
        request: String,
        /// When (the leader's clock).
        at_ms: u64,
    },
    /// Moves `amount` from `from` to `to` (already authorized).
    Transfer {
        /// The account debited.
        from: String,
        /// The account credited.
        to: String,
        /// Micro-credits.
        amount: u64,
        /// Who asked.
        by: String,
        /// Their request id.
        request: String,
        /// A note.
        memo: String,
        /// When (the leader's clock).
        at_ms: u64,
    },
}

impl BankCommand {
    /// Who asked, and their request id.
    pub fn request(&self) -> (&str, &str) {
        match self {
            BankCommand::Mint { by, request, .. } | BankCommand::Transfer { by, request, .. } => {
                (by, request)
            }
        }
    }
}

/// Why the bank refuses a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum BankError {
    /// The account debited holds less than the amount.
    #[error("account {account} holds {balance} micro-credits, less than the {amount} asked")]
    Insufficient {
        /// The account.
        account: String,
        /// What it holds.
        balance: u64,
        /// What was asked.
        amount: u64,
    },
    /// A zero amount, or one from an account to itself.
    #[error("{0}")]
    Invalid(String),
    /// A balance would pass what a u64 of micro-credits holds.
    #[error("account {0} would hold more credits than the bank counts")]
    Overflow(String),
}

/// The bank's state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Bank {
    balances: BTreeMap<String, u64>,
    /// The newest transactions, oldest first.
    history: VecDeque<Transaction>,
    /// The transaction (by number) each kept request id of each asker gave.
    seen: BTreeMap<(String, String), u64>,
    /// The last transaction's number.
    last: u64,
}

impl Bank {
    /// The balance of `account` (0 when it has none).
    pub fn balance(&self, account: &str) -> u64 {
        self.balances.get(account).copied().unwrap_or(0)
    }

    /// Every account with a balance, by name.
    pub fn balances(&self) -> impl Iterator<Item = (&String, &u64)> {
        self.balances.iter()
    }

    /// The sum of every balance.
    pub fn total(&self) -> u128 {
        self.balances.values().map(|b| u128::from(*b)).sum()
    }

    /// The newest transactions touching `account` (every one when none), newest first.
    pub fn history<'a>(
        &'a self,
        account: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Transaction> + 'a {
        self.history
            .iter()
            .rev()
            .filter(move |t| account.is_none_or(|a| t.to == a || t.from.as_deref() == Some(a)))
    }

    /// The transaction that request `request` of `by` gave, if it is kept.
    pub fn answered(&self, by: &str, request: &str) -> Option<&Transaction> {
        let seq = *self.seen.get(&(by.to_owned(), request.to_owned()))?;
        let first = self.history.front()?.seq;
        self.history
            .get(usize::try_from(seq.checked_sub(first)?).ok()?)
    }

    /// Applies `c`: a request id applied before changes nothing (and is not an error).
    pub(super) fn apply(&mut self, c: BankCommand) -> Result<(), BankError> {
        let (by, request) = c.request();
        if self.seen.contains_key(&(by.to_owned(), request.to_owned())) {
            return Ok(());
        }
        let t = match c {
            BankCommand::Mint {
                to,
                amount,
                by,
                request,
                at_ms,
            } => {
                if amount == 0 {
                    return Err(BankError::Invalid("a mint of nothing".into()));
                }
                let now = self.balance(&to);
                let after = now
                    .checked_add(amount)
                    .ok_or_else(|| BankError::Overflow(to.clone()))?;
                self.balances.insert(to.clone(), after);
                Transaction {
                    seq: self.last + 1,
                    at_ms,
                    kind: TxKind::Mint,
                    from: None,
                    to,
                    amount,
                    by,
                    request,
                    memo: String::new(),
                }
            }
            BankCommand::Transfer {
                from,
                to,
                amount,
                by,
                request,
                memo,
                at_ms,
            } => {
                if amount == 0 {
                    return Err(BankError::Invalid("a transfer of nothing".into()));
                }
                if from == to {
                    return Err(BankError::Invalid(format!(
                        "a transfer from {from} to itself"
                    )));
                }
                let balance = self.balance(&from);
                if balance < amount {
                    return Err(BankError::Insufficient {
                        account: from,
                        balance,
                        amount,
                    });
                }
                let credited = self
                    .balance(&to)
                    .checked_add(amount)
                    .ok_or_else(|| BankError::Overflow(to.clone()))?;
                if balance == amount {
                    self.balances.remove(&from);
                } else {
                    self.balances.insert(from.clone(), balance - amount);
                }
                self.balances.insert(to.clone(), credited);
                Transaction {
                    seq: self.last + 1,
                    at_ms,
                    kind: TxKind::Transfer,
                    from: Some(from),
                    to,
                    amount,
                    by,
                    request,
                    memo,
                }
            }
        };
        self.last = t.seq;
        self.seen.insert((t.by.clone(), t.request.clone()), t.seq);
        self.history.push_back(t);
        while self.history.len() > KEEP_TRANSACTIONS {
            if let Some(old) = self.history.pop_front() {
                self.seen.remove(&(old.by, old.request));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mint(to: &str, amount: u64, request: &str) -> BankCommand {
        BankCommand::Mint {
            to: to.into(),
            amount,
            by: "user:root@d".into(),
            request: request.into(),
            at_ms: 1,
        }
    }

    fn transfer(from: &str, to: &str, amount: u64, request: &str) -> BankCommand {
        BankCommand::Transfer {
            from: from.into(),
            to: to.into(),
            amount,
            by: from.into(),
            request: request.into(),
            memo: String::new(),
            at_ms: 2,
        }
    }

    #[test]
    fn credits_move_without_going_below_zero_and_their_sum_holds() {
        let mut b = Bank::default();
        b.apply(mint("user:a@d", 100, "m1")).expect("mint");
        b.apply(transfer("user:a@d", "user:b@d", 30, "t1"))
            .expect("transfer");
        assert_eq!((b.balance("user:a@d"), b.balance("user:b@d")), (70, 30));
        assert_eq!(b.total(), 100, "a transfer creates nothing");
        let e = b.apply(transfer("user:a@d", "user:b@d", 71, "t2"));
        assert!(
            matches!(e, Err(BankError::Insufficient { balance: 70, .. })),
            "{e:?}"
        );
        assert!(b.apply(transfer("user:a@d", "user:a@d", 1, "t3")).is_err());
        assert!(b.apply(transfer("user:a@d", "user:b@d", 0, "t4")).is_err());
        assert_eq!((b.balance("user:a@d"), b.balance("user:b@d")), (70, 30));
        b.apply(transfer("user:a@d", "user:b@d", 70, "t5"))
            .expect("all of it");
        assert_eq!(b.balances().count(), 1, "an emptied account holds nothing");
        assert_eq!(b.history(Some("user:a@d")).count(), 3);
    }

    #[test]
    fn a_request_sent_again_is_applied_once() {
        let mut b = Bank::default();
        b.apply(mint("user:a@d", 100, "m1")).expect("mint");
        b.apply(mint("user:a@d", 100, "m1"))
            .expect("again: no error");
        b.apply(transfer("user:a@d", "user:b@d", 10, "t1"))
            .expect("transfer");
        b.apply(transfer("user:a@d", "user:b@d", 10, "t1"))
            .expect("again");
        assert_eq!((b.balance("user:a@d"), b.balance("user:b@d")), (90, 10));
        let t = b.answered("user:a@d", "t1").expect("kept");
        assert_eq!((t.seq, t.amount), (2, 10));
        // The same id from another asker is another request.
        b.apply(BankCommand::Transfer {
            from: "user:b@d".into(),
            to: "user:a@d".into(),
            amount: 5,
            by: "user:b@d".into(),
            request: "t1".into(),
            memo: String::new(),
            at_ms: 3,
        })
        .expect("b's t1");
        assert_eq!(b.balance("user:b@d"), 5);
    }
}
