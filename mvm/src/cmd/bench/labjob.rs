//! What the benchmarks that run the C pipeline in a lab of node processes share: the lab and
//! its client, the pipeline's profiles, and waiting on a job.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mvm_superpeer::client::{Client, Prepared};
use mvm_superpeer::proto::{JobState, JobStatus};

use super::broker::{job, write};
use crate::cmd::daemon::LinksArg;
use crate::cmd::job::wire;
use crate::cmd::lab::{Lab, NetArgs, Transport};
use crate::exit::Failure;

/// A lab of 3 node processes and 1 super-peer over TCP in `dir/lab`, a runtime, and a client
/// of its broker.
pub(super) fn start(dir: &Path) -> Result<(Lab, tokio::runtime::Runtime, Client), Failure> {
    let net = NetArgs {
        transport: Transport::Tcp,
        links: LinksArg::Sealed,
        request_rate: mvm_superpeer::net::REQUEST_RATE,
    };
    let lab = Lab::start(&dir.join("lab"), 3, 1, false, net)?;
    let rt = super::tokio()?;
    let user = lab.user()?;
    let broker = lab.broker.clone();
    let client = rt.block_on(async {
        Client::find(&user, std::slice::from_ref(&broker))
            .await
            .map_err(wire)
    })?;
    Ok((lab, rt, client))
}

/// The C pipeline of 4 vertices (the modules of `jobs`) over `items` items, on at most 2
/// nodes: its profiles, written in `dir` ([`Pipeline::profile`]).
pub(super) struct Pipeline {
    dir: PathBuf,
    jobs: PathBuf,
    items: u64,
}

impl Pipeline {
    /// The pipeline's topology written in `dir`.
    pub(super) fn new(dir: &Path, jobs: &Path, items: u64) -> Result<Pipeline, Failure> {
        let failed = |e: String| Failure::failed(anyhow::anyhow!("bench: {e}"));
        let jobs =
            std::fs::canonicalize(jobs).map_err(|e| failed(format!("{}: {e}", jobs.display())))?;
        let topology = mvm_component::topology::generate::generate("pipeline", "4")
            .map_err(|e| failed(e.to_string()))?;
        write(dir, "pipeline.dot", &topology)?;
        Ok(Pipeline {
            dir: dir.to_owned(),
            jobs,
            items,
        })
    }

    /// Profile `NAME.toml` with `extra` (sections) at its end.
    pub(super) fn profile(&self, name: &str, extra: &str) -> Result<Prepared, Failure> {
        job(
            &self.dir,
            &format!("{name}.toml"),
            &format!(
                "name = \"{name}\"\ntopology = \"{d}/pipeline.dot\"\n[components]\nsource = \"{j}/pipe_source.wasm\"\nstage = \"{j}/pipe_stage.wasm\"\nsink = \"{j}/pipe_sink.wasm\"\n[parameters]\ncount = {items}\nfactor = 3\n[requirements]\nnodes = 2\n[limits]\nwall = \"600s\"\n{extra}",
                d = self.dir.display(),
                j = self.jobs.display(),
                items = self.items,
            ),
        )
    }
}

/// The job's status now.
pub(super) async fn status(c: &Client, s: &JobStatus) -> Result<JobStatus, Failure> {
    c.status(Some(&s.job))
        .await
        .map_err(wire)?
        .pop()
        .ok_or_else(|| Failure::failed(anyhow::anyhow!("bench: job {} is gone", s.job)))
}

/// Waits (up to `within`) until the job's state passes `pred`.
pub(super) async fn until(
    c: &Client,
    s: &JobStatus,
    pred: impl Fn(JobState) -> bool,
    within: Duration,
) -> Result<JobStatus, Failure> {
    let deadline = Instant::now() + within;
    loop {
        let now = status(c, s).await?;
        if pred(now.state) {
            return Ok(now);
        }
        if Instant::now() > deadline {
            return Err(Failure::failed(anyhow::anyhow!(
                "bench: job {} is still {:?}",
                s.job,
                now.state
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
