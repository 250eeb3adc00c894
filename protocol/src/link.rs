//! The gateway ↔ foundation link format (`docs/PROTOCOL.md` §8).
//!
//! A link is one TCP connection (mutual TLS when the pool has credentials) carrying length-prefixed link frames both ways, many per write. A
//! device frame travels inside `UPSTREAM` / `DOWNSTREAM` behind a short routing header, its bytes unchanged, so the
//! gateway forwards without re-encoding.

use std::net::{IpAddr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;

use crate::codes::ErrorCode;
use crate::error::DecodeError;
use crate::limits::Limits;
use crate::stream;
use crate::varint;
use crate::wire::{Reader, len_prefixed_len, put_len_prefixed};

/// Version of the link format.
pub const LINK_VERSION: u8 = 6;

/// Bytes a routing header adds at most to a device frame: type, session id, incarnation, thing name at its length
/// limit.
pub fn max_overhead(limits: &Limits) -> usize {
    1 + varint::MAX_LEN * 3 + limits.max_name
}

/// The longest `ROUTES` frame (type and fields): [`MAX_ROUTED_WORKERS`] ids at the name limit and a primary for
/// every partition.
pub fn max_routes_len(limits: &Limits) -> usize {
    let name = varint::encoded_len(limits.max_name as u64) + limits.max_name;
    let index = varint::encoded_len(MAX_ROUTED_WORKERS as u64);
    1 + varint::MAX_LEN
        + varint::encoded_len(MAX_ROUTED_WORKERS as u64)
        + MAX_ROUTED_WORKERS * name
        + varint::encoded_len(crate::partition::PARTITIONS as u64)
        + crate::partition::PARTITIONS * index
}

/// Bytes of one `WORKERS` address: the family byte, an IPv6 address, the port.
const MAX_ADDRESS_LEN: usize = 1 + 16 + 2;

/// The longest `WORKERS` frame (type and fields): [`MAX_ROUTED_WORKERS`] ids at the name limit, each with an IPv6
/// link address.
pub fn max_workers_len(limits: &Limits) -> usize {
    let name = varint::encoded_len(limits.max_name as u64) + limits.max_name;
    1 + varint::encoded_len(MAX_ROUTED_WORKERS as u64)
        + MAX_ROUTED_WORKERS * (name + MAX_ADDRESS_LEN)
}

/// The longest link frame (type and fields) a receiver with `limits` accepts (§8.1): a device frame at its limit
/// behind a routing header, the longest `ROUTES` or the longest `WORKERS`, whichever is longest. It does not depend
/// on `max_frame` alone, so a gateway with small device frames still takes a worker's `ROUTES` and `WORKERS`.
pub fn max_link_frame(limits: &Limits) -> usize {
    (limits.max_frame + max_overhead(limits))
        .max(max_routes_len(limits))
        .max(max_workers_len(limits))
}

/// Link frame type bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum LinkType {
    Hello = 0x01,
    Welcome = 0x02,
    Open = 0x03,
    Close = 0x04,
    Upstream = 0x05,
    Stored = 0x06,
    Downstream = 0x07,
    Undeliverable = 0x08,
    Ping = 0x09,
    Pong = 0x0a,
    Load = 0x0b,
    Goaway = 0x0c,
    Rejected = 0x0d,
    Bound = 0x0e,
    Delivered = 0x0f,
    Routes = 0x10,
    StoredRun = 0x11,
    Workers = 0x12,
}

impl LinkType {
    fn from_u8(byte: u8) -> Result<LinkType, DecodeError> {
        Ok(match byte {
            0x01 => LinkType::Hello,
            0x02 => LinkType::Welcome,
            0x03 => LinkType::Open,
            0x04 => LinkType::Close,
            0x05 => LinkType::Upstream,
            0x06 => LinkType::Stored,
            0x07 => LinkType::Downstream,
            0x08 => LinkType::Undeliverable,
            0x09 => LinkType::Ping,
            0x0a => LinkType::Pong,
            0x0b => LinkType::Load,
            0x0c => LinkType::Goaway,
            0x0d => LinkType::Rejected,
            0x0e => LinkType::Bound,
            0x0f => LinkType::Delivered,
            0x10 => LinkType::Routes,
            0x11 => LinkType::StoredRun,
            0x12 => LinkType::Workers,
            other => return Err(DecodeError::UnknownFrameType(other)),
        })
    }
}

/// How the device reached the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Transport {
    Wss = 1,
    Quic = 2,
}

impl Transport {
    /// The transport of a byte as `OPEN` carries it.
    pub fn from_u8(byte: u8) -> Option<Transport> {
        match byte {
            1 => Some(Transport::Wss),
            2 => Some(Transport::Quic),
            _ => None,
        }
    }

    /// `wss` or `quic`.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Wss => "wss",
            Transport::Quic => "quic",
        }
    }
}

/// A link frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkFrame {
    /// Gateway → worker, first on a link.
    Hello {
        version: u8,
        gateway_id: ByteString,
        link_index: u32,
    },
    /// Worker → gateway, the reply to `Hello`.
    Welcome {
        version: u8,
        worker_id: ByteString,
    },
    /// Gateway → worker: a device session was authenticated (the thing's binding is this gateway and session).
    Open {
        session_id: u64,
        thing: ByteString,
        transport: Transport,
        incarnation: u64,
        resume_seq: u64,
    },
    /// Gateway → worker: the session ended; `code` says why (0: the device closed normally).
    Close {
        session_id: u64,
        thing: ByteString,
        code: ErrorCode,
    },
    /// Gateway → worker: a device frame from a session, unchanged. `incarnation` is the session's, from its
    /// `HELLO`, so that any worker can order and deduplicate the frame without having seen the `OPEN`.
    Upstream {
        session_id: u64,
        incarnation: u64,
        thing: ByteString,
        frame: Bytes,
    },
    /// Worker → gateway: the data frame `seq` of a session is durably handled; the gateway may acknowledge it.
    Stored {
        session_id: u64,
        seq: u64,
    },
    /// Worker → gateway: a device frame for a session. A data frame's sequence number is set by the gateway.
    /// `reference` is the worker's, returned in `Undeliverable` if the frame cannot be delivered.
    Downstream {
        session_id: u64,
        reference: u64,
        frame: Bytes,
    },
    /// Gateway → worker: a `Downstream` frame was not delivered.
    Undeliverable {
        session_id: u64,
        reference: u64,
        code: ErrorCode,
    },
    /// Either way: liveness probe, answered by `Pong` with the same nonce.
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// Worker → gateway: while `saturated`, send new device frames to other links.
    Load {
        saturated: bool,
    },
    /// Either way: the sender is draining; send nothing new on this link, finish what is in flight.
    Goaway,
    /// Worker → gateway: the data frame `seq` of a session cannot be handled (malformed content, a type mismatch
    /// with the thing model); the gateway ends the session with an `ERROR` carrying `code`.
    Rejected {
        session_id: u64,
        seq: u64,
        code: ErrorCode,
    },
    /// Worker → gateway: the `OPEN` (`open`) or `CLOSE` of a session is handled (stored in the ring, or refused
    /// for good); the gateway stops retrying it.
    Bound {
        session_id: u64,
        open: bool,
    },
    /// Gateway → worker: the device acknowledged the `PROPERTIES` frame that a `Downstream` with this non-zero
    /// `reference` carried (a property write reached the device's application).
    Delivered {
        session_id: u64,
        reference: u64,
    },
    /// Worker → gateway: the primary of each partition in the committed partition table `version`, so that the
    /// gateway sends a thing's frames to a link of the worker that stores them first. `primaries[p]` is for
    /// partition `p` (see [`crate::partition`]): an index into `workers`, or `None` when the partition has no known
    /// primary; partitions past the end of `primaries` have none either.
    Routes {
        version: u64,
        workers: Vec<ByteString>,
        primaries: Vec<Option<u16>>,
    },
    /// Worker → gateway: the data frames `first..=last` of a session are all durably handled, as one `Stored` for
    /// each would say. At most [`MAX_STORED_RUN`] frames.
    StoredRun {
        session_id: u64,
        first: u64,
        last: u64,
    },
    /// Worker → gateway: the workers of the pool as the sender's membership sees them, each with the address its
    /// links are opened to, so that a gateway links to workers its configuration does not name. At most
    /// [`MAX_ROUTED_WORKERS`].
    Workers {
        workers: Vec<(ByteString, SocketAddr)>,
    },
}

/// Most data frames one `STORED_RUN` covers.
pub const MAX_STORED_RUN: u64 = 65_536;

/// Most workers a `ROUTES` frame names.
pub const MAX_ROUTED_WORKERS: usize = 256;

impl LinkFrame {
    fn link_type(&self) -> LinkType {
        match self {
            LinkFrame::Hello { .. } => LinkType::Hello,
            LinkFrame::Welcome { .. } => LinkType::Welcome,
            LinkFrame::Open { .. } => LinkType::Open,
            LinkFrame::Close { .. } => LinkType::Close,
            LinkFrame::Upstream { .. } => LinkType::Upstream,
            LinkFrame::Stored { .. } => LinkType::Stored,
            LinkFrame::Downstream { .. } => LinkType::Downstream,
            LinkFrame::Undeliverable { .. } => LinkType::Undeliverable,
            LinkFrame::Ping { .. } => LinkType::Ping,
            LinkFrame::Pong { .. } => LinkType::Pong,
            LinkFrame::Load { .. } => LinkType::Load,
            LinkFrame::Goaway => LinkType::Goaway,
            LinkFrame::Rejected { .. } => LinkType::Rejected,
            LinkFrame::Bound { .. } => LinkType::Bound,
            LinkFrame::Delivered { .. } => LinkType::Delivered,
            LinkFrame::Routes { .. } => LinkType::Routes,
            LinkFrame::StoredRun { .. } => LinkType::StoredRun,
            LinkFrame::Workers { .. } => LinkType::Workers,
        }
    }

    /// Bytes the frame takes, without its length prefix.
    pub fn encoded_len(&self) -> usize {
        use varint::encoded_len as v;
        1 + match self {
            LinkFrame::Hello { gateway_id, link_index, .. } => {
                1 + len_prefixed_len(gateway_id.as_bytes()) + v((*link_index).into())
            }
            LinkFrame::Welcome { worker_id, .. } => 1 + len_prefixed_len(worker_id.as_bytes()),
            LinkFrame::Open { session_id, thing, incarnation, resume_seq, .. } => {
                v(*session_id)
                    + len_prefixed_len(thing.as_bytes())
                    + 1
                    + v(*incarnation)
                    + v(*resume_seq)
            }
            LinkFrame::Close { session_id, thing, code } => {
                v(*session_id) + len_prefixed_len(thing.as_bytes()) + v(code.0.into())
            }
            LinkFrame::Upstream { session_id, incarnation, thing, frame } => {
                v(*session_id) + v(*incarnation) + len_prefixed_len(thing.as_bytes()) + frame.len()
            }
            LinkFrame::Stored { session_id, seq } => v(*session_id) + v(*seq),
            LinkFrame::Downstream { session_id, reference, frame } => {
                v(*session_id) + v(*reference) + frame.len()
            }
            LinkFrame::Undeliverable { session_id, reference, code } => {
                v(*session_id) + v(*reference) + v(code.0.into())
            }
            LinkFrame::Ping { nonce } | LinkFrame::Pong { nonce } => v(*nonce),
            LinkFrame::Load { .. } => 1,
            LinkFrame::Goaway => 0,
            LinkFrame::Rejected { session_id, seq, code } => {
                v(*session_id) + v(*seq) + v(code.0.into())
            }
            LinkFrame::Bound { session_id, .. } => v(*session_id) + 1,
            LinkFrame::Delivered { session_id, reference } => v(*session_id) + v(*reference),
            LinkFrame::Routes { version, workers, primaries } => {
                v(*version)
                    + v(workers.len() as u64)
                    + workers.iter().map(|w| len_prefixed_len(w.as_bytes())).sum::<usize>()
                    + v(primaries.len() as u64)
                    + primaries.iter().map(|p| v(route_index(*p))).sum::<usize>()
            }
            LinkFrame::StoredRun { session_id, first, last } => {
                v(*session_id) + v(*first) + v(*last)
            }
            LinkFrame::Workers { workers } => {
                v(workers.len() as u64)
                    + workers
                        .iter()
                        .map(|(id, addr)| len_prefixed_len(id.as_bytes()) + address_len(addr))
                        .sum::<usize>()
            }
        }
    }

    /// Appends the frame without its length prefix.
    pub fn encode(&self, dst: &mut impl BufMut) {
        dst.put_u8(self.link_type() as u8);
        match self {
            LinkFrame::Hello { version, gateway_id, link_index } => {
                dst.put_u8(*version);
                put_len_prefixed(dst, gateway_id.as_bytes());
                varint::put(dst, (*link_index).into());
            }
            LinkFrame::Welcome { version, worker_id } => {
                dst.put_u8(*version);
                put_len_prefixed(dst, worker_id.as_bytes());
            }
            LinkFrame::Open { session_id, thing, transport, incarnation, resume_seq } => {
                varint::put(dst, *session_id);
                put_len_prefixed(dst, thing.as_bytes());
                dst.put_u8(*transport as u8);
                varint::put(dst, *incarnation);
                varint::put(dst, *resume_seq);
            }
            LinkFrame::Close { session_id, thing, code } => {
                varint::put(dst, *session_id);
                put_len_prefixed(dst, thing.as_bytes());
                varint::put(dst, code.0.into());
            }
            LinkFrame::Upstream { session_id, incarnation, thing, frame } => {
                varint::put(dst, *session_id);
                varint::put(dst, *incarnation);
                put_len_prefixed(dst, thing.as_bytes());
                dst.put_slice(frame);
            }
            LinkFrame::Stored { session_id, seq } => {
                varint::put(dst, *session_id);
                varint::put(dst, *seq);
            }
            LinkFrame::Downstream { session_id, reference, frame } => {
                varint::put(dst, *session_id);
                varint::put(dst, *reference);
                dst.put_slice(frame);
            }
            LinkFrame::Undeliverable { session_id, reference, code } => {
                varint::put(dst, *session_id);
                varint::put(dst, *reference);
                varint::put(dst, code.0.into());
            }
            LinkFrame::Ping { nonce } | LinkFrame::Pong { nonce } => varint::put(dst, *nonce),
            LinkFrame::Load { saturated } => dst.put_u8(u8::from(*saturated)),
            LinkFrame::Goaway => {}
            LinkFrame::Rejected { session_id, seq, code } => {
                varint::put(dst, *session_id);
                varint::put(dst, *seq);
                varint::put(dst, code.0.into());
            }
            LinkFrame::Bound { session_id, open } => {
                varint::put(dst, *session_id);
                dst.put_u8(u8::from(*open));
            }
            LinkFrame::Delivered { session_id, reference } => {
                varint::put(dst, *session_id);
                varint::put(dst, *reference);
            }
            LinkFrame::Routes { version, workers, primaries } => {
                varint::put(dst, *version);
                varint::put(dst, workers.len() as u64);
                for worker in workers {
                    put_len_prefixed(dst, worker.as_bytes());
                }
                varint::put(dst, primaries.len() as u64);
                for primary in primaries {
                    varint::put(dst, route_index(*primary));
                }
            }
            LinkFrame::StoredRun { session_id, first, last } => {
                varint::put(dst, *session_id);
                varint::put(dst, *first);
                varint::put(dst, *last);
            }
            LinkFrame::Workers { workers } => {
                varint::put(dst, workers.len() as u64);
                for (id, addr) in workers {
                    put_len_prefixed(dst, id.as_bytes());
                    put_address(dst, addr);
                }
            }
        }
    }

    /// Appends the frame with its length prefix, as it goes on the link. Many frames are appended to one buffer
    /// and written with one call.
    pub fn encode_framed(&self, dst: &mut impl BufMut) {
        stream::put_len(dst, self.encoded_len());
        self.encode(dst);
    }

    /// The frame with its length prefix as one buffer.
    pub fn to_framed_bytes(&self) -> Bytes {
        let len = self.encoded_len();
        let mut buf = BytesMut::with_capacity(stream::framed_len(len));
        self.encode_framed(&mut buf);
        buf.freeze()
    }

    /// Decodes one link frame (without its length prefix). Device frames inside are slices of `frame`, not
    /// decoded: the receiver decodes them with its own limits.
    pub fn decode(frame: Bytes, limits: &Limits) -> Result<LinkFrame, DecodeError> {
        let mut r = Reader::new(frame);
        let frame = match LinkType::from_u8(r.u8()?)? {
            LinkType::Hello => LinkFrame::Hello {
                version: r.u8()?,
                gateway_id: r.name("gateway id", limits.max_name)?,
                link_index: r.varint_as("link index")?,
            },
            LinkType::Welcome => LinkFrame::Welcome {
                version: r.u8()?,
                worker_id: r.name("worker id", limits.max_name)?,
            },
            LinkType::Open => LinkFrame::Open {
                session_id: r.varint()?,
                thing: r.name("thing name", limits.max_name)?,
                transport: match r.u8()? {
                    1 => Transport::Wss,
                    2 => Transport::Quic,
                    other => {
                        return Err(DecodeError::InvalidField {
                            what: "transport",
                            value: other.into(),
                        });
                    }
                },
                incarnation: r.varint()?,
                resume_seq: match r.varint()? {
                    0 => {
                        return Err(DecodeError::InvalidField { what: "resume_seq", value: 0 });
                    }
                    seq => seq,
                },
            },
            LinkType::Close => LinkFrame::Close {
                session_id: r.varint()?,
                thing: r.name("thing name", limits.max_name)?,
                code: ErrorCode(r.varint_as("error code")?),
            },
            LinkType::Upstream => {
                let session_id = r.varint()?;
                let incarnation = r.varint()?;
                let thing = r.name("thing name", limits.max_name)?;
                let frame = device_frame(&mut r, limits)?;
                LinkFrame::Upstream { session_id, incarnation, thing, frame }
            }
            LinkType::Stored => LinkFrame::Stored { session_id: r.varint()?, seq: r.varint()? },
            LinkType::Downstream => {
                let session_id = r.varint()?;
                let reference = r.varint()?;
                LinkFrame::Downstream {
                    session_id,
                    reference,
                    frame: device_frame(&mut r, limits)?,
                }
            }
            LinkType::Undeliverable => LinkFrame::Undeliverable {
                session_id: r.varint()?,
                reference: r.varint()?,
                code: ErrorCode(r.varint_as("error code")?),
            },
            LinkType::Ping => LinkFrame::Ping { nonce: r.varint()? },
            LinkType::Pong => LinkFrame::Pong { nonce: r.varint()? },
            LinkType::Load => LinkFrame::Load {
                saturated: match r.u8()? {
                    0 => false,
                    1 => true,
                    other => {
                        return Err(DecodeError::InvalidField {
                            what: "saturated",
                            value: other.into(),
                        });
                    }
                },
            },
            LinkType::Goaway => LinkFrame::Goaway,
            LinkType::Rejected => LinkFrame::Rejected {
                session_id: r.varint()?,
                seq: r.varint()?,
                code: ErrorCode(r.varint_as("error code")?),
            },
            LinkType::Bound => LinkFrame::Bound {
                session_id: r.varint()?,
                open: match r.u8()? {
                    0 => false,
                    1 => true,
                    other => {
                        return Err(DecodeError::InvalidField {
                            what: "open",
                            value: other.into(),
                        });
                    }
                },
            },
            LinkType::Delivered => {
                LinkFrame::Delivered { session_id: r.varint()?, reference: r.varint()? }
            }
            LinkType::Routes => decode_routes(&mut r, limits)?,
            LinkType::StoredRun => {
                let session_id = r.varint()?;
                let first = r.varint()?;
                let last = r.varint()?;
                if last < first || last - first >= MAX_STORED_RUN {
                    return Err(DecodeError::InvalidField { what: "last", value: last });
                }
                LinkFrame::StoredRun { session_id, first, last }
            }
            LinkType::Workers => decode_workers(&mut r, limits)?,
        };
        r.finish()?;
        Ok(frame)
    }
}

/// A `ROUTES` primary as it is encoded: 0 for none, else the worker's index plus one.
fn route_index(primary: Option<u16>) -> u64 {
    primary.map_or(0, |i| u64::from(i) + 1)
}

fn decode_routes(r: &mut Reader, limits: &Limits) -> Result<LinkFrame, DecodeError> {
    let version = r.varint()?;
    let count = worker_count(r)?;
    let mut workers = Vec::with_capacity(count.min(r.remaining() / 2));
    for _ in 0..count {
        workers.push(r.name("worker id", limits.max_name)?);
    }
    let partitions: usize = r.varint_as("partition count")?;
    if partitions > crate::partition::PARTITIONS {
        return Err(DecodeError::TooLong {
            what: "partition count",
            len: partitions as u64,
            limit: crate::partition::PARTITIONS,
        });
    }
    let mut primaries = Vec::with_capacity(partitions.min(r.remaining()));
    for _ in 0..partitions {
        primaries.push(match r.varint()? {
            0 => None,
            i if i <= count as u64 => Some((i - 1) as u16),
            other => return Err(DecodeError::InvalidField { what: "primary", value: other }),
        });
    }
    Ok(LinkFrame::Routes { version, workers, primaries })
}

/// An address as `WORKERS` encodes it: 4 or 6, the address's bytes, the port (big-endian).
fn put_address(dst: &mut impl BufMut, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            dst.put_u8(4);
            dst.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            dst.put_u8(6);
            dst.put_slice(&ip.octets());
        }
    }
    dst.put_u16(addr.port());
}

fn address_len(addr: &SocketAddr) -> usize {
    if addr.is_ipv4() { 1 + 4 + 2 } else { MAX_ADDRESS_LEN }
}

/// The worker count of `ROUTES` or `WORKERS`, refused past [`MAX_ROUTED_WORKERS`] before anything is read.
fn worker_count(r: &mut Reader) -> Result<usize, DecodeError> {
    let count: usize = r.varint_as("worker count")?;
    if count > MAX_ROUTED_WORKERS {
        return Err(DecodeError::TooLong {
            what: "worker count",
            len: count as u64,
            limit: MAX_ROUTED_WORKERS,
        });
    }
    Ok(count)
}

fn decode_workers(r: &mut Reader, limits: &Limits) -> Result<LinkFrame, DecodeError> {
    let count = worker_count(r)?;
    let mut workers = Vec::with_capacity(count.min(r.remaining() / 8));
    for _ in 0..count {
        let id = r.name("worker id", limits.max_name)?;
        let ip = match r.u8()? {
            4 => {
                let b = r.bytes(4)?;
                IpAddr::from([b[0], b[1], b[2], b[3]])
            }
            6 => {
                let b = r.bytes(16)?;
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&b);
                IpAddr::from(octets)
            }
            other => {
                return Err(DecodeError::InvalidField {
                    what: "address family",
                    value: other.into(),
                });
            }
        };
        let port = r.bytes(2)?;
        workers.push((id, SocketAddr::new(ip, u16::from_be_bytes([port[0], port[1]]))));
    }
    Ok(LinkFrame::Workers { workers })
}

/// The rest of a link frame as a device frame: non-empty and within the device frame limit.
fn device_frame(r: &mut Reader, limits: &Limits) -> Result<Bytes, DecodeError> {
    let len = r.remaining();
    if len == 0 {
        return Err(DecodeError::Empty { what: "device frame" });
    }
    if len > limits.max_frame {
        return Err(DecodeError::TooLong {
            what: "frame",
            len: len as u64,
            limit: limits.max_frame,
        });
    }
    Ok(r.rest())
}

/// Writes the length prefix and routing header of an `UPSTREAM` frame; the caller appends the device frame's
/// `frame_len` bytes. This lets a gateway copy a device frame straight from its receive buffer into the link's
/// batch buffer.
pub fn put_upstream_header(
    dst: &mut impl BufMut,
    session_id: u64,
    incarnation: u64,
    thing: &str,
    frame_len: usize,
) {
    let len = 1
        + varint::encoded_len(session_id)
        + varint::encoded_len(incarnation)
        + len_prefixed_len(thing.as_bytes())
        + frame_len;
    stream::put_len(dst, len);
    dst.put_u8(LinkType::Upstream as u8);
    varint::put(dst, session_id);
    varint::put(dst, incarnation);
    put_len_prefixed(dst, thing.as_bytes());
}

/// The `STORED` answers `stored` ((session, seq) pairs, in any order, duplicates allowed) as few frames as can
/// say them (§8.17): per session in order, each run of consecutive numbers one `STORED_RUN` (at most
/// [`MAX_STORED_RUN`] long), a number alone one `STORED`. Sorts `stored`.
pub fn fold_stored(stored: &mut [(u64, u64)]) -> Vec<LinkFrame> {
    stored.sort_unstable();
    let mut frames = Vec::new();
    let mut i = 0;
    while i < stored.len() {
        let (session_id, first) = stored[i];
        let mut last = first;
        i += 1;
        while i < stored.len() && stored[i].0 == session_id {
            let seq = stored[i].1;
            if seq == last {
                i += 1; // a duplicate
            } else if seq == last + 1 && seq - first < MAX_STORED_RUN {
                last = seq;
                i += 1;
            } else {
                break;
            }
        }
        frames.push(if first == last {
            LinkFrame::Stored { session_id, seq: first }
        } else {
            LinkFrame::StoredRun { session_id, first, last }
        });
    }
    frames
}

/// Splits link frames off a receive buffer.
#[derive(Debug, Clone)]
pub struct LinkDecoder {
    limits: Limits,
    max_link_frame: usize,
}

impl LinkDecoder {
    /// A decoder for device frames within `limits`, plus routing headers.
    pub fn new(limits: Limits) -> Self {
        LinkDecoder { limits, max_link_frame: max_link_frame(&limits) }
    }

    /// The next whole link frame in `buf`, or `None` until one is complete.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<LinkFrame>, DecodeError> {
        match stream::next_frame(buf, self.max_link_frame)? {
            Some(frame) => LinkFrame::decode(frame, &self.limits).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_answers_fold_into_runs_per_session() {
        let mut stored = vec![(7, 3), (5, 2), (7, 1), (7, 2), (5, 4), (7, 2), (9, 1)];
        assert_eq!(
            fold_stored(&mut stored),
            vec![
                LinkFrame::Stored { session_id: 5, seq: 2 },
                LinkFrame::Stored { session_id: 5, seq: 4 },
                LinkFrame::StoredRun { session_id: 7, first: 1, last: 3 },
                LinkFrame::Stored { session_id: 9, seq: 1 },
            ],
            "a gap breaks a run, a duplicate adds nothing"
        );
        let mut long: Vec<(u64, u64)> = (0..MAX_STORED_RUN + 2).map(|seq| (1, seq)).collect();
        assert_eq!(
            fold_stored(&mut long),
            vec![
                LinkFrame::StoredRun { session_id: 1, first: 0, last: MAX_STORED_RUN - 1 },
                LinkFrame::StoredRun {
                    session_id: 1,
                    first: MAX_STORED_RUN,
                    last: MAX_STORED_RUN + 1
                },
            ],
            "a run longer than the limit is split"
        );
    }

    #[test]
    fn the_longest_workers_passes_a_decoder_and_bad_addresses_are_refused() {
        let limits = Limits { max_frame: 64, ..Limits::DEFAULT };
        let name = "w".repeat(limits.max_name);
        let v6: SocketAddr = "[2001:db8::1]:7101".parse().unwrap_or_else(|_| unreachable!());
        let workers: Vec<(ByteString, SocketAddr)> = (0..MAX_ROUTED_WORKERS)
            .map(|i| (ByteString::from(format!("{i:03}{}", &name[3..])), v6))
            .collect();
        let frame = LinkFrame::Workers { workers };
        assert_eq!(frame.encoded_len(), max_workers_len(&limits));
        let mut buf = BytesMut::new();
        frame.encode_framed(&mut buf);
        assert_eq!(LinkDecoder::new(limits).decode(&mut buf), Ok(Some(frame)));
        // family 5 is neither IPv4 nor IPv6; one worker more than the limit is refused before it is read
        let bad = Bytes::from_static(&[0x12, 0x01, 0x02, b'w', b'1', 0x05, 0, 0, 0, 0, 0x1b, 0xbd]);
        assert_eq!(
            LinkFrame::decode(bad, &limits),
            Err(DecodeError::InvalidField { what: "address family", value: 5 })
        );
        let many = Bytes::from_static(&[0x12, 0x81, 0x02]);
        assert!(matches!(LinkFrame::decode(many, &limits), Err(DecodeError::TooLong { .. })));
    }

    #[test]
    fn the_longest_routes_passes_a_decoder_with_the_smallest_device_frames() {
        let limits = Limits { max_frame: 64, ..Limits::DEFAULT };
        let name = "w".repeat(limits.max_name);
        let workers: Vec<ByteString> = (0..MAX_ROUTED_WORKERS)
            .map(|i| ByteString::from(format!("{i:03}{}", &name[3..])))
            .collect();
        let last = Some(MAX_ROUTED_WORKERS as u16 - 1);
        let routes = LinkFrame::Routes {
            version: u64::MAX,
            workers,
            primaries: vec![last; crate::partition::PARTITIONS],
        };
        assert_eq!(routes.encoded_len(), max_routes_len(&limits));
        let mut buf = BytesMut::new();
        routes.encode_framed(&mut buf);
        assert_eq!(LinkDecoder::new(limits).decode(&mut buf), Ok(Some(routes)));
    }
}
