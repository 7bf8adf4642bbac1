//! A job's lifecycle through real daemons in one process ([`super::harness`]).

use super::harness::{Lab, finished, items, one, ring, running, until};
use crate::proto::{FailureKind, JobState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_over_two_nodes_is_placed_run_and_kept_in_the_history() {
    let lab = Lab::start(1, &[16, 16]).await;
    let c = lab.client().await;
    let s = finished(&c, &ring("r", 500, Some(2), 0)).await;
    assert_eq!(s.state, JobState::Done, "{s:?}");
    assert_eq!(s.parts.len(), 2, "spread over both nodes: {s:?}");
    assert_eq!(items(&s), 500, "every hop one item: {s:?}");
    assert_eq!(s.owner, "alice@default");
    let all = c.status(None).await.expect("status");
    assert!(all.iter().any(|j| j.job == s.job));
    // Its slots are free again.
    let g = c.group().await.expect("group");
    assert!(g.nodes.iter().all(|n| n.vertices == 0), "{g:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_job_ends_and_frees_its_slots_and_cannot_be_cancelled_twice() {
    let lab = Lab::start(1, &[16]).await;
    let c = lab.client().await;
    let s = running(&c, None).await;
    assert_eq!(c.group().await.expect("group").nodes[0].vertices, 8);
    c.cancel(&s.job).await.expect("cancel");
    let s = until(&c, &s.job, JobState::is_final).await;
    assert_eq!(s.state, JobState::Cancelled);
    assert_eq!(c.group().await.expect("group").nodes[0].vertices, 0);
    let e = c.cancel(&s.job).await.expect_err("twice");
    assert_eq!(e.kind, FailureKind::Input, "{e:?}");
    assert!(e.message.contains("already ended"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waits_for_room_and_is_placed_when_it_frees() {
    let lab = Lab::start(1, &[8]).await;
    let c = lab.client().await;
    let long = running(&c, None).await;
    let next = c.submit(&ring("next", 300, None, 0)).await.expect("submit");
    assert_eq!(next.state, JobState::Pending, "{next:?}");
    assert!(
        next.waiting
            .as_deref()
            .is_some_and(|w| w.contains("n0") && w.contains("no free vertex slot")),
        "{next:?}"
    );
    // Held, it is not placed; it cannot be held twice.
    c.hold(&next.job, true).await.expect("hold");
    let e = c.hold(&next.job, true).await.expect_err("twice");
    assert!(e.message.contains("already held"), "{e:?}");
    c.cancel(&long.job).await.expect("cancel");
    until(&c, &long.job, JobState::is_final).await;
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(
        c.status(Some(&next.job)).await.expect("status")[0].state,
        JobState::Pending
    );
    c.hold(&next.job, false).await.expect("release");
    let s = until(&c, &next.job, JobState::is_final).await;
    assert_eq!((s.state, items(&s)), (JobState::Done, 300), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_lost_mid_job_fails_the_job_with_its_name() {
    let mut lab = Lab::start(1, &[8, 8]).await;
    let c = lab.client().await;
    let s = running(&c, Some(2)).await;
    lab.nodes[1].stop().await;
    let s = until(&c, &s.job, JobState::is_final).await;
    assert_eq!(s.state, JobState::Failed, "{s:?}");
    assert_eq!(s.error_kind, Some(crate::proto::ErrorKind::Lost), "{s:?}");
    assert!(
        s.error.as_deref().is_some_and(|e| e.contains("node")),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_mid_job_is_replaced_and_the_job_completes_with_the_history() {
    let mut lab = Lab::start(3, &[8, 8]).await;
    let c = lab.client().await;
    let first = finished(&c, &ring("first", 100, None, 0)).await;
    assert_eq!(first.state, JobState::Done, "{first:?}");
    let hops = 300_000;
    let s = c
        .submit(&ring("long", hops, Some(2), 0))
        .await
        .expect("submit");
    until(&c, &s.job, |st| st == JobState::Running).await;
    let l = lab.leader().await;
    lab.superpeers[l].stop().await;
    let c = lab.client().await;
    assert_ne!(lab.leader().await, l);
    let end = until(&c, &s.job, JobState::is_final).await;
    assert_eq!((end.state, items(&end)), (JobState::Done, hops), "{end:?}");
    let all = c.status(None).await.expect("status");
    assert!(all.iter().any(|j| j.job == first.job), "the history stays");
    assert_eq!(
        finished(&c, &ring("after", 100, None, 0)).await.state,
        JobState::Done
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_takes_no_job_and_names_the_leader() {
    let lab = Lab::start(3, &[8]).await;
    let l = lab.leader().await;
    let f = (l + 1) % 3;
    let leader = lab.superpeers[l].peer;
    let fc = crate::client::Client::new(&lab.user(), &lab.superpeers[f].addr)
        .await
        .expect("client");
    // A follower knows the leader from its first heartbeat.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fc.group().await.expect("group").broker != Some(leader) {
        assert!(
            std::time::Instant::now() < deadline,
            "the follower never heard the leader"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let e = fc
        .submit(&ring("x", 10, None, 0))
        .await
        .expect_err("a follower takes no job");
    assert_eq!(e.kind, FailureKind::Unavailable, "{e:?}");
    assert!(e.message.contains(&leader.to_string()), "{e:?}");
    let g = fc.group().await.expect("group");
    assert!(!g.is_broker && g.broker == Some(leader), "{g:?}");
    // Nothing was recorded: the leader knows no job.
    assert!(
        lab.client()
            .await
            .status(None)
            .await
            .expect("status")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_super_peers_all_restart_keeps_its_history_and_takes_jobs() {
    let mut lab = Lab::start(3, &[8]).await;
    let c = lab.client().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let end = finished(&c, &ring(&format!("j{i}"), 50, None, 0)).await;
        assert_eq!(end.state, JobState::Done, "{end:?}");
        ids.push(end.job);
    }
    for sp in &mut lab.superpeers {
        sp.stop().await;
    }
    let user = lab.user();
    let addrs: Vec<String> = lab.superpeers.iter().map(|s| s.addr.clone()).collect();
    assert!(
        crate::client::Client::find(&user, &addrs).await.is_err(),
        "every super-peer is down"
    );
    for sp in &mut lab.superpeers {
        sp.restart().await;
    }
    lab.registered(1).await;
    let c = lab.client().await;
    let all = c.status(None).await.expect("status");
    for id in &ids {
        let j = all.iter().find(|j| j.job == *id).expect("kept");
        assert_eq!(j.state, JobState::Done, "{j:?}");
    }
    let s = finished(&c, &ring("after", 50, None, 0)).await;
    assert_eq!(s.state, JobState::Done);
    assert!(!ids.contains(&s.job), "a new id after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_job_is_placed_by_the_next_leader_with_its_modules() {
    let mut lab = Lab::start(3, &[8]).await;
    let c = lab.client().await;
    let long = running(&c, None).await;
    let next = c.submit(&ring("next", 200, None, 0)).await.expect("submit");
    assert_eq!(next.state, JobState::Pending);
    let l = lab.leader().await;
    lab.superpeers[l].stop().await;
    // The next leader has the pending job, and its module (only the old leader was sent it).
    let c = lab.client().await;
    c.cancel(&long.job).await.expect("cancel");
    let s = until(&c, &next.job, JobState::is_final).await;
    assert_eq!((s.state, items(&s)), (JobState::Done, 200), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_jobs_go_by_priority_then_by_submission() {
    let lab = Lab::start(1, &[8]).await;
    let c = lab.client().await;
    let long = running(&c, None).await;
    let mut ids = Vec::new();
    for (name, priority) in [("a", 0), ("b", 3), ("c", 3), ("d", 1)] {
        let s = c
            .submit(&ring(name, 2_000_000_000, None, priority))
            .await
            .expect("submit");
        assert_eq!(s.state, JobState::Pending);
        ids.push(s.job);
    }
    // One at a time fits: each one placed is cancelled, and the next in order follows.
    c.cancel(&long.job).await.expect("cancel");
    let mut order = Vec::new();
    for _ in 0..4 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let running = loop {
            let all = c.status(None).await.expect("status");
            if let Some(j) = all.iter().find(|j| j.state == JobState::Running) {
                break j.name.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "none placed after {order:?}: {all:#?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let id = ids
            .iter()
            .find(|i| i.as_str().starts_with(&format!("{running}-")))
            .expect("one of them")
            .clone();
        c.cancel(&id).await.expect("cancel");
        until(&c, &id, JobState::is_final).await;
        order.push(running);
    }
    assert_eq!(order, ["b", "c", "d", "a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_submissions_are_refused_and_nothing_is_recorded() {
    let lab = Lab::start(1, &[4]).await;
    let c = lab.client().await;
    // A topology that does not parse: the file and line.
    let mut bad = ring("bad", 1, None, 0);
    bad.submission.topology = "digraph g {\n  a -> ;\n}\n".into();
    let e = c.submit(&bad).await.expect_err("refused");
    assert_eq!(e.kind, FailureKind::Input, "{e:?}");
    assert!(e.message.contains("ring-8.dot:2"), "{e:?}");
    // A component without a module.
    let mut bad = ring("bad", 1, None, 0);
    bad.submission.components.clear();
    let e = c.submit(&bad).await.expect_err("refused");
    assert!(e.message.contains("has no module"), "{e:?}");
    // More vertices than the group could ever hold: refused at once, not queued.
    let e = c
        .submit(&ring("big", 1, None, 0))
        .await
        .expect_err("refused");
    assert_eq!(e.kind, FailureKind::Unavailable, "{e:?}");
    assert!(e.message.contains("no other group"), "{e:?}");
    assert!(c.status(None).await.expect("status").is_empty());
}

/// Waits until the group's first node says it runs `n` vertices.
async fn node_runs(c: &crate::client::Client, n: u32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let g = c.group().await.expect("group");
        let running = g.nodes.first().map(|x| x.running);
        if running == Some(n) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "runs {running:?}, not {n}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A super-peer whose state is gone (its disk replaced) knows none of the jobs its node still
/// runs: the node stops those parts at its next heartbeat, and says so in the next ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_the_leader_has_no_record_of_is_stopped_at_the_next_heartbeat() {
    let mut lab = Lab::start(1, &[8]).await;
    let c = lab.client().await;
    let s = running(&c, None).await;
    node_runs(&c, 8).await;
    lab.superpeers[0].restart_without_state().await;
    lab.registered(1).await;
    let c = lab.client().await;
    let e = c.status(Some(&s.job)).await.map(|v| v.len());
    assert!(
        matches!(e, Err(_) | Ok(0)),
        "the new log knows {}: {e:?}",
        s.job
    );
    node_runs(&c, 0).await;
}

/// A vertex that traps fails its job, with the vertex and the cause, in the submitter's answer
/// (a job of one part is recorded with its end), and frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vertex_that_traps_fails_its_job_with_the_vertex_and_the_cause() {
    let lab = Lab::start(1, &[4]).await;
    let c = lab.client().await;
    let trap = one("trap", "(module (func (export \"run\") unreachable))");
    let s = finished(&c, &trap).await;
    assert_eq!(s.state, JobState::Failed, "{s:?}");
    let e = s.error.as_deref().unwrap_or_default();
    assert!(e.contains("vertex 'v'") && e.contains("unreachable"), "{e}");
    assert_eq!(s.error_kind, Some(crate::proto::ErrorKind::Trap), "{s:?}");
    assert!(s.outputs.is_empty());
    assert_eq!(c.group().await.expect("group").nodes[0].vertices, 0);
    // The node goes on taking jobs.
    let ok = one("ok", "(module (func (export \"run\")))");
    assert_eq!(finished(&c, &ok).await.state, JobState::Done);
}

/// A pending job can be cancelled: it ends without ever running and the queue goes on; a job
/// that runs cannot be held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_job_is_cancelled_without_running_and_a_running_one_is_not_held() {
    let lab = Lab::start(1, &[8]).await;
    let c = lab.client().await;
    let long = running(&c, None).await;
    let e = c.hold(&long.job, true).await.expect_err("running");
    assert!(e.message.contains("only a pending job"), "{e:?}");
    let next = c.submit(&ring("next", 100, None, 0)).await.expect("submit");
    assert_eq!(next.state, JobState::Pending);
    c.cancel(&next.job).await.expect("cancel");
    let next = until(&c, &next.job, JobState::is_final).await;
    assert_eq!(next.state, JobState::Cancelled, "{next:?}");
    assert!(next.parts.is_empty(), "it never ran: {next:?}");
    let after = c
        .submit(&ring("after", 100, None, 0))
        .await
        .expect("submit");
    assert_eq!(after.state, JobState::Pending);
    c.cancel(&long.job).await.expect("cancel");
    let after = until(&c, &after.job, JobState::is_final).await;
    assert_eq!(
        (after.state, items(&after)),
        (JobState::Done, 100),
        "{after:?}"
    );
}

/// A job waiting for room is placed on a node that joins the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_job_is_placed_on_a_node_that_joins() {
    let mut lab = Lab::start(1, &[8]).await;
    let c = lab.client().await;
    let long = running(&c, None).await;
    let next = c.submit(&ring("next", 200, None, 0)).await.expect("submit");
    assert_eq!(next.state, JobState::Pending);
    lab.add_node(8).await;
    let next = until(&c, &next.job, JobState::is_final).await;
    assert_eq!(
        (next.state, items(&next)),
        (JobState::Done, 200),
        "{next:?}"
    );
    assert_eq!(next.parts.len(), 1);
    assert_eq!(next.parts[0].name, "n1", "{next:?}");
    assert_eq!(
        c.status(Some(&long.job)).await.expect("status")[0].state,
        JobState::Running
    );
}

/// A group whose founding replica (the one that starts a new job log) does not come up is
/// founded by another after the founding wait; the founder, started later, follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_founding_replica_never_starts_is_founded_by_another() {
    let mut lab = crate::broker::harness::Setup::new(3, &[4])
        .without_founder()
        .start()
        .await;
    let founder = (0..3)
        .find(|&i| !lab.superpeers[i].is_up())
        .expect("the founder is down");
    let c = lab.client().await;
    let led = lab.superpeer_of(&c);
    assert_ne!(led, founder);
    let s = finished(&c, &one("first", "(module (func (export \"run\")))")).await;
    assert_eq!(s.state, JobState::Done, "{s:?}");
    // The founder comes up with an empty log of its own making, and takes the group's.
    lab.superpeers[founder].restart().await;
    let c = lab.client_of(founder).await;
    let seen = crate::broker::harness::eventually("the founder follows the group", async || {
        let g = c.group().await.ok()?;
        (!g.is_broker && g.broker.is_some()).then_some(g)
    })
    .await;
    assert_ne!(seen.broker, Some(lab.superpeers[founder].peer));
    let c = lab.client().await;
    let again = c.status(Some(&s.job)).await.expect("status");
    assert_eq!(
        again.first().map(|j| j.state),
        Some(JobState::Done),
        "{again:?}"
    );
    let next = finished(&c, &one("second", "(module (func (export \"run\")))")).await;
    assert_eq!(next.state, JobState::Done, "{next:?}");
}

/// Looking for the leader (what every node and client does at once after a failover) costs no
/// node list: `Leader` says who leads and where, from the leader or a follower; `Group` lists
/// the nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_probe_names_the_leader_without_the_node_list() {
    use crate::proto::{Request, Response};
    let lab = Lab::start(3, &[2, 2]).await;
    let l = lab.leader().await;
    let follower = (0..3).find(|&i| i != l).expect("a follower");
    let net = lab.nodes[0].net().expect("n0 runs");
    let ask = async |i: usize, request: Request| {
        let sp = &lab.superpeers[i];
        let (peer, addr) = crate::net::split_peer(&sp.addr).expect("an address");
        match net.request(peer, &[addr], request).await {
            Ok(Response::Group(g)) => g,
            other => panic!("{other:?}"),
        }
    };
    let led = ask(l, Request::Leader).await;
    assert!(
        led.is_broker && led.nodes.is_empty() && led.groups.is_empty(),
        "{led:?}"
    );
    let told = ask(follower, Request::Leader).await;
    assert!(!told.is_broker, "{told:?}");
    assert_eq!(told.broker, Some(lab.superpeers[l].peer));
    assert!(
        told.broker_addrs
            .iter()
            .any(|a| crate::net::split_addr(a).is_some_and(|(p, _)| p == lab.superpeers[l].peer))
    );
    let all = ask(l, Request::Group).await;
    assert_eq!(all.nodes.len(), 2, "{all:?}");
}
