//! Device frames on a QUIC stream: varint length prefixes, delivered in reads of a size the input chooses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thingport_protocol::{BytesMut, Frame, Limits, stream};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, data)) = data.split_first() else { return };
    let chunk = usize::from(chunk).max(1);
    let mut buf = BytesMut::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match stream::next_frame(&mut buf, Limits::DEFAULT.max_frame) {
                Ok(Some(raw)) => {
                    let _ = Frame::decode(raw, &Limits::DEFAULT);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(buf.capacity() <= Limits::DEFAULT.max_frame + 16 + chunk.max(64) * 2 + 4096);
    }
});
