//! Partition placement: which members hold each of the 1,024 partitions, as primary and backups.
//!
//! Sans-IO and deterministic: a [`Table`] is a pure function of its inputs, so every node that is handed the same
//! inputs computes the same owners.
//!
//! - Keys map to partitions by a fixed-seed hash of their canonical bytes ([`partition_of`]).
//! - Each member ranks the partitions by a rendezvous score, a fixed-seed hash of (partition, member name)
//!   ([`score`]). A first table ([`Table::initial`]) gives each partition its highest-scoring members, under a
//!   capacity of ⌈partitions × replicas / members⌉ replica slots per member so that no member holds more than its
//!   share (plain rendezvous hashing leaves the busiest of 10 members about 15 % above the mean with 1,024
//!   partitions; the capacity keeps it within one slot).
//! - A membership change ([`Table::next`]) starts from the previous table: owners that are still members stay
//!   owners (a backup of a lost primary is promoted), the slots of lost members go to the highest-scoring members
//!   with room, and a new member takes the slots it scores highest from the members holding the most. So about
//!   1/N of the slots move on a join or a leave, and no slot moves from one surviving member to another.
//! - Primary roles are balanced by swapping roles inside a partition's owner set, which moves no data.

use std::collections::BTreeMap;

use thingport_protocol::peer::TableRecord;
use xxhash_rust::xxh3::xxh3_64_with_seed;

pub use thingport_protocol::partition::{PARTITIONS, partition_of};

/// Seed of the rendezvous score.
const SCORE_SEED: u64 = 0x7270_6c61_6365_6d74; // "rplacemt"

/// The rendezvous score of a member for a partition: higher is preferred.
pub fn score(partition: u16, member: &str) -> u64 {
    let mut bytes = Vec::with_capacity(2 + member.len());
    bytes.extend_from_slice(&partition.to_le_bytes());
    bytes.extend_from_slice(member.as_bytes());
    xxh3_64_with_seed(&bytes, SCORE_SEED)
}

/// Owners of every partition for one membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Increases with every change; nodes adopt the highest version they are given.
    pub version: u64,
    /// Members, sorted by name.
    pub members: Vec<String>,
    /// Copies of each partition (primary included), at most the number of members.
    pub replicas: usize,
    /// For each partition, indices into `members`: the primary first, then backups.
    owners: Vec<Vec<u16>>,
}

impl Table {
    /// The table of a cluster with these members and no history.
    pub fn initial(members: &[String], replicas: usize) -> Table {
        let empty = Table {
            version: 0,
            members: Vec::new(),
            replicas,
            owners: vec![Vec::new(); PARTITIONS],
        };
        empty.next_with(members, replicas)
    }

    /// The table after the membership became `members`, moving as few replica slots as possible, with as many
    /// copies per partition as before.
    pub fn next(&self, members: &[String]) -> Table {
        self.next_with(members, self.replicas)
    }

    /// The table after the membership became `members`, with `replicas` copies per partition (fewer while there
    /// are fewer members: a pool of one holds one copy, and gains the second when a second member joins).
    pub fn next_with(&self, members: &[String], replicas: usize) -> Table {
        let mut names: Vec<String> = members.to_vec();
        names.sort();
        names.dedup();
        let n = names.len();
        let replicas = replicas.min(n).max(usize::from(n > 0));
        let mut table = Table {
            version: self.version + 1,
            members: names,
            replicas,
            owners: vec![Vec::new(); PARTITIONS],
        };
        if n == 0 {
            return table;
        }
        let index: BTreeMap<&str, u16> =
            table.members.iter().enumerate().map(|(i, m)| (m.as_str(), i as u16)).collect();

        // 1. surviving owners keep their slots, in their order (a backup of a lost primary moves up)
        for (p, owners) in self.owners.iter().enumerate() {
            table.owners[p] = owners
                .iter()
                .filter_map(|&o| self.members.get(o as usize))
                .filter_map(|name| index.get(name.as_str()).copied())
                .take(replicas)
                .collect();
        }

        let total = PARTITIONS * replicas;
        let cap = total.div_ceil(n);
        let floor = total / n;
        let mut load = vec![0usize; n];
        for owners in &table.owners {
            for &o in owners {
                load[o as usize] += 1;
            }
        }

        // 2. new members take the slots they score highest, from the members holding the most
        let joined: Vec<u16> = table
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| !self.members.contains(m))
            .map(|(i, _)| i as u16)
            .collect();
        if !self.members.is_empty() {
            for &j in &joined {
                let mut ranked: Vec<u16> = (0..PARTITIONS as u16).collect();
                let name = &table.members[j as usize];
                ranked.sort_by_key(|&p| std::cmp::Reverse(score(p, name)));
                for p in ranked {
                    if load[j as usize] >= floor {
                        break;
                    }
                    let owners = &mut table.owners[p as usize];
                    if owners.contains(&j) || owners.len() < replicas {
                        continue;
                    }
                    // give up the slot of the most loaded owner, if it holds more than its share
                    let Some((slot, &donor)) =
                        owners.iter().enumerate().max_by_key(|(_, o)| load[**o as usize])
                    else {
                        continue;
                    };
                    if load[donor as usize] <= floor {
                        continue;
                    }
                    owners[slot] = j;
                    load[donor as usize] -= 1;
                    load[j as usize] += 1;
                }
            }
        }

        // 3. fill empty slots (lost members, a first table) with the highest-scoring members that have room
        for p in 0..PARTITIONS as u16 {
            let missing = replicas - table.owners[p as usize].len();
            if missing == 0 {
                continue;
            }
            let mut candidates: Vec<u16> =
                (0..n as u16).filter(|c| !table.owners[p as usize].contains(c)).collect();
            candidates.sort_by_key(|&c| std::cmp::Reverse(score(p, &table.members[c as usize])));
            for _ in 0..missing {
                let pick = candidates
                    .iter()
                    .position(|&c| load[c as usize] < cap)
                    .or(if candidates.is_empty() { None } else { Some(0) });
                let Some(i) = pick else { break };
                let c = candidates.remove(i);
                table.owners[p as usize].push(c);
                load[c as usize] += 1;
            }
        }

        table.balance_primaries();
        table
    }

    /// Swaps primary and backup roles inside partitions until primaries per member differ by at most one. Moves no
    /// data.
    fn balance_primaries(&mut self) {
        let n = self.members.len();
        if n < 2 || self.replicas < 2 {
            return;
        }
        let mut primaries = vec![0usize; n];
        for owners in &self.owners {
            if let Some(&p) = owners.first() {
                primaries[p as usize] += 1;
            }
        }
        loop {
            let (max_i, &max) = primaries
                .iter()
                .enumerate()
                .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
                .unwrap_or((0, &0));
            let (min_i, &min) =
                primaries.iter().enumerate().min_by_key(|(i, c)| (**c, *i)).unwrap_or((0, &0));
            if max <= min + 1 {
                return;
            }
            // a partition led by the busiest member where the least busy one is a backup
            let swap = self
                .owners
                .iter()
                .position(|o| o.first() == Some(&(max_i as u16)) && o.contains(&(min_i as u16)));
            match swap {
                Some(p) => {
                    let owners = &mut self.owners[p];
                    let at = owners.iter().position(|&o| o == min_i as u16).unwrap_or(0);
                    owners.swap(0, at);
                    primaries[max_i] -= 1;
                    primaries[min_i] += 1;
                }
                None => {
                    // no direct swap: move one primary role from the busiest member to any backup with fewer
                    let fallback = self.owners.iter().enumerate().find_map(|(p, o)| {
                        (o.first() == Some(&(max_i as u16)))
                            .then(|| {
                                o.iter()
                                    .skip(1)
                                    .find(|&&b| primaries[b as usize] + 1 < max)
                                    .map(|&b| (p, b))
                            })
                            .flatten()
                    });
                    let Some((p, b)) = fallback else { return };
                    let owners = &mut self.owners[p];
                    let at = owners.iter().position(|&o| o == b).unwrap_or(0);
                    owners.swap(0, at);
                    primaries[max_i] -= 1;
                    primaries[b as usize] += 1;
                }
            }
        }
    }

    /// Owners of a partition, primary first.
    pub fn owners(&self, partition: u16) -> impl Iterator<Item = &str> {
        self.owners[partition as usize].iter().map(|&o| self.members[o as usize].as_str())
    }

    /// The primary of a partition.
    pub fn primary(&self, partition: u16) -> Option<&str> {
        self.owners(partition).next()
    }

    /// Replica slots (primary and backup) each member holds.
    pub fn load(&self) -> BTreeMap<&str, usize> {
        let mut load: BTreeMap<&str, usize> =
            self.members.iter().map(|m| (m.as_str(), 0)).collect();
        for owners in &self.owners {
            for &o in owners {
                *load.entry(self.members[o as usize].as_str()).or_default() += 1;
            }
        }
        load
    }

    /// Primaries each member holds.
    pub fn primaries(&self) -> BTreeMap<&str, usize> {
        let mut load: BTreeMap<&str, usize> =
            self.members.iter().map(|m| (m.as_str(), 0)).collect();
        for owners in &self.owners {
            if let Some(&o) = owners.first() {
                *load.entry(self.members[o as usize].as_str()).or_default() += 1;
            }
        }
        load
    }

    /// The same table with some members renamed (`renames`: old name → new name), each keeping its slots and
    /// roles: a worker restarted with its store inherits the slots of its previous run. Renames to a name already in
    /// the table, or of names not in it, are ignored.
    pub fn renamed(&self, renames: &BTreeMap<String, String>) -> Table {
        let names: Vec<String> = self
            .members
            .iter()
            .map(|m| match renames.get(m) {
                Some(new) if !self.members.contains(new) => new.clone(),
                _ => m.clone(),
            })
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != names.len() {
            return self.clone();
        }
        let index: BTreeMap<&str, u16> =
            sorted.iter().enumerate().map(|(i, m)| (m.as_str(), i as u16)).collect();
        let remap: Vec<u16> = names.iter().map(|n| index[n.as_str()]).collect();
        Table {
            version: self.version,
            members: sorted.clone(),
            replicas: self.replicas,
            owners: self
                .owners
                .iter()
                .map(|o| o.iter().map(|&i| remap[i as usize]).collect())
                .collect(),
        }
    }

    /// Whether `member` holds a copy of the partition.
    pub fn holds(&self, partition: u16, member: &str) -> bool {
        self.owners(partition).any(|o| o == member)
    }

    /// The table as the peer format carries it.
    pub fn to_record(&self) -> TableRecord {
        TableRecord {
            version: self.version,
            replicas: self.replicas as u32,
            members: self.members.clone(),
            owners: self.owners.clone(),
        }
    }

    /// A table received from a peer; `None` if it is not well formed (every partition needs 1..=replicas distinct
    /// owners among the members).
    pub fn from_record(record: TableRecord) -> Option<Table> {
        let n = record.members.len();
        let replicas = record.replicas as usize;
        // versions only grow by one per change: one this large is not from a pool, and would overflow
        let well_formed = record.version < u64::MAX / 2
            && record.owners.len() == PARTITIONS
            && record.members.windows(2).all(|w| w[0] < w[1])
            && record.owners.iter().all(|o| {
                !o.is_empty()
                    && o.len() <= replicas
                    && o.iter().all(|&i| (i as usize) < n)
                    && o.iter().enumerate().all(|(k, i)| !o[..k].contains(i))
            });
        if !well_formed {
            return None;
        }
        Some(Table {
            version: record.version,
            members: record.members,
            replicas,
            owners: record.owners,
        })
    }

    /// Replica slots whose holder differs between `self` and `other`, as (partition, from, to) — a slot held by a
    /// member in one table and not the other.
    pub fn moves<'a>(&'a self, other: &'a Table) -> Vec<(u16, Option<&'a str>, Option<&'a str>)> {
        let mut moves = Vec::new();
        for p in 0..PARTITIONS as u16 {
            let before: Vec<&str> = self.owners(p).collect();
            let after: Vec<&str> = other.owners(p).collect();
            let gone: Vec<&str> = before.iter().filter(|m| !after.contains(m)).copied().collect();
            let came: Vec<&str> = after.iter().filter(|m| !before.contains(m)).copied().collect();
            for i in 0..gone.len().max(came.len()) {
                moves.push((p, gone.get(i).copied(), came.get(i).copied()));
            }
        }
        moves
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(n: usize, salt: u32) -> Vec<String> {
        (0..n).map(|i| format!("worker-{salt}-{i}")).collect()
    }

    fn ratio(load: &BTreeMap<&str, usize>) -> f64 {
        let max = *load.values().max().unwrap_or(&0) as f64;
        let mean = load.values().sum::<usize>() as f64 / load.len() as f64;
        max / mean
    }

    #[test]
    fn a_pool_of_one_gains_its_second_copy_when_a_second_member_joins() {
        let alone = Table::initial(&names(1, 3), 2);
        assert_eq!(alone.replicas, 1);
        let pair = alone.next_with(&names(2, 3), 2);
        assert_eq!(pair.replicas, 2);
        assert!((0..PARTITIONS as u16).all(|p| pair.owners(p).count() == 2));
        // the first member keeps every partition it held
        assert!((0..PARTITIONS as u16).all(|p| pair.holds(p, &names(1, 3)[0])));
    }

    #[test]
    fn tables_from_peers_round_trip_and_malformed_ones_are_refused() {
        let table = Table::initial(&names(3, 1), 2);
        assert_eq!(Table::from_record(table.to_record()), Some(table.clone()));
        let mut record = table.to_record();
        record.owners[5] = vec![0, 0];
        assert_eq!(Table::from_record(record), None, "one member twice");
        let mut record = table.to_record();
        record.owners[5] = vec![3];
        assert_eq!(Table::from_record(record), None, "no such member");
        let mut record = table.to_record();
        record.owners.pop();
        assert_eq!(Table::from_record(record), None, "a partition missing");
        let mut record = table.to_record();
        record.members.swap(0, 1);
        assert_eq!(Table::from_record(record), None, "members out of order");
    }

    #[test]
    fn plain_rendezvous_is_not_balanced_enough() {
        // the reason for the capacity: highest score alone leaves a member well above the mean
        let members = names(10, 7);
        let mut load: BTreeMap<&str, usize> = BTreeMap::new();
        for p in 0..PARTITIONS as u16 {
            let best = members.iter().max_by_key(|m| score(p, m)).unwrap();
            *load.entry(best.as_str()).or_default() += 1;
        }
        assert!(ratio(&load) > 1.05, "{load:?}");
    }

    #[test]
    fn keys_spread_over_partitions() {
        let mut counts = vec![0u32; PARTITIONS];
        for i in 0..102_400u32 {
            counts[partition_of(format!("thing-{i}").as_bytes()) as usize] += 1;
        }
        let max = *counts.iter().max().unwrap();
        assert!(max < 150, "a partition got {max} of 100 expected keys");
        assert_eq!(partition_of(b"pump-1"), partition_of(b"pump-1"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn tables_are_balanced(n in 3usize..=10, salt: u32, replicas in 1usize..=3) {
            let table = Table::initial(&names(n, salt), replicas);
            prop_assert!(ratio(&table.load()) <= 1.10, "slots {:?}", table.load());
            prop_assert!(ratio(&table.primaries()) <= 1.10, "primaries {:?}", table.primaries());
            for p in 0..PARTITIONS as u16 {
                let owners: Vec<&str> = table.owners(p).collect();
                prop_assert_eq!(owners.len(), replicas.min(n));
                let mut unique = owners.clone();
                unique.sort();
                unique.dedup();
                prop_assert_eq!(unique.len(), owners.len(), "a member twice in partition {}", p);
            }
            prop_assert_eq!(Table::initial(&names(n, salt), replicas), table, "not deterministic");
        }

        #[test]
        fn a_join_moves_about_one_nth_and_only_to_the_new_member(n in 3usize..=9, salt: u32) {
            let members = names(n, salt);
            let before = Table::initial(&members, 2);
            let mut grown = members.clone();
            grown.push(format!("joiner-{salt}"));
            let after = before.next(&grown);
            let moves = after.moves(&before);
            let share = (PARTITIONS * 2) as f64 / (n + 1) as f64;
            prop_assert!((moves.len() as f64) <= share * 1.10 && (moves.len() as f64) >= share * 0.90,
                "{} slots moved, {share:.0} expected", moves.len());
            let joiner = format!("joiner-{salt}");
            for (p, _from, to) in before.moves(&after) {
                prop_assert_eq!(to, Some(joiner.as_str()), "partition {} moved between survivors", p);
            }
            prop_assert!(ratio(&after.load()) <= 1.10, "{:?}", after.load());
            prop_assert!(ratio(&after.primaries()) <= 1.10, "{:?}", after.primaries());
        }

        #[test]
        fn a_leave_moves_only_the_lost_members_slots(n in 4usize..=10, salt: u32, gone in 0usize..10) {
            let members = names(n, salt);
            let before = Table::initial(&members, 2);
            let lost = members[gone % n].clone();
            let remaining: Vec<String> = members.iter().filter(|m| **m != lost).cloned().collect();
            let after = before.next(&remaining);
            for (p, from, _) in before.moves(&after) {
                prop_assert_eq!(from, Some(lost.as_str()), "partition {} moved between survivors", p);
            }
            let lost_slots = before.load()[lost.as_str()];
            prop_assert_eq!(before.moves(&after).len(), lost_slots);
            prop_assert!(ratio(&after.load()) <= 1.10, "{:?}", after.load());
            prop_assert!(ratio(&after.primaries()) <= 1.10, "{:?}", after.primaries());
            // every partition keeps a surviving copy: a lost primary's backup took over
            for p in 0..PARTITIONS as u16 {
                let was: Vec<&str> = before.owners(p).collect();
                if was.first() == Some(&lost.as_str()) {
                    prop_assert!(after.owners(p).any(|o| o == was[1]));
                }
            }
        }
    }

    #[test]
    fn a_renamed_member_keeps_its_slots_and_roles() {
        let members: Vec<String> = ["a#1", "b#1", "c#1"].iter().map(|s| s.to_string()).collect();
        let table = Table::initial(&members, 2);
        let renames: BTreeMap<String, String> =
            [("a#1".to_string(), "z#2".to_string())].into_iter().collect();
        let renamed = table.renamed(&renames);
        assert_eq!(renamed.members, vec!["b#1", "c#1", "z#2"]);
        for p in 0..PARTITIONS as u16 {
            let before: Vec<&str> =
                table.owners(p).map(|o| if o == "a#1" { "z#2" } else { o }).collect();
            assert_eq!(renamed.owners(p).collect::<Vec<_>>(), before);
        }
        assert!(Table::from_record(renamed.to_record()).is_some());
        // the next table over the renamed members moves nothing
        let next = renamed.next(&renamed.members);
        for p in 0..PARTITIONS as u16 {
            assert_eq!(next.owners(p).collect::<Vec<_>>(), renamed.owners(p).collect::<Vec<_>>());
        }
    }
}
