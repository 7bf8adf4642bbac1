//! `mvm bench`: benchmarks, each beside its reference measured in the same run.

use clap::Subcommand;

use crate::exit::Failure;
use crate::{Output, OutputArg};

/// Arguments of `mvm bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// Queue throughput (FIFO, priority) beside a crossbeam channel, and a remote endpoint over
    /// loopback TCP beside raw TCP.
    Queue {
        /// Items per 1-producer-1-consumer run.
        #[arg(long, default_value_t = 2_000_000)]
        items: u64,
        /// Queue and channel capacity.
        #[arg(long, default_value_t = 1024)]
        capacity: usize,
        /// MiB moved per TCP run.
        #[arg(long, default_value_t = 512)]
        tcp_mib: u64,
        /// Runs of each measurement (the best is reported).
        #[arg(long, default_value_t = 3)]
        runs: u32,
        #[command(flatten)]
        out: OutputArg,
    },
}

pub(crate) fn run(args: Args) -> Result<(), Failure> {
    match args.which {
        Which::Queue {
            items,
            capacity,
            tcp_mib,
            runs,
            out,
        } => {
            if items == 0 || capacity == 0 || tcp_mib == 0 {
                return Err(Failure::input(anyhow::anyhow!(
                    "bench queue: --items, --capacity and --tcp-mib must be at least 1"
                )));
            }
            let params = mvm_queue::bench::Params {
                items,
                capacity,
                tcp_bytes: tcp_mib << 20,
                tcp_item: 64 << 10,
                runs,
            };
            let report = mvm_queue::bench::run(params)
                .map_err(|e| Failure::failed(anyhow::anyhow!("bench queue: {e}")))?;
            print(&report, out.output, |r| {
                format!(
                    "queue throughput, 1 producer 1 consumer, {} B items, capacity {}\n  \
                     fifo       {:>14.0} items/s\n  priority   {:>14.0} items/s\n  \
                     crossbeam  {:>14.0} items/s   (fifo/crossbeam = {:.2}, goal >= 0.5)\n\
                     loopback TCP, {} KiB items\n  remote     {:>10.0} MB/s\n  raw tcp    {:>10.0} MB/s   \
                     (remote/raw = {:.2} best, {:.2} median of back-to-back pairs; goal >= 0.7)",
                    r.item_bytes,
                    r.capacity,
                    r.fifo_items_per_sec,
                    r.priority_items_per_sec,
                    r.crossbeam_items_per_sec,
                    r.fifo_vs_crossbeam,
                    r.tcp_item_bytes / 1024,
                    r.remote_mb_per_sec,
                    r.raw_tcp_mb_per_sec,
                    r.remote_vs_raw_tcp,
                    r.remote_vs_raw_tcp_median,
                )
            })
        }
    }
}

/// Prints a report as JSON or as text.
pub(crate) fn print<T: serde::Serialize>(
    value: &T,
    output: Output,
    text: impl Fn(&T) -> String,
) -> Result<(), Failure> {
    match output {
        Output::Json => {
            let s = serde_json::to_string_pretty(value).map_err(Failure::failed)?;
            println!("{s}");
        }
        Output::Text => println!("{}", text(value)),
    }
    Ok(())
}
