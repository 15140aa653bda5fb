//! The event log's store on its own (no gRPC): three `PgStore` replicas on one PostgreSQL 15 (a
//! throwaway cluster on this machine, `fsync=on`, `synchronous_commit=on`) against the SQLite store
//! of the single center, side by side in one run. Each phase: 500 producers (agent streams) spread
//! over the replicas append batches of 50 events of 256 bytes; max rate (every producer appends as
//! fast as it is acknowledged) and paced to 20,000 events/s (batches of 10 every 250 ms per
//! producer); acknowledgement latency is from the append call to its answer, after the commit.
//!
//! ```text
//! cargo bench -p nodekeeper-bench --bench pg_log            # --seconds N (default 10)
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark reports on the terminal")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nodekeeper_bench::{histogram, summary};
use nodekeeper_eventcenter::store::postgres::{PgOptions, PgStore};
use nodekeeper_eventcenter::store::{Appended, Identity, NewEvent, Result, Sqlite, StoreOptions, agent_origin};
use nodekeeper_proto::v1::Event;
use nodekeeper_tests::postgres::Postgres;
use tokio::sync::Mutex;

const PRODUCERS: usize = 500;

/// A log to append to: one of the PostgreSQL replicas or the SQLite store.
#[derive(Clone)]
enum Log {
    Pg(Arc<PgStore>),
    Sqlite(Arc<Sqlite>),
}

impl Log {
    async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Appended>> {
        match self {
            Log::Pg(l) => l.append(events).await,
            Log::Sqlite(s) => s.append(events).await,
        }
    }
}

fn batch(node: &str, from: u64, n: u64) -> Vec<NewEvent> {
    let origin = agent_origin("c1", node, "b1");
    (from..from + n)
        .map(|seq| {
            let e = Event {
                cluster: "c1".into(),
                node: node.into(),
                r#type: "BenchEvent".into(),
                message: "x".repeat(256),
                ..Default::default()
            };
            NewEvent::new(Identity::agent(&origin, seq), e)
        })
        .collect()
}

/// Runs `PRODUCERS` producers over `logs` for `seconds`; each appends `per_batch` events and then
/// waits `pause` (none: at once). Events acknowledged per second and the acknowledgement latency.
async fn phase(logs: &[Log], seconds: u64, per_batch: u64, pause: Option<Duration>) -> (f64, Histogram<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(Mutex::new(histogram()));
    let mut tasks = tokio::task::JoinSet::new();
    let run = rand::random::<u32>();
    for i in 0..PRODUCERS {
        let log = logs[i % logs.len()].clone();
        let (stop, measuring, acked, latency) = (stop.clone(), measuring.clone(), acked.clone(), latency.clone());
        tasks.spawn(async move {
            let node = format!("r{run}-n{i}");
            let mut seq = 1;
            let mut mine = histogram();
            if let Some(p) = pause {
                // Spread the paced producers over the period.
                tokio::time::sleep(p.mul_f64(i as f64 / PRODUCERS as f64)).await;
            }
            let mut tick = pause.map(tokio::time::interval);
            while !stop.load(Ordering::Relaxed) {
                if let Some(t) = &mut tick {
                    t.tick().await;
                }
                let events = batch(&node, seq, per_batch);
                seq += per_batch;
                let t0 = Instant::now();
                log.append(events).await.expect("append");
                if measuring.load(Ordering::Relaxed) {
                    acked.fetch_add(per_batch, Ordering::Relaxed);
                    mine.record(t0.elapsed().as_micros() as u64).ok();
                }
            }
            latency.lock().await.add(&mine).ok();
        });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    measuring.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    measuring.store(false, Ordering::SeqCst);
    let rate = acked.load(Ordering::SeqCst) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    while tasks.join_next().await.is_some() {}
    let h = latency.lock().await.clone();
    (rate, h)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds: u64 =
        std::env::args().skip_while(|a| a != "--seconds").nth(1).and_then(|v| v.parse().ok()).unwrap_or(10);
    let pg = Postgres::start().await;
    let url = pg.create_database("bench").await;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Log::Pg(Arc::new(PgStore::open(&url, PgOptions::default()).await.expect("open"))));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite = [Log::Sqlite(Arc::new(Sqlite::open(dir.path(), StoreOptions::default()).expect("open")))];

    println!("| store | phase | events/s | append → ack |");
    println!("|---|---|---|---|");
    for (name, logs) in [("PostgreSQL 15, 3 replicas", &replicas[..]), ("SQLite, 1 center", &sqlite[..])] {
        let (rate, h) = phase(logs, seconds, 50, None).await;
        println!("| {name} | max rate, batches of 50 | {rate:.0} | {} |", summary(&h));
        let (rate, h) = phase(logs, seconds, 10, Some(Duration::from_millis(250))).await;
        println!("| {name} | paced to 20,000/s, batches of 10 | {rate:.0} | {} |", summary(&h));
    }
}
