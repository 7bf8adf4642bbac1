//! Pausing a part's vertices at their pause points, and resuming them.
//!
//! A pause is asked for by number. Each vertex, at its next pause point (a `recv`, `send` or
//! `yield`, or at once if it is waiting in one), unwinds its call stack into its memory,
//! reports its image and waits; once the part resumes, it rewinds into the same call and goes
//! on. Nothing is taken from or given to a queue by a call that pauses, so a vertex's image and
//! its queues' items together are its whole state.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use mvm_queue::queue::Queue;
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};
use wasmtime::TypedFunc;

use super::image::{PartImage, QueueImage, VertexCounts, VertexImage, VertexPhase};

/// The Asyncify functions of one instance.
#[derive(Clone)]
pub(crate) struct Asyncify {
    pub(crate) start_unwind: TypedFunc<i32, ()>,
    pub(crate) stop_unwind: TypedFunc<(), ()>,
    pub(crate) start_rewind: TypedFunc<i32, ()>,
    pub(crate) stop_rewind: TypedFunc<(), ()>,
}

/// A checkpointable vertex's side of pausing, kept in its store.
pub(crate) struct Pausing {
    /// The vertex's place in its part (its control is reached through its ports:
    /// [`crate::runtime::abi::VertexIo::pause`]).
    pub(crate) slot: usize,
    /// The last pause it took part in.
    pub(crate) seen: u64,
    /// Where Asyncify's data lives in its memory.
    pub(crate) data: u32,
    pub(crate) funcs: Option<Asyncify>,
    /// It is being rewound: the next pause point it reaches is where it paused.
    pub(crate) rewinding: bool,
    /// A pause point began an unwind: the entry's return is a pause, not an end.
    pub(crate) unwinding: bool,
    /// A send that paused part way: its output port and the channels that had the item.
    pub(crate) sending: Option<(usize, usize)>,
}

/// Where one vertex is, as its part's control sees it.
enum Slot {
    Running,
    Paused(u64, Box<VertexImage>),
    Ended(Bytes, VertexCounts),
    Failed,
}

/// Shared by a part's control and its vertices.
pub(crate) struct PauseCtl {
    /// The last pause asked for. Written and read `SeqCst`: a vertex waiting in a receive or a
    /// send reads it after each wake-up, and a pause writes it before waking the part's queues.
    requested: AtomicU64,
    resumed: watch::Sender<u64>,
    slots: Mutex<Vec<Slot>>,
    /// A slot changed.
    changed: Notify,
}

impl PauseCtl {
    pub(crate) fn new(vertices: usize) -> Arc<PauseCtl> {
        Arc::new(PauseCtl {
            requested: AtomicU64::new(0),
            resumed: watch::Sender::new(0),
            slots: Mutex::new((0..vertices).map(|_| Slot::Running).collect()),
            changed: Notify::new(),
        })
    }

    /// Whether a pause after `seen` was asked for.
    #[inline]
    pub(crate) fn wanted(&self, seen: u64) -> bool {
        self.requested.load(Ordering::SeqCst) > seen
    }

    /// The pause a vertex is to take part in now.
    pub(crate) fn current(&self) -> u64 {
        self.requested.load(Ordering::SeqCst)
    }

    /// A vertex paused for pause `n`.
    pub(crate) fn paused(&self, slot: usize, n: u64, image: VertexImage) {
        self.set(slot, Slot::Paused(n, Box::new(image)));
    }

    /// A vertex's code returned, with this output and these counts.
    pub(crate) fn ended(&self, slot: usize, stdout: Bytes, counts: VertexCounts) {
        self.set(slot, Slot::Ended(stdout, counts));
    }

    /// A vertex failed: its part fails, and pauses do not wait for it.
    pub(crate) fn failed(&self, slot: usize) {
        self.set(slot, Slot::Failed);
    }

    fn set(&self, slot: usize, to: Slot) {
        if let Some(s) = self.slots.lock().get_mut(slot) {
            *s = to;
        }
        self.changed.notify_waiters();
    }

    /// Waits until pause `n` is over.
    pub(crate) async fn resumed(&self, n: u64) {
        let mut rx = self.resumed.subscribe();
        // The sender lives as long as this control; an error cannot happen while it is borrowed.
        let _ = rx.wait_for(|r| *r >= n).await;
    }

    fn resume(&self, n: u64) {
        {
            let mut slots = self.slots.lock();
            for s in slots.iter_mut() {
                if matches!(s, Slot::Paused(m, _) if *m <= n) {
                    *s = Slot::Running;
                }
            }
        }
        self.resumed.send_if_modified(|r| {
            let moved = *r < n;
            *r = (*r).max(n);
            moved
        });
    }
}

/// Why a part could not be paused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PauseError {
    /// Some vertices reached no pause point in time (a loop that never calls `recv`, `send`
    /// or `yield`); the others went on.
    #[error("vertices {} reached no pause point within {timeout:?}", .vertices.join(", "))]
    Timeout {
        /// Those vertices.
        vertices: Vec<String>,
        /// How long the pause waited.
        timeout: Duration,
    },
    /// A vertex failed: the part is ending.
    #[error("vertex '{0}' failed")]
    Failed(String),
    /// The part's vertices were not made checkpointable.
    #[error("this part was not prepared for checkpoints")]
    NotCheckpointable,
}

/// Pauses and resumes one part of a job (every vertex it runs on this node), and reads its
/// state while paused. Cheap to clone.
#[derive(Clone)]
pub struct PartControl {
    pub(crate) ctl: Arc<PauseCtl>,
    pub(crate) job: String,
    /// The local vertices' names, by slot.
    pub(crate) names: Vec<String>,
    /// The part's queues: the local input ports' and the outboxes to other parts.
    pub(crate) queues: Vec<(String, Queue<Bytes>)>,
}

impl std::fmt::Debug for PartControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartControl")
            .field("job", &self.job)
            .field("vertices", &self.names)
            .finish_non_exhaustive()
    }
}

impl PartControl {
    /// Lets the vertices of a pause kept with [`Paused::keep`] go on (a move given up).
    pub fn resume_kept(&self, number: u64) {
        self.ctl.resume(number);
    }

    /// Asks every vertex to pause and waits, up to `timeout`, until each has paused or ended.
    ///
    /// # Errors
    /// A vertex that reached no pause point in time (the others are resumed), or one that
    /// failed.
    pub async fn pause(&self, timeout: Duration) -> Result<Paused<'_>, PauseError> {
        let n = self.ctl.requested.fetch_add(1, Ordering::SeqCst) + 1;
        // Vertices waiting in a receive or a send read `requested` again when woken.
        for (_, q) in &self.queues {
            q.wake();
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.ctl.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let slots = self.ctl.slots.lock();
                if let Some(i) = slots.iter().position(|s| matches!(s, Slot::Failed)) {
                    drop(slots);
                    self.ctl.resume(n);
                    return Err(PauseError::Failed(self.name(i)));
                }
                let waiting: Vec<usize> = (0..slots.len())
                    .filter(|&i| match &slots[i] {
                        Slot::Running => true,
                        Slot::Paused(m, _) => *m != n,
                        Slot::Ended(..) | Slot::Failed => false,
                    })
                    .collect();
                if waiting.is_empty() {
                    let vertices = slots
                        .iter()
                        .enumerate()
                        .map(|(i, s)| match s {
                            Slot::Paused(_, image) => (**image).clone(),
                            Slot::Ended(stdout, counts) => VertexImage {
                                vertex: self.name(i),
                                stdout: stdout.clone(),
                                counts: counts.clone(),
                                phase: VertexPhase::Ended,
                            },
                            _ => VertexImage {
                                vertex: self.name(i),
                                stdout: Bytes::new(),
                                counts: VertexCounts::default(),
                                phase: VertexPhase::Ended,
                            },
                        })
                        .collect();
                    return Ok(Paused {
                        control: self,
                        number: n,
                        vertices,
                        resumed: false,
                    });
                }
                if tokio::time::Instant::now() >= deadline {
                    drop(slots);
                    self.ctl.resume(n);
                    return Err(PauseError::Timeout {
                        vertices: waiting.into_iter().map(|i| self.name(i)).collect(),
                        timeout,
                    });
                }
            }
            let _ = tokio::time::timeout_at(deadline, changed).await;
        }
    }

    fn name(&self, slot: usize) -> String {
        self.names.get(slot).cloned().unwrap_or_default()
    }
}

/// A part paused: its vertices wait until this is resumed or dropped.
#[derive(Debug)]
pub struct Paused<'a> {
    control: &'a PartControl,
    number: u64,
    vertices: Vec<VertexImage>,
    resumed: bool,
}

impl Paused<'_> {
    /// The pause's number.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// Each local vertex's state, by slot.
    pub fn vertices(&self) -> &[VertexImage] {
        &self.vertices
    }

    /// The part's whole state: its vertices and the items in its queues. Read the queues only
    /// once nothing more can arrive in them: every part of the job paused and the links
    /// between them drained.
    pub fn image(&self) -> PartImage {
        let queues = self
            .control
            .queues
            .iter()
            .map(|(name, q)| {
                let entries = q.drain();
                let items = entries
                    .iter()
                    .map(|e| (e.item.clone(), e.priority))
                    .collect();
                q.requeue(entries);
                QueueImage {
                    name: name.clone(),
                    items,
                }
            })
            .collect();
        PartImage {
            job: self.control.job.clone(),
            number: self.number,
            vertices: self.vertices.clone(),
            queues,
        }
    }

    /// Lets the vertices go on.
    pub fn resume(mut self) {
        self.resumed = true;
        self.control.ctl.resume(self.number);
    }

    /// Keeps the vertices paused after this handle goes (a part that moves away: they are
    /// meant never to go on here); the pause's number, for [`PartControl::resume_kept`].
    pub fn keep(mut self) -> u64 {
        self.resumed = true;
        self.number
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        if !self.resumed {
            self.control.ctl.resume(self.number);
        }
    }
}
