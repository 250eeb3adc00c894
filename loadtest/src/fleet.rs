//! A fleet of simulated devices: each a task running a [`Device`] on an open-loop schedule.
//!
//! Scenarios:
//! - `idle`: connect every device (at the ramp rate) and hold the sessions.
//! - `telemetry`: each device sends a property batch `rate` times per second on a fixed schedule.
//! - `reconnect`: telemetry, and at the midpoint a share of the devices drop their connection and reconnect with
//!   jittered backoff (a reconnect storm); their unacknowledged data is retransmitted.
//! - `drain`: telemetry; devices that receive `GOAWAY` reconnect after the hint plus jitter (run it while the
//!   gateway is restarted or drained).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use thingport_protocol::{
    ByteString, Credential, DeviceConfig, DeviceEvent, Frame, Properties, PropertyUpdate, Quality,
    ServiceResponse, ServiceResult, Value,
};
use tokio::time::Instant as TokioInstant;

use crate::report::Stats;
use thingport_device::{Device, DeviceError, Endpoint, Transport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Scenario {
    Idle,
    Telemetry,
    Reconnect,
    Drain,
    /// Devices hold their sessions and answer `echo`; callers invoke it through the foundation's REST API.
    Service,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum TransportChoice {
    Wss,
    Quic,
    /// Half WSS, half QUIC.
    Mix,
    /// WebSocket without TLS, to measure a backend directly.
    Ws,
}

/// Acknowledged messages as (thing, message number), gathered from every device.
pub type Acked = Mutex<Vec<(String, u64)>>;

/// Everything one process of a fleet needs.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub endpoint: Endpoint,
    pub transport: TransportChoice,
    /// (thing, token) of each device of this process.
    pub devices: Vec<(String, String)>,
    pub scenario: Scenario,
    /// Connections started per second.
    pub ramp: f64,
    /// Messages per second per device.
    pub rate: f64,
    pub batch: usize,
    pub payload: usize,
    /// What each property carries.
    pub values: ValueKind,
    /// How long traffic runs once every device had its turn to connect.
    pub duration: Duration,
    pub binds: Vec<IpAddr>,
    pub keepalive_secs: u16,
    pub window: usize,
    /// Share of devices that drop and reconnect in the `reconnect` scenario.
    pub reconnect_share: f64,
    /// The foundation API and an application key (`service` scenario).
    pub api: Option<(std::net::SocketAddr, String)>,
    /// Service calls per second, all callers together (`service` scenario).
    pub call_rate: f64,
    /// With [`ValueKind::Numbered`]: every acknowledged message as (thing, number), for a checker to read back.
    pub acked: Option<Arc<Acked>>,
}

/// What each property of a load-test message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ValueKind {
    /// `payload` bytes.
    Bytes,
    /// A float reading.
    Float,
    /// One property per message, `n<N>` carrying the message's number N as an integer: every message writes its own
    /// property, so each acknowledged one can be read back.
    Numbered,
}

impl Fleet {
    /// The frame one message is: a batch of `batch` properties, each `payload` bytes or a float, stamped with the
    /// current time (so that a store's retention by age keeps them).
    pub fn message(&self, n: u64) -> Frame {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        if self.values == ValueKind::Numbered {
            let update = PropertyUpdate {
                name: ByteString::from(format!("n{n}")),
                timestamp_ms: now,
                quality: Quality::Good,
                value: Value::Int(n as i64),
            };
            return Frame::Properties(Properties { seq: 1, updates: vec![update] });
        }
        let updates = (0..self.batch)
            .map(|i| PropertyUpdate {
                name: ByteString::from(format!("p{i}")),
                timestamp_ms: now,
                quality: Quality::Good,
                value: match self.values {
                    ValueKind::Bytes => {
                        Value::Bytes(Bytes::from(vec![(n % 251) as u8; self.payload]))
                    }
                    ValueKind::Float | ValueKind::Numbered => {
                        Value::Float(20.0 + (n % 1000) as f64 / 10.0 + i as f64)
                    }
                },
            })
            .collect();
        Frame::Properties(Properties { seq: 1, updates })
    }

    /// Runs every device of this process; returns when the scenario is over.
    pub async fn run(self: Arc<Self>, stats: Arc<Stats>) {
        let start = TokioInstant::now();
        let ramp_time = Duration::from_secs_f64(self.devices.len() as f64 / self.ramp.max(0.001));
        let traffic_end = start + ramp_time + self.duration;
        let mut tasks = tokio::task::JoinSet::new();
        for index in 0..self.devices.len() {
            let fleet = self.clone();
            let stats = stats.clone();
            let connect_at = start + Duration::from_secs_f64(index as f64 / self.ramp.max(0.001));
            tasks.spawn(async move { fleet.device(index, connect_at, traffic_end, &stats).await });
        }
        if let (Scenario::Service, Some((api, key))) = (self.scenario, self.api.clone()) {
            let fleet = self.clone();
            let stats = stats.clone();
            tasks.spawn(async move {
                fleet.callers(api, key, start + ramp_time, traffic_end, stats).await
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    fn endpoint_for(&self, index: usize) -> Endpoint {
        let mut endpoint = self.endpoint.clone();
        endpoint.transport = match self.transport {
            TransportChoice::Wss => Transport::Wss,
            TransportChoice::Ws => Transport::Ws,
            TransportChoice::Quic => Transport::Quic,
            TransportChoice::Mix if index.is_multiple_of(2) => Transport::Wss,
            TransportChoice::Mix => Transport::Quic,
        };
        if !self.binds.is_empty() {
            endpoint.bind = Some(self.binds[index % self.binds.len()]);
        }
        endpoint
    }

    async fn device(
        &self,
        index: usize,
        connect_at: TokioInstant,
        traffic_end: TokioInstant,
        stats: &Stats,
    ) {
        let (thing, token) = &self.devices[index];
        let endpoint = self.endpoint_for(index);
        let config = DeviceConfig {
            thing: ByteString::from(thing.clone()),
            credential: Credential::Token(Bytes::from(token.clone().into_bytes())),
            keepalive_secs: self.keepalive_secs,
            handshake_timeout: Duration::from_secs(10),
            window: self.window,
            incarnation: fastrand::u64(..),
        };
        let mut device = Device::new(config, 1);
        tokio::time::sleep_until(connect_at).await;
        if !connect(&mut device, &endpoint, stats, traffic_end).await {
            return;
        }
        stats.connected.fetch_add(1, Ordering::Relaxed);

        let sending =
            matches!(self.scenario, Scenario::Telemetry | Scenario::Reconnect | Scenario::Drain);
        let interval = Duration::from_secs_f64(1.0 / self.rate.max(0.000_001));
        // spread the devices' schedules over one interval
        let mut next_send = TokioInstant::now() + interval.mul_f64(fastrand::f64());
        let storm_at =
            if self.scenario == Scenario::Reconnect && fastrand::f64() < self.reconnect_share {
                Some(connect_at + (traffic_end - connect_at) / 2)
            } else {
                None
            };
        let mut storm_done = false;
        // messages sent and waiting for their ack (sequence number, intended time, message number: 0 for an
        // answer to a call), and messages due but not yet sent (window full)
        let mut pending: VecDeque<(u64, TokioInstant, u64)> = VecDeque::new();
        // the numbers of the acknowledged messages, kept only when asked for
        let mut acked = self.acked.as_ref().map(|_| Vec::new());
        let mut backlog: VecDeque<TokioInstant> = VecDeque::new();
        let mut n = 0u64;
        loop {
            if device.flush().await.is_err() {
                stats.session_errors.fetch_add(1, Ordering::Relaxed);
                if !self.reconnect(&mut device, &endpoint, stats, traffic_end, None).await {
                    break;
                }
                continue;
            }
            let storm = storm_at.filter(|_| !storm_done);
            let send_due = sending && next_send < traffic_end;
            let event = tokio::select! {
                _ = tokio::time::sleep_until(traffic_end) => break,
                _ = tokio::time::sleep_until(next_send), if send_due => {
                    backlog.push_back(next_send);
                    next_send += interval;
                    None
                }
                _ = sleep_opt(storm) => {
                    storm_done = true;
                    device.abort();
                    let jitter = Duration::from_millis(fastrand::u64(0..1_000));
                    if !self.reconnect(&mut device, &endpoint, stats, traffic_end, Some(jitter)).await {
                        break;
                    }
                    None
                }
                event = device.recv_event() => Some(event),
            };
            match event {
                None | Some(Ok(None)) => {}
                Some(Ok(Some(DeviceEvent::Acked { seq }))) => {
                    record_acks(&mut pending, &mut acked, seq, index, stats);
                }
                Some(Ok(Some(DeviceEvent::Data(Frame::ServiceRequest(call))))) => {
                    let answer = Frame::ServiceResponse(ServiceResponse {
                        seq: 0,
                        call_id: call.call_id,
                        result: ServiceResult::Ok(call.params),
                    });
                    if device.session.send(answer).is_ok() {
                        pending.push_back((device.session.next_seq() - 1, TokioInstant::now(), 0));
                    }
                }
                Some(Ok(Some(DeviceEvent::Goaway(goaway)))) => {
                    stats.goaways.fetch_add(1, Ordering::Relaxed);
                    // wait for the server to close (it acknowledges what is in flight first)
                    let hint = Duration::from_millis(goaway.reconnect_after_ms.into());
                    let _ = tokio::time::timeout(Duration::from_secs(30), async {
                        loop {
                            match device.next_event().await {
                                Ok(DeviceEvent::Acked { seq }) => {
                                    record_acks(&mut pending, &mut acked, seq, index, stats);
                                }
                                Ok(_) => {}
                                Err(_) => return,
                            }
                        }
                    })
                    .await;
                    device.abort();
                    let wait = hint + hint.mul_f64(fastrand::f64());
                    if !self.reconnect(&mut device, &endpoint, stats, traffic_end, Some(wait)).await
                    {
                        break;
                    }
                }
                Some(Ok(Some(_))) => {}
                Some(Err(e)) => {
                    tracing::debug!(thing = %thing, error = %e, "session ended");
                    stats.session_errors.fetch_add(1, Ordering::Relaxed);
                    if !self.reconnect(&mut device, &endpoint, stats, traffic_end, None).await {
                        break;
                    }
                }
            }
            // send what is due, as far as the window allows; latency counts from the intended time
            while device.session.can_send() {
                let Some(intended) = backlog.pop_front() else { break };
                n += 1;
                match device.session.send(self.message(n)) {
                    Ok(seq) => {
                        pending.push_back((seq, intended, n));
                        stats.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        backlog.push_front(intended);
                        break;
                    }
                }
            }
        }
        // give outstanding messages a moment to be acknowledged, then count what is left
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while !pending.is_empty() {
                match device.next_event().await {
                    Ok(DeviceEvent::Acked { seq }) => {
                        record_acks(&mut pending, &mut acked, seq, index, stats);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        })
        .await;
        stats.unacked_at_end.fetch_add(pending.len() as u64, Ordering::Relaxed);
        device.disconnect().await;
        if let (Some(all), Some(acked)) = (&self.acked, acked) {
            let mut all = all.lock().unwrap_or_else(|e| e.into_inner());
            all.extend(acked.into_iter().map(|n| (thing.clone(), n)));
        }
    }

    /// Calls `echo` on random devices through the API at `call_rate`, open loop, over a few keep-alive
    /// connections; latency counts from each call's intended start.
    async fn callers(
        &self,
        api: std::net::SocketAddr,
        key: String,
        start: TokioInstant,
        end: TokioInstant,
        stats: std::sync::Arc<Stats>,
    ) {
        const CALLERS: usize = 32;
        let devices: std::sync::Arc<[String]> =
            self.devices.iter().map(|(t, _)| t.clone()).collect();
        if devices.is_empty() {
            return;
        }
        // one bounded queue per caller: a call's latency counts from its intended start even if it queued
        let mut queues = Vec::with_capacity(CALLERS);
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..CALLERS {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<TokioInstant>(4);
            queues.push(tx);
            let (key, devices, stats) = (key.clone(), devices.clone(), stats.clone());
            workers.spawn(async move {
                let mut conn: Option<tokio::net::TcpStream> = None;
                while let Some(intended) = rx.recv().await {
                    let thing = &devices[fastrand::usize(..devices.len())];
                    let path = format!("/v1/things/{thing}/services/echo?timeout_ms=5000");
                    let ok = crate::http::post(&mut conn, api, &path, &key, "{\"n\":1}")
                        .await
                        .is_ok_and(|s| s == 200);
                    if ok {
                        stats.calls_ok.fetch_add(1, Ordering::Relaxed);
                        stats.call_time(TokioInstant::now() - intended);
                    } else {
                        stats.calls_failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        tokio::time::sleep_until(start).await;
        let interval = Duration::from_secs_f64(1.0 / self.call_rate.max(0.001));
        let mut next = start;
        let mut n = 0usize;
        while next < end {
            tokio::time::sleep_until(next).await;
            if queues[n % CALLERS].send(next).await.is_err() {
                break;
            }
            n += 1;
            next += interval;
        }
        drop(queues);
        while workers.join_next().await.is_some() {}
    }

    async fn reconnect(
        &self,
        device: &mut Device,
        endpoint: &Endpoint,
        stats: &Stats,
        end: TokioInstant,
        wait: Option<Duration>,
    ) -> bool {
        device.abort();
        let started = Instant::now();
        tokio::time::sleep(wait.unwrap_or(Duration::from_millis(fastrand::u64(100..1_000)))).await;
        stats.reconnects.fetch_add(1, Ordering::Relaxed);
        let connected = connect(device, endpoint, stats, end).await;
        if connected {
            stats.reconnect_time(started.elapsed());
        }
        connected
    }
}

/// Connects with retries (exponential backoff with full jitter) until `end`.
async fn connect(
    device: &mut Device,
    endpoint: &Endpoint,
    stats: &Stats,
    end: TokioInstant,
) -> bool {
    let mut backoff = Duration::from_millis(100);
    loop {
        stats.connects.fetch_add(1, Ordering::Relaxed);
        match device.connect(endpoint).await {
            Ok(_) => return true,
            Err(e) => {
                stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "connect failed");
                if matches!(e, DeviceError::Session(_)) {
                    device.abort();
                }
            }
        }
        let wait = backoff.mul_f64(fastrand::f64());
        if TokioInstant::now() + wait >= end {
            return false;
        }
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Counts every pending message up to `seq` as acknowledged, with its latency from its intended send time, and
/// adds the numbers of the messages among them to `acked` (if kept).
fn record_acks(
    pending: &mut VecDeque<(u64, TokioInstant, u64)>,
    acked: &mut Option<Vec<u64>>,
    seq: u64,
    index: usize,
    stats: &Stats,
) {
    let now = TokioInstant::now();
    while pending.front().is_some_and(|(s, _, _)| *s <= seq) {
        if let Some((_, intended, n)) = pending.pop_front() {
            stats.latency(index, now - intended);
            stats.acked.fetch_add(1, Ordering::Relaxed);
            if let (Some(acked), true) = (acked.as_mut(), n > 0) {
                acked.push(n);
            }
        }
    }
}

async fn sleep_opt(at: Option<TokioInstant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_counts_every_message_up_to_its_sequence_and_keeps_their_numbers() {
        let stats = Stats::default();
        let now = TokioInstant::now();
        // messages 1 and 2, an answer to a call (number 0), then message 3
        let mut pending: VecDeque<(u64, TokioInstant, u64)> =
            [(10, now, 1), (11, now, 2), (12, now, 0), (13, now, 3)].into();
        let mut acked = Some(Vec::new());
        record_acks(&mut pending, &mut acked, 12, 0, &stats);
        assert_eq!(
            acked.as_deref(),
            Some(&[1, 2][..]),
            "the answer is acknowledged but is no message"
        );
        assert_eq!(stats.acked.load(Ordering::Relaxed), 3);
        assert_eq!(pending.len(), 1);
        record_acks(&mut pending, &mut acked, 13, 0, &stats);
        assert_eq!(acked.as_deref(), Some(&[1, 2, 3][..]));
        // without --acked nothing is kept
        let mut pending: VecDeque<(u64, TokioInstant, u64)> = [(14, now, 4)].into();
        let mut none = None;
        record_acks(&mut pending, &mut none, 14, 0, &stats);
        assert_eq!((none, stats.acked.load(Ordering::Relaxed)), (None, 5));
    }
}
