use std::sync::Arc;

use mvm_queue::codec::Registry;
use mvm_queue::controller::Limits as QueueLimits;
use mvm_queue::queue::Config;

use super::*;
use crate::topology::{Options, Topology, generate::generate};

/// The token ring job: the vertex with parameter `start` sends token 0; every vertex receives a
/// token, adds one, and forwards it until it reaches the `hops` parameter.
const TOKEN: &str = include_str!("../../../jobs/wat/token.wat");

fn runtime() -> Runtime {
    runtime_with(2)
}

/// A runtime with `dedicated` vertex threads (0: every vertex on the caller's pool).
pub(crate) fn runtime_with(dedicated: usize) -> Runtime {
    Runtime::new(&RuntimeConfig {
        max_instances: 1100,
        max_memory_bytes: 4 << 20,
        dedicated_threads: dedicated,
        ..RuntimeConfig::default()
    })
    .expect("runtime")
}

pub(crate) fn controller() -> Controller {
    Controller::new(QueueLimits::default(), Arc::new(Registry::new()))
}

pub(crate) fn topology(src: &str) -> Topology {
    let reg = Registry::new();
    Topology::parse(
        src,
        &Options {
            codecs: &reg,
            queue_defaults: Config::default(),
        },
    )
    .expect("valid topology")
}

fn spec<'a>(
    rt: &Runtime,
    t: &'a Topology,
    modules: &[(&str, &str)],
    params: &[(&str, &str)],
) -> JobSpec<'a> {
    let modules: Vec<(&str, &[u8])> = modules.iter().map(|(c, m)| (*c, m.as_bytes())).collect();
    spec_of(rt, t, &modules, params, false)
}

/// A job of `modules` (made checkpointable when `checkpointable`) with 1 MiB of memory per
/// vertex and a minute of wall time.
pub(crate) fn spec_of<'a>(
    rt: &Runtime,
    t: &'a Topology,
    modules: &[(&str, &[u8])],
    params: &[(&str, &str)],
    checkpointable: bool,
) -> JobSpec<'a> {
    JobSpec {
        id: "job".into(),
        topology: t,
        modules: modules
            .iter()
            .map(|(c, src)| {
                let m = if checkpointable {
                    rt.cache().load_checkpointable(c, src)
                } else {
                    rt.cache().load(c, src)
                };
                ((*c).to_owned(), m.expect("valid module").0)
            })
            .collect(),
        params: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        limits: Limits {
            memory_bytes: 1 << 20,
            cpu: None,
            wall: Some(Duration::from_secs(60)),
            ..Limits::default()
        },
        owner: None,
        sandboxes: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_ring_on_ring_8_moves_exactly_hops_items() {
    let rt = runtime();
    let t = topology(&generate("ring", "8").expect("ring"));
    let q = controller();
    let report = rt
        .run(
            &spec(&rt, &t, &[("token", TOKEN)], &[("hops", "1000")]),
            &q,
            &AllowAll,
        )
        .await
        .expect("runs");
    let moved: u64 = report.queues.iter().map(|s| s.items_in).sum();
    assert_eq!(moved, 1000);
    assert_eq!(report.vertices.len(), 8);
    assert!(q.is_empty(), "queues destroyed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_vertex_ring_runs_on_two_threads() {
    let rt = runtime();
    let t = topology(&generate("ring", "1000").expect("ring"));
    let q = controller();
    let report = rt
        .run(
            &spec(&rt, &t, &[("token", TOKEN)], &[("hops", "3000")]),
            &q,
            &AllowAll,
        )
        .await
        .expect("runs");
    assert_eq!(report.queues.iter().map(|s| s.items_in).sum::<u64>(), 3000);
    assert_eq!(report.vertices.len(), 1000);
}

const SINK_FOREVER: &str = r#"(module
  (import "mvm" "recv" (func $recv (param i32 i32 i32 i32) (result i64)))
  (memory (export "memory") 1)
  (data (i32.const 0) "in")
  (func (export "_start") (loop $l (drop (call $recv (i32.const 0) (i32.const 2) (i32.const 64) (i32.const 8))) (br $l))))"#;

fn pair() -> Topology {
    topology("digraph { a [component=a]; b [component=b]; a -> b; b:back -> a:in2 }")
}

/// Runs `a` beside a vertex that waits forever, on dedicated threads and on the shared pool;
/// the failure must be the same both ways, and the dedicated threads must come back.
async fn failure(a: &str, limits: Limits) -> JobError {
    let mut errors = Vec::new();
    for dedicated in [2, 0] {
        let rt = runtime_with(dedicated);
        let t = pair();
        let q = controller();
        let mut s = spec(&rt, &t, &[("a", a), ("b", SINK_FOREVER)], &[]);
        s.limits = limits;
        let e = rt.run(&s, &q, &AllowAll).await.expect_err("fails");
        assert!(q.is_empty(), "queues destroyed after a failure");
        if dedicated > 0 {
            assert_eq!(
                rt.inner.dedicated.started(),
                2,
                "the pair ran on dedicated threads"
            );
            // The cancelled vertices end on their threads, which become idle again.
            let back = (0..400).find_map(|_| {
                std::thread::sleep(Duration::from_millis(5));
                rt.inner.dedicated.take(dedicated)
            });
            assert!(back.is_some(), "the dedicated threads came back after {e}");
        }
        errors.push(e);
    }
    assert_eq!(
        errors[0], errors[1],
        "dedicated threads and the shared pool agree"
    );
    errors.remove(0)
}

fn limits() -> Limits {
    Limits {
        memory_bytes: 1 << 20,
        cpu: None,
        wall: Some(Duration::from_secs(20)),
        ..Limits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_names_the_vertex_and_cancels_the_others() {
    let e = failure(
        r#"(module (memory (export "memory") 1) (func (export "_start") unreachable))"#,
        limits(),
    )
    .await;
    assert_eq!(e.vertex, "a");
    assert_eq!(e.kind, ErrorKind::Trap, "{e}");
    assert!(
        e.cause.contains("trapped") && e.cause.contains("unreachable"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cpu_limit_stops_an_endless_loop() {
    let l = Limits {
        cpu: Some(Duration::from_millis(50)),
        ..limits()
    };
    let e = failure(
        r#"(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))"#,
        l,
    )
    .await;
    assert_eq!(e.vertex, "a");
    assert!(e.cause.contains("CPU limit"), "{e}");
    assert_eq!(e.kind, ErrorKind::CpuLimit, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wall_limit_stops_a_vertex_that_waits_forever() {
    let l = Limits {
        wall: Some(Duration::from_millis(200)),
        ..limits()
    };
    let waits = SINK_FOREVER
        .replace("\"in\"", "\"in2\"")
        .replace("i32.const 2) (i32.const 64)", "i32.const 3) (i32.const 64)");
    let e = failure(&waits, l).await;
    assert!(e.cause.contains("wall-time limit"), "{e}");
    assert_eq!(e.kind, ErrorKind::WallLimit, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_import_is_refused_at_instantiation() {
    let bad = r#"(module (import "mvm" "teleport" (func)) (memory (export "memory") 1) (func (export "_start")))"#;
    let e = failure(bad, limits()).await;
    assert!(
        e.cause.contains("cannot instantiate") && e.cause.contains("teleport"),
        "{e}"
    );
    assert_eq!(e.kind, ErrorKind::Setup, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_limit_traps_growth() {
    let grow = r#"(module (memory (export "memory") 1) (func (export "_start") (drop (memory.grow (i32.const 64)))))"#;
    let e = failure(grow, limits()).await;
    assert!(e.cause.contains("memory limit of"), "{e}");
    assert_eq!(e.kind, ErrorKind::Memory, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nonzero_exit_fails_the_job() {
    let exit = r#"(module
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (func (export "_start") (call $exit (i32.const 3))))"#;
    let e = failure(exit, limits()).await;
    assert!(e.cause.contains("exited with status 3"), "{e}");
    assert_eq!(e.kind, ErrorKind::Exit(3), "{e}");
}

struct DenyB;

impl PolicyHook for DenyB {
    fn check(&self, job: &JobSpec<'_>, local: &[usize]) -> Result<(), Refusal> {
        match local
            .iter()
            .find(|v| job.topology.vertices[**v].name == "b")
        {
            Some(_) => Err(Refusal {
                vertex: "b".into(),
                reason: "b may not run here".into(),
            }),
            None => Ok(()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_denial_instantiates_nothing() {
    let rt = runtime();
    let t = pair();
    let q = controller();
    let s = spec(&rt, &t, &[("a", SINK_FOREVER), ("b", SINK_FOREVER)], &[]);
    let e = rt.run(&s, &q, &DenyB).await.expect_err("denied");
    assert!(
        e.denied() && e.vertex == "b" && e.cause.contains("b may not run here"),
        "{e}"
    );
    assert!(q.is_empty(), "no queue was created");
}

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
    ;; a too-small buffer first: the item is kept, its length returned
    (local.set $n (call $recv (i32.const 0) (i32.const 2) (i32.const 1024) (i32.const 1)))
    (local.set $n (call $recv (i32.const 0) (i32.const 2) (i32.const 1024) (i32.const 60000)))
    (i32.store (i32.const 16) (i32.const 1024))
    (i32.store (i32.const 20) (i32.wrap_i64 (local.get $n)))
    (drop (call $write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 32)))))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codec_transforms_are_invisible_to_jobs_and_large_items_are_kept_for_a_bigger_buffer() {
    let rt = runtime();
    let msg = "hello, compressed world. ".repeat(48);
    let t = topology(&format!(
        r#"digraph {{ s [component=say, msg="{msg}"]; p [component=print]; s -> p [codec="zstd+raw"] }}"#
    ));
    let q = controller();
    let report = rt
        .run(
            &spec(&rt, &t, &[("say", SAY), ("print", PRINT)], &[]),
            &q,
            &AllowAll,
        )
        .await
        .expect("runs");
    let out = &report
        .vertices
        .iter()
        .find(|v| v.vertex == "p")
        .expect("p")
        .stdout;
    assert_eq!(&out[..], msg.as_bytes(), "the job saw the plain bytes");
    let carried = report.queues[0].bytes_in;
    assert!(
        carried < msg.len() as u64 / 4,
        "the queue carried {carried} compressed bytes for {}",
        msg.len()
    );
}

#[test]
fn the_cache_compiles_once_then_loads_from_memory_and_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = RuntimeConfig {
        cache_dir: Some(dir.path().join("cache")),
        max_instances: 4,
        ..RuntimeConfig::default()
    };
    let rt = Runtime::new(&cfg).expect("runtime");
    let (_, hash, s1) = rt.cache().load("token", TOKEN.as_bytes()).expect("valid");
    let (_, _, s2) = rt.cache().load("token", TOKEN.as_bytes()).expect("valid");
    assert_eq!((s1, s2), (Source::Compiled, Source::Memory));
    assert_eq!(hash, cache::content_hash(TOKEN.as_bytes()));
    let rt2 = Runtime::new(&cfg).expect("runtime");
    let (_, _, s3) = rt2.cache().load("token", TOKEN.as_bytes()).expect("valid");
    assert_eq!(s3, Source::Disk, "a new process skips compilation");
    let e = rt
        .cache()
        .load("junk.wasm", b"\0asm\x01\0\0\0\xff")
        .expect_err("invalid");
    assert!(
        e.to_string()
            .starts_with("junk.wasm: not a valid WebAssembly module"),
        "{e}"
    );
}

/// A ring split over three parts with their own controllers, joined by the queue layer's remote
/// endpoints over in-memory byte streams: the token makes every hop, across every cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_split_over_three_parts_runs_through_remote_endpoints() {
    use mvm_queue::remote::{Options as RemoteOptions, export_stream, import_stream};
    let rt = runtime();
    let t = topology(&generate("ring", "9").expect("ring"));
    let s = spec(&rt, &t, &[("token", TOKEN)], &[("hops", "300")]);
    let placement: Vec<usize> = (0..9).map(|v| v / 3).collect();
    let controllers: Vec<Controller> = (0..3).map(|_| controller()).collect();
    let mut parts: Vec<Prepared> = (0..3)
        .map(|p| {
            rt.prepare(&s, &controllers[p], &AllowAll, &placement, p)
                .expect("prepared")
        })
        .collect();
    // Every part sends to exactly one other part and hears from exactly one.
    for (p, part) in parts.iter().enumerate() {
        assert_eq!(part.vertices().count(), 3);
        assert_eq!(part.remote_outputs.len(), 1, "part {p}");
        assert_eq!(part.remote_inputs.len(), 1, "part {p}");
        assert_eq!(part.remote_outputs[0].to, (p + 1) % 3);
    }
    let mut links = tokio::task::JoinSet::new();
    let outputs: Vec<Vec<RemoteOutput>> = parts
        .iter_mut()
        .map(|p| std::mem::take(&mut p.remote_outputs))
        .collect();
    let mut inputs: Vec<Vec<RemoteInput>> = parts
        .iter_mut()
        .map(|p| std::mem::take(&mut p.remote_inputs))
        .collect();
    for (p, outs) in outputs.into_iter().enumerate() {
        for out in outs {
            let slot = inputs[out.to]
                .iter()
                .position(|i| i.from == p && i.vertex == out.vertex && i.port == out.port)
                .expect("a matching input");
            let input = inputs[out.to].swap_remove(slot);
            let (a, b) = tokio::io::duplex(1 << 16);
            links.spawn(async move {
                let o = RemoteOptions::default();
                let (e, i) = tokio::join!(
                    export_stream(&out.receiver, a, &o),
                    import_stream(input.sender, b, &o)
                );
                (e.expect("export").items, i.expect("import").items)
            });
        }
    }
    let runs: Vec<_> = parts.into_iter().map(|p| tokio::spawn(p.run())).collect();
    let mut vertices = 0;
    for r in runs {
        let report = r.await.expect("joined").expect("part runs");
        vertices += report.vertices.len();
    }
    let mut crossed = 0;
    while let Some(r) = links.join_next().await {
        let (sent, received) = r.expect("link");
        assert_eq!(sent, received);
        crossed += sent;
    }
    assert_eq!(vertices, 9);
    // 300 hops on a 9-ring cut into thirds: every third hop crosses a cut.
    assert_eq!(crossed, 100);
    let moved: u64 = controllers
        .iter()
        .flat_map(|c| c.destroy_job("job"))
        .filter(|s| !s.name.ends_with(">out"))
        .map(|s| s.items_in)
        .sum();
    assert_eq!(moved, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_policy_checks_owner_queue_kinds_codecs_and_queue_count_before_anything_runs() {
    use crate::policy::{Bundle, Cached, Node, NodePolicy, OsoEngine, Principal, PrincipalKind};
    let rt = runtime();
    let mut bundle = Bundle::default();
    bundle.files.insert(
        "node.polar".into(),
        "allow(u: User, \"run\", n: Node) if u.domain = n.domain;\n\
         queue_kind(\"fifo\");\ncodec(\"raw\");\nmax_queues(2);\n"
            .into(),
    );
    let engine = Arc::new(Cached::new(OsoEngine::load(&bundle, 1).expect("loads"), 64));
    let hook = NodePolicy::new(
        engine,
        Node {
            name: "n1".into(),
            domain: "physics".into(),
            roles: Vec::new(),
            group: "g".into(),
        },
    );
    let alice = Principal {
        kind: PrincipalKind::User,
        name: "alice".into(),
        domain: "physics".into(),
        roles: vec!["researcher".into()],
    };
    let modules = [
        ("a", SINK_FOREVER),
        ("b", SINK_FOREVER),
        ("c", SINK_FOREVER),
    ];
    let cases = [
        // (topology, owner's domain, the refusal must name)
        (
            "digraph { a [component=a]; b [component=b]; a -> b }",
            "biology",
            "run jobs",
        ),
        (
            "digraph { a [component=a]; b [component=b]; a -> b [queue=priority] }",
            "physics",
            "priority",
        ),
        (
            "digraph { a [component=a]; b [component=b]; a -> b [codec=json] }",
            "physics",
            "codec json",
        ),
        (
            "digraph { a [component=a]; b [component=b]; c [component=c]; a -> b; b -> c; c -> a }",
            "physics",
            "3 queues",
        ),
    ];
    for (src, domain, why) in cases {
        let t = topology(src);
        let q = controller();
        let mut s = spec(&rt, &t, &modules[..t.vertices.len()], &[]);
        s.owner = Some(Principal {
            domain: domain.into(),
            ..alice.clone()
        });
        let e = rt.run(&s, &q, &hook).await.expect_err(src);
        assert!(e.denied() && e.cause.contains(why), "{src}: {e}");
        assert!(q.is_empty(), "{src}: nothing was created");
    }
    // Within the settings, it runs (the sink ends when its sender has ended).
    let t = topology("digraph { a [component=a]; b [component=b]; a -> b }");
    let q = controller();
    let mut s = spec(&rt, &t, &[("a", NOTHING), ("b", DRAIN)], &[]);
    s.owner = Some(alice.clone());
    rt.run(&s, &q, &hook).await.expect("allowed");
    s.owner = None;
    let e = rt.run(&s, &q, &hook).await.expect_err("no owner");
    assert!(e.cause.contains("no owner"), "{e}");
}

/// Ends at once.
const NOTHING: &str = r#"(module (memory (export "memory") 1) (func (export "_start")))"#;

/// Receives on `in` until the end of the stream.
const DRAIN: &str = r#"(module
  (import "mvm" "recv" (func $recv (param i32 i32 i32 i32) (result i64)))
  (memory (export "memory") 1)
  (data (i32.const 0) "in")
  (func (export "_start")
    (loop $l (br_if $l (i64.ge_s (call $recv (i32.const 0) (i32.const 2) (i32.const 64) (i32.const 8)) (i64.const 0))))))"#;

/// Two jobs whose vertices together exceed the instance pool run one after the other: a
/// vertex waits for a slot that an ending job frees instead of failing (a node's new part
/// is often placed while the vertices of a cancelled one are still stopping).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vertex_waits_for_a_pool_slot_that_another_job_frees() {
    let rt = Runtime::new(&RuntimeConfig {
        max_instances: 4,
        max_memory_bytes: 4 << 20,
        dedicated_threads: 0,
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let t = topology(&generate("ring", "4").expect("ring"));
    let (qa, qb) = (controller(), controller());
    let (sa, mut sb) = (
        spec(&rt, &t, &[("token", TOKEN)], &[("hops", "20000")]),
        spec(&rt, &t, &[("token", TOKEN)], &[("hops", "100")]),
    );
    sb.id = "job-b".into();
    let (a, b) = tokio::join!(rt.run(&sa, &qa, &AllowAll), async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        rt.run(&sb, &qb, &AllowAll).await
    });
    let a = a.expect("the first job runs");
    let b = b.expect("the second waits for the first's slots, then runs");
    assert_eq!(a.queues.iter().map(|s| s.items_in).sum::<u64>(), 20000);
    assert_eq!(b.queues.iter().map(|s| s.items_in).sum::<u64>(), 100);
}

/// Reads `in.txt` from its sandbox and writes it to `copy.txt` there; exits 7 if `../secret`
/// opens (outside the sandbox), 8 if `in.txt` does not.
const COPY: &str = r#"(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "in.txt")
  (data (i32.const 16) "copy.txt")
  (data (i32.const 32) "../secret")
  (func $open_at (param $path i32) (param $len i32) (param $oflags i32) (result i32)
    (call $open (i32.const 3) (i32.const 0) (local.get $path) (local.get $len)
      (local.get $oflags) (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 0)
      (i32.const 100)))
  (func (export "_start") (local $fd i32) (local $n i32)
    (if (i32.eqz (call $open_at (i32.const 32) (i32.const 9) (i32.const 0)))
      (then (call $exit (i32.const 7))))
    (if (call $open_at (i32.const 0) (i32.const 6) (i32.const 0))
      (then (call $exit (i32.const 8))))
    (local.set $fd (i32.load (i32.const 100)))
    (i32.store (i32.const 108) (i32.const 1024))
    (i32.store (i32.const 112) (i32.const 4096))
    (if (call $read (local.get $fd) (i32.const 108) (i32.const 1) (i32.const 104))
      (then (call $exit (i32.const 9))))
    (local.set $n (i32.load (i32.const 104)))
    (drop (call $close (local.get $fd)))
    ;; O_CREAT | O_TRUNC
    (if (call $open_at (i32.const 16) (i32.const 8) (i32.const 9))
      (then (call $exit (i32.const 10))))
    (local.set $fd (i32.load (i32.const 100)))
    (i32.store (i32.const 112) (local.get $n))
    (if (call $write (local.get $fd) (i32.const 108) (i32.const 1) (i32.const 104))
      (then (call $exit (i32.const 11))))
    (drop (call $close (local.get $fd)))))"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_vertex_reaches_its_own_sandbox_and_nothing_else() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("secret"), b"not yours").expect("write");
    for (v, text) in [("a", "alpha"), ("b", "beta")] {
        std::fs::create_dir(dir.path().join(v)).expect("mkdir");
        std::fs::write(dir.path().join(v).join("in.txt"), text).expect("write");
    }
    let t = topology("digraph { a [component=copy]; b [component=copy] }");
    let q = controller();
    let mut s = spec(&rt, &t, &[("copy", COPY)], &[]);
    s.sandboxes = ["a", "b"]
        .iter()
        .map(|v| ((*v).to_owned(), dir.path().join(v)))
        .collect();
    rt.run(&s, &q, &AllowAll).await.expect("runs");
    for (v, text) in [("a", "alpha"), ("b", "beta")] {
        let copy = std::fs::read_to_string(dir.path().join(v).join("copy.txt")).expect("copied");
        assert_eq!(copy, text, "vertex {v} read its own input");
    }
    // Without a sandbox a vertex reaches no file at all.
    s.sandboxes.remove("b");
    let e = rt.run(&s, &q, &AllowAll).await.expect_err("b has no files");
    assert_eq!(
        (e.vertex.as_str(), e.kind),
        ("b", ErrorKind::Exit(8)),
        "{e}"
    );
}
