//! A peer connection's byte stream (foundation ↔ foundation, `docs/PROTOCOL.md` §10): whatever decodes must
//! re-encode to a message that decodes the same; nothing panics, and lengths over the limit are refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thingport_protocol::BytesMut;
use thingport_protocol::peer::PeerMessage;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(message)) = PeerMessage::decode_framed(&mut buf, 1 << 20) {
        let bytes = message.to_framed_bytes().expect("a decoded message encodes");
        let mut again = BytesMut::from(&bytes[..]);
        assert_eq!(PeerMessage::decode_framed(&mut again, 1 << 20).ok().flatten(), Some(message));
    }
});
