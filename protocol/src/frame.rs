//! Device frames: what a device and the server exchange (`docs/PROTOCOL.md` §5).
//!
//! A frame is one type byte then the type's fields. On WSS one frame is one binary WebSocket message; on QUIC frames
//! are length-prefixed on one bidirectional stream ([`crate::stream`]). Decoding takes the whole frame as `Bytes`
//! and hands strings and payloads out as slices of it.

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use crate::codes::{ErrorCode, GoawayReason, Quality, ServiceErrorCode};
use crate::error::DecodeError;
use crate::limits::Limits;
use crate::value::Value;
use crate::varint;
use crate::wire::{Reader, len_prefixed_len, put_len_prefixed};

/// Largest timestamp, in milliseconds since the Unix epoch (`docs/PROTOCOL.md` §4.2).
pub const MAX_TIMESTAMP: u64 = i64::MAX as u64;

/// Frame type bytes (`docs/PROTOCOL.md` §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum FrameType {
    Hello = 0x01,
    Welcome = 0x02,
    Properties = 0x03,
    Event = 0x04,
    ServiceRequest = 0x05,
    ServiceResponse = 0x06,
    Ack = 0x07,
    Ping = 0x08,
    Pong = 0x09,
    Goaway = 0x0a,
    Error = 0x0b,
}

impl FrameType {
    /// The type of a frame type byte.
    pub fn from_u8(byte: u8) -> Result<FrameType, DecodeError> {
        Ok(match byte {
            0x01 => FrameType::Hello,
            0x02 => FrameType::Welcome,
            0x03 => FrameType::Properties,
            0x04 => FrameType::Event,
            0x05 => FrameType::ServiceRequest,
            0x06 => FrameType::ServiceResponse,
            0x07 => FrameType::Ack,
            0x08 => FrameType::Ping,
            0x09 => FrameType::Pong,
            0x0a => FrameType::Goaway,
            0x0b => FrameType::Error,
            other => return Err(DecodeError::UnknownFrameType(other)),
        })
    }

    /// The frame's name as the specification writes it.
    pub fn name(self) -> &'static str {
        match self {
            FrameType::Hello => "HELLO",
            FrameType::Welcome => "WELCOME",
            FrameType::Properties => "PROPERTIES",
            FrameType::Event => "EVENT",
            FrameType::ServiceRequest => "SERVICE_REQUEST",
            FrameType::ServiceResponse => "SERVICE_RESPONSE",
            FrameType::Ack => "ACK",
            FrameType::Ping => "PING",
            FrameType::Pong => "PONG",
            FrameType::Goaway => "GOAWAY",
            FrameType::Error => "ERROR",
        }
    }

    /// Data frames carry a sequence number first and are acknowledged (`docs/PROTOCOL.md` §3.3).
    pub fn is_data(self) -> bool {
        matches!(
            self,
            FrameType::Properties
                | FrameType::Event
                | FrameType::ServiceRequest
                | FrameType::ServiceResponse
        )
    }
}

/// How a device proves its identity in `HELLO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// No credential in the frame: the TLS client certificate names the thing (mTLS).
    None,
    /// A signed device token.
    Token(Bytes),
}

/// `HELLO` (device → server): opens a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version the device speaks.
    pub min_version: u8,
    /// Highest protocol version the device speaks.
    pub max_version: u8,
    /// The thing this device is.
    pub thing: ByteString,
    pub credential: Credential,
    /// Keepalive the device asks for, in seconds; 0 lets the server choose.
    pub keepalive_secs: u16,
    /// Random number the device chose when it last started numbering its data frames from 1 (first boot, or after
    /// losing its stored counter). The server deduplicates data by (thing, incarnation, sequence number), so a
    /// device that restarts its numbering is not mistaken for a retransmission.
    pub incarnation: u64,
    /// Sequence number of the device's oldest unacknowledged data frame (its next new one if none): the server
    /// expects data frames from here on.
    pub resume_seq: u64,
}

/// `WELCOME` (server → device): the session is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The version chosen: the highest both sides speak.
    pub version: u8,
    /// The server's id for this session (for logs and support).
    pub session_id: u64,
    /// The keepalive both sides use, in seconds.
    pub keepalive_secs: u16,
    /// Largest frame the server accepts.
    pub max_frame: u32,
    /// Most updates the server accepts in one `PROPERTIES` frame.
    pub max_batch: u32,
    /// Most data frames the device may have unacknowledged at once.
    pub window: u32,
}

/// One property value in a `PROPERTIES` frame.
#[derive(Debug, Clone, PartialEq)]
pub struct PropertyUpdate {
    pub name: ByteString,
    /// When the device measured the value, ms since the Unix epoch.
    pub timestamp_ms: u64,
    pub quality: Quality,
    pub value: Value,
}

/// `PROPERTIES` (both ways): a batch of property values. From a device: its readings; from the server: writes.
#[derive(Debug, Clone, PartialEq)]
pub struct Properties {
    pub seq: u64,
    pub updates: Vec<PropertyUpdate>,
}

/// `EVENT` (both ways): something happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub seq: u64,
    pub timestamp_ms: u64,
    pub name: ByteString,
    pub payload: Value,
}

/// `SERVICE_REQUEST` (both ways): call a service the other side implements.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRequest {
    pub seq: u64,
    /// Chosen by the caller, unique among its outstanding calls; the response carries it back.
    pub call_id: u64,
    /// How long the caller waits for the response, in ms; 0 means the caller's default.
    pub timeout_ms: u32,
    pub service: ByteString,
    pub params: Value,
}

/// Outcome of a service call.
#[derive(Debug, Clone, PartialEq)]
pub enum ServiceResult {
    Ok(Value),
    Err { code: ServiceErrorCode, message: ByteString },
}

/// `SERVICE_RESPONSE` (both ways): the answer to a `SERVICE_REQUEST`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceResponse {
    pub seq: u64,
    pub call_id: u64,
    pub result: ServiceResult,
}

/// `GOAWAY` (server → device): the server is ending the session on purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Goaway {
    pub reason: GoawayReason,
    /// Wait at least this long before reconnecting, in ms, plus random jitter of up to the same again.
    pub reconnect_after_ms: u32,
    pub message: ByteString,
}

/// `ERROR` (both ways): the session ends with this error; the sender closes the connection after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    /// For retryable codes, wait at least this long before reconnecting, in ms; 0 means use backoff.
    pub retry_after_ms: u32,
    pub message: ByteString,
}

/// A device frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    Properties(Properties),
    Event(Event),
    ServiceRequest(ServiceRequest),
    ServiceResponse(ServiceResponse),
    /// Cumulative acknowledgement: every data frame up to and including `seq` is done.
    Ack {
        seq: u64,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    Goaway(Goaway),
    Error(ErrorFrame),
}

const CREDENTIAL_NONE: u8 = 0;
const CREDENTIAL_TOKEN: u8 = 1;
const RESULT_OK: u8 = 0;
const RESULT_ERR: u8 = 1;

impl Frame {
    /// The frame's type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::Welcome(_) => FrameType::Welcome,
            Frame::Properties(_) => FrameType::Properties,
            Frame::Event(_) => FrameType::Event,
            Frame::ServiceRequest(_) => FrameType::ServiceRequest,
            Frame::ServiceResponse(_) => FrameType::ServiceResponse,
            Frame::Ack { .. } => FrameType::Ack,
            Frame::Ping { .. } => FrameType::Ping,
            Frame::Pong { .. } => FrameType::Pong,
            Frame::Goaway(_) => FrameType::Goaway,
            Frame::Error(_) => FrameType::Error,
        }
    }

    /// The sequence number of a data frame.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Frame::Properties(f) => Some(f.seq),
            Frame::Event(f) => Some(f.seq),
            Frame::ServiceRequest(f) => Some(f.seq),
            Frame::ServiceResponse(f) => Some(f.seq),
            _ => None,
        }
    }

    /// Sets the sequence number of a data frame; other frames are unchanged.
    pub fn set_seq(&mut self, seq: u64) {
        match self {
            Frame::Properties(f) => f.seq = seq,
            Frame::Event(f) => f.seq = seq,
            Frame::ServiceRequest(f) => f.seq = seq,
            Frame::ServiceResponse(f) => f.seq = seq,
            _ => {}
        }
    }

    /// Number of bytes the frame takes on the wire.
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            Frame::Hello(h) => {
                2 + len_prefixed_len(h.thing.as_bytes())
                    + match &h.credential {
                        Credential::None => 1,
                        Credential::Token(t) => 1 + len_prefixed_len(t),
                    }
                    + varint::encoded_len(h.keepalive_secs.into())
                    + varint::encoded_len(h.incarnation)
                    + varint::encoded_len(h.resume_seq)
            }
            Frame::Welcome(w) => {
                1 + varint::encoded_len(w.session_id)
                    + varint::encoded_len(w.keepalive_secs.into())
                    + varint::encoded_len(w.max_frame.into())
                    + varint::encoded_len(w.max_batch.into())
                    + varint::encoded_len(w.window.into())
            }
            Frame::Properties(p) => {
                let base = base_timestamp(&p.updates);
                varint::encoded_len(p.seq)
                    + varint::encoded_len(p.updates.len() as u64)
                    + varint::encoded_len(base)
                    + p.updates
                        .iter()
                        .map(|u| {
                            len_prefixed_len(u.name.as_bytes())
                                + varint::encoded_len(timestamp_delta(base, u.timestamp_ms))
                                + 1
                                + u.value.encoded_len()
                        })
                        .sum::<usize>()
            }
            Frame::Event(e) => {
                varint::encoded_len(e.seq)
                    + varint::encoded_len(e.timestamp_ms.min(MAX_TIMESTAMP))
                    + len_prefixed_len(e.name.as_bytes())
                    + e.payload.encoded_len()
            }
            Frame::ServiceRequest(r) => {
                varint::encoded_len(r.seq)
                    + varint::encoded_len(r.call_id)
                    + varint::encoded_len(r.timeout_ms.into())
                    + len_prefixed_len(r.service.as_bytes())
                    + r.params.encoded_len()
            }
            Frame::ServiceResponse(r) => {
                varint::encoded_len(r.seq)
                    + varint::encoded_len(r.call_id)
                    + 1
                    + match &r.result {
                        ServiceResult::Ok(v) => v.encoded_len(),
                        ServiceResult::Err { code, message } => {
                            varint::encoded_len(code.0.into())
                                + len_prefixed_len(message.as_bytes())
                        }
                    }
            }
            Frame::Ack { seq } => varint::encoded_len(*seq),
            Frame::Ping { nonce } | Frame::Pong { nonce } => varint::encoded_len(*nonce),
            Frame::Goaway(g) => {
                1 + varint::encoded_len(g.reconnect_after_ms.into())
                    + len_prefixed_len(g.message.as_bytes())
            }
            Frame::Error(e) => {
                varint::encoded_len(e.code.0.into())
                    + varint::encoded_len(e.retry_after_ms.into())
                    + len_prefixed_len(e.message.as_bytes())
            }
        }
    }

    /// Appends the frame's encoding to `dst`.
    pub fn encode(&self, dst: &mut impl BufMut) {
        dst.put_u8(self.frame_type() as u8);
        match self {
            Frame::Hello(h) => {
                dst.put_u8(h.min_version);
                dst.put_u8(h.max_version);
                put_len_prefixed(dst, h.thing.as_bytes());
                match &h.credential {
                    Credential::None => dst.put_u8(CREDENTIAL_NONE),
                    Credential::Token(t) => {
                        dst.put_u8(CREDENTIAL_TOKEN);
                        put_len_prefixed(dst, t);
                    }
                }
                varint::put(dst, h.keepalive_secs.into());
                varint::put(dst, h.incarnation);
                varint::put(dst, h.resume_seq);
            }
            Frame::Welcome(w) => {
                dst.put_u8(w.version);
                varint::put(dst, w.session_id);
                varint::put(dst, w.keepalive_secs.into());
                varint::put(dst, w.max_frame.into());
                varint::put(dst, w.max_batch.into());
                varint::put(dst, w.window.into());
            }
            Frame::Properties(p) => {
                let base = base_timestamp(&p.updates);
                varint::put(dst, p.seq);
                varint::put(dst, p.updates.len() as u64);
                varint::put(dst, base);
                for u in &p.updates {
                    put_len_prefixed(dst, u.name.as_bytes());
                    varint::put(dst, timestamp_delta(base, u.timestamp_ms));
                    dst.put_u8(u.quality as u8);
                    u.value.encode(dst);
                }
            }
            Frame::Event(e) => {
                varint::put(dst, e.seq);
                varint::put(dst, e.timestamp_ms.min(MAX_TIMESTAMP));
                put_len_prefixed(dst, e.name.as_bytes());
                e.payload.encode(dst);
            }
            Frame::ServiceRequest(r) => {
                varint::put(dst, r.seq);
                varint::put(dst, r.call_id);
                varint::put(dst, r.timeout_ms.into());
                put_len_prefixed(dst, r.service.as_bytes());
                r.params.encode(dst);
            }
            Frame::ServiceResponse(r) => {
                varint::put(dst, r.seq);
                varint::put(dst, r.call_id);
                match &r.result {
                    ServiceResult::Ok(v) => {
                        dst.put_u8(RESULT_OK);
                        v.encode(dst);
                    }
                    ServiceResult::Err { code, message } => {
                        dst.put_u8(RESULT_ERR);
                        varint::put(dst, code.0.into());
                        put_len_prefixed(dst, message.as_bytes());
                    }
                }
            }
            Frame::Ack { seq } => varint::put(dst, *seq),
            Frame::Ping { nonce } | Frame::Pong { nonce } => varint::put(dst, *nonce),
            Frame::Goaway(g) => {
                dst.put_u8(g.reason.0);
                varint::put(dst, g.reconnect_after_ms.into());
                put_len_prefixed(dst, g.message.as_bytes());
            }
            Frame::Error(e) => {
                varint::put(dst, e.code.0.into());
                varint::put(dst, e.retry_after_ms.into());
                put_len_prefixed(dst, e.message.as_bytes());
            }
        }
    }

    /// The frame's encoding as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut buf);
        buf.freeze()
    }

    /// Decodes one whole frame. Strings and payloads in the result are slices of `frame`.
    pub fn decode(frame: Bytes, limits: &Limits) -> Result<Frame, DecodeError> {
        // §7: the frame limit applies to the whole frame
        if frame.len() > limits.max_frame {
            return Err(DecodeError::TooLong {
                what: "frame",
                len: frame.len() as u64,
                limit: limits.max_frame,
            });
        }
        let mut r = Reader::new(frame);
        let frame = match FrameType::from_u8(r.u8()?)? {
            FrameType::Hello => Frame::Hello(Hello {
                min_version: r.u8()?,
                max_version: r.u8()?,
                thing: r.name("thing name", limits.max_name)?,
                credential: match r.u8()? {
                    CREDENTIAL_NONE => Credential::None,
                    CREDENTIAL_TOKEN => {
                        let token = r.len_prefixed("credential", limits.max_string)?;
                        if token.is_empty() {
                            return Err(DecodeError::Empty { what: "credential" });
                        }
                        Credential::Token(token)
                    }
                    other => {
                        return Err(DecodeError::InvalidField {
                            what: "credential kind",
                            value: other.into(),
                        });
                    }
                },
                keepalive_secs: r.varint_as("keepalive")?,
                incarnation: r.varint()?,
                // §5.1: sequence numbers start at 1
                resume_seq: match r.varint()? {
                    0 => {
                        return Err(DecodeError::InvalidField { what: "resume_seq", value: 0 });
                    }
                    seq => seq,
                },
            }),
            FrameType::Welcome => Frame::Welcome(Welcome {
                version: r.u8()?,
                session_id: r.varint()?,
                keepalive_secs: r.varint_as("keepalive")?,
                max_frame: r.varint_as("max_frame")?,
                max_batch: r.varint_as("max_batch")?,
                window: r.varint_as("window")?,
            }),
            FrameType::Properties => {
                let seq = r.varint()?;
                // an update is at least: name length, one name byte, delta, quality, value tag
                let count = r.count("batch", limits.max_batch, 5)?;
                let base = timestamp(r.varint()?)?;
                let mut updates = Vec::with_capacity(count);
                for _ in 0..count {
                    let name = r.name("property name", limits.max_name)?;
                    let delta = varint::unzigzag(r.varint()?);
                    // §4.2: base + delta must lie in 0..=MAX_TIMESTAMP
                    let sum = i128::from(base) + i128::from(delta);
                    let timestamp_ms = u64::try_from(sum)
                        .ok()
                        .filter(|t| *t <= MAX_TIMESTAMP)
                        .ok_or(DecodeError::OutOfRange {
                            what: "timestamp",
                            value: sum.clamp(0, u64::MAX.into()) as u64,
                        })?;
                    let quality = r.u8()?;
                    let quality = Quality::from_u8(quality).ok_or(DecodeError::InvalidField {
                        what: "quality",
                        value: quality.into(),
                    })?;
                    let value = Value::read(&mut r, limits, 0)?;
                    updates.push(PropertyUpdate { name, timestamp_ms, quality, value });
                }
                Frame::Properties(Properties { seq, updates })
            }
            FrameType::Event => Frame::Event(Event {
                seq: r.varint()?,
                timestamp_ms: timestamp(r.varint()?)?,
                name: r.name("event name", limits.max_name)?,
                payload: Value::read(&mut r, limits, 0)?,
            }),
            FrameType::ServiceRequest => Frame::ServiceRequest(ServiceRequest {
                seq: r.varint()?,
                call_id: r.varint()?,
                timeout_ms: r.varint_as("timeout")?,
                service: r.name("service name", limits.max_name)?,
                params: Value::read(&mut r, limits, 0)?,
            }),
            FrameType::ServiceResponse => Frame::ServiceResponse(ServiceResponse {
                seq: r.varint()?,
                call_id: r.varint()?,
                result: match r.u8()? {
                    RESULT_OK => ServiceResult::Ok(Value::read(&mut r, limits, 0)?),
                    RESULT_ERR => ServiceResult::Err {
                        code: ServiceErrorCode(r.varint_as("service error code")?),
                        message: r.text("message", limits.max_string)?,
                    },
                    other => {
                        return Err(DecodeError::InvalidField {
                            what: "result status",
                            value: other.into(),
                        });
                    }
                },
            }),
            FrameType::Ack => Frame::Ack { seq: r.varint()? },
            FrameType::Ping => Frame::Ping { nonce: r.varint()? },
            FrameType::Pong => Frame::Pong { nonce: r.varint()? },
            FrameType::Goaway => Frame::Goaway(Goaway {
                reason: GoawayReason(r.u8()?),
                reconnect_after_ms: r.varint_as("reconnect hint")?,
                message: r.text("message", limits.max_string)?,
            }),
            FrameType::Error => Frame::Error(ErrorFrame {
                code: ErrorCode(r.varint_as("error code")?),
                retry_after_ms: r.varint_as("retry hint")?,
                message: r.text("message", limits.max_string)?,
            }),
        };
        r.finish()?;
        Ok(frame)
    }
}

/// The type and sequence number at the front of an encoded data frame, read without decoding the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    pub frame_type: FrameType,
    pub seq: u64,
    /// Bytes the type and sequence number take; the frame's other fields follow.
    pub len: usize,
}

impl DataHeader {
    /// Reads the header of an encoded data frame; `None` if the frame is not a data frame.
    pub fn peek(frame: &[u8]) -> Result<Option<DataHeader>, DecodeError> {
        let (&first, rest) = frame.split_first().ok_or(DecodeError::Truncated)?;
        let frame_type = FrameType::from_u8(first)?;
        if !frame_type.is_data() {
            return Ok(None);
        }
        match varint::peek(rest)? {
            varint::Peek::Complete(seq, n) => Ok(Some(DataHeader { frame_type, seq, len: 1 + n })),
            varint::Peek::Incomplete => Err(DecodeError::Truncated),
        }
    }

    /// A copy of an encoded data frame with its sequence number replaced; the other fields are copied unchanged.
    pub fn restamp(frame: &[u8], seq: u64) -> Result<Bytes, DecodeError> {
        let header = DataHeader::peek(frame)?.ok_or(DecodeError::InvalidField {
            what: "data frame type",
            value: frame.first().copied().unwrap_or_default().into(),
        })?;
        let body = &frame[header.len..];
        let mut out = BytesMut::with_capacity(1 + varint::encoded_len(seq) + body.len());
        out.put_u8(header.frame_type as u8);
        varint::put(&mut out, seq);
        out.put_slice(body);
        Ok(out.freeze())
    }
}

/// The base timestamp of a batch: its first update's, so that deltas stay short.
fn base_timestamp(updates: &[PropertyUpdate]) -> u64 {
    updates.first().map_or(0, |u| u.timestamp_ms.min(MAX_TIMESTAMP))
}

/// Zigzag-encoded difference of an update's timestamp from the base; both are at most `MAX_TIMESTAMP`, so the
/// difference fits an `i64`.
fn timestamp_delta(base: u64, timestamp_ms: u64) -> u64 {
    let t = timestamp_ms.min(MAX_TIMESTAMP) as i64;
    varint::zigzag(t - base as i64)
}

fn timestamp(value: u64) -> Result<u64, DecodeError> {
    if value > MAX_TIMESTAMP {
        return Err(DecodeError::OutOfRange { what: "timestamp", value });
    }
    Ok(value)
}
