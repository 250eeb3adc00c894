//! thingport-loadtest: Simulated device fleets over WSS and QUIC with HDR latency reports.
//!
//! Only the command line exists so far: it prints its help.

use clap::Parser;

/// Simulated device fleets over WSS and QUIC with HDR latency reports.
#[derive(Debug, Parser)]
#[command(name = "thingport-loadtest", version)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    println!(
        "thingport-loadtest {}: not yet implemented; see README.md for what runs today",
        env!("CARGO_PKG_VERSION")
    );
}
