//! The session state machines on a virtual clock: handshake, ordering, acknowledgement, retransmission after
//! reconnect, keepalive, windows and draining. Time is an `Instant` base plus offsets; nothing sleeps.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "in tests a panic is a failed assertion"
)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use thingport_protocol::{
    ByteString, Credential, DeviceConfig, DeviceEvent, DeviceSession, DeviceState, ErrorCode,
    Event, Frame, GoawayReason, Limits, Properties, PropertyUpdate, Quality, SendError,
    ServerConfig, ServerEvent, ServerSession, ServerState, SessionError, Value,
};

struct Clock(Instant);

impl Clock {
    fn at(&self, ms: u64) -> Instant {
        self.0 + Duration::from_millis(ms)
    }
}

fn device_config() -> DeviceConfig {
    DeviceConfig {
        thing: ByteString::from_static("pump-1"),
        credential: Credential::Token("tok".into()),
        keepalive_secs: 30,
        handshake_timeout: Duration::from_secs(10),
        window: 16,
        incarnation: 0x5eed,
    }
}

fn reading(v: i64) -> Frame {
    Frame::Properties(Properties {
        seq: 0,
        updates: vec![PropertyUpdate {
            name: "level".into(),
            timestamp_ms: 1_000 + v as u64,
            quality: Quality::Good,
            value: Value::Int(v),
        }],
    })
}

/// Moves every frame one way, encoding and decoding it as the wire would.
fn drain_device(device: &mut DeviceSession, now: Instant) -> Vec<Frame> {
    std::iter::from_fn(|| device.poll_transmit(now))
        .map(|f| Frame::decode(f.to_bytes(), &Limits::DEFAULT).unwrap())
        .collect()
}

fn drain_server(server: &mut ServerSession) -> Vec<Frame> {
    std::iter::from_fn(|| server.poll_transmit()).collect()
}

/// Connects a device to a fresh server session and returns the server's session.
fn handshake(device: &mut DeviceSession, now: Instant) -> ServerSession {
    let mut server = ServerSession::new(ServerConfig::default(), 7, now);
    device.connect(now);
    let hello = drain_device(device, now);
    assert_eq!(hello.len(), 1);
    let Some(ServerEvent::Hello(h)) = server.handle_frame(hello[0].clone(), now).unwrap() else {
        panic!("no hello event");
    };
    assert_eq!(h.thing, "pump-1");
    server.accept();
    for frame in drain_server(&mut server) {
        device.handle_frame(frame, now).unwrap();
    }
    assert_eq!(device.state(), DeviceState::Established);
    server
}

#[test]
fn handshake_negotiates_keepalive_and_window() {
    let clock = Clock(Instant::now());
    let mut device = DeviceSession::new(device_config(), 1, clock.at(0));
    let server = handshake(&mut device, clock.at(0));
    assert_eq!(server.state(), ServerState::Established);
    assert_eq!(server.keepalive(), Duration::from_secs(30));
}

#[test]
fn data_before_hello_is_refused() {
    let clock = Clock(Instant::now());
    let mut server = ServerSession::new(ServerConfig::default(), 1, clock.at(0));
    let err = server.handle_frame(reading(1), clock.at(1)).unwrap_err();
    assert_eq!(err, SessionError::UnexpectedFrame { frame: "PROPERTIES", state: "awaiting HELLO" });
    let Frame::Error(e) = ServerSession::error_frame(&err) else { panic!() };
    assert_eq!(e.code, ErrorCode::UNEXPECTED_FRAME);
}

#[test]
fn a_second_hello_is_refused() {
    let clock = Clock(Instant::now());
    let mut device = DeviceSession::new(device_config(), 1, clock.at(0));
    let mut server = handshake(&mut device, clock.at(0));
    device.connect(clock.at(1));
    let hello = drain_device(&mut device, clock.at(1)).remove(0);
    assert!(matches!(
        server.handle_frame(hello, clock.at(1)),
        Err(SessionError::UnexpectedFrame { .. })
    ));
}

#[test]
fn unsupported_versions_are_refused() {
    let clock = Clock(Instant::now());
    let mut server = ServerSession::new(ServerConfig::default(), 1, clock.at(0));
    let mut device = DeviceSession::new(device_config(), 1, clock.at(0));
    device.connect(clock.at(0));
    let Some(Frame::Hello(mut hello)) = device.poll_transmit(clock.at(0)) else { panic!() };
    hello.min_version = 2;
    hello.max_version = 3;
    let err = server.handle_frame(Frame::Hello(hello), clock.at(0)).unwrap_err();
    assert_eq!(err.code(), ErrorCode::UNSUPPORTED_VERSION);
}

#[test]
fn data_must_arrive_in_order() {
    let clock = Clock(Instant::now());
    let mut device = DeviceSession::new(device_config(), 1, clock.at(0));
    let mut server = handshake(&mut device, clock.at(0));
    let mut skipped = reading(1);
    skipped.set_seq(2);
    let err = server.handle_frame(skipped, clock.at(1)).unwrap_err();
    assert_eq!(err, SessionError::Sequence { expected: 1, got: 2 });
    assert_eq!(err.code(), ErrorCode::SEQUENCE_ERROR);
}

#[test]
fn acks_are_cumulative_over_out_of_order_storage() {
    let clock = Clock(Instant::now());
    let mut device = DeviceSession::new(device_config(), 1, clock.at(0));
    let mut server = handshake(&mut device, clock.at(0));
    for v in 0..3 {
        device.send(reading(v)).unwrap();
    }
    for frame in drain_device(&mut device, clock.at(1)) {
        assert!(matches!(
            server.handle_frame(frame, clock.at(1)),
            Ok(Some(ServerEvent::Data { .. }))
        ));
    }
    assert_eq!(server.in_flight(), 3);
    assert!(!server.stored(2), "a gap at 1 holds the ack back");
    assert!(drain_server(&mut server).is_empty());
    assert!(server.stored(1));
    assert_eq!(drain_server(&mut server), vec![Frame::Ack { seq: 2 }]);
    assert!(!server.stored(2), "stored twice is ignored");
    assert!(server.stored(3));
    let acks = drain_server(&mut server);
    assert_eq!(acks, vec![Frame::Ack { seq: 3 }]);
    assert_eq!(
        device.handle_frame(acks[0].clone(), clock.at(2)),
        Ok(Some(DeviceEvent::Acked { seq: 3 }))
    );
    assert_eq!(device.unacked(), 0);
}

#[test]
fn unacknowledged_data_is_retransmitted_after_reconnect() {
    let clock = Clock(Instant::now());
    let mut device = DeviceSession::new(device_config(), 1, clock.at(0));
    let mut server = handshake(&mut device, clock.at(0));
    for v in 0..3 {
        device.send(reading(v)).unwrap();
    }
    for frame in drain_device(&mut device, clock.at(1)) {
        server.handle_frame(frame, clock.at(1)).unwrap();
    }
    server.stored(1);
    for frame in drain_server(&mut server) {
        device.handle_frame(frame, clock.at(2)).unwrap();
    }
    // the connection drops with 2 and 3 unacknowledged; a 4th reading is taken while offline
    device.disconnected();
    assert_eq!(device.send(reading(3)), Ok(4));
    assert!(
        drain_device(&mut device, clock.at(3)).is_empty(),
        "nothing goes out while disconnected"
    );

    let mut server = ServerSession::new(ServerConfig::default(), 8, clock.at(4));
    device.connect(clock.at(4));
    let hello = drain_device(&mut device, clock.at(4));
    let [Frame::Hello(h)] = &hello[..] else { panic!("{hello:?}") };
    assert_eq!(h.resume_seq, 2);
    server.handle_frame(hello[0].clone(), clock.at(4)).unwrap();
    server.accept();
    for frame in drain_server(&mut server) {
        device.handle_frame(frame, clock.at(5)).unwrap();
    }
    let resent: Vec<u64> =
        drain_device(&mut device, clock.at(5)).iter().filter_map(Frame::seq).collect();
    assert_eq!(resent, vec![2, 3, 4]);
}

#[test]
fn a_replayed_acknowledged_frame_is_a_sequence_error() {
    let clock = Clock(Instant::now());
    let mut device = DeviceSession::new(device_config(), 5, clock.at(0));
    let mut server = handshake(&mut device, clock.at(0));
    let mut old = reading(0);
    old.set_seq(4);
    assert_eq!(
        server.handle_frame(old, clock.at(1)),
        Err(SessionError::Sequence { expected: 5, got: 4 })
    );
}

#[test]
fn keepalive_pings_then_declares_the_server_dead() {
    let clock = Clock(Instant::now());
    let mut device = DeviceSession::new(device_config(), 1, clock.at(0));
    let _server = handshake(&mut device, clock.at(0));
    assert_eq!(device.poll_timeout(), Some(clock.at(30_000)));
    device.handle_timeout(clock.at(29_999)).unwrap();
    assert!(drain_device(&mut device, clock.at(29_999)).is_empty());
    device.handle_timeout(clock.at(30_000)).unwrap();
    assert_eq!(drain_device(&mut device, clock.at(30_000)), vec![Frame::Ping { nonce: 1 }]);
    // no pong: dead 1.5 keepalives after the last thing received
    assert_eq!(device.poll_timeout(), Some(clock.at(45_000)));
    assert_eq!(device.handle_timeout(clock.at(45_000)), Err(SessionError::KeepaliveTimeout));
}

#[test]
fn a_pong_keeps_the_device_alive() {
    let clock = Clock(Instant::now());
    let mut device = DeviceSession::new(device_config(), 1, clock.at(0));
    let mut server = handshake(&mut device, clock.at(0));
    device.handle_timeout(clock.at(30_000)).unwrap();
    for ping in drain_device(&mut device, clock.at(30_000)) {
        server.handle_frame(ping, clock.at(30_010)).unwrap();
    }
    for pong in drain_server(&mut server) {
        assert_eq!(pong, Frame::Pong { nonce: 1 });
        device.handle_frame(pong, clock.at(30_020)).unwrap();
    }
    device.handle_timeout(clock.at(45_000)).unwrap();
    server.handle_timeout(clock.at(45_000)).unwrap();
    assert_eq!(server.poll_timeout(), Some(clock.at(75_010)));
    assert_eq!(server.handle_timeout(clock.at(75_010)), Err(SessionError::KeepaliveTimeout));
}

#[test]
fn handshake_deadlines() {
    let clock = Clock(Instant::now());
    let mut server = ServerSession::new(ServerConfig::default(), 1, clock.at(0));
    assert_eq!(server.poll_timeout(), Some(clock.at(10_000)));
    // a HELLO that is never accepted does not extend the deadline
    let mut device = DeviceSession::new(device_config(), 1, clock.at(0));
    device.connect(clock.at(9_000));
    for f in drain_device(&mut device, clock.at(9_000)) {
        server.handle_frame(f, clock.at(9_000)).unwrap();
    }
    assert_eq!(server.handle_timeout(clock.at(10_000)), Err(SessionError::HandshakeTimeout));
    assert_eq!(device.handle_timeout(clock.at(19_000)), Err(SessionError::HandshakeTimeout));
}

#[test]
fn windows_bound_unacknowledged_data() {
    let clock = Clock(Instant::now());
    let mut config = device_config();
    config.window = 2;
    let mut device = DeviceSession::new(config, 1, clock.at(0));
    device.send(reading(0)).unwrap();
    device.send(reading(1)).unwrap();
    assert_eq!(device.send(reading(2)), Err(SendError::WindowFull));
    assert_eq!(device.send(Frame::Ping { nonce: 1 }), Err(SendError::NotData));

    // a device ignoring the server's window
    let mut server =
        ServerSession::new(ServerConfig { window: 1, ..ServerConfig::default() }, 1, clock.at(0));
    let mut device = DeviceSession::new(device_config(), 1, clock.at(0));
    device.connect(clock.at(0));
    for f in drain_device(&mut device, clock.at(0)) {
        server.handle_frame(f, clock.at(0)).unwrap();
    }
    server.accept();
    let mut f1 = reading(0);
    f1.set_seq(1);
    let mut f2 = reading(1);
    f2.set_seq(2);
    server.handle_frame(f1, clock.at(1)).unwrap();
    let err = server.handle_frame(f2, clock.at(1)).unwrap_err();
    assert_eq!(err, SessionError::WindowExceeded { limit: 1 });
}

#[test]
fn goaway_stops_new_data_but_not_acks() {
    let clock = Clock(Instant::now());
    let mut device = DeviceSession::new(device_config(), 1, clock.at(0));
    let mut server = handshake(&mut device, clock.at(0));
    device.send(reading(0)).unwrap();
    for f in drain_device(&mut device, clock.at(1)) {
        server.handle_frame(f, clock.at(1)).unwrap();
    }
    server.goaway(GoawayReason::DRAINING, 2_000, "restarting");
    server.stored(1);
    let out = drain_server(&mut server);
    assert!(
        matches!(&out[0], Frame::Goaway(g) if g.reason == GoawayReason::DRAINING && g.reconnect_after_ms == 2_000)
    );
    assert_eq!(out[1], Frame::Ack { seq: 1 });
    for f in out {
        device.handle_frame(f, clock.at(2)).unwrap();
    }
    assert_eq!(device.state(), DeviceState::Draining);
    assert_eq!(device.unacked(), 0);
    device.send(reading(1)).unwrap();
    assert!(drain_device(&mut device, clock.at(3)).is_empty(), "no new data while draining");
    assert_eq!(device.unacked(), 1, "kept for the next connection");
}

#[test]
fn server_data_is_stamped_and_acknowledged() {
    let clock = Clock(Instant::now());
    let mut device = DeviceSession::new(device_config(), 1, clock.at(0));
    let mut server = handshake(&mut device, clock.at(0));
    let from_worker = Frame::Event(Event {
        seq: 0,
        timestamp_ms: 9,
        name: "reboot".into(),
        payload: Value::Null,
    });
    for expected in 1..=2 {
        let stamped = server.stamp(&from_worker.to_bytes()).unwrap();
        let frame = Frame::decode(stamped, &Limits::DEFAULT).unwrap();
        assert_eq!(frame.seq(), Some(expected));
        assert!(matches!(device.handle_frame(frame, clock.at(1)), Ok(Some(DeviceEvent::Data(_)))));
    }
    assert_eq!(server.unacked_sent(), 2);
    let acks = drain_device(&mut device, clock.at(2));
    assert_eq!(acks, vec![Frame::Ack { seq: 2 }], "one coalesced ack");
    assert_eq!(
        server.handle_frame(acks[0].clone(), clock.at(3)),
        Ok(Some(ServerEvent::Acked { seq: 2 }))
    );
    assert_eq!(server.unacked_sent(), 0);
    assert!(matches!(
        server.handle_frame(Frame::Ack { seq: 3 }, clock.at(3)),
        Err(SessionError::AckBeyondSent { acked: 3, sent: 2 })
    ));
    assert_eq!(server.stamp(&[0x07, 1]), Err(SendError::NotData));
}

#[test]
fn refusal_reaches_the_device_with_its_code() {
    let clock = Clock(Instant::now());
    let mut server = ServerSession::new(ServerConfig::default(), 1, clock.at(0));
    let mut device = DeviceSession::new(device_config(), 1, clock.at(0));
    device.connect(clock.at(0));
    for f in drain_device(&mut device, clock.at(0)) {
        server.handle_frame(f, clock.at(0)).unwrap();
    }
    server.refuse(ErrorCode::TOKEN_EXPIRED, 0, "token expired");
    let frames = drain_server(&mut server);
    let err = device.handle_frame(frames[0].clone(), clock.at(1)).unwrap_err();
    assert!(matches!(err, SessionError::Peer { code: ErrorCode::TOKEN_EXPIRED, .. }));
    assert_eq!(device.state(), DeviceState::Disconnected);
    assert_eq!(server.state(), ServerState::Closed);
}

// ---------------------------------------------------------------------------------------------------------------
// Deterministic simulation: a device and the server over a lossy connection that drops at random, workers that
// store frames out of order. Every reading taken must end up stored, and nothing is acknowledged before it is.
// ---------------------------------------------------------------------------------------------------------------

/// A tiny deterministic generator (xorshift64*), seeded by proptest.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn simulate(seed: u64, readings: i64) {
    let clock = Clock(Instant::now());
    let mut rng = Rng(seed | 1);
    let mut device =
        DeviceSession::new(DeviceConfig { window: 8, ..device_config() }, 1, clock.at(0));
    let mut server: Option<ServerSession> = None;
    // frames on the wire each way, and frames the workers hold before storing (seq, value)
    let mut to_server: VecDeque<Frame> = VecDeque::new();
    let mut to_device: VecDeque<Frame> = VecDeque::new();
    let mut workers: Vec<(u64, i64)> = Vec::new();
    // what the store holds: by sequence number, as the foundation dedups
    let mut store = std::collections::BTreeMap::new();
    let mut taken = 0;
    let mut ms = 0;

    for _step in 0..20_000 {
        ms += 1 + rng.next() % 20;
        let now = clock.at(ms);
        if taken < readings && device.can_send() {
            device.send(reading(taken)).unwrap();
            taken += 1;
        }
        match (&mut server, device.state()) {
            (None, DeviceState::Disconnected) => {
                server = Some(ServerSession::new(ServerConfig::default(), ms, now));
                device.connect(now);
            }
            (Some(s), _) if rng.chance(2) => {
                // the connection drops: whatever was on the wire is lost, workers still finish their frames
                let _ = s;
                server = None;
                device.disconnected();
                to_server.clear();
                to_device.clear();
                continue;
            }
            _ => {}
        }
        let Some(srv) = server.as_mut() else { continue };
        while let Some(f) = device.poll_transmit(now) {
            to_server.push_back(f);
        }
        while let Some(frame) = to_server.pop_front() {
            let value = match &frame {
                Frame::Properties(p) => p.updates.first().map(|u| u.value.clone()),
                _ => None,
            };
            match srv.handle_frame(frame, now) {
                Ok(Some(ServerEvent::Hello(_))) => {
                    srv.accept();
                }
                Ok(Some(ServerEvent::Data { seq })) => {
                    let Some(Value::Int(v)) = value else { panic!("not a reading") };
                    workers.push((seq, v));
                }
                Ok(_) => {}
                Err(e) => panic!("protocol error in simulation: {e}"),
            }
        }
        // workers store some of their frames, in random order
        let mut i = 0;
        while i < workers.len() {
            if rng.chance(40) {
                let (seq, v) = workers.swap_remove(i);
                let previous = store.insert(seq, v);
                assert!(previous.is_none_or(|p| p == v), "seq {seq} stored with two values");
                srv.stored(seq);
            } else {
                i += 1;
            }
        }
        while let Some(f) = srv.poll_transmit() {
            to_device.push_back(f);
        }
        while let Some(frame) = to_device.pop_front() {
            if let Ok(Some(DeviceEvent::Acked { seq })) = device.handle_frame(frame, now) {
                assert!(
                    (1..=seq).all(|s| store.contains_key(&s)),
                    "acked {seq} before it was stored"
                );
            }
        }
        if taken == readings && device.unacked() == 0 {
            break;
        }
    }
    assert_eq!(device.unacked(), 0, "seed {seed}: readings left unacknowledged");
    assert_eq!(store.len() as i64, readings);
    for (seq, v) in store {
        assert_eq!(seq as i64, v + 1, "seq {seq} holds another reading");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn lossy_connection_loses_no_reading(seed: u64) {
        simulate(seed, 60);
    }
}

#[test]
fn a_backlog_is_retransmitted_within_the_servers_window() {
    let clock = Clock(Instant::now());
    let mut device =
        DeviceSession::new(DeviceConfig { window: 10, ..device_config() }, 1, clock.at(0));
    for v in 0..10 {
        device.send(reading(v)).unwrap();
    }
    let mut server =
        ServerSession::new(ServerConfig { window: 4, ..ServerConfig::default() }, 1, clock.at(0));
    device.connect(clock.at(0));
    for f in drain_device(&mut device, clock.at(0)) {
        server.handle_frame(f, clock.at(0)).unwrap();
    }
    server.accept();
    for f in drain_server(&mut server) {
        device.handle_frame(f, clock.at(1)).unwrap();
    }
    let first: Vec<u64> =
        drain_device(&mut device, clock.at(1)).iter().filter_map(Frame::seq).collect();
    assert_eq!(first, vec![1, 2, 3, 4], "only the server's window goes out");
    for seq in first {
        let mut f = reading(0);
        f.set_seq(seq);
        server.handle_frame(f, clock.at(2)).unwrap();
        server.stored(seq);
    }
    for f in drain_server(&mut server) {
        device.handle_frame(f, clock.at(3)).unwrap();
    }
    let next: Vec<u64> =
        drain_device(&mut device, clock.at(3)).iter().filter_map(Frame::seq).collect();
    assert_eq!(next, vec![5, 6, 7, 8]);
}

#[test]
fn a_device_streaming_into_silence_pings_and_gives_up() {
    let clock = Clock(Instant::now());
    let mut device =
        DeviceSession::new(DeviceConfig { window: 1_000, ..device_config() }, 1, clock.at(0));
    let _server = handshake(&mut device, clock.at(0));
    // data goes out every second; nothing comes back
    let mut pinged = false;
    for s in 1..=45u64 {
        let now = clock.at(s * 1_000);
        device.send(reading(s as i64)).unwrap();
        match device.handle_timeout(now) {
            Ok(()) => {}
            Err(e) => {
                assert_eq!(e, SessionError::KeepaliveTimeout);
                assert!(pinged, "a ping went out before giving up");
                assert_eq!(s, 45);
                return;
            }
        }
        pinged |= drain_device(&mut device, now).contains(&Frame::Ping { nonce: 1 });
    }
    panic!("the silent server was never declared dead");
}

#[test]
fn keepalive_zero_sets_no_timer() {
    let clock = Clock(Instant::now());
    let mut device = DeviceSession::new(device_config(), 1, clock.at(0));
    device.connect(clock.at(0));
    drain_device(&mut device, clock.at(0));
    let welcome = Frame::Welcome(thingport_protocol::Welcome {
        version: 1,
        session_id: 1,
        keepalive_secs: 0,
        max_frame: 65_536,
        max_batch: 256,
        window: 8,
    });
    device.handle_frame(welcome, clock.at(1)).unwrap();
    assert_eq!(device.poll_timeout(), None);
}
