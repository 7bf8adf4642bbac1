//! `mvm bench scale`: one group of many nodes in one process. S super-peers (the replicas of
//! the group's job log) and N nodes run as real daemons on one tokio runtime of two workers,
//! on loopback TCP, with ephemeral identities of a temporary domain CA and the production
//! heartbeat cadence; the figures say whether the leader keeps hearing every node, alone and
//! while trivial jobs are placed among them.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mvm_component::policy::PrincipalKind;
use mvm_superpeer::client::{Client, Prepared};
use mvm_superpeer::daemon::{Daemon, DaemonConfig};
use mvm_superpeer::net::{Net, NetConfig};
use mvm_superpeer::pki::{Ca, Credentials, Subject};
use serde::Serialize;
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::broker::{NOOP_WAT, job, run_one, write};
use crate::cmd::job::wire;
use crate::exit::Failure;

/// Node daemons started at once.
const START_AT_ONCE: usize = 50;
/// Vertex slots of each node.
const SLOTS: u32 = 2;
/// How long after the last node has started the hold begins: for every node's heartbeats to
/// settle (a control stream dropped in a burst is opened again within about a second).
const SETTLE: Duration = Duration::from_secs(11);
/// How often the monitor asks the leader for the group.
const POLL: Duration = Duration::from_millis(500);

/// What `mvm bench scale` reports.
#[derive(Debug, Serialize)]
pub(crate) struct ScaleReport {
    /// Node daemons in the process, each with [`SLOTS`] vertex slots.
    pub(crate) nodes: u32,
    /// Super-peers in the process (the replicas of the job log; the leader brokers).
    pub(crate) superpeers: u32,
    /// Heartbeat interval of every daemon, ms (the production default).
    pub(crate) heartbeat_ms: u64,
    /// Silence after which the leader marks a node lost, ms (the production default).
    pub(crate) lost_after_ms: u64,
    /// Seconds from the first super-peer's start until every node daemon had started.
    pub(crate) started_secs: f64,
    /// Seconds from the first super-peer's start until the leader listed every node live;
    /// none if it never did within the wait (30 s and 150 ms a node).
    pub(crate) registered_secs: Option<f64>,
    /// The fewest live (not lost) nodes the leader listed, polled every 500 ms from then (or the
    /// wait's end) through the hold to the end of the run (goal: `nodes`, every heartbeat
    /// held).
    pub(crate) live_nodes_min: usize,
    /// The most nodes the leader listed as lost over the same polls (goal: 0).
    pub(crate) lost_nodes_max: usize,
    /// Polls of the leader's group that failed or took over 2 s.
    pub(crate) group_polls_failed: u64,
    /// Heartbeats per second measured while the group held only heartbeats (for
    /// `lost_after`, from 11 s after the last node started, before any job): the requests
    /// every node sent on its control stream to the leader, which carries nothing else then;
    /// all handled by the leader when no node was lost meanwhile.
    pub(crate) heartbeats_per_sec: f64,
    /// `nodes` / heartbeat interval: what `heartbeats_per_sec` should be.
    pub(crate) heartbeats_per_sec_nominal: f64,
    /// CPU cores busy (the process's CPU time over wall time) while the group held only
    /// heartbeats.
    pub(crate) idle_cores_busy: f64,
    /// CPU cores busy during the run of trivial jobs.
    pub(crate) run_cores_busy: f64,
    /// Trivial one-vertex jobs submitted, placed, run and collected per second.
    pub(crate) trivial_jobs_per_sec: f64,
    /// Jobs done in the run.
    pub(crate) jobs_done: u64,
    /// Jobs of the run that failed or were not taken.
    pub(crate) jobs_failed: u64,
    /// Why the first of them failed.
    pub(crate) first_failure: Option<String>,
    /// Concurrent clients submitting them.
    pub(crate) clients: usize,
    /// Seconds of the run.
    pub(crate) secs: f64,
    /// Distinct nodes that ran a part during the run.
    pub(crate) nodes_used: usize,
    /// The process's peak resident memory (VmHWM), MiB.
    pub(crate) peak_rss_mib: f64,
    /// The most threads of the process seen by the polls.
    pub(crate) threads_max: u64,
    /// The most open file descriptors of the process seen by the polls.
    pub(crate) open_fds_max: u64,
    /// The process's limit of open files (raised to its hard limit first).
    pub(crate) fd_limit: u64,
}

/// A daemon running on the benchmark's runtime.
struct Running {
    /// Its network handle, for its request count (dropped before it stops: a handle keeps the
    /// swarm open).
    net: Option<Net>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// Stops every daemon of `all` at once and waits until each has.
async fn stop_all(all: &mut Vec<Running>) {
    for r in all.iter_mut() {
        r.net = None;
        if let Some(s) = r.stop.take() {
            let _ = s.send(());
        }
    }
    for r in all.drain(..) {
        let _ = r.task.await;
    }
}

/// Starts a daemon and serves it on a task of the current runtime.
async fn start(creds: &Credentials, config: DaemonConfig) -> Result<Running, Failure> {
    let name = config.name.clone();
    let daemon = Daemon::start(creds, config)
        .await
        .map_err(|e| Failure::failed(anyhow::anyhow!("daemon {name}: {e}")))?;
    let net = daemon.net();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(daemon.run(async move {
        let _ = rx.await;
    }));
    Ok(Running {
        net: Some(net),
        stop: Some(tx),
        task,
    })
}

/// Fresh credentials of `ca`'s domain.
fn creds(ca: &Ca, kind: PrincipalKind, name: &str, roles: &[&str]) -> Result<Credentials, Failure> {
    let subject = Subject {
        kind,
        name: name.into(),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
    };
    Credentials::ephemeral(ca, &subject)
        .map_err(|e| Failure::failed(anyhow::anyhow!("credentials for {name}: {e}")))
}

/// A free loopback TCP port (free when asked; the super-peers' ports are chosen before any
/// starts, so that each is told the others' addresses).
fn free_port() -> Result<u16, Failure> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(Failure::failed)
}

fn loopback(port: u16) -> Result<NetConfig, Failure> {
    let listen = format!("/ip4/127.0.0.1/tcp/{port}")
        .parse()
        .map_err(Failure::failed)?;
    // The clients submit as fast as the broker places: its capacity is measured, not a user's
    // quota.
    Ok(NetConfig {
        listen: vec![listen],
        request_rate: 0,
        ..NetConfig::default()
    })
}

/// The process's CPU time so far (user and system), seconds.
fn cpu_secs() -> f64 {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct it is given, which outlives the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// A field of /proc/self/status (`VmHWM`, `Threads`), as its first number.
fn status_field(name: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Open file descriptors of the process.
fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

/// Requests the nodes have sent on control streams so far.
fn node_requests(nodes: &[Running]) -> u64 {
    nodes
        .iter()
        .filter_map(|r| r.net.as_ref())
        .map(Net::stream_requests)
        .sum()
}

/// The leader's view: (live nodes, lost nodes), if it answers as the leader within 2 s.
async fn live(client: &Client) -> Option<(usize, usize)> {
    let g = tokio::time::timeout(Duration::from_secs(2), client.group())
        .await
        .ok()?
        .ok()?;
    let lost = g.nodes.iter().filter(|n| n.lost).count();
    g.is_broker.then_some((g.nodes.len() - lost, lost))
}

/// What the monitor saw.
#[derive(Debug)]
struct Seen {
    live_min: usize,
    lost_max: usize,
    failed: u64,
    threads_max: u64,
    fds_max: u64,
}

/// Polls the leader's group every [`POLL`] until `stop` changes.
async fn monitor(client: Client, mut stop: watch::Receiver<bool>) -> Seen {
    let mut seen = Seen {
        live_min: usize::MAX,
        lost_max: 0,
        failed: 0,
        threads_max: 0,
        fds_max: 0,
    };
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return seen,
        }
        match live(&client).await {
            Some((live, lost)) => {
                seen.live_min = seen.live_min.min(live);
                seen.lost_max = seen.lost_max.max(lost);
            }
            None => seen.failed += 1,
        }
        seen.threads_max = seen.threads_max.max(status_field("Threads").unwrap_or(0));
        seen.fds_max = seen.fds_max.max(open_fds());
    }
}

/// What the clients did in the run.
#[derive(Default)]
struct Tally {
    done: AtomicU64,
    failed: AtomicU64,
    first_failure: Mutex<Option<String>>,
    used: Mutex<HashSet<String>>,
}

/// `clients` clients submitting `job` and waiting for its end, one at a time each, until
/// `secs` have passed; gives the wall time.
async fn submit(client: &Client, job: &Prepared, clients: usize, secs: f64, tally: &Arc<Tally>) {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut set = JoinSet::new();
    for _ in 0..clients {
        let (client, job, tally) = (client.clone(), job.clone(), tally.clone());
        set.spawn(async move {
            while Instant::now() < deadline {
                match run_one(&client, &job).await {
                    Ok((s, _)) => {
                        tally.done.fetch_add(1, Ordering::Relaxed);
                        let mut used = tally.used.lock().unwrap_or_else(PoisonError::into_inner);
                        used.extend(s.parts.into_iter().map(|p| p.node.to_string()));
                    }
                    Err(e) => {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                        tally
                            .first_failure
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get_or_insert_with(|| format!("{:#}", e.error));
                        // No tight loop on a broker that refuses at once.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
}

/// Runs the whole benchmark: `nodes` nodes and `superpeers` super-peers, then `clients`
/// clients submitting trivial jobs for `secs` seconds.
pub(crate) fn run(
    nodes: u32,
    superpeers: u32,
    secs: f64,
    clients: usize,
) -> Result<ScaleReport, Failure> {
    let fd_limit = crate::cmd::daemon::raise_fd_limit()?;
    let tmp = tempfile::Builder::new()
        .prefix("mvm-bench-scale-")
        .tempdir()
        .map_err(Failure::failed)?;
    let d = tmp.path();
    let root = d.display().to_string();
    write(d, "noop.wat", NOOP_WAT)?;
    write(d, "one.dot", "digraph one { v [component=\"noop\"]; }\n")?;
    let trivial = job(
        d,
        "one.toml",
        &format!(
            "name = \"noop\"\ntopology = \"{root}/one.dot\"\n[components]\nnoop = \"{root}/noop.wat\"\n"
        ),
    )?;
    let rt = super::tokio()?;
    let mut daemons = Vec::new();
    let report = rt.block_on(async {
        let r = lab(d, nodes, superpeers, secs, clients, &trivial, &mut daemons).await;
        // Nodes first (the last ones pushed), so that none goes looking for a leader.
        let first = (superpeers as usize).min(daemons.len());
        let mut sps: Vec<Running> = daemons.drain(..first).collect();
        stop_all(&mut daemons).await;
        stop_all(&mut sps).await;
        r
    });
    rt.shutdown_timeout(Duration::from_secs(10));
    let mut report = report?;
    report.fd_limit = fd_limit;
    report.peak_rss_mib = status_field("VmHWM").unwrap_or(0) as f64 / 1024.0;
    Ok(report)
}

/// Starts the daemons (pushed onto `daemons`, super-peers first, for the caller to stop),
/// waits until the leader lists every node live, holds, then runs the clients.
async fn lab(
    dir: &Path,
    nodes: u32,
    superpeers: u32,
    secs: f64,
    clients: usize,
    trivial: &Prepared,
    daemons: &mut Vec<Running>,
) -> Result<ScaleReport, Failure> {
    let defaults = DaemonConfig::default();
    let t0 = Instant::now();
    let ca = Arc::new(
        Ca::init(&dir.join("ca"), "default", 30)
            .map_err(|e| Failure::failed(anyhow::anyhow!("a CA in {}: {e}", dir.display())))?,
    );
    let mut sps = Vec::new();
    for i in 0..superpeers {
        let c = creds(&ca, PrincipalKind::Node, &format!("sp{i}"), &["superpeer"])?;
        let port = free_port()?;
        let addr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", c.peer());
        sps.push((c, port, addr));
    }
    let addrs: Vec<String> = sps.iter().map(|(_, _, a)| a.clone()).collect();
    for (i, (c, port, addr)) in sps.iter().enumerate() {
        let config = DaemonConfig {
            name: format!("sp{i}"),
            broker: true,
            slots: 0,
            state_dir: Some(dir.join(format!("sp{i}"))),
            replicas: addrs.iter().filter(|a| *a != addr).cloned().collect(),
            net: loopback(*port)?,
            ..DaemonConfig::default()
        };
        daemons.push(start(c, config).await?);
    }
    let user = creds(&ca, PrincipalKind::User, "alice", &["researcher"])?;
    let client = leader(&user, &addrs).await?;
    // The leader first: a node registers with the first address and would be sent on by a
    // replica that does not lead.
    let lead = client.broker().to_string();
    let mut bootstrap = addrs.clone();
    bootstrap.sort_by_key(|a| !a.ends_with(&lead));
    let cache = dir.join("cache");
    let slots = Arc::new(Semaphore::new(START_AT_ONCE));
    let mut starting = JoinSet::new();
    for i in 0..nodes {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(Failure::failed)?;
        let (ca, bootstrap, cache) = (ca.clone(), bootstrap.clone(), cache.clone());
        starting.spawn(async move {
            let _permit = permit;
            let name = format!("n{i}");
            let c = creds(&ca, PrincipalKind::Node, &name, &[])?;
            let config = DaemonConfig {
                name,
                slots: SLOTS,
                bootstrap,
                cache_dir: Some(cache),
                net: loopback(0)?,
                ..DaemonConfig::default()
            };
            start(&c, config).await
        });
        // Those started so far are pushed as they come, so that a failure stops them too.
        while let Some(r) = starting.try_join_next() {
            daemons.push(r.map_err(Failure::failed)??);
        }
    }
    while let Some(r) = starting.join_next().await {
        daemons.push(r.map_err(Failure::failed)??);
    }
    let started_secs = t0.elapsed().as_secs_f64();
    let n = nodes as usize;
    let wait = Duration::from_secs(30) + Duration::from_millis(150) * nodes;
    let mut registered_secs = None;
    while t0.elapsed() < wait {
        if live(&client).await.is_some_and(|(live, _)| live >= n) {
            registered_secs = Some(t0.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let watcher = tokio::spawn(monitor(client.clone(), stop_rx));
    // Heartbeats alone, for as long as a silent node takes to be lost.
    let node_daemons = &daemons[superpeers as usize..];
    // Heartbeats settle first: a node whose control stream the leader dropped (a burst of them
    // arrives faster than it takes them in) opens it again within about a second, and nodes
    // that registered late catch up: the hold starts once every node has had the chance.
    tokio::time::sleep_until((t0 + Duration::from_secs_f64(started_secs) + SETTLE).into()).await;
    let (cpu, requests, t) = (cpu_secs(), node_requests(node_daemons), Instant::now());
    tokio::time::sleep(defaults.lost_after).await;
    let hold = t.elapsed().as_secs_f64();
    let idle_cores_busy = (cpu_secs() - cpu) / hold;
    let heartbeats_per_sec = node_requests(node_daemons).saturating_sub(requests) as f64 / hold;
    // Warm-up: the module compiled once into the shared cache. A group that has lost its
    // leader fails these too; the run counts its failures.
    for _ in 0..4 {
        if run_one(&client, trivial).await.is_err() {
            break;
        }
    }
    let tally = Arc::new(Tally::default());
    let (cpu, t) = (cpu_secs(), Instant::now());
    submit(&client, trivial, clients, secs, &tally).await;
    let run_secs = t.elapsed().as_secs_f64();
    let run_cores_busy = (cpu_secs() - cpu) / run_secs;
    let _ = stop_tx.send(true);
    let seen = watcher.await.map_err(Failure::failed)?;
    let done = tally.done.load(Ordering::Relaxed);
    let nodes_used = tally
        .used
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .len();
    let first_failure = tally
        .first_failure
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    Ok(ScaleReport {
        nodes,
        superpeers,
        heartbeat_ms: u64::try_from(defaults.heartbeat.as_millis()).unwrap_or(u64::MAX),
        lost_after_ms: u64::try_from(defaults.lost_after.as_millis()).unwrap_or(u64::MAX),
        started_secs,
        registered_secs,
        live_nodes_min: if seen.live_min == usize::MAX {
            0
        } else {
            seen.live_min
        },
        lost_nodes_max: seen.lost_max,
        group_polls_failed: seen.failed,
        heartbeats_per_sec,
        heartbeats_per_sec_nominal: f64::from(nodes) / defaults.heartbeat.as_secs_f64(),
        idle_cores_busy,
        run_cores_busy,
        trivial_jobs_per_sec: done as f64 / run_secs,
        jobs_done: done,
        jobs_failed: tally.failed.load(Ordering::Relaxed),
        first_failure,
        clients,
        secs: run_secs,
        nodes_used,
        peak_rss_mib: 0.0,
        threads_max: seen.threads_max,
        open_fds_max: seen.fds_max,
        fd_limit: 0,
    })
}

/// A client of the group's leader, once one is elected (within 30 s).
async fn leader(user: &Credentials, addrs: &[String]) -> Result<Client, Failure> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Client::find(user, addrs).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(wire(e)),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The report as text.
pub(crate) fn text(r: &ScaleReport) -> String {
    format!(
        "{} nodes and {} super-peers in one process (heartbeat {} ms, lost after {} ms)\n  \
         started in {:.1} s; all live at the leader after {} s\n  \
         live nodes at least {} (goal {}), lost at most {}; {} polls of the leader failed\n  \
         heartbeats: {:.0}/s measured ({:.0}/s nominal), {:.2} cores busy holding them\n  \
         trivial jobs/s ({} clients): {:.0} ({} done, {} failed) on {} nodes; {:.2} cores busy\n  \
         peak RSS {:.0} MiB, at most {} threads and {} open files (limit {}){}",
        r.nodes,
        r.superpeers,
        r.heartbeat_ms,
        r.lost_after_ms,
        r.started_secs,
        r.registered_secs
            .map_or("never".to_owned(), |s| format!("{s:.1}")),
        r.live_nodes_min,
        r.nodes,
        r.lost_nodes_max,
        r.group_polls_failed,
        r.heartbeats_per_sec,
        r.heartbeats_per_sec_nominal,
        r.idle_cores_busy,
        r.clients,
        r.trivial_jobs_per_sec,
        r.jobs_done,
        r.jobs_failed,
        r.nodes_used,
        r.run_cores_busy,
        r.peak_rss_mib,
        r.threads_max,
        r.open_fds_max,
        r.fd_limit,
        r.first_failure
            .as_ref()
            .map_or(String::new(), |f| format!("\n  first failure: {f}")),
    )
}
