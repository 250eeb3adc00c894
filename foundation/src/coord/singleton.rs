//! The pool's singleton: one worker at a time holds the lock [`NAME`] through the consensus group, and work that
//! must run once in the pool (the PostgreSQL retention sweep) runs only there.
//!
//! Each worker asks for the lock every third of [`LocksConfig::singleton_ttl`]; the holder's asks renew it (the
//! same holder keeps its token), and a worker that does not hold it also asks as soon as it applies the lock's
//! release. A worker counts its lease from when it *sent* the request that granted or renewed it, so its own view
//! ends before the pool's does; a worker that cannot reach a leader gives the role up when that view ends. A
//! worker that stops releases the lock before it leaves, so another takes the role as soon as the group commits
//! its ask; one that dies is replaced once its lease runs out. Work done under the role should carry
//! [`Singleton::token`] where something downstream can refuse a smaller one.
//!
//! [`LocksConfig::singleton_ttl`]: crate::config::LocksConfig::singleton_ttl

use std::sync::Arc;
use std::time::{Duration, Instant};

use thingport_protocol::peer::{LockCommand, LockOutcome};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Consensus;

/// The lock that carries the role.
pub const NAME: &str = "thingport:singleton";
/// Lock names the pool keeps for itself: the API refuses to take, renew or release them.
pub const RESERVED: &str = "thingport:";

/// Until this worker applies an entry after which nobody holds [`NAME`].
async fn released(coord: &Consensus) {
    let mut applied = coord.applied();
    while applied.changed().await.is_ok() {
        if !matches!(coord.peek(NAME), LockOutcome::Held(_)) {
            return;
        }
    }
    std::future::pending().await
}

/// This worker's hold on the role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hold {
    token: u64,
    /// When this worker's view of its lease ends.
    until: Instant,
}

/// Whether this worker holds the singleton role, as it changes.
#[derive(Debug)]
pub struct Singleton {
    hold: watch::Sender<Option<Hold>>,
}

impl Default for Singleton {
    fn default() -> Self {
        Singleton { hold: watch::channel(None).0 }
    }
}

impl Singleton {
    /// The fencing token of this worker's lease, while this worker holds the role.
    pub fn token(&self) -> Option<u64> {
        let hold = (*self.hold.borrow())?;
        (Instant::now() < hold.until).then_some(hold.token)
    }

    pub fn holds(&self) -> bool {
        self.token().is_some()
    }

    fn set(&self, hold: Option<Hold>) {
        self.hold.send_if_modified(|now| {
            let changed = now.map(|h| h.token) != hold.map(|h| h.token);
            if changed {
                match hold {
                    Some(h) => {
                        tracing::info!(token = h.token, "this worker holds the singleton role")
                    }
                    None if now.is_some() => {
                        tracing::info!("this worker gave up the singleton role")
                    }
                    None => {}
                }
            }
            *now = hold;
            changed
        });
        metrics::gauge!(crate::telemetry::SINGLETON_HELD).set(if hold.is_some() {
            1.0
        } else {
            0.0
        });
    }

    /// Asks for the role as `holder` until `stop`, then releases it if held.
    pub async fn run(
        self: Arc<Self>,
        coord: Arc<Consensus>,
        holder: String,
        ttl: Duration,
        stop: CancellationToken,
    ) {
        let ttl_ms = ttl.as_millis() as u64;
        let every = ttl / 3;
        let ask = LockCommand::Acquire { name: NAME.into(), holder: holder.clone(), ttl_ms };
        loop {
            let sent = Instant::now();
            let outcome = tokio::select! {
                _ = stop.cancelled() => break,
                outcome = coord.submit(ask.clone()) => outcome,
            };
            let wait = match outcome {
                Ok(LockOutcome::Held(lease)) if lease.holder == holder => {
                    self.set(Some(Hold { token: lease.token, until: sent + ttl }));
                    every
                }
                // another worker's: ask again as its lease runs out
                Ok(LockOutcome::Busy { expires_in_ms, .. }) => {
                    self.set(None);
                    Duration::from_millis(expires_in_ms).clamp(Duration::from_millis(10), every)
                }
                // no leader reachable, or the table is full: the lease this worker has (if any) still counts
                _ => {
                    if self.token().is_none() {
                        self.set(None);
                    }
                    every.min(Duration::from_millis(200))
                }
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
                // a worker that does not hold the role asks again as soon as it sees the lock released
                _ = released(&coord), if !self.holds() => {}
            }
        }
        if let Some(token) = self.token() {
            self.set(None);
            let release = LockCommand::Release { name: NAME.into(), token };
            let _ = tokio::time::timeout(Duration::from_secs(1), coord.submit(release)).await;
        }
    }
}
