//! Counters and latency histograms of a fleet, the live progress line, and the final report (table or JSON).
//!
//! Latency is measured from each message's *intended* send time (its slot in the open-loop schedule) to the
//! acknowledgement that covers it, so a stalled server shows up as latency rather than as fewer samples
//! (no coordinated omission).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{Deserialize, Serialize};

const SHARDS: usize = 16;

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 hour, 3 significant figures
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| unreachable!("valid bounds"))
}

/// What a fleet counts while it runs.
#[derive(Debug)]
pub struct Stats {
    pub connected: AtomicU64,
    pub connects: AtomicU64,
    pub connect_errors: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub session_errors: AtomicU64,
    pub goaways: AtomicU64,
    pub reconnects: AtomicU64,
    pub unacked_at_end: AtomicU64,
    total: Vec<Mutex<Histogram<u64>>>,
    interval: Vec<Mutex<Histogram<u64>>>,
    reconnect_times: Mutex<Histogram<u64>>,
    pub calls_ok: AtomicU64,
    pub calls_failed: AtomicU64,
    call_times: Mutex<Histogram<u64>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            connected: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            session_errors: AtomicU64::new(0),
            goaways: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            unacked_at_end: AtomicU64::new(0),
            total: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
            interval: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
            reconnect_times: Mutex::new(histogram()),
            calls_ok: AtomicU64::new(0),
            calls_failed: AtomicU64::new(0),
            call_times: Mutex::new(histogram()),
        }
    }
}

fn lock(h: &Mutex<Histogram<u64>>) -> std::sync::MutexGuard<'_, Histogram<u64>> {
    h.lock().unwrap_or_else(|e| e.into_inner())
}

impl Stats {
    /// Records one message's latency (device `shard` picks the histogram shard).
    pub fn latency(&self, shard: usize, latency: Duration) {
        let us = (latency.as_micros() as u64).max(1);
        lock(&self.total[shard % SHARDS]).saturating_record(us);
        lock(&self.interval[shard % SHARDS]).saturating_record(us);
    }

    /// Records a service call's latency, from its intended start to its answer.
    pub fn call_time(&self, took: Duration) {
        lock(&self.call_times).saturating_record((took.as_micros() as u64).max(1));
    }

    pub fn reconnect_time(&self, took: Duration) {
        lock(&self.reconnect_times).saturating_record((took.as_micros() as u64).max(1));
    }

    fn merged(shards: &[Mutex<Histogram<u64>>], reset: bool) -> Histogram<u64> {
        let mut merged = histogram();
        for shard in shards {
            let mut h = lock(shard);
            let _ = merged.add(&*h);
            if reset {
                h.reset();
            }
        }
        merged
    }

    /// The latency histogram since the last call (for the progress line).
    pub fn take_interval(&self) -> Histogram<u64> {
        Stats::merged(&self.interval, true)
    }

    /// The report of this process.
    pub fn report(&self, elapsed: Duration, frame_bytes: usize) -> Report {
        let latency = Stats::merged(&self.total, false);
        let reconnect = lock(&self.reconnect_times).clone();
        let calls = lock(&self.call_times).clone();
        Report {
            elapsed_s: elapsed.as_secs_f64(),
            frame_bytes,
            connects: self.connects.load(Ordering::Relaxed),
            connect_errors: self.connect_errors.load(Ordering::Relaxed),
            peak_sessions: self.connected.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            unacked_at_end: self.unacked_at_end.load(Ordering::Relaxed),
            session_errors: self.session_errors.load(Ordering::Relaxed),
            goaways: self.goaways.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            latency: Summary::of(&latency),
            reconnect_time: Summary::of(&reconnect),
            latency_hdr: encode(&latency),
            reconnect_hdr: encode(&reconnect),
            calls_ok: self.calls_ok.load(Ordering::Relaxed),
            calls_failed: self.calls_failed.load(Ordering::Relaxed),
            call_time: Summary::of(&calls),
            call_hdr: encode(&calls),
        }
    }
}

fn encode(h: &Histogram<u64>) -> String {
    let mut out = Vec::new();
    let _ = V2Serializer::new().serialize(h, &mut out);
    base64::engine::general_purpose::STANDARD.encode(out)
}

fn decode(text: &str) -> Result<Histogram<u64>> {
    let raw = base64::engine::general_purpose::STANDARD.decode(text)?;
    Deserializer::new().deserialize(&mut raw.as_slice()).map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// Percentiles of a histogram, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Summary {
    pub fn of(h: &Histogram<u64>) -> Summary {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1_000.0;
        Summary {
            count: h.len(),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: h.max() as f64 / 1_000.0,
        }
    }
}

/// The outcome of a run: what `--json` prints, and what each process of a multi-process run sends its parent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub elapsed_s: f64,
    pub frame_bytes: usize,
    pub connects: u64,
    pub connect_errors: u64,
    pub peak_sessions: u64,
    pub sent: u64,
    pub acked: u64,
    pub unacked_at_end: u64,
    pub session_errors: u64,
    pub goaways: u64,
    pub reconnects: u64,
    pub latency: Summary,
    pub reconnect_time: Summary,
    /// The histograms, HDR V2 serialized and base64 encoded, so reports of several processes merge exactly.
    pub latency_hdr: String,
    pub reconnect_hdr: String,
    /// Service calls made through the foundation API (`service` scenario).
    #[serde(default)]
    pub calls_ok: u64,
    #[serde(default)]
    pub calls_failed: u64,
    #[serde(default)]
    pub call_time: Summary,
    #[serde(default)]
    pub call_hdr: String,
}

impl Report {
    /// Merges the reports of several processes.
    pub fn merge(reports: &[Report]) -> Result<Report> {
        let mut latency = histogram();
        let mut reconnect = histogram();
        let mut calls = histogram();
        let mut merged = Report::default();
        for r in reports {
            latency.add(decode(&r.latency_hdr).context("latency histogram")?)?;
            reconnect.add(decode(&r.reconnect_hdr).context("reconnect histogram")?)?;
            if !r.call_hdr.is_empty() {
                calls.add(decode(&r.call_hdr).context("call histogram")?)?;
            }
            merged.calls_ok += r.calls_ok;
            merged.calls_failed += r.calls_failed;
            merged.elapsed_s = merged.elapsed_s.max(r.elapsed_s);
            merged.frame_bytes = r.frame_bytes;
            merged.connects += r.connects;
            merged.connect_errors += r.connect_errors;
            merged.peak_sessions += r.peak_sessions;
            merged.sent += r.sent;
            merged.acked += r.acked;
            merged.unacked_at_end += r.unacked_at_end;
            merged.session_errors += r.session_errors;
            merged.goaways += r.goaways;
            merged.reconnects += r.reconnects;
        }
        merged.latency = Summary::of(&latency);
        merged.reconnect_time = Summary::of(&reconnect);
        merged.latency_hdr = encode(&latency);
        merged.reconnect_hdr = encode(&reconnect);
        merged.call_time = Summary::of(&calls);
        merged.call_hdr = encode(&calls);
        Ok(merged)
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let rate = if self.elapsed_s > 0.0 { self.acked as f64 / self.elapsed_s } else { 0.0 };
        let mut out = String::new();
        let mut row = |k: &str, v: String| out.push_str(&format!("{k:<24} {v}\n"));
        row("elapsed", format!("{:.1} s", self.elapsed_s));
        row("sessions (peak)", self.peak_sessions.to_string());
        row("connects / errors", format!("{} / {}", self.connects, self.connect_errors));
        row("frame size", format!("{} B", self.frame_bytes));
        row("messages sent / acked", format!("{} / {} ({rate:.0}/s)", self.sent, self.acked));
        row("unacked at end", self.unacked_at_end.to_string());
        row("session errors", self.session_errors.to_string());
        row("goaways / reconnects", format!("{} / {}", self.goaways, self.reconnects));
        let l = &self.latency;
        row(
            "latency ms p50/p90/p99",
            format!("{:.3} / {:.3} / {:.3}", l.p50_ms, l.p90_ms, l.p99_ms),
        );
        row("latency ms p99.9/max", format!("{:.3} / {:.3}", l.p999_ms, l.max_ms));
        if self.calls_ok + self.calls_failed > 0 {
            let c = &self.call_time;
            row("service calls ok / failed", format!("{} / {}", self.calls_ok, self.calls_failed));
            row(
                "call ms p50/p99/max",
                format!("{:.2} / {:.2} / {:.2}", c.p50_ms, c.p99_ms, c.max_ms),
            );
        }
        if self.reconnect_time.count > 0 {
            let r = &self.reconnect_time;
            row(
                "reconnect ms p50/p99/max",
                format!("{:.1} / {:.1} / {:.1}", r.p50_ms, r.p99_ms, r.max_ms),
            );
        }
        out
    }
}
