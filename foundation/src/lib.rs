//! The thingport foundation worker: the thing model and the embedded consistent-hash cache ring that every worker
//! of a pool shares.
//!
//! Built so far: [`ring::placement`], the sans-IO partition table (which members hold each of the 1,024
//! partitions). Not built yet: the partition stores and replication, membership, the link server for gateways, the
//! thing model and the REST API.

pub mod ring;
