//! The process: subcommands, logging, the runtime, signals and systemd notification.

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::config::{self, ServerConfig};

/// Exit status of a bad configuration or command line (`EX_USAGE`); the units set `RestartPreventExitStatus=64`.
pub const EX_USAGE: u8 = 64;

/// The subcommands every server has; a server flattens them into its own (`#[command(flatten)]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Run,
    /// Check the configuration file and print every problem (exit status 64 if any).
    CheckConfig,
    /// Print the default configuration, with a comment on every key.
    PrintDefaultConfig,
}

impl Command {
    /// Runs the subcommand with the configuration at `path`. For `run`: logging is set up, the configuration is
    /// loaded (every problem printed, exit 64), signal handlers are installed and `serve` runs on a multi-threaded
    /// runtime; an error it returns is logged and the exit status is 1.
    pub fn execute<C, F, Fut>(self, path: &Path, serve: F) -> ExitCode
    where
        C: ServerConfig,
        F: FnOnce(C, Process) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        match self {
            Command::PrintDefaultConfig => {
                print!("{}", C::DEFAULT_FILE);
                ExitCode::SUCCESS
            }
            Command::CheckConfig => match load_or_exit::<C>(path) {
                Ok(_) => {
                    println!("{}: ok", path.display());
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            },
            Command::Run => run(path, serve),
        }
    }
}

/// Loads the configuration or prints every problem and returns exit status 64.
pub fn load_or_exit<C: ServerConfig>(path: &Path) -> Result<C, ExitCode> {
    config::load::<C>(path).map_err(|problems| {
        eprintln!("{}: {} problem(s):", path.display(), problems.len());
        for problem in problems {
            eprintln!("  {problem}");
        }
        ExitCode::from(EX_USAGE)
    })
}

fn run<C, F, Fut>(path: &Path, serve: F) -> ExitCode
where
    C: ServerConfig,
    F: FnOnce(C, Process) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    init_logging();
    let config = match load_or_exit::<C>(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    raise_open_files_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // handlers before anything binds: a signal that arrives as soon as the listeners are up must not kill the
        // process unannounced
        let process = Process::new()?;
        serve(config, process).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit on open files to the hard limit: every connection is a descriptor, and the soft limit
/// (often 1,024) is far below what the limits in the configuration allow. Logs the limit in force.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "the open files limit could not be raised"),
    }
}

/// The filter without `RUST_LOG`: `info`, but the consensus library's own progress (elections, replication
/// steps, its state at start) only from `warn` up; thingport logs what the group does in its own words.
const DEFAULT_LOG_FILTER: &str = "info,openraft=warn";

/// Logs to stderr (journald keeps it), `RUST_LOG` filters (default [`DEFAULT_LOG_FILTER`]), colours only on a
/// terminal.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// The running process's signals and its conversation with systemd.
#[derive(Debug)]
pub struct Process {
    terminate: Signal,
    interrupt: Signal,
    hangup: Option<Signal>,
}

impl Process {
    /// Installs the SIGTERM, SIGINT and SIGHUP handlers. Inside a tokio runtime.
    pub fn new() -> std::io::Result<Process> {
        Ok(Process {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: Some(signal(SignalKind::hangup())?),
        })
    }

    /// Calls `reload` on every SIGHUP. Without it, a SIGHUP is logged and otherwise ignored.
    pub fn on_hangup(&mut self, mut reload: impl FnMut() + Send + 'static) {
        if let Some(mut hangup) = self.hangup.take() {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    reload();
                }
            });
        }
    }

    /// The server is up: prints `addrs` as one JSON line on stdout (for whoever started it with port 0), logs
    /// them, tells systemd `READY=1` and, when the unit has a watchdog, pings it at half its period.
    pub fn ready(&mut self, addrs: &serde_json::Value) {
        tracing::info!(%addrs, "listening");
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{addrs}");
            let _ = out.flush();
        }
        self.on_hangup(|| tracing::info!("SIGHUP: nothing to reload"));
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
    }

    /// Completes on the first SIGTERM or SIGINT, after telling systemd `STOPPING=1`: the server's shutdown future.
    pub async fn shutdown(mut self) {
        let which = tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        };
        tracing::info!("{which}: stopping");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    }
}
