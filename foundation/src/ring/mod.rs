//! The embedded cache ring: partition placement and the partition stores.
//!
//! Built: [`placement`] (which members hold each partition) and [`store`] (the partitions this node holds). Not
//! built yet: forwarding to a partition's primary, synchronous replication to its backups, and moving partitions on
//! a membership change; today a worker holds every partition itself.

pub mod placement;
pub mod store;

pub use placement::{PARTITIONS, Table, partition_of};
pub use store::Store;
