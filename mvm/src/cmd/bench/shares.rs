//! `mvm bench shares`: whether a guest's CPU weight binds the job part that runs in it. One
//! host-driver guest per weight, all on CPU 0 (one vCPU each), each running a worker (`mvm
//! worker`, joined to its guest before its exec, as a node starts it) whose one vertex spins;
//! each worker's CPU time over a window, as a fraction of theirs together, against what the
//! weights ask for. Also what starting a worker costs: spawn, job handed over, a trivial part
//! run, its end read.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mvm_component::policy::{Principal, PrincipalKind};
use mvm_component::runtime::{Runtime, RuntimeConfig};
use mvm_os::Driver;
use mvm_os::guest::GuestSpec;
use mvm_os::host::{Cgroups, HostDriver, join_on_exec};
use mvm_superpeer::proto::{LimitSpec, MICRO};
use mvm_superpeer::worker::{WorkerEnd, WorkerJob, job_frames, read_end};
use serde::Serialize;

use crate::exit::Failure;

/// Spins until stopped.
const SPIN: &str = r#"(module (func (export "_start") (loop $l (br $l))))"#;

/// Ends at once.
const NOOP: &str = r#"(module (func (export "_start")))"#;

/// Trivial parts run to measure a worker's start.
const STARTS: usize = 20;

/// What the guests' shares are set from.
#[derive(Debug, Clone)]
pub(crate) enum Setting {
    /// Xen-style weights in units of the default (1 and 3 become 256 and 768).
    Weights(Vec<u32>),
    /// Bid rates (micro-credits per CPU-second), through the market's auctioneer, and a
    /// change of one bid after the first window (its index, its new rate).
    Bids(Vec<u64>, Option<(usize, u64)>),
}

/// A change of bid, and how the shares followed it.
#[derive(Debug, Serialize)]
pub(crate) struct Rebid {
    /// The part whose bid changed (its index).
    pub(crate) part: usize,
    /// Its new rate, credits per CPU-second.
    pub(crate) rate: f64,
    /// What the bids then ask for.
    pub(crate) expected: Vec<f64>,
    /// The shares measured over a window once they settled.
    pub(crate) shares: Vec<f64>,
    /// The largest difference then, in points.
    pub(crate) max_error_points: f64,
    /// From the change until a 500 ms window's shares were within 3 points of what the new
    /// bids ask for, milliseconds (goal: within 2 s).
    pub(crate) settle_ms: f64,
}

/// What `mvm bench shares` measured.
#[derive(Debug, Serialize)]
pub(crate) struct SharesReport {
    /// The weights set (Xen-style: 256 is the default).
    pub(crate) weights: Vec<u32>,
    /// The bid rates, credits per CPU-second, when the shares were set by bids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) bids: Option<Vec<f64>>,
    /// What each part was charged at its rate for the CPU time its guest's control group
    /// counted over the whole run, credits (by bids only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) charged: Option<Vec<f64>>,
    /// The largest difference between a charge and the part's CPU time × its rate, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) charge_error_percent: Option<f64>,
    /// The change of bid, when one was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rebid: Option<Rebid>,
    /// Each worker's measured fraction of the CPU time the workers had, in the weights' order.
    pub(crate) shares: Vec<f64>,
    /// What the weights ask for.
    pub(crate) expected: Vec<f64>,
    /// The largest difference between a share and what its weight asks for, in points.
    pub(crate) max_error_points: f64,
    /// The window measured, seconds.
    pub(crate) seconds: f64,
    /// The cgroup interface (`v1`, `v2`).
    pub(crate) cgroups: &'static str,
    /// A worker's start to its trivial part's end read, milliseconds: median and maximum of
    /// [`STARTS`].
    pub(crate) worker_start_ms_median: f64,
    /// See `worker_start_ms_median`.
    pub(crate) worker_start_ms_max: f64,
}

/// Guests under a parent group of the bench's own, removed at the end.
struct Guests {
    driver: HostDriver,
    group: String,
    workers: Vec<Child>,
}

impl Drop for Guests {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        for g in self.driver.list().unwrap_or_default() {
            let _ = self.driver.destroy(&g.name);
        }
        for c in ["cpu", "cpuacct", "memory", "freezer", "cpuset", ""] {
            let _ = std::fs::remove_dir(PathBuf::from("/sys/fs/cgroup").join(c).join(&self.group));
        }
    }
}

fn failed(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure::failed(anyhow::anyhow!("bench shares: {what}: {e}"))
}

/// A worker of `exe` joined to guest `guest`, handed `frame`.
fn start(exe: &PathBuf, driver: &HostDriver, guest: &str, frame: &[u8]) -> Result<Child, Failure> {
    use std::io::Write;

    let join = driver
        .join_files(guest)
        .map_err(|e| failed("a guest", e))?
        .unwrap_or_default();
    let mut cmd = Command::new(exe);
    cmd.arg("worker")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    join_on_exec(&mut cmd, &join).map_err(|e| failed("joining a guest", e))?;
    let mut child = cmd.spawn().map_err(|e| failed("starting a worker", e))?;
    // The pipe stays open (in `child`) while the part runs: a worker whose pipe closes ends.
    if let Some(stdin) = child.stdin.as_mut() {
        stdin
            .write_all(frame)
            .and_then(|()| stdin.flush())
            .map_err(|e| failed("handing a worker its job", e))?;
    }
    Ok(child)
}

/// CPU seconds process `pid` has used (all its threads).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf with a valid name has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Each part's fraction of the CPU time in `used`.
fn fractions(used: &[f64]) -> Vec<f64> {
    let total: f64 = used.iter().sum();
    used.iter()
        .map(|u| u / total.max(f64::MIN_POSITIVE))
        .collect()
}

/// The largest difference between `shares` and `expected`, in points.
fn error_points(shares: &[f64], expected: &[f64]) -> f64 {
    shares
        .iter()
        .zip(expected)
        .map(|(s, e)| (s - e).abs() * 100.0)
        .fold(0.0, f64::max)
}

/// Measures the shares `setting` asks for over `secs` seconds.
pub(crate) fn run(setting: &Setting, secs: f64) -> Result<SharesReport, Failure> {
    // The weights, and what they ask for: set directly, or by the auctioneer from bids.
    let mut auction = mvm_superpeer::market::Auctioneer::default();
    let (weights, expected): (Vec<u32>, Vec<f64>) = match setting {
        Setting::Weights(w) => {
            let sum: u32 = w.iter().sum();
            (
                w.iter()
                    .map(|x| x.saturating_mul(256).clamp(1, 65535))
                    .collect(),
                w.iter()
                    .map(|&x| f64::from(x) / f64::from(sum.max(1)))
                    .collect(),
            )
        }
        Setting::Bids(rates, _) => {
            for (i, &rate) in rates.iter().enumerate() {
                let bid = mvm_superpeer::market::Bid {
                    payer: format!("user:bench{i}@default"),
                    rate,
                };
                auction.bid(&part(i), bid).map_err(|e| failed("a bid", e))?;
            }
            (
                auction.weights().into_iter().map(|w| w.1).collect(),
                auction.shares().into_iter().map(|s| s.1).collect(),
            )
        }
    };
    let exe = std::env::current_exe().map_err(|e| failed("this program", e))?;
    let group = format!("mvm-bench-shares-{}", std::process::id());
    let mut g = Guests {
        driver: HostDriver::new(&group),
        group,
        workers: Vec::new(),
    };
    let cgroups = match g.driver.cgroups() {
        Cgroups::V1 { .. } => "v1",
        Cgroups::V2 { .. } => "v2",
        Cgroups::None => {
            return Err(Failure::failed(anyhow::anyhow!(
                "bench shares: no writable control groups here (run as root)"
            )));
        }
    };
    let rt = Runtime::new(&RuntimeConfig {
        max_instances: 4,
        ..RuntimeConfig::default()
    })
    .map_err(|e| failed("runtime", e))?;
    let job = |wat: &str| -> Result<Vec<u8>, Failure> {
        let (m, _, _) = rt
            .cache()
            .load("c", wat.as_bytes())
            .map_err(|e| failed("module", e))?;
        let bytes = m.serialize().map_err(|e| failed("module", e))?;
        job_frames(&WorkerJob {
            space: "bench".into(),
            topology_file: "one.dot".into(),
            topology: "digraph one { v [component=c]; }".into(),
            queue: Default::default(),
            modules: vec![("c".into(), bytes.into())],
            parameters: Default::default(),
            limits: LimitSpec::default(),
            placement: vec![0],
            here: 0,
            owner: Principal {
                kind: PrincipalKind::User,
                name: "bench".into(),
                domain: "default".into(),
                roles: Vec::new(),
            },
            max_memory_bytes: rt.max_memory_bytes() as u64,
            restore: None,
            sandboxes: Default::default(),
            guest_files: None,
        })
        .map_err(|e| failed("job", e))
    };
    let guest = |name: &str, weight: u32| GuestSpec {
        name: name.into(),
        mode: mvm_os::guest::Mode::Pv,
        kernel: None,
        ramdisk: None,
        cmdline: None,
        vcpus: 1,
        memory_mib: 256,
        disks: Vec::new(),
        nics: Vec::new(),
        weight: Some(weight),
        cap: None,
    };

    // A worker's start, to its trivial part's end.
    g.driver
        .create(&guest("start", 256))
        .map_err(|e| failed("a guest", e))?;
    let noop = job(NOOP)?;
    let mut starts = Vec::with_capacity(STARTS);
    for _ in 0..STARTS {
        let t = Instant::now();
        let mut w = start(&exe, &g.driver, "start", &noop)?;
        let end = w
            .stdout
            .take()
            .ok_or_else(|| failed("a worker", "no stdout"))
            .and_then(|mut o| read_end(&mut o).map_err(|e| failed("a worker's end", e)))?;
        let _ = w.wait();
        if let WorkerEnd::Failed(f) = end {
            return Err(failed("a trivial part", f.cause));
        }
        starts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    starts.sort_by(f64::total_cmp);

    // The shares: every guest on CPU 0, each with a spinning worker.
    let spin = job(SPIN)?;
    for (i, &w) in weights.iter().enumerate() {
        let name = part(i);
        g.driver
            .create(&guest(&name, w))
            .map_err(|e| failed("a guest", e))?;
        let worker = start(&exe, &g.driver, &name, &spin)?;
        g.workers.push(worker);
    }
    // Past the workers' start, then the window.
    std::thread::sleep(Duration::from_millis(500));
    let pids: Vec<u32> = g.workers.iter().map(Child::id).collect();
    let before: Vec<f64> = pids.iter().map(|&p| cpu_secs(p)).collect();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let after: Vec<f64> = pids.iter().map(|&p| cpu_secs(p)).collect();
    let seconds = t.elapsed().as_secs_f64();
    let used: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    if used.iter().sum::<f64>() <= 0.0 {
        return Err(failed("the workers", "used no CPU time"));
    }
    let shares = fractions(&used);
    let max_error_points = error_points(&shares, &expected);
    // What each part owes for the CPU time its guest's control group counted, at the rate in
    // force (the auctioneer's meter, run at every change of bid and at the end), against that
    // time × that rate.
    let mut meter = Meter::default();
    let rebid = match setting {
        Setting::Bids(rates, Some((i, rate))) => {
            meter.all(&g, &mut auction, rates)?;
            let mut now = rates.clone();
            now[*i] = *rate;
            let r = rebid(&g, &pids, &mut auction, *i, *rate, secs)?;
            meter.all(&g, &mut auction, &now)?;
            Some(r)
        }
        Setting::Bids(rates, None) => {
            meter.all(&g, &mut auction, rates)?;
            None
        }
        Setting::Weights(_) => None,
    };
    let (bids, charged, charge_error_percent) = match setting {
        Setting::Weights(_) => (None, None, None),
        Setting::Bids(rates, _) => {
            let worst = meter
                .charged
                .iter()
                .zip(&meter.want)
                .filter(|(_, w)| **w > 0.0)
                .map(|(c, w)| (*c as f64 - w).abs() / w * 100.0)
                .fold(0.0, f64::max);
            let credits = |v: &[u64]| v.iter().map(|&r| r as f64 / MICRO as f64).collect();
            (
                Some(credits(rates)),
                Some(credits(&meter.charged)),
                Some(worst),
            )
        }
    };
    Ok(SharesReport {
        bids,
        charged,
        charge_error_percent,
        rebid,
        weights: weights.clone(),
        shares,
        expected,
        max_error_points,
        seconds,
        cgroups,
        worker_start_ms_median: starts[starts.len() / 2],
        worker_start_ms_max: starts.last().copied().unwrap_or(0.0),
    })
}

/// What the parts were charged, and what their CPU time at the rates in force came to.
#[derive(Default)]
struct Meter {
    /// Each guest's CPU seconds at the last metering.
    cpu: Vec<f64>,
    /// Micro-credits charged by the auctioneer.
    charged: Vec<u64>,
    /// CPU seconds × rate, micro-credits.
    want: Vec<f64>,
}

impl Meter {
    /// Meters every part at the rates in force (`rates`), as its guest's control group counts
    /// its CPU time now.
    fn all(
        &mut self,
        g: &Guests,
        auction: &mut mvm_superpeer::market::Auctioneer,
        rates: &[u64],
    ) -> Result<(), Failure> {
        self.cpu.resize(rates.len(), 0.0);
        self.charged.resize(rates.len(), 0);
        self.want.resize(rates.len(), 0.0);
        for (i, &rate) in rates.iter().enumerate() {
            let cpu = g
                .driver
                .inspect(&part(i))
                .map_err(|e| failed("a guest", e))?
                .cpu_seconds;
            if let Some(c) = auction.meter(&part(i), cpu) {
                self.charged[i] += c.micro;
            }
            self.want[i] += (cpu - self.cpu[i]) * rate as f64;
            self.cpu[i] = cpu;
        }
        Ok(())
    }
}

/// A part's guest's name.
fn part(i: usize) -> String {
    format!("s{i}")
}

/// Changes part `i`'s bid to `rate` (the auctioneer's new weights set on every guest), then
/// measures 500 ms windows until the shares are within 3 points of what the bids ask for,
/// and a window of `secs` after.
fn rebid(
    g: &Guests,
    pids: &[u32],
    auction: &mut mvm_superpeer::market::Auctioneer,
    i: usize,
    rate: u64,
    secs: f64,
) -> Result<Rebid, Failure> {
    let payer = format!("user:bench{i}@default");
    auction
        .bid(&part(i), mvm_superpeer::market::Bid { payer, rate })
        .map_err(|e| failed("a bid", e))?;
    let expected: Vec<f64> = auction.shares().into_iter().map(|s| s.1).collect();
    let changed = Instant::now();
    for (name, weight) in auction.weights() {
        g.driver
            .set_sched(&name, mvm_os::driver::Sched { weight, cap: 0 })
            .map_err(|e| failed("a guest's weight", e))?;
    }
    let cpu = || pids.iter().map(|&p| cpu_secs(p)).collect::<Vec<f64>>();
    let diff = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<f64>>();
    let settle_ms = loop {
        let before = cpu();
        std::thread::sleep(Duration::from_millis(500));
        let shares = fractions(&diff(&cpu(), &before));
        if error_points(&shares, &expected) <= 3.0 {
            break changed.elapsed().as_secs_f64() * 1e3;
        }
        if changed.elapsed() > Duration::from_secs(30) {
            return Err(failed(
                "a change of bid",
                format!("the shares never came within 3 points of {expected:?}: {shares:?}"),
            ));
        }
    };
    let before = cpu();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let shares = fractions(&diff(&cpu(), &before));
    Ok(Rebid {
        part: i,
        rate: rate as f64 / MICRO as f64,
        max_error_points: error_points(&shares, &expected),
        expected,
        shares,
        settle_ms,
    })
}

/// The report for people.
pub(crate) fn text(r: &SharesReport) -> String {
    let pct = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{:.1} %", x * 100.0))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let set = match &r.bids {
        Some(b) => format!("bid rates {b:?} (weights {:?})", r.weights),
        None => format!("weights {:?}", r.weights),
    };
    let mut s = format!(
        "guest CPU shares on one core (host driver, cgroup {}), {set}, {:.1} s\n  \
         measured {}  asked {}  largest error {:.1} points (goal <= 3)",
        r.cgroups,
        r.seconds,
        pct(&r.shares),
        pct(&r.expected),
        r.max_error_points,
    );
    if let Some(b) = &r.rebid {
        s.push_str(&format!(
            "\n  bid {} to {}: within 3 points after {:.0} ms (goal <= 2000); then measured {}  \
             asked {}  largest error {:.1} points",
            b.part,
            b.rate,
            b.settle_ms,
            pct(&b.shares),
            pct(&b.expected),
            b.max_error_points
        ));
    }
    if let (Some(c), Some(e)) = (&r.charged, r.charge_error_percent) {
        s.push_str(&format!(
            "\n  charged (credits, at the rates, for the CPU time each guest's control group \
             counted) {c:.3?}; largest difference from time x rate {e:.3} % (goal <= 1)"
        ));
    }
    s.push_str(&format!(
        "\n  a worker's start to its trivial part's end: median {:.2} ms, max {:.2} ms ({} starts)",
        r.worker_start_ms_median, r.worker_start_ms_max, STARTS
    ));
    s
}
