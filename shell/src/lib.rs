//! thingport-shell: the process around a thingport server, the same for the gateway and the foundation worker.
//!
//! - [`config`]: read a TOML configuration and report every problem at once (syntax, types, unknown keys, values),
//!   exit status 64 (`EX_USAGE`), on which the systemd units do not restart.
//! - [`Command`]: the subcommands every server has (`run`, `check-config`, `print-default-config`), and
//!   [`Command::execute`], which runs them.
//! - [`Process`]: logging (to stderr; stdout carries one JSON line of bound addresses), a multi-threaded runtime,
//!   SIGTERM and SIGINT as shutdown, SIGHUP as reload, and systemd notification (`READY`, `WATCHDOG`, `STOPPING`).
//! - [`admin`]: the admin router (`/metrics`, `/healthz`, `/readyz`).
//! - [`https`]: the listener that serves a server's HTTP API over TLS (or plain TCP without a certificate).
//! - [`pool`]: the pool's credentials (a CA of its own), mutual TLS on the internal connections and sealed
//!   membership datagrams.
//! - [`batch`]: the batched, vectored writer of the internal connections (gateway ↔ worker links, peer
//!   connections).
//!
//! It holds no server logic (the batched writer moves bytes, whatever they mean): a server supplies its
//! configuration type ([`ServerConfig`]) and an async `serve` function that binds, calls [`Process::ready`] and
//! runs until [`Process::shutdown`] completes.

pub mod admin;
pub mod batch;
pub mod config;
pub mod https;
pub mod pool;
mod process;

pub use config::ServerConfig;
pub use process::{Command, EX_USAGE, Process, init_logging, load_or_exit};
