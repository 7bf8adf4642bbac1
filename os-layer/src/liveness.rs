//! The liveness monitor (SmartDomains): watches guests, and when one dies behind MVM's back
//! (destroyed by someone else, crashed, shut down from inside), tears it down (domain and
//! storage) and tells the owner through an event.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::driver::State;
use crate::provision::Provisioner;

/// What the monitor reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Died {
    /// The guest.
    pub name: String,
    /// Its state when last seen: `None` when it had vanished, else shut down, crashed or dying.
    pub last: Option<State>,
    /// How its teardown went: `Ok` when domain and storage are gone.
    pub cleanup: Result<(), String>,
}

/// Watches guests on one provisioner from a thread of its own; stops when dropped.
#[derive(Debug)]
pub struct Monitor {
    watched: Arc<Mutex<BTreeSet<String>>>,
    stop: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Monitor {
    /// Starts watching every `interval`; deaths arrive on the returned receiver (capacity 64:
    /// the monitor waits for the owner rather than drop one).
    pub fn start(prov: Arc<Provisioner>, interval: Duration) -> (Monitor, mpsc::Receiver<Died>) {
        let (tx, rx) = mpsc::channel(64);
        let (stop_tx, stop_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let watched: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let w = watched.clone();
        let thread = std::thread::Builder::new()
            .name("mvm-liveness".into())
            .spawn(move || {
                loop {
                    match stop_rx.recv_timeout(interval) {
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    for died in check(&prov, &w) {
                        if tx.blocking_send(died).is_err() {
                            return;
                        }
                    }
                }
            })
            .ok();
        (
            Monitor {
                watched,
                stop: Some(stop_tx),
                thread,
            },
            rx,
        )
    }

    fn set(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.watched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Watches guest `name`.
    pub fn watch(&self, name: &str) {
        self.set().insert(name.to_owned());
    }

    /// Stops watching guest `name` (before MVM itself saves, migrates or destroys it).
    pub fn unwatch(&self, name: &str) {
        self.set().remove(name);
    }

    /// The guests watched.
    pub fn watched(&self) -> Vec<String> {
        self.set().iter().cloned().collect()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.try_send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One round: the watched guests that are dead, torn down.
fn check(prov: &Provisioner, watched: &Mutex<BTreeSet<String>>) -> Vec<Died> {
    let names: Vec<String> = watched
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .cloned()
        .collect();
    if names.is_empty() {
        return Vec::new();
    }
    let guests = match prov.driver().list() {
        Ok(g) => g,
        Err(e) => {
            // Not knowing is not dying: try again next round.
            tracing::warn!("liveness: cannot list guests: {e}");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for name in names {
        let last = match guests.iter().find(|g| g.name == name) {
            None => None,
            Some(g) if g.state.is_dead() => Some(g.state),
            Some(_) => continue,
        };
        // Still watched? The owner may have unwatched it while we listed.
        let still = watched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&name);
        if !still {
            continue;
        }
        let cleanup = prov.teardown(&name).map_err(|e| e.to_string());
        tracing::info!(guest = %name, ?last, ?cleanup, "liveness: guest died");
        out.push(Died {
            name,
            last,
            cleanup,
        });
    }
    out
}
