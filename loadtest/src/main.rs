//! `thingport-loadtest`: simulated device fleets against a gateway, with an HDR latency report; and an
//! acknowledging worker for measuring the gateway alone.
//!
//! ```sh
//! thingport-gateway token issue --thing dev- --count 9000 --secret-file secret > fleet.txt
//! thingport-loadtest run --target 127.0.0.1:8443 --ca cert.pem --tokens fleet.txt --scenario telemetry \
//!     --rate 1 --duration 60s --ramp 1000
//! ```

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use thingport_device::{Endpoint, Transport};
use thingport_loadtest::fleet::{Fleet, Scenario, TransportChoice, ValueKind};
use thingport_loadtest::report::{Report, Stats, Summary};
use thingport_loadtest::worker::AckWorker;

#[derive(Debug, Parser)]
#[command(
    name = "thingport-loadtest",
    version,
    about = "Simulated device fleets over WSS and QUIC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a fleet against a gateway.
    Run(Box<RunArgs>),
    /// Run an acknowledging worker (a link-protocol backend that stores nothing) until interrupted.
    AckWorker {
        #[arg(long, default_value = "127.0.0.1:7101")]
        listen: SocketAddr,
    },
    /// Read streams of changes from a worker's API: one Server-Sent Event stream per thing PREFIX0, PREFIX1, ...,
    /// reporting the delay from the primary's receipt of each property value to its delivery.
    Watch {
        /// The worker's API address (plain HTTP).
        #[arg(long)]
        api: SocketAddr,
        #[arg(long, default_value = "demo-key")]
        api_key: String,
        /// Thing-name prefix, as given to `token issue --thing`.
        #[arg(long, default_value = "dev-")]
        things: String,
        /// Streams to open (things PREFIX0 to PREFIX{N-1}).
        #[arg(long, default_value_t = 1_000)]
        count: usize,
        /// How long to read once every stream is open.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long)]
        json: bool,
    },
    /// Take and release locks through workers' APIs (`/v1/locks`): CLIENTS clients, each in a loop of acquire and
    /// release, reporting operations per second, latency, and whether the fencing tokens grew.
    Locks {
        /// Workers' API addresses (plain HTTP); clients are spread over them.
        #[arg(long, required = true, num_args = 1..)]
        api: Vec<SocketAddr>,
        #[arg(long, default_value = "demo-key")]
        api_key: String,
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Distinct lock names (client i takes lock i % names; fewer names than clients: contention).
        #[arg(long)]
        names: Option<usize>,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long)]
        json: bool,
    },
    /// Run a plain-WebSocket backend that speaks the device protocol and acknowledges at once (what nginx and
    /// HAProxy proxy to in the side-by-side benchmark).
    WsBackend {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct RunArgs {
    /// Gateway address (WSS on TCP, QUIC on UDP).
    #[arg(long)]
    target: SocketAddr,
    /// Name to check the gateway's certificate against.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// PEM certificate (or CA) to trust.
    #[arg(long)]
    ca: PathBuf,
    /// Device identities: `thing token` per line (`thingport-gateway token issue --count N`).
    #[arg(long)]
    tokens: PathBuf,
    /// Use only the first N devices of the file.
    #[arg(long)]
    devices: Option<usize>,
    #[arg(long, value_enum, default_value = "wss")]
    transport: TransportChoice,
    #[arg(long, value_enum, default_value = "telemetry")]
    scenario: Scenario,
    /// New connections per second (all processes together).
    #[arg(long, default_value_t = 500.0)]
    ramp: f64,
    /// Messages per second per device.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Properties per message.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Bytes of value per property (with `--values bytes`).
    #[arg(long, default_value_t = 32)]
    payload: usize,
    /// What each property carries: `bytes` of `--payload` length, or a `float` reading (9 bytes on the wire).
    #[arg(long, value_enum, default_value = "bytes")]
    values: ValueKind,
    /// How long traffic runs after the ramp, e.g. 60s.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Source addresses to connect from, round-robin (e.g. 127.0.0.2,127.0.0.3).
    #[arg(long, value_delimiter = ',')]
    bind: Vec<IpAddr>,
    /// Worker processes to spread the fleet over (each has its own descriptor limit).
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// This process's share: `INDEX/COUNT` (set by the parent of a multi-process run).
    #[arg(long, hide = true)]
    shard: Option<String>,
    #[arg(long, default_value_t = 60)]
    keepalive: u16,
    /// Data frames a device keeps unacknowledged at most.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Share of devices dropped in the reconnect scenario.
    #[arg(long, default_value_t = 0.3)]
    reconnect_share: f64,
    /// Foundation API address (`service` scenario).
    #[arg(long)]
    api: Option<SocketAddr>,
    /// Application key for the API.
    #[arg(long, default_value = "demo-key")]
    api_key: String,
    /// Service calls per second (`service` scenario), all processes together.
    #[arg(long, default_value_t = 100.0)]
    call_rate: f64,
    /// Write `thing property value` for every acknowledged message to this file at the end (needs `--values
    /// numbered` and one process).
    #[arg(long)]
    acked: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Command::Run(args) = &cli.command {
        let mut errors = Vec::new();
        if args.acked.is_some() && args.values != ValueKind::Numbered {
            errors.push("--acked needs --values numbered");
        }
        if args.acked.is_some() && args.processes > 1 {
            errors.push("--acked needs --processes 1");
        }
        if args.values == ValueKind::Numbered && args.batch != 1 {
            errors.push("--values numbered sends one property per message: leave --batch at 1");
        }
        if !errors.is_empty() {
            for e in errors {
                eprintln!("error: {e}");
            }
            return ExitCode::from(64);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Run(args) if args.processes > 1 && args.shard.is_none() => {
            runtime.block_on(parent(*args))
        }
        Command::Run(args) => runtime.block_on(run(*args)),
        Command::AckWorker { listen } => runtime.block_on(ack_worker(listen)),
        Command::Watch { api, api_key, things, count, duration, json } => {
            runtime.block_on(watch(api, api_key, things, count, duration, json))
        }
        Command::Locks { api, api_key, clients, names, duration, json } => {
            runtime.block_on(locks(api, api_key, clients, names.unwrap_or(clients), duration, json))
        }
        Command::WsBackend { listen } => {
            runtime.block_on(thingport_loadtest::backend::serve(listen))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn watch(
    api: SocketAddr,
    key: String,
    prefix: String,
    count: usize,
    duration: Duration,
    json: bool,
) -> Result<()> {
    let things = (0..count).map(|i| format!("{prefix}{i}")).collect();
    let opened = |n: usize| {
        eprintln!("{n} streams open; reading for {}", humantime::format_duration(duration))
    };
    let report = thingport_loadtest::watch::watch(api, &key, things, duration, opened).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

async fn locks(
    apis: Vec<SocketAddr>,
    key: String,
    clients: usize,
    names: usize,
    duration: Duration,
    json: bool,
) -> Result<()> {
    let report = thingport_loadtest::locks::run(&apis, &key, clients, names, duration).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    if !report.tokens_ok {
        bail!("a fencing token was granted twice or did not grow");
    }
    Ok(())
}

async fn ack_worker(listen: SocketAddr) -> Result<()> {
    let worker = AckWorker::start(listen, "ack-worker").await?;
    eprintln!("ack worker on {}", worker.addr());
    tokio::signal::ctrl_c().await?;
    eprintln!("{} frames acknowledged", worker.frames());
    worker.kill().await;
    Ok(())
}

fn load_devices(args: &RunArgs) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(&args.tokens)
        .with_context(|| format!("reading {}", args.tokens.display()))?;
    let mut devices = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let Some((thing, token)) = line.trim().split_once(' ') else {
            bail!("{}:{}: expected `thing token`", args.tokens.display(), n + 1);
        };
        devices.push((thing.to_string(), token.trim().to_string()));
    }
    if let Some(limit) = args.devices {
        if devices.len() < limit {
            bail!("{} holds {} devices, {limit} asked for", args.tokens.display(), devices.len());
        }
        devices.truncate(limit);
    }
    Ok(devices)
}

fn parse_shard(shard: &str) -> Result<(usize, usize)> {
    let (index, count) = shard.split_once('/').context("--shard is INDEX/COUNT")?;
    Ok((index.parse()?, count.parse()?))
}

async fn run(args: RunArgs) -> Result<()> {
    let mut devices = load_devices(&args)?;
    let mut ramp = args.ramp;
    let mut label = String::new();
    if let Some(shard) = &args.shard {
        let (index, count) = parse_shard(shard)?;
        devices = devices.into_iter().skip(index).step_by(count).collect();
        ramp /= count as f64;
        label = format!("[{shard}] ");
    }
    let trusted: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&args.ca)
        .with_context(|| format!("reading {}", args.ca.display()))?
        .collect::<Result<_, _>>()?;
    let endpoint = Endpoint::new(args.target, &args.server_name, Transport::Wss, &trusted)?;
    let fleet = Arc::new(Fleet {
        endpoint,
        transport: args.transport,
        devices,
        scenario: args.scenario,
        ramp,
        rate: args.rate,
        batch: args.batch,
        payload: args.payload,
        values: args.values,
        duration: args.duration,
        binds: args.bind.clone(),
        keepalive_secs: args.keepalive,
        window: args.window,
        reconnect_share: args.reconnect_share,
        api: args.api.map(|a| (a, args.api_key.clone())),
        call_rate: args.call_rate / args.processes.max(1) as f64,
        acked: args.acked.as_ref().map(|_| Arc::default()),
    });
    let frame_bytes = fleet.message(1).encoded_len();
    let stats = Arc::new(Stats::default());
    let started = Instant::now();
    let progress = (!args.quiet).then(|| tokio::spawn(progress(stats.clone(), label)));
    fleet.clone().run(stats.clone()).await;
    if let Some(progress) = progress {
        progress.abort();
    }
    let report = stats.report(started.elapsed(), frame_bytes);
    if let (Some(path), Some(acked)) = (&args.acked, &fleet.acked) {
        let acked = acked.lock().unwrap_or_else(|e| e.into_inner());
        let lines: String = acked.iter().map(|(thing, n)| format!("{thing} n{n} {n}\n")).collect();
        std::fs::write(path, lines).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.shard.is_some() || args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

async fn progress(stats: Arc<Stats>, label: String) {
    let started = Instant::now();
    let mut last_acked = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let acked = stats.acked.load(Ordering::Relaxed);
        let interval = Summary::of(&stats.take_interval());
        eprintln!(
            "{label}t={:>4}s sessions={} acked/s={} p50={:.2}ms p99={:.2}ms errors={}",
            started.elapsed().as_secs(),
            stats.connected.load(Ordering::Relaxed),
            acked - last_acked,
            interval.p50_ms,
            interval.p99_ms,
            stats.connect_errors.load(Ordering::Relaxed)
                + stats.session_errors.load(Ordering::Relaxed),
        );
        last_acked = acked;
    }
}

/// Runs `processes` copies of this program, each with a share of the fleet, and merges their reports.
async fn parent(args: RunArgs) -> Result<()> {
    let exe = std::env::current_exe()?;
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut children = Vec::new();
    for index in 0..args.processes {
        let mut command = tokio::process::Command::new(&exe);
        command.args(&raw).arg("--shard").arg(format!("{index}/{}", args.processes));
        command.stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true);
        children.push(command.spawn().context("starting a worker process")?);
    }
    let mut reports = Vec::new();
    for child in children {
        let output = child.wait_with_output().await?;
        if !output.status.success() {
            bail!("a worker process failed: {}", output.status);
        }
        let line = BufReader::new(&output.stdout[..])
            .lines()
            .map_while(Result::ok)
            .last()
            .unwrap_or_default();
        reports.push(serde_json::from_str::<Report>(&line).context("a worker process's report")?);
    }
    let report = Report::merge(&reports)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
