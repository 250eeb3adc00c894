//! The consensus group's log, vote and latest snapshot, in a SQLite file of the worker's data directory
//! (`consensus.db`), written with `synchronous = FULL`: Raft may count a vote or an entry only once it is on disk.

#![allow(clippy::result_large_err, reason = "openraft's storage traits return its StorageError")]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, RaftLogId, RaftLogReader, StorageError, StorageIOError, Vote};
use rusqlite::{Connection, OptionalExtension, params};

use super::{NodeId, TypeConfig};

/// The file's schema (`PRAGMA user_version` 1).
const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS log (idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
";

/// The open file; shared by the log, its readers and the state machine's snapshots.
#[derive(Debug, Clone)]
pub struct Db(Arc<Mutex<Connection>>);

type Result<T> = std::result::Result<T, StorageError<NodeId>>;

impl Db {
    /// Opens (creating) `dir/consensus.db`.
    pub fn open(dir: &Path) -> anyhow::Result<Db> {
        std::fs::create_dir_all(dir)?;
        let conn = Connection::open(dir.join("consensus.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        anyhow::ensure!(
            version <= 1,
            "consensus.db has schema {version}, newer than this worker knows (1)"
        );
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", 1)?;
        Ok(Db(Arc::new(Mutex::new(conn))))
    }

    /// Runs `f` on the connection on a blocking thread.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
        error: fn(&rusqlite::Error) -> StorageIOError<NodeId>,
    ) -> Result<T> {
        let db = self.0.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut conn = db.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut conn)
        })
        .await;
        match done {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(error(&e).into()),
            Err(e) => Err(StorageIOError::<NodeId>::write(&e).into()),
        }
    }

    /// A value of `meta`, decoded.
    pub async fn meta<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>> {
        let raw = self
            .run(
                move |c| {
                    c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
                        r.get::<_, Vec<u8>>(0)
                    })
                    .optional()
                },
                |e| StorageIOError::read(e),
            )
            .await?;
        raw.map(|raw| {
            postcard::from_bytes(&raw).map_err(|e| StorageIOError::<NodeId>::read(&e).into())
        })
        .transpose()
    }

    /// Sets a value of `meta`, on disk when this returns.
    pub async fn set_meta<T: serde::Serialize>(&self, key: &'static str, value: &T) -> Result<()> {
        let raw = postcard::to_stdvec(value).map_err(|e| StorageIOError::<NodeId>::write(&e))?;
        self.run(
            move |c| {
                c.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                    params![key, raw],
                )
                .map(drop)
            },
            |e| StorageIOError::write(e),
        )
        .await
    }
}

/// The log as openraft reads and writes it.
#[derive(Debug, Clone)]
pub struct Log {
    db: Db,
}

impl Log {
    pub fn new(db: Db) -> Log {
        Log { db }
    }
}

fn bounds(range: impl RangeBounds<u64>) -> (i64, i64) {
    let start = match range.start_bound() {
        Bound::Included(&i) => i,
        Bound::Excluded(&i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&i) => i,
        Bound::Excluded(&i) => i.saturating_sub(1),
        Bound::Unbounded => i64::MAX as u64,
    };
    (start.min(i64::MAX as u64) as i64, end.min(i64::MAX as u64) as i64)
}

fn decode(raw: &[u8]) -> rusqlite::Result<Entry<TypeConfig>> {
    postcard::from_bytes(raw).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

impl RaftLogReader<TypeConfig> for Log {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let (start, end) = bounds(range);
        self.db
            .run(
                move |c| {
                    let mut statement = c.prepare_cached(
                        "SELECT entry FROM log WHERE idx BETWEEN ?1 AND ?2 ORDER BY idx",
                    )?;
                    let rows = statement.query_map([start, end], |r| r.get::<_, Vec<u8>>(0))?;
                    rows.map(|raw| decode(&raw?)).collect()
                },
                |e| StorageIOError::read_logs(e),
            )
            .await
    }
}

impl RaftLogStorage<TypeConfig> for Log {
    type LogReader = Log;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let last_purged: Option<LogId<NodeId>> = self.db.meta("purged").await?;
        let last = self
            .db
            .run(
                |c| {
                    c.query_row("SELECT entry FROM log ORDER BY idx DESC LIMIT 1", [], |r| {
                        r.get::<_, Vec<u8>>(0)
                    })
                    .optional()?
                    .map(|raw| decode(&raw))
                    .transpose()
                },
                |e| StorageIOError::read_logs(e),
            )
            .await?;
        let last_log_id = last.map(|e| *e.get_log_id()).or(last_purged);
        Ok(LogState { last_purged_log_id: last_purged, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Log {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<()> {
        self.db.set_meta("vote", vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>> {
        self.db.meta("vote").await
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<()> {
        self.db.set_meta("committed", &committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>> {
        Ok(self.db.meta::<Option<LogId<NodeId>>>("committed").await?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut rows = Vec::new();
        for entry in entries {
            let raw = postcard::to_stdvec(&entry)
                .map_err(|e| StorageIOError::<NodeId>::write_logs(&e))?;
            rows.push((entry.get_log_id().index as i64, raw));
        }
        let written = self
            .db
            .run(
                move |c| {
                    let tx = c.transaction()?;
                    {
                        let mut insert = tx.prepare_cached(
                            "INSERT OR REPLACE INTO log (idx, entry) VALUES (?1, ?2)",
                        )?;
                        for (idx, raw) in &rows {
                            insert.execute(params![idx, raw])?;
                        }
                    }
                    tx.commit()
                },
                |e| StorageIOError::write_logs(e),
            )
            .await;
        match written {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        let from = log_id.index as i64;
        self.db
            .run(
                move |c| c.execute("DELETE FROM log WHERE idx >= ?1", [from]).map(drop),
                |e| StorageIOError::write_logs(e),
            )
            .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        self.db.set_meta("purged", &log_id).await?;
        let to = log_id.index as i64;
        self.db
            .run(
                move |c| c.execute("DELETE FROM log WHERE idx <= ?1", [to]).map(drop),
                |e| StorageIOError::write_logs(e),
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};
    use openraft::{AnyError, StorageError, StorageIOError};
    use tempfile::TempDir;

    use super::{Db, Log};
    use crate::coord::machine::Machine;
    use crate::coord::{NodeId, TypeConfig};

    /// A fresh `consensus.db` in a directory of its own.
    struct Fresh;

    impl StoreBuilder<TypeConfig, Log, Machine, TempDir> for Fresh {
        async fn build(&self) -> Result<(TempDir, Log, Machine), StorageError<NodeId>> {
            let failed =
                |e: String| StorageError::from(StorageIOError::<NodeId>::write(AnyError::error(e)));
            let dir = tempfile::tempdir().map_err(|e| failed(e.to_string()))?;
            let db = Db::open(dir.path()).map_err(|e| failed(e.to_string()))?;
            let machine = Machine::open(db.clone()).await?;
            Ok((dir, Log::new(db), machine))
        }
    }

    /// openraft's own checks of a log store and a state machine: log state after appends, truncation and purges,
    /// votes, committed ids, membership from the log and from snapshots, snapshot building and installing.
    #[test]
    fn the_log_and_the_state_machine_pass_openraft_storage_suite() {
        Suite::test_all(Fresh).unwrap();
    }
}
