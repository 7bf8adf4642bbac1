//! `mvm bench staging`: how fast a job's input files go from the submitter to its vertices'
//! sandboxes (sent to the leading super-peer, fetched by the node, laid out), on a local lab
//! of real processes, beside raw TCP on loopback in the same run.

use std::time::Instant;

use mvm_superpeer::client::Client;
use serde::Serialize;

use super::broker::{NOOP_WAT, job, median, raw_tcp, run_one, write};
use crate::cmd::daemon::LinksArg;
use crate::cmd::job::wire;
use crate::cmd::lab::{Lab, NetArgs, Transport};
use crate::exit::Failure;

/// What `mvm bench staging` reports.
#[derive(Debug, Serialize)]
pub(crate) struct StagingReport {
    /// Bytes of input files per run, in `files` files.
    pub(crate) input_bytes: u64,
    /// Input files per run.
    pub(crate) files: u32,
    /// Super-peers (replicas of the job log; the leader passes every file on to the others).
    pub(crate) superpeers: u32,
    /// Runs (each with files of new content, so that nothing is held already).
    pub(crate) runs: u32,
    /// Median MB/s from the submission's start (its files sent to the leader) to the job's
    /// end (the node has fetched them and laid them out in the vertex's sandbox, and the
    /// vertex ran): the staging throughput.
    pub(crate) end_to_end_mb_per_sec: f64,
    /// Median MB/s of the sending alone (submitter to the leading super-peer).
    pub(crate) upload_mb_per_sec: f64,
    /// Median MB/s of the job alone (the node's fetch from the leader and the layout), from
    /// the broker's record of the job.
    pub(crate) fetch_and_lay_out_mb_per_sec: f64,
    /// Median milliseconds of the same job without files (what every job costs).
    pub(crate) job_without_files_ms: f64,
    /// Raw TCP on loopback: 1 MiB messages, MB/s (the yardstick).
    pub(crate) raw_tcp_1mib_mb_per_sec: f64,
    /// end-to-end / raw TCP (goal: at least 0.5).
    pub(crate) ratio: f64,
}

/// Fills `buf` with bytes of `seed` (xorshift: cheap, and new content for every seed).
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// Runs the benchmark: `runs` jobs, each with `files` input files of `mib` MiB in all.
pub(crate) fn run(
    mib: u32,
    files: u32,
    runs: u32,
    superpeers: u32,
) -> Result<StagingReport, Failure> {
    let tmp = tempfile::Builder::new()
        .prefix("mvm-bench-staging-")
        .tempdir()
        .map_err(Failure::failed)?;
    let d = tmp.path();
    let root = d.display().to_string();
    write(d, "noop.wat", NOOP_WAT)?;
    write(d, "one.dot", "digraph one { v [component=\"noop\"]; }\n")?;
    let plain = job(
        d,
        "plain.toml",
        &format!(
            "name = \"plain\"\ntopology = \"{root}/one.dot\"\n[components]\nnoop = \"{root}/noop.wat\"\n"
        ),
    )?;
    let bytes = u64::from(mib) << 20;
    let per_file = usize::try_from(bytes / u64::from(files.max(1))).map_err(Failure::failed)?;
    let net = NetArgs {
        transport: Transport::Tcp,
        links: LinksArg::Sealed,
        request_rate: mvm_superpeer::net::REQUEST_RATE,
    };
    let lab = Lab::start(&d.join("lab"), 1, superpeers, false, net)?;
    let rt = super::tokio()?;
    let broker = lab.broker.clone();
    let (e2e, upload, fetch, plain_ms) = rt.block_on(async {
        let client = Client::find(&lab.user()?, std::slice::from_ref(&broker))
            .await
            .map_err(wire)?;
        let mut plain_ms = Vec::new();
        for _ in 0..4 {
            plain_ms.push(run_one(&client, &plain).await?.1.as_secs_f64() * 1e3);
        }
        let (mut e2e, mut upload, mut fetch) = (Vec::new(), Vec::new(), Vec::new());
        let mut buf = vec![0u8; per_file];
        for r in 0..runs {
            let data = d.join(format!("data{r}"));
            std::fs::create_dir_all(&data).map_err(Failure::failed)?;
            for f in 0..files {
                fill(&mut buf, u64::from(r) << 32 | u64::from(f));
                std::fs::write(data.join(format!("part{f}.bin")), &buf).map_err(Failure::failed)?;
            }
            let staged = job(
                d,
                &format!("staged{r}.toml"),
                &format!(
                    "name = \"staged\"\ntopology = \"{root}/one.dot\"\n[components]\nnoop = \"{root}/noop.wat\"\n[files]\ninputs = [\"data{r}/\"]\nmax_input = \"16GiB\"\n"
                ),
            )?;
            let t = Instant::now();
            let (s, took) = run_one(&client, &staged).await?;
            let total = took.as_secs_f64();
            let job_secs = (s.wall_ms as f64 / 1e3).min(total);
            let mb = (u64::from(files) * per_file as u64) as f64 / 1e6;
            e2e.push(mb / total);
            upload.push(mb / (total - job_secs).max(1e-6));
            fetch.push(mb / job_secs.max(1e-6));
            let _ = t;
            let _ = std::fs::remove_dir_all(&data);
        }
        Ok::<_, Failure>((median(e2e), median(upload), median(fetch), median(plain_ms)))
    })?;
    drop(lab);
    let (_, raw) = raw_tcp()?;
    Ok(StagingReport {
        input_bytes: u64::from(files) * per_file as u64,
        files,
        superpeers,
        runs,
        end_to_end_mb_per_sec: e2e,
        upload_mb_per_sec: upload,
        fetch_and_lay_out_mb_per_sec: fetch,
        job_without_files_ms: plain_ms,
        raw_tcp_1mib_mb_per_sec: raw,
        ratio: e2e / raw,
    })
}

/// The report as text.
pub(crate) fn text(r: &StagingReport) -> String {
    format!(
        "staging {} MiB in {} files (median of {} runs, {} super-peer(s))\n  \
         submitter to sandbox   {:>8.1} MB/s\n  \
         sending to the leader  {:>8.1} MB/s\n  \
         node fetch + layout    {:>8.1} MB/s\n  \
         raw TCP (1 MiB)        {:>8.1} MB/s\n  \
         staging / raw TCP      {:>8.2}   (goal >= 0.5)\n  \
         a job without files    {:>8.1} ms",
        r.input_bytes >> 20,
        r.files,
        r.runs,
        r.superpeers,
        r.end_to_end_mb_per_sec,
        r.upload_mb_per_sec,
        r.fetch_and_lay_out_mb_per_sec,
        r.raw_tcp_1mib_mb_per_sec,
        r.ratio,
        r.job_without_files_ms,
    )
}
