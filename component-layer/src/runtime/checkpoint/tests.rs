use std::time::Duration;

use super::super::tests::{controller, runtime_with, spec_of, topology};
use super::*;
use crate::runtime::{AllowAll, JobSpec, Runtime};

/// A C job built by `scripts/build-jobs` (read at run time: a clean checkout has none until
/// then, and lints build the tests before it runs).
pub(super) fn built(name: &str) -> &'static [u8] {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../jobs/build")
        .join(format!("{name}.wasm"));
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/build-jobs)", path.display()));
    Box::leak(bytes.into_boxed_slice())
}
const PIPELINE: &str = include_str!("../../../../topologies/pipeline-4.dot");

/// Sends a zero, then sums `i * i` for `i` below 3,000,000 in locals, calling `mvm.yield`
/// each time round, then sends the sum. A run restarted from the beginning instead of resumed
/// would send the zero twice.
const COMPUTE: &str = r#"(module
  (import "mvm" "send" (func $send (param i32 i32 i32 i32) (result i32)))
  (import "mvm" "yield" (func $yield))
  (memory (export "memory") 1)
  (data (i32.const 0) "out")
  (func (export "_start") (local $i i64) (local $acc i64)
    (drop (call $send (i32.const 0) (i32.const 3) (i32.const 16) (i32.const 8)))
    (loop $l
      (local.set $acc (i64.add (local.get $acc) (i64.mul (local.get $i) (local.get $i))))
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (call $yield)
      (br_if $l (i64.lt_u (local.get $i) (i64.const 3000000))))
    (i64.store (i32.const 16) (local.get $acc))
    (drop (call $send (i32.const 0) (i32.const 3) (i32.const 16) (i32.const 8)))))"#;

/// Spins forever without calling anything.
const SPIN: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "_start") (loop $l (br $l))))"#;

fn spec<'a>(
    rt: &Runtime,
    t: &'a crate::topology::Topology,
    modules: &[(&str, &[u8])],
    params: &[(&str, &str)],
    checkpointable: bool,
) -> JobSpec<'a> {
    let mut job = spec_of(rt, t, modules, params, checkpointable);
    job.limits.memory_bytes = 2 << 20;
    job
}

/// The output of `vertex` in an undisturbed run of plain modules.
async fn undisturbed(
    rt: &Runtime,
    t: &crate::topology::Topology,
    modules: &[(&str, &[u8])],
    params: &[(&str, &str)],
    vertex: &str,
) -> String {
    let q = controller();
    let plain = rt
        .run(&spec(rt, t, modules, params, false), &q, &AllowAll)
        .await
        .expect("runs");
    sink_output(&plain, vertex)
}

fn pipeline_modules() -> [(&'static str, &'static [u8]); 3] {
    [
        ("source", built("pipe_source")),
        ("stage", built("pipe_stage")),
        ("sink", built("pipe_sink")),
    ]
}

/// Every vertex's counts in the reports of a job's parts, by vertex.
pub(super) fn counts_of(
    reports: &[&crate::runtime::JobReport],
) -> std::collections::BTreeMap<String, VertexCounts> {
    let counts: std::collections::BTreeMap<_, _> = (reports.iter())
        .flat_map(|r| r.vertices.iter())
        .map(|v| (v.vertex.clone(), v.counts.clone()))
        .collect();
    assert!(
        counts
            .values()
            .any(|c| c.sent.iter().any(|e| e.2.items > 0)),
        "something was counted: {counts:?}"
    );
    // Each edge names the vertex and port it goes to, and that vertex takes what it counts.
    for (v, c) in &counts {
        for (_, to, _) in &c.sent {
            let (vertex, port) = to.split_once(':').expect("vertex:port");
            let into = counts.get(vertex).map(|c| &c.received);
            assert!(
                into.is_some_and(|r| r.iter().any(|(p, _)| p == port)),
                "{v} sends to {to}, which is no input port: {counts:?}"
            );
        }
    }
    counts
}

fn sink_output(report: &crate::runtime::JobReport, vertex: &str) -> String {
    let v = report
        .vertices
        .iter()
        .find(|v| v.vertex == vertex)
        .expect("the sink reported");
    String::from_utf8_lossy(&v.stdout).into_owned()
}

/// Prepares the job as one part on `q` at `placement` and runs it; its control and its run.
fn start(
    rt: &Runtime,
    job: &JobSpec<'_>,
    q: &mvm_queue::Controller,
    placement: &[usize],
) -> (
    PartControl,
    tokio::task::JoinHandle<Result<crate::runtime::JobReport, crate::runtime::JobError>>,
) {
    let prepared = rt
        .prepare(job, q, &AllowAll, placement, 0)
        .expect("prepared");
    let control = prepared.control().expect("checkpointable");
    (control, tokio::spawn(prepared.run()))
}

#[test]
fn a_module_that_exports_no_memory_cannot_be_checkpointed() {
    let e = instrument(br#"(module (func (export "_start")))"#).expect_err("no memory");
    assert!(matches!(e, RewriteError::NoMemory), "{e}");
    let e = instrument(br#"(module (memory (export "memory") 1))"#).expect_err("no entry");
    assert!(matches!(e, RewriteError::NoEntry), "{e}");
    let e = instrument(b"\0asm garbage").expect_err("not a module");
    assert!(matches!(e, RewriteError::Invalid(_)), "{e}");
}

#[test]
fn mutable_globals_are_exported_and_asyncify_is_added() {
    let wasm = instrument(
        br#"(module (memory (export "memory") 1) (global $g (mut i32) (i32.const 7))
            (global $k i32 (i32.const 1))
            (func (export "_start") (global.set $g (i32.const 8))))"#,
    )
    .expect("instrumented");
    let names: Vec<String> = wasmparser::Parser::new(0)
        .parse_all(&wasm)
        .filter_map(|p| match p.expect("valid") {
            wasmparser::Payload::ExportSection(s) => Some(
                s.into_iter()
                    .map(|e| e.expect("export").name.to_owned())
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(names.iter().any(|n| n == "__mvm_global_0"), "{names:?}");
    assert!(
        !names.iter().any(|n| n == "__mvm_global_1"),
        "immutable: {names:?}"
    );
    for f in rewrite::ASYNCIFY {
        assert!(names.iter().any(|n| n == f), "{f} in {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_paused_and_resumed_many_times_gives_the_undisturbed_output() {
    paused_and_resumed(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_on_dedicated_threads_paused_and_resumed_gives_the_undisturbed_output() {
    paused_and_resumed(4).await;
}

/// Pauses a running pipeline every 2 ms (with `dedicated` vertex threads), reading its queues
/// each time, until it ends; its output must be the undisturbed one.
async fn paused_and_resumed(dedicated: usize) {
    let rt = runtime_with(dedicated);
    let t = topology(PIPELINE);
    let params = [("count", "20000"), ("factor", "3")];
    let expected = undisturbed(&rt, &t, &pipeline_modules(), &params, "p3").await;
    assert!(expected.starts_with("items 20000 "), "{expected}");

    let job = spec(&rt, &t, &pipeline_modules(), &params, true);
    let q = controller();
    let (control, run) = start(&rt, &job, &q, &[0; 4]);
    let mut pauses = 0;
    let mut held = 0;
    while !run.is_finished() {
        tokio::time::sleep(Duration::from_millis(2)).await;
        match control.pause(Duration::from_secs(5)).await {
            Ok(p) => {
                pauses += 1;
                let image = p.image();
                held += image.queues.iter().map(|q| q.items.len()).sum::<usize>();
                if p.vertices().iter().all(|v| v.phase == VertexPhase::Ended) {
                    break;
                }
                p.resume();
            }
            Err(e) => panic!("pause {pauses}: {e}"),
        }
    }
    let report = run.await.expect("joined").expect("runs");
    q.destroy_job("job");
    assert!(pauses >= 3, "paused {pauses} times");
    assert_eq!(sink_output(&report, "p3"), expected);
    // Items were waiting in queues at some pause, and were neither lost nor doubled.
    assert!(held > 0, "no pause found items in the queues");
}

/// Runs the job to a pause after `after`, saves the part, abandons the run, and restores the
/// part from the saved blob into fresh queues and instances; the restored run's report (with
/// its queues' statistics: what was sent after the restore).
async fn restored_run(
    rt: &Runtime,
    job: &JobSpec<'_>,
    vertices: usize,
    after: Duration,
) -> (crate::runtime::JobReport, PartImage) {
    let q = controller();
    let (control, run) = start(rt, job, &q, &vec![0; vertices]);
    tokio::time::sleep(after).await;
    let blob = {
        let p = control.pause(Duration::from_secs(5)).await.expect("paused");
        // The run is lost while paused, as a node killed after its checkpoint was stored.
        run.abort();
        let _ = run.await;
        p.image().encode().expect("encoded")
    };
    q.destroy_job(&job.id);
    let image = PartImage::decode(&blob).expect("decoded");
    let mut again = rt
        .prepare(job, &q, &AllowAll, &vec![0; vertices], 0)
        .expect("prepared again");
    again.restore(&image).expect("restored");
    let mut report = again.run().await.expect("the restored part runs");
    report.queues = q.destroy_job(&job.id);
    (report, image)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c_pipeline_restored_from_a_checkpoint_gives_the_undisturbed_output() {
    let rt = runtime_with(0);
    let t = topology(PIPELINE);
    let params = [("count", "50000"), ("factor", "3")];
    let expected = undisturbed(&rt, &t, &pipeline_modules(), &params, "p3").await;
    let plain = {
        let plain = spec(&rt, &t, &pipeline_modules(), &params, false);
        let q = controller();
        counts_of(&[&rt.run(&plain, &q, &AllowAll).await.expect("runs")])
    };
    let job = spec(&rt, &t, &pipeline_modules(), &params, true);
    let mut mid = 0;
    for ms in [1, 5, 20] {
        let (report, image) = restored_run(&rt, &job, 4, Duration::from_millis(ms)).await;
        assert_eq!(
            sink_output(&report, "p3"),
            expected,
            "restored after {ms} ms"
        );
        // Each edge and port counts every item once, from before the checkpoint and after.
        assert_eq!(counts_of(&[&report]), plain, "restored after {ms} ms");
        if image
            .vertices
            .iter()
            .any(|v| matches!(v.phase, VertexPhase::Paused { .. }))
        {
            mid += 1;
        }
    }
    assert!(mid > 0, "no checkpoint was taken mid-run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compute_loop_that_yields_is_restored_with_its_locals() {
    let rt = runtime_with(0);
    let t = topology("digraph c { c [component=compute]; s [component=sink]; c:out -> s:in; }");
    let modules: [(&str, &[u8]); 2] = [
        ("compute", COMPUTE.as_bytes()),
        ("sink", built("pipe_sink")),
    ];
    let expected = undisturbed(&rt, &t, &modules, &[], "s").await;
    assert!(expected.starts_with("items 2 sum "), "{expected}");
    let job = spec(&rt, &t, &modules, &[], true);
    let (report, image) = restored_run(&rt, &job, 2, Duration::from_millis(30)).await;
    assert!(
        matches!(image.vertices[0].phase, VertexPhase::Paused { .. }),
        "the loop was paused mid-way"
    );
    assert_eq!(sink_output(&report, "s"), expected);
    // Resumed, not started again: only the sum was sent after the restore, not the zero.
    let sent: u64 = report.queues.iter().map(|q| q.items_in).sum();
    assert_eq!(sent, 1, "{:?}", report.queues);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_that_never_reaches_a_pause_point_times_out_and_the_rest_goes_on() {
    let rt = runtime_with(0);
    let t = topology("digraph s { spin [component=spin]; }");
    let mut job = spec(&rt, &t, &[("spin", SPIN.as_bytes())], &[], true);
    job.limits.wall = Some(Duration::from_millis(600));
    let q = controller();
    let (control, run) = start(&rt, &job, &q, &[0]);
    let e = control
        .pause(Duration::from_millis(100))
        .await
        .expect_err("never pauses");
    assert_eq!(
        e,
        PauseError::Timeout {
            vertices: vec!["spin".into()],
            timeout: Duration::from_millis(100)
        }
    );
    let end = run
        .await
        .expect("joined")
        .expect_err("the wall limit ends it");
    assert_eq!(end.kind, crate::runtime::ErrorKind::WallLimit);
    q.destroy_job("job");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_truncated_checkpoint_is_refused() {
    let rt = runtime_with(0);
    let t = topology(PIPELINE);
    let job = spec(&rt, &t, &pipeline_modules(), &[("count", "100000")], true);
    let q = controller();
    let (control, run) = start(&rt, &job, &q, &[0; 4]);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let blob = control
        .pause(Duration::from_secs(5))
        .await
        .expect("paused")
        .image()
        .encode()
        .expect("encoded");
    run.await.expect("joined").expect("runs");
    q.destroy_job("job");
    let mut flipped = blob.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert!(matches!(
        PartImage::decode(&flipped),
        Err(ImageError::Hash { .. })
    ));
    assert!(matches!(
        PartImage::decode(&blob[..blob.len() / 2]),
        Err(ImageError::Hash { .. })
    ));
    assert_eq!(PartImage::decode(b"MVM"), Err(ImageError::NotACheckpoint));
    let image = PartImage::decode(&blob).expect("the whole blob decodes");
    assert_eq!(image.vertices.len(), 4);
    // An image of another job is refused by a part.
    let mut other = image.clone();
    other.job = "another".into();
    let mut again = rt
        .prepare(&job, &q, &AllowAll, &[0; 4], 0)
        .expect("prepared");
    let e = again.restore(&other).expect_err("another job's image");
    assert!(e.cause.contains("another"), "{e}");
    q.destroy_job("job");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_of_plain_modules_has_no_control() {
    let rt = runtime_with(0);
    let t = topology(PIPELINE);
    let job = spec(&rt, &t, &pipeline_modules(), &[], false);
    let q = controller();
    let prepared = rt
        .prepare(&job, &q, &AllowAll, &[0; 4], 0)
        .expect("prepared");
    assert!(prepared.control().is_none());
    q.destroy_job("job");
}
