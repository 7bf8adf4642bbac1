//! Job profiles: the TOML file a user submits, naming a topology, the module of each
//! component, parameters, queue defaults, limits and requirements.
//!
//! ```toml
//! name = "fft8"
//! topology = "../topologies/fft8-butterfly.dot"   # paths are relative to this file
//! retries = 2                  # runs again (from its newest checkpoint) when a node is lost
//! estimate = "2m"              # its run time at most: what `mvm offer` plans by
//!
//! [components]
//! source = "../jobs/build/fft_source.wasm"
//! butterfly = "../jobs/build/fft_butterfly.wasm"
//! sink = "../jobs/wat/print_complex.wat"
//!
//! [parameters]                 # read by jobs with mvm.param; a vertex attribute overrides
//! input = [1.0, 2.0, 0.5, -1.0, 0.0, 3.0, 2.5, 1.0]
//!
//! [queue]                      # defaults for channels that set nothing
//! capacity = 64
//!
//! [limits]                     # per vertex
//! memory = "16MiB"
//! cpu = "10s"
//! wall = "60s"
//!
//! [checkpoint]                 # save the running job every interval (none unless asked)
//! interval = "5s"
//! keep = 2                     # stored checkpoints kept (the newest)
//!
//! [files]                      # laid out in every vertex's sandbox, and taken back
//! inputs = ["data/", "table.csv", { path = "big.bin", hash = "…" }]
//! outputs = ["out/*.txt"]      # globs inside the sandbox, taken when the job ends
//! max_output = "64MiB"         # per vertex
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mvm_queue::codec::Registry;
use mvm_queue::queue::Config;
use serde::{Deserialize, Serialize};

use crate::runtime::Limits;

/// A job profile as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The job's name.
    pub name: String,
    /// Who submits it (checked by the broker's policy).
    #[serde(default)]
    pub owner: Option<String>,
    /// The owner's domain.
    #[serde(default)]
    pub domain: Option<String>,
    /// Among this group's jobs that wait for room, higher is placed first (then earlier).
    #[serde(default)]
    pub priority: i32,
    /// The topology file.
    pub topology: PathBuf,
    /// The module file of each component name.
    pub components: BTreeMap<String, PathBuf>,
    /// Parameters for the jobs (strings, numbers, booleans, or lists of them).
    #[serde(default)]
    pub parameters: BTreeMap<String, toml::Value>,
    /// Queue defaults for channels that set nothing.
    #[serde(default)]
    pub queue: Config,
    /// Per-vertex limits.
    #[serde(default)]
    pub limits: LimitSpec,
    /// What a node must offer (read by the broker).
    #[serde(default)]
    pub requirements: Requirements,
    /// Checkpoints of the running job; none unless asked for.
    #[serde(default)]
    pub checkpoint: Option<CheckpointSpec>,
    /// How many times a job that lost a node is run again, from its newest checkpoint or from
    /// its start (default [`DEFAULT_RETRIES`]).
    #[serde(default)]
    pub retries: Option<u32>,
    /// Input files laid out in every vertex's sandbox, and output files taken back from it.
    #[serde(default)]
    pub files: Option<FilesSpec>,
    /// A parameter sweep: for each parameter named, a list of values or a range; one job per
    /// point of their product (an array of jobs).
    #[serde(default)]
    pub sweep: BTreeMap<String, SweepSpec>,
    /// Jobs (or arrays) this one waits for: it runs once they have all ended, however.
    #[serde(default)]
    pub after: Vec<String>,
    /// Jobs (or arrays) this one waits for: it runs once they have all ended well, and is
    /// cancelled when one of them does not.
    #[serde(default)]
    pub after_ok: Vec<String>,
    /// How long the job runs (e.g. `"2m"`): what an offer (`mvm offer`) plans by, and what
    /// lets the job run in a gap before a reservation.
    #[serde(default)]
    pub estimate: Option<String>,
    /// A budget for the CPU market instead of a fixed `requirements.bid`: the broker's agent
    /// chooses the nodes and bids for the job.
    #[serde(default)]
    pub market: Option<MarketBudget>,
}

/// A job's budget for the CPU market as written: `budget` credits (e.g. `500`, or `"12.5"`)
/// spent over `deadline` (e.g. `"10m"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarketBudget {
    /// Credits.
    pub budget: toml::Value,
    /// Over how long.
    pub deadline: String,
}

/// The values of one swept parameter as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SweepSpec {
    /// The values.
    Values(Vec<toml::Value>),
    /// `from` to `to` (included) by `step` (1 when not given).
    Range {
        /// The first value.
        from: toml::Value,
        /// The last value (included when a step lands on it).
        to: toml::Value,
        /// The step (positive).
        #[serde(default)]
        step: Option<toml::Value>,
    },
}

/// The most points a sweep may have as written (a domain's policy bounds arrays further).
pub const MAX_SWEEP_POINTS: u64 = 1_000_000;

/// A parameter value as jobs read it (lists comma-separated, tables as `key=value` items
/// comma-separated). Strings are never put through the TOML writer: its quoting of one with
/// hundreds of quotes in a row overflows (found by fuzzing the profile reader).
fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(a) => a.iter().map(value_text).collect::<Vec<_>>().join(","),
        toml::Value::Table(t) => t
            .iter()
            .map(|(k, v)| format!("{k}={}", value_text(v)))
            .collect::<Vec<_>>()
            .join(","),
        // Numbers, booleans and dates: no quotes to write.
        other => other.to_string(),
    }
}

/// A job's files as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesSpec {
    /// Files or directories (relative to the profile, and at the same paths in the sandbox),
    /// or files the lab already holds, by content hash.
    #[serde(default)]
    pub inputs: Vec<InputSpec>,
    /// Globs of the files a vertex writes in its sandbox that are taken back.
    #[serde(default)]
    pub outputs: Vec<String>,
    /// The most bytes of output files kept per vertex (default 64MiB).
    pub max_output: Option<String>,
    /// The most bytes of input files (default 1GiB).
    pub max_input: Option<String>,
}

/// One input as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InputSpec {
    /// A file or directory, relative to the profile.
    Path(String),
    /// A file the lab already holds: its path in the sandbox and its content hash (hex).
    Held {
        /// Its path in the sandbox.
        path: String,
        /// Its SHA-256, hex.
        hash: String,
        /// Its size in bytes.
        size: u64,
    },
}

/// A job's files, checked: the inputs still to be read (paths as written), the output
/// patterns, and the bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    /// The inputs.
    pub inputs: Vec<InputSpec>,
    /// The output patterns.
    pub outputs: Vec<String>,
    /// The most bytes of output files per vertex.
    pub max_output: u64,
    /// The most bytes of input files.
    pub max_input: u64,
}

/// Runs from the start after a lost node, unless a profile says otherwise.
pub const DEFAULT_RETRIES: u32 = 2;

/// How many stored checkpoints a job keeps when its profile does not say.
pub const DEFAULT_KEEP: u32 = 2;

/// The shortest checkpoint interval a profile may ask for.
pub const MIN_CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// Checkpoints as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// How often, e.g. `"5s"`.
    pub interval: String,
    /// How many stored checkpoints to keep, the newest (default 2).
    pub keep: Option<u32>,
}

/// Checkpoints asked for, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoints {
    /// How often one is taken.
    pub interval: Duration,
    /// How many stored ones are kept.
    pub keep: u32,
}

/// Limits as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    /// Memory per vertex, e.g. `"16MiB"`.
    pub memory: Option<String>,
    /// CPU time per vertex, e.g. `"10s"`, `"500ms"`.
    pub cpu: Option<String>,
    /// Wall time per vertex.
    pub wall: Option<String>,
    /// Log lines kept per vertex (stdout, stderr, `mvm.log`; the newest), e.g. `"256KiB"`:
    /// what `mvm logs` shows of a job. At most [`MAX_LOG_BYTES`].
    pub logs: Option<String>,
}

/// The most bytes of log lines a job may keep per vertex.
pub const MAX_LOG_BYTES: u64 = 16 << 20;

/// What a node must offer (GridWay-style requirements and rank; read by the broker).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    /// The execution-environment image id.
    pub image: Option<String>,
    /// vCPUs per node.
    pub vcpus: Option<u32>,
    /// Memory per node, e.g. `"1GiB"`.
    pub memory: Option<String>,
    /// CPU architecture, e.g. `"x86_64"`.
    pub arch: Option<String>,
    /// A rank expression over node properties; higher is better.
    pub rank: Option<String>,
    /// The most nodes to spread the vertices over (default: every node that qualifies).
    pub nodes: Option<u32>,
    /// How guests of `image` are used across jobs (GridWay's VM modes).
    pub vm_mode: Option<VmMode>,
    /// The CPU weight of the job's guests (Xen's credit weight, 1–65535, 256 by default; the
    /// host driver's cgroup CPU weight): a guest's share of a busy CPU is its weight over the
    /// sum of the weights of the guests on it.
    pub cpu_weight: Option<u32>,
    /// The CPU cap of the job's guests, in percent of one CPU (none: uncapped).
    pub cpu_cap: Option<u32>,
    /// A bid for the CPU of the nodes the job's guests run on (Tycoon's market): credits per
    /// CPU-second used (e.g. `"2.5"`). A guest's share of a busy CPU is its bid over the sum
    /// of the bids of the guests there; sets the weight instead of `cpu_weight`.
    pub bid: Option<String>,
    /// A guest template file (`environments/NAME.toml`, relative to the profile) that gives
    /// the image, vCPUs, memory, CPU weight and cap, and the guest's disk, swap and network:
    /// those fields are then not written here.
    pub environment: Option<String>,
}

/// How a node's guests of the job's image are used across jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmMode {
    /// One guest kept running and reused by job after job.
    Persistent,
    /// The guest is saved after a job and restored for the next.
    SaveRestore,
    /// A fresh guest per job, torn down after it (the default).
    StopStart,
}

impl VmMode {
    /// The name profiles and messages use.
    pub fn as_str(self) -> &'static str {
        match self {
            VmMode::Persistent => "persistent",
            VmMode::SaveRestore => "save-restore",
            VmMode::StopStart => "stop-start",
        }
    }
}

/// A profile that cannot be used: the file, the line when known, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ProfileError {
    /// The profile file.
    pub file: String,
    /// The line (1 when the problem is with the file as a whole).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Parses a size such as `65536`, `"64KiB"`, `"16MiB"`, `"1GiB"`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = [
        ("GiB", 1u64 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
    .unwrap_or((s, 1));
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

/// Parses a duration such as `"10s"`, `"500ms"`, `"2m"`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = ["ms", "s", "m", "h"]
        .iter()
        .find_map(|u| s.strip_suffix(u).map(|n| (n, *u)))?;
    let v: f64 = num.trim().parse().ok()?;
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        _ => v * 3600.0,
    };
    Duration::try_from_secs_f64(secs).ok()
}

/// The line (1-based) of byte `offset` in `src`, for errors of files read with spans.
pub fn line_of(src: &str, offset: usize) -> usize {
    1 + src.as_bytes()[..offset.min(src.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

/// Finds the line where `key = ` is written, for errors found after parsing.
/// The line of `key = ` inside the table `[table]` of `src` (the table's own line when `key`
/// is empty or not found there; 1 when the table is not found either).
fn line_in_table(src: &str, table: &str, key: &str) -> usize {
    let header = format!("[{table}]");
    let Some(start) = src.lines().position(|l| l.trim() == header) else {
        return 1;
    };
    src.lines()
        .enumerate()
        .skip(start + 1)
        .take_while(|(_, l)| !l.trim_start().starts_with('['))
        .find(|(_, l)| {
            !key.is_empty()
                && l.trim_start()
                    .strip_prefix(key)
                    .is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map_or(start + 1, |(i, _)| i + 1)
}

fn line_of_key(src: &str, key: &str) -> usize {
    src.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map_or(1, |i| i + 1)
}

impl Profile {
    /// Reads a profile file.
    ///
    /// # Errors
    /// The file cannot be read, is not valid TOML, or has unknown or badly typed fields; the
    /// error names the file and line.
    pub fn load(path: &Path) -> Result<(Profile, String), ProfileError> {
        let file = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|e| ProfileError {
            file: file.clone(),
            line: 1,
            message: format!("cannot read: {e}"),
        })?;
        let p: Profile = toml::from_str(&src).map_err(|e| ProfileError {
            file: file.clone(),
            line: e.span().map_or(1, |s| line_of(&src, s.start)),
            message: e.message().to_owned(),
        })?;
        Ok((p, src))
    }

    /// A path of the profile, made relative to the profile's directory.
    pub fn resolve(profile_path: &Path, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            profile_path
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join(p)
        }
    }

    /// The parameters as the strings jobs read (lists are comma-separated).
    pub fn parameter_strings(&self) -> BTreeMap<String, String> {
        self.parameters
            .iter()
            .map(|(k, v)| (k.clone(), value_text(v)))
            .collect()
    }

    /// The sweep, checked: each swept parameter with its values as jobs read them, in name
    /// order (empty: no sweep). The number of points is the product of their counts.
    ///
    /// # Errors
    /// An empty list, a range that is not of numbers or whose step is not positive, or more
    /// than [`MAX_SWEEP_POINTS`] points; with the line of `[sweep]` in `src`.
    pub fn sweep(&self, file: &str, src: &str) -> Result<Vec<(String, Vec<String>)>, ProfileError> {
        let line = src
            .lines()
            .position(|l| l.trim() == "[sweep]")
            .map_or(1, |i| i + 1);
        let bad = |message: String| ProfileError {
            file: file.to_owned(),
            line,
            message,
        };
        let mut axes = Vec::new();
        let mut points: u64 = 1;
        for (name, spec) in &self.sweep {
            let values: Vec<String> = match spec {
                SweepSpec::Values(v) => v.iter().map(value_text).collect(),
                SweepSpec::Range { from, to, step } => {
                    range(from, to, step.as_ref()).map_err(|m| bad(format!("sweep.{name}: {m}")))?
                }
            };
            if values.is_empty() {
                return Err(bad(format!("sweep.{name} has no values")));
            }
            points = points.saturating_mul(values.len() as u64);
            if points > MAX_SWEEP_POINTS {
                return Err(bad(format!(
                    "the sweep has more than {MAX_SWEEP_POINTS} points"
                )));
            }
            axes.push((name.clone(), values));
        }
        Ok(axes)
    }
}

/// The values of a range, as jobs read them: integers when `from`, `to` and `step` all are.
fn range(
    from: &toml::Value,
    to: &toml::Value,
    step: Option<&toml::Value>,
) -> Result<Vec<String>, String> {
    let one = toml::Value::Integer(1);
    let step = step.unwrap_or(&one);
    if let (Some(a), Some(b), Some(s)) = (from.as_integer(), to.as_integer(), step.as_integer()) {
        if s <= 0 {
            return Err(format!("the step must be positive, not {s}"));
        }
        let count = b
            .checked_sub(a)
            .map_or(0, |d| if d < 0 { 0 } else { d / s + 1 });
        if count as u64 > MAX_SWEEP_POINTS {
            return Err(format!("more than {MAX_SWEEP_POINTS} values"));
        }
        return Ok((0..count).map(|i| (a + i * s).to_string()).collect());
    }
    let num = |v: &toml::Value| {
        v.as_float()
            .or_else(|| v.as_integer().map(|i| i as f64))
            .filter(|f| f.is_finite())
    };
    let (Some(a), Some(b), Some(s)) = (num(from), num(to), num(step)) else {
        return Err("from, to and step must be numbers".to_owned());
    };
    if s <= 0.0 {
        return Err(format!("the step must be positive, not {s}"));
    }
    let count = ((b - a) / s + 1e-9).floor() + 1.0;
    if count > MAX_SWEEP_POINTS as f64 {
        return Err(format!("more than {MAX_SWEEP_POINTS} values"));
    }
    let count = if count < 1.0 { 0 } else { count as u64 };
    Ok((0..count)
        .map(|i| format!("{}", a + i as f64 * s))
        .collect())
}

impl Profile {
    /// Expands a checked sweep into its points: each a parameter map to lay over the job's
    /// own, the last parameter varying fastest.
    pub fn points(axes: &[(String, Vec<String>)]) -> Vec<BTreeMap<String, String>> {
        let mut points = vec![BTreeMap::new()];
        for (name, values) in axes {
            points = points
                .into_iter()
                .flat_map(|p| {
                    values.iter().map(move |v| {
                        let mut q = p.clone();
                        q.insert(name.clone(), v.clone());
                        q
                    })
                })
                .collect();
        }
        points
    }

    /// The limits, checked.
    ///
    /// # Errors
    /// A limit that is not a size or duration, with its line in `src`.
    pub fn limits(&self, file: &str, src: &str) -> Result<Limits, ProfileError> {
        let bad = |key: &str, what: &str, v: &str| ProfileError {
            file: file.to_owned(),
            line: line_of_key(src, key),
            message: format!("limits.{key} must be {what}, not '{v}'"),
        };
        let mut l = Limits::default();
        if let Some(m) = &self.limits.memory {
            let bytes = parse_size(m)
                .filter(|b| *b >= 64 << 10)
                .ok_or_else(|| bad("memory", "a size of at least 64KiB (e.g. \"16MiB\")", m))?;
            l.memory_bytes =
                usize::try_from(bytes).map_err(|_| bad("memory", "a smaller size", m))?;
        }
        if let Some(c) = &self.limits.cpu {
            l.cpu = Some(
                parse_duration(c)
                    .ok_or_else(|| bad("cpu", "a duration (e.g. \"10s\", \"500ms\")", c))?,
            );
        }
        if let Some(w) = &self.limits.wall {
            l.wall =
                Some(parse_duration(w).ok_or_else(|| bad("wall", "a duration (e.g. \"60s\")", w))?);
        }
        if let Some(k) = &self.limits.logs {
            let bytes = parse_size(k)
                .filter(|b| *b <= MAX_LOG_BYTES)
                .ok_or_else(|| bad("logs", "a size of at most 16MiB (e.g. \"256KiB\")", k))?;
            l.log_bytes = usize::try_from(bytes).map_err(|_| bad("logs", "a smaller size", k))?;
        }
        Ok(l)
    }

    /// The checkpoints asked for, checked (`None`: none asked for).
    ///
    /// # Errors
    /// An interval that is not a duration of at least [`MIN_CHECKPOINT_INTERVAL`], or a `keep`
    /// of 0, with its line in `src`.
    pub fn checkpoints(&self, file: &str, src: &str) -> Result<Option<Checkpoints>, ProfileError> {
        let Some(c) = &self.checkpoint else {
            return Ok(None);
        };
        let bad = |key: &str, message: String| ProfileError {
            file: file.to_owned(),
            line: line_of_key(src, key),
            message,
        };
        let interval = parse_duration(&c.interval)
            .filter(|d| *d >= MIN_CHECKPOINT_INTERVAL)
            .ok_or_else(|| {
                bad(
                    "interval",
                    format!(
                        "checkpoint.interval must be a duration of at least {}ms (e.g. \"5s\"), not '{}'",
                        MIN_CHECKPOINT_INTERVAL.as_millis(),
                        c.interval
                    ),
                )
            })?;
        let keep = c.keep.unwrap_or(DEFAULT_KEEP);
        if keep == 0 {
            return Err(bad("keep", "checkpoint.keep must be at least 1".to_owned()));
        }
        Ok(Some(Checkpoints { interval, keep }))
    }
}

/// The longest run time a profile may give as its estimate.
pub const MAX_ESTIMATE: Duration = Duration::from_secs(365 * 24 * 3600);

impl Profile {
    /// The queue defaults (`[queue]`), checked: a working configuration whose codec `codecs`
    /// resolves. An unknown queue kind or overflow policy is already an error of
    /// [`Profile::load`].
    ///
    /// # Errors
    /// An unknown codec or inconsistent settings, with the line in `src`.
    pub fn queue_defaults(
        &self,
        file: &str,
        src: &str,
        codecs: &Registry,
    ) -> Result<Config, ProfileError> {
        let q = &self.queue;
        let bad = |key: &str, message: String| ProfileError {
            file: file.to_owned(),
            line: line_in_table(src, "queue", key),
            message,
        };
        codecs
            .resolve(&q.codec)
            .map_err(|e| bad("codec", format!("queue.codec: {e}")))?;
        q.validate().map_err(|e| bad("", format!("[queue]: {e}")))?;
        Ok(q.clone())
    }

    /// The run time the profile estimates (`None`: it gives none).
    ///
    /// # Errors
    /// An estimate that is not a duration of at least 1ms and at most a year, with its line.
    pub fn estimate(&self, file: &str, src: &str) -> Result<Option<Duration>, ProfileError> {
        let Some(e) = &self.estimate else {
            return Ok(None);
        };
        parse_duration(e)
            .filter(|d| *d >= Duration::from_millis(1) && *d <= MAX_ESTIMATE)
            .map(Some)
            .ok_or_else(|| ProfileError {
                file: file.to_owned(),
                line: line_of_key(src, "estimate"),
                message: format!(
                    "estimate must be a duration from 1ms to a year (e.g. \"2m\"), not '{e}'"
                ),
            })
    }

    /// The files asked for, checked (`None`: none asked for): every path is one inside a
    /// sandbox ([`crate::files::check_path`]), every output pattern a glob, the bounds sizes.
    ///
    /// # Errors
    /// The first bad entry, with its line in `src`.
    pub fn files(&self, file: &str, src: &str) -> Result<Option<Files>, ProfileError> {
        let Some(f) = &self.files else {
            return Ok(None);
        };
        let bad = |key: &str, message: String| ProfileError {
            file: file.to_owned(),
            line: line_of_key(src, key),
            message,
        };
        if f.inputs.len() > crate::files::MAX_FILES {
            return Err(bad(
                "inputs",
                format!(
                    "files.inputs names {} entries (at most {})",
                    f.inputs.len(),
                    crate::files::MAX_FILES
                ),
            ));
        }
        for i in &f.inputs {
            let (path, hash) = match i {
                InputSpec::Path(p) => (p, None),
                InputSpec::Held { path, hash, .. } => (path, Some(hash)),
            };
            crate::files::check_path(path)
                .map_err(|e| bad("inputs", format!("files.inputs: {e}")))?;
            if let Some(h) = hash
                && (h.len() != 64
                    || !h
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
            {
                return Err(bad(
                    "inputs",
                    format!(
                        "files.inputs: the hash of '{path}' must be 64 lowercase hex digits (SHA-256), not '{h}'"
                    ),
                ));
            }
        }
        crate::files::Patterns::new(&f.outputs)
            .map_err(|e| bad("outputs", format!("files.outputs: {e}")))?;
        let size = |key: &str, v: &Option<String>, default: u64, max: u64| match v {
            None => Ok(default),
            Some(s) => parse_size(s).filter(|b| *b <= max).ok_or_else(|| {
                bad(
                    key,
                    format!(
                        "files.{key} must be a size of at most {}GiB (e.g. \"64MiB\"), not '{s}'",
                        max >> 30
                    ),
                )
            }),
        };
        Ok(Some(Files {
            inputs: f.inputs.clone(),
            outputs: f.outputs.clone(),
            max_output: size(
                "max_output",
                &f.max_output,
                crate::files::DEFAULT_OUTPUT_BYTES,
                crate::files::MAX_OUTPUT_BYTES,
            )?,
            max_input: size(
                "max_input",
                &f.max_input,
                crate::files::DEFAULT_INPUT_BYTES,
                crate::files::MAX_INPUT_BYTES,
            )?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_expand_to_their_product_and_bad_ones_name_their_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = "name = \"x\"\ntopology = \"t.dot\"\n[components]\n[sweep]\n";
        let p = write(
            dir.path(),
            "a.toml",
            &format!(
                "{base}n = {{ from = 1, to = 7, step = 3 }}\nmode = [\"a\", \"b\"]\nx = {{ from = 0.5, to = 1.0, step = 0.25 }}\n"
            ),
        );
        let (prof, src) = Profile::load(&p).expect("valid");
        let axes = prof.sweep("a.toml", &src).expect("valid");
        assert_eq!(
            axes,
            [
                ("mode".to_owned(), vec!["a".to_owned(), "b".to_owned()]),
                (
                    "n".to_owned(),
                    vec!["1".to_owned(), "4".to_owned(), "7".to_owned()]
                ),
                (
                    "x".to_owned(),
                    vec!["0.5".to_owned(), "0.75".to_owned(), "1".to_owned()]
                ),
            ]
        );
        let points = Profile::points(&axes);
        assert_eq!(points.len(), 18);
        assert_eq!(
            (
                points[0]["mode"].as_str(),
                points[0]["n"].as_str(),
                points[0]["x"].as_str()
            ),
            ("a", "1", "0.5")
        );
        assert_eq!(points[1]["x"], "0.75", "the last parameter varies fastest");
        assert_eq!(points[17]["mode"], "b");
        let p = write(
            dir.path(),
            "none.toml",
            "name = \"x\"\ntopology = \"t.dot\"\n[components]\n",
        );
        let (prof, src) = Profile::load(&p).expect("valid");
        assert!(prof.sweep("none.toml", &src).expect("valid").is_empty());
        for (body, says) in [
            ("n = []\n", "no values"),
            ("n = { from = 1, to = 5, step = 0 }\n", "positive"),
            ("n = { from = \"a\", to = 5 }\n", "numbers"),
            (
                "a = { from = 1, to = 1000 }\nb = { from = 1, to = 1001 }\n",
                "more than 1000000 points",
            ),
        ] {
            let p = write(dir.path(), "b.toml", &format!("{base}{body}"));
            let (prof, src) = Profile::load(&p).expect("parses");
            let e = prof.sweep("b.toml", &src).expect_err(body);
            assert_eq!(e.line, 4, "{e}");
            assert!(e.message.contains(says), "{body}: {e}");
        }
    }

    #[test]
    fn an_estimate_is_a_duration_and_a_bad_one_names_its_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let at = |e: &str| {
            let body =
                format!("name = \"x\"\ntopology = \"t.dot\"\nestimate = \"{e}\"\n[components]\n");
            let p = write(dir.path(), "e.toml", &body);
            let (prof, src) = Profile::load(&p).expect("parses");
            prof.estimate("e.toml", &src)
        };
        assert_eq!(at("2m").expect("valid"), Some(Duration::from_secs(120)));
        for bad in ["soon", "0s", "-1m", "400d", "9999h"] {
            let e = at(bad).expect_err(bad);
            assert_eq!((e.file.as_str(), e.line), ("e.toml", 3), "{e}");
            assert!(e.message.contains(bad), "{e}");
        }
    }

    #[test]
    fn files_are_read_and_bad_paths_name_their_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = "name = \"x\"\ntopology = \"t.dot\"\n[components]\n[files]\n";
        let h = "ab".repeat(32);
        let p = write(
            dir.path(),
            "a.toml",
            &format!(
                "{base}inputs = [\"data/\", {{ path = \"big.bin\", hash = \"{h}\", size = 3 }}]\noutputs = [\"out/*.txt\"]\nmax_output = \"1MiB\"\n"
            ),
        );
        let (prof, src) = Profile::load(&p).expect("valid");
        let f = prof.files("a.toml", &src).expect("valid").expect("some");
        assert_eq!(f.max_output, 1 << 20);
        assert_eq!(f.max_input, crate::files::DEFAULT_INPUT_BYTES);
        assert_eq!(
            f.inputs,
            [
                InputSpec::Path("data/".into()),
                InputSpec::Held {
                    path: "big.bin".into(),
                    hash: h.clone(),
                    size: 3
                }
            ]
        );
        for (body, line, says) in [
            ("inputs = [\"../etc\"]\n", 5, "climbs"),
            ("inputs = [\"/etc/passwd\"]\n", 5, "absolute"),
            ("outputs = [\"out/[z-a]\"]\n", 5, "files.outputs"),
            (
                "outputs = []\nmax_output = \"9GiB\"\n",
                6,
                "files.max_output",
            ),
            (
                "inputs = [{ path = \"x\", hash = \"12\", size = 1 }]\n",
                5,
                "64 lowercase hex",
            ),
        ] {
            let p = write(dir.path(), "b.toml", &format!("{base}{body}"));
            let (prof, src) = Profile::load(&p).expect("parses");
            let e = prof.files("b.toml", &src).expect_err(body);
            assert_eq!(e.line, line, "{e}");
            assert!(e.message.contains(says), "{e}");
        }
    }

    #[test]
    fn the_log_bound_is_read_and_a_bad_one_names_its_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = "name = \"x\"\ntopology = \"t.dot\"\n[components]\n[limits]\n";
        let p = write(dir.path(), "a.toml", &format!("{base}logs = \"256KiB\"\n"));
        let (prof, src) = Profile::load(&p).expect("valid");
        assert_eq!(
            prof.limits("a.toml", &src).expect("valid").log_bytes,
            256 << 10
        );
        let p = write(dir.path(), "d.toml", base);
        let (prof, src) = Profile::load(&p).expect("valid");
        let l = prof.limits("d.toml", &src).expect("valid");
        assert_eq!(l.log_bytes, crate::runtime::logs::DEFAULT_BOUND);
        for bad in ["\"1GiB\"", "\"lots\""] {
            let p = write(
                dir.path(),
                "b.toml",
                &format!("{base}wall = \"1s\"\nlogs = {bad}\n"),
            );
            let (prof, src) = Profile::load(&p).expect("parses");
            let e = prof.limits("b.toml", &src).expect_err(bad);
            assert_eq!((e.file.as_str(), e.line), ("b.toml", 6), "{e}");
            assert!(e.message.contains("limits.logs"), "{e}");
        }
    }

    #[test]
    fn queue_defaults_are_checked_whole_with_their_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = "name = \"x\"\ntopology = \"t.dot\"\n";
        let reg = Registry::new();
        let p = write(
            dir.path(),
            "ok.toml",
            &format!("{base}[components]\n[queue]\ncapacity = 4\ncodec = \"zstd+cbor\"\n"),
        );
        let (prof, src) = Profile::load(&p).expect("valid");
        let q = prof.queue_defaults("ok.toml", &src, &reg).expect("valid");
        assert_eq!((q.capacity, q.codec.as_str()), (4, "zstd+cbor"));
        // An unknown codec: named, with the line of `codec` inside [queue] (not the `codec`
        // of another table before it).
        let p = write(
            dir.path(),
            "codec.toml",
            &format!(
                "{base}[parameters]\ncodec = \"x\"\n[queue]\ncapacity = 4\ncodec = \"snappy+cbor\"\n[components]\n"
            ),
        );
        let (prof, src) = Profile::load(&p).expect("parses");
        let e = prof
            .queue_defaults("codec.toml", &src, &reg)
            .expect_err("unknown codec");
        assert_eq!((e.file.as_str(), e.line), ("codec.toml", 7), "{e}");
        assert!(e.message.contains("snappy"), "{e}");
        // Inconsistent settings: the line of [queue].
        let p = write(
            dir.path(),
            "aging.toml",
            &format!("{base}[components]\n[queue]\naging = 3\n"),
        );
        let (prof, src) = Profile::load(&p).expect("parses");
        let e = prof
            .queue_defaults("aging.toml", &src, &reg)
            .expect_err("aging on a FIFO");
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("aging"), "{e}");
        // An unknown kind is refused by load, with its line.
        let p = write(
            dir.path(),
            "kind.toml",
            &format!("{base}[components]\n[queue]\nkind = \"lifo\"\n"),
        );
        let e = Profile::load(&p).expect_err("unknown kind");
        assert_eq!(e.line, 5, "{e}");
    }

    #[test]
    fn checkpoints_are_read_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = "name = \"x\"\ntopology = \"t.dot\"\nretries = 5\n[components]\n";
        let p = write(
            dir.path(),
            "a.toml",
            &format!("{base}[checkpoint]\ninterval = \"1.5s\"\n"),
        );
        let (prof, src) = Profile::load(&p).expect("valid");
        assert_eq!(prof.retries, Some(5));
        assert_eq!(
            prof.checkpoints("a.toml", &src).expect("valid"),
            Some(Checkpoints {
                interval: Duration::from_millis(1500),
                keep: 2
            })
        );
        let p = write(
            dir.path(),
            "b.toml",
            &format!("{base}[checkpoint]\ninterval = \"10ms\"\n"),
        );
        let (prof, src) = Profile::load(&p).expect("parses");
        let e = prof.checkpoints("b.toml", &src).expect_err("too often");
        assert_eq!(e.line, 6, "{e}");
        assert!(e.message.contains("at least 100ms"), "{e}");
        let p = write(
            dir.path(),
            "c.toml",
            &format!("{base}[checkpoint]\ninterval = \"5s\"\nkeep = 0\n"),
        );
        let (prof, src) = Profile::load(&p).expect("parses");
        assert_eq!(
            prof.checkpoints("c.toml", &src).expect_err("keep 0").line,
            7
        );
        let p = write(dir.path(), "d.toml", base);
        let (prof, src) = Profile::load(&p).expect("valid");
        assert_eq!(prof.checkpoints("d.toml", &src).expect("none"), None);
        let p = write(
            dir.path(),
            "e.toml",
            &format!("{base}[checkpoint]\nevery = \"5s\"\n"),
        );
        assert!(
            Profile::load(&p)
                .expect_err("unknown key")
                .message
                .contains("every")
        );
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn reads_a_full_profile() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(
            dir.path(),
            "job.toml",
            r#"name = "fft8"
topology = "t.dot"
[components]
source = "s.wasm"
[parameters]
input = [1.0, 2.5, -3]
label = "x"
n = 8
[queue]
capacity = 64
kind = "priority"
[limits]
memory = "16MiB"
cpu = "500ms"
wall = "2m"
[requirements]
arch = "x86_64"
rank = "free_memory"
"#,
        );
        let (prof, src) = Profile::load(&p).expect("valid");
        assert_eq!(prof.queue.capacity, 64);
        let params = prof.parameter_strings();
        assert_eq!(params["input"], "1.0,2.5,-3");
        assert_eq!(params["n"], "8");
        let l = prof.limits("job.toml", &src).expect("valid limits");
        assert_eq!(l.memory_bytes, 16 << 20);
        assert_eq!(l.cpu, Some(Duration::from_millis(500)));
        assert_eq!(l.wall, Some(Duration::from_secs(120)));
        assert_eq!(
            Profile::resolve(&p, Path::new("t.dot")),
            dir.path().join("t.dot")
        );
    }

    #[test]
    fn errors_name_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(
            dir.path(),
            "a.toml",
            "name = \"x\"\ntopology = \"t.dot\"\n[components]\nsource = \"s\"\nsurprise = 3\n",
        );
        let p2 = write(
            dir.path(),
            "b.toml",
            "name = \"x\"\ntopology = \"t.dot\"\ncolour = 1\n[components]\n",
        );
        let e = Profile::load(&p2).expect_err("unknown field");
        assert_eq!(e.line, 3, "{e}");
        assert!(
            e.to_string().starts_with(&format!("{}:3:", p2.display())),
            "{e}"
        );
        assert!(e.message.contains("colour"), "{e}");
        // `surprise = 3` under [components] is a component whose path is not a string.
        assert!(Profile::load(&p).is_err());
        let p3 = write(
            dir.path(),
            "c.toml",
            "name = \"x\"\ntopology = \"t.dot\"\n[components]\n[limits]\ncpu = \"fast\"\n",
        );
        let (prof, src) = Profile::load(&p3).expect("parses");
        let e = prof.limits("c.toml", &src).expect_err("bad duration");
        assert_eq!(e.line, 5);
        assert!(Profile::load(&dir.path().join("missing.toml")).is_err());
        let p4 = write(dir.path(), "d.toml", "name = [\n");
        assert!(Profile::load(&p4).is_err());
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("3"), Some(3));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("10"), None);
    }

    #[test]
    fn parameters_read_as_jobs_read_them_whatever_quotes_a_string_holds() {
        // Found by fuzzing: a table parameter whose string had hundreds of quotes in a row
        // overflowed the TOML writer's count of them.
        let quotes = "'".repeat(300);
        let src = format!(
            "name = \"x\"\ntopology = \"t.dot\"\n[components]\n[parameters]\n\
             a.tx = [\"{quotes}\", \"b\"]\nn = 1.0\nl = [1, \"two\"]\n"
        );
        let p: Profile = toml::from_str(&src).expect("a profile");
        let got = p.parameter_strings();
        assert_eq!(got["a"], format!("tx={quotes},b"));
        assert_eq!(got["n"], "1.0");
        assert_eq!(got["l"], "1,two");
    }
}
