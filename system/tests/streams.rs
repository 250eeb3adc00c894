//! Streams of changes (Server-Sent Events) from two worker processes: a stream served by one worker carries the
//! changes the other acknowledged, resumes with `Last-Event-ID` without losing any, and a client that reads nothing
//! is cut at its buffer while another keeps receiving.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "in tests a panic is a failed assertion"
)]

mod support;

use std::net::SocketAddr;

use serde_json::{Value as Json, json};
use support::process::{Spec, WorkerProcess, cluster_until, settled_on};
use support::{KEY, http, within};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One event of a stream.
#[derive(Debug, Clone, PartialEq)]
struct Event {
    kind: String,
    id: Option<String>,
    data: Json,
}

/// A stream read line by line (an HTTP/1.0 request, so that the body is not chunked).
struct Stream {
    lines: BufReader<TcpStream>,
}

impl Stream {
    /// Opens `path` on `api`; returns the status and, for 200, the stream.
    async fn open(api: SocketAddr, path: &str, last_event_id: Option<&str>) -> (u16, Stream) {
        Self::open_on(TcpStream::connect(api).await.unwrap(), path, last_event_id).await
    }

    async fn open_on(mut tcp: TcpStream, path: &str, last_event_id: Option<&str>) -> (u16, Stream) {
        let resume = last_event_id.map(|id| format!("last-event-id: {id}\r\n")).unwrap_or_default();
        let request = format!("GET {path} HTTP/1.0\r\nx-api-key: {KEY}\r\n{resume}\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut lines = BufReader::new(tcp);
        let mut status = String::new();
        lines.read_line(&mut status).await.unwrap();
        let status = status.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        loop {
            let mut header = String::new();
            lines.read_line(&mut header).await.unwrap();
            if header.trim().is_empty() {
                break;
            }
        }
        (status, Stream { lines })
    }

    /// The next event with data (heartbeats, which carry only an id, are skipped); `None` at the end.
    async fn next(&mut self) -> Option<Event> {
        let (mut kind, mut id, mut data) = (String::from("message"), None, String::new());
        loop {
            let mut line = String::new();
            if self.lines.read_line(&mut line).await.unwrap_or(0) == 0 {
                return None;
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if data.is_empty() {
                    continue;
                }
                let data = serde_json::from_str(&data).unwrap();
                return Some(Event { kind, id, data });
            }
            match line.split_once(':') {
                Some(("event", v)) => kind = v.trim_start().to_string(),
                Some(("id", v)) => id = Some(v.trim_start().to_string()),
                Some(("data", v)) => data.push_str(v.trim_start()),
                _ => {}
            }
        }
    }

    /// The next event, within 10 s.
    async fn expect(&mut self, what: &str) -> Event {
        within(what, self.next()).await.unwrap_or_else(|| panic!("the stream ended before {what}"))
    }
}

async fn two_workers(dir: &std::path::Path, extra: &str) -> Vec<WorkerProcess> {
    support::api_keys(dir);
    let spec = |id: &str, seeds: &[SocketAddr]| {
        let mut spec = Spec::new(dir, id, seeds, 2);
        spec.extra = extra.to_string();
        spec
    };
    let first = spec("w1", &[]).spawn().await;
    let second = spec("w2", &[first.peer]).spawn().await;
    cluster_until(second.api, "two members", |v| settled_on(v, &["w1", "w2"])).await;
    vec![first, second]
}

/// Creates things named `prefix-0`, `prefix-1`, ... with `tags` until one's primary is the worker at `index` of
/// `workers`; returns its name.
async fn thing_led_by(
    workers: &[WorkerProcess],
    index: usize,
    prefix: &str,
    tags: &[&str],
) -> String {
    for i in 0.. {
        let name = format!("{prefix}-{i}");
        let body = json!({ "tags": tags });
        let (status, _) =
            http(workers[0].api, "PUT", &format!("/v1/things/{name}"), Some(KEY), Some(body)).await;
        assert_eq!(status, 201);
        let (_, thing) =
            http(workers[0].api, "GET", &format!("/v1/things/{name}"), Some(KEY), None).await;
        let primary = thing["owners"][0].as_str().unwrap().rsplit_once('#').unwrap().0.to_string();
        if primary == workers[index].id {
            return name;
        }
    }
    unreachable!()
}

async fn write(api: SocketAddr, thing: &str, property: &str, value: Json) {
    let path = format!("/v1/things/{thing}/properties/{property}");
    let (status, answer) =
        http(api, "PUT", &path, Some(KEY), Some(json!({ "value": value }))).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn a_stream_carries_what_another_worker_acknowledged_and_resumes_without_a_loss() {
    let dir = tempfile::tempdir().unwrap();
    let workers = two_workers(dir.path(), "").await;
    // a thing whose primary is w2, streamed from w1
    let thing = thing_led_by(&workers, 1, "pump", &["line-1"]).await;
    let path = format!("/v1/things/{thing}/stream");
    let (status, mut stream) = Stream::open(workers[0].api, &path, None).await;
    assert_eq!(status, 200);
    let snapshot = stream.expect("the snapshot").await;
    assert_eq!((snapshot.kind.as_str(), &snapshot.data["thing"]), ("snapshot", &json!(thing)));

    for i in 1..=5 {
        write(workers[0].api, &thing, "level", json!(i)).await;
    }
    let mut last_id = None;
    for i in 1..=5 {
        let event = stream.expect("a property change").await;
        assert_eq!(event.kind, "property");
        assert_eq!((&event.data["property"], &event.data["value"]), (&json!("level"), &json!(i)));
        last_id = event.id;
    }
    drop(stream);

    // changes while no stream is open, then a stream that resumes after the last event received
    for i in 6..=10 {
        write(workers[1].api, &thing, "level", json!(i)).await;
    }
    let (status, mut resumed) = Stream::open(workers[0].api, &path, last_id.as_deref()).await;
    assert_eq!(status, 200);
    for i in 6..=10 {
        let event = resumed.expect("a change made while disconnected").await;
        assert_eq!((event.kind.as_str(), &event.data["value"]), ("property", &json!(i)));
    }
    write(workers[0].api, &thing, "level", json!(11)).await;
    let live = resumed.expect("a live change after resuming").await;
    assert_eq!(live.data["value"], json!(11));

    // a stream over a tag: things whose primaries differ, each change once
    let other = thing_led_by(&workers, 0, "valve", &["line-1"]).await;
    let (status, mut tagged) = Stream::open(workers[1].api, "/v1/stream?tag=line-1", None).await;
    assert_eq!(status, 200);
    write(workers[0].api, &thing, "level", json!(12)).await;
    write(workers[0].api, &other, "open", json!(true)).await;
    let mut seen = vec![];
    for _ in 0..2 {
        let event = tagged.expect("a tagged thing's change").await;
        seen.push((event.data["thing"].as_str().unwrap().to_string(), event.data["value"].clone()));
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(seen, [(thing.clone(), json!(12)), (other.clone(), json!(true))]);

    // a place naming a worker that is not in the pool says changes may be missing
    let (_, mut ghost) = Stream::open(workers[0].api, &path, Some(r#"{"ghost#1":3}"#)).await;
    let gap = ghost.expect("a gap").await;
    assert_eq!((gap.kind.as_str(), &gap.data["worker"]), ("gap", &json!("ghost")));

    // a place past a worker's log (a client's id is only a claim) is a gap, and the stream goes on from the log's
    // end; the other streams of the worker are not held up by it
    let (_, view) = http(workers[0].api, "GET", "/v1/cluster", Some(KEY), None).await;
    let w2 = view["table"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .find(|m| m.starts_with("w2#"))
        .unwrap();
    let claim = json!({ w2.clone(): u64::MAX }).to_string();
    let (status, mut ahead) = Stream::open(workers[0].api, &path, Some(&claim)).await;
    assert_eq!(status, 200);
    let (_, mut fresh) = Stream::open(workers[0].api, &path, None).await;
    assert_eq!(fresh.expect("the snapshot").await.kind, "snapshot");
    write(workers[0].api, &thing, "level", json!(13)).await;
    let event = fresh.expect("a change on a fresh stream").await;
    assert_eq!((event.kind.as_str(), &event.data["value"]), ("property", &json!(13)));
    // the claiming stream: first the gaps (w2's for the claim, and w1's if its log no longer starts at 1: w1 is
    // missing from the claim, so its log is read from the start), then the change
    let mut gaps = Vec::new();
    let event = loop {
        let event = ahead.expect("the claiming stream's change").await;
        if event.kind != "gap" {
            break event;
        }
        gaps.push(event.data["worker"].as_str().unwrap().to_string());
    };
    assert!(gaps.contains(&"w2".to_string()), "{gaps:?}");
    assert_eq!((event.kind.as_str(), &event.data["value"]), ("property", &json!(13)));

    let (status, body) =
        http(workers[0].api, "GET", "/v1/stream?things=a&tag=b", Some(KEY), None).await;
    assert_eq!((status, body["error"].is_string()), (400, true));
    let (status, _) =
        http(workers[0].api, "GET", "/v1/things/nothing-here/stream", Some(KEY), None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_client_that_reads_nothing_is_cut_at_its_buffer_and_another_keeps_receiving() {
    let dir = tempfile::tempdir().unwrap();
    let workers =
        two_workers(dir.path(), "durability = \"memory\"\n[streams]\nclient_buffer = 16\n").await;
    let thing = thing_led_by(&workers, 1, "tank", &[]).await;
    let path = format!("/v1/things/{thing}/stream");
    // a small receive window, so that the server's socket fills after a few MiB
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(workers[0].api).await.unwrap();
    let (status, mut stalled) = Stream::open_on(tcp, &path, None).await;
    assert_eq!(status, 200);
    let (_, mut reader) = Stream::open(workers[0].api, &path, None).await;
    assert_eq!(reader.expect("the snapshot").await.kind, "snapshot");

    // 60 KB a change: 300 of them are far more than the sockets hold
    let chunk = "x".repeat(15_000);
    let big = json!([chunk, chunk, chunk, chunk]);
    let api = workers[1].api;
    // the writer stays at most 8 changes ahead of the reader, so that only the stalled client falls behind by
    // more than its buffer of 16
    let (read, mut reads) = tokio::sync::watch::channel(0usize);
    let writer = tokio::spawn(async move {
        for i in 0..300 {
            reads.wait_for(|&n| n + 8 >= i).await.unwrap();
            write(api, &thing, "blob", json!([i, big])).await;
        }
    });
    for i in 0..300 {
        let event = reader.expect("every change, in order").await;
        assert_eq!((event.kind.as_str(), &event.data["value"][0]), ("property", &json!(i)));
        read.send_replace(i + 1);
    }
    writer.await.unwrap();

    // the stalled client gets what its sockets held, then the cut
    let mut events = 0;
    let last = loop {
        let event = within("the stalled stream's end", stalled.next()).await;
        match event {
            Some(e) if e.kind == "cut" => break e,
            Some(_) => events += 1,
            None => panic!("the stalled stream ended without a cut after {events} events"),
        }
    };
    assert!(events < 300, "it was cut before the end: {events} events");
    assert!(last.data["error"].as_str().unwrap().contains("Last-Event-ID"));
    assert_eq!(within("the end", stalled.next()).await, None, "nothing after the cut");
    let metrics = support::process::get_text(workers[0].admin, "/metrics").await.1;
    assert!(metrics.contains("thingport_stream_cuts_total 1"), "{metrics}");
}
