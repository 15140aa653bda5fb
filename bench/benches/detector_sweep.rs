//! The detector's background sweep: 10,000 probe targets (simulated on loopback addresses: one
//! gRPC health server answers for all of 127.10.0.0/16) probed every 30 s with the default
//! settings. Measures the detector process's CPU over two sweeps, and checks from its /metrics
//! that every target was probed.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo bench -p nodekeeper-bench --bench detector_sweep [-- --targets 10000 --seconds 60]
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a benchmark reports on the terminal")]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nodekeeper_bench::{proc_usage, target_dir};
use nodekeeper_proto::v1::{Inventory, NetworkInterface};
use nodekeeper_tests::{AgentConn, EventCenter, free_port, hello, http_get, metric, wait_for};

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
    eprintln!("registering {targets} nodes");
    let started = Instant::now();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..targets {
        let (url, sem) = (url.clone(), sem.clone());
        tasks.spawn(async move {
            let _p = sem.acquire().await;
            let mut h = hello("bench", &format!("node-{i}"), "00000000-0000-4000-8000-000000000001");
            h.status_port = u32::from(port);
            h.inventory = Some(Inventory {
                hostname: format!("node-{i}"),
                interfaces: vec![NetworkInterface {
                    name: "eth0".into(),
                    addresses: vec![format!("127.10.{}.{}/8", i / 250, i % 250 + 1)],
                    ..Default::default()
                }],
                ..Default::default()
            });
            AgentConn::connect(&url, h).await.expect("hello");
        });
    }
    while tasks.join_next().await.is_some() {}
    eprintln!("registered in {:?}", started.elapsed());

    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let config = dir.path().join("detector.toml");
    std::fs::write(
        &config,
        format!("name = \"bench\"\ncenter = \"{url}\"\ninsecure = true\nkubelet_port = {port}\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n"),
    )
    .unwrap();
    let mut detector = Command::new(target_dir().join("release/nodekeeper-detector"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the detector (cargo build --release --workspace --bins)");
    let metrics = format!("http://127.0.0.1:{metrics_port}/metrics");
    let probes = || async { metric(&http_get(&metrics).await, "nodekeeper_detector_probes_total").unwrap_or(0.0) };
    // Warm up: the first sweep is spread over the first interval.
    wait_for("the first sweep", Duration::from_secs(120), || async {
        (probes().await >= targets as f64).then_some(())
    })
    .await;
    let pid = detector.id();
    let (p0, c0, t0) = (probes().await, proc_usage(pid).unwrap().cpu, Instant::now());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (p1, c1, window) = (probes().await, proc_usage(pid).unwrap(), t0.elapsed());
    let failed = metric(&http_get(&metrics).await, "nodekeeper_detector_probes_failed_total").unwrap_or(0.0);
    let _ = detector.kill();
    let _ = detector.wait();
    let cpu = (c1.cpu - c0).as_secs_f64() / window.as_secs_f64() * 100.0;
    println!(
        "| targets | sweep | window | probes in window | failed probes | detector CPU (% of a core) | detector RSS |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {targets} | 30 s | {:.0} s | {:.0} | {failed:.0} | **{cpu:.2} %** | {:.1} MiB |",
        window.as_secs_f64(),
        p1 - p0,
        c1.rss_bytes as f64 / 1048576.0
    );
    assert!(p1 - p0 >= targets as f64 * (window.as_secs_f64() / 30.0) * 0.9, "not every target was probed each sweep");
}
