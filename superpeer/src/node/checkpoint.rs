//! A node's side of a job's checkpoint: its part paused, its links held and drained to the
//! cut's mark, its image taken, everything let go, and the image encoded into a blob.
//!
//! Each node does this on its own, at the broker's request, for the same cut: a sending end is
//! held only after its own part has paused (what its vertices sent before stays on the link
//! before the mark, what they did not send stays in the part's outbox), and a receiving end
//! reads to the mark and no further. The images of every part then form a consistent cut
//! whatever order the nodes pause in ([`mvm_queue::remote::mark`]).

use std::time::Duration;

use bytes::Bytes;

use super::parts::Marks;
use crate::proto::{Failure, FailureKind, Hash};

/// How long a part's vertices have to reach a pause point.
const PAUSE_WAIT: Duration = Duration::from_secs(5);

/// How long the part's links have, once it is paused, to reach the cut's mark: the other
/// nodes of the job pause meanwhile, and their marks arrive.
const MARK_WAIT: Duration = Duration::from_secs(10);

/// Takes the checkpoint `cut` of a running part: the blob's hash and the blob. The part goes
/// on whatever happens.
///
/// # Errors
/// A vertex that reaches no pause point in time (a loop that calls no import), a link that
/// does not reach the mark in time or fails, or an image that cannot be encoded.
pub(super) async fn take(marks: &Marks, cut: u64) -> Result<(Hash, Bytes), Failure> {
    let failed = |m: String| Failure::new(FailureKind::Failed, format!("checkpoint {cut}: {m}"));
    let paused = marks
        .control
        .pause(PAUSE_WAIT)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let holds = futures::future::join_all(marks.holds.iter().map(|h| h.hold(cut)));
    let drains = futures::future::join_all(marks.drains.iter().map(|(_, d)| d.drain(cut)));
    let reached = tokio::time::timeout(MARK_WAIT, futures::future::join(holds, drains)).await;
    let release = || {
        for h in &marks.holds {
            h.release();
        }
        for (_, d) in &marks.drains {
            d.release();
        }
    };
    let marked = match reached {
        Err(_) => Err(format!(
            "the links did not reach the mark within {MARK_WAIT:?}"
        )),
        Ok((held, drained)) => held
            .into_iter()
            .chain(drained)
            .find_map(Result::err)
            .map_or(Ok(()), |e| Err(format!("a link: {e}"))),
    };
    if let Err(m) = marked {
        release();
        drop(paused); // resumes
        return Err(failed(m));
    }
    let mut image = paused.image();
    for ((vertex, port, _), d) in &marks.drains {
        let queue = format!("{vertex}:{port}");
        let held = d.held();
        if !held.is_empty() && !image.append(&queue, held) {
            release();
            return Err(failed(format!("the part has no queue {queue}")));
        }
    }
    release();
    paused.resume();
    let blob = image.encode().map_err(|e| failed(e.to_string()))?;
    Ok((Hash::of(&blob), Bytes::from(blob)))
}
