//! Decoding limits (`docs/PROTOCOL.md` §7). Every declared length and count is checked against these before
//! anything of that size is allocated or waited for.

/// Limits a decoder enforces. The defaults are the protocol's; a server may lower them (and tells the device its
/// `max_frame` and `max_batch` in `WELCOME`) or raise them by configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame, in bytes, excluding a stream length prefix.
    pub max_frame: usize,
    /// Most property updates in one `PROPERTIES` frame.
    pub max_batch: usize,
    /// Longest name (thing, property, event, service, map key), in bytes.
    pub max_name: usize,
    /// Longest string or bytes value, credential or message, in bytes.
    pub max_string: usize,
    /// Most elements in one list or map value.
    pub max_collection: usize,
    /// Deepest nesting of lists and maps; a scalar at the top level has depth 0.
    pub max_depth: usize,
}

impl Limits {
    /// The protocol's default limits.
    pub const DEFAULT: Limits = Limits {
        max_frame: 64 * 1024,
        max_batch: 256,
        max_name: 256,
        max_string: 16 * 1024,
        max_collection: 1024,
        max_depth: 16,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}
