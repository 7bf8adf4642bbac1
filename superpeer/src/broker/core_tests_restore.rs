//! A run given up after a lost node, placed again from the newest checkpoint whose blobs the
//! broker holds, on nodes heard from since.

use std::time::Duration;

use libp2p::PeerId;
use tokio::sync::oneshot;

use super::{Bench, all_prepared, bench, reply_now, sends, submitted};
use crate::broker::core::Input;
use crate::broker::harness::jobs;
use crate::joblog::Command;
use crate::proto::{BrokerRequest, JobState, NodeLoad, PartReport};

/// Heartbeats of `peers`, as the broker takes them.
fn beat(b: &mut Bench, peers: &[PeerId]) {
    for &peer in peers {
        let (reply, _rx) = oneshot::channel();
        reply_now(b.on(Input::Heartbeat {
            reply,
            peer,
            account: "node:n@d".into(),
            load: NodeLoad::default(),
        }));
    }
}

#[tokio::test]
async fn a_run_given_up_goes_on_from_the_newest_checkpoint_whose_blobs_are_here_on_nodes_heard_since()
 {
    use crate::proto::{CheckpointInfo, CheckpointPolicy, CutPart, ErrorKind, Hash, VertexFailure};
    let mut b = bench().await;
    let (n0, n1, n2) = (b.node("n0", 8), b.node("n1", 8), b.node("n2", 8));
    let mut job = jobs::ring("saved", 1, Some(2), 0);
    job.submission.retries = 1;
    job.submission.checkpoint = Some(CheckpointPolicy {
        interval_ms: 600_000,
        keep: 3,
    });
    let (effects, mut rx) = b.submit(&job);
    let effects = reply_now(b.settle(effects).await);
    let id = submitted(&mut rx).job;
    let started = all_prepared(&mut b, effects);
    let _ = b.settle(started).await;
    assert_eq!(b.state(&id).map(|s| s.0), Some(JobState::Running));
    let (parts, on): (Vec<Vec<String>>, Vec<PeerId>) = b.log.read(|s| {
        let j = s.job(&id).expect("recorded");
        (
            j.parts.iter().map(|p| p.vertices.clone()).collect(),
            j.parts.iter().map(|p| p.node).collect(),
        )
    });
    // Two checkpoints recorded; the newest one's blobs are not here (lost, or corrupt on disk).
    let good = b.core.blobs.put(bytes::Bytes::from_static(b"cut 1"));
    for (cut, blob) in [(1, good), (2, Hash::of(b"cut 2"))] {
        let info = CheckpointInfo {
            cut,
            attempt: 0,
            at_ms: cut,
            parts: parts
                .iter()
                .map(|v| CutPart {
                    vertices: v.clone(),
                    blob,
                    bytes: 5,
                    files: None,
                })
                .collect(),
        };
        let outcome = b.log.propose(Command::Checkpoint {
            job: id.clone(),
            info,
        });
        assert!(matches!(outcome.await, Ok(crate::joblog::Applied::Done)));
    }
    // A node of the job is lost: the other's part reports its channel broken.
    let (lost, kept) = (on[1], on[0]);
    let (reply, _report) = oneshot::channel();
    let effects = b.on(Input::Report {
        reply,
        peer: kept,
        report: Box::new(PartReport {
            job: id.clone(),
            attempt: 0,
            outcome: Err(VertexFailure {
                vertex: String::new(),
                cause: format!("a channel from {lost} broke"),
                kind: ErrorKind::Lost,
            }),
            logs: Vec::new(),
        }),
    });
    let told = sends(b.settle(effects).await);
    assert!(
        told.iter()
            .all(|(_, r, _)| matches!(r, BrokerRequest::Terminate { attempt: 0, .. })),
        "only the run given up is told to stop"
    );
    assert_eq!(b.state(&id).map(|s| s.0), Some(JobState::Pending));
    // Placed once two nodes are heard from again: never on the lost one, each part of the
    // checkpoint whole, from checkpoint 1.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let heard: Vec<PeerId> = [n0, n1, n2].into_iter().filter(|p| *p != lost).collect();
    beat(&mut b, &heard);
    let effects = b.on(Input::Tick);
    let prepares = sends(b.settle(effects).await);
    assert_eq!(prepares.len(), 2, "one prepare per part");
    for (peer, request, _) in &prepares {
        assert_ne!(*peer, lost);
        let BrokerRequest::Prepare(spec) = request else {
            panic!("not a prepare");
        };
        assert_eq!((spec.attempt, spec.restore), (1, Some(good)));
        assert!(spec.checkpoint);
    }
    let sorted = |mut v: Vec<Vec<String>>| {
        for p in &mut v {
            p.sort();
        }
        v.sort();
        v
    };
    let now: Vec<Vec<String>> = b.log.read(|s| {
        s.job(&id)
            .map(|j| j.parts.iter().map(|p| p.vertices.clone()).collect())
            .unwrap_or_default()
    });
    assert_eq!(sorted(now), sorted(parts), "the checkpoint's parts, whole");
    let restarts = b.log.read(|s| s.job(&id).map(|j| j.restarts.clone()));
    assert_eq!(
        restarts
            .as_deref()
            .and_then(|r| r.first())
            .and_then(|r| r.from_cut),
        Some(1)
    );
}
