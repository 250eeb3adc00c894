//! The thingport wire formats, the one home of every byte that crosses a thingport connection.
//!
//! - [`frame`]: device frames (HELLO, WELCOME, PROPERTIES, EVENT, SERVICE_REQUEST/RESPONSE, ACK, PING/PONG, GOAWAY,
//!   ERROR) and [`value`]: the typed values they carry.
//! - [`stream`]: length-prefixed framing for byte streams (device frames on QUIC, link frames on TCP).
//! - [`link`]: the gateway ↔ foundation link format, a routing header in front of unchanged device frame bytes,
//!   and [`partition`]: the thing name → partition hash both ends of a link route by.
//! - [`peer`]: the worker ↔ worker format of the cache ring (§10).
//! - `codec` (feature `codec`): the formats as `tokio_util::codec` decoders and encoders.
//! - [`session`]: the device session state machine used by both ends (handshake, keepalive, sequence numbers,
//!   retransmission after reconnect, duplicate detection).
//!
//! This crate does no I/O: no sockets, no clock, no randomness. Time comes in as an argument. Decoders check every
//! declared length against [`Limits`] before allocating, reject trailing bytes, and hand strings and payloads out
//! as `Bytes` slices of the input. The specification is `docs/PROTOCOL.md`; its hex test vectors are checked by
//! this crate's tests.

#[cfg(feature = "codec")]
pub mod codec;
pub mod codes;
pub mod error;
pub mod frame;
pub mod limits;
pub mod link;
pub mod partition;
pub mod peer;
pub mod session;
pub mod stream;
pub mod value;
pub mod varint;
mod wire;

pub use bytes::{Bytes, BytesMut};
pub use bytestring::ByteString;
pub use codes::{Action, ErrorCode, GoawayReason, Quality, ServiceErrorCode};
pub use error::{DecodeError, SendError, SessionError};
pub use frame::{
    Credential, DataHeader, ErrorFrame, Event, Frame, FrameType, Goaway, Hello, Properties,
    PropertyUpdate, ServiceRequest, ServiceResponse, ServiceResult, Welcome,
};
pub use limits::Limits;
pub use link::{LinkDecoder, LinkFrame, Transport};
pub use session::{
    DeviceConfig, DeviceEvent, DeviceSession, DeviceState, ServerConfig, ServerEvent,
    ServerSession, ServerState,
};
pub use value::Value;

/// Lowest device protocol version this crate speaks.
pub const MIN_VERSION: u8 = 1;
/// Highest device protocol version this crate speaks.
pub const MAX_VERSION: u8 = 1;

/// §3.2: the highest version that both this crate and a peer offering `min..=max` speak.
pub fn common_version(min: u8, max: u8) -> Option<u8> {
    (min <= max && max >= MIN_VERSION && min <= MAX_VERSION).then(|| max.min(MAX_VERSION))
}

/// §3.2: the versions a `HELLO` offers, read from its first three bytes, which every version keeps (type `0x01`,
/// `min_version`, `max_version`) — readable even when the rest is laid out for a version this crate does not know.
/// `None` when `raw` is not a `HELLO` that long.
pub fn offered_versions(raw: &[u8]) -> Option<(u8, u8)> {
    match raw {
        [0x01, min, max, ..] => Some((*min, *max)),
        _ => None,
    }
}

/// TLS ALPN protocol name of the device protocol over QUIC (`docs/PROTOCOL.md` §2.3).
pub const QUIC_ALPN: &[u8] = b"thingport/1";
/// WebSocket subprotocol (`Sec-WebSocket-Protocol`) of the device protocol over WSS (`docs/PROTOCOL.md` §2.2).
pub const WS_SUBPROTOCOL: &str = "thingport.v1";
/// Request path of the device WebSocket endpoint.
pub const WS_PATH: &str = "/v1/device";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_in_common() {
        assert_eq!(common_version(1, 1), Some(1));
        assert_eq!(common_version(1, 5), Some(MAX_VERSION));
        assert_eq!(common_version(2, 5), None);
        assert_eq!(common_version(0, 0), None);
        assert_eq!(common_version(1, 0), None, "an empty range");
        assert_eq!(offered_versions(&[0x01, 2, 3, 0xff]), Some((2, 3)));
        assert_eq!(offered_versions(&[0x01, 2]), None);
        assert_eq!(offered_versions(&[0x02, 1, 1]), None);
    }
}
