//! A worker's side in this process: the job frame in, the part run in a runtime and queues of
//! its own, the end frame out; and how the node tells a worker's death.

use std::io::Cursor;

use mvm_component::policy::PrincipalKind;
use mvm_component::runtime::{Runtime, RuntimeConfig};

use super::*;
use crate::proto::ErrorKind;

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
        restore: None,
        sandboxes: Default::default(),
        guest_files: None,
    }
}

/// What a worker writes, kept for the test.
#[derive(Clone, Default)]
struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Shared {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Serves `input` as a worker would; every message it wrote, the end last.
fn serve_all(input: Vec<u8>) -> Vec<FromWorker> {
    let out = Shared::default();
    assert_eq!(serve(Cursor::new(input), out.clone(), false), 0);
    let bytes = out.0.lock().expect("lock").clone();
    let mut r = Cursor::new(bytes);
    let mut msgs = Vec::new();
    while (r.position() as usize) < r.get_ref().len() {
        msgs.push(read_frame::<FromWorker>(&mut r, MAX_END).expect("a message"));
    }
    assert!(matches!(msgs.last(), Some(FromWorker::End(_))), "{msgs:?}");
    msgs
}

/// Serves `input` as a worker would; the end it wrote.
fn serve_bytes(input: Vec<u8>) -> WorkerEnd {
    match serve_all(input).pop() {
        Some(FromWorker::End(end)) => end,
        other => panic!("{other:?}"),
    }
}

fn msg(m: &ToWorker) -> Vec<u8> {
    let mut b = Vec::new();
    put(&mut b, m, MAX_JOB).expect("frame");
    b
}

#[test]
fn a_worker_runs_its_part_and_reports_outputs_counts_and_queues() {
    let j = job(&[("say", SAY), ("print", PRINT)], "hello from a guest");
    let end = serve_bytes(job_frames(&j).expect("frames"));
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
fn a_worker_carries_its_parts_links_over_its_pipes() {
    // The worker runs s; p runs in part 1: one remote output.
    let mut j = job(&[("say", SAY)], "to the other part");
    j.placement = vec![0, 1];
    let msgs = serve_all(job_frames(&j).expect("frames"));
    assert!(
        matches!(&msgs[0], FromWorker::Links { inputs, outputs }
            if inputs.is_empty() && outputs == &[("p".to_owned(), "in".to_owned(), 1)]),
        "{msgs:?}"
    );
    assert!(
        matches!(&msgs[1], FromWorker::Items { link: 0, items } if items.len() == 1 && &items[0][..] == b"to the other part"),
        "{msgs:?}"
    );
    assert!(
        matches!(&msgs[2], FromWorker::Closed { link: 0 }),
        "{msgs:?}"
    );
    assert!(
        matches!(&msgs[3], FromWorker::End(WorkerEnd::Done(_))),
        "{msgs:?}"
    );
    // The worker runs p; s runs in part 1: one remote input, fed by the node.
    let mut j = job(&[("print", PRINT)], "");
    j.placement = vec![1, 0];
    let mut input = job_frames(&j).expect("frames");
    input.extend(msg(&ToWorker::Items {
        link: 0,
        items: vec![Bytes::from_static(b"from the other part")],
    }));
    input.extend(msg(&ToWorker::Closed { link: 0 }));
    let msgs = serve_all(input);
    assert!(
        matches!(&msgs[0], FromWorker::Links { inputs, outputs }
            if outputs.is_empty() && inputs == &[("p".to_owned(), "in".to_owned(), 1)]),
        "{msgs:?}"
    );
    let Some(FromWorker::End(WorkerEnd::Done(r))) = msgs.last() else {
        panic!("{msgs:?}");
    };
    assert_eq!(&r.vertices[0].stdout[..], b"from the other part");
    // A worker not started ends without running anything.
    let input = frame(&j, MAX_JOB).expect("frame");
    match serve_bytes(input) {
        WorkerEnd::Failed(f) => assert!(f.cause.contains("did not start"), "{f:?}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_failing_vertex_and_a_bad_job_are_reported_not_panicked() {
    let j = job(&[("say", TRAP), ("print", PRINT)], "x");
    match serve_bytes(job_frames(&j).expect("frames")) {
        WorkerEnd::Failed(f) => {
            assert_eq!((f.vertex.as_str(), f.kind), ("s", ErrorKind::Trap), "{f:?}");
        }
        other => panic!("{other:?}"),
    }
    // A module compiled for another engine (here: not compiled at all) is refused.
    let mut j = job(&[("say", SAY), ("print", PRINT)], "x");
    j.modules[0].1 = Bytes::from_static(b"\0asm\x01\0\0\0");
    match serve_bytes(job_frames(&j).expect("frames")) {
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
    let f = node::died(42, "mvm-g", Ok(killed), true, &eof);
    assert_eq!(f.kind, ErrorKind::Memory);
    assert!(
        f.cause.contains("pid 42") && f.cause.contains("mvm-g"),
        "{f:?}"
    );
    assert!(
        f.cause.contains("SIGKILL") && f.cause.contains("memory limit"),
        "{f:?}"
    );
    let f = node::died(42, "mvm-g", Ok(killed), false, &eof);
    assert_eq!(f.kind, ErrorKind::Other);
    assert!(!f.cause.contains("memory limit"), "{f:?}");
    let f = node::died(
        7,
        "g",
        Ok(std::process::ExitStatus::from_raw(3 << 8)),
        false,
        &eof,
    );
    assert!(f.cause.contains("exited with status 3"), "{f:?}");
}

#[test]
fn items_cross_the_pipe_in_frames_of_their_own_and_a_broken_one_is_refused() {
    let items = vec![
        Bytes::from_static(b"one"),
        Bytes::new(),
        Bytes::from(vec![7u8; 70_000]),
    ];
    let mut buf = Vec::new();
    put(
        &mut buf,
        &FromWorker::Items {
            link: 9,
            items: items.clone(),
        },
        MAX_END,
    )
    .expect("put");
    put(&mut buf, &FromWorker::Closed { link: 9 }, MAX_END).expect("put");
    let mut r = Cursor::new(buf.clone());
    match read_frame::<FromWorker>(&mut r, MAX_END).expect("items") {
        FromWorker::Items {
            link: 9,
            items: got,
        } => assert_eq!(got, items),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        read_frame::<FromWorker>(&mut r, MAX_END),
        Ok(FromWorker::Closed { link: 9 })
    ));
    // An item's length past the frame's end, a length cut short, a frame over the limit.
    let body = &buf[4..];
    let mut past = body.to_vec();
    past[5..9].copy_from_slice(&4u32.to_be_bytes());
    past.truncate(12);
    assert!(parse::<FromWorker>(past).is_err());
    assert!(parse::<FromWorker>(body[..7].to_vec()).is_err());
    assert!(parse::<FromWorker>(vec![0xFF, 0, 0]).is_err());
    let mut small = Vec::new();
    assert!(put(&mut small, &FromWorker::Items { link: 0, items }, 1000).is_err());
}

/// Writes a line on stderr and logs a warning, then traps.
const COMPLAIN: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "mvm" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "about to fail\n")
  (data (i32.const 96) "trap ahead")
  (func (export "_start")
    (i32.store (i32.const 16) (i32.const 64))
    (i32.store (i32.const 20) (i32.const 14))
    (drop (call $write (i32.const 2) (i32.const 16) (i32.const 1) (i32.const 32)))
    (call $log (i32.const 1) (i32.const 96) (i32.const 10))
    unreachable))"#;

#[test]
fn a_worker_gives_its_node_what_its_vertices_wrote_before_its_end_also_when_one_fails() {
    let j = job(&[("say", COMPLAIN), ("print", PRINT)], "x");
    let msgs = serve_all(job_frames(&j).expect("frames"));
    let lines: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            FromWorker::Logs(l) => Some(l.clone()),
            _ => None,
        })
        .flatten()
        .map(|l| (l.vertex, l.seq, l.stream, l.text))
        .collect();
    use mvm_component::runtime::logs::LogStream;
    assert_eq!(
        lines,
        vec![
            (
                "s".to_owned(),
                0,
                LogStream::Stderr,
                "about to fail".to_owned()
            ),
            (
                "s".to_owned(),
                1,
                LogStream::Log,
                "warn: trap ahead".to_owned()
            ),
        ]
    );
    assert!(
        matches!(msgs.last(), Some(FromWorker::End(WorkerEnd::Failed(f))) if f.vertex == "s"),
        "{msgs:?}"
    );
    // A part whose vertices wrote nothing sends no lines.
    let j = job(&[("say", SAY), ("print", PRINT)], "quiet");
    let msgs = serve_all(job_frames(&j).expect("frames"));
    let logs: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            FromWorker::Logs(l) => Some(l),
            _ => None,
        })
        .collect();
    assert_eq!(logs.len(), 1, "only p's output: {msgs:?}");
    assert_eq!(logs[0][0].text, "quiet");
}

/// Copies `in.txt` of its sandbox to `out.txt`, then traps if `TRAP` says so.
fn copy(trap: bool) -> String {
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $close (param i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "in.txt")
  (data (i32.const 16) "out.txt")
  (func (export "_start")
    (drop (call $open (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 6) (i32.const 0)
      (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 0) (i32.const 100)))
    (i32.store (i32.const 108) (i32.const 300))
    (i32.store (i32.const 112) (i32.const 64))
    (drop (call $read (i32.load (i32.const 100)) (i32.const 108) (i32.const 1) (i32.const 104)))
    (drop (call $close (i32.load (i32.const 100))))
    (drop (call $open (i32.const 3) (i32.const 0) (i32.const 16) (i32.const 7) (i32.const 9)
      (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 0) (i32.const 100)))
    (i32.store (i32.const 112) (i32.load (i32.const 104)))
    (drop (call $write (i32.load (i32.const 100)) (i32.const 108) (i32.const 1) (i32.const 120)))
    (drop (call $close (i32.load (i32.const 100))))
    {trap}))"#,
        trap = if trap { "unreachable" } else { "" }
    )
}

/// The files a worker gave back.
fn files_of(msgs: &[FromWorker]) -> Vec<GuestOutput> {
    let files = msgs.iter().find_map(|m| match m {
        FromWorker::Files(f) => Some(f.clone()),
        _ => None,
    });
    files.expect("the files are given back")
}

/// The files a worker gave back, as `VERTEX/PATH` and their bytes (none: named only).
fn given_back(msgs: &[FromWorker]) -> Vec<(String, u64, Option<Bytes>)> {
    let mut v: Vec<_> = files_of(msgs)
        .into_iter()
        .map(|f| (format!("{}/{}", f.vertex, f.path), f.size, f.bytes))
        .collect();
    v.sort();
    v
}

#[test]
fn a_worker_with_files_of_its_own_lays_the_inputs_out_and_gives_the_outputs_back_also_failing() {
    let (ok, trap) = (copy(false), copy(true));
    let mut j = job(&[("copy", &ok), ("trap", &trap)], "");
    j.topology = "digraph { a [component=copy]; b [component=trap] }".into();
    j.guest_files = Some(GuestFiles {
        inputs: vec![("in.txt".into(), Bytes::from_static(b"hello"))],
        outputs: vec!["*.txt".into()],
        output_bytes: 7,
    });
    let msgs = serve_all(job_frames(&j).expect("frames"));
    // b trapped, after it wrote: its files come back too. Within each vertex's 7 bytes, in.txt
    // comes back whole and out.txt by its size only.
    assert!(
        matches!(msgs.last(), Some(FromWorker::End(WorkerEnd::Failed(f))) if f.vertex == "b"),
        "{msgs:?}"
    );
    let hello = Some(Bytes::from_static(b"hello"));
    assert_eq!(
        given_back(&msgs),
        [
            ("a/in.txt".to_owned(), 5, hello.clone()),
            ("a/out.txt".to_owned(), 5, None),
            ("b/in.txt".to_owned(), 5, hello),
            ("b/out.txt".to_owned(), 5, None),
        ]
    );
    // The node mirrors them: a file over the bound holds no bytes (sparse), and a path out
    // of the sandbox is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let dirs = BTreeMap::from([
        ("a".to_owned(), dir.path().join("a")),
        ("b".to_owned(), dir.path().join("b")),
    ]);
    guest_files::mirror(&dirs, &files_of(&msgs)).expect("mirrored");
    assert_eq!(
        std::fs::read(dir.path().join("a/in.txt")).expect("read"),
        b"hello"
    );
    let out = std::fs::metadata(dir.path().join("b/out.txt")).expect("there");
    assert_eq!(out.len(), 5);
    let bad = [GuestOutput {
        vertex: "a".into(),
        path: "../escape".into(),
        size: 1,
        bytes: Some(Bytes::from_static(b"x")),
    }];
    let e = guest_files::mirror(&dirs, &bad).expect_err("refused");
    assert!(e.contains("climbs out"), "{e}");
    assert!(!dir.path().join("escape").exists());
}
