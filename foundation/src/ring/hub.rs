//! A worker's change log: the changes it acknowledged as a partition's primary, numbered 1, 2, 3, ... in the order
//! they were acknowledged, kept in memory up to a count and a size (the oldest go first). Streams of changes
//! (`crate::streams`) read it, on this worker directly and on others through the peer request `Watch`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thingport_protocol::peer::{ChangeRecord, UpdateRecord};
use tokio::sync::watch;

/// Bytes counted for a change besides its names and value.
const OVERHEAD: usize = 96;

/// The change log.
#[derive(Debug)]
pub struct Hub {
    log: Mutex<Log>,
    /// The number the next change will get.
    next: watch::Sender<u64>,
    max_changes: usize,
    max_bytes: usize,
}

#[derive(Debug)]
struct Log {
    /// The number of `changes[0]`.
    first: u64,
    changes: VecDeque<Arc<UpdateRecord>>,
    bytes: usize,
}

/// A read from the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// The oldest change still held (equal to `next` when none is).
    pub first: u64,
    pub next: u64,
    pub updates: Vec<Arc<UpdateRecord>>,
}

fn weight(update: &UpdateRecord) -> usize {
    let change = match &update.change {
        ChangeRecord::Property { name, value, .. } => name.len() + value.len(),
        ChangeRecord::Event { name, payload, .. } => name.len() + payload.len(),
        ChangeRecord::Online { gateway, .. } => gateway.len(),
        ChangeRecord::Offline { .. } => 0,
        ChangeRecord::Removed { property, .. } => property.as_ref().map_or(0, String::len),
    };
    OVERHEAD + update.thing.len() + update.tags.iter().map(String::len).sum::<usize>() + change
}

impl Hub {
    /// A log that keeps at most `max_changes` changes and about `max_bytes` of them.
    pub fn new(max_changes: usize, max_bytes: usize) -> Hub {
        Hub {
            log: Mutex::new(Log { first: 1, changes: VecDeque::new(), bytes: 0 }),
            next: watch::Sender::new(1),
            max_changes: max_changes.max(1),
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends changes of one acknowledged write, numbering them.
    pub fn publish(&self, changes: Vec<(String, Vec<String>, ChangeRecord)>) {
        if changes.is_empty() {
            return;
        }
        let next = {
            let mut log = self.lock();
            for (thing, tags, change) in changes {
                let seq = log.first + log.changes.len() as u64;
                let update = UpdateRecord { seq, thing, tags, change };
                log.bytes += weight(&update);
                log.changes.push_back(Arc::new(update));
            }
            while log.changes.len() > self.max_changes
                || (log.bytes > self.max_bytes && log.changes.len() > 1)
            {
                if let Some(old) = log.changes.pop_front() {
                    log.bytes -= weight(&old);
                    log.first += 1;
                }
            }
            log.first + log.changes.len() as u64
        };
        self.next.send_replace(next);
    }

    /// Changes after number `after` (none: only the position), at most `max` and about `max_bytes`.
    pub fn read(&self, after: Option<u64>, max: usize, max_bytes: usize) -> Page {
        let log = self.lock();
        let next = log.first + log.changes.len() as u64;
        let mut updates = Vec::new();
        if let Some(after) = after {
            let skip = (after + 1).saturating_sub(log.first) as usize;
            let mut bytes = 0;
            for update in log.changes.iter().skip(skip).take(max) {
                bytes += weight(update);
                if bytes > max_bytes && !updates.is_empty() {
                    break;
                }
                updates.push(update.clone());
            }
        }
        Page { first: log.first, next, updates }
    }

    /// As [`Hub::read`], waiting up to `wait` for a change after `after` if there is none yet.
    pub async fn watch(
        &self,
        after: Option<u64>,
        max: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> Page {
        if let Some(after) = after {
            let mut next = self.next.subscribe();
            let _ = tokio::time::timeout(wait, next.wait_for(|&n| n > after + 1)).await;
        }
        self.read(after, max, max_bytes)
    }

    /// Changes held and their size in bytes (as counted against the bound).
    pub fn held(&self) -> (usize, usize) {
        let log = self.lock();
        (log.changes.len(), log.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offline(thing: &str) -> (String, Vec<String>, ChangeRecord) {
        (thing.to_string(), Vec::new(), ChangeRecord::Offline { at_ms: 1 })
    }

    #[test]
    fn changes_are_numbered_from_one_and_read_after_a_number() {
        let hub = Hub::new(100, 1 << 20);
        assert_eq!(hub.read(None, 10, 1 << 20), Page { first: 1, next: 1, updates: vec![] });
        hub.publish(vec![offline("a"), offline("b")]);
        hub.publish(vec![offline("c")]);
        let page = hub.read(Some(1), 10, 1 << 20);
        assert_eq!((page.first, page.next), (1, 4));
        let things: Vec<_> = page.updates.iter().map(|u| (u.seq, u.thing.as_str())).collect();
        assert_eq!(things, [(2, "b"), (3, "c")]);
        assert_eq!(hub.read(Some(0), 2, 1 << 20).updates.len(), 2, "at most max");
        assert!(hub.read(Some(3), 10, 1 << 20).updates.is_empty());
    }

    #[test]
    fn the_oldest_changes_go_past_the_bounds_and_a_reader_sees_it_missed_them() {
        let hub = Hub::new(3, 1 << 20);
        for t in ["a", "b", "c", "d", "e"] {
            hub.publish(vec![offline(t)]);
        }
        let page = hub.read(Some(0), 10, 1 << 20);
        assert_eq!((page.first, page.next), (3, 6));
        assert_eq!(page.updates[0].thing, "c");
        assert!(page.first > 1, "a reader after 0 can tell it missed 1 and 2");
        assert_eq!(hub.held().0, 3);

        let small = Hub::new(1_000, 3 * (OVERHEAD + 1));
        for t in ["a", "b", "c", "d", "e"] {
            small.publish(vec![offline(t)]);
        }
        assert_eq!(small.held(), (3, 3 * (OVERHEAD + 1)), "bounded by bytes");
    }

    #[tokio::test]
    async fn a_watch_waits_for_the_next_change() {
        let hub = Arc::new(Hub::new(100, 1 << 20));
        hub.publish(vec![offline("a")]);
        let waiting = {
            let hub = hub.clone();
            tokio::spawn(
                async move { hub.watch(Some(1), 10, 1 << 20, Duration::from_secs(30)).await },
            )
        };
        tokio::task::yield_now().await;
        hub.publish(vec![offline("b")]);
        let page = waiting.await.expect("the watch ends");
        assert_eq!(page.updates.len(), 1);
        assert_eq!(page.updates[0].thing, "b");
    }
}
