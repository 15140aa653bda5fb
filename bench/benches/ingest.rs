//! Durable ingest of the event center against NATS JetStream, side by side in one run.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo bench -p nodekeeper-bench --bench ingest [-- --streams 500 --seconds 10 --no-peer]
//! ```
//!
//! Phases, each against a fresh store:
//! 1. throughput: N agent streams send 256-byte observations as fast as acknowledgements allow
//!    (batches of 50, 4 batches in flight per stream); events acknowledged per second;
//! 2. latency: the same streams paced to 50,000 events/s in total; batch send → ack latency;
//! 3. fan-out: 10 subscribers following everything while 10,000 events/s arrive; latency from
//!    the producer's timestamp to each subscriber.
//!
//! The peer runs phases 1 and 2 with the same payloads and producer ids: NATS JetStream (file
//! storage, deduplication by `Nats-Msg-Id`, publish acknowledgements awaited), one connection per
//! producer like the agents.
//!
//! `--replicas N` runs each phase of the event center a second time against N replicas on one
//! throwaway PostgreSQL 15 cluster (streams spread over them; the paced phase at `--pg-rate`,
//! default 20,000 events/s; fan-out with the subscribers on the first replica and the producers on
//! the others); server CPU and memory summed over the replicas and PostgreSQL's processes.

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark reports on the terminal")]

use std::collections::{HashMap, VecDeque};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use nodekeeper_bench::{ProcUsage, histogram, process_tree, processes_usage, summary};
use nodekeeper_proto::v1::{
    AgentMessage, EventFilter, Observation, ObservationBatch, Severity, StartPosition, SubscribeRequest, agent_message,
    center_message, event_service_client::EventServiceClient, subscribe_response,
};
use nodekeeper_tests::postgres::Postgres;
use nodekeeper_tests::{AgentConn, EventCenter, free_port, hello, wait_for};
use tokio::sync::Mutex;

const PAYLOAD: usize = 256;

/// PostgreSQL as a write-heavy deployment runs it (durability untouched: `fsync` and
/// `synchronous_commit` stay on): buffers and WAL sized so that a checkpoint (and the full-page
/// images after it) does not fall inside a 10-second phase, WAL compressed.
const PG_SETTINGS: &[&str] =
    &["shared_buffers=1GB", "wal_buffers=64MB", "max_wal_size=8GB", "checkpoint_timeout=30min", "wal_compression=lz4"];
const BATCH: u64 = 50;
const WINDOW: usize = 4;

struct Args {
    streams: usize,
    seconds: u64,
    peer: bool,
    /// Run only this phase: max, paced, fanout.
    only: Option<String>,
    /// Also against this many replicas on PostgreSQL (0: not).
    replicas: usize,
    /// The paced phase's rate on PostgreSQL.
    pg_rate: u64,
}

impl Args {
    fn runs(&self, phase: &str) -> bool {
        self.only.as_deref().is_none_or(|o| o == phase)
    }
}

fn args() -> Args {
    let mut a = Args { streams: 500, seconds: 10, peer: true, only: None, replicas: 0, pg_rate: 20_000 };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--streams" => a.streams = it.next().and_then(|v| v.parse().ok()).expect("--streams N"),
            "--seconds" => a.seconds = it.next().and_then(|v| v.parse().ok()).expect("--seconds N"),
            "--no-peer" => a.peer = false,
            "--only" => a.only = it.next(),
            "--replicas" => a.replicas = it.next().and_then(|v| v.parse().ok()).expect("--replicas N"),
            "--pg-rate" => a.pg_rate = it.next().and_then(|v| v.parse().ok()).expect("--pg-rate N"),
            _ => {} // cargo bench passes --bench
        }
    }
    a
}

/// A 256-byte message naming its sequence.
fn payload(seq: u64) -> String {
    let mut s = format!("observation {seq} ");
    let fill = PAYLOAD.saturating_sub(s.len());
    s.push_str(&"x".repeat(fill));
    s
}

fn observation(seq: u64) -> Observation {
    Observation {
        sequence: seq,
        time: Some(nodekeeper_common::time::now_timestamp()),
        r#type: "BenchEvent".into(),
        message: payload(seq),
        severity: Severity::Info as i32,
        ..Default::default()
    }
}

/// What a load phase measured.
struct Outcome {
    events: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
    /// Each group of server processes (name, usage before, after).
    server: Vec<(&'static str, ProcUsage, ProcUsage)>,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    fn server_line(&self) -> String {
        let line = |(name, a, b): &(&str, ProcUsage, ProcUsage)| {
            format!(
                "{name} CPU {:.2} cores, RSS {} MiB",
                (b.cpu - a.cpu).as_secs_f64() / self.elapsed.as_secs_f64(),
                b.rss_bytes >> 20
            )
        };
        self.server.iter().map(line).collect::<Vec<_>>().join("; ")
    }
}

/// The servers a phase runs against: one center on SQLite, or replicas on one PostgreSQL.
struct Centers {
    centers: Vec<EventCenter>,
    pg: Option<Postgres>,
}

impl Centers {
    async fn start(replicas: usize) -> Centers {
        if replicas == 0 {
            return Centers { centers: vec![EventCenter::start("").await], pg: None };
        }
        let pg = Postgres::start_configured(PG_SETTINGS).await;
        let url = pg.create_database("bench").await;
        let mut centers = Vec::new();
        for _ in 0..replicas {
            centers.push(EventCenter::start(&format!("[store]\npostgres_url = \"{url}\"\n")).await);
        }
        Centers { centers, pg: Some(pg) }
    }

    /// Stream `i`'s center.
    fn url(&self, i: usize) -> String {
        self.centers[i % self.centers.len()].url()
    }

    /// The process groups measured: the centers, and PostgreSQL with its backends.
    fn groups(&self) -> Vec<(&'static str, Vec<u32>)> {
        let mut g = vec![("server", self.centers.iter().filter_map(EventCenter::pid).collect())];
        if let Some(pid) = self.pg.as_ref().and_then(Postgres::pid) {
            g[0].0 = "replicas";
            g.push(("postgres", process_tree(pid)));
        }
        g
    }
}

/// One agent stream: batches of BATCH with up to WINDOW in flight; paced to `per_second` events
/// when given. Counts acknowledged events while `measuring`, records batch latencies.
async fn agent_stream(
    url: String,
    node: String,
    per_second: Option<u64>,
    stop: Arc<AtomicBool>,
    measuring: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    latencies: Arc<Mutex<Histogram<u64>>>,
) {
    let conn = AgentConn::connect(&url, hello("bench", &node, "b1")).await.expect("connect");
    let (tx, mut rx) = conn.into_parts();
    let (batch_size, mut pace) = pacing(per_second);
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let mut local = histogram();
    let mut seq = 1;
    let mut batch_id = 0;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && sent.is_empty() {
            break;
        }
        let can_send = !stopping && sent.len() < WINDOW;
        tokio::select! {
            _ = tick(&mut pace), if can_send => {
                batch_id += 1;
                let observations: Vec<Observation> = (seq..seq + batch_size).map(observation).collect();
                seq += batch_size;
                let msg = AgentMessage {
                    msg: Some(agent_message::Msg::Observations(ObservationBatch { batch_id, observations })),
                };
                if tx.send(msg).await.is_err() {
                    break;
                }
                sent.insert(batch_id, Instant::now());
            }
            m = rx.message(), if !sent.is_empty() => match m {
                Ok(Some(m)) => {
                    if let Some(center_message::Msg::Ack(a)) = m.msg
                        && let Some(t0) = sent.remove(&a.batch_id)
                        && measuring.load(Ordering::Relaxed)
                    {
                        acked.fetch_add(u64::from(a.stored + a.duplicates), Ordering::Relaxed);
                        local.record(t0.elapsed().as_micros().max(1) as u64).ok();
                    }
                }
                _ => break,
            },
            _ = tokio::time::sleep(Duration::from_millis(50)) => {} // re-check `stop`
        }
    }
    latencies.lock().await.add(&local).ok();
}

/// Batch size and pace: unpaced, BATCH per batch as fast as acknowledged; paced to `rate` events/s,
/// ten batches a second.
fn pacing(per_second: Option<u64>) -> (u64, Option<tokio::time::Interval>) {
    match per_second {
        Some(rate) => {
            let batches_per_second = (rate / 10).max(1);
            let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / batches_per_second as f64));
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            (rate.div_ceil(batches_per_second), Some(t))
        }
        None => (BATCH, None),
    }
}

/// Ready at once when unpaced, else at the next tick.
async fn tick(pace: &mut Option<tokio::time::Interval>) {
    if let Some(p) = pace {
        p.tick().await;
    }
}

/// Runs `spawn(i)` for i in 0..n, warms up, measures for `seconds`, then stops them.
async fn load_phase<F, Fut>(n: usize, seconds: u64, servers: Vec<(&'static str, Vec<u32>)>, spawn: F) -> Outcome
where
    F: Fn(usize, Arc<AtomicBool>, Arc<AtomicBool>, Arc<AtomicU64>, Arc<Mutex<Histogram<u64>>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(histogram()));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        tasks.spawn(spawn(i, stop.clone(), measuring.clone(), acked.clone(), latencies.clone()));
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // connect and warm up
    // PostgreSQL starts backends as connections come: the processes are listed after the warm-up.
    let servers: Vec<(&'static str, Vec<u32>)> = servers
        .into_iter()
        .map(|(name, pids)| if name == "postgres" { (name, process_tree(pids[0])) } else { (name, pids) })
        .collect();
    let before: Vec<ProcUsage> = servers.iter().map(|(_, p)| processes_usage(p)).collect();
    measuring.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    measuring.store(false, Ordering::SeqCst);
    let elapsed = t0.elapsed();
    let server = servers
        .iter()
        .zip(before)
        .map(|((name, pids), before)| (*name, before, processes_usage(pids)))
        .filter(|(_, b, _)| b.rss_bytes > 0)
        .collect();
    let events = acked.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    while tasks.join_next().await.is_some() {}
    let latency = latencies.lock().await.clone();
    Outcome { events, elapsed, latency, server }
}

async fn center_phase(args: &Args, replicas: usize, per_stream: Option<u64>) -> Outcome {
    let centers = Centers::start(replicas).await;
    let urls: Vec<String> = (0..args.streams).map(|i| centers.url(i)).collect();
    load_phase(args.streams, args.seconds, centers.groups(), |i, stop, measuring, acked, lat| {
        agent_stream(urls[i].clone(), format!("node-{i}"), per_stream, stop, measuring, acked, lat)
    })
    .await
}

/// Subscribers on the first center; producers on the others when there are several (an event
/// crosses replicas before it reaches a subscriber).
async fn fanout_phase(args: &Args, replicas: usize) -> (Outcome, Histogram<u64>) {
    let centers = Centers::start(replicas).await;
    let center = &centers.centers[0];
    let producers: Vec<String> =
        (0..50).map(|i| centers.url(if replicas > 1 { 1 + i % (replicas - 1) } else { 0 })).collect();
    let subscribers = 10;
    let received = Arc::new(AtomicU64::new(0));
    let fan = Arc::new(Mutex::new(histogram()));
    let done = Arc::new(AtomicBool::new(false));
    let mut subs = Vec::new();
    for _ in 0..subscribers {
        let mut client = EventServiceClient::new(center.channel().await);
        let req = SubscribeRequest {
            start: StartPosition::Now as i32,
            filter: Some(EventFilter { types: vec!["BenchEvent".into()], ..Default::default() }),
            ..Default::default()
        };
        let mut stream = client.subscribe(req).await.expect("subscribe").into_inner();
        let (received, fan, done) = (received.clone(), fan.clone(), done.clone());
        subs.push(tokio::spawn(async move {
            let mut local = histogram();
            while !done.load(Ordering::Relaxed) {
                let Ok(Ok(Some(m))) = tokio::time::timeout(Duration::from_millis(200), stream.message()).await else {
                    continue;
                };
                if let Some(subscribe_response::Msg::Event(e)) = m.msg
                    && let Some(t) = e.time
                {
                    let sent = SystemTime::UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32);
                    let lat = SystemTime::now().duration_since(sent).unwrap_or_default();
                    local.record(lat.as_micros().max(1) as u64).ok();
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
            fan.lock().await.add(&local).ok();
        }));
    }
    // 50 streams × 200 events/s = 10,000 events/s.
    let outcome = load_phase(50, args.seconds, centers.groups(), |i, stop, measuring, acked, lat| {
        agent_stream(producers[i].clone(), format!("node-{i}"), Some(200), stop, measuring, acked, lat)
    })
    .await;
    done.store(true, Ordering::SeqCst);
    for s in subs {
        s.await.ok();
    }
    let fan = fan.lock().await.clone();
    (outcome, fan)
}

// ---- NATS JetStream peer ----

struct Nats {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

async fn start_nats() -> Nats {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nats-server (apt-get install nats-server)");
    let url = format!("nats://127.0.0.1:{port}");
    let u = url.clone();
    wait_for("nats-server", Duration::from_secs(20), || {
        let u = u.clone();
        async move { async_nats::connect(u).await.ok().map(|_| ()) }
    })
    .await;
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("connect nats"));
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH".into(),
        subjects: vec!["bench.>".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .expect("create stream");
    Nats { child, url, _dir: dir }
}

/// One producer: publishes with a message id (node/boot/sequence) and awaits acknowledgements,
/// keeping BATCH × WINDOW in flight like an agent stream, or paced like it.
async fn nats_producer(
    url: String,
    node: String,
    per_second: Option<u64>,
    stop: Arc<AtomicBool>,
    measuring: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    latencies: Arc<Mutex<Histogram<u64>>>,
) {
    let client = async_nats::connect(url).await.expect("connect nats");
    let js = async_nats::jetstream::new(client);
    let subject = format!("bench.{node}");
    let (batch_size, mut pace) = pacing(per_second);
    let mut in_flight: VecDeque<(Instant, Vec<async_nats::jetstream::context::PublishAckFuture>)> = VecDeque::new();
    let mut local = histogram();
    let mut seq = 1;
    while !stop.load(Ordering::Relaxed) {
        if let Some(p) = pace.as_mut() {
            p.tick().await;
        }
        let t0 = Instant::now();
        let mut acks = Vec::with_capacity(batch_size as usize);
        for _ in 0..batch_size {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("{node}/b1/{seq}").as_str());
            match js.publish_with_headers(subject.clone(), headers, payload(seq).into()).await {
                Ok(f) => acks.push(f),
                Err(_) => return,
            }
            seq += 1;
        }
        in_flight.push_back((t0, acks));
        let limit = if pace.is_some() { 0 } else { WINDOW - 1 };
        while in_flight.len() > limit {
            let (t0, acks) = in_flight.pop_front().expect("non-empty");
            let n = acks.len() as u64;
            for a in acks {
                if a.await.is_err() {
                    return;
                }
            }
            if measuring.load(Ordering::Relaxed) {
                acked.fetch_add(n, Ordering::Relaxed);
                local.record(t0.elapsed().as_micros().max(1) as u64).ok();
            }
        }
    }
    latencies.lock().await.add(&local).ok();
}

async fn nats_phase(args: &Args, per_stream: Option<u64>) -> Outcome {
    let nats = start_nats().await;
    let url = nats.url.clone();
    let servers = vec![("server", vec![nats.child.id()])];
    load_phase(args.streams, args.seconds, servers, |i, stop, measuring, acked, lat| {
        nats_producer(url.clone(), format!("node-{i}"), per_stream, stop, measuring, acked, lat)
    })
    .await
}

fn report(name: &str, o: &Outcome) -> String {
    format!("| {name} | {:.0} | {} | {} |", o.rate(), summary(&o.latency), o.server_line())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    let paced = 50_000 / args.streams as u64;
    let pg_paced = args.pg_rate / args.streams as u64;
    let pg = format!("{} replicas on PostgreSQL 15", args.replicas);
    let mut rows = vec!["| phase | events/s | batch send → ack | server |".to_owned(), "|---|---|---|---|".to_owned()];
    let mut ec_max = None;
    if args.runs("max") {
        eprintln!("event center: throughput with {} streams for {} s", args.streams, args.seconds);
        let o = center_phase(&args, 0, None).await;
        rows.push(report("nodekeeper-eventcenter, max rate (fsync per group commit)", &o));
        ec_max = Some(o.rate());
    }
    if args.replicas > 0 && args.runs("max") {
        eprintln!("{pg}: throughput");
        let o = center_phase(&args, args.replicas, None).await;
        rows.push(report(&format!("nodekeeper-eventcenter, {pg}, max rate"), &o));
    }
    if args.peer && args.runs("max") {
        eprintln!("NATS JetStream: throughput");
        let o = nats_phase(&args, None).await;
        rows.push(report("NATS JetStream 2.9 (file, dedup, acks awaited), max rate", &o));
        if let Some(ec) = ec_max {
            rows.push(format!("| ratio event center / JetStream at max rate | {:.2} | | |", ec / o.rate()));
        }
    }
    if args.runs("paced") {
        eprintln!("event center: latency at 50,000 events/s");
        let o = center_phase(&args, 0, Some(paced)).await;
        rows.push(report("nodekeeper-eventcenter, paced to 50,000/s", &o));
    }
    if args.replicas > 0 && args.runs("paced") {
        eprintln!("{pg}: latency at {} events/s", args.pg_rate);
        let o = center_phase(&args, args.replicas, Some(pg_paced)).await;
        rows.push(report(&format!("nodekeeper-eventcenter, {pg}, paced to {}/s", args.pg_rate), &o));
    }
    if args.peer && args.runs("paced") {
        eprintln!("NATS JetStream: latency at 50,000 events/s");
        let o = nats_phase(&args, Some(paced)).await;
        rows.push(report("NATS JetStream 2.9, paced to 50,000/s", &o));
    }
    if args.runs("fanout") {
        let mut kinds = vec![(0, "one center".to_owned())];
        if args.replicas > 0 {
            kinds.push((args.replicas, format!("{pg}, subscribers on one replica, producers on the others")));
        }
        for (replicas, name) in kinds {
            eprintln!("{name}: fan-out to 10 subscribers at 10,000 events/s");
            let (load, fan) = fanout_phase(&args, replicas).await;
            rows.push(format!(
                "\nfan-out ({name}): 10 subscribers, producers at {:.0} events/s; event → subscriber latency: {}; \
                 producers' batch send → ack: {}; {}",
                load.rate(),
                summary(&fan),
                summary(&load.latency),
                load.server_line()
            ));
        }
    }
    for r in rows {
        println!("{r}");
    }
}
