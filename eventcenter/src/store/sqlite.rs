//! The embedded store: SQLite in WAL mode with `synchronous=FULL`.
//!
//! One writer thread owns the only write connection and commits in groups (see `writer.rs`): a
//! caller's write is answered only after the transaction holding it committed, so whatever the
//! center acknowledges survives a process crash and a power loss. Reads use a small pool of
//! read-only connections, which WAL lets run beside the writer; a checkpointer thread copies the
//! WAL back and checks the disk reserve.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::{Semaphore, broadcast, oneshot, watch};

use super::space::{self, DiskState};
use super::{
    Appended, HelloOutcome, LiveBatch, NewEvent, NodeChanged, NodeHello, NodeKey, Result, StoreError, StoreMetrics,
    StoreOptions, writer,
};

/// Embedded numbered migrations; `PRAGMA user_version` records how many applied.
pub(super) const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_components.sql"),
    include_str!("migrations/0003_permits.sql"),
    include_str!("migrations/0004_decommissioned.sql"),
    include_str!("migrations/0005_rollouts.sql"),
    include_str!("migrations/0006_node_events.sql"),
];

#[derive(Clone)]
pub struct Sqlite {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    ops: std::sync::mpsc::Sender<writer::Op>,
    pending: Arc<Semaphore>,
    max_pending: usize,
    readers: Mutex<Vec<Connection>>,
    live: broadcast::Sender<LiveBatch>,
    head: watch::Receiver<u64>,
    floor: Arc<AtomicU64>,
    metrics: StoreMetrics,
    space: Arc<space::Space>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Dropping the sender stops the checkpointer thread.
    checkpointer: Mutex<Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
}

impl Sqlite {
    /// Opens (creating if needed) the store at `dir/eventcenter.db`, applies migrations, checks
    /// the durability settings and starts the writer thread.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Sqlite> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::sqlite(dir, format!("creating directory: {e}")))?;
        let path = dir.join("eventcenter.db");
        let conn = open_writer(&path)?;
        let max_cursor = conn
            .query_row("SELECT COALESCE(MAX(cursor), 0) FROM events", [], |r| r.get::<_, i64>(0))
            .map_err(|e| StoreError::sqlite(&path, e))? as u64;
        let floor = conn
            .query_row("SELECT COALESCE((SELECT value FROM meta WHERE key = 'retention_floor'), 0)", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(|e| StoreError::sqlite(&path, e))? as u64;
        // Retention may have emptied the table: cursors continue after the floor, never reused.
        let head = max_cursor.max(floor);
        let (ops_tx, ops_rx) = std::sync::mpsc::channel();
        let (live, _) = broadcast::channel(1024);
        let (head_tx, head_rx) = watch::channel(head);
        let floor = Arc::new(AtomicU64::new(floor));
        let metrics = StoreMetrics::default();
        let space = Arc::new(space::Space::new(dir.to_owned(), options.min_free_bytes));
        let w = writer::Writer::new(
            conn,
            path.clone(),
            options.clone(),
            head,
            live.clone(),
            head_tx,
            floor.clone(),
            space.clone(),
        )
        .with_metrics(metrics.clone());
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || w.run(ops_rx))
            .map_err(|e| StoreError::sqlite(&path, format!("spawning writer thread: {e}")))?;
        let checkpointer = spawn_checkpointer(&path, space.clone())?;
        Ok(Sqlite {
            inner: Arc::new(Inner {
                path,
                ops: ops_tx,
                pending: Arc::new(Semaphore::new(options.max_pending_rows)),
                max_pending: options.max_pending_rows,
                readers: Mutex::new(Vec::new()),
                live,
                head: head_rx,
                floor,
                metrics,
                space,
                writer: Mutex::new(Some(handle)),
                checkpointer: Mutex::new(Some(checkpointer)),
            }),
        })
    }

    pub fn metrics(&self) -> &StoreMetrics {
        &self.inner.metrics
    }

    /// The disk reserve's state now.
    pub fn disk(&self) -> DiskState {
        self.inner.space.state()
    }

    /// Follows the disk reserve's state.
    pub fn watch_disk(&self) -> watch::Receiver<DiskState> {
        self.inner.space.watch()
    }

    /// The newest committed cursor.
    pub fn head(&self) -> u64 {
        *self.inner.head.borrow()
    }

    /// Follows the newest committed cursor.
    pub fn watch_head(&self) -> watch::Receiver<u64> {
        self.inner.head.clone()
    }

    /// The highest cursor removed by retention; resuming after an older cursor is impossible.
    pub fn floor(&self) -> u64 {
        self.inner.floor.load(Ordering::Acquire)
    }

    /// Live feed of committed events. Subscribe before reading the store to leave no gap.
    pub fn subscribe_live(&self) -> broadcast::Receiver<LiveBatch> {
        self.inner.live.subscribe()
    }

    /// Waits for room (backpressure) and hands the operation to the writer, in call order;
    /// returns the receiver of its answer, which arrives once its group committed. Operations that
    /// add data are refused while the disk is within its reserve.
    async fn enqueue<T: Send + 'static>(
        &self,
        rows: usize,
        make: impl FnOnce(oneshot::Sender<Result<T>>, tokio::sync::OwnedSemaphorePermit) -> writer::Op,
    ) -> Result<oneshot::Receiver<Result<T>>> {
        self.room()?;
        self.enqueue_within_reserve(rows, make).await
    }

    /// `Err(Full)` while the disk is within its reserve.
    fn room(&self) -> Result<()> {
        match self.disk() {
            DiskState { low: true, free, reserve } => Err(StoreError::Full { free, reserve }),
            _ => Ok(()),
        }
    }

    /// Like `enqueue`, also inside the reserve: for writes that free space or are small and keep
    /// the fleet's picture right.
    async fn enqueue_within_reserve<T: Send + 'static>(
        &self,
        rows: usize,
        make: impl FnOnce(oneshot::Sender<Result<T>>, tokio::sync::OwnedSemaphorePermit) -> writer::Op,
    ) -> Result<oneshot::Receiver<Result<T>>> {
        let rows = rows.clamp(1, self.inner.max_pending) as u32;
        let permit = self.inner.pending.clone().acquire_many_owned(rows).await.map_err(|_| StoreError::Closed)?;
        let (tx, rx) = oneshot::channel();
        self.inner.ops.send(make(tx, permit)).map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    async fn submit<T: Send + 'static>(
        &self,
        rows: usize,
        make: impl FnOnce(oneshot::Sender<Result<T>>, tokio::sync::OwnedSemaphorePermit) -> writer::Op,
    ) -> Result<T> {
        self.room()?;
        self.submit_within_reserve(rows, make).await
    }

    async fn submit_within_reserve<T: Send + 'static>(
        &self,
        rows: usize,
        make: impl FnOnce(oneshot::Sender<Result<T>>, tokio::sync::OwnedSemaphorePermit) -> writer::Op,
    ) -> Result<T> {
        let rx = self.enqueue_within_reserve(rows, make).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Like [`Sqlite::append`], but returns once the events are queued, in call order, so that a
    /// stream can keep reading while earlier batches commit; the future answers after the commit.
    pub async fn append_queued(
        &self,
        events: Vec<NewEvent>,
    ) -> Result<impl std::future::Future<Output = Result<Vec<Appended>>> + use<>> {
        let rx = self.enqueue(events.len(), |reply, permit| writer::Op::Append { events, reply, permit }).await?;
        Ok(async move { rx.await.map_err(|_| StoreError::Closed)? })
    }

    /// Appends events; answers once they are committed. Duplicates (by identity) are not stored
    /// again and report the cursor of the stored copy.
    pub async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>> {
        self.submit(events.len(), |reply, permit| writer::Op::Append { events, reply, permit }).await
    }

    /// Records an agent's hello: creates or updates the node and emits NodeRegistered,
    /// NodeRebooted and NodeInventoryChanged events as they apply.
    pub async fn hello(&self, hello: NodeHello) -> Result<HelloOutcome> {
        self.submit_within_reserve(2, |reply, permit| writer::Op::Hello { hello: Box::new(hello), reply, permit }).await
    }

    /// Persists a liveness transition and its event (NodeHeartbeatLost / NodeHeartbeatResumed).
    pub async fn set_liveness(&self, key: NodeKey, lost: bool, grace: Duration) -> Result<()> {
        self.submit_within_reserve(1, |reply, permit| writer::Op::Liveness { key, lost, grace, reply, permit }).await
    }

    /// Stores what Kubernetes says of a node (its labels, its startup taint) and records the
    /// changes as events. `None`: no such node.
    pub async fn sync_kubernetes(
        &self,
        key: NodeKey,
        labels: HashMap<String, String>,
        onboarding: bool,
        onboarded: bool,
        issuer: String,
    ) -> Result<Option<NodeChanged>> {
        let change = writer::NodeChange::Kubernetes { key, labels, onboarding, onboarded, issuer };
        self.submit(3, |reply, permit| writer::Op::Node { change, reply, permit }).await
    }

    /// Marks a node decommissioned, closes its open faults and records a NodeDecommissioned
    /// event. `None`: no such node.
    pub async fn decommission(&self, key: NodeKey, reason: String, issuer: String) -> Result<Option<NodeChanged>> {
        let change = writer::NodeChange::Decommission { key, reason, issuer };
        self.submit(1, |reply, permit| writer::Op::Node { change, reply, permit }).await
    }

    /// Creates the durable consumer at `position` unless it exists; returns its acked cursor.
    pub async fn ensure_consumer(&self, name: String, position: u64) -> Result<u64> {
        self.submit_within_reserve(1, |reply, permit| writer::Op::EnsureConsumer { name, position, reply, permit })
            .await
    }

    /// Moves a durable consumer's acknowledged position forward. `Ok(false)` if it does not exist.
    pub async fn ack_consumer(&self, name: String, cursor: u64) -> Result<bool> {
        self.submit_within_reserve(1, |reply, permit| writer::Op::AckConsumer { name, cursor, reply, permit }).await
    }

    pub async fn delete_consumer(&self, name: String) -> Result<bool> {
        self.submit_within_reserve(1, |reply, permit| writer::Op::DeleteConsumer { name, reply, permit }).await
    }

    /// Deletes up to `max_rows` of the oldest events received before `cutoff_ms`; returns how
    /// many it deleted.
    pub async fn retain(&self, cutoff_ms: i64, max_rows: usize) -> Result<u64> {
        self.submit_within_reserve(1, |reply, permit| writer::Op::Retain { cutoff_ms, max_rows, reply, permit }).await
    }

    /// Runs `f` on a read-only connection from the pool, on the blocking pool.
    pub(crate) async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = inner.readers.lock().expect("reader pool lock").pop();
            let conn = match conn {
                Some(c) => c,
                None => open_reader(&inner.path)?,
            };
            let out = f(&conn);
            let mut pool = inner.readers.lock().expect("reader pool lock");
            if pool.len() < 8 {
                pool.push(conn);
            }
            out
        })
        .await
        .map_err(|e| StoreError::sqlite(&self.inner.path, format!("reader task failed: {e}")))?
    }

    /// Sets the desired components of a target of a cluster ("node:<name>" or
    /// "selector:<k=v,...>"); returns the new generation.
    pub async fn set_desired(&self, cluster: String, target: String, specs: Vec<u8>) -> Result<u64> {
        let change = writer::ComponentsChange::Desired { cluster, target, specs };
        self.submit(1, |reply, permit| writer::Op::Components { change, reply, permit }).await
    }

    /// Records the component status a node reported.
    pub async fn set_component_status(&self, key: NodeKey, body: Vec<u8>) -> Result<u64> {
        let change = writer::ComponentsChange::Status { key, body };
        self.submit_within_reserve(1, |reply, permit| writer::Op::Components { change, reply, permit }).await
    }

    /// Stores permits (granted, released or expired: active or not) and the events that record
    /// the decisions, in one transaction.
    pub async fn put_permits(
        &self,
        permits: Vec<(nodekeeper_proto::v1::Permit, bool)>,
        events: Vec<NewEvent>,
    ) -> Result<u64> {
        let rows = permits.len() + events.len();
        let change = writer::ComponentsChange::Permits { permits, events };
        self.submit(rows, |reply, permit| writer::Op::Components { change, reply, permit }).await
    }

    /// Stores a cluster's guard ("" for the global freeze) with the events that record it.
    pub async fn put_guard(&self, cluster: String, body: Vec<u8>, events: Vec<NewEvent>) -> Result<u64> {
        let change = writer::ComponentsChange::Guard { cluster, body, events };
        self.submit(2, |reply, permit| writer::Op::Components { change, reply, permit }).await
    }

    /// Stores a rollout's state with the events of its timeline and the desired components it
    /// sets (target, encoded DesiredState), all in one transaction; returns the generation the
    /// desired components were written at (0 when none).
    pub async fn put_rollout(
        &self,
        name: String,
        cluster: String,
        body: Vec<u8>,
        events: Vec<NewEvent>,
        desired: Vec<(String, Vec<u8>)>,
    ) -> Result<u64> {
        let rows = events.len() + desired.len() + 1;
        let change = writer::ComponentsChange::Rollout { name, cluster, body, events, desired };
        self.submit(rows, |reply, permit| writer::Op::Components { change, reply, permit }).await
    }

    /// Records a remediation step on a fault (`event.fault_id`) and moves the fault to `state`
    /// (0: unchanged; a resolved fault stays resolved). Returns the event's cursor; a resent step
    /// (same identity) changes nothing.
    pub async fn fault_action(&self, event: NewEvent, state: i32) -> Result<u64> {
        let change = writer::ComponentsChange::FaultAction { event: Box::new(event), state };
        self.submit(1, |reply, permit| writer::Op::Components { change, reply, permit }).await
    }

    /// Stops the writer after it committed everything submitted so far, and checkpoints the WAL.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.ops.send(writer::Op::Close { reply: tx }).is_ok() {
            // The writer answers after its last commit.
            if rx.await.is_err() {
                tracing::warn!("store writer stopped before acknowledging close");
            }
        }
        let checkpointer = self.inner.checkpointer.lock().expect("checkpointer lock").take();
        if let Some((stop, handle)) = checkpointer {
            drop(stop);
            if tokio::task::spawn_blocking(move || handle.join()).await.is_err() {
                tracing::error!("store checkpointer thread panicked");
            }
        }
        let handle = self.inner.writer.lock().expect("writer handle lock").take();
        if let Some(handle) = handle
            && tokio::task::spawn_blocking(move || handle.join()).await.is_err()
        {
            tracing::error!("store writer thread panicked");
        }
    }
}

/// Copies the store in `dir` to `to`, consistent as of one moment, while a center may be running
/// and writing: `VACUUM INTO` reads one snapshot (WAL readers never block the writer, and are not
/// restarted by its commits, unlike the page-by-page backup API under steady ingest). The copy is
/// written beside `to`, synced, then renamed onto it; an existing `to` is refused. Returns its size.
pub fn backup(dir: &Path, to: &Path) -> Result<u64> {
    let path = dir.join("eventcenter.db");
    if !path.exists() {
        return Err(StoreError::sqlite(&path, "no store here"));
    }
    if to.exists() {
        return Err(StoreError::sqlite(to, "already exists; choose a new file"));
    }
    let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| StoreError::sqlite(&path, e))?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(|e| StoreError::sqlite(&path, e))?;
    let tmp = to.with_file_name(format!(
        ".{}.partial",
        to.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    let _ = std::fs::remove_file(&tmp);
    conn.execute("VACUUM INTO ?1", [tmp.to_string_lossy()]).map_err(|e| StoreError::sqlite(&path, e))?;
    let io = |e: std::io::Error| StoreError::sqlite(to, e);
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, to).map_err(io)?;
    let parent = to.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(std::fs::metadata(to).map_err(io)?.len())
}

pub(super) fn open_writer(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).map_err(|e| StoreError::sqlite(path, e))?;
    let sqlite = |e: rusqlite::Error| StoreError::sqlite(path, e);
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(sqlite)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::NotWal { path: path.to_owned(), found: mode });
    }
    // journal_size_limit: a WAL that grew under a burst is cut back when it is next reset.
    conn.execute_batch(
        "PRAGMA synchronous = FULL; PRAGMA cache_size = -65536; PRAGMA busy_timeout = 5000; \
         PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 67108864;",
    )
    .map_err(sqlite)?;
    let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).map_err(sqlite)?;
    if sync != 2 {
        return Err(StoreError::NotSynchronousFull { path: path.to_owned(), found: sync });
    }
    migrate(&conn).map_err(|e| match e {
        MigrateError::Sqlite(e) => sqlite(e),
        MigrateError::TooNew(found) => {
            StoreError::SchemaTooNew { path: path.to_owned(), found, known: MIGRATIONS.len() }
        }
    })?;
    Ok(conn)
}

/// How often the WAL is copied back into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);
/// Every this many checkpoint rounds, the disk reserve is checked (once a second).
const SPACE_EVERY: u32 = 5;

/// Checkpoints run on their own connection and thread, in PASSIVE mode, so that they never stall
/// the writer's commits (SQLite's automatic checkpoint would run inside a commit and show up as
/// latency spikes for every caller of that group). The writer disables the automatic one. When a
/// round finds nothing new since the last one (the store is idle) and everything checkpointed, the
/// WAL is truncated to nothing, so that an idle store's WAL never outgrows its database. The same
/// thread checks the disk reserve.
fn spawn_checkpointer(
    path: &Path,
    space: Arc<space::Space>,
) -> Result<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)> {
    let conn = Connection::open(path).map_err(|e| StoreError::sqlite(path, e))?;
    conn.execute_batch("PRAGMA busy_timeout = 5000;").map_err(|e| StoreError::sqlite(path, e))?;
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let store_path = path.display().to_string();
    let handle = std::thread::Builder::new()
        .name("store-checkpoint".into())
        .spawn(move || {
            let mut round = 0u32;
            let mut last_frames = -1i64;
            // recv_timeout doubles as a stoppable timer: the sender is dropped on close.
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(CHECKPOINT_EVERY) {
                round = round.wrapping_add(1);
                if round.is_multiple_of(SPACE_EVERY) {
                    space.check();
                }
                let passive = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                });
                match passive {
                    Ok((frames, done)) if frames > 0 && frames == done && frames == last_frames => {
                        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
                            tracing::warn!(store = %store_path, error = %e, "truncating checkpoint failed");
                        }
                        last_frames = 0;
                    }
                    Ok((frames, _)) => last_frames = frames,
                    Err(e) => tracing::warn!(store = %store_path, error = %e, "checkpoint failed"),
                }
            }
        })
        .map_err(|e| StoreError::sqlite(path, format!("spawning checkpoint thread: {e}")))?;
    Ok((stop_tx, handle))
}

fn open_reader(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| StoreError::sqlite(path, e))?;
    conn.execute_batch("PRAGMA busy_timeout = 5000;").map_err(|e| StoreError::sqlite(path, e))?;
    Ok(conn)
}

enum MigrateError {
    Sqlite(rusqlite::Error),
    TooNew(i64),
}

/// Applies the migrations not yet applied, each in its own transaction.
fn migrate(conn: &Connection) -> std::result::Result<(), MigrateError> {
    let applied: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(MigrateError::Sqlite)?;
    if applied as usize > MIGRATIONS.len() {
        return Err(MigrateError::TooNew(applied));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let version = i + 1;
        conn.execute_batch(&format!("BEGIN; {sql}\nPRAGMA user_version = {version}; COMMIT;"))
            .map_err(MigrateError::Sqlite)?;
        tracing::info!(version, "applied store migration");
    }
    Ok(())
}
