//! `thingport-foundation`: runs a foundation worker and checks its configuration. Exit status 64 means a bad
//! configuration or command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use thingport_foundation::{Config, Worker, config};

const EX_USAGE: u8 = 64;

/// Foundation worker: thing model, embedded cache ring and REST API.
#[derive(Debug, Parser)]
#[command(name = "thingport-foundation", version)]
struct Cli {
    #[arg(long, global = true, default_value = "/etc/thingport/foundation.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the worker (the default).
    Run,
    /// Check the configuration and print every problem (exit status 64 if any).
    CheckConfig,
    /// Print the default configuration, with a comment on every key.
    PrintDefaultConfig,
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        eprintln!("{}: {e}", path.display());
        ExitCode::from(EX_USAGE)
    })?;
    let problems = match Config::parse(&text) {
        Ok(config) => match config.validate() {
            p if p.is_empty() => return Ok(config),
            p => p,
        },
        Err(p) => p,
    };
    eprintln!("{}: {} problem(s):", path.display(), problems.len());
    for problem in problems {
        eprintln!("  {problem}");
    }
    Err(ExitCode::from(EX_USAGE))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::PrintDefaultConfig => {
            print!("{}", config::DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Command::CheckConfig => match load(&cli.config) {
            Ok(_) => {
                println!("{}: ok", cli.config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr)
                .init();
            let config = match load(&cli.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = runtime.block_on(async {
                // the handler first: a SIGTERM right after start must not kill the process unannounced
                let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                let worker = Worker::bind(config).await?;
                let addrs = worker.addrs();
                tracing::info!(link = %addrs.link, api = %addrs.api, admin = ?addrs.admin, peer = %addrs.peer, "listening");
                // one line on stdout with the bound addresses, for whoever started the worker with ports 0
                println!(
                    "{}",
                    serde_json::json!({
                        "link": addrs.link.to_string(),
                        "api": addrs.api.to_string(),
                        "admin": addrs.admin.map(|a| a.to_string()),
                        "peer": addrs.peer.to_string(),
                    })
                );
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                let mut watchdog_usec = 0;
                if sd_notify::watchdog_enabled(false, &mut watchdog_usec) {
                    let period = std::time::Duration::from_micros(watchdog_usec / 2);
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(period).await;
                            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                        }
                    });
                }
                worker
                    .run(async move {
                        tokio::select! {
                            _ = terminate.recv() => {}
                            _ = tokio::signal::ctrl_c() => {}
                        }
                    })
                    .await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
