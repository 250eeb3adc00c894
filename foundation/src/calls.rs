//! Service calls started through the API and waiting for their device's answer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use thingport_protocol::ServiceResult;
use tokio::sync::oneshot;

/// Outcome of a call as the caller sees it.
#[derive(Debug)]
pub enum CallOutcome {
    Answered(ServiceResult),
    /// The gateway could not deliver the request (the device left, its queue was full).
    Undeliverable(thingport_protocol::ErrorCode),
}

/// Calls in flight, by call id.
#[derive(Debug, Default)]
pub struct Calls {
    next: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<CallOutcome>>>,
}

impl Calls {
    /// A new call: its id (also the DOWNSTREAM reference) and where its outcome arrives.
    pub fn start(&self) -> (u64, oneshot::Receiver<CallOutcome>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, tx);
        (id, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<CallOutcome>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Completes a call; false if no caller waits for it (it timed out, or the answer is a duplicate).
    pub fn complete(&self, id: u64, outcome: CallOutcome) -> bool {
        match self.lock().remove(&id) {
            Some(tx) => tx.send(outcome).is_ok(),
            None => false,
        }
    }

    /// Forgets a call whose caller stopped waiting.
    pub fn abandon(&self, id: u64) {
        self.lock().remove(&id);
    }
}
