//! A deterministic simulation of a pool's table changes, primary leases and writes, on a simulated clock and
//! network, from a seed.
//!
//! Each simulated worker runs the real decision code: its table coordinator ([`Coordinator`]), its primary leases
//! ([`Leases`]), and the rules a member follows to prepare, adopt and accept copies ([`coordinator::prepare`],
//! [`coordinator::dropped_by`], [`coordinator::accepts_copy`], [`coordinator::copy_targets`], [`Table::next_with`]).
//! What the simulation models instead of running:
//!
//! - **The network**: every message takes 1–4 ms; a cut pair of workers drops them both ways; a message to a paused
//!   worker waits until it resumes; a request to a worker that is not running is refused at once.
//! - **Failure detection**: a worker sees another as active from the first heartbeat (100 ms) it reaches it, and
//!   as gone 2 s after the last (the defaults: `probe_period` 500 ms + `suspect_timeout` 1.5 s). SWIM's indirect
//!   probes are not modelled: a worker sees exactly those it reaches.
//! - **The consensus group**, as Raft's guarantees rather than its messages: up to five voters; a voter that heard
//!   from no leader for an election timeout (500–1,000 ms) and reaches a majority of voters whose logs are not newer
//!   than its own becomes the leader of the next term; a leader steps down when it reaches a worker that knows a
//!   later term. A leader's heartbeat (100 ms) counts as accepted by every voter it reaches that knows no later term
//!   ([`Leases::accepted`]), and carries the log's committed table to every worker it reaches. An entry commits
//!   when its leader reaches a majority of voters; an entry a deposed leader left open commits, or not, with equal
//!   chance, when the next leader is elected. A linearizable read needs the leader to reach a majority.
//! - **Leases**: every worker that does not hold one as leader asks the leader every third of a lease (2 s), directly
//!   (the real worker also asks through others when it does not know the leader).
//! - **Writes**: a client writes to a random partition, through the primary of a random worker's table. The primary
//!   checks what `Cluster::lead` checks, applies, copies to [`coordinator::copy_targets`] (each copy lands after one
//!   message delay), and acknowledges a message delay later if every copy was accepted and it still holds a lease.
//!   A worker's store keeps its partitions, tables and log across a kill (`durability = "disk"`).
//!
//! Faults come one at a time, at random gaps: a `kill -9` and restart, a `SIGSTOP` and resume, the pool cut in
//! halves, a minority of two cut off, the consensus leader cut off, a worker joining. After the faults every cut
//! heals, every worker runs again, and the pool settles. The checks: one table per version on every worker that
//! adopts one; every acknowledged write is on every holder of its partition in the final table; and the final table
//! names exactly the running workers (a liveness check, reported apart).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use thingport_protocol::peer::{Refusal, Request, Response, TableRecord};

use crate::coord::lease::Leases;
use crate::coord::{NodeId, node_id};
use crate::ring::cluster::PartitionLoss;
use crate::ring::coordinator::{self, Coordinator, Facts, Input, Output, Settings};
use crate::ring::membership::{Node, name_of};
use crate::ring::placement::{PARTITIONS, Table};

const HEARTBEAT: Duration = Duration::from_millis(100);
const CHECK: Duration = Duration::from_millis(500);
const DETECT: Duration = Duration::from_millis(2_000);
const ELECTION: Duration = Duration::from_millis(500);
const LEASE: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` of a worker, restarted 1–3 s later with its store.
    Kill,
    /// `SIGSTOP` of a worker for 1–3 s.
    Pause,
    /// The pool cut in two halves for 2–5 s.
    Halves,
    /// Two workers cut off from the others for 2–5 s.
    Minority,
    /// The consensus group's leader cut off from every other worker for 2–5 s.
    IsolateLeader,
    /// A new worker joins (while any of `Params::joins` are left).
    Join,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::Kill,
        Fault::Pause,
        Fault::Halves,
        Fault::Minority,
        Fault::IsolateLeader,
        Fault::Join,
    ];
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Params {
    pub seed: u64,
    /// Workers at the start, the first table's members.
    pub workers: usize,
    /// Workers that may join during the run.
    pub joins: usize,
    /// Voting members of the consensus group (the first workers), at most five.
    pub voters: usize,
    pub replicas: usize,
    /// How long faults are injected.
    pub faults: Duration,
    /// The gap between one fault's end and the next fault.
    pub gap: (Duration, Duration),
    /// How long the pool runs after the last fault ended.
    pub settle: Duration,
    pub writes_per_second: u32,
    pub kinds: Vec<Fault>,
    /// Backups accept copies from a primary with an older table (the rule of [`coordinator::accepts_copy`] left
    /// out): a broken pool, to show that the checks find what it loses.
    pub accept_stale_copies: bool,
    /// Workers ignore the table version a lease grant names (`Leases::table_at_least`), and lead under older
    /// tables: with `accept_stale_copies`, a pool with neither fence.
    pub ignore_lease_table: bool,
}

impl Params {
    /// A short run of five workers with every kind of fault.
    pub fn short(seed: u64) -> Params {
        Params {
            seed,
            workers: 5,
            joins: 2,
            voters: 5,
            replicas: 2,
            faults: Duration::from_secs(40),
            gap: (Duration::from_millis(200), Duration::from_secs(3)),
            settle: Duration::from_secs(15),
            writes_per_second: 1_000,
            kinds: Fault::ALL.to_vec(),
            accept_stale_copies: false,
            ignore_lease_table: false,
        }
    }
}

/// A table change the coordinator completed.
#[derive(Debug, Clone)]
pub struct Changed {
    /// Simulated time since the start.
    pub at: Duration,
    pub version: u64,
    pub moved: usize,
    /// From the check that started it to its commit.
    pub took: Duration,
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub acknowledged: usize,
    /// Acknowledged writes (partition, write) missing from some holder of the final table.
    pub lost: Vec<(u16, u64)>,
    /// Safety violations other than lost writes.
    pub violations: Vec<String>,
    /// Why the pool had not settled at the end (liveness).
    pub unsettled: Vec<String>,
    pub changes: Vec<Changed>,
    /// Each fault and when it started.
    pub faults: Vec<(Duration, String)>,
    pub final_version: u64,
    pub events: u64,
    /// Writes acknowledged by a primary whose committed table was older than the log's (safe as long as every
    /// holder of the newer table got the copy; counted to show the runs reach such states).
    pub stale_acks: usize,
    /// Reads answered, one per write attempt, each through a random worker to its table's primary.
    pub reads: usize,
    /// Reads that missed a write acknowledged before they started (reads are answered by a primary alone, without
    /// a lease: `docs/CONSISTENCY.md`).
    pub stale_reads: usize,
}

impl Report {
    /// Whether no acknowledged write was lost and no other safety violation was seen.
    pub fn safe(&self) -> bool {
        self.lost.is_empty() && self.violations.is_empty()
    }
}

#[derive(Debug)]
enum Event {
    Heartbeat,
    Check(usize, u64),
    AskLease(usize, u64),
    Granted {
        to: usize,
        boot: u64,
        sent: Instant,
        remaining: Duration,
        table_version: u64,
    },
    Deliver {
        from: usize,
        from_boot: u64,
        to: usize,
        to_boot: u64,
        id: u64,
        request: Request,
    },
    Answer {
        to: usize,
        boot: u64,
        input: Input,
    },
    /// The answer to `AskEnded`, worked out when it arrives.
    Ended {
        to: usize,
        boot: u64,
        id: u64,
        member: String,
        refused: bool,
    },
    Timeout {
        to: usize,
        boot: u64,
        id: u64,
    },
    Write,
    Copy {
        write: u64,
        target: usize,
        target_boot: u64,
    },
    Ack {
        write: u64,
    },
    Fault,
    Undo(Undo),
    Finish,
    End,
}

#[derive(Debug)]
enum Undo {
    Restart(usize),
    Resume(usize),
    Heal,
}

struct Worker {
    name: String,
    id: NodeId,
    boot: u64,
    running: bool,
    paused: bool,
    /// Events that reached it while paused.
    held: Vec<Event>,
    coordinator: Coordinator,
    committed: Option<Arc<Table>>,
    pending: Option<Arc<Table>>,
    previous: Option<String>,
    applied_log: Option<TableRecord>,
    /// The write ids of each partition this worker holds.
    data: Vec<BTreeSet<u64>>,
    leases: Leases,
    /// The latest run of each other worker it reached, and when.
    heard: BTreeMap<usize, (u64, Duration)>,
    view: BTreeMap<String, Node>,
    led_term: Option<u64>,
    known_term: u64,
    leader_heard: Duration,
    election_after: Duration,
    /// Requests it waits for an answer to.
    outstanding: BTreeSet<u64>,
}

impl Worker {
    fn key(&self) -> String {
        key(&self.name, self.boot)
    }
}

fn key(name: &str, boot: u64) -> String {
    format!("{name}#{boot:x}")
}

struct Flight {
    partition: u16,
    primary: usize,
    boot: u64,
    version: u64,
    waiting: usize,
    failed: bool,
}

struct Entry {
    /// Decided by an election after its leader's term: committed with that election, or never.
    decided: bool,
    term: u64,
    from: usize,
    boot: u64,
    id: u64,
    table: TableRecord,
}

/// The simulated pool.
struct World {
    params: Params,
    rng: StdRng,
    base: Instant,
    now: Duration,
    seq: u64,
    queue: BTreeMap<(Duration, u64), Event>,
    workers: Vec<Worker>,
    voters: Vec<usize>,
    cut: BTreeSet<(usize, usize)>,
    term: u64,
    log: Option<TableRecord>,
    open: Vec<Entry>,
    tables: BTreeMap<u64, Arc<Table>>,
    writes: BTreeMap<u64, Flight>,
    next_write: u64,
    acked: Vec<(u16, u64)>,
    /// The acknowledged writes of each partition.
    acked_in: Vec<Vec<u64>>,
    /// Draws for reads apart, so that reads leave the rest of a run as it would be without them.
    reads_rng: StdRng,
    faulting: bool,
    joins_left: usize,
    report: Report,
}

/// Runs one simulation.
pub fn run(params: Params) -> Report {
    let mut world = World::new(params);
    world.run();
    world.report
}

impl World {
    fn new(params: Params) -> World {
        let base = Instant::now();
        let mut world = World {
            rng: StdRng::seed_from_u64(params.seed),
            base,
            now: Duration::ZERO,
            seq: 0,
            queue: BTreeMap::new(),
            workers: Vec::new(),
            voters: (0..params.voters.min(5).min(params.workers)).collect(),
            cut: BTreeSet::new(),
            term: 0,
            log: None,
            open: Vec::new(),
            tables: BTreeMap::new(),
            writes: BTreeMap::new(),
            next_write: 0,
            acked: Vec::new(),
            acked_in: vec![Vec::new(); PARTITIONS],
            reads_rng: StdRng::seed_from_u64(params.seed ^ 0xA5A5_A5A5_A5A5_A5A5),
            faulting: true,
            joins_left: params.joins,
            report: Report { seed: params.seed, ..Report::default() },
            params,
        };
        for _ in 0..world.params.workers {
            world.add_worker();
        }
        world
    }

    fn at(&self) -> Instant {
        self.base + self.now
    }

    fn schedule(&mut self, after: Duration, event: Event) {
        self.seq += 1;
        self.queue.insert((self.now + after, self.seq), event);
    }

    fn latency(&mut self) -> Duration {
        Duration::from_micros(self.rng.random_range(1_000..4_000))
    }

    fn settings(&self) -> Settings {
        Settings {
            replicas: self.params.replicas,
            bootstrap_members: self.params.workers,
            settle: Duration::ZERO,
            check_period: CHECK,
            request_timeout: REQUEST_TIMEOUT,
            copy_timeout: Duration::from_secs(60),
            partition_loss: PartitionLoss::Wait,
            shared_store: false,
        }
    }

    fn add_worker(&mut self) {
        let index = self.workers.len();
        let name = format!("w{index:03}");
        let worker = Worker {
            id: node_id(&name),
            coordinator: Coordinator::new(key(&name, 1), self.settings(), self.at()),
            name,
            boot: 1,
            running: true,
            paused: false,
            held: Vec::new(),
            committed: None,
            pending: None,
            previous: None,
            applied_log: None,
            data: vec![BTreeSet::new(); PARTITIONS],
            leases: Leases::with_epoch(LEASE, self.base),
            heard: BTreeMap::new(),
            view: BTreeMap::new(),
            led_term: None,
            known_term: 0,
            leader_heard: self.now,
            election_after: ELECTION,
            outstanding: BTreeSet::new(),
        };
        self.workers.push(worker);
        self.refresh_view(index);
        let offset = Duration::from_micros(self.rng.random_range(0..500_000));
        self.schedule(offset, Event::Check(index, 1));
        let offset = Duration::from_micros(self.rng.random_range(0..600_000));
        self.schedule(offset, Event::AskLease(index, 1));
    }

    fn node(&self, index: usize, boot: u64) -> Node {
        let port = 10_000 + index as u16;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        Node { name: self.workers[index].name.clone(), addr, link: addr, boot, renewal: 0 }
    }

    /// Whether the network between `a` and `b` is up (whatever their processes do).
    fn linked(&self, a: usize, b: usize) -> bool {
        a == b || !self.cut.contains(&(a.min(b), a.max(b)))
    }

    /// Whether `a` and `b` can exchange messages now (both running, neither paused, not cut apart).
    fn reach(&self, a: usize, b: usize) -> bool {
        let (wa, wb) = (&self.workers[a], &self.workers[b]);
        a == b
            || (wa.running
                && wb.running
                && !wa.paused
                && !wb.paused
                && !self.cut.contains(&(a.min(b), a.max(b))))
    }

    fn index_of(&self, key: &str) -> Option<(usize, u64)> {
        let name = name_of(key);
        let index: usize = name.strip_prefix('w')?.parse().ok()?;
        let boot = crate::ring::membership::boot_of(key)?;
        (index < self.workers.len()).then_some((index, boot))
    }

    fn run(&mut self) {
        self.schedule(HEARTBEAT, Event::Heartbeat);
        self.schedule(Duration::from_secs(2), Event::Write);
        let first = self.params.gap.1.max(Duration::from_secs(3));
        self.schedule(first, Event::Fault);
        self.schedule(self.params.faults, Event::Finish);
        self.schedule(self.params.faults + self.params.settle, Event::End);
        while let Some(((at, _), event)) = self.queue.pop_first() {
            self.now = at;
            self.report.events += 1;
            if matches!(event, Event::End) {
                break;
            }
            self.dispatch(event);
        }
        self.finish();
    }

    /// The worker an event is for, if it is addressed to one: events for a run that ended are dropped, and those
    /// for a paused worker wait.
    fn addressed(&mut self, event: Event) -> Option<Event> {
        let target = match &event {
            Event::Check(w, b) | Event::AskLease(w, b) => Some((*w, *b)),
            Event::Granted { to, boot, .. }
            | Event::Answer { to, boot, .. }
            | Event::Ended { to, boot, .. }
            | Event::Timeout { to, boot, .. } => Some((*to, *boot)),
            Event::Deliver { to, to_boot, .. } => Some((*to, *to_boot)),
            _ => None,
        };
        let Some((w, boot)) = target else { return Some(event) };
        let worker = &mut self.workers[w];
        if !worker.running || worker.boot != boot {
            if let Event::Deliver { from, from_boot, id, .. } = event {
                // refused: the sender learns at once
                let lat = self.latency();
                self.schedule(
                    lat,
                    Event::Answer { to: from, boot: from_boot, input: answer(id, None) },
                );
            }
            return None;
        }
        if worker.paused {
            worker.held.push(event);
            return None;
        }
        Some(event)
    }

    fn dispatch(&mut self, event: Event) {
        let Some(event) = self.addressed(event) else { return };
        match event {
            Event::Heartbeat => {
                self.heartbeat();
                self.schedule(HEARTBEAT, Event::Heartbeat);
            }
            Event::Check(w, boot) => {
                self.check(w);
                self.schedule(CHECK, Event::Check(w, boot));
            }
            Event::AskLease(w, boot) => self.ask_lease(w, boot),
            Event::Granted { to, sent, remaining, table_version, .. } => {
                self.workers[to].leases.granted(sent, remaining);
                if !self.params.ignore_lease_table {
                    self.workers[to].leases.table_at_least(table_version);
                }
            }
            Event::Deliver { from, from_boot, to, id, request, .. } => {
                // a request that crossed a cut is lost; the sender times out
                if !self.linked(from, to) {
                    return;
                }
                let response = self.serve(to, request);
                let lat = self.latency();
                let input = answer(id, Some(response));
                self.schedule(lat, Event::Answer { to: from, boot: from_boot, input });
            }
            Event::Answer { to, input, .. } => self.answer(to, input),
            Event::Ended { to, id, member, refused, .. } => {
                let ended = refused
                    || self.lease_left(to, name_of(&member)).is_some_and(|left| left.is_zero());
                self.answer(to, Input::Ended { id, ended });
            }
            Event::Timeout { to, id, .. } => {
                if self.workers[to].outstanding.remove(&id) {
                    self.workers[to].coordinator.handle(timed_out(id));
                    self.drain(to);
                }
            }
            Event::Write => {
                self.write();
                self.read();
                let every = Duration::from_secs(1) / self.params.writes_per_second.max(1);
                if self.faulting || self.now < self.params.faults + self.params.settle / 2 {
                    self.schedule(every, Event::Write);
                }
            }
            Event::Copy { write, target, target_boot } => self.copy(write, target, target_boot),
            Event::Ack { write } => self.ack(write),
            Event::Fault => self.fault(),
            Event::Undo(undo) => {
                self.undo(undo);
                if self.faulting {
                    let gap = self.rng.random_range(self.params.gap.0..=self.params.gap.1);
                    self.schedule(gap, Event::Fault);
                }
            }
            Event::Finish => {
                self.faulting = false;
                self.cut.clear();
                for w in 0..self.workers.len() {
                    if self.workers[w].paused {
                        self.undo(Undo::Resume(w));
                    }
                    if !self.workers[w].running {
                        self.undo(Undo::Restart(w));
                    }
                }
            }
            Event::End => {}
        }
    }

    /// An answer reaches a worker's coordinator, a late one too (after its timeout, or to a phase it abandoned):
    /// the coordinator must ignore those itself.
    fn answer(&mut self, to: usize, input: Input) {
        let id = input_id(&input);
        if id == 0 {
            return; // a table sent without waiting for the answer
        }
        self.workers[to].outstanding.remove(&id);
        let busy = self.workers[to].coordinator.busy();
        self.workers[to].coordinator.handle(input);
        self.drain(to);
        // as `Cluster::coordinate`: a change that ended is followed by a check at once
        if busy && !self.workers[to].coordinator.busy() {
            self.check(to);
        }
    }

    /// A member's answer to a request of the ring (`Cluster::handle`, for the requests a coordinator sends).
    fn serve(&mut self, w: usize, request: Request) -> Response {
        match request {
            Request::Prepare { table } => {
                let Some(next) = Table::from_record(table) else {
                    return refused(Refusal::Invalid);
                };
                let worker = &mut self.workers[w];
                let empty = coordinator::prepare(
                    &worker.key(),
                    worker.previous.as_deref(),
                    worker.committed.as_deref(),
                    worker.pending.as_deref(),
                    worker.applied_log.clone(),
                    &next,
                );
                match empty {
                    Ok(empty) => {
                        for p in empty {
                            worker.data[p as usize].clear();
                        }
                        worker.pending = Some(Arc::new(next));
                        Response::Prepared { newer: None }
                    }
                    Err(newer) => Response::Prepared { newer: Some(newer) },
                }
            }
            Request::Pull { version, sources } => {
                if self.workers[w].pending.as_ref().is_none_or(|t| t.version != version) {
                    return refused(Refusal::Stale);
                }
                for (p, source) in sources {
                    let Some((s, boot)) = self.index_of(&source) else {
                        return refused(Refusal::CopyFailed);
                    };
                    if s == w {
                        continue;
                    }
                    if self.workers[s].boot != boot || !self.reach(w, s) {
                        return refused(Refusal::CopyFailed);
                    }
                    let copy = self.workers[s].data[p as usize].clone();
                    self.workers[w].data[p as usize].extend(copy);
                }
                Response::Done
            }
            Request::Commit { table } | Request::Table { table } => {
                if let Some(table) = Table::from_record(table) {
                    self.adopt(w, Arc::new(table));
                }
                Response::Done
            }
            _ => Response::Done,
        }
    }

    /// `Cluster::adopt`: makes `table` the worker's committed table if it is newer.
    fn adopt(&mut self, w: usize, table: Arc<Table>) {
        match self.tables.get(&table.version) {
            Some(known) if **known != *table => self.report.violations.push(format!(
                "{}: two tables of version {} were adopted",
                self.workers[w].key(),
                table.version
            )),
            Some(_) => {}
            None => {
                self.tables.insert(table.version, table.clone());
            }
        }
        let worker = &mut self.workers[w];
        if worker.committed.as_ref().is_some_and(|c| c.version >= table.version) {
            return;
        }
        if worker.pending.as_ref().is_some_and(|p| p.version <= table.version) {
            worker.pending = None;
        }
        if worker.previous.as_ref().is_some_and(|prev| !table.members.contains(prev)) {
            worker.previous = None;
        }
        let dropped = coordinator::dropped_by(
            &worker.key(),
            worker.previous.as_deref(),
            &table,
            worker.pending.as_deref(),
        );
        for p in dropped {
            worker.data[p as usize].clear();
        }
        worker.committed = Some(table);
    }

    fn facts_check(&mut self, w: usize) {
        let holds = self.holds_lease(w);
        let worker = &mut self.workers[w];
        let now = self.base + self.now;
        let members = worker.view.clone();
        let table = worker.committed.clone();
        worker.coordinator.check(Facts {
            now,
            members: &members,
            table: table.as_ref(),
            changing: worker.pending.is_some(),
            leads: worker.led_term.is_some(),
            in_contact: holds,
        });
    }

    fn check(&mut self, w: usize) {
        self.facts_check(w);
        self.drain(w);
    }

    /// Does what worker `w`'s coordinator asks for (`Cluster::perform`).
    fn drain(&mut self, w: usize) {
        while let Some(output) = self.workers[w].coordinator.poll_output() {
            let boot = self.workers[w].boot;
            match output {
                Output::SendTable { to, table } => {
                    let request = Request::Table { table: table.to_record() };
                    self.send(w, &to, 0, request);
                }
                Output::Adopt(table) => self.adopt(w, table),
                Output::WithholdOnly(ids) => self.workers[w].leases.withhold_only(&ids),
                Output::Withhold(ids) => self.workers[w].leases.withhold(&ids),
                Output::AskEnded { id, member, .. } => {
                    self.workers[w].outstanding.insert(id);
                    // the peer port refuses only if the run is gone and the network between is up
                    let (refused, after) = match self.index_of(&member) {
                        Some((m, b)) => {
                            let gone = !self.workers[m].running || self.workers[m].boot != b;
                            let cut = self.cut.contains(&(w.min(m), w.max(m)));
                            if cut || (!gone && self.workers[m].paused) {
                                (false, PROBE_TIMEOUT)
                            } else {
                                (gone, self.latency() * 2)
                            }
                        }
                        None => (false, Duration::ZERO),
                    };
                    self.schedule(after, Event::Ended { to: w, boot, id, member, refused });
                }
                Output::ReadLog { id } => {
                    self.workers[w].outstanding.insert(id);
                    let table =
                        if self.leads_with_quorum(w) { Ok(self.log.clone()) } else { Err(()) };
                    let after = if table.is_ok() { self.latency() * 2 } else { REQUEST_TIMEOUT };
                    let input = Input::Log { id, table };
                    self.schedule(after, Event::Answer { to: w, boot, input });
                }
                Output::Request { id, to, request, timeout } => {
                    self.workers[w].outstanding.insert(id);
                    self.schedule(timeout, Event::Timeout { to: w, boot, id });
                    self.send(w, &to, id, request);
                }
                Output::CommitLog { id, table } => {
                    self.workers[w].outstanding.insert(id);
                    let term = self.workers[w].led_term.unwrap_or(0);
                    self.open.push(Entry { decided: false, term, from: w, boot, id, table });
                    self.resolve_entries();
                }
                Output::Unheld(_) => {}
                Output::Changed { version, moved, started } => {
                    let took = self.at().saturating_duration_since(started);
                    self.report.changes.push(Changed { at: self.now, version, moved, took });
                }
            }
        }
    }

    fn send(&mut self, from: usize, to: &str, id: u64, request: Request) {
        let from_boot = self.workers[from].boot;
        let Some((t, to_boot)) = self.index_of(to) else { return };
        let lat = if t == from { Duration::ZERO } else { self.latency() };
        self.schedule(lat, Event::Deliver { from, from_boot, to: t, to_boot, id, request });
    }

    // the consensus group

    /// As a leader that believes it leads: the end of its own lease (`Consensus::leader_lease`).
    fn leader_lease(&self, w: usize) -> Option<Instant> {
        let worker = &self.workers[w];
        let term = worker.led_term?;
        worker.leases.leading(term, self.at());
        let voters: BTreeSet<NodeId> = self.voters.iter().map(|&v| self.workers[v].id).collect();
        worker.leases.leader_until(worker.id, term, [&voters], self.at())
    }

    /// `Consensus::holds_lease`.
    fn holds_lease(&self, w: usize) -> bool {
        let now = self.at();
        let worker = &self.workers[w];
        if worker.leases.holds(now) {
            return true;
        }
        match self.leader_lease(w) {
            Some(until) => {
                worker.leases.extend(until);
                until > now
            }
            None => false,
        }
    }

    /// `Consensus::lease_left`.
    fn lease_left(&self, w: usize, worker: &str) -> Option<Duration> {
        let now = self.at();
        self.leader_lease(w).filter(|until| *until > now)?;
        let leases = &self.workers[w].leases;
        let term = self.workers[w].led_term?;
        Some(leases.left_of(worker, leases.leading(term, now), now))
    }

    fn reachable_voters(&self, w: usize) -> Vec<usize> {
        self.voters.iter().copied().filter(|&v| self.reach(w, v)).collect()
    }

    fn majority(&self, count: usize) -> bool {
        count * 2 > self.voters.len()
    }

    /// Whether `w` leads the current term and reaches a majority of voters.
    fn leads_with_quorum(&self, w: usize) -> bool {
        self.workers[w].led_term == Some(self.term) && self.majority(self.reachable_voters(w).len())
    }

    fn step_down(&mut self, w: usize) {
        self.workers[w].led_term = None;
        let mut kept = Vec::new();
        for entry in std::mem::take(&mut self.open) {
            if entry.from == w && entry.boot == self.workers[w].boot {
                let lat = self.latency();
                let input = Input::Logged { id: entry.id, committed: Err(()) };
                self.schedule(lat, Event::Answer { to: w, boot: entry.boot, input });
            } else {
                kept.push(entry);
            }
        }
        self.open = kept;
    }

    fn resolve_entries(&mut self) {
        let mut kept = Vec::new();
        for entry in std::mem::take(&mut self.open) {
            let from = &self.workers[entry.from];
            // a killed leader's entry is in its followers' logs or not: the next election decides it
            if !from.running || from.boot != entry.boot {
                if !entry.decided {
                    kept.push(entry);
                }
                continue;
            }
            let leads =
                from.running && from.boot == entry.boot && from.led_term == Some(entry.term);
            if !leads {
                let input = Input::Logged { id: entry.id, committed: Err(()) };
                self.schedule(
                    Duration::ZERO,
                    Event::Answer { to: entry.from, boot: entry.boot, input },
                );
                continue;
            }
            if entry.term == self.term && !from.paused && self.leads_with_quorum(entry.from) {
                let committed = self.log.as_ref().is_none_or(|l| entry.table.version > l.version);
                if committed {
                    self.log = Some(entry.table.clone());
                    for v in self.reachable_voters(entry.from) {
                        self.workers[v].applied_log = self.log.clone();
                    }
                }
                let lat = self.latency();
                let input = Input::Logged { id: entry.id, committed: Ok(committed) };
                self.schedule(lat, Event::Answer { to: entry.from, boot: entry.boot, input });
                continue;
            }
            kept.push(entry);
        }
        self.open = kept;
    }

    fn heartbeat(&mut self) {
        for w in 0..self.workers.len() {
            if self.workers[w].running && !self.workers[w].paused {
                self.refresh_view(w);
            }
        }
        // leaders: acceptances, log replication, stepping down
        for l in 0..self.workers.len() {
            let Some(term) = self.workers[l].led_term else { continue };
            if !self.workers[l].running || self.workers[l].paused {
                continue;
            }
            let later = (0..self.workers.len())
                .any(|o| o != l && self.reach(l, o) && self.workers[o].known_term > term);
            if later {
                self.step_down(l);
                continue;
            }
            let at = self.at();
            for v in self.reachable_voters(l) {
                if v != l {
                    let id = self.workers[v].id;
                    self.workers[l].leases.accepted(id, term, at);
                    self.workers[v].known_term = term;
                    self.workers[v].leader_heard = self.now;
                }
            }
            if term == self.term
                && let Some(log) = self.log.clone()
            {
                for o in 0..self.workers.len() {
                    if self.reach(l, o) {
                        self.workers[o].known_term = self.workers[o].known_term.max(term);
                        self.workers[o].leader_heard = self.now;
                        self.workers[o].applied_log = Some(log.clone());
                        if let Some(table) = Table::from_record(log.clone()) {
                            self.adopt(o, Arc::new(table));
                        }
                    }
                }
            }
        }
        self.elect();
        self.resolve_entries();
    }

    fn elect(&mut self) {
        for v in self.voters.clone() {
            let worker = &self.workers[v];
            if !worker.running || worker.paused || worker.led_term == Some(self.term) {
                continue;
            }
            if self.now.saturating_sub(worker.leader_heard) < worker.election_after {
                continue;
            }
            // a voter that heard from a leader within an election timeout does not vote
            let reached: Vec<usize> = self
                .reachable_voters(v)
                .into_iter()
                .filter(|&r| {
                    r == v || self.now.saturating_sub(self.workers[r].leader_heard) >= ELECTION
                })
                .collect();
            let mine = worker.applied_log.as_ref().map_or(0, |l| l.version);
            let newest = reached
                .iter()
                .map(|&r| self.workers[r].applied_log.as_ref().map_or(0, |l| l.version))
                .max()
                .unwrap_or(0);
            let jitter = Duration::from_millis(self.rng.random_range(0..500));
            self.workers[v].election_after = ELECTION + jitter;
            if !self.majority(reached.len()) || mine < newest {
                self.workers[v].leader_heard = self.now;
                continue;
            }
            // the new term: a deposed leader's open entries commit with it, or are dropped
            self.term += 1;
            let term = self.term;
            for entry in self.open.iter_mut().filter(|e| e.term < term && !e.decided) {
                entry.decided = true;
                if self.rng.random_bool(0.5)
                    && self.log.as_ref().is_none_or(|l| entry.table.version > l.version)
                {
                    self.log = Some(entry.table.clone());
                }
            }
            for r in reached {
                self.workers[r].known_term = term;
                self.workers[r].leader_heard = self.now;
                self.workers[r].applied_log = self.log.clone();
            }
            for o in 0..self.workers.len() {
                if o != v && self.workers[o].led_term.is_some() && self.reach(v, o) {
                    self.step_down(o);
                }
            }
            self.workers[v].led_term = Some(term);
            self.workers[v].leases.leading(term, self.at());
            return;
        }
    }

    fn ask_lease(&mut self, w: usize, boot: u64) {
        let every = LEASE / 3;
        if let Some(until) = self.leader_lease(w) {
            self.workers[w].leases.extend(until);
            self.schedule(every, Event::AskLease(w, boot));
            return;
        }
        let leader = (0..self.workers.len()).find(|&l| self.workers[l].led_term == Some(self.term));
        let granted = leader.filter(|&l| self.reach(w, l)).and_then(|l| {
            let left = self.leader_lease(l)?.saturating_duration_since(self.at()).min(LEASE);
            let until = self.at() + left;
            let table_version = self.workers[l].applied_log.as_ref().map_or(0, |t| t.version);
            (!left.is_zero() && self.workers[l].leases.grant(&self.workers[w].name, until))
                .then_some((left, table_version))
        });
        match granted {
            Some((remaining, table_version)) => {
                let lat = self.latency() * 2;
                let sent = self.at();
                let grant = Event::Granted { to: w, boot, sent, remaining, table_version };
                self.schedule(lat, grant);
                self.schedule(every, Event::AskLease(w, boot));
            }
            None => self.schedule(LEASE / 20, Event::AskLease(w, boot)),
        }
    }

    // membership

    fn refresh_view(&mut self, w: usize) {
        for o in 0..self.workers.len() {
            if o != w && self.reach(w, o) {
                let boot = self.workers[o].boot;
                self.workers[w].heard.insert(o, (boot, self.now));
            }
        }
        let mut view = BTreeMap::new();
        let me = self.node(w, self.workers[w].boot);
        view.insert(me.key(), me);
        for (&o, &(boot, last)) in &self.workers[w].heard {
            if self.now.saturating_sub(last) < DETECT {
                let node = self.node(o, boot);
                view.insert(node.key(), node);
            }
        }
        if view != self.workers[w].view {
            self.workers[w].view = view;
            let at = self.at();
            self.workers[w].coordinator.members_changed(at);
            if !self.workers[w].coordinator.busy() {
                self.check(w);
            }
        }
    }

    // writes

    /// A random partition and a random running worker to enter through (with the reads' draws or the others'),
    /// and the run of the partition's primary in that worker's table, if it reaches it.
    fn route(&mut self, read: bool) -> Option<(u16, usize, u64)> {
        let running: Vec<usize> = (0..self.workers.len())
            .filter(|&w| self.workers[w].running && !self.workers[w].paused)
            .collect();
        if running.is_empty() {
            return None;
        }
        let rng = if read { &mut self.reads_rng } else { &mut self.rng };
        let entry = running[rng.random_range(0..running.len())];
        let partition = rng.random_range(0..PARTITIONS as u16);
        let table = self.workers[entry].committed.clone()?;
        let (p, boot) = table.primary(partition).and_then(|k| self.index_of(k))?;
        (self.reach(entry, p) && self.workers[p].boot == boot).then_some((partition, p, boot))
    }

    fn write(&mut self) {
        let Some((partition, p, boot)) = self.route(false) else { return };
        // `Cluster::lead`
        let Some(own) = self.workers[p].committed.clone() else { return };
        if own.primary(partition) != Some(self.workers[p].key().as_str())
            || own.version < self.workers[p].leases.table_version()
            || !coordinator::has_quorum(&own, &self.workers[p].view)
            || !self.holds_lease(p)
        {
            return;
        }
        self.next_write += 1;
        let write = self.next_write;
        self.workers[p].data[partition as usize].insert(write);
        let worker = &self.workers[p];
        let (targets, version) = coordinator::copy_targets(
            &worker.key(),
            worker.committed.as_deref(),
            worker.pending.as_deref(),
            partition,
        );
        let targets: Vec<(usize, u64)> = targets.iter().filter_map(|t| self.index_of(t)).collect();
        let flight =
            Flight { partition, primary: p, boot, version, waiting: targets.len(), failed: false };
        self.writes.insert(write, flight);
        for (target, target_boot) in targets {
            let lat = self.latency();
            self.schedule(lat, Event::Copy { write, target, target_boot });
        }
        self.schedule(Duration::from_millis(9), Event::Ack { write });
    }

    /// A read through a random worker, answered as `Cluster::handle` answers `Read`: by the primary of its committed
    /// table, from its copy.
    fn read(&mut self) {
        let Some((partition, p, _)) = self.route(true) else { return };
        let primary = &self.workers[p];
        let Some(own) = primary.committed.as_ref() else { return };
        if own.primary(partition) != Some(primary.key().as_str())
            || own.version < primary.leases.table_version()
        {
            return;
        }
        self.report.reads += 1;
        let held = &primary.data[partition as usize];
        if self.acked_in[partition as usize].iter().any(|w| !held.contains(w)) {
            self.report.stale_reads += 1;
        }
    }

    fn copy(&mut self, write: u64, target: usize, target_boot: u64) {
        let Some(flight) = self.writes.get(&write) else { return };
        let (partition, mut version, primary) = (flight.partition, flight.version, flight.primary);
        if self.params.accept_stale_copies {
            version = u64::MAX;
        }
        let worker = &self.workers[target];
        let accepted = worker.boot == target_boot
            && worker.running
            && !worker.paused
            && self.linked(primary, target)
            && coordinator::accepts_copy(
                &worker.key(),
                worker.committed.as_deref(),
                worker.pending.as_deref(),
                partition,
                version,
            )
            .is_ok();
        if accepted {
            self.workers[target].data[partition as usize].insert(write);
        }
        if let Some(flight) = self.writes.get_mut(&write) {
            flight.waiting -= 1;
            flight.failed |= !accepted;
        }
    }

    fn ack(&mut self, write: u64) {
        let Some(flight) = self.writes.remove(&write) else { return };
        let p = flight.primary;
        let alive = self.workers[p].running
            && !self.workers[p].paused
            && self.workers[p].boot == flight.boot;
        // the lease may have run out while the copies were made: then nothing is acknowledged
        if flight.waiting == 0 && !flight.failed && alive && self.holds_lease(p) {
            self.acked.push((flight.partition, write));
            self.acked_in[flight.partition as usize].push(write);
            // acknowledged by a primary whose table the log has replaced
            let logged = self.log.as_ref().map_or(0, |l| l.version);
            if self.workers[p].committed.as_ref().is_some_and(|t| t.version < logged) {
                self.report.stale_acks += 1;
            }
        }
    }

    // faults

    fn fault(&mut self) {
        if !self.faulting {
            return;
        }
        let kind = self.params.kinds[self.rng.random_range(0..self.params.kinds.len())];
        let n = self.workers.len();
        let running: Vec<usize> = (0..n).filter(|&w| self.workers[w].running).collect();
        if running.is_empty() {
            return;
        }
        let pause = Duration::from_millis(self.rng.random_range(1_000..3_000));
        let cut_for = Duration::from_millis(self.rng.random_range(2_000..5_000));
        let pick = |rng: &mut StdRng, from: &[usize]| from[rng.random_range(0..from.len())];
        let what = match kind {
            Fault::Kill => {
                let w = pick(&mut self.rng, &running);
                self.kill(w);
                self.schedule(pause, Event::Undo(Undo::Restart(w)));
                format!("kill -9 {}", self.workers[w].name)
            }
            Fault::Pause => {
                let w = pick(&mut self.rng, &running);
                self.workers[w].paused = true;
                self.schedule(pause, Event::Undo(Undo::Resume(w)));
                format!("SIGSTOP {}", self.workers[w].name)
            }
            Fault::Halves | Fault::Minority => {
                let mut order: Vec<usize> = (0..n).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, self.rng.random_range(0..=i));
                }
                let size = if kind == Fault::Halves { n / 2 } else { 2.min(n / 2) };
                let side: BTreeSet<usize> = order[..size].iter().copied().collect();
                self.cut_off(&side);
                self.schedule(cut_for, Event::Undo(Undo::Heal));
                let names: Vec<&str> =
                    side.iter().map(|&w| self.workers[w].name.as_str()).collect();
                format!("cut {names:?} from the rest")
            }
            Fault::IsolateLeader => {
                let leader = (0..n).find(|&l| self.workers[l].led_term == Some(self.term));
                let w = leader.unwrap_or_else(|| pick(&mut self.rng, &running));
                self.cut_off(&BTreeSet::from([w]));
                self.schedule(cut_for, Event::Undo(Undo::Heal));
                format!("cut the leader {} from the rest", self.workers[w].name)
            }
            Fault::Join => {
                if self.joins_left == 0 {
                    self.schedule(Duration::from_millis(10), Event::Undo(Undo::Heal));
                    return;
                }
                self.joins_left -= 1;
                self.add_worker();
                self.schedule(Duration::from_secs(1), Event::Undo(Undo::Heal));
                format!("{} joins", self.workers[n].name)
            }
        };
        self.report.faults.push((self.now, what));
    }

    fn cut_off(&mut self, side: &BTreeSet<usize>) {
        let n = self.workers.len();
        for &a in side {
            for b in (0..n).filter(|b| !side.contains(b)) {
                self.cut.insert((a.min(b), a.max(b)));
            }
        }
    }

    fn kill(&mut self, w: usize) {
        let worker = &mut self.workers[w];
        worker.running = false;
        worker.paused = false;
        worker.held.clear();
        worker.outstanding.clear();
        worker.led_term = None;
    }

    fn undo(&mut self, undo: Undo) {
        match undo {
            Undo::Heal => self.cut.clear(),
            Undo::Resume(w) if self.workers[w].paused => {
                self.workers[w].paused = false;
                // its failure detection did not run meanwhile: it sees the members it saw when it stopped
                let now = self.now;
                for (_, last) in self.workers[w].heard.values_mut() {
                    *last = now;
                }
                for event in std::mem::take(&mut self.workers[w].held) {
                    self.schedule(Duration::ZERO, event);
                }
            }
            Undo::Resume(_) => {}
            Undo::Restart(w) if !self.workers[w].running => {
                // `Cluster::recover`: the store keeps the table, the partitions and the log
                let settings = self.settings();
                let at = self.at();
                let base = self.base;
                let worker = &mut self.workers[w];
                worker.boot += 1;
                worker.running = true;
                worker.pending = None;
                worker.previous = worker
                    .committed
                    .as_ref()
                    .and_then(|t| t.members.iter().find(|m| name_of(m) == worker.name).cloned());
                worker.coordinator = Coordinator::new(worker.key(), settings, at);
                worker.leases = Leases::with_epoch(LEASE, base);
                worker.heard.clear();
                worker.view.clear();
                worker.leader_heard = self.now;
                let boot = worker.boot;
                self.refresh_view(w);
                self.schedule(CHECK, Event::Check(w, boot));
                self.schedule(Duration::ZERO, Event::AskLease(w, boot));
            }
            Undo::Restart(_) => {}
        }
    }

    fn finish(&mut self) {
        self.report.acknowledged = self.acked.len();
        let Some(table) = self
            .log
            .clone()
            .and_then(Table::from_record)
            .or_else(|| self.tables.values().last().map(|t| (**t).clone()))
        else {
            self.report.unsettled.push("no table was ever made".into());
            return;
        };
        self.report.final_version = table.version;
        for &(p, write) in &self.acked {
            let missing = table.owners(p).any(|o| {
                self.index_of(o).is_none_or(|(w, boot)| {
                    self.workers[w].boot != boot
                        || !self.workers[w].data[p as usize].contains(&write)
                })
            });
            if missing {
                self.report.lost.push((p, write));
            }
        }
        let running: BTreeSet<String> =
            self.workers.iter().filter(|w| w.running).map(|w| w.key()).collect();
        let members: BTreeSet<String> = table.members.iter().cloned().collect();
        if members != running {
            self.report.unsettled.push(format!(
                "the last table (version {}) has members {members:?}; running: {running:?}",
                table.version
            ));
        }
        for w in &self.workers {
            if w.committed.as_ref().is_none_or(|c| c.version < table.version) {
                self.report.unsettled.push(format!("{} did not adopt the last table", w.key()));
            }
        }
    }
}

fn refused(refusal: Refusal) -> Response {
    Response::Refused { refusal, table_version: 0 }
}

fn answer(id: u64, answer: Option<Response>) -> Input {
    Input::Answer { id, answer }
}

fn timed_out(id: u64) -> Input {
    Input::Answer { id, answer: None }
}

fn input_id(input: &Input) -> u64 {
    match input {
        Input::Ended { id, .. }
        | Input::Log { id, .. }
        | Input::Answer { id, .. }
        | Input::Logged { id, .. } => *id,
    }
}
