//! Queues across nodes: a queue extended over any async byte stream.
//!
//! [`export`] takes items from a local queue and writes them to a stream; [`import`] reads them
//! on the other side and puts them into a local queue there. Flow control is by credit: the
//! importer announces a window (items and bytes) and grants it again as it delivers, a quarter
//! of the window at a time, and the rest when the exporter asks (its window is used up, or its
//! queue has ended), so a slow consumer on one node blocks the producer on the other instead of
//! growing memory, and a fast stream costs one credit frame per quarter window, not per item.
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
//!
//! Checkpoints: [`export_with`] and [`import_with`] take a [`Hold`] and a [`Drain`], with which
//! a checkpoint stops the link at a MARK frame so that nothing is in flight ([`mark`]).

pub mod direct;
pub(crate) mod frame;
pub mod mark;
pub mod seal;

use std::collections::VecDeque;
use std::io;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

use crate::queue::{Entry, Queue, Receiver, RecvFailure, SendError, SendFailure, Sender};
use frame::{Frame, FrameReader, FrameWriter, Hello, VERSION};
use mark::{Control, Phase};
pub use mark::{Drain, Hold, MarkError, Marked};

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
    /// Importer: acknowledge an item only once a local consumer has taken it (not when it enters
    /// the local queue), so an item waiting at a consumer that leaves is never considered
    /// delivered. For shared queues.
    pub credit_on_consume: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            window_items: 256,
            window_bytes: 8 << 20,
            max_item: 64 << 20,
            handshake_timeout: Duration::from_secs(10),
            credit_on_consume: false,
        }
    }
}

impl Options {
    /// A window of one item: an importer holds at most one item in flight, so the items of a
    /// shared queue go to whichever consumer is free rather than piling up at one.
    pub fn work_sharing() -> Options {
        Options {
            window_items: 1,
            credit_on_consume: true,
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
    /// Items a direct link received after its queue's consumers had gone (read and dropped, so
    /// the producer was not left blocked), and items an importer kept for a checkpoint that
    /// nobody took after the stream's end.
    pub discarded: u64,
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
    /// A sealed link's record failed to open, or cannot be sealed ([`seal`]).
    #[error("sealed link: {0}")]
    Sealed(String),
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
    /// The [`Hold`] or [`Drain`] given controls another link end already.
    #[error("the link control is given to another link end already")]
    ControlInUse,
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

/// The exporter's view of what is in flight, shared by its reading and writing halves.
struct Flight {
    /// Sent and not yet credited, oldest first.
    outstanding: VecDeque<Entry<Bytes>>,
    outstanding_bytes: u64,
    /// Taken from the queue, waiting for credit.
    pending: Option<Entry<Bytes>>,
    window_items: usize,
    window_bytes: u64,
    /// The importer said STOP.
    stopped: bool,
    /// END was sent (or is being sent).
    ended: bool,
    /// WANT was sent and no credit has come since.
    asked: bool,
    report: Report,
}

impl Flight {
    fn has_item_credit(&self) -> bool {
        self.outstanding.len() < self.window_items
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
/// The exporter reads the stream all the time, also while a write is blocked, so the two sides
/// can never wait on each other's writes.
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
    export_with(rx, reader, writer, options, &Hold::new()).await
}

/// [`export`], held at marks for checkpoints with `hold` ([`mark`]). Held, the exporter takes
/// nothing from the queue; an item it took before (waiting for credit) goes out before the
/// MARK. Items sent stay outstanding until credited, as always. The queue's end is seen (and
/// END written) only once released.
///
/// # Errors
/// As [`export`]; [`RemoteError::ControlInUse`] when `hold` was given to another end.
pub async fn export_with<R, W>(
    rx: &Receiver<Bytes>,
    reader: R,
    writer: W,
    options: &Options,
    hold: &Hold,
) -> Result<Report, RemoteError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let control = &hold.0;
    if !control.attach(None) {
        return Err(RemoteError::ControlInUse);
    }
    let result = export_to_end(rx, reader, writer, options, control).await;
    control.over(result.is_ok());
    result
}

/// The exporter until the closing handshake or a failure.
async fn export_to_end<R, W>(
    rx: &Receiver<Bytes>,
    reader: R,
    writer: W,
    options: &Options,
    control: &Control,
) -> Result<Report, RemoteError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut w = FrameWriter::new(writer);
    let mut r = FrameReader::new(reader, 0);
    // Say hello and hear theirs at once: neither side may wait for the other to read.
    let ours = Hello {
        version: VERSION,
        window_items: 0,
        window_bytes: 0,
        max_item: options.max_item,
    };
    let ((), peer) = tokio::try_join!(w.hello(ours), handshake(&mut r, options.handshake_timeout))?;
    if peer.window_items == 0 {
        return Err(RemoteError::Protocol(
            "the importer announced an empty window".into(),
        ));
    }
    r.set_max_item(peer.max_item.max(options.max_item));
    let flight = Mutex::new(Flight {
        outstanding: VecDeque::new(),
        outstanding_bytes: 0,
        pending: None,
        window_items: usize::try_from(peer.window_items).unwrap_or(usize::MAX),
        window_bytes: peer.window_bytes,
        stopped: false,
        ended: false,
        asked: false,
        report: Report::default(),
    });
    let wake = Notify::new();
    let queue = rx.queue();
    let result = tokio::try_join!(
        export_reads(&mut r, &flight, &wake, &queue),
        export_writes(rx, &queue, &mut w, &flight, &wake, peer.max_item, control),
    );
    let mut flight = flight.into_inner();
    // Every item taken is leased until it is acknowledged; what was not, goes back first.
    let mut back: Vec<Entry<Bytes>> = flight.pending.take().into_iter().collect();
    if result.is_err() {
        back.extend(flight.outstanding.drain(..));
    }
    let requeued = back.len() as u64;
    queue.requeue(back);
    queue.release_leases(requeued);
    match result {
        Ok(_) => Ok(flight.report),
        Err(e) => {
            if requeued > 0 {
                tracing::warn!(queue = %queue.name(), requeued, error = %e, "export failed; items put back");
            }
            Err(match e {
                RemoteError::Broken { .. } => RemoteError::Broken { requeued },
                other => other,
            })
        }
    }
}

/// The exporter's reading half: credits, returns, STOP, and the final END_ACK.
async fn export_reads<R: AsyncRead + Unpin>(
    r: &mut FrameReader<R>,
    flight: &Mutex<Flight>,
    wake: &Notify,
    queue: &Queue<Bytes>,
) -> Result<(), RemoteError> {
    loop {
        let frame = r.next().await?;
        let done = on_frame(&mut flight.lock(), frame, queue)?;
        wake.notify_one();
        if done {
            return Ok(());
        }
    }
}

/// Applies one frame from the importer; `true` once the closing handshake is complete.
fn on_frame(
    f: &mut Flight,
    frame: Option<Frame>,
    queue: &Queue<Bytes>,
) -> Result<bool, RemoteError> {
    match frame {
        None => return Err(RemoteError::Broken { requeued: 0 }),
        Some(Frame::Credit { items, .. }) => {
            f.credit(items)?;
            f.asked = false;
            queue.release_leases(u64::from(items));
        }
        Some(Frame::Return { priority, payload }) => {
            // Back into the queue at once, for the other consumers. If it was still in flight,
            // its lease ends with the credit that follows.
            f.report.returned += 1;
            queue.requeue([Entry::new(payload, priority)]);
        }
        Some(Frame::Stop) => f.stopped = true,
        Some(Frame::EndAck) if f.ended => {
            if !f.outstanding.is_empty() {
                return Err(RemoteError::Protocol(
                    "END_ACK with items unacknowledged".into(),
                ));
            }
            return Ok(true);
        }
        Some(other) => return Err(RemoteError::Protocol(format!("unexpected {other:?}"))),
    }
    Ok(false)
}

/// What the exporter's writing half does next.
enum Step {
    /// Write this item (it is recorded as outstanding already).
    Send(Entry<Bytes>),
    /// Wait for an item from the queue (or for the reader, or for the queue to close if it was
    /// open when this was decided); first send WANT if `ask`.
    WaitQueue { ask: bool, closed: bool },
    /// Wait for credit from the reader; first send WANT if `ask`.
    WaitCredit { ask: bool },
    /// The queue ended or the importer stopped: write END.
    End,
    /// The end is held for a checkpoint: write MARK, or wait for release.
    Hold,
}

/// Decides the next step under the lock, taking an item from the queue when there is credit.
///
/// The exporter asks for credit (once per credit received) when it cannot go on without it:
/// its window is used up, or its queue is closed and only its own unacknowledged items keep the
/// queue from ending.
/// Held (`held`), it takes nothing from the queue.
fn next_step(
    f: &mut Flight,
    rx: &Receiver<Bytes>,
    queue: &Queue<Bytes>,
    peer_max: u64,
    held: bool,
) -> Result<Step, RemoteError> {
    if f.stopped {
        return Ok(Step::End);
    }
    let ask = |f: &mut Flight, needed: bool| {
        let ask = needed && !f.asked;
        f.asked |= ask;
        ask
    };
    let entry = match f.pending.take() {
        Some(e) => e,
        None if held => return Ok(Step::Hold),
        None if !f.has_item_credit() => return Ok(Step::WaitCredit { ask: ask(f, true) }),
        None => match rx.try_recv_leased() {
            Ok(e) => e,
            Err(e) if e.failure == RecvFailure::Closed => return Ok(Step::End),
            Err(_) => {
                let closed = queue.is_closed();
                let needed = closed && !f.outstanding.is_empty();
                return Ok(Step::WaitQueue {
                    ask: ask(f, needed),
                    closed,
                });
            }
        },
    };
    let size = entry.item.len() as u64;
    if size > peer_max {
        f.pending = Some(entry);
        return Err(RemoteError::TooLarge {
            size,
            limit: peer_max,
        });
    }
    if !f.fits(size) {
        f.pending = Some(entry);
        return Ok(Step::WaitCredit { ask: ask(f, true) });
    }
    f.report.items += 1;
    f.report.bytes += size;
    f.outstanding_bytes += size;
    f.outstanding.push_back(entry.clone());
    Ok(Step::Send(entry))
}

/// The exporter's writing half: items within credit (and MARKs when held), then END.
async fn export_writes<W: AsyncWrite + Unpin>(
    rx: &Receiver<Bytes>,
    queue: &Queue<Bytes>,
    w: &mut FrameWriter<W>,
    flight: &Mutex<Flight>,
    wake: &Notify,
    peer_max: u64,
    control: &Control,
) -> Result<(), RemoteError> {
    loop {
        let wait = wake.notified();
        let held = control.busy();
        let step = next_step(&mut flight.lock(), rx, queue, peer_max, held)?;
        match step {
            Step::Send(entry) => w.data(entry.priority, &entry.item).await?,
            Step::Hold => {
                let changed = control.changed();
                match control.phase() {
                    Phase::Seek(n) => {
                        w.mark(n)?;
                        // The hold completes once everything sent before the mark is
                        // acknowledged (the drained importer credits all it read at the mark):
                        // a held end then owes nothing, and can be dropped, or its link
                        // replaced when a part moves, without an item put back twice.
                        let mut asked = false;
                        loop {
                            let credited = wake.notified();
                            let released = control.changed();
                            if flight.lock().outstanding.is_empty()
                                || control.phase() != Phase::Seek(n)
                            {
                                break;
                            }
                            if !asked {
                                w.want()?;
                                asked = true;
                            }
                            w.flush().await?;
                            tokio::select! {
                                () = credited => {}
                                () = released => {}
                            }
                        }
                        w.flush().await?;
                        if control.phase() == Phase::Seek(n) {
                            control.wrote_mark(n);
                        }
                    }
                    Phase::Wait => {
                        w.flush().await?;
                        // Released, or a STOP from the importer.
                        tokio::select! {
                            () = changed => {}
                            () = wait => {}
                        }
                    }
                    Phase::Run => {}
                }
            }
            Step::WaitCredit { ask } => {
                if ask {
                    w.want()?;
                }
                w.flush().await?;
                // Held with an item taken, it waits for credit to send it before the MARK.
                tokio::select! {
                    () = wait => {}
                    () = control.asked(), if !held => {}
                }
            }
            Step::WaitQueue { ask, closed } => {
                if ask {
                    w.want()?;
                }
                w.flush().await?;
                // A close is a reason to ask for the rest of the credit: wake up for it (also
                // when it came after the decision).
                tokio::select! {
                    () = rx.ready_async() => {}
                    () = wait => {}
                    () = queue.closed_async(), if !closed => {}
                    () = control.asked() => {}
                }
            }
            Step::End => break,
        }
    }
    flight.lock().ended = true;
    w.end()?;
    w.flush().await
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
    import_with(tx, reader, writer, options, &Drain::new()).await
}

/// [`import`], drained to marks for checkpoints with `drain` ([`mark`]).
///
/// Drained, the importer reads on even when its queue is full: what does not fit is kept
/// ([`Drain::held`]) and credited at once, as processed (it is part of the node's state once
/// checkpointed), so the exporter's outstanding items are all credited when the MARK is read.
/// With `credit_on_consume` an item waiting in the queue for a consumer is credited then too:
/// a paused consumer takes nothing, so waiting for it would hold the MARK back; if the
/// consumers go away afterwards, the item is still handed back (its exporter requeues any item
/// handed back, credited or not). Released, the importer delivers what it kept first.
///
/// If the exporter ends (END) while items are kept, the importer acknowledges the end, waits
/// to be released, delivers them, and only then closes the queue. If the stream fails, the
/// kept items are delivered the same way before the error is returned: they were credited, so
/// the exporter does not put them back.
///
/// # Errors
/// As [`import`]; [`RemoteError::ControlInUse`] when `drain` was given to another end.
pub async fn import_with<R, W>(
    tx: Sender<Bytes>,
    reader: R,
    writer: W,
    options: &Options,
    drain: &Drain,
) -> Result<Report, RemoteError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let control = &drain.0;
    if !control.attach(None) {
        return Err(RemoteError::ControlInUse);
    }
    let mut result = import_to_end(&tx, reader, writer, options, control).await;
    control.over(result.is_ok());
    let discarded = deliver_kept(&tx, control).await;
    if let Ok(report) = &mut result {
        report.discarded += discarded;
    }
    drop(tx);
    result
}

/// The importer until END or a failure (the caller closes the queue).
async fn import_to_end<R, W>(
    tx: &Sender<Bytes>,
    reader: R,
    writer: W,
    options: &Options,
    control: &Control,
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
    let ours = Hello {
        version: VERSION,
        window_items: options.window_items,
        window_bytes: options.window_bytes,
        max_item: options.max_item,
    };
    tokio::try_join!(w.hello(ours), handshake(&mut r, options.handshake_timeout))?;
    let every_items = (options.window_items / 4).max(1);
    let every_bytes = (options.window_bytes / 4).max(1);
    let mut owed = Owed::default();
    let mut back = Back {
        report: Report::default(),
        refused: None,
    };
    // Credit goes out a quarter of the window at a time, and what is left when the exporter
    // asks (WANT): in a fast stream the importer is idle after nearly every item, and crediting
    // whenever idle cost a frame, a write and a wake-up of the exporter per item.
    loop {
        let idle = !r.has_frame();
        if owed.items >= every_items || owed.bytes >= every_bytes {
            owed.grant(&mut w)?;
        }
        if idle {
            w.flush().await?;
        }
        // Held for a checkpoint: read on to the mark (kept items are credited like delivered
        // ones), then read nothing until released; released, deliver what was kept first.
        let held = control.busy();
        let mut change: Option<Notified<'_>> = None;
        let mut reading = true;
        if held {
            let changed = control.changed();
            match control.phase() {
                Phase::Run => {
                    if let Some(e) = control.take_kept() {
                        let priority = e.priority;
                        match tx.send_entry_until(e, control.asked()).await {
                            Ok(None) => {}
                            Ok(Some(e)) => control.put_back(e),
                            Err(e) => back.refuse(e, priority, tx, &mut w, control).await?,
                        }
                    }
                    continue;
                }
                Phase::Seek(_) => change = Some(changed),
                Phase::Wait => {
                    change = Some(changed);
                    reading = false;
                }
            }
        }
        let watching = change.is_some();
        tokio::select! {
            biased;
            () = tx.receivers_gone(), if !back.report.stopped => {
                hand_back_all(tx, &mut w, &mut back.report, control).await?;
            }
            // Released (or a mark reached) meanwhile: look again.
            () = async move { if let Some(c) = change { c.await } }, if watching => {}
            frame = r.next(), if reading => match frame? {
                None => return Err(RemoteError::Broken { requeued: 0 }),
                Some(Frame::Data { priority, payload }) => {
                    let size = payload.len() as u64;
                    back.report.items += 1;
                    back.report.bytes += size;
                    let entry = Entry::new(payload, priority);
                    if back.report.stopped {
                        back.report.returned += 1;
                        w.give_back(priority, &entry.item).await?;
                    } else {
                        let sent = if held {
                            keep_or_send(tx, entry, control)
                        } else {
                            deliver(tx, entry, options, control).await
                        };
                        match sent {
                            Ok(None) => {}
                            Ok(Some(e)) => control.keep(e),
                            Err(e) => back.refuse(e, priority, tx, &mut w, control).await?,
                        }
                    }
                    if !back.report.stopped && tx.has_no_receivers() {
                        // Delivered, but the consumers left before taking it: hand it back
                        // before acknowledging it, so it is never counted as delivered.
                        hand_back_all(tx, &mut w, &mut back.report, control).await?;
                    }
                    owed.items += 1;
                    owed.bytes += size;
                }
                Some(Frame::Want) => {
                    // Every DATA frame sent before the WANT has been processed (the stream is
                    // in order), so this credit is all the exporter waits for.
                    owed.grant(&mut w)?;
                    w.flush().await?;
                }
                Some(Frame::Mark(n)) => {
                    // Everything before the MARK is processed (delivered or kept): credit it
                    // all, so nothing of this link stays outstanding at the exporter, before
                    // the drain completes.
                    owed.grant(&mut w)?;
                    w.flush().await?;
                    control.read_mark(n);
                }
                Some(Frame::End) => {
                    owed.grant(&mut w)?;
                    w.end_ack()?;
                    w.shutdown().await?;
                    return match back.refused {
                        Some(e) => Err(RemoteError::Refused(e)),
                        None => Ok(back.report),
                    };
                }
                Some(other) => return Err(RemoteError::Protocol(format!("unexpected {other:?}"))),
            },
        }
    }
}

/// What an importer reports, and the first refusal of its queue.
struct Back {
    report: Report,
    refused: Option<SendError<()>>,
}

impl Back {
    /// The local queue did not take an item: hand it back, and everything else with it.
    async fn refuse<W: AsyncWrite + Unpin>(
        &mut self,
        e: SendError<Bytes>,
        priority: i64,
        tx: &Sender<Bytes>,
        w: &mut FrameWriter<W>,
        control: &Control,
    ) -> Result<(), RemoteError> {
        self.report.returned += 1;
        w.give_back(priority, &e.item).await?;
        if !matches!(e.failure, SendFailure::NoReceivers | SendFailure::Closed) {
            self.refused.get_or_insert(e.without_item());
        }
        hand_back_all(tx, w, &mut self.report, control).await
    }
}

/// Delivers the items kept at the end of a drained importer, each once the end is released
/// (and not held again); `tx` closes after them. The items that nobody takes any more (the
/// consumers have gone) are counted.
async fn deliver_kept(tx: &Sender<Bytes>, control: &Control) -> u64 {
    let mut discarded = 0;
    loop {
        let changed = control.changed();
        if !control.keeps() {
            return discarded;
        }
        if control.phase() != Phase::Run {
            changed.await;
            continue;
        }
        let Some(e) = control.take_kept() else {
            return discarded;
        };
        match tx.send_entry_until(e, control.asked()).await {
            Ok(None) => {}
            Ok(Some(e)) => control.put_back(e),
            Err(_) => discarded += 1,
        }
    }
}

/// What an importer has processed and not yet credited.
#[derive(Default)]
struct Owed {
    items: u32,
    bytes: u64,
}

impl Owed {
    /// Writes a credit for everything owed (if anything is), and owes nothing more.
    fn grant<W: AsyncWrite + Unpin>(&mut self, w: &mut FrameWriter<W>) -> Result<(), RemoteError> {
        if self.items > 0 {
            w.credit(self.items, self.bytes)?;
            *self = Owed::default();
        }
        Ok(())
    }
}

/// Puts an item into the local queue; with `credit_on_consume`, also waits until a local
/// consumer has taken it. If the consumers leave instead, the item is still in the local
/// queue, and the caller hands it back before acknowledging it. A mark asked for meanwhile
/// ends the wait: `Ok(Some(entry))` when the item did not go in (the caller keeps it).
async fn deliver(
    tx: &Sender<Bytes>,
    entry: Entry<Bytes>,
    options: &Options,
    control: &Control,
) -> Result<Option<Entry<Bytes>>, SendError<Bytes>> {
    if let Some(back) = tx.send_entry_until(entry, control.asked()).await? {
        return Ok(Some(back));
    }
    if options.credit_on_consume {
        tokio::select! {
            () = tx.drained() => {}
            () = control.asked() => {}
        }
    }
    Ok(None)
}

/// A drained importer's delivery: into the queue if it has room and nothing is kept before
/// the item, else kept (`Ok(Some(entry))`).
fn keep_or_send(
    tx: &Sender<Bytes>,
    entry: Entry<Bytes>,
    control: &Control,
) -> Result<Option<Entry<Bytes>>, SendError<Bytes>> {
    if control.keeps() {
        return Ok(Some(entry));
    }
    let priority = entry.priority;
    match tx.try_send_entry(entry) {
        Ok(()) => Ok(None),
        Err(e) if e.failure == SendFailure::Full => Ok(Some(Entry::new(e.item, priority))),
        Err(e) => Err(e),
    }
}

/// Stops taking items: everything in the local queue goes back to the exporter, then what
/// a drain kept, then STOP.
async fn hand_back_all<W: AsyncWrite + Unpin>(
    tx: &Sender<Bytes>,
    w: &mut FrameWriter<W>,
    report: &mut Report,
    control: &Control,
) -> Result<(), RemoteError> {
    if report.stopped {
        return Ok(());
    }
    report.stopped = true;
    for e in tx
        .queue()
        .drain()
        .into_iter()
        .chain(control.take_all_kept())
    {
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
    export_stream_with(rx, stream, options, &Hold::new()).await
}

/// [`export_with`] over one stream that reads and writes.
///
/// # Errors
/// As [`export_with`].
pub async fn export_stream_with<S>(
    rx: &Receiver<Bytes>,
    stream: S,
    options: &Options,
    hold: &Hold,
) -> Result<Report, RemoteError>
where
    S: AsyncRead + AsyncWrite,
{
    let (r, w) = tokio::io::split(stream);
    export_with(rx, r, w, options, hold).await
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
    import_stream_with(tx, stream, options, &Drain::new()).await
}

/// [`import_with`] over one stream that reads and writes.
///
/// # Errors
/// As [`import_with`].
pub async fn import_stream_with<S>(
    tx: Sender<Bytes>,
    stream: S,
    options: &Options,
    drain: &Drain,
) -> Result<Report, RemoteError>
where
    S: AsyncRead + AsyncWrite,
{
    let (r, w) = tokio::io::split(stream);
    import_with(tx, r, w, options, drain).await
}
