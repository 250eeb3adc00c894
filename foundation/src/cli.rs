//! The `thingport-foundation` command line: `run` (the default), `check-config`, `print-default-config`, all
//! through the shared process shell ([`thingport_shell`]), and `pool init` / `pool issue`, which make the pool's
//! credentials ([`thingport_shell::pool`]).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use thingport_shell::Process;

use crate::{Config, Worker};

/// Foundation worker: thing model, embedded cache ring and REST API.
#[derive(Debug, Parser)]
#[command(name = "thingport-foundation", version)]
struct Cli {
    /// Configuration file (see `print-default-config`).
    #[arg(long, global = true, default_value = "/etc/thingport/foundation.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Shell(thingport_shell::Command),
    /// The pool's credentials: a CA of its own, a certificate per host, the membership key.
    Pool {
        #[command(subcommand)]
        command: PoolCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Make the credentials of a new pool in DIR (refuses if DIR holds a pool).
    Init {
        #[arg(long, default_value = "/etc/thingport/pool")]
        dir: PathBuf,
        /// This host's name, written into its certificate (by default the system's host name).
        #[arg(long)]
        host: Option<String>,
    },
    /// Write into OUT what another host needs to join the pool of DIR (DIR must hold ca.key): copy OUT to that
    /// host and name it in pool_credentials there.
    Issue {
        #[arg(long, default_value = "/etc/thingport/pool")]
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// The other host's name, written into its certificate.
        #[arg(long)]
        host: String,
    },
}

/// Runs the command line `args` (the program name first); the process's exit status.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = Cli::parse_from(args);
    let result = match cli.command.unwrap_or(Command::Shell(thingport_shell::Command::Run)) {
        Command::Shell(command) => return command.execute(&cli.config, serve),
        Command::Pool { command: PoolCommand::Init { dir, host } } => {
            let host = host.unwrap_or_else(host_name);
            thingport_shell::pool::init(&dir, &host)
                .map(|()| println!("pool credentials for {host} in {}", dir.display()))
        }
        Command::Pool { command: PoolCommand::Issue { dir, out, host } } => {
            thingport_shell::pool::issue(&dir, &out, &host)
                .map(|()| println!("credentials for {host} in {}", out.display()))
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

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

async fn serve(config: Config, mut process: Process) -> anyhow::Result<()> {
    let worker = Worker::bind(config).await?;
    let addrs = worker.addrs();
    process.ready(&serde_json::json!({
        "link": addrs.link.to_string(),
        "api": addrs.api.to_string(),
        "admin": addrs.admin.map(|a| a.to_string()),
        "peer": addrs.peer.to_string(),
    }));
    worker.run(process.shutdown()).await
}
