//! The locks the consensus group holds: a state machine that every member applies in log order, so that every
//! member holds the same leases. Time is the leader's: each command carries the clock of the leader that
//! proposed it, and the machine never lets its time run backwards (a new leader with a slower clock cannot revive
//! a lease that ran out).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thingport_protocol::peer::{Lease, LockCommand, LockOutcome};

/// A command as the consensus log holds it: stamped with the proposing leader's clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamped {
    pub now_ms: u64,
    pub command: LockCommand,
}

/// One held lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub holder: String,
    pub token: u64,
    pub expires_ms: u64,
}

/// Every lock held, and the latest time a command carried.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Locks {
    held: BTreeMap<String, Held>,
    now_ms: u64,
}

impl Locks {
    /// Applies the command of log entry `index`.
    pub fn apply(&mut self, index: u64, stamped: &Stamped) -> LockOutcome {
        let now = self.now_ms.max(stamped.now_ms);
        self.now_ms = now;
        match &stamped.command {
            LockCommand::Acquire { name, holder, ttl_ms } => match self.current(name, now) {
                Some(held) if held.holder != *holder => LockOutcome::Busy {
                    holder: held.holder.clone(),
                    token: held.token,
                    expires_in_ms: held.expires_ms - now,
                },
                Some(held) => {
                    held.expires_ms = now.saturating_add(*ttl_ms);
                    lease(name, held, now)
                }
                None => {
                    let held = Held {
                        holder: holder.clone(),
                        token: index,
                        expires_ms: now.saturating_add(*ttl_ms),
                    };
                    let outcome = lease(name, &held, now);
                    self.held.insert(name.clone(), held);
                    outcome
                }
            },
            LockCommand::Renew { name, token, ttl_ms } => match self.current(name, now) {
                Some(held) if held.token == *token => {
                    held.expires_ms = now.saturating_add(*ttl_ms);
                    lease(name, held, now)
                }
                _ => LockOutcome::Lost,
            },
            LockCommand::Release { name, token } => match self.held.get(name) {
                Some(held) if held.token == *token => {
                    self.held.remove(name);
                    LockOutcome::Released
                }
                _ => LockOutcome::Lost,
            },
        }
    }

    /// The lock's lease if it has not run out at `now`; one that ran out is dropped.
    fn current(&mut self, name: &str, now: u64) -> Option<&mut Held> {
        if self.held.get(name).is_some_and(|h| h.expires_ms <= now) {
            self.held.remove(name);
        }
        self.held.get_mut(name)
    }

    /// The lock as it stands at `now_ms` (the reader's clock, or the machine's time if that is later).
    pub fn read(&self, name: &str, now_ms: u64) -> LockOutcome {
        let now = self.now_ms.max(now_ms);
        match self.held.get(name) {
            Some(held) if held.expires_ms > now => lease(name, held, now),
            _ => LockOutcome::Free,
        }
    }

    /// Locks held, counting those whose lease ran out but that no command has touched since.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Locks whose lease has not run out at `now_ms` (or the machine's time, if later).
    pub fn live(&self, now_ms: u64) -> usize {
        let now = self.now_ms.max(now_ms);
        self.held.values().filter(|h| h.expires_ms > now).count()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Drops every lease that ran out at the machine's time; returns how many.
    pub fn sweep(&mut self) -> usize {
        let now = self.now_ms;
        let before = self.held.len();
        self.held.retain(|_, h| h.expires_ms > now);
        before - self.held.len()
    }
}

fn lease(name: &str, held: &Held, now: u64) -> LockOutcome {
    LockOutcome::Held(Lease {
        name: name.to_string(),
        holder: held.holder.clone(),
        token: held.token,
        expires_in_ms: held.expires_ms.saturating_sub(now),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(now_ms: u64, command: LockCommand) -> Stamped {
        Stamped { now_ms, command }
    }

    fn acquire(name: &str, holder: &str, ttl_ms: u64) -> LockCommand {
        LockCommand::Acquire { name: name.into(), holder: holder.into(), ttl_ms }
    }

    fn token(outcome: &LockOutcome) -> u64 {
        match outcome {
            LockOutcome::Held(lease) => lease.token,
            other => panic!("not held: {other:?}"),
        }
    }

    #[test]
    fn a_lock_has_one_holder_until_its_lease_runs_out_or_it_is_released() {
        let mut locks = Locks::default();
        let a = locks.apply(10, &at(1_000, acquire("sweep", "a", 500)));
        assert_eq!(token(&a), 10);
        assert_eq!(
            locks.apply(11, &at(1_200, acquire("sweep", "b", 500))),
            LockOutcome::Busy { holder: "a".into(), token: 10, expires_in_ms: 300 }
        );
        // the same holder extends its lease and keeps its token
        assert_eq!(token(&locks.apply(12, &at(1_300, acquire("sweep", "a", 500)))), 10);
        // the lease ran out (1,300 + 500): b takes it with a larger token, and a's token is lost
        let b = locks.apply(13, &at(1_800, acquire("sweep", "b", 500)));
        assert_eq!(token(&b), 13);
        let renew = LockCommand::Renew { name: "sweep".into(), token: 10, ttl_ms: 500 };
        assert_eq!(locks.apply(14, &at(1_810, renew)), LockOutcome::Lost);
        let release = LockCommand::Release { name: "sweep".into(), token: 10 };
        assert_eq!(locks.apply(15, &at(1_820, release)), LockOutcome::Lost);
        let release = LockCommand::Release { name: "sweep".into(), token: 13 };
        assert_eq!(locks.apply(16, &at(1_830, release)), LockOutcome::Released);
        assert_eq!(locks.read("sweep", 1_830), LockOutcome::Free);
        assert_eq!(token(&locks.apply(17, &at(1_840, acquire("sweep", "a", 500)))), 17);
    }

    #[test]
    fn time_never_runs_backwards_so_a_slower_leader_revives_no_lease() {
        let mut locks = Locks::default();
        locks.apply(1, &at(5_000, acquire("job", "a", 100)));
        // a new leader whose clock is 1 s behind: the lease ran out at 5,100 by the time already seen
        locks.apply(2, &at(5_200, acquire("other", "x", 100)));
        assert_eq!(token(&locks.apply(3, &at(4_200, acquire("job", "b", 100)))), 3);
        assert_eq!(locks.read("job", 0), locks.read("job", 5_200));
    }

    #[test]
    fn a_renewal_extends_the_lease_from_the_renewal() {
        let mut locks = Locks::default();
        locks.apply(1, &at(0, acquire("l", "a", 1_000)));
        let renewed = locks
            .apply(2, &at(900, LockCommand::Renew { name: "l".into(), token: 1, ttl_ms: 1_000 }));
        assert!(matches!(renewed, LockOutcome::Held(Lease { expires_in_ms: 1_000, .. })));
        assert_eq!(
            locks.apply(3, &at(1_500, acquire("l", "b", 10))),
            LockOutcome::Busy { holder: "a".into(), token: 1, expires_in_ms: 400 }
        );
        locks.apply(4, &at(5_000, acquire("m", "c", 10)));
        assert_eq!(locks.sweep(), 1, "l ran out at 1,900");
        assert_eq!(locks.len(), 1);
    }
}
