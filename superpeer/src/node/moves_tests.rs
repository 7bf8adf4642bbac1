//! The parts machine's side of a move, by hand: a part that can pause (its module made
//! pausable for real), with link ends to two other nodes, takes each step in its turn, refuses
//! the others, and hands its links over to the new node.

use std::time::Duration;

use bytes::Bytes;
use mvm_queue::queue::{Config as QueueConfig, Queue};
use mvm_queue::remote::{Drain, Hold};

use super::*;
use crate::node::parts::{InputKey, Marks, Relinked};
use crate::proto::MoveStep;

/// Yields forever.
const YIELDING: &[u8] = br#"(module
  (import "mvm" "yield" (func $yield))
  (memory (export "memory") 1)
  (func (export "_start") (loop $l (call $yield) (br $l))))"#;

impl Bench {
    /// Starts run 0 of `job`, as its broker asks; what the parts machine does (its answer's
    /// receiver is dropped).
    fn start(&mut self, broker: PeerId, job: &str) -> Vec<Effect> {
        let (reply, _rx) = asked();
        self.parts.on(Input::Start {
            from: broker,
            superpeer: true,
            job: job.into(),
            attempt: 0,
            reply,
        })
    }

    /// A part of `job` prepared to pause: one vertex, an output to `left` and inputs from
    /// `left` and `other` (link ends only: nothing runs).
    fn pausable(&self, job: &str, left: PeerId, other: PeerId) -> Box<Ready> {
        let prepared = self.one_vertex(job, YIELDING, true);
        let control = prepared.control().expect("pausable");
        let key = |port: &str, peer| ("w".to_owned(), port.to_owned(), peer);
        Box::new(Ready {
            prepared: crate::node::parts::Body::Here(prepared),
            parts: vec![(PeerId::random(), Vec::new())],
            inputs: HashMap::new(),
            expected_links: 3,
            vertices: 1,
            env: None,
            marks: Some(Marks {
                control: crate::node::part::Control::Here(control),
                holds: vec![(key("in", left), Hold::new())],
                drains: vec![
                    (key("a", left), Drain::new()),
                    (key("b", other), Drain::new()),
                ],
            }),
            sandbox: None,
        })
    }
}

fn step(b: &mut Bench, step: MoveStep) -> (Vec<Effect>, oneshot::Receiver<Response>) {
    let (reply, rx) = asked();
    let out = b.parts.on(Input::Move {
        from: PeerId::random(),
        job: "j-1-1".into(),
        attempt: 0,
        step,
        reply,
    });
    (out, rx)
}

/// The answer among `out`, sent and read.
fn said(out: Vec<Effect>, mut rx: oneshot::Receiver<Response>) -> Response {
    answer(out);
    rx.try_recv().expect("answered")
}

#[tokio::test]
async fn a_part_takes_each_step_of_a_move_in_its_turn_and_hands_its_links_to_the_new_node() {
    let mut b = bench();
    let broker = PeerId::random();
    let (left, other, new) = (PeerId::random(), PeerId::random(), PeerId::random());
    let job = "j-1-1";
    drop(b.prepare(broker, job, false));
    let ready = b.pausable(job, left, other);
    answer(b.parts.on(Input::Prepared {
        job: job.into(),
        attempt: 0,
        ready: Ok(ready),
    }));
    // The leaving part's files are given 100 s to go up: the links are held as long as that,
    // and as long again for the new node to fetch them, each 10 s more, after the usual 60 s.
    let hold = |peer| MoveStep::Hold {
        cut: 1,
        peer,
        within_ms: Some(100_000),
    };
    // Not running yet: no step.
    let (out, rx) = step(&mut b, hold(left));
    assert!(matches!(said(out, rx), Response::Error(f) if f.kind == FailureKind::Unavailable));
    let out = b.start(broker, job);
    assert!(kinds(&out).contains(&"run"));

    // Links are handed over only once held.
    let relink = MoveStep::Relink {
        peer: left,
        to: new,
        addrs: Vec::new(),
    };
    let (out, rx) = step(&mut b, relink.clone());
    assert!(matches!(said(out, rx), Response::Error(f) if f.message.contains("not held")));
    // Held: only the link ends with the node whose part leaves.
    let (out, _rx) = step(&mut b, hold(left));
    let [
        Effect::HoldLinks {
            holds, drains, cut, ..
        },
        Effect::MoveWait { wait, .. },
    ] = &out[..]
    else {
        panic!("{:?}", kinds(&out))
    };
    assert_eq!((holds.len(), drains.len(), *cut), (1, 1, 1));
    assert_eq!(*wait, Duration::from_secs(60 + 2 * 110));
    // One move at a time.
    let (out, rx) = step(
        &mut b,
        MoveStep::Leave {
            cut: 2,
            within_ms: None,
        },
    );
    assert!(matches!(said(out, rx), Response::Error(f) if f.message.contains("under way")));
    let (out, rx) = step(&mut b, relink);
    let [Effect::Relink(r)] = &out[..] else {
        panic!("{:?}", kinds(&out))
    };
    assert_eq!(
        r.outs.iter().map(|o| &o.0).collect::<Vec<_>>(),
        [&("w".to_owned(), "in".to_owned(), left)]
    );
    assert_eq!(
        r.ins.iter().map(|i| &i.0).collect::<Vec<_>>(),
        [&("w".to_owned(), "a".to_owned(), left)]
    );
    assert_eq!(r.to, new);
    // The loop made the new links: the part's marks and inputs now name the new node.
    let queue: Queue<Bytes> = Queue::new("w:a", QueueConfig::default()).expect("queue");
    let (reply, task) = {
        let Some(Effect::Relink(r)) = out.into_iter().next() else {
            unreachable!()
        };
        (r.reply, tokio::spawn(std::future::pending::<()>()))
    };
    let new_in: InputKey = ("w".to_owned(), "a".to_owned(), new);
    let new_out: InputKey = ("w".to_owned(), "in".to_owned(), new);
    let first = vec![mvm_queue::queue::Entry::new(
        Bytes::from_static(b"past its room"),
        0,
    )];
    answer(b.parts.on(Input::Relinked(Box::new(Relinked {
        job: job.into(),
        attempt: 0,
        from: left,
        ins: vec![(new_in.clone(), queue.sender(), first)],
        outs: vec![(new_out.clone(), Hold::new(), task.abort_handle())],
        reply,
    }))));
    assert!(matches!(rx.await, Ok(Response::Ok)));
    let part = b.parts.parts.get(&job.into()).expect("held");
    let marks = part.marks.as_ref().expect("marks");
    let keys: Vec<&InputKey> = marks.holds.iter().map(|(k, _)| k).collect();
    assert_eq!(keys, [&new_out]);
    let mut keys: Vec<&InputKey> = marks.drains.iter().map(|(k, _)| k).collect();
    keys.sort();
    let other_in = ("w".to_owned(), "b".to_owned(), other);
    let mut want = vec![&new_in, &other_in];
    want.sort();
    assert_eq!(
        keys, want,
        "the new input drained at the next cut; the other kept"
    );
    assert!(
        part.inputs.contains_key(&new_in),
        "a stream from the new node is expected"
    );
    assert_eq!(part.relinked.get(&new_in).map(Vec::len), Some(1));
    assert!(part.outlets.contains_key(&new_out));
    // Its stream takes the items to give first, and a stream only.
    let (reply, taken) = oneshot::channel();
    answer(b.parts.on(Input::Inbound {
        job: job.into(),
        attempt: 0,
        key: new_in,
        reply,
    }));
    let (_, _, _, first) = taken.await.expect("answered").expect("taken");
    assert_eq!(first.map(|f| f.len()), Some(1));

    // Moved: the move's wait running out changes nothing.
    let over = |b: &mut Bench| {
        b.parts.on(Input::MoveOver {
            job: job.into(),
            attempt: 0,
        })
    };
    assert!(over(&mut b).is_empty());
    // A move given up lets the held ends go.
    let (out, _rx) = step(&mut b, hold(other));
    assert_eq!(kinds(&out), ["hold links", "move wait"]);
    let (out, rx) = step(&mut b, MoveStep::Stay);
    assert_eq!(kinds(&out), ["release", "reply"]);
    assert!(matches!(said(out, rx), Response::Ok));
    let (out, rx) = step(&mut b, MoveStep::Stay);
    assert_eq!(kinds(&out), ["reply"], "nothing to give up");
    drop(rx);
    // A move whose broker goes quiet while the links are held: when the wait runs out, the
    // part reports itself lost (its job runs again) and goes.
    let (out, _rx) = step(&mut b, hold(other));
    assert_eq!(kinds(&out), ["hold links", "move wait"]);
    let out = over(&mut b);
    assert_eq!(kinds(&out), ["stop", "report"]);
    let Some(Effect::Report { report, .. }) = out.into_iter().nth(1) else {
        unreachable!()
    };
    assert!(
        matches!(&report.outcome, Err(f) if f.kind == crate::proto::ErrorKind::Lost),
        "{report:?}"
    );
    assert!(b.parts.parts.is_empty());
    task.abort();
}

/// A cut asked of a part prepared but not started yet (the broker sent its `Start` first, but
/// the two crossed on the way) waits for the `Start`, and is taken as the part starts; a later
/// cut overtakes an earlier one that waits. The part's sending ends are held longer than the
/// broker says it waits for the cut, and never less than the usual 30 s.
#[test]
fn a_cut_that_comes_before_its_parts_start_waits_for_it() {
    let mut b = bench();
    let broker = PeerId::random();
    let job = "c-1-0";
    drop(b.prepare(broker, job, false));
    let ready = b.pausable(job, PeerId::random(), PeerId::random());
    let out = b.parts.on(Input::Prepared {
        job: job.into(),
        attempt: 0,
        ready: Ok(ready),
    });
    assert_eq!(kinds(&out), ["reply"]);
    answer(out);
    let cut = |b: &mut Bench, cut: u64, within: Option<u64>| {
        let (reply, rx) = asked();
        let out = b.parts.on(Input::Checkpoint {
            from: PeerId::random(),
            job: job.into(),
            attempt: 0,
            cut,
            within_ms: within.map(|s| s * 1000),
            reply,
        });
        (out, rx)
    };
    let held = |out: &[Effect]| {
        out.iter().find_map(|e| match e {
            Effect::Checkpoint { cut, hold, .. } => Some((*cut, hold.as_secs())),
            _ => None,
        })
    };
    let (out, mut first) = cut(&mut b, 1, None);
    assert!(out.is_empty(), "it waits for the start");
    let (out, _second) = cut(&mut b, 2, Some(100));
    assert_eq!(kinds(&out), ["reply"]);
    answer(out);
    assert!(
        matches!(first.try_recv(), Ok(Response::Error(f)) if f.message.contains("overtaken")),
        "the first is given up"
    );
    let out = b.start(broker, job);
    assert_eq!(kinds(&out), ["run", "checkpoint", "reply"]);
    assert_eq!(held(&out), Some((2, 110)), "the waiting cut is taken");
    for (within, hold) in [(None, 30), (Some(5), 30), (Some(3600), 3610)] {
        let (out, _rx) = cut(&mut b, 3, within);
        assert_eq!(held(&out), Some((3, hold)), "{within:?}");
    }
}
