//! The event center's store on PostgreSQL (`[store] postgres_url`), for several center replicas
//! on one database: the log, the folding of conditions into faults, a node's life and who watches
//! it, the state beside the log and its reads, durable consumers, retention, a live feed, leases
//! (each replica's own and the leader's) and the permits' lock.
//!
//! Cursors stay contiguous and in commit order across replicas: every append transaction first
//! locks the `log_head` row, gives its new events the cursors after the head, and commits with the
//! row moved, so the appends of all replicas commit one after another and a reader that sees
//! cursor N sees every cursor below it. Each replica groups what its callers queue into one
//! transaction (group commit), so the lock is taken once per group, not per event. Idempotence is
//! the identity (origin, sequence), looked up after interning its origin locked the origin's row
//! (so another replica storing the same identity has committed by then); events the center makes
//! get an identity of their replica before the first attempt, so retrying a group whose commit was
//! cut off stores nothing twice. A commit notifies `nodekeeper_log` with the new head; listeners
//! only wake readers, which read the table. `writer.rs` is the group commit (with
//! `writer/nodes.rs` and `writer/state.rs`, the operations that record events), `read.rs` the log's
//! reads, durable consumers and retention, `fleet.rs` the fleet's state read back, `lease.rs` leases
//! for work that runs once.
//!
//! The connection is a libpq-style URL (`postgres://u@h1:5432,h2:5432/db?target_session_attrs=read-write`):
//! after a failover the writer reconnects, finds the promoted primary, and retries its group.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::{AsyncMessage, Client};

use super::writer::{ComponentsChange, NodeChange, NodeChanged};
use super::{Appended, HelloOutcome, Identity, NewEvent, NodeHello, NodeKey, Result, StoreError};
use connect::Database;
pub use connect::PgTls;
use writer::{Center, Done, Op};

mod connect;
mod fleet;
pub mod import;
pub mod lease;
mod read;
mod tail;
mod writer;

const MIGRATIONS: &[&str] = &[
    include_str!("postgres/0001_log.sql"),
    include_str!("postgres/0002_leases.sql"),
    include_str!("postgres/0003_faults.sql"),
    include_str!("postgres/0004_nodes.sql"),
    include_str!("postgres/0005_state.sql"),
    include_str!("postgres/0006_owners.sql"),
    include_str!("postgres/0007_votes.sql"),
];

/// Commits notify this channel with the new head.
const CHANNEL: &str = "nodekeeper_log";

/// Serializes migrations of replicas that start together.
const MIGRATION_LOCK: i64 = 0x6e6f_6465_6b65_6570;

/// Serializes permit decisions across replicas.
const PERMITS_LOCK: i64 = 0x6e6b_7065_726d_6974;

/// How long a group is retried across a lost connection (a failover) before its callers are told.
const RETRY_FOR: Duration = Duration::from_secs(60);

pub(crate) fn pg(e: tokio_postgres::Error) -> StoreError {
    // The server's own words (and SQLSTATE) where it answered; "db error" alone says nothing.
    // Otherwise the whole chain: "error performing TLS handshake" needs its cause to be acted on.
    let message = match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => nodekeeper_common::errors::chain(&e),
    };
    StoreError::Postgres { message }
}

pub struct PgOptions {
    /// Events per group commit at most.
    pub commit_max_rows: usize,
    pub tls: PgTls,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self { commit_max_rows: 8192, tls: PgTls::default() }
    }
}

/// One replica's handle on the shared store.
pub struct PgStore {
    queue: mpsc::Sender<Job>,
    head: watch::Receiver<u64>,
    /// Connections for reads; a broken one is replaced when next taken.
    readers: deadpool_postgres::Pool,
    /// This replica's identity for the events the center makes.
    center: Center,
    /// Every committed event, in cursor order (see `tail.rs`).
    live: tokio::sync::broadcast::Sender<super::LiveBatch>,
    /// The retention floor as this replica last knew it (read at open, moved by its retention).
    floor: Arc<AtomicU64>,
    metrics: super::StoreMetrics,
    /// Always "not low": the database's disk is its operators' to watch.
    disk: watch::Sender<super::DiskState>,
    /// This replica's own lease (`replica/<id>`: it is alive) and its contention for `leader`;
    /// given up when the store closes.
    leases: std::sync::Mutex<Vec<lease::Lease>>,
    leading: watch::Receiver<Option<u64>>,
    alive: watch::Receiver<Option<u64>>,
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Done>>,
}

impl PgStore {
    /// Connects, refuses a server that would acknowledge what it has not made durable, applies
    /// the migrations not yet applied, and starts this replica's writer and listener.
    pub async fn open(url: &str, options: PgOptions) -> Result<PgStore> {
        let db = Database::new(url, &options.tls)?;
        let mut client = db.connect().await?;
        let sync: String = client.query_one("SHOW synchronous_commit", &[]).await.map_err(pg)?.get(0);
        if matches!(sync.as_str(), "off" | "local") {
            return Err(StoreError::NotDurable { found: sync });
        }
        migrate(&mut client).await?;
        let head = read_head(&client).await?;
        let (head_tx, head_rx) = watch::channel(head);
        let head_tx = Arc::new(head_tx);
        tokio::spawn(listen(db.clone(), head_tx.clone()));
        let (queue, jobs) = mpsc::channel(1024);
        let center =
            Center { origin: format!("c/{:016x}", rand::random::<u64>()).into(), seq: Arc::new(AtomicU64::new(1)) };
        let metrics = super::StoreMetrics::default();
        let readers = db.pool(16)?;
        tokio::spawn(writer::write(db, client, jobs, head_tx, options, center.clone(), metrics.clone()));
        let (live, _) = tokio::sync::broadcast::channel(1024);
        tokio::spawn(tail::follow(readers.clone(), head_rx.clone(), live.clone(), head));
        let floor: i64 = client_floor(&readers).await?;
        let replica = center.replica();
        let alive =
            lease::Lease::contend(readers.clone(), &format!("replica/{replica}"), &replica, Default::default())?;
        // Alive before it owns a node: otherwise another replica would take its nodes over.
        let mut held = alive.leading();
        let alive_rx = held.clone();
        tokio::time::timeout(Duration::from_secs(30), held.wait_for(Option::is_some))
            .await
            .map_err(|_| StoreError::Postgres { message: "cannot take this replica's lease".into() })?
            .map_err(|_| StoreError::Closed)?;
        let leader = lease::Lease::contend(readers.clone(), "leader", &replica, Default::default())?;
        let leading = leader.leading();
        tracing::info!(replica = %replica, "replica of the event center on PostgreSQL");
        Ok(PgStore {
            queue,
            head: head_rx,
            readers,
            center,
            live,
            floor: Arc::new(AtomicU64::new(floor as u64)),
            metrics,
            disk: watch::channel(super::DiskState::default()).0,
            leases: std::sync::Mutex::new(vec![leader, alive]),
            leading,
            alive: alive_rx,
        })
    }

    /// Appends events; answered once their group committed. Duplicates (by identity) are not
    /// stored again and answered with the cursor they have.
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>> {
        self.append_queued(events).await?.await
    }

    /// Like [`PgStore::append`], but returns once the events are queued, in call order, so that a
    /// stream can keep reading while earlier batches commit; the future answers after the commit.
    pub async fn append_queued(
        &self,
        events: Vec<NewEvent>,
    ) -> Result<impl std::future::Future<Output = Result<Vec<Appended>>> + use<>> {
        let (reply, answer) = oneshot::channel();
        let job = Job { op: Op::Append(self.identified(events)), reply };
        self.queue.send(job).await.map_err(|_| StoreError::Closed)?;
        Ok(async move {
            match answer.await.map_err(|_| StoreError::Closed)?? {
                Done::Appended(a) => Ok(a),
                _ => Err(answered_otherwise()),
            }
        })
    }

    /// An agent's hello: the node registered (or its changes recorded); where its boot's events
    /// stand.
    pub async fn hello(&self, hello: NodeHello) -> Result<HelloOutcome> {
        match self.run(Op::Hello(Box::new(hello))).await? {
            Done::Hello(h) => Ok(h),
            _ => Err(answered_otherwise()),
        }
    }

    /// A liveness transition (recorded once, whichever replica decides it; a loss only by the
    /// node's owner). Whether this replica watches the node.
    pub async fn set_liveness(&self, key: NodeKey, lost: bool, grace: Duration) -> Result<bool> {
        match self.run(Op::Liveness { key, lost, grace }).await? {
            Done::Liveness(mine) => Ok(mine),
            _ => Err(answered_otherwise()),
        }
    }

    /// One of the node's agent streams on this replica ended.
    pub async fn disconnected(&self, key: NodeKey) -> Result<()> {
        self.run(Op::Disconnected(key)).await.map(drop)
    }

    /// Takes over the nodes nobody watches: those of replicas whose lease ran out (dead, or cut
    /// off from the database) and those never watched. They are this replica's to watch now,
    /// with no stream open on it.
    ///
    /// Every replica asks every 2 s, so the question is asked of the few leases, not of every
    /// node: the owners whose lease ran out first, then their nodes (and the unowned) by the
    /// owner index. An owner always has a lease row: it takes one before it owns a node, giving
    /// it up only expires it, and `forget_dead_replicas` keeps the rows of owners of live nodes.
    pub async fn adopt_nodes(&self) -> Result<Vec<nodekeeper_proto::v1::Node>> {
        let client = self.reader().await?;
        let me = self.center.replica();
        let dead: Vec<String> = client
            .query(
                "SELECT substr(name, length('replica/') + 1) FROM leases
                 WHERE name LIKE 'replica/%' AND expires_at <= now() AND name <> 'replica/' || $1",
                &[&me],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let rows = client
            .query(
                "UPDATE nodes SET owner = $1, connections = 0
                 WHERE decommissioned_ms IS NULL AND (owner IS NULL OR owner = ANY($2))
                 RETURNING info, lost, liveness_changed_ms",
                &[&me, &dead],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| {
                let mut node: nodekeeper_proto::v1::Node = read::decode("nodes", r.get(0))?;
                super::read::stored_node(&mut node, r.get(1), r.get(2));
                Ok(node)
            })
            .collect()
    }

    /// Makes this replica the owner again of the nodes whose streams it has (taken over while
    /// its lease had run out), with their stream counts: the nodes it took back.
    pub async fn reclaim_nodes(&self, connected: Vec<(NodeKey, u32)>) -> Result<u64> {
        let (clusters, names, counts): (Vec<String>, Vec<String>, Vec<i32>) = connected
            .into_iter()
            .map(|(k, n)| (k.cluster, k.node, n as i32))
            .fold((Vec::new(), Vec::new(), Vec::new()), |(mut c, mut n, mut k), (cluster, node, count)| {
                c.push(cluster);
                n.push(node);
                k.push(count);
                (c, n, k)
            });
        self.reader()
            .await?
            .execute(
                "UPDATE nodes SET owner = $1, connections = mine.count
                 FROM unnest($2::text[], $3::text[], $4::int[]) AS mine (cluster, name, count)
                 WHERE nodes.cluster = mine.cluster AND nodes.name = mine.name
                   AND (nodes.owner IS DISTINCT FROM $1 OR nodes.connections <> mine.count)",
                &[&self.center.replica(), &clusters, &names, &counts],
            )
            .await
            .map_err(pg)
    }

    /// Removes the leases of replicas that stopped (they gave their lease up) or died longer than
    /// `gone_for` ago (their lease ran out then): each start of a replica is a new identity, so
    /// they would pile up. The lease of a replica that still owns a node is kept until the node
    /// is taken over (`adopt_nodes` finds owners by their expired lease). How many were removed.
    pub async fn forget_dead_replicas(&self, gone_for: Duration) -> Result<u64> {
        self.reader()
            .await?
            .execute(
                "DELETE FROM leases l WHERE name LIKE 'replica/%' AND expires_at < now() - make_interval(secs => $1)
                 AND NOT EXISTS (SELECT 1 FROM nodes n
                                 WHERE n.decommissioned_ms IS NULL AND n.owner = substr(l.name, length('replica/') + 1))",
                &[&gone_for.as_secs_f64()],
            )
            .await
            .map_err(pg)
    }

    /// `Some(_)` while this replica holds its own lease (others take its nodes over when not).
    pub fn alive(&self) -> watch::Receiver<Option<u64>> {
        self.alive.clone()
    }

    /// `Some(epoch)` while this replica leads the work that runs once.
    pub fn leading(&self) -> watch::Receiver<Option<u64>> {
        self.leading.clone()
    }

    /// What Kubernetes says of a node; `None` if the center does not know it.
    pub async fn sync_kubernetes(
        &self,
        key: NodeKey,
        labels: std::collections::HashMap<String, String>,
        onboarding: bool,
        onboarded: bool,
        issuer: String,
    ) -> Result<Option<NodeChanged>> {
        self.node_change(NodeChange::Kubernetes { key, labels, onboarding, onboarded, issuer }).await
    }

    /// Decommissions a node (its open faults closed); `None` if the center does not know it.
    pub async fn decommission(&self, key: NodeKey, reason: String, issuer: String) -> Result<Option<NodeChanged>> {
        self.node_change(NodeChange::Decommission { key, reason, issuer }).await
    }

    async fn node_change(&self, change: NodeChange) -> Result<Option<NodeChanged>> {
        match self.run(Op::Node(change)).await? {
            Done::Node(n) => Ok(n),
            _ => Err(answered_otherwise()),
        }
    }

    /// Sets the desired components of a target of a cluster; the new generation.
    pub async fn set_desired(&self, cluster: String, target: String, specs: Vec<u8>) -> Result<u64> {
        self.state(ComponentsChange::Desired { cluster, target, specs }).await
    }

    /// Records the component status a node reported.
    pub async fn set_component_status(&self, key: NodeKey, body: Vec<u8>) -> Result<u64> {
        self.state(ComponentsChange::Status { key, body }).await
    }

    /// Stores permits (active or not) with the events of the decisions, in one transaction.
    pub async fn put_permits(
        &self,
        permits: Vec<(nodekeeper_proto::v1::Permit, bool)>,
        events: Vec<NewEvent>,
    ) -> Result<u64> {
        let events = self.identified(events);
        self.state(ComponentsChange::Permits { permits, events }).await
    }

    /// Stores a cluster's guard ("" for the global freeze) with the events that record it.
    pub async fn put_guard(&self, cluster: String, body: Vec<u8>, events: Vec<NewEvent>) -> Result<u64> {
        let events = self.identified(events);
        self.state(ComponentsChange::Guard { cluster, body, events }).await
    }

    /// Stores a rollout's state with its timeline's events and the desired components it sets,
    /// in one transaction; the generation of those (0: none).
    pub async fn put_rollout(
        &self,
        name: String,
        cluster: String,
        body: Vec<u8>,
        events: Vec<NewEvent>,
        desired: Vec<(String, Vec<u8>)>,
    ) -> Result<u64> {
        let events = self.identified(events);
        self.state(ComponentsChange::Rollout { name, cluster, body, events, desired }).await
    }

    /// Records a remediation step on a fault and moves the fault to `state` (0: unchanged; a
    /// resolved fault stays resolved); the event's cursor. A resent step changes nothing.
    pub async fn fault_action(&self, event: NewEvent, state: i32) -> Result<u64> {
        let event = Box::new(self.identified(vec![event]).remove(0));
        self.state(ComponentsChange::FaultAction { event, state }).await
    }

    async fn state(&self, change: ComponentsChange) -> Result<u64> {
        match self.run(Op::State(change)).await? {
            Done::State(n) => Ok(n),
            _ => Err(answered_otherwise()),
        }
    }

    /// Events the center makes get this replica's identity, before the first attempt.
    fn identified(&self, mut events: Vec<NewEvent>) -> Vec<NewEvent> {
        for e in &mut events {
            if e.identity == Identity::Center {
                let sequence = self.center.seq.fetch_add(1, Ordering::Relaxed);
                e.identity = Identity::Keyed { origin: self.center.origin.clone(), sequence };
            }
        }
        events
    }

    /// Queues `op` for this replica's writer; its answer after the commit.
    async fn run(&self, op: Op) -> Result<Done> {
        let (reply, answer) = oneshot::channel();
        self.queue.send(Job { op, reply }).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Every event committed from now on, by any replica, in cursor order, in batches.
    pub fn subscribe_live(&self) -> tokio::sync::broadcast::Receiver<super::LiveBatch> {
        self.live.subscribe()
    }

    /// Counters of the store (not fed by this engine yet).
    pub fn metrics(&self) -> &super::StoreMetrics {
        &self.metrics
    }

    pub fn disk(&self) -> super::DiskState {
        *self.disk.borrow()
    }

    pub fn watch_disk(&self) -> watch::Receiver<super::DiskState> {
        self.disk.subscribe()
    }

    /// The retention floor as this replica knows it.
    pub fn floor_now(&self) -> u64 {
        self.floor.load(Ordering::Acquire)
    }

    /// Gives up the leadership and the replica's lease, so that the others take over at once
    /// (every call was answered after its commit: nothing else to wait for).
    pub async fn close(&self) {
        let leases = std::mem::take(&mut *self.leases.lock().expect("leases lock"));
        for l in leases {
            l.release().await;
        }
    }

    /// The replica's pool of connections (for leases and reads beside the log).
    pub fn pool(&self) -> deadpool_postgres::Pool {
        self.readers.clone()
    }

    /// The newest cursor this replica knows committed (its own commits and every other replica's
    /// it was notified of).
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// Follows the head.
    pub fn watch_head(&self) -> watch::Receiver<u64> {
        self.head.clone()
    }

    /// The detector votes with a cursor in `after..=upto`, in cursor order, at most `limit`.
    pub async fn votes(&self, after: u64, upto: u64, limit: usize) -> Result<Vec<nodekeeper_proto::v1::Event>> {
        let rows = self
            .reader()
            .await?
            .query(
                "SELECT cursor, body FROM events WHERE vote AND cursor > $1 AND cursor <= $2 ORDER BY cursor LIMIT $3",
                &[&(after as i64), &(upto as i64), &(limit as i64)],
            )
            .await
            .map_err(pg)?;
        rows.iter().map(read::event_of).collect()
    }
}

/// A session-level advisory lock held on one of the pool's connections until dropped. The
/// unlock is sent when it is dropped; if it fails, the connection is closed instead (which
/// releases the lock on the server) rather than returned to the pool still holding it.
pub struct AdvisoryLock {
    client: Option<deadpool_postgres::Object>,
    key: i64,
}

impl Drop for AdvisoryLock {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else { return };
        let key = self.key;
        tokio::spawn(async move {
            if let Err(e) = client.execute("SELECT pg_advisory_unlock($1)", &[&key]).await {
                tracing::warn!(error = %e, "cannot release an advisory lock; closing its connection");
                drop(deadpool_postgres::Object::take(client));
            }
        });
    }
}

impl PgStore {
    /// Waits for the lock of permit decisions, which every replica takes to decide.
    pub async fn lock_permits(&self) -> Result<AdvisoryLock> {
        self.advisory_lock(PERMITS_LOCK).await
    }

    /// Waits for an advisory lock. Taken in a task of its own: a caller that gives up waiting
    /// (a cancelled request) must not leave the lock granted later to a pooled connection that
    /// nobody unlocks; the task's result, dropped, unlocks it.
    async fn advisory_lock(&self, key: i64) -> Result<AdvisoryLock> {
        let pool = self.readers.clone();
        let take = tokio::spawn(async move {
            let client = pool.get().await.map_err(|e| StoreError::Postgres { message: e.to_string() })?;
            if let Err(e) = client.execute("SELECT pg_advisory_lock($1)", &[&key]).await {
                // Not locked, and the connection may be broken: not returned to the pool.
                drop(deadpool_postgres::Object::take(client));
                return Err(pg(e));
            }
            Ok(AdvisoryLock { client: Some(client), key })
        });
        take.await.map_err(|e| StoreError::Postgres { message: format!("taking a lock: {e}") })?
    }
}

async fn client_floor(pool: &deadpool_postgres::Pool) -> Result<i64> {
    let client = pool.get().await.map_err(|e| StoreError::Postgres { message: e.to_string() })?;
    Ok(client.query_one("SELECT floor FROM log_head", &[]).await.map_err(pg)?.get(0))
}

fn answered_otherwise() -> StoreError {
    StoreError::Postgres { message: "the writer answered another operation".into() }
}

async fn read_head(client: &Client) -> Result<u64> {
    Ok(client.query_one("SELECT head FROM log_head", &[]).await.map_err(pg)?.get::<_, i64>(0) as u64)
}

/// Applies the migrations not yet applied, in one transaction under an advisory lock.
async fn migrate(client: &mut Client) -> Result<()> {
    let tx = client.transaction().await.map_err(pg)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(pg)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)").await.map_err(pg)?;
    let applied: i32 =
        tx.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[]).await.map_err(pg)?.get(0);
    if applied as usize > MIGRATIONS.len() {
        return Err(StoreError::Postgres {
            message: format!("schema version {applied} is newer than this binary knows ({})", MIGRATIONS.len()),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        tx.batch_execute(sql)
            .await
            .map_err(|e| StoreError::Postgres { message: format!("migration {}: {e}", i + 1) })?;
        tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&(i as i32 + 1)]).await.map_err(pg)?;
    }
    tx.commit().await.map_err(pg)
}

/// Keeps `head` at the newest cursor any replica committed: LISTEN, and the head read again after
/// every (re)connection, since notifications sent while away are lost.
async fn listen(db: Database, head: Arc<watch::Sender<u64>>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if head.is_closed() {
            return;
        }
        match db.config.connect(db.tls.clone()).await {
            Ok((client, mut conn)) => {
                let (notes_tx, mut notes) = mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                        match m {
                            Ok(AsyncMessage::Notification(n)) => {
                                let _ = notes_tx.send(n.payload().parse::<u64>().unwrap_or(0));
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %pg(e), "postgres listener connection ended");
                                return;
                            }
                        }
                    }
                });
                let ready = async {
                    client.batch_execute(&format!("LISTEN {CHANNEL}")).await.map_err(pg)?;
                    read_head(&client).await
                };
                if let Ok(now) = ready.await {
                    backoff = Duration::from_millis(100);
                    head.send_if_modified(|h| std::mem::replace(h, (*h).max(now)) < now);
                    while let Some(n) = notes.recv().await {
                        head.send_if_modified(|h| std::mem::replace(h, (*h).max(n)) < n);
                        if head.is_closed() {
                            break;
                        }
                    }
                }
                driver.abort();
            }
            Err(e) => tracing::warn!(error = %pg(e), "cannot connect the postgres listener"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
