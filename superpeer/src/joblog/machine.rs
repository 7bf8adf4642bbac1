//! The job log's state machine: the control state in memory, rebuilt at start from the
//! snapshot and the committed entries after it, and its snapshots on disk.

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
    StoredMembership,
};
use parking_lot::RwLock;
use redb::Database;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::state::{Applied, ControlState};
use super::store::{Result, blocking, decode, encode, meta_get, meta_put};
use super::{NodeId, Replica, TypeConfig};
use crate::proto::JobId;

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
    Arc<parking_lot::Mutex<std::collections::HashMap<JobId, watch::Sender<u64>>>>;

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
                        let index = e.log_id.index;
                        touched.extend(c.jobs().into_iter().map(|j| (j.to_owned(), index)));
                        state.apply(index, c)
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
