//! `thingport-demo`: the whole system on this machine for a first try — a gateway and a pool of two foundation
//! workers sharing the cache ring, on loopback with a self-signed certificate, a demo device token, an application
//! key, and a simulated device that reports a temperature every second. It prints how to connect a device, call the
//! API and scrape metrics.
//!
//! The same binary runs either server: `thingport-demo gateway ARGS` is `thingport-gateway ARGS` and
//! `thingport-demo foundation ARGS` is `thingport-foundation ARGS` (one build gives the whole-system tests real
//! server processes). The demo runs each server that way, as a child process with its configuration and log in the
//! demo's directory, so each serves its own metrics at its own admin address.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Parser;
use thingport_device::{Client, Endpoint, Handler, Options, Transport};
use thingport_protocol::{
    Credential, PropertyUpdate, Quality, ServiceRequest, ServiceResult, Value,
};

/// Start a gateway and two foundation workers on loopback, with a simulated device.
#[derive(Debug, Parser)]
#[command(
    name = "thingport-demo",
    version,
    after_help = "`thingport-demo gateway ARGS` and `thingport-demo foundation ARGS` run either server's own \
                  command line (see their --help)."
)]
struct Args {
    /// Where to keep the demo's certificate, secrets and configuration (default: a new temporary directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Gateway port (WSS on TCP and QUIC on UDP); 0 picks a free one.
    #[arg(long, default_value_t = 8443)]
    port: u16,
    /// API port of the first foundation worker (the second takes the next port); 0 picks free ones.
    #[arg(long, default_value_t = 8080)]
    api_port: u16,
    /// Do not run the simulated device.
    #[arg(long)]
    no_device: bool,
}

const API_KEY: &str = "demo-key";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `port` if it is free on loopback (TCP), else 0.
fn free_or_any(port: u16) -> u16 {
    match std::net::TcpListener::bind(loopback(port)) {
        Ok(_) => port,
        Err(_) => 0,
    }
}

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os();
    let program = args.next();
    match std::env::args_os().nth(1).as_ref().and_then(|a| a.to_str()) {
        Some("gateway") => thingport_gateway::cli::main(program.into_iter().chain(args.skip(1))),
        Some("foundation") => {
            thingport_foundation::cli::main(program.into_iter().chain(args.skip(1)))
        }
        _ => {
            let args = Args::parse();
            let result = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(demo(args)));
            match result {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}

async fn demo(args: Args) -> Result<()> {
    let temp;
    let dir: &Path = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir
        }
        None => {
            temp = std::env::temp_dir().join(format!("thingport-demo-{}", std::process::id()));
            std::fs::create_dir_all(&temp)?;
            &temp
        }
    };
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let secret = dir.join("provisioning.key");
    let keys = dir.join("api-keys");
    if !cert.exists() {
        let (cert_pem, key_pem) =
            thingport_gateway::tls::self_signed(&["localhost".into(), "127.0.0.1".into()])?;
        std::fs::write(&cert, cert_pem)?;
        std::fs::write(&key, key_pem)?;
    }
    if !secret.exists() {
        let mut bytes = [0u8; 32];
        ring_fill(&mut bytes)?;
        std::fs::write(&secret, bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())?;
    }
    // the demo's key, hashed as `thingport-foundation api-key add` keeps keys
    let hash: String =
        thingport_foundation::keys::hash(API_KEY).iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&keys, format!("sha256:{hash} role=admin name=demo\n"))?;

    // each server is a process of its own (this binary's `foundation` and `gateway` commands), so that each serves
    // its own metrics; their logs go to files in `dir`
    let exe = std::env::current_exe().context("finding this program")?;
    let mut workers: Vec<Addrs> = Vec::new();
    let mut children = Vec::new();
    for i in 1..=2u16 {
        let api_port = if args.api_port == 0 { 0 } else { free_or_any(args.api_port + i - 1) };
        let seeds: Vec<String> = workers.iter().map(|w| format!("\"{}\"", w.peer)).collect();
        let config = format!(
            "id = \"foundation-{i}\"\nlink_address = \"{any}\"\napi_address = \"{api}\"\n\
             admin_address = \"{any}\"\npeer_address = \"{any}\"\nseeds = [{seeds}]\nbootstrap_members = 2\n\
             api_keys_file = \"{keys}\"\n[storage]\ndata_dir = \"{data}\"\n",
            any = loopback(0),
            api = loopback(api_port),
            seeds = seeds.join(", "),
            keys = keys.display(),
            // each worker's store; with --dir, what the demo stored is there at the next start
            data = dir.join(format!("foundation-{i}")).display(),
        );
        let (child, addrs) =
            spawn_server(&exe, dir, "foundation", &format!("foundation-{i}"), &config).await?;
        children.push(child);
        workers.push(addrs);
    }
    // the pool's first partition table is made once both are members
    wait_ready(workers[1].admin).await.context("the two workers did not form a pool")?;
    let worker_addrs = workers[0];

    // the gateway; every device of a demo (and of a load test against it) comes from loopback, so the caps per
    // source address are lifted: they would only refuse them
    let limits = thingport_gateway::Config::default().limits;
    let foundations: Vec<String> = workers.iter().map(|w| format!("\"{}\"", w.link)).collect();
    let config = format!(
        "[listen]\naddress = \"{listen}\"\n[admin]\naddress = \"{any}\"\n\
         [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n[auth]\nsecret_file = \"{secret}\"\n\
         [upstream]\nfoundations = [{foundations}]\n\
         [limits]\nmax_sessions_per_ip = {sessions}\nmax_handshakes_per_ip = {handshakes}\nmax_waiting_per_ip = {waiting}\n",
        listen = loopback(free_or_any(args.port)),
        any = loopback(0),
        cert = cert.display(),
        key = key.display(),
        secret = secret.display(),
        foundations = foundations.join(", "),
        sessions = limits.max_sessions,
        handshakes = limits.max_handshakes,
        waiting = limits.max_waiting,
    );
    let (gateway, gw) = spawn_server(&exe, dir, "gateway", "gateway", &config).await?;

    let tokens = thingport_gateway::token::TokenKey::from_file(&secret)?;
    let token = tokens.issue("demo-device", now() + 365 * 86_400);
    let wss = gw.wss;
    println!(
        "thingport demo is running (Ctrl-C or SIGTERM stops it)\n\
         \n  gateway      wss://localhost:{port}/v1/device and quic://localhost:{port} (ALPN thingport/1)\n\
         \x20 certificate  {cert}\n\
         \x20 foundation   REST API http://{api} and http://{api2}, two workers sharing the ring (application key: {API_KEY})\n\
         \x20 console      http://{api}/console (sign in with the application key)\n\
         \x20 metrics      http://{gw_admin}/metrics (gateway), http://{fd_admin}/metrics and http://{fd_admin2}/metrics (foundation)\n\
         \x20 logs         {dir}/gateway.log, foundation-1.log, foundation-2.log\n\
         \n  connect a device:\n\
         \x20   cargo run --release -p thingport-device --example device -- --target {wss} --ca {cert} --thing demo-device --token {token}\n\
         \x20 more tokens:\n\
         \x20   cargo run --release -p thingport-gateway -- token issue --thing NAME --secret-file {secret}\n\
         \x20 call the API:\n\
         \x20   curl -s -H 'x-api-key: {API_KEY}' http://{api}/v1/things\n\
         \x20   curl -s -H 'x-api-key: {API_KEY}' http://{api}/v1/things/sim-device/properties/temperature\n\
         \x20   curl -s -X PUT -H 'x-api-key: {API_KEY}' -H 'content-type: application/json' -d '{{\"value\": 25}}' http://{api}/v1/things/sim-device/properties/setpoint\n\
         \x20   curl -s -X POST -H 'x-api-key: {API_KEY}' -H 'content-type: application/json' -d '{{\"hello\": 1}}' http://{api2}/v1/things/sim-device/services/echo\n\
         \x20   curl -s -H 'x-api-key: {API_KEY}' http://{api2}/v1/cluster",
        port = wss.port(),
        cert = cert.display(),
        api = worker_addrs.api,
        api2 = workers[1].api,
        fd_admin2 = workers[1].admin,
        gw_admin = gw.admin,
        fd_admin = worker_addrs.admin,
        secret = secret.display(),
        dir = dir.display(),
    );

    if !args.no_device {
        let trusted = thingport_device::read_certificates(&cert)?;
        let endpoint = Endpoint::new(wss, "localhost", Transport::Wss, &trusted)?;
        let token = tokens.issue("sim-device", now() + 86_400);
        let options =
            Options::new(endpoint, "sim-device", Credential::Token(token.into_bytes().into()));
        let (client, handle) = Client::new(options)?;
        let setpoint = std::sync::Arc::new(std::sync::Mutex::new(21.0));
        tokio::spawn(client.run(Simulated { setpoint: setpoint.clone() }, std::future::pending()));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let t = setpoint.lock().map_or(21.0, |s| *s) + (now() % 7) as f64 / 10.0;
                let update = PropertyUpdate {
                    name: "temperature".into(),
                    timestamp_ms: now() * 1_000,
                    quality: Quality::Good,
                    value: Value::Float(t),
                };
                if handle.properties(vec![update]).await.is_err() {
                    return;
                }
            }
        });
    }

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        interrupted = tokio::signal::ctrl_c() => interrupted?,
        _ = terminate.recv() => {}
    }
    println!("stopping: the gateway drains first");
    stop(gateway).await;
    for child in children.into_iter().rev() {
        stop(child).await;
    }
    Ok(())
}

/// Where a server listens, from the JSON line it prints on start.
#[derive(Debug, Clone, Copy)]
struct Addrs {
    link: SocketAddr,
    peer: SocketAddr,
    api: SocketAddr,
    admin: SocketAddr,
    wss: SocketAddr,
}

/// Starts `exe SERVER --config DIR/NAME.toml run` with its log in `DIR/NAME.log`, and reads the addresses it bound.
async fn spawn_server(
    exe: &Path,
    dir: &Path,
    server: &str,
    name: &str,
    config: &str,
) -> Result<(tokio::process::Child, Addrs)> {
    use tokio::io::AsyncBufReadExt;
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config)?;
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut child = tokio::process::Command::new(exe)
        .arg(server)
        .arg("--config")
        .arg(&path)
        .arg("run")
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        // a group of its own: Ctrl-C reaches the demo alone, which stops the gateway first and then the workers
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let stdout = child.stdout.take().context("the server's output")?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .with_context(|| {
        format!("{name} did not start; see {}", dir.join(format!("{name}.log")).display())
    })??;
    let printed: serde_json::Value = serde_json::from_str(&line).with_context(|| {
        format!("{name} did not start; see {}", dir.join(format!("{name}.log")).display())
    })?;
    let addr = |key: &str| -> SocketAddr {
        printed[key].as_str().and_then(|a| a.parse().ok()).unwrap_or_else(|| loopback(0))
    };
    let addrs = Addrs {
        link: addr("link"),
        peer: addr("peer"),
        api: addr("api"),
        admin: addr("admin"),
        wss: addr("wss"),
    };
    Ok((child, addrs))
}

/// Waits until a server's `/readyz` answers 200.
async fn wait_ready(admin: SocketAddr) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(admin).await {
            let request = b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
            let mut response = String::new();
            if stream.write_all(request).await.is_ok()
                && stream.read_to_string(&mut response).await.is_ok()
                && response.starts_with("HTTP/1.1 200")
            {
                return Ok(());
            }
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "not ready within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM, and waits for the process to exit (its drain included).
async fn stop(mut child: tokio::process::Child) {
    let pid = child.id().and_then(|id| rustix::process::Pid::from_raw(id as i32));
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let _ = child.wait().await;
}

fn ring_fill(bytes: &mut [u8]) -> Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(bytes)?;
    Ok(())
}

/// The simulated device's answers: writes to `setpoint` change the temperature it reports, `echo` answers its
/// parameters.
struct Simulated {
    setpoint: std::sync::Arc<std::sync::Mutex<f64>>,
}

impl Handler for Simulated {
    fn property_write(&mut self, updates: &[PropertyUpdate]) {
        for u in updates {
            let v = match u.value {
                Value::Float(v) => v,
                Value::Int(v) => v as f64,
                _ => continue,
            };
            if &*u.name == "setpoint"
                && let Ok(mut setpoint) = self.setpoint.lock()
            {
                *setpoint = v;
            }
        }
    }

    fn service_call(&mut self, call: &ServiceRequest) -> Option<ServiceResult> {
        Some(ServiceResult::Ok(call.params.clone()))
    }
}
