//! The table coordinator's decisions, without I/O: a state machine that is fed what its worker observes (the
//! active members, the committed table, whether it leads the consensus group) and the answers to what it asked
//! for, and that returns what to send and to whom. [`Cluster::coordinate`](super::Cluster::coordinate) drives it
//! with real peers and the real consensus group; [`simulation`](super::simulation) drives many of them on a
//! simulated clock and network.
//!
//! A check ([`Coordinator::check`]) runs every `check_period` and whenever the members change. As the leader of
//! the consensus group, when the active members differ from the committed table's, the coordinator goes through
//! these phases, one at a time; a phase that fails ends the change, and a later check starts again:
//!
//! 1. *Leases.* It withholds primary leases from the members that left, and asks whether each one's lease has
//!    certainly ended ([`Output::AskEnded`]).
//! 2. *Log.* It asks for the newest table the consensus log committed ([`Output::ReadLog`]); a newer one than its
//!    own is adopted instead of changing anything.
//! 3. *Align.* It sends the committed table to every active member.
//! 4. *Prepare* the next table on every active member.
//! 5. *Pull.* Every new owner of a partition copies it from a surviving holder.
//! 6. *Log the table* ([`Output::CommitLog`]): one table per version commits.
//! 7. *Commit* it to every active member, and adopt it.
//!
//! Requests carry an id; an answer whose id the current phase does not wait for (an abandoned phase's) is
//! dropped.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thingport_protocol::peer::{Refusal, Request, Response, TableRecord};

use super::cluster::PartitionLoss;
use super::membership::{self, Node};
use super::placement::{PARTITIONS, Table};

/// What the coordinator is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Copies of each partition, the primary included.
    pub replicas: usize,
    /// Active members needed before the first table is made.
    pub bootstrap_members: usize,
    /// How long the members must stay unchanged before the first table is made.
    pub settle: Duration,
    /// How often the coordinator checks.
    pub check_period: Duration,
    /// How long a request to a member may take.
    pub request_timeout: Duration,
    /// How long a new owner's copy of its partitions may take (the worker gives it at least a minute).
    pub copy_timeout: Duration,
    /// What to do when every holder of a partition is gone.
    pub partition_loss: PartitionLoss,
    /// Whether the workers share one store (a new owner can then load any partition from it).
    pub shared_store: bool,
}

/// What the worker observes at a check.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub now: Instant,
    /// The active members, by key, as this worker's failure detection sees them.
    pub members: &'a BTreeMap<String, Node>,
    /// This worker's committed table.
    pub table: Option<&'a Arc<Table>>,
    /// Whether this worker has a prepared table that is not committed.
    pub changing: bool,
    /// Whether this worker leads the consensus group.
    pub leads: bool,
    /// Whether this worker holds a primary lease.
    pub in_contact: bool,
}

/// What the coordinator asks its driver to do.
#[derive(Debug, Clone)]
pub enum Output {
    /// Send this committed table to a member, without waiting for an answer.
    SendTable { to: String, table: Arc<Table> },
    /// Make this table the worker's committed table.
    Adopt(Arc<Table>),
    /// Grant no primary lease to these workers (by id) and grant again to every other one withheld.
    WithholdOnly(BTreeSet<String>),
    /// Grant no primary lease to these workers either.
    Withhold(BTreeSet<String>),
    /// Whether `member`'s primary lease has certainly ended: its peer port at `addr` refuses connections, or the
    /// lease this leader granted it has run out. Answered with [`Input::Ended`].
    AskEnded { id: u64, member: String, addr: Option<SocketAddr> },
    /// Read the newest table the consensus log committed, linearizably. Answered with [`Input::Log`].
    ReadLog { id: u64 },
    /// Send a request to a member (this worker included). Answered with [`Input::Answer`].
    Request { id: u64, to: String, request: Request, timeout: Duration },
    /// Commit this table through the consensus log. Answered with [`Input::Logged`].
    CommitLog { id: u64, table: TableRecord },
    /// The number of the table's partitions with no active holder (the coordinator's gauge; 0 elsewhere).
    Unheld(usize),
    /// A table change ended: the new version, the replica slots moved, and when the change started.
    Changed { version: u64, moved: usize, started: Instant },
}

/// What the driver tells the coordinator, besides the checks.
#[derive(Debug, Clone)]
pub enum Input {
    Ended {
        id: u64,
        ended: bool,
    },
    /// The log's committed table; `Err` when it could not be read.
    Log {
        id: u64,
        table: Result<Option<TableRecord>, ()>,
    },
    /// A member's answer; `None` when it did not answer in time.
    Answer {
        id: u64,
        answer: Option<Response>,
    },
    /// Whether the table committed through the log; `Err` when this worker stopped leading first.
    Logged {
        id: u64,
        committed: Result<bool, ()>,
    },
}

/// The change under way.
#[derive(Debug)]
struct Change {
    /// The committed table it starts from.
    table: Arc<Table>,
    /// The committed table with restarted workers standing in for their previous runs.
    effective: Table,
    /// Those restarted workers.
    inherited: BTreeSet<String>,
    active: Vec<String>,
    started: Instant,
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    Leases {
        waiting: BTreeMap<u64, String>,
        alive: Vec<String>,
    },
    Log {
        id: u64,
    },
    Align {
        waiting: BTreeSet<u64>,
        refused: bool,
    },
    /// The request ids by the member's index in `active`, and the answers in that order (`None`: none yet, or
    /// none in time).
    Prepare {
        next: Arc<Table>,
        ids: BTreeMap<u64, usize>,
        answers: Vec<Option<Response>>,
    },
    Pull {
        next: Arc<Table>,
        moved: usize,
        waiting: BTreeSet<u64>,
        failed: bool,
    },
    LogTable {
        next: Arc<Table>,
        moved: usize,
        id: u64,
    },
    Commit {
        next: Arc<Table>,
        moved: usize,
        waiting: BTreeSet<u64>,
        missed: bool,
    },
}

/// The table coordinator of one worker.
#[derive(Debug)]
pub struct Coordinator {
    me: String,
    settings: Settings,
    /// The members seen at the previous check.
    seen: BTreeSet<String>,
    /// Where members' peer ports were.
    addrs: BTreeMap<String, SocketAddr>,
    stable_since: Instant,
    last_push: Instant,
    reported_unheld: usize,
    change: Option<Change>,
    next_id: u64,
    out: VecDeque<Output>,
}

impl Coordinator {
    pub fn new(me: String, settings: Settings, now: Instant) -> Coordinator {
        Coordinator {
            me,
            settings,
            seen: BTreeSet::new(),
            addrs: BTreeMap::new(),
            stable_since: now,
            last_push: now,
            reported_unheld: 0,
            change: None,
            next_id: 0,
            out: VecDeque::new(),
        }
    }

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Whether a change is under way (checks wait for it to end).
    pub fn busy(&self) -> bool {
        self.change.is_some()
    }

    /// The active members changed at `now`.
    pub fn members_changed(&mut self, now: Instant) {
        self.stable_since = now;
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Checks the members against the table, and starts a change if one is due. Does nothing while a change is
    /// under way.
    pub fn check(&mut self, facts: Facts<'_>) {
        if self.change.is_some() {
            return;
        }
        let active: Vec<String> = facts.members.keys().cloned().collect();
        if active.is_empty() {
            return; // this worker left the pool
        }
        // members that just appeared get the committed table
        let appeared: Vec<String> =
            active.iter().filter(|m| !self.seen.contains(*m) && **m != self.me).cloned().collect();
        self.addrs.extend(facts.members.iter().map(|(k, n)| (k.clone(), n.addr)));
        // only the active members and the table's are remembered
        let in_committed = |k: &String| facts.table.is_some_and(|t| t.members.contains(k));
        self.addrs.retain(|k, _| active.contains(k) || in_committed(k));
        self.seen = active.iter().cloned().collect();
        if let Some(table) = facts.table {
            for to in appeared {
                self.out.push_back(Output::SendTable { to, table: table.clone() });
            }
        }
        let Some(table) = facts.table else {
            let first = active.first().is_some_and(|m| *m == self.me);
            let settled =
                facts.now.saturating_duration_since(self.stable_since) >= self.settings.settle;
            if first && settled && active.len() >= self.settings.bootstrap_members {
                let mut initial = Table::initial(&active, self.settings.replicas);
                initial.version = 1;
                let initial = Arc::new(initial);
                tracing::info!(members = ?active, "first partition table");
                self.out.push_back(Output::Adopt(initial.clone()));
                for to in active.iter().filter(|m| **m != self.me) {
                    self.out
                        .push_back(Output::SendTable { to: to.clone(), table: initial.clone() });
                }
            }
            return;
        };
        // a restarted worker (with its store) stands in for its previous run
        let renames = renewals(table, facts.members);
        let effective =
            if renames.is_empty() { (**table).clone() } else { table.renamed(&renames) };
        let in_table = active.iter().filter(|m| effective.members.contains(m)).count();
        // the ids of the table's members that are gone (with no later run active): the leader withholds leases
        // from them while it waits to move their partitions, and lets go of the others it withheld
        let departing: Vec<String> =
            effective.members.iter().filter(|m| !active.contains(m)).cloned().collect();
        let departing_ids: BTreeSet<String> = departing
            .iter()
            .map(|m| membership::name_of(m).to_string())
            .filter(|id| !facts.members.values().any(|n| n.name == *id))
            .collect();
        self.out.push_back(Output::WithholdOnly(departing_ids.clone()));
        if !facts.leads {
            self.out.push_back(Output::Unheld(0)); // the coordinator's figure only
            return;
        }
        let unheld = if self.settings.shared_store { 0 } else { unheld_in(&effective, &active) };
        self.out.push_back(Output::Unheld(unheld));
        // an abandoned change leaves its prepared table on the members (primaries keep copying to its owners):
        // with nothing else to change, a change to the same members replaces and commits it
        if active == table.members {
            if facts.now.saturating_duration_since(self.last_push)
                >= self.settings.check_period * 10
            {
                self.last_push = facts.now;
                for to in active.iter().filter(|m| **m != self.me) {
                    self.out.push_back(Output::SendTable { to: to.clone(), table: table.clone() });
                }
            }
            if !facts.changing {
                return;
            }
        }
        if !has_quorum(table, facts.members) {
            tracing::warn!(
                active = in_table,
                members = table.members.len(),
                "no majority of the table's members is active; the table stays"
            );
            return;
        }
        // a coordinator cut off from the consensus group changes nothing: the other side may hold leases
        if !facts.in_contact {
            tracing::debug!("no primary lease from the consensus group; the table stays");
            return;
        }
        // every holder of some partition gone: wait for one to come back, or give them up
        if unheld > 0 && self.settings.partition_loss == PartitionLoss::Wait {
            if unheld != self.reported_unheld {
                tracing::warn!(
                    partitions = unheld,
                    "every holder of some partitions is gone; the table waits for one of them to come back \
                     (partition_loss = \"wait\")"
                );
                self.reported_unheld = unheld;
            }
            return;
        }
        self.reported_unheld = unheld;
        self.out.push_back(Output::Withhold(departing_ids));
        let mut waiting = BTreeMap::new();
        for member in departing {
            // a later run of the same worker is active: the earlier one is certainly gone
            let restarted = facts.members.values().any(|n| {
                n.name == membership::name_of(&member)
                    && membership::boot_of(&member).is_some_and(|boot| n.boot > boot)
            });
            if restarted {
                continue;
            }
            let id = self.id();
            let addr = self.addrs.get(&member).copied();
            self.out.push_back(Output::AskEnded { id, member: member.clone(), addr });
            waiting.insert(id, member);
        }
        self.change = Some(Change {
            table: table.clone(),
            effective,
            inherited: renames.into_values().collect(),
            active,
            started: facts.now,
            phase: Phase::Leases { waiting, alive: Vec::new() },
        });
        self.advance();
    }

    /// Takes an answer to something the coordinator asked for.
    pub fn handle(&mut self, input: Input) {
        let Some(change) = self.change.as_mut() else { return };
        match (&mut change.phase, input) {
            (Phase::Leases { waiting, alive }, Input::Ended { id, ended }) => {
                if let Some(member) = waiting.remove(&id)
                    && !ended
                {
                    alive.push(member);
                }
            }
            (Phase::Log { id }, Input::Log { id: answered, table }) if *id == answered => {
                match table {
                    Err(()) => self.change = None,
                    Ok(Some(logged)) if logged.version > change.table.version => {
                        if let Some(logged) = Table::from_record(logged) {
                            self.out.push_back(Output::Adopt(Arc::new(logged)));
                        }
                        self.change = None;
                    }
                    Ok(_) => {
                        let table = change.table.clone();
                        let active = change.active.clone();
                        let waiting = self.commit_to(&active, &table);
                        self.phase(Phase::Align { waiting, refused: false });
                    }
                }
            }
            (Phase::Align { waiting, refused }, Input::Answer { id, answer }) => {
                tick_off(waiting, refused, id, answer)
            }
            (Phase::Prepare { ids, answers, .. }, Input::Answer { id, answer }) => {
                if let Some(index) = ids.remove(&id) {
                    answers[index] = answer;
                }
            }
            (Phase::Pull { waiting, failed, .. }, Input::Answer { id, answer }) => {
                tick_off(waiting, failed, id, answer)
            }
            (Phase::LogTable { id, .. }, Input::Logged { id: answered, committed })
                if *id == answered =>
            {
                match committed {
                    Ok(true) => {
                        let Phase::LogTable { next, moved, .. } =
                            std::mem::replace(&mut change.phase, Phase::Log { id: 0 })
                        else {
                            unreachable!("matched above")
                        };
                        let active = change.active.clone();
                        let waiting = self.commit_to(&active, &next);
                        self.phase(Phase::Commit { next, moved, waiting, missed: false });
                    }
                    Ok(false) => {
                        self.abandon("a table of this version or a newer one committed first")
                    }
                    Err(()) => {
                        self.abandon("this worker stopped leading before the table committed")
                    }
                }
            }
            (Phase::Commit { waiting, missed, .. }, Input::Answer { id, answer }) => {
                tick_off(waiting, missed, id, answer)
            }
            _ => {} // an answer to an abandoned phase
        }
        self.advance();
    }

    fn phase(&mut self, phase: Phase) {
        if let Some(change) = self.change.as_mut() {
            change.phase = phase;
        }
    }

    fn abandon(&mut self, why: &'static str) {
        tracing::warn!(why, "partition table change abandoned; retrying");
        self.change = None;
    }

    /// Sends `table` as committed to the other `members`; the ids of the requests.
    fn commit_to(&mut self, members: &[String], table: &Table) -> BTreeSet<u64> {
        let record = table.to_record();
        let mut waiting = BTreeSet::new();
        let others: Vec<String> = members.iter().filter(|m| **m != self.me).cloned().collect();
        for to in others {
            let id = self.id();
            let request = Request::Commit { table: record.clone() };
            let timeout = self.settings.request_timeout;
            self.out.push_back(Output::Request { id, to, request, timeout });
            waiting.insert(id);
        }
        waiting
    }

    /// Moves to the next phase once the current one has every answer it waits for.
    fn advance(&mut self) {
        loop {
            let Some(change) = self.change.as_mut() else { return };
            match &mut change.phase {
                Phase::Leases { waiting, alive } => {
                    if !waiting.is_empty() {
                        return;
                    }
                    if !alive.is_empty() {
                        tracing::debug!(waiting = ?alive, "waiting for silent members' primary leases to run out");
                        self.change = None;
                        return;
                    }
                    // the change follows the newest table the log committed, its predecessors' entries included:
                    // a table whose commit a previous leader left open may have committed since
                    let id = self.id();
                    self.out.push_back(Output::ReadLog { id });
                    self.phase(Phase::Log { id });
                    return;
                }
                Phase::Log { .. } | Phase::LogTable { .. } => return,
                Phase::Align { waiting, refused } => {
                    if !waiting.is_empty() {
                        return;
                    }
                    // every member prepares from the committed table: one that missed its commit would count only
                    // older tables (or an abandoned prepared one) as held, and empty partitions it keeps
                    if *refused {
                        tracing::warn!(
                            "a member did not take the committed table; the change waits"
                        );
                        self.change = None;
                        return;
                    }
                    let next = Arc::new(
                        change.effective.next_with(&change.active, self.settings.replicas),
                    );
                    let record = next.to_record();
                    let active = change.active.clone();
                    let mut ids = BTreeMap::new();
                    for (index, to) in active.iter().enumerate() {
                        let id = self.id();
                        let request = Request::Prepare { table: record.clone() };
                        let timeout = self.settings.request_timeout;
                        self.out.push_back(Output::Request {
                            id,
                            to: to.clone(),
                            request,
                            timeout,
                        });
                        ids.insert(id, index);
                    }
                    let answers = vec![None; active.len()];
                    self.phase(Phase::Prepare { next, ids, answers });
                }
                Phase::Prepare { next, ids, answers } => {
                    if !ids.is_empty() {
                        return;
                    }
                    // the answers in the members' order: the first that is not a plain `Prepared` ends the change
                    let refusal = answers.iter().find_map(|answer| match answer {
                        Some(Response::Prepared { newer: None }) => None,
                        Some(Response::Prepared { newer: Some(newer) }) => {
                            Some(Some(newer.clone()))
                        }
                        _ => Some(None),
                    });
                    match refusal {
                        None => {}
                        Some(Some(newer)) => {
                            if let Some(newer) = Table::from_record(newer) {
                                self.out.push_back(Output::Adopt(Arc::new(newer)));
                            }
                            return self.abandon("a member has a newer table");
                        }
                        Some(None) => return self.abandon("a member did not prepare"),
                    }
                    let next = next.clone();
                    let (pulls, moved) = pulls(
                        &change.effective,
                        &next,
                        &change.inherited,
                        &change.active,
                        self.settings.shared_store,
                    );
                    let mut waiting = BTreeSet::new();
                    for (to, sources) in pulls {
                        let id = self.id();
                        let request = Request::Pull { version: next.version, sources };
                        let timeout = self.settings.copy_timeout;
                        self.out.push_back(Output::Request { id, to, request, timeout });
                        waiting.insert(id);
                    }
                    self.phase(Phase::Pull { next, moved, waiting, failed: false });
                }
                Phase::Pull { next, moved, waiting, failed } => {
                    if !waiting.is_empty() {
                        return;
                    }
                    if *failed {
                        return self.abandon("a new owner could not copy its partitions");
                    }
                    // the table commits through the consensus log: one table per version. The commit is waited for
                    // however long it takes (primaries go on copying to the prepared table's owners meanwhile)
                    let (next, moved) = (next.clone(), *moved);
                    let id = self.id();
                    self.out.push_back(Output::CommitLog { id, table: next.to_record() });
                    self.phase(Phase::LogTable { next, moved, id });
                }
                Phase::Commit { next, moved, waiting, missed } => {
                    if !waiting.is_empty() {
                        return;
                    }
                    if *missed {
                        tracing::warn!(
                            "a member missed the commit; it gets the table with the next push"
                        );
                    }
                    let (version, moved) = (next.version, *moved);
                    let started = change.started;
                    self.out.push_back(Output::Adopt(next.clone()));
                    self.out.push_back(Output::Changed { version, moved, started });
                    self.change = None;
                    return;
                }
            }
        }
    }
}

/// Notes the answer to request `id`, if the phase waits for it: `flag` is set unless it is `Done`.
fn tick_off(waiting: &mut BTreeSet<u64>, flag: &mut bool, id: u64, answer: Option<Response>) {
    if waiting.remove(&id) && !matches!(answer, Some(Response::Done)) {
        *flag = true;
    }
}

/// Members of `table` that are gone while a later run of the same worker is active: each is renamed to that run,
/// which inherits its slots.
pub fn renewals(table: &Table, members: &BTreeMap<String, Node>) -> BTreeMap<String, String> {
    table
        .members
        .iter()
        .filter(|m| !members.contains_key(*m))
        .filter_map(|old| {
            let boot = membership::boot_of(old)?;
            members
                .values()
                .find(|n| n.name == membership::name_of(old) && n.boot > boot)
                .map(|n| (old.clone(), n.key()))
        })
        .collect()
}

/// Whether more than half of the table's members are among `members`. A table member that has been restarted (a
/// member with its id and a later boot number is active) counts as present: its old run is certainly gone, not
/// cut off.
pub fn has_quorum(table: &Table, members: &BTreeMap<String, Node>) -> bool {
    let present = |key: &String| {
        members.contains_key(key)
            || members.values().any(|n| {
                n.name == membership::name_of(key)
                    && membership::boot_of(key).is_some_and(|boot| n.boot > boot)
            })
    };
    let present = table.members.iter().filter(|m| present(m)).count();
    present * 2 > table.members.len()
}

/// Partitions of `table` none of whose holders is among `active`.
pub fn unheld_in(table: &Table, active: &[String]) -> usize {
    (0..PARTITIONS as u16)
        .filter(|&p| table.owners(p).all(|o| !active.iter().any(|a| a == o)))
        .count()
}

/// What each new owner of `next` copies, and from whom, after `current` (with the restarted workers `inherited`
/// standing in for their previous runs); and the replica slots that move. A holder that kept running has the newest
/// copy; else one that recovered it from its store. A restarted holder that keeps its slot merges a survivor's
/// copy. With a shared store, a partition no active member holds is loaded from it by its new owner.
pub fn pulls(
    current: &Table,
    next: &Table,
    inherited: &BTreeSet<String>,
    active: &[String],
    shared: bool,
) -> (BTreeMap<String, Vec<(u16, String)>>, usize) {
    let mut pulls: BTreeMap<String, Vec<(u16, String)>> = BTreeMap::new();
    let mut moved = 0;
    for p in 0..PARTITIONS as u16 {
        let alive = |o: &&str| active.iter().any(|a| a == o);
        let survivor = current.owners(p).filter(alive).find(|o| !inherited.contains(*o));
        let source = survivor.or_else(|| current.owners(p).find(alive));
        for owner in next.owners(p) {
            if current.holds(p, owner) {
                if let Some(survivor) = survivor.filter(|_| inherited.contains(owner)) {
                    pulls.entry(owner.to_string()).or_default().push((p, survivor.to_string()));
                }
                continue;
            }
            moved += 1;
            match source {
                Some(source) => {
                    pulls.entry(owner.to_string()).or_default().push((p, source.to_string()))
                }
                None if shared => {
                    pulls.entry(owner.to_string()).or_default().push((p, owner.to_string()))
                }
                None => tracing::error!(partition = p, "every holder of the partition is gone"),
            }
        }
    }
    (pulls, moved)
}

/// What a member does with a table to prepare: `Err` with the newer table it has (its committed one, or the
/// consensus log's), else the partitions it gains that must start empty. A copy it kept from an earlier table (it
/// was cut off, or paused, and is coming back) would be stale; no write for it can have arrived yet, since a backup
/// accepts copies only for partitions of its committed or prepared table. A table older than the one `next`
/// follows does not count as held: this member missed changes since. The slots of its previous run (`previous`),
/// which it recovered from its store, count as held.
pub fn prepare(
    me: &str,
    previous: Option<&str>,
    committed: Option<&Table>,
    pending: Option<&Table>,
    logged: Option<TableRecord>,
    next: &Table,
) -> Result<Vec<u16>, TableRecord> {
    // a version the consensus log committed already is not prepared again
    if let Some(logged) = logged.filter(|l| l.version >= next.version) {
        return Err(logged);
    }
    if let Some(committed) = committed.filter(|c| c.version >= next.version) {
        return Err(committed.to_record());
    }
    let recent = |t: &&Table| t.version + 1 >= next.version;
    let empty = (0..PARTITIONS as u16)
        .filter(|&p| next.holds(p, me))
        .filter(|&p| {
            let mut held = committed.into_iter().chain(pending).filter(recent);
            !held.any(|t| t.holds(p, me) || previous.is_some_and(|prev| t.holds(p, prev)))
        })
        .collect();
    Ok(empty)
}

/// The partitions a member that adopts `table` no longer holds: not in it, nor in its prepared table, nor its
/// previous run's slots in it.
pub fn dropped_by(
    me: &str,
    previous: Option<&str>,
    table: &Table,
    pending: Option<&Table>,
) -> Vec<u16> {
    (0..PARTITIONS as u16)
        .filter(|&p| {
            !table.holds(p, me)
                && !pending.is_some_and(|t| t.holds(p, me))
                && !previous.is_some_and(|prev| table.holds(p, prev))
        })
        .collect()
}

/// As a partition's primary: the other holders a write is copied to (the owners in the committed table and in a
/// prepared one), and the newest table version the primary knows, which the copies carry.
pub fn copy_targets(
    me: &str,
    committed: Option<&Table>,
    pending: Option<&Table>,
    partition: u16,
) -> (BTreeSet<String>, u64) {
    let known = || committed.into_iter().chain(pending);
    let targets = known()
        .flat_map(|t| t.owners(partition).map(String::from).collect::<Vec<_>>())
        .filter(|o| *o != me)
        .collect();
    (targets, known().map(|t| t.version).max().unwrap_or(0))
}

/// As a backup: whether to apply a primary's copy of a write to `partition` that carries table `version`. Only if
/// this member holds the partition in its committed or prepared table, and the primary knows a table at least as
/// new as this member's newest: a primary that was left out of a change (it was paused or cut off while the others
/// prepared it) cannot have a write acknowledged that the change's new owners would miss.
pub fn accepts_copy(
    me: &str,
    committed: Option<&Table>,
    pending: Option<&Table>,
    partition: u16,
    version: u64,
) -> Result<(), Refusal> {
    let known = || committed.into_iter().chain(pending);
    if known().map(|t| t.version).max().is_some_and(|newest| newest > version) {
        return Err(Refusal::Stale);
    }
    if !known().any(|t| t.holds(partition, me)) {
        return Err(Refusal::NotOwner);
    }
    Ok(())
}
