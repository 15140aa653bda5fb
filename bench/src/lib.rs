//! Shared pieces of the benchmarks: latency histograms, process CPU and memory from /proc, and
//! the peer services they are compared with.

use std::time::Duration;

use hdrhistogram::Histogram;

/// A latency histogram in microseconds, 1 µs to 60 s.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// "p50 1.2 ms, p99 4.5 ms, max 9 ms".
pub fn summary(h: &Histogram<u64>) -> String {
    let ms = |v: u64| v as f64 / 1000.0;
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, max {:.1} ms ({} samples)",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        h.len()
    )
}

/// CPU time (user + system) and resident memory of a process, from /proc.
#[derive(Debug, Clone, Copy)]
pub struct ProcUsage {
    pub cpu: Duration,
    pub rss_bytes: u64,
}

pub fn proc_usage(pid: u32) -> Option<ProcUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let rss_pages: u64 = fields.get(21)?.parse().ok()?;
    // Linux reports in USER_HZ (100 on every mainstream configuration) and 4 KiB pages.
    Some(ProcUsage { cpu: Duration::from_millis(ticks * 10), rss_bytes: rss_pages * 4096 })
}

/// `pid` and every process descended from it (PostgreSQL's backends under its postmaster).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        let Some(ppid) = stat.rfind(')').and_then(|i| stat[i + 2..].split_whitespace().nth(1)?.parse().ok()) else {
            continue;
        };
        parents.push((p, ppid));
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    tree
}

/// The summed usage of processes (those that exist).
pub fn processes_usage(pids: &[u32]) -> ProcUsage {
    pids.iter().filter_map(|p| proc_usage(*p)).fold(ProcUsage { cpu: Duration::ZERO, rss_bytes: 0 }, |a, b| ProcUsage {
        cpu: a.cpu + b.cpu,
        rss_bytes: a.rss_bytes + b.rss_bytes,
    })
}

/// The cargo target directory this benchmark binary was built in (`target/`).
pub fn target_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<bench>
    exe.ancestors().nth(3).expect("target dir").to_owned()
}

/// Samples a process's CPU and memory over a window.
pub struct Sampler {
    pub name: String,
    pub pid: u32,
    start: Option<ProcUsage>,
    rss_sum: u64,
    rss_max: u64,
    samples: u64,
}

impl Sampler {
    pub fn new(name: &str, pid: u32) -> Self {
        Sampler { name: name.to_owned(), pid, start: None, rss_sum: 0, rss_max: 0, samples: 0 }
    }

    /// Starts the window (CPU counted from here).
    pub fn begin(&mut self) {
        self.start = proc_usage(self.pid);
    }

    pub fn sample(&mut self) {
        if let Some(u) = proc_usage(self.pid) {
            self.rss_sum += u.rss_bytes;
            self.rss_max = self.rss_max.max(u.rss_bytes);
            self.samples += 1;
        }
    }

    /// "| name | cpu % of a core | rss avg | rss max |" over `window`.
    pub fn row(&self, window: Duration) -> String {
        let end = proc_usage(self.pid);
        let cpu = match (self.start, end) {
            (Some(a), Some(b)) => format!("{:.3} %", 100.0 * (b.cpu - a.cpu).as_secs_f64() / window.as_secs_f64()),
            _ => "process gone".into(),
        };
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        format!(
            "| {} | {cpu} | {:.2} MiB | {:.2} MiB |",
            self.name,
            mib(self.rss_sum / self.samples.max(1)),
            mib(self.rss_max)
        )
    }
}

pub use nodekeeper_tests::KillOnDrop;

/// One simulated agent on its own connection: `hello`, then a heartbeat every `interval` (random
/// phase) until the center ends the stream; counts connections and heartbeats.
pub async fn simulated_agent(
    url: String,
    hello: nodekeeper_proto::v1::Hello,
    interval: Duration,
    connected: std::sync::Arc<std::sync::atomic::AtomicU64>,
    beats: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    simulated_agent_on(channel(&url).await, hello, interval, connected, beats).await
}

/// A connection to `url`, retried until the center accepts it.
pub async fn channel(url: &str) -> tonic::transport::Channel {
    loop {
        match tonic::transport::Channel::from_shared(url.to_owned()).expect("url").connect().await {
            Ok(c) => return c,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// [`simulated_agent`] on a connection it may share with other simulated agents (one HTTP/2
/// stream each).
pub async fn simulated_agent_on(
    channel: tonic::transport::Channel,
    mut hello: nodekeeper_proto::v1::Hello,
    interval: Duration,
    connected: std::sync::Arc<std::sync::atomic::AtomicU64>,
    beats: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use nodekeeper_proto::v1::{AgentMessage, Heartbeat, agent_message};
    use rand::RngExt;
    use std::sync::atomic::Ordering;
    hello.heartbeat_interval = Some(nodekeeper_common::time::to_duration(interval));
    let conn = loop {
        match nodekeeper_tests::AgentConn::connect_channel(channel.clone(), hello.clone()).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    connected.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = conn.into_parts();
    let phase = interval.mul_f64(rand::rng().random_range(0.0..1.0));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let hb = AgentMessage { msg: Some(agent_message::Msg::Heartbeat(Heartbeat::default())) };
                if tx.send(hb).await.is_err() {
                    return;
                }
                beats.fetch_add(1, Ordering::Relaxed);
            }
            m = rx.message() => if !matches!(m, Ok(Some(_))) { return },
        }
    }
}
