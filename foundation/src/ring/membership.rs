//! Membership and failure detection: SWIM over UDP with [foca](https://docs.rs/foca), on the worker's peer port.
//!
//! A worker's identity is its configured name, its peer address and a boot number taken at start, so a restarted
//! worker is a new member (its memory is empty) and its earlier self is declared down. A worker that the others
//! declared down while it ran (it was paused, or cut off) rejoins under a new *renewal* of the same run: SWIM sees a
//! new identity, the ring sees the same member key, so the worker keeps its memory and is added back to the table
//! like any joining member. A worker joins by announcing itself to the seed addresses until some member answers. The
//! set of active members (this worker included) is published on a watch channel, keyed by [`Node::key`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use foca::{Config as FocaConfig, Foca, OwnedNotification, PeriodicParams, PostcardCodec, Timer};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use thingport_shell::pool::SwimKey;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// A member of the pool.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Node {
    /// The configured worker name.
    pub name: String,
    /// The peer address: UDP for membership, TCP for the ring's requests.
    pub addr: SocketAddr,
    /// Where gateways open their links to this worker (told to them in `WORKERS`).
    pub link: SocketAddr,
    /// Distinguishes this run of the worker from earlier ones.
    pub boot: u64,
    /// Counts the times this run rejoined after being declared down.
    pub renewal: u32,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}@{}", self.key(), self.renewal, self.addr)
    }
}

impl Node {
    /// The member's name in partition tables: worker name and boot number (the same for every renewal).
    pub fn key(&self) -> String {
        format!("{}#{:x}", self.name, self.boot)
    }
}

/// The worker name part of a member key.
pub fn name_of(key: &str) -> &str {
    key.rsplit_once('#').map_or(key, |(name, _)| name)
}

/// The boot number part of a member key.
pub fn boot_of(key: &str) -> Option<u64> {
    key.rsplit_once('#').and_then(|(_, boot)| u64::from_str_radix(boot, 16).ok())
}

impl foca::Identity for Node {
    type Addr = SocketAddr;

    // Declared down while running: rejoin as the same run, renewed. (Two sides of a healed network partition that
    // declared each other down both renew; neither has to restart.)
    fn renew(&self) -> Option<Self> {
        Some(Node { renewal: self.renewal.wrapping_add(1), ..self.clone() })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.boot, self.renewal) > (adversary.boot, adversary.renewal)
    }
}

/// Active members by key, this worker included.
pub type Members = Arc<BTreeMap<String, Node>>;

/// Timing of failure detection.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How often each member probes another.
    pub probe_period: Duration,
    /// How long a suspected member has to refute before it is declared down.
    pub suspect_timeout: Duration,
}

enum Input {
    Data(Bytes),
    Timer(Timer<Node>),
    /// The member's peer port refused a connection: its process is gone.
    Gone(Node),
}

/// The running membership of this worker.
#[derive(Debug, Clone)]
pub struct Membership {
    pub me: Node,
    pub members: watch::Receiver<Members>,
    gone: mpsc::Sender<Input>,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Data(d) => write!(f, "Data({} bytes)", d.len()),
            Input::Timer(_) => f.write_str("Timer"),
            Input::Gone(n) => write!(f, "Gone({n:?})"),
        }
    }
}

impl Membership {
    /// Declares a member down without waiting for failure detection, because its peer port refused a connection:
    /// a worker binds that port before it joins and keeps it until it exits, so a refusal means the process is
    /// gone (killed, crashed). The news spreads to the others as SWIM's own would. Failures that refuse nothing
    /// (a host down, a network cut) are left to failure detection.
    pub fn gone(&self, node: &Node) {
        let _ = self.gone.try_send(Input::Gone(node.clone()));
    }
}

/// Probe periods between announcements to the seeds that are not members.
const SEED_EVERY: u64 = 10;

fn foca_config(timing: Timing) -> FocaConfig {
    let mut config = FocaConfig::simple();
    config.probe_period = timing.probe_period;
    config.probe_rtt = timing.probe_period / 2;
    config.suspect_to_down_after = timing.suspect_timeout;
    config.max_transmissions = NonZeroU8::new(6).unwrap_or(NonZeroU8::MIN);
    // a member declared down that still talks (it was paused, or cut off) is told so, and leaves
    config.notify_down_members = true;
    config.periodic_announce = Some(PeriodicParams {
        frequency: timing.probe_period * 10,
        num_members: NonZeroUsize::MIN,
    });
    // and members declared down are asked now and then whether they are back: the two sides of a healed partition
    // meet again even when no seed is on the other side
    config.periodic_announce_to_down_members = Some(PeriodicParams {
        frequency: timing.probe_period * 10,
        num_members: NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN),
    });
    config.periodic_gossip = Some(PeriodicParams {
        frequency: timing.probe_period / 4,
        num_members: NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN),
    });
    config
}

/// Membership's handle now, and the function that starts it later: the worker loads its store in between, so that
/// it is not announced to the pool before it can serve. Membership stops at `stop`, announcing the departure first;
/// its task ends then, or earlier if the pool declares this worker down.
pub fn prepare(
    me: Node,
    socket: UdpSocket,
    seeds: Vec<SocketAddr>,
    timing: Timing,
    seal: Option<Arc<SwimKey>>,
    stop: CancellationToken,
) -> (Membership, impl FnOnce() -> tokio::task::JoinHandle<()>) {
    let mut initial = BTreeMap::new();
    initial.insert(me.key(), me.clone());
    ::metrics::gauge!(crate::telemetry::RING_MEMBERS).set(1.0);
    let (members_tx, members) = watch::channel(Arc::new(initial));
    // bounded: datagrams beyond it are dropped, as the network could drop them
    let (tx, rx) = mpsc::channel::<Input>(1024);
    let inputs = (tx.clone(), rx);
    let node = me.clone();
    let socket = Datagrams { socket: Arc::new(socket), seal };
    let start = move || tokio::spawn(run(node, socket, seeds, timing, members_tx, stop, inputs));
    (Membership { me, members, gone: tx }, start)
}

/// The membership socket: datagrams sealed with the pool's key when the pool has credentials.
#[derive(Debug, Clone)]
struct Datagrams {
    socket: Arc<UdpSocket>,
    seal: Option<Arc<SwimKey>>,
}

impl Datagrams {
    async fn send_to(&self, data: &[u8], to: SocketAddr) {
        match &self.seal {
            None => {
                let _ = self.socket.send_to(data, to).await;
            }
            Some(key) => match key.seal(data) {
                Ok(sealed) => {
                    let _ = self.socket.send_to(&sealed, to).await;
                }
                Err(e) => tracing::warn!(error = %e, "a membership datagram could not be sealed"),
            },
        }
    }

    /// The next datagram that opens with the pool's key (all of them without credentials); the others are
    /// counted and dropped.
    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<Bytes> {
        loop {
            let (n, from) = self.socket.recv_from(buf).await?;
            let Some(key) = &self.seal else { return Ok(Bytes::copy_from_slice(&buf[..n])) };
            if let Some(plain) = key.open(&mut buf[..n]) {
                return Ok(Bytes::copy_from_slice(plain));
            }
            ::metrics::counter!(crate::telemetry::FOUNDATION_MEMBERSHIP_REFUSED_TOTAL).increment(1);
            tracing::debug!(%from, "a membership datagram that does not open with the pool's key was dropped");
        }
    }
}

async fn run(
    me: Node,
    socket: Datagrams,
    seeds: Vec<SocketAddr>,
    timing: Timing,
    members: watch::Sender<Members>,
    stop: CancellationToken,
    (tx, mut rx): (mpsc::Sender<Input>, mpsc::Receiver<Input>),
) {
    let mut foca = Foca::new(me.clone(), foca_config(timing), StdRng::from_os_rng(), PostcardCodec);
    let mut runtime = foca::AccumulatingRuntime::new();
    let receiver = {
        let socket = socket.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(data) = socket.recv(&mut buf).await {
                let _ = tx.try_send(Input::Data(data));
            }
        })
    };
    let mut announce = tokio::time::interval(timing.probe_period);
    let mut ticks = 0u64;
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => {
                let _ = foca.leave_cluster(&mut runtime);
                flush(&mut runtime, &socket, &tx, &members, &foca).await;
                break;
            }
            _ = announce.tick() => {
                // until some member answers, keep announcing to the seeds; after that, every tenth period, to the
                // seeds that are not members: two sides of a healed partition that each declared the other down
                // probe only their own side, and would stay apart
                ticks += 1;
                let alone = foca.num_members() == 0;
                if alone || ticks.is_multiple_of(SEED_EVERY) {
                    let active: Vec<SocketAddr> = foca.iter_members().map(|m| m.id().addr).collect();
                    let missing = seeds.iter().filter(|&&s| s != me.addr && (alone || !active.contains(&s)));
                    for &seed in missing {
                        let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
                        let target =
                            Node { name: String::new(), addr: seed, link: unknown, boot: 0, renewal: 0 };
                        let _ = foca.announce(target, &mut runtime);
                    }
                }
                Ok(())
            }
            input = rx.recv() => match input {
                Some(Input::Data(data)) => foca.handle_data(&data, &mut runtime),
                Some(Input::Timer(timer)) => foca.handle_timer(timer, &mut runtime),
                Some(Input::Gone(node)) => {
                    let known = foca.iter_members().any(|m| *m.id() == node);
                    if known {
                        tracing::warn!(member = ?node, "member's peer port refuses connections; declaring it down");
                        let down = foca::Member::new(node, 0, foca::State::Down);
                        foca.apply_many(std::iter::once(down), true, &mut runtime)
                    } else {
                        Ok(())
                    }
                }
                None => break,
            },
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "membership message ignored");
        }
        if !flush(&mut runtime, &socket, &tx, &members, &foca).await {
            tracing::error!(member = ?me, "the pool declared this worker down");
            members.send_replace(Arc::new(BTreeMap::new()));
            break;
        }
    }
    receiver.abort();
}

/// Sends, schedules and publishes what foca asked for; false once this worker is defunct.
async fn flush(
    runtime: &mut foca::AccumulatingRuntime<Node>,
    socket: &Datagrams,
    tx: &mpsc::Sender<Input>,
    members: &watch::Sender<Members>,
    foca: &Foca<Node, PostcardCodec, StdRng, foca::NoCustomBroadcast>,
) -> bool {
    while let Some((to, data)) = runtime.to_send() {
        socket.send_to(&data, to.addr).await;
    }
    while let Some((after, timer)) = runtime.to_schedule() {
        let tx = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(Input::Timer(timer)).await;
        });
    }
    let mut changed = false;
    while let Some(notification) = runtime.to_notify() {
        match notification {
            OwnedNotification::MemberUp(node) => {
                tracing::info!(member = ?node, "member up");
                changed = true;
            }
            OwnedNotification::MemberDown(node) => {
                tracing::warn!(member = ?node, "member down");
                changed = true;
            }
            OwnedNotification::Rename(_, _) => changed = true,
            OwnedNotification::Rejoin(node) => {
                tracing::warn!(member = ?node, "the pool had declared this worker down; rejoined");
                changed = true;
            }
            OwnedNotification::Defunct => return false,
            _ => {}
        }
    }
    if changed {
        let mut active: BTreeMap<String, Node> =
            foca.iter_members().map(|m| (m.id().key(), m.id().clone())).collect();
        active.insert(foca.identity().key(), foca.identity().clone());
        ::metrics::gauge!(crate::telemetry::RING_MEMBERS).set(active.len() as f64);
        members.send_replace(Arc::new(active));
    }
    true
}
