//! Benchmarks of jobs on one node, run by `mvm bench pingpong`, `mvm bench ring` and
//! `mvm bench checkpoint`.

pub mod checkpoint;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mvm_queue::Controller;
use mvm_queue::codec::Registry;
use mvm_queue::controller::Limits as QueueLimits;
use mvm_queue::queue::Config;
use serde::Serialize;
use wasmtime::{Linker, Module, Store};

use crate::runtime::{AllowAll, JobSpec, Limits, Runtime};
use crate::topology::generate::generate;
use crate::topology::{Options, Topology};

/// The ping-pong job (`jobs/wat/pingpong.wat`).
pub const PINGPONG_WAT: &str = include_str!("../../../jobs/wat/pingpong.wat");
/// The token ring job (`jobs/wat/token.wat`).
pub const TOKEN_WAT: &str = include_str!("../../../jobs/wat/token.wat");
const NOOP_WAT: &str = r#"(module (memory (export "memory") 1) (func (export "_start")))"#;

/// A benchmark could not run.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BenchError(String);

pub(crate) fn err(e: impl std::fmt::Display) -> BenchError {
    BenchError(e.to_string())
}

pub(crate) fn topology(src: &str, queue: Config) -> Result<Topology, BenchError> {
    let reg = Registry::new();
    Topology::parse(
        src,
        &Options {
            codecs: &reg,
            queue_defaults: queue,
        },
    )
    .map_err(|d| BenchError(format!("bench topology: {d:?}")))
}

async fn run_job(
    rt: &Runtime,
    t: &Topology,
    modules: &[(&str, &str)],
    params: &[(&str, String)],
) -> Result<crate::runtime::JobReport, BenchError> {
    let spec = job_spec(rt, t, modules, params)?;
    let q = Controller::new(QueueLimits::default(), Arc::new(Registry::new()));
    rt.run(&spec, &q, &AllowAll).await.map_err(err)
}

/// As [`run_job`], the vertices run from a task of their own, as a node runs a part of a job:
/// how long they took.
async fn run_part(
    rt: &Runtime,
    t: &Topology,
    modules: &[(&str, &str)],
) -> Result<Duration, BenchError> {
    let spec = job_spec(rt, t, modules, &[])?;
    let q = Controller::new(QueueLimits::default(), Arc::new(Registry::new()));
    let here = vec![0; t.vertices.len()];
    let prepared = rt.prepare(&spec, &q, &AllowAll, &here, 0).map_err(err)?;
    let report = tokio::spawn(prepared.run()).await.map_err(err)?;
    q.destroy_job(&spec.id);
    Ok(report.map_err(err)?.wall)
}

/// The spec of a job of topology `t` with `modules` (name, WAT) and `params`.
fn job_spec<'a>(
    rt: &Runtime,
    t: &'a Topology,
    modules: &[(&str, &str)],
    params: &[(&str, String)],
) -> Result<JobSpec<'a>, BenchError> {
    let mut map = HashMap::new();
    for (name, src) in modules {
        map.insert(
            (*name).to_owned(),
            rt.cache().load(name, src.as_bytes()).map_err(err)?.0,
        );
    }
    let spec = JobSpec {
        id: "bench".into(),
        topology: t,
        modules: map,
        params: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
        limits: Limits {
            memory_bytes: 2 << 20,
            cpu: None,
            wall: Some(Duration::from_secs(300)),
            ..Limits::default()
        },
        owner: None,
        sandboxes: Default::default(),
    };
    Ok(spec)
}

/// One ping-pong size.
#[derive(Debug, Clone, Serialize)]
pub struct PingPong {
    /// Message size in bytes.
    pub size: usize,
    /// Round trips timed.
    pub iters: u64,
    /// Half the round-trip time, in microseconds.
    pub one_way_us: f64,
    /// size / one-way time, in MB/s.
    pub mb_per_sec: f64,
}

/// Ping-pong between two WebAssembly vertices on this node.
///
/// # Errors
/// The job failed or printed no timing.
pub async fn pingpong(rt: &Runtime, size: usize, iters: u64) -> Result<PingPong, BenchError> {
    let queue = Config {
        capacity: 4,
        capacity_bytes: 4 << 20,
        ..Config::default()
    };
    let t = topology(
        "digraph { a [component=pp, lead=\"1\"]; b [component=pp]; a:out -> b:in; b:out -> a:in }",
        queue,
    )?;
    let params = [
        ("size", size.to_string()),
        ("iters", iters.to_string()),
        ("warmup", (iters / 10 + 10).to_string()),
    ];
    let report = run_job(rt, &t, &[("pp", PINGPONG_WAT)], &params).await?;
    let text = report
        .vertices
        .iter()
        .find(|v| v.vertex == "a")
        .map(|v| String::from_utf8_lossy(&v.stdout).into_owned());
    let ns: f64 = text
        .as_deref()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| BenchError(format!("pingpong printed no time: {text:?}")))?;
    let one_way = ns / iters as f64 / 2.0;
    Ok(PingPong {
        size,
        iters,
        one_way_us: one_way / 1e3,
        mb_per_sec: size as f64 / one_way * 1e3,
    })
}

/// The time per hop of a token ring of `n` WebAssembly vertices on this node, in microseconds.
/// Two runs of different lengths are subtracted, so instantiation cancels out.
///
/// # Errors
/// The job failed.
pub async fn ring(rt: &Runtime, n: usize, hops: u64) -> Result<f64, BenchError> {
    let t = topology(
        &generate("ring", &n.to_string()).map_err(err)?,
        Config::default(),
    )?;
    let short = (n as u64).max(hops / 10);
    let a = run_job(
        rt,
        &t,
        &[("token", TOKEN_WAT)],
        &[("hops", short.to_string())],
    )
    .await?
    .wall;
    let b = run_job(
        rt,
        &t,
        &[("token", TOKEN_WAT)],
        &[("hops", hops.to_string())],
    )
    .await?
    .wall;
    Ok(b.saturating_sub(a).as_secs_f64() * 1e6 / (hops - short).max(1) as f64)
}

/// Instantiation cost per vertex, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Instantiation {
    /// Vertices per measurement.
    pub vertices: usize,
    /// Through MVM: a job of `vertices` vertices that return at once, run from a task as a
    /// node runs a part (each vertex's task, store, instance, call and report; its queues are
    /// wired before the clock starts), the module already cached. Its vertices run on every
    /// worker thread, as a node's do; bare wasmtime below runs them one after another.
    pub mvm_us_per_vertex: f64,
    /// Bare wasmtime with the same pooling engine: store, instantiate, call.
    pub bare_us_per_vertex: f64,
    /// mvm / bare (goal: at most 1.2).
    pub ratio: f64,
}

/// Rounds of the instantiation measurement.
const ROUNDS: usize = 7;

/// Measures instantiation from the cache, through MVM and bare (the median of 7 rounds each).
///
/// # Errors
/// A job or an instantiation failed.
pub async fn instantiation(rt: &Runtime, n: usize) -> Result<Instantiation, BenchError> {
    let t = topology(
        &generate("ring", &n.to_string()).map_err(err)?,
        Config::default(),
    )?;
    run_job(rt, &t, &[("token", NOOP_WAT)], &[]).await?; // warm the cache and the pool
    let module: Module = rt.cache().load("noop", NOOP_WAT.as_bytes()).map_err(err)?.0;
    let linker: Linker<()> = Linker::new(rt.engine());
    // Rounds of each, interleaved, and the median of each: one round is a few milliseconds,
    // short enough for a stray wake-up to skew it. The job's vertices run from a task of their
    // own, as a node runs a part: driven from `block_on` instead, every vertex's end would wake
    // the caller's thread through the kernel, a cost no node pays. Bare wasmtime runs where the
    // caller is (in `mvm bench`, `block_on`'s thread), its fastest: in a task it was slower
    // here (3.8 against 3.1 us a vertex).
    let (mut mvms, mut bares) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        mvms.push(run_part(rt, &t, &[("token", NOOP_WAT)]).await?);
        bares.push(bare(rt.engine(), &linker, &module, n).await?);
    }
    mvms.sort();
    bares.sort();
    let (mvm, bare) = (mvms[ROUNDS / 2], bares[ROUNDS / 2]);
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    Ok(Instantiation {
        vertices: n,
        mvm_us_per_vertex: per(mvm),
        bare_us_per_vertex: per(bare),
        ratio: per(mvm) / per(bare).max(1e-9),
    })
}

/// Bare wasmtime: `n` stores in turn, each instantiating `module` and calling its `_start`.
async fn bare(
    engine: &wasmtime::Engine,
    linker: &Linker<()>,
    module: &Module,
    n: usize,
) -> Result<Duration, BenchError> {
    let start = Instant::now();
    for _ in 0..n {
        let mut store = Store::new(engine, ());
        store.epoch_deadline_async_yield_and_update(1);
        let instance = linker
            .instantiate_async(&mut store, module)
            .await
            .map_err(err)?;
        let f = instance
            .get_typed_func::<(), ()>(&mut store, "_start")
            .map_err(err)?;
        f.call_async(&mut store, ()).await.map_err(err)?;
    }
    Ok(start.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::RuntimeConfig;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_benchmarks_run_and_measure_something() {
        let rt = Runtime::new(&RuntimeConfig {
            max_instances: 64,
            ..RuntimeConfig::default()
        })
        .expect("runtime");
        let p = pingpong(&rt, 1024, 200).await.expect("pingpong");
        // Only that something was measured: speed is for `mvm bench`, not for a loaded test run.
        assert!(p.one_way_us > 0.0 && p.one_way_us.is_finite(), "{p:?}");
        // Enough hops that the two runs' difference outweighs instantiation noise (800 hops,
        // under a millisecond, once came out at zero).
        let per_hop = ring(&rt, 8, 20_000).await.expect("ring");
        assert!(per_hop > 0.0 && per_hop.is_finite(), "{per_hop}");
        let i = instantiation(&rt, 16).await.expect("instantiation");
        assert!(
            i.mvm_us_per_vertex > 0.0 && i.bare_us_per_vertex > 0.0,
            "{i:?}"
        );
    }
}
