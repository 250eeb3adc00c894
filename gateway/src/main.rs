//! `thingport-gateway`: runs the gateway, checks its configuration, and issues what devices need
//! ([`thingport_gateway::cli`]). Exit status 64 means a bad configuration or command line.

fn main() -> std::process::ExitCode {
    thingport_gateway::cli::main(std::env::args_os())
}
