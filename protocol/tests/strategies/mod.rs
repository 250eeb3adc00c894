//! proptest strategies for every frame of the protocol.

#![allow(dead_code, unreachable_pub, reason = "each test binary uses a different part")]

use proptest::prelude::*;
use thingport_protocol::frame::MAX_TIMESTAMP;
use thingport_protocol::{
    ByteString, Bytes, Credential, ErrorCode, ErrorFrame, Event, Frame, Goaway, GoawayReason,
    Hello, LinkFrame, Properties, PropertyUpdate, Quality, ServiceErrorCode, ServiceRequest,
    ServiceResponse, ServiceResult, Transport, Value, Welcome,
};

pub fn name() -> impl Strategy<Value = ByteString> {
    "[a-zA-Z0-9_.:/é-]{1,24}".prop_map(ByteString::from)
}

pub fn text() -> impl Strategy<Value = ByteString> {
    ".{0,40}".prop_map(ByteString::from)
}

pub fn bytes() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..48).prop_map(Bytes::from)
}

/// Values, floats without NaN so that equality is meaningful (NaN round-trips bit for bit; see the codec tests).
pub fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<f64>()
            .prop_filter("NaN is not equal to itself", |x| !x.is_nan())
            .prop_map(Value::Float),
        text().prop_map(Value::String),
        bytes().prop_map(Value::Bytes),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::List),
            prop::collection::btree_map("[a-z]{1,8}", inner, 0..6).prop_map(|m| {
                Value::Map(m.into_iter().map(|(k, v)| (ByteString::from(k), v)).collect())
            }),
        ]
    })
}

pub fn timestamp() -> impl Strategy<Value = u64> {
    prop_oneof![0..=MAX_TIMESTAMP, 1_700_000_000_000u64..1_900_000_000_000]
}

pub fn quality() -> impl Strategy<Value = Quality> {
    prop_oneof![Just(Quality::Good), Just(Quality::Uncertain), Just(Quality::Bad)]
}

pub fn update() -> impl Strategy<Value = PropertyUpdate> {
    (name(), timestamp(), quality(), value()).prop_map(|(name, timestamp_ms, quality, value)| {
        PropertyUpdate { name, timestamp_ms, quality, value }
    })
}

pub fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            any::<u8>(),
            any::<u8>(),
            name(),
            prop::option::of(bytes().prop_filter("tokens are not empty", |b| !b.is_empty())),
            any::<u16>(),
            any::<u64>(),
            1..u64::MAX,
        )
            .prop_map(
                |(
                    min_version,
                    max_version,
                    thing,
                    token,
                    keepalive_secs,
                    incarnation,
                    resume_seq,
                )| {
                    Frame::Hello(Hello {
                        min_version,
                        max_version,
                        thing,
                        credential: token.map_or(Credential::None, Credential::Token),
                        keepalive_secs,
                        incarnation,
                        resume_seq,
                    })
                }
            ),
        (any::<u8>(), any::<u64>(), any::<u16>(), any::<u32>(), any::<u32>(), any::<u32>())
            .prop_map(|(version, session_id, keepalive_secs, max_frame, max_batch, window)| {
                Frame::Welcome(Welcome {
                    version,
                    session_id,
                    keepalive_secs,
                    max_frame,
                    max_batch,
                    window,
                })
            }),
        (any::<u64>(), prop::collection::vec(update(), 0..8))
            .prop_map(|(seq, updates)| Frame::Properties(Properties { seq, updates })),
        (any::<u64>(), timestamp(), name(), value()).prop_map(
            |(seq, timestamp_ms, name, payload)| {
                Frame::Event(Event { seq, timestamp_ms, name, payload })
            }
        ),
        (any::<u64>(), any::<u64>(), any::<u32>(), name(), value()).prop_map(
            |(seq, call_id, timeout_ms, service, params)| {
                Frame::ServiceRequest(ServiceRequest { seq, call_id, timeout_ms, service, params })
            }
        ),
        (
            any::<u64>(),
            any::<u64>(),
            prop_oneof![
                value().prop_map(ServiceResult::Ok),
                (any::<u16>(), text()).prop_map(|(code, message)| ServiceResult::Err {
                    code: ServiceErrorCode(code),
                    message
                }),
            ]
        )
            .prop_map(|(seq, call_id, result)| Frame::ServiceResponse(ServiceResponse {
                seq,
                call_id,
                result
            })),
        any::<u64>().prop_map(|seq| Frame::Ack { seq }),
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
        (any::<u8>(), any::<u32>(), text()).prop_map(|(reason, reconnect_after_ms, message)| {
            Frame::Goaway(Goaway { reason: GoawayReason(reason), reconnect_after_ms, message })
        }),
        (any::<u16>(), any::<u32>(), text()).prop_map(|(code, retry_after_ms, message)| {
            Frame::Error(ErrorFrame { code: ErrorCode(code), retry_after_ms, message })
        }),
    ]
}

pub fn device_frame_bytes() -> impl Strategy<Value = Bytes> {
    frame().prop_map(|f| f.to_bytes())
}

pub fn link_frame() -> impl Strategy<Value = LinkFrame> {
    let transport = prop_oneof![Just(Transport::Wss), Just(Transport::Quic)];
    prop_oneof![
        (any::<u8>(), name(), any::<u32>()).prop_map(|(version, gateway_id, link_index)| {
            LinkFrame::Hello { version, gateway_id, link_index }
        }),
        (any::<u8>(), name())
            .prop_map(|(version, worker_id)| LinkFrame::Welcome { version, worker_id }),
        (any::<u64>(), name(), transport, any::<u64>(), 1..u64::MAX).prop_map(
            |(session_id, thing, transport, incarnation, resume_seq)| LinkFrame::Open {
                session_id,
                thing,
                transport,
                incarnation,
                resume_seq
            }
        ),
        (any::<u64>(), any::<u64>(), any::<u16>()).prop_map(|(session_id, seq, code)| {
            LinkFrame::Rejected { session_id, seq, code: ErrorCode(code) }
        }),
        (any::<u64>(), name(), any::<u16>()).prop_map(|(session_id, thing, code)| {
            LinkFrame::Close { session_id, thing, code: ErrorCode(code) }
        }),
        (any::<u64>(), any::<u64>(), name(), device_frame_bytes()).prop_map(
            |(session_id, incarnation, thing, frame)| LinkFrame::Upstream {
                session_id,
                incarnation,
                thing,
                frame
            }
        ),
        (any::<u64>(), any::<u64>())
            .prop_map(|(session_id, seq)| LinkFrame::Stored { session_id, seq }),
        (any::<u64>(), any::<u64>(), device_frame_bytes()).prop_map(
            |(session_id, reference, frame)| {
                LinkFrame::Downstream { session_id, reference, frame }
            }
        ),
        (any::<u64>(), any::<u64>(), any::<u16>()).prop_map(|(session_id, reference, code)| {
            LinkFrame::Undeliverable { session_id, reference, code: ErrorCode(code) }
        }),
        any::<u64>().prop_map(|nonce| LinkFrame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| LinkFrame::Pong { nonce }),
        any::<bool>().prop_map(|saturated| LinkFrame::Load { saturated }),
        Just(LinkFrame::Goaway),
        (any::<u64>(), any::<bool>())
            .prop_map(|(session_id, open)| LinkFrame::Bound { session_id, open }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(session_id, reference)| LinkFrame::Delivered { session_id, reference }),
        (
            any::<u64>(),
            prop::collection::vec(name(), 1..5),
            prop::collection::vec(any::<u16>(), 0..64)
        )
            .prop_map(|(version, workers, picks)| {
                let primaries = picks
                    .into_iter()
                    .map(|p| (p % 5 != 0).then_some(p % workers.len() as u16))
                    .collect();
                LinkFrame::Routes { version, workers, primaries }
            }),
        (any::<u64>(), 0..u64::MAX - 70_000, 0..65_536u64).prop_map(|(session_id, first, n)| {
            LinkFrame::StoredRun { session_id, first, last: first + n }
        }),
        // the format carries an address and a port, not an IPv6 flow label or scope
        prop::collection::vec((name(), any::<std::net::IpAddr>(), any::<u16>()), 0..8).prop_map(
            |workers| LinkFrame::Workers {
                workers: workers
                    .into_iter()
                    .map(|(id, ip, port)| (id, std::net::SocketAddr::new(ip, port)))
                    .collect(),
            }
        ),
    ]
}
