//! Admission control shared by every listener: session caps (global and per source address), an accept-rate
//! bucket and a cap on concurrent handshakes. A refused connection costs no TLS work on WSS and is refused before
//! the handshake on QUIC.

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
    Draining,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::MaxSessions => "max_sessions",
            Refusal::MaxSessionsPerIp => "max_sessions_per_ip",
            Refusal::AcceptRate => "accept_rate",
            Refusal::MaxHandshakes => "max_handshakes",
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

/// The gateway's admission state.
#[derive(Debug)]
pub struct Admission {
    sessions: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_ip: usize,
    accept: Mutex<TokenBucket>,
}

/// Held for the life of a connection: releases its session slot and per-address count when dropped.
#[derive(Debug)]
pub struct SessionPermit {
    _slot: OwnedSemaphorePermit,
    ip: IpAddr,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for SessionPermit {
    fn drop(&mut self) {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Held while a connection is in its handshake.
pub type HandshakePermit = OwnedSemaphorePermit;

impl Admission {
    pub fn new(limits: &config::Limits) -> Self {
        Admission {
            sessions: Arc::new(Semaphore::new(limits.max_sessions)),
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes)),
            per_ip: Arc::default(),
            max_per_ip: limits.max_sessions_per_ip,
            accept: Mutex::new(TokenBucket::new(
                limits.accept_rate,
                limits.accept_rate,
                Instant::now(),
            )),
        }
    }

    /// Admits a new connection from `ip`, or says why not (and counts the refusal).
    pub fn admit(
        &self,
        ip: IpAddr,
        transport: &'static str,
    ) -> Result<(SessionPermit, HandshakePermit), Refusal> {
        let result = self.try_admit(ip);
        if let Err(refusal) = result {
            metrics::refused(transport, refusal.reason());
        }
        result
    }

    fn try_admit(&self, ip: IpAddr) -> Result<(SessionPermit, HandshakePermit), Refusal> {
        if !self.accept.lock().unwrap_or_else(|e| e.into_inner()).try_take(Instant::now()) {
            return Err(Refusal::AcceptRate);
        }
        let handshake =
            self.handshakes.clone().try_acquire_owned().map_err(|_| Refusal::MaxHandshakes)?;
        let slot = self.sessions.clone().try_acquire_owned().map_err(|_| Refusal::MaxSessions)?;
        {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let count = per_ip.entry(ip).or_insert(0);
            if *count >= self.max_per_ip {
                return Err(Refusal::MaxSessionsPerIp);
            }
            *count += 1;
        }
        Ok((SessionPermit { _slot: slot, ip, per_ip: self.per_ip.clone() }, handshake))
    }

    /// Stops admitting anything (drain).
    pub fn close(&self) {
        self.sessions.close();
        self.handshakes.close();
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
}
