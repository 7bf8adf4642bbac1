//! `mvm bid`: change a running job's bid for its nodes' CPU by hand; `mvm market hosts`:
//! the hosts ranked by price.

use mvm_superpeer::proto::{HostPrice, JobId, MICRO, format_credits, parse_credits};
use serde::Serialize;

use crate::OutputArg;
use crate::cmd::job::{BrokerArg, connect, runtime, wire};
use crate::exit::{Failure, input};

/// Arguments of `mvm bid`.
#[derive(Debug, clap::Args)]
pub(crate) struct BidArgs {
    /// The job (its profile must bid: `requirements.bid`).
    job: JobId,
    /// The new rate, credits per CPU-second its guests use (e.g. `2.5`); at most its owner's
    /// balance.
    #[arg(long)]
    rate: String,
    #[command(flatten)]
    broker: BrokerArg,
    #[command(flatten)]
    out: OutputArg,
}

/// `mvm bid JOB --rate R`.
pub(crate) fn bid(args: BidArgs) -> Result<(), Failure> {
    let rate = parse_credits(&args.rate).map_err(|e| input(format!("--rate: {e}")))?;
    runtime()?.block_on(async {
        let client = connect(&args.broker).await?;
        client.bid(&args.job, rate).await.map_err(wire)?;
        crate::cmd::print(
            &serde_json::json!({ "job": args.job, "rate": format_credits(rate) }),
            args.out.output,
            |_| {
                format!(
                    "{} bids {} credits a CPU-second",
                    args.job,
                    format_credits(rate)
                )
            },
        )
    })
}

/// Arguments of `mvm market`.
#[derive(Debug, clap::Args)]
pub(crate) struct MarketArgs {
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, clap::Subcommand)]
enum Which {
    /// The hosts of this group and of the groups it hears from, ranked by price: the top one
    /// gives the most CPU for the least bid (Tycoon's service location service).
    Hosts {
        #[command(flatten)]
        broker: BrokerArg,
        #[command(flatten)]
        out: OutputArg,
    },
}

/// A host as `mvm market hosts` lists it.
#[derive(Debug, Serialize)]
struct Host {
    group: String,
    name: String,
    cpus: u32,
    /// Credits per CPU-second.
    price: String,
    bidders: u32,
    free_slots: u32,
    /// The least bid it takes, credits per CPU-second.
    floor: String,
    /// The CPUs a bid of one credit a CPU-second would get there now: `cpus × 1 / (1 +
    /// price)`.
    cpus_per_credit: f64,
}

/// `mvm market …`.
pub(crate) fn market(args: MarketArgs) -> Result<(), Failure> {
    let Which::Hosts { broker, out } = args.which;
    runtime()?.block_on(async {
        let client = connect(&broker).await?;
        let g = client.group().await.map_err(wire)?;
        let mut hosts: Vec<Host> = g
            .nodes
            .iter()
            .filter(|n| !n.lost)
            .map(|n| {
                host(
                    &g.group,
                    &HostPrice {
                        name: n.name.clone(),
                        cpus: n.cpus,
                        price: n.price,
                        bidders: n.bidders,
                        free_slots: n.slots.saturating_sub(n.vertices),
                        floor: n.floor,
                    },
                )
            })
            .collect();
        for other in &g.groups {
            hosts.extend(other.hosts.iter().map(|h| host(&other.group, h)));
        }
        hosts.sort_by(|a, b| {
            b.cpus_per_credit
                .total_cmp(&a.cpus_per_credit)
                .then_with(|| (&a.group, &a.name).cmp(&(&b.group, &b.name)))
        });
        crate::cmd::print(&hosts, out.output, |hs: &Vec<Host>| {
            let mut s = format!(
                "{:<4} {:<16} {:<16} {:>5} {:>14} {:>14} {:>8} {:>6} {:>10}",
                "RANK", "GROUP", "HOST", "CPUS", "PRICE", "FLOOR", "BIDDERS", "FREE", "CPU/CREDIT"
            );
            for (i, h) in hs.iter().enumerate() {
                s.push_str(&format!(
                    "\n{:<4} {:<16} {:<16} {:>5} {:>14} {:>14} {:>8} {:>6} {:>10.3}",
                    i + 1,
                    h.group,
                    h.name,
                    h.cpus,
                    h.price,
                    h.floor,
                    h.bidders,
                    h.free_slots,
                    h.cpus_per_credit
                ));
            }
            s
        })
    })
}

fn host(group: &str, h: &HostPrice) -> Host {
    let price = h.price as f64 / MICRO as f64;
    Host {
        group: group.to_owned(),
        name: h.name.clone(),
        cpus: h.cpus,
        price: if h.price == 0 {
            "0".into()
        } else {
            format_credits(h.price)
        },
        bidders: h.bidders,
        free_slots: h.free_slots,
        floor: if h.floor == 0 {
            "0".into()
        } else {
            format_credits(h.floor)
        },
        cpus_per_credit: f64::from(h.cpus) / (1.0 + price),
    }
}
