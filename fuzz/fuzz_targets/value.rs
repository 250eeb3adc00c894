//! One typed value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thingport_protocol::{Bytes, BytesMut, Limits, Value};

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = Value::decode(Bytes::copy_from_slice(data), &Limits::DEFAULT) {
        let mut buf = BytesMut::new();
        value.encode(&mut buf);
        assert_eq!(buf.len(), value.encoded_len());
        assert_eq!(&buf[..], data, "values have one encoding");
    }
});
