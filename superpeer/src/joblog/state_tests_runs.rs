//! Runs given up and parts moved, in the control state.

use super::*;

#[test]
fn a_run_given_up_waits_again_in_its_place_frees_its_slots_and_its_reports_are_refused() {
    let (a, b) = (PeerId::random(), PeerId::random());
    let order = |s: &ControlState| s.pending().map(|j| j.id.clone()).collect::<Vec<_>>();
    let mut s = ControlState::default();
    let mut running = job("r-1-0", 0, 10, vec![part(a, 2), part(b, 1)]);
    running.retries = 1;
    running.submission = Some(submission());
    assert_eq!(
        s.apply(1, Command::Submit(Box::new(running))),
        Applied::Done
    );
    let start = |at_ms| Command::Start {
        job: "r-1-0".into(),
        at_ms,
    };
    assert_eq!(s.apply(2, start(20)), Applied::Done);
    let done = |node, attempt| Command::PartDone {
        guest: None,
        job: "r-1-0".into(),
        node,
        attempt,
        outputs: vec![("v0".into(), bytes::Bytes::from_static(b"out"))],
        traffic: Vec::new(),
        edges: Vec::new(),
        received: vec![PortTraffic {
            port: "v0:in".into(),
            items: 3,
            bytes: 3,
        }],
        at_ms: 30,
    };
    assert_eq!(s.apply(3, done(a, 0)), Applied::Done);
    // A later job waits behind it.
    assert_eq!(
        s.apply(
            4,
            Command::Submit(Box::new(job("later-1-0", 0, 50, Vec::new())))
        ),
        Applied::Done
    );
    let requeue = |attempt| Command::Requeue {
        job: "r-1-0".into(),
        attempt,
        at_ms: 40,
        why: "node b lost".into(),
    };
    assert!(matches!(
        s.apply(5, requeue(2)),
        Applied::Refused(CommandError::NoRetry { .. })
    ));
    assert_eq!(s.apply(5, requeue(1)), Applied::Done);
    let j = s.job(&"r-1-0".into()).expect("kept").clone();
    assert_eq!((j.state, j.attempt), (JobState::Pending, 1));
    assert!(j.parts.is_empty() && j.outputs.is_empty(), "{j:?}");
    assert!(
        j.received.is_empty(),
        "the run given up counts nothing: {j:?}"
    );
    assert_eq!(
        (s.reserved(&a), s.reserved(&b)),
        (0, 0),
        "its slots are free"
    );
    assert_eq!(s.held(&alice()).vertices, 4, "its owner still holds it");
    assert_eq!(order(&s), ["r-1-0", "later-1-0"], "it keeps its place");
    // A report of the run given up changes nothing, and its retries are used up.
    assert!(matches!(
        s.apply(6, done(b, 0)),
        Applied::Refused(CommandError::NoPartsYet(_))
    ));
    assert!(matches!(
        s.apply(6, requeue(2)),
        Applied::Refused(CommandError::NoRetry { .. })
    ));
    // Placed and started again: the restart says when it ran again.
    let place = Command::Place {
        job: "r-1-0".into(),
        parts: vec![part(a, 3)],
        from_cut: None,
    };
    assert_eq!(s.apply(7, place), Applied::Done);
    assert!(
        s.job(&"r-1-0".into())
            .is_some_and(|j| j.submission.is_none()),
        "no retry left: the submission goes"
    );
    assert_eq!(s.apply(8, start(45)), Applied::Done);
    assert!(matches!(
        s.apply(9, done(a, 0)),
        Applied::Refused(CommandError::OtherRun { current: 1, .. })
    ));
    assert_eq!(s.apply(9, done(a, 1)), Applied::Done);
    let j = s.job(&"r-1-0".into()).expect("kept");
    assert_eq!(j.state, JobState::Done);
    assert_eq!(j.restarts.len(), 1);
    assert_eq!(j.restarts[0].recovery_ms(), Some(5));
    // A run given up needs retries: a job without any fails instead.
    let mut other = job("o-1-0", 0, 60, vec![part(a, 1)]);
    other.submission = Some(submission());
    assert_eq!(s.apply(10, Command::Submit(Box::new(other))), Applied::Done);
    assert!(matches!(
        s.apply(
            11,
            Command::Requeue {
                job: "o-1-0".into(),
                attempt: 1,
                at_ms: 70,
                why: "lost".into(),
            }
        ),
        Applied::Refused(CommandError::NoRetry { .. })
    ));
}

#[test]
fn a_move_hands_a_running_part_and_its_slots_to_the_new_node_and_one_that_does_not_fit_changes_nothing()
 {
    let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
    let mut s = ControlState::default();
    let id: JobId = "j-1-1".into();
    let j = job("j-1-1", 0, 1, vec![part(a, 3), part(b, 1)]);
    assert_eq!(s.apply(1, Command::Submit(Box::new(j))), Applied::Done);
    let info = |from, to, cut| crate::proto::MoveInfo {
        vertices: vec!["v0".into()],
        from,
        to,
        attempt: 0,
        cut,
        at_ms: 5,
        downtime_ms: 3,
        bytes: 100,
    };
    let moved = |part, from, to| Command::Move {
        job: id.clone(),
        part,
        info: info(from, to, 1),
    };
    // Not running yet.
    assert!(matches!(
        s.apply(2, moved(1, b, c)),
        Applied::Refused(CommandError::Move { .. })
    ));
    let start = Command::Start {
        job: id.clone(),
        at_ms: 0,
    };
    assert_eq!(s.apply(3, start), Applied::Done);
    // Onto a node that holds a part, from a node that does not hold it, or a part that is not
    // there: refused.
    for bad in [
        moved(1, b, a),
        moved(1, c, a),
        moved(0, b, c),
        moved(7, b, c),
    ] {
        assert!(matches!(
            s.apply(4, bad),
            Applied::Refused(CommandError::Move { .. })
        ));
    }
    assert_eq!((s.reserved(&b), s.reserved(&c)), (1, 0));
    assert_eq!(s.apply(5, moved(1, b, c)), Applied::Done);
    let j = s.job(&id).expect("job");
    assert_eq!(j.parts[1].node, c);
    assert_eq!(j.moves, vec![info(b, c, 1)]);
    assert_eq!((s.reserved(&a), s.reserved(&b), s.reserved(&c)), (3, 0, 1));
    assert_eq!(s.placed_on(&b).count(), 0);
    assert_eq!(s.placed_on(&c).count(), 1);
    // The new node's report counts; the old one's is not a part's any more.
    let done = |node| Command::PartDone {
        guest: None,
        job: id.clone(),
        node,
        attempt: 0,
        outputs: Vec::new(),
        traffic: Vec::new(),
        edges: Vec::new(),
        received: Vec::new(),
        at_ms: 7,
    };
    assert!(matches!(
        s.apply(6, done(b)),
        Applied::Refused(CommandError::NotAPart { .. })
    ));
    assert_eq!(s.apply(7, done(c)), Applied::Done);
    // A drained node stays so in a snapshot, until undrained.
    assert_eq!(
        s.apply(
            8,
            Command::Drain {
                node: a,
                drained: true
            }
        ),
        Applied::Done
    );
    let mut bytes = Vec::new();
    ciborium::into_writer(&s, &mut bytes).expect("encode");
    let copy: ControlState = ciborium::from_reader(bytes.as_slice()).expect("decode");
    assert!(copy.is_drained(&a) && !copy.is_drained(&b));
    assert_eq!(
        s.apply(
            9,
            Command::Drain {
                node: a,
                drained: false
            }
        ),
        Applied::Done
    );
    assert!(!s.is_drained(&a));
}
