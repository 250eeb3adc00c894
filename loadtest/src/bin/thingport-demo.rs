//! `thingport-demo`: the whole system on this machine for a first try — a gateway and a pool of two foundation
//! workers sharing the cache ring, on loopback with a self-signed certificate, a demo device token, an application
//! key, and a simulated device that reports a temperature every second. It prints how to connect a device, call the
//! API and scrape metrics.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Parser;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use thingport_loadtest::client::{Device, Endpoint, Transport};
use thingport_protocol::{
    ByteString, Credential, DeviceConfig, DeviceEvent, Frame, Properties, PropertyUpdate, Quality,
    ServiceResponse, ServiceResult, Value,
};

/// Start a gateway and two foundation workers on loopback, with a simulated device.
#[derive(Debug, Parser)]
#[command(name = "thingport-demo", version)]
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

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
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
         \x20   cargo run --release --example device -- --target {wss} --ca {cert} --thing demo-device --token {token}\n\
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
        let trusted: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(&cert)?.collect::<Result<_, _>>()?;
        let endpoint = Endpoint::new(wss, "localhost", Transport::Wss, &trusted)?;
        let token = tokens.issue("sim-device", now() + 86_400);
        tokio::spawn(simulated_device(endpoint, token));
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

/// A device reporting `temperature` every second, applying writes to `setpoint`, and answering `echo`.
async fn simulated_device(endpoint: Endpoint, token: String) {
    let mut device = Device::new(
        DeviceConfig {
            thing: ByteString::from_static("sim-device"),
            credential: Credential::Token(token.into_bytes().into()),
            keepalive_secs: 30,
            handshake_timeout: Duration::from_secs(10),
            window: 600,
            incarnation: now(),
        },
        1,
    );
    let mut setpoint = 21.0;
    loop {
        if device.connect(&endpoint).await.is_err() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            if device.flush().await.is_err() {
                break;
            }
            tokio::select! {
                _ = tick.tick() => {
                    let t = setpoint + (now() % 7) as f64 / 10.0;
                    let _ = device.session.send(Frame::Properties(Properties {
                        seq: 0,
                        updates: vec![PropertyUpdate {
                            name: "temperature".into(),
                            timestamp_ms: now() * 1_000,
                            quality: Quality::Good,
                            value: Value::Float(t),
                        }],
                    }));
                }
                event = device.recv_event() => match event {
                    Ok(Some(DeviceEvent::Data(Frame::Properties(write)))) => {
                        for u in write.updates {
                            match u.value {
                                Value::Float(v) if &*u.name == "setpoint" => setpoint = v,
                                Value::Int(v) if &*u.name == "setpoint" => setpoint = v as f64,
                                _ => {}
                            }
                        }
                    }
                    Ok(Some(DeviceEvent::Data(Frame::ServiceRequest(call)))) => {
                        let _ = device.session.send(Frame::ServiceResponse(ServiceResponse {
                            seq: 0,
                            call_id: call.call_id,
                            result: ServiceResult::Ok(call.params),
                        }));
                    }
                    Ok(_) => {}
                    Err(_) => break,
                },
            }
        }
        device.abort();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
