//! The parts machine on its own: requests and outcomes given by hand, effects looked at. A
//! part is prepared by a real runtime (one vertex that returns at once), but nothing runs.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use libp2p::PeerId;
use mvm_component::policy::{Principal, PrincipalKind};
use mvm_component::runtime::{AllowAll, JobSpec, Limits, Runtime, RuntimeConfig};
use mvm_component::topology::{Options, Topology};
use mvm_queue::Controller;
use mvm_queue::codec::Registry;
use mvm_queue::controller::Limits as QueueLimits;
use tokio::sync::oneshot;

use super::{Effect, Held, Input, Parts, Ready, Reply};
use crate::proto::{
    Failure, FailureKind, PartReport, PartResult, PartSpec, Response, VertexFailure,
};

struct Bench {
    parts: Parts,
    held: Arc<Held>,
    runtime: Runtime,
    queues: Controller,
}

fn bench() -> Bench {
    let held = Arc::new(Held::default());
    Bench {
        parts: Parts::new(held.clone()),
        held,
        runtime: Runtime::new(&RuntimeConfig::default()).expect("runtime"),
        queues: Controller::new(QueueLimits::default(), Arc::new(Registry::new())),
    }
}

fn spec(job: &str, start: bool) -> Box<PartSpec> {
    Box::new(PartSpec {
        job: job.into(),
        topology_file: "one.dot".into(),
        topology: "digraph one { v [component=\"c\"]; }\n".into(),
        queue: Default::default(),
        components: BTreeMap::new(),
        parameters: BTreeMap::new(),
        limits: Default::default(),
        placement: vec![0],
        parts: Vec::new(),
        here: 0,
        start,
        environment: None,
        owner: Principal {
            kind: PrincipalKind::User,
            name: "alice".into(),
            domain: "default".into(),
            roles: Vec::new(),
        },
        policy_digest: crate::proto::Hash::of(b""),
        attempt: 0,
        checkpoint: false,
        restore: None,
        restore_files: None,
        streams: false,
        files: None,
        image_from: Vec::new(),
        files_from: Vec::new(),
    })
}

fn asked() -> (Reply, oneshot::Receiver<Response>) {
    oneshot::channel()
}

impl Bench {
    /// A part of `job` prepared: one vertex whose module returns at once.
    fn ready(&self, job: &str) -> Box<Ready> {
        let prepared = self.one_vertex(job, br#"(module (func (export "run")))"#, false);
        Box::new(Ready {
            prepared: super::Body::Here(prepared),
            parts: vec![(PeerId::random(), Vec::new())],
            inputs: HashMap::new(),
            expected_links: 0,
            vertices: 1,
            env: None,
            marks: None,
            sandbox: None,
        })
    }

    /// One vertex `v` of `job` running `module` (made pausable if `pausable`), prepared.
    fn one_vertex(
        &self,
        job: &str,
        module: &[u8],
        pausable: bool,
    ) -> mvm_component::runtime::Prepared {
        let topology = Topology::parse_named(
            "one.dot",
            "digraph one { v [component=\"c\"]; }\n",
            &Options {
                codecs: self.queues.codecs(),
                queue_defaults: Default::default(),
            },
        )
        .expect("topology");
        let cache = self.runtime.cache();
        let loaded = if pausable {
            cache.load_checkpointable("c", module)
        } else {
            cache.load("c", module)
        };
        let (module, _, _) = loaded.expect("module");
        let spec = JobSpec {
            id: job.into(),
            topology: &topology,
            modules: HashMap::from([("c".to_owned(), module)]),
            params: BTreeMap::new(),
            limits: Limits::default(),
            owner: None,
            sandboxes: Default::default(),
        };
        self.runtime
            .prepare(&spec, &self.queues, &AllowAll, &[0], 0)
            .expect("prepared")
    }

    /// The preparation of `job` ends with a real part ready.
    fn prepared(&mut self, job: &str) -> Vec<Effect> {
        let ready = self.ready(job);
        self.parts.on(Input::Prepared {
            job: job.into(),
            attempt: 0,
            ready: Ok(ready),
        })
    }

    /// Prepares `job` for `from`; the answer's receiver.
    fn prepare(&mut self, from: PeerId, job: &str, start: bool) -> oneshot::Receiver<Response> {
        let (reply, rx) = asked();
        let out = self.parts.on(Input::Prepare {
            from,
            spec: spec(job, start),
            reply,
        });
        assert!(
            matches!(&out[..], [Effect::Prepare { spec, .. }] if spec.job == job),
            "the preparation goes off the loop"
        );
        rx
    }
}

/// `from` (a super-peer of the group, if `superpeer`) ends job `j` for `reason`.
fn terminate(from: PeerId, superpeer: bool, reason: &str, reply: Reply) -> Input {
    Input::Terminate {
        from,
        superpeer,
        job: "j-1-1".into(),
        attempt: 0,
        reason: reason.into(),
        reply,
    }
}

/// What `out` does, in short.
fn kinds(out: &[Effect]) -> Vec<&'static str> {
    out.iter()
        .map(|e| match e {
            Effect::Reply(..) => "reply",
            Effect::Prepare { .. } => "prepare",
            Effect::Run { .. } => "run",
            Effect::Hold { .. } => "hold",
            Effect::Stop { .. } => "stop",
            Effect::Abort(_) => "abort",
            Effect::Epilog { .. } => "epilog",
            Effect::Report { .. } => "report",
            Effect::Checkpoint { .. } => "checkpoint",
            Effect::Leave { .. } => "leave",
            Effect::HoldLinks { .. } => "hold links",
            Effect::Release { .. } => "release",
            Effect::Relink(_) => "relink",
            Effect::MoveWait { .. } => "move wait",
        })
        .collect()
}

/// Sends the answers among `out`.
fn answer(out: Vec<Effect>) {
    for e in out {
        if let Effect::Reply(reply, r) = e {
            let _ = reply.send(r);
        }
    }
}

fn report(job: &str, ok: bool) -> PartReport {
    PartReport {
        job: job.into(),
        attempt: 0,
        outcome: if ok {
            Ok(PartResult::default())
        } else {
            Err(VertexFailure {
                vertex: "v".into(),
                cause: "trap".into(),
                kind: mvm_component::runtime::ErrorKind::Trap,
            })
        },
        logs: Vec::new(),
    }
}

#[test]
fn a_part_started_with_its_prepare_answers_with_its_report_within_the_hold() {
    let mut b = bench();
    let broker = PeerId::random();
    let mut rx = b.prepare(broker, "j-1-1", true);
    assert_eq!(b.held.jobs(), ["j-1-1"], "held from its prepare on");
    let out = b.prepared("j-1-1");
    assert_eq!(kinds(&out), ["run", "hold"], "no answer before the hold");
    assert_eq!(b.held.vertices(), 1);
    let out = b.parts.on(Input::Ended {
        report: report("j-1-1", true),
    });
    assert_eq!(kinds(&out), ["stop", "reply"], "a part done goes at once");
    answer(out);
    assert!(matches!(rx.try_recv(), Ok(Response::Finished(r)) if r.job == "j-1-1"));
    assert!(b.held.jobs().is_empty());
    // The hold's end finds nothing left to answer.
    assert!(
        b.parts
            .on(Input::HoldOver {
                job: "j-1-1".into(),
                attempt: 0,
            })
            .is_empty()
    );
}

#[test]
fn a_part_still_running_when_the_hold_is_over_reports_by_itself_and_a_failed_one_stays() {
    let mut b = bench();
    let broker = PeerId::random();
    let mut rx = b.prepare(broker, "j-1-1", true);
    b.prepared("j-1-1");
    let out = b.parts.on(Input::HoldOver {
        job: "j-1-1".into(),
        attempt: 0,
    });
    assert_eq!(kinds(&out), ["reply"]);
    answer(out);
    assert!(matches!(rx.try_recv(), Ok(Response::Ok)));
    let out = b.parts.on(Input::Ended {
        report: report("j-1-1", false),
    });
    let [Effect::Report { broker: to, report }] = &out[..] else {
        panic!("the report goes to the leader: {:?}", kinds(&out));
    };
    assert_eq!(*to, broker);
    assert!(report.outcome.is_err());
    assert_eq!(
        b.held.jobs(),
        ["j-1-1"],
        "a failed part waits for the broker's end"
    );
    // Only its broker, or a super-peer of the group, may end it.
    let stranger = PeerId::random();
    let (reply, mut rx) = asked();
    answer(b.parts.on(terminate(stranger, false, "cancel", reply)));
    assert!(matches!(rx.try_recv(), Ok(Response::Error(f)) if f.kind == FailureKind::Refused));
    let (reply, mut rx) = asked();
    let out = b.parts.on(terminate(stranger, true, "cancel", reply));
    assert_eq!(kinds(&out), ["stop", "reply"]);
    answer(out);
    assert!(matches!(rx.try_recv(), Ok(Response::Ok)));
    assert!(b.held.jobs().is_empty());
}

#[test]
fn a_part_ended_while_being_prepared_is_answered_and_what_its_preparation_made_goes() {
    let mut b = bench();
    let broker = PeerId::random();
    let mut prepare = b.prepare(broker, "j-1-1", false);
    // A second prepare of the same job is refused while the first is under way.
    let (reply, mut again) = asked();
    answer(b.parts.on(Input::Prepare {
        from: broker,
        spec: spec("j-1-1", false),
        reply,
    }));
    assert!(
        matches!(again.try_recv(), Ok(Response::Error(f)) if f.message.contains("already here"))
    );
    let (reply, mut ended) = asked();
    let out = b.parts.on(terminate(broker, false, "cancelled", reply));
    assert_eq!(kinds(&out), ["reply", "stop", "reply"]);
    answer(out);
    assert!(
        matches!(prepare.try_recv(), Ok(Response::Error(f)) if f.message.contains("cancelled"))
    );
    assert!(matches!(ended.try_recv(), Ok(Response::Ok)));
    // Its preparation ends after all: what it made goes (its queues; its guest with it), and
    // nothing starts.
    let out = b.prepared("j-1-1");
    assert_eq!(kinds(&out), ["stop"]);
}

#[test]
fn a_refused_preparation_answers_with_the_refusal_and_a_start_needs_a_prepared_part() {
    let mut b = bench();
    let broker = PeerId::random();
    let mut rx = b.prepare(broker, "j-1-1", false);
    let refusal = Failure::new(FailureKind::Refused, "refused by the node-level policy");
    let out = b.parts.on(Input::Prepared {
        job: "j-1-1".into(),
        attempt: 0,
        ready: Err(refusal.clone()),
    });
    assert_eq!(kinds(&out), ["reply", "stop"]);
    answer(out);
    assert!(matches!(rx.try_recv(), Ok(Response::Error(f)) if f == refusal));
    let (reply, mut rx) = asked();
    answer(b.parts.on(Input::Start {
        from: broker,
        superpeer: true,
        job: "j-1-1".into(),
        attempt: 0,
        reply,
    }));
    assert!(matches!(rx.try_recv(), Ok(Response::Error(f)) if f.kind == FailureKind::NotFound));
    // Prepared without a start: a start by another runs it, once.
    drop(b.prepare(broker, "k-1-1", false));
    let out = b.prepared("k-1-1");
    assert_eq!(kinds(&out), ["reply"]);
    let start = |b: &mut Bench, from: PeerId, superpeer: bool| {
        let (reply, mut rx) = asked();
        let out = b.parts.on(Input::Start {
            from,
            superpeer,
            job: "k-1-1".into(),
            attempt: 0,
            reply,
        });
        let kinds = kinds(&out);
        answer(out);
        (kinds, rx.try_recv())
    };
    let (k, r) = start(&mut b, PeerId::random(), false);
    assert_eq!(k, ["reply"]);
    assert!(matches!(r, Ok(Response::Error(f)) if f.kind == FailureKind::Refused));
    let (k, r) = start(&mut b, broker, false);
    assert_eq!(k, ["run", "reply"]);
    assert!(matches!(r, Ok(Response::Ok)));
    let (_, r) = start(&mut b, broker, false);
    assert!(matches!(r, Ok(Response::Error(f)) if f.message.contains("already started")));
}

#[tokio::test]
async fn a_queue_streams_import_that_comes_before_its_part_runs_ends_with_the_part() {
    let mut b = bench();
    let broker = PeerId::random();
    drop(b.prepare(broker, "j-1-1", false));
    b.prepared("j-1-1");
    // Prepared, not started: the part feeding it on another node started first, and its
    // stream's import begins here.
    let import = tokio::spawn(std::future::pending::<()>());
    let key = ("v".to_owned(), "in".to_owned(), PeerId::random());
    let out = b.parts.on(Input::Attach {
        job: "j-1-1".into(),
        tasks: Vec::new(),
        links: vec![(key, false, import.abort_handle())],
    });
    assert!(out.is_empty(), "kept with its part: {:?}", kinds(&out));
    let (reply, _rx) = asked();
    let out = b.parts.on(terminate(broker, false, "cancelled", reply));
    let Some(Effect::Stop { tasks, .. }) =
        out.into_iter().find(|e| matches!(e, Effect::Stop { .. }))
    else {
        panic!("no stop");
    };
    assert_eq!(tasks.len(), 1, "the import ends with its part");
    // One for a part that is gone is stopped at once.
    let late = tokio::spawn(std::future::pending::<()>());
    let out = b.parts.on(Input::Attach {
        job: "j-1-1".into(),
        tasks: vec![late.abort_handle()],
        links: Vec::new(),
    });
    assert_eq!(kinds(&out), ["abort"]);
}

#[test]
fn a_later_run_of_a_job_replaces_the_earlier_and_what_comes_of_the_earlier_is_ignored() {
    let mut b = bench();
    let broker = PeerId::random();
    let job = "j-1-1";
    drop(b.prepare(broker, job, false));
    assert_eq!(kinds(&b.prepared(job)), ["reply"]);
    // Run 1 of the job (run 0 was given up): run 0 goes first, in its own namespace.
    let run = |attempt, start| {
        let mut s = spec(job, start);
        s.attempt = attempt;
        s
    };
    let (reply, _first) = asked();
    let out = b.parts.on(Input::Prepare {
        from: broker,
        spec: run(1, false),
        reply,
    });
    assert_eq!(kinds(&out), ["stop", "prepare"]);
    assert!(matches!(&out[0], Effect::Stop { attempt: 0, .. }));
    // Run 0 again, or a second run 1, is refused.
    for attempt in [0, 1] {
        let (reply, mut rx) = asked();
        answer(b.parts.on(Input::Prepare {
            from: broker,
            spec: run(attempt, false),
            reply,
        }));
        assert!(
            matches!(rx.try_recv(), Ok(Response::Error(f)) if f.message.contains("already here"))
        );
    }
    // Run 0's end, termination and preparation are not run 1's.
    let mut old = report(job, false);
    old.attempt = 0;
    assert!(b.parts.on(Input::Ended { report: old }).is_empty());
    let (reply, mut rx) = asked();
    let out = b.parts.on(terminate(broker, false, "run given up", reply));
    assert_eq!(kinds(&out), ["reply"], "run 1 stays");
    answer(out);
    assert!(matches!(rx.try_recv(), Ok(Response::Ok)));
    assert_eq!(b.held.jobs(), [job]);
    let stale = b.ready(job);
    let out = b.parts.on(Input::Prepared {
        job: job.into(),
        attempt: 0,
        ready: Ok(stale),
    });
    assert!(
        matches!(&out[..], [Effect::Stop { attempt: 0, .. }]),
        "what run 0's preparation made goes: {:?}",
        kinds(&out)
    );
    // Run 1 prepared: only a start of run 1 runs it.
    let ready = b.ready(&crate::node::space(&job.into(), 1));
    let out = b.parts.on(Input::Prepared {
        job: job.into(),
        attempt: 1,
        ready: Ok(ready),
    });
    assert_eq!(kinds(&out), ["reply"]);
    let start = |b: &mut Bench, attempt| {
        let (reply, mut rx) = asked();
        let out = b.parts.on(Input::Start {
            from: broker,
            superpeer: false,
            job: job.into(),
            attempt,
            reply,
        });
        let k = kinds(&out);
        answer(out);
        (k, rx.try_recv())
    };
    let (k, r) = start(&mut b, 0);
    assert!(
        k == ["reply"] && matches!(r, Ok(Response::Error(f)) if f.kind == FailureKind::NotFound)
    );
    let (k, r) = start(&mut b, 1);
    assert!(
        k == ["run", "reply"] && matches!(r, Ok(Response::Ok)),
        "{k:?}"
    );
}

#[path = "moves_tests.rs"]
mod moves;
