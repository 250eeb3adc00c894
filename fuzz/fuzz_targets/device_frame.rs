//! One device frame, as a WebSocket message delivers it: decode, and whatever decodes must re-encode to a frame
//! that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thingport_protocol::{Bytes, Frame, Limits};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::decode(Bytes::copy_from_slice(data), &Limits::DEFAULT) {
        let encoded = frame.to_bytes();
        assert_eq!(encoded.len(), frame.encoded_len());
        let again = Frame::decode(encoded, &Limits::DEFAULT).expect("re-encoded frame decodes");
        assert_eq!(again.to_bytes(), frame.to_bytes());
    }
});
