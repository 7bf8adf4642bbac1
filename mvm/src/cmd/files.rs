//! `mvm fetch`: a job's output files, brought back from its super-peer.

use std::path::{Path, PathBuf};

use mvm_superpeer::client::Client;
use mvm_superpeer::proto::{JobId, JobStatus};
use serde::Serialize;

use crate::OutputArg;
use crate::cmd::job::{BrokerArg, connect, runtime, wire};
use crate::exit::Failure;

/// Arguments of `mvm fetch`.
#[derive(Debug, clap::Args)]
pub(crate) struct FetchArgs {
    /// The job id.
    job: JobId,
    /// Where to write them, each at DIR/VERTEX/PATH (default: ./JOB).
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    #[command(flatten)]
    broker: BrokerArg,
    #[command(flatten)]
    out: OutputArg,
}

/// What `mvm fetch` (and `mvm submit --output-dir`) wrote.
#[derive(Debug, Serialize)]
pub(crate) struct Fetched {
    job: JobId,
    dir: PathBuf,
    /// Each file: its vertex, its path in the vertex's sandbox, its size, and where it is now.
    files: Vec<FetchedFile>,
}

#[derive(Debug, Serialize)]
struct FetchedFile {
    vertex: String,
    path: String,
    bytes: u64,
    at: PathBuf,
}

impl Fetched {
    /// How many files.
    pub(crate) fn len(&self) -> usize {
        self.files.len()
    }

    /// One line per file.
    pub(crate) fn text(&self) -> String {
        if self.files.is_empty() {
            return format!("job {} left no output files", self.job);
        }
        let lines: Vec<String> = self
            .files
            .iter()
            .map(|f| format!("{}  {} bytes", f.at.display(), f.bytes))
            .collect();
        lines.join("\n")
    }
}

/// Writes the output files of `s` under `dir`.
pub(crate) async fn fetch_into(
    client: &Client,
    s: &JobStatus,
    dir: &Path,
) -> Result<Fetched, Failure> {
    let written = client.fetch_outputs(s, dir).await.map_err(wire)?;
    Ok(Fetched {
        job: s.job.clone(),
        dir: dir.to_owned(),
        files: s
            .files
            .iter()
            .zip(written)
            .map(|(f, at)| FetchedFile {
                vertex: f.vertex.clone(),
                path: f.path.clone(),
                bytes: f.size,
                at,
            })
            .collect(),
    })
}

/// `mvm fetch JOB`.
pub(crate) fn fetch(args: FetchArgs) -> Result<(), Failure> {
    runtime()?.block_on(async {
        let client = connect(&args.broker).await?;
        let s = client
            .status(Some(&args.job))
            .await
            .map_err(wire)?
            .pop()
            .ok_or_else(|| Failure::input(anyhow::anyhow!("no job {}", args.job)))?;
        let client = client.follow(&s).map_err(wire)?;
        if !s.state.is_final() {
            return Err(Failure::input(anyhow::anyhow!(
                "job {} has not ended: its output files are taken when it ends (mvm submit \
                 --wait --output-dir DIR waits for them)",
                s.job
            )));
        }
        let dir = args
            .output_dir
            .unwrap_or_else(|| PathBuf::from(s.job.as_str()));
        let fetched = fetch_into(&client, &s, &dir).await?;
        crate::cmd::print(&fetched, args.out.output, Fetched::text)
    })
}
