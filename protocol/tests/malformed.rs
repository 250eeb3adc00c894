//! Bad input: every decoder returns a typed error, never panics, and never accepts a damaged frame silently.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "in tests a panic is a failed assertion"
)]

mod strategies;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use thingport_protocol::{
    DecodeError, ErrorCode, Frame, Limits, LinkDecoder, LinkFrame, frame::FrameType, stream,
};

const LIMITS: Limits = Limits { max_frame: 1 << 20, ..Limits::DEFAULT };

fn decode(bytes: &[u8]) -> Result<Frame, DecodeError> {
    Frame::decode(Bytes::copy_from_slice(bytes), &LIMITS)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    /// Every proper prefix of a frame is refused (the protocol has no optional trailing fields).
    #[test]
    fn truncated_frames(frame in strategies::frame()) {
        let encoded = frame.to_bytes();
        for cut in 0..encoded.len() {
            prop_assert!(decode(&encoded[..cut]).is_err(), "prefix of {} bytes accepted", cut);
        }
    }

    #[test]
    fn trailing_bytes(frame in strategies::frame(), extra in prop::collection::vec(any::<u8>(), 1..4)) {
        let mut bytes = frame.to_bytes().to_vec();
        bytes.extend_from_slice(&extra);
        prop_assert_eq!(decode(&bytes), Err(DecodeError::TrailingBytes(extra.len())));
    }

    /// Arbitrary bytes never panic a decoder; whatever decodes re-encodes to a frame that decodes the same.
    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(frame) = decode(&bytes) {
            prop_assert_eq!(decode(&frame.to_bytes())?, frame);
        }
        let _ = LinkFrame::decode(Bytes::copy_from_slice(&bytes), &LIMITS);
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = LinkDecoder::new(LIMITS).decode(&mut buf) {}
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = stream::next_frame(&mut buf, LIMITS.max_frame) {}
    }

    /// Flipping one byte of a valid frame yields an error or another well-formed frame, never a panic.
    #[test]
    fn corrupted_frames(frame in strategies::frame(), at: prop::sample::Index, byte: u8) {
        let mut bytes = frame.to_bytes().to_vec();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        if let Ok(frame) = decode(&bytes) {
            prop_assert_eq!(decode(&frame.to_bytes())?, frame);
        }
    }
}

#[test]
fn unknown_frame_types() {
    for byte in [0x00u8, 0x0c, 0x7f, 0xff] {
        assert_eq!(decode(&[byte]), Err(DecodeError::UnknownFrameType(byte)));
        assert_eq!(decode(&[byte]).unwrap_err().code(), ErrorCode::MALFORMED_FRAME);
    }
    for byte in 0x01..=0x0b {
        assert!(FrameType::from_u8(byte).is_ok());
    }
}

#[test]
fn bad_varints() {
    // ACK with an overlong and an overflowing sequence number
    assert_eq!(decode(&[0x07, 0x80, 0x00]), Err(DecodeError::VarintOverlong));
    assert_eq!(
        decode(&[0x07, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
        Err(DecodeError::VarintOverflow)
    );
    assert_eq!(decode(&[0x07, 0x80]), Err(DecodeError::Truncated));
    // a keepalive that does not fit 16 bits
    let hello = [0x01, 1, 1, 1, b'a', 0, 0x80, 0x80, 0x04, 0, 1];
    assert_eq!(decode(&hello), Err(DecodeError::OutOfRange { what: "keepalive", value: 65_536 }));
}

#[test]
fn lengths_over_limits_are_refused_before_allocating() {
    let limits = Limits { max_frame: 64, max_batch: 2, max_name: 4, ..Limits::DEFAULT };
    let big = vec![0x07; 65];
    let err = Frame::decode(Bytes::from(big), &limits).unwrap_err();
    assert_eq!(err, DecodeError::TooLong { what: "frame", len: 65, limit: 64 });
    assert_eq!(err.code(), ErrorCode::FRAME_TOO_LARGE);
    // a batch announcing 3 updates
    let err = Frame::decode(Bytes::from_static(&[0x03, 1, 3, 0]), &limits).unwrap_err();
    assert_eq!(err, DecodeError::TooMany { what: "batch", count: 3, limit: 2 });
    assert_eq!(err.code(), ErrorCode::LIMIT_EXCEEDED);
    // a thing name announcing 2^32 bytes
    let hello = [0x01, 1, 1, 0x80, 0x80, 0x80, 0x80, 0x10];
    assert!(matches!(
        Frame::decode(Bytes::copy_from_slice(&hello), &limits),
        Err(DecodeError::TooLong { what: "thing name", len: 4_294_967_296, .. })
    ));
}

#[test]
fn field_rules() {
    // resume_seq 0
    assert_eq!(
        decode(&[0x01, 1, 1, 1, b'a', 0, 0, 0, 0]),
        Err(DecodeError::InvalidField { what: "resume_seq", value: 0 })
    );
    // empty thing name
    assert_eq!(
        decode(&[0x01, 1, 1, 0, 0, 0, 0, 1]),
        Err(DecodeError::Empty { what: "thing name" })
    );
    // empty token
    assert_eq!(
        decode(&[0x01, 1, 1, 1, b'a', 1, 0, 0, 0, 1]),
        Err(DecodeError::Empty { what: "credential" })
    );
    // unknown credential kind
    assert_eq!(
        decode(&[0x01, 1, 1, 1, b'a', 7, 0, 0, 1]),
        Err(DecodeError::InvalidField { what: "credential kind", value: 7 })
    );
    // quality 3
    assert_eq!(
        decode(&[0x03, 1, 1, 0, 1, b't', 0, 3, 0]),
        Err(DecodeError::InvalidField { what: "quality", value: 3 })
    );
    // a delta taking the timestamp below zero
    assert!(matches!(
        decode(&[0x03, 1, 1, 0, 1, b't', 1, 0, 0]),
        Err(DecodeError::OutOfRange { what: "timestamp", .. })
    ));
    // result status 2
    assert_eq!(
        decode(&[0x06, 1, 1, 2]),
        Err(DecodeError::InvalidField { what: "result status", value: 2 })
    );
    // invalid UTF-8 in an error message
    assert_eq!(decode(&[0x0b, 1, 0, 1, 0xff]), Err(DecodeError::InvalidUtf8 { what: "message" }));
}

#[test]
fn link_frames_carry_only_bounded_nonempty_device_frames() {
    let limits = Limits { max_frame: 8, ..Limits::DEFAULT };
    let empty = LinkFrame::decode(Bytes::from_static(&[0x05, 1, 7, 1, b'a']), &limits);
    assert_eq!(empty, Err(DecodeError::Empty { what: "device frame" }));
    let mut big = vec![0x07, 1, 0];
    big.extend_from_slice(&[0x07; 9]);
    assert!(matches!(
        LinkFrame::decode(Bytes::from(big), &limits),
        Err(DecodeError::TooLong { what: "frame", .. })
    ));
    assert_eq!(
        LinkFrame::decode(Bytes::from_static(&[0x0b, 2]), &limits),
        Err(DecodeError::InvalidField { what: "saturated", value: 2 })
    );
    assert_eq!(
        LinkFrame::decode(Bytes::from_static(&[0x13]), &limits),
        Err(DecodeError::UnknownFrameType(0x13))
    );
    // STORED_RUN: last not before first, and at most 65,536 frames
    assert_eq!(
        LinkFrame::decode(Bytes::from_static(&[0x11, 1, 5, 4]), &limits),
        Err(DecodeError::InvalidField { what: "last", value: 4 })
    );
    assert_eq!(
        LinkFrame::decode(Bytes::from_static(&[0x11, 1, 0, 0x80, 0x80, 0x04]), &limits),
        Err(DecodeError::InvalidField { what: "last", value: 65_536 })
    );
    assert!(
        LinkFrame::decode(Bytes::from_static(&[0x11, 1, 1, 0x80, 0x80, 0x04]), &limits).is_ok()
    );
    // ROUTES: at most 256 workers and 1,024 partitions, and a primary names one of the workers
    assert!(matches!(
        LinkFrame::decode(Bytes::from_static(&[0x10, 1, 0x81, 0x02]), &limits),
        Err(DecodeError::TooLong { what: "worker count", .. })
    ));
    assert!(matches!(
        LinkFrame::decode(Bytes::from_static(&[0x10, 1, 0, 0x81, 0x08]), &limits),
        Err(DecodeError::TooLong { what: "partition count", .. })
    ));
    assert_eq!(
        LinkFrame::decode(Bytes::from_static(&[0x10, 1, 1, 1, b'w', 2, 1, 2]), &limits),
        Err(DecodeError::InvalidField { what: "primary", value: 2 })
    );
    assert_eq!(
        LinkFrame::decode(Bytes::from_static(&[0x10, 1, 1, 1, b'w', 3, 1, 0]), &limits),
        Err(DecodeError::Truncated)
    );
    assert_eq!(
        LinkFrame::decode(Bytes::from_static(&[0x0e, 1, 2]), &limits),
        Err(DecodeError::InvalidField { what: "open", value: 2 })
    );
    assert_eq!(
        LinkFrame::decode(Bytes::from_static(&[0x0c, 0]), &limits),
        Err(DecodeError::TrailingBytes(1))
    );
}

#[test]
fn link_decoder_refuses_oversized_prefix() {
    let decoder = LinkDecoder::new(Limits { max_frame: 1024, ..Limits::DEFAULT });
    let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0x7f][..]);
    assert!(matches!(decoder.decode(&mut buf), Err(DecodeError::TooLong { what: "frame", .. })));
}
