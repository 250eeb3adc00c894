//! Scenario S1: connections that never send a byte cannot lock devices out. They wait for their first bytes with a
//! short deadline of their own and take no handshake slot, so 10,000 of them — from ten source addresses, held by
//! helper processes for the descriptor limit — leave a device's first round trip, over WSS and QUIC, under a
//! second.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "in tests a panic is a failed assertion"
)]

mod support;

use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Harness, within};
use thingport_device::Transport;
use thingport_protocol::{DeviceEvent, Frame, Properties, PropertyUpdate, Quality, Value};

const HOLDERS: u8 = 10;
const PER_HOLDER: usize = 1_000;
const HOLD_ENV: &str = "THINGPORT_TEST_HOLD";

/// Not a test: the body of a helper process. It connects `count` TCP sockets from `source` to `target` — `silent`,
/// or `trickle`: sending the first byte of a ClientHello and nothing more —, says so on stdout, and holds them until
/// its stdin closes.
#[test]
#[ignore = "a helper process of ten_thousand_idle_or_trickling_connections_leave_a_device_a_fast_round_trip"]
fn hold_idle_connections() {
    let Ok(spec) = std::env::var(HOLD_ENV) else { return };
    let mut parts = spec.split(' ');
    let target: SocketAddr = parts.next().unwrap().parse().unwrap();
    let source: IpAddr = parts.next().unwrap().parse().unwrap();
    let count: usize = parts.next().unwrap().parse().unwrap();
    let trickle = parts.next() == Some("trickle");
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::new(source, 0).into()).unwrap();
        socket.connect(&target.into()).unwrap();
        if trickle {
            // the gateway may already have closed it (a cap): that is its answer, not an error here
            let _ = socket.send(&[0x16]);
        }
        held.push(socket);
    }
    println!("held {count}");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

/// Helper processes, stopped when dropped (the test's end or its failure).
struct Holders(Vec<Child>);

impl Drop for Holders {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn hold(target: SocketAddr, mode: &str) -> Holders {
    let mut holders = Holders(Vec::new());
    for i in 0..HOLDERS {
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "hold_idle_connections", "--ignored", "--nocapture", "--quiet"])
            .env(HOLD_ENV, format!("{target} 127.0.0.{} {PER_HOLDER} {mode}", i + 2))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        holders.0.push(child);
    }
    for child in &mut holders.0 {
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let said = stdout.lines().map_while(Result::ok).find(|line| line.starts_with("held"));
        assert_eq!(said, Some(format!("held {PER_HOLDER}")), "a helper could not connect");
    }
    holders
}

/// This process's resident memory, KiB.
fn rss_kib() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|line| line.starts_with(name))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

/// Connects a device, sends one reading and waits for its acknowledgement; how long that took.
async fn first_round_trip(harness: &Harness, thing: &str, transport: Transport) -> Duration {
    let started = Instant::now();
    let mut device = harness.device(thing);
    device.connect(&harness.endpoint(transport)).await.unwrap();
    let reading = PropertyUpdate {
        name: "level".into(),
        timestamp_ms: 1_000,
        quality: Quality::Good,
        value: Value::Int(1),
    };
    device.send(Frame::Properties(Properties { seq: 0, updates: vec![reading] })).await.unwrap();
    loop {
        if let DeviceEvent::Acked { seq: 1 } = device.next_event().await.unwrap() {
            break;
        }
    }
    let took = started.elapsed();
    device.disconnect().await;
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_or_trickling_connections_leave_a_device_a_fast_round_trip() {
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
    let harness = Harness::start(1, |c| {
        // long enough that every idle connection is still held while the device connects
        c.limits.first_bytes_timeout = Duration::from_secs(120);
        c.limits.handshake_timeout = Duration::from_secs(120);
    })
    .await;
    let rss_before = rss_kib();
    let holders = tokio::task::spawn_blocking({
        let target = harness.addrs.wss.unwrap();
        move || hold(target, "silent")
    })
    .await
    .unwrap();
    let total = f64::from(HOLDERS) * PER_HOLDER as f64;
    within("every idle connection accepted and waiting", async {
        loop {
            let (_, metrics) = harness.admin_get("/metrics").await;
            if gauge(&metrics, "thingport_gateway_connections_waiting{transport=\"wss\"}") >= total
            {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;

    let per_connection = (rss_kib() - rss_before) as f64 * 1024.0 / total;
    eprintln!("resident memory per idle connection: {per_connection:.0} bytes (this process)");
    let wss = within("a WSS device", first_round_trip(&harness, "legit-wss", Transport::Wss)).await;
    let quic =
        within("a QUIC device", first_round_trip(&harness, "legit-quic", Transport::Quic)).await;
    eprintln!("with {total} idle connections held: first round trip WSS {wss:?}, QUIC {quic:?}");
    assert!(wss < Duration::from_secs(1), "WSS first round trip took {wss:?}");
    assert!(quic < Duration::from_secs(1), "QUIC first round trip took {quic:?}");
    let (_, metrics) = harness.admin_get("/metrics").await;
    assert!(
        gauge(&metrics, "thingport_gateway_connections_waiting{transport=\"wss\"}") >= total,
        "the idle connections were still held"
    );
    drop(holders);
    harness.stop().await.unwrap();

    // the same 10,000 trickling: each has sent a byte and wants a handshake slot. One address gets at most
    // limits.max_handshakes_per_ip of them (the rest are closed at once), so ten addresses cannot fill the pool.
    let harness =
        Harness::start(1, |c| c.limits.handshake_timeout = Duration::from_secs(120)).await;
    let per_ip = harness_limits().max_handshakes_per_ip as f64;
    let holders = tokio::task::spawn_blocking({
        let target = harness.addrs.wss.unwrap();
        move || hold(target, "trickle")
    })
    .await
    .unwrap();
    within("each address at its handshake cap", async {
        loop {
            let (_, metrics) = harness.admin_get("/metrics").await;
            let refused = "thingport_gateway_refused_total{transport=\"wss\",reason=\"max_handshakes_per_ip\"}";
            if gauge(&metrics, "thingport_gateway_handshakes_active{transport=\"wss\"}")
                >= f64::from(HOLDERS) * per_ip
                && gauge(&metrics, refused) >= total - f64::from(HOLDERS) * per_ip
            {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let wss =
        within("a WSS device", first_round_trip(&harness, "legit-wss-2", Transport::Wss)).await;
    eprintln!("with {total} trickling connections: first round trip WSS {wss:?}");
    assert!(wss < Duration::from_secs(1), "WSS first round trip took {wss:?}");
    drop(holders);
    harness.stop().await.unwrap();
}

fn harness_limits() -> thingport_gateway::config::Limits {
    thingport_gateway::config::Limits::default()
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_cut_at_the_first_bytes_deadline() {
    use tokio::io::AsyncReadExt;
    let harness = Harness::start(1, |c| {
        c.limits.first_bytes_timeout = Duration::from_millis(100);
        // far beyond `within`'s 10 s: only the first-bytes deadline can close it in time
        c.limits.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    let mut silent = tokio::net::TcpStream::connect(harness.addrs.wss.unwrap()).await.unwrap();
    let mut buf = [0u8; 16];
    let n = within("closed at the first-bytes deadline", silent.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    let (_, metrics) = harness.admin_get("/metrics").await;
    assert!(metrics.contains("result=\"first_bytes_timeout\""), "the cut is counted:\n{metrics}");
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn quic_under_handshake_load_asks_for_a_retry_and_still_admits_a_device() {
    let harness = Harness::start(1, |c| c.limits.max_handshakes = 3).await;
    // two QUIC connections up but silent (no stream): each holds a QUIC handshake slot, over half of them
    let mut silent = Vec::new();
    let quic = harness.endpoint(Transport::Quic);
    for _ in 0..2 {
        let conn = thingport_device::FrameConn::connect(&quic);
        silent.push(within("a silent QUIC connection", conn).await.unwrap());
    }
    within("the handshakes counted", async {
        loop {
            let (_, metrics) = harness.admin_get("/metrics").await;
            if gauge(&metrics, "thingport_gateway_handshakes_active{transport=\"quic\"}") >= 2.0 {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    // a device now proves its address with a Retry first, then is admitted to the last slot
    within("a QUIC device", first_round_trip(&harness, "retried", Transport::Quic)).await;
    let (_, metrics) = harness.admin_get("/metrics").await;
    assert!(
        metrics.lines().any(|l| l.contains("result=\"retry\"") && l.contains("transport=\"quic\"")),
        "the Retry is counted:\n{metrics}"
    );
    // WSS has its own pool: QUIC's load does not refuse it
    within("a WSS device", first_round_trip(&harness, "wss-beside", Transport::Wss)).await;
    drop(silent);
    harness.stop().await.unwrap();
}
