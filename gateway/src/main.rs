//! thingport-gateway: the connection server. It will terminate device WSS and QUIC sessions and multiplex them onto
//! the foundation pool.
//!
//! Only the command line exists so far; `demo` says what runs today.

use clap::{Parser, Subcommand};

/// Connection server: terminates device WSS and QUIC sessions and multiplexes them onto the foundation pool.
#[derive(Debug, Parser)]
#[command(name = "thingport-gateway", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the whole system on this machine (gateway and a foundation pool on loopback, self-signed TLS).
    Demo,
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Demo) | None => {
            println!(
                "thingport {}: the gateway and foundation servers are not built yet, so there is nothing to start.\n\
                 What exists today is the wire protocol (protocol/, specified in docs/PROTOCOL.md):\n\
                 \x20 cargo test -p thingport-protocol                  # its tests, including the specification's vectors\n\
                 \x20 cargo bench -p thingport-protocol --bench codec   # encode/decode throughput",
                env!("CARGO_PKG_VERSION")
            );
        }
    }
}
