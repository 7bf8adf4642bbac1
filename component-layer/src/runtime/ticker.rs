//! The epoch ticker: one thread per process and tick length advances the epoch of every
//! engine in use, however many runtimes the process holds (a node holds one; a test or a
//! benchmark with many nodes in one process holds one per node, and a thread each would wake
//! thousands of times a millisecond). An engine is ticked for as long as anything holds its
//! runtime's state, which includes the vertices still running after their runtime was dropped:
//! a vertex stops at a tick, so one that is never ticked again would never stop.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use parking_lot::Mutex;

use super::Inner;

/// The runtimes ticked by one thread.
type Ticked = Arc<Mutex<Vec<Weak<Inner>>>>;

/// The runtimes of each tick length, each list served by one thread.
static TICKERS: OnceLock<Mutex<HashMap<Duration, Ticked>>> = OnceLock::new();

/// Advances the epoch of `inner`'s engine every `tick` while `inner` is held.
///
/// # Errors
/// The ticker thread of this tick length cannot be started.
pub(super) fn tick(inner: Weak<Inner>, tick: Duration) -> std::io::Result<()> {
    let mut tickers = TICKERS.get_or_init(Mutex::default).lock();
    if let Some(list) = tickers.get(&tick) {
        list.lock().push(inner);
        return Ok(());
    }
    let list = Arc::new(Mutex::new(vec![inner]));
    let served = list.clone();
    std::thread::Builder::new()
        .name("mvm-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(tick);
                served.lock().retain(|w| match w.upgrade() {
                    Some(inner) => {
                        inner.engine.increment_epoch();
                        true
                    }
                    None => false,
                });
            }
        })?;
    tickers.insert(tick, list);
    Ok(())
}
