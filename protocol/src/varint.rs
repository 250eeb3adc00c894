//! Unsigned LEB128 variable-length integers and zigzag mapping for signed ones.
//!
//! `docs/PROTOCOL.md` §2.1: seven bits per byte, least significant group first, the high bit set on every byte but
//! the last; at most 10 bytes for a `u64`; the shortest encoding only (an overlong form is rejected so that every
//! value has exactly one encoding).

use bytes::{Buf, BufMut};

use crate::error::DecodeError;

/// The longest encoding of a `u64`.
pub const MAX_LEN: usize = 10;

/// Number of bytes `value` takes on the wire.
#[inline]
pub const fn encoded_len(value: u64) -> usize {
    // bits needed, rounded up to groups of seven; zero still takes one byte
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Appends `value` to `dst`.
#[inline]
pub fn put(dst: &mut impl BufMut, mut value: u64) {
    while value >= 0x80 {
        dst.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    dst.put_u8(value as u8);
}

/// Outcome of peeking at a varint in a buffer that may hold only part of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    /// The value and the number of bytes it took.
    Complete(u64, usize),
    /// The buffer ends inside the varint.
    Incomplete,
}

/// Reads a varint from the front of `src` without consuming it.
pub fn peek(src: &[u8]) -> Result<Peek, DecodeError> {
    let mut value: u64 = 0;
    for (i, &byte) in src.iter().enumerate().take(MAX_LEN) {
        let group = u64::from(byte & 0x7f);
        if i == MAX_LEN - 1 && byte > 0x01 {
            // the tenth byte may carry only the 64th bit
            return Err(DecodeError::VarintOverflow);
        }
        value |= group << (7 * i);
        if byte & 0x80 == 0 {
            if byte == 0 && i > 0 {
                return Err(DecodeError::VarintOverlong);
            }
            return Ok(Peek::Complete(value, i + 1));
        }
    }
    if src.len() >= MAX_LEN { Err(DecodeError::VarintOverflow) } else { Ok(Peek::Incomplete) }
}

/// Reads and consumes a varint; a buffer that ends inside it is [`DecodeError::Truncated`].
pub fn get(src: &mut impl Buf) -> Result<u64, DecodeError> {
    match peek(src.chunk())? {
        Peek::Complete(value, len) => {
            src.advance(len);
            Ok(value)
        }
        Peek::Incomplete => Err(DecodeError::Truncated),
    }
}

/// Maps a signed integer onto an unsigned one so that small magnitudes stay short (0, -1, 1, -2 → 0, 1, 2, 3).
#[inline]
pub const fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

/// Inverse of [`zigzag`].
#[inline]
pub const fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_encodings() {
        let cases: &[(u64, &[u8])] = &[
            (0, &[0x00]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (16_384, &[0x80, 0x80, 0x01]),
            (u64::MAX, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
        ];
        for &(value, bytes) in cases {
            let mut out = Vec::new();
            put(&mut out, value);
            assert_eq!(out, bytes, "encoding of {value}");
            assert_eq!(encoded_len(value), bytes.len());
            assert_eq!(peek(bytes), Ok(Peek::Complete(value, bytes.len())));
        }
    }

    #[test]
    fn rejects_bad_forms() {
        assert_eq!(peek(&[0x80, 0x00]), Err(DecodeError::VarintOverlong));
        assert_eq!(peek(&[0xff; 10]), Err(DecodeError::VarintOverflow));
        assert_eq!(
            peek(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]),
            Err(DecodeError::VarintOverflow)
        );
        assert_eq!(peek(&[0x80, 0x80]), Ok(Peek::Incomplete));
        assert_eq!(peek(&[]), Ok(Peek::Incomplete));
        let mut short: &[u8] = &[0x80];
        assert_eq!(get(&mut short), Err(DecodeError::Truncated));
    }

    proptest! {
        #[test]
        fn roundtrip(value: u64) {
            let mut out = Vec::new();
            put(&mut out, value);
            prop_assert_eq!(out.len(), encoded_len(value));
            prop_assert_eq!(peek(&out)?, Peek::Complete(value, out.len()));
        }

        #[test]
        fn zigzag_roundtrip(value: i64) {
            prop_assert_eq!(unzigzag(zigzag(value)), value);
            prop_assert!(zigzag(value) <= value.unsigned_abs().saturating_mul(2));
        }
    }
}
