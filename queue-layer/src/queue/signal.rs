//! A wake-up signal with a lock-free fast path when nobody waits.
//!
//! `event_listener::Event::notify` takes a lock on every call. A queue notifies on every send
//! and receive, so this wrapper counts the waiters and skips the call when there are none.
//!
//! Why no wake-up is lost: a waiter first registers its listener, then announces itself
//! (`waiting += 1`, SeqCst), then re-checks its condition with SeqCst reads. A notifier first
//! makes its change ending in a SeqCst read-modify-write, then reads `waiting` (SeqCst). In the
//! single total order of SeqCst operations either the announcement comes first (the notifier
//! sees it and notifies the registered listener) or the change does (the re-check sees it).
//! This is the reasoning of crossbeam's channels, which also notify without a fence.

use std::sync::atomic::{AtomicUsize, Ordering, fence};

use event_listener::{Event, EventListener};

/// A signal: an event plus a count of announced waiters.
#[derive(Default)]
pub(crate) struct Signal {
    event: Event,
    waiting: AtomicUsize,
}

/// A registered, announced waiter. Dropping it withdraws the announcement.
pub(crate) struct Waiter<'a> {
    signal: &'a Signal,
    listener: Option<EventListener>,
}

impl Signal {
    /// Registers and announces a waiter. Re-check the condition after this, then wait.
    pub(crate) fn listen(&self) -> Waiter<'_> {
        let listener = self.event.listen();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        Waiter {
            signal: self,
            listener: Some(listener),
        }
    }

    /// Wakes one more waiter, if any is announced.
    ///
    /// No fence: the caller's change must end with a SeqCst read-modify-write (or be made under
    /// a lock the waiter's re-check takes), and the waiter's re-check must read it with SeqCst
    /// (or under that lock). Then the change and the announcement are both in the single total
    /// order of SeqCst operations, and this SeqCst load of the count sees the announcement
    /// whenever the re-check could have missed the change.
    #[inline]
    pub(crate) fn notify_one(&self) {
        if self.waiting.load(Ordering::SeqCst) != 0 {
            self.event.notify_additional(1);
        }
    }

    /// Whether a waiter has announced itself.
    #[inline]
    pub(crate) fn is_awaited(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) != 0
    }

    /// Wakes every waiter.
    pub(crate) fn notify_all(&self) {
        fence(Ordering::SeqCst);
        self.event.notify(usize::MAX);
    }
}

impl Waiter<'_> {
    /// Blocks the thread until notified, or until `deadline`; `false` on timeout.
    pub(crate) fn wait(mut self, deadline: Option<std::time::Instant>) -> bool {
        use event_listener::Listener;
        match self.listener.take() {
            Some(l) => match deadline {
                None => {
                    l.wait();
                    true
                }
                Some(d) => l.wait_deadline(d).is_some(),
            },
            None => true,
        }
    }

    /// Waits in async code until notified.
    pub(crate) async fn wait_async(mut self) {
        if let Some(l) = self.listener.take() {
            l.await;
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.signal.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn no_wakeup_is_lost_under_races() {
        // A flag set by one thread and waited for by another, many times: a lost wake-up
        // would hang this test.
        for _ in 0..2000 {
            let s = Arc::new((Signal::default(), AtomicBool::new(false)));
            let s2 = s.clone();
            let waiter = std::thread::spawn(move || {
                loop {
                    if s2.1.load(Ordering::SeqCst) {
                        return;
                    }
                    let w = s2.0.listen();
                    if s2.1.load(Ordering::SeqCst) {
                        return;
                    }
                    w.wait(None);
                }
            });
            s.1.store(true, Ordering::SeqCst);
            s.0.notify_one();
            waiter.join().expect("no panic");
        }
    }
}
