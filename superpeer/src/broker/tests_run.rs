//! A job's part on its node: what it prints, how it exits, its limits, and a prepare that
//! fails (a module that does not compile or link, an image the node cannot provide), through
//! real daemons in one process ([`super::harness`]).

use super::harness::{Lab, finished, one, sleeping};
use crate::proto::{FailureKind, JobState, LimitSpec};

/// A one-part job's end as its node saw it, and its node's slots free again.
async fn fails_on_n0(lab: &Lab, job: &crate::client::Prepared) -> String {
    let c = lab.client().await;
    let s = finished(&c, job).await;
    assert_eq!(s.state, JobState::Failed, "{s:?}");
    assert!(s.outputs.is_empty(), "a failed job has no outputs: {s:?}");
    let g = c.group().await.expect("group");
    assert!(g.nodes.iter().all(|n| n.vertices == 0), "{g:?}");
    s.error.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vertex_s_stdout_is_its_job_s_output() {
    let lab = Lab::start(1, &[4]).await;
    let c = lab.client().await;
    let s = finished(&c, &sleeping("nap", 0)).await;
    assert_eq!(s.state, JobState::Done, "{s:?}");
    assert_eq!(s.outputs.len(), 1, "{s:?}");
    assert_eq!(s.outputs[0].0, "v");
    assert_eq!(&s.outputs[0].1[..], b"slept\n");
    assert_eq!((s.vertices, s.vertices_done), (1, 1), "{s:?}");
    assert!(s.parts.iter().all(|p| p.done && p.name == "n0"), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vertex_that_exits_non_zero_fails_its_job_with_the_status_and_zero_is_done() {
    let lab = Lab::start(1, &[4]).await;
    let exit = |code: u8| {
        let wat = format!(
            "(module (import \"wasi_snapshot_preview1\" \"proc_exit\" (func $exit (param i32))) \
             (memory (export \"memory\") 1) \
             (func (export \"_start\") (call $exit (i32.const {code}))))"
        );
        super::harness::one_of(&format!("exit{code}"), wat.into_bytes().into())
    };
    let e = fails_on_n0(&lab, &exit(3)).await;
    assert!(
        e.contains("vertex 'v'") && e.contains("exited with status 3"),
        "{e}"
    );
    let c = lab.client().await;
    let s = finished(&c, &exit(0)).await;
    assert_eq!(s.state, JobState::Done, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vertex_over_its_wall_time_limit_fails_its_job_saying_so() {
    let lab = Lab::start(1, &[4]).await;
    let mut job = sleeping("slow", 60_000);
    job.submission.limits = LimitSpec {
        wall_ms: Some(300),
        ..LimitSpec::default()
    };
    let e = fails_on_n0(&lab, &job).await;
    assert!(e.contains("wall-time limit of 300ms exceeded"), "{e}");
    assert!(e.contains(&lab.node_peer(0)), "names the node: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vertex_over_its_cpu_limit_fails_its_job_saying_so() {
    let lab = Lab::start(1, &[4]).await;
    let mut job = one("spin", "(module (func (export \"run\") (loop $l (br $l))))");
    job.submission.limits = LimitSpec {
        cpu_ms: Some(100),
        ..LimitSpec::default()
    };
    let e = fails_on_n0(&lab, &job).await;
    assert!(
        e.contains("vertex 'v'") && e.contains("CPU limit of 100ms exceeded"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vertex_growing_its_memory_over_its_limit_fails_and_a_limit_under_64_kib_is_refused() {
    let lab = Lab::start(1, &[4]).await;
    // One page (64 KiB) fits the limit of 128 KiB; sixteen more do not.
    let grow = "(module (memory (export \"memory\") 1) \
                (func (export \"run\") (drop (memory.grow (i32.const 16)))))";
    let mut job = one("grow", grow);
    job.submission.limits = LimitSpec {
        memory_bytes: Some(128 << 10),
        ..LimitSpec::default()
    };
    let e = fails_on_n0(&lab, &job).await;
    assert!(
        e.contains("vertex 'v'") && e.contains("memory limit of 131072 bytes reached"),
        "{e}"
    );
    // Within a larger limit the same module ends well.
    job.submission.limits.memory_bytes = Some(4 << 20);
    let c = lab.client().await;
    assert_eq!(finished(&c, &job).await.state, JobState::Done);
    // A limit too small for any module is bad input, refused before anything is recorded.
    job.submission.limits.memory_bytes = Some(1024);
    let r = c.submit(&job).await.expect_err("refused");
    assert_eq!(r.kind, FailureKind::Input, "{r:?}");
    assert!(r.message.contains("under 64KiB"), "{r:?}");
    assert_eq!(c.status(None).await.expect("status").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_does_not_compile_fails_its_job_at_prepare_naming_the_node() {
    let lab = Lab::start(1, &[4]).await;
    // Valid text, invalid code: `i32.add` with nothing on the stack.
    let bad = one("bad", "(module (func (export \"run\") (drop (i32.add))))");
    let e = fails_on_n0(&lab, &bad).await;
    assert!(e.contains(&lab.node_peer(0)), "names the node: {e}");
    assert!(
        e.contains("c: not a valid WebAssembly module"),
        "names the component: {e}"
    );
    // The job never started: it was recorded with its failure, and nothing runs.
    let c = lab.client().await;
    let s = &c.status(None).await.expect("status")[0];
    assert_eq!(s.vertices_done, 0, "{s:?}");
    assert_eq!(
        finished(&c, &sleeping("next", 0)).await.state,
        JobState::Done
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_whose_imports_the_node_does_not_offer_or_without_an_entry_fails_its_job() {
    let lab = Lab::start(1, &[4]).await;
    let unlinked = one(
        "unlinked",
        "(module (import \"env\" \"nowhere\" (func)) (func (export \"run\")))",
    );
    let e = fails_on_n0(&lab, &unlinked).await;
    assert!(
        e.contains("vertex 'v': cannot instantiate") && e.contains("env::nowhere"),
        "names the vertex and the import: {e}"
    );
    assert!(e.contains(&lab.node_peer(0)), "names the node: {e}");
    let no_entry = one("no-entry", "(module (func (export \"main\")))");
    let e = fails_on_n0(&lab, &no_entry).await;
    assert!(
        e.contains("vertex 'v'") && e.contains("neither '_start' nor 'run'"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_an_image_its_node_offers_but_cannot_provide_fails_at_prepare_naming_the_node() {
    let mut lab = Lab::start(1, &[]).await;
    // The node says it offers the image, but has no OS layer to run it with.
    lab.add_node_with(4, |c| c.images = vec!["host".into(), "tools:1".into()])
        .await;
    lab.registered(1).await;
    let mut job = sleeping("imaged", 0);
    job.submission.requirements.image = Some("tools:1".into());
    let e = fails_on_n0(&lab, &job).await;
    assert!(
        e.contains(&lab.node_peer(0)) && e.contains("node n0 has no OS layer for image 'tools:1'"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_an_image_no_node_offers_is_refused_naming_each_node_and_nothing_is_recorded() {
    let lab = Lab::start(1, &[4, 4]).await;
    let c = lab.client().await;
    let mut job = sleeping("imaged", 0);
    job.submission.requirements.image = Some("nowhere:1".into());
    let e = c.submit(&job).await.expect_err("refused");
    assert_eq!(e.kind, FailureKind::Unavailable, "{e:?}");
    for n in ["n0", "n1"] {
        let why = format!("node {n}: does not offer image 'nowhere:1'");
        assert!(e.message.contains(&why), "{e:?}");
    }
    assert!(e.message.contains("no other group"), "{e:?}");
    assert!(c.status(None).await.expect("status").is_empty());
}
