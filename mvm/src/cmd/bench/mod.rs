//! `mvm bench`: benchmarks, each beside its reference measured in the same run.

mod broker;
mod chaos;
mod checkpoint;
mod compare;
mod hostile;
mod labjob;
mod market;
mod mpi;
mod pn;
mod recovery;
mod scale;
mod shares;
mod staging;

use clap::Subcommand;
use mvm_component::bench as jobs;
use mvm_component::runtime::{Runtime, RuntimeConfig};
use serde::Serialize;

use crate::OutputArg;
use crate::exit::Failure;

/// Arguments of `mvm bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// An earlier run's JSON (`-o json`, or `scripts/bench-all`'s document): each figure is
    /// printed beside it, with a mark where it got worse by more than 10 %.
    #[arg(long, global = true, value_name = "FILE")]
    compare: Option<std::path::PathBuf>,
    #[command(subcommand)]
    which: Which,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// One policy decision: its latency from oso and from the per-version cache, and
    /// decisions per second, over every role, action and resource of a policy directory.
    Policy {
        /// The policy directory.
        #[arg(long, default_value = "policies", value_name = "DIR")]
        policies: std::path::PathBuf,
        /// Passes over the questions through oso (50 times as many through the cache).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        rounds: u64,
        #[command(flatten)]
        out: OutputArg,
    },
    /// One-way latency between two WebAssembly vertices on this node for 8 B, 1 KiB, 64 KiB and
    /// 1 MiB, beside MPICH over shared memory (when installed).
    Pingpong {
        /// Scale the round trips per size (1 = 20000, 10000, 2000, 200).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Time per hop of a 16-vertex token ring on this node beside MPICH's 16-rank ring, and the
    /// instantiation cost per vertex beside bare wasmtime.
    Ring {
        /// Vertices (and MPI ranks).
        #[arg(long, default_value_t = 16)]
        vertices: usize,
        /// Hops of the WebAssembly ring.
        #[arg(long, default_value_t = 200_000)]
        hops: u64,
        /// Laps of the MPI ring (16 busy-polling ranks on 2 cores take about 16 ms a hop).
        #[arg(long, default_value_t = 10)]
        mpi_laps: u32,
        #[command(flatten)]
        out: OutputArg,
    },
    /// The overlay on a local lab (3 super-peers and 4 node processes): trivial jobs per
    /// second, a 16-vertex ring from submission to completion beside `mpiexec -n 16`,
    /// cross-node latency and throughput beside MPICH over TCP and raw TCP, and the time from
    /// killing the leading super-peer to the next job accepted.
    Broker {
        /// Super-peers (replicas of the job log); with one, no failover is measured.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=7))]
        superpeers: u32,
        /// Seconds of trivial-job submissions.
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        /// Concurrent submitting clients.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
        clients: u64,
        /// The libp2p transport between the daemons.
        #[arg(long, value_enum, default_value_t = crate::cmd::lab::Transport::Tcp)]
        transport: crate::cmd::lab::Transport,
        #[command(flatten)]
        out: OutputArg,
    },
    /// A job's input files from the submitter to its vertex's sandbox on a local lab (sent to
    /// the leading super-peer, fetched by the node, laid out), beside raw TCP on loopback.
    Staging {
        /// MiB of input files per run.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=16384))]
        mib: u32,
        /// Input files per run.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
        files: u32,
        /// Runs (the median is reported).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
        runs: u32,
        /// Super-peers (the leader passes every file on to the others).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=7))]
        superpeers: u32,
        #[command(flatten)]
        out: OutputArg,
    },
    /// One group of many nodes in this process (on one tokio runtime of 2 workers, loopback
    /// TCP, the default heartbeat of 500 ms and loss after 3 s): the time until the leader
    /// lists every node live, whether it keeps hearing them all (alone and under load), and
    /// trivial jobs per second placed among them; peak memory, threads and open files.
    Scale {
        /// Node daemons (2 vertex slots each).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        nodes: u32,
        /// Super-peers (replicas of the job log).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=7))]
        superpeers: u32,
        /// Seconds of trivial-job submissions.
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Concurrent submitting clients.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
        clients: u64,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Whether a guest's CPU weight binds the job part in it: one host-driver guest per weight,
    /// all on CPU 0, each running a worker whose vertex spins; each worker's share of the CPU
    /// time against what the weights ask for; and what starting a worker costs (as root).
    Shares {
        /// The guests' weights, e.g. `1,3`.
        #[arg(long, value_delimiter = ',', default_value = "1,3", value_parser = clap::value_parser!(u32).range(1..=255))]
        weights: Vec<u32>,
        /// Bid rates instead (credits per CPU-second, e.g. `1,2,5`): the market's auctioneer
        /// sets the weights, and charges each guest for the CPU time it used.
        #[arg(long, value_delimiter = ',', conflicts_with = "weights")]
        bids: Option<Vec<String>>,
        /// After the first window, change one bid: `INDEX=RATE` (e.g. `2=1`), and measure how
        /// soon the shares follow.
        #[arg(long, requires = "bids", value_name = "INDEX=RATE")]
        rebid: Option<String>,
        /// Seconds measured.
        #[arg(long, default_value_t = 4.0)]
        secs: f64,
        #[command(flatten)]
        out: OutputArg,
    },
    /// The market's bidding agents (Feldman, Lai and Zhang's best response) on the real
    /// auctioneers, one per host: efficiency and envy at their equilibrium and with uniform
    /// bids, beside Zhang's bounds (ICALP 2005), also with one host and with two users.
    Market {
        /// Hosts, each with its auctioneer.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        hosts: u32,
        /// Users, each with a budget of 1 credit per second.
        #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        users: u32,
        /// The seed of the users' valuations.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Inside a Xen dom0: a guest's create-to-running time through MVM's Xen driver beside plain
    /// `xl create` of the same xl.cfg (`--kernel`); or, through a lab's broker and its Xen
    /// nodes, GridWay's throughput P(n) = n / T(n) of short jobs on the host and in guests of an
    /// image in each VM mode, with the fitted asymptotic rate and half-performance length
    /// (`--throughput IMAGE`). scripts/xen-suite runs both under QEMU.
    Xen {
        /// The guest kernel (PV).
        #[arg(
            long,
            required_unless_present = "throughput",
            conflicts_with = "throughput"
        )]
        kernel: Option<std::path::PathBuf>,
        /// Measure P(n) with guests of this image (`name:version`, offered by the lab's Xen
        /// nodes), through the broker.
        #[arg(long, value_name = "IMAGE")]
        throughput: Option<String>,
        /// Jobs per mode for `--throughput`.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
        jobs: u32,
        #[command(flatten)]
        broker: crate::cmd::job::BrokerArg,
        /// The guest's ramdisk.
        #[arg(long)]
        ramdisk: Option<std::path::PathBuf>,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(16..))]
        memory_mib: u32,
        /// Creates of each kind.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
        runs: u32,
        /// Where the guests' xl.cfg files are written.
        #[arg(long, default_value = "/var/lib/mvm/bench-xen")]
        state_dir: std::path::PathBuf,
        #[command(flatten)]
        out: OutputArg,
    },
    /// What checkpoints cost jobs on this node: a 16-vertex token ring and the C pipeline run
    /// with plain modules, with pausable ones, and paused and saved every interval, side by
    /// side; each checkpoint's pause, capture and size; a blob's time to running again; a
    /// part's move to another node; and, in a lab of 3 node processes, `mvm checkpoint` on the
    /// pipeline over 2 of them and its recovery after one is killed (SIGKILL).
    Checkpoint {
        /// Hops of the ring.
        #[arg(long, default_value_t = 3_000_000, value_parser = clap::value_parser!(u64).range(1000..))]
        hops: u64,
        /// Items through the pipeline.
        #[arg(long, default_value_t = 2_000_000, value_parser = clap::value_parser!(u64).range(1000..))]
        items: u64,
        /// Time between checkpoints, e.g. `1s`, `500ms`.
        #[arg(long, default_value = "1s", value_parser = parse_interval)]
        interval: std::time::Duration,
        /// Rounds of each run (the median is reported).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
        runs: u32,
        /// Where the C jobs are built (`scripts/build-jobs`).
        #[arg(long, default_value = "jobs/build", value_name = "DIR")]
        jobs: std::path::PathBuf,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Trials of the C pipeline with checkpoints in a lab of 3 node processes, each with a node
    /// running a part of it killed (SIGKILL) at a random moment (and started again after):
    /// trials, jobs completed, outputs identical to an undisturbed run's, items lost or
    /// delivered twice. Fails unless every job completes identical.
    Chaos {
        /// Trials.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
        trials: u32,
        /// Items through the pipeline.
        #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1000..))]
        items: u64,
        /// Time between checkpoints, e.g. `1s`, `500ms`.
        #[arg(long, default_value = "1s", value_parser = parse_interval)]
        interval: std::time::Duration,
        /// The random seed (default: from the clock; the report gives it).
        #[arg(long)]
        seed: Option<u64>,
        /// Where the C jobs are built (`scripts/build-jobs`).
        #[arg(long, default_value = "jobs/build", value_name = "DIR")]
        jobs: std::path::PathBuf,
        #[command(flatten)]
        out: OutputArg,
    },
    /// What a hostile peer does to a super-peer and to its other users: a user's trivial
    /// jobs' latency and throughput quiet and under each attack (a flood of requests,
    /// thousands of streams, oversized frames, endless frames, answers never read, and 1,200
    /// unauthenticated connections), each from a process at `nice 19`; the super-peer's
    /// memory, and whether the attacker was cut off and logged.
    Hostile {
        /// Seconds the user is measured under each attack (latency, then throughput for half).
        #[arg(long, default_value_t = 4.0)]
        secs: f64,
        /// The attacks, comma-separated (default: all).
        #[arg(long, value_delimiter = ',', value_parser = parse_attack)]
        attacks: Vec<mvm_superpeer::net::hostile::Attack>,
        /// The attacker's niceness: 19 (the default) keeps it from taking CPU from the users
        /// measured, as if it ran on another machine; 0 lets it keep its pace on a loaded one
        /// (when only its cut-off is checked).
        #[arg(long, default_value_t = 19, value_parser = clap::value_parser!(u8).range(0..=19))]
        attacker_nice: u8,
        #[command(flatten)]
        out: OutputArg,
    },
    /// The attacker of `mvm bench hostile` (run by it).
    #[command(hide = true)]
    HostilePeer {
        #[arg(long, value_parser = parse_attack)]
        attack: mvm_superpeer::net::hostile::Attack,
        #[arg(long)]
        broker: String,
        #[arg(long)]
        identity: std::path::PathBuf,
        #[arg(long)]
        secs: f64,
    },
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
        /// Runs per measurement: each throughput alternates with its reference in 2×RUNS−1
        /// back-to-back pairs (the best of each and the median of the pairs are reported).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
        runs: u32,
        #[command(flatten)]
        out: OutputArg,
    },
}

#[derive(Serialize)]
struct PingPongRow {
    size: usize,
    mvm_one_way_us: f64,
    mvm_mb_per_sec: f64,
    mpich_one_way_us: Option<f64>,
    /// mvm / mpich (goal for 8 B: at most 1.5).
    ratio: Option<f64>,
}

#[derive(Serialize)]
struct PingPongReport {
    sizes: Vec<PingPongRow>,
    mpich: String,
}

#[derive(Serialize)]
struct RingReport {
    vertices: usize,
    hops: u64,
    /// Goal: under 5 µs per hop for 16 vertices.
    mvm_per_hop_us: f64,
    mpich_per_hop_us: Option<f64>,
    mpich: String,
    instantiation: jobs::Instantiation,
}

/// A checkpoint interval: a duration of at least 100 ms.
fn parse_attack(s: &str) -> Result<mvm_superpeer::net::hostile::Attack, String> {
    s.parse()
}

fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    mvm_component::profile::parse_duration(s)
        .filter(|d| *d >= mvm_component::profile::MIN_CHECKPOINT_INTERVAL)
        .ok_or_else(|| format!("'{s}' is not a duration of at least 100ms (e.g. \"1s\")"))
}

fn tokio() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Failure::failed)
}

fn wasm_runtime() -> Result<Runtime, Failure> {
    Runtime::new(&RuntimeConfig {
        max_instances: 1100,
        ..RuntimeConfig::default()
    })
    .map_err(Failure::failed)
}

pub(crate) fn run(args: Args) -> Result<(), Failure> {
    let bench = match &args.which {
        Which::Policy { .. } => "policy",
        Which::Pingpong { .. } => "pingpong",
        Which::Ring { .. } => "ring",
        Which::Broker { .. } => "broker",
        Which::Staging { .. } => "staging",
        Which::Scale { .. } => "scale",
        Which::Shares { .. } => "shares",
        Which::Market { .. } => "market",
        Which::Xen { .. } => "xen",
        Which::Checkpoint { .. } => "checkpoint",
        Which::Chaos { .. } => "chaos",
        Which::Queue { .. } => "queue",
        Which::Hostile { .. } => "hostile",
        Which::HostilePeer { .. } => "hostile-peer",
    };
    let cmp = compare::Compare {
        bench,
        file: args.compare,
    };
    match args.which {
        Which::Pingpong { scale, out } => {
            if !(scale > 0.0 && scale <= 100.0) {
                return Err(Failure::input(anyhow::anyhow!(
                    "bench pingpong: --scale must be in (0, 100]"
                )));
            }
            let rt = wasm_runtime()?;
            let tokio = tokio()?;
            let (mpich, status) = match mpi::pingpong() {
                Ok(v) => (v, "measured (shared memory)".to_owned()),
                Err(e) => (Vec::new(), format!("{e:#}")),
            };
            let mut sizes = Vec::new();
            for (size, iters) in [
                (8usize, 20_000u64),
                (1024, 10_000),
                (65536, 2_000),
                (1 << 20, 200),
            ] {
                let iters = ((iters as f64 * scale) as u64).max(10);
                let p = tokio
                    .block_on(jobs::pingpong(&rt, size, iters))
                    .map_err(|e| Failure::failed(anyhow::anyhow!("bench pingpong: {e}")))?;
                let m = mpich.iter().find(|(s, _)| *s == size).map(|(_, us)| *us);
                sizes.push(PingPongRow {
                    size,
                    mvm_one_way_us: p.one_way_us,
                    mvm_mb_per_sec: p.mb_per_sec,
                    mpich_one_way_us: m,
                    ratio: m.map(|m| p.one_way_us / m),
                });
            }
            let report = PingPongReport {
                sizes,
                mpich: status,
            };
            cmp.print(&report, out.output, |r| {
                let mut s = String::from(
                    "one-way latency between two WebAssembly vertices (us)\n  size       mvm      mpich   mvm/mpich\n",
                );
                for row in &r.sizes {
                    s.push_str(&format!(
                        "  {:>7}  {:>8.3}  {:>9}  {:>9}\n",
                        row.size,
                        row.mvm_one_way_us,
                        row.mpich_one_way_us
                            .map_or("-".into(), |v| format!("{v:.3}")),
                        row.ratio.map_or("-".into(), |v| format!("{v:.2}")),
                    ));
                }
                s.push_str(&format!(
                    "  MPICH: {} (goal for 8 B: mvm/mpich <= 1.5)",
                    r.mpich
                ));
                s
            })
        }
        Which::Ring {
            vertices,
            hops,
            mpi_laps,
            out,
        } => {
            if !(2..=1000).contains(&vertices) || hops < 10 * vertices as u64 {
                return Err(Failure::input(anyhow::anyhow!(
                    "bench ring: --vertices must be 2..=1000 and --hops at least 10 per vertex"
                )));
            }
            let rt = wasm_runtime()?;
            let tokio = tokio()?;
            let per_hop = tokio
                .block_on(jobs::ring(&rt, vertices, hops))
                .map_err(|e| Failure::failed(anyhow::anyhow!("bench ring: {e}")))?;
            let inst = tokio
                .block_on(jobs::instantiation(&rt, 1000))
                .map_err(|e| Failure::failed(anyhow::anyhow!("bench ring: {e}")))?;
            let n = u32::try_from(vertices).unwrap_or(16);
            let (m, status) = match mpi::ring(n, mpi_laps) {
                Ok(v) => (Some(v), "measured (shared memory)".to_owned()),
                Err(e) => (None, format!("{e:#}")),
            };
            let report = RingReport {
                vertices,
                hops,
                mvm_per_hop_us: per_hop,
                mpich_per_hop_us: m,
                mpich: status,
                instantiation: inst,
            };
            cmp.print(&report, out.output, |r| {
                format!(
                    "{}-vertex token ring: mvm {:.3} us per hop, MPICH {} (goal: mvm < 5 us)\n\
                     instantiation from cache, {} vertices: mvm {:.1} us per vertex, bare wasmtime {:.1} us (ratio {:.2}, goal <= 1.2)",
                    r.vertices,
                    r.mvm_per_hop_us,
                    r.mpich_per_hop_us
                        .map_or(r.mpich.clone(), |v| format!("{v:.1} us per hop")),
                    r.instantiation.vertices,
                    r.instantiation.mvm_us_per_vertex,
                    r.instantiation.bare_us_per_vertex,
                    r.instantiation.ratio,
                )
            })
        }
        Which::Checkpoint {
            hops,
            items,
            interval,
            runs,
            jobs,
            out,
        } => {
            let runs = usize::try_from(runs).unwrap_or(3);
            let report = checkpoint::run(hops, items, interval, runs, &jobs)?;
            cmp.print(&report, out.output, checkpoint::text)
        }
        Which::Chaos {
            trials,
            items,
            interval,
            seed,
            jobs,
            out,
        } => {
            let tmp = tempfile::Builder::new()
                .prefix("mvm-bench-chaos-")
                .tempdir()
                .map_err(Failure::failed)?;
            let trials = usize::try_from(trials).unwrap_or(20);
            let report = chaos::run(tmp.path(), &jobs, items, interval, trials, seed)?;
            cmp.print(&report, out.output, chaos::text)?;
            if report.identical < report.trials || report.items_lost + report.items_twice > 0 {
                return Err(Failure::failed(anyhow::anyhow!(
                    "bench chaos: {} of {} trials ended identical",
                    report.identical,
                    report.trials
                )));
            }
            Ok(())
        }
        Which::Hostile {
            secs,
            attacks,
            attacker_nice,
            out,
        } => {
            if !(secs > 0.0 && secs <= 600.0) {
                return Err(Failure::input(anyhow::anyhow!(
                    "bench hostile: --secs must be in (0, 600]"
                )));
            }
            let attacks = if attacks.is_empty() {
                mvm_superpeer::net::hostile::Attack::ALL.to_vec()
            } else {
                attacks
            };
            let report = hostile::run(secs, &attacks, attacker_nice)?;
            cmp.print(&report, out.output, hostile::text)
        }
        Which::HostilePeer {
            attack,
            broker,
            identity,
            secs,
        } => hostile::attacker(&identity, &broker, attack, secs),
        Which::Broker {
            superpeers,
            secs,
            clients,
            transport,
            out,
        } => {
            if !(secs > 0.0 && secs <= 600.0) {
                return Err(Failure::input(anyhow::anyhow!(
                    "bench broker: --secs must be in (0, 600]"
                )));
            }
            let clients = usize::try_from(clients).unwrap_or(64);
            let report = broker::run(superpeers, secs, clients, transport)?;
            cmp.print(&report, out.output, broker::text)
        }
        Which::Staging {
            mib,
            files,
            runs,
            superpeers,
            out,
        } => {
            let report = staging::run(mib, files, runs, superpeers)?;
            cmp.print(&report, out.output, staging::text)
        }
        Which::Scale {
            nodes,
            superpeers,
            secs,
            clients,
            out,
        } => {
            if !(secs > 0.0 && secs <= 600.0) {
                return Err(Failure::input(anyhow::anyhow!(
                    "bench scale: --secs must be in (0, 600]"
                )));
            }
            let clients = usize::try_from(clients).unwrap_or(64);
            let report = scale::run(nodes, superpeers, secs, clients)?;
            cmp.print(&report, out.output, scale::text)
        }
        Which::Shares {
            weights,
            bids,
            rebid,
            secs,
            out,
        } => {
            let credits = |s: &str| {
                mvm_superpeer::proto::parse_credits(s)
                    .map_err(|e| Failure::input(anyhow::anyhow!("bench shares: {e}")))
            };
            let setting = match bids {
                None => shares::Setting::Weights(weights),
                Some(b) => {
                    let rates = b
                        .iter()
                        .map(|s| credits(s))
                        .collect::<Result<Vec<_>, _>>()?;
                    let rebid = match rebid.as_deref() {
                        None => None,
                        Some(r) => {
                            let bad = || {
                                Failure::input(anyhow::anyhow!(
                                    "bench shares: --rebid must be INDEX=RATE with an index of \
                                     --bids, not '{r}'"
                                ))
                            };
                            let (i, rate) = r.split_once('=').ok_or_else(bad)?;
                            let i: usize = i.parse().map_err(|_| bad())?;
                            if i >= rates.len() {
                                return Err(bad());
                            }
                            Some((i, credits(rate)?))
                        }
                    };
                    shares::Setting::Bids(rates, rebid)
                }
            };
            let n = match &setting {
                shares::Setting::Weights(w) => w.len(),
                shares::Setting::Bids(b, _) => b.len(),
            };
            if !(secs > 0.0 && secs <= 600.0) || n < 2 {
                return Err(Failure::input(anyhow::anyhow!(
                    "bench shares: --secs must be in (0, 600] and --weights or --bids name at \
                     least 2"
                )));
            }
            let report = shares::run(&setting, secs)?;
            cmp.print(&report, out.output, shares::text)
        }
        Which::Market {
            hosts,
            users,
            seed,
            out,
        } => {
            let report = market::run(hosts, users, seed)?;
            cmp.print(&report, out.output, market::text)
        }
        Which::Xen {
            kernel,
            throughput,
            jobs,
            broker,
            ramdisk,
            memory_mib,
            runs,
            state_dir,
            out,
        } => {
            let Some(kernel) = kernel else {
                let image = throughput.unwrap_or_default();
                let t = pn::run(&broker, &image, memory_mib, jobs, &state_dir.join("pn"))?;
                return cmp.print(&t, out.output, pn::text);
            };
            for f in std::iter::once(&kernel).chain(ramdisk.as_ref()) {
                if !f.is_file() {
                    return Err(Failure::input(anyhow::anyhow!(
                        "bench xen: {}: no such file",
                        f.display()
                    )));
                }
            }
            let params = mvm_os::bench::Params {
                kernel,
                ramdisk,
                memory_mib,
                runs,
                state_dir,
            };
            let report = mvm_os::bench::xen(&params)
                .map_err(|e| Failure::failed(anyhow::anyhow!("bench xen: {e}")))?;
            cmp.print(&report, out.output, |r| {
                format!(
                    "guest create-to-running, {} runs each\n  mvm  median {:.2} s  {:?}\n  \
                     xl   median {:.2} s  {:?}\n  mvm/xl = {:.3} (goal <= 1.05)",
                    r.runs, r.mvm_median_secs, r.mvm_secs, r.xl_median_secs, r.xl_secs, r.ratio
                )
            })
        }
        Which::Policy {
            policies,
            rounds,
            out,
        } => {
            let bundle = mvm_component::policy::Bundle::read_dir(&policies)
                .map_err(|e| Failure::input(anyhow::anyhow!("{}/{e}", policies.display())))?;
            let r = mvm_component::policy::bench::run(
                &bundle,
                usize::try_from(rounds).unwrap_or(usize::MAX),
            )
            .map_err(|e| Failure::input(anyhow::anyhow!("{}/{e}", policies.display())))?;
            cmp.print(&r, out.output, |r| {
                format!(
                    "policy decisions, {} questions ({} allowed)\n  \
                     oso     p50 {:>9.2} us  p99 {:>9.2} us  {:>12.0} /s\n  \
                     cached  p50 {:>9.2} us  p99 {:>9.2} us  {:>12.0} /s  \
                     ({:.0} /s from 2 threads; goal p50 < {} us)",
                    r.questions,
                    r.allowed,
                    r.oso.p50_us,
                    r.oso.p99_us,
                    r.oso.per_sec,
                    r.cached.p50_us,
                    r.cached.p99_us,
                    r.cached.per_sec,
                    r.cached_per_sec_2_threads,
                    r.goal_p50_us
                )
            })
        }
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
            cmp.print(&report, out.output, |r| {
                format!(
                    "queue throughput, 1 producer 1 consumer, {} B items, capacity {}\n  \
                     fifo       {:>14.0} items/s\n  priority   {:>14.0} items/s\n  \
                     crossbeam  {:>14.0} items/s   (fifo/crossbeam = {:.2} best, {:.2} median of back-to-back pairs; goal >= 0.5)\n\
                     loopback TCP, {} KiB items\n  remote     {:>10.0} MB/s\n  raw tcp    {:>10.0} MB/s   \
                     (remote/raw = {:.2} best, {:.2} median of back-to-back pairs; goal >= 0.7)\n  \
                     direct     {:>10.0} MB/s   (direct/raw = {:.2} median of pairs)\n\
                     loopback TCP, 8 B one-way\n  direct     {:>10.2} us (polling)\n  raw tcp    {:>10.2} us (blocking reads), {:.2} us (polling)",
                    r.item_bytes,
                    r.capacity,
                    r.fifo_items_per_sec,
                    r.priority_items_per_sec,
                    r.crossbeam_items_per_sec,
                    r.fifo_vs_crossbeam,
                    r.fifo_vs_crossbeam_median,
                    r.tcp_item_bytes / 1024,
                    r.remote_mb_per_sec,
                    r.raw_tcp_mb_per_sec,
                    r.remote_vs_raw_tcp,
                    r.remote_vs_raw_tcp_median,
                    r.direct_mb_per_sec,
                    r.direct_vs_raw_tcp_median,
                    r.direct_8b_us,
                    r.raw_tcp_8b_us,
                    r.raw_tcp_polling_8b_us,
                )
            })
        }
    }
}
