//! The upstream link pool: a few persistent TCP links to every foundation worker, carrying the device frames of
//! all sessions.
//!
//! - **Batching**: a link's writer takes every frame queued since its last write (and, with `flush_delay`, waits
//!   that long for more) and writes them with one vectored call, each device frame from the buffer it was read
//!   into when it is long, behind its routing header (`thingport_shell::batch`;
//!   `thingport_gateway_link_frames_per_write`).
//! - **Owner-aware routing**: workers send the primary of every partition (`ROUTES`); a device data frame goes to
//!   a link of its thing's partition's primary, the same link for every frame of a session, so the primary stores
//!   it without passing it on and a session's frames keep their order while that link can take them (a frame sent
//!   elsewhere by the fallback below may be stored before earlier ones still queued on it).
//! - **Round-robin with high-water skip** as the fallback: when no primary is known, or none of its links can take
//!   the frame, it goes to the next link that is up, not saturated (`LOAD`), not draining, and has fewer than
//!   `high_water_bytes` queued. When none can take it the session waits (and stops reading its device) until one
//!   can.
//! - **Retry**: a link keeps every data frame it sent until the worker answers `STORED`. When the link fails, those
//!   frames are sent again on other links (or held until a link is up); workers apply data idempotently, so a
//!   frame stored twice is applied once.
//! - **Heartbeats**: a link silent for three heartbeat intervals is closed and its frames retried.
//! - **Bindings**: a session's `OPEN` and `CLOSE` are kept until a worker answers `BOUND`, and sent again (on any
//!   link) every four heartbeat intervals until then; a link that comes up first carries an `OPEN` for every live
//!   session, since the worker behind it may have restarted and lost its bindings. At most two per allowed
//!   session wait: beyond it the oldest `CLOSE` is forgotten (the thing's next session binds it anyway).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::StreamExt;
use thingport_protocol::codec::{CodecError, LinkCodec};
use thingport_protocol::link::{self, LINK_VERSION};
use thingport_protocol::{ByteString, ErrorCode, LinkFrame};
use thingport_shell::batch::{Batch, Flush, gather};
use thingport_shell::pool::{self, Connector, PoolStream};
use tokio::io::AsyncWriteExt;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{Notify, mpsc};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::config;
use crate::metrics;
use crate::registry::{Downstream, Push, Registry};

use crate::config::MAX_BATCH_BYTES;

/// Workers a gateway links to at most, configured and learned together.
const MAX_LINKED_WORKERS: usize = 256;

const DOWN: u8 = 0;
const UP: u8 = 1;
const SATURATED: u8 = 2;
const DRAINING: u8 = 3;

/// A device data frame on its way to a worker, kept until the worker answers `STORED`.
#[derive(Debug, Clone)]
pub struct Pending {
    pub session_id: u64,
    pub incarnation: u64,
    /// The thing's partition (`thingport_protocol::partition`), which routing follows.
    pub partition: u16,
    pub seq: u64,
    pub thing: ByteString,
    pub frame: Bytes,
    pub sent: Instant,
}

#[derive(Debug)]
enum Outbound {
    Data(Pending),
    Control(LinkFrame),
}

/// No link can take a frame now: every link is down, saturated or over its high-water mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// One persistent link to a worker (reconnected as needed).
#[derive(Debug)]
struct Link {
    index: usize,
    addr: SocketAddr,
    state: AtomicU8,
    queued: AtomicUsize,
    tx: mpsc::Sender<Outbound>,
    rx: Mutex<Option<mpsc::Receiver<Outbound>>>,
    inflight: Mutex<HashMap<(u64, u64), Pending>>,
    /// The worker behind the link, from its last `WELCOME`.
    worker: Mutex<Option<ByteString>>,
    /// Named in the configuration (else learned from a worker's `WORKERS`).
    configured: bool,
    /// Set while no worker lists this link's address any more: the link is not opened again.
    retired: tokio::sync::watch::Sender<bool>,
    /// The link addresses the worker behind the link listed in its last `WORKERS` (empty while the link is down).
    listed: Mutex<Vec<SocketAddr>>,
    /// A PONG waits for room in the queue (at most one per link).
    pong_waiting: Arc<AtomicBool>,
}

impl Link {
    fn writable(&self, high_water: usize) -> bool {
        self.state.load(Ordering::Acquire) == UP && self.queued.load(Ordering::Relaxed) < high_water
    }

    fn inflight(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u64), Pending>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send_control(&self, frame: LinkFrame) -> bool {
        self.state.load(Ordering::Acquire) != DOWN
            && self.tx.try_send(Outbound::Control(frame)).is_ok()
    }

    fn worker(&self) -> Option<ByteString> {
        self.worker.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Queues a data frame if the link can take it.
    fn try_send(&self, pending: &Pending, high_water: usize) -> bool {
        if !self.writable(high_water) {
            return false;
        }
        let key = (pending.session_id, pending.seq);
        let len = pending.frame.len();
        // recorded before sending, so that a fast STORED always finds it
        self.inflight().insert(key, pending.clone());
        if self.tx.try_send(Outbound::Data(pending.clone())).is_err() {
            self.inflight().remove(&key);
            return false;
        }
        self.queued.fetch_add(len, Ordering::Relaxed);
        metrics::per_frame().link_queue_bytes.increment(len as f64);
        true
    }
}

fn new_link(index: usize, addr: SocketAddr, configured: bool, queue_frames: usize) -> Arc<Link> {
    let (tx, rx) = mpsc::channel(queue_frames);
    Arc::new(Link {
        index,
        addr,
        state: AtomicU8::new(DOWN),
        queued: AtomicUsize::new(0),
        tx,
        rx: Mutex::new(Some(rx)),
        inflight: Mutex::default(),
        worker: Mutex::default(),
        configured,
        retired: tokio::sync::watch::Sender::new(false),
        listed: Mutex::default(),
        pong_waiting: Arc::default(),
    })
}

/// Where each partition's frames go: the links of its primary, by the newest `ROUTES` any worker sent.
#[derive(Debug, Default)]
struct Routes {
    version: u64,
    workers: Vec<ByteString>,
    primaries: Vec<Option<u16>>,
    /// For each of `workers`, the links whose `WELCOME` named it.
    links: Vec<Vec<usize>>,
}

impl Routes {
    fn new(
        version: u64,
        workers: Vec<ByteString>,
        primaries: Vec<Option<u16>>,
        pool: &[Arc<Link>],
    ) -> Routes {
        let by_link: Vec<Option<ByteString>> = pool.iter().map(|l| l.worker()).collect();
        let links = workers
            .iter()
            .map(|w| (0..pool.len()).filter(|&i| by_link[i].as_ref() == Some(w)).collect())
            .collect();
        Routes { version, workers, primaries, links }
    }

    /// The links of `partition`'s primary; empty when it is not known or has no link.
    fn links_for(&self, partition: u16) -> &[usize] {
        self.primaries
            .get(usize::from(partition))
            .copied()
            .flatten()
            .and_then(|w| self.links.get(usize::from(w)))
            .map_or(&[], Vec::as_slice)
    }
}

/// The links to every worker.
#[derive(Debug)]
pub struct Pool {
    gateway_id: ByteString,
    /// Every link, configured and learned; it only grows, so an index stays valid (a link of a worker that left is
    /// retired, not removed).
    links: ArcSwap<Vec<Arc<Link>>>,
    /// Held while links are added or retired.
    discovery: Mutex<()>,
    /// The stop of the link tasks, for links added after the start.
    cancel: std::sync::OnceLock<CancellationToken>,
    next: AtomicUsize,
    high_water: usize,
    ready: Notify,
    /// Frames whose link failed while no other link could take them. Bounded: each session has at most its
    /// window of frames in flight, and frames of closed sessions are dropped (their devices retransmit).
    orphans: Mutex<VecDeque<Pending>>,
    registry: Arc<Registry>,
    limits: thingport_protocol::Limits,
    config: config::Upstream,
    /// `OPEN` and `CLOSE` frames not yet confirmed with `BOUND`, by (session, open), with when they were last sent.
    bindings: Mutex<HashMap<(u64, bool), (LinkFrame, Instant)>>,
    max_bindings: usize,
    routes: ArcSwap<Routes>,
    /// Held while `routes` is replaced, so that two updates do not undo each other.
    routes_update: Mutex<()>,
    /// Mutual TLS with the pool's credentials; plain TCP (loopback only) without.
    tls: Option<Connector>,
}

impl Pool {
    pub fn new(
        config: &config::Config,
        registry: Arc<Registry>,
        tls: Option<Connector>,
    ) -> Arc<Pool> {
        let upstream = &config.upstream;
        let mut links = Vec::new();
        for addr in &upstream.foundations {
            for _ in 0..upstream.links_per_foundation {
                links.push(new_link(links.len(), *addr, true, upstream.queue_frames));
            }
        }
        Arc::new(Pool {
            gateway_id: ByteString::from(config.id.clone()),
            links: ArcSwap::from_pointee(links),
            discovery: Mutex::default(),
            cancel: std::sync::OnceLock::new(),
            next: AtomicUsize::new(0),
            high_water: upstream.high_water_bytes,
            ready: Notify::new(),
            orphans: Mutex::default(),
            registry,
            limits: config.protocol_limits(),
            config: upstream.clone(),
            bindings: Mutex::default(),
            max_bindings: config.limits.max_sessions.saturating_mul(2),
            routes: ArcSwap::default(),
            routes_update: Mutex::default(),
            tls,
        })
    }

    /// Starts every link's task; they run until `cancel`.
    pub fn start(self: &Arc<Self>, cancel: CancellationToken) {
        let _discovery = self.discovery.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self.cancel.set(cancel.clone());
        for link in self.links.load().iter() {
            tokio::spawn(run_link(self.clone(), link.clone(), cancel.clone()));
        }
        drop(_discovery);
        let pool = self.clone();
        tokio::spawn(async move {
            let period = pool.config.heartbeat * 4;
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => pool.resend_bindings(period),
                }
            }
        });
    }

    /// Sends a session's `OPEN` or `CLOSE` and keeps it until a worker confirms it.
    pub fn send_binding(&self, frame: LinkFrame) {
        let key = match &frame {
            LinkFrame::Open { session_id, .. } => (*session_id, true),
            LinkFrame::Close { session_id, .. } => (*session_id, false),
            _ => return,
        };
        {
            let mut bindings = self.bindings.lock().unwrap_or_else(|e| e.into_inner());
            if !key.1 {
                // a closed session's OPEN need not be confirmed any more
                bindings.remove(&(key.0, true));
            }
            if bindings.len() >= self.max_bindings {
                let oldest = bindings
                    .iter()
                    .filter(|((_, open), _)| !open)
                    .min_by_key(|(_, (_, sent))| *sent)
                    .map(|(k, _)| *k);
                if let Some(oldest) = oldest {
                    bindings.remove(&oldest);
                    ::metrics::counter!(metrics::LINK_EVENTS, "event" => "binding_forgotten")
                        .increment(1);
                }
            }
            bindings.insert(key, (frame.clone(), Instant::now()));
        }
        self.send_control(frame);
    }

    /// Sends again every binding unconfirmed for `after`.
    fn resend_bindings(&self, after: Duration) {
        let due: Vec<LinkFrame> = {
            let mut bindings = self.bindings.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            bindings
                .values_mut()
                .filter(|(_, sent)| now.duration_since(*sent) >= after)
                .map(|(frame, sent)| {
                    *sent = now;
                    frame.clone()
                })
                .collect()
        };
        for frame in due {
            ::metrics::counter!(metrics::LINK_EVENTS, "event" => "binding_resent").increment(1);
            self.send_control(frame);
        }
    }

    /// Bindings sent and not yet confirmed.
    pub fn unconfirmed_bindings(&self) -> usize {
        self.bindings.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Links that are up (saturated or not).
    pub fn links_up(&self) -> usize {
        self.links
            .load()
            .iter()
            .filter(|l| matches!(l.state.load(Ordering::Acquire), UP | SATURATED))
            .count()
    }

    /// The addresses of the workers this gateway links to: those it is configured with and those the workers
    /// list (`WORKERS`), not those that left.
    pub fn linked_workers(&self) -> Vec<SocketAddr> {
        let mut addrs: Vec<SocketAddr> =
            self.links.load().iter().filter(|l| !*l.retired.borrow()).map(|l| l.addr).collect();
        addrs.sort();
        addrs.dedup();
        addrs
    }

    /// A worker listed its pool's workers: links are added for those not linked yet, and those that no linked
    /// worker lists any more (and the configuration does not name) are retired.
    fn discovered(self: &Arc<Self>, link: &Link, workers: Vec<(ByteString, SocketAddr)>) {
        let listed: Vec<SocketAddr> = workers.into_iter().map(|(_, addr)| addr).collect();
        *link.listed.lock().unwrap_or_else(|e| e.into_inner()) = listed;
        self.rediscover();
    }

    /// Applies the union of what the linked workers list.
    fn rediscover(self: &Arc<Self>) {
        let _discovery = self.discovery.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.links.load_full();
        let mut wanted: Vec<SocketAddr> = Vec::new();
        let mut lists = 0;
        for link in current.iter() {
            let listed = link.listed.lock().unwrap_or_else(|e| e.into_inner());
            lists += usize::from(!listed.is_empty());
            for addr in listed.iter() {
                if !wanted.contains(addr) {
                    wanted.push(*addr);
                }
            }
        }
        // with no link up that has listed the pool (this gateway is cut off, say), nothing is known to have left:
        // the learned workers keep being tried
        if lists == 0 {
            return;
        }
        // without the pool's credentials a link stays on loopback, as the configuration check requires
        let allowed = |addr: &SocketAddr| self.tls.is_some() || addr.ip().is_loopback();
        for addr in wanted.iter().filter(|a| !allowed(a)) {
            tracing::warn!(%addr, "a worker listed at a non-loopback address is not linked: upstream.pool_credentials is not set");
        }
        wanted.retain(allowed);
        let mut grown: Vec<Arc<Link>> = current.as_ref().clone();
        let mut added = Vec::new();
        for addr in &wanted {
            let known = grown.iter().any(|l| l.addr == *addr);
            if !known && grown.len() >= MAX_LINKED_WORKERS * self.config.links_per_foundation {
                // retired links keep their slots (indices stay valid), so addresses that came and went count too
                tracing::warn!(%addr, "not linked: this gateway has had links to {MAX_LINKED_WORKERS} workers; restart it to forget those that left");
            } else if !known {
                for _ in 0..self.config.links_per_foundation {
                    let link = new_link(grown.len(), *addr, false, self.config.queue_frames);
                    added.push(link.clone());
                    grown.push(link);
                }
                ::metrics::counter!(metrics::LINK_EVENTS, "event" => "discovered").increment(1);
                tracing::info!(%addr, "a worker the pool lists is linked");
            }
        }
        for link in grown.iter().filter(|l| !l.configured) {
            let retire = !wanted.contains(&link.addr);
            let was = link.retired.send_replace(retire);
            if retire && !was && link.index % self.config.links_per_foundation == 0 {
                ::metrics::counter!(metrics::LINK_EVENTS, "event" => "retired").increment(1);
                tracing::info!(addr = %link.addr, "no worker lists this worker any more; its links are not opened again");
            }
        }
        if !added.is_empty() {
            self.links.store(Arc::new(grown));
            if let Some(cancel) = self.cancel.get() {
                for link in added {
                    tokio::spawn(run_link(self.clone(), link, cancel.clone()));
                }
            }
        }
    }

    /// Sends a device data frame on a link of its partition's primary (the session's one of them, or another if
    /// that one cannot take it), else on the next link that can take it.
    pub fn send(&self, pending: Pending) -> Result<(), Busy> {
        let routes = self.routes.load();
        let links = self.links.load();
        let primary = routes.links_for(pending.partition);
        let k = primary.len();
        let first = pending.session_id as usize;
        if (0..k).any(|i| links[primary[(first + i) % k]].try_send(&pending, self.high_water)) {
            metrics::per_frame().routed_primary.increment(1);
            return Ok(());
        }
        let n = links.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        if (0..n).any(|i| links[(start + i) % n].try_send(&pending, self.high_water)) {
            metrics::per_frame().routed_other.increment(1);
            return Ok(());
        }
        Err(Busy)
    }

    /// Version of the partition table routed by (0: none yet).
    pub fn routes_version(&self) -> u64 {
        self.routes.load().version
    }

    /// Adopts a worker's `ROUTES` if it is newer than the routes held.
    fn reroute(&self, version: u64, workers: Vec<ByteString>, primaries: Vec<Option<u16>>) {
        let _update = self.routes_update.lock().unwrap_or_else(|e| e.into_inner());
        if version <= self.routes.load().version {
            return;
        }
        self.routes.store(Arc::new(Routes::new(version, workers, primaries, &self.links.load())));
        ::metrics::gauge!(metrics::ROUTES_VERSION).set(version as f64);
    }

    /// Forgets the routes once no link is up. Table versions grow only within one pool: a pool started again
    /// from empty stores numbers its tables from 1, and a gateway that kept the old version would ignore them.
    fn unlinked(&self) {
        let _update = self.routes_update.lock().unwrap_or_else(|e| e.into_inner());
        if self.links.load().iter().all(|l| l.state.load(Ordering::Acquire) == DOWN) {
            self.routes.store(Arc::default());
            ::metrics::gauge!(metrics::ROUTES_VERSION).set(0.0);
        }
    }

    /// Records which worker a link reached, and routes to it.
    fn welcomed(&self, link: &Link, worker: ByteString) {
        let _update = self.routes_update.lock().unwrap_or_else(|e| e.into_inner());
        let previous =
            link.worker.lock().unwrap_or_else(|e| e.into_inner()).replace(worker.clone());
        if previous.as_ref() == Some(&worker) {
            return;
        }
        let current = self.routes.load();
        let routes = Routes::new(
            current.version,
            current.workers.clone(),
            current.primaries.clone(),
            &self.links.load(),
        );
        self.routes.store(Arc::new(routes));
    }

    /// Waits until a link may be able to take a frame (a link came up or drained), or `max` passed.
    pub async fn wait_ready(&self, max: Duration) {
        let _ = tokio::time::timeout(max, self.ready.notified()).await;
    }

    /// Sends a control frame (`OPEN`, `CLOSE`) on any link that is up and not draining; returns false if none is.
    pub fn send_control(&self, frame: LinkFrame) -> bool {
        let links = self.links.load();
        let n = links.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).any(|i| {
            let link = &links[(start + i) % n];
            link.state.load(Ordering::Acquire) != DRAINING && link.send_control(frame.clone())
        })
    }

    /// Tells the worker behind `link` that the device acknowledged the property write of `reference`.
    pub fn delivered(&self, link: usize, session_id: u64, reference: u64) {
        self.send_control_on(link, LinkFrame::Delivered { session_id, reference });
    }

    /// Tells the worker behind `link` that a `DOWNSTREAM` frame was not delivered.
    pub fn undeliverable(&self, link: usize, session_id: u64, reference: u64, code: ErrorCode) {
        self.send_control_on(link, LinkFrame::Undeliverable { session_id, reference, code });
    }

    fn send_control_on(&self, link: usize, frame: LinkFrame) {
        if let Some(link) = self.links.load().get(link) {
            link.send_control(frame);
        }
    }

    /// Frames a failed link had not had acknowledged: sent again elsewhere, in order, or held.
    fn resend(&self, mut frames: Vec<Pending>) {
        frames.sort_by_key(|p| (p.session_id, p.seq));
        let mut orphans = self.orphans.lock().unwrap_or_else(|e| e.into_inner());
        for pending in frames {
            if self.registry.get(pending.session_id).is_none() {
                continue; // the session is gone; its device retransmits after reconnecting
            }
            metrics::counter_retried();
            if orphans.is_empty() && self.send(pending.clone()).is_ok() {
                continue;
            }
            orphans.push_back(pending);
        }
    }

    fn flush_orphans(&self) {
        let mut orphans = self.orphans.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(pending) = orphans.pop_front() {
            if let Err(Busy) = self.send(pending.clone()) {
                orphans.push_front(pending);
                break;
            }
        }
    }

    /// Tells every worker this gateway is draining.
    pub fn goaway(&self) {
        for link in self.links.load().iter() {
            link.send_control(LinkFrame::Goaway);
        }
    }

    fn handle(self: &Arc<Self>, link: &Link, frame: LinkFrame) {
        match frame {
            LinkFrame::Stored { session_id, seq } => {
                if let Some(pending) = link.inflight().remove(&(session_id, seq)) {
                    metrics::per_frame().worker_rtt.record(pending.sent.elapsed().as_secs_f64());
                }
                if let Some(inbox) = self.registry.get(session_id) {
                    inbox.stored(seq, seq);
                }
            }
            LinkFrame::StoredRun { session_id, first, last } => {
                {
                    let mut inflight = link.inflight();
                    let rtt = &metrics::per_frame().worker_rtt;
                    // a run may cover up to MAX_STORED_RUN numbers: the work is bounded by what the link holds
                    if last - first < inflight.len() as u64 {
                        for seq in first..=last {
                            if let Some(pending) = inflight.remove(&(session_id, seq)) {
                                rtt.record(pending.sent.elapsed().as_secs_f64());
                            }
                        }
                    } else {
                        inflight.retain(|&(session, seq), pending| {
                            let stored = session == session_id && (first..=last).contains(&seq);
                            if stored {
                                rtt.record(pending.sent.elapsed().as_secs_f64());
                            }
                            !stored
                        });
                    }
                }
                if let Some(inbox) = self.registry.get(session_id) {
                    inbox.stored(first, last);
                }
            }
            LinkFrame::Downstream { session_id, reference, frame } => {
                let undeliverable = |code| LinkFrame::Undeliverable { session_id, reference, code };
                match self.registry.get(session_id) {
                    None => {
                        metrics::dropped("no_session");
                        link.send_control(undeliverable(ErrorCode::UNAVAILABLE));
                    }
                    Some(inbox) => {
                        match inbox.push(Downstream { frame, link: link.index, reference }) {
                            Push::Queued => {}
                            Push::QueuedDropping(dropped) => self.send_control_on(
                                dropped.link,
                                LinkFrame::Undeliverable {
                                    session_id,
                                    reference: dropped.reference,
                                    code: ErrorCode::SLOW_CONSUMER,
                                },
                            ),
                            Push::Refused => {
                                link.send_control(undeliverable(ErrorCode::SLOW_CONSUMER));
                            }
                        }
                    }
                }
            }
            LinkFrame::Rejected { session_id, seq, code } => {
                link.inflight().remove(&(session_id, seq));
                if let Some(inbox) = self.registry.get(session_id) {
                    inbox.rejected(seq, code);
                }
            }
            LinkFrame::Ping { nonce } => {
                // behind what is queued: a draining worker reads its PONG after every frame sent before it
                // (with the queue full, one PONG per link waits for room; a PING past it is not answered)
                if !link.send_control(LinkFrame::Pong { nonce })
                    && link.state.load(Ordering::Acquire) != DOWN
                    && !link.pong_waiting.swap(true, Ordering::AcqRel)
                {
                    let (tx, waiting) = (link.tx.clone(), link.pong_waiting.clone());
                    tokio::spawn(async move {
                        let _ = tx.send(Outbound::Control(LinkFrame::Pong { nonce })).await;
                        waiting.store(false, Ordering::Release);
                    });
                }
            }
            LinkFrame::Load { saturated } => {
                let (from, to) = if saturated { (UP, SATURATED) } else { (SATURATED, UP) };
                if link
                    .state
                    .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    let event = if saturated { "saturated" } else { "unsaturated" };
                    ::metrics::counter!(metrics::LINK_EVENTS, "event" => event).increment(1);
                    if !saturated {
                        self.ready.notify_waiters();
                    }
                }
            }
            LinkFrame::Goaway => {
                // the worker is stopping: new frames go elsewhere; the link closes once it has answered
                link.state.store(DRAINING, Ordering::Release);
                ::metrics::counter!(metrics::LINK_EVENTS, "event" => "goaway").increment(1);
                tracing::info!(link = link.index, "the worker is draining this link");
            }
            LinkFrame::Bound { session_id, open } => {
                self.bindings.lock().unwrap_or_else(|e| e.into_inner()).remove(&(session_id, open));
            }
            LinkFrame::Routes { version, workers, primaries } => {
                self.reroute(version, workers, primaries);
            }
            LinkFrame::Workers { workers } => self.discovered(link, workers),
            LinkFrame::Pong { .. } | LinkFrame::Welcome { .. } => {}
            other => {
                tracing::debug!(link = link.index, frame = ?other, "unexpected link frame from worker")
            }
        }
    }
}

/// Why a connected link ended.
#[derive(Debug)]
enum LinkEnd {
    Cancelled,
    /// The worker closed the link after its `GOAWAY` (it is stopping).
    Drained,
    Failed(anyhow::Error),
}

async fn run_link(pool: Arc<Pool>, link: Arc<Link>, cancel: CancellationToken) {
    let Some(mut rx) = link.rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    let mut backoff = pool.config.reconnect_min;
    let mut retired = link.retired.subscribe();
    loop {
        // a worker no other worker lists any more is not linked again, unless a list names it again
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = retired.wait_for(|retired| !retired) => {}
        }
        let connected = tokio::select! {
            _ = cancel.cancelled() => return,
            r = connect(&pool, &link) => r,
        };
        let (frames, writer, worker) = match connected {
            Ok(parts) => parts,
            Err(e) => {
                tracing::debug!(link = link.index, addr = %link.addr, error = %e, "link connect failed");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(pool.config.reconnect_max);
                continue;
            }
        };
        backoff = pool.config.reconnect_min;
        pool.welcomed(&link, worker);
        link.state.store(UP, Ordering::Release);
        ::metrics::gauge!(metrics::LINKS_UP).increment(1.0);
        ::metrics::counter!(metrics::LINK_EVENTS, "event" => "connected").increment(1);
        tracing::info!(link = link.index, addr = %link.addr, "link up");
        // the worker may have restarted without its bindings: every live session is opened again on this link
        // before any of its data
        for (session_id, open) in pool.registry.opens() {
            pool.bindings
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry((session_id, true))
                .or_insert_with(|| (open.clone(), Instant::now()));
            link.send_control(open);
        }
        pool.ready.notify_waiters();
        pool.flush_orphans();

        let stop = cancel.child_token();
        let writer_task =
            tokio::spawn(write_loop(pool.clone(), link.clone(), writer, rx, stop.clone()));
        let end = read_loop(&pool, &link, frames, &stop).await;
        stop.cancel();
        rx = match writer_task.await {
            Ok(rx) => rx,
            Err(_) => return,
        };

        link.state.store(DOWN, Ordering::Release);
        ::metrics::gauge!(metrics::LINKS_UP).decrement(1.0);
        pool.unlinked();
        // what this worker listed no longer counts: a worker gone stops vouching for itself
        let listed = std::mem::take(&mut *link.listed.lock().unwrap_or_else(|e| e.into_inner()));
        if !listed.is_empty() {
            pool.rediscover();
        }
        // frames queued but not written are in `inflight` too: drop the queue, resend from `inflight`
        while rx.try_recv().is_ok() {}
        let queued = link.queued.swap(0, Ordering::Relaxed);
        ::metrics::gauge!(metrics::LINK_QUEUE_BYTES).decrement(queued as f64);
        let unacked: Vec<Pending> = link.inflight().drain().map(|(_, p)| p).collect();
        match end {
            LinkEnd::Cancelled => return,
            LinkEnd::Drained => {
                tracing::info!(link = link.index, addr = %link.addr, unacked = unacked.len(), "link closed by a draining worker");
            }
            LinkEnd::Failed(e) => {
                ::metrics::counter!(metrics::LINK_EVENTS, "event" => "failed").increment(1);
                tracing::warn!(link = link.index, addr = %link.addr, error = %e, unacked = unacked.len(), "link failed");
            }
        }
        pool.resend(unacked);
    }
}

async fn connect(pool: &Pool, link: &Link) -> anyhow::Result<(LinkReader, LinkWriter, ByteString)> {
    let timeout = pool.config.connect_timeout;
    let stream = pool::connect(pool.tls.as_ref(), link.addr, timeout).await?;
    let (reader, mut writer) = tokio::io::split(stream);
    let hello = LinkFrame::Hello {
        version: LINK_VERSION,
        gateway_id: pool.gateway_id.clone(),
        link_index: link.index as u32,
    };
    writer.write_all(&hello.to_framed_bytes()).await?;
    let mut frames = FramedRead::with_capacity(reader, LinkCodec::new(pool.limits), 16 * 1024);
    match tokio::time::timeout(timeout, frames.next()).await? {
        Some(Ok(LinkFrame::Welcome { version: LINK_VERSION, worker_id })) => {
            Ok((frames, writer, worker_id))
        }
        Some(Ok(other)) => anyhow::bail!("expected link WELCOME, got {other:?}"),
        Some(Err(e)) => Err(e.into()),
        None => anyhow::bail!("worker closed the link during its handshake"),
    }
}

/// A link's incoming frames.
type LinkReader = FramedRead<ReadHalf<PoolStream>, LinkCodec>;
/// A link's outgoing side.
type LinkWriter = WriteHalf<PoolStream>;

async fn read_loop(
    pool: &Arc<Pool>,
    link: &Link,
    mut frames: LinkReader,
    stop: &CancellationToken,
) -> LinkEnd {
    let silence = pool.config.heartbeat * 3;
    // one wait for the stop and one timer for the link's life (each costs a registration): the timer is moved on
    // only when it fires before `silence` has passed since the last frame
    let mut stopped = std::pin::pin!(stop.cancelled());
    let mut last_frame = tokio::time::Instant::now();
    let mut deadline = std::pin::pin!(tokio::time::sleep_until(last_frame + silence));
    loop {
        let next = tokio::select! {
            _ = stopped.as_mut() => return LinkEnd::Cancelled,
            next = frames.next() => next,
            _ = deadline.as_mut() => {
                if last_frame.elapsed() >= silence {
                    return LinkEnd::Failed(anyhow::anyhow!("worker silent for {silence:?}"));
                }
                deadline.as_mut().reset(last_frame + silence);
                continue;
            }
        };
        last_frame = tokio::time::Instant::now();
        match next {
            Some(Ok(frame)) => pool.handle(link, frame),
            None if link.state.load(Ordering::Acquire) == DRAINING => return LinkEnd::Drained,
            None => return LinkEnd::Failed(anyhow::anyhow!("worker closed the link")),
            Some(Err(CodecError::Decode(e))) => {
                return LinkEnd::Failed(anyhow::anyhow!("undecodable link frame: {e}"));
            }
            Some(Err(e)) => return LinkEnd::Failed(e.into()),
        }
    }
}

impl Outbound {
    /// Puts the frame into a batch. A data frame weighs its device frame's bytes, which the link's queued count
    /// releases once written.
    fn put(self, batch: &mut Batch) -> usize {
        match self {
            Outbound::Data(p) => {
                let len = p.frame.len();
                batch.encode(|b| {
                    link::put_upstream_header(b, p.session_id, p.incarnation, &p.thing, len);
                });
                batch.push(p.frame);
                len
            }
            Outbound::Control(frame) => {
                batch.encode(|b| frame.encode_framed(b));
                0
            }
        }
    }
}

async fn write_loop(
    pool: Arc<Pool>,
    link: Arc<Link>,
    mut writer: LinkWriter,
    mut rx: mpsc::Receiver<Outbound>,
    stop: CancellationToken,
) -> mpsc::Receiver<Outbound> {
    let mut batch = Batch::default();
    let mut nonce = 0u64;
    // a PING after a heartbeat without a write; one timer for the link's life, moved when it fires, not per write
    let mut last_write = tokio::time::Instant::now();
    let mut beat = std::pin::pin!(tokio::time::sleep_until(last_write + pool.config.heartbeat));
    let mut stopped = std::pin::pin!(stop.cancelled());
    loop {
        let first = tokio::select! {
            _ = stopped.as_mut() => return rx,
            item = rx.recv() => item,
            _ = beat.as_mut() => {
                let due = last_write + pool.config.heartbeat;
                if tokio::time::Instant::now() < due {
                    beat.as_mut().reset(due);
                    continue;
                }
                beat.as_mut().reset(due + pool.config.heartbeat);
                nonce += 1;
                Some(Outbound::Control(LinkFrame::Ping { nonce }))
            }
        };
        let Some(first) = first else { return rx };
        let policy = Flush {
            delay: pool.config.flush_delay,
            bytes: pool.config.flush_bytes,
            max_bytes: MAX_BATCH_BYTES,
        };
        tokio::select! {
            _ = stopped.as_mut() => return rx,
            _ = gather(&mut rx, first, &mut batch, policy, Outbound::put) => {}
        };
        let (frames, data_bytes) = (batch.frames, batch.weight);
        let written = tokio::select! {
            _ = stopped.as_mut() => return rx,
            r = batch.write_to(&mut writer) => r,
        };
        if written.is_err() {
            // the reader sees the broken connection too; wait for it to stop us
            stopped.await;
            return rx;
        }
        last_write = tokio::time::Instant::now();
        let released = data_bytes.min(link.queued.load(Ordering::Relaxed));
        link.queued.fetch_sub(released, Ordering::Relaxed);
        let per_frame = metrics::per_frame();
        per_frame.link_queue_bytes.decrement(released as f64);
        per_frame.frames_per_write.record(frames as f64);
        if link.queued.load(Ordering::Relaxed) < pool.high_water {
            pool.ready.notify_waiters();
        }
    }
}
