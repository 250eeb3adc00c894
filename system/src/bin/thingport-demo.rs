//! `thingport-demo`: the whole system on this machine for a first try — a gateway and a pool of two foundation
//! workers sharing the cache ring, on loopback with a self-signed certificate, a demo device token, an application
//! key, and a simulated device that reports a temperature every second. It prints how to connect a device, call the
//! API and scrape metrics.
//!
//! The same binary runs either server: `thingport-demo gateway ARGS` is `thingport-gateway ARGS` and
//! `thingport-demo foundation ARGS` is `thingport-foundation ARGS` (one build gives the whole-system tests real
//! server processes).

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
    std::fs::write(&keys, format!("{API_KEY}\n"))?;

    // two foundation workers sharing the ring: the second joins through the first
    let mut workers = Vec::new();
    let mut stops = Vec::new();
    for i in 0..2u16 {
        let api_port = if args.api_port == 0 { 0 } else { free_or_any(args.api_port + i) };
        let seeds = workers.iter().map(|a: &thingport_foundation::Addrs| a.peer).collect();
        let worker_config = thingport_foundation::Config {
            id: format!("foundation-{}", i + 1),
            link_address: loopback(0),
            api_address: loopback(api_port),
            admin_address: Some(loopback(0)),
            peer_address: loopback(0),
            seeds,
            bootstrap_members: 2,
            api_keys_file: keys.clone(),
            // each worker's store; with --dir, what the demo stored is there at the next start
            storage: thingport_foundation::config::StorageConfig {
                data_dir: dir.join(format!("foundation-{}", i + 1)),
                ..Default::default()
            },
            ..thingport_foundation::Config::default()
        };
        let worker = thingport_foundation::Worker::bind(worker_config).await?;
        workers.push(worker.addrs());
        let mut table = worker.table_version();
        let (stop_worker, worker_stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(worker.run(async move {
            let _ = worker_stopped.await;
        }));
        stops.push(stop_worker);
        if i == 1 {
            // the pool's first partition table, made once both are members
            tokio::time::timeout(Duration::from_secs(30), table.wait_for(|v| *v > 0))
                .await
                .context("the two workers did not form a pool")??;
        }
    }
    let worker_addrs = workers[0];

    // the gateway
    let mut config = thingport_gateway::Config::default();
    config.listen.address = loopback(free_or_any(args.port));
    config.admin.address = Some(loopback(0));
    config.tls.cert = cert.clone();
    config.tls.key = key.clone();
    config.auth.secret_file = secret.clone();
    config.upstream.foundations = workers.iter().map(|w| w.link).collect();
    // every device of a demo (and of a load test against it) comes from loopback: caps per source address
    // would only refuse them
    config.limits.max_sessions_per_ip = config.limits.max_sessions;
    config.limits.max_handshakes_per_ip = config.limits.max_handshakes;
    config.limits.max_waiting_per_ip = config.limits.max_waiting;
    let problems = config.validate();
    anyhow::ensure!(problems.is_empty(), "demo configuration: {problems:?}");
    let gateway = thingport_gateway::Gateway::bind(config).await?;
    let gw = gateway.addrs();
    let (stop_gateway, gateway_stopped) = tokio::sync::oneshot::channel::<()>();
    let gateway_task = tokio::spawn(gateway.run(async move {
        let _ = gateway_stopped.await;
    }));

    let tokens = thingport_gateway::token::TokenKey::from_file(&secret)?;
    let token = tokens.issue("demo-device", now() + 365 * 86_400);
    let wss = gw.wss.context("WSS listener")?;
    println!(
        "thingport demo is running (Ctrl-C stops it)\n\
         \n  gateway      wss://localhost:{port}/v1/device and quic://localhost:{port} (ALPN thingport/1)\n\
         \x20 certificate  {cert}\n\
         \x20 foundation   REST API http://{api} and http://{api2}, two workers sharing the ring (application key: {API_KEY})\n\
         \x20 metrics      http://{gw_admin}/metrics (gateway), http://{fd_admin}/metrics and http://{fd_admin2}/metrics (foundation)\n\
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
        fd_admin2 = workers[1].admin.map(|a| a.to_string()).unwrap_or_default(),
        gw_admin = gw.admin.map(|a| a.to_string()).unwrap_or_default(),
        fd_admin = worker_addrs.admin.map(|a| a.to_string()).unwrap_or_default(),
        secret = secret.display(),
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

    tokio::signal::ctrl_c().await?;
    println!("stopping: the gateway drains first");
    let _ = stop_gateway.send(());
    let _ = gateway_task.await;
    for stop_worker in stops {
        let _ = stop_worker.send(());
    }
    Ok(())
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
