//! `thingport-gateway`: runs the gateway, checks its configuration, and issues what devices need (certificates,
//! tokens). Exit status 64 (`EX_USAGE`) means a bad configuration or command line; systemd does not restart on it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use thingport_gateway::token::{TokenKey, parse_ttl};
use thingport_gateway::{Config, Gateway, config, tls};

const EX_USAGE: u8 = 64;

/// Connection server: terminates device WSS and QUIC sessions and multiplexes them onto the foundation pool.
#[derive(Debug, Parser)]
#[command(name = "thingport-gateway", version)]
struct Cli {
    /// Configuration file (see `print-default-config`).
    #[arg(long, global = true, default_value = "/etc/thingport/gateway.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Check the configuration file and print every problem (exit status 64 if any).
    CheckConfig,
    /// Print the default configuration, with a comment on every key.
    PrintDefaultConfig,
    /// Write a self-signed ECDSA P-256 certificate and its key (PEM).
    GenCert {
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// DNS names or IP addresses the certificate is for (repeatable).
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
    },
    /// Write a new random provisioning secret (the key that signs device tokens).
    GenSecret {
        #[arg(long)]
        out: PathBuf,
    },
    /// Device tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Issue a token for one thing, signed with the provisioning secret. With `--count N`, `--thing` is a prefix:
    /// tokens for PREFIX0 … PREFIX(N-1) are printed as `thing token` lines (a fleet for the load generator).
    Issue {
        #[arg(long)]
        thing: String,
        #[arg(long)]
        count: Option<u64>,
        /// How long the token is valid, e.g. 365d, 12h.
        #[arg(long, default_value = "365d")]
        ttl: String,
        /// The secret file (by default, the one named in the configuration).
        #[arg(long)]
        secret_file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(&cli.config),
        Command::CheckConfig => match load_config(&cli.config) {
            Ok(_) => {
                println!("{}: ok", cli.config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::PrintDefaultConfig => {
            print!("{}", config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Command::GenCert { cert, key, names } => report(gen_cert(&cert, &key, &names)),
        Command::GenSecret { out } => report(gen_secret(&out)),
        Command::Token { command: TokenCommand::Issue { thing, count, ttl, secret_file } } => {
            report(issue_token(&cli.config, &thing, count, &ttl, secret_file.as_deref()))
        }
    }
}

fn report(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads and checks the configuration, printing every problem; the error is the exit code.
fn load_config(path: &Path) -> Result<Config, ExitCode> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return Err(ExitCode::from(EX_USAGE));
        }
    };
    let problems = match Config::parse(&text) {
        Ok(config) => match config.validate() {
            problems if problems.is_empty() => return Ok(config),
            problems => problems,
        },
        Err(problems) => problems,
    };
    eprintln!("{}: {} problem(s):", path.display(), problems.len());
    for problem in problems {
        eprintln!("  {problem}");
    }
    Err(ExitCode::from(EX_USAGE))
}

fn run(path: &Path) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // colours only on a terminal: journald and log files get plain text
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let config = match load_config(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // handlers first: a SIGHUP or SIGTERM that arrives as soon as the listeners are up must not kill the process
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let gateway = Gateway::bind(config).await?;
    let addrs = gateway.addrs();
    tracing::info!(wss = ?addrs.wss, quic = ?addrs.quic, admin = ?addrs.admin, "listening");
    let handle = gateway.handle();
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match handle.reload() {
                Ok(()) => tracing::info!("certificate reloaded"),
                Err(e) => tracing::error!("{e:#}"),
            }
        }
    });
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut watchdog_usec = 0;
    if sd_notify::watchdog_enabled(false, &mut watchdog_usec) {
        let period = Duration::from_micros(watchdog_usec / 2);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
        });
    }
    gateway
        .run(async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        })
        .await
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents).with_context(|| format!("writing {}", path.display()))
}

fn gen_cert(cert: &Path, key: &Path, names: &[String]) -> Result<()> {
    let (cert_pem, key_pem) = tls::self_signed(names)?;
    write_new(key, key_pem.as_bytes(), 0o600)?;
    write_new(cert, cert_pem.as_bytes(), 0o644)?;
    println!(
        "wrote {} and {} (ECDSA P-256, self-signed for {})",
        cert.display(),
        key.display(),
        names.join(", ")
    );
    Ok(())
}

fn gen_secret(out: &Path) -> Result<()> {
    use base64::Engine;
    let mut secret = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| anyhow::anyhow!("no system randomness"))?;
    let text = format!("{}\n", base64::engine::general_purpose::STANDARD.encode(secret));
    write_new(out, text.as_bytes(), 0o600)?;
    println!("wrote a new provisioning secret to {}", out.display());
    Ok(())
}

fn issue_token(
    config: &Path,
    thing: &str,
    count: Option<u64>,
    ttl: &str,
    secret_file: Option<&Path>,
) -> Result<()> {
    let secret_file = match secret_file {
        Some(path) => path.to_path_buf(),
        None => {
            let text = std::fs::read_to_string(config)
                .with_context(|| format!("reading {}", config.display()))?;
            let config = Config::parse(&text).map_err(|e| anyhow::anyhow!(e.join("; ")))?;
            config.auth.secret_file
        }
    };
    let key = TokenKey::from_file(&secret_file)?;
    let ttl = parse_ttl(ttl)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let expiry = now + ttl.as_secs();
    match count {
        None => println!("{}", key.issue(thing, expiry)),
        Some(count) => {
            use std::io::Write;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for i in 0..count {
                let name = format!("{thing}{i}");
                writeln!(out, "{name} {}", key.issue(&name, expiry))?;
            }
            out.flush()?;
        }
    }
    Ok(())
}
