//! The thing model as the ring stores it: things, their properties (latest value, device timestamp, quality,
//! receive time), their binding to a gateway session, and recent events.
//!
//! All state of a thing lives in one partition (keyed by the thing's name), so one primary orders every write to
//! it. Writes are idempotent: a property update applies only if it is newer by (device timestamp, incarnation,
//! sequence number) — last writer wins — and an event is keyed by (incarnation, sequence number), so a frame applied
//! twice (a retransmission, a retry on another link) changes nothing the second time.

use std::collections::{BTreeMap, VecDeque};

use thingport_protocol::{ByteString, Quality, Value};

/// Events kept per thing (oldest dropped first).
pub const EVENTS_KEPT: usize = 100;
/// Ended sessions remembered per thing (oldest forgotten first).
pub const CLOSED_KEPT: usize = 16;

/// Where a device write came from, for last-writer-wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Version {
    pub timestamp_ms: u64,
    pub incarnation: u64,
    pub seq: u64,
}

/// The latest value of a property.
#[derive(Debug, Clone, PartialEq)]
pub struct PropertyState {
    pub value: Value,
    pub quality: Quality,
    pub version: Version,
    /// When the server received it, ms since the Unix epoch.
    pub received_ms: u64,
}

/// The gateway session a connected thing is reached through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub gateway: ByteString,
    pub session_id: u64,
    pub since_ms: u64,
}

/// An event a thing reported.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub name: ByteString,
    pub payload: Value,
    pub version: Version,
    pub received_ms: u64,
}

/// Everything stored about one thing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ThingState {
    pub created_ms: u64,
    pub properties: BTreeMap<ByteString, PropertyState>,
    pub binding: Option<Binding>,
    /// The most recent sessions that ended (at most [`CLOSED_KEPT`]), so that a session's `OPEN` arriving after its
    /// `CLOSE` — they may travel on different links and workers — does not bind a session that is gone.
    pub closed: VecDeque<(ByteString, u64)>,
    pub events: VecDeque<EventRecord>,
}

impl ThingState {
    /// Applies a property update; false if an update at least as new is already there.
    pub fn apply_property(&mut self, name: &ByteString, update: PropertyState) -> bool {
        match self.properties.get(name) {
            Some(current) if current.version >= update.version => false,
            _ => {
                self.properties.insert(name.clone(), update);
                true
            }
        }
    }

    /// Records an event once, keeping the newest [`EVENTS_KEPT`]; false if it was already recorded.
    pub fn record_event(&mut self, event: EventRecord) -> bool {
        let key = (event.version.incarnation, event.version.seq);
        if self.events.iter().any(|e| (e.version.incarnation, e.version.seq) == key) {
            return false;
        }
        self.events.push_back(event);
        while self.events.len() > EVENTS_KEPT {
            self.events.pop_front();
        }
        true
    }

    /// Binds the thing to a session unless that session already ended or a later one is bound: a thing's
    /// sessions follow one another (a new one replaces the old, which is then closed), so in whatever order the
    /// `OPEN`s and `CLOSE`s arrive, the binding ends as the latest session still open.
    pub fn bind(&mut self, binding: Binding) -> bool {
        if self.is_closed(&binding.gateway, binding.session_id)
            || self.binding.as_ref().is_some_and(|b| b.since_ms > binding.since_ms)
        {
            return false;
        }
        self.binding = Some(binding);
        true
    }

    fn is_closed(&self, gateway: &str, session_id: u64) -> bool {
        self.closed.iter().any(|(g, s)| *g == gateway && *s == session_id)
    }

    /// Records that a session ended and removes the binding if it is this session's (a later session's stays).
    pub fn unbind(&mut self, gateway: &str, session_id: u64) -> bool {
        if !self.is_closed(gateway, session_id) {
            self.closed.push_back((ByteString::from(gateway), session_id));
            while self.closed.len() > CLOSED_KEPT {
                self.closed.pop_front();
            }
        }
        if self.binding.as_ref().is_some_and(|b| b.gateway == gateway && b.session_id == session_id)
        {
            self.binding = None;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(v: i64, timestamp_ms: u64, seq: u64) -> PropertyState {
        PropertyState {
            value: Value::Int(v),
            quality: Quality::Good,
            version: Version { timestamp_ms, incarnation: 1, seq },
            received_ms: 0,
        }
    }

    #[test]
    fn last_writer_wins_and_reapplying_is_harmless() {
        let mut thing = ThingState::default();
        let name = ByteString::from_static("level");
        assert!(thing.apply_property(&name, update(1, 100, 1)));
        assert!(thing.apply_property(&name, update(2, 200, 2)));
        assert!(
            !thing.apply_property(&name, update(1, 100, 1)),
            "an older update arriving late loses"
        );
        assert!(
            !thing.apply_property(&name, update(2, 200, 2)),
            "the same update twice applies once"
        );
        assert!(
            thing.apply_property(&name, update(3, 200, 3)),
            "same timestamp, later sequence wins"
        );
        assert_eq!(thing.properties[&name].value, Value::Int(3));
    }

    #[test]
    fn events_are_recorded_once_and_bounded() {
        let mut thing = ThingState::default();
        for seq in 0..(EVENTS_KEPT as u64 + 10) {
            let event = EventRecord {
                name: "tick".into(),
                payload: Value::Null,
                version: Version { timestamp_ms: seq, incarnation: 1, seq },
                received_ms: 0,
            };
            assert!(thing.record_event(event.clone()));
            assert!(!thing.record_event(event));
        }
        assert_eq!(thing.events.len(), EVENTS_KEPT);
    }

    #[test]
    fn unbinding_an_old_session_keeps_the_new_binding() {
        let mut thing = ThingState::default();
        thing.bind(Binding { gateway: "g".into(), session_id: 1, since_ms: 0 });
        thing.bind(Binding { gateway: "g".into(), session_id: 2, since_ms: 1 });
        assert!(!thing.unbind("g", 1));
        assert!(thing.binding.is_some());
        assert!(thing.unbind("g", 2));
        assert!(thing.binding.is_none());
    }

    #[test]
    fn an_open_arriving_after_its_close_binds_nothing() {
        let mut thing = ThingState::default();
        assert!(!thing.unbind("g", 7));
        assert!(!thing.bind(Binding { gateway: "g".into(), session_id: 7, since_ms: 4 }));
        assert!(thing.binding.is_none());
        assert!(thing.bind(Binding { gateway: "g".into(), session_id: 8, since_ms: 6 }));
    }
}
