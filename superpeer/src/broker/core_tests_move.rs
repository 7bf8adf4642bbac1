//! Moves of a running part, step by step, with the nodes' answers given by hand: the order of
//! the steps, a move given up before the links change (nothing changes), one that completes
//! (recorded, the new node's report taken after it), and how cuts are numbered after them.

use bytes::Bytes;
use libp2p::PeerId;
use tokio::sync::oneshot;

use super::{Bench, bench, jobs, reply_now, sends, submitted};
use crate::broker::core::{Effect, Input, Then};
use crate::broker::migrate::Which;
use crate::proto::{
    BrokerRequest, CheckpointPolicy, Failure, FailureKind, FileSpec, Hash, JobId, JobState,
    MoveStep, PartReport, PartResult, Response,
};

/// A ring of 8 that asks for checkpoints, running as two parts of 4 on two of three nodes of
/// 4 slots: its id, its parts' nodes, the third node, and a vertex of its second part.
async fn running(b: &mut Bench) -> (JobId, Vec<PeerId>, PeerId, String) {
    running_with(b, None).await
}

/// As [`running`], the job with `files`.
async fn running_with(
    b: &mut Bench,
    files: Option<FileSpec>,
) -> (JobId, Vec<PeerId>, PeerId, String) {
    let nodes = [b.node("n0", 4), b.node("n1", 4), b.node("n2", 4)];
    let mut job = jobs::ring("moving", 1000, Some(2), 0);
    job.submission.checkpoint = Some(CheckpointPolicy {
        interval_ms: 600_000,
        keep: 2,
    });
    job.submission.files = files;
    let (effects, mut rx) = b.submit(&job);
    let effects = reply_now(b.settle(effects).await);
    let id = submitted(&mut rx).job;
    let started = super::all_prepared(b, effects);
    let _ = b.settle(started).await;
    assert_eq!(b.state(&id).map(|s| s.0), Some(JobState::Running));
    let (on, vertex) = b.log.read(|s| {
        let j = s.job(&id).expect("recorded");
        let on: Vec<PeerId> = j.parts.iter().map(|p| p.node).collect();
        (on, j.parts[1].vertices[0].clone())
    });
    assert_eq!(on.len(), 2, "two parts");
    let free = nodes
        .into_iter()
        .find(|n| !on.contains(n))
        .expect("a third node");
    (id, on, free, vertex)
}

fn migrate(
    b: &mut Bench,
    job: &JobId,
    vertex: &str,
    to: &str,
) -> (Vec<Effect>, oneshot::Receiver<Response>) {
    let (reply, rx) = oneshot::channel();
    let effects = b.on(Input::Migrate {
        reply,
        job: job.clone(),
        which: Which::Vertex(vertex.to_owned()),
        to: to.to_owned(),
    });
    (effects, rx)
}

fn answer(
    b: &mut Bench,
    peer: PeerId,
    then: Then,
    answer: Result<Response, Failure>,
) -> Vec<Effect> {
    b.on(Input::Answered { then, peer, answer })
}

/// The steps asked: to whom, which, with what for.
fn steps(effects: Vec<Effect>) -> Vec<(PeerId, MoveStep, Then)> {
    sends(effects)
        .into_iter()
        .filter_map(|(peer, r, then)| match r {
            BrokerRequest::Move { step, .. } => Some((peer, step, then)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_move_given_up_before_the_links_change_changes_nothing_and_one_that_completes_is_recorded()
 {
    let mut b = bench().await;
    let (id, on, free, vertex) = running(&mut b).await;
    let (from, stays) = (on[1], on[0]);

    // Refused at once: a node that holds a part already, and a vertex that is not there.
    let holder = b.core.members.name(&stays).expect("named").to_owned();
    let (effects, mut rx) = migrate(&mut b, &id, &vertex, &holder);
    reply_now(effects);
    assert!(matches!(rx.try_recv(), Ok(Response::Error(f)) if f.message.contains("runs a part")));
    let to = b.core.members.name(&free).expect("named").to_owned();
    let (effects, mut rx) = migrate(&mut b, &id, "nope", &to);
    reply_now(effects);
    assert!(matches!(rx.try_recv(), Ok(Response::Error(f)) if f.kind == FailureKind::NotFound));

    // Step 1: the part's node saves it; the other part's node holds its links with it.
    let (effects, mut rx) = migrate(&mut b, &id, &vertex, &to);
    let mut asked = steps(effects);
    asked.sort_by_key(|(p, _, _)| *p != from);
    assert_eq!(
        asked.len(),
        2,
        "{:?}",
        asked.iter().map(|a| &a.1).collect::<Vec<_>>()
    );
    let (leave, hold) = (asked.remove(0), asked.remove(0));
    let MoveStep::Leave { cut, .. } = leave.1 else {
        panic!("the part's node is asked to leave: {:?}", leave.1)
    };
    assert_eq!(leave.0, from);
    assert!(matches!(hold.1, MoveStep::Hold { cut: c, peer, .. } if c == cut && peer == from));
    assert_eq!(hold.0, stays);
    // A checkpoint waits for the move.
    let (reply, mut ck) = oneshot::channel();
    reply_now(b.on(Input::Checkpoint {
        reply,
        job: id.clone(),
    }));
    assert!(matches!(ck.try_recv(), Ok(Response::Error(f)) if f.message.contains("moving")));

    // The leaving node fails: the move is given up, both nodes are told to go on, and nothing
    // changes. The other node's late answer changes nothing either.
    let failed = Err(Failure::new(
        FailureKind::Failed,
        "vertices reached no pause point",
    ));
    let effects = answer(&mut b, from, leave.2, failed);
    let effects = reply_now(effects);
    assert!(
        matches!(rx.try_recv(), Ok(Response::Error(f)) if f.message.contains("no pause point"))
    );
    let mut stay: Vec<PeerId> = steps(effects)
        .into_iter()
        .filter(|(_, s, _)| matches!(s, MoveStep::Stay))
        .map(|(p, _, _)| p)
        .collect();
    stay.sort();
    let mut both = vec![from, stays];
    both.sort();
    assert_eq!(stay, both);
    assert!(answer(&mut b, stays, hold.2, Ok(Response::Ok)).is_empty());
    let parts = b.log.read(|s| {
        s.job(&id)
            .map(|j| j.parts.iter().map(|p| p.node).collect::<Vec<_>>())
    });
    assert_eq!(parts, Some(on.clone()));

    // Again, to the end. Its cut comes after the one given up.
    let (effects, mut rx) = migrate(&mut b, &id, &vertex, &to);
    let mut asked = steps(effects);
    asked.sort_by_key(|(p, _, _)| *p != from);
    let (leave, hold) = (asked.remove(0), asked.remove(0));
    let MoveStep::Leave { cut: cut2, .. } = leave.1 else {
        panic!("leave")
    };
    assert!(cut2 > cut, "cut {cut2} after {cut}");
    let blob = Bytes::from_static(b"the part's image");
    let hash = Hash::of(&blob);
    let image = Ok(Response::Checkpoint {
        hash,
        blob,
        files: None,
    });
    assert!(
        answer(&mut b, from, leave.2, image).is_empty(),
        "the hold is awaited"
    );
    // Step 2: the new node prepares the part from its image, held here for it to fetch.
    let prepare = sends(answer(&mut b, stays, hold.2, Ok(Response::Ok)));
    let [(peer, BrokerRequest::Prepare(spec), then)] = &prepare[..] else {
        panic!("one prepare")
    };
    assert_eq!(*peer, free);
    assert_eq!(
        (spec.restore, spec.start, spec.here, spec.attempt),
        (Some(hash), false, 1, 0)
    );
    assert_eq!(spec.parts[1].peer, free);
    assert_eq!(spec.parts[0].peer, stays);
    assert!(b.core.blobs.get(&hash).is_some());
    let then = match then {
        Then::MoveStep { job, cut, then } => Then::MoveStep {
            job: job.clone(),
            cut: *cut,
            then: *then,
        },
        _ => panic!("a move's step"),
    };
    // Step 3: the other node links to the new one.
    let relink = steps(answer(&mut b, free, then, Ok(Response::Ok)));
    let [
        (
            peer,
            MoveStep::Relink {
                peer: left,
                to: new,
                ..
            },
            _,
        ),
    ] = &relink[..]
    else {
        panic!("one relink")
    };
    assert_eq!((*peer, *left, *new), (stays, from, free));
    let then = relink.into_iter().next().map(|r| r.2).expect("then");
    // Step 4: the new node starts the part; the old one ends its copy.
    let mut started = sends(answer(&mut b, stays, then, Ok(Response::Ok)));
    started.sort_by_key(|(p, _, _)| *p != free);
    assert_eq!(started.len(), 2, "a start and a termination");
    let (ended, start) = (started.pop().expect("two"), started.pop().expect("two"));
    assert!(matches!(start.1, BrokerRequest::Start { .. }) && start.0 == free);
    assert!(matches!(ended.1, BrokerRequest::Terminate { .. }) && ended.0 == from);
    // The new part ends before the move is recorded: its report waits.
    let (reply, mut report) = oneshot::channel();
    let early = b.on(Input::Report {
        reply,
        peer: free,
        report: Box::new(PartReport {
            job: id.clone(),
            attempt: 0,
            outcome: Ok(PartResult::default()),
            logs: Vec::new(),
        }),
    });
    assert!(early.is_empty(), "it waits for the move");
    // Step 5: once both answered (the old node's failure does not matter), recorded; the
    // asker gets the move, and the report is taken.
    assert!(answer(&mut b, free, start.2, Ok(Response::Ok)).is_empty());
    let gone = Err(Failure::new(FailureKind::Unavailable, "node gone"));
    let effects = answer(&mut b, from, ended.2, gone);
    let effects = reply_now(b.settle(effects).await);
    let Ok(Response::Moved(moves)) = rx.try_recv() else {
        panic!("the move answered")
    };
    assert_eq!(moves.len(), 1);
    assert_eq!(
        (moves[0].from, moves[0].to, moves[0].cut),
        (from, free, cut2)
    );
    assert!(
        matches!(report.try_recv(), Ok(Response::Ok)),
        "{}",
        effects.len()
    );
    let (nodes, done, logged) = b.log.read(|s| {
        let j = s.job(&id).expect("job");
        (
            j.parts.iter().map(|p| p.node).collect::<Vec<_>>(),
            j.parts[1].done,
            j.moves.len(),
        )
    });
    assert_eq!(nodes, vec![stays, free]);
    assert!(done, "the new node's report counts for the part");
    assert_eq!(logged, 1);
    assert_eq!(
        b.log.read(|s| (s.reserved(&from), s.reserved(&free))),
        (0, 4)
    );
    // The move's blob is not kept: no checkpoint refers to it.
    assert!(b.core.blobs.get(&hash).is_none());
}

/// A cut of a job with files is given as long as its parts' sandboxes may take to go up (after
/// the usual 20 s: 30 s, then the least rate a transfer keeps), and its nodes are told so:
/// parts that answer 30 s after it was asked are taken, where a job without files gives the
/// same cut up. A move's leaving part is given as long for its own sandboxes, and the parts
/// that hold their links with it are told too.
#[tokio::test]
async fn a_cut_of_a_job_with_files_waits_as_long_as_its_files_may_take_to_go_up() {
    let files = FileSpec {
        inputs: Vec::new(),
        outputs: vec!["out/*".into()],
        output_bytes: 256 << 20,
    };
    for files in [None, Some(files)] {
        let mut b = bench().await;
        let (id, on, free, vertex) = running_with(&mut b, files.clone()).await;
        let (reply, mut ck) = oneshot::channel();
        let asked: Vec<_> = sends(b.on(Input::Checkpoint {
            reply,
            job: id.clone(),
        }))
        .into_iter()
        .filter_map(|(peer, r, then)| match r {
            BrokerRequest::Checkpoint { within_ms, .. } => Some((peer, within_ms, then)),
            _ => None,
        })
        .collect();
        assert_eq!(asked.len(), 2, "both parts are asked");
        // 8 vertices of at most 256 MiB each, at 1 MiB/s: 2,048 s after the first 20 + 30 s.
        let within = files.as_ref().map(|_| (20 + 30 + 8 * 256) * 1000);
        for (_, w, _) in &asked {
            assert_eq!(*w, within);
        }
        let later = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut effects = Vec::new();
        for (peer, _, then) in asked {
            let blob = Bytes::from(format!("the part on {peer}"));
            let answer = Ok(Response::Checkpoint {
                hash: Hash::of(&blob),
                blob,
                files: files.as_ref().map(|_| Vec::new()),
            });
            effects.extend(b.core.on(later, Input::Answered { then, peer, answer }));
        }
        reply_now(b.settle(effects).await);
        let answer = ck.try_recv().expect("the cut is answered");
        let cuts = b
            .log
            .read(|s| s.job(&id).map_or(0, |j| j.checkpoints.len()));
        if files.is_some() {
            assert!(matches!(answer, Response::Ok), "{answer:?}");
            assert_eq!(cuts, 1, "recorded");
        } else {
            assert!(
                matches!(&answer, Response::Error(f) if f.message.contains("within 20s")),
                "{answer:?}"
            );
            assert_eq!(cuts, 0, "given up");
        }
        // A move: the leaving part's 4 vertices, 1,024 s after the first 20 + 30 s.
        let to = b.core.members.name(&free).expect("named").to_owned();
        let (effects, _rx) = migrate(&mut b, &id, &vertex, &to);
        let given: Vec<_> = steps(effects)
            .into_iter()
            .map(|(p, s, _)| match s {
                MoveStep::Leave { within_ms, .. } | MoveStep::Hold { within_ms, .. } => {
                    (p, within_ms)
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(given.len(), 2, "a leave and a hold");
        for (p, within) in given {
            assert!(on.contains(&p));
            assert_eq!(within, files.as_ref().map(|_| (20 + 30 + 4 * 256) * 1000));
        }
    }
}
