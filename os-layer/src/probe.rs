//! Property probes: what a node measures about itself at intervals and publishes (the VM
//! manager's probes). A new probe is one implementation of [`Probe`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// A probe failed to take a sample.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("probe '{probe}': {message}")]
pub struct ProbeError {
    /// The probe.
    pub probe: String,
    /// What went wrong.
    pub message: String,
}

/// Something a node measures about itself.
pub trait Probe: Send + Sync {
    /// The property's name, e.g. `free_memory`.
    fn name(&self) -> &str;
    /// How often to sample it.
    fn interval(&self) -> Duration;
    /// One sample.
    ///
    /// # Errors
    /// The measurement could not be taken.
    fn sample(&self) -> Result<f64, ProbeError>;
}

fn fail(probe: &str, message: impl Into<String>) -> ProbeError {
    ProbeError {
        probe: probe.to_owned(),
        message: message.into(),
    }
}

/// The number of guests alive on a driver (running, blocked or paused).
pub struct RunningGuests {
    /// The driver asked.
    pub driver: std::sync::Arc<dyn crate::driver::Driver>,
    /// Sampling interval.
    pub interval: Duration,
}

impl std::fmt::Debug for RunningGuests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningGuests")
            .field("driver", &self.driver.kind())
            .field("interval", &self.interval)
            .finish()
    }
}

impl Probe for RunningGuests {
    fn name(&self) -> &str {
        "running_guests"
    }
    fn interval(&self) -> Duration {
        self.interval
    }
    fn sample(&self) -> Result<f64, ProbeError> {
        let guests = self
            .driver
            .list()
            .map_err(|e| fail(self.name(), e.to_string()))?;
        Ok(guests.iter().filter(|g| !g.state.is_dead()).count() as f64)
    }
}

/// Available memory in bytes (`MemAvailable` of /proc/meminfo).
#[derive(Debug, Clone)]
pub struct FreeMemory {
    /// Sampling interval.
    pub interval: Duration,
}

impl Probe for FreeMemory {
    fn name(&self) -> &str {
        "free_memory"
    }
    fn interval(&self) -> Duration {
        self.interval
    }
    fn sample(&self) -> Result<f64, ProbeError> {
        let text = std::fs::read_to_string("/proc/meminfo")
            .map_err(|e| fail(self.name(), e.to_string()))?;
        parse_meminfo(&text, "MemAvailable:")
            .ok_or_else(|| fail(self.name(), "no MemAvailable in /proc/meminfo"))
    }
}

/// Total memory in bytes (`MemTotal` of /proc/meminfo), if readable.
pub fn total_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text, "MemTotal:").map(|b| b as u64)
}

fn parse_meminfo(text: &str, key: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}

/// The one-minute load average (/proc/loadavg).
#[derive(Debug, Clone)]
pub struct Load {
    /// Sampling interval.
    pub interval: Duration,
}

impl Probe for Load {
    fn name(&self) -> &str {
        "load"
    }
    fn interval(&self) -> Duration {
        self.interval
    }
    fn sample(&self) -> Result<f64, ProbeError> {
        let text = std::fs::read_to_string("/proc/loadavg")
            .map_err(|e| fail(self.name(), e.to_string()))?;
        text.split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| fail(self.name(), "unreadable /proc/loadavg"))
    }
}

/// Free disk space in bytes under a path (statvfs: blocks available to unprivileged users).
#[derive(Debug, Clone)]
pub struct FreeDisk {
    /// The path whose file system is measured.
    pub path: PathBuf,
    /// Sampling interval.
    pub interval: Duration,
}

impl Probe for FreeDisk {
    fn name(&self) -> &str {
        "free_disk"
    }
    fn interval(&self) -> Duration {
        self.interval
    }
    fn sample(&self) -> Result<f64, ProbeError> {
        let c = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes())
            .map_err(|_| fail(self.name(), "path contains a NUL byte"))?;
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of the
        // size statvfs expects; the result is read only when the call reports success.
        let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
        if rc != 0 {
            return Err(fail(
                self.name(),
                format!(
                    "{}: {}",
                    self.path.display(),
                    std::io::Error::last_os_error()
                ),
            ));
        }
        // SAFETY: statvfs returned 0, so it filled the structure.
        let st = unsafe { st.assume_init() };
        Ok(st.f_bavail as f64 * st.f_frsize as f64)
    }
}

/// A probe from a closure, e.g. the number of running guests read from a driver.
pub struct FnProbe<F> {
    name: String,
    interval: Duration,
    f: F,
}

impl<F: Fn() -> Result<f64, String> + Send + Sync> FnProbe<F> {
    /// A probe named `name` sampling `f` every `interval`.
    pub fn new(name: impl Into<String>, interval: Duration, f: F) -> FnProbe<F> {
        FnProbe {
            name: name.into(),
            interval,
            f,
        }
    }
}

impl<F: Fn() -> Result<f64, String> + Send + Sync> Probe for FnProbe<F> {
    fn name(&self) -> &str {
        &self.name
    }
    fn interval(&self) -> Duration {
        self.interval
    }
    fn sample(&self) -> Result<f64, ProbeError> {
        (self.f)().map_err(|m| fail(&self.name, m))
    }
}

/// The latest sample of every probe, by name.
pub type Properties = BTreeMap<String, f64>;

/// Samples every probe at its own interval and publishes the latest properties; runs until
/// every receiver of the returned channel is gone. A failed sample is logged and skipped.
pub fn publish(
    probes: Vec<Arc<dyn Probe>>,
) -> (watch::Receiver<Properties>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Properties::new());
    let handle = tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        let tx = Arc::new(tx);
        for p in probes {
            let tx = tx.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(p.interval().max(Duration::from_millis(1)));
                loop {
                    tick.tick().await;
                    match p.sample() {
                        Ok(v) => {
                            tx.send_modify(|props| {
                                props.insert(p.name().to_owned(), v);
                            });
                        }
                        Err(e) => tracing::warn!(error = %e, "probe sample failed"),
                    }
                    if tx.is_closed() {
                        return;
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    });
    (rx, handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_probes_read_this_machine() {
        let s = Duration::from_secs(1);
        assert!(FreeMemory { interval: s }.sample().expect("meminfo") > 0.0);
        assert!(Load { interval: s }.sample().expect("loadavg") >= 0.0);
        assert!(
            FreeDisk {
                path: "/".into(),
                interval: s
            }
            .sample()
            .expect("statvfs")
                > 0.0
        );
        let e = FreeDisk {
            path: "/no/such/dir".into(),
            interval: s,
        }
        .sample()
        .expect_err("missing");
        assert!(e.to_string().contains("/no/such/dir"), "{e}");
        assert_eq!(
            parse_meminfo("MemTotal: 10 kB\nMemAvailable:   2 kB\n", "MemAvailable:"),
            Some(2048.0)
        );
        assert_eq!(parse_meminfo("nothing", "MemAvailable:"), None);
    }

    #[tokio::test]
    async fn published_properties_follow_each_probe_interval() {
        let fast: Arc<dyn Probe> =
            Arc::new(FnProbe::new("guests", Duration::from_millis(10), || {
                Ok(3.0)
            }));
        let broken: Arc<dyn Probe> =
            Arc::new(FnProbe::new("broken", Duration::from_millis(10), || {
                Err("no driver".into())
            }));
        let (mut rx, handle) = publish(vec![fast, broken]);
        let props = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                rx.changed().await.expect("publisher alive");
                let p = rx.borrow().clone();
                if p.contains_key("guests") {
                    return p;
                }
            }
        })
        .await
        .expect("a sample within 5 s");
        assert_eq!(props.get("guests"), Some(&3.0));
        assert!(
            !props.contains_key("broken"),
            "failed samples are not published"
        );
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), handle)
            .await
            .expect("stops without receivers")
            .expect("no panic");
    }
}
