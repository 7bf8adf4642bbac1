//! Many jobs at once through real daemons in one process ([`super::harness`]): an array of
//! jobs from a sweep, run, summarized and cancelled; dependency chains that wait, run in order,
//! and cancel their dependents when a job they need fails; bounds and unknown jobs refused.

use std::time::{Duration, Instant};

use super::harness::{Lab, Setup, one, one_of, sleeping, until};
use crate::client::{Client, Prepared};
use crate::proto::{FailureKind, JobId, JobState, JobStatus};

/// Prints its parameter `n`.
const SAY_N: &str = r#"(module
  (import "mvm" "param" (func $param (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "n")
  (func (export "_start") (local $len i32)
    (local.set $len (call $param (i32.const 0) (i32.const 1) (i32.const 64) (i32.const 100)))
    (i32.store (i32.const 16) (i32.const 64))
    (i32.store (i32.const 20) (local.get $len))
    (drop (call $write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 32)))))"#;

/// A job `name` sweeping `n` over `values`.
fn sweep(name: &str, job: Prepared, values: &[&str]) -> Prepared {
    let mut job = job;
    job.submission.name = name.into();
    job.submission.sweep = vec![(
        "n".to_owned(),
        values.iter().map(|v| (*v).to_owned()).collect(),
    )];
    job
}

/// The statuses of array `id`'s jobs once every one has ended.
async fn array_ended(c: &Client, id: &JobId) -> Vec<JobStatus> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = c.status(Some(id)).await.expect("status");
        if !v.is_empty() && v.iter().all(|s| s.state.is_final()) {
            return v;
        }
        assert!(Instant::now() < deadline, "array {id} never ended: {v:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_runs_one_job_per_point_as_one_array() {
    let lab = Lab::start(1, &[4]).await;
    let c = lab.client().await;
    let values: Vec<String> = (1..=12).map(|i| i.to_string()).collect();
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    let s = c
        .submit(&sweep("say", one("say", SAY_N), &values))
        .await
        .expect("array");
    let waiting = s.waiting.clone().unwrap_or_default();
    assert!(waiting.contains("an array of 12 jobs"), "{s:?}");
    let jobs = array_ended(&c, &s.job).await;
    assert_eq!(jobs.len(), 12, "{jobs:?}");
    let mut said = Vec::new();
    for (i, j) in jobs.iter().enumerate() {
        assert_eq!(j.state, JobState::Done, "{j:?}");
        assert_eq!(j.array, Some((s.job.clone(), i as u32)), "{j:?}");
        assert!(
            j.job.as_str().starts_with(&format!("say.{i:02}-")),
            "{}",
            j.job
        );
        said.push(String::from_utf8_lossy(&j.outputs[0].1).into_owned());
    }
    assert_eq!(said, values, "each job saw its own point, in order");
    // The array's own status sums it up; its jobs are listed by `mvm status` too.
    let all = c.status(None).await.expect("status");
    assert_eq!(all.len(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_array_is_cancelled_whole_and_one_over_the_policy_s_bound_is_refused() {
    let policy = "allow(_u: User, _a: String, _r);\nmax_array(_u: User, 5);\n";
    let nodes = "allow(user: User, \"run\", node: Node) if user.domain = node.domain;\n";
    let files = [("default/rules.polar", policy), ("node.polar", nodes)];
    let lab = Setup::new(1, &[2]).policies(&files).start().await;
    let c = lab.client().await;
    let e = c
        .submit(&sweep(
            "big",
            sleeping("big", 0),
            &["1", "2", "3", "4", "5", "6"],
        ))
        .await
        .expect_err("over the bound");
    assert_eq!(e.kind, FailureKind::Refused, "{e}");
    assert!(
        e.message.contains("6 points") && e.message.contains("at most 5"),
        "{e}"
    );
    assert!(
        c.status(None).await.expect("status").is_empty(),
        "nothing recorded"
    );
    let mut long = sleeping("long", 60_000);
    long.submission.limits.wall_ms = Some(120_000);
    let s = c
        .submit(&sweep("long", long, &["1", "2", "3", "4"]))
        .await
        .expect("array");
    // Two run (two slots), two wait.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = c.status(Some(&s.job)).await.expect("status");
        let running = v.iter().filter(|j| j.state == JobState::Running).count();
        let pending = v.iter().filter(|j| j.state == JobState::Pending).count();
        if (running, pending) == (2, 2) {
            break;
        }
        assert!(Instant::now() < deadline, "{v:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.cancel(&s.job).await.expect("cancelled");
    let jobs = array_ended(&c, &s.job).await;
    assert!(
        jobs.iter().all(|j| j.state == JobState::Cancelled),
        "{jobs:?}"
    );
    let g = c.group().await.expect("group");
    assert!(
        g.nodes.iter().all(|n| n.vertices == 0),
        "slots free again: {g:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_waits_for_its_jobs_and_a_failed_one_cancels_its_dependents() {
    let lab = Lab::start(1, &[4]).await;
    let c = lab.client().await;
    // a runs 600 ms; b runs after a ended well; d after b ended, however.
    let a = c.submit(&sleeping("a", 600)).await.expect("a");
    let mut b = sleeping("b", 0);
    b.submission.after_ok = vec![a.job.clone()];
    let b = c.submit(&b).await.expect("b");
    let mut d = sleeping("d", 0);
    d.submission.after = vec![b.job.clone()];
    let d = c.submit(&d).await.expect("d");
    let now = c.status(Some(&b.job)).await.expect("status").remove(0);
    assert_eq!(now.state, JobState::Pending, "{now:?}");
    assert_eq!(now.after, std::slice::from_ref(&a.job));
    let waits = until(&c, &d.job, |_| true)
        .await
        .waiting
        .unwrap_or_default();
    assert!(waits.contains(b.job.as_str()), "{waits}");
    for j in [&a.job, &b.job, &d.job] {
        assert_eq!(
            until(&c, j, JobState::is_final).await.state,
            JobState::Done,
            "{j}"
        );
    }
    // A job that fails: its after_ok dependent is cancelled, naming it; one that runs after
    // that one whatever its end runs.
    let exit3 = one_of(
        "boom",
        "(module (import \"wasi_snapshot_preview1\" \"proc_exit\" (func $exit (param i32))) \
         (memory (export \"memory\") 1) (func (export \"_start\") (call $exit (i32.const 3))))"
            .as_bytes()
            .to_vec()
            .into(),
    );
    // It waits for a gate first, so that its dependents are recorded before it fails.
    let gate = c.submit(&sleeping("gate", 500)).await.expect("gate");
    let mut boom = exit3;
    boom.submission.after = vec![gate.job.clone()];
    let boom = c.submit(&boom).await.expect("boom");
    let mut next = sleeping("next", 0);
    next.submission.after_ok = vec![boom.job.clone()];
    let next = c.submit(&next).await.expect("next");
    let mut last = sleeping("last", 0);
    last.submission.after = vec![next.job.clone()];
    let last = c.submit(&last).await.expect("last");
    assert_eq!(
        until(&c, &boom.job, JobState::is_final).await.state,
        JobState::Failed
    );
    let n = until(&c, &next.job, JobState::is_final).await;
    assert_eq!(n.state, JobState::Cancelled, "{n:?}");
    let why = n.error.unwrap_or_default();
    assert!(
        why.contains(boom.job.as_str()) && why.contains("failed"),
        "{why}"
    );
    assert_eq!(
        until(&c, &last.job, JobState::is_final).await.state,
        JobState::Done
    );
    // Now that boom has failed, a job asking to run after it ended well is refused at once.
    let mut late = sleeping("late", 0);
    late.submission.after_ok = vec![boom.job.clone()];
    let e = c.submit(&late).await.expect_err("never satisfied");
    assert_eq!(e.kind, FailureKind::Input, "{e}");
    assert!(e.message.contains(boom.job.as_str()), "{e}");
    // And one naming a job the group does not know.
    let mut lost = sleeping("lost", 0);
    lost.submission.after = vec!["nosuch-1-ff".parse().expect("an id")];
    let e = c.submit(&lost).await.expect_err("unknown");
    assert_eq!(e.kind, FailureKind::Input, "{e}");
    assert!(e.message.contains("nosuch-1-ff"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_array_s_waiting_jobs_are_placed_by_a_new_leader() {
    let mut lab = Lab::start(3, &[1]).await;
    let c = lab.client().await;
    let mut nap = sleeping("nap", 200);
    nap.submission.limits.wall_ms = Some(60_000);
    // A job being prepared when its leader goes runs again (as the CLI's default does).
    nap.submission.retries = 2;
    let values: Vec<String> = (0..6).map(|i| i.to_string()).collect();
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    let arr = c.submit(&sweep("nap", nap, &values)).await.expect("array");
    // One slot: the first runs, the others wait; the leader goes.
    let old = lab.leader().await;
    lab.superpeers[old].stop().await;
    let rest: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let c = lab.client_among(&lab.user(), &rest).await;
    let jobs = array_ended(&c, &arr.job).await;
    assert_eq!(jobs.len(), 6);
    assert!(jobs.iter().all(|j| j.state == JobState::Done), "{jobs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_after_a_whole_array() {
    let lab = Lab::start(1, &[4]).await;
    let c = lab.client().await;
    let mut nap = sleeping("nap", 300);
    nap.submission.limits.wall_ms = Some(60_000);
    let arr = c
        .submit(&sweep("nap", nap, &["1", "2", "3"]))
        .await
        .expect("array");
    let mut after = one("after", SAY_N);
    after
        .submission
        .parameters
        .insert("n".into(), "done".into());
    after.submission.after_ok = vec![arr.job.clone()];
    let after = c.submit(&after).await.expect("after");
    let end = until(&c, &after.job, JobState::is_final).await;
    assert_eq!(end.state, JobState::Done, "{end:?}");
    let jobs = array_ended(&c, &arr.job).await;
    assert!(jobs.iter().all(|j| j.state == JobState::Done), "{jobs:?}");
}
