//! Durable state, end to end with real processes: devices write through a real gateway (two links per worker, so
//! frames arrive out of order) while workers are killed with SIGKILL and started again on their addresses with
//! their stores. Afterwards every acknowledged frame is counted by sequence number: each value in its property's
//! history, each event in the thing's event stream in device order, the latest value as the property's value.
//!
//! The PostgreSQL runs need a server: `THINGPORT_TEST_POSTGRES` is a connection string for a role that may create
//! databases (`.ci/run` starts one). Without it they are skipped with a message, except under CI, where they fail.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "in tests a panic is a failed assertion"
)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};
use support::process::{Spec, WorkerProcess, cluster_until, get_text, settled_on};
use support::{KEY, device, http, within};
use thingport_device::Endpoint;
use thingport_protocol::{DeviceEvent, Event, Frame, Properties, PropertyUpdate, Quality, Value};
use tokio_util::sync::CancellationToken;

/// Properties in each frame of a test device.
const PROPERTIES: u64 = 5;
/// Device timestamps start an hour before the test (well inside the default retention).
fn base_ms() -> u64 {
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        now.as_millis() as u64 - 3_600_000
    })
}

/// The frames each device had acknowledged: frame number → whether it was an event.
#[derive(Clone, Default)]
struct Acked {
    by_device: Arc<Mutex<BTreeMap<String, BTreeMap<u64, bool>>>>,
    total: support::Count,
}

impl Acked {
    fn record(&self, device: &str, frames: impl IntoIterator<Item = (u64, bool)>) {
        let mut by_device = self.by_device.lock().unwrap();
        let entry = by_device.entry(device.to_string()).or_default();
        let before = entry.len();
        entry.extend(frames);
        let added = entry.len() - before;
        self.total.add(added);
    }
}

/// Frame `n` of a device: every fourth an event `tick` with payload `n`, the others [`PROPERTIES`] values
/// (`p<k>` = 10 n + k) at device time `base_ms() + n`. Written so that every frame is told apart by `n`.
fn frame(n: u64) -> (Frame, bool) {
    let ts = base_ms() + n;
    if n.is_multiple_of(4) {
        let event =
            Event { seq: 0, timestamp_ms: ts, name: "tick".into(), payload: Value::Int(n as i64) };
        return (Frame::Event(event), true);
    }
    let updates = (0..PROPERTIES)
        .map(|k| PropertyUpdate {
            name: format!("p{k}").into(),
            timestamp_ms: ts,
            quality: Quality::Good,
            value: Value::Int((n * 10 + k) as i64),
        })
        .collect();
    (Frame::Properties(Properties { seq: 0, updates }), false)
}

/// A device sending a frame every 5 ms (at most 32 unacknowledged) until `stop`, then waiting for its last
/// acknowledgement. Fails if the session ever ends: workers come and go behind the gateway, devices stay.
async fn run_device(
    name: String,
    endpoint: Endpoint,
    stop: CancellationToken,
    acked: Acked,
) -> Result<(), String> {
    let mut dev = device(&name);
    dev.connect(&endpoint).await.map_err(|e| format!("{name}: connect: {e}"))?;
    let mut unacked: BTreeMap<u64, (u64, bool)> = BTreeMap::new();
    let mut n = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = stop.cancelled(), if !stopping => stopping = true,
            _ = tick.tick(), if !stopping && unacked.len() < 32 => {
                n += 1;
                let (frame, event) = frame(n);
                let seq = dev.send(frame).await.map_err(|e| format!("{name}: send: {e}"))?;
                unacked.insert(seq, (n, event));
            }
            event = dev.recv_event() => {
                if let Some(DeviceEvent::Acked { seq }) =
                    event.map_err(|e| format!("{name}: session ended: {e}"))?
                {
                    let rest = unacked.split_off(&(seq + 1));
                    acked.record(&name, std::mem::replace(&mut unacked, rest).into_values());
                }
                dev.flush().await.map_err(|e| format!("{name}: flush: {e}"))?;
            }
        }
        if stopping && unacked.is_empty() {
            dev.disconnect().await;
            return Ok(());
        }
    }
}

/// Every page of a history, oldest first, following `next`.
async fn pages(api: SocketAddr, path: &str, field: &str) -> Vec<Json> {
    let mut all = Vec::new();
    let mut after = String::new();
    loop {
        let url = format!("{path}?order=oldest&limit=250{after}");
        let (status, page) = http(api, "GET", &url, Some(KEY), None).await;
        assert_eq!(status, 200, "{url}: {page}");
        assert_eq!(page["complete"], json!(true), "{url}: every store answered");
        all.extend(page[field].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => return all,
        }
    }
}

/// Checks, through `api`, that every acknowledged frame of every device is stored: values in history and as the
/// latest value, events in device order. Returns the values and events checked.
async fn check_everything(
    api: SocketAddr,
    acked: &Acked,
    logged: impl Fn(u64) -> bool,
) -> (usize, usize) {
    let acked = acked.by_device.lock().unwrap().clone();
    let (mut values, mut events) = (0, 0);
    for (name, frames) in &acked {
        let (status, thing) =
            http(api, "GET", &format!("/v1/things/{name}"), Some(KEY), None).await;
        assert_eq!(status, 200, "{name}: {thing}");
        let last_values = frames.iter().filter(|(_, e)| !**e).map(|(n, _)| *n).max().unwrap();
        for k in 0..PROPERTIES {
            let latest = thing["properties"][format!("p{k}")]["value"].as_i64().unwrap();
            assert!(latest >= (last_values * 10 + k) as i64, "{name} p{k}: latest {latest}");
            let path = format!("/v1/things/{name}/properties/p{k}/history");
            let stored: Vec<i64> = pages(api, &path, "values")
                .await
                .iter()
                .map(|v| v["value"].as_i64().unwrap())
                .collect();
            if !logged(k) {
                assert!(stored.is_empty(), "{name} p{k} is not logged");
                continue;
            }
            assert!(
                stored.windows(2).all(|w| w[0] < w[1]),
                "{name} p{k}: in time order, once each"
            );
            for (n, _) in frames.iter().filter(|(_, e)| !**e) {
                let want = (n * 10 + k) as i64;
                assert!(
                    stored.binary_search(&want).is_ok(),
                    "{name} p{k}: acknowledged value {want} lost; stored {} from {:?}",
                    stored.len(),
                    stored.first()
                );
                values += 1;
            }
        }
        let stored: Vec<u64> = pages(api, &format!("/v1/things/{name}/events"), "events")
            .await
            .iter()
            .map(|e| e["payload"].as_u64().unwrap())
            .collect();
        assert!(
            stored.windows(2).all(|w| w[0] < w[1]),
            "{name}: events in device order, once each: {stored:?}"
        );
        for (n, _) in frames.iter().filter(|(_, e)| **e) {
            assert!(stored.binary_search(n).is_ok(), "{name}: acknowledged event {n} lost");
            events += 1;
        }
    }
    (values, events)
}

fn start_devices(
    count: usize,
    endpoint: &Endpoint,
    stop: &CancellationToken,
    acked: &Acked,
) -> Vec<tokio::task::JoinHandle<Result<(), String>>> {
    (0..count)
        .map(|i| {
            tokio::spawn(run_device(
                format!("dev-{i}"),
                endpoint.clone(),
                stop.clone(),
                acked.clone(),
            ))
        })
        .collect()
}

async fn stop_devices(
    stop: CancellationToken,
    devices: Vec<tokio::task::JoinHandle<Result<(), String>>>,
) {
    stop.cancel();
    for device in devices {
        within("device end", device).await.unwrap().unwrap();
    }
}

/// The single packaged worker, with `auto_provision = false`: a thing created through the API keeps working
/// across a `kill -9` and a restart; its values, history, events and definitions are all there afterwards; the
/// device stays connected, and commands reach it again because the gateway opens its session again.
async fn a_killed_worker_restarts(storage: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    support::api_keys(dir.path());
    let mut spec = Spec::new(dir.path(), "w1", &[], 1);
    spec.extra = "auto_provision = false\ndurability = \"disk\"".into();
    if let Some(storage) = storage {
        // the consensus group's log stays in the worker's own data directory
        spec.storage = format!("{}\n{storage}", spec.storage);
    }
    let mut worker = spec.spawn().await;
    worker.ready().await;
    // the things exist before their devices connect; p4 is not logged
    for i in 0..3 {
        let body = json!({
            "description": format!("pump {i}"),
            "tags": ["pump", "hall-2"],
            "properties": {"p0": {"type": "int", "unit": "m"}, "p4": {"logged": false}},
        });
        let (status, _) =
            http(worker.api, "PUT", &format!("/v1/things/dev-{i}"), Some(KEY), Some(body)).await;
        assert_eq!(status, 201);
    }
    let gateway = support::gateway(dir.path(), vec![worker.link]).await;
    let stop = CancellationToken::new();
    let acked = Acked::default();
    let devices = start_devices(3, &gateway.endpoint, &stop, &acked);
    acked.total.grow_by(300, "before the kill").await;

    worker.kill().await;
    let restarted = Instant::now();
    let worker = worker.restart().await;
    let ready = worker.ready().await;
    eprintln!("restart: ready {} ms after start", restarted.elapsed().as_millis());
    let _ = ready;
    acked.total.grow_by(300, "after the restart").await;

    // the binding came back with the gateway's OPEN: a write reaches the connected device
    let (status, write) = http(
        worker.api,
        "PUT",
        "/v1/things/dev-0/properties/setpoint",
        Some(KEY),
        Some(json!({"value": 5})),
    )
    .await;
    assert_eq!((status, write["delivered"].clone()), (200, json!(true)), "{write}");
    let (status, refused) = http(
        worker.api,
        "PUT",
        "/v1/things/dev-0/properties/p0",
        Some(KEY),
        Some(json!({"value": "high"})),
    )
    .await;
    assert_eq!(status, 400, "p0 holds integers: {refused}");
    stop_devices(stop, devices).await;

    let (values, events) = check_everything(worker.api, &acked, |k| k != 4).await;
    let (_, thing) = http(worker.api, "GET", "/v1/things/dev-1", Some(KEY), None).await;
    assert_eq!(thing["description"], json!("pump 1"));
    assert_eq!(thing["tags"], json!(["pump", "hall-2"]));
    assert_eq!(thing["definitions"]["p0"]["unit"], json!("m"));
    assert_eq!(thing["definitions"]["p4"]["logged"], json!(false));
    eprintln!("{values} acknowledged values and {events} events all stored across a kill -9");

    // a removed property takes its history with it; a removed thing all of it
    let api = worker.api;
    assert_eq!(http(api, "DELETE", "/v1/things/dev-1/properties/p1", Some(KEY), None).await.0, 204);
    assert!(pages(api, "/v1/things/dev-1/properties/p1/history", "values").await.is_empty());
    assert!(!pages(api, "/v1/things/dev-1/properties/p2/history", "values").await.is_empty());
    assert_eq!(http(api, "DELETE", "/v1/things/dev-2", Some(KEY), None).await.0, 204);
    assert_eq!(http(api, "GET", "/v1/things/dev-2", Some(KEY), None).await.0, 404);
    assert_eq!(http(api, "PUT", "/v1/things/dev-2", Some(KEY), None).await.0, 201);
    assert!(
        pages(api, "/v1/things/dev-2/properties/p0/history", "values").await.is_empty(),
        "a new thing of the same name starts without history"
    );
    assert!(pages(api, "/v1/things/dev-2/events", "events").await.is_empty());
    let _ = gateway.stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_restarts_with_everything_it_acknowledged_on_sqlite() {
    a_killed_worker_restarts(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_restarts_with_everything_it_acknowledged_on_postgres() {
    if let Some(storage) = postgres_storage("worker").await {
        a_killed_worker_restarts(Some(storage)).await;
    }
}

/// Storage lines for a pool sharing a new PostgreSQL database, if a server is configured.
async fn postgres_storage(test: &str) -> Option<String> {
    let Ok(url) = std::env::var("THINGPORT_TEST_POSTGRES") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set: THINGPORT_TEST_POSTGRES must name a server"
        );
        eprintln!(
            "skipped: set THINGPORT_TEST_POSTGRES to a PostgreSQL connection string to run {test}"
        );
        return None;
    };
    let database = format!("thingport_{test}_{}", std::process::id());
    let config: tokio_postgres::Config = url.parse().unwrap();
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute(&format!("DROP DATABASE IF EXISTS {database}")).await.unwrap();
    client.batch_execute(&format!("CREATE DATABASE {database}")).await.unwrap();
    Some(format!("provider = \"postgres\"\npostgres_url = \"{url} dbname={database}\""))
}

/// A pool of three (two copies of each partition, `durability = "disk"`) under device load, every worker killed
/// with SIGKILL at once and started again: every acknowledged frame is there.
async fn the_whole_pool_killed(storage: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    support::api_keys(dir.path());
    let spec = |id: &str, seeds: &[SocketAddr]| {
        let mut spec = Spec::new(dir.path(), id, seeds, 3);
        if let Some(storage) = &storage {
            spec.storage = format!("{}\n{storage}", spec.storage);
        }
        spec
    };
    let mut workers: Vec<WorkerProcess> = vec![spec("w1", &[]).spawn().await];
    for id in ["w2", "w3"] {
        let seed = workers[0].peer;
        workers.push(spec(id, &[seed]).spawn().await);
    }
    cluster_until(workers[0].api, "three members", |v| settled_on(v, &["w1", "w2", "w3"])).await;
    let gateway = support::gateway(dir.path(), workers.iter().map(|w| w.link).collect()).await;
    let stop = CancellationToken::new();
    let acked = Acked::default();
    let devices = start_devices(6, &gateway.endpoint, &stop, &acked);
    acked.total.grow_by(600, "before the kill").await;

    for w in &mut workers {
        w.kill().await;
    }
    let restarted = Instant::now();
    let mut again = Vec::new();
    for w in &workers {
        again.push(w.restart().await);
    }
    for w in &again {
        w.ready().await;
    }
    eprintln!(
        "whole pool restarted: every worker ready after {} ms",
        restarted.elapsed().as_millis()
    );
    cluster_until(again[0].api, "the same three", |v| settled_on(v, &["w1", "w2", "w3"])).await;
    acked.total.grow_by(600, "after the restart").await;
    stop_devices(stop, devices).await;
    let (values, events) = check_everything(again[1].api, &acked, |_| true).await;
    eprintln!(
        "{values} acknowledged values and {events} events from 6 devices all stored across the loss of the whole pool"
    );
    let _ = gateway.stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_pool_killed_loses_nothing_acknowledged_on_sqlite() {
    the_whole_pool_killed(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_pool_killed_loses_nothing_acknowledged_on_postgres() {
    if let Some(storage) = postgres_storage("pool").await {
        the_whole_pool_killed(Some(storage)).await;
    }
}

/// A store file that is not a database: the worker says why it is not ready and does not join a pool or serve,
/// and once the file is moved away it starts a new store by itself and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_keeps_the_worker_not_ready_until_it_is_moved_away() {
    let dir = tempfile::tempdir().unwrap();
    support::api_keys(dir.path());
    let store = dir.path().join("store-w1");
    std::fs::create_dir_all(&store).unwrap();
    let file = store.join("thingport.sqlite");
    std::fs::write(&file, vec![0x5a; 8192]).unwrap();
    let worker = Spec::new(dir.path(), "w1", &[], 1).spawn().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let why = loop {
        let (status, body) = get_text(worker.admin, "/readyz").await;
        if status == 503 && body.contains("not a database") {
            break body;
        }
        assert!(Instant::now() < deadline, "readyz: {status} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(why.contains("thingport.sqlite"), "readyz names the file: {why}");
    loop {
        let (status, metrics) = get_text(worker.admin, "/metrics").await;
        if metrics.contains("thingport_storage_up 0") {
            break;
        }
        assert!(Instant::now() < deadline, "{status}: {metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::rename(&file, store.join("thingport.sqlite.damaged")).unwrap();
    worker.ready().await;
    let (status, _) = http(worker.api, "PUT", "/v1/things/t", Some(KEY), None).await;
    assert_eq!(status, 201);
}

/// With `durability = "replicated"` or `"memory"` a write is acknowledged before the store has it; a worker stopped
/// with SIGTERM writes everything it acknowledged before it exits.
async fn a_stopped_worker_stores_what_it_acknowledged(durability: &str) {
    let dir = tempfile::tempdir().unwrap();
    support::api_keys(dir.path());
    let mut spec = Spec::new(dir.path(), "w1", &[], 1);
    spec.extra = format!("durability = \"{durability}\"");
    let mut worker = spec.spawn().await;
    worker.ready().await;
    assert_eq!(http(worker.api, "PUT", "/v1/things/t", Some(KEY), None).await.0, 201);
    for i in 0..200 {
        let (status, _) = http(
            worker.api,
            "PUT",
            "/v1/things/t/properties/level",
            Some(KEY),
            Some(json!({"value": i})),
        )
        .await;
        assert_eq!(status, 200);
    }
    support::process::signal(&worker.child, "-TERM");
    let status = within("exit after SIGTERM", worker.child.wait()).await.unwrap();
    assert!(status.success(), "{status}");
    let worker = worker.restart().await;
    worker.ready().await;
    let stored: Vec<i64> = pages(worker.api, "/v1/things/t/properties/level/history", "values")
        .await
        .iter()
        .map(|v| v["value"].as_i64().unwrap())
        .collect();
    assert_eq!(stored, (0..200).collect::<Vec<i64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_stores_what_it_acknowledged_with_replicated() {
    a_stopped_worker_stores_what_it_acknowledged("replicated").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_stores_what_it_acknowledged_with_memory() {
    a_stopped_worker_stores_what_it_acknowledged("memory").await;
}

/// A small tmpfs of the test's own, unmounted at the end; `None` (with a message) where it cannot be mounted, which
/// under CI is a failure.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            assert!(std::env::var_os("CI").is_none(), "CI is set: mounting a tmpfs needs root");
            eprintln!("skipped: mounting a tmpfs for the store needs root");
            return None;
        }
        Some(Tmpfs(dir.to_path_buf()))
    }

    fn remount(&self, options: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount {options}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A full disk: writes are refused with a retryable error (nothing is acknowledged that was not stored), the worker
/// says why it is not ready, and once space is freed the writes it kept are committed and new ones succeed. Needs
/// root (a small tmpfs is mounted for the store); skipped with a message otherwise, except under CI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_until_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    support::api_keys(dir.path());
    let Some(tmpfs) = Tmpfs::mount(&dir.path().join("small"), "3m") else { return };
    let store = tmpfs.0.clone();
    let mut spec = Spec::new(dir.path(), "w1", &[], 1);
    spec.write_timeout = "2s".into();
    spec.storage = format!("data_dir = \"{}\"", store.display());
    let worker = spec.spawn().await;
    worker.ready().await;
    assert_eq!(http(worker.api, "PUT", "/v1/things/t", Some(KEY), None).await.0, 201);
    // fill the disk, then write until the store refuses
    let filler = store.join("filler");
    let _ = std::process::Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", filler.display()))
        .args(["bs=64k", "status=none"])
        .stderr(std::process::Stdio::null())
        .status();
    let big = "x".repeat(8_000);
    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..400 {
        let body = json!({"value": format!("{i} {big}")});
        let (status, answer) =
            http(worker.api, "PUT", "/v1/things/t/properties/blob", Some(KEY), Some(body)).await;
        match status {
            200 => accepted.push(i),
            503 => {
                refused = Some(i);
                break;
            }
            other => panic!("{other}: {answer}"),
        }
    }
    let refused = refused.expect("a full disk refuses a write");
    let (status, why) = get_text(worker.admin, "/readyz").await;
    assert_eq!(status, 503);
    assert!(why.contains("failing"), "readyz says why: {why}");
    std::fs::remove_file(&filler).unwrap();
    worker.ready().await;
    let (status, _) = http(
        worker.api,
        "PUT",
        "/v1/things/t/properties/blob",
        Some(KEY),
        Some(json!({"value": "after"})),
    )
    .await;
    assert_eq!(status, 200, "writes resume once space is freed");
    let stored: Vec<String> = pages(worker.api, "/v1/things/t/properties/blob/history", "values")
        .await
        .iter()
        .map(|v| v["value"].as_str().unwrap().split(' ').next().unwrap().to_string())
        .collect();
    for i in &accepted {
        assert!(stored.contains(&i.to_string()), "acknowledged write {i} is stored");
    }
    assert!(stored.contains(&"after".to_string()));
    eprintln!(
        "{} writes acknowledged before the disk filled; write {refused} refused with 503 and stored once space was freed: {}",
        accepted.len(),
        stored.contains(&refused.to_string())
    );
}

/// A private PostgreSQL server of the test's own (`.ci/postgres.sh`), stopped and started under a worker.
struct PrivatePostgres {
    url: String,
    dir: String,
}

impl PrivatePostgres {
    fn script(args: &[&str]) -> String {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../.ci/postgres.sh");
        let out = std::process::Command::new(script).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{script} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn start() -> PrivatePostgres {
        let exports = Self::script(&["start"]);
        let value = |name: &str| {
            exports
                .lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}='")))
                .and_then(|v| v.strip_suffix('\''))
                .unwrap()
                .to_string()
        };
        PrivatePostgres {
            url: value("THINGPORT_TEST_POSTGRES"),
            dir: value("THINGPORT_TEST_POSTGRES_DIR"),
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        Self::script(&["stop", &self.dir]);
    }
}

/// The database stopped under a running worker: writes are refused with a retryable error and the worker is not
/// ready; once the database is back the worker writes again by itself and everything acknowledged is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_started_under_a_worker_loses_nothing_acknowledged() {
    if postgres_storage("restart").await.is_none() {
        return; // no PostgreSQL here (the message is printed)
    }
    let postgres = PrivatePostgres::start();
    let dir = tempfile::tempdir().unwrap();
    support::api_keys(dir.path());
    let mut spec = Spec::new(dir.path(), "w1", &[], 1);
    spec.write_timeout = "2s".into();
    spec.storage = format!(
        "{}\nprovider = \"postgres\"\npostgres_url = \"{} dbname=postgres\"",
        spec.storage, postgres.url
    );
    let worker = spec.spawn().await;
    worker.ready().await;
    assert_eq!(http(worker.api, "PUT", "/v1/things/t", Some(KEY), None).await.0, 201);
    let write = |i: i64| {
        let api = worker.api;
        async move {
            http(api, "PUT", "/v1/things/t/properties/level", Some(KEY), Some(json!({"value": i})))
                .await
                .0
        }
    };
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        assert_eq!(write(i).await, 200);
        acknowledged.push(i);
    }
    PrivatePostgres::script(&["down", &postgres.dir]);
    assert_eq!(write(100).await, 503, "refused while the database is down");
    let (status, why) = get_text(worker.admin, "/readyz").await;
    assert_eq!(status, 503, "{why}");
    PrivatePostgres::script(&["up", &postgres.dir]);
    worker.ready().await;
    for i in 20..40 {
        assert_eq!(write(i).await, 200);
        acknowledged.push(i);
    }
    let stored: Vec<i64> = pages(worker.api, "/v1/things/t/properties/level/history", "values")
        .await
        .iter()
        .map(|v| v["value"].as_i64().unwrap())
        .collect();
    for i in &acknowledged {
        assert!(stored.contains(i), "acknowledged {i} is stored: {stored:?}");
    }
}

/// A read-only data directory at start: the worker says why it is not ready and does not join a pool, and once the
/// directory is writable it opens its store by itself and serves. Needs root, as the full-disk test. (A directory
/// that turns read-only under a running worker fails commits the way a full disk does.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_data_directory_keeps_the_worker_not_ready_until_writable() {
    let dir = tempfile::tempdir().unwrap();
    support::api_keys(dir.path());
    let Some(tmpfs) = Tmpfs::mount(&dir.path().join("store"), "16m") else { return };
    tmpfs.remount("ro");
    let mut spec = Spec::new(dir.path(), "w1", &[], 1);
    spec.storage = format!("data_dir = \"{}\"", tmpfs.0.display());
    let worker = spec.spawn().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, why) = get_text(worker.admin, "/readyz").await;
        if status == 503 && why.to_lowercase().contains("read-only") {
            break;
        }
        assert!(Instant::now() < deadline, "readyz: {status} {why}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tmpfs.remount("rw");
    worker.ready().await;
    assert_eq!(http(worker.api, "PUT", "/v1/things/t", Some(KEY), None).await.0, 201);
    let (status, _) = http(
        worker.api,
        "PUT",
        "/v1/things/t/properties/level",
        Some(KEY),
        Some(json!({"value": 1})),
    )
    .await;
    assert_eq!(status, 200);
}
