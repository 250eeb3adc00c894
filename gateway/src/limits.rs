//! Admission control shared by every listener: caps (global and per source address) on connections waiting for
//! their first bytes, in their handshake and in a session, and an accept-rate bucket. A refused connection costs no
//! TLS work on WSS and is refused before the handshake on QUIC.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config;
use crate::metrics;

/// Why a connection was refused; the label of `thingport_gateway_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MaxSessions,
    MaxSessionsPerIp,
    AcceptRate,
    MaxHandshakes,
    MaxHandshakesPerIp,
    MaxWaiting,
    MaxWaitingPerIp,
    Draining,
}

impl Refusal {
    /// Every refusal, for metrics exported before the first one.
    pub const ALL: [Refusal; 8] = [
        Refusal::MaxSessions,
        Refusal::MaxSessionsPerIp,
        Refusal::AcceptRate,
        Refusal::MaxHandshakes,
        Refusal::MaxHandshakesPerIp,
        Refusal::MaxWaiting,
        Refusal::MaxWaitingPerIp,
        Refusal::Draining,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            Refusal::MaxSessions => "max_sessions",
            Refusal::MaxSessionsPerIp => "max_sessions_per_ip",
            Refusal::AcceptRate => "accept_rate",
            Refusal::MaxHandshakes => "max_handshakes",
            Refusal::MaxHandshakesPerIp => "max_handshakes_per_ip",
            Refusal::MaxWaiting => "max_waiting",
            Refusal::MaxWaitingPerIp => "max_waiting_per_ip",
            Refusal::Draining => "draining",
        }
    }
}

/// A token bucket refilled continuously; `rate` tokens per second, holding at most `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        TokenBucket { rate: rate.into(), burst: burst.into(), tokens: burst.into(), last: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes a token if one is there.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes a token, going into debt if needed, and returns how long until the debt is paid (zero if none).
    pub fn take(&mut self, now: Instant) -> std::time::Duration {
        self.refill(now);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Counts per source address, each bounded by `max`.
#[derive(Debug, Clone)]
struct PerIp {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max: usize,
}

/// One count of a [`PerIp`]: released when dropped.
#[derive(Debug)]
struct IpCount {
    ip: IpAddr,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerIp {
    fn new(max: usize) -> PerIp {
        PerIp { counts: Arc::default(), max }
    }

    fn try_count(&self, ip: IpAddr) -> Option<IpCount> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(IpCount { ip, counts: self.counts.clone() })
    }
}

impl Drop for IpCount {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// The gateway's admission state. A connection passes three stages, each with a global cap and a cap per source
/// address: *waiting* (WSS only: accepted, no byte received yet — a socket and a small task, no TLS state),
/// *handshake* (TLS, the WebSocket upgrade and `HELLO`; a pool per transport, so that pending TCP handshakes never
/// refuse QUIC) and *session* (from the handshake's start to the close).
#[derive(Debug)]
pub struct Admission {
    accept: Mutex<TokenBucket>,
    waiting: Arc<Semaphore>,
    waiting_per_ip: PerIp,
    handshakes: [Arc<Semaphore>; 2],
    handshakes_per_ip: PerIp,
    max_handshakes: usize,
    sessions: Arc<Semaphore>,
    sessions_per_ip: PerIp,
}

/// Held for the life of a connection: releases its session slot and per-address count when dropped.
#[derive(Debug)]
pub struct SessionPermit {
    _slot: OwnedSemaphorePermit,
    _ip: IpCount,
}

/// Held while a connection is in its handshake.
#[derive(Debug)]
pub struct HandshakePermit {
    _slot: OwnedSemaphorePermit,
    _ip: IpCount,
    _gauge: Gauged,
}

/// Held while a WSS connection waits for its first bytes.
#[derive(Debug)]
pub struct WaitingPermit {
    _slot: OwnedSemaphorePermit,
    _ip: IpCount,
    _gauge: Gauged,
}

/// Counts one in a gauge while it lives.
#[derive(Debug)]
struct Gauged(&'static str, &'static str);

impl Gauged {
    fn new(name: &'static str, transport: &'static str) -> Gauged {
        ::metrics::gauge!(name, "transport" => transport).increment(1.0);
        Gauged(name, transport)
    }
}

impl Drop for Gauged {
    fn drop(&mut self) {
        ::metrics::gauge!(self.0, "transport" => self.1).decrement(1.0);
    }
}

fn slot(semaphore: &Arc<Semaphore>, full: Refusal) -> Result<OwnedSemaphorePermit, Refusal> {
    semaphore.clone().try_acquire_owned().map_err(|e| match e {
        tokio::sync::TryAcquireError::Closed => Refusal::Draining,
        tokio::sync::TryAcquireError::NoPermits => full,
    })
}

fn transport_index(transport: &'static str) -> usize {
    usize::from(transport == "quic")
}

impl Admission {
    pub fn new(limits: &config::Limits) -> Self {
        Admission {
            accept: Mutex::new(TokenBucket::new(
                limits.accept_rate,
                limits.accept_rate,
                Instant::now(),
            )),
            waiting: Arc::new(Semaphore::new(limits.max_waiting)),
            waiting_per_ip: PerIp::new(limits.max_waiting_per_ip),
            handshakes: [
                Arc::new(Semaphore::new(limits.max_handshakes)),
                Arc::new(Semaphore::new(limits.max_handshakes)),
            ],
            handshakes_per_ip: PerIp::new(limits.max_handshakes_per_ip),
            max_handshakes: limits.max_handshakes,
            sessions: Arc::new(Semaphore::new(limits.max_sessions)),
            sessions_per_ip: PerIp::new(limits.max_sessions_per_ip),
        }
    }

    /// Lets a new WSS connection from `ip` wait for its first bytes, or says why not (and counts the refusal).
    pub fn wait(&self, ip: IpAddr) -> Result<WaitingPermit, Refusal> {
        let result = slot(&self.waiting, Refusal::MaxWaiting).and_then(|slot| {
            let ip = self.waiting_per_ip.try_count(ip).ok_or(Refusal::MaxWaitingPerIp)?;
            Ok(WaitingPermit { _slot: slot, _ip: ip, _gauge: Gauged::new(metrics::WAITING, "wss") })
        });
        if let Err(refusal) = result {
            metrics::refused("wss", refusal.reason());
        }
        result
    }

    /// Admits a connection from `ip` into its handshake, or says why not (and counts the refusal).
    pub fn admit(
        &self,
        ip: IpAddr,
        transport: &'static str,
    ) -> Result<(SessionPermit, HandshakePermit), Refusal> {
        let result = self.try_admit(ip, transport);
        if let Err(refusal) = result {
            metrics::refused(transport, refusal.reason());
        }
        result
    }

    fn try_admit(
        &self,
        ip: IpAddr,
        transport: &'static str,
    ) -> Result<(SessionPermit, HandshakePermit), Refusal> {
        // the per-address caps first: one address's excess spends nothing shared, not even an accept token
        let handshake_ip =
            self.handshakes_per_ip.try_count(ip).ok_or(Refusal::MaxHandshakesPerIp)?;
        let session_ip = self.sessions_per_ip.try_count(ip).ok_or(Refusal::MaxSessionsPerIp)?;
        let handshake = slot(&self.handshakes[transport_index(transport)], Refusal::MaxHandshakes)?;
        if !self.accept.lock().unwrap_or_else(|e| e.into_inner()).try_take(Instant::now()) {
            return Err(Refusal::AcceptRate);
        }
        let session = slot(&self.sessions, Refusal::MaxSessions)?;
        Ok((
            SessionPermit { _slot: session, _ip: session_ip },
            HandshakePermit {
                _slot: handshake,
                _ip: handshake_ip,
                _gauge: Gauged::new(metrics::HANDSHAKES_ACTIVE, transport),
            },
        ))
    }

    /// Whether more than half of a transport's handshake slots are taken: QUIC then asks new clients to prove
    /// their address with a Retry before any handshake state is kept.
    pub fn busy(&self, transport: &'static str) -> bool {
        let free = self.handshakes[transport_index(transport)].available_permits();
        self.max_handshakes.saturating_sub(free) * 2 > self.max_handshakes
    }

    /// Stops admitting anything (drain).
    pub fn close(&self) {
        self.waiting.close();
        self.sessions.close();
        for handshakes in &self.handshakes {
            handshakes.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10, 2, t0);
        assert!(bucket.try_take(t0));
        assert!(bucket.try_take(t0));
        assert!(!bucket.try_take(t0));
        assert!(bucket.try_take(t0 + Duration::from_millis(100)));
        assert_eq!(bucket.take(t0 + Duration::from_millis(100)), Duration::from_millis(100));
    }

    #[test]
    fn per_ip_and_global_caps() {
        let limits =
            config::Limits { max_sessions: 3, max_sessions_per_ip: 2, ..config::Limits::default() };
        let admission = Admission::new(&limits);
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 3].into();
        let first = admission.admit(a, "wss").unwrap();
        let _second = admission.admit(a, "wss").unwrap();
        assert_eq!(admission.admit(a, "wss").unwrap_err(), Refusal::MaxSessionsPerIp);
        let _third = admission.admit(b, "quic").unwrap();
        assert_eq!(admission.admit(b, "quic").unwrap_err(), Refusal::MaxSessions);
        drop(first);
        assert!(admission.admit(a, "wss").is_ok());
    }

    #[test]
    fn waiting_connections_are_capped_apart_from_handshakes() {
        let limits = config::Limits {
            max_waiting: 3,
            max_waiting_per_ip: 2,
            max_handshakes: 1,
            ..config::Limits::default()
        };
        let admission = Admission::new(&limits);
        let a: IpAddr = [127, 0, 0, 2].into();
        let b: IpAddr = [127, 0, 0, 3].into();
        let _w1 = admission.wait(a).unwrap();
        let _w2 = admission.wait(a).unwrap();
        assert_eq!(admission.wait(a).unwrap_err(), Refusal::MaxWaitingPerIp);
        let _w3 = admission.wait(b).unwrap();
        assert_eq!(admission.wait(b).unwrap_err(), Refusal::MaxWaiting);
        // waiting connections hold no handshake slot, and a WSS handshake none of QUIC's
        let _wss = admission.admit(b, "wss").unwrap();
        assert_eq!(admission.admit(a, "wss").unwrap_err(), Refusal::MaxHandshakes);
        assert!(admission.busy("wss"));
        assert!(!admission.busy("quic"));
        let _quic = admission.admit(a, "quic").unwrap();
        admission.close();
        assert_eq!(admission.wait(a).unwrap_err(), Refusal::Draining);
    }

    #[test]
    fn one_address_cannot_take_every_handshake_slot() {
        let limits = config::Limits { max_handshakes_per_ip: 2, ..config::Limits::default() };
        let admission = Admission::new(&limits);
        let a: IpAddr = [127, 0, 0, 2].into();
        let first = admission.admit(a, "wss").unwrap();
        let _second = admission.admit(a, "quic").unwrap();
        assert_eq!(admission.admit(a, "wss").unwrap_err(), Refusal::MaxHandshakesPerIp);
        assert!(admission.admit([127, 0, 0, 3].into(), "wss").is_ok());
        // the handshake over (its permit dropped), the session keeps its slot but frees the handshake count
        let (_session, handshake) = first;
        drop(handshake);
        assert!(admission.admit(a, "wss").is_ok());
    }
}
