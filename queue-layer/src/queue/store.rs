//! Where a queue keeps its items, and its counters: a lock-free FIFO ring, or an ordered map
//! for priorities.
//!
//! Both stores enforce the item and byte capacities exactly and count every item and byte in
//! and out; neither waits. Waiting, closing and the other statistics live one level up.
//!
//! Memory ordering contract with [`super::signal::Signal`]: every change a waiter waits for
//! ends with a SeqCst read-modify-write (the ring's position CAS and byte counts, the overflow
//! length) or happens under the lock the waiter's re-check also takes (the priority map), and
//! every re-check reads those locations with SeqCst or under that lock. (A pop frees its slot
//! with a plain release store after its SeqCst counts; a producer whose re-check sees the
//! consumers' position moved waits for that store, so the room it was told of is there.)

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

use super::config::{Config, Kind};
use super::ring::Ring;
use super::{Entry, Item};

/// Why an item did not go in.
pub(crate) enum Rejected<T> {
    /// The queue is full (in items or in bytes); the entry comes back, with the depth when the
    /// store knows it without another look at the consumers' side.
    Full(Entry<T>, Option<u64>),
}

/// Everything that ever went in and came out, in items and bytes (requeued entries count in
/// again; evicted and drained ones count out).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) items_in: u64,
    pub(crate) bytes_in: u64,
    pub(crate) items_out: u64,
    pub(crate) bytes_out: u64,
}

/// A producer handle's last look at the bytes taken out. That count only grows, so a stale look
/// overestimates what the queue holds: a check against it errs on the side of full, and the real
/// counter (a cache line the consumers write) is read only when the check fails.
#[derive(Default)]
pub(crate) struct Seen {
    bytes_out: AtomicU64,
    /// Sends through this handle, for sampling the high-water mark.
    sends: AtomicU64,
}

impl Seen {
    /// Counts a send through this handle; returns the count before it.
    pub(crate) fn count_send(&self) -> u64 {
        let n = self.sends.load(Ordering::Relaxed);
        self.sends.store(n.wrapping_add(1), Ordering::Relaxed);
        n
    }
}

/// One of the two stores.
#[expect(
    clippy::large_enum_variant,
    reason = "one store per queue, inside its Arc; boxing the ring would add a pointer chase to every send"
)]
pub(crate) enum Store<T> {
    Fifo(Fifo<T>),
    Priority(Priority<T>),
}

impl<T: Item> Store<T> {
    pub(crate) fn new(config: &Config) -> Store<T> {
        match config.kind {
            Kind::Fifo => Store::Fifo(Fifo::new(config.capacity, config.capacity_bytes)),
            Kind::Priority => Store::Priority(Priority::new(
                config.capacity,
                config.capacity_bytes,
                config.aging,
            )),
        }
    }

    /// Adds an entry if it fits.
    #[inline]
    pub(crate) fn push(&self, entry: Entry<T>, seen: &Seen) -> Result<(), Rejected<T>> {
        match self {
            Store::Fifo(s) => s.push(entry, seen),
            Store::Priority(s) => s.push(entry),
        }
    }

    /// Takes the next entry, if any.
    #[inline]
    pub(crate) fn pop(&self) -> Option<Entry<T>> {
        match self {
            Store::Fifo(s) => s.pop(),
            Store::Priority(s) => s.pop(false),
        }
    }

    /// As [`Store::pop`], but a FIFO reports nothing while the next item's send is still
    /// being written (see [`Ring::pop_ready`]).
    #[inline]
    pub(crate) fn pop_ready(&self) -> Option<Entry<T>> {
        match self {
            Store::Fifo(s) => s.pop_ready(),
            Store::Priority(s) => s.pop(false),
        }
    }

    /// Removes the entry that makes room under the drop-oldest policy: the oldest of a FIFO,
    /// the one that would be served last of a priority queue.
    pub(crate) fn evict(&self) -> Option<Entry<T>> {
        match self {
            Store::Fifo(s) => s.pop(),
            Store::Priority(s) => s.pop(true),
        }
    }

    /// Puts an entry back regardless of capacity (an item returned by a remote consumer, which
    /// was already counted once). FIFO serves it before the ring; priority by its rank.
    pub(crate) fn requeue(&self, entry: Entry<T>) {
        match self {
            Store::Fifo(s) => s.requeue(entry),
            Store::Priority(s) => s.insert(&mut s.inner.lock(), entry),
        }
    }

    /// Whether `k` more items look like they fit, as far as the item capacity goes (see
    /// [`Ring::has_room`]; always for a priority store, which cannot tell without its lock).
    #[inline]
    pub(crate) fn has_room(&self, k: u64) -> bool {
        match self {
            Store::Fifo(s) => s.ring.has_room(k),
            Store::Priority(_) => true,
        }
    }

    /// Items held now.
    pub(crate) fn len(&self) -> usize {
        match self {
            Store::Fifo(s) => {
                s.ring.len() + usize::try_from(s.extra_len.load(Ordering::SeqCst)).unwrap_or(0)
            }
            Store::Priority(s) => s.inner.lock().map.len(),
        }
    }

    /// Whether the store holds nothing now (SeqCst reads, for re-checks).
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything in and out so far.
    pub(crate) fn totals(&self) -> Totals {
        match self {
            Store::Fifo(s) => s.totals(),
            Store::Priority(s) => {
                let i = s.inner.lock();
                i.totals
            }
        }
    }
}

/// A bounded lock-free ring with an exact byte budget, plus a locked side deque for requeued
/// entries.
pub(crate) struct Fifo<T> {
    ring: Ring<Entry<T>>,
    capacity_bytes: u64,
    /// Requeued entries, served before the ring (they were taken earlier than anything in it).
    extra: Mutex<(VecDeque<Entry<T>>, Totals)>,
    extra_len: CachePadded<AtomicU64>,
}

impl<T: Item> Fifo<T> {
    fn new(capacity: usize, capacity_bytes: u64) -> Fifo<T> {
        Fifo {
            ring: Ring::new(capacity),
            capacity_bytes,
            extra: Mutex::new((VecDeque::new(), Totals::default())),
            extra_len: CachePadded::new(AtomicU64::new(0)),
        }
    }

    /// Reserves `size` bytes of the budget; `false` when they do not fit. Exact among producers
    /// (compare-and-swap on the producers' byte count) and against consumers (their count only
    /// grows, so the stale look in `seen` errs on the side of full).
    #[inline]
    fn reserve(&self, size: u64, seen: &Seen) -> bool {
        let cap = self.capacity_bytes;
        let bytes_in = &self.ring.tail.bytes;
        let mut reserved = bytes_in.load(Ordering::Relaxed);
        loop {
            let held = reserved.saturating_sub(seen.bytes_out.load(Ordering::Relaxed));
            if held != 0 && held + size > cap {
                let out = self.ring.head.bytes.load(Ordering::SeqCst);
                seen.bytes_out.store(out, Ordering::Relaxed);
                let held = reserved.saturating_sub(out);
                if held != 0 && held + size > cap {
                    return false;
                }
            }
            match bytes_in.compare_exchange_weak(
                reserved,
                reserved + size,
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => reserved = now,
            }
        }
    }

    #[inline]
    fn push(&self, entry: Entry<T>, seen: &Seen) -> Result<(), Rejected<T>> {
        // A producer retrying a full ring looks at the slot it waits for first, without
        // reserving bytes: a reservation and its undoing are two more atomic writes per retry,
        // and its head reads would take the consumers' line from them at every retry.
        if self.ring.is_full() {
            return Err(Rejected::Full(entry, Some(self.full_depth())));
        }
        let size = entry.size;
        if !self.reserve(size, seen) {
            return Err(Rejected::Full(entry, None));
        }
        self.ring.push(entry).map_err(|back| {
            self.ring.tail.bytes.fetch_sub(size, Ordering::SeqCst);
            Rejected::Full(back, Some(self.full_depth()))
        })
    }

    /// The depth when the ring is full: every slot, plus the requeued entries.
    fn full_depth(&self) -> u64 {
        self.ring.capacity() + self.extra_len.load(Ordering::Relaxed)
    }

    #[inline]
    fn pop(&self) -> Option<Entry<T>> {
        self.take(true)
    }

    fn pop_ready(&self) -> Option<Entry<T>> {
        self.take(false)
    }

    /// Requeued entries first, then the ring (`claimed`: as in [`Ring::pop`], not
    /// [`Ring::pop_ready`]).
    fn take(&self, claimed: bool) -> Option<Entry<T>> {
        if self.extra_len.load(Ordering::SeqCst) != 0
            && let Some(e) = self.pop_extra()
        {
            return Some(e);
        }
        // The bytes count out before the slot is freed (see `Ring::take`). A producer that
        // sees them gone may find the slot not yet free; the ring then waits for it, as for
        // any pop under way.
        let bytes_out = &self.ring.head.bytes;
        self.ring.take(claimed, |e| {
            bytes_out.fetch_add(e.size, Ordering::SeqCst);
        })
    }

    fn pop_extra(&self) -> Option<Entry<T>> {
        let mut extra = self.extra.lock();
        let e = extra.0.pop_front()?;
        extra.1.items_out += 1;
        extra.1.bytes_out += e.size;
        self.extra_len.fetch_sub(1, Ordering::SeqCst);
        Some(e)
    }

    fn requeue(&self, entry: Entry<T>) {
        let mut extra = self.extra.lock();
        extra.1.items_in += 1;
        extra.1.bytes_in += entry.size;
        extra.0.push_back(entry);
        self.extra_len.fetch_add(1, Ordering::SeqCst);
    }

    fn totals(&self) -> Totals {
        let extra = self.extra.lock().1;
        Totals {
            items_in: self.ring.tail.pos.load(Ordering::SeqCst) + extra.items_in,
            bytes_in: self.ring.tail.bytes.load(Ordering::SeqCst) + extra.bytes_in,
            items_out: self.ring.head.pos.load(Ordering::SeqCst) + extra.items_out,
            bytes_out: self.ring.head.bytes.load(Ordering::SeqCst) + extra.bytes_out,
        }
    }
}

/// Items ordered by rank, then by arrival.
pub(crate) struct Priority<T> {
    inner: Mutex<PriorityInner<T>>,
    capacity: usize,
    capacity_bytes: u64,
    aging: Option<u64>,
}

struct PriorityInner<T> {
    /// Keyed by (rank, sequence): the largest rank is served first, and among equal ranks the
    /// smallest sequence (the oldest). The rank is stored negated so that `first` is next.
    map: BTreeMap<(i128, u64), Entry<T>>,
    bytes: u64,
    next_seq: u64,
    totals: Totals,
}

impl<T: Item> Priority<T> {
    fn new(capacity: usize, capacity_bytes: u64, aging: Option<u64>) -> Priority<T> {
        Priority {
            inner: Mutex::new(PriorityInner {
                map: BTreeMap::new(),
                bytes: 0,
                next_seq: 0,
                totals: Totals::default(),
            }),
            capacity,
            capacity_bytes,
            aging,
        }
    }

    /// The rank of an entry. With aging `n`, an entry's effective priority grows by one level
    /// for every `n` later arrivals: `p + (now - seq) / n`. Every waiting entry ages at the same
    /// rate, so ordering by `p·n − seq` is the same ordering, and it never changes while the
    /// entry waits: the map stays sorted without re-keying.
    fn key(&self, priority: i64, seq: u64) -> (i128, u64) {
        let rank = match self.aging {
            Some(n) => i128::from(priority) * i128::from(n) - i128::from(seq),
            None => i128::from(priority),
        };
        (-rank, seq)
    }

    fn push(&self, entry: Entry<T>) -> Result<(), Rejected<T>> {
        let mut inner = self.inner.lock();
        if inner.map.len() >= self.capacity
            || (inner.bytes + entry.size > self.capacity_bytes && inner.bytes != 0)
        {
            let depth = inner.map.len() as u64;
            return Err(Rejected::Full(entry, Some(depth)));
        }
        self.insert(&mut inner, entry);
        Ok(())
    }

    fn insert(&self, inner: &mut PriorityInner<T>, entry: Entry<T>) {
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.bytes += entry.size;
        inner.totals.items_in += 1;
        inner.totals.bytes_in += entry.size;
        let key = self.key(entry.priority, seq);
        inner.map.insert(key, entry);
    }

    /// The next entry, or with `last` the one that would be served last.
    fn pop(&self, last: bool) -> Option<Entry<T>> {
        let mut inner = self.inner.lock();
        let (_, e) = if last {
            inner.map.pop_last()?
        } else {
            inner.map.pop_first()?
        };
        inner.bytes -= e.size;
        inner.totals.items_out += 1;
        inner.totals.bytes_out += e.size;
        Some(e)
    }
}
