//! A worker that stops drains its gateway links: it says `GOAWAY`, and answers every frame the gateway had sent
//! before the link closes (docs/PROTOCOL.md §8.12).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "in tests a panic is a failed assertion"
)]

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::StreamExt;
use thingport_foundation::{Config, Worker};
use thingport_protocol::codec::LinkCodec;
use thingport_protocol::link::{LINK_VERSION, Transport};
use thingport_protocol::{Frame, LinkFrame, Properties, PropertyUpdate, Quality, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), future)
        .await
        .unwrap_or_else(|_| panic!("{what} took over 30 s"))
}

fn reading(seq: u64) -> Frame {
    Frame::Properties(Properties {
        seq,
        updates: vec![PropertyUpdate {
            name: "level".into(),
            timestamp_ms: 1_000 + seq,
            quality: Quality::Good,
            value: Value::Int(seq as i64),
        }],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_says_goaway_and_answers_what_the_gateway_sent_before_it_closes() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, "key-1\n").unwrap();
    let config = Config {
        link_address: "127.0.0.1:0".parse().unwrap(),
        api_address: "127.0.0.1:0".parse().unwrap(),
        peer_address: "127.0.0.1:0".parse().unwrap(),
        admin_address: None,
        api_keys_file: keys,
        storage: thingport_foundation::config::StorageConfig {
            data_dir: dir.path().join("store"),
            ..Default::default()
        },
        ..Config::default()
    };
    let limits = config.limits();
    let worker = Worker::bind(config).await.unwrap();
    let link = worker.addrs().link;
    let mut version = worker.table_version();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(worker.run(async move {
        let _ = stopped.await;
    }));
    within("the first table", version.wait_for(|v| *v > 0)).await.unwrap();

    let stream = TcpStream::connect(link).await.unwrap();
    let (reader, mut writer) = stream.into_split();
    let mut frames = FramedRead::new(reader, LinkCodec::new(limits));
    let hello =
        LinkFrame::Hello { version: LINK_VERSION, gateway_id: "gw-1".into(), link_index: 0 };
    writer.write_all(&hello.to_framed_bytes()).await.unwrap();
    let welcome = within("WELCOME", frames.next()).await.unwrap().unwrap();
    assert!(matches!(welcome, LinkFrame::Welcome { .. }), "{welcome:?}");

    // frames in flight when the worker is told to stop: all of them must be answered before the link closes
    let (session_id, incarnation, sent) = (7, 1, 500);
    let open = LinkFrame::Open {
        session_id,
        thing: "pump-1".into(),
        transport: Transport::Wss,
        incarnation,
        resume_seq: 1,
    };
    let mut out = open.to_framed_bytes().to_vec();
    for seq in 1..=sent {
        let upstream = LinkFrame::Upstream {
            session_id,
            incarnation,
            thing: "pump-1".into(),
            frame: reading(seq).to_bytes(),
        };
        out.extend_from_slice(&upstream.to_framed_bytes());
    }
    writer.write_all(&out).await.unwrap();
    stop.send(()).unwrap();

    let mut stored = BTreeSet::new();
    let mut goaway = false;
    let mut pinged = false;
    while let Some(frame) = within("the link's next frame", frames.next()).await {
        match frame.unwrap() {
            LinkFrame::Stored { seq, .. } => {
                stored.insert(seq);
            }
            LinkFrame::StoredRun { first, last, .. } => stored.extend(first..=last),
            LinkFrame::Goaway => goaway = true,
            LinkFrame::Ping { nonce } => {
                assert!(goaway, "the drain's PING comes after GOAWAY");
                pinged = true;
                // the gateway's PONG follows what it queued before it read the GOAWAY
                let pong = LinkFrame::Pong { nonce };
                writer.write_all(&pong.to_framed_bytes()).await.unwrap();
            }
            _ => {}
        }
    }
    assert!(goaway, "the worker said GOAWAY before closing the link");
    assert!(pinged);
    assert_eq!(
        stored,
        (1..=sent).collect::<BTreeSet<u64>>(),
        "every frame sent before the stop is answered"
    );
    within("the worker's exit", run).await.unwrap().unwrap();
}
