//! The ring as one worker runs it: the partition table, the write and read paths, and table changes.
//!
//! **Writes.** A write goes to its partition's primary (in one hop when another worker received it). The primary
//! applies it, then sends it to every other holder of the partition — the backups of the table and, during a
//! change, the owners of the prepared next table — and answers only when all of them applied it. A write that
//! cannot complete (the primary or a backup is unreachable, a table is changing) is retried against the newest
//! table until the write timeout; every operation is idempotent, so a retry applies nothing twice.
//!
//! **Reads** are answered by the partition's primary.
//!
//! **Table changes.** The coordinator is the leader of the pool's consensus group (`coord`). When the active
//! members differ from the table's, more than half of the table's members are active, and the lease of every
//! member leaving has run out, it computes the next table from the current one (`Table::next`: ~1/N of the
//! replica slots move, none between survivors) and:
//! 1. *prepares* it on every active member, after which primaries replicate writes to its owners too;
//! 2. has every new owner of a partition *pull* a copy from a surviving holder, merging it with the writes it
//!    already received;
//! 3. *commits* it through the consensus log, which commits one table of each version at most, waiting for the
//!    entry's outcome however long it takes (an entry left open may still commit through a later leader), then
//!    sends it to every active member; every member also adopts each table its log applies, and drops the
//!    partitions it no longer holds. Before a change the leader applies every entry its predecessors committed.
//!
//! A step that fails abandons the change; the next attempt starts again from the committed table (if the members
//! are the table's again by then, a change to the same members replaces the prepared table left behind). Every member
//! sends its committed table to members it sees appear and, from the coordinator, periodically to all, so a member
//! outside the consensus group (one that joins) catches up. Only the first table, made before the group exists, is
//! not committed through the log.
//!
//! The decisions of a table change, and the rules a member follows to prepare and adopt a table and to accept a
//! copy, are in [`coordinator`](super::coordinator), without I/O: [`Cluster::coordinate`] feeds it what this worker
//! observes and the answers to its requests, and does what it returns. `ring::simulation` drives the same code on a
//! simulated clock and network.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::join_all;
use futures_util::stream::FuturesUnordered;
use thingport_protocol::peer::{
    CallOutcome as CallWire, ChangeRecord, ConsensusRpc, EventRecord, HistoryQuery, ListQuery, Op,
    Refusal, Request, Response, StreamPosition, ThingRecord, ThingSummary, UpdateRecord,
    ValueRecord,
};
use thingport_protocol::{ByteString, ErrorCode, Frame, Limits};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::calls::{CallOutcome, Calls, tag_of, tag_of_call};
use crate::model::ThingState;
use crate::ring::coordinator::{self, Coordinator, Facts, Input, Output, Settings};
use crate::ring::hub::{Hub, Page};
use crate::ring::membership::{self, Members, Membership};
use crate::ring::ops::{self, Refused};
use crate::ring::peers::{PeerError, Peers};
use crate::ring::placement::{PARTITIONS, Table, partition_of};
use crate::ring::store::Store;
use crate::storage::{self, Change, Durability, Storage, StorageError};

/// What the coordinator does when every holder of some partition is gone (and the store is not shared, so no
/// copy can be loaded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionLoss {
    /// Keep the table until a holder of each partition is back: the partitions led by the missing members stay
    /// unavailable meanwhile, and nothing acknowledged is lost.
    Wait,
    /// Change the table anyway: those partitions get new, empty copies, and what they held is lost.
    Reset,
}

/// Settings of the ring.
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// Copies of each partition, the primary included.
    pub replicas: usize,
    /// Active members needed before the first table is made.
    pub bootstrap_members: usize,
    /// How long a write or read keeps trying before it fails.
    pub write_timeout: Duration,
    /// How long one request to another worker may take.
    pub request_timeout: Duration,
    /// How often the coordinator checks the membership.
    pub check_period: Duration,
    /// How long the membership must stay unchanged before a worker without a table makes the first one (a worker
    /// joining a pool gets the pool's table within that time).
    pub settle: Duration,
    /// Limits of device frames and values.
    pub limits: Limits,
    /// Largest peer message.
    pub max_message: usize,
    /// When a write is acknowledged.
    pub durability: Durability,
    /// Mutual TLS on peer connections (the pool's credentials); plain TCP without.
    pub peer_tls: Option<thingport_shell::pool::Connector>,
    /// Bounds of the change log: changes and bytes.
    pub change_log: (usize, usize),
    /// What to do when every holder of a partition is gone.
    pub partition_loss: PartitionLoss,
}

/// Why a write or a read failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("the thing does not exist")]
    UnknownThing,
    #[error("the operation is not valid")]
    Invalid,
    #[error("the partition's owners did not answer in time, or could not store it")]
    Unavailable,
}

impl RingError {
    /// The code a gateway passes on to the device for a refused data frame.
    pub fn code(self) -> ErrorCode {
        match self {
            RingError::UnknownThing => ErrorCode::THING_NOT_ALLOWED,
            RingError::Invalid => ErrorCode::MALFORMED_FRAME,
            RingError::Unavailable => ErrorCode::UNAVAILABLE,
        }
    }
}

#[derive(Debug, Default)]
struct Tables {
    committed: Option<Arc<Table>>,
    pending: Option<Arc<Table>>,
}

/// One worker's part of the ring.
#[derive(Debug)]
pub struct Cluster {
    /// This worker's member key.
    pub me: String,
    pub config: RingConfig,
    pub store: Store,
    pub calls: Calls,
    /// The changes this worker applied as a primary, for streams.
    pub hub: Hub,
    /// This worker's gateway links, for the cluster view (set once the worker serves links).
    pub links: std::sync::OnceLock<Arc<crate::links::Links>>,
    /// This worker's member of the consensus group (set once it started).
    pub coord: std::sync::OnceLock<Arc<crate::coord::Consensus>>,
    tables: RwLock<Tables>,
    version: watch::Sender<u64>,
    members: watch::Receiver<Members>,
    membership: Membership,
    peers: Peers,
    storage: Arc<Storage>,
    this: std::sync::Weak<Cluster>,
    /// This worker's key in the table it recovered from its store: the run before this one, whose slots it may
    /// inherit (its store holds their state).
    previous_run: RwLock<Option<String>>,
    /// Replications still running after a `memory` acknowledgement.
    background: Arc<Semaphore>,
}

/// A member's counts for the cluster view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Things held (as primary or backup).
    pub things: u64,
    pub partitions_held: u32,
    pub primaries: u32,
    /// Gateways linked to it.
    pub gateways: Vec<String>,
}

/// A thing of a listing, ordered by its name.
struct ByName(ThingSummary);

impl PartialEq for ByName {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for ByName {}

impl PartialOrd for ByName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.name.cmp(&other.0.name)
    }
}

/// Replications a primary runs behind `memory` acknowledgements at most; beyond it writes wait.
const BACKGROUND_REPLICATIONS: usize = 16_384;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl Cluster {
    /// A worker's part of the ring. `version` publishes the committed table's version.
    pub fn new(
        membership: &Membership,
        config: RingConfig,
        storage: Arc<Storage>,
        version: watch::Sender<u64>,
    ) -> Arc<Cluster> {
        let me = membership.me.key();
        Arc::new_cyclic(|this| Cluster {
            this: this.clone(),
            calls: Calls::new(&me),
            peers: Peers::new(me.clone(), config.max_message, config.peer_tls.clone()),
            hub: Hub::new(config.change_log.0, config.change_log.1),
            links: std::sync::OnceLock::new(),
            coord: std::sync::OnceLock::new(),
            me,
            config,
            store: Store::default(),
            tables: RwLock::default(),
            version,
            members: membership.members.clone(),
            membership: membership.clone(),
            storage,
            previous_run: RwLock::new(None),
            background: Arc::new(Semaphore::new(BACKGROUND_REPLICATIONS)),
        })
    }

    /// Loads what the store holds: the table this worker's previous run last committed, and the state of the
    /// partitions that run held (with a shared store) or of every thing stored (with its own). Call before the
    /// worker takes part in the ring.
    pub async fn recover(&self) -> Result<usize, StorageError> {
        let provider = self.storage.opened().await;
        let table = provider.table().await?.and_then(Table::from_record);
        let name = membership::name_of(&self.me).to_string();
        let previous = table
            .as_ref()
            .and_then(|t| t.members.iter().find(|m| membership::name_of(m) == name).cloned());
        let partitions = match (&table, &previous, provider.shared()) {
            (_, _, false) => None,
            (Some(t), Some(prev), true) => {
                Some((0..PARTITIONS as u16).filter(|&p| t.holds(p, prev)).collect())
            }
            (_, _, true) => Some(Vec::new()),
        };
        let things = provider.load(partitions).await?;
        let count = things.len();
        for (name, state) in things {
            let p = partition_of(name.as_bytes());
            self.store.with(p, |part| part.insert(name, state));
        }
        *self.previous_run.write().unwrap_or_else(|e| e.into_inner()) = previous.clone();
        if let Some(table) = table {
            tracing::info!(version = table.version, previous = ?previous, things = count, "recovered from the store");
            self.version.send_replace(table.version);
            self.tables.write().unwrap_or_else(|e| e.into_inner()).committed =
                Some(Arc::new(table));
        }
        Ok(count)
    }

    /// The store behind this worker.
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// Whether this worker writes a change of a partition to its store: with its own store always, with a shared
    /// store only as the partition's primary.
    fn writes_store(&self, primary: bool) -> bool {
        primary || self.storage.provider().is_none_or(|p| !p.shared())
    }

    /// Queues changes that follow from the ring's own work (tables, partitions dropped or copied in). They are not
    /// counted against the queue's bound: their number follows the partitions held, not what peers send.
    fn keep(&self, changes: Vec<Change>) {
        if !changes.is_empty() {
            self.storage.push_unreserved(changes);
        }
    }

    /// Members of `table` that are gone while a later run of the same worker is active (see
    /// [`coordinator::renewals`]).
    fn renewals(&self, table: &Table) -> BTreeMap<String, String> {
        coordinator::renewals(table, &self.members.borrow())
    }

    /// Whether the committed table is current: it exists, a majority of its members is active, and none of them
    /// is a run that has since been restarted (the table that replaces it is on its way).
    pub fn is_current(&self) -> bool {
        self.table().is_some_and(|t| self.has_quorum(&t) && self.renewals(&t).is_empty())
    }

    /// Whether this worker is the primary of `thing`'s partition in the committed table.
    pub fn leads(&self, thing: &str) -> bool {
        let tables = self.tables.read().unwrap_or_else(|e| e.into_inner());
        let primary =
            tables.committed.as_ref().and_then(|t| t.primary(partition_of(thing.as_bytes())));
        primary == Some(self.me.as_str())
    }

    /// The committed table, if there is one yet.
    pub fn table(&self) -> Option<Arc<Table>> {
        self.tables.read().unwrap_or_else(|e| e.into_inner()).committed.clone()
    }

    /// The committed table's version (0 before the first), as it changes.
    pub fn table_version(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Whether a table change is prepared and not yet committed.
    pub fn changing(&self) -> bool {
        self.tables.read().unwrap_or_else(|e| e.into_inner()).pending.is_some()
    }

    /// Active members by key.
    pub fn members(&self) -> Members {
        self.members.borrow().clone()
    }

    /// The active members, as they change.
    pub fn watch_members(&self) -> watch::Receiver<Members> {
        self.members.clone()
    }

    /// Whether more than half of the table's members are active as this worker sees them. A worker cut off with a
    /// minority stops acknowledging writes once failure detection notices (`probe_period` + `suspect_timeout`): the
    /// majority side will move its partitions away.
    ///
    /// A table member that has been restarted (a member with its id and a later boot number is active) counts as
    /// present: its old run is certainly gone, not cut off, so a pool of two whose second worker was restarted can
    /// replace it.
    pub fn has_quorum(&self, table: &Table) -> bool {
        coordinator::has_quorum(table, &self.members.borrow())
    }

    /// Whether `table` is older than the newest table a leader's lease grant named: this worker missed a change
    /// (it was paused or cut off) and has not caught up with the log yet, so it leads no partition under `table`.
    fn behind_log(&self, table: &Table) -> bool {
        self.coord.get().is_some_and(|c| table.version < c.lease_table_version())
    }

    /// Whether this worker holds a primary lease from the consensus group (`coord::lease`): without one it
    /// acknowledges no write.
    pub fn in_contact(&self) -> bool {
        self.coord.get().is_some_and(|c| c.holds_lease())
    }

    /// Partitions of `table` none of whose holders is among `active`, unless the store is shared (a new owner then
    /// loads them from it).
    fn unheld_in(&self, table: &Table, active: &[String]) -> usize {
        if self.storage.provider().is_some_and(|p| p.shared()) {
            return 0;
        }
        coordinator::unheld_in(table, active)
    }

    /// Partitions of the committed table with no active holder, as this worker sees the members (0 with a shared
    /// store).
    pub fn unheld(&self) -> usize {
        let Some(table) = self.table() else { return 0 };
        let active: Vec<String> = self.members.borrow().keys().cloned().collect();
        let renames = self.renewals(&table);
        let effective = if renames.is_empty() { (*table).clone() } else { table.renamed(&renames) };
        self.unheld_in(&effective, &active)
    }

    /// Sends a request to a member (this worker included) and waits for the answer.
    fn call<'a>(
        &'a self,
        key: &'a str,
        request: Request,
        timeout: Duration,
    ) -> BoxFuture<'a, Option<Response>> {
        Box::pin(async move {
            if key == self.me {
                return Some(self.handle(request).await);
            }
            let node = self.members.borrow().get(key).cloned()?;
            match self.peers.request(key, node.addr, request, timeout).await {
                Ok(response) => Some(response),
                Err(PeerError::Refused) => {
                    self.membership.gone(&node);
                    None
                }
                Err(_) => None,
            }
        })
    }

    /// Sends a request to the latest run of the worker with this configured id (this worker included).
    pub async fn call_worker(
        &self,
        name: &str,
        request: Request,
        timeout: Duration,
    ) -> Option<Response> {
        let key = if membership::name_of(&self.me) == name {
            self.me.clone()
        } else {
            let members = self.members.borrow();
            members.values().filter(|n| n.name == name).max_by_key(|n| n.boot)?.key()
        };
        self.call(&key, request, timeout).await
    }

    /// Waits for a newer table or a short while, whichever comes first.
    async fn backoff(&self, deadline: Instant) -> bool {
        if Instant::now() >= deadline {
            return false;
        }
        let mut version = self.version.subscribe();
        let pause = Duration::from_millis(50).min(deadline - Instant::now());
        let _ = tokio::time::timeout(pause, version.changed()).await;
        true
    }

    /// Applies a write through its partition's primary; returns once every holder applied it.
    pub async fn write(&self, op: Op) -> Result<(), RingError> {
        let partition = partition_of(op.thing().as_bytes());
        let deadline = Instant::now() + self.config.write_timeout;
        loop {
            let primary = self.table().and_then(|t| t.primary(partition).map(String::from));
            if let Some(primary) = primary {
                let request =
                    Request::Write { partition, replica: false, version: 0, op: op.clone() };
                match self.call(&primary, request, self.config.request_timeout).await {
                    Some(Response::Done) => {
                        crate::per_op().ring_writes.increment(1);
                        return Ok(());
                    }
                    Some(Response::Refused { refusal: Refusal::UnknownThing, .. }) => {
                        return Err(RingError::UnknownThing);
                    }
                    Some(Response::Refused { refusal: Refusal::Invalid, .. }) => {
                        return Err(RingError::Invalid);
                    }
                    _ => {}
                }
            }
            ::metrics::counter!(crate::telemetry::RING_RETRIES_TOTAL).increment(1);
            if !self.backoff(deadline).await {
                ::metrics::counter!(crate::telemetry::RING_WRITE_FAILURES_TOTAL).increment(1);
                return Err(RingError::Unavailable);
            }
        }
    }

    /// A thing's state, read on its partition's primary.
    pub async fn read(&self, thing: &str) -> Result<Option<ThingState>, RingError> {
        let partition = partition_of(thing.as_bytes());
        let deadline = Instant::now() + self.config.write_timeout;
        loop {
            let primary = self.table().and_then(|t| t.primary(partition).map(String::from));
            if let Some(primary) = primary {
                let request = Request::Read { thing: thing.to_string() };
                if let Some(Response::Thing(record)) =
                    self.call(&primary, request, self.config.request_timeout).await
                {
                    crate::per_op().ring_reads.increment(1);
                    return match record {
                        None => Ok(None),
                        Some(r) => ops::from_record(&r, &self.config.limits)
                            .map(Some)
                            .ok_or(RingError::Invalid),
                    };
                }
            }
            if !self.backoff(deadline).await {
                return Err(RingError::Unavailable);
            }
        }
    }

    /// One page of the things matching `query`, in name order, from each member's primaries, with how many match
    /// in all; `false` if some member did not answer, or if the members still listed under different tables after
    /// a few tries (a partition could then be missing or counted twice).
    pub async fn list(&self, query: ListQuery) -> (Vec<ThingSummary>, u64, bool) {
        let deadline = Instant::now() + self.config.request_timeout;
        loop {
            let Some(table) = self.table() else { return (Vec::new(), 0, false) };
            let request = || Request::List { query: query.clone() };
            let answers = join_all(
                table.members.iter().map(|m| self.call(m, request(), self.config.request_timeout)),
            )
            .await;
            let mut answered = true;
            let mut one_table = true;
            let mut things = BTreeMap::new();
            let mut total = 0;
            for answer in answers {
                match answer {
                    Some(Response::Things { things: page, matching, table_version }) => {
                        one_table &= table_version == table.version;
                        total += matching;
                        things.extend(page.into_iter().map(|t| (t.name.clone(), t)));
                    }
                    _ => answered = false,
                }
            }
            // members that listed under another table: ask again once the tables agree, within the timeout
            if answered && !one_table && self.backoff(deadline).await {
                continue;
            }
            let page = things.into_values().take(query.limit as usize).collect();
            return (page, total, answered && one_table);
        }
    }

    /// This worker's page of a listing: of the partitions it leads, the first `limit` matching names after
    /// `after`, and how many match.
    fn list_led(&self, table: &Table, query: &ListQuery) -> Response {
        let mine = |p: u16| table.primary(p) == Some(self.me.as_str());
        let mut matching = 0u64;
        // the `limit` smallest names after `after`: a max-heap by name, trimmed as it fills
        let mut page: std::collections::BinaryHeap<ByName> = std::collections::BinaryHeap::new();
        let limit = query.limit as usize;
        self.store.list(mine, |name, thing| {
            if !query.matches(name, &thing.tags, thing.binding.is_some()) {
                return;
            }
            matching += 1;
            if query.after.as_deref().is_some_and(|a| &**name <= a) || limit == 0 {
                return;
            }
            if page.len() < limit {
                page.push(ByName(ops::summary(name, thing)));
            } else if page.peek().is_some_and(|top| **name < *top.0.name) {
                page.pop();
                page.push(ByName(ops::summary(name, thing)));
            }
        });
        let things = page.into_sorted_vec().into_iter().map(|t| t.0).collect();
        Response::Things { things, matching, table_version: table.version }
    }

    /// Changes from a member's change log (this worker's included): see [`Request::Watch`].
    pub async fn watch(
        &self,
        member: &str,
        after: Option<u64>,
        max: u32,
        wait: Duration,
    ) -> Option<Page> {
        let request = Request::Watch { after, max, wait_ms: wait.as_millis() as u32 };
        match self.call(member, request, wait + self.config.request_timeout).await? {
            Response::Updates { first, next, updates } => {
                Some(Page { first, next, updates: updates.into_iter().map(Arc::new).collect() })
            }
            _ => None,
        }
    }

    /// Counts from every active member: (member key, things held, partitions held, primaries).
    pub async fn stats(&self) -> Vec<(String, Option<Stats>)> {
        let members: Vec<String> = self.members().keys().cloned().collect();
        let answers = join_all(
            members.iter().map(|m| self.call(m, Request::Stats, self.config.request_timeout)),
        )
        .await;
        members
            .into_iter()
            .zip(answers)
            .map(|(m, a)| match a {
                Some(Response::Stats { things, partitions_held, primaries, gateways }) => {
                    (m, Some(Stats { things, partitions_held, primaries, gateways }))
                }
                _ => (m, None),
            })
            .collect()
    }

    /// Members whose stores hold history: this worker alone with a shared store, else every active member (a
    /// worker keeps the history of partitions it held before).
    fn history_holders(&self) -> Vec<String> {
        if self.storage.provider().is_some_and(|p| p.shared()) {
            vec![self.me.clone()]
        } else {
            self.members().keys().cloned().collect()
        }
    }

    /// A page of a property's value stream, merged from every store that holds part of it; `false` if one did not
    /// answer (the page may then lack its values).
    pub async fn values(&self, query: HistoryQuery) -> (Vec<ValueRecord>, bool) {
        let holders = self.history_holders();
        let answers = join_all(holders.iter().map(|m| {
            self.call(m, Request::History { query: query.clone() }, self.config.request_timeout)
        }))
        .await;
        let mut complete = true;
        let mut all = Vec::new();
        for answer in answers {
            match answer {
                Some(Response::Values(values)) => all.extend(values),
                _ => complete = false,
            }
        }
        (storage::sqlite::page(all, &query), complete)
    }

    /// A page of a thing's event stream, merged as [`Cluster::values`] merges.
    pub async fn events(&self, query: HistoryQuery) -> (Vec<EventRecord>, bool) {
        let holders = self.history_holders();
        let answers = join_all(holders.iter().map(|m| {
            self.call(m, Request::Events { query: query.clone() }, self.config.request_timeout)
        }))
        .await;
        let mut complete = true;
        let mut all: Vec<EventRecord> = Vec::new();
        for answer in answers {
            match answer {
                Some(Response::Events(events)) => all.extend(events),
                _ => complete = false,
            }
        }
        let position = |e: &EventRecord| StreamPosition(e.epoch_ms, e.incarnation, e.seq);
        all.sort_by_key(position);
        if query.newest_first {
            all.reverse();
        }
        let mut seen = BTreeSet::new();
        all.retain(|e| seen.insert((e.incarnation, e.seq)));
        all.truncate(query.limit as usize);
        (all, complete)
    }

    /// Removes a thing's (or a property's) history from every member's store. With a shared store the primary's
    /// operation removed it already; every member is still told, so that it forgets what it knew of the removed
    /// streams.
    pub async fn purge(&self, thing: &str, property: Option<&str>) {
        let members: Vec<String> = self.members().keys().cloned().collect();
        join_all(members.iter().map(|m| {
            let request =
                Request::Purge { thing: thing.to_string(), property: property.map(String::from) };
            self.call(m, request, self.config.request_timeout)
        }))
        .await;
    }

    /// Ends a service call: here if this worker started it, else at the worker that did.
    pub async fn complete_call(&self, call_id: u64, outcome: CallWire) {
        if self.calls.is_mine(call_id) {
            if let Some(outcome) = self.outcome(outcome) {
                self.calls.complete(call_id, outcome);
            }
            return;
        }
        let tag = tag_of_call(call_id);
        let owners: Vec<String> =
            self.members().keys().filter(|k| tag_of(k) == tag).cloned().collect();
        for owner in owners {
            let request = Request::Complete { call_id, outcome: outcome.clone() };
            self.call(&owner, request, self.config.request_timeout).await;
        }
    }

    fn outcome(&self, outcome: CallWire) -> Option<CallOutcome> {
        match outcome {
            CallWire::Answered { frame } => match Frame::decode(frame, &self.config.limits) {
                Ok(Frame::ServiceResponse(response)) => {
                    Some(CallOutcome::Answered(response.result))
                }
                _ => None,
            },
            CallWire::Undeliverable { code } => Some(CallOutcome::Undeliverable(ErrorCode(code))),
            CallWire::Delivered => Some(CallOutcome::Delivered),
        }
    }

    fn refused(&self, refusal: Refusal) -> Response {
        Response::Refused { refusal, table_version: self.table().map_or(0, |t| t.version) }
    }

    /// Answers a request from another worker (or from this one).
    pub fn handle(&self, request: Request) -> BoxFuture<'_, Response> {
        Box::pin(async move {
            match request {
                Request::Write { partition, op, .. }
                    if partition != partition_of(op.thing().as_bytes()) =>
                {
                    // also keeps a partition number out of range from indexing the stores
                    self.refused(Refusal::Invalid)
                }
                Request::Write { partition, replica: false, op, .. } => {
                    self.lead(partition, op).await
                }
                Request::Write { partition, replica: true, version, op } => {
                    self.replicate(partition, version, op).await
                }
                Request::Read { thing } => {
                    let partition = partition_of(thing.as_bytes());
                    match self.table() {
                        Some(t) if t.primary(partition) == Some(self.me.as_str()) => {
                            if self.behind_log(&t) {
                                self.refused(Refusal::NotPrimary)
                            } else {
                                Response::Thing(
                                    self.store
                                        .get(&thing)
                                        .map(|state| ops::to_record(&thing, &state)),
                                )
                            }
                        }
                        Some(_) => self.refused(Refusal::NotPrimary),
                        None => self.refused(Refusal::NoTable),
                    }
                }
                Request::Consensus { rpc, body } => match self.coord.get() {
                    Some(coord) => coord.serve(rpc, &body).await,
                    None => self.refused(Refusal::NotLeader),
                },
                Request::Lock { command } => {
                    let deadline = Instant::now() + self.config.request_timeout;
                    match self.coord.get() {
                        Some(coord) => match coord.lead(command, deadline).await {
                            Ok(outcome) => Response::Lock(outcome),
                            Err(_) => self.refused(Refusal::NotLeader),
                        },
                        None => self.refused(Refusal::NotLeader),
                    }
                }
                Request::Lease { worker, forwarded } => match self.coord.get() {
                    Some(coord) => match coord.grant(&worker, forwarded).await {
                        Some((remaining_ms, table_version)) => {
                            Response::Lease { remaining_ms, table_version }
                        }
                        None => self.refused(Refusal::NotLeader),
                    },
                    None => self.refused(Refusal::NotLeader),
                },
                Request::ReadLock { name } => {
                    let deadline = Instant::now() + self.config.request_timeout;
                    match self.coord.get() {
                        Some(coord) => match coord.read_here(&name, deadline).await {
                            Ok(outcome) => Response::Lock(outcome),
                            Err(_) => self.refused(Refusal::NotLeader),
                        },
                        None => self.refused(Refusal::NotLeader),
                    }
                }
                Request::List { query } => {
                    let Some(t) = self.table() else { return self.refused(Refusal::NoTable) };
                    self.list_led(&t, &query)
                }
                Request::Watch { after, max, wait_ms } => {
                    // an answer fits in half a peer message, whatever the changes weigh
                    let wait = Duration::from_millis(u64::from(wait_ms).min(60_000));
                    let page = self
                        .hub
                        .watch(after, max as usize, self.config.max_message / 2, wait)
                        .await;
                    Response::Updates {
                        first: page.first,
                        next: page.next,
                        updates: page.updates.iter().map(|u| UpdateRecord::clone(u)).collect(),
                    }
                }
                Request::Fetch { partitions } => {
                    let copies = partitions
                        .into_iter()
                        .filter(|&p| (p as usize) < PARTITIONS)
                        .map(|p| {
                            let records: Vec<ThingRecord> = self.store.with(p, |part| {
                                part.iter().map(|(name, t)| ops::to_record(name, t)).collect()
                            });
                            (p, records)
                        })
                        .collect();
                    Response::Partitions(copies)
                }
                Request::Stats => {
                    let held = self.table().map_or((0, 0), |t| {
                        let held = (0..PARTITIONS as u16).filter(|&p| t.holds(p, &self.me)).count();
                        let led = (0..PARTITIONS as u16)
                            .filter(|&p| t.primary(p) == Some(self.me.as_str()))
                            .count();
                        (held as u32, led as u32)
                    });
                    let things = self.store.counts().iter().sum::<usize>() as u64;
                    let gateways = self.links.get().map(|l| l.names()).unwrap_or_default();
                    Response::Stats { things, partitions_held: held.0, primaries: held.1, gateways }
                }
                Request::Prepare { table } => self.prepare(table),
                Request::Pull { version, sources } => self.pull(version, sources).await,
                Request::Commit { table } => self.commit(table),
                Request::Table { table } => {
                    if let Some(table) = Table::from_record(table) {
                        self.adopt(Arc::new(table));
                    }
                    Response::Done
                }
                Request::Complete { call_id, outcome } => {
                    if let Some(outcome) = self.outcome(outcome) {
                        self.calls.complete(call_id, outcome);
                    }
                    Response::Done
                }
                Request::History { query } => match self.storage.provider() {
                    Some(p) => match p.values(query).await {
                        Ok(values) => Response::Values(values),
                        Err(_) => self.refused(Refusal::Unavailable),
                    },
                    None => self.refused(Refusal::Unavailable),
                },
                Request::Events { query } => match self.storage.provider() {
                    Some(p) => match p.events(query).await {
                        Ok(events) => Response::Events(events),
                        Err(_) => self.refused(Refusal::Unavailable),
                    },
                    None => self.refused(Refusal::Unavailable),
                },
                Request::Purge { thing, property } => {
                    self.keep(vec![Change::Remove {
                        thing: thing.into(),
                        property: property.map(ByteString::from),
                    }]);
                    Response::Done
                }
            }
        })
    }

    /// As the primary: apply, then have every other holder apply, then answer — after the store committed it too
    /// with `durability = disk`, or at once after applying it with `memory`.
    async fn lead(&self, partition: u16, mut op: Op) -> Response {
        let Some(table) = self.table() else { return self.refused(Refusal::NoTable) };
        if table.primary(partition) != Some(self.me.as_str()) {
            return self.refused(Refusal::NotPrimary);
        }
        if !self.has_quorum(&table) || !self.in_contact() || self.behind_log(&table) {
            return self.refused(Refusal::Unavailable);
        }
        let deadline = Instant::now() + self.config.request_timeout;
        // the change log is kept only while streams read it
        let kept = self.hub.kept();
        let mut updates = Vec::new();
        let log = kept.then_some(&mut updates);
        let ticket = match self.apply_and_keep(partition, &mut op, false, log, deadline).await {
            Ok(ticket) => ticket,
            Err(refusal) => return self.refused(refusal),
        };
        let mut response = self.acknowledge(partition, op, ticket, deadline).await;
        // the lease may have run out while the copies were made: then nothing is acknowledged
        if response == Response::Done && !self.in_contact() {
            response = self.refused(Refusal::Unavailable);
        }
        // applied here whatever the answer (reads show it, and the caller's retry changes nothing), so logged
        // whatever the answer
        if kept {
            self.hub.publish(updates);
        } else {
            self.hub.skip();
        }
        response
    }

    /// As the primary, after applying: the answer once the write is as durable as configured.
    async fn acknowledge(
        &self,
        partition: u16,
        op: Op,
        ticket: Option<storage::Ticket>,
        deadline: Instant,
    ) -> Response {
        // the copies are sent after applying: a table prepared after this point is covered by the copy its owners
        // pull
        let replicate = |op: Op| self.copy_to_holders(partition, op);
        match self.config.durability {
            Durability::Memory => {
                // acknowledged now; the copies follow in the background, within a bound
                let Ok(permit) = self.background.clone().acquire_owned().await else {
                    return self.refused(Refusal::Unavailable);
                };
                let this = self.clone_for_background();
                tokio::spawn(async move {
                    if let Some(this) = this {
                        this.replicate_in_background(partition, op).await;
                    }
                    drop(permit);
                });
                Response::Done
            }
            Durability::Replicated => {
                if replicate(op).await {
                    Response::Done
                } else {
                    self.refused(Refusal::Unavailable)
                }
            }
            Durability::Disk => {
                let (replicated, stored) = tokio::join!(replicate(op), async {
                    match ticket {
                        Some(ticket) => self.storage.committed(ticket, deadline).await,
                        None => Ok(()),
                    }
                });
                if replicated && stored.is_ok() {
                    Response::Done
                } else {
                    self.refused(Refusal::Unavailable)
                }
            }
        }
    }

    /// Applies an operation to this worker's copy of its partition and queues what the store keeps of it, in the
    /// order of the partition's lock; returns the ticket to wait for, if this worker writes the store. A primary
    /// that keeps a change log passes `updates`, which receives the changes a stream shows.
    async fn apply_and_keep(
        &self,
        partition: u16,
        op: &mut Op,
        replica: bool,
        updates: Option<&mut Vec<(String, Vec<String>, ChangeRecord)>>,
        deadline: Instant,
    ) -> Result<Option<storage::Ticket>, Refusal> {
        let keeps = self.writes_store(!replica);
        let reservation = if keeps {
            Some(self.storage.reserve(deadline).await.map_err(|_| Refusal::Unavailable)?)
        } else {
            None
        };
        let limits = self.config.limits;
        self.store.with(partition, |p| {
            let mut changes = Vec::new();
            let bound = updates.is_some().then(|| ops::bound(p, op.thing()));
            let applied = ops::apply(p, partition, op, &limits, replica, &mut changes);
            if let (Ok(()), Some(updates), Some(bound)) = (&applied, updates, bound) {
                ops::updates(p, op, bound, &changes, updates);
            }
            match applied {
                // nothing to keep (a binding): nothing to wait for
                Ok(()) if changes.is_empty() => Ok(None),
                Ok(()) => Ok(reservation.map(|r| self.storage.push(r, changes))),
                Err(Refused::UnknownThing) => Err(Refusal::UnknownThing),
                Err(Refused::Invalid) => Err(Refusal::Invalid),
            }
        })
    }

    fn clone_for_background(&self) -> Option<Arc<Cluster>> {
        self.this.upgrade()
    }

    /// Has every other holder of the partition (in the committed table and a prepared one) apply `op`; true once all
    /// did.
    async fn copy_to_holders(&self, partition: u16, op: Op) -> bool {
        let (targets, version) = {
            let tables = self.tables.read().unwrap_or_else(|e| e.into_inner());
            coordinator::copy_targets(
                &self.me,
                tables.committed.as_deref(),
                tables.pending.as_deref(),
                partition,
            )
        };
        let request = |op: Op| Request::Write { partition, replica: true, version, op };
        let answers = join_all(
            targets.iter().map(|t| self.call(t, request(op.clone()), self.config.request_timeout)),
        )
        .await;
        crate::per_op().ring_replications.increment(targets.len() as u64);
        answers.iter().all(|a| matches!(a, Some(Response::Done)))
    }

    /// Replicates a write acknowledged under `durability = memory`, retrying against newer tables until the write
    /// timeout; a copy that cannot be made is logged and counted.
    async fn replicate_in_background(&self, partition: u16, op: Op) {
        let deadline = Instant::now() + self.config.write_timeout;
        while !self.copy_to_holders(partition, op.clone()).await {
            if !self.backoff(deadline).await {
                ::metrics::counter!(crate::telemetry::RING_BACKGROUND_REPLICATION_FAILURES_TOTAL)
                    .increment(1);
                tracing::warn!(
                    partition,
                    "a write acknowledged in memory could not be copied to every backup"
                );
                return;
            }
        }
    }

    /// As a backup: apply if this worker holds the partition in the committed or the prepared table, and the
    /// primary knows a table (committed or prepared) at least as new as this worker's newest: a primary that was
    /// left out of a change (it was paused or cut off while the others prepared it) cannot have a write
    /// acknowledged that the change's new owners would miss. With `durability = disk` and a store of its own, it
    /// answers once its store committed the write.
    async fn replicate(&self, partition: u16, version: u64, mut op: Op) -> Response {
        let accepted = {
            let tables = self.tables.read().unwrap_or_else(|e| e.into_inner());
            coordinator::accepts_copy(
                &self.me,
                tables.committed.as_deref(),
                tables.pending.as_deref(),
                partition,
                version,
            )
        };
        if let Err(refusal) = accepted {
            return self.refused(refusal);
        }
        let deadline = Instant::now() + self.config.request_timeout;
        let ticket = match self.apply_and_keep(partition, &mut op, true, None, deadline).await {
            Ok(ticket) => ticket,
            Err(_) => return self.refused(Refusal::Invalid),
        };
        match (self.config.durability, ticket) {
            (Durability::Disk, Some(ticket)) => {
                match self.storage.committed(ticket, deadline).await {
                    Ok(()) => Response::Done,
                    Err(_) => self.refused(Refusal::Unavailable),
                }
            }
            _ => Response::Done,
        }
    }

    fn prepare(&self, record: thingport_protocol::peer::TableRecord) -> Response {
        let Some(next) = Table::from_record(record) else {
            return self.refused(Refusal::Invalid);
        };
        let logged = self.coord.get().and_then(|c| c.logged_table());
        let mut tables = self.tables.write().unwrap_or_else(|e| e.into_inner());
        let previous = self.previous_run.read().unwrap_or_else(|e| e.into_inner()).clone();
        let empty = coordinator::prepare(
            &self.me,
            previous.as_deref(),
            tables.committed.as_deref(),
            tables.pending.as_deref(),
            logged,
            &next,
        );
        let empty = match empty {
            Ok(empty) => empty,
            Err(newer) => return Response::Prepared { newer: Some(newer) },
        };
        let dropped: Vec<Change> = empty
            .into_iter()
            .filter(|&p| self.store.clear(p) > 0)
            .map(Change::DropPartition)
            .collect();
        if self.writes_store(false) {
            self.keep(dropped);
        }
        tables.pending = Some(Arc::new(next));
        Response::Prepared { newer: None }
    }

    async fn pull(&self, version: u64, sources: Vec<(u16, String)>) -> Response {
        let prepared = self.tables.read().unwrap_or_else(|e| e.into_inner()).pending.clone();
        if prepared.is_none_or(|t| t.version != version) {
            return self.refused(Refusal::Stale);
        }
        let limits = self.config.limits;
        // with a shared store, what it holds of these partitions first: the source's copy is merged on top
        if let Some(provider) = self.storage.provider().filter(|p| p.shared()) {
            let partitions: Vec<u16> = sources.iter().map(|(p, _)| *p).collect();
            match provider.load(Some(partitions)).await {
                Ok(things) => {
                    for (name, state) in things {
                        let p = partition_of(name.as_bytes());
                        self.store.with(p, |part| ops::merge(part, state, &name));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot load gained partitions from the shared store");
                    return self.refused(Refusal::CopyFailed);
                }
            }
        }
        let mut last = None;
        let mut by_source: BTreeMap<String, Vec<u16>> = BTreeMap::new();
        for (p, source) in sources.into_iter().filter(|(_, s)| *s != self.me) {
            by_source.entry(source).or_default().push(p);
        }
        let mut copied = 0usize;
        for (source, partitions) in by_source {
            for chunk in partitions.chunks(64) {
                let request = Request::Fetch { partitions: chunk.to_vec() };
                let timeout = self.config.write_timeout.max(Duration::from_secs(30));
                let Some(Response::Partitions(copies)) = self.call(&source, request, timeout).await
                else {
                    return self.refused(Refusal::CopyFailed);
                };
                for (p, records) in copies {
                    if (p as usize) >= PARTITIONS {
                        continue;
                    }
                    copied += records.len();
                    let keeps = self.writes_store(false);
                    let changes = self.store.with(p, |part| {
                        let mut changes = Vec::new();
                        for record in &records {
                            if let Some(state) = ops::from_record(record, &limits) {
                                ops::merge(part, state, &record.name);
                                let name = ByteString::from(record.name.as_str());
                                if let (true, Some(merged)) = (keeps, part.get(&name)) {
                                    changes.extend(storage::snapshot(&name, p, merged));
                                }
                            }
                        }
                        changes
                    });
                    if !changes.is_empty() {
                        last = Some(self.storage.push_unreserved(changes));
                    }
                }
            }
        }
        ::metrics::counter!(crate::telemetry::RING_THINGS_COPIED_TOTAL).increment(copied as u64);
        // with `disk`, the new copy is on disk before the table that relies on it can commit
        if let (Durability::Disk, Some(ticket)) = (self.config.durability, last) {
            let deadline = Instant::now() + self.config.write_timeout;
            if self.storage.committed(ticket, deadline).await.is_err() {
                return self.refused(Refusal::CopyFailed);
            }
        }
        Response::Done
    }

    /// Adopts the coordinator's table itself, not this worker's prepared one: an abandoned attempt may have left a
    /// different table of the same version prepared here.
    fn commit(&self, record: thingport_protocol::peer::TableRecord) -> Response {
        let Some(table) = Table::from_record(record) else {
            return self.refused(Refusal::Invalid);
        };
        self.adopt(Arc::new(table));
        Response::Done
    }

    /// Adopts a table the consensus log committed (see [`Cluster::adopt`]).
    pub fn adopt_record(&self, record: thingport_protocol::peer::TableRecord) {
        if let Some(table) = Table::from_record(record) {
            self.adopt(Arc::new(table));
        }
    }

    /// Makes `table` the committed table if it is newer, and drops the partitions this worker no longer holds.
    fn adopt(&self, table: Arc<Table>) {
        {
            let mut tables = self.tables.write().unwrap_or_else(|e| e.into_inner());
            if tables.committed.as_ref().is_some_and(|c| c.version >= table.version) {
                return;
            }
            if tables.pending.as_ref().is_some_and(|p| p.version <= table.version) {
                tables.pending = None;
            }
            tables.committed = Some(table.clone());
            // the previous run's slots stay this worker's to inherit while a table names that run
            let mut previous = self.previous_run.write().unwrap_or_else(|e| e.into_inner());
            if previous.as_ref().is_some_and(|prev| !table.members.contains(prev)) {
                *previous = None;
            }
            let mut changes = vec![Change::Table(table.to_record())];
            let dropped = coordinator::dropped_by(
                &self.me,
                previous.as_deref(),
                &table,
                tables.pending.as_deref(),
            );
            for p in dropped {
                if self.store.clear(p) > 0 {
                    changes.push(Change::DropPartition(p));
                }
            }
            if !self.writes_store(false) {
                changes.truncate(1);
            }
            self.keep(changes);
        }
        tracing::info!(version = table.version, members = ?table.members, "partition table committed");
        ::metrics::gauge!(crate::telemetry::RING_TABLE_VERSION).set(table.version as f64);
        let held = (0..PARTITIONS as u16).filter(|&p| table.holds(p, &self.me)).count();
        ::metrics::gauge!(crate::telemetry::RING_PARTITIONS_HELD).set(held as f64);
        self.version.send_replace(table.version);
    }

    /// Runs the coordinator's checks until `stop`: drives this worker's [`Coordinator`] with the members, the
    /// tables, the consensus group and the peers. Every member runs this; only the coordinator changes tables.
    pub async fn coordinate(self: Arc<Self>, stop: CancellationToken) {
        let settings = Settings {
            replicas: self.config.replicas,
            bootstrap_members: self.config.bootstrap_members,
            settle: self.config.settle,
            check_period: self.config.check_period,
            request_timeout: self.config.request_timeout,
            copy_timeout: self.config.write_timeout.max(Duration::from_secs(60)),
            partition_loss: self.config.partition_loss,
            shared_store: self.storage.provider().is_some_and(|p| p.shared()),
        };
        let mut machine = Coordinator::new(self.me.clone(), settings, Instant::now());
        let mut members = self.members.clone();
        let mut tick = tokio::time::interval(self.config.check_period);
        // the coordinator's open requests: those of its current phase, at most one per active member
        let mut pending: FuturesUnordered<BoxFuture<'_, Input>> = FuturesUnordered::new();
        loop {
            while let Some(output) = machine.poll_output() {
                self.perform(output, &mut pending);
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = members.changed() => {
                    if changed.is_err() { return }
                    machine.members_changed(Instant::now());
                }
                _ = tick.tick() => {}
                Some(input) = pending.next() => {
                    let busy = machine.busy();
                    machine.handle(input);
                    // a change that ended (done or abandoned) is followed by a check at once
                    if !busy || machine.busy() {
                        continue;
                    }
                }
            }
            let active = self.members.borrow().clone();
            let table = self.table();
            let coord = self.coord.get();
            machine.check(Facts {
                now: Instant::now(),
                members: &active,
                table: table.as_ref(),
                changing: self.changing(),
                leads: coord.is_some_and(|c| c.leads()),
                in_contact: self.in_contact(),
            });
        }
    }

    /// Does what the coordinator asked for; what needs an answer joins `pending`.
    fn perform<'a>(
        self: &'a Arc<Self>,
        output: Output,
        pending: &mut FuturesUnordered<BoxFuture<'a, Input>>,
    ) {
        let coord = self.coord.get();
        match output {
            Output::SendTable { to, table } => self.send_table(to, &table),
            Output::Adopt(table) => self.adopt(table),
            Output::WithholdOnly(ids) => {
                if let Some(coord) = coord {
                    coord.withhold_only(&ids);
                }
            }
            Output::Withhold(ids) => {
                if let Some(coord) = coord {
                    coord.withhold(&ids);
                }
            }
            Output::AskEnded { id, member, addr } => pending.push(Box::pin(async move {
                Input::Ended { id, ended: self.lease_ended(&member, addr).await }
            })),
            Output::ReadLog { id } => {
                let timeout = self.config.request_timeout;
                pending.push(Box::pin(async move {
                    let table = match coord {
                        Some(coord) => coord.committed_table(timeout).await.map_err(|_| ()),
                        None => Err(()),
                    };
                    Input::Log { id, table }
                }))
            }
            Output::Request { id, to, request, timeout } => pending.push(Box::pin(async move {
                Input::Answer { id, answer: self.call(&to, request, timeout).await }
            })),
            Output::CommitLog { id, table } => pending.push(Box::pin(async move {
                let committed = match coord {
                    Some(coord) => coord.commit_table(table).await.map_err(|_| ()),
                    None => Err(()),
                };
                Input::Logged { id, committed }
            })),
            Output::Unheld(unheld) => {
                ::metrics::gauge!(crate::telemetry::RING_PARTITIONS_UNHELD).set(unheld as f64)
            }
            Output::Changed { version, moved, started } => {
                tracing::info!(
                    version,
                    moved,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "partition table changed"
                );
                ::metrics::counter!(crate::telemetry::RING_TABLE_CHANGES_TOTAL).increment(1);
                ::metrics::counter!(crate::telemetry::RING_PARTITIONS_MOVED_TOTAL)
                    .increment(moved as u64);
            }
        }
    }

    /// Whether the primary lease of `member`, which left this worker's view, has certainly run out: its peer port
    /// refuses connections (its process is gone), or, as the consensus group's leader (which withholds leases from
    /// it by now), the lease this worker or its predecessor granted it has run out.
    async fn lease_ended(&self, member: &str, addr: Option<std::net::SocketAddr>) -> bool {
        if let Some(addr) = addr
            && self.gone_for_sure(member, addr).await
        {
            return true;
        }
        let name = membership::name_of(member);
        self.coord.get().and_then(|c| c.lease_left(name)).is_some_and(|left| left.is_zero())
    }

    /// Whether a member's process is certainly gone: its peer port refuses connections (a worker keeps that port
    /// until it exits). A member that answers, or that cannot be reached at all, may still hold a lease.
    async fn gone_for_sure(&self, key: &str, addr: std::net::SocketAddr) -> bool {
        let request = Request::Consensus { rpc: ConsensusRpc::Member, body: bytes::Bytes::new() };
        let answer = self.peers.request(key, addr, request, Duration::from_millis(250)).await;
        matches!(answer, Err(PeerError::Refused))
    }

    fn send_table(self: &Arc<Self>, member: String, table: &Table) {
        let this = self.clone();
        let record = table.to_record();
        tokio::spawn(async move {
            let request = Request::Table { table: record };
            this.call(&member, request, this.config.request_timeout).await;
        });
    }
}
