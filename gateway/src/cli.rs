//! The `thingport-gateway` command line: runs the gateway (through the shared process shell, [`thingport_shell`]),
//! checks its configuration, and issues what devices need (certificates, tokens). Exit status 64 (`EX_USAGE`) means a
//! bad configuration or command line; systemd does not restart on it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use thingport_shell::Process;

use crate::token::{TokenKey, parse_ttl};
use crate::{Config, Gateway, tls};

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
    #[command(flatten)]
    Shell(thingport_shell::Command),
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

/// Runs the command line `args` (the program name first); the process's exit status.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = Cli::parse_from(args);
    match cli.command.unwrap_or(Command::Shell(thingport_shell::Command::Run)) {
        Command::Shell(command) => command.execute(&cli.config, serve),
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

async fn serve(config: Config, mut process: Process) -> Result<()> {
    let gateway = Gateway::bind(config).await?;
    let handle = gateway.handle();
    process.on_hangup(move || match handle.reload() {
        Ok(()) => tracing::info!("certificate reloaded"),
        Err(e) => tracing::error!("{e:#}"),
    });
    let addrs = gateway.addrs();
    process.ready(&serde_json::json!({
        "wss": addrs.wss.map(|a| a.to_string()),
        "quic": addrs.quic.map(|a| a.to_string()),
        "admin": addrs.admin.map(|a| a.to_string()),
    }));
    gateway.run(process.shutdown()).await
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
        "wrote {} and {} (ECDSA P-256, self-signed for {}, valid {} days)",
        cert.display(),
        key.display(),
        names.join(", "),
        tls::SELF_SIGNED_DAYS
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
