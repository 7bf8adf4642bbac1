//! Marks: how a checkpoint finds nothing in flight on a link.
//!
//! A checkpoint of a job is a consistent cut. Once every node has paused its vertices, the
//! sending end of each link is held ([`Hold::hold`]): it takes nothing more from its queue and
//! writes a MARK frame after what it has written. The receiving end is drained
//! ([`Drain::drain`]): it reads everything up to that MARK even when its queue is full, and
//! keeps what does not fit, in order, after the queue's items ([`Drain::held`]). When every
//! receiving end of a node has read its MARK, nothing is in flight: the node's state is its
//! vertices, its queues and the held items. Released ([`Hold::release`], [`Drain::release`]),
//! a sending end takes from its queue again, and a receiving end first delivers its held items
//! (waiting for room as usual), then reads on.
//!
//! One pair of handles serves both transports: the stream protocol ([`super::export_with`],
//! [`super::import_with`]) and direct links ([`super::direct::outlet_with`],
//! [`super::direct::inlet_with`]). A handle is given to one link end, before or after it
//! starts; a hold or drain asked before the end starts takes effect when it does.
//!
//! Marks are numbered, and on one link each is larger than the one before. What happens at
//! the edges:
//! - A MARK the receiving end was not asked for (its sender was held without a drain here, or
//!   the number is smaller than the drain's: a checkpoint given up) is recorded
//!   ([`Drain::last_mark`]), and the end reads on. An old peer cannot break anything with it.
//! - A MARK with a larger number than the drain's ends the drain with
//!   [`MarkError::Mismatch`]; the end then reads nothing more until it is released.
//! - A drain asked for after its MARK was read (there was room for everything before it)
//!   completes at once.
//! - A link that ends (END) before the MARK completes the hold or drain with
//!   [`Marked::Ended`]: nothing will follow. A receiving end keeps its held items, delivers
//!   them once released, and only then ends its queue.
//! - A link that fails completes them with [`MarkError::LinkFailed`]; the link's own report
//!   says why. A stream importer still delivers its held items once released (it credited
//!   them, so its exporter will not send them again); a direct inlet is fail-stop and keeps
//!   them only for [`Drain::held`].
//! - A hold or drain released without anything in flight, or before its MARK, simply ends: the
//!   link goes on as before.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

use crate::queue::Entry;

/// The control of a link's sending end: holds it at a mark for a checkpoint. Cheap to clone;
/// every clone controls the same end.
#[derive(Clone, Default)]
pub struct Hold(pub(crate) Arc<Control>);

/// The control of a link's receiving end: drains it to a mark for a checkpoint and keeps the
/// items its queue had no room for. Cheap to clone; every clone controls the same end.
#[derive(Clone, Default)]
pub struct Drain(pub(crate) Arc<Control>);

/// How a hold or drain completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marked {
    /// The MARK was written (sending end) or read (receiving end): nothing of this link is in
    /// flight.
    Mark,
    /// The link ended (END) first: nothing is in flight, and nothing more will come.
    Ended,
}

/// A hold or drain that did not reach its mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MarkError {
    /// The end is held or drained for another mark; release it first.
    #[error("the link end is held for mark {0} already")]
    Busy(u64),
    /// Marks on a link must grow.
    #[error("mark {mark} is not after the link's last mark {last}")]
    Stale {
        /// The mark asked for.
        mark: u64,
        /// The last mark written or read.
        last: u64,
    },
    /// The peer sent a later mark than the one drained for: its end is at another checkpoint.
    #[error("drained for mark {expected}, the peer sent mark {got}")]
    Mismatch {
        /// The mark drained for.
        expected: u64,
        /// The mark that came.
        got: u64,
    },
    /// The end was released before it reached the mark.
    #[error("the link end was released before its mark")]
    Released,
    /// The link failed or was stopped before the mark (its report says why).
    #[error("the link failed before its mark")]
    LinkFailed,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Hold")
            .field(&self.0.state.lock().asked)
            .finish()
    }
}

impl std::fmt::Debug for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Drain")
            .field(&self.0.state.lock().asked)
            .finish()
    }
}

impl Hold {
    /// A control for one sending end, not yet given to one.
    pub fn new() -> Hold {
        Hold::default()
    }

    /// Stops taking items from the queue and writes MARK `mark` after everything already
    /// taken; completes when the MARK is written (or the link has ended or failed). The end
    /// stays held until [`Hold::release`], also if this future is dropped.
    ///
    /// On the stream protocol it completes only once every item sent before the MARK is
    /// credited (a draining receiver credits all it read at the MARK; the sender asks for it):
    /// a held sending end then owes nothing, and may be dropped, or its link replaced, without
    /// an item put back twice.
    ///
    /// # Errors
    /// [`MarkError::Busy`] when held for another mark, [`MarkError::Stale`] when `mark` is not
    /// after the last one written, [`MarkError::Released`], [`MarkError::LinkFailed`].
    pub async fn hold(&self, mark: u64) -> Result<Marked, MarkError> {
        self.0.ask(mark, false)?;
        self.0.until_reached(mark).await
    }

    /// Lets the end take items from its queue again (and ends a hold not yet complete).
    pub fn release(&self) {
        self.0.release();
    }

    /// The last MARK this end wrote.
    pub fn last_mark(&self) -> Option<u64> {
        self.0.state.lock().last
    }
}

impl Drain {
    /// A control for one receiving end, not yet given to one.
    pub fn new() -> Drain {
        Drain::default()
    }

    /// Reads every frame up to MARK `mark`, even when the queue is full, keeping what does not
    /// fit ([`Drain::held`]); completes when the MARK is read (or the link has ended or
    /// failed). The end reads nothing more until [`Drain::release`], also if this future is
    /// dropped.
    ///
    /// # Errors
    /// [`MarkError::Busy`] when drained for another mark, [`MarkError::Stale`] when `mark` is
    /// before the last one read, [`MarkError::Mismatch`] when a later mark came,
    /// [`MarkError::Released`], [`MarkError::LinkFailed`].
    pub async fn drain(&self, mark: u64) -> Result<Marked, MarkError> {
        self.0.ask(mark, true)?;
        self.0.until_reached(mark).await
    }

    /// The items read and not delivered (their queue had no room), oldest first: they come
    /// after the queue's items. Reading them takes nothing away.
    pub fn held(&self) -> Vec<Entry<Bytes>> {
        self.0.state.lock().held.iter().cloned().collect()
    }

    /// Lets the end go on: it delivers its held items first (waiting for room as usual), then
    /// reads on. Ends a drain not yet complete.
    pub fn release(&self) {
        self.0.release();
    }

    /// The last MARK this end read, asked for or not.
    pub fn last_mark(&self) -> Option<u64> {
        self.0.state.lock().last
    }
}

/// What a link end shares with its [`Hold`] or [`Drain`].
#[derive(Default)]
pub(crate) struct Control {
    /// Whether the end must look at its control: a mark is asked for, or held items wait.
    /// Read relaxed on the links' hot paths; written under `state`'s lock.
    busy: AtomicBool,
    /// Whether a mark is asked for (read with SeqCst after `changed.notified()`).
    asking: AtomicBool,
    state: Mutex<State>,
    /// Notified at every change of `state`.
    changed: Notify,
    /// Wakes the end when a mark is asked for or released (a direct link's helper thread;
    /// the stream endpoints wait on `changed`).
    kick: OnceLock<Box<dyn Fn() + Send + Sync>>,
    attached: AtomicBool,
}

#[derive(Default)]
struct State {
    /// The mark asked for, until released.
    asked: Option<u64>,
    /// How the end stopped for it.
    reached: Option<Reached>,
    /// The last mark written or read.
    last: Option<u64>,
    /// Items read and not delivered, oldest first (receiving ends).
    held: VecDeque<Entry<Bytes>>,
    /// The link has ended (`true`: cleanly, by END).
    over: Option<bool>,
}

#[derive(Debug, Clone, Copy)]
enum Reached {
    Mark,
    Ended,
    Mismatch(u64),
}

/// What a link end does about its control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Nothing is asked for: go on (a receiving end delivers its held items first).
    Run,
    /// Mark `n` is asked for: a sending end writes it, a receiving end reads to it.
    Seek(u64),
    /// The mark is reached (or the link ended): wait for release.
    Wait,
}

impl State {
    fn phase(&self) -> Phase {
        match (self.asked, self.reached) {
            (None, _) => Phase::Run,
            (Some(n), None) if self.over.is_none() => Phase::Seek(n),
            (Some(_), _) => Phase::Wait,
        }
    }

    /// How waiting for `mark` ended, if it has.
    fn outcome(&self, mark: u64) -> Option<Result<Marked, MarkError>> {
        if self.asked != Some(mark) {
            return Some(Err(MarkError::Released));
        }
        Some(match (self.reached, self.over) {
            (Some(Reached::Mark), _) => Ok(Marked::Mark),
            (Some(Reached::Ended), _) | (None, Some(true)) => Ok(Marked::Ended),
            (Some(Reached::Mismatch(got)), _) => Err(MarkError::Mismatch {
                expected: mark,
                got,
            }),
            (None, Some(false)) => Err(MarkError::LinkFailed),
            (None, None) => return None,
        })
    }
}

impl Control {
    /// Ties the control to a link end; `false` if it is tied to one already. `kick` wakes the
    /// end when a mark is asked for or released.
    pub(crate) fn attach(&self, kick: Option<Box<dyn Fn() + Send + Sync>>) -> bool {
        if self.attached.swap(true, Ordering::AcqRel) {
            return false;
        }
        if let Some(k) = kick {
            let _ = self.kick.set(k);
        }
        true
    }

    /// Whether the end must look at its control (one relaxed load, for hot paths).
    #[inline]
    pub(crate) fn busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed)
    }

    pub(crate) fn phase(&self) -> Phase {
        self.state.lock().phase()
    }

    /// A future woken at the next change; create it before looking, then wait on it.
    pub(crate) fn changed(&self) -> Notified<'_> {
        self.changed.notified()
    }

    /// Waits until a mark is asked for.
    pub(crate) async fn asked(&self) {
        loop {
            let changed = self.changed();
            if self.asking.load(Ordering::SeqCst) {
                return;
            }
            changed.await;
        }
    }

    /// Applies a change to the state, updates the flags, and wakes whoever waits.
    fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = {
            let mut s = self.state.lock();
            let r = f(&mut s);
            self.asking.store(s.asked.is_some(), Ordering::SeqCst);
            self.busy
                .store(s.asked.is_some() || !s.held.is_empty(), Ordering::SeqCst);
            r
        };
        self.changed.notify_waiters();
        r
    }

    fn ask(&self, mark: u64, receiving: bool) -> Result<(), MarkError> {
        let asked = self.update(|s| {
            match s.asked {
                Some(a) if a == mark => return Ok(false),
                Some(a) => return Err(MarkError::Busy(a)),
                None => {}
            }
            match s.last {
                // A receiving end that read this mark already (there was room for everything
                // before it) is there.
                Some(last) if receiving && last == mark => s.reached = Some(Reached::Mark),
                Some(last) if mark < last || (mark == last && !receiving) => {
                    return Err(MarkError::Stale { mark, last });
                }
                _ => s.reached = None,
            }
            if s.over == Some(true) {
                s.reached = Some(Reached::Ended);
            }
            s.asked = Some(mark);
            Ok(true)
        })?;
        if asked {
            self.wake_end();
        }
        Ok(())
    }

    async fn until_reached(&self, mark: u64) -> Result<Marked, MarkError> {
        loop {
            let changed = self.changed();
            if let Some(outcome) = self.state.lock().outcome(mark) {
                return outcome;
            }
            changed.await;
        }
    }

    fn release(&self) {
        self.update(|s| {
            s.asked = None;
            s.reached = None;
        });
        self.wake_end();
    }

    fn wake_end(&self) {
        if let Some(k) = self.kick.get() {
            k();
        }
    }

    /// A sending end wrote MARK `n` (all of it).
    pub(crate) fn wrote_mark(&self, n: u64) {
        self.update(|s| {
            s.last = Some(n);
            if s.asked == Some(n) && s.reached.is_none() {
                s.reached = Some(Reached::Mark);
            }
        });
    }

    /// A receiving end read MARK `n`; `true` if it is to read nothing more until released
    /// (the mark drained for, or a later one).
    pub(crate) fn read_mark(&self, n: u64) -> bool {
        self.update(|s| {
            s.last = Some(n);
            match s.asked {
                Some(a) if s.reached.is_none() && n >= a => {
                    s.reached = Some(if n == a {
                        Reached::Mark
                    } else {
                        Reached::Mismatch(n)
                    });
                    true
                }
                _ => false,
            }
        })
    }

    /// The link has ended: cleanly (END) or not. A hold or drain waiting completes.
    pub(crate) fn over(&self, clean: bool) {
        self.update(|s| {
            s.over.get_or_insert(clean);
            if s.asked.is_some() && s.reached.is_none() && clean {
                s.reached = Some(Reached::Ended);
            }
        });
    }

    /// Keeps an item its queue had no room for, after those kept before.
    pub(crate) fn keep(&self, entry: Entry<Bytes>) {
        // Nobody waits for this (it can come for every item of a drain): no wake-up.
        self.state.lock().held.push_back(entry);
        self.busy.store(true, Ordering::SeqCst);
    }

    /// Whether items are kept.
    pub(crate) fn keeps(&self) -> bool {
        !self.state.lock().held.is_empty()
    }

    /// The oldest item kept, to deliver now.
    pub(crate) fn take_kept(&self) -> Option<Entry<Bytes>> {
        let mut s = self.state.lock();
        let e = s.held.pop_front();
        if s.held.is_empty() && s.asked.is_none() {
            self.busy.store(false, Ordering::SeqCst);
        }
        e
    }

    /// Puts back an item taken with [`Control::take_kept`] that could not be delivered.
    pub(crate) fn put_back(&self, entry: Entry<Bytes>) {
        self.update(|s| s.held.push_front(entry));
    }

    /// Every item kept (handed back when the consumers have gone).
    pub(crate) fn take_all_kept(&self) -> Vec<Entry<Bytes>> {
        self.update(|s| s.held.drain(..).collect())
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    fn entry(n: u8) -> Entry<Bytes> {
        Entry::new(Bytes::from(vec![n]), i64::from(n))
    }

    #[test]
    fn marks_grow_one_at_a_time() {
        let hold = Hold::new();
        let c = &hold.0;
        assert!(!c.busy());
        let mut waiting = Box::pin(hold.hold(3));
        assert_eq!(waiting.as_mut().now_or_never(), None, "not written yet");
        assert!(c.busy());
        assert_eq!(c.phase(), Phase::Seek(3));
        assert_eq!(hold.hold(4).now_or_never(), Some(Err(MarkError::Busy(3))));
        c.wrote_mark(3);
        assert_eq!(c.phase(), Phase::Wait);
        assert_eq!(waiting.now_or_never(), Some(Ok(Marked::Mark)));
        assert_eq!(
            hold.hold(3).now_or_never(),
            Some(Ok(Marked::Mark)),
            "the same mark again"
        );
        hold.release();
        assert!(!c.busy());
        assert_eq!(c.phase(), Phase::Run);
        assert_eq!(
            hold.hold(3).now_or_never(),
            Some(Err(MarkError::Stale { mark: 3, last: 3 }))
        );
        assert_eq!(hold.last_mark(), Some(3));
    }

    #[test]
    fn a_drain_completes_at_its_mark_or_fails_at_a_later_one() {
        let drain = Drain::new();
        let c = &drain.0;
        // Unasked marks are recorded only.
        assert!(!c.read_mark(1));
        assert_eq!(drain.last_mark(), Some(1));
        // A mark read before the drain was asked for: the drain completes at once.
        assert_eq!(drain.drain(1).now_or_never(), Some(Ok(Marked::Mark)));
        drain.release();
        let mut waiting = Box::pin(drain.drain(5));
        assert_eq!(waiting.as_mut().now_or_never(), None);
        assert!(!c.read_mark(4), "an older mark: read on");
        assert_eq!(c.phase(), Phase::Seek(5));
        assert!(c.read_mark(6), "a later one: stop");
        assert_eq!(
            waiting.now_or_never(),
            Some(Err(MarkError::Mismatch {
                expected: 5,
                got: 6
            }))
        );
        drain.release();
        assert_eq!(
            drain.drain(5).now_or_never(),
            Some(Err(MarkError::Stale { mark: 5, last: 6 }))
        );
    }

    #[test]
    fn release_end_and_failure_complete_a_waiting_drain() {
        let drain = Drain::new();
        let mut waiting = Box::pin(drain.drain(1));
        assert_eq!(waiting.as_mut().now_or_never(), None);
        drain.release();
        assert_eq!(waiting.now_or_never(), Some(Err(MarkError::Released)));

        let mut waiting = Box::pin(drain.drain(2));
        assert_eq!(waiting.as_mut().now_or_never(), None);
        drain.0.over(true);
        assert_eq!(waiting.now_or_never(), Some(Ok(Marked::Ended)));
        drain.release();
        assert_eq!(
            drain.drain(3).now_or_never(),
            Some(Ok(Marked::Ended)),
            "ended stays ended"
        );

        let failed = Drain::new();
        failed.0.over(false);
        assert_eq!(
            failed.drain(1).now_or_never(),
            Some(Err(MarkError::LinkFailed))
        );
    }

    #[test]
    fn kept_items_stay_in_order_until_delivered() {
        let drain = Drain::new();
        let c = &drain.0;
        assert_eq!(drain.drain(1).now_or_never(), None);
        for n in 0..3 {
            c.keep(entry(n));
        }
        assert_eq!(drain.held(), vec![entry(0), entry(1), entry(2)]);
        assert_eq!(drain.held().len(), 3, "reading them keeps them");
        drain.release();
        assert!(c.busy(), "released, with items still to deliver");
        assert_eq!(c.phase(), Phase::Run);
        let first = c.take_kept();
        assert_eq!(first, Some(entry(0)));
        if let Some(e) = first {
            c.put_back(e);
        }
        assert_eq!(c.take_kept(), Some(entry(0)));
        assert_eq!(c.take_kept(), Some(entry(1)));
        assert!(c.busy());
        assert_eq!(c.take_kept(), Some(entry(2)));
        assert!(!c.busy(), "all delivered: back to the fast path");
        assert!(c.attach(None));
        assert!(!c.attach(None), "one link end per control");
    }
}
