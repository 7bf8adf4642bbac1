//! Jobs' logs: the lines nodes ship of their parts (recorded in the job log, so that a new
//! leader has them and a failed job keeps what it wrote), and what clients read of them.

use libp2p::PeerId;
use mvm_component::policy::Principal;
use mvm_component::runtime::logs::LogLine;

use super::core::{Core, Effect, Reply, Then};
use super::{Broker, admit, fail};
use crate::joblog::state::{Command, JobRecord};
use crate::proto::{FailureKind, JobId, JobLogLine, JobLogs, LogCursor, Response};

/// The most bytes of lines one answer to a client carries; the rest comes on its next ask.
const MAX_ANSWER: usize = 4 << 20;

impl Core {
    /// Lines a node ships of its part of run `attempt` of `job`, recorded then answered at
    /// `reply`. Taken from a node that runs (or ran) a part of that run, also after the job
    /// ended.
    pub(super) fn logs(
        &mut self,
        out: &mut Vec<Effect>,
        peer: PeerId,
        job: JobId,
        attempt: u32,
        lines: Vec<LogLine>,
        reply: Reply,
    ) {
        let known = self.log.read(|s| match s.job(&job) {
            None => Err(format!("no job {job}")),
            Some(j) if attempt > j.attempt => Err(format!("job {job} has not begun run {attempt}")),
            Some(j) if !ran_there(j, peer, attempt) => {
                Err(format!("{peer} runs no part of run {attempt} of {job}"))
            }
            Some(_) => Ok(()),
        });
        match known {
            Err(why) => out.push(Effect::Reply(reply, fail(FailureKind::Refused, why))),
            Ok(()) => out.push(Effect::Record {
                command: Command::Logs {
                    job,
                    attempt,
                    lines,
                },
                then: Then::Answer { reply },
            }),
        }
    }

    /// The lines a part's report carries: recorded before what the report leads to.
    pub(super) fn report_logs(
        &mut self,
        out: &mut Vec<Effect>,
        job: &JobId,
        attempt: u32,
        lines: Vec<LogLine>,
    ) {
        if !lines.is_empty() {
            out.push(Effect::Record {
                command: Command::Logs {
                    job: job.clone(),
                    attempt,
                    lines,
                },
                then: Then::Nothing,
            });
        }
    }
}

/// Whether `peer` ran a part of run `attempt` of `j`: it runs one now, a part moved from it,
/// or the run was given up (its parts are no longer listed).
fn ran_there(j: &JobRecord, peer: PeerId, attempt: u32) -> bool {
    attempt < j.attempt
        || j.parts.iter().any(|p| p.node == peer)
        || j.moves
            .iter()
            .any(|m| m.attempt == attempt && m.from == peer)
}

impl Broker {
    /// What `who` may read of `job`'s logs: the lines after `after`, written since `since_ms`,
    /// of `vertex` (or every vertex).
    pub(super) fn read_logs(
        &self,
        who: &Principal,
        job: &JobId,
        after: &[LogCursor],
        since_ms: Option<u64>,
        vertex: Option<&str>,
    ) -> Response {
        if let Some(r) = admit::refusal(&self.site, &self.log, who, "read-results", job) {
            return r;
        }
        let read = self.log.read(|s| {
            s.job(job)
                .map(|j| (j.state, select(j, after, since_ms, vertex)))
        });
        match read {
            None => fail(FailureKind::NotFound, format!("no job {job}")),
            Some((state, (lines, more))) => {
                Response::Logs(Box::new(JobLogs { lines, state, more }))
            }
        }
    }
}

/// The lines of `j` a reader asks for, by run then time, at most [`MAX_ANSWER`] bytes of them
/// (and whether more were left).
fn select(
    j: &JobRecord,
    after: &[LogCursor],
    since_ms: Option<u64>,
    vertex: Option<&str>,
) -> (Vec<JobLogLine>, bool) {
    let mut lines: Vec<JobLogLine> = Vec::new();
    for v in &j.logs {
        if vertex.is_some_and(|x| x != v.vertex) {
            continue;
        }
        let seen = after
            .iter()
            .find(|c| c.attempt == v.attempt && c.vertex == v.vertex)
            .map(|c| c.seq);
        lines.extend(
            v.lines
                .iter()
                .filter(|l| seen.is_none_or(|s| l.seq > s))
                .filter(|l| since_ms.is_none_or(|t| l.at_ms >= t))
                .map(|l| JobLogLine {
                    attempt: v.attempt,
                    line: l.clone(),
                }),
        );
    }
    // Each vertex's lines are in order already; the sort is stable.
    lines.sort_by_key(|l| (l.attempt, l.line.at_ms));
    let mut bytes = 0;
    let mut keep = lines.len();
    for (i, l) in lines.iter().enumerate() {
        bytes += l.line.weight();
        if bytes > MAX_ANSWER {
            keep = i;
            break;
        }
    }
    let more = keep < lines.len();
    // Each vertex's lines are in time order too, so what is kept of each is a prefix of its
    // lines: the reader's cursor skips none.
    lines.truncate(keep);
    (lines, more)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::joblog::state::VertexLogs;
    use mvm_component::runtime::logs::LogStream;

    fn record(logs: Vec<VertexLogs>) -> JobRecord {
        JobRecord {
            logs,
            ..crate::joblog::state::tests::job("a-1-0", 0, 0, Vec::new())
        }
    }

    fn vertex(attempt: u32, name: &str, lines: &[(u64, u64)]) -> VertexLogs {
        VertexLogs {
            attempt,
            vertex: name.into(),
            lines: lines
                .iter()
                .map(|&(seq, at_ms)| LogLine {
                    vertex: name.into(),
                    seq,
                    at_ms,
                    stream: LogStream::Stdout,
                    text: format!("{name} {seq}"),
                })
                .collect(),
            bytes: 0,
        }
    }

    fn texts(lines: &[JobLogLine]) -> Vec<String> {
        lines
            .iter()
            .map(|l| format!("{}:{}", l.attempt, l.line.text))
            .collect()
    }

    #[test]
    fn a_reader_gets_the_lines_after_its_cursor_by_run_then_time() {
        let j = record(vec![
            vertex(0, "a", &[(0, 10), (1, 30)]),
            vertex(0, "b", &[(0, 20)]),
            vertex(1, "a", &[(0, 5)]),
        ]);
        let (all, more) = select(&j, &[], None, None);
        assert!(!more);
        assert_eq!(texts(&all), vec!["0:a 0", "0:b 0", "0:a 1", "1:a 0"]);
        let after = [LogCursor {
            attempt: 0,
            vertex: "a".into(),
            seq: 0,
        }];
        let (next, _) = select(&j, &after, None, None);
        assert_eq!(texts(&next), vec!["0:b 0", "0:a 1", "1:a 0"]);
        let (b, _) = select(&j, &[], None, Some("b"));
        assert_eq!(texts(&b), vec!["0:b 0"]);
        let (late, _) = select(&j, &[], Some(20), None);
        assert_eq!(texts(&late), vec!["0:b 0", "0:a 1"]);
    }
}
