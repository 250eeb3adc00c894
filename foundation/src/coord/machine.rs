//! The consensus group's state machine: the locks, the last entry applied and the group's membership. It lives in
//! memory; its snapshots go to `consensus.db`, and a worker that starts loads the latest one, then openraft applies
//! the committed entries after it.

#![allow(clippy::result_large_err, reason = "openraft's storage traits return its StorageError")]

use std::io::Cursor;
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use thingport_protocol::peer::LockOutcome;
use tokio::sync::watch;

use super::locks::Locks;
use super::log::Db;
use super::{NodeId, TypeConfig};

type Result<T> = std::result::Result<T, StorageError<NodeId>>;

/// Entries between sweeps of the leases that ran out.
const SWEEP_EVERY: u64 = 1_024;

/// What the machine holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
    pub locks: Locks,
}

/// The latest snapshot as `consensus.db` keeps it.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// The state machine, shared by openraft and the readers of locks.
#[derive(Debug, Clone)]
pub struct Machine {
    pub state: Arc<RwLock<State>>,
    db: Db,
    /// The index of the last entry applied, for waiters.
    applied: Arc<watch::Sender<u64>>,
    /// Held while a snapshot is compared with the stored one and written: openraft builds snapshots on a task of
    /// their own, and a slow build must not replace a newer snapshot installed meanwhile (the log before it is gone).
    snapshots: Arc<tokio::sync::Mutex<()>>,
}

impl Machine {
    /// The machine as the latest snapshot in `db` left it.
    pub async fn open(db: Db) -> Result<Machine> {
        let stored: Option<Stored> = db.meta("snapshot").await?;
        let state = match &stored {
            Some(s) => postcard::from_bytes::<State>(&s.data).map_err(|e| {
                StorageIOError::<NodeId>::read_snapshot(Some(s.meta.signature()), &e)
            })?,
            None => State::default(),
        };
        let index = state.last_applied.map_or(0, |l| l.index);
        Ok(Machine {
            state: Arc::new(RwLock::new(state)),
            db,
            applied: Arc::new(watch::channel(index).0),
            snapshots: Arc::default(),
        })
    }

    /// The index of the last entry applied, as it changes.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Stores `snapshot` unless the stored one is as new or newer; returns whether it stored it.
    async fn keep(&self, snapshot: &Stored) -> Result<bool> {
        let _one = self.snapshots.lock().await;
        let stored: Option<Stored> = self.db.meta("snapshot").await?;
        if stored.is_some_and(|s| s.meta.last_log_id >= snapshot.meta.last_log_id) {
            return Ok(false);
        }
        self.db.set_meta("snapshot", snapshot).await?;
        Ok(true)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for Machine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        let (data, meta) = {
            let state = self.read();
            let data = postcard::to_stdvec(&*state)
                .map_err(|e| StorageIOError::<NodeId>::write_snapshot(None, &e))?;
            let id = state
                .last_applied
                .map_or_else(|| "0-0".to_string(), |l| format!("{}-{}", l.leader_id, l.index));
            let meta = SnapshotMeta {
                last_log_id: state.last_applied,
                last_membership: state.membership.clone(),
                snapshot_id: id,
            };
            (data, meta)
        };
        self.keep(&Stored { meta: meta.clone(), data: data.clone() }).await?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for Machine {
    type SnapshotBuilder = Machine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        let state = self.read();
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<LockOutcome>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut outcomes = Vec::new();
        let last = {
            let mut state = self.write();
            for entry in entries {
                state.last_applied = Some(entry.log_id);
                outcomes.push(match entry.payload {
                    EntryPayload::Blank => LockOutcome::Free,
                    EntryPayload::Normal(ref stamped) => {
                        state.locks.apply(entry.log_id.index, stamped)
                    }
                    EntryPayload::Membership(ref m) => {
                        state.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                        LockOutcome::Free
                    }
                });
                // every member drops the leases that ran out at the same entries, so all hold the same locks
                if entry.log_id.index % SWEEP_EVERY == 0 {
                    state.locks.sweep();
                }
            }
            state.last_applied.map_or(0, |l| l.index)
        };
        self.applied.send_replace(last);
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Machine {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        let data = snapshot.into_inner();
        let mut state: State = postcard::from_bytes(&data)
            .map_err(|e| StorageIOError::<NodeId>::read_snapshot(Some(meta.signature()), &e))?;
        state.last_applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        self.keep(&Stored { meta: meta.clone(), data }).await?;
        let index = state.last_applied.map_or(0, |l| l.index);
        *self.write() = state;
        self.applied.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        let stored: Option<Stored> = self.db.meta("snapshot").await?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}
