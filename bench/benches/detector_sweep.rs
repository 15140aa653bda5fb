//! The detector's background sweep: 10,000 probe targets (simulated on loopback: a `local` route
//! puts all of 198.18.0.0/16, the benchmarking range, on `lo`, and one gRPC health server answers
//! for every address; the detector ignores 127/8 addresses, which name no node) probed every 30 s
//! with the default settings, while every simulated node's agent heartbeats every 10 s to the event
//! center (so the detector's heartbeat suspicion runs on all of them). Needs root for the route.
//! Measures the detector process's CPU over two sweeps, and checks from its /metrics that every
//! target was probed and none was suspected.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo bench -p nodekeeper-bench --bench detector_sweep [-- --targets 10000 --seconds 60]
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark reports on the terminal")]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nodekeeper_bench::{KillOnDrop, proc_usage, simulated_agent, target_dir};
use nodekeeper_proto::v1::{Inventory, NetworkInterface};
use nodekeeper_tests::{EventCenter, free_port, hello, http_get, metric, metric_where, try_http_get, wait_for};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (mut targets, mut seconds) = (10_000usize, 60u64);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--targets" => targets = it.next().and_then(|v| v.parse().ok()).expect("--targets N"),
            "--seconds" => seconds = it.next().and_then(|v| v.parse().ok()).expect("--seconds N"),
            _ => {}
        }
    }
    let _route = LocalRoute::add("198.18.0.0/16");
    // One gRPC health server for every simulated node.
    let port = free_port();
    let (health, service) = tonic_health::server::health_reporter();
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve(std::net::SocketAddr::from(([0, 0, 0, 0], port)))
            .await
            .expect("health server");
    });
    let center = EventCenter::start("").await;
    let url = center.url();
    eprintln!("connecting {targets} simulated agents, heartbeating every 10 s");
    let started = Instant::now();
    let (connected, beats) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut agents = tokio::task::JoinSet::new();
    for i in 0..targets {
        let mut h = hello("bench", &format!("node-{i}"), "00000000-0000-4000-8000-000000000001");
        h.status_port = u32::from(port);
        h.inventory = Some(Inventory {
            hostname: format!("node-{i}"),
            interfaces: vec![NetworkInterface {
                name: "eth0".into(),
                addresses: vec![format!("198.18.{}.{}/16", i / 250, i % 250 + 1)],
                ..Default::default()
            }],
            ..Default::default()
        });
        agents.spawn(simulated_agent(url.clone(), h, Duration::from_secs(10), connected.clone(), beats.clone()));
    }
    wait_for("the agents", Duration::from_secs(300), || async {
        (connected.load(Ordering::Relaxed) == targets as u64).then_some(())
    })
    .await;
    eprintln!("connected in {:?}", started.elapsed());

    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let config = dir.path().join("detector.toml");
    std::fs::write(
        &config,
        format!("name = \"bench\"\ncenter = \"{url}\"\ninsecure = true\nkubelet_port = {port}\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n"),
    )
    .unwrap();
    let detector = Command::new(target_dir().join("release/nodekeeper-detector"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the detector (cargo build --release --workspace --bins)");
    // Killed when the bench ends, a failed one too.
    let detector = KillOnDrop(detector);
    let metrics = format!("http://127.0.0.1:{metrics_port}/metrics");
    let probes = || async {
        let text = try_http_get(&metrics).await.unwrap_or_default();
        metric(&text, "nodekeeper_detector_probes_total").unwrap_or(0.0)
    };
    // Warm up: the first sweep is spread over the first interval.
    wait_for("the first sweep", Duration::from_secs(120), || async {
        (probes().await >= targets as f64).then_some(())
    })
    .await;
    let pid = detector.0.id();
    let (p0, c0, t0) = (probes().await, proc_usage(pid).unwrap().cpu, Instant::now());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (p1, c1, window) = (probes().await, proc_usage(pid).unwrap(), t0.elapsed());
    let text = http_get(&metrics).await;
    let failed = metric(&text, "nodekeeper_detector_probes_total").unwrap_or(0.0)
        - metric_where(&text, "nodekeeper_detector_probes_total", r#"outcome="healthy""#).unwrap_or(0.0);
    let suspected = metric(&text, "nodekeeper_detector_suspected_nodes").unwrap_or(0.0);
    drop(detector);
    let cpu = (c1.cpu - c0).as_secs_f64() / window.as_secs_f64() * 100.0;
    println!(
        "| targets | sweep | window | probes in window | failed probes | suspected at the end | detector CPU (% of a core) | detector RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {targets} | 30 s | {:.0} s | {:.0} | {failed:.0} | {suspected:.0} | **{cpu:.2} %** | {:.1} MiB |",
        window.as_secs_f64(),
        p1 - p0,
        c1.rss_bytes as f64 / 1048576.0
    );
    eprintln!("{} heartbeats sent", beats.load(Ordering::Relaxed));
    assert!(p1 - p0 >= targets as f64 * (window.as_secs_f64() / 30.0) * 0.9, "not every target was probed each sweep");
}

/// A `local` route on `lo` for a range of addresses, removed when dropped.
struct LocalRoute(&'static str);

impl LocalRoute {
    fn add(range: &'static str) -> Self {
        let _ = Self::ip("del", range);
        assert!(Self::ip("add", range), "ip route add local {range} dev lo (needs root)");
        LocalRoute(range)
    }

    fn ip(verb: &str, range: &str) -> bool {
        Command::new("ip")
            .args(["route", verb, "local", range, "dev", "lo", "table", "local"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for LocalRoute {
    fn drop(&mut self) {
        let _ = Self::ip("del", self.0);
    }
}
