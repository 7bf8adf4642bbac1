//! `mvm bench chaos`: trials of a long job with checkpoints in a lab of node processes, in each
//! of which a node running a part of it is killed (`SIGKILL`) at a random moment; each job must
//! end with exactly the output of an undisturbed run, with no item lost or delivered twice.

use std::path::Path;
use std::time::{Duration, Instant};

use mvm_superpeer::client::Client;
use mvm_superpeer::proto::{JobState, JobStatus};
use serde::Serialize;

use super::labjob::{self, Pipeline, status, until};
use crate::cmd::job::wire;
use crate::exit::Failure;

/// What the trials gave.
#[derive(Debug, Serialize)]
pub(crate) struct ChaosReport {
    /// The job.
    pub(crate) workload: String,
    /// The random seed (`--seed` repeats the same kills).
    pub(crate) seed: u64,
    /// Trials run.
    pub(crate) trials: usize,
    /// Jobs that ended `done`.
    pub(crate) completed: usize,
    /// Jobs that ended with the undisturbed run's output and items on every edge and port.
    pub(crate) identical: usize,
    /// Items the sink of a completed job did not get, summed over the trials.
    pub(crate) items_lost: u64,
    /// Items the sink of a completed job got more than once, summed over the trials.
    pub(crate) items_twice: u64,
    /// The undisturbed run's wall time, milliseconds.
    pub(crate) undisturbed_ms: u64,
    /// Each trial.
    pub(crate) runs: Vec<Trial>,
}

/// One trial.
#[derive(Debug, Serialize)]
pub(crate) struct Trial {
    /// The node killed (none: the job ended before the moment chosen).
    pub(crate) killed: Option<String>,
    /// Milliseconds after the job ran that it was killed.
    pub(crate) after_ms: u64,
    /// How the job ended.
    pub(crate) state: JobState,
    /// The runs it took (1: never run again).
    pub(crate) runs: u32,
    /// The checkpoint its last run started from.
    pub(crate) from_cut: Option<u64>,
    /// From the run given up to every part running again, milliseconds.
    pub(crate) recovery_ms: Option<u64>,
    /// Items its sink got.
    pub(crate) items: Option<u64>,
    /// Whether its output is the undisturbed run's, and every edge and input port of it
    /// carried the same items.
    pub(crate) identical: bool,
    /// Why it failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

fn failed(e: impl std::fmt::Display) -> Failure {
    Failure::failed(anyhow::anyhow!("bench chaos: {e}"))
}

/// splitmix64: enough randomness to choose moments and nodes, and repeatable by its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Runs `trials` trials of the C pipeline of `jobs` over `items` items with a checkpoint every
/// `interval`, on 2 of the 3 nodes of a lab in `dir`.
pub(crate) fn run(
    dir: &Path,
    jobs: &Path,
    items: u64,
    interval: Duration,
    trials: usize,
    seed: Option<u64>,
) -> Result<ChaosReport, Failure> {
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let mut rng = Rng(seed);
    let pipeline = Pipeline::new(dir, jobs, items)?;
    let every = format!("{}ms", interval.as_millis());
    let chaos = pipeline.profile(
        "chaos",
        &format!("[checkpoint]\ninterval = \"{every}\"\nkeep = 2\n"),
    )?;
    let plain = pipeline.profile("plain", "")?;
    let (mut lab, rt, client) = labjob::start(dir)?;
    let quiet = rt.block_on(async {
        let s = client.submit_and_wait(&plain).await.map_err(wire)?;
        until(&client, &s, JobState::is_final, Duration::from_secs(600)).await
    })?;
    if quiet.state != JobState::Done {
        return Err(failed(format!(
            "the undisturbed run ended {:?}",
            quiet.state
        )));
    }
    let expected = (sorted(&quiet), quiet.edges.clone(), quiet.received.clone());
    let mut runs = Vec::with_capacity(trials);
    for _ in 0..trials {
        let trial = rt.block_on(async {
            let s = client.submit(&chaos).await.map_err(wire)?;
            let s = until(
                &client,
                &s,
                |st| st != JobState::Pending && st != JobState::Preparing,
                Duration::from_secs(60),
            )
            .await?;
            let started = Instant::now();
            // A moment within the undisturbed run's time (most of it: the job runs a little
            // slower with checkpoints).
            let after = Duration::from_millis(rng.below((quiet.wall_ms * 9 / 10).max(1)));
            tokio::time::sleep(after).await;
            let now = status(&client, &s).await?;
            let running: Vec<String> = now
                .parts
                .iter()
                .filter(|p| !p.done)
                .map(|p| p.name.clone())
                .collect();
            let victim = if now.state == JobState::Running && !running.is_empty() {
                let i = usize::try_from(rng.below(running.len() as u64)).unwrap_or(0);
                running.get(i).cloned()
            } else {
                None
            };
            Ok::<_, Failure>((s, victim, started.elapsed()))
        })?;
        let (s, victim, after) = trial;
        if let Some(v) = &victim
            && !lab.kill_daemon(v)
        {
            return Err(failed(format!("{v} is not a daemon of the lab")));
        }
        let end = rt.block_on(until(
            &client,
            &s,
            JobState::is_final,
            Duration::from_secs(600),
        ))?;
        if let Some(v) = &victim {
            lab.restart_daemon(v)?;
            rt.block_on(all_live(&client, 3))?;
        }
        let last = end.restarts.last();
        runs.push(Trial {
            killed: victim,
            after_ms: u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
            state: end.state,
            runs: end.attempt + 1,
            from_cut: last.and_then(|r| r.from_cut),
            recovery_ms: last.and_then(mvm_superpeer::proto::Restart::recovery_ms),
            items: sink_items(&end),
            identical: end.state == JobState::Done
                && (sorted(&end), end.edges.clone(), end.received.clone()) == expected,
            error: end.error.clone(),
        });
    }
    drop(lab);
    let done: Vec<&Trial> = runs.iter().filter(|t| t.state == JobState::Done).collect();
    let got = |t: &Trial| t.items.unwrap_or(0);
    Ok(ChaosReport {
        workload: format!(
            "pipeline-4 ({items} items, a checkpoint every {every}) over 2 of 3 node processes"
        ),
        seed,
        trials: runs.len(),
        completed: done.len(),
        identical: runs.iter().filter(|t| t.identical).count(),
        items_lost: done.iter().map(|t| items.saturating_sub(got(t))).sum(),
        items_twice: done.iter().map(|t| got(t).saturating_sub(items)).sum(),
        undisturbed_ms: quiet.wall_ms,
        runs,
    })
}

/// The report for people.
pub(crate) fn text(r: &ChaosReport) -> String {
    let mut s = format!(
        "{}, undisturbed {:.1} s; seed {}\n{} trials: {} completed, {} identical, {} items \
         lost, {} delivered twice (goal: {n}/{n}/{n}/0)",
        r.workload,
        r.undisturbed_ms as f64 / 1000.0,
        r.seed,
        r.trials,
        r.completed,
        r.identical,
        r.items_lost,
        r.items_twice,
        n = r.trials,
    );
    for (i, t) in r.runs.iter().enumerate() {
        s.push_str(&format!(
            "\n  {:>2}: {} at {} ms: {:?} in {} run(s){}{}{}",
            i + 1,
            t.killed.as_deref().unwrap_or("(ended first)"),
            t.after_ms,
            t.state,
            t.runs,
            t.from_cut
                .map_or(String::new(), |c| format!(", from checkpoint {c}")),
            t.recovery_ms
                .map_or(String::new(), |ms| format!(", running again after {ms} ms")),
            if t.identical {
                ", identical".to_owned()
            } else {
                format!(
                    ", DIFFERENT ({} items){}",
                    t.items.map_or("no".to_owned(), |n| n.to_string()),
                    t.error.as_ref().map_or(String::new(), |e| format!(": {e}"))
                )
            },
        ));
    }
    s
}

/// The outputs of `s`, in vertex order.
fn sorted(s: &JobStatus) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = s
        .outputs
        .iter()
        .map(|(n, b)| (n.clone(), String::from_utf8_lossy(b).into_owned()))
        .collect();
    v.sort();
    v
}

/// The items the pipeline's sink counted (`items N sum S`).
fn sink_items(s: &JobStatus) -> Option<u64> {
    s.outputs.iter().find_map(|(_, out)| {
        let text = String::from_utf8_lossy(out);
        let mut words = text.split_whitespace();
        (words.next() == Some("items"))
            .then(|| words.next()?.parse().ok())
            .flatten()
    })
}

/// Waits (up to a minute) until `n` nodes of the group are live.
async fn all_live(c: &Client, n: usize) -> Result<(), Failure> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let g = c.group().await.map_err(wire)?;
        if g.nodes.iter().filter(|x| !x.lost).count() >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(failed(format!("fewer than {n} nodes live after a minute")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
