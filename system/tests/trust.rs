//! A pool with credentials (`thingport-foundation pool init`): its workers, on two "hosts", join and serve a
//! gateway over mutual TLS and sealed membership datagrams, and a process without the pool's credentials gets
//! nothing on any of its ports.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "in tests a panic is a failed assertion"
)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use serde_json::json;
use support::process::{Spec, WorkerProcess, cluster_until, get_text, settled_on};
use support::{KEY, device, http, within};
use thingport_protocol::codec::LinkCodec;
use thingport_protocol::link::LINK_VERSION;
use thingport_protocol::peer::{PEER_VERSION, PeerMessage, Request};
use thingport_protocol::{
    DeviceEvent, Frame, LinkFrame, Properties, PropertyUpdate, Quality, Value,
};
use thingport_shell::pool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Decoder;

fn with_pool(spec: Spec, credentials: &Path) -> Spec {
    Spec { extra: format!("pool_credentials = \"{}\"", credentials.display()), ..spec }
}

/// A counter of `worker`'s metrics (0 while absent).
async fn metric(worker: &WorkerProcess, line: &str) -> u64 {
    let (_, body) = get_text(worker.admin, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(line))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

async fn metric_reaches(worker: &WorkerProcess, line: &str, at_least: u64) {
    within(line, async {
        while metric(worker, line).await < at_least {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// What a plain TCP client that sends `hello` reads back: nothing of the protocol it spoke.
async fn plain_answer(addr: SocketAddr, hello: &[u8]) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(hello).await.unwrap();
    let mut got = Vec::new();
    let _ = within("the refusal", stream.read_to_end(&mut got)).await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_members_of_the_pool_join_link_or_talk_to_its_workers() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    support::api_keys(dir);
    // the first host makes the pool; the second host's credentials are issued on it and copied over
    let host1 = dir.join("pool");
    pool::init(&host1, "host-1").unwrap();
    let host2 = dir.join("host-2");
    pool::issue(&host1, &host2, "host-2", pool::Member::Worker).unwrap();
    let gateway_host = dir.join("gateway-host");
    pool::issue(&host1, &gateway_host, "gw-1", pool::Member::Gateway).unwrap();
    let w1 = with_pool(Spec::new(dir, "w1", &[], 2), &host1).spawn().await;
    let w2 = with_pool(Spec::new(dir, "w2", &[w1.peer], 2), &host2).spawn().await;
    cluster_until(w1.api, "two members", |v| settled_on(v, &["w1", "w2"])).await;

    // a gateway with a gateway's credentials links to both, and what its devices send is stored and readable
    let gateway = support::gateway_tuned(dir, vec![w1.link, w2.link], |c| {
        c.upstream.pool_credentials = Some(gateway_host.clone());
    })
    .await;
    let mut dev = device("pump-1");
    within("connect", dev.connect(&gateway.endpoint)).await.unwrap();
    let frame = Frame::Properties(Properties {
        seq: 0,
        updates: vec![PropertyUpdate {
            name: "level".into(),
            timestamp_ms: 1_000,
            quality: Quality::Good,
            value: Value::Int(42),
        }],
    });
    let seq = dev.send(frame).await.unwrap();
    within("the acknowledgement", async {
        loop {
            if let Some(DeviceEvent::Acked { seq: acked }) = dev.recv_event().await.unwrap()
                && acked >= seq
            {
                return;
            }
        }
    })
    .await;
    for w in [&w1, &w2] {
        let (status, property) =
            http(w.api, "GET", "/v1/things/pump-1/properties/level", Some(KEY), None).await;
        assert_eq!((status, property["value"].clone()), (200, json!(42)), "read on {}", w.id);
    }

    // strangers: a worker without credentials and one of another pool try to join through w1
    let other = dir.join("other");
    pool::init(&other, "elsewhere").unwrap();
    let _w3 = Spec::new(dir, "w3", &[w1.peer], 1).spawn().await;
    let _w4 = with_pool(Spec::new(dir, "w4", &[w1.peer], 1), &other).spawn().await;
    // each announces itself again and again; w1 opens none of it
    metric_reaches(&w1, "thingport_foundation_membership_refused_total ", 6).await;
    let (_, view) = http(w1.api, "GET", "/v1/cluster", Some(KEY), None).await;
    let ids: Vec<&str> =
        view["members"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["w1", "w2"], "no stranger joined: {view:#}");

    // a link in the clear gets no WELCOME, a peer connection in the clear no answer
    let hello =
        LinkFrame::Hello { version: LINK_VERSION, gateway_id: "gw-x".into(), link_index: 0 };
    let got = plain_answer(w1.link, &hello.to_framed_bytes()).await;
    let decoded =
        LinkCodec::new(thingport_protocol::Limits::DEFAULT).decode(&mut BytesMut::from(&got[..]));
    assert!(
        !matches!(decoded, Ok(Some(LinkFrame::Welcome { .. }))),
        "a WELCOME in the clear: {got:?}"
    );
    let mut request = PeerMessage::Hello { version: PEER_VERSION, member: "x#1".into() }
        .to_framed_bytes()
        .unwrap()
        .to_vec();
    let read = PeerMessage::Request { id: 1, body: Request::Read { thing: "pump-1".into() } };
    request.extend_from_slice(&read.to_framed_bytes().unwrap());
    let got = plain_answer(w1.peer, &request).await;
    assert!(!String::from_utf8_lossy(&got).contains("level"), "a peer answer in the clear");
    metric_reaches(&w1, "thingport_foundation_handshakes_refused_total{port=\"link\"} ", 1).await;
    metric_reaches(&w1, "thingport_foundation_handshakes_refused_total{port=\"peer\"} ", 1).await;

    // a gateway's credentials open links, and nothing on the peer port
    let gateway_creds = pool::Credentials::load(&gateway_host).unwrap();
    let as_peer = gateway_creds.connector(pool::PEER_ALPN).unwrap();
    if let Ok(mut stream) = pool::connect(Some(&as_peer), w1.peer, Duration::from_secs(5)).await {
        let _ = stream.write_all(&request).await;
        let mut got = Vec::new();
        let read = within("the refusal", stream.read_to_end(&mut got)).await;
        assert!(
            read.is_err() || got.is_empty(),
            "a gateway's certificate was answered on the peer port"
        );
    }
    metric_reaches(&w1, "thingport_foundation_handshakes_refused_total{port=\"peer\"} ", 2).await;

    // another pool's member cannot link either
    let stranger = pool::Credentials::load(&other).unwrap().connector(pool::LINK_ALPN).unwrap();
    let refused = pool::connect(Some(&stranger), w1.link, Duration::from_secs(5)).await;
    match refused {
        Err(_) => {}
        Ok(mut stream) => {
            let _ = stream.write_all(&hello.to_framed_bytes()).await;
            let mut got = Vec::new();
            assert!(
                within("the refusal", stream.read_to_end(&mut got)).await.is_err()
                    || got.is_empty(),
                "another pool's member was answered"
            );
        }
    }
    dev.disconnect().await;
    let _ = gateway.stop.send(());
}
