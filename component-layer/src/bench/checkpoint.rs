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

/// The workload as a job of plain modules and as one of pausable modules.
fn jobs<'a>(
    rt: &Runtime,
    w: &Workload,
    t: &'a crate::topology::Topology,
) -> Result<(JobSpec<'a>, JobSpec<'a>), BenchError> {
    let mut plain = std::collections::HashMap::new();
    let mut pausable = std::collections::HashMap::new();
    for (name, bytes) in &w.modules {
        plain.insert(name.clone(), rt.cache().load(name, bytes).map_err(err)?.0);
        pausable.insert(
            name.clone(),
            rt.cache().load_checkpointable(name, bytes).map_err(err)?.0,
        );
    }
    let spec = |modules| JobSpec {
        id: "bench".into(),
        topology: t,
        modules,
        params: w.params.iter().cloned().collect(),
        limits: Limits {
            memory_bytes: 4 << 20,
            cpu: None,
            wall: Some(Duration::from_secs(600)),
            ..Limits::default()
        },
        owner: None,
        sandboxes: Default::default(),
    };
    Ok((spec(plain), spec(pausable)))
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
    let (mut plain_bytes, mut pausable_bytes) = (0, 0);
    for (_, bytes) in &w.modules {
        plain_bytes += wat::parse_bytes(bytes).map_err(err)?.len();
        pausable_bytes += crate::runtime::checkpoint::instrument(bytes)
            .map_err(err)?
            .len();
    }
    let (plain_job, pausable_job) = jobs(rt, w, &t)?;
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

/// What moving a part of a running job to another node costs.
#[derive(Debug, Clone, Serialize)]
pub struct MoveFigures {
    /// The workload (its last half of vertices is the part that moves).
    pub workload: String,
    /// Moves measured.
    pub moves: usize,
    /// Median time the job stood still: from asking both parts to pause to the first part
    /// resumed and the moved part running on its new node (restored, linked, every vertex
    /// instantiated), in milliseconds.
    pub downtime_ms: f64,
    /// The longest.
    pub downtime_max_ms: f64,
    /// Whether every moved run that ended gave the undisturbed run's output.
    pub identical: bool,
    /// Moved runs that did not end within two minutes (given up and not compared; each queue's
    /// depth is logged). Once common with millions of items: the staying part ran on dedicated
    /// threads and fed its stream link a tenth as fast as from the shared pool (a part with
    /// stream links now stays on the pool; `Prepared::direct_remote_links`).
    pub stalled: usize,
}

/// A link between two parts over loopback TCP (the stream protocol), with its controls and
/// its two ends' tasks.
pub(crate) struct Link {
    pub(crate) hold: mvm_queue::remote::Hold,
    pub(crate) drain: mvm_queue::remote::Drain,
    pub(crate) ends: Vec<tokio::task::JoinHandle<()>>,
}

/// Links an outbox to a remote input over a fresh loopback TCP connection.
pub(crate) async fn link(
    outbox: mvm_queue::queue::Receiver<bytes::Bytes>,
    inbox: mvm_queue::queue::Sender<bytes::Bytes>,
) -> Result<Link, BenchError> {
    use mvm_queue::remote::{Drain, Hold, Options, export_with, import_with};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(err)?;
    let addr = listener.local_addr().map_err(err)?;
    let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    let (ar, aw) = a.map_err(err)?.into_split();
    let (br, bw) = b.map_err(err)?.0.into_split();
    let (hold, drain) = (Hold::new(), Drain::new());
    let exporter = {
        let hold = hold.clone();
        tokio::spawn(async move {
            let _ = export_with(&outbox, ar, aw, &Options::default(), &hold).await;
        })
    };
    let importer = {
        let drain = drain.clone();
        tokio::spawn(async move {
            let _ = import_with(inbox, br, bw, &Options::default(), &drain).await;
        })
    };
    Ok(Link {
        hold,
        drain,
        ends: vec![exporter, importer],
    })
}

fn output(report: &crate::runtime::JobReport) -> Vec<bytes::Bytes> {
    report.vertices.iter().map(|v| v.stdout.clone()).collect()
}

/// Runs a two-part workload (its vertices split in half, one link between the halves) `runs`
/// times, moving the second part to a fresh node after `after` each time; compares each
/// output with an undisturbed run.
///
/// # Errors
/// A workload that is not split by exactly one link, or a run, pause or restore that fails.
pub async fn move_part(
    rt: &Runtime,
    w: &Workload,
    after: Duration,
    runs: usize,
) -> Result<MoveFigures, BenchError> {
    let t = topology(&w.topology, Config::default())?;
    let n = t.vertices.len();
    let placement: Vec<usize> = (0..n).map(|v| usize::from(v >= n / 2)).collect();
    let (plain, job) = jobs(rt, w, &t)?;
    let expected = {
        let q = queue_controller();
        output(&rt.run(&plain, &q, &AllowAll).await.map_err(err)?)
    };
    let one = |what: &str| BenchError(format!("{}: {what}", w.name));
    let (mut downtimes, mut identical, mut stalled) = (Vec::new(), true, 0);
    for _ in 0..runs {
        let nodes = [queue_controller(), queue_controller()];
        let mut p0 = rt
            .prepare(&job, &nodes[0], &AllowAll, &placement, 0)
            .map_err(err)?;
        let mut p1 = rt
            .prepare(&job, &nodes[1], &AllowAll, &placement, 1)
            .map_err(err)?;
        if p0.remote_outputs.len() != 1
            || p1.remote_inputs.len() != 1
            || !p0.remote_inputs.is_empty()
        {
            return Err(one(
                "its halves must be joined by exactly one link, first to second",
            ));
        }
        let (Some(out), Some(input)) = (p0.remote_outputs.pop(), p1.remote_inputs.pop()) else {
            return Err(one("no link"));
        };
        let outbox = out.receiver.clone();
        let old = link(out.receiver, input.sender).await?;
        let (Some(c0), Some(c1)) = (p0.control(), p1.control()) else {
            return Err(one("not checkpointable"));
        };
        let run0 = tokio::spawn(p0.run());
        let run1 = tokio::spawn(p1.run());
        tokio::time::sleep(after).await;
        let start = Instant::now();
        let wait = Duration::from_secs(10);
        let (a, b) = tokio::join!(c0.pause(wait), c1.pause(wait));
        let (a, b) = (a.map_err(err)?, b.map_err(err)?);
        let (held, drained) = tokio::join!(old.hold.hold(1), old.drain.drain(1));
        held.map_err(err)?;
        drained.map_err(err)?;
        let mut image = b.image();
        // Queues are named within the job: the link's is `vertex:port`.
        let inbox = format!("{}:{}", input.vertex, input.port);
        if !image.append(&inbox, old.drain.held()) {
            return Err(one("the moved part has no queue for its link"));
        }
        run1.abort();
        for end in &old.ends {
            end.abort();
        }
        let _ = run1.await;
        drop(b);
        nodes[1].destroy_job("bench");
        let new_node = queue_controller();
        let mut moved = rt
            .prepare(&job, &new_node, &AllowAll, &placement, 1)
            .map_err(err)?;
        moved.restore(&image).map_err(err)?;
        let input = moved.remote_inputs.pop().ok_or_else(|| one("no link"))?;
        let _new = link(outbox, input.sender).await?;
        let control = moved.control().ok_or_else(|| one("not checkpointable"))?;
        let run1 = tokio::spawn(moved.run());
        a.resume();
        // Running again: every moved vertex instantiated, rewound and at a pause point once.
        drop(control.pause(wait).await.map_err(err)?);
        downtimes.push(start.elapsed().as_secs_f64() * 1e3);
        let (abort0, abort1) = (run0.abort_handle(), run1.abort_handle());
        let ended = tokio::time::timeout(Duration::from_secs(120), async {
            let r0 = run0.await.map_err(err)?.map_err(err)?;
            let r1 = run1.await.map_err(err)?.map_err(err)?;
            Ok::<_, BenchError>((r0, r1))
        })
        .await;
        let Ok(ended) = ended else {
            for (node, q) in [("first", &nodes[0]), ("new", &new_node)] {
                for s in q.list(Some("bench")) {
                    tracing::warn!(node, queue = %s.name, depth = s.depth, items_in = s.items_in,
                        items_out = s.items_out, "a moved run stalled");
                }
            }
            abort0.abort();
            abort1.abort();
            stalled += 1;
            for q in [&nodes[0], &new_node] {
                q.destroy_job("bench");
            }
            continue;
        };
        let (r0, r1) = ended?;
        let mut got = output(&r0);
        got.extend(output(&r1));
        let mut want = expected.clone();
        want.sort();
        got.sort();
        identical &= got == want;
        for q in [&nodes[0], &new_node] {
            q.destroy_job("bench");
        }
    }
    let max = downtimes.iter().copied().fold(0.0, f64::max);
    Ok(MoveFigures {
        workload: w.name.clone(),
        moves: downtimes.len(),
        downtime_ms: median(downtimes),
        downtime_max_ms: max,
        identical,
        stalled,
    })
}
