//! The `thingport-foundation` command line: `run` (the default), `check-config`, `print-default-config`, all
//! through the shared process shell ([`thingport_shell`]), and `pool init` / `pool issue`, which make the pool's
//! credentials ([`thingport_shell::pool`]), and `api-key add|list|revoke` ([`crate::keys`]).

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
    /// The REST API's application keys (kept hashed in api_keys_file; a change counts from the next request).
    ApiKey {
        /// The keys file (by default, the configuration's api_keys_file).
        #[arg(long, global = true)]
        file: Option<PathBuf>,
        #[command(subcommand)]
        command: KeyCommand,
    },
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Make a new key and print it: it is shown only now; the file keeps its hash.
    Add {
        /// viewer (reads), operator (reads, property writes, service calls) or admin (everything).
        #[arg(long)]
        role: String,
        /// Limit the key to things whose names start with PREFIX (repeatable).
        #[arg(long = "prefix")]
        prefixes: Vec<String>,
        /// A name to list and revoke it by.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List the keys: id, role, prefixes, name.
    List,
    /// Remove a key, by name or by id (at least 8 of its hex digits).
    Revoke { id: String },
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
        /// worker (joins the ring; gets the membership key) or gateway (links to workers, nothing more).
        #[arg(long, default_value = "worker")]
        role: String,
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
        Command::Pool { command: PoolCommand::Issue { dir, out, host, role } } => {
            let member = match role.as_str() {
                "worker" => Ok(thingport_shell::pool::Member::Worker),
                "gateway" => Ok(thingport_shell::pool::Member::Gateway),
                _ => Err(anyhow::anyhow!("--role is worker or gateway")),
            };
            member.and_then(|member| {
                thingport_shell::pool::issue(&dir, &out, &host, member)
                    .map(|()| println!("{role} credentials for {host} in {}", out.display()))
            })
        }
        Command::ApiKey { file, command } => {
            let file = match file {
                Some(file) => Ok(file),
                None => keys_file(&cli.config),
            };
            file.and_then(|file| api_key(&file, command))
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

/// The configuration's `api_keys_file`; the default one only when there is no configuration file.
fn keys_file(config: &std::path::Path) -> anyhow::Result<PathBuf> {
    match std::fs::read_to_string(config) {
        Ok(text) => Config::parse(&text).map(|c| c.api_keys_file).map_err(|problems| {
            anyhow::anyhow!(
                "{}: {} (or name the file with --file)",
                config.display(),
                problems.join("; ")
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default().api_keys_file),
        Err(e) => {
            Err(anyhow::anyhow!("reading {}: {e} (or name the file with --file)", config.display()))
        }
    }
}

fn api_key(file: &std::path::Path, command: KeyCommand) -> anyhow::Result<()> {
    use crate::keys;
    match command {
        KeyCommand::Add { role, prefixes, name } => {
            let role = keys::Role::parse(&role)
                .ok_or_else(|| anyhow::anyhow!("--role is viewer, operator or admin"))?;
            let key = keys::add(file, role, &prefixes, &name)?;
            println!("{key}");
            eprintln!("added to {}; this is the only time the key is shown", file.display());
        }
        KeyCommand::List => {
            for line in keys::list(file)? {
                println!("{line}");
            }
        }
        KeyCommand::Revoke { id } => {
            keys::revoke(file, &id)?;
            eprintln!("revoked; it is refused from the next request");
        }
    }
    Ok(())
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
