//! The embedded store: one SQLite file per worker (WAL mode), which an operator can open with `sqlite3`
//! (`docs/STORAGE.md` has the schema).
//!
//! One thread owns the connection that writes; queries run on a few reading connections beside it (WAL lets them
//! read while it writes). Writes are shaped for SQLite's page-level log:
//! - **The write path appends.** A batch of property values becomes one `journal` row per frame, numbered in
//!   arrival order, so a commit of many frames fills a few pages at the end of the table: that row is what a `disk`
//!   acknowledgement waits for. Writing each value into its property's value stream at once would dirty a page per
//!   value and property — several times slower with thousands of streams (`docs/BENCHMARKS.md`).
//! - **Compaction folds the journal** per thing, in small slices between batches: values join their property's
//!   chunks in `value_chunks` (up to [`CHUNK_BYTES`] of values of one property, spanning at most [`CHUNK_SPAN_MS`]),
//!   the newest value of each persisted property goes to `current_values`, and `fold_marks` records the last
//!   journal row folded. Which rows of each thing are not folded yet is kept in memory (rebuilt at open); folded rows
//!   are deleted from the oldest end of the journal, a range at a time.
//! - **Retention** runs in the same slices: chunks and events older than their stream's age limit, and beyond its
//!   count limit, are removed a stream at a time.
//! - A separate thread checkpoints the WAL into the database file so that the writer never waits for it.
//!
//! Reading a value stream merges its chunks with the thing's journal rows not yet folded; recovering a worker
//! loads `things`, `current_values` and replays the journal.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use thingport_protocol::peer::{
    EventRecord, HistoryQuery, PropertyDefinition, StreamPosition, TableRecord, ValueRecord,
};
use thingport_protocol::{ByteString, Limits, Quality, Value};
use tokio::sync::oneshot;

use super::codec::{self, JournalValue};
use super::{
    BoxFuture, Change, Provider, Retention, StorageError, StoredThing, ordered, unordered,
};
use crate::model::{Definition, PropertyState, ThingState, Version};

/// The file name of the store in the data directory.
pub const FILE_NAME: &str = "thingport.sqlite";
/// Most values in one chunk of a value stream.
pub const CHUNK_VALUES: usize = 512;
/// Most bytes of values in one chunk: a row of `value_chunks` stays inside its page (SQLite moves what is beyond
/// about a quarter of a 4 KiB page of an index-organized table to an overflow page of its own, mostly empty).
pub const CHUNK_BYTES: usize = 900;
/// Longest time one chunk spans, by device timestamp.
pub const CHUNK_SPAN_MS: u64 = 3_600_000;
/// A value stream's newest chunk takes in the next fold's values while it holds fewer bytes than this; otherwise
/// they start a new chunk (so a fold rewrites at most this much).
const MERGE_BELOW: usize = CHUNK_BYTES / 2;
/// Frames in the write-ahead log (4 KiB each) beyond which it is started again from the beginning.
const RESTART_FRAMES: i64 = 16_384;
/// How often the writer looks for journals to fold, rows to delete and streams to trim.
const SCAN_PERIOD: Duration = Duration::from_millis(20);
/// Folded journal rows deleted at most per slice.
const GC_ROWS: i64 = 20_000;
/// A thing's journal rows are folded once there are this many...
const COMPACT_ROWS: u32 = 64;
/// ...or once the oldest is this old (by default).
pub const COMPACT_AGE: Duration = Duration::from_secs(10);
/// A maintenance slice stops after this long, so a batch waiting behind it is not held up for more.
const SLICE: Duration = Duration::from_millis(3);
/// A retention pass over every stream starts at most this often (by default).
pub const RETENTION_PERIOD: Duration = Duration::from_secs(60);

/// The schema, by version (`PRAGMA user_version`). A store is migrated forward at open; a store of a newer
/// version than this release knows is refused.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE things (
    name TEXT PRIMARY KEY,
    partition INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    tags TEXT NOT NULL DEFAULT '[]',
    described_ms INTEGER NOT NULL DEFAULT 0,
    incarnations TEXT NOT NULL DEFAULT '[]'
) WITHOUT ROWID;
CREATE INDEX things_by_partition ON things (partition);
CREATE TABLE property_definitions (
    thing TEXT NOT NULL,
    property TEXT NOT NULL,
    kind TEXT,
    unit TEXT,
    persisted INTEGER NOT NULL,
    logged INTEGER NOT NULL,
    max_age_ms INTEGER,
    max_count INTEGER,
    defined_ms INTEGER NOT NULL,
    PRIMARY KEY (thing, property)
) WITHOUT ROWID;
CREATE TABLE current_values (
    thing TEXT NOT NULL,
    property TEXT NOT NULL,
    value,
    quality INTEGER NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    incarnation INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (thing, property)
) WITHOUT ROWID;
CREATE TABLE journal (
    id INTEGER PRIMARY KEY,
    thing TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    frame_values BLOB NOT NULL
);
CREATE TABLE fold_marks (
    thing TEXT PRIMARY KEY,
    id INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE value_chunks (
    thing TEXT NOT NULL,
    property TEXT NOT NULL,
    first_ms INTEGER NOT NULL,
    first_incarnation INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    last_ms INTEGER NOT NULL,
    count INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (thing, property, first_ms, first_incarnation, first_seq)
) WITHOUT ROWID;
CREATE TABLE events (
    thing TEXT NOT NULL,
    epoch_ms INTEGER NOT NULL,
    incarnation INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    name TEXT NOT NULL,
    payload,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (thing, epoch_ms, incarnation, seq)
) WITHOUT ROWID;
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
"#];

/// Settings of the embedded store.
#[derive(Debug, Clone)]
pub struct Options {
    /// The data directory; created if missing.
    pub dir: PathBuf,
    /// fsync at every commit (`synchronous = FULL`); otherwise only at checkpoints (`NORMAL`: a commit survives a
    /// crash of the process but maybe not of the machine).
    pub fsync: bool,
    pub retention: Retention,
    pub limits: Limits,
    /// Reading connections.
    pub readers: usize,
    /// How often a retention pass over every stream starts.
    pub retention_period: Duration,
    /// A thing's journal rows are folded once the oldest is this old (or there are 64).
    pub fold_after: Duration,
}

/// The embedded store of one worker.
#[derive(Debug)]
pub struct Sqlite {
    jobs: Mutex<std_mpsc::Sender<Job>>,
    readers: Arc<Readers>,
    limits: Limits,
}

#[derive(Debug)]
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    unfolded: Unfolded,
}

/// The journal rows of each thing not folded yet, shared by the writer and the readers. The writer adds a row's id
/// before its commit and removes a thing's ids after the commit that folded them, so a reader that takes the ids
/// first and then reads in one transaction finds every value either in those rows or in the chunks.
type Unfolded = Arc<Mutex<HashMap<ByteString, Pending>>>;

fn ids_of(unfolded: &Unfolded, thing: &str) -> Vec<i64> {
    unfolded
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(thing)
        .map(|p| p.ids.clone())
        .unwrap_or_default()
}

enum Job {
    Write(Arc<Vec<Change>>, oneshot::Sender<Result<(), StorageError>>),
}

fn sql_error(e: rusqlite::Error) -> StorageError {
    use rusqlite::ErrorCode as C;
    match e.sqlite_error_code() {
        Some(C::DatabaseCorrupt | C::NotADatabase) => StorageError::Corrupt(e.to_string()),
        _ => StorageError::Unavailable(e.to_string()),
    }
}

fn corrupt(e: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(e.to_string())
}

fn open_connection(path: &Path, create: bool, fsync: bool) -> rusqlite::Result<Connection> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", if fsync { "FULL" } else { "NORMAL" })?;
    // the checkpointer thread does it, so the writer never waits for it
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(None, "cache_size", -16_384)?;
    conn.pragma_update(None, "journal_size_limit", 64 << 20)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StorageError> {
    let version: i64 =
        conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(sql_error)?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StorageError::Unavailable(format!(
            "the store is of schema version {version}; this release knows up to {known}"
        )));
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction().map_err(sql_error)?;
        tx.execute_batch(migration).map_err(sql_error)?;
        tx.pragma_update(None, "user_version", i as i64 + 1).map_err(sql_error)?;
        tx.commit().map_err(sql_error)?;
        tracing::info!(version = i + 1, "store schema migrated");
    }
    Ok(())
}

impl Sqlite {
    /// Opens (creating if needed) the store in `options.dir` and starts its writer and checkpointer threads.
    pub fn open(options: Options) -> Result<Sqlite, StorageError> {
        std::fs::create_dir_all(&options.dir).map_err(|e| {
            StorageError::Unavailable(format!("data directory {}: {e}", options.dir.display()))
        })?;
        let path = options.dir.join(FILE_NAME);
        // SQLite says only "unable to open database file" of a directory it cannot write: ask the system first
        let probe = options.dir.join(".thingport-write-test");
        std::fs::write(&probe, b"").map_err(|e| {
            StorageError::Unavailable(format!("data directory {}: {e}", options.dir.display()))
        })?;
        let _ = std::fs::remove_file(&probe);
        let mut conn = open_connection(&path, true, options.fsync)
            .map_err(|e| StorageError::Unavailable(format!("{}: {e}", path.display())))?;
        // reading the schema is the first thing that fails on a damaged or foreign file
        migrate(&mut conn).map_err(|e| match e {
            StorageError::Corrupt(m) => StorageError::Corrupt(format!("{}: {m}", path.display())),
            other => other,
        })?;
        let unfolded: Unfolded = Arc::default();
        let writer = Writer::new(conn, path.clone(), options.clone(), unfolded.clone())?;
        let (tx, rx) = std_mpsc::channel();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StorageError::Unavailable(format!("starting the store writer: {e}")))?;
        let idle = (0..options.readers.max(1))
            .map(|_| open_connection(&path, false, options.fsync))
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(sql_error)?;
        let readers = Arc::new(Readers { path: path.clone(), idle: Mutex::new(idle), unfolded });
        let open = Arc::downgrade(&readers);
        let fsync = options.fsync;
        std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || checkpoint(&path, fsync, open))
            .map_err(|e| StorageError::Unavailable(format!("starting the checkpointer: {e}")))?;
        Ok(Sqlite { jobs: Mutex::new(tx), readers, limits: options.limits })
    }

    /// Runs `f` on a reading connection, off the async runtime.
    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StorageError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, StorageError>> {
        let readers = self.readers.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let conn = readers.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let conn = match conn {
                    Some(c) => c,
                    None => open_connection(&readers.path, false, false).map_err(sql_error)?,
                };
                let result = f(&conn);
                readers.idle.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
                result
            })
            .await
            .map_err(|e| StorageError::Unavailable(format!("store reader: {e}")))?
        })
    }
}

/// Checkpoints the WAL into the database file in the background, while the store is open.
fn checkpoint(path: &Path, fsync: bool, open: std::sync::Weak<Readers>) {
    let Ok(conn) = open_connection(path, false, fsync) else { return };
    while open.strong_count() > 0 {
        std::thread::sleep(Duration::from_millis(250));
        // copies what it can without waiting for the writer (busy, frames in the log, frames copied)
        let frames: rusqlite::Result<(i64, i64, i64)> =
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            });
        // under steady writes the log is never all copied when the writer looks, so it would only grow: once it is
        // large and nearly all copied, start it again from the beginning. That waits for the writer's current
        // commit and copies the few frames left, a short pause (`journal_size_limit` then trims the file).
        if let Ok((_, log, done)) = frames
            && log > RESTART_FRAMES
            && log - done < 2_048
        {
            let _ = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()));
        }
    }
}

/// Journal rows of a thing not yet folded.
#[derive(Debug, Clone)]
struct Pending {
    ids: Vec<i64>,
    oldest: Instant,
}

struct Writer {
    conn: Connection,
    path: PathBuf,
    options: Options,
    unfolded: Unfolded,
    next_id: i64,
    /// Journal rows below this are deleted.
    gc_from: i64,
    /// When the journals were last looked over for folding.
    last_scan: Instant,
    /// Where the retention pass is: the last stream swept, and when the pass started.
    sweep: Option<(String, String)>,
    sweep_events: Option<String>,
    pass_started: Option<Instant>,
}

impl Writer {
    fn new(
        conn: Connection,
        path: PathBuf,
        options: Options,
        unfolded: Unfolded,
    ) -> Result<Writer, StorageError> {
        let (gc_from, next_id): (i64, i64) = conn
            .query_row(
                // numbers only grow, also across an empty journal: a fold mark may name the highest
                "SELECT COALESCE((SELECT MIN(id) FROM journal), 1),
                        MAX(COALESCE((SELECT MAX(id) FROM journal), 0), COALESCE((SELECT MAX(id) FROM fold_marks), 0)) + 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(sql_error)?;
        {
            let mut pending = unfolded.lock().unwrap_or_else(|e| e.into_inner());
            let mut stmt = conn
                .prepare(
                    "SELECT j.thing, j.id FROM journal j LEFT JOIN fold_marks m ON m.thing = j.thing
                     WHERE m.id IS NULL OR j.id > m.id ORDER BY j.id",
                )
                .map_err(sql_error)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(sql_error)?;
            // folded at the first slice
            let oldest =
                Instant::now().checked_sub(options.fold_after).unwrap_or_else(Instant::now);
            for row in rows {
                let (thing, id) = row.map_err(sql_error)?;
                pending
                    .entry(ByteString::from(thing))
                    .or_insert(Pending { ids: Vec::new(), oldest })
                    .ids
                    .push(id);
            }
        }
        Ok(Writer {
            conn,
            path,
            options,
            unfolded,
            next_id,
            gc_from,
            last_scan: Instant::now(),
            sweep: None,
            sweep_events: None,
            pass_started: None,
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<ByteString, Pending>> {
        self.unfolded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Folds a thing inside the writer's transaction; returns the ids folded (to forget after the commit).
    fn fold_thing(
        &self,
        tx: &rusqlite::Transaction<'_>,
        thing: &ByteString,
    ) -> Result<Vec<i64>, StorageError> {
        let ids = ids_of(&self.unfolded, thing);
        fold(tx, thing, &ids)?;
        Ok(ids)
    }

    /// Forgets the folded rows of each thing (after their fold committed).
    fn forget(&self, folded: Vec<(ByteString, Vec<i64>)>) {
        let mut pending = self.pending();
        for (thing, ids) in folded {
            if let Some(p) = pending.get_mut(&thing) {
                p.ids.retain(|id| !ids.contains(id));
                if p.ids.is_empty() {
                    pending.remove(&thing);
                }
            }
        }
    }

    fn run(mut self, jobs: std_mpsc::Receiver<Job>) {
        loop {
            match jobs.recv_timeout(Duration::from_millis(50)) {
                Ok(Job::Write(batch, reply)) => {
                    let result = self.write(&batch);
                    if result.is_err() {
                        // start the next attempt on a fresh connection
                        if let Ok(conn) = open_connection(&self.path, false, self.options.fsync) {
                            self.conn = conn;
                        }
                    }
                    let _ = reply.send(result);
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
            if let Err(e) = self.maintain() {
                tracing::warn!(error = %e, "store maintenance failed; retrying later");
            }
        }
    }

    /// Writes a batch in one transaction; the in-memory bookkeeping changes only once it committed.
    fn write(&mut self, batch: &[Change]) -> Result<(), StorageError> {
        let started = Instant::now();
        let tx = self.conn.unchecked_transaction().map_err(sql_error)?;
        let mut journaled: Vec<(ByteString, i64)> = Vec::new();
        let mut folded: Vec<(ByteString, Vec<i64>)> = Vec::new();
        let mut next_id = self.next_id;
        let result = self.write_in(&tx, batch, &mut journaled, &mut folded, &mut next_id);
        let result = result.and_then(|()| tx.commit().map_err(sql_error));
        if let Err(e) = result {
            // the rows journaled by this batch are not there
            self.forget(journaled.into_iter().map(|(t, id)| (t, vec![id])).collect());
            return Err(e);
        }
        self.next_id = next_id;
        self.forget(folded);
        ::metrics::histogram!(crate::telemetry::STORAGE_WRITE_SECONDS, "store" => "sqlite")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    fn write_in(
        &self,
        tx: &rusqlite::Transaction<'_>,
        batch: &[Change],
        journaled: &mut Vec<(ByteString, i64)>,
        folded: &mut Vec<(ByteString, Vec<i64>)>,
        next_id: &mut i64,
    ) -> Result<(), StorageError> {
        for change in batch {
            match change {
                Change::Thing(thing) => write_thing(tx, thing)?,
                Change::Values { thing, values } => {
                    let kept: Vec<_> =
                        values.iter().filter(|v| v.current || v.logged).cloned().collect();
                    if kept.is_empty() {
                        continue;
                    }
                    let id = *next_id;
                    tx.prepare_cached(
                        "INSERT INTO journal (id, thing, received_ms, frame_values) VALUES (?1, ?2, ?3, ?4)",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            id,
                            &**thing,
                            kept[0].received_ms as i64,
                            codec::encode_values(&kept)
                        ])
                    })
                    .map_err(sql_error)?;
                    *next_id += 1;
                    // known to readers before the commit: until then the row is simply not found
                    self.pending()
                        .entry(thing.clone())
                        .or_insert_with(|| Pending { ids: Vec::new(), oldest: Instant::now() })
                        .ids
                        .push(id);
                    journaled.push((thing.clone(), id));
                }
                Change::Event { thing, event, payload } => {
                    tx.prepare_cached(
                        "INSERT OR IGNORE INTO events (thing, epoch_ms, incarnation, seq, timestamp_ms, name, payload, received_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            &**thing,
                            event.epoch_ms as i64,
                            ordered(event.incarnation),
                            event.seq as i64,
                            event.timestamp_ms as i64,
                            event.name,
                            SqlStored(payload),
                            event.received_ms as i64
                        ])
                    })
                    .map_err(sql_error)?;
                }
                Change::Remove { thing, property } => {
                    folded.push((thing.clone(), self.fold_thing(tx, thing)?));
                    remove(tx, thing, property.as_deref())?;
                }
                Change::DropPartition(partition) => {
                    let things: Vec<String> = tx
                        .prepare_cached("SELECT name FROM things WHERE partition = ?1")
                        .and_then(|mut s| s.query_map([*partition as i64], |r| r.get(0))?.collect())
                        .map_err(sql_error)?;
                    for name in things {
                        let name = ByteString::from(name);
                        folded.push((name.clone(), self.fold_thing(tx, &name)?));
                        for sql in [
                            "DELETE FROM things WHERE name = ?1",
                            "DELETE FROM property_definitions WHERE thing = ?1",
                            "DELETE FROM current_values WHERE thing = ?1",
                        ] {
                            tx.execute(sql, [&*name]).map_err(sql_error)?;
                        }
                    }
                }
                Change::Table(table) => {
                    let bytes = postcard::to_stdvec(table).map_err(corrupt)?;
                    tx.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES ('partition_table', ?1)",
                        [bytes],
                    )
                    .map_err(sql_error)?;
                }
            }
        }
        Ok(())
    }

    /// One slice of background work: fold the journals that are due, delete folded journal rows, then a step of
    /// retention.
    fn maintain(&mut self) -> Result<(), StorageError> {
        let started = Instant::now();
        let now = Instant::now();
        // looking over every thing's journal costs as much as a small commit: not after every one
        if now.duration_since(self.last_scan) < SCAN_PERIOD {
            return Ok(());
        }
        self.last_scan = now;
        let mut due: Vec<(ByteString, Instant)> = self
            .pending()
            .iter()
            .filter(|(_, p)| {
                p.ids.len() >= COMPACT_ROWS as usize || now - p.oldest >= self.options.fold_after
            })
            .map(|(t, p)| (t.clone(), p.oldest))
            .collect();
        if !due.is_empty() {
            due.sort_by_key(|(_, oldest)| *oldest);
            let tx = self.conn.unchecked_transaction().map_err(sql_error)?;
            let mut done = Vec::new();
            for (thing, _) in due {
                done.push((thing.clone(), self.fold_thing(&tx, &thing)?));
                if started.elapsed() >= SLICE {
                    break;
                }
            }
            tx.commit().map_err(sql_error)?;
            ::metrics::counter!(crate::telemetry::STORAGE_JOURNAL_FOLDS_TOTAL)
                .increment(done.len() as u64);
            self.forget(done);
        }
        // every row below the oldest unfolded one is folded
        let low = self
            .pending()
            .values()
            .filter_map(|p| p.ids.first().copied())
            .min()
            .unwrap_or(self.next_id);
        if self.gc_from < low && started.elapsed() < SLICE {
            let upto = low.min(self.gc_from + GC_ROWS);
            self.conn
                .execute("DELETE FROM journal WHERE id >= ?1 AND id < ?2", [self.gc_from, upto])
                .map_err(sql_error)?;
            self.gc_from = upto;
        }
        if started.elapsed() < SLICE {
            self.retention_step(started)?;
        }
        Ok(())
    }

    /// Applies retention to a few streams, continuing where the last step stopped.
    fn retention_step(&mut self, started: Instant) -> Result<(), StorageError> {
        if self.sweep.is_none()
            && self.sweep_events.is_none()
            && self.pass_started.is_some_and(|t| t.elapsed() < self.options.retention_period)
        {
            return Ok(());
        }
        if self.sweep.is_none() && self.sweep_events.is_none() {
            self.pass_started = Some(Instant::now());
            self.sweep = Some((String::new(), String::new()));
        }
        let now_ms = crate::links::now_ms();
        let defaults = self.options.retention;
        let tx = self.conn.unchecked_transaction().map_err(sql_error)?;
        let mut removed = 0u64;
        if let Some((thing, property)) = self.sweep.clone() {
            let streams: Vec<(String, String)> = tx
                .prepare_cached(
                    "SELECT DISTINCT thing, property FROM value_chunks WHERE (thing, property) > (?1, ?2)
                     ORDER BY thing, property LIMIT 16",
                )
                .and_then(|mut s| {
                    s.query_map([thing, property], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
                })
                .map_err(sql_error)?;
            self.sweep = streams.last().cloned();
            if self.sweep.is_none() {
                self.sweep_events = Some(String::new());
            }
            for (thing, property) in streams {
                let definition = definition_of(&tx, &thing, &property)?;
                let max_age = definition
                    .as_ref()
                    .and_then(|d| d.max_age_ms)
                    .unwrap_or(defaults.max_age.as_millis() as u64);
                let max_count =
                    definition.as_ref().and_then(|d| d.max_count).unwrap_or(defaults.max_values);
                removed += trim_stream(&tx, &thing, &property, now_ms, max_age, max_count)?;
                if started.elapsed() >= SLICE {
                    break;
                }
            }
        } else if let Some(after) = self.sweep_events.clone() {
            let things: Vec<String> = tx
                .prepare_cached(
                    "SELECT DISTINCT thing FROM events WHERE thing > ?1 ORDER BY thing LIMIT 16",
                )
                .and_then(|mut s| s.query_map([after], |r| r.get(0))?.collect())
                .map_err(sql_error)?;
            self.sweep_events = things.last().cloned();
            let max_age = defaults.max_age.as_millis() as u64;
            for thing in things {
                if max_age > 0 {
                    removed += tx
                        .execute(
                            "DELETE FROM events WHERE thing = ?1 AND timestamp_ms < ?2",
                            params![thing, now_ms.saturating_sub(max_age) as i64],
                        )
                        .map_err(sql_error)? as u64;
                }
                if defaults.max_events > 0 {
                    removed += tx
                        .execute(
                            "DELETE FROM events WHERE thing = ?1 AND (epoch_ms, incarnation, seq) <
                             (SELECT epoch_ms, incarnation, seq FROM events WHERE thing = ?1
                              ORDER BY epoch_ms DESC, incarnation DESC, seq DESC LIMIT 1 OFFSET ?2)",
                            params![thing, defaults.max_events as i64 - 1],
                        )
                        .map_err(sql_error)? as u64;
                }
            }
        }
        tx.commit().map_err(sql_error)?;
        if removed > 0 {
            ::metrics::counter!(crate::telemetry::STORAGE_RETENTION_REMOVED_TOTAL)
                .increment(removed);
        }
        Ok(())
    }
}

/// A value as SQLite stores it: integers, finite-or-infinite floats, strings and null as themselves (readable with
/// `sqlite3`); everything else (booleans, bytes, lists, maps, NaN) as its device encoding in a BLOB.
struct SqlStored<'a>(&'a Value);

impl rusqlite::ToSql for SqlStored<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            Value::Null => ToSqlOutput::Owned(SqlValue::Null),
            Value::Int(i) => ToSqlOutput::Owned(SqlValue::Integer(*i)),
            Value::Float(f) if !f.is_nan() => ToSqlOutput::Owned(SqlValue::Real(*f)),
            Value::String(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            other => {
                let mut encoded = Vec::with_capacity(other.encoded_len());
                other.encode(&mut encoded);
                ToSqlOutput::Owned(SqlValue::Blob(encoded))
            }
        })
    }
}

fn stored_value(v: ValueRef<'_>, limits: &Limits) -> Result<Value, StorageError> {
    Ok(match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(f) => Value::Float(f),
        ValueRef::Text(t) => {
            Value::String(ByteString::try_from(Bytes::copy_from_slice(t)).map_err(corrupt)?)
        }
        ValueRef::Blob(b) => Value::decode(Bytes::copy_from_slice(b), limits).map_err(corrupt)?,
    })
}

fn encoded(value: &Value) -> Bytes {
    let mut buf = Vec::with_capacity(value.encoded_len());
    value.encode(&mut buf);
    Bytes::from(buf)
}

fn write_thing(tx: &rusqlite::Transaction<'_>, thing: &StoredThing) -> Result<(), StorageError> {
    let tags = serde_json::to_string(&thing.tags).map_err(corrupt)?;
    let incarnations = serde_json::to_string(
        &thing.incarnations.iter().map(|&(i, e)| (i.to_string(), e)).collect::<Vec<_>>(),
    )
    .map_err(corrupt)?;
    tx.prepare_cached(
        "INSERT OR REPLACE INTO things (name, partition, created_ms, description, tags, described_ms, incarnations)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut s| {
        s.execute(params![
            &*thing.name,
            thing.partition as i64,
            thing.created_ms as i64,
            thing.description,
            tags,
            thing.described_ms as i64,
            incarnations
        ])
    })
    .map_err(sql_error)?;
    tx.prepare_cached("DELETE FROM property_definitions WHERE thing = ?1")
        .and_then(|mut s| s.execute([&*thing.name]))
        .map_err(sql_error)?;
    for (property, d) in &thing.definitions {
        let def = &d.definition;
        tx.prepare_cached(
            "INSERT INTO property_definitions (thing, property, kind, unit, persisted, logged, max_age_ms, max_count, defined_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .and_then(|mut s| {
            s.execute(params![
                &*thing.name,
                &**property,
                def.kind,
                def.unit,
                def.persisted,
                def.logged,
                def.max_age_ms.map(|v| v as i64),
                def.max_count.map(|v| v as i64),
                d.defined_ms as i64
            ])
        })
        .map_err(sql_error)?;
    }
    Ok(())
}

fn remove(
    tx: &rusqlite::Transaction<'_>,
    thing: &str,
    property: Option<&str>,
) -> Result<(), StorageError> {
    match property {
        Some(property) => {
            for sql in [
                "DELETE FROM property_definitions WHERE thing = ?1 AND property = ?2",
                "DELETE FROM current_values WHERE thing = ?1 AND property = ?2",
                "DELETE FROM value_chunks WHERE thing = ?1 AND property = ?2",
            ] {
                tx.execute(sql, [thing, property]).map_err(sql_error)?;
            }
        }
        None => {
            for sql in [
                "DELETE FROM things WHERE name = ?1",
                "DELETE FROM property_definitions WHERE thing = ?1",
                "DELETE FROM current_values WHERE thing = ?1",
                "DELETE FROM value_chunks WHERE thing = ?1",
                "DELETE FROM events WHERE thing = ?1",
            ] {
                tx.execute(sql, [thing]).map_err(sql_error)?;
            }
        }
    }
    Ok(())
}

/// The values of these journal rows (those still there).
fn journal_rows(conn: &Connection, ids: &[i64]) -> Result<Vec<JournalValue>, StorageError> {
    let mut values = Vec::new();
    let mut stmt =
        conn.prepare_cached("SELECT frame_values FROM journal WHERE id = ?1").map_err(sql_error)?;
    for id in ids {
        let blob: Option<Vec<u8>> =
            stmt.query_row([id], |r| r.get(0)).optional().map_err(sql_error)?;
        if let Some(blob) = blob {
            values.extend(codec::decode_values(Bytes::from(blob)).map_err(corrupt)?);
        }
    }
    Ok(values)
}

/// Folds these journal rows of a thing into its value streams and current values, and marks them folded.
fn fold(tx: &rusqlite::Transaction<'_>, thing: &str, ids: &[i64]) -> Result<(), StorageError> {
    let Some(&last) = ids.iter().max() else { return Ok(()) };
    let values = journal_rows(tx, ids)?;
    let mut streams: BTreeMap<ByteString, Vec<ValueRecord>> = BTreeMap::new();
    let mut current: BTreeMap<ByteString, ValueRecord> = BTreeMap::new();
    for v in values {
        if v.current {
            let newer =
                current.get(&v.property).is_none_or(|c| codec::key(&v.point) > codec::key(c));
            if newer {
                current.insert(v.property.clone(), v.point.clone());
            }
        }
        if v.logged {
            streams.entry(v.property).or_default().push(v.point);
        }
    }
    for (property, mut points) in streams {
        points.sort_by_key(codec::key);
        points.dedup_by_key(|p| codec::key(p));
        append(tx, thing, &property, points)?;
    }
    let limits = Limits::DEFAULT;
    for (property, p) in current {
        let value = codec::value_of(&p, &limits).map_err(corrupt)?;
        tx.prepare_cached(
            "INSERT INTO current_values (thing, property, value, quality, timestamp_ms, incarnation, seq, received_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (thing, property) DO UPDATE SET value = excluded.value, quality = excluded.quality,
               timestamp_ms = excluded.timestamp_ms, incarnation = excluded.incarnation, seq = excluded.seq,
               received_ms = excluded.received_ms
             WHERE (excluded.timestamp_ms, excluded.incarnation, excluded.seq) >=
                   (current_values.timestamp_ms, current_values.incarnation, current_values.seq)",
        )
        .and_then(|mut s| {
            s.execute(params![
                thing,
                &*property,
                SqlStored(&value),
                p.quality as i64,
                p.timestamp_ms as i64,
                ordered(p.incarnation),
                p.seq as i64,
                p.received_ms as i64
            ])
        })
        .map_err(sql_error)?;
    }
    tx.prepare_cached("INSERT OR REPLACE INTO fold_marks (thing, id) VALUES (?1, ?2)")
        .and_then(|mut s| s.execute(params![thing, last]))
        .map_err(sql_error)?;
    Ok(())
}

/// A chunk row's key and contents.
struct Chunk {
    first: (u64, u64, u64),
    points: Vec<ValueRecord>,
    bytes: usize,
}

/// Writes sorted points as chunks. A chunk already stored under the key a new chunk would take (a value sent again
/// that starts a stored chunk) is merged in, never replaced.
fn insert_chunks(
    tx: &rusqlite::Transaction<'_>,
    thing: &str,
    property: &str,
    points: &[ValueRecord],
) -> Result<(), StorageError> {
    let mut points = points.to_vec();
    let mut start = 0;
    while start < points.len() {
        let first = codec::key(&points[start]);
        if let Some(stored) = chunk_at(tx, thing, property, first)? {
            // take the stored chunk's points into the rest, and start this chunk again
            delete_chunk(tx, thing, property, first)?;
            let mut rest = points.split_off(start);
            rest.extend(stored);
            rest.sort_by_key(codec::key);
            rest.dedup_by_key(|p| codec::key(p));
            points.extend(rest);
        }
        let first = &points[start];
        let mut end = start + 1;
        let mut bytes = codec::point_len(first, None);
        while end < points.len()
            && end - start < CHUNK_VALUES
            && points[end].timestamp_ms.saturating_sub(first.timestamp_ms) <= CHUNK_SPAN_MS
        {
            bytes += codec::point_len(&points[end], Some(&points[end - 1]));
            if bytes > CHUNK_BYTES {
                break;
            }
            end += 1;
        }
        let chunk = &points[start..end];
        tx.prepare_cached(
            "INSERT INTO value_chunks (thing, property, first_ms, first_incarnation, first_seq, last_ms, count, data)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .and_then(|mut s| {
            s.execute(params![
                thing,
                property,
                first.timestamp_ms as i64,
                ordered(first.incarnation),
                first.seq as i64,
                chunk[chunk.len() - 1].timestamp_ms as i64,
                chunk.len() as i64,
                codec::encode_chunk(chunk)
            ])
        })
        .map_err(sql_error)?;
        start = end;
    }
    Ok(())
}

/// The points of the chunk stored under this first key, if there is one.
fn chunk_at(
    tx: &rusqlite::Transaction<'_>,
    thing: &str,
    property: &str,
    first: (u64, u64, u64),
) -> Result<Option<Vec<ValueRecord>>, StorageError> {
    let data: Option<Vec<u8>> = tx
        .prepare_cached(
            "SELECT data FROM value_chunks WHERE thing = ?1 AND property = ?2 AND first_ms = ?3
             AND first_incarnation = ?4 AND first_seq = ?5",
        )
        .and_then(|mut s| {
            s.query_row(
                params![thing, property, first.0 as i64, ordered(first.1), first.2 as i64],
                |r| r.get(0),
            )
            .optional()
        })
        .map_err(sql_error)?;
    data.map(|d| codec::decode_chunk(Bytes::from(d)).map_err(corrupt)).transpose()
}

fn delete_chunk(
    tx: &rusqlite::Transaction<'_>,
    thing: &str,
    property: &str,
    first: (u64, u64, u64),
) -> Result<(), StorageError> {
    tx.prepare_cached(
        "DELETE FROM value_chunks WHERE thing = ?1 AND property = ?2 AND first_ms = ?3
         AND first_incarnation = ?4 AND first_seq = ?5",
    )
    .and_then(|mut s| {
        s.execute(params![thing, property, first.0 as i64, ordered(first.1), first.2 as i64])
    })
    .map_err(sql_error)?;
    Ok(())
}

fn last_chunk(
    tx: &rusqlite::Transaction<'_>,
    thing: &str,
    property: &str,
) -> Result<Option<Chunk>, StorageError> {
    let row: Option<(i64, i64, i64, Vec<u8>)> = tx
        .prepare_cached(
            "SELECT first_ms, first_incarnation, first_seq, data FROM value_chunks WHERE thing = ?1 AND property = ?2
             ORDER BY first_ms DESC, first_incarnation DESC, first_seq DESC LIMIT 1",
        )
        .and_then(|mut s| {
            s.query_row([thing, property], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .optional()
        })
        .map_err(sql_error)?;
    let Some((ms, inc, seq, data)) = row else { return Ok(None) };
    let bytes = data.len();
    let points = codec::decode_chunk(Bytes::from(data)).map_err(corrupt)?;
    Ok(Some(Chunk { first: (ms as u64, unordered(inc), seq as u64), points, bytes }))
}

/// Adds sorted, distinct points to a value stream: those at or after its last chunk's start are merged into that
/// chunk (split when it fills); earlier ones (late arrivals) form chunks of their own, which queries merge.
fn append(
    tx: &rusqlite::Transaction<'_>,
    thing: &str,
    property: &str,
    points: Vec<ValueRecord>,
) -> Result<(), StorageError> {
    let Some(last) = last_chunk(tx, thing, property)? else {
        return insert_chunks(tx, thing, property, &points);
    };
    let (late, tail): (Vec<ValueRecord>, Vec<ValueRecord>) =
        points.into_iter().partition(|p| codec::key(p) < last.first);
    if !late.is_empty() {
        insert_chunks(tx, thing, property, &late)?;
    }
    if tail.is_empty() {
        return Ok(());
    }
    if last.bytes >= MERGE_BELOW {
        return insert_chunks(tx, thing, property, &tail);
    }
    let mut merged = last.points;
    merged.extend(tail);
    merged.sort_by_key(codec::key);
    merged.dedup_by_key(|p| codec::key(p));
    delete_chunk(tx, thing, property, last.first)?;
    insert_chunks(tx, thing, property, &merged)
}

fn definition_of(
    conn: &Connection,
    thing: &str,
    property: &str,
) -> Result<Option<PropertyDefinition>, StorageError> {
    conn.prepare_cached(
        "SELECT kind, unit, persisted, logged, max_age_ms, max_count FROM property_definitions
         WHERE thing = ?1 AND property = ?2",
    )
    .and_then(|mut s| {
        s.query_row([thing, property], |r| {
            Ok(PropertyDefinition {
                kind: r.get(0)?,
                unit: r.get(1)?,
                persisted: r.get(2)?,
                logged: r.get(3)?,
                max_age_ms: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                max_count: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
            })
        })
        .optional()
    })
    .map_err(sql_error)
}

/// Applies a stream's age and count limits; returns the values removed.
fn trim_stream(
    tx: &rusqlite::Transaction<'_>,
    thing: &str,
    property: &str,
    now_ms: u64,
    max_age_ms: u64,
    max_count: u64,
) -> Result<u64, StorageError> {
    // newest first: (first key, last_ms, count)
    let chunks: Vec<((u64, u64, u64), u64, u64)> = tx
        .prepare_cached(
            "SELECT first_ms, first_incarnation, first_seq, last_ms, count FROM value_chunks
             WHERE thing = ?1 AND property = ?2 ORDER BY first_ms DESC, first_incarnation DESC, first_seq DESC",
        )
        .and_then(|mut s| {
            s.query_map([thing, property], |r| {
                Ok((
                    (r.get::<_, i64>(0)? as u64, unordered(r.get::<_, i64>(1)?), r.get::<_, i64>(2)? as u64),
                    r.get::<_, i64>(3)? as u64,
                    r.get::<_, i64>(4)? as u64,
                ))
            })?
            .collect()
        })
        .map_err(sql_error)?;
    let cutoff = if max_age_ms > 0 { now_ms.saturating_sub(max_age_ms) } else { 0 };
    let mut kept = 0u64;
    let mut removed = 0u64;
    for (first, last_ms, count) in chunks {
        let over_count = max_count > 0 && kept + count > max_count;
        let too_old = first.0 < cutoff;
        if !over_count && !too_old {
            kept += count;
            continue;
        }
        if last_ms < cutoff || (max_count > 0 && kept >= max_count) {
            delete_chunk(tx, thing, property, first)?;
            removed += count;
            continue;
        }
        // the boundary chunk: keep its newest values within both limits
        let Some(mut points) = chunk_at(tx, thing, property, first)? else { continue };
        points.retain(|p| p.timestamp_ms >= cutoff);
        if max_count > 0 {
            let room = (max_count - kept) as usize;
            if points.len() > room {
                points.drain(..points.len() - room);
            }
        }
        removed += count.saturating_sub(points.len() as u64);
        kept += points.len() as u64;
        delete_chunk(tx, thing, property, first)?;
        insert_chunks(tx, thing, property, &points)?;
    }
    Ok(removed)
}

fn quality(q: i64) -> Quality {
    Quality::from_u8(q as u8).unwrap_or(Quality::Bad)
}

/// Keeps the points of a page: within the time range, after the cursor, in order, at most `limit`.
pub(crate) fn page(mut points: Vec<ValueRecord>, query: &HistoryQuery) -> Vec<ValueRecord> {
    points.retain(|p| (query.from_ms..=query.to_ms).contains(&p.timestamp_ms));
    points.sort_by_key(codec::key);
    points.dedup_by_key(|p| codec::key(p));
    if query.newest_first {
        points.reverse();
    }
    if let Some(StreamPosition(a, b, c)) = query.after {
        let after = (a, b, c);
        points.retain(|p| {
            if query.newest_first { codec::key(p) < after } else { codec::key(p) > after }
        });
    }
    points.truncate(query.limit as usize);
    points
}

fn read_values(
    conn: &Connection,
    unfolded: &Unfolded,
    query: &HistoryQuery,
) -> Result<Vec<ValueRecord>, StorageError> {
    let Some(property) = query.property.as_deref() else { return Ok(Vec::new()) };
    // the unfolded rows first, then everything in one snapshot (see `Unfolded`)
    let ids = ids_of(unfolded, &query.thing);
    let tx = conn.unchecked_transaction().map_err(sql_error)?;
    let conn: &Connection = &tx;
    let mut points = Vec::new();
    // chunks that may hold values in range: a chunk spans at most CHUNK_SPAN_MS from its first value
    let lo = query.from_ms.saturating_sub(CHUNK_SPAN_MS);
    let (lo, hi) = match query.after {
        Some(StreamPosition(ts, ..)) if query.newest_first => (lo, query.to_ms.min(ts)),
        Some(StreamPosition(ts, ..)) => (lo.max(ts.saturating_sub(CHUNK_SPAN_MS)), query.to_ms),
        None => (lo, query.to_ms),
    };
    let order = if query.newest_first { "DESC" } else { "ASC" };
    let sql = format!(
        "SELECT first_ms, last_ms, data FROM value_chunks WHERE thing = ?1 AND property = ?2
         AND first_ms >= ?3 AND first_ms <= ?4 ORDER BY first_ms {order}"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(sql_error)?;
    let mut rows = stmt
        .query(params![query.thing, property, lo as i64, hi.min(i64::MAX as u64) as i64])
        .map_err(sql_error)?;
    let limit = query.limit as usize;
    // the limit-th timestamp in the page's order, once that many values are in range
    let mut bound: Option<u64> = None;
    while let Some(row) = rows.next().map_err(sql_error)? {
        let first_ms = row.get::<_, i64>(0).map_err(sql_error)? as u64;
        let last_ms = row.get::<_, i64>(1).map_err(sql_error)? as u64;
        // enough values, and no later chunk can hold one that sorts before the limit-th
        let done = match bound {
            Some(b) if query.newest_first => first_ms.saturating_add(CHUNK_SPAN_MS) < b,
            Some(b) => first_ms > b,
            None => false,
        };
        if done {
            break;
        }
        if last_ms < query.from_ms || first_ms > query.to_ms {
            continue;
        }
        let data: Vec<u8> = row.get(2).map_err(sql_error)?;
        let decoded = codec::decode_chunk(Bytes::from(data)).map_err(corrupt)?;
        points.extend(decoded.into_iter().filter(|p| wanted(query, p)));
        if points.len() >= limit && limit > 0 {
            let mut keys: Vec<u64> = points.iter().map(|p| p.timestamp_ms).collect();
            keys.sort_unstable();
            bound = if query.newest_first {
                Some(keys[keys.len() - limit])
            } else {
                Some(keys[limit - 1])
            };
        }
    }
    drop(rows);
    drop(stmt);
    for v in journal_rows(conn, &ids)? {
        if v.logged && v.property == property && wanted(query, &v.point) {
            points.push(v.point);
        }
    }
    Ok(page(points, query))
}

/// Whether a point belongs on the page: in the time range and past the cursor in the page's order.
fn wanted(query: &HistoryQuery, p: &ValueRecord) -> bool {
    let in_range = (query.from_ms..=query.to_ms).contains(&p.timestamp_ms);
    let past = match query.after {
        None => true,
        Some(StreamPosition(a, b, c)) if query.newest_first => codec::key(p) < (a, b, c),
        Some(StreamPosition(a, b, c)) => codec::key(p) > (a, b, c),
    };
    in_range && past
}

fn read_events(
    conn: &Connection,
    query: &HistoryQuery,
    limits: &Limits,
) -> Result<Vec<EventRecord>, StorageError> {
    let (op, order) = if query.newest_first { ("<", "DESC") } else { (">", "ASC") };
    let after = query.after.map_or(
        if query.newest_first {
            (i64::MAX, i64::MAX, i64::MAX)
        } else {
            (i64::MIN, i64::MIN, i64::MIN)
        },
        |StreamPosition(a, b, c)| (a as i64, ordered(b), c as i64),
    );
    let sql = format!(
        "SELECT epoch_ms, incarnation, seq, timestamp_ms, name, payload, received_ms FROM events
         WHERE thing = ?1 AND (epoch_ms, incarnation, seq) {op} (?2, ?3, ?4)
         AND timestamp_ms >= ?5 AND timestamp_ms <= ?6
         ORDER BY epoch_ms {order}, incarnation {order}, seq {order} LIMIT ?7"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(sql_error)?;
    let mut rows = stmt
        .query(params![
            query.thing,
            after.0,
            after.1,
            after.2,
            query.from_ms as i64,
            query.to_ms.min(i64::MAX as u64) as i64,
            query.limit as i64
        ])
        .map_err(sql_error)?;
    let mut events = Vec::new();
    while let Some(row) = rows.next().map_err(sql_error)? {
        let payload = stored_value(row.get_ref(5).map_err(sql_error)?, limits)?;
        events.push(EventRecord {
            epoch_ms: row.get::<_, i64>(0).map_err(sql_error)? as u64,
            incarnation: unordered(row.get::<_, i64>(1).map_err(sql_error)?),
            seq: row.get::<_, i64>(2).map_err(sql_error)? as u64,
            timestamp_ms: row.get::<_, i64>(3).map_err(sql_error)? as u64,
            name: row.get(4).map_err(sql_error)?,
            payload: encoded(&payload),
            received_ms: row.get::<_, i64>(6).map_err(sql_error)? as u64,
        });
    }
    Ok(events)
}

/// Everything stored: things with their definitions and current values, the journal replayed on top.
fn load_all(
    conn: &Connection,
    limits: &Limits,
) -> Result<Vec<(ByteString, ThingState)>, StorageError> {
    let mut things: BTreeMap<ByteString, ThingState> = BTreeMap::new();
    {
        let mut stmt = conn
            .prepare("SELECT name, created_ms, description, tags, described_ms, incarnations FROM things")
            .map_err(sql_error)?;
        let mut rows = stmt.query([]).map_err(sql_error)?;
        while let Some(r) = rows.next().map_err(sql_error)? {
            let name: String = r.get(0).map_err(sql_error)?;
            let tags: String = r.get(3).map_err(sql_error)?;
            let incarnations: String = r.get(5).map_err(sql_error)?;
            let incarnations: Vec<(String, u64)> =
                serde_json::from_str(&incarnations).map_err(corrupt)?;
            let thing = ThingState {
                created_ms: r.get::<_, i64>(1).map_err(sql_error)? as u64,
                description: r.get(2).map_err(sql_error)?,
                tags: serde_json::from_str(&tags).map_err(corrupt)?,
                described_ms: r.get::<_, i64>(4).map_err(sql_error)? as u64,
                incarnations: incarnations
                    .into_iter()
                    .filter_map(|(i, e)| i.parse().ok().map(|i| (i, e)))
                    .collect(),
                ..ThingState::default()
            };
            things.insert(ByteString::from(name), thing);
        }
    }
    {
        let mut stmt = conn
            .prepare(
                "SELECT thing, property, kind, unit, persisted, logged, max_age_ms, max_count, defined_ms
                 FROM property_definitions",
            )
            .map_err(sql_error)?;
        let mut rows = stmt.query([]).map_err(sql_error)?;
        while let Some(r) = rows.next().map_err(sql_error)? {
            let thing: String = r.get(0).map_err(sql_error)?;
            let Some(state) = things.get_mut(thing.as_str()) else { continue };
            let property: String = r.get(1).map_err(sql_error)?;
            let definition = PropertyDefinition {
                kind: r.get(2).map_err(sql_error)?,
                unit: r.get(3).map_err(sql_error)?,
                persisted: r.get(4).map_err(sql_error)?,
                logged: r.get(5).map_err(sql_error)?,
                max_age_ms: r.get::<_, Option<i64>>(6).map_err(sql_error)?.map(|v| v as u64),
                max_count: r.get::<_, Option<i64>>(7).map_err(sql_error)?.map(|v| v as u64),
            };
            let defined_ms = r.get::<_, i64>(8).map_err(sql_error)? as u64;
            state
                .definitions
                .insert(ByteString::from(property), Definition { definition, defined_ms });
        }
    }
    {
        let mut stmt = conn
            .prepare(
                "SELECT thing, property, value, quality, timestamp_ms, incarnation, seq, received_ms FROM current_values",
            )
            .map_err(sql_error)?;
        let mut rows = stmt.query([]).map_err(sql_error)?;
        while let Some(r) = rows.next().map_err(sql_error)? {
            let thing: String = r.get(0).map_err(sql_error)?;
            let Some(state) = things.get_mut(thing.as_str()) else { continue };
            let property: String = r.get(1).map_err(sql_error)?;
            let value = stored_value(r.get_ref(2).map_err(sql_error)?, limits)?;
            let version = Version {
                timestamp_ms: r.get::<_, i64>(4).map_err(sql_error)? as u64,
                incarnation: unordered(r.get::<_, i64>(5).map_err(sql_error)?),
                seq: r.get::<_, i64>(6).map_err(sql_error)? as u64,
            };
            state.apply_property(
                &ByteString::from(property),
                PropertyState {
                    value,
                    quality: quality(r.get(3).map_err(sql_error)?),
                    version,
                    received_ms: r.get::<_, i64>(7).map_err(sql_error)? as u64,
                },
            );
        }
    }
    {
        let mut stmt = conn
            .prepare(
                "SELECT j.thing, j.frame_values FROM journal j LEFT JOIN fold_marks m ON m.thing = j.thing
                 WHERE m.id IS NULL OR j.id > m.id ORDER BY j.id",
            )
            .map_err(sql_error)?;
        let mut rows = stmt.query([]).map_err(sql_error)?;
        while let Some(r) = rows.next().map_err(sql_error)? {
            let thing: String = r.get(0).map_err(sql_error)?;
            let Some(state) = things.get_mut(thing.as_str()) else { continue };
            let blob: Vec<u8> = r.get(1).map_err(sql_error)?;
            for v in codec::decode_values(Bytes::from(blob)).map_err(corrupt)? {
                if !v.current {
                    continue;
                }
                let value = codec::value_of(&v.point, limits).map_err(corrupt)?;
                state.apply_property(
                    &v.property,
                    PropertyState {
                        value,
                        quality: quality(v.point.quality.into()),
                        version: Version {
                            timestamp_ms: v.point.timestamp_ms,
                            incarnation: v.point.incarnation,
                            seq: v.point.seq,
                        },
                        received_ms: v.point.received_ms,
                    },
                );
            }
        }
    }
    Ok(things.into_iter().collect())
}

impl Provider for Sqlite {
    fn shared(&self) -> bool {
        false
    }

    fn write(&self, batch: Arc<Vec<Change>>) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            self.jobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(Job::Write(batch, reply))
                .map_err(|_| StorageError::Unavailable("the store writer stopped".into()))?;
            answer
                .await
                .map_err(|_| StorageError::Unavailable("the store writer stopped".into()))?
        })
    }

    fn table(&self) -> BoxFuture<'_, Result<Option<TableRecord>, StorageError>> {
        self.read(|conn| {
            let bytes: Option<Vec<u8>> = conn
                .query_row("SELECT value FROM meta WHERE key = 'partition_table'", [], |r| r.get(0))
                .optional()
                .map_err(sql_error)?;
            bytes.map(|b| postcard::from_bytes(&b).map_err(corrupt)).transpose()
        })
    }

    fn load(
        &self,
        partitions: Option<Vec<u16>>,
    ) -> BoxFuture<'_, Result<Vec<(ByteString, ThingState)>, StorageError>> {
        let limits = self.limits;
        self.read(move |conn| {
            // one snapshot: the writer may fold meanwhile
            let tx = conn.unchecked_transaction().map_err(sql_error)?;
            let mut all = load_all(&tx, &limits)?;
            drop(tx);
            if let Some(partitions) = partitions {
                all.retain(|(name, _)| {
                    partitions.contains(&crate::ring::partition_of(name.as_bytes()))
                });
            }
            Ok(all)
        })
    }

    fn values(&self, query: HistoryQuery) -> BoxFuture<'_, Result<Vec<ValueRecord>, StorageError>> {
        let unfolded = self.readers.unfolded.clone();
        self.read(move |conn| read_values(conn, &unfolded, &query))
    }

    fn events(&self, query: HistoryQuery) -> BoxFuture<'_, Result<Vec<EventRecord>, StorageError>> {
        let limits = self.limits;
        self.read(move |conn| read_events(conn, &query, &limits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StoredValue;

    fn options(dir: &Path) -> Options {
        Options {
            dir: dir.to_path_buf(),
            fsync: false,
            retention: Retention { max_age: Duration::ZERO, max_values: 0, max_events: 0 },
            limits: Limits::DEFAULT,
            readers: 1,
            retention_period: Duration::from_millis(20),
            fold_after: Duration::from_millis(200),
        }
    }

    fn values(n: u64) -> Change {
        Change::Values {
            thing: "t".into(),
            values: vec![StoredValue {
                property: "p".into(),
                timestamp_ms: 1_000 + n,
                incarnation: 9,
                seq: n,
                quality: Quality::Good,
                value: Value::Int(n as i64),
                received_ms: 2_000 + n,
                current: true,
                logged: true,
            }],
        }
    }

    fn query(newest_first: bool, limit: u32, after: Option<StreamPosition>) -> HistoryQuery {
        HistoryQuery {
            thing: "t".into(),
            property: Some("p".into()),
            from_ms: 0,
            to_ms: u64::MAX,
            limit,
            newest_first,
            after,
        }
    }

    /// Reads every page of the stream.
    async fn all(store: &Sqlite, newest_first: bool) -> Vec<u64> {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store.values(query(newest_first, 100, after)).await.unwrap();
            seen.extend(page.iter().map(|p| p.seq));
            match page.last() {
                Some(p) if page.len() == 100 => {
                    after = Some(StreamPosition(p.timestamp_ms, p.incarnation, p.seq))
                }
                _ => return seen,
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_value_stream_reads_the_same_before_and_after_folding() {
        let dir = tempfile::tempdir().unwrap();
        let store = Sqlite::open(options(dir.path())).unwrap();
        let thing = crate::storage::thing_row(&"t".into(), 3, &ThingState::default());
        store.write(Arc::new(vec![Change::Thing(thing)])).await.unwrap();
        for batch in 0..13u64 {
            let changes: Vec<Change> = (1..=100).map(|i| values(batch * 100 + i)).collect();
            store.write(Arc::new(changes)).await.unwrap();
        }
        let expected: Vec<u64> = (1..=1300).collect();
        // the journal is folded in the background meanwhile; every read sees every value once, in order
        for _ in 0..20 {
            assert_eq!(all(&store, false).await, expected);
            let mut newest: Vec<u64> = all(&store, true).await;
            newest.reverse();
            assert_eq!(newest, expected);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let journal: i64 = store
            .read(|c| {
                c.query_row("SELECT COUNT(*) FROM journal", [], |r| r.get(0)).map_err(sql_error)
            })
            .await
            .unwrap();
        assert_eq!(journal, 0, "folded");
        let loaded = store.load(None).await.unwrap();
        assert_eq!(loaded[0].1.properties["p"].value, Value::Int(1300));
    }

    fn event(thing: &str, seq: u64, timestamp_ms: u64) -> Change {
        Change::Event {
            thing: thing.into(),
            event: EventRecord {
                epoch_ms: 5,
                name: "e".into(),
                payload: Bytes::from_static(&[0]),
                timestamp_ms,
                incarnation: 9,
                seq,
                received_ms: timestamp_ms,
            },
            payload: Value::Null,
        }
    }

    /// Waits until `done` holds for what `read` returns.
    async fn eventually<T: std::fmt::Debug>(
        what: &str,
        read: impl AsyncFn() -> T,
        done: impl Fn(&T) -> bool,
    ) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let value = read().await;
            if done(&value) {
                return value;
            }
            assert!(Instant::now() < deadline, "{what}: {value:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_keeps_the_newest_by_age_and_by_count() {
        let dir = tempfile::tempdir().unwrap();
        let now = crate::links::now_ms();
        let mut options = options(dir.path());
        options.retention =
            Retention { max_age: Duration::from_secs(3600), max_values: 700, max_events: 50 };
        let store = Sqlite::open(options).unwrap();
        // 2,000 values a second apart ending now: the age limit keeps the last hour, the count the last 700
        let changes: Vec<Change> = (0..2_000u64)
            .map(|i| {
                let Change::Values { thing, mut values } = values(i) else { unreachable!() };
                values[0].timestamp_ms = now - (1_999 - i) * 1_000;
                Change::Values { thing, values }
            })
            .chain((0..200).map(|i| event("t", i, now - (199 - i) * 10)))
            // events of another thing, older than the age limit
            .chain((0..10).map(|i| event("old", i, now - 7_200_000 + i)))
            .collect();
        store.write(Arc::new(changes)).await.unwrap();
        let kept = eventually(
            "values trimmed to the count limit",
            async || all(&store, false).await,
            |kept| kept.len() == 700,
        )
        .await;
        assert_eq!(kept, (1_300..2_000).collect::<Vec<u64>>(), "the newest 700");
        let events = |thing: &'static str| {
            let store = &store;
            async move {
                let q = HistoryQuery {
                    thing: thing.into(),
                    property: None,
                    ..query(false, 1_000, None)
                };
                store.events(q).await.unwrap().iter().map(|e| e.seq).collect::<Vec<u64>>()
            }
        };
        let kept =
            eventually("events trimmed", async || events("t").await, |e| e.len() == 50).await;
        assert_eq!(kept, (150..200).collect::<Vec<u64>>(), "the newest 50 in device order");
        eventually("old events removed", async || events("old").await, Vec::is_empty).await;

        // a property's own limit is kept over the default
        let mut thing = ThingState::default();
        let definition =
            PropertyDefinition { max_count: Some(100), ..PropertyDefinition::default() };
        thing.define(&"p".into(), Definition { definition, defined_ms: 1 });
        let row = crate::storage::thing_row(&"t".into(), 3, &thing);
        store.write(Arc::new(vec![Change::Thing(row)])).await.unwrap();
        let kept = eventually(
            "the property's own limit",
            async || all(&store, false).await,
            |k| k.len() == 100,
        )
        .await;
        assert_eq!(kept, (1_900..2_000).collect::<Vec<u64>>());
    }

    async fn journal_rows_left(store: &Sqlite) -> i64 {
        store
            .read(|c| {
                c.query_row("SELECT COUNT(*) FROM journal", [], |r| r.get(0)).map_err(sql_error)
            })
            .await
            .unwrap()
    }

    /// A value sent again that starts a stored chunk is merged into it, not put in its place; journal rows written
    /// after a restart that followed a complete fold are not taken for folded ones.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn resent_values_and_restarts_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let thing = crate::storage::thing_row(&"t".into(), 3, &ThingState::default());
        {
            let store = Sqlite::open(options(dir.path())).unwrap();
            store.write(Arc::new(vec![Change::Thing(thing)])).await.unwrap();
            let changes: Vec<Change> = (1..=300).map(values).collect();
            store.write(Arc::new(changes)).await.unwrap();
            eventually("folded", async || journal_rows_left(&store).await, |n| *n == 0).await;
            // every stored chunk's first value, sent again
            let firsts: Vec<u64> = store
                .read(|c| {
                    let mut stmt =
                        c.prepare("SELECT first_seq FROM value_chunks").map_err(sql_error)?;
                    let rows = stmt.query_map([], |r| r.get::<_, i64>(0)).map_err(sql_error)?;
                    rows.map(|r| r.map(|v| v as u64).map_err(sql_error)).collect()
                })
                .await
                .unwrap();
            assert!(firsts.len() > 1, "several chunks: {firsts:?}");
            store.write(Arc::new(firsts.iter().map(|&n| values(n)).collect())).await.unwrap();
            eventually("folded again", async || journal_rows_left(&store).await, |n| *n == 0).await;
            assert_eq!(all(&store, false).await, (1..=300).collect::<Vec<u64>>());
        }
        // started again with an empty journal: a new value is journaled and the store closed before it is folded
        {
            let store = Sqlite::open(options(dir.path())).unwrap();
            store.write(Arc::new(vec![values(301)])).await.unwrap();
        }
        let store = Sqlite::open(options(dir.path())).unwrap();
        let loaded = store.load(None).await.unwrap();
        assert_eq!(
            loaded[0].1.properties["p"].value,
            Value::Int(301),
            "replayed at the next start"
        );
        let seen =
            eventually("301 in the stream", async || all(&store, false).await, |s| s.len() == 301)
                .await;
        assert_eq!(seen, (1..=301).collect::<Vec<u64>>());
    }
}
