//! Length-prefixed framing on byte streams: device frames on a QUIC stream and link frames on a TCP link
//! (`docs/PROTOCOL.md` §2.3 and §8.1). Each frame is a varint length, then that many bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::varint;

/// Splits the next whole frame off the front of `buf`.
///
/// Returns `Ok(None)` while the frame is incomplete, having reserved room for at most the declared length. A
/// declared length over `max_frame` is an error as soon as the prefix is read, before any of the frame is
/// buffered; an empty frame is an error too.
pub fn next_frame(buf: &mut BytesMut, max_frame: usize) -> Result<Option<Bytes>, DecodeError> {
    let (len, prefix) = match varint::peek(buf)? {
        varint::Peek::Complete(len, prefix) => (len, prefix),
        varint::Peek::Incomplete => return Ok(None),
    };
    if len > max_frame as u64 {
        return Err(DecodeError::TooLong { what: "frame", len, limit: max_frame });
    }
    if len == 0 {
        return Err(DecodeError::Empty { what: "frame" });
    }
    let len = len as usize;
    if buf.len() < prefix + len {
        buf.reserve(prefix + len - buf.len());
        return Ok(None);
    }
    buf.advance(prefix);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Writes the length prefix of a frame of `len` bytes.
pub fn put_len(dst: &mut impl BufMut, len: usize) {
    varint::put(dst, len as u64);
}

/// Bytes a frame of `len` bytes takes with its prefix.
pub fn framed_len(len: usize) -> usize {
    varint::encoded_len(len as u64) + len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_whole_frames() {
        let mut buf = BytesMut::new();
        assert_eq!(next_frame(&mut buf, 100), Ok(None));
        buf.extend_from_slice(&[3, b'a']);
        assert_eq!(next_frame(&mut buf, 100), Ok(None));
        buf.extend_from_slice(b"bc\x01z");
        assert_eq!(next_frame(&mut buf, 100), Ok(Some(Bytes::from_static(b"abc"))));
        assert_eq!(next_frame(&mut buf, 100), Ok(Some(Bytes::from_static(b"z"))));
        assert!(buf.is_empty());
    }

    #[test]
    fn refuses_oversized_before_buffering() {
        // announces 1 GiB with only the prefix present
        let mut buf = BytesMut::from(&[0x80, 0x80, 0x80, 0x80, 0x04][..]);
        assert_eq!(
            next_frame(&mut buf, 65_536),
            Err(DecodeError::TooLong { what: "frame", len: 1 << 30, limit: 65_536 })
        );
        assert!(buf.capacity() < 1024);
        let mut empty = BytesMut::from(&[0u8][..]);
        assert_eq!(next_frame(&mut empty, 10), Err(DecodeError::Empty { what: "frame" }));
    }
}
