//! Primary leases: a worker acknowledges writes as a partition's primary only while it holds a lease from the
//! consensus group, so that a worker cut off from the group (with a minority of any size) stops acknowledging
//! within one lease, whatever its failure detection says.
//!
//! - The group's **leader** holds the lease while a quorum of voters has accepted one of its `AppendEntries`
//!   recently: its lease ends [`Leases::length`] after the *sending* of the latest request that a quorum accepted
//!   (this worker counting as accepting at once). A leader cut off from most voters loses it within one length.
//! - Every **other worker** asks the leader for a lease every third of the length (through any member that knows
//!   the leader, if it does not). The leader grants one only while it holds its own, for what is left of it; the
//!   asker counts it from when it *sent* the request, so its lease ends no later than the leader's did.
//!
//! A write checks one atomic (the lease's end as last known: a grant, or the leader's own end as last counted); only
//! when that has passed does the leader count its voters' acceptances again.
//!
//! A worker's lease therefore ends within one length of the last moment it could reach a leader that could reach
//! a quorum. The leader is also the table coordinator. Once it decides to move a departed member's partitions it
//! withholds leases from that member ([`Leases::withhold`]), and it moves them only once the lease it (or its
//! predecessor) granted that member has run out, with a tenth of a length more for clocks, or once the member's
//! peer port refuses connections (its process is gone). So the side that takes the partitions over starts
//! acknowledging only after the other side stopped, across a clean cut and across a partial one (a worker the pool
//! declared down that still reaches the leader).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

use super::NodeId;

/// What a worker knows of primary leases: as leader, the voters' latest accepted requests; as any worker, its own
/// lease.
#[derive(Debug)]
pub struct Leases {
    /// How long a lease lasts.
    pub length: Duration,
    /// Per voter: the term and sending time of the latest `AppendEntries` it accepted from this worker as leader.
    accepted: Mutex<HashMap<NodeId, (u64, Instant)>>,
    /// Until when this worker holds a lease, in nanoseconds after `epoch` (0: none): one a leader granted it, or
    /// its own as leader as last counted. Read on every write, so an atomic rather than a lock.
    held: AtomicU64,
    epoch: Instant,
    /// As leader: the end of the lease it granted each worker (by id), and the workers it grants none now.
    grants: Mutex<Grants>,
    /// The term this worker was last seen to lead, and since when (as first seen, so perhaps later).
    led: Mutex<Option<(u64, Instant)>>,
    /// Set once the worker stops: it holds no lease any more, as leader or not.
    stopping: AtomicBool,
    /// The newest table version a leader's grant named: this worker leads no partition under an older table.
    table: AtomicU64,
}

impl Leases {
    pub fn new(length: Duration) -> Leases {
        Leases::with_epoch(length, Instant::now())
    }

    /// Leases counted from `epoch`, which must not be later than any time they are told (a simulated clock's
    /// start).
    pub fn with_epoch(length: Duration, epoch: Instant) -> Leases {
        Leases {
            length,
            accepted: Mutex::default(),
            held: AtomicU64::new(0),
            epoch,
            grants: Mutex::default(),
            led: Mutex::default(),
            stopping: Default::default(),
            table: AtomicU64::new(0),
        }
    }

    /// Voter `target` accepted a request this worker sent at `sent` as the leader of `term`.
    pub fn accepted(&self, target: NodeId, term: u64, sent: Instant) {
        let mut accepted = self.accepted.lock().unwrap_or_else(|e| e.into_inner());
        let entry = accepted.entry(target).or_insert((term, sent));
        if (term, sent) > *entry {
            *entry = (term, sent);
        }
    }

    /// The end of this worker's lease as the leader of `term` with these sets of voters (two while the voters
    /// change, and a quorum of each is needed): the earliest of the sets' ends.
    pub fn leader_until<'a>(
        &self,
        me: NodeId,
        term: u64,
        configs: impl IntoIterator<Item = &'a BTreeSet<NodeId>>,
        now: Instant,
    ) -> Option<Instant> {
        let accepted = self.accepted.lock().unwrap_or_else(|e| e.into_inner());
        let mut until: Option<Instant> = None;
        for voters in configs {
            let times: Vec<Option<Instant>> = voters
                .iter()
                .map(|v| {
                    if *v == me {
                        Some(now)
                    } else {
                        accepted.get(v).filter(|(t, _)| *t == term).map(|(_, at)| *at)
                    }
                })
                .collect();
            let end = quorum_until(&times, self.length)?;
            until = Some(until.map_or(end, |u| u.min(end)));
        }
        until
    }

    /// This worker is stopping: the lease it was granted ends now (its peer port is about to close, and a
    /// coordinator may take that for the process being gone).
    pub fn give_up(&self) {
        self.stopping.store(true, SeqCst);
        self.held.store(0, SeqCst);
    }

    /// Whether [`Leases::give_up`] was called.
    pub fn stopping(&self) -> bool {
        self.stopping.load(SeqCst)
    }

    /// This worker holds a lease until `until` (a later end already known stands).
    pub fn extend(&self, until: Instant) {
        let nanos = (until.saturating_duration_since(self.epoch).as_nanos() as u64).max(1);
        self.held.fetch_max(nanos, SeqCst);
        // a stop that came meanwhile wins
        if self.stopping() {
            self.held.store(0, SeqCst);
        }
    }

    /// Whether this worker holds a lease at `now`, as far as [`Leases::extend`] was told.
    pub fn holds(&self, now: Instant) -> bool {
        self.held.load(SeqCst) > now.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// The end of the lease this worker holds, if any.
    pub fn held_until(&self) -> Option<Instant> {
        let nanos = self.held.load(SeqCst);
        (nanos > 0).then(|| self.epoch + Duration::from_nanos(nanos))
    }

    /// As the leader of `term`, seen now: since when it leads, as far as this worker knows.
    pub fn leading(&self, term: u64, now: Instant) -> Instant {
        let mut led = self.led.lock().unwrap_or_else(|e| e.into_inner());
        match *led {
            Some((t, since)) if t == term => since,
            _ => {
                *led = Some((term, now));
                now
            }
        }
    }

    /// As leader: grants `worker` a lease until `until`, unless it is withheld from it; whether it did.
    pub fn grant(&self, worker: &str, until: Instant) -> bool {
        let mut grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        if grants.withheld.contains(worker) {
            return false;
        }
        let length = self.length;
        grants.until.retain(|_, u| *u + length > until);
        let entry = grants.until.entry(worker.to_string()).or_insert(until);
        *entry = (*entry).max(until);
        true
    }

    /// As leader: grants no lease to `workers` from now on (besides those withheld already).
    pub fn withhold(&self, workers: &BTreeSet<String>) {
        let mut grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        grants.withheld.extend(workers.iter().cloned());
    }

    /// As leader: grants leases again to every withheld worker not among `workers`.
    pub fn withhold_only(&self, workers: &BTreeSet<String>) {
        let mut grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        grants.withheld.retain(|w| workers.contains(w));
    }

    /// As the leader since `since`: how long `worker`'s lease may still run at `now`, and a tenth of a length more
    /// for clocks that run at different rates. A worker that a previous leader granted a lease may hold it until one
    /// length after this leader took over.
    pub fn left_of(&self, worker: &str, since: Instant, now: Instant) -> Duration {
        let grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        let margin = self.length / 10;
        let mine = grants
            .until
            .get(worker)
            .map_or(Duration::ZERO, |u| (*u + margin).saturating_duration_since(now));
        let before = (since + self.length + margin).saturating_duration_since(now);
        mine.max(before)
    }

    /// A leader granted this worker a lease of `remaining` counted from `sent`.
    pub fn granted(&self, sent: Instant, remaining: Duration) {
        self.extend(sent + remaining.min(self.length));
    }

    /// A leader's grant named `version` as the newest table its log committed.
    pub fn table_at_least(&self, version: u64) {
        self.table.fetch_max(version, SeqCst);
    }

    /// The newest table version a grant named (0 before any): a worker whose committed table is older has not
    /// caught up with the log (it was paused or cut off), and must not act as a primary under it.
    pub fn table_version(&self) -> u64 {
        self.table.load(SeqCst)
    }
}

/// What a leader granted.
#[derive(Debug, Default)]
struct Grants {
    /// The end of the lease granted to each worker.
    until: HashMap<String, Instant>,
    /// Workers that get no lease: the coordinator is waiting for theirs to run out, to move their partitions.
    withheld: BTreeSet<String>,
}

/// The end of a lease of `length` counted from the time a quorum reached: the quorum-th latest of the voters'
/// times (`None` for a voter not heard from), or `None` if fewer than a quorum have one.
pub fn quorum_until(times: &[Option<Instant>], length: Duration) -> Option<Instant> {
    let quorum = times.len() / 2 + 1;
    let mut heard: Vec<Instant> = times.iter().flatten().copied().collect();
    if heard.len() < quorum {
        return None;
    }
    heard.sort_unstable_by(|a, b| b.cmp(a));
    Some(heard[quorum - 1] + length)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_counts_from_the_time_a_quorum_reached() {
        let t = Instant::now();
        let s = |ms| Some(t + Duration::from_millis(ms));
        let len = Duration::from_secs(2);
        // one voter: the leader alone
        assert_eq!(quorum_until(&[s(0)], len), Some(t + len));
        // three voters: the second latest
        assert_eq!(quorum_until(&[s(900), s(100), s(500)], len), s(2_500));
        assert_eq!(quorum_until(&[s(900), None, s(500)], len), s(2_500));
        assert_eq!(quorum_until(&[s(900), None, None], len), None);
        // five: the third latest; four voters need three
        assert_eq!(quorum_until(&[s(5), s(4), s(3), s(2), s(1)], len), s(2_003));
        assert_eq!(quorum_until(&[s(9), s(8), None, None], len), None);
    }

    #[test]
    fn the_table_version_a_grant_names_only_grows() {
        let leases = Leases::new(Duration::from_secs(2));
        assert_eq!(leases.table_version(), 0);
        leases.table_at_least(7);
        leases.table_at_least(5);
        assert_eq!(
            leases.table_version(),
            7,
            "a grant from a leader that is behind does not lower it"
        );
        leases.table_at_least(9);
        assert_eq!(leases.table_version(), 9);
    }

    #[test]
    fn a_leader_counts_only_its_own_term_and_a_grant_never_outlasts_the_length() {
        let leases = Leases::new(Duration::from_secs(2));
        let t = Instant::now();
        leases.accepted(2, 5, t);
        leases.accepted(3, 4, t + Duration::from_millis(50));
        let voters = [BTreeSet::from([1, 2, 3])];
        assert_eq!(leases.leader_until(1, 5, &voters, t), Some(t + Duration::from_secs(2)));
        assert_eq!(leases.leader_until(1, 6, &voters, t), None, "accepted in older terms only");
        // an older acceptance does not move a newer one back
        leases.accepted(2, 5, t - Duration::from_millis(10));
        assert_eq!(leases.leader_until(1, 5, &voters, t), Some(t + Duration::from_secs(2)));
        // while the voters change, a quorum of the new set is needed too: 1, 4 and 5 alone are not one of the old
        let joint = [BTreeSet::from([1, 2, 3]), BTreeSet::from([1, 2, 3, 4, 5])];
        assert_eq!(leases.leader_until(1, 5, &joint, t), None);
        let ahead = [BTreeSet::from([1, 4, 5]), BTreeSet::from([1, 2, 3, 4, 5])];
        leases.accepted(4, 5, t);
        leases.accepted(5, 5, t);
        assert_eq!(leases.leader_until(1, 5, &ahead, t), Some(t + Duration::from_secs(2)));

        leases.granted(t, Duration::from_secs(60));
        assert_eq!(leases.held_until(), Some(t + Duration::from_secs(2)));
        leases.granted(t, Duration::from_millis(100));
        assert_eq!(leases.held_until(), Some(t + Duration::from_secs(2)), "never shortened");
        leases.give_up();
        assert_eq!(leases.held_until(), None);
        leases.granted(t, Duration::from_secs(1));
        assert_eq!(leases.held_until(), None, "none once stopping");
    }

    #[test]
    fn a_new_leader_counts_the_leases_its_predecessor_may_have_granted() {
        let leases = Leases::new(Duration::from_secs(2));
        let t = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(leases.leading(7, t), t);
        assert_eq!(leases.leading(7, t + ms(500)), t, "the same term");
        // nobody granted by this leader: the predecessor's grants run at most one length from the take-over (and a
        // tenth more for clocks)
        assert_eq!(leases.left_of("w2", t, t + ms(500)), ms(1_700));
        assert_eq!(leases.left_of("w2", t, t + ms(2_200)), Duration::ZERO);
        assert!(leases.grant("w2", t + ms(3_000)));
        assert_eq!(leases.left_of("w2", t, t + ms(2_500)), ms(700));
        assert_eq!(leases.left_of("w3", t, t + ms(2_500)), Duration::ZERO);
        assert_eq!(leases.leading(8, t + ms(4_000)), t + ms(4_000), "a new term");
    }

    #[test]
    fn a_withheld_worker_gets_no_lease_until_it_is_let_go() {
        let leases = Leases::new(Duration::from_secs(2));
        let t = Instant::now();
        let ms = Duration::from_millis;
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert!(leases.grant("w2", t + ms(1_000)));
        leases.withhold(&names(&["w2", "w3"]));
        assert!(!leases.grant("w2", t + ms(2_000)), "withheld");
        // the grant made before still counts
        assert_eq!(leases.left_of("w2", t - ms(5_000), t + ms(500)), ms(700));
        leases.withhold_only(&names(&["w3"]));
        assert!(leases.grant("w2", t + ms(2_000)), "back among the members");
        assert!(!leases.grant("w3", t + ms(2_000)));
    }
}
