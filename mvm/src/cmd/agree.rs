//! `mvm offer`, `mvm accept`, `mvm agreements`: service level agreements (OpenCCS) — a job
//! planned in time and offered with a promised finish, accepted, and followed to its end.

use std::path::PathBuf;
use std::time::Duration;

use mvm_component::runtime::logs::now_ms;
use mvm_superpeer::client::{OfferAsk, read_profile};
use mvm_superpeer::proto::{AgreementInfo, AgreementState, JobId};

use crate::OutputArg;
use crate::cmd::job::{BrokerArg, connect, runtime, wire};
use crate::cmd::logs::rfc3339;
use crate::exit::Failure;

/// Arguments of `mvm offer`.
#[derive(Debug, clap::Args)]
pub(crate) struct OfferArgs {
    /// The job profile (TOML); its `estimate` gives the run time planned for (without one, the
    /// longest of its earlier runs here, with a quarter more).
    profile: PathBuf,
    /// It must be finished within this long from now (e.g. "10m"): no offer otherwise.
    #[arg(long, value_name = "DURATION")]
    deadline: Option<String>,
    /// It must not start before this long from now (e.g. "30s").
    #[arg(long, value_name = "DURATION")]
    start_after: Option<String>,
    /// How long the offer is held for acceptance (default 1m, at most 1h).
    #[arg(long, value_name = "DURATION")]
    valid: Option<String>,
    #[command(flatten)]
    broker: BrokerArg,
    #[command(flatten)]
    out: OutputArg,
}

/// Arguments of `mvm accept`.
#[derive(Debug, clap::Args)]
pub(crate) struct AcceptArgs {
    /// The offer's id (as `mvm offer` printed it).
    offer: JobId,
    /// Wait until the agreement is met or broken, and exit 1 unless it was met.
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    broker: BrokerArg,
    #[command(flatten)]
    out: OutputArg,
}

/// Arguments of `mvm agreements`.
#[derive(Debug, clap::Args)]
pub(crate) struct AgreementsArgs {
    /// Every user's offers and agreements (an administrator of the domain only).
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    broker: BrokerArg,
    #[command(flatten)]
    out: OutputArg,
}

/// A duration argument from now, as milliseconds since the Unix epoch.
fn from_now(flag: &str, v: Option<&str>) -> Result<Option<u64>, Failure> {
    let Some(v) = v else {
        return Ok(None);
    };
    let d = mvm_component::profile::parse_duration(v).ok_or_else(|| {
        crate::exit::input(format!(
            "--{flag} must be a duration from now (e.g. \"10m\", \"30s\"), not '{v}'"
        ))
    })?;
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Ok(Some(now_ms().saturating_add(ms)))
}

/// `ms` as people read a duration: `850ms`, `12.5s`, `3m 20s`, `2h 5m`.
fn span(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m {}s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{}h {}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// A time, and how far from now.
fn when(ms: u64, now: u64) -> String {
    if ms >= now {
        format!("{} (in {})", rfc3339(ms), span(ms - now))
    } else {
        format!("{} ({} ago)", rfc3339(ms), span(now - ms))
    }
}

/// An offer or agreement, several lines.
fn text(a: &AgreementInfo) -> String {
    let now = now_ms();
    let nodes: Vec<String> = a.nodes.iter().map(|(n, s)| format!("{n} ({s})")).collect();
    let mut lines = vec![
        format!(
            "{} {} ({}): {} of group {} (domain {})",
            match a.state {
                AgreementState::Offered => "offer",
                _ => "agreement",
            },
            a.id,
            a.state.name(),
            a.name,
            a.group,
            a.domain
        ),
        format!(
            "  resources  {} vertices on {}; image {}{}",
            a.vertices,
            nodes.join(", "),
            a.image,
            if a.image == "host" {
                String::new()
            } else if a.memory_mib == 0 {
                format!("; {} vCPU each", a.vcpus)
            } else {
                format!("; {} vCPU, {} MiB each", a.vcpus, a.memory_mib)
            }
        ),
        format!("  start      {}", when(a.start_ms, now)),
        format!(
            "  finish     {}   run time {} (from its {})",
            when(a.finish_ms, now),
            span(a.estimate_ms),
            a.estimate_from
        ),
    ];
    if let Some(d) = a.deadline_ms {
        lines.push(format!("  deadline   {}", when(d, now)));
    }
    if let Some(p) = a.price {
        lines.push(format!("  price      {p}"));
    }
    if a.state == AgreementState::Offered {
        lines.push(format!(
            "  expires    {}: accept it with  mvm accept {}",
            when(a.expires_ms, now),
            a.id
        ));
    }
    if let Some(r) = &a.reason {
        lines.push(format!("  reason     {r}"));
    }
    lines.join("\n")
}

/// `mvm offer PROFILE`.
pub(crate) fn offer(args: OfferArgs) -> Result<(), Failure> {
    let deadline = from_now("deadline", args.deadline.as_deref())?;
    let start_after = from_now("start-after", args.start_after.as_deref())?;
    let valid = args
        .valid
        .as_deref()
        .map(|v| {
            mvm_component::profile::parse_duration(v)
                .filter(|d| *d <= Duration::from_secs(3600))
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .ok_or_else(|| {
                    crate::exit::input(format!(
                        "--valid must be a duration of at most 1h (e.g. \"5m\"), not '{v}'"
                    ))
                })
        })
        .transpose()?;
    let job = read_profile(&args.profile).map_err(wire)?;
    runtime()?.block_on(async {
        let client = connect(&args.broker).await?;
        let offers = client
            .offer(
                &job,
                OfferAsk {
                    deadline_ms: deadline,
                    start_after_ms: start_after,
                    valid_ms: valid,
                },
            )
            .await
            .map_err(wire)?;
        crate::cmd::print(&offers, args.out.output, |v| {
            v.iter().map(text).collect::<Vec<_>>().join("\n\n")
        })
    })
}

/// `mvm accept OFFER`.
pub(crate) fn accept(args: AcceptArgs) -> Result<(), Failure> {
    runtime()?.block_on(async {
        let client = connect(&args.broker).await?;
        let mut a = client.accept(&args.offer).await.map_err(wire)?;
        // An offer of another group is followed at its super-peer.
        let client = client.at(&a.broker_addrs).map_err(wire)?;
        if args.wait {
            while !a.state.is_final() {
                let _ = client.wait(&a.id, 0, true).await;
                a = client
                    .agreements(false)
                    .await
                    .map_err(wire)?
                    .into_iter()
                    .find(|x| x.id == args.offer)
                    .ok_or_else(|| {
                        Failure::failed(anyhow::anyhow!("agreement {} is gone", args.offer))
                    })?;
                if !a.state.is_final() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        crate::cmd::print(&a, args.out.output, text)?;
        match a.state {
            AgreementState::Met | AgreementState::Accepted | AgreementState::Running => Ok(()),
            _ => Err(Failure::quiet(crate::exit::JOB_FAILED)),
        }
    })
}

/// `mvm agreements`.
pub(crate) fn agreements(args: AgreementsArgs) -> Result<(), Failure> {
    runtime()?.block_on(async {
        let client = connect(&args.broker).await?;
        let list = client.agreements(args.all).await.map_err(wire)?;
        crate::cmd::print(&list, args.out.output, |v| {
            if v.is_empty() {
                return "no offers or agreements".to_owned();
            }
            let mut out = vec![format!(
                "{:<28} {:<10} {:<28} {:<28} {:<24} REASON",
                "ID", "STATE", "START", "FINISH", "NODES"
            )];
            for a in v {
                let nodes: Vec<String> = a.nodes.iter().map(|(n, s)| format!("{n}:{s}")).collect();
                out.push(format!(
                    "{:<28} {:<10} {:<28} {:<28} {:<24} {}",
                    a.id.as_str(),
                    a.state.name(),
                    rfc3339(a.start_ms),
                    rfc3339(a.finish_ms),
                    nodes.join(","),
                    a.reason.as_deref().unwrap_or("-")
                ));
            }
            out.join("\n")
        })
    })
}
