//! Typed values: the payload of properties, events and service parameters (`docs/PROTOCOL.md` §4.1).
//!
//! A value is one tag byte then its body. Strings and byte strings are slices of the received frame, not copies.

use bytes::{BufMut, Bytes};
use bytestring::ByteString;

use crate::error::DecodeError;
use crate::limits::Limits;
use crate::varint;
use crate::wire::{Reader, len_prefixed_len, put_len_prefixed};

/// Value tags (`docs/PROTOCOL.md` §4.1).
pub(crate) mod tag {
    pub(crate) const NULL: u8 = 0x00;
    pub(crate) const FALSE: u8 = 0x01;
    pub(crate) const TRUE: u8 = 0x02;
    pub(crate) const INT: u8 = 0x03;
    pub(crate) const FLOAT: u8 = 0x04;
    pub(crate) const STRING: u8 = 0x05;
    pub(crate) const BYTES: u8 = 0x06;
    pub(crate) const LIST: u8 = 0x07;
    pub(crate) const MAP: u8 = 0x08;
}

/// A typed value.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Value {
    /// No value.
    #[default]
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed 64-bit integer, zigzag varint on the wire.
    Int(i64),
    /// An IEEE 754 double, 8 bytes little-endian on the wire.
    Float(f64),
    /// A UTF-8 string.
    String(ByteString),
    /// Opaque bytes.
    Bytes(Bytes),
    /// An ordered list of values.
    List(Vec<Value>),
    /// String keys to values; keys are unique, order is kept.
    Map(Vec<(ByteString, Value)>),
}

impl Value {
    /// A string value from a `&'static str` (no copy).
    pub fn from_static(text: &'static str) -> Value {
        Value::String(ByteString::from_static(text))
    }

    /// Number of bytes the value takes on the wire.
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            Value::Null | Value::Bool(_) => 0,
            Value::Int(n) => varint::encoded_len(varint::zigzag(*n)),
            Value::Float(_) => 8,
            Value::String(s) => len_prefixed_len(s.as_bytes()),
            Value::Bytes(b) => len_prefixed_len(b),
            Value::List(items) => {
                varint::encoded_len(items.len() as u64)
                    + items.iter().map(Value::encoded_len).sum::<usize>()
            }
            Value::Map(entries) => {
                varint::encoded_len(entries.len() as u64)
                    + entries
                        .iter()
                        .map(|(k, v)| len_prefixed_len(k.as_bytes()) + v.encoded_len())
                        .sum::<usize>()
            }
        }
    }

    /// Appends the value's encoding to `dst`.
    pub fn encode(&self, dst: &mut impl BufMut) {
        match self {
            Value::Null => dst.put_u8(tag::NULL),
            Value::Bool(false) => dst.put_u8(tag::FALSE),
            Value::Bool(true) => dst.put_u8(tag::TRUE),
            Value::Int(n) => {
                dst.put_u8(tag::INT);
                varint::put(dst, varint::zigzag(*n));
            }
            Value::Float(x) => {
                dst.put_u8(tag::FLOAT);
                dst.put_f64_le(*x);
            }
            Value::String(s) => {
                dst.put_u8(tag::STRING);
                put_len_prefixed(dst, s.as_bytes());
            }
            Value::Bytes(b) => {
                dst.put_u8(tag::BYTES);
                put_len_prefixed(dst, b);
            }
            Value::List(items) => {
                dst.put_u8(tag::LIST);
                varint::put(dst, items.len() as u64);
                for item in items {
                    item.encode(dst);
                }
            }
            Value::Map(entries) => {
                dst.put_u8(tag::MAP);
                varint::put(dst, entries.len() as u64);
                for (key, value) in entries {
                    put_len_prefixed(dst, key.as_bytes());
                    value.encode(dst);
                }
            }
        }
    }

    /// Decodes one value from a whole buffer, rejecting trailing bytes.
    pub fn decode(buf: Bytes, limits: &Limits) -> Result<Value, DecodeError> {
        let mut reader = Reader::new(buf);
        let value = Value::read(&mut reader, limits, 0)?;
        reader.finish()?;
        Ok(value)
    }

    pub(crate) fn read(
        r: &mut Reader,
        limits: &Limits,
        depth: usize,
    ) -> Result<Value, DecodeError> {
        Ok(match r.u8()? {
            tag::NULL => Value::Null,
            tag::FALSE => Value::Bool(false),
            tag::TRUE => Value::Bool(true),
            tag::INT => Value::Int(varint::unzigzag(r.varint()?)),
            tag::FLOAT => Value::Float(r.f64()?),
            tag::STRING => Value::String(r.text("string value", limits.max_string)?),
            tag::BYTES => Value::Bytes(r.len_prefixed("bytes value", limits.max_string)?),
            tag::LIST => {
                let depth = nested(depth, limits)?;
                // every element is at least its tag byte
                let count = r.count("list", limits.max_collection, 1)?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(Value::read(r, limits, depth)?);
                }
                Value::List(items)
            }
            tag::MAP => {
                let depth = nested(depth, limits)?;
                // every entry is at least a key length byte and a tag byte
                let count = r.count("map", limits.max_collection, 2)?;
                let mut entries: Vec<(ByteString, Value)> = Vec::with_capacity(count);
                for _ in 0..count {
                    let key = r.name("map key", limits.max_name)?;
                    if entries.iter().any(|(k, _)| *k == key) {
                        return Err(DecodeError::DuplicateKey);
                    }
                    let value = Value::read(r, limits, depth)?;
                    entries.push((key, value));
                }
                Value::Map(entries)
            }
            other => return Err(DecodeError::UnknownValueTag(other)),
        })
    }
}

/// Depth of a collection's elements, or an error past the limit (`docs/PROTOCOL.md` §7).
fn nested(depth: usize, limits: &Limits) -> Result<usize, DecodeError> {
    if depth >= limits.max_depth {
        return Err(DecodeError::TooDeep { limit: limits.max_depth });
    }
    Ok(depth + 1)
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::String(ByteString::from(v))
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::String(ByteString::from(v))
    }
}

impl From<Bytes> for Value {
    fn from(v: Bytes) -> Self {
        Value::Bytes(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Result<Value, DecodeError> {
        Value::decode(Bytes::copy_from_slice(bytes), &Limits::DEFAULT)
    }

    #[test]
    fn nesting_is_limited() {
        let limits = Limits { max_depth: 2, ..Limits::DEFAULT };
        let ok = [tag::LIST, 1, tag::LIST, 1, tag::NULL];
        assert!(Value::decode(Bytes::copy_from_slice(&ok), &limits).is_ok());
        let deep = [tag::LIST, 1, tag::LIST, 1, tag::LIST, 0];
        assert_eq!(
            Value::decode(Bytes::copy_from_slice(&deep), &limits),
            Err(DecodeError::TooDeep { limit: 2 })
        );
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        // a list claiming 2^40 elements in a 9-byte frame
        assert!(matches!(
            decode(&[tag::LIST, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20]),
            Err(DecodeError::TooMany { what: "list", .. })
        ));
        // under the limit but more than the bytes present
        assert_eq!(decode(&[tag::LIST, 100, tag::NULL]), Err(DecodeError::Truncated));
    }

    #[test]
    fn bad_strings_and_keys() {
        assert_eq!(
            decode(&[tag::STRING, 2, 0xc3, 0x28]),
            Err(DecodeError::InvalidUtf8 { what: "string value" })
        );
        assert_eq!(
            decode(&[tag::MAP, 2, 1, b'a', tag::NULL, 1, b'a', tag::NULL]),
            Err(DecodeError::DuplicateKey)
        );
        assert_eq!(decode(&[0x09]), Err(DecodeError::UnknownValueTag(0x09)));
        assert_eq!(decode(&[tag::NULL, 0]), Err(DecodeError::TrailingBytes(1)));
        assert_eq!(decode(&[tag::FLOAT, 0, 0]), Err(DecodeError::Truncated));
    }

    #[test]
    fn strings_share_the_frame() {
        let frame = Bytes::from_static(&[tag::BYTES, 3, 1, 2, 3]);
        let Ok(Value::Bytes(payload)) = Value::decode(frame.clone(), &Limits::DEFAULT) else {
            panic!("not bytes");
        };
        assert_eq!(payload.as_ptr(), frame[2..].as_ptr());
    }
}
