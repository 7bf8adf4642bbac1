//! `mvm bench hostile`: what a hostile peer does to a super-peer and to the other users of its
//! group. A local lab (one super-peer, two nodes, the default request quota) serves four
//! well-behaved users, whose trivial jobs' latency (one user, one job at a time) and
//! throughput (each user four at a time, within its quota; together they keep the super-peer
//! busy) are measured quiet, then while
//! each attack runs from a process of its own (at `nice 19`, as if from another machine: the
//! super-peer's work for it is what is measured, not the attacker's own CPU), then quiet again.
//! Each attacker has a certificate of the lab's CA (it is an authenticated user), except the
//! strangers, who have none. For each attack: the user's figures beside the quiet ones (goal:
//! within 20 %), the super-peer's resident memory at its highest, whether the attacker was
//! cut off (refused at the connection at the end) and whether the super-peer logged it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mvm_component::policy::PrincipalKind;
use mvm_superpeer::client::{Client, Prepared};
use mvm_superpeer::net::hostile::{Attack, Tally};
use mvm_superpeer::pki::{Ca, Credentials, Subject};
use serde::Serialize;

use super::broker::{median, run_one, trivial_job};
use crate::cmd::daemon::LinksArg;
use crate::cmd::job::wire;
use crate::cmd::lab::{Lab, NetArgs, Transport};
use crate::exit::Failure;

/// A user's service: the figures measured for the well-behaved user.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Service {
    /// Median milliseconds from submission to end of a trivial job, one at a time (100 jobs).
    pub(crate) latency_ms: f64,
    /// The 90th percentile of the same.
    pub(crate) latency_p90_ms: f64,
    /// Trivial jobs per second, four users submitting four at a time each.
    pub(crate) jobs_per_sec: f64,
}

/// One attack's run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AttackRun {
    /// The attack.
    pub(crate) attack: Attack,
    /// The user's service meanwhile.
    pub(crate) service: Service,
    /// Its latency over the quiet one (goal: at most 1.2).
    pub(crate) latency_ratio: f64,
    /// Its throughput over the quiet one (goal: at least 0.8).
    pub(crate) throughput_ratio: f64,
    /// The super-peer's resident memory when the attack started, MiB (it grows with the
    /// users' jobs too: their history is kept).
    pub(crate) superpeer_rss_start_mib: f64,
    /// The super-peer's resident memory at its highest meanwhile, MiB.
    pub(crate) superpeer_rss_max_mib: f64,
    /// What the attacker saw.
    pub(crate) attacker: Tally,
    /// Whether the super-peer logged the attacker cut off.
    pub(crate) cut_off_logged: bool,
    /// Seconds from the attack's start to that log line, within 0.1 s (the attack goes on,
    /// after the users are measured, until then or 90 s).
    pub(crate) cut_off_after_secs: Option<f64>,
}

/// What `mvm bench hostile` reports.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HostileReport {
    /// Seconds each attack ran while the user was measured (the throughput window is half).
    pub(crate) secs: f64,
    /// The user's service with no attack: the mean of the runs before and after the attacks.
    pub(crate) quiet: Service,
    /// The runs before and after.
    pub(crate) quiet_runs: Vec<Service>,
    /// The super-peer's resident memory before the attacks, MiB.
    pub(crate) superpeer_rss_quiet_mib: f64,
    /// Each attack.
    pub(crate) attacks: Vec<AttackRun>,
}

/// The users' service: 100 jobs of the first one at a time, then four at a time from each for
/// `secs`.
async fn service(clients: &[Client], job: &Prepared, secs: f64) -> Result<Service, Failure> {
    let mut lat = Vec::new();
    let first = clients
        .first()
        .ok_or_else(|| Failure::failed(anyhow::anyhow!("no users")))?;
    for _ in 0..100 {
        lat.push(run_one(first, job).await?.1.as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    let p90 = lat.get(lat.len() * 9 / 10).copied().unwrap_or(f64::NAN);
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..16 {
        let client = clients[i % clients.len()].clone();
        let (job, done) = (job.clone(), done.clone());
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
    Ok(Service {
        latency_ms: median(lat),
        latency_p90_ms: p90,
        jobs_per_sec: done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64(),
    })
}

/// The resident memory of `pid`, MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Lines of `log` that say a peer was cut off.
fn cut_off_lines(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .map(|s| s.lines().filter(|l| l.contains("a peer cut off")).count())
        .unwrap_or(0)
}

/// Runs the benchmark: each of `attacks` for `secs` seconds of measurement, the attacker at
/// niceness `nice`.
pub(crate) fn run(secs: f64, attacks: &[Attack], nice: u8) -> Result<HostileReport, Failure> {
    let tmp = tempfile::Builder::new()
        .prefix("mvm-bench-hostile-")
        .tempdir()
        .map_err(Failure::failed)?;
    let d = tmp.path();
    let trivial = trivial_job(d)?;
    let net = NetArgs {
        transport: Transport::Tcp,
        links: LinksArg::Plain,
        request_rate: mvm_superpeer::net::REQUEST_RATE,
    };
    let lab = Lab::start(&d.join("lab"), 2, 1, false, net)?;
    let (sp_pid, sp_log) = lab
        .daemon("superpeer")
        .ok_or_else(|| Failure::failed(anyhow::anyhow!("the lab has no super-peer")))?;
    let ca = Ca::load(&lab.dir().join("ca")).map_err(|e| Failure::failed(anyhow::anyhow!(e)))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Failure::failed)?;
    let broker = lab.broker.clone();
    let issue = |name: String, out: &Path| {
        let subject = Subject {
            kind: PrincipalKind::User,
            name,
            roles: vec!["researcher".into()],
        };
        ca.issue(&subject, out, None, 30)
            .map_err(|e| Failure::failed(anyhow::anyhow!(e)))
    };
    let mut users = Vec::new();
    for i in 0..4 {
        let out = d.join(format!("user-{i}"));
        issue(format!("user{i}"), &out)?;
        users.push(Credentials::load(&out, &[]).map_err(|e| Failure::failed(anyhow::anyhow!(e)))?);
    }
    let clients = rt.block_on(async {
        let mut clients = Vec::new();
        for u in &users {
            let c = Client::find(u, std::slice::from_ref(&broker))
                .await
                .map_err(wire)?;
            for _ in 0..10 {
                run_one(&c, &trivial).await?;
            }
            clients.push(c);
        }
        Ok::<_, Failure>(clients)
    })?;
    let client = clients.as_slice();
    let quiet_before = rt.block_on(service(client, &trivial, secs / 2.0))?;
    let superpeer_rss_quiet_mib = rss_mib(sp_pid);
    let mut runs = Vec::new();
    for (i, attack) in attacks.iter().enumerate() {
        let identity = d.join(format!("attacker-{i}"));
        if *attack != Attack::Strangers {
            issue(format!("mallory{i}"), &identity)?;
        }
        let logged_before = cut_off_lines(&sp_log);
        // The attack runs a second before the users are measured, and after, until the
        // attacker is cut off (strangers never are) or 90 s have passed.
        let started = Instant::now();
        let mut child = attacker_process(&identity, &broker, *attack, 600.0, d, nice)?;
        let rss_start = rss_mib(sp_pid);
        // Every 100 ms: the super-peer's memory, and whether it has logged the cut yet.
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let (sampling, log) = (sampling.clone(), sp_log.clone());
            std::thread::spawn(move || {
                let mut max = 0f64;
                let mut cut = None;
                while sampling.load(Ordering::Relaxed) {
                    max = max.max(rss_mib(sp_pid));
                    if cut.is_none() && cut_off_lines(&log) > logged_before {
                        cut = Some(started.elapsed().as_secs_f64());
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                (max, cut)
            })
        };
        std::thread::sleep(Duration::from_secs(1));
        let measured = rt.block_on(service(client, &trivial, secs / 2.0));
        while *attack != Attack::Strangers
            && started.elapsed() < Duration::from_secs(90)
            && cut_off_lines(&sp_log) == logged_before
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        // The attacker stops when its standard input closes, and prints its tally.
        drop(child.stdin.take());
        let out = child.wait_with_output().map_err(Failure::failed)?;
        sampling.store(false, Ordering::Relaxed);
        let (rss_max, cut_off_after_secs) = sampler.join().unwrap_or((f64::NAN, None));
        let service = measured?;
        let attacker: Tally = serde_json::from_slice(&out.stdout).map_err(|e| {
            Failure::failed(anyhow::anyhow!(
                "the {} attacker's tally: {e}: {}",
                attack.name(),
                String::from_utf8_lossy(&out.stderr)
            ))
        })?;
        let logged = cut_off_lines(&sp_log) > logged_before;
        runs.push((
            *attack,
            service,
            (rss_start, rss_max),
            attacker,
            logged,
            cut_off_after_secs,
        ));
    }
    let quiet_after = rt.block_on(service(client, &trivial, secs / 2.0))?;
    let quiet = Service {
        latency_ms: (quiet_before.latency_ms + quiet_after.latency_ms) / 2.0,
        latency_p90_ms: (quiet_before.latency_p90_ms + quiet_after.latency_p90_ms) / 2.0,
        jobs_per_sec: (quiet_before.jobs_per_sec + quiet_after.jobs_per_sec) / 2.0,
    };
    let attacks = runs
        .into_iter()
        .map(
            |(attack, service, rss, attacker, logged, after)| AttackRun {
                attack,
                latency_ratio: service.latency_ms / quiet.latency_ms,
                throughput_ratio: service.jobs_per_sec / quiet.jobs_per_sec,
                service,
                superpeer_rss_start_mib: rss.0,
                superpeer_rss_max_mib: rss.1,
                attacker,
                cut_off_logged: logged,
                cut_off_after_secs: after,
            },
        )
        .collect();
    drop(lab);
    Ok(HostileReport {
        secs,
        quiet,
        quiet_runs: vec![quiet_before, quiet_after],
        superpeer_rss_quiet_mib,
        attacks,
    })
}

/// Starts the attacker: this program, at niceness `nice`, as `mvm bench hostile-peer`.
fn attacker_process(
    identity: &Path,
    broker: &str,
    attack: Attack,
    secs: f64,
    dir: &Path,
    nice: u8,
) -> Result<std::process::Child, Failure> {
    let exe = std::env::current_exe().map_err(Failure::failed)?;
    let stderr = std::fs::File::create(dir.join(format!("attacker-{}.log", attack.name())))
        .map_err(Failure::failed)?;
    Command::new("nice")
        .args(["-n", &nice.to_string()])
        .arg(exe)
        .args([
            "bench",
            "hostile-peer",
            "--attack",
            attack.name(),
            "--broker",
        ])
        .arg(broker)
        .arg("--identity")
        .arg(identity)
        .args(["--secs", &format!("{secs}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|e| Failure::failed(anyhow::anyhow!("nice: {e}")))
}

/// The attacker's side (`mvm bench hostile-peer`): runs `attack` on the super-peer at
/// `broker` as the identity in `identity` (none for strangers) until `secs` have passed or its
/// standard input closes, then prints its tally as JSON.
pub(crate) fn attacker(
    identity: &Path,
    broker: &str,
    attack: Attack,
    secs: f64,
) -> Result<(), Failure> {
    let (peer, addr) = mvm_superpeer::net::split_peer(broker)
        .map_err(|e| Failure::input(anyhow::anyhow!("--broker: {e}")))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(Failure::failed)?;
    // Stops early when its standard input closes.
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1];
            let _ = std::io::Read::read(&mut std::io::stdin(), &mut buf);
            stop.store(true, Ordering::Relaxed);
        });
    }
    let tally = rt.block_on(async {
        // Strangers have a certificate of a CA nobody trusts (and never show it).
        let unknown = tempfile::tempdir().map_err(Failure::failed)?;
        let creds = if attack == Attack::Strangers {
            let ca = Ca::init(&unknown.path().join("ca"), "nowhere", 1)
                .map_err(|e| Failure::failed(anyhow::anyhow!(e)))?;
            let subject = Subject {
                kind: PrincipalKind::User,
                name: "stranger".into(),
                roles: Vec::new(),
            };
            Credentials::ephemeral(&ca, &subject)
        } else {
            Credentials::load(identity, &[])
        }
        .map_err(|e| Failure::failed(anyhow::anyhow!(e)))?;
        let config = mvm_superpeer::net::NetConfig {
            listen: vec![
                "/ip4/127.0.0.1/tcp/0"
                    .parse()
                    .map_err(|e| Failure::failed(anyhow::anyhow!("{e}")))?,
            ],
            ..Default::default()
        };
        let (net, _inbound) = mvm_superpeer::net::Net::start(&creds, &config)
            .await
            .map_err(Failure::failed)?;
        Ok::<_, Failure>(
            mvm_superpeer::net::hostile::run(&net, peer, &[addr], attack, until, &stop).await,
        )
    })?;
    println!(
        "{}",
        serde_json::to_string(&tally).map_err(Failure::failed)?
    );
    Ok(())
}

/// The text form.
pub(crate) fn text(r: &HostileReport) -> String {
    let mut s = format!(
        "a hostile peer against a super-peer (1 super-peer, 2 nodes): a user's trivial jobs\n  \
         quiet        latency {:.2} ms (p90 {:.2})  {:.0} jobs/s   super-peer RSS {:.0} MiB\n",
        r.quiet.latency_ms, r.quiet.latency_p90_ms, r.quiet.jobs_per_sec, r.superpeer_rss_quiet_mib
    );
    for a in &r.attacks {
        s.push_str(&format!(
            "  {:<12} latency {:.2} ms (p90 {:.2}, x{:.2})  {:.0} jobs/s (x{:.2})  RSS {:.0} -> max {:.0} MiB  \
             attacker: {} sent, {} answered, {} failed, cut off {}{}\n",
            a.attack.name(),
            a.service.latency_ms,
            a.service.latency_p90_ms,
            a.latency_ratio,
            a.service.jobs_per_sec,
            a.throughput_ratio,
            a.superpeer_rss_start_mib,
            a.superpeer_rss_max_mib,
            a.attacker.sent,
            a.attacker.answered,
            a.attacker.failed,
            a.attacker.cut_off,
            a.cut_off_after_secs
                .map(|s| format!(" (logged after {s:.1} s)"))
                .unwrap_or_default()
        ));
    }
    s.push_str(
        "  goal: latency at most x1.2 and throughput at least x0.8 of quiet, under every attack\n",
    );
    s
}
