//! Service calls and property writes started through the API and waiting for their device's answer (a
//! `SERVICE_RESPONSE`, or the acknowledgement of a write).
//!
//! A call id carries the starting worker's tag in its top 20 bits: the device's answer reaches whichever worker
//! the gateway picks, and that worker sends it on to the worker with the tag (`Cluster::complete_call`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use thingport_protocol::ServiceResult;
use tokio::sync::oneshot;

const TAG_SHIFT: u32 = 44;

/// Outcome of a call as the caller sees it.
#[derive(Debug)]
pub enum CallOutcome {
    Answered(ServiceResult),
    /// The gateway could not deliver the request (the device left, its queue was full).
    Undeliverable(thingport_protocol::ErrorCode),
    /// The device acknowledged the property write.
    Delivered,
}

/// The tag of a worker, from its member key.
pub fn tag_of(member: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(member.as_bytes()) & ((1 << (64 - TAG_SHIFT)) - 1)
}

/// The tag of the worker that started a call.
pub fn tag_of_call(call_id: u64) -> u64 {
    call_id >> TAG_SHIFT
}

/// Calls in flight, by call id.
#[derive(Debug)]
pub struct Calls {
    tag: u64,
    next: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<CallOutcome>>>,
}

impl Calls {
    /// Calls of the worker with this member key.
    pub fn new(member: &str) -> Calls {
        Calls { tag: tag_of(member), next: AtomicU64::new(0), pending: Mutex::default() }
    }

    /// A new call: its id (also the DOWNSTREAM reference) and where its outcome arrives.
    pub fn start(&self) -> (u64, oneshot::Receiver<CallOutcome>) {
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let id = (self.tag << TAG_SHIFT) | (n & ((1 << TAG_SHIFT) - 1));
        let (tx, rx) = oneshot::channel();
        self.lock().insert(id, tx);
        (id, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<CallOutcome>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this worker started the call.
    pub fn is_mine(&self, id: u64) -> bool {
        tag_of_call(id) == self.tag
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
