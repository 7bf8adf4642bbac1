//! A node's side of a job's checkpoint: its part paused, its links held and drained to the
//! cut's mark, its image taken, everything let go, and the image encoded into a blob. And its
//! side of a move: the part that leaves is saved the same way but stays paused; a part that
//! stays holds only its links with the one that leaves.
//!
//! Each node does this on its own, at the broker's request, for the same cut: a sending end is
//! held only after its own part has paused (what its vertices sent before stays on the link
//! before the mark, what they did not send stays in the part's outbox), and a receiving end
//! reads to the mark and no further. The images of every part then form a consistent cut
//! whatever order the nodes pause in ([`mvm_queue::remote::mark`]).

use std::time::Duration;

use bytes::Bytes;
use mvm_component::runtime::checkpoint::{PartControl, PartImage, Paused};
use mvm_queue::remote::{Drain, Hold};

use super::part::Save;
use super::parts::{Control, Marks};
use crate::proto::{Failure, FailureKind, Hash, OutputFile};
use crate::worker::Control as WorkerControl;

/// How long a part's vertices have to reach a pause point.
const PAUSE_WAIT: Duration = Duration::from_secs(5);

/// How long the part's links have, once it is paused, to reach the cut's mark: the other
/// nodes of the job pause meanwhile, and their marks arrive.
const MARK_WAIT: Duration = Duration::from_secs(10);

/// How long a part's sending ends stay held after its image is taken, waiting for the broker
/// to say every part of the cut is saved ([`crate::proto::BrokerRequest::ReleaseCut`]). Longer
/// than the broker takes to give a cut up ([`crate::broker`]'s limit), so that a cut it records
/// never has a part that let its links go early.
pub(crate) const RELEASE_WAIT: Duration = Duration::from_secs(30);

/// How long a part's sending ends stay held after its image is taken, when the broker waits
/// `within_ms` for the cut (a cut whose files may take longer than its usual limit): longer
/// than that ([`crate::proto::save_wait`]), and never less than [`RELEASE_WAIT`].
pub(super) fn release_wait(within_ms: Option<u64>) -> Duration {
    within_ms.map_or(RELEASE_WAIT, |ms| {
        crate::proto::save_wait(ms).max(RELEASE_WAIT)
    })
}

/// A checkpoint's blob, its hash, and the files of the part's sandboxes (none: its job has no
/// files).
pub(super) type Taken = (Hash, Bytes, Option<Vec<OutputFile>>);

/// Keeps every file of the sandboxes `save` names ([`crate::files::Sandbox::save`]), while
/// the part is paused.
async fn save_files(save: Option<&Save>, cut: u64) -> Result<Option<Vec<OutputFile>>, Failure> {
    let Some(save) = save else { return Ok(None) };
    let failed = |m: String| Failure::new(FailureKind::Failed, format!("checkpoint {cut}: {m}"));
    let (sandbox, bound) = (save.sandbox.clone(), save.bound);
    match tokio::task::spawn_blocking(move || sandbox.save(bound)).await {
        Ok(Ok(files)) => Ok(Some(files)),
        Ok(Err(m)) => Err(failed(m)),
        Err(e) => Err(failed(e.to_string())),
    }
}

/// Takes the checkpoint `cut` of a running part: the blob's hash and the blob, and what its
/// sandboxes hold (`save`). The part goes
/// on whatever happens, and its receiving ends too; its sending ends stay held until
/// [`let_go`], so that no item after the cut's mark reaches a part of the job whose image is
/// not taken yet (its node may be asked later than this one, and would read on past a mark it
/// was not yet asked to drain to).
///
/// # Errors
/// A vertex that reaches no pause point in time (a loop that calls no import), a link that
/// does not reach the mark in time or fails, or an image that cannot be encoded; every end is
/// let go then.
pub(super) async fn take(marks: &Marks, cut: u64, save: Option<&Save>) -> Result<Taken, Failure> {
    let control = match &marks.control {
        Control::Here(c) => c,
        Control::Worker(w) => {
            let blob = freeze_worker(w, marks, cut).await?;
            let files = save_files(save, cut).await;
            for (_, d) in &marks.drains {
                d.release();
            }
            w.resume_now().await;
            if files.is_err() {
                let_go(marks);
            }
            return Ok((Hash::of(&blob), blob, files?));
        }
    };
    let (paused, image) = freeze(control, marks, cut).await?;
    let files = save_files(save, cut).await;
    for (_, d) in &marks.drains {
        d.release();
    }
    paused.resume();
    let taken = files.and_then(|files| {
        let (hash, blob) = encode(&image, cut)?;
        Ok((hash, blob, files))
    });
    if taken.is_err() {
        let_go(marks);
    }
    taken
}

/// Lets the sending ends of a part held since its checkpoint go on.
pub(super) fn let_go(marks: &Marks) {
    for (_, h) in &marks.holds {
        h.release();
    }
}

/// Saves a part that moves to another node at cut `cut`: the blob's hash, the blob, and the
/// pause it stays in (its links held), for [`PartControl::resume_kept`] should the move be
/// given up.
///
/// # Errors
/// As [`take`]; the part then goes on.
///
/// [`PartControl::resume_kept`]: mvm_component::runtime::checkpoint::PartControl::resume_kept
pub(super) async fn leave(
    marks: &Marks,
    cut: u64,
    save: Option<&Save>,
) -> Result<(Taken, u64), Failure> {
    let control = match &marks.control {
        Control::Here(c) => c,
        // The worker stays paused, its feeds stopped, until it is stopped or resumed.
        Control::Worker(w) => {
            let blob = freeze_worker(w, marks, cut).await?;
            return match save_files(save, cut).await {
                Ok(files) => Ok(((Hash::of(&blob), blob, files), 0)),
                Err(f) => {
                    release(marks);
                    w.resume_now().await;
                    Err(f)
                }
            };
        }
    };
    let (paused, image) = freeze(control, marks, cut).await?;
    let taken = match save_files(save, cut).await {
        Ok(files) => encode(&image, cut).map(|(hash, blob)| (hash, blob, files)),
        Err(f) => Err(f),
    };
    match taken {
        Ok(t) => Ok((t, paused.keep())),
        Err(f) => {
            release(marks);
            paused.resume();
            Err(f)
        }
    }
}

/// Holds and drains the link ends of a part that stays while the part at their other end
/// moves: they reach cut `cut`'s mark, and stay held. The part itself runs on.
///
/// # Errors
/// A link end that does not reach the mark in time, or fails; every end is released then.
pub(super) async fn hold_links(holds: &[Hold], drains: &[Drain], cut: u64) -> Result<(), Failure> {
    let marked = reach(holds, drains.iter(), cut).await;
    marked.map_err(|m| {
        for h in holds {
            h.release();
        }
        for d in drains {
            d.release();
        }
        Failure::new(FailureKind::Failed, format!("move at cut {cut}: {m}"))
    })
}

/// Holds `holds` and drains `drains` to mark `cut`, within [`MARK_WAIT`].
async fn reach<'a>(
    holds: &[Hold],
    drains: impl Iterator<Item = &'a Drain>,
    cut: u64,
) -> Result<(), String> {
    reach_after(holds, drains, cut, std::future::ready(())).await
}

/// As [`reach`], the holds asked for only once `ready` completes (the drains at once).
async fn reach_after<'a>(
    holds: &[Hold],
    drains: impl Iterator<Item = &'a Drain>,
    cut: u64,
    ready: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let held = async {
        ready.await;
        futures::future::join_all(holds.iter().map(|h| h.hold(cut))).await
    };
    let drained = futures::future::join_all(drains.map(|d| d.drain(cut)));
    match tokio::time::timeout(MARK_WAIT, futures::future::join(held, drained)).await {
        Err(_) => Err(format!(
            "the links did not reach the mark within {MARK_WAIT:?}"
        )),
        Ok((held, drained)) => held
            .into_iter()
            .chain(drained)
            .find_map(Result::err)
            .map_or(Ok(()), |e| Err(format!("a link: {e}"))),
    }
}

/// Pauses the part at cut `cut`, holds and drains its links to the cut's mark, and images it
/// with what its links delivered past its queues' room. The part stays paused (while the
/// handle is held) and its links held ([`release`]); on an error, both go on.
async fn freeze<'a>(
    control: &'a PartControl,
    marks: &Marks,
    cut: u64,
) -> Result<(Paused<'a>, PartImage), Failure> {
    let failed = |m: String| Failure::new(FailureKind::Failed, format!("checkpoint {cut}: {m}"));
    let paused = control
        .pause(PAUSE_WAIT)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let holds: Vec<Hold> = marks.holds.iter().map(|(_, h)| h.clone()).collect();
    if let Err(m) = reach(&holds, marks.drains.iter().map(|(_, d)| d), cut).await {
        release(marks);
        drop(paused); // resumes
        return Err(failed(m));
    }
    let mut image = paused.image();
    for ((vertex, port, _), d) in &marks.drains {
        let queue = format!("{vertex}:{port}");
        let held = d.held();
        tracing::debug!(cut, %queue, held = held.len(), "drained past the queue's room");
        if !held.is_empty() && !image.append(&queue, held) {
            release(marks);
            return Err(failed(format!("the part has no queue {queue}")));
        }
    }
    Ok((paused, image))
}

/// How long a worker has to image its paused part.
const IMAGE_WAIT: Duration = Duration::from_secs(30);

/// As [`freeze`], for a part in a worker (see the module `worker`): the worker pauses the part
/// and sends what its remote outputs hold; the drains start at once, and the holds once the
/// node's queues of the outputs are empty (what the part sent before its pause goes before the
/// mark); then the worker images the part, with what the node's feeds and drained ends hold.
/// The worker stays paused, and the links held; on an error, both go on.
async fn freeze_worker(w: &WorkerControl, marks: &Marks, cut: u64) -> Result<Bytes, Failure> {
    let failed = |m: String| Failure::new(FailureKind::Failed, format!("checkpoint {cut}: {m}"));
    w.pause(cut, PAUSE_WAIT + Duration::from_secs(10))
        .await
        .map_err(failed)?;
    let holds: Vec<Hold> = marks.holds.iter().map(|(_, h)| h.clone()).collect();
    let drains = marks.drains.iter().map(|(_, d)| d);
    if let Err(m) = reach_after(&holds, drains, cut, w.outboxes_empty()).await {
        release(marks);
        w.resume_now().await;
        return Err(failed(m));
    }
    let kept = |vertex: &str, port: &str| {
        marks
            .drains
            .iter()
            .find(|((v, p, _), _)| v == vertex && p == port)
            .map(|(_, d)| d.held())
            .unwrap_or_default()
    };
    match w.image(cut, kept, IMAGE_WAIT).await {
        Ok(blob) => Ok(blob),
        Err(m) => {
            release(marks);
            w.resume_now().await;
            Err(failed(m))
        }
    }
}

/// Lets every link end of the part go on.
pub(super) fn release(marks: &Marks) {
    for (_, h) in &marks.holds {
        h.release();
    }
    for (_, d) in &marks.drains {
        d.release();
    }
}

fn encode(image: &PartImage, cut: u64) -> Result<(Hash, Bytes), Failure> {
    let blob = image
        .encode()
        .map_err(|e| Failure::new(FailureKind::Failed, format!("checkpoint {cut}: {e}")))?;
    Ok((Hash::of(&blob), Bytes::from(blob)))
}
