//! Foundation workers as real processes (the built `thingport-foundation` binary), started, signalled, killed and
//! started again on the addresses they had, with the store they had.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{KEY, http, within};

/// A running worker process and the addresses it bound.
pub struct WorkerProcess {
    pub id: String,
    pub child: Child,
    pub link: SocketAddr,
    pub api: SocketAddr,
    pub peer: SocketAddr,
    pub admin: SocketAddr,
    /// How it was started, to start it again.
    pub spec: Spec,
}

/// How to start a worker.
#[derive(Debug, Clone)]
pub struct Spec {
    pub dir: PathBuf,
    pub id: String,
    pub seeds: Vec<SocketAddr>,
    pub bootstrap: usize,
    /// Addresses to bind (link, api, peer, admin); port 0 the first time.
    pub addrs: [SocketAddr; 4],
    /// How long a write may take through a failover (`write_timeout`).
    pub write_timeout: String,
    /// How long a silent member is suspected before it is declared down (`suspect_timeout`).
    pub suspect_timeout: String,
    /// More top-level configuration lines.
    pub extra: String,
    /// Lines of the `[storage]` section; by default the worker's own directory under `dir`.
    pub storage: String,
}

impl Spec {
    /// A worker with fast failure detection, its store in `dir/store-<id>`, every port chosen by the system.
    pub fn new(dir: &Path, id: &str, seeds: &[SocketAddr], bootstrap: usize) -> Spec {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        Spec {
            dir: dir.to_path_buf(),
            id: id.to_string(),
            seeds: seeds.to_vec(),
            bootstrap,
            addrs: [any; 4],
            write_timeout: "20s".into(),
            suspect_timeout: "750ms".into(),
            extra: String::new(),
            storage: format!("data_dir = \"{}\"", dir.join(format!("store-{id}")).display()),
        }
    }

    /// Starts the worker and reads the addresses it bound from its first stdout line.
    pub async fn spawn(self) -> WorkerProcess {
        let dir = &self.dir;
        let id = &self.id;
        let seeds: Vec<String> = self.seeds.iter().map(|s| format!("\"{s}\"")).collect();
        let [link, api, peer, admin] = self.addrs;
        let config = format!(
            r#"id = "{id}"
link_address = "{link}"
api_address = "{api}"
peer_address = "{peer}"
admin_address = "{admin}"
api_keys_file = "{keys}"
seeds = [{seeds}]
bootstrap_members = {bootstrap}
replicas = 2
probe_period = "150ms"
suspect_timeout = "{suspect_timeout}"
request_timeout = "1s"
write_timeout = "{write_timeout}"
{extra}
[storage]
{storage}
"#,
            keys = dir.join("api-keys").display(),
            seeds = seeds.join(", "),
            bootstrap = self.bootstrap,
            write_timeout = self.write_timeout,
            suspect_timeout = self.suspect_timeout,
            extra = self.extra,
            storage = self.storage,
        );
        let path = dir.join(format!("{id}.toml"));
        std::fs::write(&path, config).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{id}.log")))
            .unwrap();
        // `thingport-demo foundation` is `thingport-foundation`
        let mut child = Command::new(env!("CARGO_BIN_EXE_thingport-demo"))
            .arg("foundation")
            .arg("--config")
            .arg(&path)
            .arg("run")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        within("worker addresses", BufReader::new(stdout).read_line(&mut line)).await.unwrap();
        let addrs: Json = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{id} printed {line:?}: {e}; see {id}.log"));
        let addr = |k: &str| addrs[k].as_str().unwrap().parse().unwrap();
        let (link, api, peer, admin) = (addr("link"), addr("api"), addr("peer"), addr("admin"));
        WorkerProcess {
            id: id.to_string(),
            child,
            link,
            api,
            peer,
            admin,
            spec: Spec { addrs: [link, api, peer, admin], ..self },
        }
    }
}

impl WorkerProcess {
    /// `kill -9`, and waits until the process is gone.
    pub async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }

    /// Starts the worker again with the same configuration, addresses and store.
    pub async fn restart(&self) -> WorkerProcess {
        self.spec.clone().spawn().await
    }

    /// Waits until `/readyz` answers 200; returns how long that took.
    pub async fn ready(&self) -> Duration {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(30);
        loop {
            let (status, _) = get_text(self.admin, "/readyz").await;
            if status == 200 {
                return started.elapsed();
            }
            assert!(Instant::now() < deadline, "{} never became ready", self.id);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A GET on a plain-text endpoint: the status and the body.
pub async fn get_text(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// Sends a signal to a worker process.
pub fn signal(child: &Child, which: &str) {
    let pid = child.id().expect("the worker is running").to_string();
    let status = std::process::Command::new("kill").args([which, &pid]).status().unwrap();
    assert!(status.success(), "kill {which} {pid}");
}

/// Polls a worker's cluster view until `done` holds for it.
pub async fn cluster_until(api: SocketAddr, what: &str, done: impl Fn(&Json) -> bool) -> Json {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, view) = http(api, "GET", "/v1/cluster", Some(KEY), None).await;
        if status == 200 && done(&view) {
            return view;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; last view: {view:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The table's workers (names without boot numbers), and whether no change is under way.
pub fn table_ids(view: &Json) -> Vec<String> {
    view["table"]["members"]
        .as_array()
        .map(|m| {
            m.iter().map(|k| k.as_str().unwrap().rsplit_once('#').unwrap().0.to_string()).collect()
        })
        .unwrap_or_default()
}

pub fn settled_on(view: &Json, ids: &[&str]) -> bool {
    view["changing"] == json!(false) && table_ids(view) == ids
}

/// Starts a pool of workers with these ids (each seeded with the first, the first table made once all are up),
/// each spec adjusted by `tune`, and waits until the table holds them all.
#[allow(dead_code, reason = "not every test binary starts a pool this way")]
pub async fn pool_of(dir: &Path, ids: &[&str], tune: impl Fn(&mut Spec)) -> Vec<WorkerProcess> {
    let mut workers: Vec<WorkerProcess> = Vec::new();
    for id in ids {
        let seeds: Vec<SocketAddr> = workers.first().map(|w| w.peer).into_iter().collect();
        let mut spec = Spec::new(dir, id, &seeds, ids.len());
        tune(&mut spec);
        workers.push(spec.spawn().await);
    }
    cluster_until(workers[0].api, "every member in the table", |v| settled_on(v, ids)).await;
    workers
}

/// Creates the thing `thing` through `api` and answers the workers holding its copies, primary first (ids without
/// boot numbers).
#[allow(dead_code, reason = "not every test binary looks for where things are")]
pub async fn create_and_locate(api: SocketAddr, thing: &str) -> Vec<String> {
    let path = format!("/v1/things/{thing}");
    assert_eq!(http(api, "PUT", &path, Some(KEY), None).await.0, 201, "creating {thing}");
    let (_, state) = http(api, "GET", &path, Some(KEY), None).await;
    state["owners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap().rsplit_once('#').unwrap().0.to_string())
        .collect()
}
