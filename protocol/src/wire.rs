//! Field-level reading and writing shared by the device and link codecs.

use bytes::{Buf, BufMut, Bytes};
use bytestring::ByteString;

use crate::error::DecodeError;
use crate::varint;

/// Reads fields from a whole frame held in `Bytes`; slices it hands out share the frame's storage.
#[derive(Debug)]
pub(crate) struct Reader {
    buf: Bytes,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Self {
        Reader { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        if self.buf.is_empty() {
            return Err(DecodeError::Truncated);
        }
        Ok(self.buf.get_u8())
    }

    pub(crate) fn f64(&mut self) -> Result<f64, DecodeError> {
        if self.buf.len() < 8 {
            return Err(DecodeError::Truncated);
        }
        Ok(self.buf.get_f64_le())
    }

    pub(crate) fn varint(&mut self) -> Result<u64, DecodeError> {
        varint::get(&mut self.buf)
    }

    /// A varint that must fit in `T` (`what` names the field in the error).
    pub(crate) fn varint_as<T: TryFrom<u64>>(
        &mut self,
        what: &'static str,
    ) -> Result<T, DecodeError> {
        let value = self.varint()?;
        T::try_from(value).map_err(|_| DecodeError::OutOfRange { what, value })
    }

    /// A count of elements, each at least `min_size` bytes, checked against `limit` and against what remains, so
    /// that a caller may allocate `count` slots.
    pub(crate) fn count(
        &mut self,
        what: &'static str,
        limit: usize,
        min_size: usize,
    ) -> Result<usize, DecodeError> {
        let count = self.varint()?;
        if count > limit as u64 {
            return Err(DecodeError::TooMany { what, count, limit });
        }
        let count = count as usize;
        if count.saturating_mul(min_size) > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        Ok(count)
    }

    /// `len` bytes as a slice of the input.
    pub(crate) fn bytes(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        if len > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        Ok(self.buf.split_to(len))
    }

    /// A varint length then that many bytes; the length is checked against `limit` first.
    pub(crate) fn len_prefixed(
        &mut self,
        what: &'static str,
        limit: usize,
    ) -> Result<Bytes, DecodeError> {
        let len = self.varint()?;
        if len > limit as u64 {
            return Err(DecodeError::TooLong { what, len, limit });
        }
        self.bytes(len as usize)
    }

    /// A length-prefixed UTF-8 string.
    pub(crate) fn text(
        &mut self,
        what: &'static str,
        limit: usize,
    ) -> Result<ByteString, DecodeError> {
        let raw = self.len_prefixed(what, limit)?;
        ByteString::try_from(raw).map_err(|_| DecodeError::InvalidUtf8 { what })
    }

    /// A non-empty name of at most `limit` bytes.
    pub(crate) fn name(
        &mut self,
        what: &'static str,
        limit: usize,
    ) -> Result<ByteString, DecodeError> {
        let name = self.text(what, limit)?;
        if name.is_empty() {
            return Err(DecodeError::Empty { what });
        }
        Ok(name)
    }

    /// Everything left, as a slice of the input.
    pub(crate) fn rest(&mut self) -> Bytes {
        self.buf.split_off(0)
    }

    /// Ends decoding: any byte left over is an error.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

/// Writes a length-prefixed byte string.
pub(crate) fn put_len_prefixed(dst: &mut impl BufMut, bytes: &[u8]) {
    varint::put(dst, bytes.len() as u64);
    dst.put_slice(bytes);
}

/// Wire size of a length-prefixed byte string.
pub(crate) fn len_prefixed_len(bytes: &[u8]) -> usize {
    varint::encoded_len(bytes.len() as u64) + bytes.len()
}
