//! thingport-loadtest: simulated device fleets over WSS and QUIC.
//!
//! - [`fleet`]: many devices on an open-loop schedule, in the scenarios the command line offers.
//! - [`report`]: counters, HDR latency histograms measured from intended send times, and reports that merge
//!   across processes.
//! - [`backend`]: a plain-WebSocket backend that acknowledges at once, for proxies measured beside the gateway.
//! - [`worker`]: an acknowledging worker that speaks the link protocol, the backend for measuring the gateway alone.
//! - [`watch`]: streams of changes read from a worker's API, with the delay of each change.
//! - [`locks`]: locks taken and released through workers' APIs, with the rate, latency and a check of the tokens.

pub mod backend;
pub mod fleet;
pub mod http;
pub mod locks;
pub mod report;
pub mod watch;
pub mod worker;
