//! MPICH reference runs, measured in the same invocation as MVM's figures: the two small MPI
//! programs beside this file are compiled with `mpicc` into a temporary directory and run with
//! `mpiexec`. Without MPICH the figures are absent, and the report says why.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, anyhow, bail};

const PINGPONG_C: &str = include_str!("pingpong.c");
const RING_C: &str = include_str!("ring.c");

fn build(dir: &Path, name: &str, src: &str) -> anyhow::Result<std::path::PathBuf> {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, src).with_context(|| format!("cannot write {}", c.display()))?;
    let exe = dir.join(name);
    let out = Command::new("mpicc")
        .args(["-O2", "-o"])
        .arg(&exe)
        .arg(&c)
        .output()
        .map_err(|e| anyhow!("MPICH is not installed (mpicc: {e}); scripts/setup installs it"))?;
    if !out.status.success() {
        bail!(
            "mpicc failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(exe)
}

fn mpiexec(n: u32, exe: &Path, args: &[&str]) -> anyhow::Result<String> {
    mpiexec_env(n, exe, args, &[])
}

fn mpiexec_env(n: u32, exe: &Path, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<String> {
    let out = Command::new("mpiexec")
        .envs(env.iter().copied())
        .arg("-n")
        .arg(n.to_string())
        .arg(exe)
        .args(args)
        .output()
        .context("mpiexec")?;
    if !out.status.success() {
        bail!(
            "mpiexec failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// MPICH one-way latency in microseconds per size (8 B, 1 KiB, 64 KiB, 1 MiB), over shared memory.
pub(crate) fn pingpong() -> anyhow::Result<Vec<(usize, f64)>> {
    pingpong_env(&[])
}

/// As [`pingpong`], with MPICH forced onto TCP over loopback (no shared memory between ranks).
pub(crate) fn pingpong_tcp() -> anyhow::Result<Vec<(usize, f64)>> {
    pingpong_env(&[
        ("MPIR_CVAR_NOLOCAL", "1"),
        ("UCX_TLS", "tcp,self"),
        ("UCX_NET_DEVICES", "lo"),
    ])
}

fn pingpong_env(env: &[(&str, &str)]) -> anyhow::Result<Vec<(usize, f64)>> {
    let dir = tempfile::tempdir().context("a temporary directory")?;
    let exe = build(dir.path(), "pingpong", PINGPONG_C)?;
    let text = mpiexec_env(2, &exe, &[], env)?;
    text.lines()
        .map(|l| {
            let mut f = l.split_whitespace();
            match (
                f.next().and_then(|s| s.parse().ok()),
                f.next().and_then(|s| s.parse().ok()),
            ) {
                (Some(size), Some(us)) => Ok((size, us)),
                _ => Err(anyhow!("unexpected MPI output: {l}")),
            }
        })
        .collect()
}

/// MPICH token ring of `n` ranks: microseconds per hop.
pub(crate) fn ring(n: u32, laps: u32) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir().context("a temporary directory")?;
    let exe = build(dir.path(), "ring", RING_C)?;
    let text = mpiexec(n, &exe, &[&laps.to_string()])?;
    text.trim()
        .parse()
        .map_err(|_| anyhow!("unexpected MPI output: {text}"))
}

/// Wall time in seconds of `mpiexec -n N` running one lap of the ring program, from launch to
/// exit (the median of `runs`).
pub(crate) fn ring_wall(n: u32, runs: usize) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir().context("a temporary directory")?;
    let exe = build(dir.path(), "ring", RING_C)?;
    let mut times = Vec::new();
    for _ in 0..runs.max(1) {
        let t = std::time::Instant::now();
        mpiexec(n, &exe, &["1"])?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
