//! The thing model as the ring holds it in memory: things (description, tags, property definitions), their
//! properties (latest value, device timestamp, quality, receive time) and their binding to a gateway session.
//! Value streams and event streams live in the worker's store ([`crate::storage`]), not here.
//!
//! All state of a thing lives in one partition (keyed by the thing's name), so one primary orders every write to
//! it. Writes are idempotent: a property update applies only if it is newer by (device timestamp, incarnation,
//! sequence number) — last writer wins — so a frame applied twice (a retransmission, a retry on another link)
//! changes nothing the second time.

use std::collections::{BTreeMap, VecDeque};

use thingport_protocol::peer::PropertyDefinition;
use thingport_protocol::{ByteString, Quality, Value};

/// Ended sessions remembered per thing (oldest forgotten first).
pub const CLOSED_KEPT: usize = 16;
/// Incarnations remembered per thing with the time the primary first saw each (oldest forgotten first).
pub const INCARNATIONS_KEPT: usize = 16;

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
    /// How the device reached the gateway: the byte `OPEN` carries (1 WSS, 2 QUIC).
    pub transport: u8,
}

/// A property definition with the time it was set (the latest wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    pub definition: PropertyDefinition,
    pub defined_ms: u64,
}

/// Everything the ring holds about one thing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ThingState {
    pub created_ms: u64,
    pub description: String,
    pub tags: Vec<String>,
    /// When the description and tags were set (the latest wins).
    pub described_ms: u64,
    /// Properties without a definition are persisted and logged with the worker's default retention.
    pub definitions: BTreeMap<ByteString, Definition>,
    pub properties: BTreeMap<ByteString, PropertyState>,
    pub binding: Option<Binding>,
    /// The most recent sessions that ended (at most [`CLOSED_KEPT`]), so that a session's `OPEN` arriving after its
    /// `CLOSE` — they may travel on different links and workers — does not bind a session that is gone.
    pub closed: VecDeque<(ByteString, u64)>,
    /// Recent incarnations and the epoch of each: when the primary first saw it. Events are ordered by (epoch,
    /// incarnation, seq), which is the device's order: incarnations follow one another in time, and within one the
    /// sequence number counts up.
    pub incarnations: VecDeque<(u64, u64)>,
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

    /// The definition of a property: its own, or the default one.
    pub fn definition(&self, property: &str) -> PropertyDefinition {
        self.definitions.get(property).map(|d| d.definition.clone()).unwrap_or_default()
    }

    /// Sets a property's definition unless a later one is already there.
    pub fn define(&mut self, property: &ByteString, definition: Definition) -> bool {
        if self.definitions.get(property).is_some_and(|d| d.defined_ms > definition.defined_ms) {
            return false;
        }
        self.definitions.insert(property.clone(), definition);
        true
    }

    /// Sets the description and tags unless later ones are already there.
    pub fn describe(&mut self, description: String, tags: Vec<String>, now_ms: u64) -> bool {
        if self.described_ms > now_ms {
            return false;
        }
        self.description = description;
        self.tags = tags;
        self.described_ms = now_ms;
        true
    }

    /// The epoch of an incarnation: as recorded, else `proposed` (recorded from now on). A primary proposes the
    /// operation's receive time; a backup the epoch its primary chose.
    pub fn epoch(&mut self, incarnation: u64, proposed: u64) -> u64 {
        if let Some(&(_, epoch)) = self.incarnations.iter().find(|(i, _)| *i == incarnation) {
            return epoch;
        }
        self.incarnations.push_back((incarnation, proposed));
        while self.incarnations.len() > INCARNATIONS_KEPT {
            self.incarnations.pop_front();
        }
        proposed
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
    fn an_incarnation_keeps_its_first_epoch() {
        let mut thing = ThingState::default();
        assert_eq!(thing.epoch(7, 100), 100);
        assert_eq!(thing.epoch(7, 200), 100, "a later frame of the same incarnation");
        assert_eq!(thing.epoch(8, 300), 300);
        for i in 0..INCARNATIONS_KEPT as u64 {
            thing.epoch(1_000 + i, 400);
        }
        assert_eq!(thing.incarnations.len(), INCARNATIONS_KEPT);
    }

    #[test]
    fn unbinding_an_old_session_keeps_the_new_binding() {
        let mut thing = ThingState::default();
        thing.bind(Binding { gateway: "g".into(), session_id: 1, since_ms: 0, transport: 1 });
        thing.bind(Binding { gateway: "g".into(), session_id: 2, since_ms: 1, transport: 1 });
        assert!(!thing.unbind("g", 1));
        assert!(thing.binding.is_some());
        assert!(thing.unbind("g", 2));
        assert!(thing.binding.is_none());
    }

    #[test]
    fn an_open_arriving_after_its_close_binds_nothing() {
        let mut thing = ThingState::default();
        assert!(!thing.unbind("g", 7));
        assert!(!thing.bind(Binding {
            gateway: "g".into(),
            session_id: 7,
            since_ms: 4,
            transport: 1
        }));
        assert!(thing.binding.is_none());
        assert!(thing.bind(Binding {
            gateway: "g".into(),
            session_id: 8,
            since_ms: 6,
            transport: 1
        }));
    }
}
