//! The job log on disk: Raft's log, vote and commit point, and the state machine's snapshot, in
//! one redb database per replica; the state machine itself in memory, rebuilt at start from the
//! snapshot and the committed entries after it.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use parking_lot::RwLock;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::state::{Applied, ControlState};
use super::{NodeId, Replica, TypeConfig};

/// Entries by index.
const LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("log");
/// Raft's own records (vote, commit point, last purged entry) and the snapshot.
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");

type Result<T> = std::result::Result<T, StorageError<NodeId>>;

fn encode<T: Serialize>(v: &T) -> std::result::Result<Vec<u8>, std::io::Error> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).map_err(std::io::Error::other)?;
    Ok(out)
}

fn decode<T: for<'a> Deserialize<'a>>(b: &[u8]) -> std::result::Result<T, std::io::Error> {
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
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, std::io::Error> + Send + 'static,
) -> std::result::Result<T, std::io::Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

fn io(e: impl Into<redb::Error>) -> std::io::Error {
    std::io::Error::other(e.into())
}

fn meta_get<T: for<'a> Deserialize<'a>>(
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

fn meta_put<T: Serialize>(
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
#[derive(Clone)]
pub(crate) struct LogStore {
    pub(crate) db: Arc<Database>,
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => Bound::Included(*x),
            Bound::Excluded(x) => Bound::Excluded(*x),
            Bound::Unbounded => Bound::Unbounded,
        };
        let db = self.db.clone();
        blocking(move || {
            let tx = db.begin_read().map_err(io)?;
            let t = tx.open_table(LOG).map_err(io)?;
            let mut out = Vec::new();
            for item in t.range((Bound::Included(start), end)).map_err(io)? {
                let (_, v) = item.map_err(io)?;
                out.push(decode::<Entry<TypeConfig>>(v.value())?);
            }
            Ok(out)
        })
        .await
        .map_err(|e| StorageIOError::read_logs(&e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let db = self.db.clone();
        blocking(move || {
            let purged: Option<LogId<NodeId>> = meta_get(&db, "purged")?;
            let tx = db.begin_read().map_err(io)?;
            let t = tx.open_table(LOG).map_err(io)?;
            let last = match t.last().map_err(io)? {
                Some((_, v)) => Some(decode::<Entry<TypeConfig>>(v.value())?.log_id),
                None => purged,
            };
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id: last,
            })
        })
        .await
        .map_err(|e| StorageIOError::read_logs(&e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<()> {
        let db = self.db.clone();
        blocking(move || meta_put(&db, "committed", &committed))
            .await
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>> {
        let db = self.db.clone();
        blocking(move || Ok(meta_get::<Option<LogId<NodeId>>>(&db, "committed")?.flatten()))
            .await
            .map_err(|e| StorageIOError::read(&e).into())
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<()> {
        let (db, vote) = (self.db.clone(), *vote);
        blocking(move || meta_put(&db, "vote", &vote))
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>> {
        let db = self.db.clone();
        blocking(move || meta_get(&db, "vote"))
            .await
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for e in entries {
            let bytes = encode(&e).map_err(|e| StorageIOError::write_logs(&e))?;
            encoded.push((e.log_id.index, bytes));
        }
        let db = self.db.clone();
        let written = blocking(move || {
            let tx = db.begin_write().map_err(io)?;
            {
                let mut t = tx.open_table(LOG).map_err(io)?;
                for (i, b) in &encoded {
                    t.insert(*i, b.as_slice()).map_err(io)?;
                }
            }
            tx.commit().map_err(io)
        })
        .await;
        match written {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let err = StorageIOError::write_logs(&e);
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(err.into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        let db = self.db.clone();
        blocking(move || {
            let tx = db.begin_write().map_err(io)?;
            {
                let mut t = tx.open_table(LOG).map_err(io)?;
                t.retain_in(log_id.index.., |_, _| false).map_err(io)?;
            }
            tx.commit().map_err(io)
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        let db = self.db.clone();
        blocking(move || {
            let bytes = encode(&Some(log_id))?;
            let tx = db.begin_write().map_err(io)?;
            {
                let mut m = tx.open_table(META).map_err(io)?;
                m.insert("purged", bytes.as_slice()).map_err(io)?;
                let mut t = tx.open_table(LOG).map_err(io)?;
                t.retain_in(..=log_id.index, |_, _| false).map_err(io)?;
            }
            tx.commit().map_err(io)
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }
}

/// A snapshot as kept on disk.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Replica>,
    data: Vec<u8>,
}

/// The state machine: the control state, what of the log it reflects, and who hears of it.
#[derive(Clone)]
pub(crate) struct Machine {
    pub(crate) db: Arc<Database>,
    pub(crate) state: Arc<RwLock<ControlState>>,
    applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Replica>,
    /// The index of the last entry applied, for readers that wait for a change.
    pub(crate) changed: Arc<watch::Sender<u64>>,
    /// Per job someone waits on, the index of the entry that last changed it.
    pub(crate) watchers: Watchers,
}

/// Per job, the sender of its changes (while someone listens).
pub(crate) type Watchers =
    Arc<parking_lot::Mutex<std::collections::HashMap<String, watch::Sender<u64>>>>;

impl Machine {
    /// The state machine of `db`, from its snapshot if it has one.
    pub(crate) fn open(db: Arc<Database>) -> std::result::Result<Machine, std::io::Error> {
        let mut m = Machine {
            db,
            state: Arc::default(),
            applied: None,
            membership: StoredMembership::default(),
            changed: Arc::new(watch::channel(0).0),
            watchers: Watchers::default(),
        };
        if let Some(s) = meta_get::<StoredSnapshot>(&m.db, "snapshot")? {
            m.load(&s)?;
        }
        Ok(m)
    }

    fn load(&mut self, s: &StoredSnapshot) -> std::result::Result<(), std::io::Error> {
        let state: ControlState = decode(&s.data)?;
        *self.state.write() = state;
        self.applied = s.meta.last_log_id;
        self.membership = s.meta.last_membership.clone();
        self.changed
            .send_replace(self.applied.map_or(0, |l| l.index));
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for Machine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        let data =
            encode(&*self.state.read()).map_err(|e| StorageIOError::read_state_machine(&e))?;
        let id = match self.applied {
            Some(l) => format!("{}-{}", l.leader_id, l.index),
            None => "empty".into(),
        };
        let meta = SnapshotMeta {
            last_log_id: self.applied,
            last_membership: self.membership.clone(),
            snapshot_id: id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        let db = self.db.clone();
        blocking(move || meta_put(&db, "snapshot", &stored))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for Machine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Replica>)> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let mut touched = Vec::new();
        {
            let mut state = self.state.write();
            for e in entries {
                self.applied = Some(e.log_id);
                out.push(match e.payload {
                    EntryPayload::Blank => Applied::Done,
                    EntryPayload::Normal(c) => {
                        touched.push((c.job().to_owned(), e.log_id.index));
                        state.apply(e.log_id.index, c)
                    }
                    EntryPayload::Membership(m) => {
                        self.membership = StoredMembership::new(Some(e.log_id), m);
                        Applied::Done
                    }
                });
            }
        }
        self.changed
            .send_replace(self.applied.map_or(0, |l| l.index));
        if !touched.is_empty() {
            let mut w = self.watchers.lock();
            if !w.is_empty() {
                for (job, index) in touched {
                    if let Some(tx) = w.get(&job) {
                        if tx.receiver_count() == 0 {
                            w.remove(&job);
                        } else {
                            tx.send_replace(index);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Replica>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        };
        self.load(&stored)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let db = self.db.clone();
        blocking(move || meta_put(&db, "snapshot", &stored))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e).into())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        let db = self.db.clone();
        let stored = blocking(move || meta_get::<StoredSnapshot>(&db, "snapshot"))
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
