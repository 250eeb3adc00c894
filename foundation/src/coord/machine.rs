//! The consensus group's state machine: the locks, the partition table, the last entry applied and the group's
//! membership. It lives in memory; its snapshots go to `consensus.db`, and a worker that starts loads the latest one,
//! then openraft applies the committed entries after it.

#![allow(clippy::result_large_err, reason = "openraft's storage traits return its StorageError")]

use std::io::Cursor;
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use thingport_protocol::peer::{LockCommand, LockOutcome, TableRecord};
use tokio::sync::watch;

use super::locks::{Locks, Stamped};
use super::log::Db;
use super::{NodeId, TypeConfig};

type Result<T> = std::result::Result<T, StorageError<NodeId>>;

/// Entries between sweeps of the leases that ran out.
const SWEEP_EVERY: u64 = 1_024;

/// A command of the consensus log, stamped with the clock of the leader that proposed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logged {
    pub now_ms: u64,
    pub command: Command,
}

/// What a log entry does. The first three variants are [`LockCommand`]'s, in its order and with its fields, so an
/// entry written before tables went through the log (a [`Stamped`] lock command) reads as the same command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Acquire {
        name: String,
        holder: String,
        ttl_ms: u64,
    },
    Renew {
        name: String,
        token: u64,
        ttl_ms: u64,
    },
    Release {
        name: String,
        token: u64,
    },
    /// Commits the partition table, if it is newer than the one committed: only one table of each version ever
    /// commits, however many workers believe they coordinate.
    Table(TableRecord),
}

impl From<LockCommand> for Command {
    fn from(command: LockCommand) -> Command {
        match command {
            LockCommand::Acquire { name, holder, ttl_ms } => {
                Command::Acquire { name, holder, ttl_ms }
            }
            LockCommand::Renew { name, token, ttl_ms } => Command::Renew { name, token, ttl_ms },
            LockCommand::Release { name, token } => Command::Release { name, token },
        }
    }
}

impl Command {
    /// The lock operation, or the table.
    fn into_lock(self) -> std::result::Result<LockCommand, TableRecord> {
        match self {
            Command::Acquire { name, holder, ttl_ms } => {
                Ok(LockCommand::Acquire { name, holder, ttl_ms })
            }
            Command::Renew { name, token, ttl_ms } => {
                Ok(LockCommand::Renew { name, token, ttl_ms })
            }
            Command::Release { name, token } => Ok(LockCommand::Release { name, token }),
            Command::Table(table) => Err(table),
        }
    }
}

/// What applying an entry did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    Lock(LockOutcome),
    /// Whether the table committed (it was newer than the committed one).
    Table {
        committed: bool,
    },
    /// A blank or membership entry.
    Nothing,
}

/// What the machine holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
    pub locks: Locks,
    /// The partition table last committed through the log.
    pub table: Option<TableRecord>,
}

/// [`State`] as snapshots before tables went through the log hold it.
#[derive(Deserialize)]
struct StateWithoutTable {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    locks: Locks,
}

impl State {
    /// A snapshot's state, from this version or an earlier one.
    fn decode(data: &[u8]) -> std::result::Result<State, postcard::Error> {
        postcard::from_bytes::<State>(data).or_else(|e| {
            let old: StateWithoutTable = postcard::from_bytes(data).map_err(|_| e)?;
            Ok(State {
                last_applied: old.last_applied,
                membership: old.membership,
                locks: old.locks,
                table: None,
            })
        })
    }
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
    /// The committed table, for the ring.
    table: Arc<watch::Sender<Option<TableRecord>>>,
    /// Held while a snapshot is compared with the stored one and written: openraft builds snapshots on a task of
    /// their own, and a slow build must not replace a newer snapshot installed meanwhile (the log before it is gone).
    snapshots: Arc<tokio::sync::Mutex<()>>,
}

impl Machine {
    /// The machine as the latest snapshot in `db` left it.
    pub async fn open(db: Db) -> Result<Machine> {
        let stored: Option<Stored> = db.meta("snapshot").await?;
        let state = match &stored {
            Some(s) => State::decode(&s.data).map_err(|e| {
                StorageIOError::<NodeId>::read_snapshot(Some(s.meta.signature()), &e)
            })?,
            None => State::default(),
        };
        let index = state.last_applied.map_or(0, |l| l.index);
        let table = state.table.clone();
        Ok(Machine {
            state: Arc::new(RwLock::new(state)),
            db,
            applied: Arc::new(watch::channel(index).0),
            table: Arc::new(watch::channel(table).0),
            snapshots: Arc::default(),
        })
    }

    /// The index of the last entry applied, as it changes.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// The table committed through the log, as it changes.
    pub fn table(&self) -> watch::Receiver<Option<TableRecord>> {
        self.table.subscribe()
    }

    /// The table committed through the log, as this worker applied it.
    pub fn committed_table(&self) -> Option<TableRecord> {
        self.table.borrow().clone()
    }

    /// The version of that table (0 before the first).
    pub fn table_version(&self) -> u64 {
        self.table.borrow().as_ref().map_or(0, |t| t.version)
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

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut outcomes = Vec::new();
        let mut table = None;
        let last = {
            let mut state = self.write();
            for entry in entries {
                state.last_applied = Some(entry.log_id);
                outcomes.push(match entry.payload {
                    EntryPayload::Blank => Applied::Nothing,
                    EntryPayload::Normal(logged) => match logged.command.into_lock() {
                        Ok(command) => {
                            let stamped = Stamped { now_ms: logged.now_ms, command };
                            Applied::Lock(state.locks.apply(entry.log_id.index, &stamped))
                        }
                        Err(record) => {
                            let committed =
                                state.table.as_ref().is_none_or(|t| t.version < record.version);
                            if committed {
                                table = Some(record.clone());
                                state.table = Some(record);
                            }
                            Applied::Table { committed }
                        }
                    },
                    EntryPayload::Membership(m) => {
                        state.membership = StoredMembership::new(Some(entry.log_id), m);
                        Applied::Nothing
                    }
                });
                // every member drops the leases that ran out at the same entries, so all hold the same locks
                if entry.log_id.index % SWEEP_EVERY == 0 {
                    state.locks.sweep();
                }
            }
            state.last_applied.map_or(0, |l| l.index)
        };
        if table.is_some() {
            self.table.send_replace(table);
        }
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
        let mut state = State::decode(&data)
            .map_err(|e| StorageIOError::<NodeId>::read_snapshot(Some(meta.signature()), &e))?;
        state.last_applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        self.keep(&Stored { meta: meta.clone(), data }).await?;
        let index = state.last_applied.map_or(0, |l| l.index);
        let table = state.table.clone();
        *self.write() = state;
        if table.is_some() {
            self.table.send_replace(table);
        }
        self.applied.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        let stored: Option<Stored> = self.db.meta("snapshot").await?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, LogId};

    use super::*;

    fn table(version: u64, member: &str) -> TableRecord {
        TableRecord { version, replicas: 1, members: vec![member.into()], owners: vec![] }
    }

    fn entry(index: u64, command: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 7), index),
            payload: EntryPayload::Normal(Logged { now_ms: 1_000, command }),
        }
    }

    #[test]
    fn entries_written_before_tables_joined_the_log_read_as_the_same_lock_commands() {
        let commands = [
            LockCommand::Acquire { name: "job".into(), holder: "a".into(), ttl_ms: 500 },
            LockCommand::Renew { name: "job".into(), token: 9, ttl_ms: 500 },
            LockCommand::Release { name: "job".into(), token: 9 },
        ];
        for command in commands {
            let old =
                postcard::to_stdvec(&Stamped { now_ms: 42, command: command.clone() }).unwrap();
            let read: Logged = postcard::from_bytes(&old).unwrap();
            assert_eq!(read, Logged { now_ms: 42, command: Command::from(command) });
        }
    }

    #[tokio::test]
    async fn one_table_of_each_version_commits_and_only_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut machine = Machine::open(Db::open(dir.path()).unwrap()).await.unwrap();
        let mut watch = machine.table();
        let applied = machine
            .apply([
                entry(1, Command::Table(table(2, "a"))),
                // a second coordinator's table of the same version, and an older one
                entry(2, Command::Table(table(2, "b"))),
                entry(3, Command::Table(table(1, "c"))),
                entry(4, Command::Acquire { name: "l".into(), holder: "h".into(), ttl_ms: 10 }),
            ])
            .await
            .unwrap();
        let committed: Vec<Applied> =
            applied.into_iter().filter(|a| !matches!(a, Applied::Lock(_))).collect();
        assert_eq!(committed, [true, false, false].map(|committed| Applied::Table { committed }));
        assert!(watch.has_changed().unwrap());
        assert_eq!(watch.borrow_and_update().as_ref(), Some(&table(2, "a")));
        machine.apply([entry(5, Command::Table(table(3, "b")))]).await.unwrap();
        assert_eq!(watch.borrow().as_ref().map(|t| t.version), Some(3));

        // a snapshot keeps the table; one taken before tables joined the log reads with none
        let snapshot = machine.build_snapshot().await.unwrap();
        let state = State::decode(snapshot.snapshot.get_ref()).unwrap();
        assert_eq!(state.table, Some(table(3, "b")));
        #[derive(Serialize)]
        struct Old<'a> {
            last_applied: Option<LogId<NodeId>>,
            membership: &'a StoredMembership<NodeId, BasicNode>,
            locks: &'a Locks,
        }
        let old = postcard::to_stdvec(&Old {
            last_applied: state.last_applied,
            membership: &state.membership,
            locks: &state.locks,
        })
        .unwrap();
        let read = State::decode(&old).unwrap();
        assert_eq!((read.table, read.locks), (None, state.locks));
        drop(dir);
    }
}
