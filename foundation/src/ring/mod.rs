//! The embedded cache ring: partition placement and (to come) the partition stores and their replication.

pub mod placement;

pub use placement::{PARTITIONS, Table, partition_of};
