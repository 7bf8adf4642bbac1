use mvm_component::policy::PrincipalKind;

use super::*;
use crate::proto::{EdgeTraffic, PortTraffic, Submission, Traffic};

pub(super) fn alice() -> Principal {
    Principal {
        kind: PrincipalKind::User,
        name: "alice".into(),
        domain: "physics".into(),
        roles: vec!["researcher".into()],
    }
}

pub(super) fn submission() -> Box<Submission> {
    Box::new(Submission {
        name: "j".into(),
        ..Submission::default()
    })
}

pub(crate) fn job(id: &str, priority: i32, at: u64, parts: Vec<PartRecord>) -> JobRecord {
    let pending = parts.is_empty();
    JobRecord {
        id: id.into(),
        name: "j".into(),
        owner: alice(),
        owner_cert: None,
        resources: Resources {
            vcpus: 1,
            memory_mib: 64,
            vertices: 2,
        },
        image: "host".into(),
        priority,
        submitted_ms: at,
        state: if pending {
            JobState::Pending
        } else {
            JobState::Preparing
        },
        held: false,
        parts,
        outputs: Vec::new(),
        traffic: Vec::new(),
        edges: Vec::new(),
        received: Vec::new(),
        ended: None,
        submission: pending.then(submission),
        retries: 0,
        attempt: 0,
        restarts: Vec::new(),
        checkpoint: None,
        checkpoints: Vec::new(),
        moves: Vec::new(),
        version: 0,
        log_bytes: 0,
        logs: Vec::new(),
        channels: Vec::new(),
        files: None,
        written: Vec::new(),
        written_attempt: 0,
        array: None,
        after: Vec::new(),
        after_ok: Vec::new(),
        estimate_ms: None,
        started_ms: None,
        agreement: false,
        bid: None,
    }
}

pub(super) fn part(node: PeerId, n: usize) -> PartRecord {
    PartRecord {
        bid: None,
        guest: None,
        node,
        vertices: (0..n).map(|i| format!("v{i}")).collect(),
        done: false,
    }
}

pub(super) fn end(state: JobState) -> Ended {
    Ended {
        at_ms: 9,
        error: (state != JobState::Done).then(|| "why".into()),
        kind: (state == JobState::Failed).then_some(crate::proto::ErrorKind::Trap),
    }
}

#[test]
fn a_placed_job_reserves_slots_and_holds_resources_until_it_ends() {
    let (a, b) = (PeerId::random(), PeerId::random());
    let mut s = ControlState::default();
    let j = job("j-1-1", 0, 1, vec![part(a, 3), part(b, 1)]);
    assert_eq!(s.apply(1, Command::Submit(Box::new(j))), Applied::Done);
    assert_eq!((s.reserved(&a), s.reserved(&b)), (3, 1));
    let on = |s: &ControlState, n| s.placed_on(n).map(|j| j.id.clone()).collect::<Vec<_>>();
    assert_eq!(
        (on(&s, &a), on(&s, &b)),
        (vec!["j-1-1".into()], vec!["j-1-1".into()])
    );
    assert_eq!(s.held(&alice()).vertices, 2);
    assert_eq!(
        s.apply(
            1,
            Command::Start {
                job: "j-1-1".into(),
                at_ms: 0,
            }
        ),
        Applied::Done
    );
    let done = |node| Command::PartDone {
        guest: None,
        job: "j-1-1".into(),
        node,
        attempt: 0,
        outputs: vec![("v0".into(), bytes::Bytes::from_static(b"out"))],
        traffic: vec![Traffic {
            kind: "fifo".into(),
            codec: "raw".into(),
            remote: true,
            direct: false,
            sealed: false,
            items: 5,
            bytes: 40,
        }],
        edges: vec![EdgeTraffic {
            from: format!("{node}:out"),
            to: "v0:in".into(),
            items: 5,
            bytes: 40,
        }],
        received: Vec::new(),
        at_ms: 7,
    };
    assert_eq!(s.apply(1, done(a)), Applied::Done);
    assert_eq!(
        s.apply(2, done(a)),
        Applied::Refused(CommandError::Reported {
            job: "j-1-1".into(),
            node: a
        })
    );
    assert_eq!(
        s.job(&"j-1-1".into()).expect("job").state,
        JobState::Running
    );
    // The last part's report ends the job, at the entry that carried it.
    assert_eq!(s.apply(3, done(b)), Applied::Done);
    let j = s.job(&"j-1-1".into()).expect("job");
    assert_eq!(j.traffic.len(), 1);
    assert_eq!((j.traffic[0].items, j.traffic[0].bytes), (10, 80));
    // Edges are kept one by one, each part's own.
    let edges: Vec<(&str, u64)> = j.edges.iter().map(|e| (e.from.as_str(), e.items)).collect();
    assert_eq!(edges.len(), 2, "{edges:?}");
    assert!(edges.iter().all(|&(_, n)| n == 5), "{edges:?}");
    assert_eq!((j.state, j.version), (JobState::Done, 3));
    assert_eq!(
        j.ended,
        Some(Ended {
            at_ms: 7,
            error: None,
            kind: None,
        })
    );
    assert_eq!((s.reserved(&a), s.reserved(&b)), (0, 0));
    assert_eq!(
        on(&s, &a).len() + on(&s, &b).len(),
        0,
        "an ended job is placed nowhere"
    );
    assert_eq!(s.held(&alice()), Resources::default());
    assert_eq!(s.job(&"j-1-1".into()).expect("kept").outputs.len(), 2);
    // An ended job changes no more.
    let again = s.apply(
        1,
        Command::End {
            job: "j-1-1".into(),
            state: JobState::Failed,
            ended: end(JobState::Failed),
        },
    );
    assert_eq!(
        again,
        Applied::Refused(CommandError::Ended {
            job: "j-1-1".into(),
            state: JobState::Done
        })
    );
    let Applied::Refused(why) = again else {
        unreachable!("refused above")
    };
    assert_eq!(why.to_string(), "job j-1-1 has ended (Done)");
    assert_eq!(s.job(&"j-1-1".into()).expect("kept").state, JobState::Done);
}

#[test]
fn pending_jobs_are_placed_by_priority_then_submission_time_and_held_ones_wait() {
    let mut s = ControlState::default();
    for (id, prio, at) in [
        ("low-1-0", 0, 1),
        ("high-late-1-0", 5, 3),
        ("high-1-0", 5, 2),
        ("mid-1-0", 1, 0),
    ] {
        assert_eq!(
            s.apply(1, Command::Submit(Box::new(job(id, prio, at, Vec::new())))),
            Applied::Done
        );
    }
    let order = |s: &ControlState| s.pending().map(|j| j.id.clone()).collect::<Vec<_>>();
    assert_eq!(
        order(&s),
        ["high-1-0", "high-late-1-0", "mid-1-0", "low-1-0"]
    );
    assert_eq!(
        s.apply(
            1,
            Command::Hold {
                job: "high-1-0".into(),
                held: true
            }
        ),
        Applied::Done
    );
    assert_eq!(order(&s), ["high-late-1-0", "mid-1-0", "low-1-0"]);
    assert!(matches!(
        s.apply(1, Command::Hold { job: "high-1-0".into(), held: true }),
        Applied::Refused(w) if w.to_string().contains("already held")
    ));
    assert_eq!(
        s.apply(
            1,
            Command::Hold {
                job: "high-1-0".into(),
                held: false
            }
        ),
        Applied::Done
    );
    assert_eq!(order(&s)[0], "high-1-0");
    // Placing takes a job off the queue and reserves its slots; a placed job cannot be held.
    let n = PeerId::random();
    let place = Command::Place {
        job: "high-1-0".into(),
        parts: vec![part(n, 2)],
        from_cut: None,
    };
    assert_eq!(s.apply(1, place.clone()), Applied::Done);
    assert_eq!(order(&s), ["high-late-1-0", "mid-1-0", "low-1-0"]);
    assert_eq!(s.reserved(&n), 2);
    assert!(s.job(&"high-1-0".into()).expect("job").submission.is_none());
    assert!(
        matches!(s.apply(1, place), Applied::Refused(w) if w.to_string().contains("not pending"))
    );
    assert!(matches!(
        s.apply(1, Command::Hold { job: "high-1-0".into(), held: true }),
        Applied::Refused(w) if w.to_string().contains("only a pending job")
    ));
    // A pending job cancelled leaves the queue and gives its resources back.
    assert_eq!(s.held(&alice()).vertices, 8);
    let cancel = Command::End {
        job: "low-1-0".into(),
        state: JobState::Cancelled,
        ended: end(JobState::Cancelled),
    };
    assert_eq!(s.apply(1, cancel), Applied::Done);
    assert_eq!(order(&s), ["high-late-1-0", "mid-1-0"]);
    assert_eq!(s.held(&alice()).vertices, 6);
}

#[test]
fn commands_that_do_not_fit_change_nothing() {
    let n = PeerId::random();
    let mut s = ControlState::default();
    let before = format!("{s:?}");
    for c in [
        Command::Start {
            job: "nope-1-0".into(),
            at_ms: 0,
        },
        Command::Place {
            job: "nope-1-0".into(),
            parts: vec![part(n, 1)],
            from_cut: None,
        },
        Command::Submit(Box::new(JobRecord {
            state: JobState::Done,
            ..job("x-1-0", 0, 0, vec![part(n, 1)])
        })),
        Command::Submit(Box::new(JobRecord {
            submission: None,
            ..job("y-1-0", 0, 0, Vec::new())
        })),
    ] {
        assert!(matches!(s.apply(1, c), Applied::Refused(_)));
    }
    assert_eq!(format!("{s:?}"), before);
    assert_eq!(
        s.apply(
            1,
            Command::Submit(Box::new(job("z-1-0", 0, 0, vec![part(n, 1)])))
        ),
        Applied::Done
    );
    assert!(matches!(
        s.apply(1, Command::Submit(Box::new(job("z-1-0", 0, 0, vec![part(n, 1)])))),
        Applied::Refused(w) if w.to_string().contains("exists already")
    ));
    assert!(matches!(
        s.apply(1, Command::PartDone {
            guest: None,
            job: "z-1-0".into(),
            node: PeerId::random(),
            attempt: 0,
            outputs: Vec::new(),
            traffic: Vec::new(),
            edges: Vec::new(),
            received: Vec::new(),
            at_ms: 0,
        }),
        Applied::Refused(w) if w.to_string().contains("runs no part")
    ));
    assert!(matches!(
        s.apply(1, Command::End {
            job: "z-1-0".into(),
            state: JobState::Running,
            ended: end(JobState::Failed),
        }),
        Applied::Refused(w) if w.to_string().contains("not an end")
    ));
    assert_eq!(s.reserved(&n), 1);
}

#[test]
fn the_history_keeps_the_newest_ended_jobs_and_a_failed_job_no_outputs() {
    let n = PeerId::random();
    let mut s = ControlState::default();
    for i in 0..KEEP_ENDED + 3 {
        let id = format!("j-1-{i:x}");
        let mut j = job(&id, 0, 0, vec![part(n, 1)]);
        j.outputs = vec![("v".into(), bytes::Bytes::from_static(b"x"))];
        assert_eq!(s.apply(1, Command::Submit(Box::new(j))), Applied::Done);
        let state = if i % 2 == 0 {
            JobState::Done
        } else {
            JobState::Failed
        };
        let ended = end(state);
        assert_eq!(
            s.apply(
                1,
                Command::End {
                    job: id.as_str().into(),
                    state,
                    ended
                }
            ),
            Applied::Done
        );
    }
    assert_eq!(s.jobs().count(), KEEP_ENDED);
    assert!(s.job(&"j-1-2".into()).is_none() && s.job(&"j-1-3".into()).is_some());
    assert_eq!(s.job(&"j-1-4".into()).expect("done").outputs.len(), 1);
    assert!(s.job(&"j-1-5".into()).expect("failed").outputs.is_empty());
    assert_eq!(s.reserved(&n), 0);
}

#[test]
fn the_state_survives_a_snapshot_round_trip() {
    let n = PeerId::random();
    let mut s = ControlState::default();
    s.apply(
        1,
        Command::Submit(Box::new(job("a-1-0", 0, 0, vec![part(n, 2)]))),
    );
    s.apply(1, Command::Submit(Box::new(job("b-1-0", 3, 1, Vec::new()))));
    let mut bytes = Vec::new();
    ciborium::into_writer(&s, &mut bytes).expect("encode");
    let back: ControlState = ciborium::from_reader(bytes.as_slice()).expect("decode");
    assert_eq!(format!("{back:?}"), format!("{s:?}"));
    assert_eq!(back.reserved(&n), 2);
    assert_eq!(back.pending().count(), 1);
}

#[test]
fn a_batch_applies_each_command_as_alone_in_order_and_says_what_each_gave() {
    let n = PeerId::random();
    let mut s = ControlState::default();
    let batch = Command::Batch(vec![
        Command::Submit(Box::new(job("a-1-0", 0, 0, vec![part(n, 2)]))),
        Command::Start {
            job: "a-1-0".into(),
            at_ms: 0,
        },
        Command::Start {
            job: "a-1-0".into(),
            at_ms: 0,
        },
        Command::Submit(Box::new(job("b-1-0", 0, 0, vec![part(n, 1)]))),
    ]);
    let Applied::Batch(out) = s.apply(7, batch) else {
        panic!("a batch gives a batch");
    };
    assert_eq!(out.len(), 4);
    assert_eq!(
        (&out[0], &out[1], &out[3]),
        (&Applied::Done, &Applied::Done, &Applied::Done)
    );
    assert!(matches!(&out[2], Applied::Refused(w) if w.to_string().contains("not preparing")));
    assert_eq!(
        s.job(&"a-1-0".into()).expect("a-1-0").state,
        JobState::Running
    );
    assert_eq!(
        (
            s.job(&"a-1-0".into()).expect("a-1-0").version,
            s.job(&"b-1-0".into()).expect("b-1-0").version
        ),
        (7, 7)
    );
    assert_eq!(s.reserved(&n), 3);
    let nested = s.apply(8, Command::Batch(vec![Command::Batch(Vec::new())]));
    assert!(
        matches!(nested, Applied::Batch(v) if matches!(&v[0], Applied::Batch(x) if x.is_empty()))
    );
}

#[test]
fn a_job_of_one_part_is_recorded_running_and_ended_in_one_entry() {
    let n = PeerId::random();
    let mut s = ControlState::default();
    let running = JobRecord {
        state: JobState::Running,
        ..job("a-1-0", 0, 0, vec![part(n, 2)])
    };
    let done = Command::PartDone {
        guest: None,
        job: "a-1-0".into(),
        node: n,
        attempt: 0,
        outputs: vec![("v0".into(), bytes::Bytes::from_static(b"out"))],
        traffic: Vec::new(),
        edges: Vec::new(),
        received: Vec::new(),
        at_ms: 5,
    };
    let out = s.apply(
        3,
        Command::Batch(vec![Command::Submit(Box::new(running)), done]),
    );
    assert_eq!(out, Applied::Batch(vec![Applied::Done, Applied::Done]));
    let a = s.job(&"a-1-0".into()).expect("a-1-0");
    assert_eq!(
        (a.state, a.version, a.outputs.len()),
        (JobState::Done, 3, 1)
    );
    assert_eq!(s.reserved(&n), 0, "its slots are free again");
    assert_eq!(s.held(&alice()), Resources::default());
    // Recorded while it runs, it holds its slots.
    let b = JobRecord {
        state: JobState::Running,
        ..job("b-1-0", 0, 0, vec![part(n, 2)])
    };
    assert_eq!(s.apply(4, Command::Submit(Box::new(b))), Applied::Done);
    assert_eq!(s.reserved(&n), 2);
}

#[test]
fn a_refusal_keeps_its_data_through_the_log_encoding() {
    // Applied is openraft's response type: it must encode and decode as it is.
    let node = libp2p::PeerId::random();
    let a = Applied::Batch(vec![
        Applied::Done,
        Applied::Refused(CommandError::NotAPart {
            job: "j-1-1".into(),
            node,
        }),
        Applied::Refused(CommandError::AlreadyHeld {
            job: "j-1-2".into(),
            held: false,
        }),
    ]);
    let mut bytes = Vec::new();
    ciborium::into_writer(&a, &mut bytes).expect("encodes");
    let back: Applied = ciborium::from_reader(bytes.as_slice()).expect("decodes");
    assert_eq!(back, a);
    let Applied::Batch(v) = back else {
        unreachable!("a batch")
    };
    let Applied::Refused(why) = &v[2] else {
        unreachable!("a refusal")
    };
    assert_eq!(why.to_string(), "job j-1-2 is already not held");
}

#[test]
fn a_jobs_log_lines_are_kept_in_order_once_each_within_its_bound_also_after_its_end() {
    use mvm_component::runtime::logs::{LogLine, LogStream};
    let n = PeerId::random();
    let mut s = ControlState::default();
    let j = JobRecord {
        state: JobState::Running,
        // A bound of two lines of 66 bytes (34 + 32 each): a third does not fit.
        log_bytes: 140,
        ..job("a-1-0", 0, 0, vec![part(n, 2)])
    };
    assert_eq!(s.apply(1, Command::Submit(Box::new(j))), Applied::Done);
    let line = |vertex: &str, seq: u64| LogLine {
        vertex: vertex.into(),
        seq,
        at_ms: 10 + seq,
        stream: LogStream::Stderr,
        text: format!("{vertex} line {seq:027}"),
    };
    let logs = |attempt, lines| Command::Logs {
        job: "a-1-0".into(),
        attempt,
        lines,
    };
    assert_eq!(
        s.apply(2, logs(0, vec![line("p", 0), line("q", 0)])),
        Applied::Done
    );
    // Logs do not wake those who wait for the job to change.
    assert_eq!(s.job(&"a-1-0".into()).expect("job").version, 1);
    // A late shipment, a repeated one, and the newest beyond the bound.
    assert_eq!(
        s.apply(3, logs(0, vec![line("p", 2), line("p", 0)])),
        Applied::Done
    );
    assert_eq!(s.apply(4, logs(0, vec![line("p", 1)])), Applied::Done);
    let kept = |s: &ControlState, v: &str| -> Vec<u64> {
        let j = s.job(&"a-1-0".into()).expect("job");
        let vl = j.logs.iter().find(|l| l.vertex == v).expect("vertex");
        vl.lines.iter().map(|l| l.seq).collect()
    };
    assert_eq!(
        kept(&s, "p"),
        vec![1, 2],
        "in order, once each, the newest two"
    );
    assert_eq!(kept(&s, "q"), vec![0]);
    // A run not begun yet is refused; after the job's end, lines are still taken.
    assert!(matches!(
        s.apply(5, logs(1, vec![line("p", 3)])),
        Applied::Refused(CommandError::OtherRun { .. })
    ));
    let end = Command::End {
        job: "a-1-0".into(),
        state: JobState::Failed,
        ended: Ended::failed(crate::proto::ErrorKind::Trap, "trap".into()),
    };
    assert_eq!(s.apply(6, end), Applied::Done);
    assert_eq!(s.apply(7, logs(0, vec![line("q", 1)])), Applied::Done);
    assert_eq!(kept(&s, "q"), vec![0, 1]);
}

#[path = "state_tests_runs.rs"]
mod runs;
