//! The data layer: what a worker keeps on disk, behind one narrow trait with two providers (`docs/STORAGE.md`).
//!
//! - [`Provider`]: writes batches of [`Change`]s atomically and durably, loads a worker's state back, and answers
//!   value-stream and event-stream queries. [`sqlite`] is the embedded default (one file per worker); [`postgres`]
//!   is one database shared by every worker of a pool.
//! - [`Storage`]: the queue in front of a provider. Changes from many ring operations wait in one open batch; a
//!   single writer takes the whole batch, writes it in one transaction (one fsync for many frames: group commit),
//!   then wakes everyone whose changes it held. The queue is bounded in operations: a writer that finds it full waits
//!   (and so does the link or API request behind it) until a commit makes room, up to the write timeout. A batch
//!   that fails to commit (disk full, read-only, the database down) is kept and retried until it commits; nothing
//!   queued is dropped and nothing is reported committed before it is.
//!
//! The ring decides *what* changes (`crate::ring::ops`); this module only keeps it. It does not order or merge
//! anything: changes of one thing reach the store in the order the ring applied them.

pub mod codec;
pub mod postgres;
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use thingport_protocol::peer::{EventRecord, HistoryQuery, TableRecord, ValueRecord};
use thingport_protocol::{ByteString, Quality, Value};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::model::{Definition, ThingState};

/// When a device frame or an API write is acknowledged (`docs/CONSISTENCY.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Once the partition's primary applied it in memory; backups and the store follow.
    Memory,
    /// Once every copy of the partition applied it in memory; the store follows within a commit.
    Replicated,
    /// Once every copy applied it and the store committed it (fsync).
    Disk,
}

/// A change to what is stored, produced by applying a ring operation.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A thing's own row: its creation, description, tags, definitions and incarnation epochs (replaces the row).
    Thing(StoredThing),
    /// Property values reported or written together (one device frame or one API write).
    Values { thing: ByteString, values: Vec<StoredValue> },
    /// An event, in its thing's event stream.
    Event { thing: ByteString, event: EventRecord, payload: Value },
    /// A property (its value, definition and value stream) or, without `property`, a whole thing with its history.
    Remove { thing: ByteString, property: Option<ByteString> },
    /// The worker no longer holds this partition: its things' current state goes (their history stays, to be
    /// found by history queries to every worker). A shared store ignores it.
    DropPartition(u16),
    /// The worker's committed partition table, so that a restarted worker knows which partitions it held.
    Table(TableRecord),
}

/// A thing's own row.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredThing {
    pub name: ByteString,
    pub partition: u16,
    pub created_ms: u64,
    pub description: String,
    pub tags: Vec<String>,
    pub described_ms: u64,
    pub definitions: Vec<(ByteString, Definition)>,
    pub incarnations: Vec<(u64, u64)>,
}

/// One property value and what to do with it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredValue {
    pub property: ByteString,
    pub timestamp_ms: u64,
    pub incarnation: u64,
    pub seq: u64,
    pub quality: Quality,
    pub value: Value,
    pub received_ms: u64,
    /// It is now the property's current value, and the property is persisted.
    pub current: bool,
    /// The property is logged: the value joins its value stream.
    pub logged: bool,
}

/// Why the store could not do something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// The store is not open yet, or failing; the message says why. Writes wait and are retried.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// A write was not committed within the time allowed; it stays queued and will be.
    #[error("the store did not commit in time")]
    Timeout,
    /// Something stored does not decode: the store is damaged.
    #[error("the store holds undecodable data: {0}")]
    Corrupt(String),
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Retention defaults, for properties and things whose definitions do not set their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Values and events older than this (by device timestamp) are removed; zero keeps them forever.
    pub max_age: Duration,
    /// At most this many values per property stay in its value stream; zero: no limit.
    pub max_values: u64,
    /// At most this many events per thing stay in its event stream; zero: no limit.
    pub max_events: u64,
}

/// A store of thing state and history.
pub trait Provider: Send + Sync + std::fmt::Debug + 'static {
    /// Whether every worker of the pool writes this same store (then only a partition's primary writes it).
    fn shared(&self) -> bool;

    /// Writes every change in one transaction, durably (committed and synced) when it returns `Ok`.
    fn write(&self, batch: Arc<Vec<Change>>) -> BoxFuture<'_, Result<(), StorageError>>;

    /// The partition table last written, if any.
    fn table(&self) -> BoxFuture<'_, Result<Option<TableRecord>, StorageError>>;

    /// The stored state of the things of these partitions (every thing stored, for `None`).
    fn load(
        &self,
        partitions: Option<Vec<u16>>,
    ) -> BoxFuture<'_, Result<Vec<(ByteString, ThingState)>, StorageError>>;

    /// A page of a property's value stream.
    fn values(&self, query: HistoryQuery) -> BoxFuture<'_, Result<Vec<ValueRecord>, StorageError>>;

    /// A page of a thing's event stream.
    fn events(&self, query: HistoryQuery) -> BoxFuture<'_, Result<Vec<EventRecord>, StorageError>>;
}

/// How the store is doing, for `/readyz` and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not open yet; the message says what the last attempt met.
    Opening(String),
    Ok,
    /// Open, but the last commit failed; the message says why. The batch is retried.
    Failing(String),
}

impl Health {
    pub fn is_ok(&self) -> bool {
        matches!(self, Health::Ok)
    }
}

/// Settings of the queue in front of a provider.
#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    /// Operations queued for the store at most; beyond it writers wait.
    pub max_queued: usize,
    /// Pause before a failed commit is retried (doubling up to 16×).
    pub retry: Duration,
}

#[derive(Debug, Default)]
struct Open {
    generation: u64,
    changes: Vec<Change>,
    permits: Vec<OwnedSemaphorePermit>,
}

/// The queue in front of the store and its writer.
#[derive(Debug)]
pub struct Storage {
    provider: watch::Sender<Option<Arc<dyn Provider>>>,
    open: Mutex<Open>,
    room: Arc<Semaphore>,
    wake: Notify,
    committed: watch::Sender<u64>,
    health: watch::Sender<Health>,
    config: QueueConfig,
}

/// Room for one operation's changes in the queue, reserved before the operation is applied.
#[derive(Debug)]
pub struct Reservation(OwnedSemaphorePermit);

/// The commit an operation's changes are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

impl Storage {
    /// A queue whose provider is not open yet.
    pub fn new(config: QueueConfig) -> Arc<Storage> {
        Arc::new(Storage {
            provider: watch::channel(None).0,
            open: Mutex::new(Open { generation: 1, ..Open::default() }),
            room: Arc::new(Semaphore::new(config.max_queued)),
            wake: Notify::new(),
            committed: watch::channel(0).0,
            health: watch::channel(Health::Opening("not opened yet".into())).0,
            config,
        })
    }

    /// Opens the provider with `open`, retrying until it succeeds or `stop`, then writes batches until `stop`.
    pub async fn run<F, Fut>(self: Arc<Self>, open: F, stop: CancellationToken)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = anyhow::Result<Arc<dyn Provider>>>,
    {
        let mut pause = self.config.retry;
        let provider = loop {
            match open().await {
                Ok(provider) => break provider,
                Err(e) => {
                    let message = format!("{e:#}");
                    if !matches!(&*self.health.borrow(), Health::Opening(m) if *m == message) {
                        tracing::error!(error = %message, "cannot open the store; retrying");
                    }
                    self.set_health(Health::Opening(message));
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(self.config.retry * 16);
                }
            }
        };
        tracing::info!("store open");
        self.set_health(Health::Ok);
        self.provider.send_replace(Some(provider.clone()));
        self.write_batches(provider, stop).await;
    }

    async fn write_batches(&self, provider: Arc<dyn Provider>, stop: CancellationToken) {
        loop {
            let wake = self.wake.notified();
            let (generation, changes, permits) = {
                let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
                if open.changes.is_empty() && open.permits.is_empty() {
                    (0, Vec::new(), Vec::new())
                } else {
                    let generation = open.generation;
                    open.generation += 1;
                    (
                        generation,
                        std::mem::take(&mut open.changes),
                        std::mem::take(&mut open.permits),
                    )
                }
            };
            if generation == 0 {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = wake => {}
                }
                continue;
            }
            let batch = Arc::new(changes);
            let mut pause = self.config.retry;
            loop {
                let started = Instant::now();
                match provider.write(batch.clone()).await {
                    Ok(()) => {
                        ::metrics::histogram!(crate::telemetry::STORAGE_COMMIT_SECONDS)
                            .record(started.elapsed().as_secs_f64());
                        ::metrics::counter!(crate::telemetry::STORAGE_COMMITS_TOTAL).increment(1);
                        ::metrics::counter!(crate::telemetry::STORAGE_CHANGES_TOTAL)
                            .increment(batch.len() as u64);
                        if !self.health.borrow().is_ok() {
                            tracing::info!("store writable again");
                            self.set_health(Health::Ok);
                        }
                        break;
                    }
                    Err(e) => {
                        ::metrics::counter!(crate::telemetry::STORAGE_ERRORS_TOTAL).increment(1);
                        let message = e.to_string();
                        if !matches!(&*self.health.borrow(), Health::Failing(m) if *m == message) {
                            tracing::error!(error = %message, changes = batch.len(), "store commit failed; keeping the batch and retrying");
                        }
                        self.set_health(Health::Failing(message));
                        tokio::select! {
                            // the batch is lost with the process, as are the acknowledgements waiting for it
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(pause) => {}
                        }
                        pause = (pause * 2).min(self.config.retry * 16);
                    }
                }
            }
            self.committed.send_replace(generation);
            drop(permits);
        }
    }

    fn set_health(&self, health: Health) {
        ::metrics::gauge!(crate::telemetry::STORAGE_UP).set(if health.is_ok() { 1.0 } else { 0.0 });
        self.health.send_replace(health);
    }

    /// The provider once it is open.
    pub fn provider(&self) -> Option<Arc<dyn Provider>> {
        self.provider.borrow().clone()
    }

    /// Waits until the provider is open.
    pub async fn opened(&self) -> Arc<dyn Provider> {
        let mut provider = self.provider.subscribe();
        loop {
            if let Some(p) = provider.borrow_and_update().clone() {
                return p;
            }
            if provider.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    pub fn health(&self) -> Health {
        self.health.borrow().clone()
    }

    /// Waits for room for one operation's changes, at most until `deadline`.
    pub async fn reserve(&self, deadline: Instant) -> Result<Reservation, StorageError> {
        let room = self.room.clone().acquire_owned();
        match tokio::time::timeout_at(deadline.into(), room).await {
            Ok(Ok(permit)) => Ok(Reservation(permit)),
            Ok(Err(_)) => Err(StorageError::Unavailable("the store is closed".into())),
            Err(_) => {
                ::metrics::counter!(crate::telemetry::STORAGE_QUEUE_FULL_TOTAL).increment(1);
                Err(StorageError::Timeout)
            }
        }
    }

    /// Queues an operation's changes (none is fine: the reservation is returned at the next commit). Call this while
    /// holding the lock the changes were made under, so that a thing's changes are queued in the order they were made.
    pub fn push(&self, reservation: Reservation, changes: Vec<Change>) -> Ticket {
        let generation = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            open.changes.extend(changes);
            open.permits.push(reservation.0);
            open.generation
        };
        self.wake.notify_one();
        Ticket(generation)
    }

    /// Queues changes without a reservation: for the ring's own bookkeeping (tables, partitions dropped or copied
    /// in), whose amount follows the partitions a worker holds rather than what peers send.
    pub fn push_unreserved(&self, changes: Vec<Change>) -> Ticket {
        let generation = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            open.changes.extend(changes);
            open.generation
        };
        self.wake.notify_one();
        Ticket(generation)
    }

    /// Waits until the commit holding `ticket` is done, at most until `deadline`.
    pub async fn committed(&self, ticket: Ticket, deadline: Instant) -> Result<(), StorageError> {
        let mut committed = self.committed.subscribe();
        let wait = committed.wait_for(|&c| c >= ticket.0);
        match tokio::time::timeout_at(deadline.into(), wait).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(StorageError::Unavailable("the store is closed".into())),
            Err(_) => match self.health() {
                Health::Ok => Err(StorageError::Timeout),
                Health::Opening(m) | Health::Failing(m) => Err(StorageError::Unavailable(m)),
            },
        }
    }

    /// Waits until everything queued so far is committed, at most until `deadline`.
    pub async fn flush(&self, deadline: Instant) -> Result<(), StorageError> {
        let generation = {
            let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            if open.changes.is_empty() && open.permits.is_empty() {
                open.generation - 1
            } else {
                open.generation
            }
        };
        self.committed(Ticket(generation), deadline).await
    }

    /// Operations queued and not yet committed.
    pub fn queued(&self) -> usize {
        self.config.max_queued - self.room.available_permits()
    }
}

/// Incarnations are 64-bit numbers compared unsigned; stores keep them in signed 64-bit integers with the top bit
/// flipped, so that the database orders them as the ring does.
pub fn ordered(incarnation: u64) -> i64 {
    (incarnation ^ (1 << 63)) as i64
}

/// The incarnation an [`ordered`] integer stands for.
pub fn unordered(stored: i64) -> u64 {
    (stored as u64) ^ (1 << 63)
}

/// The thing row for a thing's state.
pub fn thing_row(name: &ByteString, partition: u16, thing: &ThingState) -> StoredThing {
    StoredThing {
        name: name.clone(),
        partition,
        created_ms: thing.created_ms,
        description: thing.description.clone(),
        tags: thing.tags.clone(),
        described_ms: thing.described_ms,
        definitions: thing.definitions.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        incarnations: thing.incarnations.iter().copied().collect(),
    }
}

/// Every change that writes a thing's whole current state (a copy merged in from another worker).
pub fn snapshot(name: &ByteString, partition: u16, thing: &ThingState) -> Vec<Change> {
    let values = thing
        .properties
        .iter()
        .filter(|(p, _)| thing.definition(p).persisted)
        .map(|(p, s)| StoredValue {
            property: p.clone(),
            timestamp_ms: s.version.timestamp_ms,
            incarnation: s.version.incarnation,
            seq: s.version.seq,
            quality: s.quality,
            value: s.value.clone(),
            received_ms: s.received_ms,
            current: true,
            logged: false,
        })
        .collect();
    vec![
        Change::Thing(thing_row(name, partition, thing)),
        Change::Values { thing: name.clone(), values },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Flaky {
        failures: Mutex<u32>,
        written: Mutex<Vec<usize>>,
    }

    impl Provider for Flaky {
        fn shared(&self) -> bool {
            false
        }
        fn write(&self, batch: Arc<Vec<Change>>) -> BoxFuture<'_, Result<(), StorageError>> {
            Box::pin(async move {
                let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
                if *failures > 0 {
                    *failures -= 1;
                    return Err(StorageError::Unavailable("disk full".into()));
                }
                self.written.lock().unwrap_or_else(|e| e.into_inner()).push(batch.len());
                Ok(())
            })
        }
        fn table(&self) -> BoxFuture<'_, Result<Option<TableRecord>, StorageError>> {
            Box::pin(async { Ok(None) })
        }
        fn load(
            &self,
            _: Option<Vec<u16>>,
        ) -> BoxFuture<'_, Result<Vec<(ByteString, ThingState)>, StorageError>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn values(&self, _: HistoryQuery) -> BoxFuture<'_, Result<Vec<ValueRecord>, StorageError>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn events(&self, _: HistoryQuery) -> BoxFuture<'_, Result<Vec<EventRecord>, StorageError>> {
            Box::pin(async { Ok(Vec::new()) })
        }
    }

    #[test]
    fn incarnations_keep_their_order_in_a_signed_integer() {
        let samples = [0u64, 1, 7, 1 << 62, (1 << 63) - 1, 1 << 63, u64::MAX - 1, u64::MAX];
        for w in samples.windows(2) {
            assert!(ordered(w[0]) < ordered(w[1]));
            assert_eq!(unordered(ordered(w[0])), w[0]);
        }
    }

    fn change(n: u16) -> Change {
        Change::DropPartition(n)
    }

    /// A commit that fails is retried with the same changes; waiters learn of it only once it succeeded, and a full
    /// queue holds writers back instead of dropping anything.
    #[tokio::test(start_paused = true)]
    async fn failed_commits_are_retried_and_a_full_queue_waits() {
        let storage = Storage::new(QueueConfig { max_queued: 2, retry: Duration::from_millis(10) });
        let flaky = Arc::new(Flaky { failures: Mutex::new(3), ..Flaky::default() });
        let provider: Arc<dyn Provider> = flaky.clone();
        let stop = CancellationToken::new();
        tokio::spawn(
            storage.clone().run(move || std::future::ready(Ok(provider.clone())), stop.clone()),
        );
        storage.opened().await;
        let far = Instant::now() + Duration::from_secs(60);
        let a = storage.reserve(far).await.unwrap();
        let b = storage.reserve(far).await.unwrap();
        let ticket = storage.push(a, vec![change(1), change(2)]);
        // the queue is full until the first commit succeeds
        let soon = Instant::now() + Duration::from_millis(5);
        assert_eq!(storage.reserve(soon).await.unwrap_err(), StorageError::Timeout);
        assert!(matches!(
            storage.committed(ticket, Instant::now() + Duration::from_millis(5)).await,
            Err(StorageError::Unavailable(m)) if m.contains("disk full")
        ));
        assert!(matches!(storage.health(), Health::Failing(_)));
        storage.committed(ticket, far).await.unwrap();
        assert_eq!(storage.health(), Health::Ok);
        let ticket = storage.push(b, vec![change(3)]);
        storage.committed(ticket, far).await.unwrap();
        assert_eq!(
            *flaky.written.lock().unwrap(),
            vec![2, 1],
            "each batch once, in order, nothing lost"
        );
        storage.reserve(far).await.unwrap();
        stop.cancel();
    }
}
