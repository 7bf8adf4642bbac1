//! The cost of checkpoints on one node (`mvm bench checkpoint`): a job run with plain modules,
//! with checkpointable modules, and with checkpointable modules paused and saved every
//! interval, side by side; each checkpoint's pause, capture and size; and the time from a saved
//! blob to the job running again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mvm_queue::Controller;
use mvm_queue::codec::Registry;
use mvm_queue::controller::Limits as QueueLimits;
use mvm_queue::queue::Config;
use serde::Serialize;

use super::{BenchError, err, topology};
use crate::runtime::checkpoint::PartImage;
use crate::runtime::{AllowAll, JobSpec, Limits, Runtime};

/// A job to measure: a topology, its modules (as bytes) and parameters.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Its name in the report.
    pub name: String,
    /// The topology (DOT).
    pub topology: String,
    /// The module of each component.
    pub modules: Vec<(String, Vec<u8>)>,
    /// Job parameters.
    pub params: Vec<(String, String)>,
}

/// What checkpoints cost one workload.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointFigures {
    /// The workload.
    pub workload: String,
    /// Its vertices.
    pub vertices: usize,
    /// Module bytes: as submitted, and made checkpointable.
    pub module_bytes: (usize, usize),
    /// Median wall time with plain modules, in seconds.
    pub plain_s: f64,
    /// Median wall time with checkpointable modules and no checkpoint.
    pub instrumented_s: f64,
    /// Median wall time with checkpointable modules and a checkpoint every interval.
    pub checkpointed_s: f64,
    /// instrumented / plain − 1, in percent: what being pausable costs.
    pub pausable_cost_pct: f64,
    /// checkpointed / plain − 1, in percent: the job's slowdown (goal ≤ 10 % at 1 s).
    pub slowdown_pct: f64,
    /// The interval, in seconds.
    pub interval_s: f64,
    /// Checkpoints taken over all runs.
    pub checkpoints: usize,
    /// Median time from asking for a pause to every vertex paused, in milliseconds.
    pub pause_ms: f64,
    /// Median time to read the paused part and encode it, in milliseconds.
    pub capture_ms: f64,
    /// Median encoded size of a checkpoint, in bytes.
    pub blob_bytes: usize,
    /// That per vertex.
    pub bytes_per_vertex: usize,
    /// Median time from a blob to the restored job running (decoded, wired, every vertex
    /// instantiated and paused once), in milliseconds.
    pub restore_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn queue_controller() -> Controller {
    Controller::new(QueueLimits::default(), Arc::new(Registry::new()))
}

/// Measures one workload: `runs` rounds of a plain run, a pausable run and a checkpointed run,
/// back to back; then `runs` restores from the last checkpoint.
///
/// # Errors
/// A module that cannot be made checkpointable, or a run, pause or restore that fails.
pub async fn checkpoint(
    rt: &Runtime,
    w: &Workload,
    interval: Duration,
    runs: usize,
) -> Result<CheckpointFigures, BenchError> {
    let t = topology(&w.topology, Config::default())?;
    let mut plain = std::collections::HashMap::new();
    let mut pausable = std::collections::HashMap::new();
    let (mut plain_bytes, mut pausable_bytes) = (0, 0);
    for (name, bytes) in &w.modules {
        plain.insert(name.clone(), rt.cache().load(name, bytes).map_err(err)?.0);
        pausable.insert(
            name.clone(),
            rt.cache().load_checkpointable(name, bytes).map_err(err)?.0,
        );
        plain_bytes += wat::parse_bytes(bytes).map_err(err)?.len();
        pausable_bytes += crate::runtime::checkpoint::instrument(bytes)
            .map_err(err)?
            .len();
    }
    let spec = |modules: &std::collections::HashMap<String, wasmtime::Module>| JobSpec {
        id: "bench".into(),
        topology: &t,
        modules: modules.clone(),
        params: w.params.iter().cloned().collect(),
        limits: Limits {
            memory_bytes: 4 << 20,
            cpu: None,
            wall: Some(Duration::from_secs(600)),
        },
        owner: None,
    };
    let (plain_job, pausable_job) = (spec(&plain), spec(&pausable));
    let here = vec![0; t.vertices.len()];
    let (mut plains, mut pausables, mut saved) = (Vec::new(), Vec::new(), Vec::new());
    let (mut pauses, mut captures, mut sizes) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = None;
    for _ in 0..runs {
        let q = queue_controller();
        plains.push(rt.run(&plain_job, &q, &AllowAll).await.map_err(err)?.wall);
        pausables.push(
            rt.run(&pausable_job, &q, &AllowAll)
                .await
                .map_err(err)?
                .wall,
        );
        // Checkpointed: paused, read and encoded every interval until it ends.
        let prepared = rt
            .prepare(&pausable_job, &q, &AllowAll, &here, 0)
            .map_err(err)?;
        let control = prepared
            .control()
            .ok_or_else(|| BenchError("the part is not checkpointable".into()))?;
        let start = Instant::now();
        let mut run = tokio::spawn(prepared.run());
        loop {
            tokio::select! {
                r = &mut run => {
                    r.map_err(err)?.map_err(err)?;
                    break;
                }
                () = tokio::time::sleep(interval) => {}
            }
            let asked = Instant::now();
            let Ok(p) = control.pause(Duration::from_secs(10)).await else {
                continue; // it ended meanwhile
            };
            let paused = Instant::now();
            let blob = p.image().encode().map_err(err)?;
            pauses.push(paused.duration_since(asked).as_secs_f64() * 1e3);
            captures.push(paused.elapsed().as_secs_f64() * 1e3);
            sizes.push(blob.len() as f64);
            p.resume();
            last = Some(blob);
        }
        saved.push(start.elapsed());
        q.destroy_job("bench");
    }
    let mut restores = Vec::new();
    if let Some(blob) = &last {
        for _ in 0..runs {
            let q = queue_controller();
            let start = Instant::now();
            let image = PartImage::decode(blob).map_err(err)?;
            let mut prepared = rt
                .prepare(&pausable_job, &q, &AllowAll, &here, 0)
                .map_err(err)?;
            prepared.restore(&image).map_err(err)?;
            let control = prepared
                .control()
                .ok_or_else(|| BenchError("the part is not checkpointable".into()))?;
            let run = tokio::spawn(prepared.run());
            // Running again: every vertex instantiated, rewound and at a pause point once.
            drop(control.pause(Duration::from_secs(10)).await.map_err(err)?);
            restores.push(start.elapsed().as_secs_f64() * 1e3);
            run.abort();
            let _ = run.await;
            // Stopped on purpose mid-way: its items go quietly.
            for s in q.list(Some("bench")) {
                let name = s.name.strip_prefix("bench/").unwrap_or(&s.name);
                if let Some(h) = q.get("bench", name) {
                    h.queue.drain();
                }
            }
            q.destroy_job("bench");
        }
    }
    let secs = |v: &[Duration]| median(v.iter().map(Duration::as_secs_f64).collect());
    let (p, i, c) = (secs(&plains), secs(&pausables), secs(&saved));
    let blob = median(sizes.clone());
    let vertices = t.vertices.len();
    Ok(CheckpointFigures {
        workload: w.name.clone(),
        vertices,
        module_bytes: (plain_bytes, pausable_bytes),
        plain_s: p,
        instrumented_s: i,
        checkpointed_s: c,
        pausable_cost_pct: (i / p - 1.0) * 100.0,
        slowdown_pct: (c / p - 1.0) * 100.0,
        interval_s: interval.as_secs_f64(),
        checkpoints: sizes.len(),
        pause_ms: median(pauses),
        capture_ms: median(captures),
        blob_bytes: blob as usize,
        bytes_per_vertex: (blob / vertices.max(1) as f64) as usize,
        restore_ms: median(restores),
    })
}
