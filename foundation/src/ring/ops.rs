//! Operations on a partition's things and copies of things, as the peer format carries them
//! (`thingport_protocol::peer`). Applying an operation is deterministic and idempotent, and operations on one thing
//! commute (last writer wins by version), so a primary and its backups that apply the same operations in any order
//! hold the same state, and a copy merged into a partition that already saw some of its writes changes nothing twice.

use bytes::BytesMut;
use thingport_protocol::peer::{
    BindingRecord, ChangeRecord, EventRecord as EventWire, Op, PropertyRecord, ThingRecord,
    ThingSummary,
};
use thingport_protocol::{ByteString, Frame, Limits, PropertyUpdate, Quality, Value};

use crate::model::{Binding, Definition, PropertyState, ThingState, Version};
use crate::ring::store::Partition;
use crate::storage::{self, Change, StoredValue};

/// Why an operation was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The thing does not exist and the operation may not create it.
    UnknownThing,
    /// The operation carries a frame or value that does not decode, or a frame that is not data.
    Invalid,
}

/// Applies an operation to the thing's partition (number `partition_no`) and appends what the store must keep to
/// `changes`. A backup passes `replica`: the primary already decided whether the thing may be created, and a backup
/// that has not yet received its copy of the partition creates the thing. A primary sets the operation's event
/// epoch (`Op::Device::epoch_ms`) before it is sent to the backups.
pub fn apply(
    partition: &mut Partition,
    partition_no: u16,
    op: &mut Op,
    limits: &Limits,
    replica: bool,
    changes: &mut Vec<Change>,
) -> Result<(), Refused> {
    let name = op.thing().clone();
    let (create, now_ms) = match op {
        Op::Create { now_ms, .. } => (true, *now_ms),
        Op::Device { create, now_ms, .. }
        | Op::Bind { create, now_ms, .. }
        | Op::Unbind { create, now_ms, .. }
        | Op::Describe { create, now_ms, .. } => (*create, *now_ms),
        Op::Write { now_ms, .. } | Op::Define { now_ms, .. } | Op::Remove { now_ms, .. } => {
            (false, *now_ms)
        }
    };
    if let Op::Remove { property, .. } = op {
        let removed = match property {
            None => partition.remove(&name).is_some(),
            Some(property) => partition.get_mut(&name).is_some_and(|thing| {
                thing.definitions.remove(property);
                thing.properties.remove(property);
                true
            }),
        };
        if !removed && !replica {
            return Err(Refused::UnknownThing);
        }
        changes.push(Change::Remove { thing: name, property: property.clone() });
        return Ok(());
    }
    // decode before creating, so that a refused operation leaves nothing behind
    let frame = match op {
        Op::Device { frame, .. } => {
            Some(Frame::decode(frame.clone(), limits).map_err(|_| Refused::Invalid)?)
        }
        _ => None,
    };
    let written = match op {
        Op::Write { value, .. } => {
            Some(Value::decode(value.clone(), limits).map_err(|_| Refused::Invalid)?)
        }
        _ => None,
    };
    let mut created = false;
    let thing = match partition.get_mut(&name) {
        Some(thing) => thing,
        None if create || replica => {
            created = true;
            partition
                .entry(name.clone())
                .or_insert(ThingState { created_ms: now_ms, ..ThingState::default() })
        }
        None => return Err(Refused::UnknownThing),
    };
    let mut row_changed = created;
    match op {
        Op::Create { .. } | Op::Remove { .. } => {}
        Op::Device { incarnation, epoch_ms, .. } => match frame {
            Some(Frame::Properties(batch)) => {
                let mut values = Vec::with_capacity(batch.updates.len());
                for u in in_wire_order(batch.updates) {
                    let version = Version {
                        timestamp_ms: u.timestamp_ms,
                        incarnation: *incarnation,
                        seq: batch.seq,
                    };
                    let state = PropertyState {
                        value: u.value,
                        quality: u.quality,
                        version,
                        received_ms: now_ms,
                    };
                    values.push(stored(thing, u.name, state));
                }
                changes.push(Change::Values { thing: name.clone(), values });
            }
            Some(Frame::Event(event)) => {
                let known = thing.incarnations.len();
                let proposed = if *epoch_ms == 0 { now_ms } else { *epoch_ms };
                let epoch = thing.epoch(*incarnation, proposed);
                *epoch_ms = epoch;
                row_changed |= thing.incarnations.len() != known;
                let payload = event.payload;
                let mut encoded = BytesMut::with_capacity(payload.encoded_len());
                payload.encode(&mut encoded);
                changes.push(Change::Event {
                    thing: name.clone(),
                    event: EventWire {
                        epoch_ms: epoch,
                        name: event.name.to_string(),
                        payload: encoded.freeze(),
                        timestamp_ms: event.timestamp_ms,
                        incarnation: *incarnation,
                        seq: event.seq,
                        received_ms: now_ms,
                    },
                    payload,
                });
            }
            _ => return Err(Refused::Invalid),
        },
        Op::Write { property, seq, .. } => {
            // an application's write is newer than any device report of the same millisecond
            let version = Version { timestamp_ms: now_ms, incarnation: u64::MAX, seq: *seq };
            let value = written.unwrap_or_default();
            let state =
                PropertyState { value, quality: Quality::Good, version, received_ms: now_ms };
            let value = stored(thing, property.clone(), state);
            changes.push(Change::Values { thing: name.clone(), values: vec![value] });
        }
        Op::Bind { gateway, session_id, transport, .. } => {
            thing.bind(Binding {
                gateway: gateway.clone(),
                session_id: *session_id,
                since_ms: now_ms,
                transport: *transport,
            });
        }
        Op::Unbind { gateway, session_id, .. } => {
            thing.unbind(gateway, *session_id);
        }
        Op::Describe { description, tags, .. } => {
            row_changed |= thing.describe(description.clone(), tags.clone(), now_ms);
        }
        Op::Define { property, definition, .. } => {
            let definition = Definition { definition: definition.clone(), defined_ms: now_ms };
            row_changed |= thing.define(property, definition);
        }
    }
    if row_changed {
        changes.push(Change::Thing(storage::thing_row(&name, partition_no, thing)));
    }
    Ok(())
}

/// Applies a property update and says what the store keeps of it.
/// A batch's updates applied in wire order (PROTOCOL.md §5.3): of two updates of one property with one timestamp
/// the later replaces the earlier, which is never stored — a property has one value per instant and frame.
fn in_wire_order(updates: Vec<PropertyUpdate>) -> Vec<PropertyUpdate> {
    let mut kept: Vec<PropertyUpdate> = Vec::with_capacity(updates.len());
    for u in updates {
        match kept.iter().position(|k| k.name == u.name && k.timestamp_ms == u.timestamp_ms) {
            Some(i) => kept[i] = u,
            None => kept.push(u),
        }
    }
    kept
}

fn stored(thing: &mut ThingState, property: ByteString, state: PropertyState) -> StoredValue {
    let definition = thing.definition(&property);
    let value = StoredValue {
        property: property.clone(),
        timestamp_ms: state.version.timestamp_ms,
        incarnation: state.version.incarnation,
        seq: state.version.seq,
        quality: state.quality,
        value: state.value.clone(),
        received_ms: state.received_ms,
        current: false,
        logged: definition.logged,
    };
    let won = thing.apply_property(&property, state);
    StoredValue { current: won && definition.persisted, ..value }
}

fn encode_value(value: &Value) -> bytes::Bytes {
    let mut buf = BytesMut::with_capacity(value.encoded_len());
    value.encode(&mut buf);
    buf.freeze()
}

/// The gateway and session a thing is bound to, before an operation: what [`updates`] compares with.
pub fn bound(partition: &Partition, thing: &str) -> Option<(ByteString, u64)> {
    partition.get(thing)?.binding.as_ref().map(|b| (b.gateway.clone(), b.session_id))
}

/// The changes a stream shows of an operation just applied: the values that became current, the event, the
/// binding if it changed (`before`, from [`bound`]), a removal.
pub fn updates(
    partition: &Partition,
    op: &Op,
    before: Option<(ByteString, u64)>,
    changes: &[Change],
    out: &mut Vec<(String, Vec<String>, ChangeRecord)>,
) {
    let name = op.thing();
    let thing = partition.get(name);
    let tags = || thing.map(|t| t.tags.clone()).unwrap_or_default();
    for change in changes {
        match change {
            Change::Values { values, .. } => {
                for v in values {
                    let current =
                        thing.and_then(|t| t.properties.get(&v.property)).is_some_and(|p| {
                            p.version
                                == Version {
                                    timestamp_ms: v.timestamp_ms,
                                    incarnation: v.incarnation,
                                    seq: v.seq,
                                }
                        });
                    if current {
                        out.push((
                            name.to_string(),
                            tags(),
                            ChangeRecord::Property {
                                name: v.property.to_string(),
                                value: encode_value(&v.value),
                                quality: v.quality as u8,
                                timestamp_ms: v.timestamp_ms,
                                received_ms: v.received_ms,
                            },
                        ));
                    }
                }
            }
            Change::Event { event, .. } => out.push((
                name.to_string(),
                tags(),
                ChangeRecord::Event {
                    name: event.name.clone(),
                    payload: event.payload.clone(),
                    timestamp_ms: event.timestamp_ms,
                    received_ms: event.received_ms,
                },
            )),
            Change::Remove { property, .. } => out.push((
                name.to_string(),
                tags(),
                ChangeRecord::Removed {
                    property: property.as_ref().map(ToString::to_string),
                    at_ms: now_of(op),
                },
            )),
            Change::Thing(_) | Change::DropPartition(_) | Change::Table(_) => {}
        }
    }
    let after = thing.and_then(|t| t.binding.as_ref());
    if matches!(op, Op::Bind { .. } | Op::Unbind { .. })
        && after.map(|b| (&b.gateway, b.session_id)) != before.as_ref().map(|(g, s)| (g, *s))
    {
        let change = match after {
            Some(b) => ChangeRecord::Online {
                gateway: b.gateway.to_string(),
                at_ms: b.since_ms,
                transport: b.transport,
            },
            None => ChangeRecord::Offline { at_ms: now_of(op) },
        };
        out.push((name.to_string(), tags(), change));
    }
}

/// When an operation was received.
fn now_of(op: &Op) -> u64 {
    match op {
        Op::Create { now_ms, .. }
        | Op::Device { now_ms, .. }
        | Op::Write { now_ms, .. }
        | Op::Bind { now_ms, .. }
        | Op::Unbind { now_ms, .. }
        | Op::Describe { now_ms, .. }
        | Op::Define { now_ms, .. }
        | Op::Remove { now_ms, .. } => *now_ms,
    }
}

/// A thing's state as the peer format carries it.
pub fn to_record(name: &str, thing: &ThingState) -> ThingRecord {
    ThingRecord {
        name: name.to_string(),
        created_ms: thing.created_ms,
        description: thing.description.clone(),
        tags: thing.tags.clone(),
        described_ms: thing.described_ms,
        definitions: thing
            .definitions
            .iter()
            .map(|(p, d)| (p.to_string(), d.definition.clone(), d.defined_ms))
            .collect(),
        properties: thing
            .properties
            .iter()
            .map(|(name, p)| PropertyRecord {
                name: name.to_string(),
                value: encode_value(&p.value),
                quality: p.quality as u8,
                timestamp_ms: p.version.timestamp_ms,
                incarnation: p.version.incarnation,
                seq: p.version.seq,
                received_ms: p.received_ms,
            })
            .collect(),
        binding: thing.binding.as_ref().map(|b| BindingRecord {
            gateway: b.gateway.to_string(),
            session_id: b.session_id,
            since_ms: b.since_ms,
            transport: b.transport,
        }),
        closed: thing.closed.iter().map(|(g, s)| (g.to_string(), *s)).collect(),
        incarnations: thing.incarnations.iter().copied().collect(),
    }
}

/// A thing's state from its record; `None` if a value in it does not decode.
pub fn from_record(record: &ThingRecord, limits: &Limits) -> Option<ThingState> {
    let mut thing = ThingState {
        created_ms: record.created_ms,
        description: record.description.clone(),
        tags: record.tags.clone(),
        described_ms: record.described_ms,
        definitions: record
            .definitions
            .iter()
            .map(|(p, d, ms)| {
                (
                    ByteString::from(p.as_str()),
                    Definition { definition: d.clone(), defined_ms: *ms },
                )
            })
            .collect(),
        closed: record.closed.iter().map(|(g, s)| (ByteString::from(g.as_str()), *s)).collect(),
        binding: record.binding.as_ref().map(|b| Binding {
            gateway: ByteString::from(b.gateway.as_str()),
            session_id: b.session_id,
            since_ms: b.since_ms,
            transport: b.transport,
        }),
        incarnations: record.incarnations.iter().copied().collect(),
        ..ThingState::default()
    };
    for p in &record.properties {
        let state = PropertyState {
            value: Value::decode(p.value.clone(), limits).ok()?,
            quality: Quality::from_u8(p.quality)?,
            version: Version {
                timestamp_ms: p.timestamp_ms,
                incarnation: p.incarnation,
                seq: p.seq,
            },
            received_ms: p.received_ms,
        };
        thing.properties.insert(ByteString::from(p.name.as_str()), state);
    }
    Some(thing)
}

/// Merges a copy of a thing into the partition: properties by last writer, definitions and description by the
/// latest, the later binding, incarnation epochs already known kept.
pub fn merge(partition: &mut Partition, copy: ThingState, name: &str) {
    let name = ByteString::from(name);
    let Some(thing) = partition.get_mut(&name) else {
        partition.insert(name, copy);
        return;
    };
    thing.created_ms = thing.created_ms.min(copy.created_ms);
    thing.describe(copy.description, copy.tags, copy.described_ms);
    for (property, definition) in copy.definitions {
        thing.define(&property, definition);
    }
    for (property, state) in copy.properties {
        thing.apply_property(&property, state);
    }
    for (incarnation, epoch) in copy.incarnations {
        thing.epoch(incarnation, epoch);
    }
    for (gateway, session_id) in copy.closed {
        thing.unbind(&gateway, session_id);
    }
    if let Some(binding) = copy.binding {
        thing.bind(binding);
    }
}

/// One line of a listing.
pub fn summary(name: &str, thing: &ThingState) -> ThingSummary {
    ThingSummary {
        name: name.to_string(),
        gateway: thing.binding.as_ref().map(|b| b.gateway.to_string()),
        transport: thing.binding.as_ref().map_or(0, |b| b.transport),
        properties: thing.properties.len() as u32,
        created_ms: thing.created_ms,
        tags: thing.tags.clone(),
        last_seen_ms: thing
            .properties
            .values()
            .map(|p| p.received_ms)
            .chain(thing.binding.as_ref().map(|b| b.since_ms))
            .max()
            .unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use thingport_protocol::{Event, Properties};

    use super::*;

    /// Applies a copy of `op` as partition 0; returns the changes for the store.
    fn run(
        partition: &mut Partition,
        op: &Op,
        limits: &Limits,
        replica: bool,
    ) -> Result<Vec<Change>, Refused> {
        let mut op = op.clone();
        let mut changes = Vec::new();
        apply(partition, 0, &mut op, limits, replica, &mut changes)?;
        Ok(changes)
    }

    fn device(thing: &str, seq: u64, timestamp_ms: u64, value: i64) -> Op {
        let frame = Frame::Properties(Properties {
            seq,
            updates: vec![PropertyUpdate {
                name: "level".into(),
                timestamp_ms,
                quality: Quality::Good,
                value: Value::Int(value),
            }],
        });
        Op::Device {
            thing: thing.into(),
            create: true,
            now_ms: 1,
            incarnation: 1,
            epoch_ms: 0,
            frame: frame.to_bytes(),
        }
    }

    fn event(thing: &str, seq: u64) -> Op {
        let frame = Frame::Event(Event {
            seq,
            timestamp_ms: seq,
            name: "tick".into(),
            payload: Value::Int(seq as i64),
        });
        Op::Device {
            thing: thing.into(),
            create: true,
            now_ms: 1,
            incarnation: 1,
            epoch_ms: 0,
            frame: frame.to_bytes(),
        }
    }

    #[test]
    fn any_order_and_any_repetition_give_the_same_state() {
        let ops = vec![
            device("t", 1, 100, 1),
            event("t", 2),
            device("t", 3, 300, 3),
            Op::Bind {
                thing: "t".into(),
                create: true,
                gateway: "g".into(),
                session_id: 1,
                now_ms: 10,
                transport: 1,
            },
            Op::Unbind {
                thing: "t".into(),
                create: true,
                gateway: "g".into(),
                session_id: 1,
                now_ms: 20,
            },
            device("t", 4, 200, 2),
        ];
        let limits = Limits::DEFAULT;
        let mut reference = Partition::new();
        for op in &ops {
            run(&mut reference, op, &limits, false).unwrap();
        }
        // every rotation, reversed, and each op applied twice
        for shift in 0..ops.len() {
            let mut order: Vec<&Op> = ops.iter().cycle().skip(shift).take(ops.len()).collect();
            if shift % 2 == 1 {
                order.reverse();
            }
            let mut partition = Partition::new();
            for op in order.iter().chain(order.iter()) {
                run(&mut partition, op, &limits, false).unwrap();
            }
            let (a, b) = (&partition["t"], &reference["t"]);
            assert_eq!(a.properties, b.properties, "order from {shift}");
            assert_eq!(a.binding, b.binding, "order from {shift}");
        }
        assert_eq!(reference["t"].properties["level"].value, Value::Int(3));
    }

    #[test]
    fn a_copy_round_trips_and_merges_without_loss() {
        let limits = Limits::DEFAULT;
        let mut primary = Partition::new();
        for op in [device("t", 1, 100, 1), event("t", 2), device("t", 3, 300, 3)] {
            run(&mut primary, &op, &limits, false).unwrap();
        }
        let record = to_record("t", &primary["t"]);
        let copy = from_record(&record, &limits).unwrap();
        assert_eq!(copy, primary["t"]);
        // a new owner that already got a later write through double replication keeps it
        let mut new_owner = Partition::new();
        run(&mut new_owner, &device("t", 5, 500, 5), &limits, true).unwrap();
        merge(&mut new_owner, copy, "t");
        assert_eq!(new_owner["t"].properties["level"].value, Value::Int(5));
    }

    /// One step of a generated history: (kind, thing, property, device timestamp, value).
    type Step = (u8, usize, u8, u64, i32);

    /// Turns generated steps into the operations a primary would receive, in order: property reports, events,
    /// and sessions that follow one another (each opened after the previous one closed).
    fn history(steps: &[Step]) -> Vec<Op> {
        let names = ["a", "b"];
        let mut open: [Option<u64>; 2] = [None, None];
        let mut next_session = 1;
        let mut ops = Vec::new();
        for (i, &(kind, t, prop, ts, value)) in steps.iter().enumerate() {
            let now_ms = i as u64 + 1;
            let thing = ByteString::from_static(names[t]);
            let seq = i as u64 + 1;
            let frame = match kind {
                0 | 1 => Frame::Properties(Properties {
                    seq,
                    updates: vec![PropertyUpdate {
                        name: format!("p{prop}").into(),
                        timestamp_ms: ts,
                        quality: Quality::Good,
                        value: Value::Int(value.into()),
                    }],
                }),
                2 => Frame::Event(Event {
                    seq,
                    timestamp_ms: ts,
                    name: "e".into(),
                    payload: Value::Int(value.into()),
                }),
                _ => {
                    let op = match open[t].take() {
                        Some(session_id) => Op::Unbind {
                            thing,
                            create: true,
                            gateway: "g".into(),
                            session_id,
                            now_ms,
                        },
                        None => {
                            open[t] = Some(next_session);
                            next_session += 1;
                            Op::Bind {
                                thing,
                                create: true,
                                gateway: "g".into(),
                                session_id: next_session - 1,
                                now_ms,
                                transport: 2,
                            }
                        }
                    };
                    ops.push(op);
                    continue;
                }
            };
            ops.push(Op::Device {
                thing,
                create: true,
                now_ms,
                incarnation: 1,
                epoch_ms: 0,
                frame: frame.to_bytes(),
            });
        }
        ops
    }

    /// What a reader can observe of a partition in memory: properties and bindings.
    fn observed(partition: &Partition) -> Vec<(String, String)> {
        partition
            .iter()
            .map(|(name, t)| (name.to_string(), format!("{:?} {:?}", t.properties, t.binding)))
            .collect()
    }

    /// The events a store is given: (thing, epoch, incarnation, seq), each once.
    fn events(changes: &[Change]) -> std::collections::BTreeSet<(String, u64, u64, u64)> {
        changes
            .iter()
            .filter_map(|c| match c {
                Change::Event { thing, event, .. } => {
                    Some((thing.to_string(), event.epoch_ms, event.incarnation, event.seq))
                }
                _ => None,
            })
            .collect()
    }

    proptest::proptest! {
        /// A deterministic simulation of one partition through a table change. The primary applies a history in
        /// order; the old backup gets every operation, shuffled (replication runs concurrently); the new owner gets
        /// every operation from the prepare point on, shuffled, and a copy of the primary taken at a later point,
        /// merged at a random moment. Both end exactly as the primary.
        #[test]
        fn a_moved_partition_ends_as_its_primary(
            steps in proptest::collection::vec((0u8..4, 0usize..2, 0u8..3, 0u64..40, proptest::num::i32::ANY), 1..60),
            prepare in proptest::sample::select((0..=100).collect::<Vec<usize>>()),
            copy_after in proptest::sample::select((0..=100).collect::<Vec<usize>>()),
            merge_at in proptest::sample::select((0..=100).collect::<Vec<usize>>()),
            seed: u64,
        ) {
            let limits = Limits::DEFAULT;
            let ops = history(&steps);
            let n = ops.len();
            let prepare = prepare * n / 100;
            let copy_after = prepare + (copy_after * (n - prepare)) / 100;
            let mut primary = Partition::new();
            let mut snapshot = None;
            // the primary stamps each event's epoch into the operation it replicates
            let mut ops = ops;
            let mut stored = Vec::new();
            for (i, op) in ops.iter_mut().enumerate() {
                if i == copy_after {
                    snapshot = Some(primary.clone());
                }
                apply(&mut primary, 0, op, &limits, false, &mut stored).unwrap();
            }
            let snapshot = snapshot.unwrap_or_else(|| primary.clone());
            let mut rng = fastrand::Rng::with_seed(seed);

            let mut backup = Partition::new();
            let mut shuffled: Vec<&Op> = ops.iter().collect();
            rng.shuffle(&mut shuffled);
            let mut backup_stored = Vec::new();
            for op in shuffled {
                backup_stored.extend(run(&mut backup, op, &limits, true).unwrap());
            }
            proptest::prop_assert_eq!(observed(&backup), observed(&primary));
            proptest::prop_assert_eq!(events(&backup_stored), events(&stored), "the same events in the same order");

            let mut new_owner = Partition::new();
            let mut late: Vec<&Op> = ops[prepare..].iter().collect();
            rng.shuffle(&mut late);
            let merge_at = merge_at * late.len() / 100;
            // the copy travels as records, as a pull fetches it
            let copy: Vec<ThingRecord> = snapshot.iter().map(|(name, t)| to_record(name, t)).collect();
            for i in 0..=late.len() {
                if i == merge_at {
                    for record in &copy {
                        merge(&mut new_owner, from_record(record, &limits).unwrap(), &record.name);
                    }
                }
                if let Some(op) = late.get(i) {
                    run(&mut new_owner, op, &limits, true).unwrap();
                }
            }
            proptest::prop_assert_eq!(observed(&new_owner), observed(&primary));
        }
    }

    #[test]
    fn refusals_leave_nothing_behind() {
        let limits = Limits::DEFAULT;
        let mut partition = Partition::new();
        let bad = Op::Device {
            thing: "t".into(),
            create: true,
            now_ms: 1,
            incarnation: 1,
            epoch_ms: 0,
            frame: bytes::Bytes::from_static(&[0x03, 0xff]),
        };
        assert_eq!(run(&mut partition, &bad, &limits, false), Err(Refused::Invalid));
        let write = Op::Write {
            seq: 1,
            thing: "t".into(),
            property: "p".into(),
            value: encode_value(&Value::Int(1)),
            now_ms: 1,
        };
        assert_eq!(run(&mut partition, &write, &limits, false), Err(Refused::UnknownThing));
        let remove = Op::Remove { thing: "t".into(), property: None, now_ms: 1 };
        assert_eq!(run(&mut partition, &remove, &limits, false), Err(Refused::UnknownThing));
        assert!(partition.is_empty());
    }

    #[test]
    fn the_store_is_told_what_to_keep() {
        let limits = Limits::DEFAULT;
        let mut partition = Partition::new();
        let changes = run(&mut partition, &device("t", 1, 100, 1), &limits, false).unwrap();
        // a new thing's row, then the value: current and logged by default
        assert!(matches!(&changes[..], [Change::Values { values, .. }, Change::Thing(row)]
            if values[0].current && values[0].logged && row.name == "t"));
        let older = run(&mut partition, &device("t", 2, 50, 9), &limits, false).unwrap();
        assert!(
            matches!(&older[..], [Change::Values { values, .. }]
            if !values[0].current && values[0].logged),
            "an older report joins the stream only"
        );
        let definition =
            thingport_protocol::peer::PropertyDefinition { logged: false, ..Default::default() };
        let define =
            Op::Define { thing: "t".into(), property: "level".into(), now_ms: 5, definition };
        assert!(matches!(
            &run(&mut partition, &define, &limits, false).unwrap()[..],
            [Change::Thing(_)]
        ));
        let changes = run(&mut partition, &device("t", 3, 300, 3), &limits, false).unwrap();
        assert!(matches!(&changes[..], [Change::Values { values, .. }]
            if values[0].current && !values[0].logged));
        let remove = Op::Remove { thing: "t".into(), property: Some("level".into()), now_ms: 6 };
        run(&mut partition, &remove, &limits, false).unwrap();
        assert!(partition["t"].properties.is_empty());
    }

    #[test]
    fn a_batch_is_applied_in_wire_order() {
        let limits = Limits::DEFAULT;
        let mut partition = Partition::new();
        let update = |name: &str, timestamp_ms: u64, value: i64| PropertyUpdate {
            name: name.into(),
            timestamp_ms,
            quality: Quality::Good,
            value: Value::Int(value),
        };
        let batch = Frame::Properties(Properties {
            seq: 1,
            updates: vec![
                update("level", 100, 1),
                update("flow", 100, 7),
                update("level", 100, 2),
                update("level", 90, 3),
            ],
        });
        let op = Op::Device {
            thing: "t".into(),
            create: true,
            now_ms: 1,
            incarnation: 1,
            epoch_ms: 0,
            frame: batch.to_bytes(),
        };
        let changes = run(&mut partition, &op, &limits, false).unwrap();
        // the later update of level at 100 replaced the earlier; the older one at 90 is history only
        assert_eq!(partition["t"].properties[&ByteString::from("level")].value, Value::Int(2));
        let Change::Values { values, .. } = &changes[0] else { panic!("values first") };
        let stored: Vec<(&str, u64, bool)> =
            values.iter().map(|v| (&*v.property, v.timestamp_ms, v.current)).collect();
        assert_eq!(stored, [("level", 100, true), ("flow", 100, true), ("level", 90, false)]);
    }
}
