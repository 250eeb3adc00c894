//! The foundation ↔ foundation format of the cache ring (`docs/PROTOCOL.md` §10).
//!
//! Workers of one pool talk over one TCP connection per ordered pair: the dialling worker sends requests, the
//! other answers on the same connection, in any order, matched by id. Each message is a length prefix (§2.3) and a
//! [postcard](https://docs.rs/postcard) encoding of [`PeerMessage`]. The format is internal to a pool whose
//! workers run the same release: the first message names the format's version and a worker refuses any other.
//! Property values and event payloads travel in the device encoding of a value (§4), so the ring never re-encodes
//! what a device sent.

use bytes::{BufMut, Bytes, BytesMut};
use bytestring::ByteString;
use serde::{Deserialize, Serialize};

use crate::error::DecodeError;
use crate::stream;

/// Version of the peer format.
pub const PEER_VERSION: u8 = 9;

/// One message on a peer connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// First message of the dialling worker.
    Hello {
        version: u8,
        member: String,
    },
    Request {
        id: u64,
        body: Request,
    },
    Response {
        id: u64,
        body: Response,
    },
}

/// A change to one thing (names are shared, not copied, as the operation is cloned for each copy), applied by the
/// partition's primary and then by each backup, in any order: every operation is idempotent and commutes with the
/// others of its thing (last writer wins by version).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// Creates the thing if it does not exist.
    Create { thing: ByteString, now_ms: u64 },
    /// A device data frame (`PROPERTIES` or `EVENT`), byte for byte as the device sent it. `epoch_ms` is when the
    /// primary first saw the session's incarnation (0 until the primary sets it): events are kept in device order,
    /// by (epoch, incarnation, sequence number).
    Device {
        thing: ByteString,
        create: bool,
        now_ms: u64,
        incarnation: u64,
        epoch_ms: u64,
        frame: Bytes,
    },
    /// A property value written by an application; `value` in the device encoding. `seq` orders writes of the same
    /// millisecond (the writing worker's clock in nanoseconds, made unique).
    Write { thing: ByteString, property: ByteString, value: Bytes, now_ms: u64, seq: u64 },
    /// The thing is now reached through this gateway session, whose device came over `transport` (as `OPEN`
    /// carries it, §8.4).
    Bind {
        thing: ByteString,
        create: bool,
        gateway: ByteString,
        session_id: u64,
        now_ms: u64,
        transport: u8,
    },
    /// The session ended; the binding goes if it is still this session's. `create` as for `Bind`: a `CLOSE` may be
    /// applied before its `OPEN`, and must still be remembered.
    Unbind { thing: ByteString, create: bool, gateway: ByteString, session_id: u64, now_ms: u64 },
    /// Sets the thing's description and tags (creating the thing if `create`); the latest `now_ms` wins.
    Describe {
        thing: ByteString,
        create: bool,
        now_ms: u64,
        description: String,
        tags: Vec<String>,
    },
    /// Sets how a property is kept; the latest `now_ms` wins.
    Define { thing: ByteString, property: ByteString, now_ms: u64, definition: PropertyDefinition },
    /// Removes a property (its value, definition and history) or, without `property`, the whole thing.
    Remove { thing: ByteString, property: Option<ByteString>, now_ms: u64 },
}

impl Op {
    /// The thing the operation changes.
    pub fn thing(&self) -> &ByteString {
        match self {
            Op::Create { thing, .. }
            | Op::Device { thing, .. }
            | Op::Write { thing, .. }
            | Op::Bind { thing, .. }
            | Op::Unbind { thing, .. }
            | Op::Describe { thing, .. }
            | Op::Define { thing, .. }
            | Op::Remove { thing, .. } => thing,
        }
    }
}

/// How a property of a thing is kept (`docs/STORAGE.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PropertyDefinition {
    /// The value type applications may write (`bool`, `int`, `float`, `string`, `bytes`, `list`, `map`), or any.
    pub kind: Option<String>,
    /// Unit of measure, for people.
    pub unit: Option<String>,
    /// The latest value survives a restart.
    pub persisted: bool,
    /// Every value is kept in the property's value stream.
    pub logged: bool,
    /// Values older than this (by device timestamp) leave the value stream; none: the worker's default.
    pub max_age_ms: Option<u64>,
    /// At most this many values stay in the value stream; none: the worker's default.
    pub max_count: Option<u64>,
}

impl Default for PropertyDefinition {
    fn default() -> Self {
        PropertyDefinition {
            kind: None,
            unit: None,
            persisted: true,
            logged: true,
            max_age_ms: None,
            max_count: None,
        }
    }
}

/// A partition table: members, replicas and each partition's owners (indices into `members`, primary first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRecord {
    pub version: u64,
    pub replicas: u32,
    pub members: Vec<String>,
    pub owners: Vec<Vec<u16>>,
}

/// Everything the ring holds about one thing (its history is in the workers' stores, not here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThingRecord {
    pub name: String,
    pub created_ms: u64,
    pub description: String,
    pub tags: Vec<String>,
    pub described_ms: u64,
    /// Property definitions with the time each was set.
    pub definitions: Vec<(String, PropertyDefinition, u64)>,
    pub properties: Vec<PropertyRecord>,
    pub binding: Option<BindingRecord>,
    /// Recently ended sessions: (gateway, session id).
    pub closed: Vec<(String, u64)>,
    /// Recent incarnations and when the primary first saw each: (incarnation, epoch ms).
    pub incarnations: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PropertyRecord {
    pub name: String,
    /// The value in the device encoding (§4).
    pub value: Bytes,
    pub quality: u8,
    pub timestamp_ms: u64,
    pub incarnation: u64,
    pub seq: u64,
    pub received_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingRecord {
    pub gateway: String,
    pub session_id: u64,
    pub since_ms: u64,
    /// As `OPEN` carries it (§8.4).
    pub transport: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// The event's place in device order: (epoch, incarnation, seq); see [`Op::Device`].
    pub epoch_ms: u64,
    pub name: String,
    /// The payload in the device encoding (§4).
    pub payload: Bytes,
    pub timestamp_ms: u64,
    pub incarnation: u64,
    pub seq: u64,
    pub received_ms: u64,
}

/// One line of a thing listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThingSummary {
    pub name: String,
    pub gateway: Option<String>,
    /// The session's transport while online (as `OPEN` carries it, §8.4), else 0.
    pub transport: u8,
    pub properties: u32,
    pub created_ms: u64,
    pub tags: Vec<String>,
    /// When the server last heard of the thing's device: its latest property value's receive time or its
    /// session's start, whichever is later (0: never).
    pub last_seen_ms: u64,
}

/// How a service call ended, sent to the worker that started it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CallOutcome {
    /// The device's `SERVICE_RESPONSE` frame, byte for byte.
    Answered { frame: Bytes },
    /// The gateway could not deliver the request; the error code.
    Undeliverable { code: u16 },
    /// The device acknowledged the property write (link `DELIVERED`).
    Delivered,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Apply `op` to its thing's partition: as the primary (apply, replicate to the backups, then answer) or, with
    /// `replica`, as a backup (apply and answer). `version` is the sender's table version: a backup whose table is
    /// newer refuses the copy (`Stale`), so a primary that missed a table change cannot acknowledge writes.
    Write { partition: u16, replica: bool, version: u64, op: Op },
    /// A thing's record, read on the partition's primary.
    Read { thing: String },
    /// One page of the things of the partitions this worker leads that match the query, in name order.
    List { query: ListQuery },
    /// Copies of partitions this worker holds.
    Fetch { partitions: Vec<u16> },
    /// Counts for the cluster view.
    Stats,
    /// The coordinator's next table: replicate writes to its owners too from now on.
    Prepare { table: TableRecord },
    /// Copy these partitions of the prepared table from these members, then answer.
    Pull { version: u64, sources: Vec<(u16, String)> },
    /// This table (the one prepared) is now the table.
    Commit { table: TableRecord },
    /// The committed table, sent to a member that just appeared.
    Table { table: TableRecord },
    /// A service call this worker started ended.
    Complete { call_id: u64, outcome: CallOutcome },
    /// Values of a property's value stream from this worker's store.
    History { query: HistoryQuery },
    /// Events of a thing's event stream from this worker's store.
    Events { query: HistoryQuery },
    /// Removes a thing's history (or one property's) from this worker's store: sent to every member after the
    /// thing or property was removed, since a worker keeps the history of partitions it held before.
    Purge { thing: String, property: Option<String> },
    /// Changes this worker applied as a primary, from its change log: those after sequence number `after`
    /// (none: only the log's position), at most `max`. With none to give, the answer waits up to `wait_ms` for one.
    Watch { after: Option<u64>, max: u32, wait_ms: u32 },
    /// A message of the pool's consensus group (Raft): `body` is the postcard encoding of the openraft request of
    /// that kind; the answer is [`Response::Consensus`].
    Consensus { rpc: ConsensusRpc, body: Bytes },
    /// A lock operation for the consensus group's leader to commit; answered [`Response::Lock`], or refused
    /// `NotLeader` by a worker that is not (or no longer) the leader.
    Lock { command: LockCommand },
    /// A lock's current lease as the leader knows it, read after confirming its leadership.
    ReadLock { name: String },
    /// Worker `worker`'s request for its primary lease: the consensus group's leader answers [`Response::Lease`]
    /// while a quorum of voters has acknowledged it recently; a worker that is not the leader passes the request on
    /// to the leader it knows (once: `forwarded` is then true), or refuses it `NotLeader`.
    Lease { worker: String, forwarded: bool },
}

/// The kinds of consensus messages (Raft's three RPCs, and a question a worker asks before it founds a group).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsensusRpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
    /// Whether the receiver belongs to a consensus group already (answer body: one byte, 1 if so).
    Member,
}

/// An operation on a named lock (`docs/API.md`, locks). Committed through the consensus log; the leader stamps
/// each with its clock, and leases are judged by those stamps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockCommand {
    /// Takes the lock for `holder` for `ttl_ms` if it is free or its lease ran out; the same holder extends its
    /// own lease and keeps its token.
    Acquire { name: String, holder: String, ttl_ms: u64 },
    /// Extends the lease `token` names, if it still holds the lock.
    Renew { name: String, token: u64, ttl_ms: u64 },
    /// Frees the lock, if `token` still holds it.
    Release { name: String, token: u64 },
}

/// What a lock operation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockOutcome {
    /// The lease now held: acquired or renewed.
    Held(Lease),
    /// Another holder's lease runs for `expires_in_ms` more.
    Busy {
        holder: String,
        token: u64,
        expires_in_ms: u64,
    },
    /// The token no longer holds the lock (its lease ran out, it was released, or another holder took it).
    Lost,
    Released,
    /// The lock is free (an answer to `ReadLock`).
    Free,
    /// The group holds `max_locks` locks already.
    Full,
}

/// A holder's lease of a lock. `token` is the consensus log index of the entry that granted it: it grows with
/// every grant, across locks and leaders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    pub token: u64,
    /// Lease time left as the leader's clock stood when it answered.
    pub expires_in_ms: u64,
}

/// Which things a listing wants: names after `after`, starting with `prefix` and with one of `prefixes` (if any),
/// containing `search`, carrying `tag`, online or not; at most `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListQuery {
    pub after: Option<String>,
    pub limit: u32,
    pub prefix: Option<String>,
    pub prefixes: Vec<String>,
    pub search: Option<String>,
    pub tag: Option<String>,
    pub online: Option<bool>,
}

impl ListQuery {
    /// Whether a thing matches (everything but `after` and `limit`).
    pub fn matches(&self, name: &str, tags: &[String], online: bool) -> bool {
        self.prefix.as_ref().is_none_or(|p| name.starts_with(p.as_str()))
            && (self.prefixes.is_empty()
                || self.prefixes.iter().any(|p| name.starts_with(p.as_str())))
            && self.search.as_ref().is_none_or(|s| name.contains(s.as_str()))
            && self.tag.as_ref().is_none_or(|t| tags.iter().any(|x| x == t))
            && self.online.is_none_or(|o| o == online)
    }
}

/// One change in a worker's change log: what a stream of changes carries (`docs/API.md`, streams).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateRecord {
    /// Its place in the log of the worker that acknowledged it: 1, 2, 3, ... for each run of the worker.
    pub seq: u64,
    pub thing: String,
    /// The thing's tags when the change was acknowledged.
    pub tags: Vec<String>,
    pub change: ChangeRecord,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ChangeRecord {
    /// A property took a new value (the device encoding, §4).
    Property { name: String, value: Bytes, quality: u8, timestamp_ms: u64, received_ms: u64 },
    /// An event, its payload in the device encoding.
    Event { name: String, payload: Bytes, timestamp_ms: u64, received_ms: u64 },
    /// The thing's device connected through this gateway, over this transport (as `OPEN` carries it, §8.4).
    Online { gateway: String, at_ms: u64, transport: u8 },
    /// The thing's device disconnected.
    Offline { at_ms: u64 },
    /// A property, or without one the whole thing, was removed.
    Removed { property: Option<String>, at_ms: u64 },
}

/// A page of a value or event stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryQuery {
    pub thing: String,
    /// The property, for a value stream.
    pub property: Option<String>,
    /// Device timestamps, inclusive.
    pub from_ms: u64,
    pub to_ms: u64,
    pub limit: u32,
    pub newest_first: bool,
    /// Continue after (for newest first: before) this position.
    pub after: Option<StreamPosition>,
}

/// A position in a stream: for values (timestamp, incarnation, seq); for events (epoch, incarnation, seq).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StreamPosition(pub u64, pub u64, pub u64);

/// One value of a value stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValueRecord {
    pub timestamp_ms: u64,
    pub incarnation: u64,
    pub seq: u64,
    pub quality: u8,
    /// The value in the device encoding (§4).
    pub value: Bytes,
    pub received_ms: u64,
}

/// Why a request was not carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// This worker does not lead the partition in its table; the sender should retry with a newer table.
    NotPrimary,
    /// This worker holds no copy of the partition.
    NotOwner,
    /// This worker has no table yet.
    NoTable,
    /// The thing does not exist and the operation may not create it.
    UnknownThing,
    /// The operation is invalid (an undecodable frame or value).
    Invalid,
    /// The primary could not reach every owner of the partition; retry.
    Unavailable,
    /// The prepared table is not the one named.
    Stale,
    /// Copying a partition failed.
    CopyFailed,
    /// The answer would pass the asker's `max_peer_message`, so it was not sent.
    TooLarge,
    /// This worker does not lead the consensus group (or runs none).
    NotLeader,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Done,
    Refused {
        refusal: Refusal,
        table_version: u64,
    },
    Thing(Option<ThingRecord>),
    /// A page of a listing, how many things of the receiver match the query in all, and the version of the table
    /// whose primaries it listed.
    Things {
        things: Vec<ThingSummary>,
        matching: u64,
        table_version: u64,
    },
    Partitions(Vec<(u16, Vec<ThingRecord>)>),
    Stats {
        things: u64,
        partitions_held: u32,
        primaries: u32,
        /// Gateways linked to the receiver.
        gateways: Vec<String>,
    },
    Values(Vec<ValueRecord>),
    Events(Vec<EventRecord>),
    /// Changes from the receiver's log: `first` is the oldest it still holds, `next` the number the next change
    /// will get (so a watcher that asked for changes after a number below `first - 1` missed some).
    Updates {
        first: u64,
        next: u64,
        updates: Vec<UpdateRecord>,
    },
    /// The table was prepared; or, if this worker already has a table at least as new as the one proposed, that
    /// table.
    Prepared {
        newer: Option<TableRecord>,
    },
    /// The answer to a consensus message: the postcard encoding of openraft's `Result` for that RPC.
    Consensus(Bytes),
    Lock(LockOutcome),
    /// A primary lease: the asker may acknowledge writes until `remaining_ms` after it *sent* its request, as the
    /// primary of partition tables of `table_version` or later only (the newest table the leader's log committed).
    Lease {
        remaining_ms: u64,
        table_version: u64,
    },
}

impl PeerMessage {
    /// Appends the message with its length prefix.
    pub fn encode_framed(&self, dst: &mut BytesMut) -> Result<(), postcard::Error> {
        let body = postcard::to_stdvec(self)?;
        stream::put_len(dst, body.len());
        dst.put_slice(&body);
        Ok(())
    }

    /// The message with its length prefix.
    pub fn to_framed_bytes(&self) -> Result<Bytes, postcard::Error> {
        let mut buf = BytesMut::new();
        self.encode_framed(&mut buf)?;
        Ok(buf.freeze())
    }

    /// The next whole message in `buf`, or `None` until one is complete; a declared length over `max_message` is
    /// refused before it is buffered.
    pub fn decode_framed(
        buf: &mut BytesMut,
        max_message: usize,
    ) -> Result<Option<PeerMessage>, DecodeError> {
        let Some(frame) = stream::next_frame(buf, max_message)? else { return Ok(None) };
        postcard::from_bytes(&frame).map(Some).map_err(|_| DecodeError::InvalidField {
            what: "peer message",
            value: frame.len() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_truncations_wait() {
        let message = PeerMessage::Request {
            id: 7,
            body: Request::Write {
                partition: 513,
                replica: true,
                version: 4,
                op: Op::Device {
                    thing: "pump-7".into(),
                    create: true,
                    now_ms: 1_700_000_000_000,
                    incarnation: 3,
                    epoch_ms: 0,
                    frame: Bytes::from_static(&[3, 1, 1]),
                },
            },
        };
        let bytes = message.to_framed_bytes().unwrap();
        let mut whole = BytesMut::from(&bytes[..]);
        assert_eq!(PeerMessage::decode_framed(&mut whole, 1024).unwrap(), Some(message));
        assert!(whole.is_empty());
        for cut in 0..bytes.len() {
            let mut part = BytesMut::from(&bytes[..cut]);
            assert_eq!(PeerMessage::decode_framed(&mut part, 1024).unwrap(), None, "cut at {cut}");
        }
        let mut small = BytesMut::from(&bytes[..]);
        assert!(PeerMessage::decode_framed(&mut small, 4).is_err(), "over the limit");
        let mut garbage = BytesMut::from(&[3u8, 0xff, 0xff, 0xff][..]);
        assert!(PeerMessage::decode_framed(&mut garbage, 1024).is_err());
    }
}
