//! The gateway under change: a worker killed mid-stream, drain on shutdown, certificate reload, a thing that
//! connects twice, and admission limits.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "in tests a panic is a failed assertion"
)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::{Harness, wait_for, within, write_cert};
use thingport_device::{Closed, DeviceError, FrameConn, Transport};
use thingport_protocol::{
    DeviceEvent, Frame, GoawayReason, Properties, PropertyUpdate, Quality, Value,
};

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

#[tokio::test]
async fn killing_one_of_two_workers_mid_stream_loses_no_acknowledged_frame() {
    let mut harness = Harness::start(2, |c| c.session.window = 32).await;
    let mut device = harness.device("pump-1");
    within("connect", device.connect(&harness.endpoint(Transport::Wss))).await.unwrap();
    const TOTAL: u64 = 600;
    let mut sent = 0;
    let mut acked = 0;
    let mut killed = None;
    within("all acknowledged", async {
        while acked < TOTAL {
            while sent < TOTAL && device.session.can_send() {
                device.send(reading(sent as i64)).await.unwrap();
                sent += 1;
            }
            if acked >= TOTAL / 3 && killed.is_none() {
                // kill worker 0 while frames are in flight on its links
                let worker = harness.workers.remove(0);
                let stored = worker.kill().await;
                killed = Some(stored.get("pump-1").cloned().unwrap_or_default());
            }
            if let DeviceEvent::Acked { seq } = device.next_event().await.unwrap() {
                acked = seq;
            }
        }
    })
    .await;
    // every acknowledged frame was stored by a worker: the killed one before it died, or the survivor
    let mut stored: BTreeSet<u64> = killed.unwrap().into_iter().collect();
    stored.extend(harness.workers[0].stored("pump-1"));
    let missing: Vec<u64> = (1..=TOTAL).filter(|s| !stored.contains(s)).collect();
    assert!(missing.is_empty(), "acknowledged but never stored: {missing:?}");
    let (_, metrics) = harness.admin_get("/metrics").await;
    assert!(metrics.contains("thingport_gateway_link_events_total{event=\"failed\"}"), "{metrics}");
    device.disconnect().await;
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_drains_with_goaway_and_acknowledges_in_flight_data() {
    let mut harness = Harness::start(1, |_| {}).await;
    let mut wss = harness.device("pump-1");
    let mut quic = harness.device("pump-2");
    within("connect", wss.connect(&harness.endpoint(Transport::Wss))).await.unwrap();
    within("connect", quic.connect(&harness.endpoint(Transport::Quic))).await.unwrap();
    wss.send(reading(1)).await.unwrap();
    harness.shutdown();
    for device in [&mut wss, &mut quic] {
        let mut goaway = None;
        let end = within("drain", async {
            loop {
                match device.next_event().await {
                    Ok(DeviceEvent::Goaway(g)) => goaway = Some(g),
                    Ok(_) => {}
                    Err(e) => return e,
                }
            }
        })
        .await;
        let goaway = goaway.expect("GOAWAY before the close");
        assert_eq!(goaway.reason, GoawayReason::DRAINING);
        assert_eq!(goaway.reconnect_after_ms, 2_000);
        assert!(matches!(end, DeviceError::Closed(Closed::Code(1000 | 0))), "{end:?}");
        assert_eq!(device.session.unacked(), 0, "in-flight data acknowledged before the close");
    }
    // new connections are refused while draining, and the gateway finishes
    harness.run.take().unwrap().await.unwrap().unwrap();
    assert!(FrameConn::connect(&harness.endpoint(Transport::Wss)).await.is_err());
}

#[tokio::test]
async fn reload_swaps_the_certificate_for_new_handshakes_only() {
    let harness = Harness::start(1, |_| {}).await;
    let mut old_session = harness.device("pump-1");
    within("connect", old_session.connect(&harness.endpoint(Transport::Wss))).await.unwrap();

    // replace the files with a new pair and reload
    let fresh = tempfile::tempdir().unwrap();
    let (cert, key) = write_cert(fresh.path(), "next");
    let config_cert = harness.dir.path().join("server.pem");
    let config_key = harness.dir.path().join("server.key");
    std::fs::copy(&cert, &config_cert).unwrap();
    std::fs::copy(&key, &config_key).unwrap();
    harness.handle.reload().unwrap();

    let new_cert = support::read_cert(&cert);
    let mut trusting_new = harness.endpoint(Transport::Wss);
    trusting_new.wss_tls =
        thingport_device::tls_config(std::slice::from_ref(&new_cert), b"http/1.1").unwrap();
    let mut device = harness.device("pump-2");
    within("connect with the new certificate", device.connect(&trusting_new)).await.unwrap();
    // a client trusting only the old certificate now fails its handshake
    assert!(FrameConn::connect(&harness.endpoint(Transport::Wss)).await.is_err());

    // the session opened before the reload still works
    old_session.send(reading(5)).await.unwrap();
    within("ack on the old session", async {
        loop {
            if let DeviceEvent::Acked { .. } = old_session.next_event().await.unwrap() {
                return;
            }
        }
    })
    .await;

    // a broken pair is refused and the current one kept
    std::fs::write(&config_cert, "not a certificate").unwrap();
    assert!(harness.handle.reload().is_err());
    let mut again = harness.device("pump-3");
    within("connect after a refused reload", again.connect(&trusting_new)).await.unwrap();
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn a_second_session_for_a_thing_replaces_the_first() {
    let harness = Harness::start(1, |_| {}).await;
    let mut first = harness.device("pump-1");
    within("connect", first.connect(&harness.endpoint(Transport::Wss))).await.unwrap();
    let mut second = harness.device("pump-1");
    within("connect", second.connect(&harness.endpoint(Transport::Quic))).await.unwrap();
    let goaway = within("goaway", async {
        loop {
            if let DeviceEvent::Goaway(g) = first.next_event().await.unwrap() {
                return g;
            }
        }
    })
    .await;
    assert_eq!(goaway.reason, GoawayReason::REPLACED);
    assert!(matches!(within("close", first.next_event()).await, Err(DeviceError::Closed(_))));
    second.send(reading(1)).await.unwrap();
    within("the new session works", async {
        loop {
            if let DeviceEvent::Acked { .. } = second.next_event().await.unwrap() {
                return;
            }
        }
    })
    .await;
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn session_caps_apply_to_both_transports() {
    let harness = Harness::start(1, |c| {
        c.limits.max_sessions = 2;
    })
    .await;
    let mut a = harness.device("a");
    let mut b = harness.device("b");
    within("connect", a.connect(&harness.endpoint(Transport::Wss))).await.unwrap();
    within("connect", b.connect(&harness.endpoint(Transport::Quic))).await.unwrap();
    for transport in [Transport::Wss, Transport::Quic] {
        assert!(
            FrameConn::connect(&harness.endpoint(transport)).await.is_err(),
            "{transport:?} over the cap"
        );
    }
    let (_, metrics) = harness.admin_get("/metrics").await;
    for transport in ["wss", "quic"] {
        let line = format!(
            "thingport_gateway_refused_total{{transport=\"{transport}\",reason=\"max_sessions\"}}"
        );
        assert!(metrics.contains(&line), "{line} missing");
    }
    // a slot frees when a session ends
    a.disconnect().await;
    let handle = harness.handle.clone();
    wait_for("slot freed", || handle.sessions() == 1).await;
    let mut c = harness.device("c");
    within("connect", async {
        loop {
            if c.connect(&harness.endpoint(Transport::Wss)).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn a_flooding_device_is_paced_to_its_rate() {
    let harness = Harness::start(1, |c| c.limits.message_rate = 50).await;
    let mut device = harness.device("flood");
    within("connect", device.connect(&harness.endpoint(Transport::Wss))).await.unwrap();
    // 150 frames at a rate of 50/s with a burst of 50: the last can be acknowledged no sooner than ~2 s
    let started = std::time::Instant::now();
    let mut sent = 0;
    let mut acked = 0;
    within("all acknowledged", async {
        while acked < 150 {
            while sent < 150 && device.session.can_send() {
                device.send(reading(sent)).await.unwrap();
                sent += 1;
            }
            if let DeviceEvent::Acked { seq } = device.next_event().await.unwrap() {
                acked = seq;
            }
        }
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(1_800),
        "not paced: {:?}",
        started.elapsed()
    );
    harness.stop().await.unwrap();
}
