//! The queue and placement: pending jobs and why they wait, hold and release, the job list and
//! waits, where the vertices go and what moves between nodes, through real daemons in one
//! process ([`super::harness`]).

use std::collections::BTreeMap;

use super::harness::{Lab, finished, items, one, ring, running, sleeping, until};
use crate::proto::{FailureKind, JobId, JobState, JobStatus};

/// Items that crossed between nodes, and items that did not.
fn remote_and_local(s: &JobStatus) -> (u64, u64) {
    let sum = |remote: bool| {
        s.traffic
            .iter()
            .filter(|t| t.remote == remote)
            .map(|t| t.items)
            .sum()
    };
    (sum(true), sum(false))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_job_lets_the_next_pending_job_go_first_and_is_placed_once_released() {
    let lab = Lab::start(1, &[8]).await;
    let c = lab.client().await;
    let long = running(&c, None).await;
    // The first would go first (higher priority), but it is held.
    let first = c
        .submit(&ring("first", 100, None, 5))
        .await
        .expect("submit");
    let second = c
        .submit(&ring("second", 100, None, 0))
        .await
        .expect("submit");
    assert_eq!(
        (first.state, second.state),
        (JobState::Pending, JobState::Pending)
    );
    c.hold(&first.job, true).await.expect("hold");
    let held = &c.status(Some(&first.job)).await.expect("status")[0];
    assert!(
        held.waiting.as_deref().is_some_and(|w| w.contains("held")),
        "{held:?}"
    );
    c.cancel(&long.job).await.expect("cancel");
    let s = until(&c, &second.job, JobState::is_final).await;
    assert_eq!((s.state, items(&s)), (JobState::Done, 100), "{s:?}");
    let held = &c.status(Some(&first.job)).await.expect("status")[0];
    assert_eq!(
        held.state,
        JobState::Pending,
        "passed over while held: {held:?}"
    );
    c.hold(&first.job, false).await.expect("release");
    let s = until(&c, &first.job, JobState::is_final).await;
    assert_eq!((s.state, items(&s)), (JobState::Done, 100), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_release_cancel_and_status_say_why_for_a_job_not_there_not_held_or_ended() {
    let lab = Lab::start(1, &[8]).await;
    let c = lab.client().await;
    let long = running(&c, None).await;
    let next = c.submit(&ring("next", 100, None, 0)).await.expect("submit");
    let e = c.hold(&next.job, false).await.expect_err("not held");
    assert_eq!(e.kind, FailureKind::Input, "{e:?}");
    assert!(e.message.contains("already not held"), "{e:?}");
    let nowhere = &JobId::new("nowhere", 1, 0);
    for e in [
        c.hold(nowhere, true).await.expect_err("no such job"),
        c.cancel(nowhere).await.expect_err("no such job"),
        c.status(Some(nowhere)).await.expect_err("no such job"),
        c.wait(nowhere, 0, true).await.expect_err("no such job"),
    ] {
        assert_eq!(e.kind, FailureKind::NotFound, "{e:?}");
        assert!(e.message.contains(nowhere.as_str()), "{e:?}");
    }
    c.cancel(&long.job).await.expect("cancel");
    let done = until(&c, &next.job, JobState::is_final).await;
    let e = c.hold(&done.job, true).await.expect_err("ended");
    assert_eq!(e.kind, FailureKind::Input, "{e:?}");
    assert!(e.message.contains("has ended (Done)"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_job_says_what_each_node_lacks() {
    let lab = Lab::start(1, &[8, 8]).await;
    let c = lab.client().await;
    // One ring on each node fills both.
    let a = running(&c, Some(1)).await;
    let b = running(&c, Some(1)).await;
    assert_ne!(a.parts[0].name, b.parts[0].name, "{a:?} {b:?}");
    let next = c.submit(&ring("next", 100, None, 0)).await.expect("submit");
    assert_eq!(next.state, JobState::Pending, "{next:?}");
    let why = next.waiting.as_deref().unwrap_or_default();
    for n in ["n0", "n1"] {
        assert!(
            why.contains(&format!("node {n}: has no free vertex slot")),
            "{why}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_list_gives_every_job_with_its_state_and_owner() {
    let lab = Lab::start(1, &[8]).await;
    let c = lab.client().await;
    let bob = lab.client_as(&lab.user_as("bob", &["researcher"])).await;
    assert_eq!(
        finished(&bob, &sleeping("done", 0)).await.state,
        JobState::Done
    );
    let trap = one("failed", "(module (func (export \"run\") unreachable))");
    assert_eq!(finished(&c, &trap).await.state, JobState::Failed);
    let cancelled = running(&c, None).await;
    c.cancel(&cancelled.job).await.expect("cancel");
    until(&c, &cancelled.job, JobState::is_final).await;
    let long = running(&c, None).await;
    let pending = c
        .submit(&ring("pending", 10, None, 0))
        .await
        .expect("submit");
    assert_eq!(pending.state, JobState::Pending);
    let all: BTreeMap<JobId, (JobState, String)> = c
        .status(None)
        .await
        .expect("status")
        .into_iter()
        .map(|j| (j.job, (j.state, j.owner)))
        .collect();
    assert_eq!(all.len(), 5, "{all:?}");
    let alice = "alice@default".to_owned();
    assert_eq!(all[&cancelled.job], (JobState::Cancelled, alice.clone()));
    assert_eq!(all[&long.job], (JobState::Running, alice.clone()));
    assert_eq!(all[&pending.job], (JobState::Pending, alice.clone()));
    let by = |state| all.values().filter(|(s, _)| *s == state).count();
    assert_eq!(
        (by(JobState::Done), by(JobState::Failed)),
        (1, 1),
        "{all:?}"
    );
    let of_bob: Vec<_> = all.values().filter(|(_, o)| o == "bob@default").collect();
    assert_eq!(of_bob, [&(JobState::Done, "bob@default".to_owned())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_answers_at_the_job_s_next_change_or_at_its_end() {
    let lab = Lab::start(1, &[8]).await;
    let c = lab.client().await;
    let long = running(&c, None).await;
    let next = c.submit(&sleeping("next", 200)).await.expect("submit");
    assert_eq!(next.state, JobState::Pending);
    // Waiting on the pending job, while the room it waits for is freed.
    let (changed, cancelled) =
        tokio::join!(c.wait(&next.job, next.version, false), c.cancel(&long.job));
    cancelled.expect("cancel");
    let changed = changed.expect("wait");
    assert!(changed.version > next.version, "{changed:?}");
    assert_ne!(changed.state, JobState::Pending, "{changed:?}");
    let end = c
        .wait(&next.job, changed.version, true)
        .await
        .expect("wait");
    assert_eq!(end.state, JobState::Done, "{end:?}");
    assert_eq!(end.outputs.len(), 1, "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_vertex_job_goes_to_the_freest_node_unless_its_rank_says_otherwise() {
    let lab = Lab::start(1, &[4, 16]).await;
    let c = lab.client().await;
    let s = finished(&c, &sleeping("roomy", 0)).await;
    assert_eq!(
        (s.state, s.parts[0].name.as_str()),
        (JobState::Done, "n1"),
        "{s:?}"
    );
    let mut job = sleeping("ranked", 0);
    job.submission.requirements.rank = Some("-free_slots".into());
    let s = finished(&c, &job).await;
    assert_eq!(
        (s.state, s.parts[0].name.as_str()),
        (JobState::Done, "n0"),
        "{s:?}"
    );
    // A rank that does not parse is bad input, refused at once.
    job.submission.requirements.rank = Some("free_slots +".into());
    let e = c.submit(&job).await.expect_err("bad rank");
    assert_eq!(e.kind, FailureKind::Input, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_kept_to_one_node_runs_in_one_part_and_moves_nothing_between_nodes() {
    let lab = Lab::start(1, &[8, 8]).await;
    let c = lab.client().await;
    let s = finished(&c, &ring("one", 400, Some(1), 0)).await;
    assert_eq!(s.state, JobState::Done, "{s:?}");
    assert_eq!(s.parts.len(), 1, "{s:?}");
    assert_eq!(s.parts[0].vertices.len(), 8, "{s:?}");
    assert_eq!(remote_and_local(&s), (0, 400), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_traffic_of_a_ring_over_two_nodes_counts_the_items_crossing_between_them() {
    let lab = Lab::start(1, &[8, 8]).await;
    let c = lab.client().await;
    let hops = 800;
    let s = finished(&c, &ring("two", hops, Some(2), 0)).await;
    assert_eq!((s.state, s.parts.len()), (JobState::Done, 2), "{s:?}");
    // Item k goes from v(k mod 8) to v(k+1 mod 8): each of the 8 edges carries 100.
    let part = |v: usize| {
        let name = format!("v{v}");
        s.parts.iter().position(|p| p.vertices.contains(&name))
    };
    let crossing = (0..8).filter(|&v| part(v) != part((v + 1) % 8)).count() as u64;
    assert!(
        crossing >= 2,
        "a ring over two nodes crosses at least twice: {s:?}"
    );
    let remote = crossing * hops / 8;
    assert_eq!(remote_and_local(&s), (remote, hops - remote), "{s:?}");
    assert!(
        s.traffic.iter().all(|t| !t.direct),
        "no direct links: {s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_no_one_node_can_hold_is_refused_when_kept_to_one_and_spread_otherwise() {
    let lab = Lab::start(1, &[4, 4]).await;
    let c = lab.client().await;
    let e = c
        .submit(&ring("one", 100, Some(1), 0))
        .await
        .expect_err("refused");
    assert_eq!(e.kind, FailureKind::Unavailable, "{e:?}");
    assert!(
        e.message
            .contains("8 vertices do not fit in the 4 free slots"),
        "{e:?}"
    );
    assert!(c.status(None).await.expect("status").is_empty());
    let s = finished(&c, &ring("spread", 100, None, 0)).await;
    assert_eq!((s.state, s.parts.len()), (JobState::Done, 2), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_profile_submitted_twice_runs_twice_as_two_jobs() {
    let lab = Lab::start(1, &[8]).await;
    let c = lab.client().await;
    let job = ring("twice", 100, None, 0);
    let (a, b) = tokio::join!(finished(&c, &job), finished(&c, &job));
    assert_ne!(a.job, b.job);
    for s in [&a, &b] {
        assert_eq!((s.state, items(s)), (JobState::Done, 100), "{s:?}");
    }
    assert_eq!(c.status(None).await.expect("status").len(), 2);
}
