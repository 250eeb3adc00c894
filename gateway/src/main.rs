//! thingport-gateway: Connection server: terminates device WSS and QUIC sessions and multiplexes them onto the foundation pool.
//!
//! Only the command line exists so far: it prints its help.

use clap::Parser;

/// Connection server: terminates device WSS and QUIC sessions and multiplexes them onto the foundation pool.
#[derive(Debug, Parser)]
#[command(name = "thingport-gateway", version)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    println!(
        "thingport-gateway {}: not yet implemented; see README.md for what runs today",
        env!("CARGO_PKG_VERSION")
    );
}
