//! `thingport-foundation`: runs a foundation worker and checks its configuration ([`thingport_foundation::cli`]).
//! Exit status 64 means a bad configuration or command line.

fn main() -> std::process::ExitCode {
    thingport_foundation::cli::main(std::env::args_os())
}
