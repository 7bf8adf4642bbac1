//! Offers and agreements through real daemons in one process ([`super::harness`]): an offer
//! planned in time, accepted, started at its start and met; a reservation that keeps its
//! slots from a later job and lets a short one run before it (backfilling); offers that lapse,
//! are accepted twice, or cannot meet their deadline; an agreement broken at once by a lost
//! node when its job has no checkpoint.

use std::time::{Duration, Instant};

use super::harness::{Lab, ring, sleeping, small_and_big, until};
use super::now_ms;
use crate::client::{Client, OfferAsk, Prepared};
use crate::proto::{AgreementInfo, AgreementState, FailureKind, JobId, JobState};

/// `job` with a run-time estimate of `ms`.
fn estimated(mut job: Prepared, ms: u64) -> Prepared {
    job.submission.estimate_ms = Some(ms);
    job
}

/// The one offer for `job`, as asked.
async fn offer(c: &Client, job: &Prepared, ask: OfferAsk) -> AgreementInfo {
    let mut v = c.offer(job, ask).await.expect("offer");
    assert_eq!(v.len(), 1, "{v:?}");
    v.remove(0)
}

/// Agreement `id` once `pred` holds of it.
async fn agreement_until(
    c: &Client,
    id: &JobId,
    pred: impl Fn(&AgreementInfo) -> bool,
) -> AgreementInfo {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = c.agreements(false).await.expect("agreements");
        let a = all.into_iter().find(|a| a.id == *id).expect("listed");
        if pred(&a) {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "agreement never got there: {a:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_accepted_runs_its_job_from_its_start_and_is_met() {
    let lab = Lab::start(1, &[2]).await;
    let c = lab.client().await;
    let asked = now_ms();
    let o = offer(
        &c,
        &estimated(sleeping("sla", 200), 5_000),
        OfferAsk {
            start_after_ms: Some(asked + 1_500),
            deadline_ms: Some(asked + 60_000),
            ..OfferAsk::default()
        },
    )
    .await;
    assert_eq!(o.state, AgreementState::Offered);
    assert!(o.start_ms >= asked + 1_500, "{o:?}");
    assert_eq!(o.finish_ms, o.start_ms + 5_000, "{o:?}");
    assert_eq!(
        (o.estimate_from.as_str(), o.image.as_str()),
        ("profile", "host")
    );
    assert_eq!(o.nodes.len(), 1, "{o:?}");
    assert_eq!(o.vertices, 1);
    let a = c.accept(&o.id).await.expect("accept");
    assert_eq!(a.state, AgreementState::Accepted);
    // Its job waits for the start, though there is room now.
    let st = c.status(Some(&o.id)).await.expect("status").remove(0);
    assert_eq!(st.state, JobState::Pending, "{st:?}");
    let end = until(&c, &o.id, JobState::is_final).await;
    assert_eq!(end.state, JobState::Done, "{end:?}");
    assert_eq!(end.agreement, Some((AgreementState::Met, None)), "{end:?}");
    let a = agreement_until(&c, &o.id, |a| a.state.is_final()).await;
    assert_eq!(a.state, AgreementState::Met, "{a:?}");
    assert!(
        a.ended_ms
            .is_some_and(|e| e >= o.start_ms && e <= o.finish_ms),
        "{a:?}"
    );
    // Accepted twice: refused, naming the agreement's state.
    let e = c.accept(&o.id).await.expect_err("twice");
    assert!(e.message.contains("accepted already"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_keeps_its_slot_from_a_later_job_and_lets_a_short_one_fill_the_gap() {
    let lab = Lab::start(1, &[1]).await;
    let c = lab.client().await;
    let asked = now_ms();
    let o = offer(
        &c,
        &estimated(sleeping("reserved", 300), 3_000),
        OfferAsk {
            start_after_ms: Some(asked + 5_000),
            ..OfferAsk::default()
        },
    )
    .await;
    c.accept(&o.id).await.expect("accept");
    // A job without an estimate could run past the reservation: it waits.
    let long = c.submit(&sleeping("long", 200)).await.expect("long");
    // One whose estimate ends it before the reservation runs now.
    let short = c
        .submit(&estimated(sleeping("short", 100), 1_000))
        .await
        .expect("short");
    let short = until(&c, &short.job, JobState::is_final).await;
    assert_eq!(short.state, JobState::Done, "{short:?}");
    let a = agreement_until(&c, &o.id, |_| true).await;
    assert_eq!(
        a.state,
        AgreementState::Accepted,
        "the short job ended first: {a:?}"
    );
    let st = c.status(Some(&long.job)).await.expect("status").remove(0);
    assert_eq!(st.state, JobState::Pending, "{st:?}");
    // Then the agreement's job, then the long one.
    let a = agreement_until(&c, &o.id, |a| a.state.is_final()).await;
    assert_eq!(a.state, AgreementState::Met, "{a:?}");
    let long = until(&c, &long.job, JobState::is_final).await;
    assert_eq!(long.state, JobState::Done, "{long:?}");
    assert!(
        long.wall_ms >= 2_500,
        "the long job waited for the reservation: {long:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_lapse_and_are_refused_without_an_estimate_or_past_their_deadline() {
    let lab = Lab::start(1, &[1]).await;
    let c = lab.client().await;
    // Held a short while only: then it cannot be accepted, and shows as expired.
    let o = offer(
        &c,
        &estimated(sleeping("brief", 100), 1_000),
        OfferAsk {
            valid_ms: Some(200),
            ..OfferAsk::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let e = c.accept(&o.id).await.expect_err("lapsed");
    assert!(e.message.contains("lapsed"), "{e:?}");
    let a = agreement_until(&c, &o.id, |a| a.state.is_final()).await;
    assert_eq!(a.state, AgreementState::Expired, "{a:?}");
    // Its slot was not kept: a job that gives no estimate runs now.
    let s = c
        .submit_and_wait(&sleeping("after", 50))
        .await
        .expect("submit");
    assert_eq!(
        until(&c, &s.job, JobState::is_final).await.state,
        JobState::Done
    );
    // No estimate, and no earlier run of the profile.
    let e = c
        .offer(&sleeping("unknown", 50), OfferAsk::default())
        .await
        .expect_err("no estimate");
    assert_eq!(e.kind, FailureKind::Input, "{e:?}");
    assert!(e.message.contains("estimate"), "{e:?}");
    // A profile that ran before is planned by its history.
    let o = offer(&c, &sleeping("after", 50), OfferAsk::default()).await;
    assert_eq!(o.estimate_from, "history", "{o:?}");
    assert!(o.estimate_ms >= 1_000, "{o:?}");
    // A deadline no plan meets: no offer, and the earliest finish said.
    let e = c
        .offer(
            &estimated(sleeping("slow", 50), 600_000),
            OfferAsk {
                deadline_ms: Some(now_ms() + 60_000),
                ..OfferAsk::default()
            },
        )
        .await
        .expect_err("deadline");
    assert!(e.message.contains("earliest finish"), "{e:?}");
    // An unknown offer.
    let e = c
        .accept(&"nothing-1-1".parse().expect("id"))
        .await
        .expect_err("unknown");
    assert_eq!(e.kind, FailureKind::NotFound, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_offer_is_planned_after_the_first_one_it_would_overlap() {
    let lab = Lab::start(1, &[8]).await;
    let c = lab.client().await;
    // Two rings of 8 vertices: the node holds one at a time.
    let job = |name| estimated(ring(name, 1_000, None, 0), 4_000);
    let first = offer(&c, &job("first"), OfferAsk::default()).await;
    let second = offer(&c, &job("second"), OfferAsk::default()).await;
    assert!(
        second.start_ms >= first.finish_ms,
        "the second starts after the first: {first:?} {second:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agreement_whose_node_is_lost_without_a_checkpoint_is_violated_at_once() {
    let mut lab = Lab::start(1, &[1, 1]).await;
    let c = lab.client().await;
    let mut job = estimated(sleeping("fragile", 20_000), 30_000);
    job.submission.retries = 1;
    let o = offer(&c, &job, OfferAsk::default()).await;
    c.accept(&o.id).await.expect("accept");
    let st = until(&c, &o.id, |s| s == JobState::Running).await;
    let a = agreement_until(&c, &o.id, |a| a.state == AgreementState::Running).await;
    assert!(a.reason.is_none(), "{a:?}");
    let node = st.parts[0].node.to_string();
    let victim = (0..lab.nodes.len())
        .find(|i| lab.node_peer(*i) == node)
        .expect("its node");
    let lost = Instant::now();
    lab.nodes[victim].stop().await;
    let a = agreement_until(&c, &o.id, |a| a.state.is_final()).await;
    assert_eq!(a.state, AgreementState::Violated, "{a:?}");
    let reason = a.reason.clone().unwrap_or_default();
    assert!(reason.contains("no checkpoint"), "{a:?}");
    assert!(
        lost.elapsed() < Duration::from_secs(15),
        "said at once, not at the promised finish: {a:?}"
    );
    // The job itself goes on, on the other node.
    let st = until(&c, &o.id, |s| s == JobState::Running).await;
    assert_eq!(st.attempt, 1, "{st:?}");
    c.cancel(&o.id).await.expect("cancel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_without_room_passes_on_another_group_s_offer_which_is_accepted_through_it() {
    let (small, big, c) = small_and_big(4, 16, 8).await;
    // Eight vertices: the small group's nodes could never hold them.
    let o = offer(
        &c,
        &estimated(ring("far", 300, None, 0), 30_000),
        OfferAsk::default(),
    )
    .await;
    assert_eq!(
        (o.group.as_str(), o.owner.as_str()),
        ("big", "alice@default"),
        "{o:?}"
    );
    assert!(
        !o.broker_addrs.is_empty(),
        "names the group's super-peer: {o:?}"
    );
    // Accepted through the small group's super-peer, recorded by the big group's.
    let a = c.accept(&o.id).await.expect("accept");
    assert_eq!(a.state, AgreementState::Accepted, "{a:?}");
    let there = c.at(&a.broker_addrs).expect("at");
    let end = until(&there, &o.id, JobState::is_final).await;
    assert_eq!(end.state, JobState::Done, "{end:?}");
    let a = agreement_until(&there, &o.id, |a| a.state.is_final()).await;
    assert_eq!(a.state, AgreementState::Met, "{a:?}");
    assert!(
        c.agreements(false).await.expect("list").is_empty(),
        "none here"
    );
    let b = big.client().await.agreements(false).await.expect("list");
    assert_eq!(b.len(), 1, "{b:?}");
    // Another user may not accept an offer made to alice.
    let o = offer(
        &c,
        &estimated(ring("far", 300, None, 0), 30_000),
        OfferAsk::default(),
    )
    .await;
    let bob = small
        .client_as(&small.user_as("bob", &["researcher"]))
        .await;
    let e = bob.accept(&o.id).await.expect_err("not his");
    assert!(e.message.contains("not to bob@default"), "{e:?}");
}
