//! thingport-foundation: Foundation worker: thing model, embedded consistent-hash cache ring and REST API.
//!
//! Only the command line exists so far: it prints its help.

use clap::Parser;

/// Foundation worker: thing model, embedded consistent-hash cache ring and REST API.
#[derive(Debug, Parser)]
#[command(name = "thingport-foundation", version)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    println!(
        "thingport-foundation {}: not yet implemented; see README.md for what runs today",
        env!("CARGO_PKG_VERSION")
    );
}
