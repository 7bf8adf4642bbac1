//! The host driver: the embedded default where there is no hypervisor.
//!
//! A "guest" is a control group of the host: CPU weight and cap, memory limit, the CPUs it may
//! use, and freezing stand for Xen's weight, cap, memory, vCPUs and pause. Processes are placed
//! in it with [`HostDriver::attach`]. Both cgroup v2 (a unified hierarchy with the cpu and
//! memory controllers) and v1 (one hierarchy per controller) are used; where neither can be
//! written, guests are names only, the host itself, and the limits are recorded, not enforced.
//! Checkpoints and migration need a hypervisor: those calls say so.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::driver::{Driver, DriverError, GuestInfo, Sched, State};
use crate::guest::GuestSpec;

/// How long a pause of a v1 freezer group is tried again while it reads FREEZING.
const FREEZE_WAIT: Duration = Duration::from_secs(2);

/// Which cgroup interface the driver uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// cgroup v2: one directory per guest under `root`.
    V2 {
        /// The driver's parent group, e.g. `/sys/fs/cgroup/mvm`.
        root: PathBuf,
    },
    /// cgroup v1: one directory per guest under each controller's parent group.
    V1 {
        /// `cpu` (weight as shares, cap as CFS quota).
        cpu: PathBuf,
        /// `memory`.
        memory: Option<PathBuf>,
        /// `freezer` (pause).
        freezer: Option<PathBuf>,
        /// `cpuset` (vCPUs).
        cpuset: Option<PathBuf>,
        /// `cpuacct` when it is a hierarchy of its own (CPU time used); none when it is
        /// mounted with `cpu` (then read there).
        cpuacct: Option<PathBuf>,
    },
    /// No writable cgroups: guests are the host itself.
    None,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Record {
    vcpus: u32,
    memory_mib: u64,
    sched: Sched,
    paused: bool,
}

/// A host guest as [`HostDriver::save`] writes it.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedGuest {
    name: String,
    record: Record,
}

/// Makes the process `cmd` starts join the control groups whose `cgroup.procs` files are
/// `files` (see [`Driver::join_files`]) between its fork and its exec, so that nothing it runs
/// runs outside them: the files are opened now, and the child writes `0` (itself) to each.
///
/// # Errors
/// A file cannot be opened for writing; the spawn fails if the child cannot join.
pub fn join_on_exec(cmd: &mut std::process::Command, files: &[PathBuf]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;

    let open = files
        .iter()
        .map(|f| {
            fs::OpenOptions::new()
                .write(true)
                .open(f)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", f.display())))
        })
        .collect::<io::Result<Vec<fs::File>>>()?;
    let hook = move || -> io::Result<()> {
        for f in &open {
            // SAFETY: `write` is async-signal-safe, `f` is an open descriptor owned by the
            // closure (inherited by the child), and the buffer is a static byte.
            let n = unsafe { libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) };
            if n != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook only calls `write(2)`, which is async-signal-safe, allocates nothing
    // and takes no lock.
    unsafe {
        cmd.pre_exec(hook);
    }
    Ok(())
}

/// Guests as control groups of this host.
#[derive(Debug)]
pub struct HostDriver {
    cg: Cgroups,
    /// What was asked of each guest (for the none mode, and for reading weights back exactly).
    records: Mutex<BTreeMap<String, Record>>,
}

fn write(path: &Path, value: &str) -> Result<(), DriverError> {
    fs::write(path, value).map_err(DriverError::io(path))
}

fn read(path: &Path) -> Result<String, DriverError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(DriverError::io(path))
}

fn host_cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
}

/// Xen weight (default 256) to cgroup v2 `cpu.weight` (default 100, 1–10000).
fn v2_weight(w: u32) -> u64 {
    ((u64::from(w) * 100 + 128) / 256).clamp(1, 10000)
}

/// Xen weight to cgroup v1 `cpu.shares` (default 1024, at least 2).
fn v1_shares(w: u32) -> u64 {
    (u64::from(w) * 4).max(2)
}

const PERIOD_US: u64 = 100_000;

impl HostDriver {
    /// A driver whose guests live under a group named `group` (e.g. `mvm`), with whichever
    /// cgroup interface this host offers.
    pub fn new(group: &str) -> HostDriver {
        let cg = detect(Path::new("/sys/fs/cgroup"), group);
        tracing::debug!(?cg, "host driver");
        HostDriver::with(cg)
    }

    /// A driver over the given interface.
    pub fn with(cg: Cgroups) -> HostDriver {
        HostDriver {
            cg,
            records: Mutex::new(BTreeMap::new()),
        }
    }

    /// The interface in use.
    pub fn cgroups(&self) -> &Cgroups {
        &self.cg
    }

    /// The guest's directory in each hierarchy it has one in.
    fn dirs(&self, name: &str) -> Vec<PathBuf> {
        match &self.cg {
            Cgroups::V2 { root } => vec![root.join(name)],
            Cgroups::V1 {
                cpu,
                memory,
                freezer,
                cpuset,
                cpuacct,
            } => std::iter::once(cpu)
                .chain(memory)
                .chain(freezer)
                .chain(cpuset)
                .chain(cpuacct)
                .map(|p| p.join(name))
                .collect(),
            Cgroups::None => Vec::new(),
        }
    }

    fn exists(&self, name: &str) -> bool {
        match &self.cg {
            Cgroups::None => self.records().contains_key(name),
            _ => self.dirs(name).first().is_some_and(|d| d.is_dir()),
        }
    }

    fn records(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Record>> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn need(&self, name: &str) -> Result<(), DriverError> {
        if self.exists(name) {
            Ok(())
        } else {
            Err(DriverError::NotFound(name.to_owned()))
        }
    }

    /// Places process `pid` (and its future children) in guest `name`.
    ///
    /// # Errors
    /// [`DriverError::NotFound`], or the process cannot be moved.
    pub fn attach(&self, name: &str, pid: u32) -> Result<(), DriverError> {
        self.need(name)?;
        for d in self.dirs(name) {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The processes in guest `name`.
    ///
    /// # Errors
    /// [`DriverError::NotFound`].
    pub fn processes(&self, name: &str) -> Result<Vec<u32>, DriverError> {
        self.need(name)?;
        let Some(d) = self.dirs(name).into_iter().next() else {
            return Ok(Vec::new());
        };
        Ok(read(&d.join("cgroup.procs"))?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    fn set_frozen(&self, name: &str, frozen: bool) -> Result<(), DriverError> {
        self.need(name)?;
        match &self.cg {
            Cgroups::V2 { root } => {
                write(
                    &root.join(name).join("cgroup.freeze"),
                    if frozen { "1" } else { "0" },
                )?;
            }
            Cgroups::V1 {
                freezer: Some(f), ..
            } => {
                let state = if frozen { "FROZEN" } else { "THAWED" };
                let file = f.join(name).join("freezer.state");
                write(&file, state)?;
                // A v1 freezer that could not freeze every task at once (one forking, or in
                // the middle of a system call) stays FREEZING and tries again only when
                // FROZEN is written again: write it until it holds, for a while.
                let deadline = Instant::now() + FREEZE_WAIT;
                while frozen && read(&file).is_ok_and(|s| s == "FREEZING") {
                    if Instant::now() >= deadline {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    write(&file, state)?;
                }
            }
            Cgroups::V1 { freezer: None, .. } | Cgroups::None => {
                return Err(DriverError::Unsupported {
                    driver: "host",
                    op: "pause without a freezer cgroup",
                });
            }
        }
        if let Some(r) = self.records().get_mut(name) {
            r.paused = frozen;
        }
        Ok(())
    }

    fn is_frozen(&self, name: &str) -> bool {
        match &self.cg {
            Cgroups::V2 { root } => read(&root.join(name).join("cgroup.events"))
                .map(|e| e.lines().any(|l| l == "frozen 1"))
                .unwrap_or(false),
            Cgroups::V1 {
                freezer: Some(f), ..
            } => read(&f.join(name).join("freezer.state")).is_ok_and(|s| s == "FROZEN"),
            _ => self.records().get(name).is_some_and(|r| r.paused),
        }
    }

    fn apply_vcpus(&self, name: &str, vcpus: u32) -> Result<(), DriverError> {
        let n = vcpus.clamp(1, host_cpus());
        let cpus = if n == 1 {
            "0".to_owned()
        } else {
            format!("0-{}", n - 1)
        };
        match &self.cg {
            Cgroups::V2 { root } => {
                let f = root.join(name).join("cpuset.cpus");
                if f.exists() {
                    write(&f, &cpus)?;
                }
            }
            Cgroups::V1 {
                cpuset: Some(c), ..
            } => {
                let d = c.join(name);
                // A v1 cpuset group needs its memory nodes before it can take tasks.
                let mems = read(&c.join("cpuset.mems")).unwrap_or_else(|_| "0".into());
                write(&d.join("cpuset.mems"), &mems)?;
                write(&d.join("cpuset.cpus"), &cpus)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn apply_memory(&self, name: &str, mib: u64) -> Result<(), DriverError> {
        let bytes = (mib << 20).to_string();
        match &self.cg {
            Cgroups::V2 { root } => {
                write(&root.join(name).join("memory.max"), &bytes)?;
                // No swap: the limit binds instead of swapping.
                let swap = root.join(name).join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0")?;
                }
                Ok(())
            }
            Cgroups::V1 {
                memory: Some(m), ..
            } => {
                let d = m.join(name);
                let (mem, memsw) = (
                    d.join("memory.limit_in_bytes"),
                    d.join("memory.memsw.limit_in_bytes"),
                );
                if !memsw.exists() {
                    return write(&mem, &bytes);
                }
                // Memory and swap together, so the limit binds instead of swapping; the
                // kernel keeps memory+swap at least memory, so the order depends on the way.
                let now: u64 = read(&mem)?.parse().unwrap_or(u64::MAX);
                if mib << 20 > now {
                    write(&memsw, &bytes)?;
                    write(&mem, &bytes)
                } else {
                    write(&mem, &bytes)?;
                    write(&memsw, &bytes)
                }
            }
            _ => Ok(()),
        }
    }

    fn apply_sched(&self, name: &str, s: Sched) -> Result<(), DriverError> {
        match &self.cg {
            Cgroups::V2 { root } => {
                let d = root.join(name);
                write(&d.join("cpu.weight"), &v2_weight(s.weight).to_string())?;
                let max = if s.cap == 0 {
                    format!("max {PERIOD_US}")
                } else {
                    format!("{} {PERIOD_US}", u64::from(s.cap) * PERIOD_US / 100)
                };
                write(&d.join("cpu.max"), &max)
            }
            Cgroups::V1 { cpu, .. } => {
                let d = cpu.join(name);
                write(&d.join("cpu.shares"), &v1_shares(s.weight).to_string())?;
                write(&d.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                let quota = if s.cap == 0 {
                    "-1".to_owned()
                } else {
                    (u64::from(s.cap) * PERIOD_US / 100).to_string()
                };
                write(&d.join("cpu.cfs_quota_us"), &quota)
            }
            Cgroups::None => Ok(()),
        }
    }

    /// Reads weight and cap back from the cgroup files.
    fn read_sched(&self, name: &str) -> Result<Sched, DriverError> {
        let asked = self.records().get(name).map(|r| r.sched);
        let number = |p: &Path, s: &str| -> Result<u64, DriverError> {
            s.parse().map_err(|_| DriverError::Parse {
                command: format!("read {}", p.display()),
                message: format!("'{s}' is not a number"),
            })
        };
        // Each interface: the weight file, Xen weight to its units, and the CPU quota per
        // period (none when unlimited).
        let (weight_file, to_units, quota_file): (PathBuf, fn(u32) -> u64, PathBuf) = match &self.cg
        {
            Cgroups::V2 { root } => (
                root.join(name).join("cpu.weight"),
                v2_weight,
                root.join(name).join("cpu.max"),
            ),
            Cgroups::V1 { cpu, .. } => (
                cpu.join(name).join("cpu.shares"),
                v1_shares,
                cpu.join(name).join("cpu.cfs_quota_us"),
            ),
            Cgroups::None => {
                return asked.ok_or_else(|| DriverError::NotFound(name.to_owned()));
            }
        };
        let units = number(&weight_file, &read(&weight_file)?)?;
        // v2 writes "max PERIOD" or "QUOTA PERIOD", v1 "-1" or "QUOTA".
        let quota = read(&quota_file)?;
        let cap = match quota.split_whitespace().next() {
            Some("max") | None => 0,
            Some(q) if q.starts_with('-') => 0,
            Some(q) => u32::try_from(number(&quota_file, q)? * 100 / PERIOD_US).unwrap_or(u32::MAX),
        };
        // The file holds the weight scaled to cgroup units; report the weight that was asked
        // for when it is what the file holds, else the file's value scaled back.
        let weight = match asked {
            Some(a) if to_units(a.weight) == units => a.weight,
            _ => u32::try_from(units * 256 / to_units(256).max(1)).unwrap_or(u32::MAX),
        };
        Ok(Sched { weight, cap })
    }

    /// Kills every process of the guest and waits up to `wait` for the group to empty.
    fn kill_all(&self, name: &str, signal: i32, wait: Duration) -> Result<bool, DriverError> {
        if matches!(self.cg, Cgroups::None) {
            return Ok(true);
        }
        // Frozen processes cannot act on a signal. Thaw whatever the state reads: a group
        // still FREEZING (not yet FROZEN) holds its tasks too.
        let _ = self.set_frozen(name, false);
        let deadline = Instant::now() + wait;
        loop {
            let pids = self.processes(name)?;
            if pids.is_empty() {
                return Ok(true);
            }
            for p in pids {
                if let Ok(pid) = libc::pid_t::try_from(p) {
                    // SAFETY: kill(2) with a pid read from the group's cgroup.procs.
                    unsafe { libc::kill(pid, signal) };
                }
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn remove(&self, name: &str) -> Result<(), DriverError> {
        for d in self.dirs(name).iter().rev() {
            match fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(DriverError::io(d)(e)),
            }
        }
        self.records().remove(name);
        Ok(())
    }

    fn info(&self, name: &str) -> Result<GuestInfo, DriverError> {
        self.need(name)?;
        let r = self.records().get(name).cloned();
        let state = if self.is_frozen(name) {
            State::Paused
        } else if matches!(self.cg, Cgroups::None)
            || self.processes(name).is_ok_and(|p| !p.is_empty())
        {
            State::Running
        } else {
            State::Blocked
        };
        Ok(GuestInfo {
            name: name.to_owned(),
            id: None,
            state,
            vcpus: r.as_ref().map_or(host_cpus(), |r| r.vcpus),
            memory_mib: r.as_ref().map_or(0, |r| r.memory_mib),
            cpu_seconds: self.cpu_seconds(name),
        })
    }

    fn cpu_seconds(&self, name: &str) -> f64 {
        match &self.cg {
            Cgroups::V2 { root } => read(&root.join(name).join("cpu.stat"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("usage_usec "))
                        .and_then(|v| v.parse::<f64>().ok())
                })
                .map_or(0.0, |us| us / 1e6),
            Cgroups::V1 { cpu, cpuacct, .. } => {
                // cpuacct is mounted with cpu, or is a hierarchy of its own.
                read(
                    &cpuacct
                        .as_ref()
                        .unwrap_or(cpu)
                        .join(name)
                        .join("cpuacct.usage"),
                )
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .map_or(0.0, |ns| ns / 1e9)
            }
            Cgroups::None => 0.0,
        }
    }
}

/// Finds a writable cgroup interface under `base` and makes the parent group `group` in it.
fn detect(base: &Path, group: &str) -> Cgroups {
    let v2 = base.join("cgroup.controllers");
    if let Ok(c) = fs::read_to_string(&v2) {
        let has: Vec<&str> = c.split_whitespace().collect();
        if has.contains(&"cpu") && has.contains(&"memory") {
            let root = base.join(group);
            let enable = has
                .iter()
                .filter(|c| ["cpu", "memory", "cpuset"].contains(c))
                .map(|c| format!("+{c}"))
                .collect::<Vec<_>>()
                .join(" ");
            let ok = fs::create_dir_all(&root).is_ok()
                && fs::write(base.join("cgroup.subtree_control"), &enable).is_ok()
                && fs::write(root.join("cgroup.subtree_control"), &enable).is_ok();
            if ok {
                return Cgroups::V2 { root };
            }
        }
    }
    let v1 = |c: &str| {
        let d = base.join(c);
        if !d.join("cgroup.procs").exists() {
            return None;
        }
        let g = d.join(group);
        fs::create_dir_all(&g).ok()?;
        Some(g)
    };
    if let Some(cpu) = v1("cpu") {
        let cpuset = v1("cpuset").filter(|g| {
            // A v1 cpuset parent needs CPUs and memory nodes before children can use it.
            let from = |f: &str| fs::read_to_string(g.parent().unwrap_or(g).join(f)).ok();
            match (from("cpuset.cpus"), from("cpuset.mems")) {
                (Some(c), Some(m)) => {
                    fs::write(g.join("cpuset.cpus"), c.trim()).is_ok()
                        && fs::write(g.join("cpuset.mems"), m.trim()).is_ok()
                }
                _ => false,
            }
        });
        let cpuacct = if cpu.join("cpuacct.usage").exists() {
            None
        } else {
            v1("cpuacct")
        };
        return Cgroups::V1 {
            cpu,
            memory: v1("memory"),
            freezer: v1("freezer"),
            cpuset,
            cpuacct,
        };
    }
    Cgroups::None
}

impl Driver for HostDriver {
    fn kind(&self) -> &'static str {
        "host"
    }

    fn create(&self, spec: &GuestSpec) -> Result<GuestInfo, DriverError> {
        // Kernel, disks and NICs mean nothing for a group of host processes.
        spec.validate_resources()?;
        let name = spec.name.as_str();
        if self.exists(name) {
            return Err(DriverError::Exists(name.to_owned()));
        }
        let sched = Sched {
            weight: spec.weight.unwrap_or(256),
            cap: spec.cap.unwrap_or(0),
        };
        self.records().insert(
            name.to_owned(),
            Record {
                vcpus: spec.vcpus,
                memory_mib: u64::from(spec.memory_mib),
                sched,
                paused: false,
            },
        );
        let made = (|| {
            for d in self.dirs(name) {
                fs::create_dir(&d).map_err(DriverError::io(&d))?;
            }
            self.apply_vcpus(name, spec.vcpus)?;
            self.apply_memory(name, u64::from(spec.memory_mib))?;
            self.apply_sched(name, sched)
        })();
        if let Err(e) = made {
            let _ = self.remove(name);
            return Err(e);
        }
        self.info(name)
    }

    fn list(&self) -> Result<Vec<GuestInfo>, DriverError> {
        let names: Vec<String> = match &self.cg {
            Cgroups::None => self.records().keys().cloned().collect(),
            _ => {
                let first = self.dirs("x");
                let Some(parent) = first.first().and_then(|d| d.parent()) else {
                    return Ok(Vec::new());
                };
                let mut n: Vec<String> = fs::read_dir(parent)
                    .map_err(DriverError::io(parent))?
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .collect();
                n.sort();
                n
            }
        };
        Ok(names.iter().filter_map(|n| self.info(n).ok()).collect())
    }

    fn inspect(&self, name: &str) -> Result<GuestInfo, DriverError> {
        self.info(name)
    }

    fn pause(&self, name: &str) -> Result<(), DriverError> {
        self.set_frozen(name, true)
    }

    fn unpause(&self, name: &str) -> Result<(), DriverError> {
        self.set_frozen(name, false)
    }

    /// A group of host processes keeps no memory image of its processes: it is saved once
    /// they have ended (after its job), as what it is (its name, vCPUs, memory, weight and
    /// cap, written to `to`), and removed; its storage is the caller's to keep.
    fn save(&self, name: &str, to: &Path) -> Result<(), DriverError> {
        if !self.processes(name)?.is_empty() {
            return Err(DriverError::Unsupported {
                driver: "host",
                op: "save a guest whose processes run (it keeps no memory image of them: \
                     it is saved once its job's processes have ended)",
            });
        }
        let record = self
            .records()
            .get(name)
            .cloned()
            .ok_or_else(|| DriverError::NotFound(name.to_owned()))?;
        let saved = SavedGuest {
            name: name.to_owned(),
            record,
        };
        let json = serde_json::to_vec(&saved).map_err(|e| DriverError::Parse {
            command: format!("save {name}"),
            message: e.to_string(),
        })?;
        let tmp = to.with_extension("tmp");
        fs::write(&tmp, json)
            .and_then(|()| fs::rename(&tmp, to))
            .map_err(DriverError::io(to))?;
        self.remove(name)
    }

    /// Makes the group saved in `from` again, as it was.
    fn restore(&self, name: &str, from: &Path) -> Result<GuestInfo, DriverError> {
        let bytes = fs::read(from).map_err(DriverError::io(from))?;
        let bad = |message: String| DriverError::Parse {
            command: format!("restore {name} from {}", from.display()),
            message,
        };
        let saved: SavedGuest = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if saved.name != name {
            return Err(bad(format!("it saved guest '{}'", saved.name)));
        }
        let r = saved.record;
        let spec = GuestSpec {
            name: name.to_owned(),
            mode: crate::guest::Mode::Pv,
            kernel: None,
            ramdisk: None,
            cmdline: None,
            vcpus: r.vcpus,
            memory_mib: u32::try_from(r.memory_mib).map_err(|_| bad("memory".into()))?,
            disks: Vec::new(),
            nics: Vec::new(),
            weight: Some(r.sched.weight),
            cap: Some(r.sched.cap).filter(|&c| c > 0),
        };
        self.create(&spec)
    }

    fn migrate(&self, _: &str, _: &str) -> Result<(), DriverError> {
        Err(DriverError::Unsupported {
            driver: "host",
            op: "migrate a guest (it needs a hypervisor)",
        })
    }

    fn shutdown(&self, name: &str, wait: Duration) -> Result<(), DriverError> {
        self.need(name)?;
        if !self.kill_all(name, libc::SIGTERM, wait)? {
            return Err(DriverError::Timeout {
                command: format!("SIGTERM to the processes of guest {name}"),
                after: wait,
            });
        }
        self.remove(name)
    }

    fn destroy(&self, name: &str) -> Result<(), DriverError> {
        self.need(name)?;
        if !self.kill_all(name, libc::SIGKILL, Duration::from_secs(5))? {
            return Err(DriverError::Timeout {
                command: format!("SIGKILL to the processes of guest {name}"),
                after: Duration::from_secs(5),
            });
        }
        self.remove(name)
    }

    fn set_vcpus(&self, name: &str, vcpus: u32) -> Result<(), DriverError> {
        self.need(name)?;
        self.apply_vcpus(name, vcpus)?;
        if let Some(r) = self.records().get_mut(name) {
            r.vcpus = vcpus;
        }
        Ok(())
    }

    fn set_memory(&self, name: &str, mib: u64) -> Result<(), DriverError> {
        self.need(name)?;
        self.apply_memory(name, mib)?;
        if let Some(r) = self.records().get_mut(name) {
            r.memory_mib = mib;
        }
        Ok(())
    }

    fn set_sched(&self, name: &str, sched: Sched) -> Result<(), DriverError> {
        self.need(name)?;
        if !(1..=65535).contains(&sched.weight) {
            return Err(DriverError::Spec(crate::guest::SpecError {
                guest: name.to_owned(),
                message: format!("weight {} is not 1 to 65535", sched.weight),
            }));
        }
        self.apply_sched(name, sched)?;
        if let Some(r) = self.records().get_mut(name) {
            r.sched = sched;
        }
        Ok(())
    }

    fn sched(&self, name: &str) -> Result<Sched, DriverError> {
        self.need(name)?;
        self.read_sched(name)
    }

    /// The `cgroup.procs` file of each of the guest's control groups (none without writable
    /// cgroups: the guest is the host itself).
    fn join_files(&self, name: &str) -> Result<Option<Vec<PathBuf>>, DriverError> {
        self.need(name)?;
        let files = self.dirs(name).into_iter().map(|d| d.join("cgroup.procs"));
        Ok(Some(files.collect()))
    }

    /// The `oom_kill` count of the guest's memory group (v2 `memory.events`, v1
    /// `memory.oom_control`).
    fn oom_kills(&self, name: &str) -> Option<u64> {
        let file = match &self.cg {
            Cgroups::V2 { root } => root.join(name).join("memory.events"),
            Cgroups::V1 {
                memory: Some(m), ..
            } => m.join(name).join("memory.oom_control"),
            _ => return None,
        };
        read(&file).ok()?.lines().find_map(|l| {
            l.strip_prefix("oom_kill ")
                .and_then(|n| n.trim().parse().ok())
        })
    }
}

#[cfg(test)]
mod tests;
