//! The `thingport-foundation` command line: `run` (the default), `check-config`, `print-default-config`, all
//! through the shared process shell ([`thingport_shell`]).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use thingport_shell::{Command, Process};

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

/// Runs the command line `args` (the program name first); the process's exit status.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = Cli::parse_from(args);
    cli.command.unwrap_or(Command::Run).execute(&cli.config, serve)
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
