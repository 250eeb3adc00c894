//! An example device to copy: connects to a thingport gateway over WSS or QUIC, reports a temperature every second,
//! applies writes of `setpoint`, and serves one service (`echo`). It reconnects with jittered backoff and loses no
//! reading: unacknowledged readings are sent again after a reconnect, and with `--outbox FILE` after a restart too.
//!
//! Against `thingport-demo` (which prints the certificate path and a token for `demo-device`):
//!
//! ```sh
//! cargo run --release -p thingport-device --example device -- \
//!     --target 127.0.0.1:8443 --ca /tmp/thingport-demo-PID/cert.pem --thing demo-device --token TOKEN
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use clap::Parser;
use thingport_device::{Client, Endpoint, Handler, Options, Transport};
use thingport_protocol::{
    Credential, PropertyUpdate, Quality, ServiceErrorCode, ServiceRequest, ServiceResult, Value,
    Welcome,
};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8443")]
    target: SocketAddr,
    /// The gateway's certificate (or its CA), PEM.
    #[arg(long)]
    ca: PathBuf,
    #[arg(long, default_value = "localhost")]
    server_name: String,
    #[arg(long)]
    thing: String,
    /// Token from `thingport-gateway token issue --thing NAME`.
    #[arg(long)]
    token: String,
    #[arg(long)]
    quic: bool,
    /// Keep unacknowledged readings in this file across restarts.
    #[arg(long)]
    outbox: Option<PathBuf>,
    /// Stop after this many readings are acknowledged (default: run until interrupted).
    #[arg(long)]
    count: Option<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What the server can ask of this device.
struct Thermostat {
    setpoint: Arc<Mutex<f64>>,
}

impl Handler for Thermostat {
    fn connected(&mut self, welcome: &Welcome) {
        println!(
            "connected: session {} keepalive {} s",
            welcome.session_id, welcome.keepalive_secs
        );
    }

    fn disconnected(&mut self, reason: &str, retry_in: Duration) {
        println!("disconnected: {reason}; retrying in {retry_in:?}");
    }

    fn property_write(&mut self, updates: &[PropertyUpdate]) {
        for update in updates {
            println!("property write: {} = {:?}", update.name, update.value);
            let value = match update.value {
                Value::Float(v) => Some(v),
                Value::Int(v) => Some(v as f64),
                _ => None,
            };
            if let (true, Some(v)) = (&*update.name == "setpoint", value)
                && let Ok(mut setpoint) = self.setpoint.lock()
            {
                *setpoint = v;
            }
        }
    }

    fn service_call(&mut self, call: &ServiceRequest) -> Option<ServiceResult> {
        Some(match &*call.service {
            "echo" => ServiceResult::Ok(call.params.clone()),
            other => ServiceResult::Err {
                code: ServiceErrorCode::NOT_FOUND,
                message: format!("no service {other}").into(),
            },
        })
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let trusted = thingport_device::read_certificates(&args.ca)?;
    let transport = if args.quic { Transport::Quic } else { Transport::Wss };
    let endpoint = Endpoint::new(args.target, &args.server_name, transport, &trusted)?;
    let mut options =
        Options::new(endpoint, args.thing, Credential::Token(args.token.into_bytes().into()));
    options.outbox = args.outbox;
    let (client, handle) = Client::new(options)?;
    let setpoint = Arc::new(Mutex::new(20.0));
    let handler = Thermostat { setpoint: setpoint.clone() };
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(client.run(handler, stop.clone().cancelled_owned()));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = 0;
    for _ in 0..args.count.unwrap_or(u64::MAX) {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let base = setpoint.lock().map_or(20.0, |s| *s);
        let reading = base + (now_ms() % 1_000) as f64 / 1_000.0;
        // kept (and in the outbox) until acknowledged, across reconnects
        last = handle
            .properties(vec![PropertyUpdate {
                name: "temperature".into(),
                timestamp_ms: now_ms(),
                quality: Quality::Good,
                value: Value::Float(reading),
            }])
            .await?;
    }
    if args.count.is_some() {
        handle.wait_acked(last).await?;
        println!("{last} readings acknowledged");
    }
    stop.cancel();
    running.await?;
    Ok(())
}
