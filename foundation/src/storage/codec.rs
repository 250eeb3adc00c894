//! Byte layouts the embedded store keeps in BLOB columns (`docs/STORAGE.md` §3): the values of one journal row and
//! the values of one value-stream chunk. Built from the device protocol's varints and value encoding, so a value
//! is stored in the bytes a device sent it in.
//!
//! - A journal row's values: for each, the property name (varint length + UTF-8), a flags byte (bit 0: it became
//!   the current value of a persisted property; bit 1: the property is logged), then the value as in a chunk
//!   with every delta taken from zero.
//! - A chunk: values of one property sorted by (timestamp, incarnation, seq); each is the zigzag varint delta of
//!   its timestamp, incarnation and seq from the previous value's (from zero for the first; deltas wrap), the
//!   quality byte, the zigzag varint of (received − timestamp), and the value's device encoding behind a varint
//!   length.

use bytes::{Buf, BufMut, Bytes};
use thingport_protocol::peer::ValueRecord;
use thingport_protocol::{ByteString, Limits, Value, varint};

use super::StoredValue;

const CURRENT: u8 = 1;
const LOGGED: u8 = 2;

/// Why stored bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable {0}")]
pub struct Undecodable(&'static str);

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn delta(now: u64, before: u64) -> u64 {
    zigzag(now.wrapping_sub(before) as i64)
}

fn undelta(d: u64, before: u64) -> u64 {
    before.wrapping_add(unzigzag(d) as u64)
}

fn get(src: &mut Bytes, what: &'static str) -> Result<u64, Undecodable> {
    varint::get(src).map_err(|_| Undecodable(what))
}

fn get_bytes(src: &mut Bytes, what: &'static str) -> Result<Bytes, Undecodable> {
    let len = get(src, what)? as usize;
    if len > src.len() {
        return Err(Undecodable(what));
    }
    Ok(src.split_to(len))
}

fn put_point(dst: &mut Vec<u8>, point: &ValueRecord, before: &ValueRecord) {
    varint::put(dst, delta(point.timestamp_ms, before.timestamp_ms));
    varint::put(dst, delta(point.incarnation, before.incarnation));
    varint::put(dst, delta(point.seq, before.seq));
    dst.put_u8(point.quality);
    varint::put(dst, delta(point.received_ms, point.timestamp_ms));
    varint::put(dst, point.value.len() as u64);
    dst.put_slice(&point.value);
}

/// Bytes `point` takes in a chunk after `before` (or first).
pub fn point_len(point: &ValueRecord, before: Option<&ValueRecord>) -> usize {
    let before = before.unwrap_or(&ZERO);
    varint::encoded_len(delta(point.timestamp_ms, before.timestamp_ms))
        + varint::encoded_len(delta(point.incarnation, before.incarnation))
        + varint::encoded_len(delta(point.seq, before.seq))
        + 1
        + varint::encoded_len(delta(point.received_ms, point.timestamp_ms))
        + varint::encoded_len(point.value.len() as u64)
        + point.value.len()
}

fn get_point(src: &mut Bytes, before: &ValueRecord) -> Result<ValueRecord, Undecodable> {
    let timestamp_ms = undelta(get(src, "timestamp")?, before.timestamp_ms);
    let incarnation = undelta(get(src, "incarnation")?, before.incarnation);
    let seq = undelta(get(src, "seq")?, before.seq);
    if !src.has_remaining() {
        return Err(Undecodable("quality"));
    }
    let quality = src.get_u8();
    let received_ms = undelta(get(src, "received")?, timestamp_ms);
    let value = get_bytes(src, "value")?;
    Ok(ValueRecord { timestamp_ms, incarnation, seq, quality, value, received_ms })
}

static ZERO: ValueRecord = ValueRecord {
    timestamp_ms: 0,
    incarnation: 0,
    seq: 0,
    quality: 0,
    value: Bytes::new(),
    received_ms: 0,
};

/// A value as a point of a value stream, its value in the device encoding.
pub fn point(value: &StoredValue) -> ValueRecord {
    let mut encoded = Vec::with_capacity(value.value.encoded_len());
    value.value.encode(&mut encoded);
    ValueRecord {
        timestamp_ms: value.timestamp_ms,
        incarnation: value.incarnation,
        seq: value.seq,
        quality: value.quality as u8,
        value: Bytes::from(encoded),
        received_ms: value.received_ms,
    }
}

/// The values of one journal row.
pub fn encode_values(values: &[StoredValue]) -> Vec<u8> {
    let mut dst = Vec::with_capacity(values.len() * 32);
    for v in values {
        varint::put(&mut dst, v.property.len() as u64);
        dst.put_slice(v.property.as_bytes());
        dst.put_u8((u8::from(v.current) * CURRENT) | (u8::from(v.logged) * LOGGED));
        put_point(&mut dst, &point(v), &ZERO);
    }
    dst
}

/// One value of a journal row: property, whether it became current, whether it is logged, and the point.
#[derive(Debug, Clone, PartialEq)]
pub struct JournalValue {
    pub property: ByteString,
    pub current: bool,
    pub logged: bool,
    pub point: ValueRecord,
}

/// Decodes the values of one journal row.
pub fn decode_values(mut src: Bytes) -> Result<Vec<JournalValue>, Undecodable> {
    let mut values = Vec::new();
    while src.has_remaining() {
        let name = get_bytes(&mut src, "property name")?;
        let property = ByteString::try_from(name).map_err(|_| Undecodable("property name"))?;
        if !src.has_remaining() {
            return Err(Undecodable("flags"));
        }
        let flags = src.get_u8();
        let point = get_point(&mut src, &ZERO)?;
        values.push(JournalValue {
            property,
            current: flags & CURRENT != 0,
            logged: flags & LOGGED != 0,
            point,
        });
    }
    Ok(values)
}

/// Encodes a chunk; `points` must be sorted by (timestamp, incarnation, seq).
pub fn encode_chunk(points: &[ValueRecord]) -> Vec<u8> {
    let mut dst = Vec::with_capacity(points.len() * 12);
    let mut before = &ZERO;
    for p in points {
        put_point(&mut dst, p, before);
        before = p;
    }
    dst
}

/// Decodes a chunk.
pub fn decode_chunk(mut src: Bytes) -> Result<Vec<ValueRecord>, Undecodable> {
    let mut points: Vec<ValueRecord> = Vec::new();
    while src.has_remaining() {
        let before = points.last().unwrap_or(&ZERO);
        let p = get_point(&mut src, before)?;
        points.push(p);
    }
    Ok(points)
}

/// The sort key of a point in its value stream.
pub fn key(p: &ValueRecord) -> (u64, u64, u64) {
    (p.timestamp_ms, p.incarnation, p.seq)
}

/// A value's device encoding decoded, for the thing model.
pub fn value_of(p: &ValueRecord, limits: &Limits) -> Result<Value, Undecodable> {
    Value::decode(p.value.clone(), limits).map_err(|_| Undecodable("value"))
}

#[cfg(test)]
mod tests {
    use thingport_protocol::Quality;

    use super::*;

    fn stored(property: &str, ts: u64, seq: u64, value: Value) -> StoredValue {
        StoredValue {
            property: property.into(),
            timestamp_ms: ts,
            incarnation: 0xdead_beef_dead_beef,
            seq,
            quality: Quality::Uncertain,
            value,
            received_ms: ts + 3,
            current: seq.is_multiple_of(2),
            logged: true,
        }
    }

    #[test]
    fn journal_values_round_trip() {
        let values = vec![
            stored("temperature", 1_795_000_000_000, 4, Value::Float(21.5)),
            stored("label", 1_795_000_000_100, 5, Value::String("a".into())),
            stored("nan", 7, 6, Value::Float(f64::NAN)),
        ];
        let decoded = decode_values(Bytes::from(encode_values(&values))).unwrap();
        assert_eq!(decoded.len(), 3);
        for (v, d) in values.iter().zip(&decoded) {
            assert_eq!(d.property, v.property);
            assert_eq!((d.current, d.logged), (v.current, v.logged));
            assert_eq!(d.point, point(v));
        }
        assert!(value_of(&decoded[2].point, &Limits::DEFAULT).unwrap() != Value::Float(0.0));
    }

    proptest::proptest! {
        #[test]
        fn chunks_round_trip(mut raw in proptest::collection::vec((proptest::num::u64::ANY, 0u64..3, proptest::num::u64::ANY, 0u8..3, proptest::num::u64::ANY, proptest::num::i64::ANY), 0..200)) {
            raw.sort();
            let points: Vec<ValueRecord> = raw.iter().map(|&(ts, inc, seq, quality, received, v)| {
                let mut value = Vec::new();
                Value::Int(v).encode(&mut value);
                ValueRecord { timestamp_ms: ts, incarnation: inc, seq, quality, value: Bytes::from(value), received_ms: received }
            }).collect();
            let encoded = encode_chunk(&points);
            let counted: usize = points.iter().enumerate().map(|(i, p)| point_len(p, i.checked_sub(1).map(|j| &points[j]))).sum();
            proptest::prop_assert_eq!(counted, encoded.len(), "point_len agrees with the encoding");
            let decoded = decode_chunk(Bytes::from(encoded)).unwrap();
            proptest::prop_assert_eq!(decoded, points);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = decode_chunk(Bytes::from(bytes.clone()));
            let _ = decode_values(Bytes::from(bytes));
        }
    }

    #[test]
    fn a_slow_value_costs_a_few_bytes() {
        let points: Vec<ValueRecord> = (0..1000u64)
            .map(|i| {
                let mut value = Vec::new();
                Value::Float(20.0 + i as f64 / 10.0).encode(&mut value);
                ValueRecord {
                    timestamp_ms: 1_795_000_000_000 + i * 1000,
                    incarnation: 0xdead_beef_dead_beef,
                    seq: i + 1,
                    quality: 0,
                    value: Bytes::from(value),
                    received_ms: 1_795_000_000_000 + i * 1000 + 2,
                }
            })
            .collect();
        // a float is 9 bytes in the device encoding; keys, quality and receive time add at most 8 more
        let per_value = encode_chunk(&points).len() as f64 / 1000.0;
        assert!(per_value - 9.0 <= 8.0, "{per_value} bytes per value");
    }
}
