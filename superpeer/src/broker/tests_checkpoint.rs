//! Checkpoints through real daemons in one process ([`super::harness`]): a job restored from
//! its checkpoint after a node is lost, by the leader that took it or the next one, and a
//! vertex that cannot be paused.

use super::harness::{Lab, finished, items, one_of, pipeline, until};
use super::tests_faults::{lose_a_node, outputs};
use crate::proto::{JobState, JobStatus};

/// The pipeline of 400,000 items on 2 nodes, with one retry and a checkpoint every
/// `interval_ms`, running, and a checkpoint taken at once: the job, and its status.
async fn checkpointed(
    c: &crate::client::Client,
    name: &str,
    interval_ms: u64,
) -> (crate::client::Prepared, JobStatus) {
    let mut job = pipeline(name, 400_000, Some(2));
    job.submission.retries = 1;
    job.submission.checkpoint = Some(crate::proto::CheckpointPolicy {
        interval_ms,
        keep: 2,
    });
    let s = c.submit(&job).await.expect("submit");
    let s = until(c, &s.job, |st| st == JobState::Running).await;
    c.checkpoint(&s.job).await.expect("a checkpoint now");
    (job, s)
}

/// A job that asks for checkpoints, with a node stopped after one was taken: the job runs
/// again from that checkpoint on nodes still heard from, and ends with the output of an
/// undisturbed run. A checkpoint can also be asked for at once, and only of such a job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_after_a_checkpoint_has_its_job_restored_from_it_with_the_same_output() {
    let mut lab = Lab::start(1, &[8, 8, 8]).await;
    let c = lab.client().await;
    let (job, s) = checkpointed(&c, "saved", 300).await;
    let s = until(&c, &s.job, |_| true).await;
    assert_eq!(s.state, JobState::Running, "still running: {s:?}");
    let last = s.checkpoints.last().expect("the checkpoint is listed").cut;
    let (end, victim) = lose_a_node(&mut lab, &c, &s).await;
    let restart = &end.restarts[0];
    assert!(
        end.parts
            .iter()
            .all(|p| p.node.to_string() != lab.node_peer(victim)),
        "{end:?}"
    );
    assert!(
        restart.from_cut.is_some_and(|cut| cut >= last),
        "from the checkpoint: {restart:?}"
    );
    let quiet = finished(&c, &pipeline("saved", 400_000, Some(2))).await;
    assert_eq!(quiet.state, JobState::Done, "{quiet:?}");
    assert_eq!(outputs(&end), outputs(&quiet));
    // Its traffic by kind counts the run from the checkpoint, which moved only what was left;
    // edge by edge and port by port, each vertex counts its whole life, as undisturbed.
    assert!(items(&end) < items(&quiet), "{end:?}");
    assert!(
        !quiet.edges.is_empty() && quiet.edges.iter().all(|e| e.items > 0),
        "{quiet:?}"
    );
    assert_eq!((&end.edges, &end.received), (&quiet.edges, &quiet.received));
    // Only a job that asked for checkpoints gets one, and only a job whose modules can be
    // paused may ask: one that exports no memory is refused at submission.
    let e = c.checkpoint(&quiet.job).await.expect_err("refused");
    assert!(e.message.contains("did not ask"), "{e}");
    let mut bare = super::harness::one("bare", r#"(module (func (export "run")))"#);
    bare.submission.checkpoint = job.submission.checkpoint;
    let e = c.submit(&bare).await.expect_err("refused");
    assert!(
        e.message.contains("component 'c' cannot be checkpointed")
            && e.message.contains("no memory"),
        "{e}"
    );
}

/// The replicas keep a job's checkpoint blobs too: with the leader stopped after a checkpoint,
/// and then a node of the job, the new leader restores the job from that checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_restores_a_job_from_the_checkpoint_its_old_leader_took() {
    let mut lab = Lab::start(3, &[8, 8, 8]).await;
    let c = lab.client().await;
    let (_, s) = checkpointed(&c, "kept", 600_000).await;
    let old = lab.leader().await;
    lab.superpeers[old].stop().await;
    let rest: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let c = lab.client_among(&lab.user(), &rest).await;
    let s = until(&c, &s.job, |_| true).await;
    assert_eq!(s.state, JobState::Running, "{s:?}");
    let (end, _) = lose_a_node(&mut lab, &c, &s).await;
    assert!(
        end.restarts[0].from_cut.is_some(),
        "restored from the checkpoint: {end:?}"
    );
    let quiet = finished(&c, &pipeline("kept", 400_000, Some(2))).await;
    assert_eq!(outputs(&end), outputs(&quiet));
}

/// A vertex that spins for `secs` seconds without reaching a pause point: it reads the clock
/// (a WASI call, not a pause point) only every 2^20 rounds, then prints `spun` and ends.
fn spinning(secs: u64) -> crate::client::Prepared {
    let wat = format!(
        r#"(module
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "spun\n")
  (func $now (result i64) (drop (call $clock (i32.const 1) (i64.const 1) (i32.const 0))) (i64.load (i32.const 0)))
  (func (export "_start") (local $end i64) (local $i i32)
    (local.set $end (i64.add (call $now) (i64.const {ns})))
    (loop $spin
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $spin (i32.and (local.get $i) (i32.const 0xfffff)))
      (br_if $spin (i64.lt_u (call $now) (local.get $end))))
    (i32.store (i32.const 16) (i32.const 64))
    (i32.store (i32.const 20) (i32.const 5))
    (drop (call $write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))"#,
        ns = secs * 1_000_000_000
    );
    let mut job = one_of("spin", bytes::Bytes::from(wat));
    job.submission.retries = 1;
    job.submission.checkpoint = Some(crate::proto::CheckpointPolicy {
        interval_ms: 60_000,
        keep: 1,
    });
    job
}

/// A checkpoint of a vertex in a loop that reaches no pause point times out cleanly: the
/// client is told which vertex did not pause, the job runs on, and with its node then lost
/// (and no checkpoint to go on from) it runs again from its start and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vertex_that_never_pauses_gives_its_checkpoint_up_and_its_job_completes_by_a_restart() {
    let mut lab = Lab::start(1, &[8, 8]).await;
    let c = lab.client().await;
    let s = c.submit(&spinning(8)).await.expect("submit");
    let s = until(&c, &s.job, |st| st == JobState::Running).await;
    let e = c
        .checkpoint(&s.job)
        .await
        .expect_err("the vertex never pauses");
    assert!(
        e.message.contains("vertices v reached no pause point"),
        "{e}"
    );
    let s = until(&c, &s.job, |_| true).await;
    assert_eq!(s.state, JobState::Running, "the job goes on: {s:?}");
    assert!(s.checkpoints.is_empty(), "none stored: {s:?}");
    let (end, _) = lose_a_node(&mut lab, &c, &s).await;
    assert_eq!(end.restarts[0].from_cut, None, "from its start: {end:?}");
    assert_eq!(
        outputs(&end),
        vec![("v".into(), bytes::Bytes::from("spun\n"))]
    );
}

/// A vertex that writes `state.txt` ("saved") in its sandbox, yields (a pause point) for
/// `secs` seconds, then prints what `state.txt` holds.
fn keeper(secs: u64) -> crate::client::Prepared {
    let wat = format!(
        r#"(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "mvm" "yield" (func $yield))
  (memory (export "memory") 1)
  (data (i32.const 0) "state.txt")
  (data (i32.const 16) "saved\n")
  (func $now (result i64)
    (drop (call $clock (i32.const 1) (i64.const 1) (i32.const 32))) (i64.load (i32.const 32)))
  (func (export "_start") (local $end i64)
    (drop (call $open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 9) (i32.const 9)
      (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 0) (i32.const 100)))
    (i32.store (i32.const 108) (i32.const 16))
    (i32.store (i32.const 112) (i32.const 6))
    (drop (call $write (i32.load (i32.const 100)) (i32.const 108) (i32.const 1) (i32.const 104)))
    (drop (call $close (i32.load (i32.const 100))))
    (local.set $end (i64.add (call $now) (i64.const {ns})))
    (loop $wait (call $yield) (br_if $wait (i64.lt_u (call $now) (local.get $end))))
    (i32.store (i32.const 100) (i32.const -1))
    (i32.store (i32.const 104) (i32.const 0))
    (drop (call $open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 9) (i32.const 0)
      (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 0) (i32.const 100)))
    (i32.store (i32.const 108) (i32.const 300))
    (i32.store (i32.const 112) (i32.const 64))
    (drop (call $read (i32.load (i32.const 100)) (i32.const 108) (i32.const 1) (i32.const 104)))
    (i32.store (i32.const 112) (i32.load (i32.const 104)))
    (drop (call $write (i32.const 1) (i32.const 108) (i32.const 1) (i32.const 120)))))"#,
        ns = secs * 1_000_000_000
    );
    let mut job = one_of("keeper", bytes::Bytes::from(wat));
    job.submission.retries = 1;
    job.submission.checkpoint = Some(crate::proto::CheckpointPolicy {
        interval_ms: 60_000,
        keep: 1,
    });
    job.submission.files = Some(crate::proto::FileSpec {
        inputs: Vec::new(),
        outputs: vec!["*.txt".into()],
        output_bytes: 1 << 20,
    });
    job
}

/// A checkpoint keeps what the vertices' sandboxes hold: a job restored from one on another
/// node finds there the files its vertex wrote before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_restored_from_a_checkpoint_finds_the_files_its_vertex_wrote_before_it() {
    let mut lab = Lab::start(1, &[1, 1]).await;
    let c = lab.client().await;
    let s = c.submit(&keeper(4)).await.expect("submit");
    let s = until(&c, &s.job, |st| st == JobState::Running).await;
    c.checkpoint(&s.job).await.expect("a checkpoint now");
    let s = until(&c, &s.job, |_| true).await;
    let cut = s.checkpoints.last().expect("the checkpoint is listed");
    assert_eq!(cut.parts.len(), 1, "{cut:?}");
    let saved = cut.parts[0].files.as_deref().expect("its sandbox is saved");
    assert_eq!(
        saved.iter().map(|f| (&*f.path, f.size)).collect::<Vec<_>>(),
        [("state.txt", 6)],
        "{saved:?}"
    );
    let (end, _) = lose_a_node(&mut lab, &c, &s).await;
    assert!(end.restarts[0].from_cut.is_some(), "{end:?}");
    assert_eq!(
        outputs(&end),
        [("v".to_owned(), bytes::Bytes::from_static(b"saved\n"))]
    );
    // And it is taken back as an output, from the node it ended on.
    assert!(end.files.iter().any(|f| f.path == "state.txt"), "{end:?}");
}

/// A part moved to another node takes its sandboxes' files along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_moved_to_another_node_finds_there_the_files_its_vertex_wrote() {
    let lab = Lab::start(1, &[1, 1]).await;
    let c = lab.client().await;
    let s = c.submit(&keeper(4)).await.expect("submit");
    let s = until(&c, &s.job, |st| st == JobState::Running).await;
    let to = if s.parts[0].name == "n0" { "n1" } else { "n0" };
    let moved = c
        .migrate(&s.job, Some("v".into()), None, to)
        .await
        .expect("moved");
    assert_eq!(moved.len(), 1, "{moved:?}");
    let end = until(&c, &s.job, JobState::is_final).await;
    assert_eq!(end.state, JobState::Done, "{end:?}");
    assert_eq!(end.parts[0].name, to, "{end:?}");
    assert_eq!(
        outputs(&end),
        [("v".to_owned(), bytes::Bytes::from_static(b"saved\n"))]
    );
}

/// A checkpoint asked by a new leader (the one that placed the job is gone) sends the
/// sandboxes' files to it, and a run restored from it finds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_new_leader_a_checkpoint_s_files_go_to_it_and_a_restore_finds_them() {
    let mut lab = Lab::start(3, &[1, 1]).await;
    let c = lab.client().await;
    let s = c.submit(&keeper(8)).await.expect("submit");
    until(&c, &s.job, |st| st == JobState::Running).await;
    let old = lab.leader().await;
    lab.superpeers[old].stop().await;
    let rest: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let c = lab.client_among(&lab.user(), &rest).await;
    c.checkpoint(&s.job)
        .await
        .expect("a checkpoint by the new leader");
    let s = until(&c, &s.job, |_| true).await;
    let (end, _) = lose_a_node(&mut lab, &c, &s).await;
    assert!(end.restarts[0].from_cut.is_some(), "{end:?}");
    assert_eq!(
        outputs(&end),
        [("v".to_owned(), bytes::Bytes::from_static(b"saved\n"))]
    );
}
