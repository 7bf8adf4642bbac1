//! The jobs of lifecycle tests, and waits on them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::client::{Client, Prepared};
use crate::proto::{Hash, JobId, JobState, JobStatus, LimitSpec, Requirements, Submission};

/// A token ring of 8 vertices passing `hops` tokens, on at most `nodes` nodes.
pub(crate) fn ring(name: &str, hops: u64, nodes: Option<u32>, priority: i32) -> Prepared {
    let token = Bytes::from_static(include_bytes!("../../../../jobs/wat/token.wat"));
    let hash = Hash::of(&token);
    Prepared {
        submission: Submission {
            name: name.into(),
            topology_file: "ring-8.dot".into(),
            topology: include_str!("../../../../topologies/ring-8.dot").into(),
            components: BTreeMap::from([("token".to_owned(), hash)]),
            parameters: BTreeMap::from([("hops".to_owned(), hops.to_string())]),
            limits: two_minutes(),
            requirements: on_at_most(nodes),
            priority,
            ..Submission::default()
        },
        modules: BTreeMap::from([(hash, token)]),
        inputs: BTreeMap::new(),
    }
}

/// A wall-time limit of two minutes.
fn two_minutes() -> LimitSpec {
    LimitSpec {
        wall_ms: Some(120_000),
        ..LimitSpec::default()
    }
}

/// Requirements of at most `nodes` nodes.
fn on_at_most(nodes: Option<u32>) -> Requirements {
    Requirements {
        nodes,
        ..Requirements::default()
    }
}

/// A ring that runs until cancelled (on at most `nodes` nodes), once it runs.
pub(crate) async fn running(c: &Client, nodes: Option<u32>) -> JobStatus {
    let s = c
        .submit(&ring("long", 2_000_000_000, nodes, 0))
        .await
        .expect("submit");
    until(c, &s.job, |st| st == JobState::Running).await
}

/// Submits `job`, waiting for its end, and gives its final status.
pub(crate) async fn finished(c: &Client, job: &Prepared) -> JobStatus {
    let s = c.submit_and_wait(job).await.expect("submit");
    until(c, &s.job, JobState::is_final).await
}

/// Waits until `job`'s state passes `pred`.
pub(crate) async fn until(c: &Client, job: &JobId, pred: impl Fn(JobState) -> bool) -> JobStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    loop {
        if let Ok(mut v) = c.status(Some(job)).await
            && let Some(s) = v.pop()
        {
            if pred(s.state) {
                return s;
            }
            last = Some(s);
        }
        assert!(
            Instant::now() < deadline,
            "job {job} never got there; last seen: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A job of one vertex running `wat` (a module exporting `run`).
pub(crate) fn one(name: &str, wat: &'static str) -> Prepared {
    one_of(name, Bytes::from_static(wat.as_bytes()))
}

/// A job of one vertex running `module` (WAT or binary, exporting `run` or `_start`).
pub(crate) fn one_of(name: &str, module: Bytes) -> Prepared {
    let hash = Hash::of(&module);
    Prepared {
        submission: Submission {
            name: name.into(),
            topology_file: "one.dot".into(),
            topology: "digraph one { v [component=\"c\"]; }\n".into(),
            components: BTreeMap::from([("c".to_owned(), hash)]),
            ..Submission::default()
        },
        modules: BTreeMap::from([(hash, module)]),
        inputs: BTreeMap::new(),
    }
}

/// A job of one vertex that sleeps `ms` milliseconds without using the CPU, then prints
/// `slept` and ends.
pub(crate) fn sleeping(name: &str, ms: u64) -> Prepared {
    let module = Bytes::from_static(include_bytes!("../../../../jobs/wat/sleep.wat"));
    let mut job = one_of(name, module);
    job.submission.parameters = BTreeMap::from([("ms".to_owned(), ms.to_string())]);
    job
}

/// Items moved between a job's vertices.
pub(crate) fn items(s: &JobStatus) -> u64 {
    s.traffic.iter().map(|t| t.items).sum()
}

/// The C pipeline of `topologies/pipeline-4.dot` (source, two stages, sink; modules built by
/// `scripts/build-jobs`) passing `count` items, on at most `nodes` nodes. Its sink prints the
/// items' count and sum.
pub(crate) fn pipeline(name: &str, count: u64, nodes: Option<u32>) -> Prepared {
    let built = |job: &str| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../jobs/build")
            .join(format!("{job}.wasm"));
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/build-jobs)", path.display()));
        Bytes::from(bytes)
    };
    let modules: Vec<(&str, Bytes)> = vec![
        ("source", built("pipe_source")),
        ("stage", built("pipe_stage")),
        ("sink", built("pipe_sink")),
    ];
    Prepared {
        submission: Submission {
            name: name.into(),
            topology_file: "pipeline-4.dot".into(),
            topology: include_str!("../../../../topologies/pipeline-4.dot").into(),
            components: modules
                .iter()
                .map(|(c, m)| ((*c).to_owned(), Hash::of(m)))
                .collect(),
            parameters: BTreeMap::from([
                ("count".to_owned(), count.to_string()),
                ("factor".to_owned(), "3".to_owned()),
            ]),
            limits: two_minutes(),
            requirements: on_at_most(nodes),
            ..Submission::default()
        },
        modules: modules
            .into_iter()
            .map(|(_, m)| (Hash::of(&m), m))
            .collect(),
        inputs: BTreeMap::new(),
    }
}
