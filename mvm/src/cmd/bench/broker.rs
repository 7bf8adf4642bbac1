//! `mvm bench broker`: the overlay measured on a local lab of real processes (3 super-peers,
//! the replicas of the job log, and 4 nodes on loopback), beside MPICH and raw TCP in the same
//! run, and the time a group takes to accept jobs again after its leader is killed.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mvm_superpeer::client::{Client, Prepared, read_profile};
use mvm_superpeer::proto::JobState;
use serde::Serialize;

use crate::cmd::bench::mpi;
use crate::cmd::daemon::LinksArg;
use crate::cmd::job::wire;
use crate::cmd::lab::{Lab, NetArgs, Transport};
use crate::exit::Failure;

/// A module that does nothing: the one vertex of a trivial job.
pub(super) const NOOP_WAT: &str =
    r#"(module (memory (export "memory") 1) (func (export "_start")))"#;

/// What `mvm bench broker` reports.
#[derive(Debug, Serialize)]
pub(crate) struct BrokerReport {
    /// Nodes in the lab.
    pub(crate) nodes: u32,
    /// The libp2p transport between them.
    pub(crate) transport: String,
    /// Trivial one-vertex jobs submitted, placed, run and collected per second.
    pub(crate) trivial_jobs_per_sec: f64,
    /// Concurrent clients submitting them.
    pub(crate) clients: usize,
    /// Median milliseconds from submission to completion of a 16-vertex token ring (one lap)
    /// over the 4 nodes.
    pub(crate) ring16_submit_to_done_ms: f64,
    /// Median milliseconds of `mpiexec -n 16` running a one-lap MPI ring, launch to exit.
    pub(crate) mpiexec16_ms: Option<f64>,
    /// ring16 / mpiexec (goal: at most 0.1).
    pub(crate) ring_ratio: Option<f64>,
    /// One-way 8 B latency between vertices on two nodes over plain direct links (this lab's,
    /// `--links plain`), microseconds.
    pub(crate) cross_node_8b_us: f64,
    /// 1 MiB messages between vertices on two nodes over plain direct links, MB/s.
    pub(crate) cross_node_1mib_mb_per_sec: f64,
    /// The same 8 B latency over sealed direct links (authenticated and encrypted; the
    /// default, `--links sealed`), in a lab of two nodes.
    pub(crate) cross_node_sealed_8b_us: f64,
    /// The same 1 MiB throughput over sealed direct links, MB/s.
    pub(crate) cross_node_sealed_1mib_mb_per_sec: f64,
    /// The same 8 B latency over libp2p streams (noise, yamux; `--links streams`).
    pub(crate) cross_node_streams_8b_us: f64,
    /// The same 1 MiB throughput over libp2p streams, MB/s.
    pub(crate) cross_node_streams_1mib_mb_per_sec: f64,
    /// MPICH over TCP: one-way 8 B latency, microseconds.
    pub(crate) mpich_tcp_8b_us: Option<f64>,
    /// MPICH over TCP: 1 MiB messages, MB/s.
    pub(crate) mpich_tcp_1mib_mb_per_sec: Option<f64>,
    /// cross-node (plain) / MPICH-TCP latency (goal: at most 1.5).
    pub(crate) latency_ratio: Option<f64>,
    /// Sealed cross-node / MPICH-TCP latency (goal: at most 1.5).
    pub(crate) sealed_latency_ratio: Option<f64>,
    /// Sealed cross-node / MPICH-TCP 1 MiB throughput (goal: at least 0.7).
    pub(crate) sealed_bandwidth_ratio: Option<f64>,
    /// Raw TCP on loopback: one-way 8 B latency, microseconds.
    pub(crate) raw_tcp_8b_us: f64,
    /// Raw TCP on loopback: 1 MiB messages, MB/s.
    pub(crate) raw_tcp_1mib_mb_per_sec: f64,
    /// How the MPICH figures were obtained, or why they are missing.
    pub(crate) mpich: String,
    /// Super-peers of the lab (the replicas of its job log).
    pub(crate) superpeers: u32,
    /// Milliseconds from killing (SIGKILL) the leading super-peer to the next trivial job
    /// accepted by the new leader (goal: at most 2000); none with one super-peer.
    pub(crate) failover_ms: Option<f64>,
}

/// Writes `text` to `dir/name`; gives the path.
pub(super) fn write(dir: &Path, name: &str, text: &str) -> Result<std::path::PathBuf, Failure> {
    let p = dir.join(name);
    std::fs::write(&p, text)
        .map_err(|e| Failure::failed(anyhow::anyhow!("{}: {e}", p.display())))?;
    Ok(p)
}

/// Writes a job profile to `dir/name` and reads it as a client would.
pub(super) fn job(dir: &Path, name: &str, profile: &str) -> Result<Prepared, Failure> {
    read_profile(&write(dir, name, profile)?).map_err(wire)
}

/// A trivial job (one vertex that does nothing) written to `dir` and read as a client would.
pub(super) fn trivial_job(dir: &Path) -> Result<Prepared, Failure> {
    let root = dir.display();
    write(dir, "noop.wat", NOOP_WAT)?;
    write(dir, "one.dot", "digraph one { v [component=\"noop\"]; }\n")?;
    job(
        dir,
        "one.toml",
        &format!(
            "name = \"noop\"\ntopology = \"{root}/one.dot\"\n[components]\nnoop = \"{root}/noop.wat\"\n"
        ),
    )
}

/// Submits and waits (one exchange for a short job); the job's final status and the elapsed
/// time.
pub(super) async fn run_one(
    client: &Client,
    job: &Prepared,
) -> Result<(mvm_superpeer::proto::JobStatus, Duration), Failure> {
    let t = Instant::now();
    let s = client.submit_and_wait(job).await.map_err(wire)?;
    let s = crate::cmd::job::wait(client, s, false).await?;
    Ok((done(s)?, t.elapsed()))
}

/// A bench job's final status, or an error if it did not end done.
pub(super) fn done(
    s: mvm_superpeer::proto::JobStatus,
) -> Result<mvm_superpeer::proto::JobStatus, Failure> {
    if s.state != JobState::Done {
        return Err(Failure::failed(anyhow::anyhow!(
            "bench job {} ended {:?}: {}",
            s.job,
            s.state,
            s.error.unwrap_or_default()
        )));
    }
    Ok(s)
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median one-way 8 B latency (µs) of five runs and 1 MiB throughput (MB/s) of three runs of
/// the two-vertex ping-pong jobs, whose vertices the broker places on two nodes.
async fn pingpong(client: &Client, pp8: &Prepared, pp1m: &Prepared) -> Result<(f64, f64), Failure> {
    let ns = |s: &mvm_superpeer::proto::JobStatus| -> Result<f64, Failure> {
        if s.parts.len() != 2 {
            return Err(Failure::failed(anyhow::anyhow!(
                "the ping-pong was placed on {} nodes, not 2",
                s.parts.len()
            )));
        }
        s.outputs
            .iter()
            .find(|(v, _)| v == "a")
            .and_then(|(_, b)| String::from_utf8_lossy(b).trim().parse::<f64>().ok())
            .ok_or_else(|| Failure::failed(anyhow::anyhow!("the ping-pong printed no time")))
    };
    let mut lat = Vec::new();
    let mut tput = Vec::new();
    for i in 0..5 {
        let (s, _) = run_one(client, pp8).await?;
        lat.push(ns(&s)? / 5000.0 / 2.0 / 1e3);
        if i >= 3 {
            continue;
        }
        let (s, _) = run_one(client, pp1m).await?;
        let one_way = ns(&s)? / 100.0 / 2.0;
        tput.push((1u64 << 20) as f64 / one_way * 1e3);
    }
    Ok((median(lat), median(tput)))
}

/// Raw TCP ping-pong on loopback: (one-way 8 B latency in µs, 1 MiB MB/s).
pub(super) fn raw_tcp() -> Result<(f64, f64), Failure> {
    let io = |e: std::io::Error| Failure::failed(anyhow::anyhow!("raw TCP: {e}"));
    let l = TcpListener::bind("127.0.0.1:0").map_err(io)?;
    let addr = l.local_addr().map_err(io)?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; 1 << 20];
        for size in [8usize, 1 << 20] {
            let rounds = if size == 8 { 20_000 } else { 100 };
            for _ in 0..rounds {
                s.read_exact(&mut buf[..size])?;
                s.write_all(&buf[..size])?;
            }
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr).map_err(io)?;
    s.set_nodelay(true).map_err(io)?;
    let mut buf = vec![1u8; 1 << 20];
    let mut out = [0.0; 2];
    for (i, size) in [8usize, 1 << 20].into_iter().enumerate() {
        let rounds = if size == 8 { 20_000 } else { 100 };
        let t = Instant::now();
        for _ in 0..rounds {
            s.write_all(&buf[..size]).map_err(io)?;
            s.read_exact(&mut buf[..size]).map_err(io)?;
        }
        let one_way = t.elapsed().as_secs_f64() / f64::from(rounds) / 2.0;
        out[i] = if size == 8 {
            one_way * 1e6
        } else {
            size as f64 / one_way / 1e6
        };
    }
    echo.join()
        .map_err(|_| Failure::failed(anyhow::anyhow!("raw TCP: the echo thread panicked")))?
        .map_err(io)?;
    Ok((out[0], out[1]))
}

/// Runs the whole benchmark.
pub(crate) fn run(
    superpeers: u32,
    secs: f64,
    clients: usize,
    transport: Transport,
) -> Result<BrokerReport, Failure> {
    let tmp = tempfile::Builder::new()
        .prefix("mvm-bench-broker-")
        .tempdir()
        .map_err(Failure::failed)?;
    let d = tmp.path();
    let root = d.display().to_string();
    let trivial = trivial_job(d)?;
    write(d, "token.wat", mvm_component::bench::TOKEN_WAT)?;
    write(d, "pingpong.wat", mvm_component::bench::PINGPONG_WAT)?;
    let ring = mvm_component::topology::generate::generate("ring", "16")
        .map_err(|e| Failure::failed(anyhow::anyhow!("{e}")))?;
    write(d, "ring16.dot", &ring)?;
    write(
        d,
        "pp.dot",
        "digraph pp { a [component=pp, lead=\"1\"]; b [component=pp]; a:out -> b:in [capacity=4]; b:out -> a:in [capacity=4]; }\n",
    )?;
    let ring16 = job(
        d,
        "ring.toml",
        &format!(
            "name = \"ring16\"\ntopology = \"{root}/ring16.dot\"\n[components]\ntoken = \"{root}/token.wat\"\n[parameters]\nhops = 16\n[requirements]\nnodes = 4\n"
        ),
    )?;
    let pp = |size: usize, iters: u64| {
        job(
            d,
            &format!("pp{size}.toml"),
            &format!(
                "name = \"pp\"\ntopology = \"{root}/pp.dot\"\n[components]\npp = \"{root}/pingpong.wat\"\n[parameters]\nsize = {size}\niters = {iters}\nwarmup = {}\n[limits]\nmemory = \"4MiB\"\n",
                iters / 10 + 10
            ),
        )
    };
    let (pp8, pp1m) = (pp(8, 5000)?, pp(1 << 20, 100)?);
    let nodes = 4;
    // One client submits thousands of jobs a second: the broker's capacity is measured, not
    // a user's quota.
    let net = NetArgs {
        transport,
        links: LinksArg::Plain,
        request_rate: 0,
    };
    // With three super-peers, every job's transitions are replicated to a majority of them.
    let mut lab = Lab::start(&d.join("lab"), nodes, superpeers, false, net)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Failure::failed)?;
    let broker = lab.broker.clone();
    let (jobs_per_sec, ring_ms, lat_us, mbps) = rt.block_on(async {
        let client = Client::find(&lab.user()?, std::slice::from_ref(&broker))
            .await
            .map_err(wire)?;
        // Warm up: every module compiled on every node.
        for _ in 0..4 {
            run_one(&client, &trivial).await?;
        }
        run_one(&client, &ring16).await?;
        // Throughput of trivial jobs with `clients` submitters.
        let done = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let start = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let (client, job, done) = (client.clone(), trivial.clone(), done.clone());
            set.spawn(async move {
                while Instant::now() < deadline {
                    run_one(&client, &job).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, Failure>(())
            });
        }
        while let Some(r) = set.join_next().await {
            r.map_err(Failure::failed)??;
        }
        let jobs_per_sec = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
        let mut ring = Vec::new();
        for _ in 0..11 {
            ring.push(run_one(&client, &ring16).await?.1.as_secs_f64() * 1e3);
        }
        let (lat, tput) = pingpong(&client, &pp8, &pp1m).await?;
        Ok::<_, Failure>((jobs_per_sec, median(ring), lat, tput))
    })?;
    let failover_ms = if superpeers > 1 {
        Some(failover(&rt, &mut lab, &trivial)?)
    } else {
        None
    };
    drop(lab);
    // The same ping-pong over sealed direct links and over libp2p streams, each in a lab of
    // two nodes.
    let two_nodes = |name: &str, links: LinksArg| -> Result<(f64, f64), Failure> {
        let net = NetArgs {
            transport,
            links,
            request_rate: 0,
        };
        let lab = Lab::start(&d.join(name), 2, 1, false, net)?;
        let broker = lab.broker.clone();
        rt.block_on(async {
            let client = Client::find(&lab.user()?, std::slice::from_ref(&broker))
                .await
                .map_err(wire)?;
            pingpong(&client, &pp8, &pp1m).await
        })
    };
    let (sealed_lat, sealed_tput) = two_nodes("lab-sealed", LinksArg::Sealed)?;
    let (streams_lat, streams_tput) = two_nodes("lab-streams", LinksArg::Streams)?;
    let (raw_lat, raw_tput) = raw_tcp()?;
    let (mpich_tcp, mut status) = match mpi::pingpong_tcp() {
        Ok(v) => (
            v,
            "measured (TCP over loopback; mpiexec from launch to exit)".to_owned(),
        ),
        Err(e) => (Vec::new(), format!("{e:#}")),
    };
    let m8 = mpich_tcp.iter().find(|(s, _)| *s == 8).map(|(_, us)| *us);
    let m1m = mpich_tcp
        .iter()
        .find(|(s, _)| *s == 1 << 20)
        .map(|(s, us)| *s as f64 / us);
    let mpiexec = match mpi::ring_wall(16, 3) {
        Ok(s) => Some(s * 1e3),
        Err(e) => {
            status = format!("{e:#}");
            None
        }
    };
    Ok(BrokerReport {
        nodes,
        transport: format!("{transport:?}").to_lowercase(),
        trivial_jobs_per_sec: jobs_per_sec,
        clients,
        ring16_submit_to_done_ms: ring_ms,
        mpiexec16_ms: mpiexec,
        ring_ratio: mpiexec.map(|m| ring_ms / m),
        cross_node_8b_us: lat_us,
        cross_node_1mib_mb_per_sec: mbps,
        cross_node_sealed_8b_us: sealed_lat,
        cross_node_sealed_1mib_mb_per_sec: sealed_tput,
        cross_node_streams_8b_us: streams_lat,
        cross_node_streams_1mib_mb_per_sec: streams_tput,
        mpich_tcp_8b_us: m8,
        mpich_tcp_1mib_mb_per_sec: m1m,
        latency_ratio: m8.map(|m| lat_us / m),
        sealed_latency_ratio: m8.map(|m| sealed_lat / m),
        sealed_bandwidth_ratio: m1m.map(|m| sealed_tput / m),
        raw_tcp_8b_us: raw_lat,
        raw_tcp_1mib_mb_per_sec: raw_tput,
        mpich: status,
        superpeers,
        failover_ms,
    })
}

/// Kills the lab's leading super-peer and measures the time until a new leader (found through
/// the other super-peers, as a client would) accepts and runs a trivial job.
fn failover(
    rt: &tokio::runtime::Runtime,
    lab: &mut Lab,
    trivial: &Prepared,
) -> Result<f64, Failure> {
    let user = lab.user()?;
    let leader = rt.block_on(async {
        let c = Client::find(&user, &lab.superpeers).await.map_err(wire)?;
        Ok::<_, Failure>(c.broker().to_string())
    })?;
    let Some(addr) = lab
        .superpeers
        .iter()
        .find(|a| a.ends_with(&leader))
        .cloned()
    else {
        return Err(Failure::failed(anyhow::anyhow!(
            "the leader {leader} is not a lab super-peer"
        )));
    };
    let others: Vec<String> = lab
        .superpeers
        .iter()
        .filter(|a| **a != addr)
        .cloned()
        .collect();
    let killed = Instant::now();
    lab.kill_superpeer(&addr);
    rt.block_on(async {
        let deadline = killed + Duration::from_secs(30);
        loop {
            if let Ok(c) = Client::find(&user, &others).await
                && run_one(&c, trivial).await.is_ok()
            {
                return Ok(killed.elapsed().as_secs_f64() * 1e3);
            }
            if Instant::now() > deadline {
                return Err(Failure::failed(anyhow::anyhow!(
                    "no job accepted within 30 s of killing the leading super-peer"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// The report as text.
pub(crate) fn text(r: &BrokerReport) -> String {
    let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.3}"));
    format!(
        "broker with {} nodes and {} super-peers on loopback ({})\n  trivial jobs/s ({} clients): {:.0} (goal >= 10000)\n  16-vertex ring, submit to done: {:.2} ms; mpiexec -n 16: {} ms; ratio {} (goal <= 0.1)\n  cross-node one-way 8 B: {:.2} us (plain direct links); MPICH TCP {} us; ratio {} (goal <= 1.5); raw TCP {:.2} us; libp2p streams {:.2} us\n  sealed direct links: 8 B {:.2} us, ratio {} (goal <= 1.5); 1 MiB {:.0} MB/s, ratio {} (goal >= 0.7)\n  cross-node 1 MiB: {:.0} MB/s (plain direct links); MPICH TCP {} MB/s; raw TCP {:.0} MB/s; libp2p streams {:.0} MB/s\n  leader killed to the next job accepted: {} ms (goal <= 2000)\n  MPICH: {}",
        r.nodes,
        r.superpeers,
        r.transport,
        r.clients,
        r.trivial_jobs_per_sec,
        r.ring16_submit_to_done_ms,
        opt(r.mpiexec16_ms),
        opt(r.ring_ratio),
        r.cross_node_8b_us,
        opt(r.mpich_tcp_8b_us),
        opt(r.latency_ratio),
        r.raw_tcp_8b_us,
        r.cross_node_streams_8b_us,
        r.cross_node_sealed_8b_us,
        opt(r.sealed_latency_ratio),
        r.cross_node_sealed_1mib_mb_per_sec,
        opt(r.sealed_bandwidth_ratio),
        r.cross_node_1mib_mb_per_sec,
        opt(r.mpich_tcp_1mib_mb_per_sec),
        r.raw_tcp_1mib_mb_per_sec,
        r.cross_node_streams_1mib_mb_per_sec,
        opt(r.failover_ms),
        r.mpich
    )
}
