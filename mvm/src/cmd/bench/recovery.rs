//! The part of `mvm bench checkpoint` that needs a lab: a job's checkpoint through the broker
//! and its nodes, a part of it moved to another node while it runs, and its recovery when one
//! of its nodes is killed.

use std::path::Path;
use std::time::{Duration, Instant};

use mvm_superpeer::client::Client;
use mvm_superpeer::proto::{JobState, JobStatus};
use serde::Serialize;

use super::labjob::{self, Pipeline, status, until};

/// How long the bench waits for a job.
const TEN_MINUTES: Duration = Duration::from_secs(600);
use crate::cmd::job::wire;
use crate::exit::Failure;

/// A job's checkpoints through the broker, and its recovery from a node killed (`SIGKILL`).
#[derive(Debug, Serialize)]
pub(crate) struct RecoveryFigures {
    /// The workload: the C pipeline over two of the lab's three nodes.
    pub(crate) workload: String,
    /// Median milliseconds of `mvm checkpoint` on the running job: every part paused, its
    /// links drained to the cut's mark, imaged and sent, the blobs stored and the cut recorded
    /// in the job log.
    pub(crate) checkpoint_ms: f64,
    /// Checkpoints taken for the median.
    pub(crate) checkpoints: usize,
    /// The bytes of the last one (every part's blob).
    pub(crate) checkpoint_bytes: u64,
    /// Median milliseconds of `mvm migrate` moving the job's second part to another node and
    /// back, as the client waits for it.
    pub(crate) migrate_ms: f64,
    /// Median milliseconds the moved part was paused, from its pause to its start on the new
    /// node, as the broker measured it (goal: at most 50).
    pub(crate) migration_downtime_ms: f64,
    /// Moves made for the medians.
    pub(crate) migrations: usize,
    /// Milliseconds from the kill to the run given up (the loss noticed: a link to the killed
    /// node broke, or its heartbeats stopped).
    pub(crate) detected_ms: f64,
    /// Milliseconds from the run given up to every part of the next run started, restored
    /// from the checkpoint (goal: at most 2000).
    pub(crate) running_again_ms: f64,
    /// The checkpoint the job went on from.
    pub(crate) from_cut: Option<u64>,
    /// Whether the job ended with the output of an undisturbed run.
    pub(crate) identical: bool,
}

fn failed(e: impl std::fmt::Display) -> Failure {
    Failure::failed(anyhow::anyhow!("bench checkpoint (recovery): {e}"))
}

/// Runs the pipeline of `jobs` (`items` items) with checkpoints over two nodes of a lab of
/// three, takes `checkpoints` checkpoints, moves its second part to the third node and back
/// `checkpoints` times, kills the node of its first part and waits for it to end; then runs it
/// undisturbed to compare.
pub(crate) fn run(
    dir: &Path,
    jobs: &Path,
    items: u64,
    checkpoints: usize,
) -> Result<RecoveryFigures, Failure> {
    let pipeline = Pipeline::new(dir, jobs, items)?;
    let saved = pipeline.profile("saved", "[checkpoint]\ninterval = \"60s\"\nkeep = 2\n")?;
    let plain = pipeline.profile("plain", "")?;
    let (mut lab, rt, client) = labjob::start(dir)?;
    let (taken, job) = rt.block_on(async {
        let s = client.submit(&saved).await.map_err(wire)?;
        let s = until(
            &client,
            &s,
            |st| st != JobState::Preparing && st != JobState::Pending,
            TEN_MINUTES,
        )
        .await?;
        if s.state != JobState::Running {
            return Err(failed(format!("the job did not run: {s:?}")));
        }
        let mut taken = Vec::new();
        for _ in 0..checkpoints {
            let t = Instant::now();
            client.checkpoint(&s.job).await.map_err(wire)?;
            taken.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let moved = migrate(&client, &s, checkpoints).await?;
        let s = status(&client, &s).await?;
        if s.state != JobState::Running {
            return Err(failed(format!(
                "the job ended before a node could be killed ({} items is too few)",
                items
            )));
        }
        Ok(((taken, moved), s))
    })?;
    let (mut taken, (mut moved, mut paused)) = taken;
    let bytes = job.checkpoints.last().map_or(0, |c| c.bytes());
    let victim = job
        .parts
        .first()
        .map(|p| p.name.clone())
        .ok_or_else(|| failed("the job has no parts"))?;
    let killed_ms = now_ms();
    if !lab.kill_daemon(&victim) {
        return Err(failed(format!("{victim} is not a daemon of the lab")));
    }
    let (end, quiet) = rt.block_on(async {
        let end = until(&client, &job, JobState::is_final, TEN_MINUTES).await?;
        let quiet = client.submit_and_wait(&plain).await.map_err(wire)?;
        let quiet = until(&client, &quiet, JobState::is_final, TEN_MINUTES).await?;
        Ok::<_, Failure>((end, quiet))
    })?;
    drop(lab);
    let Some(restart) = end.restarts.first() else {
        return Err(failed(format!("the job did not run again: {end:?}")));
    };
    if end.state != JobState::Done || quiet.state != JobState::Done {
        return Err(failed(format!(
            "the job ended {:?} ({}); undisturbed, {:?} ({})",
            end.state,
            end.error.unwrap_or_default(),
            quiet.state,
            quiet.error.unwrap_or_default()
        )));
    }
    let sorted = |s: &JobStatus| {
        let mut v = s.outputs.clone();
        v.sort();
        v
    };
    let identical = sorted(&end) == sorted(&quiet);
    taken.sort_by(f64::total_cmp);
    moved.sort_by(f64::total_cmp);
    paused.sort_by(f64::total_cmp);
    let median = |v: &[f64]| v.get(v.len() / 2).copied().unwrap_or(0.0);
    Ok(RecoveryFigures {
        migrate_ms: median(&moved),
        migration_downtime_ms: median(&paused),
        migrations: moved.len(),
        workload: format!("pipeline-4 ({items} items) over 2 of 3 node processes"),
        checkpoint_ms: taken.get(taken.len() / 2).copied().unwrap_or(0.0),
        checkpoints: taken.len(),
        checkpoint_bytes: bytes,
        detected_ms: restart.at_ms.saturating_sub(killed_ms) as f64,
        running_again_ms: restart.recovery_ms().unwrap_or(u64::MAX) as f64,
        from_cut: restart.from_cut,
        identical,
    })
}

/// Moves the second part of job `s` to the lab's node that runs none of it and back, `n`
/// times each way; each move's time as the client waited for it, and as the broker measured
/// the part's pause.
async fn migrate(c: &Client, s: &JobStatus, n: usize) -> Result<(Vec<f64>, Vec<f64>), Failure> {
    let part = s
        .parts
        .get(1)
        .ok_or_else(|| failed("the job has one part"))?;
    let vertex = part
        .vertices
        .first()
        .cloned()
        .ok_or_else(|| failed("a part without vertices"))?;
    let home = part.name.clone();
    let free = ["node0", "node1", "node2"]
        .into_iter()
        .find(|n| s.parts.iter().all(|p| p.name != *n))
        .ok_or_else(|| failed("no node without a part"))?;
    let (mut waited, mut paused) = (Vec::new(), Vec::new());
    for i in 0..2 * n {
        let to = if i % 2 == 0 { free } else { home.as_str() };
        let t = Instant::now();
        let moves = c
            .migrate(&s.job, Some(vertex.clone()), None, to)
            .await
            .map_err(wire)?;
        waited.push(t.elapsed().as_secs_f64() * 1e3);
        paused.extend(moves.iter().map(|m| m.downtime_ms as f64));
    }
    Ok((waited, paused))
}

/// Milliseconds since the Unix epoch (the clock the job log's times are read on).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
