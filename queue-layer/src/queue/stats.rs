//! A snapshot of one queue's counters.

use std::time::Duration;

use serde::Serialize;

use super::Kind;

/// What a queue has done since it was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// The queue's name.
    pub name: String,
    /// Its kind.
    pub kind: Kind,
    /// Its codec's name.
    pub codec: String,
    /// Items held now.
    pub depth: u64,
    /// Bytes held now.
    pub depth_bytes: u64,
    /// The most items it has held at once, as sampled: at every 32nd send of each sender and at
    /// every send that found the queue full (exact per send would cost a cache miss per item).
    pub high_water: u64,
    /// Items sent into it.
    pub items_in: u64,
    /// Bytes sent into it.
    pub bytes_in: u64,
    /// Items taken out of it.
    pub items_out: u64,
    /// Bytes taken out of it.
    pub bytes_out: u64,
    /// Time producers spent waiting for room, summed over producers.
    #[serde(serialize_with = "as_secs")]
    pub blocked: Duration,
    /// Items evicted under the drop-oldest policy.
    pub dropped_items: u64,
    /// Bytes evicted under the drop-oldest policy.
    pub dropped_bytes: u64,
    /// Sends refused because the queue was full (policy `fail`, or a non-blocking send).
    pub rejected: u64,
    /// Items handed back by a consumer that stopped and served again.
    pub requeued: u64,
    /// Whether end-of-stream was signalled.
    pub closed: bool,
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}
