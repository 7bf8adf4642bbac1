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
use mvm_superpeer::proto::LimitSpec;
use mvm_superpeer::worker::{WorkerEnd, WorkerJob, job_frames, read_end};
use serde::Serialize;

use crate::exit::Failure;

/// Spins until stopped.
const SPIN: &str = r#"(module (func (export "_start") (loop $l (br $l))))"#;

/// Ends at once.
const NOOP: &str = r#"(module (func (export "_start")))"#;

/// Trivial parts run to measure a worker's start.
const STARTS: usize = 20;

/// What `mvm bench shares` measured.
#[derive(Debug, Serialize)]
pub(crate) struct SharesReport {
    /// The weights, as given.
    pub(crate) weights: Vec<u32>,
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
        for c in ["cpu", "memory", "freezer", "cpuset", ""] {
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

/// Measures `weights` (Xen-style: 1 and 3 become 256 and 768) over `secs` seconds.
pub(crate) fn run(weights: &[u32], secs: f64) -> Result<SharesReport, Failure> {
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
        let name = format!("s{i}");
        g.driver
            .create(&guest(&name, w.saturating_mul(256).clamp(1, 65535)))
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
    let total: f64 = used.iter().sum();
    if total <= 0.0 {
        return Err(failed("the workers", "used no CPU time"));
    }
    let shares: Vec<f64> = used.iter().map(|u| u / total).collect();
    let sum: u32 = weights.iter().sum();
    let expected: Vec<f64> = weights
        .iter()
        .map(|&w| f64::from(w) / f64::from(sum.max(1)))
        .collect();
    let max_error_points = shares
        .iter()
        .zip(&expected)
        .map(|(s, e)| (s - e).abs() * 100.0)
        .fold(0.0, f64::max);
    Ok(SharesReport {
        weights: weights.to_vec(),
        shares,
        expected,
        max_error_points,
        seconds,
        cgroups,
        worker_start_ms_median: starts[starts.len() / 2],
        worker_start_ms_max: starts.last().copied().unwrap_or(0.0),
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
    format!(
        "guest CPU shares on one core (host driver, cgroup {}), weights {:?}, {:.1} s\n  \
         measured {}  asked {}  largest error {:.1} points (goal <= 3)\n  \
         a worker's start to its trivial part's end: median {:.2} ms, max {:.2} ms ({} starts)",
        r.cgroups,
        r.weights,
        r.seconds,
        pct(&r.shares),
        pct(&r.expected),
        r.max_error_points,
        r.worker_start_ms_median,
        r.worker_start_ms_max,
        STARTS
    )
}
