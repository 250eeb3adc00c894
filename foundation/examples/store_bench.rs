//! Measurements of the embedded store, for `benches/storage.sh` (`docs/BENCHMARKS.md`).
//!
//! - `ceiling`: SQLite alone (rusqlite, no thingport code), batched inserts with `synchronous = FULL` in WAL mode:
//!   one row per value keyed by (stream, timestamp, …) — a value stream's natural layout; one row per frame keyed
//!   by thing; and one row per frame in arrival order — thingport's journal. Prints values per second for each.
//! - `fill`: writes things and a day-long history through thingport's own store, as a worker would, into a data
//!   directory; then a worker started on it can be timed to ready.
//! - `history`: reads one property's day of 1 Hz values (86,400) through the store, and the bytes on disk.
//!
//! `cargo run --release -p thingport-foundation --example store_bench -- ceiling --dir /tmp/x`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a measurement tool: a failure ends it"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use thingport_foundation::model::ThingState;
use thingport_foundation::storage::sqlite::{Options, Sqlite};
use thingport_foundation::storage::{self, Change, Provider, Retention, StoredValue};
use thingport_protocol::peer::HistoryQuery;
use thingport_protocol::{Limits, Quality, Value};

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Ceiling {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 1000)]
        things: u64,
        #[arg(long, default_value_t = 10)]
        properties: u64,
        /// Frames per transaction.
        #[arg(long, default_value_t = 100)]
        frames: u64,
        #[arg(long, default_value_t = 200_000)]
        messages: u64,
    },
    Fill {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        things: u64,
        /// Logged values in all, spread evenly over the things (one property each... of ten).
        #[arg(long, default_value_t = 10_000_000)]
        values: u64,
    },
    History {
        #[arg(long)]
        dir: PathBuf,
    },
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn ceiling(dir: &Path, things: u64, properties: u64, frames: u64, messages: u64) {
    use rusqlite::{Connection, params};
    std::fs::create_dir_all(dir).unwrap();
    let open = |name: &str| {
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("sqlite-wal"));
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.pragma_update(None, "synchronous", "FULL").unwrap();
        c
    };
    let base = now_ms();
    let value = {
        let mut v = Vec::new();
        Value::Float(21.5).encode(&mut v);
        v
    };
    let names: Vec<String> = (0..things).map(|t| format!("dev-{t:05}")).collect();
    let frame: Vec<u8> =
        (0..properties).flat_map(|_| value.iter().copied().chain([0u8; 8])).collect();
    // inserts `messages` frames, `frames` per commit, into a fresh file; values per second
    let measure = |file: &str,
                   schema: &str,
                   insert: &str,
                   row: &dyn Fn(&mut rusqlite::CachedStatement<'_>, u64)| {
        let c = open(file);
        c.execute_batch(schema).unwrap();
        let started = Instant::now();
        let mut n = 0;
        while n < messages {
            let tx = c.unchecked_transaction().unwrap();
            {
                let mut statement = tx.prepare_cached(insert).unwrap();
                for _ in 0..frames {
                    row(&mut statement, n);
                    n += 1;
                }
            }
            tx.commit().unwrap();
        }
        (n * properties) as f64 / started.elapsed().as_secs_f64()
    };
    // one row per value
    let rows = measure(
        "rows.sqlite",
        "CREATE TABLE v (stream INTEGER NOT NULL, ts INTEGER NOT NULL, inc INTEGER NOT NULL, seq INTEGER NOT NULL,
         quality INTEGER NOT NULL, value BLOB NOT NULL, received INTEGER NOT NULL,
         PRIMARY KEY (stream, ts, inc, seq)) WITHOUT ROWID",
        "INSERT INTO v VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        &|insert, n| {
            let (thing, seq) = (n % things, n / things + 1);
            let ts = (base + seq * 100) as i64;
            for p in 0..properties {
                let stream = (thing * properties + p) as i64;
                insert.execute(params![stream, ts, 7i64, seq as i64, 0i64, &value, ts]).unwrap();
            }
        },
    );
    // one row per frame keyed by thing
    let keyed = measure(
        "frames.sqlite",
        "CREATE TABLE j (thing TEXT NOT NULL, id INTEGER NOT NULL, received INTEGER NOT NULL, data BLOB NOT NULL,
         PRIMARY KEY (thing, id)) WITHOUT ROWID",
        "INSERT INTO j VALUES (?1, ?2, ?3, ?4)",
        &|insert, n| {
            let thing = &names[(n % things) as usize];
            insert.execute(params![thing, n as i64, base as i64, &frame]).unwrap();
        },
    );
    // one row per frame in arrival order (thingport's journal)
    let journal = measure(
        "journal.sqlite",
        "CREATE TABLE j (id INTEGER PRIMARY KEY, thing TEXT NOT NULL, received INTEGER NOT NULL, data BLOB NOT NULL)",
        "INSERT INTO j VALUES (?1, ?2, ?3, ?4)",
        &|insert, n| {
            let thing = &names[(n % things) as usize];
            insert.execute(params![n as i64, thing, base as i64, &frame]).unwrap();
        },
    );
    println!(
        "{{\"rows_values_per_s\": {rows:.0}, \"frames_keyed_by_thing_values_per_s\": {keyed:.0}, \"journal_values_per_s\": {journal:.0}, \"things\": {things}, \"properties\": {properties}, \"frames_per_commit\": {frames}}}"
    );
}

fn options(dir: &Path) -> Options {
    Options {
        dir: dir.to_path_buf(),
        fsync: true,
        retention: Retention { max_age: Duration::ZERO, max_values: 0, max_events: 0 },
        limits: Limits::DEFAULT,
        readers: 2,
        retention_period: Duration::from_secs(3600),
        fold_after: thingport_foundation::storage::sqlite::COMPACT_AGE,
    }
}

async fn fill(dir: &Path, things: u64, values: u64) {
    let store = Sqlite::open(options(dir)).unwrap();
    let per_thing = values / things;
    let start = now_ms() - per_thing * 1000;
    let names: Vec<thingport_protocol::ByteString> =
        (0..things).map(|t| format!("dev-{t:05}").into()).collect();
    let rows: Vec<Change> = names
        .iter()
        .map(|n| {
            let p = thingport_foundation::ring::partition_of(n.as_bytes());
            Change::Thing(storage::thing_row(
                n,
                p,
                &ThingState { created_ms: start, ..ThingState::default() },
            ))
        })
        .collect();
    store.write(Arc::new(rows)).await.unwrap();
    let started = Instant::now();
    // ten properties per thing, one value each per frame, one frame a second of device time
    let frames_per_thing = per_thing / 10;
    let mut written = 0u64;
    for second in 0..frames_per_thing {
        let batch: Vec<Change> = names
            .iter()
            .map(|thing| Change::Values {
                thing: thing.clone(),
                values: (0..10)
                    .map(|p| StoredValue {
                        property: format!("p{p}").into(),
                        timestamp_ms: start + second * 1000,
                        incarnation: 1,
                        seq: second + 1,
                        quality: Quality::Good,
                        value: Value::Float(20.0 + (second % 100) as f64 / 10.0),
                        received_ms: start + second * 1000 + 3,
                        current: true,
                        logged: true,
                    })
                    .collect(),
            })
            .collect();
        written += batch.len() as u64 * 10;
        store.write(Arc::new(batch)).await.unwrap();
        if second % 100 == 0 {
            eprintln!(
                "{written} values, {:.0}/s",
                written as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    // let the journal fold before the measurement of a restart
    wait_folded(dir).await;
    println!(
        "{{\"things\": {things}, \"values\": {written}, \"seconds\": {:.1}}}",
        started.elapsed().as_secs_f64()
    );
}

/// Waits until the store's journal is folded and emptied (it is folded in the background).
async fn wait_folded(dir: &Path) {
    let conn = rusqlite::Connection::open(dir.join(storage::sqlite::FILE_NAME)).unwrap();
    loop {
        let left: i64 = conn.query_row("SELECT COUNT(*) FROM journal", [], |r| r.get(0)).unwrap();
        if left == 0 {
            return;
        }
        eprintln!("journal rows left to fold: {left}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One property's day at 1 Hz: 86,400 values read through the store, as the history API reads them.
async fn history(dir: &Path) {
    let store = Sqlite::open(options(dir)).unwrap();
    let start = now_ms() - 86_400_000;
    let exists = store
        .values(HistoryQuery {
            thing: "day".into(),
            property: Some("level".into()),
            from_ms: 0,
            to_ms: u64::MAX,
            limit: 1,
            newest_first: false,
            after: None,
        })
        .await
        .unwrap();
    if exists.is_empty() {
        for chunk in 0..864u64 {
            let batch: Vec<Change> = (0..100u64)
                .map(|i| {
                    let s = chunk * 100 + i;
                    Change::Values {
                        thing: "day".into(),
                        values: vec![StoredValue {
                            property: "level".into(),
                            timestamp_ms: start + s * 1000,
                            incarnation: 1,
                            seq: s + 1,
                            quality: Quality::Good,
                            value: Value::Float(20.0 + (s % 100) as f64 / 10.0),
                            received_ms: start + s * 1000 + 3,
                            current: true,
                            logged: true,
                        }],
                    }
                })
                .collect();
            store.write(Arc::new(batch)).await.unwrap();
        }
        wait_folded(dir).await;
    }
    let query = HistoryQuery {
        thing: "day".into(),
        property: Some("level".into()),
        from_ms: start,
        to_ms: start + 86_400_000,
        limit: 100_000,
        newest_first: false,
        after: None,
    };
    let mut times = Vec::new();
    let mut count = 0;
    for _ in 0..5 {
        let started = Instant::now();
        count = store.values(query.clone()).await.unwrap().len();
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let size = std::fs::metadata(dir.join(storage::sqlite::FILE_NAME)).unwrap().len();
    println!(
        "{{\"values\": {count}, \"read_ms_median_of_5\": {:.1}, \"file_bytes\": {size}}}",
        times[2]
    );
}

#[tokio::main]
async fn main() {
    match Cli::parse().command {
        Command::Ceiling { dir, things, properties, frames, messages } => {
            ceiling(&dir, things, properties, frames, messages)
        }
        Command::Fill { dir, things, values } => fill(&dir, things, values).await,
        Command::History { dir } => history(&dir).await,
    }
}
