//! The offers and agreements of the control state, one command at a time.

use libp2p::PeerId;

use super::tests::{alice, end, job, part, submission};
use super::{AgreementRecord, Applied, Command, CommandError, ControlState, Ended, Resources};
use crate::proto::{AgreementState, CheckpointInfo, JobState};

fn offer(id: &str, node: PeerId) -> AgreementRecord {
    AgreementRecord {
        id: id.into(),
        name: "j".into(),
        owner: alice(),
        image: "host".into(),
        resources: Resources {
            vcpus: 1,
            memory_mib: 64,
            vertices: 2,
        },
        slots: vec![(node, 2)],
        start_ms: 1_000,
        finish_ms: 5_000,
        estimate_ms: 4_000,
        estimate_from: "profile".into(),
        deadline_ms: None,
        offered_ms: 0,
        expires_ms: 500,
        state: AgreementState::Offered,
        reason: None,
        accepted_ms: None,
        ended_ms: None,
        submission: Some(submission()),
    }
}

fn accept(id: &str, at_ms: u64) -> Command {
    Command::Accept {
        offer: id.into(),
        at_ms,
        job: Box::new(job(id, 0, at_ms, Vec::new())),
    }
}

/// A state with offer `a-1-1` on `node` accepted, and its job placed there and started.
fn running(node: PeerId) -> ControlState {
    let mut s = ControlState::default();
    assert_eq!(
        s.apply(1, Command::Offer(Box::new(offer("a-1-1", node)))),
        Applied::Done
    );
    assert_eq!(s.apply(2, accept("a-1-1", 100)), Applied::Done);
    let place = Command::Place {
        job: "a-1-1".into(),
        parts: vec![part(node, 2)],
        from_cut: None,
    };
    assert_eq!(s.apply(3, place), Applied::Done);
    let start = Command::Start {
        job: "a-1-1".into(),
        at_ms: 1_000,
    };
    assert_eq!(s.apply(4, start), Applied::Done);
    s
}

fn state(s: &ControlState) -> AgreementState {
    s.agreement(&"a-1-1".into()).expect("kept").state
}

#[test]
fn an_offer_holds_its_slots_until_it_is_accepted_then_its_job_holds_them() {
    let node = PeerId::random();
    let mut s = ControlState::default();
    s.apply(1, Command::Offer(Box::new(offer("a-1-1", node))));
    assert_eq!(s.holding().count(), 1);
    assert_eq!(s.apply(2, accept("a-1-1", 100)), Applied::Done);
    let j = s.job(&"a-1-1".into()).expect("its job");
    assert!(j.agreement && j.state == JobState::Pending, "{j:?}");
    assert_eq!(state(&s), AgreementState::Accepted);
    assert_eq!(s.holding().count(), 1, "held while its job waits");
    let place = Command::Place {
        job: "a-1-1".into(),
        parts: vec![part(node, 2)],
        from_cut: None,
    };
    s.apply(3, place);
    assert_eq!(s.holding().count(), 0, "its job holds the slots now");
    assert_eq!(s.reserved(&node), 2);
}

#[test]
fn an_offer_is_accepted_once_and_not_after_it_lapses() {
    let node = PeerId::random();
    let mut s = ControlState::default();
    s.apply(1, Command::Offer(Box::new(offer("a-1-1", node))));
    s.apply(2, Command::Offer(Box::new(offer("b-1-2", node))));
    // A second offer of the same id.
    assert!(matches!(
        s.apply(3, Command::Offer(Box::new(offer("a-1-1", node)))),
        Applied::Refused(CommandError::Exists(_))
    ));
    assert_eq!(s.apply(4, accept("a-1-1", 100)), Applied::Done);
    assert!(matches!(
        s.apply(5, accept("a-1-1", 101)),
        Applied::Refused(CommandError::Agreement { why, .. }) if why.contains("accepted already")
    ));
    // Past its expiry (500): refused, and nothing recorded.
    assert!(matches!(
        s.apply(6, accept("b-1-2", 501)),
        Applied::Refused(CommandError::Agreement { why, .. }) if why.contains("lapsed")
    ));
    assert!(s.job(&"b-1-2".into()).is_none());
    let expire = |id: &str| Command::EndAgreement {
        agreement: id.into(),
        state: AgreementState::Expired,
        at_ms: 600,
        why: "not accepted".into(),
    };
    assert_eq!(s.apply(7, expire("b-1-2")), Applied::Done);
    assert_eq!(
        s.agreement(&"b-1-2".into()).map(|a| a.state),
        Some(AgreementState::Expired)
    );
    // An accepted one does not lapse; a lapsed one is not accepted.
    assert!(matches!(s.apply(8, expire("a-1-1")), Applied::Refused(_)));
    assert!(matches!(
        s.apply(9, accept("b-1-2", 100)),
        Applied::Refused(_)
    ));
    assert_eq!(s.holding().count(), 1);
}

#[test]
fn an_agreement_runs_with_its_job_and_is_met_by_an_end_in_time() {
    let node = PeerId::random();
    let mut s = running(node);
    assert_eq!(state(&s), AgreementState::Running);
    let done = Command::End {
        job: "a-1-1".into(),
        state: JobState::Done,
        ended: Ended {
            at_ms: 4_900,
            ..end(JobState::Done)
        },
    };
    assert_eq!(s.apply(5, done), Applied::Done);
    let a = s.agreement(&"a-1-1".into()).expect("kept");
    assert_eq!((a.state, a.ended_ms), (AgreementState::Met, Some(4_900)));
}

#[test]
fn an_agreement_ended_late_failed_or_cancelled_says_so() {
    let node = PeerId::random();
    for (job_state, at, want, says) in [
        (
            JobState::Done,
            5_001,
            AgreementState::Violated,
            "after the promised finish",
        ),
        (JobState::Failed, 2_000, AgreementState::Violated, "failed"),
        (
            JobState::Cancelled,
            2_000,
            AgreementState::Cancelled,
            "cancelled",
        ),
    ] {
        let mut s = running(node);
        let ended = Ended {
            at_ms: at,
            error: (job_state != JobState::Done)
                .then(|| format!("it was {job_state:?}").to_lowercase()),
            kind: None,
        };
        s.apply(
            5,
            Command::End {
                job: "a-1-1".into(),
                state: job_state,
                ended,
            },
        );
        let a = s.agreement(&"a-1-1".into()).expect("kept");
        assert_eq!(a.state, want, "{a:?}");
        assert!(
            a.reason.as_deref().unwrap_or_default().contains(says),
            "{a:?}"
        );
    }
}

#[test]
fn a_run_given_up_breaks_the_agreement_unless_a_checkpoint_carries_the_job_on() {
    let node = PeerId::random();
    let requeue = Command::Requeue {
        job: "a-1-1".into(),
        attempt: 1,
        at_ms: 2_000,
        why: "node n1 lost".into(),
    };
    let with_retry = |mut s: ControlState| {
        // The job of `running` has no retries; give it one through a fresh record.
        let mut j = s.job(&"a-1-1".into()).expect("job").clone();
        j.retries = 1;
        j.submission = Some(submission());
        s.jobs.insert(j.id.clone(), j);
        s
    };
    let mut s = with_retry(running(node));
    assert_eq!(s.apply(5, requeue.clone()), Applied::Done);
    let a = s.agreement(&"a-1-1".into()).expect("kept");
    assert_eq!(a.state, AgreementState::Violated, "{a:?}");
    let reason = a.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("node n1 lost") && reason.contains("no checkpoint"),
        "{reason}"
    );
    // With a checkpoint it goes on, and still holds its slots while its job waits.
    let mut s = with_retry(running(node));
    let cut = Command::Checkpoint {
        job: "a-1-1".into(),
        info: CheckpointInfo {
            cut: 1,
            attempt: 0,
            at_ms: 1_500,
            parts: Vec::new(),
        },
    };
    assert_eq!(s.apply(5, cut), Applied::Done);
    assert_eq!(s.apply(6, requeue), Applied::Done);
    assert_eq!(state(&s), AgreementState::Running);
    assert_eq!(s.holding().count(), 1);
}
