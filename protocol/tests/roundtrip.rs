//! Every frame round-trips through its encoding, and `encoded_len()` is the length of that encoding.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "in tests a panic is a failed assertion"
)]

mod strategies;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use thingport_protocol::{DataHeader, Frame, Limits, LinkDecoder, LinkFrame, Value, link, stream};

/// Limits wide enough for anything the strategies generate.
const WIDE: Limits = Limits { max_frame: 1 << 20, ..Limits::DEFAULT };

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn device_frames(frame in strategies::frame()) {
        let encoded = frame.to_bytes();
        prop_assert_eq!(encoded.len(), frame.encoded_len());
        let decoded = Frame::decode(encoded.clone(), &WIDE)?;
        prop_assert_eq!(&decoded, &frame);
        prop_assert_eq!(decoded.to_bytes(), encoded);
    }

    #[test]
    fn values(value in strategies::value()) {
        let mut buf = BytesMut::new();
        value.encode(&mut buf);
        prop_assert_eq!(buf.len(), value.encoded_len());
        prop_assert_eq!(Value::decode(buf.freeze(), &WIDE)?, value);
    }

    #[test]
    fn link_frames(frame in strategies::link_frame()) {
        let framed = frame.to_framed_bytes();
        prop_assert_eq!(framed.len(), stream::framed_len(frame.encoded_len()));
        let mut buf = BytesMut::from(&framed[..]);
        let decoded = LinkDecoder::new(WIDE).decode(&mut buf)?;
        prop_assert_eq!(decoded.as_ref(), Some(&frame));
        prop_assert!(buf.is_empty());
    }

    /// Many link frames in one buffer, split at arbitrary points as reads deliver them, come out whole and in order.
    #[test]
    fn link_frames_across_reads(
        frames in prop::collection::vec(strategies::link_frame(), 1..12),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode_framed(&mut wire);
        }
        let wire = wire.freeze();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len())).collect();
        points.push(wire.len());
        points.sort_unstable();
        let decoder = LinkDecoder::new(WIDE);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut start = 0;
        for end in points {
            buf.extend_from_slice(&wire[start..end]);
            start = end;
            while let Some(f) = decoder.decode(&mut buf)? {
                out.push(f);
            }
        }
        prop_assert_eq!(out, frames);
    }

    /// The upstream header written ahead of a device frame's bytes equals the full encoding of the frame.
    #[test]
    fn upstream_header(session_id: u64, incarnation: u64, thing in strategies::name(), device in strategies::device_frame_bytes()) {
        let mut by_header = BytesMut::new();
        link::put_upstream_header(&mut by_header, session_id, incarnation, &thing, device.len());
        by_header.extend_from_slice(&device);
        let whole = LinkFrame::Upstream { session_id, incarnation, thing, frame: device }.to_framed_bytes();
        prop_assert_eq!(by_header.freeze(), whole);
    }

    /// Restamping a data frame changes its sequence number and nothing else.
    #[test]
    fn restamp(frame in strategies::frame(), seq: u64) {
        let encoded = frame.to_bytes();
        match DataHeader::peek(&encoded)? {
            Some(header) => {
                prop_assert_eq!(Some(header.seq), frame.seq());
                let stamped = DataHeader::restamp(&encoded, seq)?;
                let mut expected = frame.clone();
                expected.set_seq(seq);
                prop_assert_eq!(Frame::decode(stamped, &WIDE)?, expected);
            }
            None => {
                prop_assert_eq!(frame.seq(), None);
                prop_assert!(DataHeader::restamp(&encoded, seq).is_err());
            }
        }
    }

    /// Device frames on a QUIC stream: prefix then frame, decoded back whatever the read boundaries.
    #[test]
    fn stream_framing(frames in prop::collection::vec(strategies::frame(), 1..8), chunk in 1usize..64) {
        let mut wire = BytesMut::new();
        for f in &frames {
            stream::put_len(&mut wire, f.encoded_len());
            f.encode(&mut wire);
        }
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in wire.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(raw) = stream::next_frame(&mut buf, WIDE.max_frame)? {
                out.push(Frame::decode(raw, &WIDE)?);
            }
        }
        prop_assert_eq!(out, frames);
    }
}

#[test]
fn nan_round_trips_bit_for_bit() {
    let nan = f64::from_bits(0x7ff8_dead_beef_0001);
    let mut buf = BytesMut::new();
    Value::Float(nan).encode(&mut buf);
    let Value::Float(back) = Value::decode(buf.freeze(), &Limits::DEFAULT).unwrap() else {
        panic!("not a float");
    };
    assert_eq!(back.to_bits(), nan.to_bits());
}

#[test]
fn payloads_are_slices_of_the_input() {
    let frame = Frame::Event(thingport_protocol::Event {
        seq: 1,
        timestamp_ms: 5,
        name: "door".into(),
        payload: Value::Bytes(Bytes::from_static(b"open-sesame")),
    })
    .to_bytes();
    let Frame::Event(event) = Frame::decode(frame.clone(), &Limits::DEFAULT).unwrap() else {
        panic!("not an event");
    };
    let Value::Bytes(payload) = event.payload else { panic!("not bytes") };
    let range = frame.as_ptr_range();
    assert!(range.contains(&payload.as_ptr()), "payload was copied");
    assert!(range.contains(&event.name.as_bytes().as_ptr()), "name was copied");
}
