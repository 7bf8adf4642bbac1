//! The bank of a domain's market (Tycoon, `000_*` section 3): accounts of users and of
//! providers (nodes), credits minted by an administrator, transfers, and their history.
//!
//! Amounts are whole micro-credits ([`MICRO`] to a credit), so that sums are exact.

use serde::{Deserialize, Serialize};

/// Micro-credits to a credit.
pub const MICRO: u64 = 1_000_000;

/// The most credits one mint or transfer moves.
pub const MAX_AMOUNT: u64 = 1_000_000_000_000 * MICRO;

/// The longest request id a client may give.
pub const MAX_REQUEST_ID: usize = 64;

/// What a client asks the bank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BankRequest {
    /// The balance of an account (the asker's own when none; another's for an administrator),
    /// or of every account (`all`, an administrator).
    Balance {
        /// The account.
        #[serde(default)]
        account: Option<String>,
        /// Every account.
        #[serde(default)]
        all: bool,
    },
    /// The newest transactions of an account (the asker's own when none).
    History {
        /// The account.
        #[serde(default)]
        account: Option<String>,
        /// At most so many.
        limit: u32,
    },
    /// An administrator creates credits in an account.
    Mint {
        /// The account credited.
        to: String,
        /// Micro-credits.
        amount: u64,
        /// The client's id of this request: the same id again is not applied twice.
        request: String,
    },
    /// Moves credits from the asker's account.
    Transfer {
        /// The account debited: the asker's (refused if another's).
        #[serde(default)]
        from: Option<String>,
        /// The account credited.
        to: String,
        /// Micro-credits.
        amount: u64,
        /// The client's id of this request: the same id again is not applied twice.
        request: String,
        /// A note kept with it.
        #[serde(default)]
        memo: String,
    },
}

/// What kind of transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TxKind {
    /// Credits created.
    Mint,
    /// Credits moved.
    Transfer,
    /// A node's charge for CPU time a bidding job used there (from the job's owner to the
    /// node's provider).
    Charge,
}

/// One applied transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transaction {
    /// Its number in the bank (from 1).
    pub seq: u64,
    /// When, milliseconds since the Unix epoch (the leader's clock).
    pub at_ms: u64,
    /// Mint or transfer.
    pub kind: TxKind,
    /// The account debited (none for a mint).
    pub from: Option<String>,
    /// The account credited.
    pub to: String,
    /// Micro-credits.
    pub amount: u64,
    /// Who asked (`name@domain`).
    pub by: String,
    /// The asker's request id.
    pub request: String,
    /// The note given with it.
    pub memo: String,
    /// For a charge: the use it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// The CPU time a charge is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// The job.
    pub job: super::JobId,
    /// CPU microseconds its guest used on the node.
    pub cpu_us: u64,
    /// Its bid rate then, micro-credits per CPU-second.
    pub rate: u64,
    /// What that use cost at that rate, micro-credits: the amount moved, unless the payer
    /// held less (then all it held).
    pub owed: u64,
}

/// What the bidding guests of a node used over one heartbeat (or several, merged while the
/// leader had not yet taken them): sent with every heartbeat until the leader says it is in
/// the bank. `(boot, seq)` orders a node's batches; the bank takes each once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeBatch {
    /// When the node's process started (milliseconds since the Unix epoch): a restarted
    /// node's batches come after its earlier ones.
    pub boot: u64,
    /// The batch's number since then.
    pub seq: u64,
    /// What each job's guests used.
    pub lines: Vec<ChargeLine>,
}

/// What one job's guest used on a node, and what that costs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeLine {
    /// The job.
    pub job: super::JobId,
    /// The account that pays (the job's owner's).
    pub payer: String,
    /// The bid rate charged, micro-credits per CPU-second.
    pub rate: u64,
    /// CPU microseconds used.
    pub cpu_us: u64,
    /// Micro-credits owed (the fraction of a micro-credit is carried to the next).
    pub micro: u64,
}

/// The most charge batches a heartbeat carries (older ones are merged).
pub const MAX_CHARGE_BATCHES: usize = 16;

/// The most lines a charge batch has.
pub const MAX_CHARGE_LINES: usize = 4096;

/// The bank's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BankAnswer {
    /// Accounts and their balances in micro-credits, by name.
    pub accounts: Vec<(String, u64)>,
    /// Transactions, newest first (a mint or transfer: the one applied, also when its
    /// request id had been applied before).
    pub transactions: Vec<Transaction>,
}

/// An account's name for a principal: `user:NAME@DOMAIN`, or `node:NAME@DOMAIN` (a provider).
pub fn account_of(p: &mvm_component::policy::Principal) -> String {
    let kind = match p.kind {
        mvm_component::policy::PrincipalKind::User => "user",
        mvm_component::policy::PrincipalKind::Node => "node",
    };
    format!("{kind}:{}@{}", p.name, p.domain)
}

/// Why an account name or an amount is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BankInputError {
    /// Not `user:NAME@DOMAIN` or `node:NAME@DOMAIN` (or `NAME@DOMAIN`, a user).
    #[error(
        "'{0}' is not an account: write user:NAME@DOMAIN, node:NAME@DOMAIN, or NAME@DOMAIN (a user)"
    )]
    Account(String),
    /// Not a positive amount of credits with at most six decimals.
    #[error(
        "'{0}' is not an amount: write a positive number of credits with at most six decimals, at most 10^12 (e.g. 12.5)"
    )]
    Amount(String),
}

/// `s` as an account name: `user:` is implied when no kind is written.
///
/// # Errors
/// A name that is not `[user:|node:]NAME@DOMAIN` of names' characters.
pub fn parse_account(s: &str) -> Result<String, BankInputError> {
    let bad = || BankInputError::Account(s.chars().take(80).collect());
    let (kind, rest) = match s.split_once(':') {
        Some((k @ ("user" | "node"), rest)) => (k, rest),
        Some(_) => return Err(bad()),
        None => ("user", s),
    };
    let (name, domain) = rest.split_once('@').ok_or_else(bad)?;
    let ok = |p: &str| {
        (1..=64).contains(&p.len())
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    if ok(name) && ok(domain) {
        Ok(format!("{kind}:{name}@{domain}"))
    } else {
        Err(bad())
    }
}

/// `s` (credits, e.g. `12.5`) as micro-credits.
///
/// # Errors
/// Not a positive decimal number with at most six decimals and at most [`MAX_AMOUNT`].
pub fn parse_credits(s: &str) -> Result<u64, BankInputError> {
    let bad = || BankInputError::Amount(s.chars().take(80).collect());
    let t = s.trim();
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && frac.is_empty() || !digits(whole) || !digits(frac) || frac.len() > 6 {
        return Err(bad());
    }
    let w: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let f: u64 = format!("{frac:0<6}").parse().map_err(|_| bad())?;
    let micro = w
        .checked_mul(MICRO)
        .and_then(|m| m.checked_add(f))
        .ok_or_else(bad)?;
    if micro == 0 || micro > MAX_AMOUNT {
        return Err(bad());
    }
    Ok(micro)
}

/// Micro-credits as credits, with the decimals needed (`12.5`, `3`, `0.000001`).
pub fn format_credits(micro: u64) -> String {
    let (w, f) = (micro / MICRO, micro % MICRO);
    if f == 0 {
        return w.to_string();
    }
    let f = format!("{f:06}");
    format!("{w}.{}", f.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credits_are_parsed_exactly_and_bad_amounts_refused() {
        assert_eq!(parse_credits("12.5"), Ok(12_500_000));
        assert_eq!(parse_credits("0.000001"), Ok(1));
        assert_eq!(parse_credits("3"), Ok(3 * MICRO));
        assert_eq!(format_credits(12_500_000), "12.5");
        assert_eq!(format_credits(1), "0.000001");
        for bad in [
            "",
            "0",
            "-1",
            "NaN",
            "inf",
            "1e3",
            "1.0000001",
            "1.2.3",
            "99999999999999999999",
        ] {
            assert!(parse_credits(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn accounts_are_named_by_kind_name_and_domain() {
        assert_eq!(
            parse_account("alice@physics").as_deref(),
            Ok("user:alice@physics")
        );
        assert_eq!(
            parse_account("node:n1@physics").as_deref(),
            Ok("node:n1@physics")
        );
        for bad in ["alice", "bank:x@y", "a b@c", "@physics", "x@"] {
            assert!(parse_account(bad).is_err(), "{bad}");
        }
    }
}
