//! `mvm submit`, `mvm status`, `mvm cancel`: jobs on a super-peer.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use mvm_superpeer::client::{Client, read_profile};
use mvm_superpeer::proto::{Failure as WireFailure, FailureKind, JobId, JobState, JobStatus};
use serde::Serialize;

use crate::exit::{Failure, JOB_FAILED, REFUSED, USAGE};
use crate::{Output, OutputArg};

/// Where to find the super-peer.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BrokerArg {
    /// The super-peer, as `/ip4/…/tcp/…/p2p/PEER` (default: the local lab's, from `mvm lab up`).
    #[arg(long, env = "MVM_BROKER", value_name = "MULTIADDR")]
    broker: Option<String>,
    #[command(flatten)]
    who: IdentityArg,
}

/// Whose identity a client uses.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct IdentityArg {
    /// The user's identity: a directory with `key`, `cert.pem` and `ca.pem` from `mvm ca issue`
    /// (default: the local lab's user).
    #[arg(long, env = "MVM_IDENTITY", value_name = "DIR")]
    identity: Option<PathBuf>,
    /// Another domain's CA certificate to trust (repeatable), to talk to its super-peers.
    #[arg(long = "trust", value_name = "FILE")]
    trust: Vec<PathBuf>,
}

impl IdentityArg {
    /// The credentials (default: the local lab's user).
    pub(crate) fn credentials(&self) -> Result<mvm_superpeer::pki::Credentials, Failure> {
        self.credentials_in(&crate::cmd::lab::default_dir())
    }

    /// The credentials (default: the user of the lab in `lab`).
    pub(crate) fn credentials_in(
        &self,
        lab: &std::path::Path,
    ) -> Result<mvm_superpeer::pki::Credentials, Failure> {
        let dir = match &self.identity {
            Some(d) => d.clone(),
            None => lab.join("user"),
        };
        mvm_superpeer::pki::Credentials::load(&dir, &self.trust).map_err(|e| {
            Failure::input(anyhow::anyhow!(
                "{e}{}",
                if self.identity.is_none() {
                    " (no --identity given, and no local lab user)"
                } else {
                    ""
                }
            ))
        })
    }
}

/// Arguments of `mvm submit`.
#[derive(Debug, clap::Args)]
pub(crate) struct SubmitArgs {
    /// The job profile (TOML).
    profile: PathBuf,
    /// Wait for the end, showing progress, and print the results.
    #[arg(long)]
    wait: bool,
    /// With --wait: bring the job's output files back into DIR (at DIR/VERTEX/PATH; an
    /// array's at DIR/JOB/VERTEX/PATH), also when it failed.
    #[arg(long, value_name = "DIR", requires = "wait")]
    output_dir: Option<PathBuf>,
    /// Run once this job (or array) has ended, however (added to the profile's `after`).
    #[arg(long, value_name = "JOB")]
    after: Vec<JobId>,
    /// Run once this job (or every job of this array) has ended well; cancelled if one does
    /// not (added to the profile's `after_ok`).
    #[arg(long, value_name = "JOB")]
    after_ok: Vec<JobId>,
    #[command(flatten)]
    broker: BrokerArg,
    #[command(flatten)]
    out: OutputArg,
}

/// Arguments of `mvm status`.
#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    /// A job id (default: every job the super-peer knows).
    job: Option<JobId>,
    /// Only jobs in this state.
    #[arg(long, value_parser = ["pending", "preparing", "running", "done", "failed", "refused", "cancelled"])]
    state: Option<String>,
    /// Only jobs of this owner (`NAME` or `NAME@DOMAIN`).
    #[arg(long, value_name = "USER")]
    owner: Option<String>,
    #[command(flatten)]
    broker: BrokerArg,
    #[command(flatten)]
    out: OutputArg,
}

/// Arguments of `mvm cancel`, `hold` and `release`.
#[derive(Debug, clap::Args)]
pub(crate) struct CancelArgs {
    /// The job id.
    job: JobId,
    #[command(flatten)]
    broker: BrokerArg,
    #[command(flatten)]
    out: OutputArg,
}

/// Maps a failure on the wire to an exit status.
pub(crate) fn wire(f: WireFailure) -> Failure {
    let code = match f.kind {
        FailureKind::Input | FailureKind::NotFound => USAGE,
        FailureKind::Refused => REFUSED,
        FailureKind::Failed | FailureKind::Unavailable => JOB_FAILED,
    };
    Failure {
        code,
        error: anyhow::anyhow!(f.message),
    }
}

/// A client of the group's super-peer: through the flag's address (a super-peer or any node of
/// its group), or through the local lab's super-peers and nodes, whichever answers first (the
/// super-peer that led when the lab started may be gone, or lead no more).
pub(crate) async fn connect(arg: &BrokerArg) -> Result<Client, Failure> {
    let addrs = match &arg.broker {
        Some(b) => vec![b.clone()],
        None => {
            let lab = crate::cmd::lab::default_dir();
            let info = crate::cmd::lab::read_info(&lab).map_err(|e| {
                Failure::input(anyhow::anyhow!(
                    "no --broker given and no local lab ({e:#}); start one with `mvm lab up`"
                ))
            })?;
            std::iter::once(info.broker)
                .chain(info.superpeers)
                .chain(info.members)
                .collect()
        }
    };
    let creds = arg.who.credentials()?;
    Client::find(&creds, &addrs).await.map_err(wire)
}

/// A job's status for printing: outputs as text.
#[derive(Debug, Serialize)]
pub(crate) struct StatusOut {
    job: JobId,
    name: String,
    state: JobState,
    vertices: u32,
    vertices_done: u32,
    wall_ms: u64,
    error: Option<String>,
    /// What kind of failure (`trap`, `{"exit": 3}`, `cpu-limit`, `wall-limit`, `memory`,
    /// `refused`, `setup`, `lost`, `other`).
    #[serde(skip_serializing_if = "Option::is_none")]
    error_kind: Option<mvm_superpeer::proto::ErrorKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    waiting: Option<String>,
    owner: String,
    /// The run of the job (0: its first).
    attempt: u32,
    /// The runs given up because a node was lost, each with how long the job took to run
    /// again (`running_ms - at_ms`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    restarts: Vec<mvm_superpeer::proto::Restart>,
    /// The checkpoints kept, oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    checkpoints: Vec<mvm_superpeer::proto::CheckpointInfo>,
    /// The parts moved to other nodes while they ran, oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    moves: Vec<mvm_superpeer::proto::MoveInfo>,
    parts: Vec<mvm_superpeer::proto::PartStatus>,
    traffic: Vec<mvm_superpeer::proto::Traffic>,
    /// What each edge carried, as its sending vertex counted it over its whole life.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    edges: Vec<mvm_superpeer::proto::EdgeTraffic>,
    /// What each input port took.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    received: Vec<mvm_superpeer::proto::PortTraffic>,
    pub(crate) outputs: Vec<(String, String)>,
    /// The array it belongs to, and its index there.
    #[serde(skip_serializing_if = "Option::is_none")]
    array: Option<(JobId, u32)>,
    /// The jobs it runs after.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    after: Vec<JobId>,
    /// The output files its vertices left (`mvm fetch` brings them back).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    files: Vec<mvm_superpeer::proto::OutputFile>,
    /// The agreement it runs under: its state, and why it was broken.
    #[serde(skip_serializing_if = "Option::is_none")]
    agreement: Option<(mvm_superpeer::proto::AgreementState, Option<String>)>,
}

/// Sorts vertex names with their numbers in numeric order (`sink2` before `sink10`).
fn natural(a: &str, b: &str) -> std::cmp::Ordering {
    let split = |s: &str| {
        let i = s.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        (s[..i].to_owned(), s[i..].parse::<u64>().unwrap_or(0))
    };
    split(a).cmp(&split(b)).then(a.cmp(b))
}

impl From<&JobStatus> for StatusOut {
    fn from(s: &JobStatus) -> StatusOut {
        let mut outputs: Vec<(String, String)> = s
            .outputs
            .iter()
            .map(|(v, b)| (v.clone(), String::from_utf8_lossy(b).into_owned()))
            .collect();
        outputs.sort_by(|a, b| natural(&a.0, &b.0));
        StatusOut {
            job: s.job.clone(),
            name: s.name.clone(),
            state: s.state,
            vertices: s.vertices,
            vertices_done: s.vertices_done,
            wall_ms: s.wall_ms,
            error: s.error.clone(),
            error_kind: s.error_kind,
            waiting: s.waiting.clone(),
            owner: s.owner.clone(),
            attempt: s.attempt,
            restarts: s.restarts.clone(),
            checkpoints: s.checkpoints.clone(),
            moves: s.moves.clone(),
            parts: s.parts.clone(),
            traffic: s.traffic.clone(),
            edges: s.edges.clone(),
            received: s.received.clone(),
            outputs,
            array: s.array.clone(),
            after: s.after.clone(),
            files: s.files.clone(),
            agreement: s.agreement.clone(),
        }
    }
}

/// How many of `jobs` are in each state: `12 jobs: 10 done, 2 running`.
pub(crate) fn tally(jobs: &[JobStatus]) -> String {
    let mut counts = std::collections::BTreeMap::new();
    for j in jobs {
        *counts.entry(state_name(j.state)).or_insert(0u32) += 1;
    }
    let each: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    format!("{} jobs: {}", jobs.len(), each.join(", "))
}

/// A job state as users write it (`pending`, `running`, …).
fn state_name(s: JobState) -> String {
    format!("{s:?}").to_lowercase()
}

fn line(s: &JobStatus) -> String {
    let state = state_name(s.state);
    let mut l = format!(
        "{}  {state:<9} {}/{} vertices  {} nodes  {:.3} s",
        s.job,
        s.vertices_done,
        s.vertices,
        s.parts.len(),
        s.wall_ms as f64 / 1000.0
    );
    if let Some(k) = s.error_kind {
        l.push_str(&format!("  [{k}]"));
    }
    if s.attempt > 0 {
        l.push_str(&format!("  (run {})", s.attempt + 1));
    }
    if let Some(e) = s.error.as_ref().or(s.waiting.as_ref()) {
        l.push_str(&format!("  {e}"));
    }
    if let Some((a, why)) = &s.agreement {
        l.push_str(&format!("  agreement {}", a.name()));
        if let Some(w) = why {
            l.push_str(&format!(" ({w})"));
        }
    }
    let r = restarts(s);
    if !r.is_empty() {
        l.push('\n');
        l.push_str(r.trim_end());
    }
    l
}

/// One line per run of a job given up because a node was lost (why, from where it ran again,
/// and how long that took), one per checkpoint kept, and one per part moved.
fn restarts(s: &JobStatus) -> String {
    let mut out = String::new();
    for r in &s.restarts {
        let again = match r.recovery_ms() {
            Some(ms) => format!("running again after {:.3} s", ms as f64 / 1000.0),
            None => "not running again yet".to_owned(),
        };
        let from = match r.from_cut {
            Some(cut) => format!("from checkpoint {cut}"),
            None => "from the start".to_owned(),
        };
        out.push_str(&format!(
            "  run {} restarted {from} ({again}): {}\n",
            r.attempt + 1,
            r.why
        ));
    }
    for c in &s.checkpoints {
        out.push_str(&format!(
            "  checkpoint {} (run {}): {} parts, {} bytes\n",
            c.cut,
            c.attempt + 1,
            c.parts.len(),
            c.bytes()
        ));
    }
    for m in &s.moves {
        out.push_str(&format!("  {}\n", moved(s, m)));
    }
    out
}

/// A part's move, as people read it: its vertices, where it went, and its downtime.
fn moved(s: &JobStatus, m: &mvm_superpeer::proto::MoveInfo) -> String {
    let to = s
        .parts
        .iter()
        .find(|p| p.node == m.to && !p.name.is_empty())
        .map_or_else(|| short(&m.to), |p| p.name.clone());
    format!(
        "part [{}] moved from {} to {to} at cut {} (run {}): paused {} ms, {} bytes",
        m.vertices.join(", "),
        short(&m.from),
        m.cut,
        m.attempt + 1,
        m.downtime_ms,
        m.bytes
    )
}

/// A peer id's last 8 characters (as people tell nodes apart in a listing).
fn short(peer: &impl std::fmt::Display) -> String {
    let p = peer.to_string();
    format!("…{}", &p[p.len().saturating_sub(8)..])
}

/// The summary of an ended job: vertices per node, traffic per edge kind, wall time.
pub(crate) fn summary(s: &JobStatus) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "job {} ({}): {}, {} vertices on {} nodes, {:.3} s\n",
        s.job,
        s.name,
        format!("{:?}", s.state).to_lowercase(),
        s.vertices,
        s.parts.len(),
        s.wall_ms as f64 / 1000.0
    ));
    for p in &s.parts {
        let name = if p.name.is_empty() {
            p.node.to_string()
        } else {
            p.name.clone()
        };
        let guest = p.guest.as_ref().map_or_else(String::new, |g| {
            let id = g.id.map_or_else(String::new, |i| format!(" (id {i})"));
            let worker = g
                .worker
                .map_or_else(String::new, |w| format!(", worker pid {w}"));
            format!(", in {} guest {}{id}{worker}", g.driver, g.name)
        });
        out.push_str(&format!(
            "  node {name}: {} vertices{guest}\n",
            p.vertices.len()
        ));
    }
    for t in &s.traffic {
        out.push_str(&format!(
            "  {} {}/{}: {} items, {} bytes\n",
            match (t.remote, t.direct, t.sealed) {
                (true, true, true) => "remote (sealed direct link)",
                (true, true, false) => "remote (plain direct link)",
                (true, false, _) => "remote",
                (false, _, _) => "local ",
            },
            t.kind,
            t.codec,
            t.items,
            t.bytes
        ));
    }
    out.push_str(&edges(s));
    out.push_str(&restarts(s));
    match (&s.error, s.error_kind) {
        (Some(e), Some(k)) => out.push_str(&format!("  error ({k}): {e}\n")),
        (Some(e), None) => out.push_str(&format!("  error: {e}\n")),
        _ => {}
    }
    out
}

/// The most edges a summary lists one by one (`-o json` lists them all).
const EDGES_LISTED: usize = 16;

/// What the job's edges carried: each edge when there are few, else the sum.
fn edges(s: &JobStatus) -> String {
    if s.edges.is_empty() {
        return String::new();
    }
    let items: u64 = s.edges.iter().map(|e| e.items).sum();
    let mut out = format!("  {} edges carried {items} items\n", s.edges.len());
    if s.edges.len() <= EDGES_LISTED {
        for e in &s.edges {
            out.push_str(&format!("    {} -> {}: {} items\n", e.from, e.to, e.items));
        }
    }
    out
}

/// Waits for a job's end, drawing progress on stderr when it is a terminal.
pub(crate) async fn wait(
    client: &Client,
    mut s: JobStatus,
    progress: bool,
) -> Result<JobStatus, Failure> {
    let tty = progress && std::io::stderr().is_terminal();
    while !s.state.is_final() {
        if tty {
            eprint!(
                "\r{} {:<9} {}/{} vertices done",
                s.job,
                format!("{:?}", s.state).to_lowercase(),
                s.vertices_done,
                s.vertices
            );
            let _ = std::io::stderr().flush();
        }
        s = client.wait(&s.job, s.version, !tty).await.map_err(wire)?;
    }
    if tty {
        eprintln!("\r{:60}", "");
    }
    Ok(s)
}

/// The exit status of an ended job.
pub(crate) fn outcome(s: &JobStatus) -> Result<(), Failure> {
    match s.state {
        JobState::Done => Ok(()),
        JobState::Refused => Err(Failure {
            code: REFUSED,
            error: anyhow::anyhow!(
                "job {} refused: {}",
                s.job,
                s.error.clone().unwrap_or_default()
            ),
        }),
        _ => Err(Failure::failed(anyhow::anyhow!(
            "job {} {}: {}",
            s.job,
            format!("{:?}", s.state).to_lowercase(),
            s.error.clone().unwrap_or_default()
        ))),
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Failure::failed)
}

pub(crate) fn submit(args: SubmitArgs) -> Result<(), Failure> {
    let mut job = read_profile(&args.profile).map_err(wire)?;
    job.submission.after.extend(args.after.iter().cloned());
    job.submission
        .after_ok
        .extend(args.after_ok.iter().cloned());
    if !job.submission.sweep.is_empty() {
        return crate::cmd::array::submit(
            &job,
            &args.broker,
            args.wait,
            args.output_dir.as_deref(),
            args.out.output,
        );
    }
    runtime()?.block_on(async {
        let client = connect(&args.broker).await?;
        // Without a progress line to draw, the broker may answer at the job's end.
        let progress = args.out.output == Output::Text && std::io::stderr().is_terminal();
        let s = if args.wait && !progress {
            client.submit_and_wait(&job).await
        } else {
            client.submit(&job).await
        }
        .map_err(wire)?;
        // A job this group could not place may have gone to another group's super-peer.
        let client = client.follow(&s).map_err(wire)?;
        if !args.wait {
            return crate::cmd::print(&StatusOut::from(&s), args.out.output, |o| o.job.to_string());
        }
        let s = wait(&client, s, args.out.output == Output::Text).await?;
        if let Some(dir) = &args.output_dir {
            let fetched = crate::cmd::files::fetch_into(&client, &s, dir).await?;
            if args.out.output == Output::Text {
                eprintln!("{} output files in {}", fetched.len(), dir.display());
            }
        }
        match args.out.output {
            Output::Json => {
                crate::cmd::print(&StatusOut::from(&s), Output::Json, |_| String::new())?
            }
            Output::Text => {
                for (_, text) in StatusOut::from(&s).outputs {
                    print!("{text}");
                }
                eprint!("{}", summary(&s));
            }
        }
        outcome(&s)
    })
}

pub(crate) fn status(args: StatusArgs) -> Result<(), Failure> {
    runtime()?.block_on(async {
        let client = connect(&args.broker).await?;
        let mut list = client.status(args.job.as_ref()).await.map_err(wire)?;
        list.retain(|s| {
            args.state
                .as_ref()
                .is_none_or(|st| *st == state_name(s.state))
                && args
                    .owner
                    .as_ref()
                    .is_none_or(|o| s.owner == *o || s.owner.split('@').next() == Some(o.as_str()))
        });
        let out: Vec<StatusOut> = list.iter().map(StatusOut::from).collect();
        // An array asked for: a line that sums it up, then its jobs.
        let head = args
            .job
            .as_ref()
            .filter(|id| {
                !list.is_empty()
                    && list
                        .iter()
                        .all(|s| s.array.as_ref().is_some_and(|(a, _)| a == *id))
            })
            .map(|id| format!("array {id}: {}\n", tally(&list)));
        crate::cmd::print(&out, args.out.output, |_| {
            let lines = list.iter().map(line).collect::<Vec<_>>().join("\n");
            format!("{}{lines}", head.clone().unwrap_or_default())
        })
    })
}

pub(crate) fn hold(args: CancelArgs, held: bool) -> Result<(), Failure> {
    runtime()?.block_on(async {
        let client = connect(&args.broker).await?;
        client.hold(&args.job, held).await.map_err(wire)?;
        crate::cmd::print(
            &serde_json::json!({ "job": args.job, "held": held }),
            args.out.output,
            |_| format!("{} {}", args.job, if held { "held" } else { "released" }),
        )
    })
}

pub(crate) fn checkpoint(args: CancelArgs) -> Result<(), Failure> {
    runtime()?.block_on(async {
        let client = connect(&args.broker).await?;
        client.checkpoint(&args.job).await.map_err(wire)?;
        let s = client
            .status(Some(&args.job))
            .await
            .map_err(wire)?
            .pop()
            .and_then(|s| s.checkpoints.last().cloned());
        crate::cmd::print(
            &serde_json::json!({ "job": args.job, "checkpoint": s }),
            args.out.output,
            |_| match &s {
                Some(c) => format!(
                    "{} checkpoint {} stored: {} parts, {} bytes",
                    args.job,
                    c.cut,
                    c.parts.len(),
                    c.bytes()
                ),
                None => format!("{} checkpoint stored", args.job),
            },
        )
    })
}

/// Arguments of `mvm migrate`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("part").required(true).args(["vertex", "node"])))]
pub(crate) struct MigrateArgs {
    /// The job id.
    job: JobId,
    /// Move the part that runs this vertex.
    #[arg(long, value_name = "VERTEX")]
    vertex: Option<String>,
    /// Move the part that runs on this node (by name).
    #[arg(long, value_name = "NODE")]
    node: Option<String>,
    /// The node (by name) to move it to.
    #[arg(long, value_name = "NODE")]
    to: String,
    #[command(flatten)]
    broker: BrokerArg,
    #[command(flatten)]
    out: OutputArg,
}

/// `mvm migrate`: moves a part of a running job to another node while it runs.
pub(crate) fn migrate(args: MigrateArgs) -> Result<(), Failure> {
    runtime()?.block_on(async {
        let client = connect(&args.broker).await?;
        let moves = client
            .migrate(&args.job, args.vertex.clone(), args.node.clone(), &args.to)
            .await
            .map_err(wire)?;
        let s = client.status(Some(&args.job)).await.map_err(wire)?.pop();
        crate::cmd::print(
            &serde_json::json!({ "job": args.job, "moves": moves }),
            args.out.output,
            |_| {
                let lines = moves.iter().map(|m| match &s {
                    Some(s) => format!("{} {}", args.job, moved(s, m)),
                    None => format!("{} part [{}] moved", args.job, m.vertices.join(", ")),
                });
                lines.collect::<Vec<_>>().join("\n")
            },
        )
    })
}

/// Arguments of `mvm node drain` and `mvm node undrain`.
#[derive(Debug, clap::Args)]
pub(crate) struct DrainArgs {
    /// The node, by name.
    node: String,
    #[command(flatten)]
    broker: BrokerArg,
    #[command(flatten)]
    out: OutputArg,
}

/// `mvm node drain` (`drain`) and `mvm node undrain`.
pub(crate) fn drain(args: DrainArgs, drain: bool) -> Result<(), Failure> {
    runtime()?.block_on(async {
        let client = connect(&args.broker).await?;
        let moves = client.drain(&args.node, drain).await.map_err(wire)?;
        // What still runs there: parts of jobs without checkpoints, which end there.
        let staying: Vec<JobId> = if drain {
            let all = client.status(None).await.map_err(wire)?;
            all.iter()
                .filter(|s| !s.state.is_final())
                .filter(|s| s.parts.iter().any(|p| p.name == args.node && !p.done))
                .map(|s| s.job.clone())
                .collect()
        } else {
            Vec::new()
        };
        crate::cmd::print(
            &serde_json::json!({
                "node": args.node, "drained": drain, "moves": moves, "staying": staying,
            }),
            args.out.output,
            |_| {
                if !drain {
                    return format!("node {} takes parts again", args.node);
                }
                let mut out = format!(
                    "node {} drained: nothing more is placed on it; {} part(s) moved",
                    args.node,
                    moves.len()
                );
                for m in &moves {
                    out.push_str(&format!(
                        "\n  part [{}] to {}: paused {} ms",
                        m.vertices.join(", "),
                        short(&m.to),
                        m.downtime_ms
                    ));
                }
                if !staying.is_empty() {
                    let jobs: Vec<String> = staying.iter().map(ToString::to_string).collect();
                    out.push_str(&format!(
                        "\n  still running there (no checkpoints: they end there): {}",
                        jobs.join(", ")
                    ));
                }
                out
            },
        )
    })
}

pub(crate) fn cancel(args: CancelArgs) -> Result<(), Failure> {
    runtime()?.block_on(async {
        let client = connect(&args.broker).await?;
        client.cancel(&args.job).await.map_err(wire)?;
        crate::cmd::print(
            &serde_json::json!({ "job": args.job, "cancelled": true }),
            args.out.output,
            |_| format!("{} cancelled", args.job),
        )
    })
}

/// Arguments of `mvm web`.
#[derive(Debug, clap::Args)]
pub(crate) struct WebArgs {
    #[command(flatten)]
    broker: BrokerArg,
    #[command(flatten)]
    out: OutputArg,
}

/// `mvm web`: a link that logs this user into the super-peer's live web view.
pub(crate) fn web(args: WebArgs) -> Result<(), Failure> {
    runtime()?.block_on(async {
        let client = connect(&args.broker).await?;
        let (url, expires_ms) = client.web_login().await.map_err(wire)?;
        crate::cmd::print(
            &serde_json::json!({ "url": url, "expires_ms": expires_ms }),
            args.out.output,
            |_| url.clone(),
        )
    })
}
