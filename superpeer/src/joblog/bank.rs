//! The bank in the control state: balances, the transactions applied (the newest kept), and
//! the request ids they answered, so that a request sent again — a client's retry, a new
//! leader's — is not applied twice. Balances never go below zero, and credits only move,
//! except by a mint.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::proto::{ChargeBatch, Transaction, TxKind, Usage};

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
    /// A node's charges for the CPU time bidding jobs used on it (already checked against
    /// the jobs it runs): each line moves what it owes, or all the payer holds if less, from
    /// the payer to the node's provider. Batches the bank has taken are skipped.
    Charge {
        /// The provider's account (the node's).
        provider: String,
        /// The node's batches, in order.
        batches: Vec<ChargeBatch>,
        /// When (the leader's clock).
        at_ms: u64,
    },
}

impl BankCommand {
    /// Who asked, and their request id (none for a node's charges, which go by batch).
    pub fn request(&self) -> Option<(&str, &str)> {
        match self {
            BankCommand::Mint { by, request, .. } | BankCommand::Transfer { by, request, .. } => {
                Some((by, request))
            }
            BankCommand::Charge { .. } => None,
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
    /// Per provider: the last charge batch taken, `(boot, seq)`.
    #[serde(default)]
    charged: BTreeMap<String, (u64, u64)>,
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

    /// The last charge batch of `provider` taken, `(boot, seq)`.
    pub fn charged(&self, provider: &str) -> Option<(u64, u64)> {
        self.charged.get(provider).copied()
    }

    /// Applies `c`: a request id applied before changes nothing (and is not an error).
    pub(super) fn apply(&mut self, c: BankCommand) -> Result<(), BankError> {
        if let Some((by, request)) = c.request()
            && self.seen.contains_key(&(by.to_owned(), request.to_owned()))
        {
            return Ok(());
        }
        let t = match c {
            BankCommand::Charge {
                provider,
                batches,
                at_ms,
            } => {
                self.charge(&provider, batches, at_ms, &mut BTreeMap::new());
                return Ok(());
            }
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
                    usage: None,
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
                    usage: None,
                }
            }
        };
        self.seen.insert((t.by.clone(), t.request.clone()), t.seq);
        self.keep(t);
        Ok(())
    }

    /// Takes the batches of `provider` after the last one taken: each line moves what it owes
    /// from its payer to the provider, but never more than the payer holds, nor, for a job in
    /// `caps`, more than is left there (what is moved is taken off). What each job was
    /// charged.
    pub(super) fn charge(
        &mut self,
        provider: &str,
        batches: Vec<ChargeBatch>,
        at_ms: u64,
        caps: &mut BTreeMap<crate::proto::JobId, u64>,
    ) -> Vec<(crate::proto::JobId, u64)> {
        let mut charged = Vec::new();
        for b in batches {
            if self
                .charged
                .get(provider)
                .is_some_and(|&last| (b.boot, b.seq) <= last)
            {
                continue;
            }
            self.charged.insert(provider.to_owned(), (b.boot, b.seq));
            for (i, l) in b.lines.into_iter().enumerate() {
                let held = self.balance(&l.payer);
                let cap = caps.get(&l.job).copied().unwrap_or(u64::MAX);
                let amount = l.micro.min(held).min(cap);
                if amount == 0 || l.payer == provider {
                    continue;
                }
                if let Some(c) = caps.get_mut(&l.job) {
                    *c -= amount;
                }
                charged.push((l.job.clone(), amount));
                let Some(credited) = self.balance(provider).checked_add(amount) else {
                    continue;
                };
                if held == amount {
                    self.balances.remove(&l.payer);
                } else {
                    self.balances.insert(l.payer.clone(), held - amount);
                }
                self.balances.insert(provider.to_owned(), credited);
                let t = Transaction {
                    seq: self.last + 1,
                    at_ms,
                    kind: TxKind::Charge,
                    from: Some(l.payer),
                    to: provider.to_owned(),
                    amount,
                    by: provider.to_owned(),
                    request: format!("charge-{}-{}-{i}", b.boot, b.seq),
                    memo: String::new(),
                    usage: Some(Usage {
                        job: l.job,
                        cpu_us: l.cpu_us,
                        rate: l.rate,
                        owed: l.micro,
                    }),
                };
                self.keep(t);
            }
        }
        charged
    }

    /// Keeps transaction `t` as the newest (the oldest beyond [`KEEP_TRANSACTIONS`] go, with
    /// the request ids they answered).
    fn keep(&mut self, t: Transaction) {
        self.last = t.seq;
        self.history.push_back(t);
        while self.history.len() > KEEP_TRANSACTIONS {
            if let Some(old) = self.history.pop_front()
                && old.kind != TxKind::Charge
            {
                self.seen.remove(&(old.by, old.request));
            }
        }
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

    fn charges(provider: &str, boot: u64, seq: u64, owed: &[(&str, u64)]) -> BankCommand {
        BankCommand::Charge {
            provider: provider.into(),
            batches: vec![ChargeBatch {
                boot,
                seq,
                lines: owed
                    .iter()
                    .map(|(payer, micro)| crate::proto::ChargeLine {
                        job: "j-1-1".parse().expect("a job id"),
                        payer: (*payer).into(),
                        rate: 2,
                        cpu_us: micro * 500_000,
                        micro: *micro,
                    })
                    .collect(),
            }],
            at_ms: 5,
        }
    }

    #[test]
    fn a_node_s_charges_move_credits_once_and_never_more_than_the_payer_holds() {
        let mut b = Bank::default();
        b.apply(mint("user:a@d", 10, "m1")).expect("mint");
        b.apply(mint("user:b@d", 10, "m2")).expect("mint");
        let n = "node:n1@d";
        b.apply(charges(n, 1, 1, &[("user:a@d", 3), ("user:b@d", 4)]))
            .expect("charge");
        assert_eq!((b.balance("user:a@d"), b.balance("user:b@d")), (7, 6));
        assert_eq!(b.balance(n), 7);
        // The same batch again (a heartbeat resent before its answer): taken once.
        b.apply(charges(n, 1, 1, &[("user:a@d", 3)]))
            .expect("again");
        assert_eq!(b.balance("user:a@d"), 7);
        // More than the payer holds: all it holds, the use and what it owed kept.
        b.apply(charges(n, 1, 2, &[("user:a@d", 9)]))
            .expect("short");
        assert_eq!((b.balance("user:a@d"), b.balance(n)), (0, 14));
        let t = b.history(Some("user:a@d")).next().expect("the charge");
        assert_eq!(t.kind, TxKind::Charge);
        assert_eq!(t.amount, 7);
        assert_eq!(
            t.usage.as_ref().map(|u| (u.owed, u.cpu_us)),
            Some((9, 4_500_000))
        );
        // Nothing left: nothing moves, no transaction.
        let before = b.history(None).count();
        b.apply(charges(n, 1, 3, &[("user:a@d", 5)]))
            .expect("broke");
        assert_eq!(b.history(None).count(), before);
        // An older boot's batch after a newer one is not taken.
        b.apply(charges(n, 2, 1, &[("user:b@d", 1)]))
            .expect("new boot");
        b.apply(charges(n, 1, 9, &[("user:b@d", 1)]))
            .expect("old boot");
        assert_eq!(b.balance("user:b@d"), 5);
        assert_eq!(b.charged(n), Some((2, 1)));
        assert_eq!(b.total(), 20, "charges only move credits");
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
