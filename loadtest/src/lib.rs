//! thingport-loadtest: simulated device fleets over WSS and QUIC.
//!
//! - [`client`]: a device client (transport + the protocol crate's device session), the unit of a fleet.
//! - [`fleet`]: many devices on an open-loop schedule, in the scenarios the command line offers.
//! - [`report`]: counters, HDR latency histograms measured from intended send times, and reports that merge
//!   across processes.
//! - [`backend`]: a plain-WebSocket backend that acknowledges at once, for proxies measured beside the gateway.
//! - [`worker`]: an acknowledging worker that speaks the link protocol, the backend for measuring the gateway alone.

pub mod backend;
pub mod client;
pub mod fleet;
pub mod http;
pub mod report;
pub mod worker;
