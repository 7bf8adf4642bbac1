//! `mvm bench checkpoint`: what checkpoints cost jobs on this node.

use std::path::Path;
use std::time::Duration;

use mvm_component::bench::checkpoint::{
    CheckpointFigures, MoveFigures, Workload, checkpoint, move_part,
};
use mvm_component::topology::generate::generate;
use serde::Serialize;

use crate::exit::Failure;

/// The figures of every workload.
#[derive(Debug, Serialize)]
pub(crate) struct CheckpointReport {
    /// One per workload.
    pub(crate) workloads: Vec<CheckpointFigures>,
    /// The pipeline over two parts joined by a link on loopback TCP, its second part moved to
    /// another node while it runs (goal: downtime ≤ 50 ms).
    pub(crate) moves: MoveFigures,
    /// The pipeline with checkpoints in a lab of node processes: a checkpoint through the
    /// broker, and the recovery from a node killed.
    pub(crate) recovery: super::recovery::RecoveryFigures,
}

fn failed(e: impl std::fmt::Display) -> Failure {
    Failure::failed(anyhow::anyhow!("bench checkpoint: {e}"))
}

/// Measures a 16-vertex token ring of `hops` hops and the C pipeline of `jobs` (source, two
/// stages, sink) over `items` items.
pub(crate) fn run(
    hops: u64,
    items: u64,
    interval: Duration,
    runs: usize,
    jobs: &Path,
) -> Result<CheckpointReport, Failure> {
    let read = |name: &str| {
        let path = jobs.join(format!("{name}.wasm"));
        std::fs::read(&path).map_err(|e| {
            Failure::input(anyhow::anyhow!(
                "bench checkpoint: {}: {e} (scripts/build-jobs builds it)",
                path.display()
            ))
        })
    };
    let ring = Workload {
        name: "ring-16".into(),
        topology: generate("ring", "16").map_err(failed)?,
        modules: vec![(
            "token".into(),
            mvm_component::bench::TOKEN_WAT.as_bytes().to_vec(),
        )],
        params: vec![("hops".into(), hops.to_string())],
    };
    let pipeline = Workload {
        name: "pipeline-4".into(),
        topology: generate("pipeline", "4").map_err(failed)?,
        modules: vec![
            ("source".into(), read("pipe_source")?),
            ("stage".into(), read("pipe_stage")?),
            ("sink".into(), read("pipe_sink")?),
        ],
        params: vec![
            ("count".into(), items.to_string()),
            ("factor".into(), "3".into()),
        ],
    };
    let rt = super::wasm_runtime()?;
    let tokio = super::tokio()?;
    let mut workloads = Vec::new();
    for w in [&ring, &pipeline] {
        workloads.push(
            tokio
                .block_on(checkpoint(&rt, w, interval, runs))
                .map_err(failed)?,
        );
    }
    let moves = tokio
        .block_on(move_part(&rt, &pipeline, Duration::from_millis(50), runs))
        .map_err(failed)?;
    if !moves.identical {
        return Err(failed(
            "a run whose part was moved gave another output than the undisturbed run",
        ));
    }
    let tmp = tempfile::Builder::new()
        .prefix("mvm-bench-recovery-")
        .tempdir()
        .map_err(failed)?;
    let recovery = super::recovery::run(tmp.path(), jobs, items, 5)?;
    if !recovery.identical {
        return Err(failed(
            "a job restored from its checkpoint gave another output than the undisturbed run",
        ));
    }
    Ok(CheckpointReport {
        workloads,
        moves,
        recovery,
    })
}

/// The report for people.
pub(crate) fn text(r: &CheckpointReport) -> String {
    let mut s = String::from("checkpoints of jobs on this node (medians)\n");
    for w in &r.workloads {
        s.push_str(&format!(
            "  {} ({} vertices; modules {} B, pausable {} B)\n    \
             plain {:.3} s, pausable {:.3} s ({:+.1} %), checkpoint every {:.1} s {:.3} s \
             (slowdown {:+.1} %, goal <= 10 %)\n    \
             {} checkpoints: pause {:.2} ms, capture and encode {:.2} ms, {} B ({} B per vertex); \
             blob to running again {:.2} ms\n",
            w.workload,
            w.vertices,
            w.module_bytes.0,
            w.module_bytes.1,
            w.plain_s,
            w.instrumented_s,
            w.pausable_cost_pct,
            w.interval_s,
            w.checkpointed_s,
            w.slowdown_pct,
            w.checkpoints,
            w.pause_ms,
            w.capture_ms,
            w.blob_bytes,
            w.bytes_per_vertex,
            w.restore_ms,
        ));
    }
    let m = &r.moves;
    s.push_str(&format!(
        "  {} over two parts on loopback TCP, the second moved to another node while it runs: \
         downtime {:.2} ms (longest {:.2} ms; goal <= 50 ms) over {} moves; output {}{}",
        m.workload,
        m.downtime_ms,
        m.downtime_max_ms,
        m.moves,
        if m.identical {
            "identical"
        } else {
            "DIFFERENT"
        },
        if m.stalled > 0 {
            format!("; {} run(s) STALLED (given up after 2 min)", m.stalled)
        } else {
            String::new()
        },
    ));
    let r = &r.recovery;
    s.push_str(&format!(
        "\n  {} with checkpoints: mvm checkpoint {:.1} ms ({} taken; {} B); mvm migrate {:.1} ms, \
         the part paused {:.1} ms (goal <= 50 ms; {} moves); a node killed: \
         noticed after {:.0} ms, running again from checkpoint {} after {:.0} ms more \
         (goal <= 2000 ms); output {}",
        r.workload,
        r.checkpoint_ms,
        r.checkpoints,
        r.checkpoint_bytes,
        r.migrate_ms,
        r.migration_downtime_ms,
        r.migrations,
        r.detected_ms,
        r.from_cut.map_or("-".to_owned(), |c| c.to_string()),
        r.running_again_ms,
        if r.identical {
            "identical"
        } else {
            "DIFFERENT"
        },
    ));
    s
}
