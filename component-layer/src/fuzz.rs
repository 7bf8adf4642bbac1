//! Entry points of the fuzz targets in `fuzz/` (`scripts/fuzz`): each takes arbitrary bytes and
//! drives one of this crate's parsers (or the host ABI) with them. Not an API: hidden, and
//! changed at will. A target returns normally on every input; a panic is a bug.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mvm_queue::codec::Registry;
use mvm_queue::controller::{Controller, Limits as QueueLimits};
use mvm_queue::queue::Config;
use sha2::{Digest, Sha256};

use crate::policy::{Bundle, Engine, OsoEngine};
use crate::profile::Profile;
use crate::runtime::checkpoint::image::{MAGIC, PartImage};
use crate::runtime::{AllowAll, JobSpec, Limits, Runtime, RuntimeConfig};
use crate::topology::{Options, Topology};

/// A topology file (DOT).
pub fn topology(data: &[u8]) {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let reg = Registry::new();
    let options = Options {
        codecs: &reg,
        queue_defaults: Config::default(),
    };
    if let Ok(t) = Topology::parse(src, &options) {
        std::hint::black_box(t.graph().edge_count());
    }
}

/// A job profile (TOML), and every check a submission makes of it.
pub fn profile(data: &[u8]) {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = toml::from_str::<Profile>(src) else {
        return;
    };
    let file = "fuzz.toml";
    let _ = p.limits(file, src);
    let _ = p.checkpoints(file, src);
    let _ = p.estimate(file, src);
    let _ = p.files(file, src);
    let _ = p.queue_defaults(file, src, &Registry::new());
    if let Ok(axes) = p.sweep(file, src)
        && axes.iter().map(|(_, v)| v.len()).product::<usize>() <= 4096
    {
        std::hint::black_box(Profile::points(&axes));
    }
    std::hint::black_box(p.parameter_strings());
}

/// A checkpoint blob, decoded and, when it decodes, restored into the driver job (made
/// checkpointable) and run. First byte even: the rest is the blob as stored. Odd: the rest is
/// a blob's body, given a valid header (what a node that forged its checkpoint could store).
pub fn checkpoint(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let blob = if first & 1 == 0 {
        rest.to_vec()
    } else {
        let mut b = Vec::with_capacity(MAGIC.len() + 32 + rest.len());
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&Sha256::digest(rest));
        b.extend_from_slice(rest);
        b
    };
    let Ok(image) = PartImage::decode(&blob) else {
        return;
    };
    let abi = abi();
    let job = driver_job(abi, pausable().clone(), &[]);
    let q = queues();
    let mut part = abi
        .runtime
        .prepare(&job, &q, &AllowAll, &[0, 0], 0)
        .unwrap_or_else(|e| panic!("the driver job cannot be prepared: {e}"));
    match part.restore(&image) {
        Ok(()) => {
            let report = abi.tokio.block_on(part.run());
            std::hint::black_box(report.is_ok());
        }
        Err(_) => drop(part),
    }
}

/// Checkpoints of the driver job (made checkpointable) paused while it runs the script
/// `script`: seeds for [`checkpoint`].
///
/// # Panics
/// The job cannot be run or paused.
pub fn checkpoint_seeds(script: &[u8]) -> Vec<Vec<u8>> {
    let abi = abi();
    let job = driver_job(abi, pausable().clone(), script);
    let q = queues();
    let part = abi
        .runtime
        .prepare(&job, &q, &AllowAll, &[0, 0], 0)
        .unwrap_or_else(|e| panic!("the driver job cannot be prepared: {e}"));
    let Some(control) = part.control() else {
        panic!("the driver job is not checkpointable");
    };
    abi.tokio.block_on(async {
        let run = tokio::spawn(part.run());
        let mut seeds = Vec::new();
        for _ in 0..3 {
            match control.pause(Duration::from_secs(5)).await {
                Ok(p) => {
                    if let Ok(b) = p.image().encode() {
                        seeds.push(b);
                    }
                    p.resume();
                }
                Err(e) => panic!("the driver job does not pause: {e}"),
            }
        }
        let _ = run.await;
        seeds
    })
}

/// A module's bytes as a broker checks them: valid WebAssembly, and checkpointable.
pub fn module(data: &[u8]) {
    static ENGINE: OnceLock<wasmtime::Engine> = OnceLock::new();
    let _ = crate::runtime::checkpoint::check_checkpointable(data);
    let _ = wasmtime::Module::validate(ENGINE.get_or_init(wasmtime::Engine::default), data);
}

/// A policy bundle as fetched from a super-peer: files separated by `\0`, each `PATH\nTEXT`,
/// loaded, then asked a few questions.
pub fn policy(data: &[u8]) {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let mut bundle = Bundle::default();
    for part in src.split('\0').take(8) {
        let (path, text) = part.split_once('\n').unwrap_or((part, ""));
        bundle.files.insert(path.to_owned(), text.to_owned());
    }
    let Ok(engine) = OsoEngine::load(&bundle, 1) else {
        return;
    };
    for q in crate::policy::bench::questions(&bundle).iter().take(4) {
        std::hint::black_box(engine.decide(q));
        std::hint::black_box(engine.inter_domain(q));
        let _ = engine.job_rules(&q.actor, &q.actor.domain);
    }
}

/// The queues of one run: its own, so that runs on several threads (tests) do not meet.
fn queues() -> Controller {
    Controller::new(QueueLimits::default(), Arc::new(Registry::new()))
}

/// What the host ABI target keeps across runs.
struct Abi {
    runtime: Runtime,
    tokio: tokio::runtime::Runtime,
    module: wasmtime::Module,
    topology: Topology,
}

/// The driver made checkpointable (by binaryen's wasm-opt: only for the targets that need it).
fn pausable() -> &'static wasmtime::Module {
    static PAUSABLE: OnceLock<wasmtime::Module> = OnceLock::new();
    PAUSABLE.get_or_init(|| {
        abi()
            .runtime
            .cache()
            .load_checkpointable("driver", DRIVER.as_bytes())
            .unwrap_or_else(|e| panic!("the fuzz target's checkpointable driver: {e}"))
            .0
    })
}

fn abi() -> &'static Abi {
    static ABI: OnceLock<Abi> = OnceLock::new();
    ABI.get_or_init(|| {
        let runtime = Runtime::new(&RuntimeConfig {
            max_instances: 16,
            max_memory_bytes: 1 << 20,
            dedicated_threads: 0,
            ..RuntimeConfig::default()
        })
        .unwrap_or_else(|e| panic!("the fuzz target's runtime: {e}"));
        let (module, _, _) = runtime
            .cache()
            .load("driver", DRIVER.as_bytes())
            .unwrap_or_else(|e| panic!("the fuzz target's driver module: {e}"));
        let reg = Registry::new();
        let topology = Topology::parse(
            "digraph { node [component=driver]; a:out -> b:in [capacity=4] }",
            &Options {
                codecs: &reg,
                queue_defaults: Config::default(),
            },
        )
        .unwrap_or_else(|e| panic!("the fuzz target's topology: {e:?}"));
        Abi {
            runtime,
            tokio: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("the fuzz target's tokio: {e}")),
            module,
            topology,
        }
    })
}

/// The module the host ABI target runs in two vertices (`a:out -> b:in`): it reads a script
/// from its parameter `s` (hex) and calls the host's imports as it says, with the script's
/// numbers as pointers, lengths and port names. Each step is an opcode byte and four i32
/// (little-endian): 0 send, 1 recv, 2 try_recv, 3 ports, 4 param, 5 log, 6 yield, 7 send on
/// `out` and 8 recv on `in` (their pointers and lengths masked into the memory), 9 memory.grow.
const DRIVER: &str = r#"(module
  (import "mvm" "send" (func $send (param i32 i32 i32 i32) (result i32)))
  (import "mvm" "recv" (func $recv (param i32 i32 i32 i32) (result i64)))
  (import "mvm" "try_recv" (func $try_recv (param i32 i32 i32 i32) (result i64)))
  (import "mvm" "ports" (func $ports (param i32 i32) (result i32)))
  (import "mvm" "param" (func $param (param i32 i32 i32 i32) (result i32)))
  (import "mvm" "log" (func $log (param i32 i32 i32)))
  (import "mvm" "yield" (func $yield))
  (memory (export "memory") 1)
  (data (i32.const 0) "out")
  (data (i32.const 8) "in")
  (data (i32.const 16) "s")
  (func $nib (param $c i32) (result i32)
    (if (result i32) (i32.ge_u (local.get $c) (i32.const 97))
      (then (i32.and (i32.sub (local.get $c) (i32.const 87)) (i32.const 15)))
      (else (i32.and (i32.sub (local.get $c) (i32.const 48)) (i32.const 15)))))
  (func (export "_start")
    (local $n i32) (local $i i32) (local $pc i32) (local $op i32)
    (local $a i32) (local $b i32) (local $c i32) (local $d i32)
    ;; the script, hex, at 1024 (at most 8 KiB); its bytes at 16384
    (local.set $n (call $param (i32.const 16) (i32.const 1) (i32.const 1024) (i32.const 8192)))
    (if (i32.lt_s (local.get $n) (i32.const 0)) (then (return)))
    (local.set $n (i32.shr_u (local.get $n) (i32.const 1)))
    (block $done (loop $hex
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (i32.store8 (i32.add (i32.const 16384) (local.get $i))
        (i32.or
          (i32.shl (call $nib (i32.load8_u (i32.add (i32.const 1024) (i32.shl (local.get $i) (i32.const 1))))) (i32.const 4))
          (call $nib (i32.load8_u (i32.add (i32.const 1025) (i32.shl (local.get $i) (i32.const 1)))))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $hex)))
    (block $end (loop $step
      (br_if $end (i32.gt_u (i32.add (local.get $pc) (i32.const 17)) (local.get $n)))
      (local.set $op (i32.rem_u (i32.load8_u (i32.add (i32.const 16384) (local.get $pc))) (i32.const 10)))
      (local.set $a (i32.load (i32.add (i32.const 16385) (local.get $pc))))
      (local.set $b (i32.load (i32.add (i32.const 16389) (local.get $pc))))
      (local.set $c (i32.load (i32.add (i32.const 16393) (local.get $pc))))
      (local.set $d (i32.load (i32.add (i32.const 16397) (local.get $pc))))
      (local.set $pc (i32.add (local.get $pc) (i32.const 17)))
      (block $next
        (br_if $next (i32.ne (local.get $op) (i32.const 0)))
        (drop (call $send (local.get $a) (local.get $b) (local.get $c) (local.get $d))))
      (block $next
        (br_if $next (i32.ne (local.get $op) (i32.const 1)))
        (drop (call $recv (local.get $a) (local.get $b) (local.get $c) (local.get $d))))
      (block $next
        (br_if $next (i32.ne (local.get $op) (i32.const 2)))
        (drop (call $try_recv (local.get $a) (local.get $b) (local.get $c) (local.get $d))))
      (block $next
        (br_if $next (i32.ne (local.get $op) (i32.const 3)))
        (drop (call $ports (local.get $a) (local.get $b))))
      (block $next
        (br_if $next (i32.ne (local.get $op) (i32.const 4)))
        (drop (call $param (local.get $a) (local.get $b) (local.get $c) (local.get $d))))
      (block $next
        (br_if $next (i32.ne (local.get $op) (i32.const 5)))
        (call $log (local.get $a) (local.get $b) (local.get $c)))
      (block $next
        (br_if $next (i32.ne (local.get $op) (i32.const 6)))
        (call $yield))
      (block $next
        (br_if $next (i32.ne (local.get $op) (i32.const 7)))
        (drop (call $send (i32.const 0) (i32.const 3)
          (i32.and (local.get $c) (i32.const 32767)) (i32.and (local.get $d) (i32.const 16383)))))
      (block $next
        (br_if $next (i32.ne (local.get $op) (i32.const 8)))
        (drop (call $recv (i32.const 8) (i32.const 2)
          (i32.and (local.get $c) (i32.const 32767)) (i32.and (local.get $d) (i32.const 32767)))))
      (block $next
        (br_if $next (i32.ne (local.get $op) (i32.const 9)))
        (drop (memory.grow (i32.and (local.get $a) (i32.const 15)))))
      (br $step)))))
"#;

/// The host ABI: the bytes are the driver module's script ([`DRIVER`]), run as a job of two
/// vertices. Traps and failed jobs are fine; a panic or a hang is not.
pub fn host_abi(data: &[u8]) {
    let abi = abi();
    let job = driver_job(abi, abi.module.clone(), data);
    let report = abi
        .tokio
        .block_on(abi.runtime.run(&job, &queues(), &AllowAll));
    std::hint::black_box(report.is_ok());
}

/// The driver job of `module` with `script`.
fn driver_job<'a>(abi: &'a Abi, module: wasmtime::Module, script: &[u8]) -> JobSpec<'a> {
    let script: String = script
        .iter()
        .take(4096)
        .map(|b| format!("{b:02x}"))
        .collect();
    JobSpec {
        id: "fuzz".into(),
        topology: &abi.topology,
        modules: [("driver".to_owned(), module)].into(),
        params: BTreeMap::from([("s".to_owned(), script)]),
        limits: Limits {
            memory_bytes: 1 << 20,
            cpu: None,
            wall: Some(Duration::from_secs(2)),
            log_bytes: 4096,
        },
        owner: None,
        sandboxes: BTreeMap::new(),
    }
}
