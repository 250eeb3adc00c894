//! Which device sessions are on this gateway, and the queue of frames towards each.
//!
//! Links deliver to a session through its [`Inbox`]: `STORED` acknowledgements, `DOWNSTREAM` frames and
//! `REJECTED` verdicts. The inbox is the session's bounded send queue. Its policy when full: the oldest telemetry
//! frame (`PROPERTIES`, `EVENT`) is dropped to make room; if the queue holds only service traffic, the session is
//! marked overflowed and closed with `SLOW_CONSUMER`, and the frames it still held are reported `UNDELIVERABLE` to
//! their workers. A service request or response is never dropped silently.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use dashmap::DashMap;
use thingport_protocol::{ByteString, ErrorCode, FrameType};
use tokio::sync::Notify;

use crate::metrics;

/// A frame from a worker for the device, with what is needed to report it undeliverable.
#[derive(Debug, Clone)]
pub struct Downstream {
    pub frame: Bytes,
    pub link: usize,
    pub reference: u64,
}

impl Downstream {
    fn is_telemetry(&self) -> bool {
        matches!(
            self.frame.first().and_then(|b| FrameType::from_u8(*b).ok()),
            Some(FrameType::Properties | FrameType::Event)
        )
    }
}

/// What links have delivered to a session since it last looked.
#[derive(Debug, Default)]
pub struct Delivered {
    /// Runs `first..=last` of data frames answered `STORED` (or `STORED_RUN`), adjacent runs joined.
    pub stored: Vec<(u64, u64)>,
    pub downstream: VecDeque<Downstream>,
    /// A worker refused data frame `.0` with code `.1`: the session ends with that code.
    pub rejected: Option<(u64, ErrorCode)>,
    /// The queue overflowed with service traffic: the session ends with SLOW_CONSUMER.
    pub overflowed: bool,
    /// A newer session for the same thing took over.
    pub replaced: bool,
}

#[derive(Debug)]
struct InboxState {
    delivered: Delivered,
    bytes: usize,
    closed: bool,
}

/// The shared side of a session: links push, the session task takes.
#[derive(Debug)]
pub struct Inbox {
    state: Mutex<InboxState>,
    notify: Notify,
    max_frames: usize,
    max_bytes: usize,
}

/// Outcome of pushing a downstream frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// Queued after dropping the oldest telemetry frame, returned so its worker can be told.
    QueuedDropping(Box<DownstreamRef>),
    /// The session is closed or overflowed; the frame was not queued.
    Refused,
}

/// Where a dropped downstream frame came from.
#[derive(Debug, PartialEq, Eq)]
pub struct DownstreamRef {
    pub link: usize,
    pub reference: u64,
}

impl Inbox {
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        Inbox {
            state: Mutex::new(InboxState {
                delivered: Delivered::default(),
                bytes: 0,
                closed: false,
            }),
            notify: Notify::new(),
            max_frames,
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that the data frames `first..=last` are stored.
    pub fn stored(&self, first: u64, last: u64) {
        let mut state = self.lock();
        if !state.closed {
            let runs = &mut state.delivered.stored;
            match runs.last_mut() {
                Some(run) if run.1.checked_add(1) == Some(first) => run.1 = last,
                _ => runs.push((first, last)),
            }
            drop(state);
            self.notify.notify_one();
        }
    }

    pub fn rejected(&self, seq: u64, code: ErrorCode) {
        self.lock().delivered.rejected.get_or_insert((seq, code));
        self.notify.notify_one();
    }

    pub fn replaced(&self) {
        self.lock().delivered.replaced = true;
        self.notify.notify_one();
    }

    /// Queues a frame for the device under the queue's policy (see the module header).
    pub fn push(&self, item: Downstream) -> Push {
        let mut state = self.lock();
        if state.closed || state.delivered.overflowed {
            return Push::Refused;
        }
        let len = item.frame.len();
        let mut outcome = Push::Queued;
        let full = |s: &InboxState| {
            s.delivered.downstream.len() >= self.max_frames || s.bytes + len > self.max_bytes
        };
        if full(&state) {
            let oldest_telemetry =
                state.delivered.downstream.iter().position(Downstream::is_telemetry);
            match oldest_telemetry {
                Some(i) => {
                    let dropped =
                        state.delivered.downstream.remove(i).unwrap_or_else(|| unreachable!());
                    state.bytes -= dropped.frame.len();
                    metrics::dropped("send_queue_full");
                    outcome = Push::QueuedDropping(Box::new(DownstreamRef {
                        link: dropped.link,
                        reference: dropped.reference,
                    }));
                }
                None if item.is_telemetry() => {
                    metrics::dropped("send_queue_full");
                    return Push::Refused;
                }
                None => {
                    state.delivered.overflowed = true;
                    drop(state);
                    self.notify.notify_one();
                    return Push::Refused;
                }
            }
            if full(&state) {
                return Push::Refused;
            }
        }
        state.bytes += len;
        state.delivered.downstream.push_back(item);
        let depth = state.delivered.downstream.len();
        drop(state);
        metrics::per_frame().send_queue.record(depth as f64);
        self.notify.notify_one();
        outcome
    }

    /// Takes everything delivered so far. Downstream frames are taken only up to `room` (the session's send
    /// window); the rest wait.
    pub fn take(&self, room: usize) -> Delivered {
        let mut state = self.lock();
        let split = state.delivered.downstream.len().saturating_sub(room);
        let rest = if split > 0 {
            let keep_from = room.min(state.delivered.downstream.len());
            state.delivered.downstream.split_off(keep_from)
        } else {
            VecDeque::new()
        };
        let taken = std::mem::replace(
            &mut state.delivered,
            Delivered { downstream: rest, ..Delivered::default() },
        );
        state.bytes = state.delivered.downstream.iter().map(|d| d.frame.len()).sum();
        taken
    }

    /// Closes the inbox and returns the frames it still held.
    pub fn close(&self) -> VecDeque<Downstream> {
        let mut state = self.lock();
        state.closed = true;
        state.bytes = 0;
        std::mem::take(&mut state.delivered.downstream)
    }

    /// Waits until something is pushed (or returns at once if something was pushed since the last wait).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

/// A session as the registry knows it.
#[derive(Debug, Clone)]
pub struct SessionEntry {
    pub thing: ByteString,
    pub inbox: Arc<Inbox>,
    pub opened: Instant,
    /// The session's link `OPEN`, sent again when a link (re)connects: a worker that restarted has no bindings.
    pub open: thingport_protocol::LinkFrame,
}

/// All sessions on this gateway, by id and by thing.
#[derive(Debug, Default)]
pub struct Registry {
    sessions: DashMap<u64, SessionEntry>,
    things: DashMap<ByteString, u64>,
}

impl Registry {
    /// Registers a session; a session already open for the same thing is told it was replaced.
    pub fn insert(&self, session_id: u64, entry: SessionEntry) {
        let thing = entry.thing.clone();
        self.sessions.insert(session_id, entry);
        if let Some(older) = self.things.insert(thing, session_id)
            && older != session_id
            && let Some(old) = self.sessions.get(&older)
        {
            old.inbox.replaced();
        }
    }

    /// Removes a session (and its thing's entry if it still points at it).
    pub fn remove(&self, session_id: u64) {
        if let Some((_, entry)) = self.sessions.remove(&session_id) {
            self.things.remove_if(&entry.thing, |_, id| *id == session_id);
        }
    }

    pub fn get(&self, session_id: u64) -> Option<Arc<Inbox>> {
        self.sessions.get(&session_id).map(|e| e.inbox.clone())
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// The link `OPEN` of every session.
    pub fn opens(&self) -> Vec<(u64, thingport_protocol::LinkFrame)> {
        self.sessions.iter().map(|e| (*e.key(), e.value().open.clone())).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: FrameType, len: usize) -> Downstream {
        let mut bytes = vec![0u8; len];
        bytes[0] = kind as u8;
        Downstream { frame: Bytes::from(bytes), link: 0, reference: len as u64 }
    }

    #[test]
    fn full_queue_drops_oldest_telemetry() {
        let inbox = Inbox::new(2, 1 << 20);
        assert_eq!(inbox.push(frame(FrameType::ServiceRequest, 10)), Push::Queued);
        assert_eq!(inbox.push(frame(FrameType::Properties, 11)), Push::Queued);
        let pushed = inbox.push(frame(FrameType::Properties, 12));
        assert_eq!(
            pushed,
            Push::QueuedDropping(Box::new(DownstreamRef { link: 0, reference: 11 }))
        );
        let taken = inbox.take(10);
        let kept: Vec<u64> = taken.downstream.iter().map(|d| d.reference).collect();
        assert_eq!(kept, vec![10, 12]);
        assert!(!taken.overflowed);
    }

    #[test]
    fn full_queue_of_service_traffic_overflows_the_session() {
        let inbox = Inbox::new(1, 1 << 20);
        assert_eq!(inbox.push(frame(FrameType::ServiceRequest, 10)), Push::Queued);
        assert_eq!(inbox.push(frame(FrameType::ServiceResponse, 10)), Push::Refused);
        assert!(inbox.take(0).overflowed);
    }

    #[test]
    fn take_respects_room_and_keeps_the_rest() {
        let inbox = Inbox::new(10, 1 << 20);
        for len in 10..14 {
            inbox.push(frame(FrameType::Event, len));
        }
        assert_eq!(inbox.take(3).downstream.len(), 3);
        assert_eq!(inbox.take(3).downstream.len(), 1);
    }

    #[test]
    fn a_new_session_for_a_thing_replaces_the_old_one() {
        let registry = Registry::default();
        let entry = |thing: &'static str| SessionEntry {
            thing: ByteString::from_static(thing),
            inbox: Arc::new(Inbox::new(4, 1024)),
            opened: Instant::now(),
            open: thingport_protocol::LinkFrame::Goaway,
        };
        let first = entry("pump");
        let first_inbox = first.inbox.clone();
        registry.insert(1, first);
        registry.insert(2, entry("pump"));
        assert!(first_inbox.take(0).replaced);
        registry.remove(1);
        assert!(registry.get(2).is_some(), "removing the old session keeps the new one");
        registry.remove(2);
        assert!(registry.is_empty());
    }
}
