//! A gateway's session fed whatever frames a device sends, with time moving as the input says: it must never
//! panic, and what it acknowledges must have been stored.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use thingport_protocol::{Frame, Limits, ServerConfig, ServerEvent, ServerSession, stream};

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut now = start;
    let mut session = ServerSession::new(ServerConfig::default(), 1, start);
    let mut buf = thingport_protocol::BytesMut::from(data);
    let mut stored_up_to = 0u64;
    while let Ok(Some(raw)) = stream::next_frame(&mut buf, Limits::DEFAULT.max_frame) {
        now += Duration::from_millis(u64::from(raw.len() as u8) * 100);
        if session.handle_timeout(now).is_err() {
            return;
        }
        let Ok(frame) = Frame::decode(raw, &Limits::DEFAULT) else { return };
        match session.handle_frame(frame, now) {
            Ok(Some(ServerEvent::Hello(_))) => {
                session.accept();
            }
            Ok(Some(ServerEvent::Data { seq })) => {
                // store every other frame at once, so gaps appear and fill
                if seq % 2 == 0 {
                    session.stored(seq);
                    session.stored(seq - 1);
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
        while let Some(frame) = session.poll_transmit() {
            if let Frame::Ack { seq } = frame {
                assert!(seq >= stored_up_to);
                stored_up_to = seq;
            }
        }
    }
});
