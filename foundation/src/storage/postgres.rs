//! The shared store: one PostgreSQL database that every worker of a pool writes (`docs/STORAGE.md` has the
//! schema). Only a partition's primary writes a change, so each reaches the database once.
//!
//! Built on `tokio-postgres`: an asynchronous client without a compile-time database, whose array parameters let a
//! whole batch go in as one `INSERT … SELECT FROM UNNEST(…)` statement per table (a few round trips per commit,
//! however many values). PostgreSQL's own log records rows, not pages, so value streams are plain rows keyed by
//! (stream, timestamp, incarnation, seq), and the current value of a logged property is the newest row of its stream
//! (`current_values` holds those of properties that are persisted but not logged), so each value is written once.
//!
//! One connection writes; a few more read. A connection that fails is replaced at the next use, so a database
//! restarted under a running pool is written again as soon as it accepts connections. Versioned migrations run at
//! open, under an advisory lock so that workers starting together do not race; retention runs in the background on
//! the worker that holds the pool's singleton role (`coord::singleton`), under another advisory lock.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use thingport_protocol::peer::{
    EventRecord, HistoryQuery, PropertyDefinition, StreamPosition, TableRecord, ValueRecord,
};
use thingport_protocol::{ByteString, Limits, Quality, Value};
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

use super::{
    BoxFuture, Change, Provider, Retention, StorageError, StoredValue, ordered, unordered,
};
use crate::coord::singleton::Singleton;
use crate::model::{Definition, PropertyState, ThingState, Version};

/// The schema, by version (table `thingport_schema`).
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE things (
    name TEXT PRIMARY KEY,
    partition INTEGER NOT NULL,
    created_ms BIGINT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    tags JSONB NOT NULL DEFAULT '[]',
    described_ms BIGINT NOT NULL DEFAULT 0,
    incarnations JSONB NOT NULL DEFAULT '[]'
);
CREATE INDEX things_by_partition ON things (partition);
CREATE TABLE property_definitions (
    thing TEXT NOT NULL,
    property TEXT NOT NULL,
    kind TEXT,
    unit TEXT,
    persisted BOOLEAN NOT NULL,
    logged BOOLEAN NOT NULL,
    max_age_ms BIGINT,
    max_count BIGINT,
    defined_ms BIGINT NOT NULL,
    PRIMARY KEY (thing, property)
);
CREATE TABLE current_values (
    thing TEXT NOT NULL,
    property TEXT NOT NULL,
    value BYTEA NOT NULL,
    quality SMALLINT NOT NULL,
    timestamp_ms BIGINT NOT NULL,
    incarnation BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    received_ms BIGINT NOT NULL,
    PRIMARY KEY (thing, property)
);
CREATE TABLE value_streams (
    id BIGSERIAL PRIMARY KEY,
    thing TEXT NOT NULL,
    property TEXT NOT NULL,
    UNIQUE (thing, property)
);
CREATE TABLE property_values (
    stream BIGINT NOT NULL,
    timestamp_ms BIGINT NOT NULL,
    incarnation BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    quality SMALLINT NOT NULL,
    value BYTEA NOT NULL,
    received_ms BIGINT NOT NULL,
    PRIMARY KEY (stream, timestamp_ms, incarnation, seq)
);
CREATE TABLE events (
    thing TEXT NOT NULL,
    epoch_ms BIGINT NOT NULL,
    incarnation BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    timestamp_ms BIGINT NOT NULL,
    name TEXT NOT NULL,
    payload BYTEA NOT NULL,
    received_ms BIGINT NOT NULL,
    PRIMARY KEY (thing, epoch_ms, incarnation, seq)
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
"#];

/// Advisory lock keys: migrations, and the retention sweep.
const MIGRATION_LOCK: i64 = 0x7468_696e_6770_0001;
const RETENTION_LOCK: i64 = 0x7468_696e_6770_0002;

/// The shared store.
#[derive(Debug)]
pub struct Postgres {
    config: tokio_postgres::Config,
    writer: Mutex<Option<Client>>,
    readers: Mutex<Vec<Client>>,
    /// Value stream ids by (thing, property), as the database numbered them.
    streams: Mutex<HashMap<(ByteString, ByteString), i64>>,
    limits: Limits,
}

fn db_error(e: tokio_postgres::Error) -> StorageError {
    StorageError::Unavailable(match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    })
}

fn corrupt(e: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(e.to_string())
}

async fn connect(config: &tokio_postgres::Config) -> Result<Client, StorageError> {
    let (client, connection) = config.connect(NoTls).await.map_err(db_error)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection ended");
        }
    });
    Ok(client)
}

fn encoded(value: &Value) -> Vec<u8> {
    let mut buf = Vec::with_capacity(value.encoded_len());
    value.encode(&mut buf);
    buf
}

impl Postgres {
    /// Connects, migrates the schema forward and starts the retention sweep.
    pub async fn open(
        url: &str,
        retention: Retention,
        limits: Limits,
        singleton: Arc<Singleton>,
    ) -> anyhow::Result<Postgres> {
        let config: tokio_postgres::Config =
            url.parse().map_err(|e| anyhow::anyhow!("storage.postgres_url: {e}"))?;
        let mut client = connect(&config).await?;
        migrate(&mut client).await?;
        let store = Postgres {
            config: config.clone(),
            writer: Mutex::new(Some(client)),
            readers: Mutex::new(Vec::new()),
            streams: Mutex::new(HashMap::new()),
            limits,
        };
        tokio::spawn(sweep(config, retention, singleton));
        Ok(store)
    }

    async fn reader(&self) -> Result<Client, StorageError> {
        if let Some(client) = self.readers.lock().await.pop()
            && !client.is_closed()
        {
            return Ok(client);
        }
        connect(&self.config).await
    }

    async fn give_back(&self, client: Client) {
        let mut readers = self.readers.lock().await;
        if readers.len() < 4 && !client.is_closed() {
            readers.push(client);
        }
    }

    async fn write_batch(&self, batch: &[Change]) -> Result<(), StorageError> {
        let mut writer = self.writer.lock().await;
        if writer.as_ref().is_none_or(Client::is_closed) {
            *writer = Some(connect(&self.config).await?);
        }
        let Some(client) = writer.as_mut() else {
            return Err(StorageError::Unavailable("no database connection".into()));
        };
        let result = write(client, batch, &self.streams).await;
        if result.is_err() {
            // the ids cached may belong to a transaction that rolled back
            self.streams.lock().await.clear();
            if client.is_closed() {
                *writer = None;
            }
        }
        result
    }
}

async fn migrate(client: &mut Client) -> Result<(), StorageError> {
    let tx = client.transaction().await.map_err(db_error)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(db_error)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS thingport_schema (version INTEGER NOT NULL)")
        .await
        .map_err(db_error)?;
    let version: Option<i32> = tx
        .query_opt("SELECT version FROM thingport_schema", &[])
        .await
        .map_err(db_error)?
        .map(|r| r.get(0));
    let known = MIGRATIONS.len() as i32;
    let version = version.unwrap_or(0);
    if version > known {
        return Err(StorageError::Unavailable(format!(
            "the database is of schema version {version}; this release knows up to {known}"
        )));
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(migration).await.map_err(db_error)?;
        tracing::info!(version = i + 1, "database schema migrated");
    }
    tx.execute("DELETE FROM thingport_schema", &[]).await.map_err(db_error)?;
    tx.execute("INSERT INTO thingport_schema (version) VALUES ($1)", &[&known])
        .await
        .map_err(db_error)?;
    tx.commit().await.map_err(db_error)
}

/// Logged values of a batch by (stream, timestamp, incarnation, seq): (quality, value, received).
type PendingValues = BTreeMap<(i64, u64, u64, u64), (u8, Vec<u8>, u64)>;

/// Value rows of a batch, one per (stream, timestamp, incarnation, seq), the last of equals kept.
#[derive(Default)]
struct ValueRows {
    stream: Vec<i64>,
    timestamp: Vec<i64>,
    incarnation: Vec<i64>,
    seq: Vec<i64>,
    quality: Vec<i16>,
    value: Vec<Vec<u8>>,
    received: Vec<i64>,
}

async fn write(
    client: &mut Client,
    batch: &[Change],
    streams: &Mutex<HashMap<(ByteString, ByteString), i64>>,
) -> Result<(), StorageError> {
    let tx = client.transaction().await.map_err(db_error)?;
    // value stream ids for every logged value of the batch
    let mut wanted: Vec<(ByteString, ByteString)> = Vec::new();
    {
        let known = streams.lock().await;
        for change in batch {
            if let Change::Values { thing, values } = change {
                for v in values.iter().filter(|v| v.logged) {
                    let key = (thing.clone(), v.property.clone());
                    if !known.contains_key(&key) && !wanted.contains(&key) {
                        wanted.push(key);
                    }
                }
            }
        }
    }
    if !wanted.is_empty() {
        let things: Vec<&str> = wanted.iter().map(|(t, _)| t.as_ref()).collect();
        let properties: Vec<&str> = wanted.iter().map(|(_, p)| p.as_ref()).collect();
        tx.execute(
            "INSERT INTO value_streams (thing, property) SELECT * FROM UNNEST($1::text[], $2::text[])
             ON CONFLICT DO NOTHING",
            &[&things, &properties],
        )
        .await
        .map_err(db_error)?;
        let rows = tx
            .query(
                "SELECT s.id, s.thing, s.property FROM value_streams s
                 JOIN UNNEST($1::text[], $2::text[]) AS w (thing, property)
                 ON s.thing = w.thing AND s.property = w.property",
                &[&things, &properties],
            )
            .await
            .map_err(db_error)?;
        let mut known = streams.lock().await;
        for row in rows {
            let thing: String = row.get(1);
            let property: String = row.get(2);
            known.insert((thing.into(), property.into()), row.get(0));
        }
    }
    let mut ids = streams.lock().await.clone();
    let mut values: PendingValues = BTreeMap::new();
    let mut current: BTreeMap<(ByteString, ByteString), &StoredValue> = BTreeMap::new();
    let mut events: BTreeMap<(String, u64, u64, u64), &EventRecord> = BTreeMap::new();
    // changes apply in order; a removal or a thing row ends the batch's rows so far for that thing
    let flush_values = |values: &mut PendingValues| {
        let mut rows = ValueRows::default();
        for ((stream, ts, inc, seq), (quality, value, received)) in std::mem::take(values) {
            rows.stream.push(stream);
            rows.timestamp.push(ts as i64);
            rows.incarnation.push(ordered(inc));
            rows.seq.push(seq as i64);
            rows.quality.push(quality.into());
            rows.value.push(value);
            rows.received.push(received as i64);
        }
        rows
    };
    for change in batch {
        match change {
            Change::Values { thing, values: vs } => {
                for v in vs {
                    if v.logged
                        && let Some(&stream) = ids.get(&(thing.clone(), v.property.clone()))
                    {
                        values.insert(
                            (stream, v.timestamp_ms, v.incarnation, v.seq),
                            (v.quality as u8, encoded(&v.value), v.received_ms),
                        );
                    }
                    // a logged property's current value is the newest row of its stream (read at load)
                    if v.current && !v.logged {
                        let key = (thing.clone(), v.property.clone());
                        let newer = current.get(&key).is_none_or(|c| {
                            (v.timestamp_ms, v.incarnation, v.seq)
                                >= (c.timestamp_ms, c.incarnation, c.seq)
                        });
                        if newer {
                            current.insert(key, v);
                        }
                    }
                }
            }
            Change::Event { thing, event, .. } => {
                events.insert(
                    (thing.to_string(), event.epoch_ms, event.incarnation, event.seq),
                    event,
                );
            }
            Change::Thing(thing) => {
                let tags = serde_json::to_value(&thing.tags).map_err(corrupt)?;
                let incarnations = serde_json::to_value(
                    thing.incarnations.iter().map(|&(i, e)| (i.to_string(), e)).collect::<Vec<_>>(),
                )
                .map_err(corrupt)?;
                tx.execute(
                    "INSERT INTO things (name, partition, created_ms, description, tags, described_ms, incarnations)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (name) DO UPDATE SET partition = EXCLUDED.partition, created_ms = EXCLUDED.created_ms,
                       description = EXCLUDED.description, tags = EXCLUDED.tags,
                       described_ms = EXCLUDED.described_ms, incarnations = EXCLUDED.incarnations",
                    &[
                        &&*thing.name,
                        &i32::from(thing.partition),
                        &(thing.created_ms as i64),
                        &thing.description,
                        &tags,
                        &(thing.described_ms as i64),
                        &incarnations,
                    ],
                )
                .await
                .map_err(db_error)?;
                tx.execute("DELETE FROM property_definitions WHERE thing = $1", &[&&*thing.name])
                    .await
                    .map_err(db_error)?;
                for (property, d) in &thing.definitions {
                    let def = &d.definition;
                    tx.execute(
                        "INSERT INTO property_definitions (thing, property, kind, unit, persisted, logged, max_age_ms, max_count, defined_ms)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                        &[
                            &&*thing.name,
                            &&**property,
                            &def.kind,
                            &def.unit,
                            &def.persisted,
                            &def.logged,
                            &def.max_age_ms.map(|v| v as i64),
                            &def.max_count.map(|v| v as i64),
                            &(d.defined_ms as i64),
                        ],
                    )
                    .await
                    .map_err(db_error)?;
                }
            }
            Change::Remove { thing, property } => {
                // rows of this batch written before the removal go first, then the removal
                write_rows(&tx, flush_values(&mut values), &mut current, &mut events).await?;
                match property {
                    Some(p) => {
                        for sql in [
                            "DELETE FROM property_definitions WHERE thing = $1 AND property = $2",
                            "DELETE FROM current_values WHERE thing = $1 AND property = $2",
                            "DELETE FROM property_values WHERE stream IN
                               (SELECT id FROM value_streams WHERE thing = $1 AND property = $2)",
                            "DELETE FROM value_streams WHERE thing = $1 AND property = $2",
                        ] {
                            tx.execute(sql, &[&&**thing, &&**p]).await.map_err(db_error)?;
                        }
                    }
                    None => {
                        for sql in [
                            "DELETE FROM things WHERE name = $1",
                            "DELETE FROM property_definitions WHERE thing = $1",
                            "DELETE FROM current_values WHERE thing = $1",
                            "DELETE FROM property_values WHERE stream IN (SELECT id FROM value_streams WHERE thing = $1)",
                            "DELETE FROM value_streams WHERE thing = $1",
                            "DELETE FROM events WHERE thing = $1",
                        ] {
                            tx.execute(sql, &[&&**thing]).await.map_err(db_error)?;
                        }
                    }
                }
                // a later value of this batch for a removed stream starts a new one, at the next batch
                let removed = |(t, p): &(ByteString, ByteString)| {
                    t == thing && property.as_ref().is_none_or(|q| q == p)
                };
                ids.retain(|k, _| !removed(k));
                streams.lock().await.retain(|k, _| !removed(k));
            }
            // the database is shared: what this worker no longer holds, another does
            Change::DropPartition(_) => {}
            Change::Table(table) => {
                let bytes = postcard::to_stdvec(table).map_err(corrupt)?;
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('partition_table', $1)
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    &[&bytes],
                )
                .await
                .map_err(db_error)?;
            }
        }
    }
    write_rows(&tx, flush_values(&mut values), &mut current, &mut events).await?;
    tx.commit().await.map_err(db_error)
}

async fn write_rows(
    tx: &tokio_postgres::Transaction<'_>,
    rows: ValueRows,
    current: &mut BTreeMap<(ByteString, ByteString), &StoredValue>,
    events: &mut BTreeMap<(String, u64, u64, u64), &EventRecord>,
) -> Result<(), StorageError> {
    if !rows.stream.is_empty() {
        tx.execute(
            "INSERT INTO property_values (stream, timestamp_ms, incarnation, seq, quality, value, received_ms)
             SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::smallint[], $6::bytea[], $7::bigint[])
             ON CONFLICT DO NOTHING",
            &[
                &rows.stream,
                &rows.timestamp,
                &rows.incarnation,
                &rows.seq,
                &rows.quality,
                &rows.value,
                &rows.received,
            ],
        )
        .await
        .map_err(db_error)?;
    }
    if !current.is_empty() {
        let mut things = Vec::new();
        let mut properties = Vec::new();
        let mut values = Vec::new();
        let mut quality = Vec::new();
        let mut ts = Vec::new();
        let mut inc = Vec::new();
        let mut seq = Vec::new();
        let mut received = Vec::new();
        for ((thing, property), v) in std::mem::take(current) {
            things.push(thing.to_string());
            properties.push(property.to_string());
            values.push(encoded(&v.value));
            quality.push(v.quality as i16);
            ts.push(v.timestamp_ms as i64);
            inc.push(ordered(v.incarnation));
            seq.push(v.seq as i64);
            received.push(v.received_ms as i64);
        }
        tx.execute(
            "INSERT INTO current_values (thing, property, value, quality, timestamp_ms, incarnation, seq, received_ms)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::smallint[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[])
             ON CONFLICT (thing, property) DO UPDATE SET value = EXCLUDED.value, quality = EXCLUDED.quality,
               timestamp_ms = EXCLUDED.timestamp_ms, incarnation = EXCLUDED.incarnation, seq = EXCLUDED.seq,
               received_ms = EXCLUDED.received_ms
             WHERE (EXCLUDED.timestamp_ms, EXCLUDED.incarnation, EXCLUDED.seq) >=
                   (current_values.timestamp_ms, current_values.incarnation, current_values.seq)",
            &[&things, &properties, &values, &quality, &ts, &inc, &seq, &received],
        )
        .await
        .map_err(db_error)?;
    }
    if !events.is_empty() {
        let mut things = Vec::new();
        let mut epoch = Vec::new();
        let mut inc = Vec::new();
        let mut seq = Vec::new();
        let mut ts = Vec::new();
        let mut names = Vec::new();
        let mut payloads = Vec::new();
        let mut received = Vec::new();
        for ((thing, ..), e) in std::mem::take(events) {
            things.push(thing);
            epoch.push(e.epoch_ms as i64);
            inc.push(ordered(e.incarnation));
            seq.push(e.seq as i64);
            ts.push(e.timestamp_ms as i64);
            names.push(e.name.clone());
            payloads.push(e.payload.to_vec());
            received.push(e.received_ms as i64);
        }
        tx.execute(
            "INSERT INTO events (thing, epoch_ms, incarnation, seq, timestamp_ms, name, payload, received_ms)
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], $6::text[], $7::bytea[], $8::bigint[])
             ON CONFLICT DO NOTHING",
            &[&things, &epoch, &inc, &seq, &ts, &names, &payloads, &received],
        )
        .await
        .map_err(db_error)?;
    }
    Ok(())
}

/// Applies retention every minute on the worker that holds the pool's singleton role, a stream at a time (each its
/// own short statement, so writers are never held up for long). The sweep also takes an advisory lock, so that two
/// workers never sweep at once even while one's lease of the role runs out and another's begins.
async fn sweep(config: tokio_postgres::Config, retention: Retention, singleton: Arc<Singleton>) {
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
        if !singleton.holds() {
            continue;
        }
        if let Err(e) = sweep_once(&config, retention).await {
            tracing::warn!(error = %e, "retention sweep failed; retrying later");
        }
    }
}

async fn sweep_once(
    config: &tokio_postgres::Config,
    retention: Retention,
) -> Result<(), StorageError> {
    let client = connect(config).await?;
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&RETENTION_LOCK])
        .await
        .map_err(db_error)?
        .get(0);
    if !locked {
        return Ok(());
    }
    let now_ms = crate::links::now_ms() as i64;
    let default_age = retention.max_age.as_millis() as i64;
    let streams = client
        .query(
            "SELECT s.id, d.max_age_ms, d.max_count FROM value_streams s
             LEFT JOIN property_definitions d ON d.thing = s.thing AND d.property = s.property",
            &[],
        )
        .await
        .map_err(db_error)?;
    let mut removed = 0u64;
    for row in streams {
        let id: i64 = row.get(0);
        let age = row.get::<_, Option<i64>>(1).unwrap_or(default_age);
        let count = row.get::<_, Option<i64>>(2).unwrap_or(retention.max_values as i64);
        if age > 0 {
            // never the newest: it is the property's current value
            removed += client
                .execute(
                    "DELETE FROM property_values WHERE stream = $1 AND timestamp_ms < $2 AND (timestamp_ms, incarnation, seq) <
                     (SELECT timestamp_ms, incarnation, seq FROM property_values WHERE stream = $1
                      ORDER BY timestamp_ms DESC, incarnation DESC, seq DESC LIMIT 1)",
                    &[&id, &(now_ms - age)],
                )
                .await
                .map_err(db_error)?;
        }
        if count > 0 {
            removed += client
                .execute(
                    "DELETE FROM property_values WHERE stream = $1 AND (timestamp_ms, incarnation, seq) <
                     (SELECT timestamp_ms, incarnation, seq FROM property_values WHERE stream = $1
                      ORDER BY timestamp_ms DESC, incarnation DESC, seq DESC OFFSET $2 LIMIT 1)",
                    &[&id, &(count - 1)],
                )
                .await
                .map_err(db_error)?;
        }
    }
    if default_age > 0 {
        removed += client
            .execute("DELETE FROM events WHERE timestamp_ms < $1", &[&(now_ms - default_age)])
            .await
            .map_err(db_error)?;
    }
    if retention.max_events > 0 {
        let things =
            client.query("SELECT DISTINCT thing FROM events", &[]).await.map_err(db_error)?;
        for row in things {
            let thing: String = row.get(0);
            removed += client
                .execute(
                    "DELETE FROM events WHERE thing = $1 AND (epoch_ms, incarnation, seq) <
                     (SELECT epoch_ms, incarnation, seq FROM events WHERE thing = $1
                      ORDER BY epoch_ms DESC, incarnation DESC, seq DESC OFFSET $2 LIMIT 1)",
                    &[&thing, &(retention.max_events as i64 - 1)],
                )
                .await
                .map_err(db_error)?;
        }
    }
    if removed > 0 {
        ::metrics::counter!(crate::telemetry::STORAGE_RETENTION_REMOVED_TOTAL).increment(removed);
    }
    client.execute("SELECT pg_advisory_unlock($1)", &[&RETENTION_LOCK]).await.map_err(db_error)?;
    Ok(())
}

/// A property's state from a row whose columns 2 to 7 are value, quality, timestamp, incarnation, seq, received.
fn property_at(r: &tokio_postgres::Row, limits: &Limits) -> Result<PropertyState, StorageError> {
    let value =
        Value::decode(Bytes::copy_from_slice(r.get::<_, &[u8]>(2)), limits).map_err(corrupt)?;
    Ok(PropertyState {
        value,
        quality: quality(r.get(3)),
        version: Version {
            timestamp_ms: r.get::<_, i64>(4) as u64,
            incarnation: unordered(r.get(5)),
            seq: r.get::<_, i64>(6) as u64,
        },
        received_ms: r.get::<_, i64>(7) as u64,
    })
}

/// A page's comparison and order in SQL, and its cursor (the stream's ends when there is none).
fn page_bounds(query: &HistoryQuery) -> (&'static str, &'static str, (i64, i64, i64)) {
    let (op, order) = if query.newest_first { ("<", "DESC") } else { (">", "ASC") };
    let after = match query.after {
        Some(StreamPosition(a, b, c)) => (a as i64, ordered(b), c as i64),
        None if query.newest_first => (i64::MAX, i64::MAX, i64::MAX),
        None => (i64::MIN, i64::MIN, i64::MIN),
    };
    (op, order, after)
}

fn quality(q: i16) -> Quality {
    Quality::from_u8(q as u8).unwrap_or(Quality::Bad)
}

impl Provider for Postgres {
    fn shared(&self) -> bool {
        true
    }

    fn write(&self, batch: Arc<Vec<Change>>) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            let result = self.write_batch(&batch).await;
            ::metrics::histogram!(crate::telemetry::STORAGE_WRITE_SECONDS, "store" => "postgres")
                .record(started.elapsed().as_secs_f64());
            result
        })
    }

    fn table(&self) -> BoxFuture<'_, Result<Option<TableRecord>, StorageError>> {
        Box::pin(async move {
            let client = self.reader().await?;
            let row = client
                .query_opt("SELECT value FROM meta WHERE key = 'partition_table'", &[])
                .await
                .map_err(db_error)?;
            self.give_back(client).await;
            row.map(|r| postcard::from_bytes(r.get::<_, &[u8]>(0)).map_err(corrupt)).transpose()
        })
    }

    fn load(
        &self,
        partitions: Option<Vec<u16>>,
    ) -> BoxFuture<'_, Result<Vec<(ByteString, ThingState)>, StorageError>> {
        Box::pin(async move {
            let client = self.reader().await?;
            let partitions: Option<Vec<i32>> =
                partitions.map(|p| p.into_iter().map(i32::from).collect());
            let filter = "($1::integer[] IS NULL OR t.partition = ANY($1))";
            let mut things: BTreeMap<ByteString, ThingState> = BTreeMap::new();
            let rows = client
                .query(
                    &format!(
                        "SELECT t.name, t.created_ms, t.description, t.tags, t.described_ms, t.incarnations
                         FROM things t WHERE {filter}"
                    ),
                    &[&partitions],
                )
                .await
                .map_err(db_error)?;
            for r in rows {
                let name: String = r.get(0);
                let tags: serde_json::Value = r.get(3);
                let incarnations: serde_json::Value = r.get(5);
                let incarnations: Vec<(String, u64)> =
                    serde_json::from_value(incarnations).map_err(corrupt)?;
                things.insert(
                    ByteString::from(name),
                    ThingState {
                        created_ms: r.get::<_, i64>(1) as u64,
                        description: r.get(2),
                        tags: serde_json::from_value(tags).map_err(corrupt)?,
                        described_ms: r.get::<_, i64>(4) as u64,
                        incarnations: incarnations
                            .into_iter()
                            .filter_map(|(i, e)| i.parse().ok().map(|i| (i, e)))
                            .collect(),
                        ..ThingState::default()
                    },
                );
            }
            let rows = client
                .query(
                    &format!(
                        "SELECT d.thing, d.property, d.kind, d.unit, d.persisted, d.logged, d.max_age_ms, d.max_count, d.defined_ms
                         FROM property_definitions d JOIN things t ON t.name = d.thing WHERE {filter}"
                    ),
                    &[&partitions],
                )
                .await
                .map_err(db_error)?;
            for r in rows {
                let thing: String = r.get(0);
                let Some(state) = things.get_mut(thing.as_str()) else { continue };
                let property: String = r.get(1);
                let definition = PropertyDefinition {
                    kind: r.get(2),
                    unit: r.get(3),
                    persisted: r.get(4),
                    logged: r.get(5),
                    max_age_ms: r.get::<_, Option<i64>>(6).map(|v| v as u64),
                    max_count: r.get::<_, Option<i64>>(7).map(|v| v as u64),
                };
                let defined_ms = r.get::<_, i64>(8) as u64;
                state.definitions.insert(property.into(), Definition { definition, defined_ms });
            }
            let rows = client
                .query(
                    &format!(
                        "SELECT c.thing, c.property, c.value, c.quality, c.timestamp_ms, c.incarnation, c.seq, c.received_ms
                         FROM current_values c JOIN things t ON t.name = c.thing WHERE {filter}"
                    ),
                    &[&partitions],
                )
                .await
                .map_err(db_error)?;
            for r in rows {
                let thing: String = r.get(0);
                let Some(state) = things.get_mut(thing.as_str()) else { continue };
                let property: String = r.get(1);
                state.apply_property(&ByteString::from(property), property_at(&r, &self.limits)?);
            }
            // the newest value of each logged property's stream, where its definition persists it
            let rows = client
                .query(
                    &format!(
                        "SELECT s.thing, s.property, v.value, v.quality, v.timestamp_ms, v.incarnation, v.seq, v.received_ms
                         FROM value_streams s JOIN things t ON t.name = s.thing
                         CROSS JOIN LATERAL (SELECT * FROM property_values p WHERE p.stream = s.id
                           ORDER BY p.timestamp_ms DESC, p.incarnation DESC, p.seq DESC LIMIT 1) v
                         WHERE {filter}"
                    ),
                    &[&partitions],
                )
                .await
                .map_err(db_error)?;
            for r in rows {
                let thing: String = r.get(0);
                let Some(state) = things.get_mut(thing.as_str()) else { continue };
                let property: String = r.get(1);
                if !state.definition(&property).persisted {
                    continue;
                }
                state.apply_property(&ByteString::from(property), property_at(&r, &self.limits)?);
            }
            self.give_back(client).await;
            Ok(things.into_iter().collect())
        })
    }

    fn values(&self, query: HistoryQuery) -> BoxFuture<'_, Result<Vec<ValueRecord>, StorageError>> {
        Box::pin(async move {
            let Some(property) = query.property.as_deref() else { return Ok(Vec::new()) };
            let client = self.reader().await?;
            let (op, order, after) = page_bounds(&query);
            let sql = format!(
                "SELECT timestamp_ms, incarnation, seq, quality, value, received_ms FROM property_values
                 WHERE stream = (SELECT id FROM value_streams WHERE thing = $1 AND property = $2)
                 AND timestamp_ms >= $3 AND timestamp_ms <= $4 AND (timestamp_ms, incarnation, seq) {op} ($5, $6, $7)
                 ORDER BY timestamp_ms {order}, incarnation {order}, seq {order} LIMIT $8"
            );
            let rows = client
                .query(
                    &sql,
                    &[
                        &query.thing,
                        &property,
                        &(query.from_ms.min(i64::MAX as u64) as i64),
                        &(query.to_ms.min(i64::MAX as u64) as i64),
                        &after.0,
                        &after.1,
                        &after.2,
                        &i64::from(query.limit),
                    ],
                )
                .await
                .map_err(db_error)?;
            self.give_back(client).await;
            Ok(rows
                .iter()
                .map(|r| ValueRecord {
                    timestamp_ms: r.get::<_, i64>(0) as u64,
                    incarnation: unordered(r.get(1)),
                    seq: r.get::<_, i64>(2) as u64,
                    quality: r.get::<_, i16>(3) as u8,
                    value: Bytes::copy_from_slice(r.get::<_, &[u8]>(4)),
                    received_ms: r.get::<_, i64>(5) as u64,
                })
                .collect())
        })
    }

    fn events(&self, query: HistoryQuery) -> BoxFuture<'_, Result<Vec<EventRecord>, StorageError>> {
        Box::pin(async move {
            let client = self.reader().await?;
            let (op, order, after) = page_bounds(&query);
            let sql = format!(
                "SELECT epoch_ms, incarnation, seq, timestamp_ms, name, payload, received_ms FROM events
                 WHERE thing = $1 AND (epoch_ms, incarnation, seq) {op} ($2, $3, $4)
                 AND timestamp_ms >= $5 AND timestamp_ms <= $6
                 ORDER BY epoch_ms {order}, incarnation {order}, seq {order} LIMIT $7"
            );
            let rows = client
                .query(
                    &sql,
                    &[
                        &query.thing,
                        &after.0,
                        &after.1,
                        &after.2,
                        &(query.from_ms.min(i64::MAX as u64) as i64),
                        &(query.to_ms.min(i64::MAX as u64) as i64),
                        &i64::from(query.limit),
                    ],
                )
                .await
                .map_err(db_error)?;
            self.give_back(client).await;
            Ok(rows
                .iter()
                .map(|r| EventRecord {
                    epoch_ms: r.get::<_, i64>(0) as u64,
                    incarnation: unordered(r.get(1)),
                    seq: r.get::<_, i64>(2) as u64,
                    timestamp_ms: r.get::<_, i64>(3) as u64,
                    name: r.get(4),
                    payload: Bytes::copy_from_slice(r.get::<_, &[u8]>(5)),
                    received_ms: r.get::<_, i64>(6) as u64,
                })
                .collect())
        })
    }
}
