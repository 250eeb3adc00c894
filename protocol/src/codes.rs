//! Numeric codes carried in frames: error codes and what a device must do on each, `GOAWAY` reasons, value
//! quality, and service error codes.
//!
//! Codes are open sets: a receiver keeps a code it does not know (a newer peer may send it) and acts on its class.

use std::fmt;

/// Code of an `ERROR` frame (`docs/PROTOCOL.md` §6). The high byte is the class, which tells a device what to do
/// even with a code it does not know.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

/// What a device does after an `ERROR` frame, decided by the code's class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Class 0x01: a passing condition. Reconnect after `retry_after_ms` (or, if 0, after exponential backoff with
    /// full jitter); unacknowledged data is retransmitted.
    Retry,
    /// Class 0x02: credentials, identity or version are not accepted. Do not reconnect with the same `HELLO`;
    /// change the configuration (new token, other version) first.
    Reconfigure,
    /// Class 0x03: the device broke the protocol. Reconnect with backoff and report the fault; a device that gets
    /// the same error for the same retransmitted frame twice discards that frame.
    FixDevice,
}

macro_rules! codes {
    ($ty:ident { $($(#[$doc:meta])* $name:ident = $value:expr;)* }) => {
        impl $ty {
            $($(#[$doc])* pub const $name: $ty = $ty($value);)*

            /// The code's name, or `None` for a code this version does not define.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($value => Some(stringify!($name)),)*
                    _ => None,
                }
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(name) => f.write_str(name),
                    None => write!(f, "{}(0x{:x})", stringify!($ty), self.0),
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    };
}

codes!(ErrorCode {
    /// The server is at a connection or handshake limit.
    OVERLOADED = 0x0101;
    /// The device sent faster than its allowed rate or window.
    RATE_LIMITED = 0x0102;
    /// TLS, upgrade and `HELLO` did not complete within the handshake deadline.
    HANDSHAKE_TIMEOUT = 0x0103;
    /// Nothing arrived within the keepalive window.
    KEEPALIVE_TIMEOUT = 0x0104;
    /// The device did not read what the server sent, and its send queue filled.
    SLOW_CONSUMER = 0x0105;
    /// An internal server fault.
    INTERNAL = 0x0106;
    /// No application server can take the device's data now.
    UNAVAILABLE = 0x0107;
    /// The credential is not valid for this thing.
    AUTH_FAILED = 0x0201;
    /// The token's expiry has passed.
    TOKEN_EXPIRED = 0x0202;
    /// The token or thing has been revoked.
    REVOKED = 0x0203;
    /// The thing name is not allowed (unknown thing without auto-provisioning, or not the certificate's name).
    THING_NOT_ALLOWED = 0x0204;
    /// No protocol version is supported by both sides.
    UNSUPPORTED_VERSION = 0x0205;
    /// A frame could not be decoded.
    MALFORMED_FRAME = 0x0301;
    /// A frame is not allowed in the session's state (data before `HELLO`, a second `HELLO`).
    UNEXPECTED_FRAME = 0x0302;
    /// A frame is longer than the negotiated maximum.
    FRAME_TOO_LARGE = 0x0303;
    /// A data frame's sequence number or an `ACK` is out of order.
    SEQUENCE_ERROR = 0x0304;
    /// A batch, string, collection or nesting limit was exceeded.
    LIMIT_EXCEEDED = 0x0305;
});

impl ErrorCode {
    /// What a device must do on this code; unknown classes are treated as [`Action::Retry`].
    pub fn action(self) -> Action {
        match self.0 >> 8 {
            0x02 => Action::Reconfigure,
            0x03 => Action::FixDevice,
            _ => Action::Retry,
        }
    }
}

/// Reason of a `GOAWAY` frame (`docs/PROTOCOL.md` §5.10).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct GoawayReason(pub u8);

codes!(GoawayReason {
    /// The server is shutting down or restarting; reconnect after the hint, to any address of the service.
    DRAINING = 1;
    /// A newer session for the same thing was opened on another connection; wait at least the hint, then back off
    /// exponentially (two clients configured with the same thing name would otherwise take it from each other).
    REPLACED = 2;
    /// The server asks the device to move for balance; reconnect after the hint.
    REBALANCE = 3;
});

/// Service error code in a failed `SERVICE_RESPONSE` (`docs/PROTOCOL.md` §5.6).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceErrorCode(pub u16);

codes!(ServiceErrorCode {
    /// No service of that name.
    NOT_FOUND = 1;
    /// The parameters do not fit the service.
    INVALID_PARAMS = 2;
    /// The service ran and failed.
    FAILED = 3;
    /// No result within the request's timeout.
    TIMEOUT = 4;
    /// The implementer is not reachable (device offline).
    UNAVAILABLE = 5;
    /// The implementer is busy; retry later.
    BUSY = 6;
});

/// Quality of a property value, as industrial data sources report it (`docs/PROTOCOL.md` §4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Quality {
    /// The value is valid.
    #[default]
    Good = 0,
    /// The value may be stale or inaccurate.
    Uncertain = 1,
    /// The value is not valid (sensor fault, out of range).
    Bad = 2,
}

impl Quality {
    /// Quality from its wire byte, `None` for a byte the protocol does not define.
    pub fn from_u8(byte: u8) -> Option<Quality> {
        match byte {
            0 => Some(Quality::Good),
            1 => Some(Quality::Uncertain),
            2 => Some(Quality::Bad),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_follow_class() {
        assert_eq!(ErrorCode::OVERLOADED.action(), Action::Retry);
        assert_eq!(ErrorCode::AUTH_FAILED.action(), Action::Reconfigure);
        assert_eq!(ErrorCode::MALFORMED_FRAME.action(), Action::FixDevice);
        assert_eq!(ErrorCode(0x02ff).action(), Action::Reconfigure);
        assert_eq!(ErrorCode(0x7777).action(), Action::Retry);
    }

    #[test]
    fn unknown_codes_print_their_number() {
        assert_eq!(ErrorCode::RATE_LIMITED.to_string(), "RATE_LIMITED");
        assert_eq!(ErrorCode(0x0999).to_string(), "ErrorCode(0x999)");
        assert_eq!(GoawayReason(9).name(), None);
    }
}
