//! Errors of the decoding and session layers.
//!
//! Each variant says what it does to the connection: a decode error or a session error ends the device session with
//! an `ERROR` frame whose code is [`DecodeError::code`] / [`SessionError::code`], then the transport is closed. The
//! peer's other sessions and the process are never affected.

use crate::codes::ErrorCode;

/// A frame could not be decoded. The session is ended with `ERROR` and the connection closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended before the frame did (a whole message was expected).
    #[error("frame truncated")]
    Truncated,
    /// A varint has more than 64 significant bits.
    #[error("varint overflows 64 bits")]
    VarintOverflow,
    /// A varint is not in its shortest form.
    #[error("varint not in shortest form")]
    VarintOverlong,
    /// A varint does not fit the field it encodes.
    #[error("{what} out of range: {value}")]
    OutOfRange { what: &'static str, value: u64 },
    /// The frame type byte names no frame of this protocol version.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownFrameType(u8),
    /// A value tag names no value type.
    #[error("unknown value tag 0x{0:02x}")]
    UnknownValueTag(u8),
    /// A declared length is over its limit; nothing of that size was allocated.
    #[error("{what} length {len} over limit {limit}")]
    TooLong { what: &'static str, len: u64, limit: usize },
    /// A declared element count is over its limit; nothing of that size was allocated.
    #[error("{what} count {count} over limit {limit}")]
    TooMany { what: &'static str, count: u64, limit: usize },
    /// Structured values are nested deeper than the limit.
    #[error("values nested deeper than {limit}")]
    TooDeep { limit: usize },
    /// A string is not valid UTF-8.
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 { what: &'static str },
    /// A field holds a value the protocol does not define.
    #[error("invalid {what}: {value}")]
    InvalidField { what: &'static str, value: u64 },
    /// A name that must not be empty is empty.
    #[error("{what} is empty")]
    Empty { what: &'static str },
    /// A map holds the same key twice.
    #[error("duplicate map key")]
    DuplicateKey,
    /// Bytes remain after the frame's last field.
    #[error("{0} trailing bytes after frame")]
    TrailingBytes(usize),
}

impl DecodeError {
    /// The code a server sends in the `ERROR` frame that ends the session.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLong { what: "frame", .. } => ErrorCode::FRAME_TOO_LARGE,
            DecodeError::TooLong { .. }
            | DecodeError::TooMany { .. }
            | DecodeError::TooDeep { .. } => ErrorCode::LIMIT_EXCEEDED,
            _ => ErrorCode::MALFORMED_FRAME,
        }
    }
}

/// A frame was well formed but not valid in the session's state. The session ends with `ERROR` (code
/// [`SessionError::code`]) and the connection is closed; a device then reconnects as the code directs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The frame is not allowed in this state or from this side (data before `HELLO`, a second `HELLO`, a server
    /// frame sent by a device).
    #[error("unexpected {frame} frame while {state}")]
    UnexpectedFrame { frame: &'static str, state: &'static str },
    /// A data frame's sequence number is not the next one expected.
    #[error("sequence {got} where {expected} was expected")]
    Sequence { expected: u64, got: u64 },
    /// An `ACK` acknowledges a sequence number that was never sent.
    #[error("ack {acked} beyond last sent sequence {sent}")]
    AckBeyondSent { acked: u64, sent: u64 },
    /// No version is supported by both sides.
    #[error("no common protocol version (peer offers {min}..={max})")]
    UnsupportedVersion { min: u8, max: u8 },
    /// The session was not established (`WELCOME` sent or received) before the handshake deadline.
    #[error("handshake deadline passed")]
    HandshakeTimeout,
    /// Nothing was received for longer than the keepalive window allows.
    #[error("keepalive window passed with nothing received")]
    KeepaliveTimeout,
    /// The peer has more unacknowledged data frames in flight than allowed.
    #[error("more than {limit} data frames unacknowledged")]
    WindowExceeded { limit: usize },
    /// The peer ended the session with an `ERROR` frame.
    #[error("peer error {code}: {message}")]
    Peer { code: ErrorCode, retry_after_ms: u32, message: String },
    /// The session is closed; nothing more can be sent or handled.
    #[error("session closed")]
    Closed,
}

impl SessionError {
    /// The code sent to the peer in the `ERROR` frame that ends the session.
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::UnexpectedFrame { .. } => ErrorCode::UNEXPECTED_FRAME,
            SessionError::Sequence { .. } | SessionError::AckBeyondSent { .. } => {
                ErrorCode::SEQUENCE_ERROR
            }
            SessionError::UnsupportedVersion { .. } => ErrorCode::UNSUPPORTED_VERSION,
            SessionError::HandshakeTimeout => ErrorCode::HANDSHAKE_TIMEOUT,
            SessionError::KeepaliveTimeout => ErrorCode::KEEPALIVE_TIMEOUT,
            SessionError::WindowExceeded { .. } => ErrorCode::RATE_LIMITED,
            SessionError::Peer { code, .. } => *code,
            SessionError::Closed => ErrorCode::INTERNAL,
        }
    }
}

/// A data frame could not be queued for sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The window of unacknowledged data frames is full; retry after an `ACK` arrives.
    #[error("send window full")]
    WindowFull,
    /// Only data frames (`PROPERTIES`, `EVENT`, `SERVICE_REQUEST`, `SERVICE_RESPONSE`) are sequenced.
    #[error("not a data frame")]
    NotData,
    /// The session has ended for good.
    #[error("session closed")]
    Closed,
}
