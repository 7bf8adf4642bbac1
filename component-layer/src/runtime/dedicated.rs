//! Dedicated vertex threads: a part whose vertices fit the node's free cores runs each vertex
//! on a thread of its own, where a receive may poll before it parks (as MPI ranks do).
//!
//! On the shared tokio pool a vertex must never spin: the task it just woke sits in its
//! worker's LIFO slot, which no other worker can steal, so a spin would delay the very reply it
//! waits for. On a dedicated thread nothing else is scheduled, so a short poll costs only that
//! core, and a hand-off between two vertices on two cores takes a cache-line transfer instead
//! of a wake-up through the kernel. Parts larger than the free cores (a 16-vertex ring on 2
//! cores) stay on the shared pool, where hand-offs between tasks on one worker are cheapest.
//!
//! Threads are started on first use, at most one per core, and kept: each runs one vertex at a
//! time on its own current-thread tokio runtime.

use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

type Work = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The dedicated threads of one runtime.
pub(crate) struct Dedicated {
    shared: Arc<Shared>,
}

struct Shared {
    pool: Mutex<Pool>,
    /// The most threads there may be.
    limit: usize,
}

/// The idle threads and how many were started, under one lock.
#[derive(Default)]
struct Pool {
    idle: Vec<Worker>,
    started: usize,
}

/// One idle thread, ready for a vertex. Dropped without work (a part cancelled before its
/// vertex started), it goes back to the idle list: the thread lives as long as a handle to it.
pub(crate) struct Worker {
    tx: Option<mpsc::Sender<(Work, Worker)>>,
    pool: Weak<Shared>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let (Some(tx), Some(pool)) = (self.tx.take(), self.pool.upgrade()) {
            pool.pool.lock().idle.push(Worker {
                tx: Some(tx),
                pool: self.pool.clone(),
            });
        }
    }
}

impl Dedicated {
    /// At most `limit` threads (0: never dedicate).
    pub(crate) fn new(limit: usize) -> Dedicated {
        Dedicated {
            shared: Arc::new(Shared {
                pool: Mutex::new(Pool::default()),
                limit,
            }),
        }
    }

    /// `n` threads for the vertices of one part, or `None` when fewer are free (the part then
    /// runs on the shared pool).
    pub(crate) fn take(&self, n: usize) -> Option<Vec<Worker>> {
        if n == 0 {
            return None;
        }
        let mut pool = self.shared.pool.lock();
        if pool.idle.len() + (self.shared.limit - pool.started) < n {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match pool.idle.pop() {
                Some(w) => out.push(w),
                None => match self.spawn() {
                    Some(w) => {
                        pool.started += 1;
                        out.push(w);
                    }
                    None => {
                        // The thread could not be started: give back what was taken.
                        pool.idle.extend(out);
                        return None;
                    }
                },
            }
        }
        Some(out)
    }

    /// Threads started so far.
    #[cfg(test)]
    pub(crate) fn started(&self) -> usize {
        self.shared.pool.lock().started
    }

    /// Returns threads that were taken but not used.
    pub(crate) fn give_back(&self, workers: Vec<Worker>) {
        self.shared.pool.lock().idle.extend(workers);
    }

    fn spawn(&self) -> Option<Worker> {
        let (tx, rx) = mpsc::channel::<(Work, Worker)>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        let shared = Arc::downgrade(&self.shared);
        std::thread::Builder::new()
            .name("mvm-vertex".into())
            .spawn(move || {
                // The thread ends when every handle to it is gone: the idle list's (when the
                // runtime is dropped) and the one that comes with each piece of work.
                while let Ok((work, me)) = rx.recv() {
                    rt.block_on(work);
                    let Some(shared) = shared.upgrade() else {
                        return;
                    };
                    shared.pool.lock().idle.push(me);
                }
            })
            .ok()?;
        Some(Worker {
            tx: Some(tx),
            pool: Arc::downgrade(&self.shared),
        })
    }
}

impl Worker {
    /// Runs `work` on this thread, which becomes idle again after it.
    ///
    /// # Errors
    /// The thread is gone (it panicked); the work is handed back.
    pub(crate) fn run(self, work: Work) -> Result<(), Work> {
        let Some(tx) = self.tx.clone() else {
            return Err(work);
        };
        tx.send((work, self)).map_err(|e| {
            let (work, mut dead) = e.0;
            dead.tx = None; // its thread is gone: not back to the idle list
            work
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_taken_up_to_the_limit_and_come_back_when_idle() {
        let d = Dedicated::new(2);
        assert!(d.take(3).is_none(), "more than the limit");
        let two = d.take(2).expect("two threads");
        assert!(d.take(1).is_none(), "all are taken");
        let (tx, rx) = mpsc::channel();
        for w in two {
            let tx = tx.clone();
            let name = async move {
                let _ = tx.send(std::thread::current().name().map(str::to_owned));
            };
            assert!(w.run(Box::pin(name)).is_ok());
        }
        for _ in 0..2 {
            let name = rx.recv().expect("ran");
            assert_eq!(name.as_deref(), Some("mvm-vertex"));
        }
        // Both threads return to the idle list after their work.
        let back = (0..200).find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            d.take(2)
        });
        assert!(back.is_some(), "the threads came back");
        assert_eq!(d.started(), 2, "no new thread was started");
        // Dropped without work (a part cancelled before its vertices started): back at once.
        drop(back);
        let again = d.take(2).expect("the dropped threads are idle again");
        assert_eq!(d.started(), 2, "and still no new thread");
        // They still run work.
        let (tx, rx) = mpsc::channel();
        for w in again {
            let tx = tx.clone();
            assert!(
                w.run(Box::pin(async move { tx.send(()).expect("send") }))
                    .is_ok()
            );
        }
        for _ in 0..2 {
            rx.recv().expect("ran");
        }
    }
}
