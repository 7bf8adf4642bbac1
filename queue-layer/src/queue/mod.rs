//! Virtual queues: bounded FIFO and priority queues with explicit overflow policies.
//!
//! A [`Queue`] is a handle to one queue; it makes [`Sender`]s and [`Receiver`]s, any number of
//! each. The queue closes when [`Queue::close`] is called or when its last sender goes away
//! (is dropped or [`Sender::close`]d); receivers then take what is left and see end-of-stream.
//! When every receiver has gone, sends fail with [`SendFailure::NoReceivers`]: an item is never
//! dropped silently.
//!
//! Every operation comes blocking, non-blocking (`try_`) and async (`_async`). Waiting parks
//! the thread or task; an idle queue costs no CPU.

mod config;
mod ring;
mod signal;
mod stats;
mod store;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_utils::{Backoff, CachePadded};

pub use config::{
    Config, ConfigError, DEFAULT_CAPACITY, DEFAULT_CAPACITY_BYTES, DEFAULT_CODEC, Kind, Overflow,
};
use signal::Signal;
pub use stats::Stats;
use store::{Rejected, Seen, Store};

/// Something a queue can carry: it knows its size in bytes, for the byte capacity and stats.
pub trait Item: Send + 'static {
    /// The size counted against the queue's byte capacity.
    fn size(&self) -> u64;
}

impl Item for Bytes {
    fn size(&self) -> u64 {
        self.len() as u64
    }
}

impl Item for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }
}

impl Item for String {
    fn size(&self) -> u64 {
        self.len() as u64
    }
}

impl<const N: usize> Item for [u8; N] {
    fn size(&self) -> u64 {
        N as u64
    }
}

/// An item with the priority it was sent with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<T> {
    /// The item.
    pub item: T,
    /// Its priority (0 unless sent with one; FIFO queues keep but ignore it).
    pub priority: i64,
    size: u64,
}

impl<T: Item> Entry<T> {
    /// An entry for `item` at `priority`.
    pub fn new(item: T, priority: i64) -> Entry<T> {
        let size = item.size();
        Entry {
            item,
            priority,
            size,
        }
    }
}

/// Why a send failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFailure {
    /// The queue is full and its overflow policy is `fail` (or a non-blocking send found it full).
    Full,
    /// The queue is closed: end-of-stream was signalled.
    Closed,
    /// Every receiver has gone; nobody would ever take the item.
    NoReceivers,
    /// The item is larger than the queue accepts.
    TooLarge {
        /// The item's size in bytes.
        size: u64,
        /// The largest size accepted.
        limit: u64,
    },
    /// A send with a deadline found no room in time.
    Timeout,
}

impl fmt::Display for SendFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendFailure::Full => f.write_str("queue is full"),
            SendFailure::Closed => f.write_str("queue is closed"),
            SendFailure::NoReceivers => f.write_str("queue has no receivers left"),
            SendFailure::TooLarge { size, limit } => {
                write!(
                    f,
                    "item of {size} bytes is larger than the queue's limit of {limit} bytes"
                )
            }
            SendFailure::Timeout => f.write_str("timed out waiting for room"),
        }
    }
}

/// A failed send: which queue, why, and the item, given back.
pub struct SendError<T> {
    /// The queue's name.
    pub queue: Arc<str>,
    /// Why the send failed.
    pub failure: SendFailure,
    /// The item that was not sent.
    pub item: T,
}

impl<T> SendError<T> {
    /// Drops the item, keeping the description (for error chains that need `'static` data).
    pub fn without_item(self) -> SendError<()> {
        SendError {
            queue: self.queue,
            failure: self.failure,
            item: (),
        }
    }
}

impl<T> fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendError")
            .field("queue", &self.queue)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl<T> fmt::Display for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "queue '{}': {}", self.queue, self.failure)
    }
}

impl<T> std::error::Error for SendError<T> {}

/// Why a receive returned no item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvFailure {
    /// Nothing is there now (non-blocking receives only).
    Empty,
    /// End-of-stream: the queue is closed and empty.
    Closed,
    /// A receive with a deadline found nothing in time.
    Timeout,
}

/// A receive that returned no item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("queue '{queue}': {}", match failure {
    RecvFailure::Empty => "queue is empty",
    RecvFailure::Closed => "end of stream",
    RecvFailure::Timeout => "timed out waiting for an item",
})]
pub struct RecvError {
    /// The queue's name.
    pub queue: Arc<str>,
    /// Why there was no item.
    pub failure: RecvFailure,
}

/// Sends between two samples of the high-water mark by one handle.
const HIGH_WATER_SAMPLE: u64 = 32;

/// The most free slots a blocked producer waits for while it spins (an eighth of the
/// capacity, up to this).
const SLIP_MAX: u64 = 64;

/// How long a blocked producer sleeps at most waiting for `slip` free slots before it takes any
/// room there is.
const SOFT_WAIT: Duration = Duration::from_micros(100);

/// The signals of room in a queue, on one cache line: a consumer looks at both after each pop.
#[derive(Default)]
struct Room {
    /// Notified when room is made.
    any: Signal,
    /// Notified when `slip` slots are free, for a producer that waits for that much room (see
    /// [`Shared::send_blocked`]).
    slip: Signal,
}

impl Room {
    /// Wakes every waiter of both kinds (the queue closed, or its receivers went).
    fn notify_all(&self) {
        self.any.notify_all();
        self.slip.notify_all();
    }
}

struct Shared<T> {
    name: Arc<str>,
    config: Config,
    item_limit: u64,
    /// Free slots a blocked producer waits for while it spins (see [`Shared::send_blocked`]).
    slip: u64,
    store: Store<T>,
    high_water: AtomicU64,
    blocked_nanos: AtomicU64,
    dropped_items: AtomicU64,
    dropped_bytes: AtomicU64,
    rejected: AtomicU64,
    requeued: AtomicU64,
    requeued_bytes: AtomicU64,
    closed: AtomicBool,
    senders: AtomicUsize,
    receivers: AtomicUsize,
    receivers_gone: AtomicBool,
    /// Items taken by exporters and not yet acknowledged by their importers: they may come
    /// back, so end-of-stream waits for them.
    leases: AtomicU64,
    /// Notified when an item arrives or the queue closes.
    not_empty: CachePadded<Signal>,
    /// Notified when room is made, the queue closes, or the receivers go.
    not_full: CachePadded<Room>,
    /// Notified only when the queue closes or its last receiver goes.
    lifecycle: Signal,
    /// Takes what producers push (a direct link out of this queue).
    outlet: OnceLock<Arc<dyn Pump>>,
    /// Brings items in when consumers find the queue empty (a direct link into it).
    inlet: OnceLock<Arc<dyn Pump>>,
}

/// Moves items between a queue and a link on the threads that use the queue (see
/// [`crate::remote::direct`]): an outlet is pumped after every push and at close, an inlet
/// whenever a consumer finds the queue empty.
pub trait Pump: Send + Sync {
    /// Moves what can be moved now, without blocking.
    fn pump(&self);
    /// A user of the queue is about to wait (a consumer for an item, a producer for room): keep
    /// moving items in the background meanwhile.
    fn waiting(&self);
    /// Takes `other`, a further pump of the same kind for the same queue (an inlet from another
    /// node), to drive with itself; `false` if it cannot.
    fn join(&self, other: Arc<dyn Pump>) -> bool {
        let _ = other;
        false
    }
}

/// A handle to a queue. Cloning it gives another handle to the same queue.
pub struct Queue<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Queue {
            shared: self.shared.clone(),
        }
    }
}

impl<T> fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.shared.name)
            .field("kind", &self.shared.config.kind)
            .finish_non_exhaustive()
    }
}

impl<T: Item> Queue<T> {
    /// Makes a queue named `name` (the name appears in errors and stats).
    ///
    /// # Errors
    /// The configuration's first inconsistency.
    pub fn new(name: impl Into<Arc<str>>, config: Config) -> Result<Queue<T>, ConfigError> {
        config.validate()?;
        let item_limit = config.item_limit();
        let slip = (config.capacity as u64 / 8).clamp(1, SLIP_MAX);
        let shared = Shared {
            name: name.into(),
            store: Store::new(&config),
            config,
            item_limit,
            slip,
            high_water: AtomicU64::new(0),
            blocked_nanos: AtomicU64::new(0),
            dropped_items: AtomicU64::new(0),
            dropped_bytes: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            requeued: AtomicU64::new(0),
            requeued_bytes: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            senders: AtomicUsize::new(0),
            receivers: AtomicUsize::new(0),
            receivers_gone: AtomicBool::new(false),
            leases: AtomicU64::new(0),
            not_empty: CachePadded::new(Signal::default()),
            not_full: CachePadded::default(),
            lifecycle: Signal::default(),
            outlet: OnceLock::new(),
            inlet: OnceLock::new(),
        };
        Ok(Queue {
            shared: Arc::new(shared),
        })
    }

    /// A new producer handle.
    pub fn sender(&self) -> Sender<T> {
        self.shared.senders.fetch_add(1, Ordering::AcqRel);
        Sender {
            shared: self.shared.clone(),
            open: true,
            seen: Seen::default(),
        }
    }

    /// A new consumer handle.
    pub fn receiver(&self) -> Receiver<T> {
        if self.shared.receivers.fetch_add(1, Ordering::AcqRel) == 0 {
            self.shared.receivers_gone.store(false, Ordering::Release);
        }
        Receiver {
            shared: self.shared.clone(),
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &Arc<str> {
        &self.shared.name
    }

    /// The queue's configuration.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Signals end-of-stream: further sends fail; receivers take what is left, then see
    /// [`RecvFailure::Closed`].
    pub fn close(&self) {
        self.shared.close();
    }

    /// Whether the queue is closed.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Waits, without polling, until the queue is closed (its last sender has gone or
    /// [`Queue::close`] was called); items may still be in it.
    pub async fn closed_async(&self) {
        let s = &self.shared;
        s.until(&s.lifecycle, || s.closed.load(Ordering::Acquire))
            .await;
    }

    /// Items held now.
    pub fn len(&self) -> usize {
        self.shared.store.len()
    }

    /// Whether the queue holds no items now.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wakes every receiver and sender waiting on this queue, so that the waits of
    /// [`Receiver::recv_async_unless`] and [`Sender::send_async_unless`] read their `stop`
    /// again (the others just wait again).
    pub fn wake(&self) {
        self.shared.not_empty.notify_all();
        self.shared.not_full.notify_all();
    }

    /// Removes and returns every item held now (for teardown and for handing items back).
    pub fn drain(&self) -> Vec<Entry<T>> {
        let mut out = Vec::new();
        while let Some(e) = self.shared.store.pop() {
            self.shared.made_room();
            out.push(e);
        }
        out
    }

    /// Puts back items that were received but not consumed (for example by a remote consumer
    /// that stopped): they are served again, ahead of the capacity limit, and counted as
    /// requeued rather than as new input.
    pub fn requeue(&self, entries: impl IntoIterator<Item = Entry<T>>) {
        let s = &self.shared;
        for e in entries {
            let size = e.size;
            s.store.requeue(e);
            s.requeued.fetch_add(1, Ordering::Relaxed);
            s.requeued_bytes.fetch_add(size, Ordering::Relaxed);
            s.not_empty.notify_one();
        }
    }

    /// A snapshot of the queue's statistics.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Attaches a pump that takes what producers push (one per queue; `false` if there is one).
    pub fn set_outlet(&self, pump: Arc<dyn Pump>) -> bool {
        self.shared.outlet.set(pump).is_ok()
    }

    /// Attaches a pump that brings items in when consumers find the queue empty: a direct
    /// link into it. A queue fed from several nodes has one from each: the first drives the
    /// others ([`Pump::join`]); `false` if it cannot.
    pub fn add_inlet(&self, pump: Arc<dyn Pump>) -> bool {
        match self.shared.inlet.set(pump) {
            Ok(()) => true,
            Err(pump) => self
                .shared
                .inlet
                .get()
                .is_some_and(|first| first.join(pump)),
        }
    }

    /// Releases `n` leases taken with [`Receiver::try_recv_leased`] (their items were delivered,
    /// or put back with [`Queue::requeue`] first).
    pub fn release_leases(&self, n: u64) {
        self.shared.release_leases(n);
    }
}

impl<T: Item> Shared<T> {
    /// Waits from async code, without polling, until `done` holds; `signal` is notified
    /// whenever it may have come to hold.
    async fn until(&self, signal: &Signal, done: impl Fn() -> bool) {
        loop {
            if done() {
                return;
            }
            let listener = signal.listen();
            if done() {
                return;
            }
            listener.wait_async().await;
        }
    }

    fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.not_empty.notify_all();
            self.not_full.notify_all();
            self.lifecycle.notify_all();
            if let Some(p) = self.outlet.get() {
                p.pump();
            }
        }
    }

    /// A consumer is about to wait: an inlet keeps bringing items meanwhile.
    #[inline]
    fn consumer_waits(&self) {
        if let Some(p) = self.inlet.get() {
            p.waiting();
        }
    }

    /// A producer is about to wait for room: an outlet keeps taking items meanwhile.
    #[inline]
    fn producer_waits(&self) {
        if let Some(p) = self.outlet.get() {
            p.waiting();
        }
    }

    /// The store was found empty: an inlet brings in what has arrived; `true` if there is one.
    #[inline]
    fn refill(&self) -> bool {
        match self.inlet.get() {
            Some(p) => {
                p.pump();
                true
            }
            None => false,
        }
    }

    /// An entry went in: sample the depth now and then, and wake a receiver.
    #[inline]
    fn pushed(&self, seen: &Seen) {
        // The high-water mark is sampled: reading the consumers' position on every send would
        // cost a cache miss per item (more than the rest of the send). Sends that find the
        // queue full always record the depth.
        if seen.count_send().is_multiple_of(HIGH_WATER_SAMPLE) {
            self.sample_depth();
        }
        self.not_empty.notify_one();
        if let Some(p) = self.outlet.get() {
            p.pump();
        }
    }

    /// Records the depth now in the high-water mark.
    fn sample_depth(&self) {
        self.record_depth(self.store.len() as u64);
    }

    /// Raises the high-water mark to `depth`.
    #[inline]
    fn record_depth(&self, depth: u64) {
        if depth > self.high_water.load(Ordering::Relaxed) {
            self.high_water.fetch_max(depth, Ordering::Relaxed);
        }
    }

    /// An entry came out: wake a producer waiting for room, and one waiting for `slip` slots
    /// once there are that many.
    #[inline]
    fn made_room(&self) {
        self.not_full.any.notify_one();
        if self.not_full.slip.is_awaited() && self.store.has_room(self.slip) {
            self.not_full.slip.notify_one();
        }
    }

    fn fail<U>(&self, failure: SendFailure, item: U) -> SendError<U> {
        if failure == SendFailure::Full {
            self.rejected.fetch_add(1, Ordering::Relaxed);
        }
        SendError {
            queue: self.name.clone(),
            failure,
            item,
        }
    }

    /// One attempt at a send. `Err(Ok(entry))`: full, and the policy is to wait.
    #[inline(always)]
    fn attempt(&self, entry: Entry<T>, seen: &Seen) -> Result<(), Result<Entry<T>, SendError<T>>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Err(self.fail(SendFailure::Closed, entry.item)));
        }
        if self.receivers_gone.load(Ordering::Acquire) {
            return Err(Err(self.fail(SendFailure::NoReceivers, entry.item)));
        }
        if entry.size > self.item_limit {
            let failure = SendFailure::TooLarge {
                size: entry.size,
                limit: self.item_limit,
            };
            return Err(Err(self.fail(failure, entry.item)));
        }
        let mut entry = entry;
        loop {
            match self.store.push(entry, seen) {
                Ok(()) => {
                    self.pushed(seen);
                    return Ok(());
                }
                Err(Rejected::Full(back, depth)) => {
                    // A full queue is when the high-water mark matters: always record it.
                    match depth {
                        Some(d) => self.record_depth(d),
                        None => self.sample_depth(),
                    }
                    match self.config.overflow {
                        Overflow::Block => return Err(Ok(back)),
                        Overflow::Fail => {
                            return Err(Err(self.fail(SendFailure::Full, back.item)));
                        }
                        Overflow::DropOldest => {
                            if let Some(old) = self.store.evict() {
                                self.dropped_items.fetch_add(1, Ordering::Relaxed);
                                self.dropped_bytes.fetch_add(old.size, Ordering::Relaxed);
                                tracing::debug!(queue = %self.name, "drop-oldest evicted an item");
                            }
                            entry = back;
                        }
                    }
                }
            }
        }
    }

    fn record_blocked(&self, since: Option<Instant>) {
        if let Some(t) = since {
            let nanos = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.blocked_nanos.fetch_add(nanos, Ordering::Relaxed);
        }
    }

    #[inline]
    fn send_blocking(
        &self,
        entry: Entry<T>,
        deadline: Option<Instant>,
        seen: &Seen,
    ) -> Result<(), SendError<T>> {
        match self.attempt(entry, seen) {
            Ok(()) => Ok(()),
            Err(Err(e)) => Err(e),
            Err(Ok(entry)) => self.send_blocked(entry, deadline, seen),
        }
    }

    /// The rest of [`Shared::send_blocking`], once the queue was found full.
    #[cold]
    #[inline(never)]
    fn send_blocked(
        &self,
        mut entry: Entry<T>,
        deadline: Option<Instant>,
        seen: &Seen,
    ) -> Result<(), SendError<T>> {
        let since = Instant::now();
        // Spin a little first: a consumer on another core usually makes room within
        // microseconds, and parking costs more than that. While spinning, wait for `slip` free
        // slots, not one: a producer that refills each slot as the consumer frees it writes the
        // cache line the consumer is reading next, and both slow down (the "slip" of
        // FastForward, Giacomoni et al., PPoPP 2008). Measured with `mvm bench queue`: FIFO
        // 24 → 32–36 M items/s. Parked, it takes any room, so a single freed slot is enough.
        let backoff = Backoff::new();
        let slip = self.slip;
        while !backoff.is_completed() {
            backoff.snooze();
            if !self.store.has_room(slip) {
                continue;
            }
            entry = match self.attempt(entry, seen) {
                Ok(()) => {
                    self.record_blocked(Some(since));
                    return Ok(());
                }
                Err(Err(e)) => return Err(e),
                Err(Ok(entry)) => entry,
            };
        }
        // Then sleep until `slip` slots are free, for at most SOFT_WAIT: the consumers wake
        // such a sleeper only when there is that much room, so a producer that keeps a queue
        // full is woken once per `slip` items, not at every item (a wake-up on another core
        // costs microseconds, more on a virtual machine). The deadline bounds the wait when the
        // consumers stop with less freed.
        if slip > 1 {
            let listener = self.not_full.slip.listen();
            if !self.store.has_room(slip) && !self.closed.load(Ordering::SeqCst) {
                self.producer_waits();
                let soft = Instant::now() + SOFT_WAIT;
                listener.wait(Some(deadline.map_or(soft, |d| d.min(soft))));
            }
        }
        let result = loop {
            let listener = self.not_full.any.listen();
            entry = match self.attempt(entry, seen) {
                Ok(()) => break Ok(()),
                Err(Err(e)) => break Err(e),
                Err(Ok(entry)) => entry,
            };
            self.producer_waits();
            match deadline {
                None => {
                    listener.wait(None);
                }
                Some(d) => {
                    if !listener.wait(Some(d)) {
                        break Err(SendError {
                            queue: self.name.clone(),
                            failure: SendFailure::Timeout,
                            item: entry.item,
                        });
                    }
                }
            }
        };
        self.record_blocked(Some(since));
        result
    }

    async fn send_async(&self, entry: Entry<T>, seen: &Seen) -> Result<(), SendError<T>> {
        match self.send_async_unless(entry, seen, || false).await {
            Ok(None) => Ok(()),
            // Never stopped.
            Ok(Some(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// As `send_async`, but gives the entry back (`Ok(Some)`) instead of waiting on once
    /// `stop()` holds; `stop` is read after each wake-up ([`Queue::wake`]).
    async fn send_async_unless(
        &self,
        entry: Entry<T>,
        seen: &Seen,
        stop: impl Fn() -> bool,
    ) -> Result<Option<Entry<T>>, SendError<T>> {
        let mut entry = match self.attempt(entry, seen) {
            Ok(()) => return Ok(None),
            Err(Err(e)) => return Err(e),
            Err(Ok(entry)) => entry,
        };
        let since = Instant::now();
        let result = loop {
            let listener = self.not_full.any.listen();
            entry = match self.attempt(entry, seen) {
                Ok(()) => break Ok(None),
                Err(Err(e)) => break Err(e),
                Err(Ok(entry)) => entry,
            };
            if stop() {
                break Ok(Some(entry));
            }
            self.producer_waits();
            listener.wait_async().await;
        };
        self.record_blocked(Some(since));
        result
    }

    /// Sends from async code, waiting for room until `stop` completes: `Ok(Some(entry))` gives
    /// the entry back unsent.
    async fn send_async_until(
        &self,
        entry: Entry<T>,
        seen: &Seen,
        stop: impl Future<Output = ()>,
    ) -> Result<Option<Entry<T>>, SendError<T>> {
        let mut entry = match self.attempt(entry, seen) {
            Ok(()) => return Ok(None),
            Err(Err(e)) => return Err(e),
            Err(Ok(entry)) => entry,
        };
        let since = Instant::now();
        let mut stop = std::pin::pin!(stop);
        let result = loop {
            let listener = self.not_full.any.listen();
            entry = match self.attempt(entry, seen) {
                Ok(()) => break Ok(None),
                Err(Err(e)) => break Err(e),
                Err(Ok(entry)) => entry,
            };
            self.producer_waits();
            tokio::select! {
                biased;
                () = listener.wait_async() => {}
                () = &mut stop => break Ok(Some(entry)),
            }
        };
        self.record_blocked(Some(since));
        result
    }

    #[inline]
    fn try_pop(&self) -> Result<Entry<T>, RecvFailure> {
        self.try_pop_holding(0)
    }

    /// A pop for polling loops: what is ready now, without reading the producers' position
    /// (an item whose send is still being written counts as not there yet). A closed queue
    /// gets the full check, so the end of the stream is reported as by `try_pop`.
    #[inline]
    fn try_pop_ready(&self) -> Result<Entry<T>, RecvFailure> {
        if let Some(e) = self.store.pop_ready() {
            self.made_room();
            return Ok(e);
        }
        if self.refill()
            && let Some(e) = self.store.pop_ready()
        {
            self.made_room();
            return Ok(e);
        }
        if self.closed.load(Ordering::SeqCst) {
            return self.try_pop();
        }
        Err(RecvFailure::Empty)
    }

    /// A pop by a caller that itself holds `own` leases (which do not delay its end-of-stream).
    #[inline]
    fn try_pop_holding(&self, own: u64) -> Result<Entry<T>, RecvFailure> {
        if let Some(e) = self.store.pop() {
            self.made_room();
            return Ok(e);
        }
        if self.refill()
            && let Some(e) = self.store.pop()
        {
            self.made_room();
            return Ok(e);
        }
        if self.closed.load(Ordering::SeqCst) {
            // Everything sent before the close is visible now: look once more.
            return match self.store.pop() {
                Some(e) => {
                    self.made_room();
                    Ok(e)
                }
                // Leased items may still come back: not the end yet.
                None if self.leases.load(Ordering::SeqCst) > own => Err(RecvFailure::Empty),
                None => Err(RecvFailure::Closed),
            };
        }
        Err(RecvFailure::Empty)
    }

    /// Takes an entry under a lease (see [`Receiver::try_recv_leased`]). The lease is taken
    /// before the pop, so a consumer that finds the store empty also finds the lease.
    fn try_pop_leased(&self) -> Result<Entry<T>, RecvFailure> {
        self.leases.fetch_add(1, Ordering::SeqCst);
        let got = self.try_pop_holding(1);
        if got.is_err() {
            self.release_leases(1);
        }
        got
    }

    fn release_leases(&self, n: u64) {
        if n > 0
            && self.leases.fetch_sub(n, Ordering::SeqCst) == n
            && self.closed.load(Ordering::SeqCst)
        {
            // The last lease of a closed queue: waiting consumers may now see end-of-stream.
            self.not_empty.notify_all();
        }
    }

    fn recv_error(&self, failure: RecvFailure) -> RecvError {
        RecvError {
            queue: self.name.clone(),
            failure,
        }
    }

    fn recv_blocking(&self, deadline: Option<Instant>) -> Result<Entry<T>, RecvError> {
        // Spin a little first, as in `send_blocking`.
        let backoff = Backoff::new();
        while !backoff.is_completed() {
            match self.try_pop() {
                Ok(e) => return Ok(e),
                Err(RecvFailure::Empty) => backoff.snooze(),
                Err(f) => return Err(self.recv_error(f)),
            }
        }
        loop {
            match self.try_pop() {
                Ok(e) => return Ok(e),
                Err(RecvFailure::Empty) => {}
                Err(f) => return Err(self.recv_error(f)),
            }
            let listener = self.not_empty.listen();
            match self.try_pop() {
                Ok(e) => return Ok(e),
                Err(RecvFailure::Empty) => {}
                Err(f) => return Err(self.recv_error(f)),
            }
            self.consumer_waits();
            match deadline {
                None => {
                    listener.wait(None);
                }
                Some(d) => {
                    if !listener.wait(Some(d)) {
                        return Err(self.recv_error(RecvFailure::Timeout));
                    }
                }
            }
        }
    }

    async fn recv_async(&self) -> Result<Entry<T>, RecvError> {
        loop {
            if let Some(r) = self.recv_async_unless(|| false).await {
                return r;
            }
        }
    }

    /// As `recv_async`, but `None` instead of waiting on once `stop()` holds; `stop` is read
    /// after each wake-up ([`Queue::wake`]).
    async fn recv_async_unless(
        &self,
        stop: impl Fn() -> bool,
    ) -> Option<Result<Entry<T>, RecvError>> {
        loop {
            match self.try_pop() {
                Ok(e) => return Some(Ok(e)),
                Err(RecvFailure::Empty) => {}
                Err(f) => return Some(Err(self.recv_error(f))),
            }
            let listener = self.not_empty.listen();
            match self.try_pop() {
                Ok(e) => return Some(Ok(e)),
                Err(RecvFailure::Empty) => {}
                Err(f) => return Some(Err(self.recv_error(f))),
            }
            if stop() {
                return None;
            }
            self.consumer_waits();
            listener.wait_async().await;
        }
    }

    fn stats(&self) -> Stats {
        // Store totals count requeued entries in again and evictions out; the stats report
        // what producers sent and consumers took.
        let t = self.store.totals();
        let requeued = self.requeued.load(Ordering::Relaxed);
        let requeued_bytes = self.requeued_bytes.load(Ordering::Relaxed);
        let dropped_items = self.dropped_items.load(Ordering::Relaxed);
        let dropped_bytes = self.dropped_bytes.load(Ordering::Relaxed);
        Stats {
            name: self.name.to_string(),
            kind: self.config.kind,
            codec: self.config.codec.clone(),
            depth: t.items_in.saturating_sub(t.items_out),
            depth_bytes: t.bytes_in.saturating_sub(t.bytes_out),
            high_water: self.high_water.load(Ordering::Relaxed),
            items_in: t.items_in.saturating_sub(requeued),
            bytes_in: t.bytes_in.saturating_sub(requeued_bytes),
            items_out: t.items_out.saturating_sub(dropped_items + requeued),
            bytes_out: t.bytes_out.saturating_sub(dropped_bytes + requeued_bytes),
            blocked: Duration::from_nanos(self.blocked_nanos.load(Ordering::Relaxed)),
            dropped_items,
            dropped_bytes,
            rejected: self.rejected.load(Ordering::Relaxed),
            requeued,
            closed: self.closed.load(Ordering::Acquire),
        }
    }
}

/// A producer handle. The queue closes when the last open sender is dropped or closed.
pub struct Sender<T: Item> {
    shared: Arc<Shared<T>>,
    open: bool,
    seen: Seen,
}

impl<T: Item> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::AcqRel);
        Sender {
            shared: self.shared.clone(),
            open: true,
            seen: Seen::default(),
        }
    }
}

impl<T: Item> Drop for Sender<T> {
    fn drop(&mut self) {
        self.release();
    }
}

impl<T: Item> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("queue", &self.shared.name)
            .finish_non_exhaustive()
    }
}

impl<T: Item> Sender<T> {
    fn release(&mut self) {
        if std::mem::take(&mut self.open) && self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1
        {
            self.shared.close();
        }
    }

    /// This producer is done. When it was the last one, the queue closes.
    pub fn close(mut self) {
        self.release();
    }

    /// The queue's name.
    pub fn queue_name(&self) -> &Arc<str> {
        &self.shared.name
    }

    /// The queue's configuration.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Sends at priority 0, waiting for room when the policy is `block`.
    ///
    /// # Errors
    /// The queue is closed, has no receivers, is full under the `fail` policy, or the item is
    /// too large. The item comes back in the error.
    pub fn send(&self, item: T) -> Result<(), SendError<T>> {
        self.shared
            .send_blocking(Entry::new(item, 0), None, &self.seen)
    }

    /// Sends at `priority` (higher is served first by priority queues).
    ///
    /// # Errors
    /// As [`Sender::send`].
    pub fn send_priority(&self, item: T, priority: i64) -> Result<(), SendError<T>> {
        self.shared
            .send_blocking(Entry::new(item, priority), None, &self.seen)
    }

    /// Sends an entry, waiting at most until `deadline` for room.
    ///
    /// # Errors
    /// As [`Sender::send`], or [`SendFailure::Timeout`].
    pub fn send_deadline(&self, entry: Entry<T>, deadline: Instant) -> Result<(), SendError<T>> {
        self.shared.send_blocking(entry, Some(deadline), &self.seen)
    }

    /// Sends without waiting.
    ///
    /// # Errors
    /// As [`Sender::send`], and [`SendFailure::Full`] when there is no room now.
    pub fn try_send(&self, item: T) -> Result<(), SendError<T>> {
        self.try_send_entry(Entry::new(item, 0))
    }

    /// Sends an entry (item and priority) without waiting.
    ///
    /// # Errors
    /// As [`Sender::try_send`].
    pub fn try_send_entry(&self, entry: Entry<T>) -> Result<(), SendError<T>> {
        match self.shared.attempt(entry, &self.seen) {
            Ok(()) => Ok(()),
            Err(Err(e)) => Err(e),
            Err(Ok(back)) => Err(self.shared.fail(SendFailure::Full, back.item)),
        }
    }

    /// One attempt at a send at priority 0, as [`Sender::send_async`] makes first:
    /// `Ok(None)` when sent, `Ok(Some(item))` when the queue is full and its policy is to
    /// wait (nothing is counted; wait with `send_async`). Lets a caller that would have to give
    /// something up to wait (a clone, a lock) do so only then.
    ///
    /// # Errors
    /// As [`Sender::send`].
    #[inline]
    pub fn attempt(&self, item: T) -> Result<Option<T>, SendError<T>> {
        match self.shared.attempt(Entry::new(item, 0), &self.seen) {
            Ok(()) => Ok(None),
            Err(Err(e)) => Err(e),
            Err(Ok(back)) => Ok(Some(back.item)),
        }
    }

    /// Sends at priority 0 from async code, waiting for room without blocking the thread.
    ///
    /// # Errors
    /// As [`Sender::send`].
    pub async fn send_async(&self, item: T) -> Result<(), SendError<T>> {
        self.shared
            .send_async(Entry::new(item, 0), &self.seen)
            .await
    }

    /// Sends an entry (item and priority) from async code.
    ///
    /// # Errors
    /// As [`Sender::send`].
    pub async fn send_entry_async(&self, entry: Entry<T>) -> Result<(), SendError<T>> {
        self.shared.send_async(entry, &self.seen).await
    }

    /// As [`Sender::send_async`], but while waiting for room gives the item back
    /// (`Ok(Some(item))`, not sent) once `stop()` holds. `stop` is read after every wake-up:
    /// whoever makes it hold must then call [`Queue::wake`], and must make it hold with a
    /// `SeqCst` write for `stop`'s `SeqCst` read to see it.
    ///
    /// # Errors
    /// As [`Sender::send`].
    pub async fn send_async_unless(
        &self,
        item: T,
        stop: impl Fn() -> bool,
    ) -> Result<Option<T>, SendError<T>> {
        self.shared
            .send_async_unless(Entry::new(item, 0), &self.seen, stop)
            .await
            .map(|back| back.map(|e| e.item))
    }

    /// Sends an entry from async code, waiting for room only until `stop` completes:
    /// `Ok(None)` when sent, `Ok(Some(entry))` when `stop` came first (nothing is sent).
    ///
    /// # Errors
    /// As [`Sender::send`].
    pub async fn send_entry_until(
        &self,
        entry: Entry<T>,
        stop: impl Future<Output = ()>,
    ) -> Result<Option<Entry<T>>, SendError<T>> {
        self.shared.send_async_until(entry, &self.seen, stop).await
    }
}

/// A consumer handle. Several receivers share the items: each item goes to exactly one.
pub struct Receiver<T: Item> {
    shared: Arc<Shared<T>>,
}

impl<T: Item> Clone for Receiver<T> {
    fn clone(&self) -> Self {
        self.shared.receivers.fetch_add(1, Ordering::AcqRel);
        Receiver {
            shared: self.shared.clone(),
        }
    }
}

impl<T: Item> Drop for Receiver<T> {
    fn drop(&mut self) {
        if self.shared.receivers.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.receivers_gone.store(true, Ordering::Release);
            self.shared.not_full.notify_all();
            self.shared.lifecycle.notify_all();
            // An inlet reads on to the end of its stream, for nobody.
            self.shared.consumer_waits();
        }
    }
}

impl<T: Item> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("queue", &self.shared.name)
            .finish_non_exhaustive()
    }
}

impl<T: Item> Receiver<T> {
    /// The queue's name.
    pub fn queue_name(&self) -> &Arc<str> {
        &self.shared.name
    }

    /// The queue's configuration.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Takes the next item, waiting for one.
    ///
    /// # Errors
    /// [`RecvFailure::Closed`] at end-of-stream.
    pub fn recv(&self) -> Result<T, RecvError> {
        self.shared.recv_blocking(None).map(|e| e.item)
    }

    /// Takes the next entry (item and priority), waiting at most until `deadline`.
    ///
    /// # Errors
    /// [`RecvFailure::Closed`] at end-of-stream, [`RecvFailure::Timeout`] past the deadline.
    pub fn recv_deadline(&self, deadline: Instant) -> Result<Entry<T>, RecvError> {
        self.shared.recv_blocking(Some(deadline))
    }

    /// Takes the next item if there is one now.
    ///
    /// # Errors
    /// [`RecvFailure::Empty`] or [`RecvFailure::Closed`].
    pub fn try_recv(&self) -> Result<T, RecvError> {
        self.try_recv_entry().map(|e| e.item)
    }

    /// As [`Receiver::try_recv`], for polling loops: the failure alone, without the error's
    /// queue name (whose reference count is shared with every other handle of the queue), and
    /// without reading the producers' position, so a poll does not pull their cache line away
    /// from them. An item whose send is under way counts as not there yet (`Empty`): poll
    /// again, or wait with [`Receiver::recv_async`], which the send's wake-up reaches.
    ///
    /// # Errors
    /// [`RecvFailure::Empty`] or [`RecvFailure::Closed`].
    #[inline]
    pub fn poll(&self) -> Result<T, RecvFailure> {
        self.shared.try_pop_ready().map(|e| e.item)
    }

    /// As [`Receiver::try_recv_entry`], with the failure alone (no queue name to share).
    ///
    /// # Errors
    /// [`RecvFailure::Empty`] or [`RecvFailure::Closed`].
    #[inline]
    pub fn take(&self) -> Result<Entry<T>, RecvFailure> {
        self.shared.try_pop()
    }

    /// Takes the next entry (item and priority) if there is one now.
    ///
    /// # Errors
    /// [`RecvFailure::Empty`] or [`RecvFailure::Closed`].
    pub fn try_recv_entry(&self) -> Result<Entry<T>, RecvError> {
        self.shared.try_pop().map_err(|f| self.shared.recv_error(f))
    }

    /// Takes the next item from async code.
    ///
    /// # Errors
    /// [`RecvFailure::Closed`] at end-of-stream.
    pub async fn recv_async(&self) -> Result<T, RecvError> {
        self.shared.recv_async().await.map(|e| e.item)
    }

    /// Takes the next entry (item and priority) from async code.
    ///
    /// # Errors
    /// [`RecvFailure::Closed`] at end-of-stream.
    pub async fn recv_entry_async(&self) -> Result<Entry<T>, RecvError> {
        self.shared.recv_async().await
    }

    /// As [`Receiver::recv_async`], but `None` (nothing taken) instead of waiting on once
    /// `stop()` holds. `stop` is read after every wake-up: whoever makes it hold must then call
    /// [`Queue::wake`], with a `SeqCst` write for `stop`'s `SeqCst` read to see it.
    pub async fn recv_async_unless(&self, stop: impl Fn() -> bool) -> Option<Result<T, RecvError>> {
        self.shared
            .recv_async_unless(stop)
            .await
            .map(|r| r.map(|e| e.item))
    }

    /// Takes the next entry under a lease, if there is one now: until the lease is released
    /// ([`Queue::release_leases`]), the queue does not report end-of-stream, because the item
    /// may be handed back ([`Queue::requeue`]). Remote exporters take items this way.
    ///
    /// # Errors
    /// [`RecvFailure::Empty`] or [`RecvFailure::Closed`].
    pub fn try_recv_leased(&self) -> Result<Entry<T>, RecvError> {
        self.shared
            .try_pop_leased()
            .map_err(|f| self.shared.recv_error(f))
    }

    /// Waits from async code until an item may be there, or the queue has ended (closed, with
    /// no leases left), without taking anything; follow with [`Receiver::try_recv_leased`].
    pub async fn ready_async(&self) {
        let s = &self.shared;
        let ready = || {
            !s.store.is_empty()
                || (s.closed.load(Ordering::SeqCst) && s.leases.load(Ordering::SeqCst) == 0)
        };
        loop {
            if ready() {
                return;
            }
            s.refill();
            let listener = s.not_empty.listen();
            if ready() {
                return;
            }
            s.consumer_waits();
            listener.wait_async().await;
        }
    }

    /// A handle to the queue this receiver takes from.
    pub fn queue(&self) -> Queue<T> {
        Queue {
            shared: self.shared.clone(),
        }
    }
}

impl<T: Item> Sender<T> {
    /// A handle to the queue this sender feeds.
    pub fn queue(&self) -> Queue<T> {
        Queue {
            shared: self.shared.clone(),
        }
    }

    /// Whether every receiver has gone (sends would fail with [`SendFailure::NoReceivers`]).
    pub fn has_no_receivers(&self) -> bool {
        self.shared.receivers_gone.load(Ordering::Acquire)
    }

    /// Waits, without polling, until this queue holds no items (its consumers took them all)
    /// or every receiver has gone.
    pub async fn drained(&self) {
        let s = &self.shared;
        s.until(&s.not_full.any, || {
            s.store.is_empty() || s.receivers_gone.load(Ordering::SeqCst)
        })
        .await;
    }

    /// Waits, without polling, until every receiver has gone or the queue is closed.
    pub async fn receivers_gone(&self) {
        let s = &self.shared;
        s.until(&s.lifecycle, || {
            s.receivers_gone.load(Ordering::Acquire) || s.closed.load(Ordering::Acquire)
        })
        .await;
    }
}

#[cfg(test)]
mod tests;
