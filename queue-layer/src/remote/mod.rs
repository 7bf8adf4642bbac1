//! Queues across nodes: a queue extended over any async byte stream.
//!
//! [`export`] takes items from a local queue and writes them to a stream; [`import`] reads them
//! on the other side and puts them into a local queue there. Flow control is by credit: the
//! importer announces a window (items and bytes) and grants it again as it delivers, so a slow
//! consumer on one node blocks the producer on the other instead of growing memory.
//!
//! Guarantees: items arrive in order, without loss or duplication, also when the producer side
//! ends while items are in flight (the importer acknowledges the end only after delivering
//! everything). Each data frame is later covered by exactly one credit, so the exporter always
//! knows which items might not have arrived: if the stream breaks, those are put back into the
//! source queue (at-least-once across a failure, never lost) and the error says how many.
//!
//! Work sharing: when the consumers behind an importer go away, the importer hands back every
//! item it holds and stops; the exporter puts them back into its queue for the other consumers.
//! So any number of consumers, local to the queue or behind importers on other nodes, can share
//! one queue, and each item is delivered to exactly one of them ([`Options::work_sharing`]).

mod frame;

use std::collections::VecDeque;
use std::io;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::queue::{Entry, Receiver, RecvFailure, SendFailure, Sender};
use frame::{Frame, FrameReader, FrameWriter, Hello, VERSION};

/// How an endpoint behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "kebab-case")]
pub struct Options {
    /// Importer: the most items in flight.
    pub window_items: u32,
    /// Importer: the most bytes in flight (a single larger item is still let through alone).
    pub window_bytes: u64,
    /// The largest item accepted from the peer.
    pub max_item: u64,
    /// How long to wait for the peer's hello.
    #[serde(with = "secs")]
    pub handshake_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            window_items: 256,
            window_bytes: 8 << 20,
            max_item: 64 << 20,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl Options {
    /// A window of one item: an importer holds at most one item in flight, so the items of a
    /// shared queue go to whichever consumer is free rather than piling up at one.
    pub fn work_sharing() -> Options {
        Options {
            window_items: 1,
            ..Options::default()
        }
    }
}

mod secs {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Duration, D::Error> {
        let v = <f64 as serde::Deserialize>::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)
    }
}

/// What an endpoint did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Items that crossed the stream (sent by an exporter, received by an importer).
    pub items: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Items handed back by the importer (and put back into the exporter's queue).
    pub returned: u64,
    /// Whether the importer stopped early because its consumers went away.
    pub stopped: bool,
}

/// A remote endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The stream failed.
    #[error("stream {op} failed: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The I/O error.
        source: io::Error,
    },
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer speaks another protocol version.
    #[error("peer speaks queue protocol version {theirs}, this node speaks {ours}")]
    Version {
        /// Ours.
        ours: u16,
        /// Theirs.
        theirs: u16,
    },
    /// The peer did not say hello in time.
    #[error("the peer did not complete the handshake within {0:?}")]
    HandshakeTimeout(Duration),
    /// The stream ended before the closing handshake. The exporter put the items that might not
    /// have arrived back into its queue.
    #[error("the stream ended early; {requeued} unacknowledged items were put back into the queue")]
    Broken {
        /// Items put back.
        requeued: u64,
    },
    /// The local queue refused an item that came over the stream (it is handed back).
    #[error("{0}")]
    Refused(crate::queue::SendError<()>),
    /// An item is larger than the peer accepts (it is put back into the queue).
    #[error("item of {size} bytes is larger than the peer accepts ({limit} bytes)")]
    TooLarge {
        /// The item's size.
        size: u64,
        /// The peer's limit.
        limit: u64,
    },
}

impl RemoteError {
    fn io(op: &'static str) -> impl FnOnce(io::Error) -> RemoteError {
        move |source| RemoteError::Io { op, source }
    }
}

async fn handshake<R: AsyncRead + Unpin>(
    r: &mut FrameReader<R>,
    timeout: Duration,
) -> Result<Hello, RemoteError> {
    match tokio::time::timeout(timeout, r.next()).await {
        Err(_) => Err(RemoteError::HandshakeTimeout(timeout)),
        Ok(Ok(Some(Frame::Hello(h)))) if h.version == VERSION => Ok(h),
        Ok(Ok(Some(Frame::Hello(h)))) => Err(RemoteError::Version {
            ours: VERSION,
            theirs: h.version,
        }),
        Ok(Ok(Some(other))) => Err(RemoteError::Protocol(format!(
            "expected HELLO, got {other:?}"
        ))),
        Ok(Ok(None)) => Err(RemoteError::Broken { requeued: 0 }),
        Ok(Err(e)) => Err(e),
    }
}

/// The exporter's view of what is in flight.
struct Flight {
    /// Sent and not yet credited, oldest first.
    outstanding: VecDeque<Entry<Bytes>>,
    outstanding_bytes: u64,
    /// Taken from the queue, waiting for byte credit.
    pending: Option<Entry<Bytes>>,
    /// Handed back by the importer.
    returned: Vec<Entry<Bytes>>,
    window_items: usize,
    window_bytes: u64,
    report: Report,
}

impl Flight {
    fn can_take(&self) -> bool {
        self.pending.is_none() && self.outstanding.len() < self.window_items
    }

    fn fits(&self, size: u64) -> bool {
        self.outstanding.is_empty() || self.outstanding_bytes + size <= self.window_bytes
    }

    fn credit(&mut self, items: u32) -> Result<(), RemoteError> {
        for _ in 0..items {
            let e = self.outstanding.pop_front().ok_or_else(|| {
                RemoteError::Protocol("credit for more items than were sent".into())
            })?;
            self.outstanding_bytes -= e.item.len() as u64;
        }
        Ok(())
    }
}

/// Sends the items of a local queue over a stream until the queue's end-of-stream (or until the
/// importer stops), then completes the closing handshake.
///
/// `rx` takes from the local queue like any consumer, so an exporter can share a queue with
/// local consumers and with other exporters. Items handed back by the importer, and on failure
/// the items that might not have arrived, are put back into that queue.
///
/// # Errors
/// I/O or protocol failures; [`RemoteError::Broken`] when the stream ends early.
pub async fn export<R, W>(
    rx: &Receiver<Bytes>,
    reader: R,
    writer: W,
    options: &Options,
) -> Result<Report, RemoteError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut w = FrameWriter::new(writer);
    let mut r = FrameReader::new(reader, 0);
    w.hello(Hello {
        version: VERSION,
        window_items: 0,
        window_bytes: 0,
        max_item: options.max_item,
    })
    .await?;
    let peer = handshake(&mut r, options.handshake_timeout).await?;
    if peer.window_items == 0 {
        return Err(RemoteError::Protocol(
            "the importer announced an empty window".into(),
        ));
    }
    r.set_max_item(peer.max_item.max(options.max_item));
    let mut flight = Flight {
        outstanding: VecDeque::new(),
        outstanding_bytes: 0,
        pending: None,
        returned: Vec::new(),
        window_items: usize::try_from(peer.window_items).unwrap_or(usize::MAX),
        window_bytes: peer.window_bytes,
        report: Report::default(),
    };
    let result = export_loop(rx, &mut r, &mut w, &mut flight, peer.max_item).await;
    let queue = rx.queue();
    let returned = std::mem::take(&mut flight.returned);
    queue.requeue(returned);
    match result {
        Ok(()) => Ok(flight.report),
        Err(e) => {
            let mut back: Vec<Entry<Bytes>> = flight.outstanding.drain(..).collect();
            back.extend(flight.pending.take());
            let requeued = back.len() as u64;
            queue.requeue(back);
            Err(match e {
                RemoteError::Broken { .. } => RemoteError::Broken { requeued },
                other => {
                    if requeued > 0 {
                        tracing::warn!(queue = %queue.name(), requeued, "export failed; items put back");
                    }
                    other
                }
            })
        }
    }
}

async fn export_loop<R, W>(
    rx: &Receiver<Bytes>,
    r: &mut FrameReader<R>,
    w: &mut FrameWriter<W>,
    f: &mut Flight,
    peer_max: u64,
) -> Result<(), RemoteError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut ended = false;
    loop {
        // Send what credit allows without waiting.
        if !ended {
            loop {
                let entry = match f.pending.take() {
                    Some(e) => e,
                    None if f.outstanding.len() < f.window_items => match rx.try_recv_entry() {
                        Ok(e) => e,
                        Err(e) if e.failure == RecvFailure::Closed => {
                            w.end()?;
                            ended = true;
                            break;
                        }
                        Err(_) => break,
                    },
                    None => break,
                };
                let size = entry.item.len() as u64;
                if size > peer_max {
                    f.returned.push(entry);
                    return Err(RemoteError::TooLarge {
                        size,
                        limit: peer_max,
                    });
                }
                if !f.fits(size) {
                    f.pending = Some(entry);
                    break;
                }
                w.data(entry.priority, &entry.item).await?;
                f.report.items += 1;
                f.report.bytes += size;
                f.outstanding_bytes += size;
                f.outstanding.push_back(entry);
            }
            w.flush().await?;
        }
        tokio::select! {
            biased;
            frame = r.next() => match frame? {
                None => return Err(RemoteError::Broken { requeued: 0 }),
                Some(Frame::Credit { items, .. }) => f.credit(items)?,
                Some(Frame::Return { priority, payload }) => {
                    f.report.returned += 1;
                    f.returned.push(Entry::new(payload, priority));
                }
                Some(Frame::Stop) => {
                    f.report.stopped = true;
                    if !ended {
                        w.end()?;
                        w.flush().await?;
                        ended = true;
                    }
                }
                Some(Frame::EndAck) if ended => {
                    if !f.outstanding.is_empty() {
                        return Err(RemoteError::Protocol("END_ACK with items unacknowledged".into()));
                    }
                    return Ok(());
                }
                Some(other) => return Err(RemoteError::Protocol(format!("unexpected {other:?}"))),
            },
            got = rx.recv_entry_async(), if !ended && f.can_take() => match got {
                Ok(e) => f.pending = Some(e),
                Err(_) => {
                    w.end()?;
                    w.flush().await?;
                    ended = true;
                }
            },
        }
    }
}

/// Receives items from a stream into a local queue until the exporter's end-of-stream, then
/// closes this sender (the local queue ends when its last sender does).
///
/// If the local consumers go away first, every item held is handed back to the exporter.
///
/// # Errors
/// I/O or protocol failures; [`RemoteError::Broken`] when the stream ends early;
/// [`RemoteError::Refused`] when the local queue refuses an item (its policy is `fail`), after
/// handing that item back.
pub async fn import<R, W>(
    tx: Sender<Bytes>,
    reader: R,
    writer: W,
    options: &Options,
) -> Result<Report, RemoteError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if options.window_items == 0 {
        return Err(RemoteError::Protocol(
            "an importer needs a window of at least one item".into(),
        ));
    }
    let mut w = FrameWriter::new(writer);
    let mut r = FrameReader::new(reader, options.max_item);
    w.hello(Hello {
        version: VERSION,
        window_items: options.window_items,
        window_bytes: options.window_bytes,
        max_item: options.max_item,
    })
    .await?;
    handshake(&mut r, options.handshake_timeout).await?;
    let every_items = (options.window_items / 4).max(1);
    let every_bytes = (options.window_bytes / 4).max(1);
    let (mut credit_items, mut credit_bytes) = (0u32, 0u64);
    let mut report = Report::default();
    let mut refused: Option<crate::queue::SendError<()>> = None;
    loop {
        let idle = !r.has_frame();
        if credit_items > 0 && (idle || credit_items >= every_items || credit_bytes >= every_bytes)
        {
            w.credit(credit_items, credit_bytes)?;
            (credit_items, credit_bytes) = (0, 0);
        }
        if idle {
            w.flush().await?;
        }
        tokio::select! {
            biased;
            () = tx.receivers_gone(), if !report.stopped => {
                hand_back_all(&tx, &mut w, &mut report).await?;
            }
            frame = r.next() => match frame? {
                None => return Err(RemoteError::Broken { requeued: 0 }),
                Some(Frame::Data { priority, payload }) => {
                    let size = payload.len() as u64;
                    report.items += 1;
                    report.bytes += size;
                    if report.stopped {
                        report.returned += 1;
                        w.give_back(priority, &payload).await?;
                    } else if let Err(e) = tx.send_entry_async(Entry::new(payload, priority)).await {
                        report.returned += 1;
                        w.give_back(priority, &e.item).await?;
                        match e.failure {
                            SendFailure::NoReceivers | SendFailure::Closed => {
                                hand_back_all(&tx, &mut w, &mut report).await?;
                            }
                            _ => {
                                refused.get_or_insert(e.without_item());
                                hand_back_all(&tx, &mut w, &mut report).await?;
                            }
                        }
                    }
                    credit_items += 1;
                    credit_bytes += size;
                }
                Some(Frame::End) => {
                    if credit_items > 0 {
                        w.credit(credit_items, credit_bytes)?;
                    }
                    w.end_ack()?;
                    w.shutdown().await?;
                    drop(tx);
                    return match refused {
                        Some(e) => Err(RemoteError::Refused(e)),
                        None => Ok(report),
                    };
                }
                Some(other) => return Err(RemoteError::Protocol(format!("unexpected {other:?}"))),
            },
        }
    }
}

/// Stops taking items: everything in the local queue goes back to the exporter, then STOP.
async fn hand_back_all<W: AsyncWrite + Unpin>(
    tx: &Sender<Bytes>,
    w: &mut FrameWriter<W>,
    report: &mut Report,
) -> Result<(), RemoteError> {
    if report.stopped {
        return Ok(());
    }
    report.stopped = true;
    for e in tx.queue().drain() {
        report.returned += 1;
        w.give_back(e.priority, &e.item).await?;
    }
    w.stop()?;
    w.flush().await
}

/// [`export`] over one stream that reads and writes.
///
/// # Errors
/// As [`export`].
pub async fn export_stream<S>(
    rx: &Receiver<Bytes>,
    stream: S,
    options: &Options,
) -> Result<Report, RemoteError>
where
    S: AsyncRead + AsyncWrite,
{
    let (r, w) = tokio::io::split(stream);
    export(rx, r, w, options).await
}

/// [`import`] over one stream that reads and writes.
///
/// # Errors
/// As [`import`].
pub async fn import_stream<S>(
    tx: Sender<Bytes>,
    stream: S,
    options: &Options,
) -> Result<Report, RemoteError>
where
    S: AsyncRead + AsyncWrite,
{
    let (r, w) = tokio::io::split(stream);
    import(tx, r, w, options).await
}
