//! A worker's change log: the changes it applied as a partition's primary, numbered 1, 2, 3, ... in the order their
//! writes finished, kept in memory up to a count and a size (the oldest go first). Streams of changes
//! (`crate::streams`) read it, on this worker directly and on others through the peer request `Watch`.
//!
//! The log is kept only while someone reads it: for [`KEPT_UNREAD`] after the last read. Before that a write only
//! moves the log's numbers on, so that a reader who comes back after a change that was not kept sees it missed
//! something (`first` is past its place) rather than nothing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thingport_protocol::peer::{ChangeRecord, UpdateRecord};
use tokio::sync::watch;

/// Bytes counted for a change besides its names and value.
const OVERHEAD: usize = 96;
/// How long the log keeps changes after its last read.
pub const KEPT_UNREAD: Duration = Duration::from_secs(600);

/// The change log.
#[derive(Debug)]
pub struct Hub {
    log: Mutex<Log>,
    /// The number the next change will get.
    next: watch::Sender<u64>,
    max_changes: usize,
    max_bytes: usize,
    /// Milliseconds since `started` until which the log keeps changes (0: it was never read).
    read_until_ms: AtomicU64,
    started: Instant,
}

#[derive(Debug)]
struct Log {
    /// The number of `changes[0]`.
    first: u64,
    changes: VecDeque<Arc<UpdateRecord>>,
    bytes: usize,
    /// The last write skipped the log and nothing was kept since.
    skipped: bool,
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
            log: Mutex::new(Log { first: 1, changes: VecDeque::new(), bytes: 0, skipped: false }),
            next: watch::Sender::new(1),
            max_changes: max_changes.max(1),
            max_bytes,
            read_until_ms: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Whether someone read the log within [`KEPT_UNREAD`]: only then are changes kept (see [`Hub::skip`]).
    pub fn kept(&self) -> bool {
        self.elapsed_ms() < self.read_until_ms.load(Ordering::Relaxed)
    }

    /// A write that applied changes while the log is not kept: it forgets what it holds and moves its numbers on,
    /// so that a reader whose place is older sees that it missed changes.
    pub fn skip(&self) {
        let mut log = self.lock();
        if log.skipped {
            // no place was given out since: moving on again would tell no reader more
            return;
        }
        let next = self.next_number(&log) + 1;
        log.changes.clear();
        log.bytes = 0;
        log.first = next;
        log.skipped = true;
        drop(log);
        self.next.send_replace(next);
    }

    fn next_number(&self, log: &Log) -> u64 {
        log.first + log.changes.len() as u64
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
            log.skipped = false;
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
        self.read_until_ms
            .store(self.elapsed_ms() + KEPT_UNREAD.as_millis() as u64, Ordering::Relaxed);
        let mut log = self.lock();
        // a place is given out: a later skip must move past it
        log.skipped = false;
        let next = log.first + log.changes.len() as u64;
        let mut updates = Vec::new();
        if let Some(after) = after {
            let skip =
                after.saturating_add(1).saturating_sub(log.first).min(usize::MAX as u64) as usize;
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
            let _ =
                tokio::time::timeout(wait, next.wait_for(|&n| n > after.saturating_add(1))).await;
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

    #[test]
    fn unread_the_log_keeps_nothing_and_a_reader_coming_back_sees_it_missed_changes() {
        let hub = Hub::new(100, 1 << 20);
        assert!(!hub.kept(), "never read");
        hub.skip();
        hub.skip();
        let place = hub.read(None, 0, 0).next - 1;
        assert!(hub.kept(), "read just now");
        hub.publish(vec![offline("a")]);
        assert_eq!(hub.read(Some(place), 10, 1 << 20).updates.len(), 1);
        // as if unread for long: the next writes skip
        hub.read_until_ms.store(0, Ordering::Relaxed);
        hub.skip();
        hub.skip();
        let page = hub.read(Some(place + 1), 10, 1 << 20);
        assert!(page.updates.is_empty());
        assert!(
            page.first > place + 2,
            "the reader after {} can tell it missed a change",
            place + 1
        );
        assert_eq!(hub.read(Some(u64::MAX), 10, 1 << 20).updates.len(), 0, "no overflow");
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
