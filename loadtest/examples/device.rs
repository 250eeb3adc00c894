//! An example device to copy: connects to a thingport gateway over WSS or QUIC, reports a property every second,
//! applies property writes, and serves one service (`echo`). It reconnects with backoff and never loses a reading:
//! unacknowledged readings are kept and sent again after a reconnect (the protocol crate's `DeviceSession` does
//! this).
//!
//! ```sh
//! cargo run --release --example device -- --target 127.0.0.1:8443 --ca cert.pem --thing demo-device --token TOKEN
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Parser;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use thingport_loadtest::client::{Device, Endpoint, Transport};
use thingport_protocol::{
    ByteString, Credential, DeviceConfig, DeviceEvent, Frame, Properties, PropertyUpdate, Quality,
    ServiceErrorCode, ServiceResponse, ServiceResult, Value,
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
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let trusted: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&args.ca)
        .context("reading --ca")?
        .collect::<Result<_, _>>()?;
    let transport = if args.quic { Transport::Quic } else { Transport::Wss };
    let endpoint = Endpoint::new(args.target, &args.server_name, transport, &trusted)?;
    let mut device = Device::new(
        DeviceConfig {
            thing: ByteString::from(args.thing.clone()),
            credential: Credential::Token(args.token.clone().into_bytes().into()),
            keepalive_secs: 30,
            handshake_timeout: Duration::from_secs(10),
            window: 1_000,
            // a real device stores this with its sequence counter; a new one after losing it
            incarnation: now_ms(),
        },
        1,
    );
    let mut setpoint = 20.0f64;
    let mut backoff = Duration::from_secs(1);
    loop {
        match device.connect(&endpoint).await {
            Ok(welcome) => {
                println!(
                    "connected: session {} keepalive {} s",
                    welcome.session_id, welcome.keepalive_secs
                );
                backoff = Duration::from_secs(1);
            }
            Err(e) => {
                eprintln!("connect failed: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                continue;
            }
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let ended = loop {
            if let Err(e) = device.flush().await {
                break e.to_string();
            }
            tokio::select! {
                _ = tick.tick() => {
                    let reading = setpoint + (now_ms() % 1_000) as f64 / 1_000.0;
                    let frame = Frame::Properties(Properties {
                        seq: 0,
                        updates: vec![PropertyUpdate {
                            name: "temperature".into(),
                            timestamp_ms: now_ms(),
                            quality: Quality::Good,
                            value: Value::Float(reading),
                        }],
                    });
                    // the session keeps it until acknowledged, across reconnects
                    if device.session.send(frame).is_err() {
                        eprintln!("too many unacknowledged readings; dropping this one");
                    }
                }
                event = device.recv_event() => match event {
                    Ok(Some(DeviceEvent::Data(Frame::Properties(write)))) => {
                        for update in write.updates {
                            println!("property write: {} = {:?}", update.name, update.value);
                            if let ("setpoint", Value::Float(v)) = (&*update.name, &update.value) {
                                setpoint = *v;
                            } else if let ("setpoint", Value::Int(v)) = (&*update.name, &update.value) {
                                setpoint = *v as f64;
                            }
                        }
                    }
                    Ok(Some(DeviceEvent::Data(Frame::ServiceRequest(call)))) => {
                        let result = match &*call.service {
                            "echo" => ServiceResult::Ok(call.params),
                            other => ServiceResult::Err {
                                code: ServiceErrorCode::NOT_FOUND,
                                message: format!("no service {other}").into(),
                            },
                        };
                        let answer = Frame::ServiceResponse(ServiceResponse { seq: 0, call_id: call.call_id, result });
                        let _ = device.session.send(answer);
                    }
                    Ok(Some(DeviceEvent::Goaway(goaway))) => {
                        println!("server asks to reconnect in {} ms", goaway.reconnect_after_ms);
                    }
                    Ok(_) => {}
                    Err(e) => break e.to_string(),
                },
            }
        };
        println!(
            "disconnected: {ended}; {} readings kept for the next connection",
            device.session.unacked()
        );
        device.abort();
        tokio::time::sleep(backoff).await;
    }
}
