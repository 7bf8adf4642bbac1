//! Policies at the three levels and forwarding between groups: who may submit, read, cancel
//! and hold, sharing limits, nodes that refuse a part, jobs forwarded to another group of the
//! domain or of a domain with an agreement, and refused when no group can take them, through
//! real daemons in one process ([`super::harness`]).

use super::harness::{Lab, Setup, finished, group_until, items, ring, running, sleeping, until};
use crate::policy::PolicySource;
use crate::proto::{FailureKind, JobState};

/// Domain `default`: members read their own jobs, researchers also submit and cancel theirs,
/// admins do anything; a researcher holds at most 12 vertices at once.
const RBAC: &str = r#"
permission("member", "read-results");
permission("researcher", "read-results");
permission("researcher", "submit");
permission("researcher", "cancel");

allow(user: User, action: String, job: Job) if
    user.domain = job.domain and job.owner = user.name and job.owner_domain = user.domain and
    role in user.roles and permission(role, action);

allow(user: User, _action: String, resource) if
    user.domain = resource.domain and "admin" in user.roles;

limit(user: User, "vertices", 12) if "researcher" in user.roles and not "admin" in user.roles;
"#;

/// Nodes run the jobs of their own domain.
const NODES: &str = "allow(user: User, \"run\", node: Node) if user.domain = node.domain;\n";

/// A group of one super-peer and a node per entry of `slots`, under [`RBAC`] and [`NODES`].
async fn rbac_lab(slots: &[u32]) -> Lab {
    let files = [("default/rbac.polar", RBAC), ("node.polar", NODES)];
    Setup::new(1, slots).policies(&files).start().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_whose_roles_do_not_allow_submitting_is_refused_and_nothing_is_recorded() {
    let lab = rbac_lab(&[8]).await;
    let carol = lab.client_as(&lab.user_as("carol", &["member"])).await;
    let e = carol
        .submit(&sleeping("nap", 0))
        .await
        .expect_err("refused");
    assert_eq!(e.kind, FailureKind::Refused, "{e:?}");
    assert!(
        e.message.contains("refused by policy")
            && e.message
                .contains("does not let user carol@default (roles member) submit"),
        "{e:?}"
    );
    let admin = lab.client_as(&lab.user_as("root", &["admin"])).await;
    assert!(admin.status(None).await.expect("status").is_empty());
    // A researcher may.
    let c = lab.client().await;
    assert_eq!(
        finished(&c, &sleeping("nap", 0)).await.state,
        JobState::Done
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_or_an_admin_reads_cancels_or_holds_a_job_and_sees_it_listed() {
    let lab = rbac_lab(&[8]).await;
    let alice = lab.client().await;
    let long = running(&alice, None).await;
    let next = alice.submit(&sleeping("next", 0)).await.expect("submit");
    assert_eq!(next.state, JobState::Pending);
    let bob = lab.client_as(&lab.user_as("bob", &["researcher"])).await;
    for e in [
        bob.status(Some(&long.job)).await.expect_err("read"),
        bob.wait(&long.job, 0, false).await.expect_err("wait"),
        bob.cancel(&long.job).await.expect_err("cancel"),
        bob.hold(&next.job, true).await.expect_err("hold"),
    ] {
        assert_eq!(e.kind, FailureKind::Refused, "{e:?}");
        assert!(e.message.contains("does not let user bob@default"), "{e:?}");
    }
    assert!(
        bob.status(None).await.expect("status").is_empty(),
        "sees none"
    );
    // The owner reads and holds hers; an admin sees every job and cancels any.
    let mine = alice.status(Some(&long.job)).await.expect("status");
    assert_eq!(mine[0].state, JobState::Running);
    alice.hold(&next.job, true).await.expect("hold");
    let admin = lab.client_as(&lab.user_as("root", &["admin"])).await;
    assert_eq!(admin.status(None).await.expect("status").len(), 2);
    admin.cancel(&long.job).await.expect("cancel");
    let end = until(&alice, &long.job, JobState::is_final).await;
    assert_eq!(end.state, JobState::Cancelled, "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_the_domain_s_vertex_limit_is_refused_until_their_running_job_ends() {
    let lab = rbac_lab(&[16]).await;
    let c = lab.client().await;
    let long = running(&c, None).await;
    let e = c
        .submit(&ring("more", 100, None, 0))
        .await
        .expect_err("over the limit");
    assert_eq!(e.kind, FailureKind::Refused, "{e:?}");
    assert!(
        e.message
            .contains("limits user alice@default (roles researcher) to 12 vertices")
            && e.message.contains("they would hold 16"),
        "{e:?}"
    );
    // Another user is not counted with her.
    let bob = lab.client_as(&lab.user_as("bob", &["researcher"])).await;
    let s = finished(&bob, &ring("bobs", 100, None, 0)).await;
    assert_eq!(s.state, JobState::Done, "{s:?}");
    c.cancel(&long.job).await.expect("cancel");
    until(&c, &long.job, JobState::is_final).await;
    let s = finished(&c, &ring("more", 100, None, 0)).await;
    assert_eq!((s.state, items(&s)), (JobState::Done, 100), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_applies_its_own_policy_to_the_part_it_is_given() {
    let mut lab = Lab::start(1, &[]).await;
    // n0 runs only admins' jobs; n1 anyone's of the domain, with priority queues only.
    let admins = "allow(user: User, \"run\", node: Node) if \
                  user.domain = node.domain and \"admin\" in user.roles;\n";
    let n0 = lab.policy_dir("n0", &[("node.polar", admins)]);
    let priority = format!("{NODES}queue_kind(\"priority\");\n");
    let n1 = lab.policy_dir("n1", &[("node.polar", &priority)]);
    lab.add_node_with(4, |c| c.policies = PolicySource::Dir(n0))
        .await;
    lab.add_node_with(8, |c| c.policies = PolicySource::Dir(n1))
        .await;
    lab.registered(2).await;
    let c = lab.client().await;
    // Only n1 holds a ring of 8 in one part; its channels are fifo.
    let s = finished(&c, &ring("fifo", 100, Some(1), 0)).await;
    assert_eq!(s.state, JobState::Refused, "{s:?}");
    let e = s.error.as_deref().unwrap_or_default();
    assert!(
        e.contains(&lab.node_peer(1))
            && e.contains("vertex 'v1': refused by the node-level policy")
            && e.contains("node n1 does not allow fifo queues"),
        "{e}"
    );
    // The node with the fewest free slots is n0.
    let mut job = sleeping("nap", 0);
    job.submission.requirements.rank = Some("-free_slots".into());
    let s = finished(&c, &job).await;
    assert_eq!(s.state, JobState::Refused, "{s:?}");
    let e = s.error.as_deref().unwrap_or_default();
    assert!(
        e.contains(&lab.node_peer(0))
            && e.contains("does not let user alice@default (roles researcher) run jobs on node n0"),
        "{e}"
    );
    let root = lab.client_as(&lab.user_as("root", &["admin"])).await;
    let s = finished(&root, &job).await;
    assert_eq!(
        (s.state, s.parts[0].name.as_str()),
        (JobState::Done, "n0"),
        "{s:?}"
    );
    let g = c.group().await.expect("group");
    assert!(g.nodes.iter().all(|n| n.vertices == 0), "{g:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_its_group_could_never_hold_is_forwarded_to_a_group_of_the_domain_that_can() {
    let (_small, big, c) = super::harness::small_and_big(4, 16, 8).await;
    let s = c
        .submit(&ring("far", 300, None, 0))
        .await
        .expect("forwarded");
    assert!(
        !s.broker_addrs.is_empty(),
        "names the group that holds it: {s:?}"
    );
    let there = c.follow(&s).expect("follow");
    let end = until(&there, &s.job, JobState::is_final).await;
    assert_eq!((end.state, items(&end)), (JobState::Done, 300), "{end:?}");
    assert_eq!(end.owner, "alice@default", "its owner is the user: {end:?}");
    assert!(end.parts.iter().all(|p| p.name == "n0"), "{end:?}");
    // The small group recorded nothing; the big one holds the job.
    assert!(c.status(None).await.expect("status").is_empty());
    let b = big.client().await.status(None).await.expect("status");
    assert_eq!(b.len(), 1, "{b:?}");
    assert_eq!(b[0].job, s.job);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_no_group_can_hold_is_refused_and_recorded_nowhere() {
    let mut a = Setup::new(1, &[4]).group("a");
    let mut b = Setup::beside(&a, "b", 1, &[4]);
    Setup::link(&mut a, &mut b);
    let (a, b) = (a.start().await, b.start().await);
    let c = a.client().await;
    group_until(&c, "group b's summary", |g| {
        g.groups.iter().any(|s| s.group == "b" && s.free_slots == 4)
    })
    .await;
    let e = c
        .submit(&ring("big", 100, None, 0))
        .await
        .expect_err("refused");
    assert_eq!(e.kind, FailureKind::Unavailable, "{e:?}");
    assert!(
        e.message
            .contains("group a: 8 vertices do not fit in the 4 free slots")
            && e.message
                .contains("no other group known to this super-peer can take it"),
        "{e:?}"
    );
    assert!(c.status(None).await.expect("status").is_empty());
    let bc = b.client().await;
    assert!(bc.status(None).await.expect("status").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_physics_researcher_s_job_is_forwarded_to_biology_and_read_there_by_its_owner_only() {
    let mut phy = Setup::in_domain("physics", 1, &[4])
        .group("phy")
        .example_policies();
    let mut bio = Setup::in_domain("biology", 1, &[16])
        .group("bio")
        .example_policies();
    Setup::link(&mut phy, &mut bio);
    let (phy, _bio) = (phy.start().await, bio.start().await);
    let c = phy.client().await;
    group_until(&c, "biology's summary", |g| {
        g.groups
            .iter()
            .any(|s| s.domain == "biology" && s.free_slots >= 8)
    })
    .await;
    let s = c
        .submit(&ring("guest", 300, None, 0))
        .await
        .expect("forwarded");
    let there = c.follow(&s).expect("follow");
    let end = until(&there, &s.job, JobState::is_final).await;
    assert_eq!((end.state, items(&end)), (JobState::Done, 300), "{end:?}");
    assert_eq!(end.owner, "alice@physics", "{end:?}");
    // Another physics researcher may run jobs there, not read hers.
    let bob = phy.client_as(&phy.user_as("bob", &["researcher"])).await;
    let bob_there = bob.follow(&s).expect("follow");
    let e = bob_there.status(Some(&s.job)).await.expect_err("not his");
    assert_eq!(e.kind, FailureKind::Refused, "{e:?}");
    assert!(e.message.contains("bob@physics"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn physics_revocations_reach_biology_which_cancels_the_revoked_users_job_there_and_cuts_her_off()
 {
    let owned = cancelling_revoked();
    let files: Vec<(&str, &str)> = owned.iter().map(|(f, t)| (&**f, &**t)).collect();
    // Physics has no nodes: its researchers' jobs run in biology.
    let mut phy = Setup::in_domain("physics", 1, &[])
        .group("phy")
        .policies(&files);
    let mut bio = Setup::in_domain("biology", 1, &[4])
        .group("bio")
        .policies(&files);
    Setup::link(&mut phy, &mut bio);
    let (phy, bio) = (phy.start().await, bio.start().await);
    let (alice, bob) = (phy.user(), phy.user_as("bob", &["researcher"]));
    let (ca, cb) = (phy.client_as(&alice).await, phy.client_as(&bob).await);
    group_until(&ca, "biology's summary", |g| {
        g.groups
            .iter()
            .any(|s| s.domain == "biology" && s.free_slots >= 2)
    })
    .await;
    let mut there = Vec::new();
    for c in [&ca, &cb] {
        let s = c.submit(&sleeping("nap", 60_000)).await.expect("forwarded");
        let follow = c.follow(&s).expect("follow");
        until(&follow, &s.job, |st| st == JobState::Running).await;
        there.push((s.job, follow));
    }
    let admin = bio.client_as(&bio.user_as("root", &["admin"])).await;
    assert!(
        admin.status(None).await.expect("status").len() == 2,
        "both run in biology"
    );

    // Physics' CA revokes alice: its super-peer reads the list, and biology's fetches it
    // (told of it by physics' summaries), cancels her job as physics' policy says, and cuts
    // her off. Bob's job runs on.
    phy.revoke(&alice);
    let ended = until(&admin, &there[0].0, JobState::is_final).await;
    assert_eq!(ended.state, JobState::Cancelled, "{ended:?}");
    assert!(
        there[0].1.status(None).await.is_err(),
        "biology still serves a user physics revoked"
    );
    let s = there[1]
        .1
        .status(Some(&there[1].0))
        .await
        .expect("bob is served");
    assert_eq!(s[0].state, JobState::Running, "{s:?}");
    admin.cancel(&there[1].0).await.expect("cancel");
}

/// The shipped policies, and physics' rule for its revoked users' jobs: cancel them.
fn cancelling_revoked() -> Vec<(String, String)> {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut owned: Vec<(String, String)> = [
        "inter-domain.polar",
        "node.polar",
        "physics/rbac.polar",
        "physics/limits.polar",
        "biology/rbac.polar",
        "biology/limits.polar",
    ]
    .iter()
    .map(|f| {
        let text = std::fs::read_to_string(shipped.join(f)).expect("a shipped policy");
        ((*f).to_owned(), text)
    })
    .collect();
    owned.push((
        "physics/revoked.polar".into(),
        "revoked_jobs(_user: User, \"cancel\");\n".into(),
    ));
    owned
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_comes_to_lead_cancels_the_jobs_of_users_revoked_by_a_list_it_took_as_a_follower()
 {
    let owned = cancelling_revoked();
    let files: Vec<(&str, &str)> = owned.iter().map(|(f, t)| (&**f, &**t)).collect();
    let mut lab = Setup::in_domain("physics", 3, &[2])
        .group("phy")
        .policies(&files)
        .start()
        .await;
    let alice = lab.user();
    let job = lab
        .client_as(&alice)
        .await
        .submit(&sleeping("nap", 60_000))
        .await
        .expect("submitted")
        .job;
    let admin = lab.client_as(&lab.user_as("root", &["admin"])).await;
    until(&admin, &job, |st| st == JobState::Running).await;
    // The followers take a list revoking alice (as one fetched from another domain's
    // super-peer), the leader does not: only the leader acts on one, so her job runs on.
    let leader = lab.leader().await;
    let der = lab.crl_revoking(&alice);
    for (i, sp) in lab.superpeers.iter().enumerate() {
        if i != leader {
            let trust = sp.net().expect("up").trust();
            assert!(trust.adopt_crl(&der).expect("signed").is_some(), "taken");
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let s = admin.status(Some(&job)).await.expect("status");
    assert_eq!(s[0].state, JobState::Running, "{s:?}");
    // The leader stops; the follower that comes to lead cancels her job.
    lab.superpeers[leader].stop().await;
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let admin = lab
        .client_among(&lab.user_as("root", &["admin"]), &others)
        .await;
    let ended = until(&admin, &job, JobState::is_final).await;
    assert_eq!(ended.state, JobState::Cancelled, "{ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_not_forwarded_to_a_domain_without_an_agreement_that_lets_its_owner() {
    // The agreement lets physics use biology, not the other way round.
    let mut bio = Setup::in_domain("biology", 1, &[4])
        .group("bio")
        .example_policies();
    let mut phy = Setup::in_domain("physics", 1, &[16])
        .group("phy")
        .example_policies();
    Setup::link(&mut bio, &mut phy);
    let (bio, phy) = (bio.start().await, phy.start().await);
    let c = bio.client().await;
    group_until(&c, "physics' summary", |g| {
        g.groups
            .iter()
            .any(|s| s.domain == "physics" && s.free_slots >= 8)
    })
    .await;
    let e = c
        .submit(&ring("guest", 100, None, 0))
        .await
        .expect_err("refused");
    assert_eq!(e.kind, FailureKind::Unavailable, "{e:?}");
    assert!(
        e.message
            .contains("no other group known to this super-peer can take it"),
        "{e:?}"
    );
    assert!(c.status(None).await.expect("status").is_empty());
    let pc = phy.client().await;
    assert!(pc.status(None).await.expect("status").is_empty());
}

/// The domain's checkpoint policy (the MVM paper's): researchers' jobs that ask for no
/// checkpoints get one every 10 minutes, and no job may ask for more than one a second.
const CHECKPOINTS: &str = r#"
checkpoint_interval(user: User, 600000) if "researcher" in user.roles;
min_checkpoint_interval(_user: User, 1000);
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_domain_policy_checkpoints_jobs_that_ask_for_none_and_bounds_how_often_one_may_ask() {
    let files = [
        ("default/rbac.polar", RBAC),
        ("default/checkpoints.polar", CHECKPOINTS),
        ("node.polar", NODES),
    ];
    let lab = Setup::new(1, &[8]).policies(&files).start().await;
    let c = lab.client().await;
    // A ring whose profile asks for no checkpoints is checkpointed: one is taken on demand.
    let long = running(&c, None).await;
    // (Every slot of the node is taken: pausing needs no more.)
    c.checkpoint(&long.job)
        .await
        .expect("checkpointable by the domain's policy");
    let s = c.status(Some(&long.job)).await.expect("status").remove(0);
    assert_eq!(s.checkpoints.len(), 1, "{s:?}");
    c.cancel(&long.job).await.expect("cancel");
    until(&c, &long.job, JobState::is_final).await;
    // Asking for checkpoints more often than the policy lets is refused, saying why.
    let mut often = ring("often", 100, None, 0);
    often.submission.checkpoint = Some(crate::proto::CheckpointPolicy {
        interval_ms: 500,
        keep: 2,
    });
    let e = c.submit(&often).await.expect_err("too often");
    assert_eq!(e.kind, FailureKind::Refused, "{e:?}");
    assert!(
        e.message.contains("at most every 1000 ms") && e.message.contains("every 500 ms"),
        "{e:?}"
    );
    // As often as it lets is fine.
    often.submission.checkpoint = Some(crate::proto::CheckpointPolicy {
        interval_ms: 1000,
        keep: 2,
    });
    let s = finished(&c, &often).await;
    assert_eq!(s.state, JobState::Done, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_users_jobs_are_cancelled_or_run_on_as_the_domain_policy_says_and_the_user_is_cut_off()
 {
    let rules = format!(
        "{RBAC}\nrevoked_jobs(_user: User, \"finish\");\n\
         revoked_jobs(user: User, \"cancel\") if \"student\" in user.roles;\n"
    );
    let files = [
        ("default/rbac.polar", rules.as_str()),
        ("node.polar", NODES),
    ];
    let lab = Setup::new(1, &[8]).policies(&files).start().await;
    let admin = lab.client_as(&lab.user_as("root", &["admin"])).await;
    let eve = lab.user_as("eve", &["researcher", "student"]);
    let bob = lab.user_as("bob", &["researcher"]);
    let (ce, cb) = (lab.client_as(&eve).await, lab.client_as(&bob).await);
    let mut jobs = Vec::new();
    for c in [&ce, &cb] {
        let s = c.submit(&sleeping("nap", 60_000)).await.expect("submit");
        jobs.push(
            until(&admin, &s.job, |st| st == JobState::Running)
                .await
                .job,
        );
    }
    // Carol is not revoked: her job is not touched.
    let carol = lab.user_as("carol", &["researcher", "student"]);
    let cc = lab.client_as(&carol).await;
    let s = cc.submit(&sleeping("nap", 60_000)).await.expect("submit");
    let carols = until(&admin, &s.job, |st| st == JobState::Running)
        .await
        .job;

    lab.revoke(&eve);
    lab.revoke(&bob);
    // Eve's job is cancelled, as the policy says of students; Bob's runs on.
    let ended = until(&admin, &jobs[0], JobState::is_final).await;
    assert_eq!(ended.state, JobState::Cancelled, "{ended:?}");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    for j in [&jobs[1], &carols] {
        let s = admin.status(Some(j)).await.expect("status");
        assert_eq!(s[0].state, JobState::Running, "{s:?}");
    }
    // Eve and Bob are cut off; Carol is not.
    for c in [&ce, &cb] {
        assert!(c.status(None).await.is_err(), "a revoked user still served");
    }
    assert!(cc.status(None).await.is_ok());
    for j in [&jobs[1], &carols] {
        admin.cancel(j).await.expect("cancel");
    }
}
