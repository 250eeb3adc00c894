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

    /// Runs `f` on a thing's state, creating the thing (at `now_ms`) if `create` and it does not exist.
    pub fn update<T>(
        &self,
        thing: &ByteString,
        create: bool,
        now_ms: u64,
        f: impl FnOnce(&mut ThingState) -> T,
    ) -> Option<T> {
        let mut partition = self.lock(partition_of(thing.as_bytes()));
        if !partition.contains_key(thing) {
            if !create {
                return None;
            }
            partition
                .insert(thing.clone(), ThingState { created_ms: now_ms, ..ThingState::default() });
        }
        partition.get_mut(thing).map(f)
    }

    /// A copy of a thing's state.
    pub fn get(&self, thing: &str) -> Option<ThingState> {
        self.lock(partition_of(thing.as_bytes())).get(thing).cloned()
    }

    /// Every thing, with `f` applied to its state, sorted by name.
    pub fn list<T>(&self, mut f: impl FnMut(&ByteString, &ThingState) -> T) -> Vec<T> {
        let mut all = Vec::new();
        for p in 0..PARTITIONS as u16 {
            let partition = self.lock(p);
            let mut items: Vec<_> = partition.iter().map(|(k, v)| (k.clone(), f(k, v))).collect();
            all.append(&mut items);
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all.into_iter().map(|(_, t)| t).collect()
    }

    /// Things held in each partition.
    pub fn counts(&self) -> Vec<usize> {
        (0..PARTITIONS as u16).map(|p| self.lock(p).len()).collect()
    }
}
