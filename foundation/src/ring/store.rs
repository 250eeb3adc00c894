//! The partitions this node holds: 1,024 independently locked maps from thing name to its state.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use thingport_protocol::ByteString;

use crate::model::ThingState;
use crate::ring::placement::{PARTITIONS, partition_of};

/// One partition's things.
pub type Partition = BTreeMap<ByteString, ThingState>;

/// The node's partition stores.
#[derive(Debug)]
pub struct Store {
    partitions: Vec<Mutex<Partition>>,
}

impl Default for Store {
    fn default() -> Self {
        Store { partitions: (0..PARTITIONS).map(|_| Mutex::new(Partition::new())).collect() }
    }
}

impl Store {
    fn lock(&self, partition: u16) -> MutexGuard<'_, Partition> {
        self.partitions[partition as usize].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on a partition.
    pub fn with<T>(&self, partition: u16, f: impl FnOnce(&mut Partition) -> T) -> T {
        f(&mut self.lock(partition))
    }

    /// A copy of a thing's state.
    pub fn get(&self, thing: &str) -> Option<ThingState> {
        self.lock(partition_of(thing.as_bytes())).get(thing).cloned()
    }

    /// `f` applied to every thing of the partitions `keep` selects.
    pub fn list<T>(
        &self,
        keep: impl Fn(u16) -> bool,
        mut f: impl FnMut(&ByteString, &ThingState) -> T,
    ) -> Vec<T> {
        let mut all = Vec::new();
        for p in (0..PARTITIONS as u16).filter(|&p| keep(p)) {
            let partition = self.lock(p);
            all.extend(partition.iter().map(|(k, v)| f(k, v)));
        }
        all
    }

    /// Empties a partition this node no longer holds.
    pub fn clear(&self, partition: u16) -> usize {
        let mut partition = self.lock(partition);
        let n = partition.len();
        partition.clear();
        n
    }

    /// Things held in each partition.
    pub fn counts(&self) -> Vec<usize> {
        (0..PARTITIONS as u16).map(|p| self.lock(p).len()).collect()
    }
}
