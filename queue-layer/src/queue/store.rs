//! Where a queue keeps its items: a lock-free FIFO ring, or an ordered map for priorities.
//!
//! Both stores enforce the item and byte capacities exactly; neither waits. Waiting, closing
//! and statistics live one level up, in [`super::Shared`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

use super::config::{Config, Kind};
use super::{Entry, Item};

/// Why an item did not go in.
pub(crate) enum Rejected<T> {
    /// The queue is full (in items or in bytes); the entry comes back.
    Full(Entry<T>),
}

/// One of the two stores.
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
    pub(crate) fn push(&self, entry: Entry<T>) -> Result<(), Rejected<T>> {
        match self {
            Store::Fifo(s) => s.push(entry),
            Store::Priority(s) => s.push(entry),
        }
    }

    /// Takes the next entry, if any.
    #[inline]
    pub(crate) fn pop(&self) -> Option<Entry<T>> {
        match self {
            Store::Fifo(s) => s.pop(),
            Store::Priority(s) => s.pop(),
        }
    }

    /// Removes the entry that makes room under the drop-oldest policy: the oldest of a FIFO,
    /// the one that would be served last of a priority queue.
    pub(crate) fn evict(&self) -> Option<Entry<T>> {
        match self {
            Store::Fifo(s) => s.pop(),
            Store::Priority(s) => s.pop_last(),
        }
    }

    /// Puts an entry back regardless of capacity (items returned by a remote consumer that
    /// were already counted once). FIFO puts it at the tail; priority by its rank.
    pub(crate) fn requeue(&self, entry: Entry<T>) -> Result<(), Entry<T>> {
        match self {
            Store::Fifo(s) => s.requeue(entry),
            Store::Priority(s) => {
                s.insert(entry);
                Ok(())
            }
        }
    }

    /// Bytes held now.
    pub(crate) fn bytes(&self) -> u64 {
        match self {
            Store::Fifo(s) => s.bytes.load(Ordering::Acquire),
            Store::Priority(s) => s.inner.lock().bytes,
        }
    }

    /// Items held now.
    pub(crate) fn len(&self) -> usize {
        match self {
            Store::Fifo(s) => {
                s.ring.len() + usize::try_from(s.overflow_len.load(Ordering::Acquire)).unwrap_or(0)
            }
            Store::Priority(s) => s.inner.lock().map.len(),
        }
    }
}

/// A bounded lock-free ring with an exact byte budget.
pub(crate) struct Fifo<T> {
    ring: ArrayQueue<Entry<T>>,
    /// Bytes reserved by items in the ring (and by pushes under way).
    bytes: CachePadded<AtomicU64>,
    capacity_bytes: u64,
    /// Room beyond `ring` for requeued entries; rarely used, so a lock is fine.
    overflow: Mutex<std::collections::VecDeque<Entry<T>>>,
    overflow_len: AtomicU64,
}

impl<T: Item> Fifo<T> {
    fn new(capacity: usize, capacity_bytes: u64) -> Fifo<T> {
        Fifo {
            ring: ArrayQueue::new(capacity.max(1)),
            bytes: CachePadded::new(AtomicU64::new(0)),
            capacity_bytes,
            overflow: Mutex::new(std::collections::VecDeque::new()),
            overflow_len: AtomicU64::new(0),
        }
    }

    #[inline]
    fn push(&self, entry: Entry<T>) -> Result<(), Rejected<T>> {
        let size = entry.size;
        // Reserve the bytes first: the budget is exact even with many producers.
        let before = self.bytes.fetch_add(size, Ordering::AcqRel);
        if before + size > self.capacity_bytes && before != 0 {
            self.bytes.fetch_sub(size, Ordering::AcqRel);
            return Err(Rejected::Full(entry));
        }
        match self.ring.push(entry) {
            Ok(()) => Ok(()),
            Err(entry) => {
                self.bytes.fetch_sub(size, Ordering::AcqRel);
                Err(Rejected::Full(entry))
            }
        }
    }

    #[inline]
    fn pop(&self) -> Option<Entry<T>> {
        // Requeued entries were taken earlier than anything in the ring: serve them first.
        if self.overflow_len.load(Ordering::Acquire) != 0
            && let Some(e) = self.pop_overflow()
        {
            return Some(e);
        }
        let entry = self.ring.pop()?;
        self.bytes.fetch_sub(entry.size, Ordering::AcqRel);
        Some(entry)
    }

    fn pop_overflow(&self) -> Option<Entry<T>> {
        let mut overflow = self.overflow.lock();
        let e = overflow.pop_front()?;
        self.overflow_len.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(e.size, Ordering::AcqRel);
        Some(e)
    }

    fn requeue(&self, entry: Entry<T>) -> Result<(), Entry<T>> {
        self.bytes.fetch_add(entry.size, Ordering::AcqRel);
        self.overflow.lock().push_back(entry);
        self.overflow_len.fetch_add(1, Ordering::AcqRel);
        Ok(())
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
    /// smallest sequence (the oldest). The key is stored negated so that `first` is next.
    map: BTreeMap<(i128, u64), Entry<T>>,
    bytes: u64,
    next_seq: u64,
}

impl<T: Item> Priority<T> {
    fn new(capacity: usize, capacity_bytes: u64, aging: Option<u64>) -> Priority<T> {
        Priority {
            inner: Mutex::new(PriorityInner {
                map: BTreeMap::new(),
                bytes: 0,
                next_seq: 0,
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
            return Err(Rejected::Full(entry));
        }
        self.insert_locked(&mut inner, entry);
        Ok(())
    }

    fn insert(&self, entry: Entry<T>) {
        let mut inner = self.inner.lock();
        self.insert_locked(&mut inner, entry);
    }

    fn insert_locked(&self, inner: &mut PriorityInner<T>, entry: Entry<T>) {
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.bytes += entry.size;
        let key = self.key(entry.priority, seq);
        inner.map.insert(key, entry);
    }

    fn pop(&self) -> Option<Entry<T>> {
        let mut inner = self.inner.lock();
        let (_, e) = inner.map.pop_first()?;
        inner.bytes -= e.size;
        Some(e)
    }

    fn pop_last(&self) -> Option<Entry<T>> {
        let mut inner = self.inner.lock();
        let (_, e) = inner.map.pop_last()?;
        inner.bytes -= e.size;
        Some(e)
    }
}
