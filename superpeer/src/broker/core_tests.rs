//! The broker's machine without its loop and without nodes: inputs given by hand, effects
//! looked at, entries proposed to a real one-replica log. Answers that no live node gives on
//! demand (a refusal of one part out of two, a report before its job's entry) are given here.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use mvm_component::policy::{Principal, PrincipalKind};
use mvm_queue::codec::Registry;
use tokio::sync::{mpsc, oneshot};

use super::{Core, Effect, Input, Then};
use crate::broker::View;
use crate::broker::harness::{creds, jobs};
use crate::broker::place::check;
use crate::joblog::{Command, JobLog, LogConfig, Replica};
use crate::modules::ModuleStore;
use crate::net::{Inbound, Net, NetConfig};
use crate::pki::Ca;
use crate::policy::{Policies, PolicySource};
use crate::proto::{
    BrokerRequest, Failure, FailureKind, JobId, JobState, NodeInfo, NodeLoad, PartReport,
    PartResult, Response,
};
use crate::site::Site;

/// A machine over a log of one replica that leads.
pub(super) struct Bench {
    core: Core,
    log: JobLog,
    ca: Ca,
    dir: tempfile::TempDir,
    _inbound: mpsc::Receiver<Inbound>,
}

async fn bench() -> Bench {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::init(&dir.path().join("ca"), "default", 30).expect("ca");
    let c = creds(&ca, &[], PrincipalKind::Node, "sp0", &["superpeer"]);
    let config = NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
        ..NetConfig::default()
    };
    let (net, inbound): (Net, _) = Net::start(&c, &config).await.expect("net");
    let policies = Policies::open(PolicySource::Default, "default").expect("policies");
    let site = Arc::new(Site::new(
        net.clone(),
        policies,
        "sp0".into(),
        "default".into(),
        "default".into(),
        Duration::from_millis(100),
        Duration::from_secs(1),
    ));
    let log = JobLog::open(
        &dir.path().join("joblog"),
        net.clone(),
        &LogConfig::default(),
    )
    .await
    .expect("log");
    let me = vec![Replica::new(net.peer(), net.addrs())];
    log.expect(&me).expect("replicas");
    log.initialize(&me).await.expect("initialize");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log.is_leader() {
        assert!(Instant::now() < deadline, "the log of one never led");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let core = Core::new(
        site,
        log.clone(),
        [
            Arc::new(ModuleStore::new(None)),
            Arc::new(ModuleStore::new(None)),
        ],
        Arc::new(Registry::new()),
        Arc::new(View::default()),
        None,
    );
    Bench {
        core,
        log,
        ca,
        dir,
        _inbound: inbound,
    }
}

impl Bench {
    fn on(&mut self, input: Input) -> Vec<Effect> {
        self.core.on(Instant::now(), input)
    }

    /// Proposes every entry among `effects` (and among what their outcomes give), in order;
    /// the other effects.
    async fn settle(&mut self, effects: Vec<Effect>) -> Vec<Effect> {
        let mut queue: VecDeque<Effect> = effects.into();
        let mut rest = Vec::new();
        while let Some(e) = queue.pop_front() {
            match e {
                Effect::Record { command, then } => {
                    let outcome = self.log.propose(command).await;
                    queue.extend(self.on(Input::Recorded { then, outcome }));
                }
                other => rest.push(other),
            }
        }
        rest
    }

    /// Registers node `name` with `slots`.
    fn node(&mut self, name: &str, slots: u32) -> PeerId {
        let peer = PeerId::random();
        let who = Principal {
            kind: PrincipalKind::Node,
            name: name.into(),
            domain: "default".into(),
            roles: Vec::new(),
        };
        let info = NodeInfo {
            name: name.into(),
            group: "default".into(),
            domain: "default".into(),
            addrs: Vec::new(),
            cpus: 2,
            memory_bytes: 1 << 30,
            arch: std::env::consts::ARCH.into(),
            images: Vec::new(),
            slots,
            eligible: false,
            load: NodeLoad::default(),
            guest_of: None,
            fetches_images: false,
        };
        let (reply, mut rx) = oneshot::channel();
        let effects = self.on(Input::Register {
            reply,
            peer,
            who,
            info,
        });
        reply_now(effects);
        assert!(matches!(rx.try_recv(), Ok(Response::Registered { .. })));
        peer
    }

    /// Submits `job` as alice; the effects, and where the answer comes.
    fn submit(
        &mut self,
        job: &crate::client::Prepared,
    ) -> (Vec<Effect>, oneshot::Receiver<Response>) {
        self.submit_as(alice(), job)
    }

    /// Submits `job` as `who`; the effects, and where the answer comes.
    fn submit_as(
        &mut self,
        who: Principal,
        job: &crate::client::Prepared,
    ) -> (Vec<Effect>, oneshot::Receiver<Response>) {
        for b in job.modules.values() {
            self.core.modules.put(b.clone());
        }
        let checked =
            check(&self.core.modules, &self.core.codecs, &job.submission).expect("checked");
        let (reply, rx) = oneshot::channel();
        let effects = self.on(Input::Submit {
            reply,
            who,
            submission: Box::new(job.submission.clone()),
            checked: Box::new(checked),
        });
        (effects, rx)
    }

    fn state(&self, job: &JobId) -> Option<(JobState, Option<String>)> {
        self.log.read(|s| {
            s.job(job)
                .map(|j| (j.state, j.ended.as_ref().and_then(|e| e.error.clone())))
        })
    }
}

/// The user the bench submits as.
pub(super) fn alice() -> Principal {
    Principal {
        kind: PrincipalKind::User,
        name: "alice".into(),
        domain: "default".into(),
        roles: Vec::new(),
    }
}

/// Sends the answers among `effects`; the others.
fn reply_now(effects: Vec<Effect>) -> Vec<Effect> {
    effects
        .into_iter()
        .filter_map(|e| match e {
            Effect::Reply(reply, r) => {
                let _ = reply.send(r);
                None
            }
            other => Some(other),
        })
        .collect()
}

/// The requests to nodes among `effects`: to whom, what, and what for.
fn sends(effects: Vec<Effect>) -> Vec<(PeerId, BrokerRequest, Then)> {
    effects
        .into_iter()
        .filter_map(|e| match e {
            Effect::Send {
                peer,
                request,
                then,
                ..
            } => Some((peer, request, then)),
            _ => None,
        })
        .collect()
}

fn submitted(rx: &mut oneshot::Receiver<Response>) -> crate::proto::JobStatus {
    match rx.try_recv() {
        Ok(Response::Submitted(st)) => *st,
        other => panic!("not submitted: {other:?}"),
    }
}

#[tokio::test]
async fn a_job_of_two_parts_is_recorded_before_its_parts_wake_and_one_refusal_ends_it_everywhere() {
    let mut b = bench().await;
    let n0 = b.node("n0", 4);
    let n1 = b.node("n1", 4);
    let (effects, mut rx) = b.submit(&jobs::ring("two", 1, Some(2), 0));
    // Nothing is sent to a node before the job's entry is applied.
    assert!(
        matches!(
            &effects[..],
            [Effect::Record {
                command: Command::Submit(_),
                ..
            }]
        ),
        "the first effect records the job"
    );
    let effects = reply_now(b.settle(effects).await);
    let st = submitted(&mut rx);
    assert_eq!(st.state, JobState::Preparing);
    let prepares = sends(effects);
    let mut peers: Vec<PeerId> = prepares.iter().map(|(p, _, _)| *p).collect();
    peers.sort();
    let mut both = vec![n0, n1];
    both.sort();
    assert_eq!(peers, both, "one prepare to each node");
    assert!(
        prepares
            .iter()
            .all(|(_, r, _)| matches!(r, BrokerRequest::Prepare(_)))
    );
    // One part is ready, the other refuses: the job ends refused, naming the node and why, and
    // both parts are told to stop.
    let mut prepares = prepares.into_iter();
    let (ok_peer, _, ok_then) = prepares.next().expect("a prepare");
    let (no_peer, _, no_then) = prepares.next().expect("another prepare");
    let after_one = b.on(Input::Answered {
        then: ok_then,
        peer: ok_peer,
        answer: Ok(Response::Ok),
    });
    assert!(
        after_one.is_empty(),
        "nothing happens before every part has answered"
    );
    let refusal = Failure::new(FailureKind::Refused, "no room for its guest");
    let effects = b.on(Input::Answered {
        then: no_then,
        peer: no_peer,
        answer: Err(refusal),
    });
    let effects = b.settle(effects).await;
    let (state, error) = b.state(&st.job).expect("the job is in the log");
    assert_eq!(state, JobState::Refused);
    let error = error.expect("an error");
    let name = if no_peer == n0 { "n0" } else { "n1" };
    assert!(
        error.contains(&format!("node {name} (")) && error.contains("no room for its guest"),
        "{error}"
    );
    let mut told: Vec<PeerId> = sends(effects)
        .into_iter()
        .filter(|(_, r, _)| matches!(r, BrokerRequest::Terminate { .. }))
        .map(|(p, _, _)| p)
        .collect();
    told.sort();
    assert_eq!(told, both, "every part is told to stop");
}

#[tokio::test]
async fn a_report_that_comes_before_its_jobs_entry_waits_for_it() {
    let mut b = bench().await;
    let n0 = b.node("n0", 4);
    let (effects, mut rx) = b.submit(&jobs::sleeping("early", 1));
    // A job of one part on the host is prepared before it is recorded.
    let mut prepares = sends(effects);
    assert_eq!(prepares.len(), 1);
    let (peer, _, then) = prepares.pop().expect("a prepare");
    assert_eq!(peer, n0);
    let Then::AlonePrepared { record, .. } = &then else {
        panic!("not the prepare of a job alone");
    };
    let job = record.id.clone();
    assert!(b.state(&job).is_none(), "not in the log yet");
    // Its part ends, and its report arrives, before the node's answer to the prepare.
    let (reply, mut report_rx) = oneshot::channel();
    let report = PartReport {
        job: job.clone(),
        attempt: 0,
        outcome: Ok(PartResult {
            guest: None,
            outputs: vec![("v".into(), bytes::Bytes::from_static(b"slept\n"))],
            traffic: Vec::new(),
            edges: Vec::new(),
            received: Vec::new(),
            wall_ms: 1,
        }),
        logs: Vec::new(),
    };
    let waiting = b.on(Input::Report {
        reply,
        peer: n0,
        report: Box::new(report),
    });
    assert!(waiting.is_empty(), "the report waits for the job's entry");
    let effects = b.on(Input::Answered {
        then,
        peer: n0,
        answer: Ok(Response::Ok),
    });
    let rest = reply_now(b.settle(effects).await);
    assert!(rest.is_empty(), "nothing else to do");
    assert_eq!(submitted(&mut rx).job, job);
    assert!(
        matches!(report_rx.try_recv(), Ok(Response::Ok)),
        "the report is answered"
    );
    let (state, _) = b.state(&job).expect("in the log");
    assert_eq!(state, JobState::Done, "the early report ended the job");
    let outputs = b.log.read(|s| s.job(&job).map(|j| j.outputs.clone()));
    assert_eq!(outputs.map(|o| o.len()), Some(1));
}

#[tokio::test]
async fn a_job_that_does_not_fit_now_waits_holding_nothing_and_is_placed_when_a_node_comes() {
    let mut b = bench().await;
    let n0 = b.node("n0", 4);
    // Eight vertices on at most one node of four slots: no node here could ever take it, so
    // it goes to the other groups (none known), holding nothing.
    let (effects, _rx) = b.submit(&jobs::ring("big", 1, Some(1), 0));
    let rest = reply_now(b.settle(effects).await);
    let [Effect::Forward { to, why, .. }] = &rest[..] else {
        panic!("a job no node here can take is offered to other groups");
    };
    assert!(to.is_empty(), "no other group is known");
    assert!(why.to_string().contains("default"), "{why}");
    assert_eq!(
        b.core.ledger.slots(&n0),
        0,
        "a job not placed holds no slot"
    );
    assert!(b.core.drives.is_empty());
    // A node of eight slots takes a job of eight vertices; another such job waits.
    let n1 = b.node("n1", 8);
    let (effects, mut rx) = b.submit(&jobs::ring("fits", 1, Some(1), 0));
    let effects = reply_now(b.settle(effects).await);
    let mut prepares = sends(effects);
    assert_eq!(prepares.len(), 1);
    let (peer, _, then) = prepares.pop().expect("a prepare");
    assert_eq!(peer, n1, "the node with room takes it");
    // Its one part runs once prepared.
    let effects = b.on(Input::Answered {
        then,
        peer,
        answer: Ok(Response::Ok),
    });
    assert!(reply_now(b.settle(effects).await).is_empty());
    assert_eq!(submitted(&mut rx).state, JobState::Running);
    let (effects, mut rx) = b.submit(&jobs::ring("waits", 1, Some(1), 0));
    let rest = reply_now(b.settle(effects).await);
    assert!(
        rest.is_empty(),
        "nothing woken for a waiting job: {:?}",
        rest.iter()
            .map(|e| match e {
                Effect::Forward { why, .. } => format!("forward: {why}"),
                Effect::Disconnect(_) => "disconnect".into(),
                Effect::Found(_) => "found".into(),
                _ => "other".into(),
            })
            .collect::<Vec<_>>()
    );
    let st = submitted(&mut rx);
    assert_eq!(st.state, JobState::Pending);
    assert!(st.waiting.is_some(), "it says why it waits");
    assert_eq!(
        b.core.ledger.slots(&n1),
        0,
        "the log holds what placed jobs hold"
    );
    // The tick tries it again; once a node of eight free slots registers, it is placed there.
    let tick = b.on(Input::Tick);
    let effects = reply_now(b.settle(tick).await);
    assert!(sends(effects).is_empty(), "still no room");
    let n2 = b.node("n2", 8);
    let tick = b.on(Input::Tick);
    let effects = reply_now(b.settle(tick).await);
    let placed_on: Vec<PeerId> = sends(effects).into_iter().map(|(p, _, _)| p).collect();
    assert_eq!(placed_on, vec![n2]);
    assert_eq!(b.state(&st.job).map(|s| s.0), Some(JobState::Preparing));
}

#[tokio::test]
async fn a_takeover_noticed_late_leaves_alone_a_job_whose_start_is_on_its_way() {
    let mut b = bench().await;
    b.node("n0", 4);
    b.node("n1", 4);
    let (effects, mut rx) = b.submit(&jobs::ring("two", 1, Some(2), 0));
    let effects = reply_now(b.settle(effects).await);
    let job = submitted(&mut rx).job;
    // Every part answers its prepare: the start goes to the log.
    let start = all_prepared(&mut b, effects);
    assert!(
        matches!(
            &start[..],
            [Effect::Record {
                then: Then::StartRecorded { .. },
                ..
            }]
        ),
        "the start is recorded once every part is prepared"
    );
    // Before that entry is applied, this replica notices (late) that it leads: the job is
    // still `preparing` in the log, but it is this broker's own, not one a lost leader left.
    b.core.leading = false;
    let tick = b.on(Input::Tick);
    assert!(
        !tick.iter().any(|e| matches!(
            e,
            Effect::Record {
                command: Command::End { .. },
                ..
            }
        )),
        "the job is not ended"
    );
    let effects = b.settle(start).await;
    let starts = sends(effects);
    assert_eq!(starts.len(), 2, "both parts are started");
    assert_eq!(b.state(&job).map(|s| s.0), Some(JobState::Running));
}

/// Every prepare among `effects` answered well; what the broker does then.
pub(super) fn all_prepared(b: &mut Bench, effects: Vec<Effect>) -> Vec<Effect> {
    let mut then_effects = Vec::new();
    for (peer, _, then) in sends(effects) {
        then_effects.extend(b.on(Input::Answered {
            then,
            peer,
            answer: Ok(Response::Ok),
        }));
    }
    then_effects
}

#[path = "core_tests_restore.rs"]
mod restore;

#[path = "core_tests_move.rs"]
mod moves;
#[path = "core_tests_revoke.rs"]
mod revoke;
