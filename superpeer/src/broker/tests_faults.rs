//! Faults in a job's lifecycle: partitions of the leader and of nodes, nodes lost, restarted
//! or cut off from each other, and a cancel while the parts prepare, through real daemons in
//! one process ([`super::harness`]).

use super::harness::{
    Lab, Who, eventually, finished, group_until, items, ring, running, sleeping, until,
};
use crate::proto::{FailureKind, JobState, JobStatus};

/// The names of every job the group's leader knows, sorted.
async fn names(lab: &Lab) -> Vec<String> {
    let c = lab.client().await;
    let mut v: Vec<String> = c
        .status(None)
        .await
        .expect("status")
        .into_iter()
        .map(|j| j.name)
        .collect();
    v.sort();
    v
}

/// Waits until every running super-peer names the same leader, and exactly one says it is
/// that leader; gives its index.
async fn one_leader(lab: &Lab) -> usize {
    eventually("one leader, named by every replica", async || {
        let mut leaders = Vec::new();
        let mut brokers = 0;
        for (i, sp) in lab.superpeers.iter().enumerate() {
            if !sp.is_up() {
                continue;
            }
            let g = lab.client_of(i).await.group().await.ok()?;
            brokers += usize::from(g.is_broker);
            leaders.push(g.broker?);
        }
        leaders.dedup();
        let [leader] = &leaders[..] else { return None };
        let i = lab.superpeers.iter().position(|s| s.peer == *leader)?;
        (brokers == 1).then_some(i)
    })
    .await
}

/// Cuts super-peer `old` off from everyone, and waits until it no longer says it leads; a
/// client of it.
async fn cut_off_until_follower(lab: &mut Lab, old: usize) -> crate::client::Client {
    lab.partition(&[Who::Sp(old)]).await;
    let alone = lab.client_of(old).await;
    eventually("the cut-off replica no longer says it leads", async || {
        alone.group().await.ok().filter(|g| !g.is_broker)
    })
    .await;
    alone
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_other_replicas_takes_no_job_and_the_majority_elects_another() {
    let mut lab = Lab::start(3, &[8]).await;
    let c = lab.client().await;
    assert_eq!(
        finished(&c, &ring("before", 50, None, 0)).await.state,
        JobState::Done
    );
    let old = lab.leader().await;
    lab.partition(&[Who::Sp(old)]).await;
    // The two others elect one of themselves; the node follows it, and it places jobs.
    let rest: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let c = lab.client_among(&lab.user(), &rest).await;
    assert_ne!(lab.superpeer_of(&c), old);
    group_until(&c, "the node registered with the new leader", |g| {
        g.nodes.iter().any(|n| n.name == "n0" && !n.lost)
    })
    .await;
    let s = finished(&c, &ring("majority", 50, None, 0)).await;
    assert_eq!((s.state, items(&s)), (JobState::Done, 50), "{s:?}");
    // The cut-off replica commits nothing: a job sent to it is never accepted.
    let alone = lab.client_of(old).await;
    let lonely = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        alone.submit(&ring("lonely", 50, None, 0)),
    )
    .await;
    assert!(
        !matches!(lonely, Ok(Ok(_))),
        "a replica cut off alone took a job: {lonely:?}"
    );
    // Healed: one leader, which is not the old one, and each job once.
    lab.heal().await;
    assert_ne!(one_leader(&lab).await, old);
    assert_eq!(names(&lab).await, ["before", "majority"]);
}

/// A leader that no longer reaches a majority cannot commit: it should say so, so that clients
/// and nodes look for the leader elsewhere, and refuse jobs instead of holding them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_majority_stops_saying_it_leads_and_refuses_jobs_at_once() {
    let mut lab = Lab::start(3, &[8]).await;
    let old = lab.leader().await;
    let alone = cut_off_until_follower(&mut lab, old).await;
    let e = alone
        .submit(&ring("lonely", 50, None, 0))
        .await
        .expect_err("refused");
    assert_eq!(e.kind, FailureKind::Unavailable, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_s_report_reaches_the_leader_elected_while_its_leader_was_cut_off() {
    let mut lab = Lab::start(3, &[4]).await;
    let c = lab.client().await;
    let s = c.submit(&sleeping("nap", 1500)).await.expect("submit");
    assert_eq!(s.state, JobState::Running, "{s:?}");
    let old = lab.leader().await;
    lab.partition(&[Who::Sp(old)]).await;
    // The part ends after the cut: its report can only be taken by the majority's leader
    // (the node finds it when its own super-peer refuses it), with the part's output.
    let rest: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let c = lab.client_among(&lab.user(), &rest).await;
    let end = until(&c, &s.job, JobState::is_final).await;
    assert_eq!(end.state, JobState::Done, "{end:?}");
    assert_eq!(end.outputs, [("v".to_owned(), b"slept\n"[..].into())]);
    // Healed: the old leader follows the new one, which still has the job's end.
    lab.heal().await;
    let l = one_leader(&lab).await;
    assert_ne!(l, old);
    let c = lab.client().await;
    assert_eq!(
        until(&c, &s.job, JobState::is_final).await.state,
        JobState::Done
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_mid_job_fails_the_job_naming_it_and_registers_again_after_the_heal() {
    let mut lab = Lab::start(1, &[8, 8]).await;
    let c = lab.client().await;
    let s = running(&c, Some(2)).await;
    assert_eq!(s.parts.len(), 2, "{s:?}");
    lab.partition(&[Who::Node(1)]).await;
    let end = until(&c, &s.job, JobState::is_final).await;
    assert_eq!(end.state, JobState::Failed, "{end:?}");
    let e = end.error.as_deref().unwrap_or_default();
    assert!(e.contains(&lab.node_peer(1)), "names the node cut off: {e}");
    group_until(&c, "n1 lost", |g| {
        g.nodes.iter().any(|n| n.name == "n1" && n.lost)
    })
    .await;
    // Healed: it registers again, stops the part it held, and takes jobs.
    lab.heal().await;
    lab.registered(2).await;
    group_until(&c, "n1 runs nothing", |g| {
        g.nodes.iter().any(|n| n.name == "n1" && n.running == 0)
    })
    .await;
    let s = finished(&c, &ring("after", 400, Some(2), 0)).await;
    assert_eq!(
        (s.state, items(&s), s.parts.len()),
        (JobState::Done, 400, 2),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_whose_nodes_cannot_reach_each_other_fails_naming_the_other_node() {
    let mut lab = Lab::start(1, &[8, 8]).await;
    // Both nodes reach the super-peer, not each other: the remote channels cannot open.
    lab.cut(Who::Node(0), Who::Node(1)).await;
    let c = lab.client().await;
    let s = finished(&c, &ring("split", 400, Some(2), 0)).await;
    assert_eq!(s.state, JobState::Failed, "{s:?}");
    let e = s.error.as_deref().unwrap_or_default();
    assert!(
        e.contains(&lab.node_peer(0)) && e.contains(&lab.node_peer(1)),
        "names the node that failed and the one it could not reach: {e}"
    );
    let g = c.group().await.expect("group");
    assert!(g.nodes.iter().all(|n| !n.lost && n.vertices == 0), "{g:?}");
    lab.heal().await;
    let s = finished(&c, &ring("joined", 400, Some(2), 0)).await;
    assert_eq!((s.state, items(&s)), (JobState::Done, 400), "{s:?}");
}

/// A node that restarts (its process, with its identity) loses the parts it ran; back before
/// it counts as lost, it registers again and says it runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_mid_job_fails_its_job_and_takes_the_next_one() {
    let mut lab = Lab::start(1, &[4]).await;
    let c = lab.client().await;
    let s = c.submit(&sleeping("nap", 60_000)).await.expect("submit");
    assert_eq!(s.state, JobState::Running, "{s:?}");
    lab.nodes[0].restart().await;
    let end = eventually("the job ends", async || {
        let v = c.status(Some(&s.job)).await.ok()?;
        v.into_iter().find(|j| j.state.is_final())
    })
    .await;
    assert_eq!(end.state, JobState::Failed, "{end:?}");
    let e = end.error.as_deref().unwrap_or_default();
    assert!(e.contains(&lab.node_peer(0)), "names the node: {e}");
    assert!(e.contains("no longer runs its part"), "{e}");
    assert_eq!(
        end.error_kind,
        Some(crate::proto::ErrorKind::Lost),
        "{end:?}"
    );
    let next = finished(&c, &sleeping("next", 0)).await;
    assert_eq!(next.state, JobState::Done, "{next:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_is_shown_lost_jobs_go_to_the_others_and_it_is_placed_on_once_back() {
    let mut lab = Lab::start(1, &[8, 8]).await;
    let c = lab.client().await;
    lab.nodes[1].stop().await;
    group_until(&c, "n1 lost", |g| {
        g.nodes.iter().any(|n| n.name == "n1" && n.lost)
    })
    .await;
    let s = finished(&c, &ring("without", 100, None, 0)).await;
    assert_eq!(s.state, JobState::Done, "{s:?}");
    assert!(s.parts.iter().all(|p| p.name == "n0"), "{s:?}");
    lab.nodes[1].restart().await;
    lab.registered(2).await;
    let s = finished(&c, &ring("with", 100, Some(2), 0)).await;
    let mut on: Vec<&str> = s.parts.iter().map(|p| p.name.as_str()).collect();
    on.sort_unstable();
    assert_eq!((s.state, on), (JobState::Done, vec!["n0", "n1"]), "{s:?}");
}

/// A ring whose module takes its nodes a while to compile (about a second here, debug build):
/// the token ring's, with many functions nobody calls.
fn heavy_ring(name: &str) -> crate::client::Prepared {
    let mut wat = String::from(include_str!("../../../jobs/wat/token.wat"));
    // Before the module's last parenthesis: functions nobody calls, compiled all the same.
    wat.truncate(wat.trim_end().len() - 1);
    for i in 0..1500 {
        wat.push_str(&format!(
            "\n  (func $pad{i} (param i64) (result i64) (local $x i64) \
             (local.set $x (local.get 0)) \
             (loop $l (local.set $x (i64.add (i64.mul (local.get $x) (i64.const {i})) \
             (i64.const 7))) (br_if $l (i64.lt_u (local.get $x) (i64.const 1000)))) \
             (local.get $x))"
        ));
    }
    wat.push_str(")\n");
    let mut job = ring(name, 100, Some(2), 0);
    let module = bytes::Bytes::from(wat.into_bytes());
    let hash = crate::proto::Hash::of(&module);
    job.submission.components.insert("token".into(), hash);
    job.modules = std::collections::BTreeMap::from([(hash, module)]);
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_while_its_parts_prepare_never_starts_and_frees_its_nodes() {
    let lab = Lab::start(1, &[8, 8]).await;
    let c = lab.client().await;
    // A job of two parts is recorded before its nodes prepare: it answers as preparing.
    let s: JobStatus = c.submit(&heavy_ring("heavy")).await.expect("submit");
    assert_eq!(s.state, JobState::Preparing, "{s:?}");
    c.cancel(&s.job).await.expect("cancel");
    let end = until(&c, &s.job, JobState::is_final).await;
    assert_eq!(end.state, JobState::Cancelled, "{end:?}");
    assert_eq!(
        (end.vertices_done, items(&end)),
        (0, 0),
        "never ran: {end:?}"
    );
    // Its slots are free at once, and the next job runs.
    let g = c.group().await.expect("group");
    assert!(g.nodes.iter().all(|n| n.vertices == 0), "{g:?}");
    let next = finished(&c, &ring("next", 100, Some(2), 0)).await;
    assert_eq!(next.state, JobState::Done, "{next:?}");
    // A part whose prepare ended after the cancel's terminate is stopped at its node's next
    // heartbeat: the nodes end up running nothing, and the job stays cancelled.
    group_until(&c, "the nodes run nothing", |g| {
        g.nodes.iter().all(|n| n.running == 0)
    })
    .await;
    let s = until(&c, &s.job, JobState::is_final).await;
    assert_eq!(s.state, JobState::Cancelled, "{s:?}");
}

/// A lab node that runs a part of `s`, other than those of `but`.
pub(super) fn node_of(lab: &Lab, s: &JobStatus, but: &[usize]) -> usize {
    (0..lab.nodes.len())
        .filter(|i| !but.contains(i))
        .find(|&i| {
            s.parts
                .iter()
                .any(|p| p.node.to_string() == lab.node_peer(i))
        })
        .unwrap_or_else(|| panic!("no node of the job: {s:?}"))
}

/// Three nodes, and a ring of `hops` on two of them with one retry, running.
async fn retried(name: &str, hops: u64) -> (Lab, crate::client::Client, JobStatus) {
    let lab = Lab::start(1, &[8, 8, 8]).await;
    let c = lab.client().await;
    let mut job = ring(name, hops, Some(2), 0);
    job.submission.retries = 1;
    let s = c.submit(&job).await.expect("submit");
    let s = until(&c, &s.job, |st| st == JobState::Running).await;
    (lab, c, s)
}

/// Stops a node of running job `s` and waits for the job's end: done in its second run,
/// after one restart. The job's end, and the node stopped.
pub(super) async fn lose_a_node(
    lab: &mut Lab,
    c: &crate::client::Client,
    s: &JobStatus,
) -> (JobStatus, usize) {
    let victim = node_of(lab, s, &[]);
    lab.nodes[victim].stop().await;
    let end = until(c, &s.job, JobState::is_final).await;
    assert_eq!((end.state, end.attempt), (JobState::Done, 1), "{end:?}");
    assert_eq!(end.restarts.len(), 1, "one restart: {end:?}");
    (end, victim)
}

/// Sorted vertex outputs, for comparing runs.
pub(super) fn outputs(s: &JobStatus) -> Vec<(String, bytes::Bytes)> {
    let mut v = s.outputs.clone();
    v.sort();
    v
}

/// A node stopped mid-job (its connections close at once): the job runs again from its start
/// on nodes that are still heard from, ends as an undisturbed run does, and says what was
/// restarted and how long that took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_mid_job_has_its_job_run_again_on_the_others_with_the_same_output() {
    let (mut lab, c, s) = retried("again", 200_000).await;
    let (end, victim) = lose_a_node(&mut lab, &c, &s).await;
    let restart = &end.restarts[0];
    assert_eq!(restart.attempt, 1);
    assert!(restart.recovery_ms().is_some(), "{restart:?}");
    assert!(
        end.parts
            .iter()
            .all(|p| p.node.to_string() != lab.node_peer(victim)),
        "the second run avoids the stopped node: {end:?}"
    );
    // The same job undisturbed: the same outputs, as many items moved.
    let quiet = finished(&c, &ring("again", 200_000, Some(2), 0)).await;
    assert_eq!(quiet.state, JobState::Done, "{quiet:?}");
    assert_eq!(outputs(&end), outputs(&quiet));
    assert_eq!(items(&end), items(&quiet));
}

/// Without retries (`retries = 0`), or once they are used up, a lost node fails the job,
/// naming the node; never silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_retries_are_used_up_fails_when_a_node_is_lost_again() {
    let (mut lab, c, s) = retried("twice", 2_000_000_000).await;
    let mut stopped = Vec::new();
    for attempt in 0..2 {
        let s = until(&c, &s.job, |st| st == JobState::Running).await;
        assert_eq!(s.attempt, attempt, "{s:?}");
        let victim = node_of(&lab, &s, &stopped);
        lab.nodes[victim].stop().await;
        stopped.push(victim);
        if attempt == 0 {
            eventually("the job runs again", async || {
                let v = c.status(Some(&s.job)).await.ok()?;
                v.into_iter().find(|j| j.attempt == 1)
            })
            .await;
        }
    }
    let end = until(&c, &s.job, JobState::is_final).await;
    assert_eq!((end.state, end.attempt), (JobState::Failed, 1), "{end:?}");
    assert_eq!(
        end.error_kind,
        Some(crate::proto::ErrorKind::Lost),
        "{end:?}"
    );
    assert_eq!(end.restarts.len(), 1, "{end:?}");
}

/// A node stopped just before a job is placed on it (its loss not yet noticed): the prepare
/// cannot reach it, and the job, which may run again, runs on a node heard from since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_placed_on_a_node_lost_but_not_yet_noticed_runs_on_another() {
    // The roomier node ranks first.
    let mut lab = Lab::start(1, &[16, 4]).await;
    let c = lab.client().await;
    lab.nodes[0].stop().await;
    let mut job = sleeping("after", 0);
    job.submission.retries = 1;
    let s = finished(&c, &job).await;
    assert_eq!((s.state, s.attempt), (JobState::Done, 1), "{s:?}");
    assert!(
        s.restarts[0].why.contains(&lab.node_peer(0)),
        "names the node it could not reach: {s:?}"
    );
    assert!(
        s.parts
            .iter()
            .all(|p| p.node.to_string() == lab.node_peer(1)),
        "{s:?}"
    );
}

/// A client made as the CLI makes one, through every super-peer's address; the index of the
/// super-peer it found leading.
async fn found(lab: &Lab) -> (crate::client::Client, usize) {
    let addrs: Vec<String> = lab.superpeers.iter().map(|s| s.addr.clone()).collect();
    let c = crate::client::Client::find(&lab.user(), &addrs)
        .await
        .expect("a leader found");
    let old = lab.superpeer_of(&c);
    (c, old)
}

/// A client found through every super-peer follows the group's lead: its super-peer stopped,
/// the same client reads the job it waits on from the one elected after, and sees it end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_follows_the_lead_to_the_super_peer_elected_after_its_own_stopped() {
    let mut lab = Lab::start(3, &[2]).await;
    let (c, old) = found(&lab).await;
    let s = c.submit(&sleeping("nap", 3_000)).await.expect("submit");
    until(&c, &s.job, |st| st == JobState::Running).await;
    lab.superpeers[old].stop().await;
    let end = c
        .wait(&s.job, 0, true)
        .await
        .expect("a wait through the new leader");
    let end = if end.state.is_final() {
        end
    } else {
        until(&c, &s.job, JobState::is_final).await
    };
    assert_eq!(end.state, JobState::Done, "{end:?}");
    assert_ne!(lab.superpeer_of(&c), old, "still the stopped super-peer");
    assert_eq!(lab.superpeer_of(&c), one_leader(&lab).await);
    // Later requests, writes too, go to the new leader.
    let next = c
        .submit_and_wait(&sleeping("next", 10))
        .await
        .expect("a submission to the new leader");
    let next = until(&c, &next.job, JobState::is_final).await;
    assert_eq!(next.state, JobState::Done, "{next:?}");
}

/// A submission a former leader refuses (it lost the lead in a partition, and says so) goes
/// again to the leader the client finds, and runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_refused_by_a_former_leader_goes_to_the_new_one_and_runs_once() {
    let mut lab = Lab::start(3, &[8]).await;
    let (c, old) = found(&lab).await;
    cut_off_until_follower(&mut lab, old).await;
    let rest: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let leader = lab.client_among(&lab.user(), &rest).await;
    group_until(&leader, "the node registered with the new leader", |g| {
        g.nodes.iter().any(|n| n.name == "n0" && !n.lost)
    })
    .await;
    let s = c
        .submit(&ring("moved", 50, None, 0))
        .await
        .expect("sent again to the new leader");
    assert_ne!(lab.superpeer_of(&c), old);
    let s = until(&c, &s.job, JobState::is_final).await;
    assert_eq!((s.state, items(&s)), (JobState::Done, 50), "{s:?}");
    lab.heal().await;
    assert_eq!(names(&lab).await, ["moved"]);
}
