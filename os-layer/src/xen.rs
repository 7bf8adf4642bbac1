//! The Xen driver: guests through the real `xl` toolstack.
//!
//! Each operation runs `xl` with a time limit and reads what it prints (`xl list`,
//! `xl sched-credit2 -d`, `xl cpupool-list`); a failure carries xl's stderr. Guests are tracked
//! by name, because the domid changes on restore and migration. The driver keeps, per guest,
//! the xl.cfg it wrote and the spec behind it in its state directory, so a checkpoint can be
//! restored with its disks attached again.
//!
//! Disk files are attached to loop devices by the driver and handed to xl as `phy` devices, so
//! a dom0 needs no file-aware hotplug scripts; the loop devices are released when the guest is
//! destroyed or saved.

use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::driver::{Driver, DriverError, GuestInfo, Sched, State};
use crate::guest::GuestSpec;
use crate::loopdev;

/// How the Xen driver runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XenConfig {
    /// The `xl` program.
    #[serde(default = "default_xl")]
    pub xl: PathBuf,
    /// Where the driver keeps each guest's xl.cfg and spec.
    pub state_dir: PathBuf,
    /// The limit for quick commands (list, pause, sched-credit2...).
    #[serde(default = "default_quick", with = "humantime_secs")]
    pub quick_timeout: Duration,
    /// The limit for slow ones (create, save, restore, migrate).
    #[serde(default = "default_slow", with = "humantime_secs")]
    pub slow_timeout: Duration,
    /// Attach disk files to loop devices and give xl block devices (true), or pass files to xl
    /// as they are (for a dom0 with Xen's own hotplug scripts or qdisk).
    #[serde(default = "yes")]
    pub attach_files: bool,
}

fn default_xl() -> PathBuf {
    "xl".into()
}
fn default_quick() -> Duration {
    Duration::from_secs(60)
}
fn default_slow() -> Duration {
    Duration::from_secs(600)
}
fn yes() -> bool {
    true
}

mod humantime_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

impl XenConfig {
    /// The defaults, keeping state in `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> XenConfig {
        XenConfig {
            xl: default_xl(),
            state_dir: state_dir.into(),
            quick_timeout: default_quick(),
            slow_timeout: default_slow(),
            attach_files: true,
        }
    }
}

/// What the driver remembers of a guest it created.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    /// The spec as given (disk targets are the files).
    spec: GuestSpec,
    /// The loop devices attached for it now.
    loops: Vec<PathBuf>,
}

/// Guests through `xl`.
#[derive(Debug)]
pub struct XenDriver {
    cfg: XenConfig,
}

/// Runs a program with a time limit; returns its stdout, or an error with its stderr.
pub(crate) fn run(program: &Path, args: &[&str], limit: Duration) -> Result<String, DriverError> {
    let command = std::iter::once(program.display().to_string())
        .chain(args.iter().map(|a| (*a).to_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    // A group of its own, so a timeout kills what it started too (xl forks helpers).
    let mut child = Command::new(program)
        .args(args)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| DriverError::Command {
            command: command.clone(),
            status: "not started".into(),
            stderr: e.to_string(),
        })?;
    let pid = child.id();
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let (tx, rx) = mpsc::sync_channel(1);
    let waiter = std::thread::spawn(move || {
        let mut o = Vec::new();
        let mut e = Vec::new();
        // stderr is read on its own thread so neither pipe can fill and stall the child.
        let errs = std::thread::spawn(move || {
            if let Some(err) = err.as_mut() {
                let _ = err.read_to_end(&mut e);
            }
            e
        });
        if let Some(out) = out.as_mut() {
            let _ = out.read_to_end(&mut o);
        }
        let e = errs.join().unwrap_or_default();
        let status = child.wait();
        let _ = tx.send(());
        (status, o, e)
    });
    if rx.recv_timeout(limit).is_err() {
        // SAFETY: kill(2) on the child's process group; the child is not yet reaped (the waiter
        // thread has not returned from wait), so its pid still names that group.
        unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
        let _ = waiter.join();
        return Err(DriverError::Timeout {
            command,
            after: limit,
        });
    }
    let (status, o, e) = waiter.join().map_err(|_| DriverError::Command {
        command: command.clone(),
        status: "lost".into(),
        stderr: String::new(),
    })?;
    let status = status.map_err(|e| DriverError::Command {
        command: command.clone(),
        status: "not waited for".into(),
        stderr: e.to_string(),
    })?;
    let stderr = String::from_utf8_lossy(&e).trim().to_owned();
    if status.success() {
        Ok(String::from_utf8_lossy(&o).into_owned())
    } else {
        Err(DriverError::Command {
            command,
            status: status.to_string(),
            stderr,
        })
    }
}

/// Reads the state flags of `xl list` (`r-----`, `-b----`, `--p---`, ...).
pub(crate) fn parse_state(flags: &str) -> Option<State> {
    if flags.len() != 6 || !flags.chars().all(|c| "rbpscd-".contains(c)) {
        return None;
    }
    let has = |c| flags.contains(c);
    Some(if has('d') {
        State::Dying
    } else if has('c') {
        State::Crashed
    } else if has('s') {
        State::Shutdown
    } else if has('p') {
        State::Paused
    } else if has('b') {
        State::Blocked
    } else {
        // `r`, or no flag at all: runnable (a just-restored domain shows `------`).
        State::Running
    })
}

/// Reads the table `xl list [NAME]` prints: `Name ID Mem VCPUs State Time(s)`.
pub(crate) fn parse_list(text: &str) -> Result<Vec<GuestInfo>, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    match lines.next() {
        Some(h) if h.split_whitespace().next() == Some("Name") => {}
        Some(h) => return Err(format!("unexpected header '{h}'")),
        None => return Ok(Vec::new()),
    }
    let mut out = Vec::new();
    for line in lines {
        let f: Vec<&str> = line.split_whitespace().collect();
        // The name is the first field; the five after it are fixed (extra columns follow with -v).
        let bad = || format!("unexpected line '{line}'");
        if f.len() < 6 {
            return Err(bad());
        }
        let info = GuestInfo {
            name: f[0].to_owned(),
            id: Some(f[1].parse().map_err(|_| bad())?),
            memory_mib: f[2].parse().map_err(|_| bad())?,
            vcpus: f[3].parse().map_err(|_| bad())?,
            state: parse_state(f[4]).ok_or_else(bad)?,
            cpu_seconds: f[5].parse().map_err(|_| bad())?,
        };
        out.push(info);
    }
    Ok(out)
}

/// Reads the table of `xl sched-credit[2] -d NAME`: `Name ID Weight Cap`.
pub(crate) fn parse_sched(text: &str, name: &str) -> Result<Sched, String> {
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 4 && f[0] == name {
            let bad = || format!("unexpected line '{line}'");
            return Ok(Sched {
                weight: f[2].parse().map_err(|_| bad())?,
                cap: f[3].parse().map_err(|_| bad())?,
            });
        }
    }
    Err(format!("no line for '{name}'"))
}

/// Reads `xl cpupool-list`: each pool's name and scheduler.
pub(crate) fn parse_cpupools(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    match lines.next() {
        Some(h) if h.split_whitespace().next() == Some("Name") => {}
        other => return Err(format!("unexpected header {other:?}")),
    }
    lines
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 3 {
                return Err(format!("unexpected line '{l}'"));
            }
            Ok((f[0].to_owned(), f[2].to_owned()))
        })
        .collect()
}

/// Reads the pool column of `xl list -c NAME`.
pub(crate) fn parse_pool(text: &str, name: &str) -> Result<String, String> {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && f[0] == name)
        .and_then(|f| f.last().map(|s| (*s).to_owned()))
        .ok_or_else(|| format!("no line for '{name}'"))
}

fn not_found(e: &DriverError) -> bool {
    matches!(e, DriverError::Command { stderr, .. } if stderr.contains("invalid domain identifier"))
}

impl XenDriver {
    /// A driver with `cfg`; creates its state directory.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn new(cfg: XenConfig) -> Result<XenDriver, DriverError> {
        fs::create_dir_all(&cfg.state_dir).map_err(DriverError::io(&cfg.state_dir))?;
        Ok(XenDriver { cfg })
    }

    fn xl(&self, args: &[&str], slow: bool) -> Result<String, DriverError> {
        let limit = if slow {
            self.cfg.slow_timeout
        } else {
            self.cfg.quick_timeout
        };
        run(&self.cfg.xl, args, limit)
    }

    /// Runs an xl command on guest `name`, turning xl's "invalid domain identifier" into
    /// [`DriverError::NotFound`].
    fn on(&self, name: &str, args: &[&str], slow: bool) -> Result<String, DriverError> {
        self.xl(args, slow).map_err(|e| {
            if not_found(&e) {
                DriverError::NotFound(name.to_owned())
            } else {
                e
            }
        })
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.cfg.state_dir.join(format!("{name}.json"))
    }

    fn cfg_path(&self, name: &str) -> PathBuf {
        self.cfg.state_dir.join(format!("{name}.cfg"))
    }

    fn read_record(&self, name: &str) -> Option<Record> {
        let text = fs::read(self.record_path(name)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn write_record(&self, name: &str, r: &Record) -> Result<(), DriverError> {
        let p = self.record_path(name);
        let text = serde_json::to_vec_pretty(r).map_err(|e| DriverError::Io {
            path: p.clone(),
            source: std::io::Error::other(e),
        })?;
        let tmp = p.with_extension("json.tmp");
        fs::write(&tmp, text).map_err(DriverError::io(&tmp))?;
        fs::rename(&tmp, &p).map_err(DriverError::io(&p))
    }

    fn forget(&self, name: &str) {
        let _ = fs::remove_file(self.record_path(name));
        let _ = fs::remove_file(self.cfg_path(name));
    }

    /// Attaches the spec's disk files to loop devices; returns the spec xl gets and the devices.
    fn attach_disks(&self, spec: &GuestSpec) -> Result<(GuestSpec, Vec<PathBuf>), DriverError> {
        let mut xl_spec = spec.clone();
        let mut loops = Vec::new();
        if !self.cfg.attach_files {
            return Ok((xl_spec, loops));
        }
        for d in &mut xl_spec.disks {
            let is_file = fs::metadata(&d.target)
                .map(|m| m.is_file())
                .unwrap_or(false);
            if !is_file {
                continue;
            }
            if d.format != "raw" {
                release_loops(&loops);
                return Err(DriverError::Spec(crate::guest::SpecError {
                    guest: spec.name.clone(),
                    message: format!(
                        "disk {}: a {} file cannot be served as a block device; convert it to raw",
                        d.target.display(),
                        d.format
                    ),
                }));
            }
            match loopdev::attach(&d.target, d.read_only) {
                Ok(dev) => {
                    loops.push(dev.clone());
                    d.target = dev;
                }
                Err(e) => {
                    release_loops(&loops);
                    return Err(DriverError::Io {
                        path: d.target.clone(),
                        source: e,
                    });
                }
            }
        }
        Ok((xl_spec, loops))
    }

    /// Starts a domain from `spec` (create) or from a checkpoint (restore), attaching disks
    /// first and releasing everything if xl fails.
    fn start(&self, spec: &GuestSpec, checkpoint: Option<&Path>) -> Result<GuestInfo, DriverError> {
        spec.validate()?;
        // Only a guest this driver knows needs a look first (one more `xl` run); xl itself
        // refuses a name taken by any other domain, and that is caught below.
        if checkpoint.is_none() && self.read_record(&spec.name).is_some() {
            match self.inspect(&spec.name) {
                Ok(_) => return Err(DriverError::Exists(spec.name.clone())),
                Err(DriverError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let (xl_spec, loops) = self.attach_disks(spec)?;
        let cfg_path = self.cfg_path(&spec.name);
        let result = xl_spec
            .to_xl_cfg()
            .map_err(DriverError::from)
            .and_then(|text| fs::write(&cfg_path, text).map_err(DriverError::io(&cfg_path)))
            .and_then(|()| {
                self.write_record(
                    &spec.name,
                    &Record {
                        spec: spec.clone(),
                        loops: loops.clone(),
                    },
                )
            })
            .and_then(|()| {
                let cfg = cfg_path.display().to_string();
                match checkpoint {
                    None => self.xl(&["create", &cfg], true),
                    Some(ck) => self.xl(&["restore", &cfg, &ck.display().to_string()], true),
                }
            })
            .and_then(|_| self.inspect(&spec.name));
        if let Err(DriverError::Command { stderr, .. }) = &result
            && stderr.contains("already exists")
        {
            // Another domain has the name: leave it alone.
            release_loops(&loops);
            if checkpoint.is_none() {
                let _ = fs::remove_file(&cfg_path);
                let _ = fs::remove_file(self.record_path(&spec.name));
            }
            return Err(DriverError::Exists(spec.name.clone()));
        }
        if result.is_err() {
            // xl may have left a half-made domain behind.
            let _ = self.xl(&["destroy", &spec.name], false);
            release_loops(&loops);
            if checkpoint.is_some() {
                // Keep what a later restore of the same checkpoint needs.
                let _ = fs::remove_file(&cfg_path);
                let _ = self.write_record(
                    &spec.name,
                    &Record {
                        spec: spec.clone(),
                        loops: Vec::new(),
                    },
                );
            } else {
                self.forget(&spec.name);
            }
        }
        result
    }

    /// Releases the loop devices recorded for `name`, keeping the record.
    fn release(&self, name: &str) {
        if let Some(mut r) = self.read_record(name) {
            release_loops(&r.loops);
            r.loops.clear();
            let _ = self.write_record(name, &r);
        }
    }

    /// The scheduler of the cpupool guest `name` is in (`credit2` or `credit`).
    fn scheduler_of(&self, name: &str) -> Result<String, DriverError> {
        let parse = |command: &str| {
            let command = command.to_owned();
            move |message| DriverError::Parse { command, message }
        };
        let pool = parse_pool(&self.on(name, &["list", "-c", name], false)?, name)
            .map_err(parse("xl list -c"))?;
        let pools = parse_cpupools(&self.xl(&["cpupool-list"], false)?)
            .map_err(parse("xl cpupool-list"))?;
        pools
            .into_iter()
            .find(|(p, _)| *p == pool)
            .map(|(_, s)| s)
            .ok_or_else(|| DriverError::Parse {
                command: "xl cpupool-list".into(),
                message: format!("no pool '{pool}'"),
            })
    }

    fn sched_command(&self, name: &str) -> Result<&'static str, DriverError> {
        match self.scheduler_of(name)?.as_str() {
            "credit2" => Ok("sched-credit2"),
            "credit" => Ok("sched-credit"),
            other => Err(DriverError::Parse {
                command: "xl cpupool-list".into(),
                message: format!(
                    "guest '{name}' is in a pool scheduled by '{other}', which has no weights"
                ),
            }),
        }
    }
}

fn release_loops(loops: &[PathBuf]) {
    for d in loops {
        if let Err(e) = loopdev::detach(d) {
            tracing::warn!(device = %d.display(), "cannot detach loop device: {e}");
        }
    }
}

impl Driver for XenDriver {
    fn kind(&self) -> &'static str {
        "xen"
    }

    fn create(&self, spec: &GuestSpec) -> Result<GuestInfo, DriverError> {
        self.start(spec, None)
    }

    fn list(&self) -> Result<Vec<GuestInfo>, DriverError> {
        let text = self.xl(&["list"], false)?;
        let all = parse_list(&text).map_err(|message| DriverError::Parse {
            command: "xl list".into(),
            message,
        })?;
        Ok(all.into_iter().filter(|g| g.id != Some(0)).collect())
    }

    fn inspect(&self, name: &str) -> Result<GuestInfo, DriverError> {
        let text = self.on(name, &["list", name], false)?;
        parse_list(&text)
            .map_err(|message| DriverError::Parse {
                command: format!("xl list {name}"),
                message,
            })?
            .into_iter()
            .find(|g| g.name == name)
            .ok_or_else(|| DriverError::NotFound(name.to_owned()))
    }

    fn pause(&self, name: &str) -> Result<(), DriverError> {
        self.on(name, &["pause", name], false).map(drop)
    }

    fn unpause(&self, name: &str) -> Result<(), DriverError> {
        self.on(name, &["unpause", name], false).map(drop)
    }

    fn save(&self, name: &str, checkpoint: &Path) -> Result<(), DriverError> {
        if let Some(dir) = checkpoint.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(DriverError::io(dir))?;
        }
        self.on(
            name,
            &["save", name, &checkpoint.display().to_string()],
            true,
        )?;
        self.release(name);
        Ok(())
    }

    fn restore(&self, name: &str, checkpoint: &Path) -> Result<GuestInfo, DriverError> {
        let Some(record) = self.read_record(name) else {
            return Err(DriverError::NotFound(format!(
                "{name} (no record of it in {}: only guests this driver saved can be restored)",
                self.cfg.state_dir.display()
            )));
        };
        if !checkpoint.is_file() {
            return Err(DriverError::Io {
                path: checkpoint.to_owned(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        self.start(&record.spec, Some(checkpoint))
    }

    fn migrate(&self, name: &str, host: &str) -> Result<(), DriverError> {
        if host == "localhost" {
            // With an empty ssh command xl runs the "host" string itself: a migration into this
            // dom0, which moves the domain to a new domid.
            self.on(
                name,
                &["migrate", "-s", "", name, "xl migrate-receive"],
                true,
            )?;
        } else {
            self.on(name, &["migrate", name, host], true)?;
            self.release(name);
            self.forget(name);
        }
        Ok(())
    }

    fn shutdown(&self, name: &str, wait: Duration) -> Result<(), DriverError> {
        self.on(name, &["shutdown", name], false)?;
        let deadline = std::time::Instant::now() + wait;
        loop {
            match self.inspect(name) {
                Err(DriverError::NotFound(_)) => break,
                Err(e) => return Err(e),
                Ok(_) if std::time::Instant::now() >= deadline => {
                    return Err(DriverError::Timeout {
                        command: format!("xl shutdown {name}"),
                        after: wait,
                    });
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        self.release(name);
        self.forget(name);
        Ok(())
    }

    fn destroy(&self, name: &str) -> Result<(), DriverError> {
        let r = self.on(name, &["destroy", name], false);
        // Whatever xl says, the driver's own hold on the guest's disks goes.
        self.release(name);
        self.forget(name);
        r.map(drop)
    }

    fn set_vcpus(&self, name: &str, vcpus: u32) -> Result<(), DriverError> {
        self.on(name, &["vcpu-set", name, &vcpus.to_string()], false)
            .map(drop)
    }

    fn set_memory(&self, name: &str, mib: u64) -> Result<(), DriverError> {
        self.on(name, &["mem-set", name, &format!("{mib}m")], false)
            .map(drop)
    }

    fn set_sched(&self, name: &str, sched: Sched) -> Result<(), DriverError> {
        if !(1..=65535).contains(&sched.weight) {
            return Err(DriverError::Spec(crate::guest::SpecError {
                guest: name.to_owned(),
                message: format!("weight {} is not 1 to 65535", sched.weight),
            }));
        }
        let cmd = self.sched_command(name)?;
        let (w, c) = (sched.weight.to_string(), sched.cap.to_string());
        self.on(name, &[cmd, "-d", name, "-w", &w, "-c", &c], false)?;
        // A restore rebuilds the domain from the recorded spec: keep the share there too.
        if let Some(mut r) = self.read_record(name) {
            r.spec.weight = Some(sched.weight);
            r.spec.cap = Some(sched.cap);
            self.write_record(name, &r)?;
        }
        Ok(())
    }

    fn sched(&self, name: &str) -> Result<Sched, DriverError> {
        let cmd = self.sched_command(name)?;
        let text = self.on(name, &[cmd, "-d", name], false)?;
        parse_sched(&text, name).map_err(|message| DriverError::Parse {
            command: format!("xl {cmd} -d {name}"),
            message,
        })
    }
}

#[cfg(test)]
mod tests;
