//! The wire formats as `tokio_util::codec` decoders and encoders (feature `codec`), so that every connection reads
//! and writes frames the same way:
//!
//! - [`LinkCodec`]: gateway ↔ worker link frames (§8);
//! - [`PeerCodec`]: worker ↔ worker messages (§10);
//! - [`StreamCodec`]: device frames on a byte stream, each behind its varint length (QUIC, §2.3).
//!
//! Decoding is the crate's own (`LinkDecoder`, `PeerMessage::decode_framed`, `stream::next_frame`): each declared
//! length is checked against its limit before anything is buffered. The codecs add nothing but the traits; a
//! reader drives one over a `BytesMut` it fills itself, or hands it to `FramedRead`. The encoders write what they
//! are given: keeping within the receiver's limits is the sender's job.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::error::DecodeError;
use crate::limits::Limits;
use crate::link::{LinkDecoder, LinkFrame};
use crate::peer::PeerMessage;
use crate::stream;

/// Why a framed connection stopped: its stream failed, or the peer sent something undecodable.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("peer message could not be encoded: {0}")]
    Encode(#[from] postcard::Error),
}

/// Link frames (§8.1) within a device frame limit plus the routing header.
#[derive(Debug, Clone)]
pub struct LinkCodec(LinkDecoder);

impl LinkCodec {
    pub fn new(limits: Limits) -> Self {
        LinkCodec(LinkDecoder::new(limits))
    }
}

impl Decoder for LinkCodec {
    type Item = LinkFrame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<LinkFrame>, CodecError> {
        Ok(self.0.decode(src)?)
    }
}

impl Encoder<&LinkFrame> for LinkCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &LinkFrame, dst: &mut BytesMut) -> Result<(), CodecError> {
        frame.encode_framed(dst);
        Ok(())
    }
}

/// Peer messages (§10) of at most `max_message` bytes.
#[derive(Debug, Clone, Copy)]
pub struct PeerCodec {
    pub max_message: usize,
}

impl Decoder for PeerCodec {
    type Item = PeerMessage;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<PeerMessage>, CodecError> {
        Ok(PeerMessage::decode_framed(src, self.max_message)?)
    }
}

impl Encoder<&PeerMessage> for PeerCodec {
    type Error = CodecError;

    fn encode(&mut self, message: &PeerMessage, dst: &mut BytesMut) -> Result<(), CodecError> {
        Ok(message.encode_framed(dst)?)
    }
}

/// Device frames on a byte stream (§2.3): a varint length, then the frame, at most `max_frame` bytes. Decoded
/// frames are slices of the read buffer, not copies.
#[derive(Debug, Clone, Copy)]
pub struct StreamCodec {
    pub max_frame: usize,
}

impl Decoder for StreamCodec {
    type Item = Bytes;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
        Ok(stream::next_frame(src, self.max_frame)?)
    }
}

impl Encoder<&[u8]> for StreamCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &[u8], dst: &mut BytesMut) -> Result<(), CodecError> {
        dst.reserve(stream::framed_len(frame.len()));
        stream::put_len(dst, frame.len());
        dst.extend_from_slice(frame);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::LinkFrame;

    #[test]
    fn a_codec_splits_frames_across_reads_and_refuses_an_oversized_length_before_buffering() {
        let mut codec = LinkCodec::new(Limits::DEFAULT);
        let mut wire = BytesMut::new();
        for nonce in [1, 300] {
            codec.encode(&LinkFrame::Ping { nonce }, &mut wire).unwrap();
        }
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for byte in wire.iter() {
            buf.extend_from_slice(&[*byte]);
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!(frames, vec![LinkFrame::Ping { nonce: 1 }, LinkFrame::Ping { nonce: 300 }]);

        let mut device = StreamCodec { max_frame: 16 };
        let mut buf = BytesMut::from(&[0x7f][..]);
        assert!(matches!(
            device.decode(&mut buf),
            Err(CodecError::Decode(DecodeError::TooLong { .. }))
        ));
        let mut wire = BytesMut::new();
        device.encode(&b"abc"[..], &mut wire).unwrap();
        assert_eq!(device.decode(&mut wire).unwrap(), Some(Bytes::from_static(b"abc")));
    }
}
