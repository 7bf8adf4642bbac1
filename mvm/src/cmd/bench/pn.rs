//! `mvm bench xen --throughput IMAGE`: GridWay's system throughput `P(n) = n / T(n)` (`T(n)`:
//! the time until the n-th job of a run is done), through a lab's broker, for short jobs run one
//! after another on the host (no guest: GridWay's run without virtualization) and then in
//! guests of `IMAGE` in each VM mode (persistent, save-restore, stop-start), side by side in
//! one run. Each mode's `T(n)` is fitted to the linear model of Montero, Huedo and Llorente
//! (GridWay's reference 14), `T(n) = (n + n½) / r∞`: `r∞` is the asymptotic throughput (jobs
//! per second) and `n½` the jobs it takes to reach half of it.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use mvm_superpeer::client::{Client, Prepared};

use crate::cmd::job::{BrokerArg, connect, wire};
use crate::exit::Failure;

/// One mode's run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ModeThroughput {
    /// `host` (no guest), or the VM mode.
    pub(crate) mode: String,
    /// `T(n)` for n = 1…jobs, seconds from the run's start.
    pub(crate) done_secs: Vec<f64>,
    /// `P(n) = n / T(n)`, jobs per second.
    pub(crate) p: Vec<f64>,
    /// The fitted asymptotic throughput `r∞`, jobs per second.
    pub(crate) r_inf: f64,
    /// The fitted half-performance length `n½`, jobs.
    pub(crate) n_half: f64,
}

/// The throughput of every mode, in the order run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Throughput {
    /// The image of the guests.
    pub(crate) image: String,
    /// Jobs per mode.
    pub(crate) jobs: u32,
    /// Each mode.
    pub(crate) modes: Vec<ModeThroughput>,
}

const QUICK: &str = "(module (func (export \"_start\")))\n";

/// How long one job may take, from its submission to its end, before the run is given up: a
/// guest's boot under emulation takes tens of seconds, a job that waits for room that never
/// comes would take for ever.
const JOB_DEADLINE: Duration = Duration::from_secs(180);

/// Runs `jobs` short jobs in each mode through the broker of `broker`.
pub(crate) fn run(
    broker: &BrokerArg,
    image: &str,
    memory_mib: u32,
    jobs: u32,
    dir: &Path,
) -> Result<Throughput, Failure> {
    let io = |e: std::io::Error| Failure::failed(anyhow::anyhow!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let root = dir.display().to_string();
    super::broker::write(dir, "quick.wat", QUICK)?;
    super::broker::write(dir, "quick.dot", "digraph quick { v [component=\"q\"]; }\n")?;
    let profile = |mode: Option<&str>| {
        let req = mode.map_or_else(String::new, |m| {
            format!("[requirements]\nimage = \"{image}\"\nmemory = \"{memory_mib}MiB\"\nvm_mode = \"{m}\"\n")
        });
        super::broker::job(
            dir,
            &format!("quick-{}.toml", mode.unwrap_or("host")),
            &format!(
                "name = \"pn\"\ntopology = \"{root}/quick.dot\"\nretries = 0\n[components]\nq = \"{root}/quick.wat\"\n{req}"
            ),
        )
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Failure::failed)?;
    let mut modes = Vec::new();
    for mode in [
        None,
        Some("persistent"),
        Some("save-restore"),
        Some("stop-start"),
    ] {
        let job = profile(mode)?;
        let done_secs = rt.block_on(async {
            let client = connect(broker).await?;
            let start = Instant::now();
            let mut done = Vec::with_capacity(jobs as usize);
            for _ in 0..jobs {
                one(&client, &job).await?;
                done.push(start.elapsed().as_secs_f64());
            }
            Ok::<_, Failure>(done)
        })?;
        let (r_inf, n_half) = fit(&done_secs);
        modes.push(ModeThroughput {
            mode: mode.unwrap_or("host").to_owned(),
            p: done_secs
                .iter()
                .enumerate()
                .map(|(i, t)| (i + 1) as f64 / t.max(f64::MIN_POSITIVE))
                .collect(),
            done_secs,
            r_inf,
            n_half,
        });
    }
    Ok(Throughput {
        image: image.to_owned(),
        jobs,
        modes,
    })
}

/// Runs one job to its end, or cancels it after [`JOB_DEADLINE`] with an error that says where
/// it stood (its state, and why it waited if it did).
async fn one(client: &Client, job: &Prepared) -> Result<(), Failure> {
    let deadline = tokio::time::Instant::now() + JOB_DEADLINE;
    let mut s = client.submit_and_wait(job).await.map_err(wire)?;
    while !s.state.is_final() {
        match tokio::time::timeout_at(deadline, client.wait(&s.job, s.version, true)).await {
            Ok(next) => s = next.map_err(wire)?,
            Err(_) => {
                let _ = client.cancel(&s.job).await;
                return Err(Failure::failed(anyhow::anyhow!(
                    "bench job {} not ended after {} s ({:?}{}); cancelled",
                    s.job,
                    JOB_DEADLINE.as_secs(),
                    s.state,
                    s.waiting.map(|w| format!(": {w}")).unwrap_or_default()
                )));
            }
        }
    }
    super::broker::done(s).map(drop)
}

/// The least-squares line `T(n) = a + b n` through `done` (T(1), T(2), …) as `(r∞, n½) = (1/b,
/// a/b)`; one point gives `r∞ = 1 / T(1)` and `n½ = 0`.
fn fit(done: &[f64]) -> (f64, f64) {
    let n = done.len() as f64;
    if done.len() < 2 {
        return (
            done.first().map_or(0.0, |t| 1.0 / t.max(f64::MIN_POSITIVE)),
            0.0,
        );
    }
    let xs = (1..=done.len()).map(|i| i as f64);
    let mx = xs.clone().sum::<f64>() / n;
    let my = done.iter().sum::<f64>() / n;
    let sxy: f64 = xs.clone().zip(done).map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = xs.map(|x| (x - mx) * (x - mx)).sum();
    let b = sxy / sxx;
    let a = my - b * mx;
    if b <= 0.0 {
        return (f64::INFINITY, 0.0);
    }
    (1.0 / b, a / b)
}

/// The text form.
pub(crate) fn text(t: &Throughput) -> String {
    let mut s = format!(
        "throughput P(n) = n / T(n) of {} short jobs per mode (guests of {})\n",
        t.jobs, t.image
    );
    for m in &t.modes {
        let ps: Vec<String> = m.p.iter().map(|p| format!("{p:.3}")).collect();
        s.push_str(&format!(
            "  {:<12} r_inf {:.3} jobs/s  n_half {:.1}  P(n) {}\n",
            m.mode,
            m.r_inf,
            m.n_half,
            ps.join(" ")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::fit;

    #[test]
    fn the_linear_model_gives_back_its_rate_and_half_length() {
        // T(n) = (n + 3) / 0.5: r∞ = 0.5 jobs/s, n½ = 3.
        let done: Vec<f64> = (1..=6).map(|n| (f64::from(n) + 3.0) / 0.5).collect();
        let (r, h) = fit(&done);
        assert!((r - 0.5).abs() < 1e-9 && (h - 3.0).abs() < 1e-9, "{r} {h}");
        let (r, h) = fit(&[2.0]);
        assert!((r - 0.5).abs() < 1e-9 && h == 0.0);
    }
}
