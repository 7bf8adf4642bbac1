//! Checkpoints: consistent cuts of every part of a running job, taken at its interval or when
//! a client asks, stored here by content hash and recorded in the job log.
//!
//! A cut is asked of every part's node at once ([`BrokerRequest::Checkpoint`]); each node
//! pauses its part, drains its links to the cut's mark, and answers with its part's blob (see
//! the node's `checkpoint` module). The cut counts once every blob is stored and the cut is
//! recorded; a part that does not answer in time, or fails, gives the cut up, and the job goes
//! on (the next interval tries again).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use libp2p::PeerId;
use mvm_component::runtime::checkpoint::{
    Count, PartImage, VertexCounts, VertexImage, VertexPhase,
};

use super::core::{Core, Effect, Reply, Then, first};
use super::{fail, now_ms};
use crate::joblog::state::JobRecord;
use crate::joblog::{Applied, Command, LogError};
use crate::proto::{
    BrokerRequest, CheckpointInfo, CutPart, EdgeTraffic, Failure, FailureKind, FileSpec, Hash,
    JobId, JobState, MAX_SAVE, OutputFile, PortTraffic, Response,
};

/// A part's image as its node answered: the blob's hash, the blob, and the files of its
/// sandboxes (none: its job has no files).
type Saved = (Hash, Bytes, Option<Vec<OutputFile>>);

/// Why a part's image cannot be taken if `store` lacks a file of `files` it names.
pub(super) fn unheld(
    store: Option<&crate::files::FileStore>,
    files: Option<&[OutputFile]>,
) -> Option<String> {
    let (store, files) = (store?, files?);
    let f = files.iter().find(|f| store.size(&f.hash) != Some(f.size))?;
    Some(format!(
        "file '{}' of vertex '{}' was not sent first",
        f.path, f.vertex
    ))
}

/// A cut under way.
pub(super) struct Cut {
    /// Its number within the job.
    cut: u64,
    /// The run it is of.
    attempt: u32,
    /// Each part's node and vertices, in the job's order of parts.
    parts: Vec<(PeerId, Vec<String>)>,
    /// Each part's blob, once its node has answered.
    blobs: Vec<Option<Saved>>,
    /// Clients waiting for it.
    replies: Vec<Reply>,
    /// When it was asked for.
    started: Instant,
    /// How long it may take ([`save_limit`]).
    limit: Duration,
}

/// How long a cut may take, from its request to its last blob, when its job has no files (or
/// few); a later one is given up. Less than a node holds its sending ends for it
/// ([`crate::node`]'s `RELEASE_WAIT`), so that no part of a cut recorded has let its links go
/// early.
const CUT_LIMIT: Duration = Duration::from_secs(20);

/// How long a save of parts with `vertices` vertices in all may take, for a job whose files
/// are `files` (`None`: it has none, and [`CUT_LIMIT`] holds): [`CUT_LIMIT`] for pausing and
/// imaging, and then as long as a transfer of the most their sandboxes may hold (each vertex's
/// inputs and output bound) may take before it is cut ([`crate::files::allowed`]: 30 s, then
/// the least rate a transfer keeps). The broker tells the nodes (`within_ms`), which hold
/// their sending ends longer than that.
pub(super) fn save_limit(files: Option<&FileSpec>, vertices: usize) -> Option<Duration> {
    let f = files?;
    let bytes = f
        .input_bytes()
        .saturating_add(f.output_bytes)
        .saturating_mul(u64::try_from(vertices).unwrap_or(u64::MAX));
    let limit = CUT_LIMIT + crate::files::allowed(bytes);
    Some(limit.min(MAX_SAVE))
}

/// `d` in whole milliseconds, as a request carries it.
pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Core {
    /// Starts a checkpoint of a running job that asked for them, unless one is under way
    /// (then `reply` waits for that one).
    pub(super) fn start_cut(&mut self, out: &mut Vec<Effect>, job: &JobId, reply: Option<Reply>) {
        if let Some(c) = self.cuts.get_mut(job) {
            c.replies.extend(reply);
            return;
        }
        if self.moves.contains_key(job) {
            if let Some(reply) = reply {
                let why = format!("a part of job {job} is moving; try again once it has moved");
                out.push(Effect::Reply(reply, fail(FailureKind::Unavailable, why)));
            }
            return;
        }
        // A part that has ended well is in the cut as its vertices' outputs, which the log
        // holds: it is not asked.
        let found = self.log.read(|s| {
            let Some(j) = s.job(job) else {
                return Err((FailureKind::NotFound, format!("no job {job}")));
            };
            if j.checkpoint.is_none() {
                let why =
                    format!("job {job} did not ask for checkpoints ([checkpoint] in its profile)");
                return Err((FailureKind::Input, why));
            }
            if j.state != JobState::Running {
                let why = format!("job {job} is {:?}, not running", j.state);
                return Err((FailureKind::Input, why));
            }
            let parts: Vec<_> = j
                .parts
                .iter()
                .map(|p| {
                    let ended = p.done.then(|| ended_part(job, &p.vertices, j));
                    (p.node, p.vertices.clone(), ended)
                })
                .collect();
            let last = j.checkpoints.last().map_or(0, |c| c.cut);
            let moved = j.moves.last().map_or(0, |m| m.cut);
            // The parts asked save their sandboxes' files.
            let vertices = parts
                .iter()
                .filter(|(_, _, ended)| ended.is_none())
                .map(|(_, v, _)| v.len())
                .sum();
            let limit = save_limit(j.files.as_ref(), vertices);
            Ok((j.attempt, last.max(moved), parts, limit))
        });
        let (attempt, last, parts, limit) = match found {
            Ok(found) => found,
            Err((kind, why)) => {
                if let Some(reply) = reply {
                    out.push(Effect::Reply(reply, fail(kind, why)));
                }
                return;
            }
        };
        // After every cut of the job's links: its checkpoints' and its moves'.
        let cut = last.max(self.cut_floor.get(job).copied().unwrap_or(0)) + 1;
        self.cut_floor.insert(job.to_owned(), cut);
        self.last_cut.insert(job.to_owned(), self.now);
        let mut blobs = Vec::with_capacity(parts.len());
        for (i, (peer, _, ended)) in parts.iter().enumerate() {
            if let Some(blob) = ended {
                blobs.push(Some((Hash::of(blob), blob.clone(), None)));
                continue;
            }

            blobs.push(None);
            out.push(Effect::Send {
                peer: *peer,
                addrs: self.members.addrs(peer),
                request: BrokerRequest::Checkpoint {
                    job: job.to_owned(),
                    attempt,
                    cut,
                    within_ms: limit.map(millis),
                },
                then: Then::CutTaken {
                    job: job.to_owned(),
                    cut,
                    part: i,
                },
            });
        }
        if blobs.iter().all(Option::is_some) {
            // Every part has ended: the job is ending, and there is nothing to save.
            if let Some(reply) = reply {
                let why = format!("job {job} is ending: every part has ended");
                out.push(Effect::Reply(reply, fail(FailureKind::Input, why)));
            }
            return;
        }
        self.cuts.insert(
            job.to_owned(),
            Cut {
                cut,
                attempt,
                parts: parts.into_iter().map(|(p, v, _)| (p, v)).collect(),
                blobs,
                replies: reply.into_iter().collect(),
                started: self.now,
                limit: limit.unwrap_or(CUT_LIMIT),
            },
        );
    }

    /// Starts the checkpoints that are due: running jobs that asked for them, an interval
    /// after their last one (or after this broker first saw them running).
    pub(super) fn cuts_due(&mut self, out: &mut Vec<Effect>) {
        let running: Vec<(JobId, u64)> = self.log.read(|s| {
            s.jobs()
                .filter(|j| j.state == JobState::Running)
                .filter_map(|j| Some((j.id.clone(), j.checkpoint?.interval_ms)))
                .collect()
        });
        let now = self.now;
        self.last_cut
            .retain(|job, _| running.iter().any(|(j, _)| j == job));
        for (job, interval_ms) in running {
            let since = *self.last_cut.entry(job.clone()).or_insert(now);
            let due = now.saturating_duration_since(since).as_millis() >= u128::from(interval_ms);
            if due && !self.cuts.contains_key(&job) && !self.moves.contains_key(&job) {
                self.start_cut(out, &job, None);
            }
        }
    }

    /// A node answered for part `part` of cut `cut`: its blob, or why not (the cut is given
    /// up). Once every part's blob is here, they are stored and the cut recorded.
    pub(super) fn cut_taken(
        &mut self,
        out: &mut Vec<Effect>,
        job: &JobId,
        cut: u64,
        part: usize,
        answer: Result<Response, Failure>,
    ) {
        let Some(c) = self.cuts.get_mut(job).filter(|c| c.cut == cut) else {
            return;
        };
        let late = self.now.saturating_duration_since(c.started) > c.limit;
        let why = match answer {
            _ if late => Some(format!("not every part answered within {:?}", c.limit)),
            Ok(Response::Checkpoint { hash, blob, files }) if Hash::of(&blob) == hash => {
                match unheld(self.files.as_deref(), files.as_deref()) {
                    Some(missing) => Some(missing),
                    None => {
                        if let Some(slot) = c.blobs.get_mut(part) {
                            *slot = Some((hash, blob, files));
                        }
                        None
                    }
                }
            }
            Ok(Response::Checkpoint { .. }) => Some("a blob does not match its hash".to_owned()),
            Ok(_) => Some("a node answered with no blob".to_owned()),
            Err(f) => Some(format!(
                "node {}: {}",
                c.parts
                    .get(part)
                    .map(|(peer, _)| self.members.label(peer))
                    .unwrap_or_default(),
                f.message
            )),
        };
        if let Some(why) = why {
            if let Some(c) = self.cuts.remove(job) {
                tracing::warn!(%job, cut, %why, "checkpoint given up");
                self.release_cut(out, job, &c);
                give_up_cut(out, c, &why);
            }
            return;
        }
        if c.blobs.iter().any(Option::is_none) {
            return;
        }
        let Some(c) = self.cuts.remove(job) else {
            return;
        };
        // Every part is saved: their sending ends may go on.
        self.release_cut(out, job, &c);
        let mut parts = Vec::with_capacity(c.parts.len());
        let mut put = Vec::with_capacity(c.parts.len());
        for ((_, vertices), blob) in c.parts.into_iter().zip(c.blobs) {
            let Some((hash, blob, files)) = blob else {
                return;
            };
            let bytes = blob.len() as u64;
            self.blobs.put(blob.clone());
            put.push(blob);
            parts.push(CutPart {
                vertices,
                blob: hash,
                bytes,
                files,
            });
        }
        // The other replicas keep them too, so that whichever leads next can restore the job.
        out.push(Effect::Blobs {
            put,
            forget: Vec::new(),
        });
        let before = self.kept_blobs(job);
        out.push(Effect::Record {
            command: Command::Checkpoint {
                job: job.to_owned(),
                info: CheckpointInfo {
                    cut,
                    attempt: c.attempt,
                    at_ms: now_ms(),
                    parts: parts.clone(),
                },
            },
            then: Then::CutRecorded {
                job: job.to_owned(),
                before: before
                    .into_iter()
                    .chain(parts.iter().map(|p| p.blob))
                    .collect(),
                replies: c.replies,
            },
        });
    }

    /// Tells the nodes of cut `c` of `job` that every part of it is saved (or that it was given
    /// up): their sending ends, held since they saved their part, go on.
    fn release_cut(&self, out: &mut Vec<Effect>, job: &JobId, c: &Cut) {
        for (peer, _) in &c.parts {
            out.push(Effect::Send {
                peer: *peer,
                addrs: self.members.addrs(peer),
                request: BrokerRequest::ReleaseCut {
                    job: job.to_owned(),
                    attempt: c.attempt,
                    cut: c.cut,
                },
                then: Then::Nothing,
            });
        }
    }

    /// A cut was recorded (or not): the blobs of `before` that the job no longer keeps go, and
    /// the clients that asked for it are answered.
    pub(super) fn cut_recorded(
        &mut self,
        out: &mut Vec<Effect>,
        job: &JobId,
        before: Vec<Hash>,
        replies: Vec<Reply>,
        outcome: Result<Applied, LogError>,
    ) {
        let r = match first(outcome) {
            Ok(()) => {
                use std::sync::atomic::Ordering::Relaxed;
                let bytes = self.log.read(|s| {
                    s.job(job)
                        .and_then(|j| j.checkpoints.last())
                        .map_or(0, crate::proto::CheckpointInfo::bytes)
                });
                self.view.figures.checkpoints.fetch_add(1, Relaxed);
                self.view.figures.checkpoint_bytes.fetch_add(bytes, Relaxed);
                Response::Ok
            }
            Err(f) => Response::Error(f),
        };
        self.drop_blobs(out, job, before);
        for reply in replies {
            out.push(Effect::Reply(reply, r.clone()));
        }
    }

    /// Forgets, here and on the other replicas, the blobs of `blobs` that no checkpoint `job`
    /// keeps refers to.
    pub(super) fn drop_blobs(&self, out: &mut Vec<Effect>, job: &JobId, blobs: Vec<Hash>) {
        let kept = self.kept_blobs(job);
        let forget: Vec<Hash> = blobs.into_iter().filter(|h| !kept.contains(h)).collect();
        if forget.is_empty() {
            return;
        }
        for h in &forget {
            self.blobs.remove(h);
        }
        out.push(Effect::Blobs {
            put: Vec::new(),
            forget,
        });
    }

    /// The blobs of the checkpoints `job` keeps (none once it has ended).
    pub(super) fn kept_blobs(&self, job: &JobId) -> Vec<Hash> {
        self.blobs_of(job, false)
    }

    /// The blobs of the checkpoints `job`'s record lists; none if it has ended, unless
    /// `ended`.
    fn blobs_of(&self, job: &JobId, ended: bool) -> Vec<Hash> {
        self.log.read(|s| {
            s.job(job)
                .filter(|j| ended || !j.state.is_final())
                .map(|j| {
                    j.checkpoints
                        .iter()
                        .flat_map(|c| c.parts.iter().map(|p| p.blob))
                        .collect()
                })
                .unwrap_or_default()
        })
    }

    /// A job ended: its cut under way is given up and its checkpoints' blobs go.
    pub(super) fn forget_cuts(&mut self, out: &mut Vec<Effect>, job: &JobId) {
        if let Some(c) = self.cuts.remove(job) {
            give_up_cut(out, c, "the job ended");
        }
        self.last_cut.remove(job);
        self.cut_floor.remove(job);
        self.drop_blobs(out, job, self.blobs_of(job, true));
    }
}

/// The blob of a part of `job` that has ended well: each of its vertices ended, with its output
/// and counts as the log (`j`) holds them. Restored, it runs nothing, and its links end at once.
fn ended_part(job: &JobId, vertices: &[String], j: &JobRecord) -> Bytes {
    let image = PartImage {
        job: job.to_string(),
        number: 0,
        vertices: vertices
            .iter()
            .map(|v| VertexImage {
                vertex: v.clone(),
                stdout: j
                    .outputs
                    .iter()
                    .find(|(name, _)| name == v)
                    .map(|(_, out)| out.clone())
                    .unwrap_or_default(),
                counts: counts_of(v, &j.edges, &j.received),
                phase: VertexPhase::Ended,
            })
            .collect(),
        queues: Vec::new(),
    };
    // An image of names and outputs always encodes; an empty blob would be refused at restore.
    image.encode().map(Bytes::from).unwrap_or_default()
}

/// The counts of vertex `v` among a job's `edges` and `received` (`vertex:port` names).
fn counts_of(v: &str, edges: &[EdgeTraffic], received: &[PortTraffic]) -> VertexCounts {
    let port = |name: &str| {
        let (vertex, port) = name.split_once(':')?;
        (vertex == v).then(|| port.to_owned())
    };
    let count = |items, bytes| Count { items, bytes };
    VertexCounts {
        sent: (edges.iter())
            .filter_map(|e| Some((port(&e.from)?, e.to.clone(), count(e.items, e.bytes))))
            .collect(),
        received: (received.iter())
            .filter_map(|r| Some((port(&r.port)?, count(r.items, r.bytes))))
            .collect(),
    }
}

/// Answers the clients waiting for a cut given up.
pub(super) fn give_up_cut(out: &mut Vec<Effect>, c: Cut, why: &str) {
    for reply in c.replies {
        let f = fail(
            FailureKind::Failed,
            format!("checkpoint {} given up: {why}", c.cut),
        );
        out.push(Effect::Reply(reply, f));
    }
}

/// When each running job that asked for checkpoints had its last one started.
pub(super) type LastCuts = HashMap<JobId, Instant>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vertex_s_counts_are_those_of_its_own_edges_and_ports() {
        let e = |from: &str, to: &str, items: u64| EdgeTraffic {
            from: from.into(),
            to: to.into(),
            items,
            bytes: items * 8,
        };
        let p = |port: &str, items: u64| PortTraffic {
            port: port.into(),
            items,
            bytes: items * 8,
        };
        let edges = [
            e("a:out", "b:in", 3),
            e("ab:out", "a:in", 5),
            e("b:x", "a:in", 7),
        ];
        let received = [p("a:in", 12), p("ab:in", 1), p("b:in", 3)];
        let c = counts_of("a", &edges, &received);
        let count = |items: u64| Count {
            items,
            bytes: items * 8,
        };
        assert_eq!(c.sent, vec![("out".into(), "b:in".into(), count(3))]);
        assert_eq!(c.received, vec![("in".into(), count(12))]);
    }
}
