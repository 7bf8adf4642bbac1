//! `mvm bank`: the bank of the domain's market — balances, history, mints (administrators)
//! and transfers, kept in the group's replicated job log.

use clap::Subcommand;
use mvm_superpeer::proto::{
    BankAnswer, BankRequest, Transaction, TxKind, format_credits, parse_account, parse_credits,
};

use crate::OutputArg;
use crate::cmd::job::{BrokerArg, connect, runtime, wire};
use crate::cmd::logs::rfc3339;
use crate::exit::{Failure, input};

/// Arguments of `mvm bank`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    which: Which,
}

/// Where the bank is, and how to print its answer (on every subcommand).
#[derive(Debug, clap::Args)]
struct Common {
    #[command(flatten)]
    broker: BrokerArg,
    #[command(flatten)]
    out: OutputArg,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// An account's balance (yours by default; another's, or `--all`, for an administrator).
    Balance {
        /// The account: `NAME@DOMAIN` (a user), `user:NAME@DOMAIN` or `node:NAME@DOMAIN`.
        account: Option<String>,
        /// Every account.
        #[arg(long, conflicts_with = "account")]
        all: bool,
        #[command(flatten)]
        common: Common,
    },
    /// An account's newest transactions (yours by default).
    History {
        /// The account.
        account: Option<String>,
        /// At most so many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        common: Common,
    },
    /// Create credits in an account (an administrator of the domain).
    Mint {
        /// The account credited.
        account: String,
        /// Credits (e.g. 500, 12.5; up to six decimals).
        amount: String,
        /// This request's id: sent again with the same id, it is applied once (default: a
        /// new one).
        #[arg(long)]
        request_id: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Move credits from your account to another.
    Transfer {
        /// The account credited.
        to: String,
        /// Credits.
        amount: String,
        /// A note kept with it.
        #[arg(long, default_value = "")]
        memo: String,
        /// This request's id (default: a new one).
        #[arg(long)]
        request_id: Option<String>,
        #[command(flatten)]
        common: Common,
    },
}

/// A new request id: this process and the time, in hex.
fn request_id(given: Option<String>) -> String {
    given.unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("r-{:x}-{nanos:x}", std::process::id())
    })
}

fn account(a: &str) -> Result<String, Failure> {
    parse_account(a).map_err(input)
}

fn tx_line(t: &Transaction) -> String {
    let what = match t.kind {
        TxKind::Mint => format!("mint      {:>16} -> {}", format_credits(t.amount), t.to),
        TxKind::Transfer => format!(
            "transfer  {:>16} {} -> {}",
            format_credits(t.amount),
            t.from.as_deref().unwrap_or("?"),
            t.to
        ),
        TxKind::Charge => format!(
            "charge    {:>16} {} -> {}",
            format_credits(t.amount),
            t.from.as_deref().unwrap_or("?"),
            t.to
        ),
    };
    let memo = match &t.usage {
        Some(u) => format!(
            "  (job {}: {:.3} CPU-s at {}/CPU-s)",
            u.job,
            u.cpu_us as f64 / 1e6,
            format_credits(u.rate)
        ),
        None if t.memo.is_empty() => String::new(),
        None => format!("  ({})", t.memo),
    };
    format!(
        "#{:<6} {}  {what}  by {}{memo}",
        t.seq,
        rfc3339(t.at_ms),
        t.by
    )
}

fn text(a: &BankAnswer) -> String {
    let mut lines: Vec<String> = a.transactions.iter().map(tx_line).collect();
    lines.extend(
        a.accounts
            .iter()
            .map(|(k, v)| format!("{k}  {}", format_credits(*v))),
    );
    if lines.is_empty() {
        return "no accounts hold credits".into();
    }
    lines.join("\n")
}

/// `mvm bank …`.
pub(crate) fn run(args: Args) -> Result<(), Failure> {
    let (request, common) = match args.which {
        Which::Balance {
            account: a,
            all,
            common,
        } => (
            BankRequest::Balance {
                account: a.as_deref().map(account).transpose()?,
                all,
            },
            common,
        ),
        Which::History {
            account: a,
            limit,
            common,
        } => (
            BankRequest::History {
                account: a.as_deref().map(account).transpose()?,
                limit,
            },
            common,
        ),
        Which::Mint {
            account: a,
            amount,
            request_id: r,
            common,
        } => (
            BankRequest::Mint {
                to: account(&a)?,
                amount: parse_credits(&amount).map_err(input)?,
                request: request_id(r),
            },
            common,
        ),
        Which::Transfer {
            to,
            amount,
            memo,
            request_id: r,
            common,
        } => (
            BankRequest::Transfer {
                from: None,
                to: account(&to)?,
                amount: parse_credits(&amount).map_err(input)?,
                request: request_id(r),
                memo,
            },
            common,
        ),
    };
    runtime()?.block_on(async {
        let client = connect(&common.broker).await?;
        let answer = client.bank(request).await.map_err(wire)?;
        crate::cmd::print(&answer, common.out.output, text)
    })
}
