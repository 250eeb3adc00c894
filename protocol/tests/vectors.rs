//! The hex test vectors of `docs/PROTOCOL.md` §9: each is decoded and must equal the frame named here, and the
//! frame named here must encode to exactly those bytes.
//!
//! `THINGPORT_PRINT_VECTORS=1 cargo test -p thingport-protocol --test vectors -- --nocapture` prints the section.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "in tests a panic is a failed assertion"
)]

use bytes::{Bytes, BytesMut};
use thingport_protocol::{
    ByteString, Credential, ErrorCode, ErrorFrame, Event, Frame, Goaway, GoawayReason, Hello,
    Limits, LinkDecoder, LinkFrame, Properties, PropertyUpdate, Quality, ServiceErrorCode,
    ServiceRequest, ServiceResponse, ServiceResult, Transport, Value, Welcome,
};

enum Vector {
    Device(Frame),
    Link(LinkFrame),
}

fn vectors() -> Vec<(&'static str, &'static str, Vector)> {
    use Vector::{Device, Link};
    vec![
        (
            "hello-token",
            "HELLO: versions 1..=1, thing `pump-1`, token `tok`, keepalive 30 s, incarnation 0x1234, resume_seq 1.",
            Device(Frame::Hello(Hello {
                min_version: 1,
                max_version: 1,
                thing: "pump-1".into(),
                credential: Credential::Token(Bytes::from_static(b"tok")),
                keepalive_secs: 30,
                incarnation: 0x1234,
                resume_seq: 1,
            })),
        ),
        (
            "hello-mtls",
            "HELLO offering versions 1..=2, without a credential (mTLS), keepalive left to the server, incarnation 0, resuming at sequence 300.",
            Device(Frame::Hello(Hello {
                min_version: 1,
                max_version: 2,
                thing: "cnc-7".into(),
                credential: Credential::None,
                keepalive_secs: 0,
                incarnation: 0,
                resume_seq: 300,
            })),
        ),
        (
            "welcome",
            "WELCOME: version 1, session 42, keepalive 30 s, max_frame 65536, max_batch 256, window 64.",
            Device(Frame::Welcome(Welcome {
                version: 1,
                session_id: 42,
                keepalive_secs: 30,
                max_frame: 65_536,
                max_batch: 256,
                window: 64,
            })),
        ),
        (
            "properties-small",
            "PROPERTIES seq 1: `t` = INT 21 at 1000 ms, GOOD.",
            Device(Frame::Properties(Properties {
                seq: 1,
                updates: vec![PropertyUpdate {
                    name: "t".into(),
                    timestamp_ms: 1_000,
                    quality: Quality::Good,
                    value: Value::Int(21),
                }],
            })),
        ),
        (
            "properties-batch",
            "PROPERTIES seq 2: `temp` = FLOAT 21.5 at 1764000000000 ms GOOD; `on` = TRUE 250 ms later UNCERTAIN; \
             `fw` = STRING `1.4` 10 ms earlier than the first, BAD.",
            Device(Frame::Properties(Properties {
                seq: 2,
                updates: vec![
                    PropertyUpdate {
                        name: "temp".into(),
                        timestamp_ms: 1_764_000_000_000,
                        quality: Quality::Good,
                        value: Value::Float(21.5),
                    },
                    PropertyUpdate {
                        name: "on".into(),
                        timestamp_ms: 1_764_000_000_250,
                        quality: Quality::Uncertain,
                        value: Value::Bool(true),
                    },
                    PropertyUpdate {
                        name: "fw".into(),
                        timestamp_ms: 1_763_999_999_990,
                        quality: Quality::Bad,
                        value: Value::from_static("1.4"),
                    },
                ],
            })),
        ),
        (
            "event-structured",
            "EVENT seq 3 `alarm` at 1000 ms with MAP {`level`: INT -2, `tags`: LIST [BYTES 0xbeef, NULL]}.",
            Device(Frame::Event(Event {
                seq: 3,
                timestamp_ms: 1_000,
                name: "alarm".into(),
                payload: Value::Map(vec![
                    (ByteString::from_static("level"), Value::Int(-2)),
                    (
                        ByteString::from_static("tags"),
                        Value::List(vec![
                            Value::Bytes(Bytes::from_static(&[0xbe, 0xef])),
                            Value::Null,
                        ]),
                    ),
                ]),
            })),
        ),
        (
            "service-request",
            "SERVICE_REQUEST seq 1 from the server: call 7 of `reboot` with a 5000 ms timeout and parameters MAP \
             {`delay`: INT 10}.",
            Device(Frame::ServiceRequest(ServiceRequest {
                seq: 1,
                call_id: 7,
                timeout_ms: 5_000,
                service: "reboot".into(),
                params: Value::Map(vec![(ByteString::from_static("delay"), Value::Int(10))]),
            })),
        ),
        (
            "service-response-ok",
            "SERVICE_RESPONSE seq 4: call 7 succeeded with STRING `ok`.",
            Device(Frame::ServiceResponse(ServiceResponse {
                seq: 4,
                call_id: 7,
                result: ServiceResult::Ok(Value::from_static("ok")),
            })),
        ),
        (
            "service-response-error",
            "SERVICE_RESPONSE seq 5: call 8 failed with NOT_FOUND `no such service`.",
            Device(Frame::ServiceResponse(ServiceResponse {
                seq: 5,
                call_id: 8,
                result: ServiceResult::Err {
                    code: ServiceErrorCode::NOT_FOUND,
                    message: "no such service".into(),
                },
            })),
        ),
        ("ack", "ACK of every data frame up to 300.", Device(Frame::Ack { seq: 300 })),
        ("ping", "PING nonce 1.", Device(Frame::Ping { nonce: 1 })),
        ("pong", "PONG nonce 1.", Device(Frame::Pong { nonce: 1 })),
        (
            "goaway",
            "GOAWAY DRAINING, reconnect after 2000 ms, message `restart`.",
            Device(Frame::Goaway(Goaway {
                reason: GoawayReason::DRAINING,
                reconnect_after_ms: 2_000,
                message: "restart".into(),
            })),
        ),
        (
            "error-auth",
            "ERROR AUTH_FAILED (0x0201), no retry hint, message `bad token`.",
            Device(Frame::Error(ErrorFrame {
                code: ErrorCode::AUTH_FAILED,
                retry_after_ms: 0,
                message: "bad token".into(),
            })),
        ),
        (
            "link-upstream",
            "Link UPSTREAM (with its length prefix): session 5, incarnation 7, thing `t1`, carrying the `ack` vector's frame.",
            Link(LinkFrame::Upstream {
                session_id: 5,
                incarnation: 7,
                thing: "t1".into(),
                frame: Frame::Ack { seq: 300 }.to_bytes(),
            }),
        ),
        (
            "link-stored",
            "Link STORED (with its length prefix): session 5, data frame 300 handled.",
            Link(LinkFrame::Stored { session_id: 5, seq: 300 }),
        ),
        (
            "link-open",
            "Link OPEN (with its length prefix): session 5, thing `t1`, over QUIC, incarnation 0x1234, resuming at 1.",
            Link(LinkFrame::Open {
                session_id: 5,
                thing: "t1".into(),
                transport: Transport::Quic,
                incarnation: 0x1234,
                resume_seq: 1,
            }),
        ),
        (
            "link-bound",
            "Link BOUND (with its length prefix): the OPEN of session 5 is handled.",
            Link(LinkFrame::Bound { session_id: 5, open: true }),
        ),
        (
            "link-delivered",
            "Link DELIVERED (with its length prefix): the device of session 5 acknowledged the property write of reference 300.",
            Link(LinkFrame::Delivered { session_id: 5, reference: 300 }),
        ),
        (
            "link-routes",
            "Link ROUTES (with its length prefix): table version 9 with workers `w1` and `w2`; partitions 0 and 2 are led by `w2`, partition 1 by `w1`, partition 3 has no known primary, and the frame names no others (a real frame lists all 1,024).",
            Link(LinkFrame::Routes {
                version: 9,
                workers: vec!["w1".into(), "w2".into()],
                primaries: vec![Some(1), Some(0), Some(1), None],
            }),
        ),
        (
            "link-stored-run",
            "Link STORED_RUN (with its length prefix): the data frames 1 to 5 of session 42 are stored.",
            Link(LinkFrame::StoredRun { session_id: 42, first: 1, last: 5 }),
        ),
        (
            "link-workers",
            "Link WORKERS (with its length prefix): worker `w1` has its links at 127.0.0.1:7101 and `w2` at [::1]:7102.",
            Link(LinkFrame::Workers {
                workers: vec![
                    ("w1".into(), "127.0.0.1:7101".parse().unwrap()),
                    ("w2".into(), "[::1]:7102".parse().unwrap()),
                ],
            }),
        ),
    ]
}

fn encode(vector: &Vector) -> Bytes {
    match vector {
        Vector::Device(f) => f.to_bytes(),
        Vector::Link(f) => f.to_framed_bytes(),
    }
}

fn hex_lines(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|c| c.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `(name, bytes)` of every vector in the specification: a heading `### 9.N \`name\`` then a ```hex block.
fn vectors_in_spec() -> Vec<(String, Vec<u8>)> {
    let spec = include_str!("../../docs/PROTOCOL.md");
    let mut found = Vec::new();
    let mut lines = spec.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix("### 9.") else {
            continue;
        };
        let Some(name) = rest.split('`').nth(1) else {
            continue;
        };
        let hex: String = lines
            .by_ref()
            .skip_while(|l| l.trim() != "```hex")
            .skip(1)
            .take_while(|l| l.trim() != "```")
            .collect::<Vec<_>>()
            .join("")
            .split_whitespace()
            .collect();
        found.push((
            name.to_string(),
            hex::decode(&hex).unwrap_or_else(|e| panic!("vector {name}: {e}")),
        ));
    }
    found
}

#[test]
fn specification_vectors() {
    let vectors = vectors();
    if std::env::var_os("THINGPORT_PRINT_VECTORS").is_some() {
        for (i, (name, description, vector)) in vectors.iter().enumerate() {
            println!(
                "### 9.{} `{name}`\n\n{description}\n\n```hex\n{}\n```\n",
                i + 1,
                hex_lines(&encode(vector))
            );
        }
    }
    if let Some(dir) = std::env::var_os("THINGPORT_WRITE_CORPUS") {
        write_corpus(std::path::Path::new(&dir), &vectors);
    }
    let in_spec = vectors_in_spec();
    let names: Vec<&str> = in_spec.iter().map(|(n, _)| n.as_str()).collect();
    let expected: Vec<&str> = vectors.iter().map(|(n, _, _)| *n).collect();
    assert_eq!(names, expected, "docs/PROTOCOL.md §9 lists other vectors");
    for ((name, bytes), (_, _, vector)) in in_spec.into_iter().zip(&vectors) {
        assert_eq!(hex_lines(&encode(vector)), hex_lines(&bytes), "encoding of {name}");
        match vector {
            Vector::Device(frame) => {
                let decoded = Frame::decode(Bytes::from(bytes), &Limits::DEFAULT).unwrap();
                assert_eq!(&decoded, frame, "decoding of {name}");
            }
            Vector::Link(frame) => {
                let mut buf = BytesMut::from(&bytes[..]);
                let decoded = LinkDecoder::new(Limits::DEFAULT).decode(&mut buf).unwrap();
                assert_eq!(decoded.as_ref(), Some(frame), "decoding of {name}");
                assert!(buf.is_empty());
            }
        }
    }
}

/// Writes the vectors as seeds for each fuzz target (`fuzz/corpus/TARGET/NAME`), in the form that target reads.
fn write_corpus(dir: &std::path::Path, vectors: &[(&str, &str, Vector)]) {
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let path = dir.join(target);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join(name), bytes).unwrap();
    };
    let mut stream = vec![7u8];
    let mut session = Vec::new();
    for (name, _, vector) in vectors {
        let encoded = encode(vector);
        match vector {
            Vector::Device(frame) => {
                write("device_frame", name, &encoded);
                let mut framed = BytesMut::new();
                thingport_protocol::stream::put_len(&mut framed, encoded.len());
                framed.extend_from_slice(&encoded);
                stream.extend_from_slice(&framed);
                // a session the server accepts: HELLO, data 1, 2, 3, then PING
                if [
                    "hello-token",
                    "properties-small",
                    "properties-batch",
                    "event-structured",
                    "ping",
                ]
                .contains(name)
                {
                    session.extend_from_slice(&framed);
                }
                let payload = match frame {
                    Frame::Event(e) => Some(&e.payload),
                    Frame::ServiceRequest(r) => Some(&r.params),
                    _ => None,
                };
                if let Some(value) = payload {
                    let mut buf = BytesMut::new();
                    value.encode(&mut buf);
                    write("value", name, &buf);
                }
            }
            Vector::Link(_) => {
                let mut seed = vec![encoded.len() as u8 / 2];
                seed.extend_from_slice(&encoded);
                write("link_stream", name, &seed);
            }
        }
    }
    write("device_stream", "all-vectors", &stream);
    write("server_session", "all-vectors", &session);
}
