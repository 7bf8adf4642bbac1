//! A worker's side in this process: the job frame in, the part run in a runtime and queues of
//! its own, the end frame out; and how the node tells a worker's death.

use std::io::Cursor;

use mvm_component::policy::PrincipalKind;

use super::*;

/// Sends its `msg` parameter on `out`; the sink prints what it receives on stdout.
const SAY: &str = r#"(module
  (import "mvm" "send" (func $send (param i32 i32 i32 i32) (result i32)))
  (import "mvm" "param" (func $param (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "out")
  (data (i32.const 8) "msg")
  (func (export "_start") (local $n i32)
    (local.set $n (call $param (i32.const 8) (i32.const 3) (i32.const 1024) (i32.const 60000)))
    (drop (call $send (i32.const 0) (i32.const 3) (i32.const 1024) (local.get $n)))))"#;

const PRINT: &str = r#"(module
  (import "mvm" "recv" (func $recv (param i32 i32 i32 i32) (result i64)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "in")
  (func (export "_start") (local $n i64)
    (local.set $n (call $recv (i32.const 0) (i32.const 2) (i32.const 1024) (i32.const 60000)))
    (i32.store (i32.const 16) (i32.const 1024))
    (i32.store (i32.const 20) (i32.wrap_i64 (local.get $n)))
    (drop (call $write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 32)))))"#;

const TRAP: &str = r#"(module (func (export "_start") unreachable))"#;

/// A job of the two-vertex graph `s -> p`, its modules compiled by a node's runtime.
fn job(modules: &[(&str, &str)], msg: &str) -> WorkerJob {
    let node = Runtime::new(&RuntimeConfig {
        max_instances: 4,
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    WorkerJob {
        space: "j-1-1".into(),
        topology_file: "say.dot".into(),
        topology: "digraph { s [component=say]; p [component=print]; s -> p }".into(),
        queue: QueueConfig::default(),
        modules: modules
            .iter()
            .map(|(name, wat)| {
                let (m, _, _) = node.cache().load(name, wat.as_bytes()).expect("compiles");
                (
                    (*name).to_owned(),
                    Bytes::from(m.serialize().expect("serializes")),
                )
            })
            .collect(),
        parameters: BTreeMap::from([("msg".to_owned(), msg.to_owned())]),
        limits: LimitSpec::default(),
        placement: vec![0, 0],
        here: 0,
        owner: Principal {
            kind: PrincipalKind::User,
            name: "alice".into(),
            domain: "default".into(),
            roles: Vec::new(),
        },
        max_memory_bytes: node.max_memory_bytes() as u64,
    }
}

/// Serves `input` as a worker would; the end it wrote.
fn serve_bytes(input: Vec<u8>) -> WorkerEnd {
    let mut out = Vec::new();
    assert_eq!(serve(Cursor::new(input), &mut out, false), 0);
    let len = u32::from_be_bytes(out[..4].try_into().expect("a length")) as usize;
    assert_eq!(out.len(), 4 + len, "one frame");
    crate::proto::decode(&out[4..]).expect("an end")
}

#[test]
fn a_worker_runs_its_part_and_reports_outputs_counts_and_queues() {
    let j = job(&[("say", SAY), ("print", PRINT)], "hello from a guest");
    let end = serve_bytes(frame(&j, MAX_JOB).expect("frame"));
    let WorkerEnd::Done(r) = end else {
        panic!("{end:?}");
    };
    let p = r.vertices.iter().find(|v| v.vertex == "p").expect("p");
    assert_eq!(&p.stdout[..], b"hello from a guest");
    let s = r.vertices.iter().find(|v| v.vertex == "s").expect("s");
    assert_eq!(s.counts.sent.len(), 1, "{:?}", s.counts);
    assert_eq!(s.counts.sent[0].2.items, 1);
    let q = r
        .queues
        .iter()
        .find(|q| q.name == "p:in")
        .expect("p's queue");
    assert_eq!((q.items_in, q.bytes_in), (1, 18));
    assert_eq!(r.pid, std::process::id());
}

#[test]
fn a_failing_vertex_and_a_bad_job_are_reported_not_panicked() {
    let j = job(&[("say", TRAP), ("print", PRINT)], "x");
    match serve_bytes(frame(&j, MAX_JOB).expect("frame")) {
        WorkerEnd::Failed(f) => {
            assert_eq!((f.vertex.as_str(), f.kind), ("s", ErrorKind::Trap), "{f:?}");
        }
        other => panic!("{other:?}"),
    }
    // A module compiled for another engine (here: not compiled at all) is refused.
    let mut j = job(&[("say", SAY), ("print", PRINT)], "x");
    j.modules[0].1 = Bytes::from_static(b"\0asm\x01\0\0\0");
    match serve_bytes(frame(&j, MAX_JOB).expect("frame")) {
        WorkerEnd::Failed(f) => {
            assert_eq!(f.kind, ErrorKind::Setup, "{f:?}");
            assert!(f.cause.contains("does not load"), "{f:?}");
        }
        other => panic!("{other:?}"),
    }
    // A truncated frame, and one that is not a job.
    for input in [vec![0, 0, 1, 0, 7], {
        let mut b = frame(&"not a job", 1 << 10).expect("frame");
        b.truncate(b.len());
        b
    }] {
        match serve_bytes(input) {
            WorkerEnd::Failed(f) => {
                assert_eq!(f.kind, ErrorKind::Setup, "{f:?}");
                assert!(f.cause.starts_with("the worker's job"), "{f:?}");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_worker_that_dies_says_how_and_a_memory_kill_is_a_memory_failure() {
    use std::os::unix::process::ExitStatusExt;

    let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
    let killed = std::process::ExitStatus::from_raw(9);
    let f = died(42, "mvm-g", Ok(killed), true, &eof);
    assert_eq!(f.kind, ErrorKind::Memory);
    assert!(
        f.cause.contains("pid 42") && f.cause.contains("mvm-g"),
        "{f:?}"
    );
    assert!(
        f.cause.contains("SIGKILL") && f.cause.contains("memory limit"),
        "{f:?}"
    );
    let f = died(42, "mvm-g", Ok(killed), false, &eof);
    assert_eq!(f.kind, ErrorKind::Other);
    assert!(!f.cause.contains("memory limit"), "{f:?}");
    let f = died(
        7,
        "g",
        Ok(std::process::ExitStatus::from_raw(3 << 8)),
        false,
        &eof,
    );
    assert!(f.cause.contains("exited with status 3"), "{f:?}");
}
