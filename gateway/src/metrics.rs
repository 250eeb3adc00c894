//! The gateway's Prometheus metrics: names, labels and the recorder.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `thingport_gateway_sessions_active` | gauge | `transport` |
//! | `thingport_gateway_sessions_limit` | gauge | | `limits.max_sessions` |
//! | `thingport_gateway_connections_waiting` | gauge | `transport` (`wss`) | accepted, no byte received yet |
//! | `thingport_gateway_handshakes_active` | gauge | `transport` | in TLS, upgrade or `HELLO` |
//! | `thingport_gateway_handshakes_total` | counter | `transport`, `result` (`ok` or a refusal reason) |
//! | `thingport_gateway_refused_total` | counter | `transport`, `reason` |
//! | `thingport_gateway_frames_total` | counter | `direction` (`upstream`, `downstream`) |
//! | `thingport_gateway_bytes_total` | counter | `direction` |
//! | `thingport_gateway_dropped_total` | counter | `reason` |
//! | `thingport_gateway_sessions_closed_total` | counter | `reason` |
//! | `thingport_gateway_links_up` | gauge | |
//! | `thingport_gateway_link_events_total` | counter | `event` (`connected`, `failed`, `saturated`, `unsaturated`, `goaway`, `discovered`, `retired`, `binding_resent`, `binding_forgotten`) |
//! | `thingport_gateway_link_frames_per_write` | histogram | |
//! | `thingport_gateway_link_queue_bytes` | gauge | |
//! | `thingport_gateway_frames_routed_total` | counter | `route` (`primary`, `other`) | device data frames sent to their partition's primary, or to another link |
//! | `thingport_gateway_routes_version` | gauge | | version of the partition table routed by (0: none yet) |
//! | `thingport_gateway_retried_total` | counter | | frames re-sent on another link after a link failed |
//! | `thingport_gateway_send_queue_frames` | histogram | | depth of a session's send queue when it grows |
//! | `thingport_gateway_worker_round_trip_seconds` | histogram | | gateway → worker → `STORED` |
//! | `thingport_gateway_cert_reloads_total` | counter | `result` |
//! | `thingport_build_info` | gauge | `server`, `version` | always 1 |
//! | `thingport_certificate_expiry_timestamp_seconds` | gauge | `cert` (`device`, `pool`) | Unix time |

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const SESSIONS_ACTIVE: &str = "thingport_gateway_sessions_active";
pub const SESSIONS_LIMIT: &str = "thingport_gateway_sessions_limit";
pub const HANDSHAKES: &str = "thingport_gateway_handshakes_total";
pub const WAITING: &str = "thingport_gateway_connections_waiting";
pub const HANDSHAKES_ACTIVE: &str = "thingport_gateway_handshakes_active";
pub const REFUSED: &str = "thingport_gateway_refused_total";
pub const FRAMES: &str = "thingport_gateway_frames_total";
pub const BYTES: &str = "thingport_gateway_bytes_total";
pub const DROPPED: &str = "thingport_gateway_dropped_total";
pub const CLOSED: &str = "thingport_gateway_sessions_closed_total";
pub const LINKS_UP: &str = "thingport_gateway_links_up";
pub const LINK_EVENTS: &str = "thingport_gateway_link_events_total";
pub const FRAMES_PER_WRITE: &str = "thingport_gateway_link_frames_per_write";
pub const LINK_QUEUE_BYTES: &str = "thingport_gateway_link_queue_bytes";
pub const FRAMES_ROUTED: &str = "thingport_gateway_frames_routed_total";
pub const ROUTES_VERSION: &str = "thingport_gateway_routes_version";
pub const RETRIED: &str = "thingport_gateway_retried_total";
pub const SEND_QUEUE: &str = "thingport_gateway_send_queue_frames";
pub const WORKER_RTT: &str = "thingport_gateway_worker_round_trip_seconds";
pub const CERT_RELOADS: &str = "thingport_gateway_cert_reloads_total";

/// The process's Prometheus recorder, installed on first use (one per process, shared by every gateway in it).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(FRAMES_PER_WRITE.into()),
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(SEND_QUEUE.into()),
                    &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0],
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(WORKER_RTT.into()),
                    &[
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                        0.25, 1.0,
                    ],
                )
            });
        let recorder = match builder {
            Ok(b) => b.build_recorder(),
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let handle = thingport_shell::admin::install(recorder);
        describe();
        register_zeroes();
        thingport_shell::admin::describe_build_info();
        thingport_shell::admin::build_info("gateway", env!("CARGO_PKG_VERSION"));
        handle
    })
}

/// Handles of the metrics updated for every frame, registered once. A `counter!` call looks its name and labels up
/// in the recorder's registry each time (hashing, comparing and copying the key), which cost the gateway about 1,000
/// instructions per round trip, more than forwarding the frame itself.
#[derive(Debug)]
pub struct PerFrame {
    pub frames_upstream: Counter,
    pub bytes_upstream: Counter,
    pub frames_downstream: Counter,
    pub bytes_downstream: Counter,
    pub routed_primary: Counter,
    pub routed_other: Counter,
    pub link_queue_bytes: Gauge,
    pub frames_per_write: Histogram,
    pub worker_rtt: Histogram,
    pub send_queue: Histogram,
}

/// The per-frame handles, bound to the recorder [`handle`] installs.
pub fn per_frame() -> &'static PerFrame {
    static PER_FRAME: OnceLock<PerFrame> = OnceLock::new();
    PER_FRAME.get_or_init(|| {
        handle();
        PerFrame {
            frames_upstream: metrics::counter!(FRAMES, "direction" => "upstream"),
            bytes_upstream: metrics::counter!(BYTES, "direction" => "upstream"),
            frames_downstream: metrics::counter!(FRAMES, "direction" => "downstream"),
            bytes_downstream: metrics::counter!(BYTES, "direction" => "downstream"),
            routed_primary: metrics::counter!(FRAMES_ROUTED, "route" => "primary"),
            routed_other: metrics::counter!(FRAMES_ROUTED, "route" => "other"),
            link_queue_bytes: metrics::gauge!(LINK_QUEUE_BYTES),
            frames_per_write: metrics::histogram!(FRAMES_PER_WRITE),
            send_queue: metrics::histogram!(SEND_QUEUE),
            worker_rtt: metrics::histogram!(WORKER_RTT),
        }
    })
}

/// Exports, at 0, the counters of rare events that alert rules and dashboards name, so that a scrape tells "none
/// yet" from "not exported".
fn register_zeroes() {
    for transport in ["wss", "quic"] {
        for reason in crate::limits::Refusal::ALL.map(crate::limits::Refusal::reason) {
            metrics::counter!(REFUSED, "transport" => transport, "reason" => reason).absolute(0);
        }
    }
    metrics::counter!(RETRIED).absolute(0);
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(SESSIONS_ACTIVE, "Device sessions open, by transport");
    describe_gauge!(SESSIONS_LIMIT, "Device sessions allowed at once (limits.max_sessions)");
    describe_counter!(HANDSHAKES, "Device handshakes finished, by transport and result");
    describe_gauge!(
        WAITING,
        "Connections accepted and waiting for their first bytes, by transport"
    );
    describe_gauge!(HANDSHAKES_ACTIVE, "Device handshakes in progress, by transport");
    describe_counter!(REFUSED, "Connections or sessions refused, by transport and reason");
    describe_counter!(FRAMES, "Device frames forwarded, by direction");
    describe_counter!(BYTES, "Device frame bytes forwarded, by direction");
    describe_counter!(DROPPED, "Frames dropped, by reason");
    describe_counter!(CLOSED, "Device sessions closed, by reason");
    describe_gauge!(LINKS_UP, "Upstream links to foundation workers that are up");
    describe_counter!(LINK_EVENTS, "Upstream link events");
    describe_histogram!(FRAMES_PER_WRITE, "Link frames written per write call");
    describe_gauge!(LINK_QUEUE_BYTES, "Bytes queued on upstream links");
    describe_counter!(
        FRAMES_ROUTED,
        "Device data frames sent to a link of their partition's primary (route=primary) or to another link"
    );
    describe_gauge!(ROUTES_VERSION, "Version of the partition table the gateway routes by");
    describe_counter!(RETRIED, "Device frames sent again on another link after their link failed");
    describe_histogram!(
        SEND_QUEUE,
        "Depth of a session's queue towards its device when a frame is added"
    );
    describe_histogram!(
        WORKER_RTT,
        metrics::Unit::Seconds,
        "Gateway to worker to STORED round trip"
    );
    describe_counter!(CERT_RELOADS, "Certificate reloads, by result");
}

pub fn refused(transport: &'static str, reason: &'static str) {
    metrics::counter!(REFUSED, "transport" => transport, "reason" => reason).increment(1);
}

pub fn handshake(transport: &'static str, result: &'static str) {
    metrics::counter!(HANDSHAKES, "transport" => transport, "result" => result).increment(1);
}

pub fn closed(reason: &'static str) {
    metrics::counter!(CLOSED, "reason" => reason).increment(1);
}

pub fn dropped(reason: &'static str) {
    metrics::counter!(DROPPED, "reason" => reason).increment(1);
}

pub fn counter_retried() {
    metrics::counter!(RETRIED).increment(1);
}
