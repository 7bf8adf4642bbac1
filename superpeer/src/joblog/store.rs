//! The job log on disk: Raft's log, vote and commit point, and the state machine's snapshot, in
//! one redb database per replica; the state machine itself in memory, rebuilt at start from the
//! snapshot and the committed entries after it.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{NodeId, TypeConfig};

/// Entries by index.
const LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("log");
/// Raft's own records (vote, commit point, last purged entry) and the snapshot.
pub(super) const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");

pub(super) type Result<T> = std::result::Result<T, StorageError<NodeId>>;

pub(super) fn encode<T: Serialize>(v: &T) -> std::result::Result<Vec<u8>, std::io::Error> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).map_err(std::io::Error::other)?;
    Ok(out)
}

pub(super) fn decode<T: for<'a> Deserialize<'a>>(
    b: &[u8],
) -> std::result::Result<T, std::io::Error> {
    ciborium::from_reader(b).map_err(std::io::Error::other)
}

/// Opens (or creates) a replica's database.
pub(crate) fn open(path: &Path) -> std::result::Result<Arc<Database>, std::io::Error> {
    let db = Database::create(path).map_err(io)?;
    let tx = db.begin_write().map_err(io)?;
    tx.open_table(LOG).map_err(io)?;
    tx.open_table(META).map_err(io)?;
    tx.commit().map_err(io)?;
    Ok(Arc::new(db))
}

/// Runs a blocking database call off the async workers.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, std::io::Error> + Send + 'static,
) -> std::result::Result<T, std::io::Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

pub(super) fn io(e: impl Into<redb::Error>) -> std::io::Error {
    std::io::Error::other(e.into())
}

pub(super) fn meta_get<T: for<'a> Deserialize<'a>>(
    db: &Database,
    key: &str,
) -> std::result::Result<Option<T>, std::io::Error> {
    let tx = db.begin_read().map_err(io)?;
    let t = tx.open_table(META).map_err(io)?;
    match t.get(key).map_err(io)? {
        Some(v) => Ok(Some(decode(v.value())?)),
        None => Ok(None),
    }
}

pub(super) fn meta_put<T: Serialize>(
    db: &Database,
    key: &str,
    v: &T,
) -> std::result::Result<(), std::io::Error> {
    let bytes = encode(v)?;
    let tx = db.begin_write().map_err(io)?;
    {
        let mut t = tx.open_table(META).map_err(io)?;
        t.insert(key, bytes.as_slice()).map_err(io)?;
    }
    tx.commit().map_err(io)
}

/// Raft's log and vote.
///
/// Readers see every entry appended and not purged from memory at once; the disk follows on
/// a writer thread of its own, which takes every write queued since its last commit into one
/// redb transaction (one fsync) and only then tells openraft the entries are stored. Appends
/// from many jobs at once thus cost one commit, not one each, and the Raft core never waits
/// on the disk.
#[derive(Clone)]
pub(crate) struct LogStore {
    inner: Arc<LogInner>,
}

struct LogInner {
    /// Every entry not purged, by index.
    entries: parking_lot::Mutex<std::collections::BTreeMap<u64, Entry<TypeConfig>>>,
    /// The last entry purged.
    purged: parking_lot::Mutex<Option<LogId<NodeId>>>,
    /// The vote, as last stored.
    vote: parking_lot::Mutex<Option<Vote<NodeId>>>,
    /// The commit point stored by the last run (read once, at start).
    committed: Option<LogId<NodeId>>,
    /// To the writer thread, in order.
    writes: std::sync::mpsc::SyncSender<Write>,
    /// The writer thread, until stopped.
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A change for the writer thread to make on disk.
enum Write {
    Append(Vec<(u64, Vec<u8>)>, LogFlushed<TypeConfig>),
    /// Remove entries from this index on.
    Truncate(u64),
    /// Remove entries up to this one, and record it as purged.
    Purge(LogId<NodeId>),
    /// Store a record of Raft's own (vote, commit point), and say when it is on disk.
    Meta(
        &'static str,
        Vec<u8>,
        tokio::sync::oneshot::Sender<std::io::Result<()>>,
    ),
    /// Write what came before, then end (and close the database).
    Stop,
}

/// Writes queued before the writer blocks the Raft core (backpressure on a slow disk).
const WRITE_QUEUE: usize = 1 << 14;

impl LogStore {
    /// The log stored in `db`, read into memory, with its writer thread started.
    pub(crate) fn open(db: Arc<Database>) -> std::result::Result<LogStore, std::io::Error> {
        let purged: Option<LogId<NodeId>> =
            meta_get::<Option<LogId<NodeId>>>(&db, "purged")?.flatten();
        let committed = meta_get::<Option<LogId<NodeId>>>(&db, "committed")?.flatten();
        let vote = meta_get::<Vote<NodeId>>(&db, "vote")?;
        let mut entries = std::collections::BTreeMap::new();
        {
            let tx = db.begin_read().map_err(io)?;
            let t = tx.open_table(LOG).map_err(io)?;
            for item in t.iter().map_err(io)? {
                let (k, v) = item.map_err(io)?;
                entries.insert(k.value(), decode::<Entry<TypeConfig>>(v.value())?);
            }
        }
        let (writes, queue) = std::sync::mpsc::sync_channel(WRITE_QUEUE);
        let thread = std::thread::Builder::new()
            .name("mvm-joblog-writer".into())
            .spawn(move || writer(&db, &queue))?;
        Ok(LogStore {
            inner: Arc::new(LogInner {
                entries: parking_lot::Mutex::new(entries),
                purged: parking_lot::Mutex::new(purged),
                vote: parking_lot::Mutex::new(vote),
                committed,
                writes,
                thread: parking_lot::Mutex::new(Some(thread)),
            }),
        })
    }

    /// Writes what is queued, stops the writer and closes its hold on the database.
    pub(crate) async fn stop(&self) {
        let thread = self.inner.thread.lock().take();
        if let Some(t) = thread {
            let _ = self.queue(Write::Stop);
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    fn queue(&self, w: Write) -> std::result::Result<(), std::io::Error> {
        self.inner
            .writes
            .send(w)
            .map_err(|_| std::io::Error::other("the job log's writer has stopped"))
    }

    /// Stores a record of Raft's own; the receiver hears when it is on disk.
    fn put_meta<T: Serialize>(
        &self,
        key: &'static str,
        v: &T,
    ) -> std::result::Result<tokio::sync::oneshot::Receiver<std::io::Result<()>>, std::io::Error>
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.queue(Write::Meta(key, encode(v)?, tx))?;
        Ok(rx)
    }
}

/// The writer thread: takes every write queued, makes them in one transaction, then reports.
/// Ends when the store is dropped.
fn writer(db: &Database, queue: &std::sync::mpsc::Receiver<Write>) {
    let mut stop = false;
    while !stop && let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match queue.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let result = (|| -> std::result::Result<(), std::io::Error> {
            let tx = db.begin_write().map_err(io)?;
            {
                let mut log = tx.open_table(LOG).map_err(io)?;
                let mut meta = tx.open_table(META).map_err(io)?;
                for w in &batch {
                    match w {
                        Write::Append(entries, _) => {
                            for (i, b) in entries {
                                log.insert(*i, b.as_slice()).map_err(io)?;
                            }
                        }
                        Write::Truncate(from) => {
                            log.retain_in(*from.., |_, _| false).map_err(io)?;
                        }
                        Write::Purge(upto) => {
                            let bytes = encode(&Some(*upto))?;
                            meta.insert("purged", bytes.as_slice()).map_err(io)?;
                            log.retain_in(..=upto.index, |_, _| false).map_err(io)?;
                        }
                        Write::Meta(key, bytes, _) => {
                            meta.insert(*key, bytes.as_slice()).map_err(io)?;
                        }
                        Write::Stop => {}
                    }
                }
            }
            tx.commit().map_err(io)
        })();
        for w in batch {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            match w {
                Write::Append(_, callback) => callback.log_io_completed(r),
                Write::Meta(_, _, done) => {
                    let _ = done.send(r);
                }
                Write::Truncate(_) | Write::Purge(_) => {}
                Write::Stop => stop = true,
            }
        }
        if let Err(e) = result {
            tracing::error!(error = %e, "the job log cannot write to its database");
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let entries = self.inner.entries.lock();
        Ok(entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let purged = *self.inner.purged.lock();
        let last = self
            .inner
            .entries
            .lock()
            .last_key_value()
            .map(|(_, e)| e.log_id)
            .or(purged);
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<()> {
        // Only a hint for the next start (entries up to it are applied at once): not waited
        // for. Without it a restarted group applies them when its new leader commits.
        self.put_meta("committed", &committed)
            .map(drop)
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>> {
        Ok(self.inner.committed)
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<()> {
        // A vote counts only once it is on disk: Raft's safety rests on it.
        let stored = async {
            self.put_meta("vote", vote)?
                .await
                .map_err(|_| std::io::Error::other("the job log's writer has stopped"))?
        };
        stored.await.map_err(|e| StorageIOError::write_vote(&e))?;
        *self.inner.vote.lock() = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>> {
        Ok(*self.inner.vote.lock())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        {
            let mut mem = self.inner.entries.lock();
            for e in entries {
                let bytes = encode(&e).map_err(|e| StorageIOError::write_logs(&e))?;
                encoded.push((e.log_id.index, bytes));
                mem.insert(e.log_id.index, e);
            }
        }
        self.queue(Write::Append(encoded, callback))
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        drop(self.inner.entries.lock().split_off(&log_id.index));
        self.queue(Write::Truncate(log_id.index))
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        {
            let mut mem = self.inner.entries.lock();
            let keep = mem.split_off(&(log_id.index + 1));
            *mem = keep;
        }
        *self.inner.purged.lock() = Some(log_id);
        self.queue(Write::Purge(log_id))
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }
}
