//! The pool's consensus group: Raft (openraft 0.9) among up to five voting workers, the others learners, over the
//! ring's peer connections. It commits the ring's partition tables (its leader is the table coordinator), the locks
//! applications take through `/v1/locks` ([`locks`]) and the lease of the pool's singleton role ([`singleton`]); its
//! log, vote and snapshots are on disk in the worker's data directory ([`log`], [`machine`]).
//!
//! Who belongs follows the committed partition table: the group's leader adds a worker that joins the table as a
//! learner, makes it a voter while there are fewer than five, and removes one the table dropped. The group is
//! founded once, by the lowest-named member of the first table that finds every other member outside any group.
//! A worker is known to the group by its configured id (its Raft node id is a hash of it), so a worker that
//! restarts with its data directory is the same member; one that lost its directory must come back under a new id.

pub mod lease;
pub mod locks;
pub mod log;
pub mod machine;
pub mod singleton;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, ChangeMembers, SnapshotPolicy};
use serde::Serialize;
use serde::de::DeserializeOwned;
use thingport_protocol::peer::{
    ConsensusRpc, LockCommand, LockOutcome, Request, Response, TableRecord,
};
use tokio_util::sync::CancellationToken;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::config::LocksConfig;
use crate::ring::{Cluster, membership};
use lease::Leases;
use machine::{Applied, Command, Logged, Machine};

openraft::declare_raft_types!(
    /// The consensus group's types: entries carry stamped lock commands and partition tables, and applying one
    /// gives its outcome.
    pub TypeConfig:
        D = Logged,
        R = Applied,
);

pub type NodeId = u64;
type Raft = openraft::Raft<TypeConfig>;

/// Voting members at most; the other workers follow as learners.
pub const VOTERS: usize = 5;

/// The seed of the hash from a worker's id to its Raft node id.
const NODE_SEED: u64 = 0x7468_696e_6770_6f72;

/// A worker's node id in the group.
pub fn node_id(name: &str) -> NodeId {
    xxh3_64_with_seed(name.as_bytes(), NODE_SEED)
}

/// Why a lock operation could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordError {
    /// No leader could commit it in time: the group is electing one, or this worker is cut off from most voters.
    #[error("the pool's consensus group has no leader reachable from this worker; retry")]
    NoLeader,
}

/// One worker's member of the consensus group.
pub struct Consensus {
    raft: Raft,
    id: NodeId,
    name: String,
    machine: Machine,
    cluster: Weak<Cluster>,
    config: LocksConfig,
    /// How long one operation may wait for a leader.
    timeout: Duration,
    leases: Arc<Leases>,
}

impl std::fmt::Debug for Consensus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Consensus({} = {:x})", self.name, self.id)
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Consensus {
    /// Opens `dir/consensus.db` and starts this worker's member. Attach it to the cluster (`Cluster::coord`) so that
    /// peers' consensus messages reach it, and spawn [`Consensus::run`].
    pub async fn start(
        cluster: &Arc<Cluster>,
        dir: &Path,
        config: LocksConfig,
        timeout: Duration,
    ) -> anyhow::Result<Arc<Consensus>> {
        let dir = dir.to_path_buf();
        let db = tokio::task::spawn_blocking(move || log::Db::open(&dir)).await??;
        let machine = Machine::open(db.clone()).await?;
        let heartbeat = config.heartbeat.as_millis() as u64;
        let election = config.election_timeout.as_millis() as u64;
        let raft_config = openraft::Config {
            cluster_name: "thingport".into(),
            heartbeat_interval: heartbeat,
            election_timeout_min: election,
            election_timeout_max: election * 2,
            install_snapshot_timeout: 10_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(10_000),
            max_in_snapshot_log_to_keep: 1_000,
            // a chunk of a snapshot travels in one peer message
            snapshot_max_chunk_size: (cluster.config.max_message / 2) as u64,
            ..Default::default()
        }
        .validate()?;
        let name = membership::name_of(&cluster.me).to_string();
        let id = node_id(&name);
        let leases = Arc::new(Leases::new(config.primary_lease));
        let network = Network { cluster: Arc::downgrade(cluster), leases: leases.clone() };
        let raft =
            Raft::new(id, Arc::new(raft_config), network, log::Log::new(db), machine.clone())
                .await?;
        Ok(Arc::new(Consensus {
            raft,
            id,
            name,
            machine,
            cluster: Arc::downgrade(cluster),
            config,
            timeout,
            leases,
        }))
    }

    /// Answers a peer's consensus message.
    pub async fn serve(&self, rpc: ConsensusRpc, body: &[u8]) -> Response {
        fn answer<T: Serialize>(result: &T) -> Response {
            Response::Consensus(postcard::to_stdvec(result).map(Bytes::from).unwrap_or_default())
        }
        match rpc {
            ConsensusRpc::AppendEntries => match postcard::from_bytes(body) {
                Ok(request) => answer(&self.raft.append_entries(request).await),
                Err(_) => Response::Consensus(Bytes::new()),
            },
            ConsensusRpc::Vote => match postcard::from_bytes(body) {
                Ok(request) => answer(&self.raft.vote(request).await),
                Err(_) => Response::Consensus(Bytes::new()),
            },
            ConsensusRpc::InstallSnapshot => match postcard::from_bytes(body) {
                Ok(request) => answer(&self.raft.install_snapshot(request).await),
                Err(_) => Response::Consensus(Bytes::new()),
            },
            ConsensusRpc::Member => {
                Response::Consensus(Bytes::from(vec![u8::from(self.in_group())]))
            }
        }
    }

    /// The end of this worker's lease as the group's leader (`None` if it does not lead, or no quorum accepted it
    /// in this term).
    fn leader_lease(&self) -> Option<Instant> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        if metrics.current_leader != Some(self.id) || self.leases.stopping() {
            return None;
        }
        let configs = metrics.membership_config.membership().get_joint_config();
        let now = Instant::now();
        self.leases.leading(metrics.current_term, now);
        self.leases.leader_until(self.id, metrics.current_term, configs, now)
    }

    /// This worker is stopping: from now on it holds no primary lease and grants none.
    pub fn give_up_lease(&self) {
        self.leases.give_up();
    }

    /// As the leader: how long `worker`'s primary lease may still run (`None` if this worker does not lead, or
    /// no longer holds its own lease: it may have been deposed without knowing).
    pub fn lease_left(&self, worker: &str) -> Option<Duration> {
        let now = Instant::now();
        self.leader_lease().filter(|until| *until > now)?;
        let term = self.raft.metrics().borrow().current_term;
        Some(self.leases.left_of(worker, self.leases.leading(term, now), now))
    }

    /// As the leader: grants no lease to these workers (by id) from now on, until [`Consensus::withhold_only`]
    /// leaves them out.
    pub fn withhold(&self, workers: &BTreeSet<String>) {
        self.leases.withhold(workers);
    }

    /// As the leader: grants leases again to the withheld workers not among `workers`.
    pub fn withhold_only(&self, workers: &BTreeSet<String>) {
        self.leases.withhold_only(workers);
    }

    /// How long a primary lease lasts.
    pub fn lease_length(&self) -> Duration {
        self.leases.length
    }

    /// The newest table version a leader's grant named: a committed table older than that is one this worker
    /// has not caught up from (`Leases::table_version`).
    pub fn lease_table_version(&self) -> u64 {
        self.leases.table_version()
    }

    /// Whether this worker may acknowledge writes as a primary now: it holds a lease as the group's leader, or one
    /// the leader granted it (`lease`).
    pub fn holds_lease(&self) -> bool {
        let now = Instant::now();
        if self.leases.holds(now) {
            return true;
        }
        // the lease known so far ran out (or there is none yet): as the leader, count the voters' acceptances again
        match self.leader_lease() {
            Some(until) => {
                self.leases.extend(until);
                until > now
            }
            None => false,
        }
    }

    /// Answers a worker's request for a lease: what is left of this worker's lease as the leader, and the newest
    /// table version its log committed; else, unless the request was passed on already, the leader's answer.
    ///
    /// The leader grants none to a worker it withholds leases from ([`Consensus::withhold`]): one whose partitions
    /// it, as the table coordinator, is about to move, even if that worker still reaches it.
    pub async fn grant(&self, worker: &str, forwarded: bool) -> Option<(u64, u64)> {
        if let Some(until) = self.leader_lease() {
            let now = Instant::now();
            let left = until.saturating_duration_since(now).min(self.leases.length);
            if left.is_zero() || !self.leases.grant(worker, now + left) {
                return None;
            }
            return Some((left.as_millis() as u64, self.table_version()));
        }
        let leader = self.leader().filter(|l| *l != self.name && !forwarded)?;
        let cluster = self.cluster.upgrade()?;
        let request = Request::Lease { worker: worker.to_string(), forwarded: true };
        match cluster.call_worker(&leader, request, self.leases.length / 4).await {
            Some(Response::Lease { remaining_ms, table_version }) => {
                Some((remaining_ms, table_version))
            }
            _ => None,
        }
    }

    /// Keeps this worker's lease: asks the leader (or, not knowing it, another worker of the table, which passes
    /// the ask on) every third of its length, at once when the leader changes, and again soon after an ask that
    /// failed (through the next worker of the table), until `stop`. Logs each change of leader.
    pub async fn keep_lease(self: Arc<Self>, stop: CancellationToken) {
        let every = (self.leases.length / 3).max(Duration::from_millis(10));
        let retry = (self.leases.length / 20).max(Duration::from_millis(10));
        let mut metrics = self.raft.metrics();
        let mut failures = 0usize;
        let mut logged = None;
        loop {
            let wait = if let Some(until) = self.leader_lease() {
                self.leases.extend(until);
                failures = 0;
                every
            } else {
                match self.ask_lease(failures, &stop).await {
                    None => break,
                    Some(true) => {
                        failures = 0;
                        every
                    }
                    Some(false) => {
                        failures += 1;
                        retry
                    }
                }
            };
            let (leader, term) = {
                let m = metrics.borrow_and_update();
                (m.current_leader, m.current_term)
            };
            if leader != logged {
                logged = leader;
                match self.leader() {
                    Some(name) => {
                        tracing::info!(leader = %name, term, "the consensus group's leader")
                    }
                    None => {
                        tracing::info!(term, "the consensus group has no leader this worker knows")
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
                _ = metrics.wait_for(|m| m.current_leader != leader) => {}
            }
        }
    }

    /// One ask for a lease: to the leader this worker knows, or after `failures` failed asks (or knowing no
    /// leader) to another worker of the table in turn. `Some(granted)`, or `None` once `stop` is cancelled.
    async fn ask_lease(&self, failures: usize, stop: &CancellationToken) -> Option<bool> {
        let cluster = self.cluster.upgrade()?;
        let leader = self.leader().filter(|l| *l != self.name && failures.is_multiple_of(2));
        let ask = leader.or_else(|| {
            let table = cluster.table()?;
            let others: Vec<String> = table
                .members
                .iter()
                .map(|m| membership::name_of(m).to_string())
                .filter(|n| *n != self.name)
                .collect();
            others.get(failures % others.len().max(1)).cloned()
        });
        let Some(ask) = ask else { return Some(false) };
        let sent = Instant::now();
        let request = Request::Lease { worker: self.name.clone(), forwarded: false };
        let answer = tokio::select! {
            _ = stop.cancelled() => return None,
            answer = cluster.call_worker(&ask, request, self.leases.length / 4) => answer,
        };
        match answer {
            Some(Response::Lease { remaining_ms, table_version }) => {
                self.leases.granted(sent, Duration::from_millis(remaining_ms));
                self.leases.table_at_least(table_version);
                Some(true)
            }
            _ => Some(false),
        }
    }

    /// Whether this worker belongs to a group (it was founded with it, or a leader added it).
    fn in_group(&self) -> bool {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        metrics.membership_config.nodes().next().is_some()
    }

    /// The group's leader as this worker knows it, by worker id.
    pub fn leader(&self) -> Option<String> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let leader = metrics.current_leader?;
        metrics
            .membership_config
            .nodes()
            .find(|(id, _)| **id == leader)
            .map(|(_, n)| n.addr.clone())
    }

    /// The group's voters and learners by worker id, and its last applied index, for the cluster view.
    pub fn view(&self) -> (Vec<String>, Vec<String>, u64) {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let name =
            |id: NodeId| membership.get_node(&id).map(|n| n.addr.clone()).unwrap_or_default();
        let voters = membership.voter_ids().map(name).collect();
        let learners = membership.learner_ids().map(name).collect();
        (voters, learners, metrics.last_applied.map_or(0, |l| l.index))
    }

    /// Carries out a lock operation through the group's leader (this worker or another), waiting up to the
    /// request timeout for one.
    pub async fn submit(&self, command: LockCommand) -> Result<LockOutcome, CoordError> {
        let forward = Request::Lock { command: command.clone() };
        self.through_leader(|deadline| self.lead(command.clone(), deadline), forward).await
    }

    /// Runs `here` on this worker, or sends `forward` to the leader it names, until one answers or the request
    /// timeout passes.
    async fn through_leader<F, Fut>(
        &self,
        here: F,
        forward: Request,
    ) -> Result<LockOutcome, CoordError>
    where
        F: Fn(Instant) -> Fut,
        Fut: Future<Output = Result<LockOutcome, Option<String>>>,
    {
        let deadline = Instant::now() + self.timeout;
        loop {
            match here(deadline).await {
                Ok(outcome) => return Ok(outcome),
                Err(Some(leader)) if leader != self.name => {
                    if let Some(cluster) = self.cluster.upgrade() {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if let Some(Response::Lock(outcome)) =
                            cluster.call_worker(&leader, forward.clone(), left).await
                        {
                            return Ok(outcome);
                        }
                    }
                }
                Err(_) => {}
            }
            if !pause(deadline).await {
                return Err(CoordError::NoLeader);
            }
        }
    }

    /// Commits a lock operation as the leader; `Err` with the leader it knows of if this worker is not it (or it
    /// could not commit in time).
    pub async fn lead(
        &self,
        command: LockCommand,
        deadline: Instant,
    ) -> Result<LockOutcome, Option<String>> {
        if let LockCommand::Acquire { name, holder, .. } = &command {
            let state = self.machine.state.read().unwrap_or_else(|e| e.into_inner());
            let leads = self.raft.metrics().borrow().current_leader == Some(self.id);
            let now = now_ms();
            match state.locks.read(name, now) {
                // another holder's lease: refused without an entry (a refusal grants nothing, so an answer from
                // a state that lags, or from a deposed leader, is safe), and waiters add nothing to the log
                LockOutcome::Held(lease) if lease.holder != *holder && leads => {
                    return Ok(LockOutcome::Busy {
                        holder: lease.holder,
                        token: lease.token,
                        expires_in_ms: lease.expires_in_ms,
                    });
                }
                // leases that ran out count in `len` until a sweep: count the live ones before refusing; the pool's
                // own locks (the singleton) are never refused for room
                LockOutcome::Free
                    if leads
                        && !name.starts_with(singleton::RESERVED)
                        && state.locks.len() >= self.config.max_locks
                        && state.locks.live(now) >= self.config.max_locks =>
                {
                    return Ok(LockOutcome::Full);
                }
                _ => {}
            }
        }
        let logged = Logged { now_ms: now_ms(), command: command.into() };
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.raft.client_write(logged)).await {
            Ok(Ok(written)) => match written.data {
                Applied::Lock(outcome) => Ok(outcome),
                _ => Err(None),
            },
            Ok(Err(e)) => Err(e
                .forward_to_leader()
                .and_then(|f| f.leader_node.as_ref())
                .map(|n| n.addr.clone())),
            Err(_) => Err(None),
        }
    }

    /// A lock as the leader holds it, read after the leader confirmed with a quorum that it still leads.
    pub async fn read(&self, name: &str) -> Result<LockOutcome, CoordError> {
        let forward = Request::ReadLock { name: name.to_string() };
        self.through_leader(|deadline| self.read_here(name, deadline), forward).await
    }

    /// [`Consensus::read`] as the leader; `Err` with the leader it knows of if this worker is not it.
    pub async fn read_here(
        &self,
        name: &str,
        deadline: Instant,
    ) -> Result<LockOutcome, Option<String>> {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.raft.ensure_linearizable()).await {
            Ok(Ok(_)) => {
                let state = self.machine.state.read().unwrap_or_else(|e| e.into_inner());
                Ok(state.locks.read(name, now_ms()))
            }
            Ok(Err(e)) => Err(e
                .forward_to_leader()
                .and_then(|f| f.leader_node.as_ref())
                .map(|n| n.addr.clone())),
            Err(_) => Err(None),
        }
    }

    /// A lock as this worker's applied state holds it, without asking the leader: it may lag the leader's.
    pub fn peek(&self, name: &str) -> LockOutcome {
        let state = self.machine.state.read().unwrap_or_else(|e| e.into_inner());
        state.locks.read(name, now_ms())
    }

    /// The index of the last entry this worker applied, as it changes (a lock released or taken).
    pub fn applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.machine.applied()
    }

    /// Whether this worker is the group's leader as far as it knows (a deposed leader may not know yet: what it
    /// proposes then does not commit).
    pub fn leads(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// Commits `table` through the log as the leader: `Ok(true)` once it committed, `Ok(false)` if a table of its
    /// version or a newer one had committed before it, `Err` if this worker does not lead (or stopped leading
    /// before the entry committed: a later leader may still commit it).
    ///
    /// It waits as long as the entry's fate is open, with no time limit: a coordinator that gave up on a table
    /// that may still commit, and prepared another of the same version in its place, would let the first one
    /// commit without its copies.
    pub async fn commit_table(&self, table: TableRecord) -> Result<bool, CoordError> {
        let logged = Logged { now_ms: now_ms(), command: Command::Table(table) };
        match self.raft.client_write(logged).await {
            Ok(written) => Ok(matches!(written.data, Applied::Table { committed: true })),
            Err(_) => Err(CoordError::NoLeader),
        }
    }

    /// As the leader, within `timeout`: the table the log committed, once this worker applied every entry that any
    /// earlier leader's log committed (`None` before the first table change). `Err` if this worker does not lead.
    pub async fn committed_table(
        &self,
        timeout: Duration,
    ) -> Result<Option<TableRecord>, CoordError> {
        match tokio::time::timeout(timeout, self.raft.ensure_linearizable()).await {
            Ok(Ok(_)) => Ok(self.machine.committed_table()),
            _ => Err(CoordError::NoLeader),
        }
    }

    /// The table the log last committed, as this worker applied it.
    pub fn logged_table(&self) -> Option<TableRecord> {
        self.machine.committed_table()
    }

    /// The version of the table last committed through the log on this worker (0 before the first).
    pub fn table_version(&self) -> u64 {
        self.machine.table_version()
    }

    /// Hands the ring every table the log commits, founds the group when it falls to this worker, and, while this
    /// worker leads, keeps the group's members in step with the committed table. Stops the member when `stop` is
    /// cancelled.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let Some(cluster) = self.cluster.upgrade() else { return };
        let mut version = cluster.table_version();
        let mut members = cluster.watch_members();
        let mut committed = self.machine.table();
        committed.mark_changed();
        drop(cluster);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = version.changed() => {}
                _ = members.changed() => {}
                changed = committed.changed() => {
                    let record = committed.borrow_and_update().clone();
                    if let (Ok(()), Some(record), Some(cluster)) = (changed, record, self.cluster.upgrade()) {
                        cluster.adopt_record(record);
                    }
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let Some(cluster) = self.cluster.upgrade() else { break };
            let Some(table) = cluster.table() else { continue };
            let names: BTreeSet<String> =
                table.members.iter().map(|m| membership::name_of(m).to_string()).collect();
            if !self.in_group() {
                if names.first() == Some(&self.name) && cluster.is_current() {
                    self.found(&cluster, &names).await;
                }
                continue;
            }
            let leads = self.raft.metrics().borrow().current_leader == Some(self.id);
            if leads {
                self.follow_table(&names).await;
            }
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "the consensus member did not stop cleanly");
        }
    }

    /// Founds the group with the table's first members as voters, if every other member of the table answers that
    /// it belongs to none (so that no second group is ever founded beside one that exists).
    async fn found(&self, cluster: &Cluster, names: &BTreeSet<String>) {
        for name in names.iter().filter(|n| **n != self.name) {
            let request = Request::Consensus { rpc: ConsensusRpc::Member, body: Bytes::new() };
            match cluster.call_worker(name, request, self.timeout).await {
                Some(Response::Consensus(answer)) if answer[..] == [0] => {}
                _ => return,
            }
        }
        let voters: BTreeMap<NodeId, BasicNode> = names
            .iter()
            .take(VOTERS)
            .map(|n| (node_id(n), BasicNode { addr: n.clone() }))
            .collect();
        match self.raft.initialize(voters).await {
            Ok(()) => {
                tracing::info!(voters = ?names.iter().take(VOTERS).collect::<Vec<_>>(), "founded the consensus group")
            }
            Err(e) => tracing::debug!(error = %e, "the consensus group was not founded"),
        }
    }

    /// As the leader: learners for the table's members the group lacks, voters up to [`VOTERS`] (keeping the ones
    /// it has), and out with members the table dropped.
    async fn follow_table(&self, names: &BTreeSet<String>) {
        let membership = self.raft.metrics().borrow().membership_config.clone();
        if membership.membership().get_joint_config().len() > 1 {
            return; // a change is under way
        }
        let wanted: BTreeMap<NodeId, &String> = names.iter().map(|n| (node_id(n), n)).collect();
        let known: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
        let voters_now: BTreeSet<NodeId> = membership.voter_ids().collect();
        let mut voters: BTreeSet<NodeId> =
            voters_now.iter().filter(|id| wanted.contains_key(id)).copied().collect();
        for name in names {
            if voters.len() >= VOTERS {
                break;
            }
            voters.insert(node_id(name));
        }
        for (id, name) in &wanted {
            if !known.contains(id) {
                let node = BasicNode { addr: (*name).clone() };
                if let Err(e) = self.raft.add_learner(*id, node, false).await {
                    tracing::debug!(error = %e, worker = %name, "could not add a learner");
                    return;
                }
                tracing::info!(worker = %name, "added a learner to the consensus group");
            }
        }
        if voters != voters_now && !voters.is_empty() {
            match self.raft.change_membership(voters.clone(), false).await {
                Ok(_) => {
                    tracing::info!(voters = voters.len(), "changed the consensus group's voters")
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not change the voters");
                    return;
                }
            }
        }
        let gone: BTreeSet<NodeId> = known
            .iter()
            .filter(|id| !wanted.contains_key(id) && !voters.contains(id))
            .copied()
            .collect();
        if !gone.is_empty()
            && let Err(e) =
                self.raft.change_membership(ChangeMembers::RemoveNodes(gone), false).await
        {
            tracing::debug!(error = %e, "could not remove learners the table dropped");
        }
    }
}

/// Waits a short while before trying again; `false` once `deadline` has passed.
async fn pause(deadline: Instant) -> bool {
    let now = Instant::now();
    if now >= deadline {
        return false;
    }
    tokio::time::sleep(Duration::from_millis(50).min(deadline - now)).await;
    true
}

/// Raft's messages over the ring's peer connections.
#[derive(Clone)]
struct Network {
    cluster: Weak<Cluster>,
    leases: Arc<Leases>,
}

struct Connection {
    cluster: Weak<Cluster>,
    leases: Arc<Leases>,
    target: NodeId,
    name: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Connection {
        Connection {
            cluster: self.cluster.clone(),
            leases: self.leases.clone(),
            target,
            name: node.addr.clone(),
        }
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl Connection {
    async fn rpc<Q, A, E>(
        &self,
        rpc: ConsensusRpc,
        request: &Q,
        option: &RPCOption,
    ) -> RpcResult<A, E>
    where
        Q: Serialize,
        A: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let network = |what: &str| {
            RPCError::Network(NetworkError::new(&std::io::Error::other(what.to_string())))
        };
        let body = postcard::to_stdvec(request).map_err(|e| network(&e.to_string()))?;
        let Some(cluster) = self.cluster.upgrade() else {
            return Err(network("the worker is stopping"));
        };
        let request = Request::Consensus { rpc, body: Bytes::from(body) };
        match cluster.call_worker(&self.name, request, option.hard_ttl()).await {
            Some(Response::Consensus(raw)) => {
                let answer: Result<A, RaftError<NodeId, E>> =
                    postcard::from_bytes(&raw).map_err(|e| network(&e.to_string()))?;
                answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Some(_) => Err(network("an answer that is not a consensus answer")),
            None => Err(RPCError::Unreachable(Unreachable::new(&std::io::Error::other(format!(
                "{} is not reachable",
                self.name
            ))))),
        }
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        // a leader's lease counts from the sending of a request a quorum accepted
        let sent = Instant::now();
        let term = request.vote.is_committed().then(|| request.vote.leader_id().term);
        let answer = self.rpc(ConsensusRpc::AppendEntries, &request, &option).await;
        if let (Some(term), Ok(accepted)) = (term, &answer)
            && !matches!(accepted, AppendEntriesResponse::HigherVote(_))
        {
            self.leases.accepted(self.target, term, sent);
        }
        answer
    }

    async fn install_snapshot(
        &mut self,
        request: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.rpc(ConsensusRpc::InstallSnapshot, &request, &option).await
    }

    async fn vote(
        &mut self,
        request: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        self.rpc(ConsensusRpc::Vote, &request, &option).await
    }
}
