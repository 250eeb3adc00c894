//! thingport-loadtest: simulated device fleets over WSS and QUIC.
//!
//! - [`client`]: a device client (transport + the protocol crate's device session), the unit of a fleet.
//! - [`worker`]: an acknowledging worker that speaks the link protocol, the backend for measuring the gateway alone.

pub mod client;
pub mod worker;
