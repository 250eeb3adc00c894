//! Streams of changes for API clients (`docs/API.md`, "Streams"): each worker's change log ([`crate::ring::hub`])
//! read by one pump per member of the pool, whose changes go to the subscribers this worker serves.
//!
//! A subscriber's place is a number per member (the last change of that member's log it has passed), so a client
//! that reconnects with it resumes where it stopped: what the pumps already passed is read again from the logs.
//! Each subscriber has a bounded queue; the pump never waits for one: a subscriber whose queue is full is cut (its
//! queue emptied, the client told), and the others go on.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use thingport_protocol::peer::UpdateRecord;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::StreamsConfig;
use crate::keys::Access;
use crate::ring::Cluster;

/// Changes one pump request asks for at most.
const PAGE: u32 = 1_024;
/// How long one pump request waits at its member for a change.
const WAIT: Duration = Duration::from_secs(10);
/// A pump whose member did not answer tries again after this.
const RETRY: Duration = Duration::from_millis(200);

/// Which things a stream follows (and of them, those its key reaches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    Things(Vec<String>),
    Tag(String),
    All,
}

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum Item {
    Update {
        member: Arc<str>,
        update: Arc<UpdateRecord>,
    },
    /// Changes of this member may have been missed: it left the pool, or they fell out of its log.
    Gap {
        member: String,
        reason: &'static str,
    },
}

/// Why a stream could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("this worker serves as many streams as it may (streams.max_clients)")]
    Full,
    #[error("this worker has no partition table yet")]
    NoTable,
}

/// One subscriber's queue.
#[derive(Debug)]
pub struct Subscriber {
    filter: Filter,
    access: Access,
    queue: Mutex<Queue>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Item>,
    /// It fell behind by more than its buffer: it gets nothing more.
    cut: bool,
}

impl Subscriber {
    fn wants(&self, update: &UpdateRecord) -> bool {
        let listed = match &self.filter {
            Filter::Things(names) => names.contains(&update.thing),
            Filter::Tag(tag) => update.tags.iter().any(|t| t == tag),
            Filter::All => true,
        };
        listed && self.access.reaches(&update.thing)
    }
}

/// The subscribers of this worker and the pumps that feed them.
#[derive(Debug)]
pub struct Streams {
    cluster: Arc<Cluster>,
    config: StreamsConfig,
    state: Mutex<State>,
    clients: AtomicUsize,
    stop: CancellationToken,
    events: ::metrics::Counter,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    subscribers: HashMap<u64, Arc<Subscriber>>,
    by_thing: HashMap<String, Vec<u64>>,
    by_tag: HashMap<String, Vec<u64>>,
    all: Vec<u64>,
    /// Each running pump's member and the last change of its log it passed on.
    /// Each running pump's member and the last change of its log it passed on (none: it has yet to ask where
    /// the log is).
    pumps: HashMap<String, Option<u64>>,
}

impl State {
    /// The lists of the index a filter puts its subscriber in: one per distinct thing name, its tag's, or all.
    fn add(&mut self, id: u64, filter: &Filter) {
        match filter {
            Filter::Things(names) => {
                for name in names {
                    let ids = self.by_thing.entry(name.clone()).or_default();
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
            }
            Filter::Tag(tag) => self.by_tag.entry(tag.clone()).or_default().push(id),
            Filter::All => self.all.push(id),
        }
    }

    fn remove(&mut self, id: u64) -> bool {
        let Some(subscriber) = self.subscribers.remove(&id) else { return false };
        let drop_from = |map: &mut HashMap<String, Vec<u64>>, key: &str| {
            if let Some(ids) = map.get_mut(key) {
                ids.retain(|&i| i != id);
                if ids.is_empty() {
                    map.remove(key);
                }
            }
        };
        match &subscriber.filter {
            Filter::Things(names) => names.iter().for_each(|n| drop_from(&mut self.by_thing, n)),
            Filter::Tag(tag) => drop_from(&mut self.by_tag, tag),
            Filter::All => self.all.retain(|&i| i != id),
        }
        true
    }

    /// The subscribers that want a change.
    fn matching(&self, update: &UpdateRecord) -> Vec<&Arc<Subscriber>> {
        let mut ids: Vec<u64> = self.all.clone();
        if let Some(listed) = self.by_thing.get(&update.thing) {
            ids.extend(listed);
        }
        for tag in &update.tags {
            if let Some(tagged) = self.by_tag.get(tag) {
                ids.extend(tagged);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids.iter().filter_map(|id| self.subscribers.get(id)).filter(|s| s.wants(update)).collect()
    }
}

/// What a subscription yields next.
#[derive(Debug)]
pub enum Next {
    Item(Item),
    /// Nothing came for the idle time: time for a heartbeat.
    Idle,
    /// The subscriber fell behind by more than its buffer.
    Cut,
    /// The worker is stopping.
    Stopped,
}

/// A subscriber as its stream reads it; leaves the streams when dropped.
#[derive(Debug)]
pub struct Subscription {
    streams: Arc<Streams>,
    id: u64,
    subscriber: Arc<Subscriber>,
    /// Read back from the logs (resuming) before the live changes, with the gaps found on the way.
    backlog: VecDeque<Item>,
    /// Per member, the last change of its log passed: the stream's place.
    positions: BTreeMap<String, u64>,
}

impl Subscription {
    /// The stream's place, to resume from: the last change passed per member.
    pub fn positions(&self) -> &BTreeMap<String, u64> {
        &self.positions
    }

    /// The next item, waiting at most `idle` for one.
    pub async fn next(&mut self, idle: Duration) -> Next {
        loop {
            if let Some(item) = self.backlog.pop_front() {
                if self.passes(&item) {
                    return Next::Item(item);
                }
                continue;
            }
            let item = {
                let mut queue = self.subscriber.queue.lock().unwrap_or_else(|e| e.into_inner());
                match queue.items.pop_front() {
                    Some(item) => Some(item),
                    None if queue.cut => return Next::Cut,
                    None => None,
                }
            };
            if let Some(item) = item {
                if self.passes(&item) {
                    return Next::Item(item);
                }
                continue;
            }
            tokio::select! {
                () = self.subscriber.notify.notified() => {}
                () = tokio::time::sleep(idle) => return Next::Idle,
                () = self.streams.stop.cancelled() => return Next::Stopped,
            }
        }
    }

    /// Moves the place past a change; false if it was passed already (read back and then live).
    fn passes(&mut self, item: &Item) -> bool {
        match item {
            Item::Update { member, update } => {
                let place = self.positions.entry(member.to_string()).or_insert(0);
                if update.seq <= *place {
                    return false;
                }
                *place = update.seq;
                true
            }
            Item::Gap { .. } => true,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.streams.lock().remove(self.id);
        self.streams.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Streams {
    pub fn new(
        cluster: Arc<Cluster>,
        config: StreamsConfig,
        stop: CancellationToken,
    ) -> Arc<Streams> {
        let streams = Arc::new(Streams {
            cluster,
            config,
            state: Mutex::default(),
            clients: AtomicUsize::new(0),
            stop,
            events: ::metrics::counter!(crate::telemetry::STREAM_EVENTS_TOTAL),
        });
        tokio::spawn(streams.clone().follow_table());
        tokio::spawn(streams.clone().export());
        streams
    }

    /// Counts an event sent on a stream.
    pub fn sent(&self) {
        self.events.increment(1);
    }

    /// Sets the gauges of streams and of the change log every few seconds.
    async fn export(self: Arc<Self>) {
        let streams = ::metrics::gauge!(crate::telemetry::STREAMS);
        let log = ::metrics::gauge!(crate::telemetry::CHANGE_LOG_CHANGES);
        loop {
            streams.set(self.clients() as f64);
            log.set(self.cluster.hub.held().0 as f64);
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
                () = self.stop.cancelled() => return,
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Streams served now.
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// A new subscriber: from now on, or resuming after `resume` (a place from [`Subscription::positions`]).
    pub async fn subscribe(
        self: &Arc<Self>,
        filter: Filter,
        access: Access,
        resume: Option<BTreeMap<String, u64>>,
    ) -> Result<Subscription, Refused> {
        if self.clients.fetch_add(1, Ordering::Relaxed) >= self.config.max_clients {
            self.clients.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::Full);
        }
        let subscriber = Arc::new(Subscriber {
            filter: filter.clone(),
            access,
            queue: Mutex::default(),
            notify: Notify::new(),
        });
        // registered at once, so that dropping the subscription on any path below counts the client out
        let id = {
            let mut state = self.lock();
            let id = state.next_id;
            state.next_id += 1;
            id
        };
        let mut subscription = Subscription {
            streams: self.clone(),
            id,
            subscriber: subscriber.clone(),
            backlog: VecDeque::new(),
            positions: BTreeMap::new(),
        };
        let Some(table) = self.cluster.table() else { return Err(Refused::NoTable) };
        // where each member's log is now; a place is never taken beyond it (a client's id is only a claim)
        let heads = futures_util::future::join_all(
            table.members.iter().map(|m| self.cluster.watch(m, None, 0, Duration::ZERO)),
        )
        .await;
        let gap = |member: &str, reason| Item::Gap { member: member.to_string(), reason };
        if let Some(resume) = &resume {
            for member in resume.keys().filter(|m| !table.members.contains(m)) {
                subscription.backlog.push_back(gap(member, "the worker left the pool"));
            }
        }
        let mut starts: BTreeMap<String, u64> = BTreeMap::new();
        for (member, head) in table.members.iter().zip(heads) {
            let Some(head) = head.map(|page| page.next.saturating_sub(1)) else {
                subscription.backlog.push_back(gap(member, "the worker did not answer"));
                continue;
            };
            let start = match resume.as_ref().map(|r| r.get(member).copied()) {
                None => head,
                // a member missing from the place joined after it: everything in its log is newer
                Some(None) => 0,
                Some(Some(place)) if place > head => {
                    subscription
                        .backlog
                        .push_back(gap(member, "the place is past the worker's log"));
                    head
                }
                Some(Some(place)) => place,
            };
            starts.insert(member.clone(), start);
        }
        subscription.positions = starts.clone();
        let mut read_back: Vec<(String, u64, u64)> = Vec::new();
        {
            let mut state = self.lock();
            state.subscribers.insert(id, subscriber);
            state.add(id, &filter);
            for member in &table.members {
                let start = starts.get(member).copied();
                match state.pumps.get(member).copied() {
                    None => {
                        state.pumps.insert(member.clone(), start);
                        tokio::spawn(self.clone().pump(member.clone()));
                    }
                    Some(None) => {
                        state.pumps.insert(member.clone(), start);
                    }
                    // the pump passed changes before this subscriber was there: read them back
                    Some(Some(passed)) => {
                        if let Some(start) = start
                            && passed > start
                        {
                            read_back.push((member.clone(), start, passed));
                        }
                    }
                }
            }
            // a member that joined the table while this subscriber was getting its place
            if let Some(table) = self.cluster.table() {
                self.start_pumps(&mut state, &table.members);
            }
        }
        for (member, from, to) in read_back {
            self.read_back(&mut subscription, &member, from, to).await;
        }
        Ok(subscription)
    }

    /// Reads a member's changes after `from` up to `to` into a subscription's backlog.
    async fn read_back(&self, subscription: &mut Subscription, member: &str, from: u64, to: u64) {
        let key: Arc<str> = member.into();
        let mut after = from;
        while after < to {
            let Some(page) = self.cluster.watch(member, Some(after), PAGE, Duration::ZERO).await
            else {
                subscription.backlog.push_back(Item::Gap {
                    member: member.to_string(),
                    reason: "the worker did not answer",
                });
                return;
            };
            if page.first > after.saturating_add(1) {
                subscription.backlog.push_back(Item::Gap {
                    member: member.to_string(),
                    reason: "the changes fell out of the worker's log",
                });
            }
            let Some(last) = page.updates.last().map(|u| u.seq) else { return };
            for update in page.updates.into_iter().filter(|u| u.seq <= to) {
                if !subscription.subscriber.wants(&update) {
                    continue;
                }
                if subscription.backlog.len() >= self.config.client_buffer {
                    subscription.backlog.push_back(Item::Gap {
                        member: member.to_string(),
                        reason: "more changes to read back than the stream's buffer holds",
                    });
                    // go on live from where the pump is
                    subscription.positions.insert(member.to_string(), to);
                    return;
                }
                subscription.backlog.push_back(Item::Update { member: key.clone(), update });
            }
            after = last;
        }
    }

    /// Follows one member's log while there are subscribers, passing each change to those that want it.
    async fn pump(self: Arc<Self>, member: String) {
        let key: Arc<str> = member.as_str().into();
        loop {
            let asked = {
                let mut state = self.lock();
                if state.subscribers.is_empty() {
                    state.pumps.remove(&member);
                    return;
                }
                match state.pumps.get(&member) {
                    Some(&cursor) => cursor,
                    None => return,
                }
            };
            let answer = tokio::select! {
                answer = self.cluster.watch(&member, asked, PAGE, WAIT) => answer,
                () = self.stop.cancelled() => return,
            };
            let Some(page) = answer else {
                let in_table = self.cluster.table().is_some_and(|t| t.members.contains(&member));
                if !in_table {
                    let mut state = self.lock();
                    state.pumps.remove(&member);
                    self.gap(&mut state, &member, "the worker left the pool");
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(RETRY) => continue,
                    () = self.stop.cancelled() => return,
                }
            };
            let mut state = self.lock();
            if state.pumps.get(&member) != Some(&asked) {
                // a subscriber set the place meanwhile: ask again from there
                continue;
            }
            let Some(cursor) = asked else {
                state.pumps.insert(member.clone(), Some(page.next.saturating_sub(1)));
                continue;
            };
            if page.first > cursor.saturating_add(1) {
                self.gap(&mut state, &member, "the changes fell out of the worker's log");
            }
            let mut passed = cursor;
            let mut cut = Vec::new();
            for update in page.updates.into_iter().filter(|u| u.seq > cursor) {
                passed = update.seq;
                for subscriber in state.matching(&update) {
                    let item = Item::Update { member: key.clone(), update: update.clone() };
                    if !self.offer(subscriber, item) {
                        cut.push(subscriber.clone());
                    }
                }
            }
            state.pumps.insert(member.clone(), Some(passed));
            let ids: Vec<u64> = state
                .subscribers
                .iter()
                .filter(|(_, s)| cut.iter().any(|c| Arc::ptr_eq(c, s)))
                .map(|(&id, _)| id)
                .collect();
            for id in ids {
                state.remove(id);
            }
        }
    }

    /// Queues an item for a subscriber; false if it is cut (its queue was full).
    fn offer(&self, subscriber: &Subscriber, item: Item) -> bool {
        let mut queue = subscriber.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.cut {
            return false;
        }
        let kept = if queue.items.len() >= self.config.client_buffer {
            queue.items = VecDeque::new();
            queue.cut = true;
            ::metrics::counter!(crate::telemetry::STREAM_CUTS_TOTAL).increment(1);
            false
        } else {
            queue.items.push_back(item);
            true
        };
        drop(queue);
        subscriber.notify.notify_one();
        kept
    }

    /// Tells every subscriber that changes of a member may have been missed.
    fn gap(&self, state: &mut State, member: &str, reason: &'static str) {
        let gap = Item::Gap { member: member.to_string(), reason };
        let cut: Vec<u64> = state
            .subscribers
            .iter()
            .filter(|(_, s)| !self.offer(s, gap.clone()))
            .map(|(&id, _)| id)
            .collect();
        for id in cut {
            state.remove(id);
        }
    }

    /// Starts a pump for each member that joins the table while there are subscribers: it reads that member's
    /// log from its start, since all of it is newer than the subscribers' places.
    async fn follow_table(self: Arc<Self>) {
        let mut version = self.cluster.table_version();
        loop {
            tokio::select! {
                changed = version.changed() => if changed.is_err() { return },
                () = self.stop.cancelled() => return,
            }
            let Some(table) = self.cluster.table() else { continue };
            let mut state = self.lock();
            if !state.subscribers.is_empty() {
                self.start_pumps(&mut state, &table.members);
            }
        }
    }

    /// Starts a pump, from the start of its log, for each of `members` that has none.
    fn start_pumps(self: &Arc<Self>, state: &mut State, members: &[String]) {
        for member in members {
            if !state.pumps.contains_key(member) {
                state.pumps.insert(member.clone(), Some(0));
                tokio::spawn(self.clone().pump(member.clone()));
            }
        }
    }
}
