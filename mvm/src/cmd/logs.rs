//! `mvm logs`: what a job's vertices wrote (stdout, stderr, `mvm.log`), kept in the group's
//! job log; with `--follow`, as they write it, until the job ends.

use std::collections::BTreeMap;
use std::time::Duration;

use mvm_component::runtime::logs::{epoch, now_ms};
use mvm_superpeer::proto::{JobId, JobLogLine, LogCursor};

use super::job::{BrokerArg, connect, runtime, wire};
use crate::exit::{Failure, USAGE};
use crate::{Output, OutputArg};

/// How often `--follow` asks for new lines.
const POLL: Duration = Duration::from_millis(500);

/// How long `--follow` goes on asking once the job has ended: a part stopped because another
/// failed ships what it still held after the end (nodes ship every 500 ms).
const AFTER_END: Duration = Duration::from_millis(1500);

/// Arguments of `mvm logs`.
#[derive(Debug, clap::Args)]
pub(crate) struct LogsArgs {
    /// The job id.
    job: JobId,
    /// Only this vertex's lines.
    #[arg(long, value_name = "VERTEX")]
    vertex: Option<String>,
    /// Go on printing lines as the vertices write them, until the job ends.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only lines written within this long before now (e.g. `30s`, `5m`, `2h`).
    #[arg(long, value_name = "DURATION")]
    since: Option<String>,
    /// Begin each line with the time it was written (RFC 3339, UTC).
    #[arg(long)]
    timestamps: bool,
    #[command(flatten)]
    broker: BrokerArg,
    /// Output format (`json`: one JSON object a line).
    #[command(flatten)]
    out: OutputArg,
}

/// Parses `--since`: a duration before now, as milliseconds since the Unix epoch.
fn since_ms(since: Option<&str>) -> Result<Option<u64>, Failure> {
    let Some(s) = since else {
        return Ok(None);
    };
    let d = mvm_component::profile::parse_duration(s).ok_or_else(|| Failure {
        code: USAGE,
        error: anyhow::anyhow!("--since must be a duration (e.g. \"30s\", \"5m\"), not '{s}'"),
    })?;
    Ok(Some(now_ms().saturating_sub(
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
    )))
}

/// Prints lines, and keeps where each run's vertex is.
struct Printer {
    output: Output,
    timestamps: bool,
    job: JobId,
    /// The last line printed of each run and vertex.
    seen: BTreeMap<(u32, String), u64>,
    /// The run of the last line printed.
    run: Option<u32>,
}

impl Printer {
    fn cursors(&self) -> Vec<LogCursor> {
        self.seen
            .iter()
            .map(|((attempt, vertex), seq)| LogCursor {
                attempt: *attempt,
                vertex: vertex.clone(),
                seq: *seq,
            })
            .collect()
    }

    fn print(&mut self, lines: &[JobLogLine]) -> Result<(), Failure> {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let mut w = |s: String| writeln!(out, "{s}").map_err(Failure::failed);
        for l in lines {
            let key = (l.attempt, l.line.vertex.clone());
            let before = self.seen.insert(key, l.line.seq);
            if self.output == Output::Json {
                let v = serde_json::json!({
                    "job": self.job,
                    "attempt": l.attempt,
                    "vertex": l.line.vertex,
                    "seq": l.line.seq,
                    "at_ms": l.line.at_ms,
                    "stream": l.line.stream.as_str(),
                    "text": l.line.text,
                });
                w(v.to_string())?;
                continue;
            }
            if self.run != Some(l.attempt) {
                if self.run.is_some() || l.attempt > 0 {
                    w(format!("--- run {} of {} ---", l.attempt, self.job))?;
                }
                self.run = Some(l.attempt);
            }
            let vertex = &l.line.vertex;
            // A gap in one numbering: lines the job's bound dropped before they were kept.
            let gap = before
                .filter(|b| epoch(*b) == epoch(l.line.seq))
                .map_or(0, |b| l.line.seq.saturating_sub(b + 1));
            if gap > 0 {
                w(format!(
                    "[{vertex}] … {gap} lines dropped (over the job's log bound)"
                ))?;
            }
            let stamp = if self.timestamps {
                format!("{} ", rfc3339(l.line.at_ms))
            } else {
                String::new()
            };
            let tag = match l.line.stream {
                mvm_superpeer::proto::LogStream::Stdout => vertex.clone(),
                s => format!("{vertex} {s}"),
            };
            w(format!("{stamp}[{tag}] {}", l.line.text))?;
        }
        Ok(())
    }
}

/// A time as RFC 3339 in UTC, to the millisecond.
pub(super) fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

pub(crate) fn logs(args: LogsArgs) -> Result<(), Failure> {
    let since = since_ms(args.since.as_deref())?;
    runtime()?.block_on(async {
        let client = connect(&args.broker).await?;
        let mut p = Printer {
            output: args.out.output,
            timestamps: args.timestamps,
            job: args.job.clone(),
            seen: BTreeMap::new(),
            run: None,
        };
        let mut ended_at: Option<tokio::time::Instant> = None;
        loop {
            let got = client
                .logs(&args.job, p.cursors(), since, args.vertex.clone())
                .await
                .map_err(wire)?;
            p.print(&got.lines)?;
            if got.more {
                continue;
            }
            if !args.follow {
                return Ok(());
            }
            if got.state.is_final() {
                let at = *ended_at.get_or_insert_with(tokio::time::Instant::now);
                if at.elapsed() >= AFTER_END {
                    return Ok(());
                }
            }
            tokio::time::sleep(POLL).await;
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_printed_in_rfc3339() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(
            super::rfc3339(1_796_515_200_000),
            "2026-12-06T00:00:00.000Z"
        );
    }
}
