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
    /// When the binding last changed, ms since the Unix epoch: copies of a thing merge to the later binding.
    pub binding_changed_ms: u64,
    /// The last session that ended, so that its `OPEN` arriving after its `CLOSE` (they may travel on different
    /// links and workers) does not bind a session that is gone.
    pub last_closed: Option<(ByteString, u64)>,
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

    /// Binds the thing to a session (a newer session replaces an older one); false if that session already
    /// ended.
    pub fn bind(&mut self, binding: Binding) -> bool {
        if self
            .last_closed
            .as_ref()
            .is_some_and(|(g, s)| *g == binding.gateway && *s == binding.session_id)
        {
            return false;
        }
        self.binding_changed_ms = self.binding_changed_ms.max(binding.since_ms);
        self.binding = Some(binding);
        true
    }

    /// Removes the binding if it is still this session's (a later session's binding stays).
    pub fn unbind(&mut self, gateway: &str, session_id: u64, now_ms: u64) -> bool {
        self.last_closed = Some((ByteString::from(gateway), session_id));
        if self.binding.as_ref().is_some_and(|b| b.gateway == gateway && b.session_id == session_id)
        {
            self.binding = None;
            self.binding_changed_ms = self.binding_changed_ms.max(now_ms);
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
        assert!(!thing.unbind("g", 1, 2));
        assert!(thing.binding.is_some());
        assert!(thing.unbind("g", 2, 3));
        assert!(thing.binding.is_none());
    }

    #[test]
    fn an_open_arriving_after_its_close_binds_nothing() {
        let mut thing = ThingState::default();
        assert!(!thing.unbind("g", 7, 5));
        assert!(!thing.bind(Binding { gateway: "g".into(), session_id: 7, since_ms: 4 }));
        assert!(thing.binding.is_none());
        assert!(thing.bind(Binding { gateway: "g".into(), session_id: 8, since_ms: 6 }));
    }
}
