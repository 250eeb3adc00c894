//! The worker's Prometheus metrics: every name, with the help text `/metrics` shows for it. docs/API.md lists them
//! with their labels.

pub const FOUNDATION_FRAMES_STORED_TOTAL: &str = "thingport_foundation_frames_stored_total";
pub const FOUNDATION_FRAMES_REFUSED_TOTAL: &str = "thingport_foundation_frames_refused_total";
pub const FOUNDATION_FRAMES_FORWARDED_TOTAL: &str = "thingport_foundation_frames_forwarded_total";
pub const FOUNDATION_LINK_LOAD_TOTAL: &str = "thingport_foundation_link_load_total";
pub const FOUNDATION_HANDSHAKES_REFUSED_TOTAL: &str =
    "thingport_foundation_handshakes_refused_total";
pub const FOUNDATION_MEMBERSHIP_REFUSED_TOTAL: &str =
    "thingport_foundation_membership_refused_total";
pub const RING_WRITES_TOTAL: &str = "thingport_ring_writes_total";
pub const RING_READS_TOTAL: &str = "thingport_ring_reads_total";
pub const RING_REPLICATIONS_TOTAL: &str = "thingport_ring_replications_total";
pub const RING_RETRIES_TOTAL: &str = "thingport_ring_retries_total";
pub const RING_WRITE_FAILURES_TOTAL: &str = "thingport_ring_write_failures_total";
pub const RING_BACKGROUND_REPLICATION_FAILURES_TOTAL: &str =
    "thingport_ring_background_replication_failures_total";
pub const RING_MEMBERS: &str = "thingport_ring_members";
pub const RING_TABLE_VERSION: &str = "thingport_ring_table_version";
pub const RING_PARTITIONS_HELD: &str = "thingport_ring_partitions_held";
pub const RING_PARTITIONS_UNHELD: &str = "thingport_ring_partitions_unheld";
pub const RING_TABLE_CHANGES_TOTAL: &str = "thingport_ring_table_changes_total";
pub const RING_PARTITIONS_MOVED_TOTAL: &str = "thingport_ring_partitions_moved_total";
pub const RING_THINGS_COPIED_TOTAL: &str = "thingport_ring_things_copied_total";
pub const STREAMS: &str = "thingport_streams";
pub const STREAM_CUTS_TOTAL: &str = "thingport_stream_cuts_total";
pub const STREAM_EVENTS_TOTAL: &str = "thingport_stream_events_total";
pub const CHANGE_LOG_CHANGES: &str = "thingport_change_log_changes";
pub const STORAGE_UP: &str = "thingport_storage_up";
pub const STORAGE_COMMITS_TOTAL: &str = "thingport_storage_commits_total";
pub const STORAGE_CHANGES_TOTAL: &str = "thingport_storage_changes_total";
pub const STORAGE_COMMIT_SECONDS: &str = "thingport_storage_commit_seconds";
pub const STORAGE_WRITE_SECONDS: &str = "thingport_storage_write_seconds";
pub const STORAGE_ERRORS_TOTAL: &str = "thingport_storage_errors_total";
pub const STORAGE_QUEUE_FULL_TOTAL: &str = "thingport_storage_queue_full_total";
pub const STORAGE_JOURNAL_FOLDS_TOTAL: &str = "thingport_storage_journal_folds_total";
pub const STORAGE_RETENTION_REMOVED_TOTAL: &str = "thingport_storage_retention_removed_total";
pub const SINGLETON_HELD: &str = "thingport_foundation_singleton_held";

/// Gives every metric its help text (`# HELP` in `/metrics`); the recorder must be installed.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        FOUNDATION_FRAMES_STORED_TOTAL,
        "Device data frames stored and answered STORED"
    );
    describe_counter!(
        FOUNDATION_FRAMES_REFUSED_TOTAL,
        "Device data frames answered REJECTED, by reason (unknown_thing, invalid, unavailable)"
    );
    describe_counter!(
        FOUNDATION_FRAMES_FORWARDED_TOTAL,
        "Device data frames that reached this worker though another worker is their partition's primary"
    );
    describe_counter!(
        FOUNDATION_LINK_LOAD_TOTAL,
        "LOAD frames sent to gateways, by event (saturated, unsaturated)"
    );
    describe_counter!(
        FOUNDATION_HANDSHAKES_REFUSED_TOTAL,
        "Connections to the link or peer port closed because their TLS handshake failed, by port"
    );
    describe_counter!(
        FOUNDATION_MEMBERSHIP_REFUSED_TOTAL,
        "Membership datagrams dropped because they do not open with the pool's key"
    );
    describe_counter!(RING_WRITES_TOTAL, "Ring writes completed through this worker");
    describe_counter!(RING_READS_TOTAL, "Ring reads completed through this worker");
    describe_counter!(
        RING_REPLICATIONS_TOTAL,
        "Copies sent to backups by this worker as a primary"
    );
    describe_counter!(
        RING_RETRIES_TOTAL,
        "Ring writes retried (the primary was unreachable or a table was changing)"
    );
    describe_counter!(RING_WRITE_FAILURES_TOTAL, "Ring writes that failed after write_timeout");
    describe_counter!(
        RING_BACKGROUND_REPLICATION_FAILURES_TOTAL,
        "Replications behind a memory acknowledgement that failed"
    );
    describe_gauge!(RING_MEMBERS, "Active members as this worker sees them");
    describe_gauge!(RING_TABLE_VERSION, "Version of the committed partition table");
    describe_gauge!(RING_PARTITIONS_HELD, "Partitions this worker holds a copy of");
    describe_gauge!(
        RING_PARTITIONS_UNHELD,
        "Partitions with no active holder, as the table coordinator last saw them (0 on other workers)"
    );
    describe_counter!(RING_TABLE_CHANGES_TOTAL, "Partition table changes this worker coordinated");
    describe_counter!(
        RING_PARTITIONS_MOVED_TOTAL,
        "Replica slots moved by the table changes this worker coordinated"
    );
    describe_counter!(
        RING_THINGS_COPIED_TOTAL,
        "Things copied to this worker when it gained partitions"
    );
    describe_gauge!(STREAMS, "Streams of changes (Server-Sent Events) this worker serves now");
    describe_counter!(
        STREAM_CUTS_TOTAL,
        "Streams cut because their client fell behind by more than streams.client_buffer"
    );
    describe_counter!(STREAM_EVENTS_TOTAL, "Events sent on streams of changes");
    describe_gauge!(
        CHANGE_LOG_CHANGES,
        "Changes held in this worker's change log (bounded by streams.log_changes and log_bytes)"
    );
    describe_gauge!(SINGLETON_HELD, "1 while this worker holds the pool's singleton role, else 0");
    describe_gauge!(STORAGE_UP, "1 while the store is open and its last commit succeeded, else 0");
    describe_counter!(STORAGE_COMMITS_TOTAL, "Group commits of the store");
    describe_counter!(STORAGE_CHANGES_TOTAL, "Changes the store's group commits carried");
    describe_histogram!(
        STORAGE_COMMIT_SECONDS,
        Unit::Seconds,
        "Time from taking a batch to its commit"
    );
    describe_histogram!(
        STORAGE_WRITE_SECONDS,
        Unit::Seconds,
        "Time the store took to write one batch, by store (sqlite, postgres)"
    );
    describe_counter!(STORAGE_ERRORS_TOTAL, "Store commits that failed and were retried");
    describe_counter!(
        STORAGE_QUEUE_FULL_TOTAL,
        "Operations that waited for room in the store's queue until write_timeout"
    );
    describe_counter!(
        STORAGE_JOURNAL_FOLDS_TOTAL,
        "Things whose journal was folded into their value streams (SQLite)"
    );
    describe_counter!(STORAGE_RETENTION_REMOVED_TOTAL, "Values and events removed by retention");
    thingport_shell::admin::describe_build_info();
}

/// Exports, at 0, the counters that count rare events, so that a scrape tells "none yet" from "not exported" (alert
/// rules and dashboards name them from the start).
pub fn register_zeroes() {
    for reason in ["unknown_thing", "invalid", "unavailable"] {
        metrics::counter!(FOUNDATION_FRAMES_REFUSED_TOTAL, "reason" => reason).absolute(0);
    }
    for name in [
        RING_RETRIES_TOTAL,
        RING_WRITE_FAILURES_TOTAL,
        RING_BACKGROUND_REPLICATION_FAILURES_TOTAL,
        STORAGE_ERRORS_TOTAL,
        STORAGE_QUEUE_FULL_TOTAL,
        STREAM_CUTS_TOTAL,
        STREAM_EVENTS_TOTAL,
    ] {
        metrics::counter!(name).absolute(0);
    }
}
