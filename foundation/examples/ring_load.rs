//! Load on the ring alone: puts (a device's property batch) and gets (a thing's record) sent straight to the
//! partitions' primaries over the peer protocol, as a worker forwards them. Prints operations per second, latency,
//! and for each partition the longest time without a successful put (the failover time when a worker is killed
//! during the run). Used by `benches/ring-ops.sh`.
//!
//! cargo run --release -p thingport-foundation --example ring_load -- --peers 127.0.0.1:7201,127.0.0.1:7202

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a measurement tool: a panic is a failed run"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use thingport_foundation::ring::partition_of;
use thingport_foundation::ring::peers::Peers;
use thingport_protocol::peer::{Op, Refusal, Request, Response};
use thingport_protocol::{Frame, Properties, PropertyUpdate, Quality, Value};

#[derive(Debug, Parser)]
struct Args {
    /// Peer addresses of the workers, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    peers: Vec<SocketAddr>,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Distinct things written and read.
    #[arg(long, default_value_t = 10_000)]
    things: usize,
    /// Share of operations that are gets (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    reads: f64,
}

struct Shared {
    args: Args,
    peers: Peers,
    /// Thing names by partition, as many in each, so that every partition sees the same rate and a stall stands
    /// out from chance.
    things: Vec<Vec<String>>,
    /// Which worker led each partition at the last success.
    route: Vec<AtomicUsize>,
    /// Per worker: until when (µs since the start) it is skipped, after it failed to answer in time.
    skip_until: Vec<AtomicU64>,
    /// Per partition: the last successful put and the longest time between two, in µs since the start.
    last: Vec<AtomicU64>,
    gap: Vec<AtomicU64>,
    started: Instant,
}

#[derive(Default)]
struct Tally {
    puts: u64,
    gets: u64,
    retries: u64,
    latency: Option<Histogram<u64>>,
}

fn put(thing: String, n: u64) -> Op {
    let frame = Frame::Properties(Properties {
        seq: n,
        updates: vec![PropertyUpdate {
            name: "level".into(),
            timestamp_ms: n,
            quality: Quality::Good,
            value: Value::Float(n as f64),
        }],
    });
    Op::Device {
        thing: thing.into(),
        create: true,
        now_ms: n,
        incarnation: 1,
        epoch_ms: 0,
        frame: frame.to_bytes(),
    }
}

async fn client(shared: Arc<Shared>, index: usize) -> Tally {
    let args = &shared.args;
    let n_peers = args.peers.len();
    let mut tally = Tally {
        latency: Some(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()),
        ..Tally::default()
    };
    let deadline = shared.started + Duration::from_secs(args.seconds);
    let mut rng = fastrand::Rng::with_seed(index as u64);
    let mut n = 0u64;
    while Instant::now() < deadline {
        n += 1;
        let in_partition = &shared.things[rng.usize(..1024)];
        let thing = in_partition[rng.usize(..in_partition.len())].clone();
        let partition = partition_of(thing.as_bytes());
        let read = rng.f64() < args.reads;
        let request = if read {
            Request::Read { thing: thing.clone() }
        } else {
            Request::Write { partition, replica: false, version: 0, op: put(thing.clone(), n) }
        };
        let began = Instant::now();
        let mut at = shared.route[partition as usize].load(Ordering::Relaxed);
        loop {
            // a worker that did not answer in time is tried again only after a pause, as a worker's own
            // forwarding would after its table changed
            let now_us = shared.started.elapsed().as_micros() as u64;
            if (0..n_peers).any(|i| shared.skip_until[i].load(Ordering::Relaxed) <= now_us) {
                while shared.skip_until[at % n_peers].load(Ordering::Relaxed) > now_us {
                    at += 1;
                }
            }
            let addr = args.peers[at % n_peers];
            let key = addr.to_string();
            let answer = shared.peers.request(&key, addr, request.clone(), Duration::from_secs(1));
            match answer.await {
                Err(thingport_foundation::ring::peers::PeerError::Timeout) => {
                    let until = shared.started.elapsed().as_micros() as u64 + 2_000_000;
                    shared.skip_until[at % n_peers].fetch_max(until, Ordering::Relaxed);
                    at += 1;
                }
                Ok(Response::Done | Response::Thing(_)) => break,
                Ok(Response::Refused { refusal: Refusal::NotPrimary, .. }) => at += 1,
                other => {
                    if std::env::var_os("RING_LOAD_DEBUG").is_some_and(|v| !v.is_empty()) {
                        eprintln!(
                            "{} ms partition {partition} at {addr}: {other:?}",
                            shared.started.elapsed().as_millis()
                        );
                    }
                    // the worker is gone or the table is changing: try the next one after a pause
                    at += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            tally.retries += 1;
            if Instant::now() >= deadline + Duration::from_secs(30) {
                panic!("no worker took an operation on partition {partition} for 30 s");
            }
        }
        shared.route[partition as usize].store(at % n_peers, Ordering::Relaxed);
        let now = Instant::now();
        if let Some(h) = tally.latency.as_mut() {
            let _ = h.record(now.duration_since(began).as_micros().max(1) as u64);
        }
        if read {
            tally.gets += 1;
        } else {
            tally.puts += 1;
            let t = now.duration_since(shared.started).as_micros() as u64;
            let p = partition as usize;
            let before = shared.last[p].fetch_max(t, Ordering::Relaxed);
            if before > 0 && t > before {
                let old = shared.gap[p].fetch_max(t - before, Ordering::Relaxed);
                if t - before > 250_000
                    && old < 250_000
                    && std::env::var_os("RING_LOAD_DEBUG").is_some_and(|v| !v.is_empty())
                {
                    eprintln!("partition {p}: stall from {} ms to {} ms", before / 1000, t / 1000);
                }
            }
        }
    }
    tally
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let per_partition = args.things.div_ceil(1024).max(1);
    let mut things: Vec<Vec<String>> = vec![Vec::new(); 1024];
    let mut i = 0;
    while things.iter().any(|t| t.len() < per_partition) {
        let name = format!("thing-{i}");
        let list = &mut things[partition_of(name.as_bytes()) as usize];
        if list.len() < per_partition {
            list.push(name);
        }
        i += 1;
    }
    let shared = Arc::new(Shared {
        things,
        peers: Peers::new("ring-load".into(), 64 << 20, None),
        route: (0..1024).map(|p| AtomicUsize::new(p % args.peers.len())).collect(),
        last: (0..1024).map(|_| AtomicU64::new(0)).collect(),
        skip_until: args.peers.iter().map(|_| AtomicU64::new(0)).collect(),
        gap: (0..1024).map(|_| AtomicU64::new(0)).collect(),
        started: Instant::now(),
        args,
    });
    let tasks: Vec<_> =
        (0..shared.args.concurrency).map(|i| tokio::spawn(client(shared.clone(), i))).collect();
    let mut total = Tally {
        latency: Some(Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()),
        ..Tally::default()
    };
    for task in tasks {
        let t = task.await.unwrap();
        total.puts += t.puts;
        total.gets += t.gets;
        total.retries += t.retries;
        if let (Some(all), Some(h)) = (total.latency.as_mut(), t.latency.as_ref()) {
            all.add(h).unwrap();
        }
    }
    let elapsed = shared.started.elapsed().as_secs_f64();
    let h = total.latency.unwrap();
    let ops = (total.puts + total.gets) as f64 / elapsed;
    let gaps: Vec<u64> = shared.gap.iter().map(|g| g.load(Ordering::Relaxed)).collect();
    let worst = gaps.iter().copied().max().unwrap_or(0);
    let stalled = gaps.iter().filter(|&&g| g > 250_000).count();
    println!(
        "{} workers, {:.1} s, concurrency {}: {:.0} puts/s, {:.0} gets/s, {:.0} ops/s per worker; \
         latency µs p50 {} p99 {} p99.9 {} max {}; retries {}; longest stall of a partition's puts {} ms \
         ({} partitions stalled over 250 ms)",
        shared.args.peers.len(),
        elapsed,
        shared.args.concurrency,
        total.puts as f64 / elapsed,
        total.gets as f64 / elapsed,
        ops / shared.args.peers.len() as f64,
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
        total.retries,
        worst / 1000,
        stalled,
    );
}
