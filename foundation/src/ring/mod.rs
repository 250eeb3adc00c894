//! The embedded cache ring: the workers of a pool share the thing model in 1,024 partitions, each held by a primary
//! and backups.
//!
//! - [`placement`]: which members hold each partition (sans-IO, deterministic).
//! - [`store`]: the partitions this worker holds; [`ops`]: operations on them and copies of them.
//! - [`membership`]: active members, with SWIM failure detection.
//! - [`peers`]: requests between workers.
//! - [`cluster`]: the write and read paths, and the I/O of table changes.
//! - [`coordinator`]: the decisions of table changes (sans-IO), driven by `cluster` and by [`simulation`].
//! - [`simulation`]: a deterministic simulation of a pool on a simulated clock and network.
//! - [`hub`]: the change log that streams of changes read.

pub mod cluster;
pub mod coordinator;
pub mod hub;
pub mod membership;
pub mod ops;
pub mod peers;
pub mod placement;
pub mod simulation;
pub mod store;

pub use cluster::{Cluster, PartitionLoss, RingConfig, RingError};
pub use placement::{PARTITIONS, Table, partition_of};
pub use store::Store;
